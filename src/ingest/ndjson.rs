//! Newline-delimited JSON CloudEvents (one structured event per line) from a file or stdin:
//! replays of what a `File` endpoint wrote, and shell pipelines.
//!
//! A bad line is reported with its line number and skipped; the rest are routed. Lines are
//! submitted in small batches; when a queue is full the reader waits (the pipe backs up to the
//! writer) instead of dropping anything.

use crate::delivery::{Dispatcher, Refusal};
use crate::event::{parse_structured, CloudEvent};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Events submitted together, to amortise routing and queue reservations.
const SUBMIT_BATCH: usize = 64;
/// How long the reader waits before offering a refused batch again.
const FULL_WAIT: Duration = Duration::from_millis(50);

/// What a read of an NDJSON stream did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NdjsonReport {
    pub accepted: u64,
    pub unmatched: u64,
    /// Lines refused (bad JSON, invalid event, too long), each logged with its line number.
    pub invalid: u64,
    /// True when the reader stopped because twinroute is shutting down, not at end of input.
    pub interrupted: bool,
}

/// Reads `input` to its end, submitting every valid event.
pub async fn run<R: AsyncBufRead + Unpin>(
    mut input: R,
    name: &str,
    dispatcher: &Dispatcher,
    max_event_bytes: usize,
) -> std::io::Result<NdjsonReport> {
    let mut report = NdjsonReport::default();
    let mut pending: Vec<CloudEvent> = Vec::with_capacity(SUBMIT_BATCH);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = read_line_limited(&mut input, &mut line, max_event_bytes + 2).await?;
        if n == 0 {
            break;
        }
        number += 1;
        if !line.ends_with(b"\n") && line.len() > max_event_bytes {
            // Skip the rest of an over-long line without holding it in memory.
            let mut rest = Vec::new();
            while read_line_limited(&mut input, &mut rest, max_event_bytes + 2).await? > 0
                && !rest.ends_with(b"\n")
            {
                rest.clear();
            }
            report.invalid += 1;
            tracing::warn!(
                input = name,
                line = number,
                "event refused: longer than {max_event_bytes} bytes (ingest.max_event_bytes)"
            );
            continue;
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match parse_structured(text) {
            Ok(event) => pending.push(event),
            Err(problems) => {
                report.invalid += 1;
                for p in problems {
                    tracing::warn!(input = name, line = number, problem = %p, "event refused");
                }
            }
        }
        if pending.len() >= SUBMIT_BATCH && !submit(dispatcher, &mut pending, &mut report).await {
            report.interrupted = true;
            return Ok(report);
        }
    }
    if !pending.is_empty() && !submit(dispatcher, &mut pending, &mut report).await {
        report.interrupted = true;
    }
    Ok(report)
}

/// Submits `pending`, waiting while queues are full. False when twinroute is shutting down.
async fn submit(dispatcher: &Dispatcher, pending: &mut Vec<CloudEvent>, report: &mut NdjsonReport) -> bool {
    loop {
        // The dispatcher takes the events only when it accepts them: refused ones stay to offer again.
        match dispatcher.submit_from(pending, "ndjson").await {
            Ok(accepted) => {
                report.accepted += accepted.events as u64;
                report.unmatched += accepted.unmatched as u64;
                return true;
            }
            Err(Refusal::Full { .. } | Refusal::Bytes { .. } | Refusal::SpoolFull { .. }) => {
                tokio::time::sleep(FULL_WAIT).await
            }
            Err(Refusal::ShuttingDown) => return false,
            Err(refusal @ Refusal::Storage(_)) => {
                tracing::error!(error = %refusal, "stopped reading events: they cannot be stored");
                return false;
            }
        }
    }
}

/// Like `read_until(b'\n')` but stops after `limit` bytes, so one enormous line cannot exhaust
/// memory. Returns the bytes read (0 at end of input).
async fn read_line_limited<R: AsyncBufRead + Unpin>(
    input: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = input.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        let room = limit.saturating_sub(out.len());
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ if available.len() >= room => (room, true),
            _ => (available.len(), false),
        };
        out.extend_from_slice(&available[..take]);
        input.consume(take);
        total += take;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limited_reads_split_long_lines() {
        let data = b"abc\ndefghij\n\nxy";
        let mut r = tokio::io::BufReader::with_capacity(2, &data[..]);
        let mut out = Vec::new();
        let mut lines = Vec::new();
        while read_line_limited(&mut r, &mut out, 5).await.unwrap() > 0 {
            lines.push(String::from_utf8(out.clone()).unwrap());
            out.clear();
        }
        assert_eq!(lines, ["abc\n", "defgh", "ij\n", "\n", "xy"]);
    }
}
