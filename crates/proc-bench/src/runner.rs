//! Runs the whole bench card: every workload, every system, interleaved
//! round by round, each measurement in a process of its own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The card's workloads and the bench target of each.
pub const WORKLOADS: [(&str, &str); 9] = [
    ("W1", "w1_spawn_join"),
    ("W2", "w2_queue_small"),
    ("W3", "w3_queue_large"),
    ("W3b", "w3b_queue_huge"),
    ("W4", "w4_ping_pong"),
    ("W5", "w5_pool_apply_async"),
    ("W6", "w6_pool_map"),
    ("W7", "w7_mpmc"),
    ("W8", "w8_pool_startup"),
];

/// How the card is run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Smaller N, one round (for CI).
    pub quick: bool,
    /// Rounds per workload (the median is reported).
    pub rounds: usize,
    /// Only these workloads (ids such as `W2`), if set.
    pub only: Option<Vec<String>>,
    /// Where the table, the chart and the raw figures go.
    pub out: PathBuf,
    /// A measurement during which other processes used more than this
    /// share of the machine's CPU is run again (at most twice).
    pub max_load: f64,
}

/// One measurement: the figure, its unit, and the share of the machine
/// that other processes used meanwhile.
#[derive(Debug, Clone)]
pub struct Sample {
    pub figure: f64,
    pub unit: String,
    pub load: f64,
    pub disturbed: bool,
}

/// Everything measured for one workload.
#[derive(Debug, Default)]
pub struct Row {
    /// Samples per system, in the order the systems were listed.
    pub systems: Vec<(String, Vec<Sample>)>,
    /// Why a system has no figure (python3 missing, a peer without the
    /// feature).
    pub missing: BTreeMap<String, String>,
    /// Systems whose measurement failed, and how.
    pub failed: BTreeMap<String, String>,
}

/// A workload's systems, how each is run, and what they measured.
struct Planned<'a> {
    workload: &'a str,
    systems: Vec<(String, Runner)>,
    row: Row,
}

/// What one system of a workload is run by.
enum Runner {
    /// A bench target of the root package, asked for one system.
    Bench(PathBuf),
    /// This program's `measure` subcommand (the peers).
    Peer,
}

/// Builds the bench targets and returns their executables by target name.
pub fn build_benches(root: &Path) -> Result<BTreeMap<String, PathBuf>, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the bench targets (cargo bench --no-run -p proc) ...");
    let out = Command::new(cargo)
        .args(["bench", "--no-run", "-p", "proc", "--message-format=json"])
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err("cargo bench --no-run failed".into());
    }
    let mut exes = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_bench = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"));
        if let (true, Some(name), Some(exe)) = (
            is_bench,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            exes.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    Ok(exes)
}

/// Shortest measurement whose load figure is trusted (seconds).
const MIN_LOAD_WALL: f64 = 0.2;

/// Share of the machine busy (all CPUs), from `/proc/stat`: (busy, total)
/// jiffies.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    let total: u64 = v.iter().take(8).sum();
    Some((total - idle, total))
}

/// CPU seconds used by this process's waited-for children so far.
fn children_cpu() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid out-pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Runs one measurement; `Err` with the reason when it gave no figure.
fn run_one(
    runner: &Runner,
    workload: &str,
    system: &str,
    opts: &Options,
    root: &Path,
) -> Result<Sample, String> {
    let mut cmd = match runner {
        Runner::Bench(exe) => {
            let mut c = Command::new(exe);
            c.arg("--bench").env("PROC_BENCH_SYSTEM", system);
            c
        }
        Runner::Peer => {
            let mut c = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
            c.args(["measure", workload, system]);
            c
        }
    };
    if opts.quick {
        cmd.env("PROC_BENCH_QUICK", "1");
        if matches!(runner, Runner::Peer) {
            cmd.arg("--quick");
        }
    } else {
        // A full card: no quick setting inherited from the environment
        // (the peers read only `--quick`: every system runs the full N).
        cmd.env_remove("PROC_BENCH_QUICK");
    }
    cmd.current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let before_cpu = children_cpu();
    let before = cpu_jiffies();
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("start: {e}"))?;
    let mut stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut figure = None;
    let mut notes = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["RESULT", w, s, value, unit] = words[..] {
                if w == workload && s == system {
                    figure = value.parse::<f64>().ok().map(|v| (v, unit.to_owned()));
                }
            } else if line.contains("python3 not found") {
                notes.push("python3 not found".to_owned());
            } else if line.trim_start().starts_with("(python: failed") {
                notes.push(line.trim().to_owned());
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let stderr = err_reader.join().unwrap_or_default();
    let ours = children_cpu() - before_cpu;
    let load = match (before, cpu_jiffies()) {
        (Some((b0, _)), Some((b1, _))) if wall > 0.0 => {
            let busy = (b1 - b0) as f64 / clock_ticks();
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            ((busy - ours) / (wall * cpus)).max(0.0)
        }
        _ => 0.0,
    };
    match figure {
        Some((figure, unit)) => Ok(Sample {
            figure,
            unit,
            load,
            // /proc/stat counts in ticks (10 ms): below ~0.2 s the share is
            // noise, not a measure.
            disturbed: wall >= MIN_LOAD_WALL && load > opts.max_load,
        }),
        None if !notes.is_empty() => Err(notes.join("; ")),
        None => {
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            Err(format!(
                "no figure ({status}){}",
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    )
                }
            ))
        }
    }
}

