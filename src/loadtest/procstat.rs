//! The daemon's CPU time and resident set, read from `/proc` (Linux), for the load test's
//! timeline: how many cores a given rate costs, and whether memory grows during a run.
//!
//! The parsers are pure functions over the files' text; [`ProcSampler`] does the reading.

use std::io;
use std::time::Instant;

/// Clock ticks per second assumed when `sysconf` cannot tell: USER_HZ, which the Linux ABI fixes
/// at 100 for the times in `/proc/<pid>/stat` whatever the kernel's internal HZ.
const DEFAULT_CLOCK_TICKS: f64 = 100.0;

/// One reading of a process, compared with the previous one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// CPU seconds used (user + system, all threads) since the previous sample, divided by the
    /// wall seconds since it: 1.0 is one core busy the whole time.
    pub cpu_cores: f64,
    /// CPU seconds (user + system, all threads) the process has used since it started.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
}

/// A process's use over a sampler's whole life, for the report's summary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcTotals {
    /// CPU seconds used from [`ProcSampler::new`] to the last sample, divided by the wall seconds
    /// between them (0 before the first sample).
    pub cpu_cores_mean: f64,
    /// The largest resident set seen, bytes (the reading in `new` included).
    pub rss_bytes_max: u64,
}

/// Samples one process's CPU time and resident set from `/proc/<pid>`.
#[derive(Debug)]
pub struct ProcSampler {
    /// The process sampled.
    pid: u32,
    /// Clock ticks per second of `utime` and `stime` in `/proc/<pid>/stat`.
    ticks_per_second: f64,
    /// When `new` took its reading, and the CPU seconds then: the origin of [`ProcTotals`].
    first_at: Instant,
    first_cpu_seconds: f64,
    /// The latest reading: the next sample's `cpu_cores` counts from here.
    last_at: Instant,
    last_cpu_seconds: f64,
    /// The largest resident set seen so far, bytes.
    rss_bytes_max: u64,
}

impl ProcSampler {
    /// Starts sampling process `pid`, taking a first reading; fails (naming the pid) when
    /// `/proc/<pid>` cannot be read, e.g. because the process is gone or this is not Linux.
    pub fn new(pid: u32) -> io::Result<Self> {
        let ticks_per_second = clock_ticks_per_second();
        let (at, cpu_seconds, rss_bytes) = read(pid, ticks_per_second)?;
        Ok(Self {
            pid,
            ticks_per_second,
            first_at: at,
            first_cpu_seconds: cpu_seconds,
            last_at: at,
            last_cpu_seconds: cpu_seconds,
            rss_bytes_max: rss_bytes,
        })
    }

    /// Reads the process now; `cpu_cores` covers the time since the previous sample (or `new`).
    pub fn sample(&mut self) -> io::Result<ProcSample> {
        let (at, cpu_seconds, rss_bytes) = read(self.pid, self.ticks_per_second)?;
        let cpu_cores =
            cores(cpu_seconds - self.last_cpu_seconds, at.duration_since(self.last_at).as_secs_f64());
        self.last_at = at;
        self.last_cpu_seconds = cpu_seconds;
        self.rss_bytes_max = self.rss_bytes_max.max(rss_bytes);
        Ok(ProcSample { cpu_cores, cpu_seconds, rss_bytes })
    }

    /// Mean CPU use and peak resident set from `new` to the latest sample.
    pub fn totals(&self) -> ProcTotals {
        ProcTotals {
            cpu_cores_mean: cores(
                self.last_cpu_seconds - self.first_cpu_seconds,
                self.last_at.duration_since(self.first_at).as_secs_f64(),
            ),
            rss_bytes_max: self.rss_bytes_max,
        }
    }
}

