//! The card's results as a Markdown table, ratios, a chart (SVG) and the
//! machine's facts.

use std::fmt::Write as _;
use std::process::Command;

use crate::runner::{Row, Sample};

/// Column order of the table (systems no workload plans are left out).
const COLUMNS: [&str; 14] = [
    "proc",
    "proc-process",
    "proc-forkserver",
    "proc-spawn",
    "python",
    "python-spawn",
    "python-forkserver",
    "procspawn",
    "ipc-channel",
    "ipmpsc",
    "crossbeam-threads",
    "raw-fork",
    "raw-exec",
    "raw-pipe",
];

/// The peers `proc` is compared with ("best peer").
const PEERS: [&str; 4] = ["python", "procspawn", "ipc-channel", "ipmpsc"];

/// Facts about the machine and the toolchain.
pub fn facts() -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text).trim().to_owned()
            })
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1048576.0)
        });
    vec![
        ("CPU".into(), cpu),
        ("nproc".into(), nproc.to_string()),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        (
            "rustc".into(),
            version(&rustc, "-V").unwrap_or_else(|| "unknown".into()),
        ),
        (
            "python".into(),
            version("python3", "--version").unwrap_or_else(|| "python3 not found".into()),
        ),
        ("date (UTC)".into(), utc_now()),
    ]
}

/// The current UTC date and time, `YYYY-MM-DD HH:MM:SS`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Whether a smaller figure is better for `unit`.
fn lower_is_better(unit: &str) -> bool {
    matches!(unit, "us" | "ms")
}

fn median(samples: &[Sample]) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().map(|s| s.figure).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0} k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A row's medians by system, and its unit.
fn medians(row: &Row) -> (Vec<(&str, f64)>, String) {
    let unit = row
        .systems
        .iter()
        .find_map(|(_, s)| s.first().map(|s| s.unit.clone()))
        .unwrap_or_default();
    let m = row
        .systems
        .iter()
        .filter_map(|(name, s)| median(s).map(|m| (name.as_str(), m)))
        .collect();
    (m, unit)
}

/// `ours` against `theirs`, above 1 when ours is better.
fn ratio(ours: f64, theirs: f64, unit: &str) -> f64 {
    if lower_is_better(unit) {
        theirs / ours
    } else {
        ours / theirs
    }
}

