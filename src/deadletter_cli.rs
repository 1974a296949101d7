//! `twinroute deadletter list|replay`: an endpoint's dead letters read back from its dead-letter
//! container, and delivered again through the daemon's own sink.
//!
//! Dead letters are the blobs `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.json` the delivery
//! workers write (see [`crate::delivery::deadletter`]): a structured CloudEvent, with why it was
//! given up on as blob metadata. `list` prints them; `replay` delivers each again at a bounded
//! rate and deletes a blob only once its event was delivered, so a replay that stopped (an outage,
//! Ctrl-C) is finished by running it again.
//!
//! Layout: the pure parts first (`--since`, blob names and the prefixes worth listing, the table,
//! the backoff), then the IO: opening the endpoint's store, reading dead letters, the two commands.

use crate::cli::{EXIT_BAD_FILTER, EXIT_DATA};
use crate::config::{Config, EndpointConfig, EndpointType, EXIT_CONFIG};
use crate::delivery::deadletter::{META_ATTEMPTS, META_FIRST_ATTEMPT, META_LAST_ERROR, META_REASON};
use crate::delivery::Envelope;
use crate::event::{describe_problems, parse_structured, CloudEvent};
use crate::filter::Filter;
use crate::identity::IdentityProvider;
use crate::sinks::blob::{BlobError, BlobWriter, StoredBlob};
use crate::sinks::http::redact_urls;
use crate::sinks::{DefaultSinkFactory, DeliveryOutcome, Sink, SinkFactory};
use clap::{Args, Subcommand};
use futures::{Stream, StreamExt as _};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::{Date, Month, OffsetDateTime, UtcOffset};

/// Exit status when a replay did not finish (dead letters were left in place) or the dead-letter
/// container could not be read.
pub const EXIT_INCOMPLETE: u8 = 1;
/// Exit status for an invalid `--since` (`EX_DATAERR`, as for other bad input).
pub const EXIT_BAD_SINCE: u8 = EXIT_DATA;

/// The exit statuses, for `--help` (the README's `## Dead letters` section says the same).
pub const EXIT_STATUS_HELP: &str = "Exit status:
  0   success
  1   replay incomplete: dead letters were left in place (a failure, a refusal, Ctrl-C),
      or the dead-letter container could not be read
  2   invalid --filter (the error shows where, with a caret)
  65  invalid --since
  78  configuration problem: a bad configuration file, no such endpoint, or an endpoint
      without a dead-letter store (dead_letter_secret / dead_letter_uri)";

/// Replay rate when `--rate` is not given: fast enough to empty a store of thousands in a minute,
/// slow enough not to trip a destination's throttling at once.
pub const DEFAULT_RATE: u32 = 100;
/// Attempts per event while the destination fails transiently (or a blob delete does), before
/// the replay stops: an outage is not waited out here, the replay is run again later.
const REPLAY_ATTEMPTS: u32 = 4;
/// The first wait after a transient failure; each next one doubles (0.5 s, 1 s, 2 s).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between attempts, even when the destination's `Retry-After` asks for more:
/// a replay is interactive.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Blobs read ahead of the one being printed or replayed (hides the read round trips).
const READ_AHEAD: usize = 8;
/// Characters of the last error shown in the `list` table (the full text is in `--json`).
const LAST_ERROR_WIDTH: usize = 60;
/// Dead letters are named by the writer's clock: one running ahead of this host's by up to this
/// much is still listed by `--since`.
const CLOCK_SKEW: time::Duration = time::Duration::hours(1);
/// With `--since` far in the past, listing prefix by prefix would take more requests than one
/// listing of the endpoint's folder: past this many, the folder is listed and filtered by name.
const MAX_PREFIXES: usize = 200;

/// `twinroute deadletter ...`.
#[derive(Debug, Subcommand)]
pub enum DeadletterCommand {
    /// List an endpoint's dead letters: hour, event id, type, subject, why, attempts and last
    /// error, then a count by reason.
    #[command(after_help = EXIT_STATUS_HELP)]
    List {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Print NDJSON instead, for scripts: one object per dead letter,
        /// {"blob", "hour", "event", "metadata"} (the count goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Deliver dead letters to their endpoint again (with the endpoint's own sink, credentials
    /// and wire format), deleting each blob once its event was delivered.
    #[command(after_help = EXIT_STATUS_HELP)]
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Events per second at most.
        #[arg(long, value_name = "N", default_value_t = DEFAULT_RATE,
              value_parser = clap::value_parser!(u32).range(1..))]
        rate: u32,
        /// Only list what would be replayed; deliver and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Stop at the first event the endpoint refuses (or that cannot be read), instead of
        /// leaving it in place and going on with the next.
        #[arg(long)]
        stop_on_error: bool,
    },
}

