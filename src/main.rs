//! The `twinroute` binary: everything is in the library; see `twinroute --help`.

fn main() -> std::process::ExitCode {
    twinroute::cli::main()
}
