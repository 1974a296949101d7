//! The `twinroute loadtest` command line.

use crate::cli::{runtime, EXIT_USAGE};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The daemon's ingest URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Events per second in total, on a fixed schedule (open loop); `max` sends as fast as the
    /// daemon takes them.
    #[arg(long, default_value = "1000")]
    rate: String,
    /// How long to send: 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = crate::loadtest::parse_duration)]
    duration: std::time::Duration,
    /// Events per request.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    connections: u32,
    /// Twins in the generated population.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    twins: u32,
    /// Seed of the generated stream (the same seed, the same events).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pad each event's data to about this many bytes (0: as generated, about 400).
    #[arg(long, default_value_t = 0)]
    payload_bytes: usize,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// `twinroute loadtest`.
pub fn main(args: LoadtestArgs) -> ExitCode {
    let rate = match args.rate.as_str() {
        "max" => None,
        text => match text.parse::<f64>() {
            Ok(r) if r > 0.0 && r.is_finite() => Some(r),
            _ => {
                eprintln!("twinroute: --rate {text:?}: give events per second (> 0) or max");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let options = crate::loadtest::LoadOptions {
        target: args.target,
        rate,
        duration: args.duration,
        batch: args.batch as usize,
        connections: args.connections as usize,
        twins: args.twins as usize,
        seed: args.seed,
        payload_bytes: args.payload_bytes,
    };
    let runtime = match runtime(true) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let report = runtime.block_on(crate::loadtest::run(&options, |elapsed, accepted| {
        eprintln!("  {:>5.1} s  {accepted} events accepted", elapsed.as_secs_f64());
    }));
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(e) = std::fs::write(path, text + "\n") {
            eprintln!("twinroute: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.errors > 0 {
        for e in &report.error_samples {
            eprintln!("twinroute: request failed: {e}");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

