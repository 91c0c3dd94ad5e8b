//! Results out: a table on stdout, medians over repeated runs, for a sweep a CSV and an SVG
//! plot of latency percentiles against offered load, and for the scale mode log-log plots of
//! measurements against a size (drawn here; no plotting crate).

use crate::drive::{Latency, Outcome};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The header of [`row`].
pub fn header() -> String {
    format!(
        "{:<10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}  {:<24} {:>5} {:>5} {:>6} {:>6} {:>7}",
        "target",
        "offered",
        "req/s",
        "p50 ms",
        "p90",
        "p99",
        "p99.9",
        "max",
        "answers (code:count)",
        "unexp",
        "errs",
        "srv cpu",
        "cli cpu",
        "RSS MiB",
    )
}

/// One run as a table row.
pub fn row(o: &Outcome) -> String {
    let offered = o
        .load
        .rate
        .map_or_else(|| "closed".to_string(), |r| format!("{r:.0}"));
    let codes = o
        .status_codes
        .iter()
        .map(|(c, n)| format!("{c}:{n}"))
        .collect::<Vec<_>>()
        .join(" ");
    // Only Portcullis's answers are checked: the no-op server allows everything.
    let unexpected = if o.target == "portcullis" {
        o.unexpected.to_string()
    } else {
        "-".to_string()
    };
    let l = &o.latency_ms;
    let mut line = format!(
        "{:<10} {:>9} {:>9.0} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}  {:<24} {:>5} {:>5} {:>6.2} {:>7.2} {:>7.1}",
        o.target,
        offered,
        o.throughput_rps,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
        codes,
        unexpected,
        o.errors,
        o.server_cpu_cores,
        o.client_cpu_cores,
        o.server_memory.rss_kib as f64 / 1024.0,
    );
    if o.behind_schedule > 0 {
        let _ = write!(line, "  ({} sent behind schedule)", o.behind_schedule);
    }
    if o.feed_exhausted {
        line.push_str("  (distinct requests ran out: shorter interval)");
    }
    line
}

/// Details worth a line of their own: error samples and mismatched answers by kind.
pub fn notes(o: &Outcome, check_expected: bool) -> Vec<String> {
    let mut notes: Vec<String> = o
        .error_samples
        .iter()
        .map(|e| format!("  error: {e}"))
        .collect();
    if check_expected {
        for (kind, count) in &o.by_kind {
            if count.unexpected > 0 {
                notes.push(format!(
                    "  {} of {} {} requests did not get status {}",
                    count.unexpected,
                    count.answered,
                    kind.name(),
                    kind.expected_code()
                ));
            }
        }
    }
    notes
}

/// The medians of the headline numbers over several runs of one target.
#[derive(Debug, Clone, Serialize)]
pub struct Medians {
    pub runs: usize,
    pub throughput_rps: f64,
    pub latency_ms: Latency,
    pub server_cpu_cores: f64,
    pub client_cpu_cores: f64,
    /// Throughput per server core: requests per CPU-second.
    pub requests_per_server_cpu_second: f64,
}

