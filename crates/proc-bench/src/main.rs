//! `proc-bench`: runs the whole bench card (`shared/bench/WORKLOADS.md`,
//! W1–W8) for every system — `proc`, Python's `multiprocessing`, the Rust
//! peers procspawn, ipc-channel and ipmpsc, crossbeam-channel between
//! threads (the in-process ceiling), raw fork / exec / pipe (the OS floor)
//! — interleaved round by round, and writes a Markdown table, the ratios,
//! a chart and the machine's facts.
//!
//! ```text
//! cargo run --release -p proc-bench -- [--quick] [--rounds N] [--only W2,W5] [--out DIR]
//! ```
//!
//! `proc`'s own systems, Python and the ceilings come from the root
//! package's bench targets (asked for one system at a time with
//! `PROC_BENCH_SYSTEM`); the peers run in this program (`measure`
//! subcommand), each measurement in a process of its own.

mod peers;
mod report;
mod runner;

use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: proc-bench [--quick] [--rounds N] [--only W1,W2,...] [--out DIR] [--max-load F]\n\
         \x20      proc-bench measure <workload> <peer> [--quick]"
    );
    std::process::exit(2)
}

fn main() {
    // Both first: procspawn's children re-enter main here, as proc's do.
    procspawn::init();
    proc::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("measure") {
        let (Some(workload), Some(system)) = (args.get(1), args.get(2)) else {
            usage()
        };
        let quick = args.iter().any(|a| a == "--quick");
        match peers::measure(workload, system, quick) {
            Some((figure, unit)) => println!("RESULT {workload} {system} {figure:.2} {unit}"),
            None => {
                eprintln!("{system} does not run {workload}");
                std::process::exit(1)
            }
        }
        return;
    }
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let root = root.canonicalize().unwrap_or(root);
    let mut opts = runner::Options {
        quick: false,
        rounds: 3,
        only: None,
        out: root.join("target/bench-card"),
        max_load: 0.25,
    };
    let mut rounds = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--rounds" => rounds = it.next().and_then(|n| n.parse().ok()).or_else(|| usage()),
            "--only" => {
                opts.only = it
                    .next()
                    .map(|l| l.split(',').map(str::to_owned).collect())
                    .or_else(|| usage())
            }
            "--out" => opts.out = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--max-load" => {
                opts.max_load = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            _ => usage(),
        }
    }
    opts.rounds = rounds.unwrap_or(if opts.quick { 1 } else { 3 }).max(1);
    let command = format!("cargo run --release -p proc-bench -- {}", args.join(" "));
    let facts = report::facts();
    for (k, v) in &facts {
        eprintln!("{k}: {v}");
    }
    let rows = match runner::run(&opts, &root) {
        Ok(rows) => rows,
        Err(e) => {
            eprintln!("proc-bench: {e}");
            std::process::exit(1)
        }
    };
    let md = report::markdown(&rows, &facts, command.trim_end());
    let svg = report::chart(&rows);
    let stamp = report::utc_now().replace([' ', ':'], "-");
    let dir = opts.out.join(&stamp);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("table.md"), &md))
        .and_then(|()| std::fs::write(dir.join("ratios.svg"), &svg));
    println!("{md}");
    match written {
        Ok(()) => eprintln!(
            "wrote {} and {}",
            dir.join("table.md").display(),
            dir.join("ratios.svg").display()
        ),
        Err(e) => {
            eprintln!("proc-bench: writing {}: {e}", dir.display());
            std::process::exit(1)
        }
    }
    // A measurement that failed (a panic, a failed check, no figure) or a
    // workload without a proc figure means the card is broken.
    let broken: Vec<String> = rows
        .iter()
        .flat_map(|(w, r)| {
            let no_proc = (!r.systems.iter().any(|(s, v)| s == "proc" && !v.is_empty()))
                .then(|| format!("{w} proc (no figure)"));
            r.failed
                .iter()
                .map(move |(s, why)| format!("{w} {s}: {why}"))
                .chain(no_proc)
        })
        .collect();
    if !broken.is_empty() {
        eprintln!("proc-bench: failed: {}", broken.join("; "));
        std::process::exit(1)
    }
}