/// Which dead letters: the arguments `list` and `replay` share.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// The endpoint whose dead letters to read (its name in the configuration).
    #[arg(long, value_name = "NAME")]
    pub endpoint: String,
    /// Configuration file (TOML) defining the endpoint and its dead-letter store.
    #[arg(long, short, env = "TWINROUTE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Only dead letters from this time on (whole hours, UTC): an RFC 3339 time
    /// (2024-03-05T07:00:00Z) or a duration back from now (30m, 24h, 7d).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only dead letters whose event matches this filter (the route filter language).
    #[arg(long, value_name = "EXPR")]
    pub filter: Option<String>,
}

/// The checked selection.
struct Selection {
    endpoint: String,
    config: Option<PathBuf>,
    /// The start of the first hour folder to read.
    since: Option<OffsetDateTime>,
    filter: Option<Filter>,
}

/// Runs `twinroute deadletter ...`; returns the exit status.
pub fn main(command: DeadletterCommand) -> ExitCode {
    let (args, mode) = match command {
        DeadletterCommand::List { selection, json } => (selection, Mode::List { json }),
        DeadletterCommand::Replay { selection, rate, dry_run, stop_on_error } => {
            (selection, Mode::Replay(ReplayOptions { rate, dry_run, stop_on_error }))
        }
    };
    let selection = match check_args(args, OffsetDateTime::now_utc()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let config = match Config::load(selection.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinroute: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let Some(endpoint) = config.endpoints.get(&selection.endpoint).cloned() else {
        let known: Vec<&str> = config.endpoints.keys().map(String::as_str).collect();
        eprintln!(
            "twinroute: configuration {} has no endpoint {:?}{}",
            config.origin,
            selection.endpoint,
            if known.is_empty() { String::new() } else { format!(" (its endpoints: {})", known.join(", ")) }
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    if endpoint.dead_letter.is_none() {
        return no_dead_letter_store(&endpoint, &config.origin);
    }
    // The sinks log through `tracing`; a command line shows their warnings only (RUST_LOG overrides).
    let mut log = config.log.clone();
    log.level = "warn".into();
    crate::telemetry::init_logging(&log);
    let runtime = match crate::cli::runtime(1) {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let identity = Arc::new(IdentityProvider::new(&config.identity, None));
        let factory = DefaultSinkFactory::new(identity);
        let reader = match factory.dead_letter_writer(&endpoint) {
            Ok(Some(w)) => w,
            Ok(None) => return no_dead_letter_store(&endpoint, &config.origin),
            Err(e) => {
                eprintln!("twinroute: {e}");
                return ExitCode::from(EXIT_CONFIG as u8);
            }
        };
        let store = Store { endpoint, factory, reader };
        match mode {
            Mode::List { json } => list(&store, &selection, json).await,
            Mode::Replay(options) => replay(&store, &selection, &options).await,
        }
    })
}

fn no_dead_letter_store(endpoint: &EndpointConfig, origin: &str) -> ExitCode {
    let name = &endpoint.name;
    let what_to_do = match endpoint.endpoint_type {
        EndpointType::File | EndpointType::Stdout => {
            format!("{} endpoints cannot have one", endpoint.endpoint_type)
        }
        _ => format!(
            "set dead_letter_secret (a container SAS URL; key-based endpoints) or dead_letter_uri \
             (identity-based endpoints) in [endpoints.{name}] of {origin}"
        ),
    };
    eprintln!(
        "twinroute: endpoint {name} has no dead-letter store (its events are dropped when given up on): \
         {what_to_do}"
    );
    ExitCode::from(EXIT_CONFIG as u8)
}

enum Mode {
    List { json: bool },
    Replay(ReplayOptions),
}

struct ReplayOptions {
    rate: u32,
    dry_run: bool,
    stop_on_error: bool,
}

/// Checks `--filter` (exit 2) and `--since` (exit 65) before anything is read.
fn check_args(args: SelectionArgs, now: OffsetDateTime) -> Result<Selection, ExitCode> {
    let filter = match args.filter.as_deref().map(Filter::parse).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("twinroute: invalid filter: {e}");
            return Err(ExitCode::from(EXIT_BAD_FILTER));
        }
    };
    let since = match args.since.as_deref().map(|s| parse_since(s, now)).transpose() {
        Ok(s) => s.map(start_of_hour),
        Err(e) => {
            eprintln!("twinroute: {e}");
            return Err(ExitCode::from(EXIT_BAD_SINCE));
        }
    };
    Ok(Selection { endpoint: args.endpoint, config: args.config, since, filter })
}

// ---- The pure parts ----------------------------------------------------------------------------

/// `--since`: an RFC 3339 time, or a duration back from `now` (`90s`, `30m`, `24h`, `7d`, `2w`).
pub fn parse_since(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let bad = || {
        format!(
            "--since {text:?}: expected an RFC 3339 time (2024-03-05T07:00:00Z) or a duration back \
             from now (30m, 24h, 7d)"
        )
    };
    let text = text.trim();
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t.to_offset(UtcOffset::UTC));
    }
    let unit_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(unit_at);
    let number: i64 = number.parse().map_err(|_| bad())?;
    let seconds_per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    number
        .checked_mul(seconds_per)
        .and_then(|s| now.checked_sub(time::Duration::seconds(s)))
        .ok_or_else(|| format!("--since {text:?}: too far back"))
}