pub fn medians(runs: &[&Outcome]) -> Medians {
    let m = |f: &dyn Fn(&Outcome) -> f64| median(runs.iter().map(|&o| f(o)).collect());
    let throughput = m(&|o| o.throughput_rps);
    let cpu = m(&|o| o.server_cpu_cores);
    Medians {
        runs: runs.len(),
        throughput_rps: throughput,
        latency_ms: Latency {
            p50: m(&|o| o.latency_ms.p50),
            p90: m(&|o| o.latency_ms.p90),
            p99: m(&|o| o.latency_ms.p99),
            p999: m(&|o| o.latency_ms.p999),
            max: m(&|o| o.latency_ms.max),
            mean: m(&|o| o.latency_ms.mean),
        },
        server_cpu_cores: cpu,
        client_cpu_cores: m(&|o| o.client_cpu_cores),
        requests_per_server_cpu_second: m(&|o| o.throughput_rps / o.server_cpu_cores.max(1e-9)),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The sweep as CSV: one row per run, the closed-loop maximum first.
pub fn csv(runs: &[Outcome]) -> String {
    let mut out = String::from(
        "mode,offered_rps,achieved_rps,requests,p50_ms,p90_ms,p99_ms,p999_ms,max_ms,mean_ms,\
         behind_schedule,errors,unexpected,server_cpu_cores,client_cpu_cores,server_rss_kib,server_hwm_kib\n",
    );
    for o in runs {
        let l = &o.latency_ms;
        let _ = writeln!(
            out,
            "{},{},{:.1},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{:.3},{:.3},{},{}",
            o.mode,
            o.load.rate.map_or_else(String::new, |r| format!("{r:.1}")),
            o.throughput_rps,
            o.requests,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean,
            o.behind_schedule,
            o.errors,
            o.unexpected,
            o.server_cpu_cores,
            o.client_cpu_cores,
            o.server_memory.rss_kib,
            o.server_memory.hwm_kib,
        );
    }
    out
}

/// A plotted line: its name, its colour and the percentile it shows.
type Series = (&'static str, &'static str, fn(&Latency) -> f64);

/// Latency percentiles (p50, p99, p99.9; log scale) against offered load, for the fixed-rate
/// runs, with the closed-loop maximum marked.
pub fn svg(runs: &[Outcome], max_rps: f64, title: &str) -> String {
    const W: f64 = 860.0;
    const H: f64 = 520.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 170.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 60.0;
    let points: Vec<&Outcome> = runs.iter().filter(|o| o.load.rate.is_some()).collect();
    let series: [Series; 3] = [
        ("p50", "#1f77b4", |l| l.p50),
        ("p99", "#ff7f0e", |l| l.p99),
        ("p99.9", "#d62728", |l| l.p999),
    ];
    let values = points
        .iter()
        .flat_map(|o| series.iter().map(|(_, _, f)| f(&o.latency_ms)))
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.01, 10.0) };
    let (dec_lo, dec_hi) = (
        lo.log10().floor() as i32,
        hi.log10().ceil().max(lo.log10().floor() + 1.0) as i32,
    );
    let x_max = points
        .iter()
        .filter_map(|o| o.load.rate)
        .fold(max_rps, f64::max)
        * 1.05;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |v: f64| LEFT + pw * v / x_max.max(1.0);
    let y = |ms: f64| {
        let span = f64::from(dec_hi - dec_lo);
        TOP + ph * (1.0 - (ms.max(1e-6).log10() - f64::from(dec_lo)) / span)
    };

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        xml_escape(title)
    );
    // Decades and their 2x, 5x, labelled, as horizontal grid lines.
    for d in dec_lo..=dec_hi {
        for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let v = m * 10f64.powi(d);
            if d == dec_hi && m > 1.0 {
                continue;
            }
            let yy = y(v);
            let stroke = if major { "#bbb" } else { "#e5e5e5" };
            let _ = writeln!(
                s,
                r#"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="{stroke}"/>"#,
                LEFT + pw
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                yy + 4.0,
                trim_number(v)
            );
        }
    }
    // Vertical grid lines at round loads.
    let step = nice_step(x_max / 6.0);
    for i in 0..=((x_max / step) as u32) {
        let v = step * f64::from(i);
        let xx = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{TOP}" y2="{}" stroke="#e5e5e5"/>"##,
            TOP + ph
        );
        let _ = writeln!(
            s,
            r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{v:.0}</text>"#,
            TOP + ph + 18.0,
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">offered load (requests/s)</text>"#,
        LEFT + pw / 2.0,
        H - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">latency (ms, log scale)</text>"#,
        TOP + ph / 2.0
    );
    // The closed-loop maximum.
    let mx = x(max_rps);
    let _ = writeln!(
        s,
        r##"<line x1="{mx:.1}" x2="{mx:.1}" y1="{TOP}" y2="{}" stroke="#555" stroke-dasharray="5 4"/>"##,
        TOP + ph
    );
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{}" text-anchor="end" fill="#555">closed-loop max {max_rps:.0}/s</text>"##,
        mx - 4.0,
        TOP + ph - 8.0
    );
    for (i, (name, colour, f)) in series.iter().enumerate() {
        let coords: Vec<String> = points
            .iter()
            .filter_map(|o| o.load.rate.map(|r| (x(r), y(f(&o.latency_ms)))))
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            coords.join(" ")
        );
        for c in &coords {
            let (px, py) = c.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                s,
                r#"<circle cx="{px}" cy="{py}" r="3.5" fill="{colour}"/>"#
            );
        }
        let ly = TOP + 20.0 + 22.0 * i as f64;
        let lx = LEFT + pw + 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/>"#,
            lx + 24.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{name}</text>"#,
            lx + 30.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

/// A line of a log-log plot: its name, colour, style and points (x, y), both positive.
pub struct Line {
    pub name: &'static str,
    pub colour: &'static str,
    pub dashed: bool,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a log-log plot: its y-axis label and its lines.
pub struct Panel {
    pub y_label: &'static str,
    pub lines: Vec<Line>,
}

/// The decades `[lo, hi]` (powers of ten) that hold every value, at least one apart.
fn decades(values: impl Iterator<Item = f64>) -> (i32, i32) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (1.0, 10.0) };
    let lo = lo.log10().floor() as i32;
    (lo, (hi.log10().ceil() as i32).max(lo + 1))
}

