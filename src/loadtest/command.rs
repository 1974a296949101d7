//! The `twinroute loadtest` command line.

use super::compare::{CompareOptions, Spool};
use super::scaleout::ScaleoutOptions;
use super::{HttpIngest, LoadOptions, Observers};
use crate::cli::{runtime, EXIT_USAGE};
use crate::config::EXIT_CONFIG;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Exit statuses beyond the usual ones.
pub const EXIT_STATUS_HELP: &str =
    "Exit status: 0 the run completed without errors; 1 some requests failed or \
(--compare) events were lost, or (--scaleout) a round did not route every event; 64 bad arguments; 78 (--endpoints) the configuration is invalid.";

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The daemon's ingest URL (the default target).
    #[arg(long, default_value = "http://127.0.0.1:8080", conflicts_with_all = ["endpoints", "compare", "scaleout"])]
    target: String,
    /// Instead of a daemon's ingest: this configuration's endpoints, through twinroute's delivery
    /// pipeline in this process (to load what consumes them).
    #[arg(long, value_name = "CONFIG", conflicts_with_all = ["compare", "scaleout"])]
    endpoints: Option<PathBuf>,
    /// Measure twinroute against the SDK straight to an in-process Event Hubs / Service Bus
    /// stand-in, in one run: 10 routes, 3 endpoints; end-to-end latency, throughput ratio, the
    /// daemon's CPU and memory.
    #[arg(long, conflicts_with = "scaleout")]
    compare: bool,
    /// Measure how fast groups of twinroute replicas drain an Event Hubs hub of 8 partitions
    /// (an `eventhubs` source with Blob checkpoints), one round per replica count: e.g. 1,2,3.
    /// Needs a Blob service for the checkpoints (--blob-service).
    #[arg(long, value_name = "COUNTS", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=16), requires = "blob_service")]
    scaleout: Vec<u32>,
    /// With --scaleout: events in each round's backlog.
    #[arg(long, value_name = "N", default_value_t = 50_000, value_parser = clap::value_parser!(u32).range(1..))]
    events: u32,
    /// With --scaleout: the Blob service's account URL for checkpoints and ownership (a
    /// container is created for the run and deleted after it), authenticated with the managed
    /// identity of an in-process IMDS stand-in: Azurite started by `scripts/azurite start`
    /// (https://127.0.0.1:10000/devstoreaccount1).
    #[arg(long, value_name = "URL")]
    blob_service: Option<String>,
    /// With --scaleout: extra CA certificates (PEM) to trust for the Blob service.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// With --scaleout: the longest one round may take.
    #[arg(long, default_value = "120s", value_parser = crate::loadtest::parse_duration)]
    round_limit: std::time::Duration,
    /// With --compare or --scaleout: the daemon's spool.
    #[arg(long, value_enum, default_value = "memory")]
    spool: SpoolArg,
    /// With --compare: the event hubs' partition key, `twin_id` (twinroute's default: a message
    /// per twin per batch) or `none` (a message per batch), for both phases.
    #[arg(long, value_name = "KEY", default_value = "twin_id", value_parser = ["twin_id", "none"], requires = "compare")]
    partition_key: String,
    /// With --compare: events per send in the baseline (default: --batch). twinroute gathers
    /// the events of many requests into each delivery; this gives the SDK the same advantage.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10000), requires = "compare")]
    baseline_batch: Option<u32>,
    /// With --compare or --scaleout: the twinroute binary to run as the daemon (default: this one).
    #[arg(long, value_name = "PATH")]
    daemon: Option<PathBuf>,
    /// A file holding the bearer token the daemon's ingest requires (its first line; the token
    /// is not taken on the command line, where other users could read it).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["endpoints", "compare", "scaleout"])]
    token_file: Option<PathBuf>,
    /// The daemon's process id, to read its CPU and memory use from /proc while loading it.
    #[arg(long, conflicts_with_all = ["endpoints", "compare", "scaleout"])]
    pid: Option<u32>,
    /// Events per second in total, on a fixed schedule (open loop); `FROM..TO` ramps linearly
    /// from FROM at the start to TO at the end; `max` sends as fast as the target takes them.
    #[arg(long, default_value = "1000")]
    rate: String,
    /// How long to send: 10s, 500ms, 2m.
    #[arg(long, default_value = "10s", value_parser = crate::loadtest::parse_duration)]
    duration: std::time::Duration,
    /// Sent first but left out of the percentiles (connections opening, links attaching); the
    /// timeline and counts include it.
    #[arg(long, default_value = "1s", value_parser = crate::loadtest::parse_duration_or_zero)]
    warmup: std::time::Duration,
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
    /// Draw throughput and latency over time as an SVG chart in FILE (with --compare, also
    /// FILE's name with `-baseline` for the baseline).
    #[arg(long, value_name = "FILE")]
    chart: Option<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SpoolArg {
    Memory,
    Disk,
}