/// The start of the hour holding `t`, in UTC.
fn start_of_hour(t: OffsetDateTime) -> OffsetDateTime {
    let t = t.to_offset(UtcOffset::UTC);
    t.replace_time(time::Time::from_hms(t.hour(), 0, 0).unwrap_or(time::Time::MIDNIGHT))
}

/// `2024-03-05T07`: an hour folder as the table shows it.
fn hour_label(hour: OffsetDateTime) -> String {
    format!("{:04}-{:02}-{:02}T{:02}", hour.year(), u8::from(hour.month()), hour.day(), hour.hour())
}

/// The hour folder of a dead-letter blob `<endpoint>/<yyyy>/<mm>/<dd>/<hh>/<event-id>.json`, or
/// `None` when the name is not one (another endpoint's, or some other blob).
pub fn blob_hour(endpoint: &str, name: &str) -> Option<OffsetDateTime> {
    let rest = name.strip_prefix(endpoint)?.strip_prefix('/')?;
    let mut parts = rest.splitn(5, '/');
    let mut number = |len: usize| {
        let p = parts.next()?;
        (p.len() == len && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse::<u16>().ok()).flatten()
    };
    let (year, month, day, hour) = (number(4)?, number(2)?, number(2)?, number(2)?);
    let file = parts.next()?;
    if file.contains('/') || file.len() <= ".json".len() || !file.ends_with(".json") {
        return None;
    }
    let month = Month::try_from(u8::try_from(month).ok()?).ok()?;
    let date = Date::from_calendar_date(i32::from(year), month, u8::try_from(day).ok()?).ok()?;
    let time = time::Time::from_hms(u8::try_from(hour).ok()?, 0, 0).ok()?;
    Some(date.with_time(time).assume_utc())
}

/// The blob-name prefixes to list for dead letters from `since` on (written up to `now`): whole
/// years, months and days where they are covered entirely, so old folders are never listed; the
/// first day is listed whole and its earlier hours dropped by name. Far in the past (more than
/// `MAX_PREFIXES`), the endpoint's whole folder.
pub fn since_prefixes(endpoint: &str, since: OffsetDateTime, now: OffsetDateTime) -> Vec<String> {
    let since = since.to_offset(UtcOffset::UTC);
    let first = since.date();
    let last = (now.to_offset(UtcOffset::UTC) + CLOCK_SKEW).date().max(first);
    let mut prefixes = Vec::new();
    let mut day = first;
    while day <= last {
        if prefixes.len() > MAX_PREFIXES {
            return vec![format!("{endpoint}/")];
        }
        let (year, month) = (day.year(), day.month());
        let next = if day.ordinal() == 1 && year < last.year() {
            prefixes.push(format!("{endpoint}/{year:04}/"));
            Date::from_calendar_date(year + 1, Month::January, 1).ok()
        } else if day.day() == 1 && (year, u8::from(month)) < (last.year(), u8::from(last.month())) {
            prefixes.push(format!("{endpoint}/{year:04}/{:02}/", u8::from(month)));
            let next_year = if month == Month::December { year + 1 } else { year };
            Date::from_calendar_date(next_year, month.next(), 1).ok()
        } else {
            prefixes.push(format!("{endpoint}/{year:04}/{:02}/{:02}/", u8::from(month), day.day()));
            day.next_day()
        };
        match next {
            Some(d) => day = d,
            None => break,
        }
    }
    prefixes
}