/// A count as a short label: 10, 100, 1k, 10k, 1M.
fn count_label(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{}M", trim_number(v / 1e6)),
        v if v >= 1e3 => format!("{}k", trim_number(v / 1e3)),
        v => trim_number(v),
    }
}

/// Panels stacked over one shared logarithmic x axis (a size: entity or policy count), each
/// with a logarithmic y axis and its legend on the right. Points with a missing measurement
/// are simply left out of their line.
pub fn log_plot(title: &str, x_label: &str, panels: &[Panel]) -> String {
    const W: f64 = 860.0;
    const LEFT: f64 = 80.0;
    const RIGHT: f64 = 210.0;
    const TOP: f64 = 50.0;
    const PANEL: f64 = 230.0;
    const GAP: f64 = 60.0;
    const BOTTOM: f64 = 60.0;
    let n = panels.len().max(1) as f64;
    let h = TOP + n * PANEL + (n - 1.0) * GAP + BOTTOM;
    let pw = W - LEFT - RIGHT;
    let all = || {
        panels
            .iter()
            .flat_map(|p| p.lines.iter())
            .flat_map(|l| l.points.iter())
    };
    let (x_lo, x_hi) = decades(all().map(|(x, _)| *x));
    let x = |v: f64| LEFT + pw * (v.max(1e-9).log10() - f64::from(x_lo)) / f64::from(x_hi - x_lo);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        LEFT + pw / 2.0,
        xml_escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL + GAP);
        let (y_lo, y_hi) = decades(
            panel
                .lines
                .iter()
                .flat_map(|l| l.points.iter().map(|p| p.1)),
        );
        let y = |v: f64| {
            top + PANEL * (1.0 - (v.max(1e-9).log10() - f64::from(y_lo)) / f64::from(y_hi - y_lo))
        };
        // Decades and their 2x and 5x as horizontal grid lines, labelled.
        for d in y_lo..=y_hi {
            for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
                if d == y_hi && m > 1.0 {
                    continue;
                }
                let v = m * 10f64.powi(d);
                let yy = y(v);
                let stroke = if major { "#bbb" } else { "#e5e5e5" };
                let _ = writeln!(
                    s,
                    r#"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="{stroke}"/>"#,
                    LEFT + pw
                );
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                    LEFT - 6.0,
                    yy + 4.0,
                    trim_number(v)
                );
            }
        }
        // Decades of the size as vertical grid lines, labelled under every panel.
        for d in x_lo..=x_hi {
            let v = 10f64.powi(d);
            let xx = x(v);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#e5e5e5"/>"##,
                top + PANEL
            );
            let _ = writeln!(
                s,
                r#"<text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"#,
                top + PANEL + 18.0,
                count_label(v)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{top}" width="{pw}" height="{PANEL}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(22 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + PANEL / 2.0,
            xml_escape(panel.y_label)
        );
        for (j, line) in panel.lines.iter().enumerate() {
            let dash = if line.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let coords: Vec<(f64, f64)> = line
                .points
                .iter()
                .filter(|(px, py)| *px > 0.0 && *py > 0.0)
                .map(|(px, py)| (x(*px), y(*py)))
                .collect();
            let path: Vec<String> = coords
                .iter()
                .map(|(px, py)| format!("{px:.1},{py:.1}"))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
                path.join(" "),
                line.colour
            );
            for (px, py) in &coords {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{px:.1}" cy="{py:.1}" r="3.5" fill="{}"/>"#,
                    line.colour
                );
            }
            let ly = top + 14.0 + 22.0 * j as f64;
            let lx = LEFT + pw + 16.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/>"#,
                lx + 24.0,
                line.colour
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}">{}</text>"#,
                lx + 30.0,
                ly + 4.0,
                xml_escape(line.name)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{} (log scale)</text>"#,
        LEFT + pw / 2.0,
        h - 16.0,
        xml_escape(x_label)
    );
    s.push_str("</svg>\n");
    s
}

/// The 1, 2 or 5 times a power of ten nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let power = 10f64.powf(raw.max(1.0).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= raw)
        .unwrap_or(10.0 * power)
}

fn trim_number(v: f64) -> String {
    let text = format!("{v:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `text` to `path`, creating its directory.
pub fn write_file(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: cannot write: {e}", path.display()))
}
