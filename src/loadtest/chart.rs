//! A load test's timeline as a self-contained SVG chart (written by hand, no dependency):
//! throughput above, latency below, over the same seconds, so a stall or a slow leak shows at a
//! glance in a browser or a pull request.

use super::progress::thousands;
use super::Sample;
use std::fmt::Write;

/// The drawing's size, pixels.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;
/// The plot areas' left and right edges: room on the left for the y labels and axis titles.
const LEFT: f64 = 100.0;
const RIGHT: f64 = 875.0;
/// Top and height of each panel's plot area; each legend sits just above its panel.
const THROUGHPUT_TOP: f64 = 75.0;
const LATENCY_TOP: f64 = 310.0;
const PANEL_HEIGHT: f64 = 190.0;
/// About how many intervals each axis is divided into (the nice step decides exactly).
const Y_TICKS: usize = 5;
const X_TICKS: usize = 10;
/// Line colours from the Okabe–Ito palette, told apart also with the commonest colour blindness.
const ACCEPTED_COLOUR: &str = "#0072b2";
const RECEIVED_COLOUR: &str = "#e69f00";
const P50_COLOUR: &str = "#009e73";
const P99_COLOUR: &str = "#d55e00";

/// The chart of a run's `samples` under `title`; without samples, a chart saying "no data".
pub fn svg(title: &str, samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(out, r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#);
    let _ = write!(
        out,
        r#"<text x="{}" y="26" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    if samples.is_empty() {
        let _ = write!(
            out,
            r##"<text x="{}" y="{}" text-anchor="middle" font-size="20" fill="#888">no data</text></svg>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0
        );
        return out;
    }
    if let Some(text) = resources(samples) {
        let _ = write!(
            out,
            r##"<text x="{}" y="46" text-anchor="middle" fill="#444">{text}</text>"##,
            WIDTH / 2.0
        );
    }

    let t_max = samples.iter().map(|s| s.t).fold(0.0, f64::max);
    let x_ticks = nice_ticks(t_max, X_TICKS);
    let x_end = *x_ticks.last().expect("nice_ticks gives at least two ticks");
    let x = |t: f64| LEFT + (RIGHT - LEFT) * t / x_end;

    let mut throughput = vec![Series {
        name: "accepted/s",
        colour: ACCEPTED_COLOUR,
        values: samples.iter().map(|s| Some(s.accepted_per_second)).collect(),
    }];
    if samples.iter().any(|s| s.received_per_second.is_some()) {
        throughput.push(Series {
            name: "received/s at the stand-ins",
            colour: RECEIVED_COLOUR,
            values: samples.iter().map(|s| s.received_per_second).collect(),
        });
    }
    panel(&mut out, samples, &x, THROUGHPUT_TOP, "events/s", 1.0, &throughput);

    let unit = latency_unit(samples.iter().map(|s| s.p50_us.max(s.p99_us)).max().unwrap_or(0));
    let latency = [
        Series {
            name: "p50",
            colour: P50_COLOUR,
            values: samples.iter().map(|s| Some(s.p50_us as f64)).collect(),
        },
        Series {
            name: "p99",
            colour: P99_COLOUR,
            values: samples.iter().map(|s| Some(s.p99_us as f64)).collect(),
        },
    ];
    panel(&mut out, samples, &x, LATENCY_TOP, &format!("latency ({})", unit.name), unit.micros, &latency);

    // The shared time axis, under the lower panel.
    let bottom = LATENCY_TOP + PANEL_HEIGHT;
    for &tick in &x_ticks {
        let _ = write!(
            out,
            r#"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1}" stroke="black"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"#,
            x(tick),
            bottom + 5.0,
            bottom + 19.0,
            label(tick, x_ticks[1])
        );
    }
    let _ = write!(
        out,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text>"#,
        (LEFT + RIGHT) / 2.0,
        bottom + 40.0
    );
    out.push_str("</svg>");
    out
}

/// One line of a panel: `values` in step with the samples, `None` where not measured.
struct Series {
    name: &'static str,
    colour: &'static str,
    values: Vec<Option<f64>>,
}

/// A panel whose top edge is at `top`: grid, y axis in `divisor`s of the values, legend, lines.
fn panel(
    out: &mut String,
    samples: &[Sample],
    x: &dyn Fn(f64) -> f64,
    top: f64,
    y_title: &str,
    divisor: f64,
    series: &[Series],
) {
    let bottom = top + PANEL_HEIGHT;
    let y_max =
        series.iter().flat_map(|s| s.values.iter().flatten()).fold(0.0, |m, &v| f64::max(m, v / divisor));
    let y_ticks = nice_ticks(y_max, Y_TICKS);
    let y_end = *y_ticks.last().expect("nice_ticks gives at least two ticks");
    let y = |v: f64| bottom - PANEL_HEIGHT * v / divisor / y_end;
    for &tick in &y_ticks {
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{RIGHT}" y2="{0:.1}" stroke="#e0e0e0"/><text x="{1}" y="{2:.1}" text-anchor="end">{3}</text>"##,
            bottom - PANEL_HEIGHT * tick / y_end,
            LEFT - 6.0,
            bottom - PANEL_HEIGHT * tick / y_end + 4.0,
            label(tick, y_ticks[1])
        );
    }
    let _ = write!(
        out,
        r#"<polyline points="{LEFT},{top} {LEFT},{bottom} {RIGHT},{bottom}" fill="none" stroke="black"/>"#
    );
    let middle = top + PANEL_HEIGHT / 2.0;
    let _ = write!(
        out,
        r#"<text x="24" y="{middle}" text-anchor="middle" transform="rotate(-90 24 {middle})">{}</text>"#,
        escape(y_title)
    );
    // The legend, left to right above the panel; width estimated from the names' lengths.
    let mut legend_x = LEFT;
    for s in series {
        let _ = write!(
            out,
            r#"<line x1="{legend_x}" y1="{0}" x2="{1}" y2="{0}" stroke="{2}" stroke-width="3"/><text x="{3}" y="{4}">{5}</text>"#,
            top - 12.0,
            legend_x + 20.0,
            s.colour,
            legend_x + 25.0,
            top - 8.0,
            escape(s.name)
        );
        legend_x += 45.0 + 7.0 * s.name.chars().count() as f64;
    }
    for s in series {
        let points: Vec<String> = samples
            .iter()
            .zip(&s.values)
            .filter_map(|(sample, value)| value.map(|v| format!("{:.1},{:.1}", x(sample.t), y(v))))
            .collect();
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"/>"#,
            points.join(" "),
            s.colour
        );
        // A single point draws no line: mark it.
        if let [point] = points.as_slice() {
            let (cx, cy) = point.split_once(',').expect("x,y");
            let _ = write!(out, r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{}"/>"#, s.colour);
        }
    }
}