/// `text` cut to `width` characters (an ellipsis marking the cut), on one line.
fn truncate(text: &str, width: usize) -> String {
    let one_line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if one_line.chars().count() <= width {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

const HEADER: [&str; 7] = ["HOUR (UTC)", "EVENT ID", "TYPE", "SUBJECT", "REASON", "ATTEMPTS", "LAST ERROR"];

/// The `list` table: a header and one line per row, columns aligned (the last one unpadded).
fn render_table(rows: &[[String; 7]]) -> String {
    let header = HEADER.map(str::to_owned);
    let all = || std::iter::once(&header).chain(rows);
    let mut widths = [0usize; 7];
    for row in all() {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in all() {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < row.len() {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `2 max_attempts, 1 permanent`.
fn count_text(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(reason, n)| format!("{n} {reason}")).collect::<Vec<_>>().join(", ")
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The wait before attempt `attempt + 1` after `attempt` transient failures: doubling from
/// [`FIRST_BACKOFF`], at least the destination's hint, at most [`MAX_BACKOFF`].
fn backoff(attempt: u32, hint: Option<Duration>) -> Duration {
    let doubled = FIRST_BACKOFF.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    doubled.max(hint.unwrap_or_default()).min(MAX_BACKOFF)
}

// ---- Reading dead letters ----------------------------------------------------------------------

/// The endpoint, its sink factory and its dead-letter container.
struct Store {
    endpoint: EndpointConfig,
    factory: DefaultSinkFactory,
    /// Lists, reads and deletes the dead-letter blobs.
    reader: BlobWriter,
}

/// One dead letter read back.
struct Letter {
    blob: String,
    hour: OffsetDateTime,
    body: Vec<u8>,
    metadata: BTreeMap<String, String>,
    /// The blob's body as a CloudEvent, or why it is not one.
    event: Result<CloudEvent, String>,
}

impl Letter {
    fn new(blob: String, hour: OffsetDateTime, stored: StoredBlob) -> Letter {
        let event = parse_structured(&stored.body).map_err(|p| describe_problems(&p).replace('\n', "; "));
        let metadata = stored.metadata.into_iter().collect();
        Letter { blob, hour, body: stored.body, metadata, event }
    }

    /// A metadata value (names compared without case: services may change it).
    fn meta(&self, name: &str) -> Option<&str> {
        self.metadata.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn reason(&self) -> &str {
        self.meta(META_REASON).unwrap_or("unknown")
    }

    /// The event id, or the blob's file name when the body is not an event.
    fn id(&self) -> &str {
        match &self.event {
            Ok(e) => e.id(),
            Err(_) => self.blob.rsplit('/').next().unwrap_or(&self.blob),
        }
    }

    fn row(&self) -> [String; 7] {
        let (ty, subject, error) = match &self.event {
            Ok(e) => (
                e.ty().to_owned(),
                e.subject().unwrap_or("-").to_owned(),
                self.meta(META_LAST_ERROR).map_or_else(|| "-".to_owned(), redact_urls),
            ),
            Err(why) => ("?".into(), "-".into(), format!("unreadable: {why}")),
        };
        [
            hour_label(self.hour),
            self.id().to_owned(),
            ty,
            subject,
            self.reason().to_owned(),
            self.meta(META_ATTEMPTS).unwrap_or("-").to_owned(),
            truncate(&error, LAST_ERROR_WIDTH),
        ]
    }

    /// The `--json` record.
    fn to_json(&self) -> serde_json::Value {
        let event =
            serde_json::from_slice::<serde_json::Value>(&self.body).unwrap_or(serde_json::Value::Null);
        let metadata: BTreeMap<&str, String> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), redact_urls(v))).collect();
        let mut record = serde_json::json!({
            "blob": self.blob,
            "hour": self.hour.format(&Rfc3339).unwrap_or_default(),
            "event": event,
            "metadata": metadata,
        });
        if let Err(why) = &self.event {
            record["error"] = why.as_str().into();
        }
        record
    }

    /// The envelope to deliver again. Its acceptance time is the first attempt's (what the
    /// original delivery used for blob paths and Event Grid's `eventTime` of events without one).
    fn envelope(&self) -> Option<Arc<Envelope>> {
        let event = self.event.as_ref().ok()?.clone();
        let mut envelope = Envelope::new(event);
        if let Some(first) =
            self.meta(META_FIRST_ATTEMPT).and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        {
            envelope.accepted_at = first;
        }
        Some(Arc::new(envelope))
    }
}

/// The dead-letter blobs of the selection (oldest hour first) with their hours, and how many other
/// blobs under the endpoint's folder were passed over.
async fn select_names(
    store: &Store,
    since: Option<OffsetDateTime>,
) -> Result<(Vec<(String, OffsetDateTime)>, usize), BlobError> {
    let endpoint = &store.endpoint.name;
    let prefixes = match since {
        Some(since) => since_prefixes(endpoint, since, OffsetDateTime::now_utc()),
        None => vec![format!("{endpoint}/")],
    };
    let (mut names, mut others) = (Vec::new(), 0);
    for prefix in prefixes {
        for name in store.reader.list(&prefix).await? {
            match blob_hour(endpoint, &name) {
                Some(hour) if since.is_none_or(|s| hour >= s) => names.push((name, hour)),
                Some(_) => {}
                None => others += 1,
            }
        }
    }
    Ok((names, others))
}

/// The blobs read, [`READ_AHEAD`] at a time, in order; `None` for one deleted meanwhile.
fn read_letters(
    reader: &BlobWriter,
    names: Vec<(String, OffsetDateTime)>,
) -> impl Stream<Item = (String, Result<Option<Letter>, BlobError>)> + '_ {
    futures::stream::iter(names)
        .map(move |(name, hour)| async move {
            let read = reader.get(&name).await.map(|b| b.map(|b| Letter::new(name.clone(), hour, b)));
            (name, read)
        })
        .buffered(READ_AHEAD)
}

/// Prints a line on stdout; `false` when stdout is gone (a closed pipe), so the caller can stop.
fn say(line: &str) -> bool {
    writeln!(std::io::stdout(), "{line}").is_ok()
}

/// `the dead letters of endpoint X[ since ...]`, for summaries.
fn scope(store: &Store, selection: &Selection) -> String {
    let since = selection.since.map_or(String::new(), |s| format!(" since {}", hour_label(s)));
    format!("endpoint {}{since}", store.endpoint.name)
}

// ---- list --------------------------------------------------------------------------------------

async fn list(store: &Store, selection: &Selection, json: bool) -> ExitCode {
    let (names, others) = match select_names(store, selection.since).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("twinroute: {e}");
            return ExitCode::from(EXIT_INCOMPLETE);
        }
    };
    let mut rows = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let (mut unmatched, mut unreadable) = (0, 0);
    let mut letters = std::pin::pin!(read_letters(&store.reader, names));
    while let Some((_, read)) = letters.next().await {
        let letter = match read {
            Ok(Some(letter)) => letter,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("twinroute: {e}");
                return ExitCode::from(EXIT_INCOMPLETE);
            }
        };
        match (&letter.event, &selection.filter) {
            (Ok(event), Some(filter)) if !filter.matches(event) => {
                unmatched += 1;
                continue;
            }
            (Err(_), _) => unreadable += 1,
            _ => {}
        }
        *counts.entry(letter.reason().to_owned()).or_default() += 1;
        if json {
            if !say(&letter.to_json().to_string()) {
                return ExitCode::SUCCESS;
            }
        } else {
            rows.push(letter.row());
        }
    }
    let total: usize = counts.values().sum();
    let mut summary = if total == 0 {
        format!("no dead letters of {}", scope(store, selection))
    } else {
        format!(
            "{} of {}: {}",
            plural(total, "dead letter", "dead letters"),
            scope(store, selection),
            count_text(&counts)
        )
    };
    if unmatched > 0 {
        summary.push_str(&format!("; {unmatched} more did not match the filter"));
    }
    if unreadable > 0 {
        summary.push_str(&format!("; {unreadable} of them unreadable (not a CloudEvent)"));
    }
    if others > 0 {
        summary.push_str(&format!("; {} not named as dead letters ignored", plural(others, "blob", "blobs")));
    }
    if json {
        eprintln!("{summary}");
    } else {
        if !rows.is_empty() && !say(render_table(&rows).trim_end()) {
            return ExitCode::SUCCESS;
        }
        say(&summary);
    }
    ExitCode::SUCCESS
}