/// The ratios of a row: (label, ratio), above 1 when proc is better.
pub fn ratios(row: &Row) -> Vec<(String, f64)> {
    let (m, unit) = medians(row);
    let get = |n: &str| m.iter().find(|(s, _)| *s == n).map(|&(_, v)| v);
    let Some(proc_) = get("proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // The best peer: the one proc's ratio is smallest against, each peer
    // against its like: procspawn execs its processes, so it faces
    // proc-spawn where the row has it.
    let counterpart = |peer: &str| match peer {
        "procspawn" if get("proc-spawn").is_some() => "proc-spawn",
        _ => "proc",
    };
    let best_peer = PEERS
        .iter()
        .filter_map(|p| {
            let ours = counterpart(p);
            let v = get(p)?;
            Some((ours, *p, ratio(get(ours)?, v, &unit)))
        })
        .min_by(|a, b| a.2.total_cmp(&b.2));
    if let Some((ours, p, r)) = best_peer {
        out.push((format!("{ours} vs best peer ({p})"), r));
    }
    if let Some(py) = get("python") {
        out.push(("proc vs python".into(), ratio(proc_, py, &unit)));
    }
    if let Some(c) = get("crossbeam-threads") {
        out.push((
            "proc vs crossbeam-threads (ceiling)".into(),
            ratio(proc_, c, &unit),
        ));
    }
    for floor in ["raw-fork", "raw-pipe"] {
        if let Some(f) = get(floor) {
            out.push((format!("proc vs {floor} (floor)"), ratio(proc_, f, &unit)));
        }
    }
    if let (Some(s), Some(x)) = (get("proc-spawn"), get("raw-exec")) {
        out.push(("proc-spawn vs raw-exec (floor)".into(), ratio(s, x, &unit)));
    }
    out
}

/// The Markdown report.
pub fn markdown(rows: &[(String, Row)], facts: &[(String, String)], command: &str) -> String {
    let present: Vec<&str> = COLUMNS
        .iter()
        .copied()
        .filter(|c| {
            rows.iter().any(|(_, r)| {
                r.systems.iter().any(|(s, _)| s == c)
                    || r.missing.contains_key(*c)
                    || r.failed.contains_key(*c)
            })
        })
        .collect();
    let mut md = String::new();
    let _ = writeln!(md, "# The bench card: proc, Python and the Rust peers\n");
    let _ = writeln!(md, "- Command: `{command}`");
    for (k, v) in facts {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "\nEach cell: median (min–max) over the rounds; systems interleaved \
         round by round, each measurement in a process of its own. `*`: other \
         processes used a noticeable share of the CPU during that \
         measurement even after re-runs.\n"
    );
    let _ = write!(md, "| workload | unit |");
    for c in &present {
        let _ = write!(md, " {c} |");
    }
    let _ = write!(md, "\n|---|---|");
    for _ in &present {
        let _ = write!(md, "---|");
    }
    md.push('\n');
    for (w, row) in rows {
        let (_, unit) = medians(row);
        let arrow = if lower_is_better(&unit) { "↓" } else { "↑" };
        let _ = write!(md, "| {w} | {unit} {arrow} |");
        for c in &present {
            let samples = row.systems.iter().find(|(s, _)| s == c).map(|(_, v)| v);
            let cell = match samples.filter(|v| !v.is_empty()) {
                Some(v) => {
                    let lo = v.iter().map(|s| s.figure).fold(f64::INFINITY, f64::min);
                    let hi = v.iter().map(|s| s.figure).fold(f64::NEG_INFINITY, f64::max);
                    let star = if v.iter().any(|s| s.disturbed) {
                        "*"
                    } else {
                        ""
                    };
                    format!(
                        "{}{star} ({}–{})",
                        fmt(median(v).unwrap_or(f64::NAN)),
                        fmt(lo),
                        fmt(hi)
                    )
                }
                None => match (row.missing.get(*c), row.failed.get(*c)) {
                    (Some(why), _) if why.contains("python3 not found") => {
                        "python3 not found".into()
                    }
                    (Some(_), _) => "n/a".into(),
                    (None, Some(_)) => "FAILED".into(),
                    (None, None) => "–".into(),
                },
            };
            let _ = write!(md, " {cell} |");
        }
        md.push('\n');
    }
    let _ = writeln!(md, "\n## Ratios (above 1: proc is better)\n");
    let _ = writeln!(md, "| workload | ratios |\n|---|---|");
    for (w, row) in rows {
        let r = ratios(row)
            .into_iter()
            .map(|(label, v)| format!("{label}: {v:.2}x"))
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(md, "| {w} | {r} |");
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|(w, row)| {
            let missing = row
                .missing
                .iter()
                .map(move |(s, why)| format!("- {w} {s}: {why}"));
            let failed = row
                .failed
                .iter()
                .map(move |(s, why)| format!("- {w} {s}: FAILED: {why}"));
            missing.chain(failed)
        })
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(md, "\n## Not measured\n\n{}", notes.join("\n"));
    }
    let _ = writeln!(md, "\n## Load during each measurement\n");
    let _ = writeln!(
        md,
        "Share of the machine's CPU used by other processes while each \
         measurement ran (from `/proc/stat`, less the measured process tree):\n"
    );
    for (w, row) in rows {
        let loads: Vec<String> = row
            .systems
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(s, v)| {
                let l: Vec<String> = v
                    .iter()
                    .map(|x| format!("{:.0}%", x.load * 100.0))
                    .collect();
                format!("{s} {}", l.join("/"))
            })
            .collect();
        let _ = writeln!(md, "- {w}: {}", loads.join(", "));
    }
    md
}

/// A bar chart of proc's ratios per workload (log scale), as SVG.
pub fn chart(rows: &[(String, Row)]) -> String {
    let bars: Vec<(String, String, f64)> = rows
        .iter()
        .flat_map(|(w, row)| {
            ratios(row)
                .into_iter()
                .filter(|(l, _)| l.starts_with("proc vs best") || l.starts_with("proc vs python"))
                .map(move |(l, v)| (w.clone(), l, v))
        })
        .collect();
    let (width, left, bar_h, gap) = (900.0, 330.0, 18.0, 6.0);
    let height = 60.0 + bars.len() as f64 * (bar_h + gap);
    // log10 scale from 0.1x to 1000x.
    let (lo, hi) = (-1.0f64, 3.0f64);
    let x = |v: f64| {
        left + (v.max(1e-3).log10().clamp(lo, hi) - lo) / (hi - lo) * (width - left - 40.0)
    };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="14">proc against the best peer and Python (log scale; right of the line: proc is faster)</text>"#
    );
    for tick in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let tx = x(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" y1="30" x2="{tx:.1}" y2="{:.1}" stroke="{}" />"##,
            height - 10.0,
            if tick == 1.0 { "#000" } else { "#ddd" }
        );
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="42" text-anchor="middle">{tick}x</text>"#
        );
    }
    for (i, (w, label, v)) in bars.iter().enumerate() {
        let y = 50.0 + i as f64 * (bar_h + gap);
        let (x0, x1) = (x(1.0), x(*v));
        let (a, b) = if x1 >= x0 { (x0, x1) } else { (x1, x0) };
        let color = if *v >= 1.0 { "#2b7bba" } else { "#d9534f" };
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{:.1}">{w} {}</text>"#,
            y + bar_h * 0.75,
            label.replace('&', "and")
        );
        let _ = writeln!(
            svg,
            r#"<rect x="{a:.1}" y="{y:.1}" width="{:.1}" height="{bar_h}" fill="{color}" />"#,
            (b - a).max(1.0)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{v:.2}x</text>"#,
            b + 4.0,
            y + bar_h * 0.75
        );
    }
    svg.push_str("</svg>\n");
    svg
}