/// Asks a bench target for its systems.
fn bench_systems(exe: &Path, root: &Path) -> Vec<String> {
    let Ok(out) = Command::new(exe)
        .arg("--bench")
        .env("PROC_BENCH_LIST", "1")
        .current_dir(root)
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("SYSTEMS "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.2}")
    }
}

/// Runs the card; returns the rows by workload id, in card order.
pub fn run(opts: &Options, root: &Path) -> Result<Vec<(String, Row)>, String> {
    let exes = build_benches(root)?;
    let chosen: Vec<(&str, &str)> = WORKLOADS
        .iter()
        .copied()
        .filter(|(w, _)| {
            opts.only
                .as_ref()
                .is_none_or(|only| only.iter().any(|o| o.eq_ignore_ascii_case(w)))
        })
        .collect();
    // The plan: for each workload, its systems and how to run each.
    let mut plan: Vec<Planned<'_>> = Vec::new();
    for (workload, target) in &chosen {
        let mut systems: Vec<(String, Runner)> = Vec::new();
        let mut row = Row::default();
        match exes.get(*target) {
            Some(exe) => {
                for s in bench_systems(exe, root) {
                    systems.push((s, Runner::Bench(exe.clone())));
                }
            }
            None => {
                row.missing
                    .insert("proc".into(), format!("bench target {target} not built"));
            }
        }
        let (peers, why_not) = crate::peers::systems(workload);
        for p in peers {
            systems.push(((*p).to_owned(), Runner::Peer));
        }
        for (p, why) in why_not {
            row.missing.insert((*p).into(), (*why).into());
        }
        row.systems = systems
            .iter()
            .map(|(s, _)| (s.clone(), Vec::new()))
            .collect();
        plan.push(Planned {
            workload,
            systems,
            row,
        });
    }
    let total: usize = plan.iter().map(|p| p.systems.len()).sum::<usize>() * opts.rounds;
    let mut done = 0;
    let started = Instant::now();
    for Planned {
        workload,
        systems,
        row,
    } in &mut plan
    {
        for round in 0..opts.rounds {
            // Rotate the order each round: whoever runs right after another
            // system pays for its leftovers (page cache, teardown).
            let n = systems.len();
            for k in 0..n {
                let i = (k + round) % n;
                let (system, runner) = &systems[i];
                done += 1;
                let mut best: Option<Sample> = None;
                let mut failure = None;
                for attempt in 0..3 {
                    eprint!(
                        "[{done:>3}/{total}] {workload} {system} (round {}/{}{}) ... ",
                        round + 1,
                        opts.rounds,
                        if attempt > 0 {
                            ", again: disturbed"
                        } else {
                            ""
                        }
                    );
                    match run_one(runner, workload, system, opts, root) {
                        Ok(s) => {
                            eprintln!(
                                "{} {} (others used {:.0}% of the CPU)",
                                human(s.figure),
                                s.unit,
                                s.load * 100.0
                            );
                            let disturbed = s.disturbed;
                            if best.as_ref().is_none_or(|b| s.load < b.load) {
                                best = Some(s);
                            }
                            if !disturbed {
                                break;
                            }
                        }
                        Err(e) => {
                            eprintln!("{e}");
                            failure = Some(e);
                            break;
                        }
                    }
                }
                match (best, failure) {
                    (Some(s), _) => row.systems[i].1.push(s),
                    (None, Some(why)) if why.contains("python3 not found") => {
                        row.missing.insert(system.clone(), why);
                    }
                    (None, why) => {
                        row.failed.insert(system.clone(), why.unwrap_or_default());
                    }
                }
            }
        }
        let left = total - done;
        if left > 0 {
            eprintln!(
                "  {workload} done; {left} measurements left ({:.0?} so far)",
                started.elapsed()
            );
        }
    }
    Ok(plan
        .into_iter()
        .map(|p| (p.workload.to_owned(), p.row))
        .collect())
}