// ---- replay ------------------------------------------------------------------------------------

/// What a replay did, for the final summary.
#[derive(Debug, Default)]
struct Tally {
    replayed: usize,
    skipped: usize,
    failed: usize,
    /// Deleted by someone else between listing and reading (another replay).
    gone: usize,
    /// Examined so far (the rest are left in place when the replay stops).
    seen: usize,
}

async fn replay(store: &Store, selection: &Selection, options: &ReplayOptions) -> ExitCode {
    let sink = match store.factory.build(&store.endpoint).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("twinroute: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    let (names, others) = match select_names(store, selection.since).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("twinroute: {e}");
            return ExitCode::from(EXIT_INCOMPLETE);
        }
    };
    if others > 0 {
        eprintln!(
            "twinroute: {} under {}/ not named as dead letters ignored",
            plural(others, "blob", "blobs"),
            store.endpoint.name
        );
    }
    let total = names.len();
    let interrupted = Arc::new(AtomicBool::new(false));
    let watcher = (!options.dry_run).then(|| tokio::spawn(watch_interrupt(interrupted.clone())));
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(options.rate)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tally = Tally::default();
    let mut stopped: Option<String> = None;
    let mut letters = std::pin::pin!(read_letters(&store.reader, names));
    while let Some((name, read)) = letters.next().await {
        if interrupted.load(Ordering::Acquire) {
            stopped = Some("interrupted".into());
            break;
        }
        tally.seen += 1;
        let n = format!("[{}/{total}]", tally.seen);
        let letter = match read {
            Ok(Some(letter)) => letter,
            Ok(None) => {
                tally.gone += 1;
                eprintln!("twinroute: {n} {name}: already deleted (replayed by someone else?)");
                continue;
            }
            Err(e) => {
                tally.seen -= 1;
                stopped = Some(format!("reading {name} failed: {e}"));
                break;
            }
        };
        let what = format!("{} {}", hour_label(letter.hour), letter.id());
        let Some(envelope) = letter.envelope() else {
            tally.failed += 1;
            let why = letter.event.as_ref().err().cloned().unwrap_or_default();
            say(&format!("{n} unreadable {what}: not a CloudEvent ({why}); left in place"));
            if options.stop_on_error {
                stopped = Some("--stop-on-error".into());
                break;
            }
            continue;
        };
        if selection.filter.as_ref().is_some_and(|f| !f.matches(&envelope.event)) {
            tally.skipped += 1;
            continue;
        }
        if options.dry_run {
            tally.replayed += 1;
            if !say(&format!("{n} would replay {what} {}", envelope.event.ty())) {
                return ExitCode::SUCCESS;
            }
            continue;
        }
        pace.tick().await;
        match deliver(sink.as_ref(), &envelope, &n).await {
            DeliveryOutcome::Delivered => match delete(&store.reader, &letter.blob, &n).await {
                Ok(_) => {
                    tally.replayed += 1;
                    say(&format!("{n} replayed {what} {}", envelope.event.ty()));
                }
                Err(e) => {
                    // Delivered, but the blob stays: the next replay delivers it again.
                    tally.replayed += 1;
                    stopped = Some(format!(
                        "{} was delivered but its blob could not be deleted ({e}); delete {} or the \
                         next replay delivers it again",
                        envelope.event.id(),
                        letter.blob
                    ));
                    break;
                }
            },
            DeliveryOutcome::Permanent { reason } => {
                tally.failed += 1;
                let ty = envelope.event.ty();
                say(&format!("{n} refused {what} {ty}: {}; left in place", redact_urls(&reason)));
                if options.stop_on_error {
                    stopped = Some("--stop-on-error".into());
                    break;
                }
            }
            DeliveryOutcome::Transient { reason, .. } => {
                tally.failed += 1;
                stopped = Some(format!(
                    "{} could not be delivered after {REPLAY_ATTEMPTS} attempts: {}",
                    envelope.event.id(),
                    redact_urls(&reason)
                ));
                break;
            }
            DeliveryOutcome::AuthFailure { reason } => {
                tally.failed += 1;
                stopped = Some(format!("the endpoint refused the credentials: {}", redact_urls(&reason)));
                break;
            }
            DeliveryOutcome::Partial { .. } => {
                unreachable!("deliver() resolves partial outcomes of one event")
            }
        }
    }
    if let Some(w) = watcher {
        w.abort();
    }
    if let Err(e) = sink.flush().await {
        eprintln!("twinroute: closing the endpoint's sink: {e}");
    }
    let left = total - tally.seen;
    let scope = scope(store, selection);
    if options.dry_run {
        say(&format!(
            "dry run for {scope}: {} would be replayed, {} skipped by filter, {} unreadable",
            tally.replayed, tally.skipped, tally.failed
        ));
    } else {
        say(&format!(
            "replay of {scope}: {} replayed, {} skipped by filter, {} failed, {left} left",
            tally.replayed, tally.skipped, tally.failed
        ));
    }
    if let Some(why) = &stopped {
        eprintln!(
            "twinroute: replay stopped ({why}); {} not replayed yet. Run the same command again to go on.",
            plural(left + tally.failed, "dead letter", "dead letters")
        );
    }
    if tally.gone > 0 {
        eprintln!(
            "twinroute: {} deleted by someone else meanwhile",
            plural(tally.gone, "blob was", "blobs were")
        );
    }
    if stopped.is_some() || tally.failed > 0 {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Delivers one event: transient failures are retried [`REPLAY_ATTEMPTS`] times in all with a
/// short backoff; an auth failure once, after refreshing the credentials.
async fn deliver(sink: &dyn Sink, envelope: &Arc<Envelope>, n: &str) -> DeliveryOutcome {
    let batch = std::slice::from_ref(envelope);
    let mut attempt = 1;
    let mut refreshed = false;
    loop {
        // One event: a partial outcome is the outcome of the event.
        let outcome = match sink.deliver(batch).await {
            DeliveryOutcome::Partial { delivered, rest } if delivered.is_empty() => *rest,
            DeliveryOutcome::Partial { .. } => DeliveryOutcome::Delivered,
            other => other,
        };
        match outcome {
            DeliveryOutcome::AuthFailure { .. } if !refreshed => {
                refreshed = true;
                sink.refresh_credentials().await;
            }
            DeliveryOutcome::Transient { reason, after } if attempt < REPLAY_ATTEMPTS => {
                let wait = backoff(attempt, after);
                eprintln!(
                    "twinroute: {n} {}: {}; retrying in {} ms",
                    envelope.event.id(),
                    redact_urls(&reason),
                    wait.as_millis()
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Deletes a replayed event's blob, retrying transient failures like deliveries.
async fn delete(reader: &BlobWriter, blob: &str, n: &str) -> Result<bool, BlobError> {
    let mut attempt = 1;
    loop {
        match reader.delete(blob).await {
            Err(BlobError::Transient { reason, after }) if attempt < REPLAY_ATTEMPTS => {
                let wait = backoff(attempt, after);
                eprintln!("twinroute: {n} {reason}; retrying in {} ms", wait.as_millis());
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The first Ctrl-C (or SIGTERM) stops the replay after the event in hand, so no event is
/// delivered without its blob being deleted; a second Ctrl-C exits at once.
async fn watch_interrupt(flag: Arc<AtomicBool>) {
    crate::cli::shutdown_signal().await;
    flag.store(true, Ordering::Release);
    eprintln!("twinroute: stopping after the current event (Ctrl-C again to quit at once)");
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn since_is_rfc3339_or_a_duration_back() {
        let now = datetime!(2024-03-05 07:30:15 UTC);
        assert_eq!(parse_since("2024-03-01T10:20:00+02:00", now), Ok(datetime!(2024-03-01 08:20 UTC)));
        assert_eq!(parse_since("30m", now), Ok(datetime!(2024-03-05 07:00:15 UTC)));
        assert_eq!(parse_since("24h", now), Ok(datetime!(2024-03-04 07:30:15 UTC)));
        assert_eq!(parse_since("7d", now), Ok(datetime!(2024-02-27 07:30:15 UTC)));
        assert_eq!(parse_since(" 2w", now), Ok(datetime!(2024-02-20 07:30:15 UTC)));
        for bad in ["", "yesterday", "24", "h", "-3h", "3 h", "3y", "2024-03-05", "99999999999999999999d"] {
            let e = parse_since(bad, now).unwrap_err();
            assert!(
                e.starts_with("--since") && (e.contains("RFC 3339") || e.contains("too far")),
                "{bad}: {e}"
            );
        }
        assert_eq!(start_of_hour(datetime!(2024-03-05 07:30:15 +01:00)), datetime!(2024-03-05 06:00 UTC));
    }

    #[test]
    fn blob_names_give_their_hour_folder() {
        let hour = datetime!(2024-03-05 07:00 UTC);
        assert_eq!(blob_hour("hub", "hub/2024/03/05/07/ev%2F1.json"), Some(hour));
        assert_eq!(blob_hour("hub", "hub/2024/03/05/07/a.b.json"), Some(hour));
        for other in [
            "hub-2/2024/03/05/07/e.json",
            "hu/2024/03/05/07/e.json",
            "hub/2024/03/05/07/e.ndjson",
            "hub/2024/03/05/07/.json",
            "hub/2024/03/05/07/x/e.json",
            "hub/2024/3/05/07/e.json",
            "hub/2024/13/05/07/e.json",
            "hub/2024/02/30/07/e.json",
            "hub/2024/03/05/24/e.json",
            "hub/2024/03/05/e.json",
        ] {
            assert_eq!(blob_hour("hub", other), None, "{other}");
        }
    }

    #[test]
    fn since_lists_whole_years_months_and_days_up_to_now() {
        let now = datetime!(2024-03-05 07:30 UTC);
        // The last day is listed whole; the first too (its earlier hours are dropped by name).
        assert_eq!(
            since_prefixes("hub", datetime!(2024-03-04 07:00 UTC), now),
            ["hub/2024/03/04/", "hub/2024/03/05/"]
        );
        assert_eq!(since_prefixes("hub", datetime!(2024-03-05 07:00 UTC), now), ["hub/2024/03/05/"]);
        assert_eq!(
            since_prefixes("hub", datetime!(2024-01-30 23:00 UTC), now),
            [
                "hub/2024/01/30/",
                "hub/2024/01/31/",
                "hub/2024/02/",
                "hub/2024/03/01/",
                "hub/2024/03/02/",
                "hub/2024/03/03/",
                "hub/2024/03/04/",
                "hub/2024/03/05/"
            ]
        );
        assert_eq!(
            since_prefixes("hub", datetime!(2022-12-31 05:00 UTC), datetime!(2024-02-01 00:10 UTC)),
            ["hub/2022/12/31/", "hub/2023/", "hub/2024/01/", "hub/2024/02/01/"]
        );
        // Just before midnight, the next day too: a writer's clock may run ahead.
        assert_eq!(
            since_prefixes("hub", datetime!(2024-12-31 23:00 UTC), datetime!(2024-12-31 23:30 UTC)),
            ["hub/2024/12/31/", "hub/2025/01/01/"]
        );
        // In the future: its own day.
        assert_eq!(since_prefixes("hub", datetime!(2030-01-01 00:00 UTC), now), ["hub/2030/01/01/"]);
        // Far back: the endpoint's folder, filtered by name.
        assert_eq!(since_prefixes("hub", datetime!(1800-01-01 00:00 UTC), now), ["hub/"]);
    }

    #[test]
    fn the_table_is_aligned_and_errors_are_cut() {
        let row = |id: &str, error: &str| {
            ["2024-03-05T07", id, "t", "-", "permanent", "1", error].map(str::to_owned)
        };
        let table = render_table(&[row("a-long-event-id", "boom"), row("b", "")]);
        assert_eq!(
            table,
            "HOUR (UTC)     EVENT ID         TYPE  SUBJECT  REASON     ATTEMPTS  LAST ERROR\n\
             2024-03-05T07  a-long-event-id  t     -        permanent  1         boom\n\
             2024-03-05T07  b                t     -        permanent  1\n"
        );
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("line\nbreak", 10), "line break");
        assert_eq!(truncate("0123456789abc", 10), "012345678…");
        assert_eq!(truncate("üüüüüüüüüüüü", 4).chars().count(), 4);
    }

    #[test]
    fn backoff_doubles_honours_hints_and_is_capped() {
        assert_eq!(backoff(1, None), Duration::from_millis(500));
        assert_eq!(backoff(2, None), Duration::from_secs(1));
        assert_eq!(backoff(3, None), Duration::from_secs(2));
        assert_eq!(backoff(1, Some(Duration::from_secs(3))), Duration::from_secs(3));
        assert_eq!(backoff(1, Some(Duration::from_secs(3600))), MAX_BACKOFF);
        assert_eq!(backoff(40, None), MAX_BACKOFF);
    }

    #[test]
    fn counts_read_well() {
        let counts = BTreeMap::from([("max_attempts".to_owned(), 2), ("permanent".to_owned(), 1)]);
        assert_eq!(count_text(&counts), "2 max_attempts, 1 permanent");
        assert_eq!(plural(1, "dead letter", "dead letters"), "1 dead letter");
    }
}