/// CPU seconds per wall second; 0 when no wall time passed.
fn cores(cpu_seconds: f64, wall_seconds: f64) -> f64 {
    if wall_seconds > 0.0 {
        (cpu_seconds / wall_seconds).max(0.0)
    } else {
        0.0
    }
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`: (when, CPU seconds, resident bytes).
fn read(pid: u32, ticks_per_second: f64) -> io::Result<(Instant, f64, u64)> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&stat_path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read process {pid}'s CPU time from {stat_path}: {e} (is the process running, on Linux?)"),
        )
    })?;
    let at = Instant::now();
    let status_path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&status_path).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot read process {pid}'s memory from {status_path}: {e}"))
    })?;
    let ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("process {pid}: unexpected {stat_path}: {stat:?}"))
    })?;
    let rss_bytes = parse_status_rss_bytes(&status).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("process {pid}: no VmRSS line in {status_path}"))
    })?;
    Ok((at, ticks as f64 / ticks_per_second, rss_bytes))
}

/// `utime + stime` (fields 14 and 15, clock ticks, all threads) of a `/proc/<pid>/stat` line.
///
/// The command name (field 2) is in parentheses and may itself contain spaces and `)`, so the
/// fields are counted from the line's last `)`.
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After the name: state (field 3), ..., utime (14), stime (15).
    let mut fields = after_comm.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The resident set in bytes from `/proc/<pid>/status`'s `VmRSS:   1234 kB` line.
fn parse_status_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    // The kernel always writes kB (KiB); refuse anything else rather than misreport.
    (parts.next()? == "kB").then_some(kib * 1024)
}

/// The unit of `utime` and `stime`, as the C library reports it.
#[cfg(unix)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: `sysconf` takes an integer and returns an integer; it reads no memory of ours and
    // has no preconditions. An unknown name gives -1, handled below.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        DEFAULT_CLOCK_TICKS
    }
}

/// The unit of `utime` and `stime`; without `sysconf`, Linux's fixed USER_HZ.
#[cfg(not(unix))]
fn clock_ticks_per_second() -> f64 {
    DEFAULT_CLOCK_TICKS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hint::black_box;
    use std::time::Duration;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // utime 250, stime 50; the name holds ") (" and spaces to mislead a naive split.
        let stat = "4242 (tw) (in route) S 1 4242 4242 0 -1 4194560 1200 0 3 0 250 50 7 9 20 0 \
                    12 0 98765 123456789 2345 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 \
                    1 0 0 0 0 0\n";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None, "too few fields");
        assert_eq!(parse_stat_cpu_ticks("4242 no name"), None);
    }

    #[test]
    fn rss_comes_from_the_vmrss_line_in_kib() {
        let status = "Name:\ttwinroute\nVmPeak:\t  900 kB\nVmRSS:\t   20480 kB\nThreads:\t5\n";
        assert_eq!(parse_status_rss_bytes(status), Some(20480 * 1024));
        assert_eq!(parse_status_rss_bytes("Name:\tkthreadd\n"), None, "kernel threads have no VmRSS");
    }

    #[test]
    fn busy_cpu_shows_as_cores_and_seconds() {
        let mut sampler = ProcSampler::new(std::process::id()).expect("our own /proc entry");
        let before = sampler.sample().unwrap();
        let start = Instant::now();
        let mut x = 1u64;
        while start.elapsed() < Duration::from_millis(200) {
            for _ in 0..10_000 {
                x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
            }
        }
        black_box(x);
        let after = sampler.sample().unwrap();
        assert!(after.cpu_cores > 0.3, "a busy thread should show, got {} cores", after.cpu_cores);
        assert!(after.cpu_seconds > before.cpu_seconds, "{after:?} after {before:?}");
        let totals = sampler.totals();
        assert!(totals.cpu_cores_mean > 0.0, "{totals:?}");
    }

    #[test]
    fn touched_memory_shows_in_the_resident_set() {
        let mut sampler = ProcSampler::new(std::process::id()).expect("our own /proc entry");
        let before = sampler.sample().unwrap();
        assert!(before.rss_bytes > 1 << 20, "a test process holds more than 1 MB: {before:?}");
        // Zeroed allocations may be mapped lazily; writing a byte per page makes them resident.
        let mut block = vec![0u8; 64 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        black_box(&mut block);
        let after = sampler.sample().unwrap();
        drop(block);
        assert!(
            after.rss_bytes >= before.rss_bytes + (32 << 20),
            "64 MiB touched: {} -> {} bytes",
            before.rss_bytes,
            after.rss_bytes
        );
        assert!(sampler.totals().rss_bytes_max >= after.rss_bytes);
    }

    #[test]
    fn a_missing_process_is_an_error_naming_it() {
        // Above the kernel's largest pid_max (2^22), so never a live process.
        let pid = u32::MAX - 7;
        let error = ProcSampler::new(pid).unwrap_err();
        assert!(error.to_string().contains(&pid.to_string()), "{error}");
    }
}
