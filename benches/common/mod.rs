//! Shared pieces of the bench-card targets: quick mode, medians, the
//! `RESULT` output contract of `shared/bench/WORKLOADS.md`, and running the
//! Python side by side.
#![allow(dead_code)]

use std::process::Command;
use std::time::Instant;

/// Whether `PROC_BENCH_QUICK=1` asks for a smaller N and one round.
pub fn quick() -> bool {
    std::env::var("PROC_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The pool workloads' worker count: 2, the card's (`WORKLOADS.md`), unless
/// `PROC_BENCH_WORKERS=<n>` asks for another to see how W5 and W6 scale on
/// a machine with more cores (not a card figure).
pub fn workers() -> usize {
    std::env::var("PROC_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

/// The one system the suite runner (`proc-bench`) asks this target to
/// measure (`PROC_BENCH_SYSTEM=<name>`): one round of it alone, so that the
/// runner can interleave it with the peers' measurements.
pub fn only_system() -> Option<String> {
    std::env::var("PROC_BENCH_SYSTEM").ok()
}

/// Whether the runner asks for the names of this target's systems
/// (`PROC_BENCH_LIST=1`): they are printed as one `SYSTEMS` line.
pub fn list_systems() -> bool {
    std::env::var("PROC_BENCH_LIST").is_ok_and(|v| v == "1")
}

/// Prints the `SYSTEMS` line for the runner.
pub fn print_systems(workload: &str, names: &[&str]) {
    println!("SYSTEMS {workload} {}", names.join(" "));
}

/// How many interleaved rounds to run (the median of them is reported).
pub fn rounds() -> usize {
    if quick() || only_system().is_some() {
        1
    } else {
        std::env::var("PROC_BENCH_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3)
    }
}

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints the contract line `RESULT <workload> <system> <figure> <unit>`,
/// plus the min–max over the rounds.
pub fn result(workload: &str, system: &str, samples: &[f64], unit: &str) {
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!("RESULT {workload} {system} {:.2} {unit}", median(samples));
    println!(
        "  ({system}: {} rounds, min {min:.2}, max {max:.2})",
        samples.len()
    );
}

/// Runs `python3 benches/python/<script> <args>` and returns the figure it
/// prints on its last line, or `None` (with a note) when python3 is absent
/// or fails.
pub fn python(script: &str, args: &[String]) -> Option<f64> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/python/");
    let out = match Command::new("python3")
        .arg(format!("{path}{script}"))
        .args(args)
        .output()
    {
        Ok(out) => out,
        Err(_) => {
            println!("  (python: python3 not found)");
            return None;
        }
    };
    if !out.status.success() {
        println!(
            "  (python: failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

/// One system of a bench: its name for the `RESULT` line and one run,
/// returning the figure (or `None` when it cannot run here, e.g. no python3).
pub struct System<'a> {
    pub name: &'static str,
    pub run: Box<dyn FnMut() -> Option<f64> + 'a>,
}

/// Runs every system once per round, interleaved (A B C A B C …), prints
/// each round, then the `RESULT` lines (median over rounds) and the ratios
/// of `proc` against the others. `higher_is_better` tells how to read them.
pub fn interleave(
    workload: &str,
    unit: &str,
    higher_is_better: bool,
    mut systems: Vec<System<'_>>,
) {
    if list_systems() {
        let names: Vec<&str> = systems.iter().map(|s| s.name).collect();
        print_systems(workload, &names);
        return;
    }
    if let Some(only) = only_system() {
        systems.retain(|s| s.name == only);
    }
    let rounds = rounds();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); systems.len()];
    for round in 1..=rounds {
        let mut line = format!("  round {round}/{rounds}:");
        for (i, s) in systems.iter_mut().enumerate() {
            match (s.run)() {
                Some(v) => {
                    samples[i].push(v);
                    line += &format!(" {} {}", s.name, human(v));
                }
                None => line += &format!(" {} -", s.name),
            }
        }
        println!("{line}");
    }
    let mut medians = Vec::new();
    for (s, xs) in systems.iter().zip(&samples) {
        if !xs.is_empty() {
            result(workload, s.name, xs, unit);
            medians.push((s.name, median(xs)));
        }
    }
    if let Some(&(_, ours)) = medians.iter().find(|(n, _)| *n == "proc") {
        for &(name, v) in medians.iter().filter(|(n, _)| *n != "proc") {
            let ratio = if higher_is_better { ours / v } else { v / ours };
            println!("ratio proc vs {name}: {ratio:.2}x (above 1: proc is better)");
        }
    }
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.2}")
    }
}

/// The Python side of a queue workload (`benches/python/queue_workloads.py`).
pub fn python_system(workload: &'static str, n: u64) -> System<'static> {
    System {
        name: "python",
        run: Box::new(move || python("queue_workloads.py", &[workload.to_owned(), n.to_string()])),
    }
}

/// W3 / W3b with proc: a child `put_bytes` N messages of `size` bytes, the
/// parent `get_bytes` them all; GB/s of payload.
pub fn bytes_proc(n: usize, size: usize) -> f64 {
    let q: proc::Queue<Vec<u8>> = proc::Queue::new().expect("queue");
    let producer = q.clone();
    let t = Instant::now();
    let child = proc::spawn(move || {
        let payload = vec![7u8; size];
        for _ in 0..n {
            producer.put_bytes(&payload).expect("put");
        }
    })
    .expect("spawn");
    let mut total = 0;
    for _ in 0..n {
        let v = q.get_bytes().expect("get");
        assert_eq!(v[size - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total, n * size);
    total as f64 / el / 1e9
}

/// W3 / W3b with crossbeam-channel between two threads (each message a
/// fresh `Vec`, as `get_bytes` returns); GB/s of payload.
pub fn bytes_crossbeam(n: usize, size: usize) -> f64 {
    let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let t = Instant::now();
    let child = std::thread::spawn(move || {
        let payload = vec![7u8; size];
        for _ in 0..n {
            tx.send(payload.clone()).expect("send");
        }
    });
    let mut total = 0;
    for _ in 0..n {
        let v = rx.recv().expect("recv");
        assert_eq!(v[size - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total, n * size);
    total as f64 / el / 1e9
}

/// The Python side of a pool workload (`benches/python/pool_workloads.py`).
pub fn python_pool_system(workload: &'static str, n: u64) -> System<'static> {
    System {
        name: "python",
        run: Box::new(move || {
            python(
                "pool_workloads.py",
                &[workload.to_owned(), n.to_string(), workers().to_string()],
            )
        }),
    }
}

/// The in-process ceiling of the pool workloads: `workers` threads fed
/// through one crossbeam channel, results back through another; runs
/// `f` on each of `jobs`, returns the results in order.
pub fn thread_pool_map(workers: usize, jobs: Vec<u64>, f: fn(u64) -> u64) -> Vec<u64> {
    let n = jobs.len();
    let (task_tx, task_rx) = crossbeam_channel::unbounded::<(usize, u64)>();
    let (result_tx, result_rx) = crossbeam_channel::unbounded::<(usize, u64)>();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let rx = task_rx.clone();
            let tx = result_tx.clone();
            std::thread::spawn(move || {
                for (i, x) in rx {
                    if tx.send((i, f(x))).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    for job in jobs.into_iter().enumerate() {
        task_tx.send(job).expect("send");
    }
    drop(task_tx);
    let mut out = vec![0; n];
    for _ in 0..n {
        let (i, v) = result_rx.recv().expect("recv");
        out[i] = v;
    }
    for t in threads {
        t.join().expect("thread");
    }
    out
}
