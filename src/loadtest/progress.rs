//! The progress line a load test shows on stderr while it runs: a bar redrawn in place on a
//! terminal, one plain line per update otherwise (so CI logs and pipes stay readable).

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Characters in the bar between the brackets.
const BAR_WIDTH: usize = 20;

/// Reports a run's progress on stderr.
#[derive(Debug)]
pub struct Progress {
    /// The planned length of the run: the bar's 100 %.
    total: Duration,
    /// Whether stderr is a terminal: redraw one line with `\r` instead of printing lines.
    terminal: bool,
    /// Characters of the line last drawn on the terminal (0: none open), so a shorter line can
    /// blank the rest and `finish` knows whether to end it.
    drawn: usize,
}

impl Progress {
    /// A progress display for a run planned to last `total`.
    pub fn new(total: Duration) -> Self {
        Self { total, terminal: std::io::stderr().is_terminal(), drawn: 0 }
    }

    /// Shows the run's state: `received` at the stand-ins and the latest `p99_us` when known.
    pub fn update(&mut self, elapsed: Duration, accepted: u64, received: Option<u64>, p99_us: Option<u64>) {
        let text = line(self.total, elapsed, accepted, received, p99_us, self.terminal);
        let mut stderr = std::io::stderr().lock();
        // A progress display that cannot be written is not worth failing the run for.
        if self.terminal {
            let width = text.chars().count();
            let blank = self.drawn.saturating_sub(width);
            let _ = write!(stderr, "\r{text}{:blank$}", "");
            let _ = stderr.flush();
            self.drawn = width;
        } else {
            let _ = writeln!(stderr, "{text}");
        }
    }

    /// Ends the redrawn line on a terminal, so what follows starts on a line of its own.
    pub fn finish(&mut self) {
        if self.drawn > 0 {
            let _ = writeln!(std::io::stderr());
            self.drawn = 0;
        }
    }
}

/// One progress line; with `bar`, led by a bar filled in proportion to `elapsed / total`.
fn line(
    total: Duration,
    elapsed: Duration,
    accepted: u64,
    received: Option<u64>,
    p99_us: Option<u64>,
    bar: bool,
) -> String {
    let mut text = String::new();
    if bar {
        let fraction =
            if total.is_zero() { 1.0 } else { (elapsed.as_secs_f64() / total.as_secs_f64()).clamp(0.0, 1.0) };
        let filled = (fraction * BAR_WIDTH as f64).round() as usize;
        text.push('[');
        text.extend(std::iter::repeat_n('#', filled));
        text.extend(std::iter::repeat_n('.', BAR_WIDTH - filled));
        text.push_str("] ");
    }
    text.push_str(&format!(
        "{:.1}/{:.1} s  {} accepted",
        elapsed.as_secs_f64(),
        total.as_secs_f64(),
        thousands(accepted)
    ));
    if let Some(received) = received {
        text.push_str(&format!("  {} received", thousands(received)));
    }
    if let Some(p99) = p99_us {
        text.push_str(&format!("  p99 {}", micros(p99)));
    }
    text
}

/// A latency in a readable unit: `850 µs`, `1.2 ms`, `2.35 s`.
fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// `n` with a comma between each group of three digits: `12,345`.
pub(super) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_full_line_on_a_terminal() {
        assert_eq!(
            line(secs(10.0), secs(4.0), 12_345, Some(12_300), Some(1_234), true),
            "[########............] 4.0/10.0 s  12,345 accepted  12,300 received  p99 1.2 ms"
        );
    }

    #[test]
    fn the_bar_fills_in_proportion_and_stops_at_full() {
        let bar = |elapsed: f64| {
            let text = line(secs(10.0), secs(elapsed), 0, None, None, true);
            text[1..=BAR_WIDTH].chars().filter(|&c| c == '#').count()
        };
        assert_eq!(bar(0.0), 0);
        assert_eq!(bar(2.5), 5);
        assert_eq!(bar(5.0), 10);
        assert_eq!(bar(10.0), 20);
        assert_eq!(bar(13.0), 20, "a run that overruns does not overflow the bar");
        let overrun = line(secs(10.0), secs(13.0), 0, None, None, true);
        assert_eq!(overrun, "[####################] 13.0/10.0 s  0 accepted");
        assert!(line(Duration::ZERO, secs(1.0), 0, None, None, true).starts_with("[####################]"));
    }

    #[test]
    fn unknown_parts_are_left_out_and_plain_lines_have_no_bar() {
        assert_eq!(line(secs(60.0), secs(1.0), 999, None, None, false), "1.0/60.0 s  999 accepted");
        assert_eq!(
            line(secs(60.0), secs(1.0), 5, Some(4), None, false),
            "1.0/60.0 s  5 accepted  4 received"
        );
        assert_eq!(
            line(secs(60.0), secs(1.0), 5, None, Some(850), false),
            "1.0/60.0 s  5 accepted  p99 850 µs"
        );
    }

    #[test]
    fn numbers_are_grouped_and_latencies_scaled() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(123_456), "123,456");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
        assert_eq!(micros(999), "999 µs");
        assert_eq!(micros(1_000), "1.0 ms");
        assert_eq!(micros(2_350_000), "2.35 s");
    }
}
