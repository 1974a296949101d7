//! The `twinroute` binary: everything is in the library; see `twinroute --help`.

/// mimalloc instead of the C library's allocator: per event, twinroute makes and frees many
/// small allocations (parsed attributes, messages, frames), and glibc's malloc and free were a
/// fifth of the daemon's instructions at a steady 1,000 events/s (callgrind; before/after in
/// `benches/RESULTS.md`). Built without transparent huge pages (`no_thp`): with them, mimalloc's
/// arenas took the resident set from 20 to 31 MB at that rate.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    twinroute::cli::main()
}