/// `twinroute loadtest`.
pub fn main(args: LoadtestArgs) -> ExitCode {
    let (rate, ramp_to) = match parse_rate(&args.rate) {
        Ok(r) => r,
        Err(message) => {
            eprintln!("twinroute: --rate {:?}: {message}", args.rate);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let options = LoadOptions {
        target: args.target.clone(),
        rate,
        ramp_to,
        duration: args.duration,
        batch: args.batch as usize,
        connections: args.connections as usize,
        twins: args.twins as usize,
        seed: args.seed,
        payload_bytes: args.payload_bytes,
        warmup: args.warmup,
    };
    let runtime = match runtime(0) {
        Ok(r) => r,
        Err(code) => return code,
    };
    if args.compare {
        return runtime.block_on(compare(&args, options));
    }
    if !args.scaleout.is_empty() {
        return runtime.block_on(scaleout(&args));
    }
    let report = if let Some(path) = &args.endpoints {
        let config = match crate::config::Config::load(Some(path)) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("twinroute: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        };
        runtime.block_on(async {
            let pipeline = match super::direct::Pipeline::start(config).await {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    eprintln!("twinroute: {e}");
                    return Err(ExitCode::FAILURE);
                }
            };
            let observers = Observers { progress: !args.quiet, ..Default::default() };
            let mut report = super::run(&options, pipeline.clone(), observers).await;
            report.target = format!("endpoints of {} (delivery pipeline)", path.display());
            eprintln!("twinroute: load sent; draining the queues");
            let Ok(pipeline) = Arc::try_unwrap(pipeline) else { unreachable!("the load's tasks have ended") };
            for t in pipeline.finish().await {
                eprintln!(
                    "  endpoint {}: {} delivered, {} dead-lettered, {} dropped, {} undelivered",
                    t.endpoint, t.delivered, t.dead_lettered, t.dropped, t.undelivered
                );
                if t.dead_lettered + t.dropped + t.undelivered > 0 {
                    report.errors += 1;
                    report.error_samples.push(format!("endpoint {} did not take every event", t.endpoint));
                }
            }
            Ok(report)
        })
    } else {
        let process = match args.pid.map(super::procstat::ProcSampler::new) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                eprintln!("twinroute: --pid: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };
        let mut target = HttpIngest::new(&args.target, options.connections);
        if let Some(path) = &args.token_file {
            let token = match std::fs::read_to_string(path) {
                Ok(text) => text.lines().next().unwrap_or("").trim().to_owned(),
                Err(e) => {
                    eprintln!("twinroute: --token-file {}: {e}", path.display());
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            target = match target.with_token(&token) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("twinroute: --token-file {}: {e}", path.display());
                    return ExitCode::from(EXIT_USAGE);
                }
            };
        }
        let target = Arc::new(target);
        let observers = Observers { process, progress: !args.quiet, ..Default::default() };
        let mut report = runtime.block_on(super::run(&options, target, observers));
        report.target = args.target.clone();
        Ok(report)
    };
    let report = match report {
        Ok(r) => r,
        Err(code) => return code,
    };
    println!("{}", report.table());
    if let Err(code) = write_json(&args, &report) {
        return code;
    }
    if let Some(path) = &args.chart {
        if let Err(code) = write(path, super::chart::svg(&report.target, &report.timeline)) {
            return code;
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

/// `--rate`: `max`, events per second, or a ramp `FROM..TO` (events per second at the start and
/// at the end).
fn parse_rate(text: &str) -> Result<(Option<f64>, Option<f64>), String> {
    let positive = |t: &str| match t.trim().parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(r),
        _ => Err("give events per second (> 0), a ramp FROM..TO (e.g. 100..2000) or max".to_owned()),
    };
    match text.split_once("..") {
        _ if text == "max" => Ok((None, None)),
        Some((from, to)) => Ok((Some(positive(from)?), Some(positive(to)?))),
        None => Ok((Some(positive(text)?), None)),
    }
}

/// The binary to run as the daemon: --daemon, or this one.
fn daemon_binary(args: &LoadtestArgs) -> Result<PathBuf, ExitCode> {
    match &args.daemon {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe().map_err(|e| {
            eprintln!("twinroute: cannot find this program's path ({e}); give --daemon");
            ExitCode::FAILURE
        }),
    }
}

fn spool(args: &LoadtestArgs) -> Spool {
    match args.spool {
        SpoolArg::Memory => Spool::Memory,
        SpoolArg::Disk => Spool::Disk,
    }
}

async fn scaleout(args: &LoadtestArgs) -> ExitCode {
    let daemon = match daemon_binary(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let options = ScaleoutOptions {
        replicas: args.scaleout.iter().map(|&n| n as usize).collect(),
        events: args.events as usize,
        twins: args.twins as usize,
        seed: args.seed,
        payload_bytes: args.payload_bytes,
        blob_service: args.blob_service.clone().unwrap_or_default(),
        ca_file: args.ca_file.clone(),
        daemon,
        spool: spool(args),
        round_limit: args.round_limit,
        progress: !args.quiet,
    };
    let report = match super::scaleout::run(&options).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("twinroute: the scale-out run could not run: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.table());
    if let Err(code) = write_json(args, &report) {
        return code;
    }
    if report.rounds.iter().all(|r| r.complete) {
        ExitCode::SUCCESS
    } else {
        eprintln!("twinroute: not every event was routed in every round");
        ExitCode::FAILURE
    }
}

async fn compare(args: &LoadtestArgs, load: LoadOptions) -> ExitCode {
    let daemon = match daemon_binary(args) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let spool = spool(args);
    let by_twin = args.partition_key == "twin_id";
    let options = CompareOptions {
        load,
        spool,
        by_twin,
        baseline_batch: args.baseline_batch.map(|b| b as usize),
        daemon,
        progress: !args.quiet,
    };
    let report = match super::compare::run(&options).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("twinroute: the comparison could not run: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", report.table());
    if let Err(code) = write_json(args, &report) {
        return code;
    }
    if let Some(path) = &args.chart {
        let baseline_path = sibling(path, "-baseline");
        let key = if report.partition_key == "twin_id" { "twin id" } else { "none" };
        let title = format!("twinroute, {:?} spool, partition key {key}", report.spool).to_lowercase();
        if let Err(code) = write(path, super::chart::svg(&title, &report.twinroute.timeline)) {
            return code;
        }
        let title = format!("baseline: the SDK straight to the stand-in, partition key {key}");
        if let Err(code) = write(&baseline_path, super::chart::svg(&title, &report.baseline.timeline)) {
            return code;
        }
    }
    let mut failed = false;
    for (phase, r) in [("baseline", &report.baseline), ("twinroute", &report.twinroute)] {
        for e in &r.error_samples {
            eprintln!("twinroute: {phase}: request failed: {e}");
        }
        failed |= r.errors > 0;
    }
    let received = report.twinroute.received.unwrap_or(0);
    if received < report.twinroute_delivered || report.twinroute_delivered == 0 {
        eprintln!(
            "twinroute: twinroute reports {} events delivered but the stand-in received {received}",
            report.twinroute_delivered
        );
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `dir/name<suffix>.ext` next to `path`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}{suffix}"),
    };
    path.with_file_name(name)
}

fn write(path: &Path, text: String) -> Result<(), ExitCode> {
    std::fs::write(path, text).map_err(|e| {
        eprintln!("twinroute: cannot write {}: {e}", path.display());
        ExitCode::FAILURE
    })
}

fn write_json(args: &LoadtestArgs, report: &impl serde::Serialize) -> Result<(), ExitCode> {
    match &args.json {
        Some(path) => {
            write(path, serde_json::to_string_pretty(report).expect("the report serializes") + "\n")
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates_are_a_number_a_ramp_or_max() {
        assert_eq!(parse_rate("max"), Ok((None, None)));
        assert_eq!(parse_rate("1000"), Ok((Some(1000.0), None)));
        assert_eq!(parse_rate("100..2000"), Ok((Some(100.0), Some(2000.0))));
        assert_eq!(parse_rate("2000..100"), Ok((Some(2000.0), Some(100.0))));
        for bad in ["0", "-5", "fast", "100..", "..100", "0..100", "100..max", "NaN"] {
            assert!(parse_rate(bad).unwrap_err().contains("FROM..TO"), "{bad}");
        }
    }
}