/// The line under the title on the daemon's resources, when any sample measured them.
fn resources(samples: &[Sample]) -> Option<String> {
    let cores: Vec<f64> = samples.iter().filter_map(|s| s.cpu_cores).collect();
    if cores.is_empty() {
        return None;
    }
    let mut text =
        format!("daemon: {:.2} CPU cores on average", cores.iter().sum::<f64>() / cores.len() as f64);
    if let Some(rss) = samples.iter().filter_map(|s| s.rss_bytes).max() {
        let _ = write!(text, ", {:.1} MB resident at most", rss as f64 / 1e6);
    }
    Some(text)
}

/// A unit to show latencies in, so that the labels stay short.
#[derive(Debug, PartialEq)]
struct LatencyUnit {
    name: &'static str,
    /// Microseconds in one of this unit.
    micros: f64,
}

/// µs below a millisecond, ms below a second, else s (judged by the largest value).
fn latency_unit(max_us: u64) -> LatencyUnit {
    match max_us {
        0..1_000 => LatencyUnit { name: "µs", micros: 1.0 },
        1_000..1_000_000 => LatencyUnit { name: "ms", micros: 1e3 },
        _ => LatencyUnit { name: "s", micros: 1e6 },
    }
}

/// Ticks from 0 to the first multiple of the step at or above `max`, the step being 1, 2 or 5
/// × 10ⁿ chosen so there are about `target` intervals (at most `target`, rounding the step up):
/// 0..=1000 with 5 gives 0, 200, …, 1000. Always at least two ticks (a `max` of 0 counts as 1).
fn nice_ticks(max: f64, target: usize) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = match raw / magnitude {
        n if n <= 1.0 => 1.0,
        n if n <= 2.0 => 2.0,
        n if n <= 5.0 => 5.0,
        _ => 10.0,
    } * magnitude;
    // The tolerance keeps 0.3 / 0.1 = 3.0000000000000004 from adding an empty interval.
    let intervals = ((max / step) * (1.0 - 1e-9)).ceil().max(1.0) as usize;
    (0..=intervals).map(|i| i as f64 * step).collect()
}

/// A tick's label: whole numbers grouped by thousands, else as many decimals as the step needs.
fn label(value: f64, step: f64) -> String {
    if step >= 1.0 {
        thousands(value.round() as u64)
    } else {
        let decimals = (-step.log10().floor()) as usize;
        format!("{value:.decimals$}")
    }
}

/// `text` safe in XML character data and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that tags nest and close, and that every `&` starts a known entity.
    fn assert_well_formed(svg: &str) {
        assert!(svg.starts_with("<svg "), "{svg}");
        assert!(svg.ends_with("</svg>"), "{svg}");
        let mut open: Vec<&str> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = start + rest[start..].find('>').expect("every tag closes");
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "a '<' inside a tag: {tag}");
            let name = |t: &str| t.split_whitespace().next().unwrap_or_default().to_owned();
            if let Some(closing) = tag.strip_prefix('/') {
                assert_eq!(open.pop().map(name), Some(closing.to_owned()), "mismatched </{closing}>");
            } else if !tag.ends_with('/') {
                open.push(tag);
            }
            rest = &rest[end + 1..];
        }
        assert!(open.is_empty(), "unclosed: {open:?}");
        for (i, _) in svg.match_indices('&') {
            let entity = &svg[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| entity.starts_with(e)),
                "a bare & at {}",
                &svg[i..(i + 10).min(svg.len())]
            );
        }
    }

    fn polyline_point_counts(svg: &str) -> Vec<usize> {
        svg.split("<polyline points=\"")
            .skip(1)
            .map(|rest| rest[..rest.find('"').unwrap()].split_whitespace().count())
            .collect()
    }

    fn run(n: usize, end_to_end: bool) -> Vec<Sample> {
        (1..=n)
            .map(|i| Sample {
                t: i as f64,
                accepted_per_second: 10_000.0 + 100.0 * i as f64,
                received_per_second: end_to_end.then_some(9_900.0 + 100.0 * i as f64),
                p50_us: 800 + i as u64,
                p99_us: 4_000 + 50 * i as u64,
                cpu_cores: end_to_end.then_some(1.5),
                rss_bytes: end_to_end.then_some(50_000_000 + i as u64),
            })
            .collect()
    }

    #[test]
    fn a_run_gives_a_well_formed_chart_with_a_point_per_sample() {
        let samples = run(12, true);
        let svg = svg("a<b&c", &samples);
        assert_well_formed(&svg);
        // Two axis frames (3 points each), then accepted, received, p50, p99.
        assert_eq!(polyline_point_counts(&svg), vec![3, 12, 12, 3, 12, 12]);
        assert!(svg.contains("a&lt;b&amp;c") && !svg.contains("a<b&c"), "the title escaped");
        assert!(svg.contains("received/s") && svg.contains("p99") && svg.contains("latency (ms)"));
        assert!(svg.contains("1.50 CPU cores on average, 50.0 MB resident at most"), "{svg}");
        assert!(svg.contains(">15,000<"), "throughput labels grouped by thousands: {svg}");
    }

    #[test]
    fn without_stand_ins_or_resources_those_parts_are_left_out() {
        let svg = svg("run", &run(3, false));
        assert_well_formed(&svg);
        assert_eq!(polyline_point_counts(&svg), vec![3, 3, 3, 3, 3], "no received line");
        assert!(!svg.contains("received") && !svg.contains("CPU"));
        let single = super::svg("run", &run(1, false));
        assert_well_formed(&single);
        assert_eq!(single.matches("<circle").count(), 3, "a lone sample is marked");
    }

    #[test]
    fn no_samples_say_no_data() {
        let svg = svg("empty & idle", &[]);
        assert_well_formed(&svg);
        assert!(svg.contains(">no data<") && svg.contains("empty &amp; idle"));
        assert!(!svg.contains("<polyline"));
    }

    #[test]
    fn ticks_fall_on_one_two_five_steps() {
        assert_eq!(nice_ticks(1000.0, 5), vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        assert_eq!(nice_ticks(1001.0, 5), vec![0.0, 500.0, 1000.0, 1500.0]);
        assert_eq!(nice_ticks(7.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(nice_ticks(60.0, 10), vec![0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        let unit = nice_ticks(0.0, 5);
        assert_eq!(
            (unit.len(), unit.last()),
            (6, Some(&1.0)),
            "0 is drawn as 0..1 in steps of 0.2: {unit:?}"
        );
        assert_eq!(nice_ticks(0.3, 3).len(), 4, "0, 0.1, 0.2, 0.3: no empty interval from rounding");
        assert_eq!(nice_ticks(12_345.0, 5).last(), Some(&15_000.0));
        assert_eq!(label(0.6000000000000001, 0.2), "0.6");
        assert_eq!(label(15_000.0, 5_000.0), "15,000");
    }

    #[test]
    fn latency_units_keep_labels_short() {
        assert_eq!(latency_unit(999).name, "µs");
        assert_eq!(latency_unit(1_000).name, "ms");
        assert_eq!(latency_unit(4_999_999).name, "s");
    }
}
