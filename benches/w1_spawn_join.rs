//! W1 spawn-join: start a process whose target does nothing, then join it;
//! sequentially, N = 200 times. Figure: µs per start+join.
//!
//! Systems, interleaved one start+join at a time (cycling through every
//! order) in each round: `raw-fork` (libc fork + `_exit` +
//! waitpid, the OS floor), `proc` (`proc::spawn(|| ()).join()`),
//! `proc-process` (`Process::new` + `start` + `join`), and `python`
//! (`multiprocessing` with the fork context); then, interleaved with each
//! other, `raw-exec` (std `Command` running this binary, which exits at
//! once), `proc-spawn` (`spawn_entry` with `StartMethod::Spawn`) and
//! `proc-forkserver` (`StartMethod::ForkServer`), N each, then Python's
//! `spawn` and `forkserver` contexts (`python-spawn`, `python-forkserver`,
//! N each, after each round). `PROC_BENCH_QUICK=1`: N = 20, one round.

mod common;

use std::time::Instant;

/// One raw fork + `_exit(0)` + waitpid, in µs.
fn raw_fork() -> f64 {
    let t = Instant::now();
    #[allow(clippy::disallowed_methods)] // the floor we compare against
    // SAFETY: this bench is single-threaded, and the child only calls the
    // async-signal-safe _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: _exit never returns and touches no shared state.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert_eq!(status, 0);
    t.elapsed().as_secs_f64() * 1e6
}

/// One `proc::spawn(|| ()).join()`, in µs.
fn proc_spawn() -> f64 {
    let t = Instant::now();
    proc::spawn(|| ()).expect("spawn").join().expect("join");
    t.elapsed().as_secs_f64() * 1e6
}

/// One `Process::new` + `start` + `join`, in µs.
fn proc_process() -> f64 {
    let t = Instant::now();
    let mut p = proc::Process::new(|| ());
    p.start().expect("start");
    p.join().expect("join");
    assert_eq!(p.exitcode(), Some(0));
    t.elapsed().as_secs_f64() * 1e6
}

/// The Spawn start method's target: does nothing.
fn noop(_: ()) {}

/// One `Builder::spawn_entry` start+join with `method`, in µs.
fn proc_entry(method: proc::StartMethod) -> f64 {
    let t = Instant::now();
    proc::Builder::new()
        .start_method(method)
        .spawn_entry(noop, ())
        .expect("spawn")
        .join()
        .expect("join");
    t.elapsed().as_secs_f64() * 1e6
}

/// One exec of this same bench binary that exits at once (the OS floor
/// for an exec start), with std's `Command`, in µs.
fn raw_exec() -> f64 {
    let t = Instant::now();
    let status = std::process::Command::new("/proc/self/exe")
        .env(RAW_EXEC, "1")
        .status()
        .expect("exec");
    assert!(status.success());
    t.elapsed().as_secs_f64() * 1e6
}

const RAW_EXEC: &str = "PROC_W1_RAW_EXEC";

/// All six orders of three systems: whichever runs right after another
/// system's child exits pays for that child's teardown, so each system must
/// follow each other one equally often.
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [0, 2, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
];

fn main() {
    proc::init();
    if std::env::var_os(RAW_EXEC).is_some() {
        return;
    }
    let n = if common::quick() { 20 } else { 200 };
    const SYSTEMS: [&str; 9] = [
        "raw-fork",
        "proc",
        "proc-process",
        "python",
        "raw-exec",
        "proc-spawn",
        "proc-forkserver",
        "python-spawn",
        "python-forkserver",
    ];
    if common::list_systems() {
        common::print_systems("W1", &SYSTEMS);
        return;
    }
    if let Some(only) = common::only_system() {
        // One system alone, for the suite runner (which interleaves).
        // Five starts to warm up page tables and the allocator, as below.
        let mean = |k: usize, f: &dyn Fn() -> f64| {
            (0..5).for_each(|_| {
                f();
            });
            (0..k).map(|_| f()).sum::<f64>() / k as f64
        };
        let figure = match only.as_str() {
            "raw-fork" => Some(mean(n, &raw_fork)),
            "proc" => Some(mean(n, &proc_spawn)),
            "proc-process" => Some(mean(n, &proc_process)),
            "python" => common::python("w1_spawn_join.py", &[n.to_string(), "fork".into()]),
            "raw-exec" => Some(mean(n, &raw_exec)),
            "proc-spawn" => Some(mean(n, &|| proc_entry(proc::StartMethod::Spawn))),
            "proc-forkserver" => {
                // The first start execs the server: not part of the figure.
                proc_entry(proc::StartMethod::ForkServer);
                Some(mean(n, &|| proc_entry(proc::StartMethod::ForkServer)))
            }
            "python-spawn" => common::python("w1_spawn_join.py", &[n.to_string(), "spawn".into()]),
            "python-forkserver" => {
                common::python("w1_spawn_join.py", &[n.to_string(), "forkserver".into()])
            }
            _ => None,
        };
        if let Some(us) = figure {
            common::result("W1", &only, &[us], "us");
        }
        return;
    }
    let rounds = common::rounds();
    println!("W1 spawn-join: N = {n}, {rounds} interleaved rounds");
    // Warm up page tables and the allocator once.
    for _ in 0..5 {
        raw_fork();
        proc_spawn();
    }
    let (mut raw, mut ours, mut obj, mut py) = (vec![], vec![], vec![], vec![]);
    for round in 1..=rounds {
        // Interleaved one start+join at a time, so that the machine's drift
        // hits every system alike.
        let (mut r, mut o, mut p) = (0.0, 0.0, 0.0);
        const ORDERS: [[usize; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for i in 0..n {
            for k in ORDERS[i % 6] {
                match k {
                    0 => r += raw_fork(),
                    1 => o += proc_spawn(),
                    _ => p += proc_process(),
                }
            }
        }
        raw.push(r / n as f64);
        ours.push(o / n as f64);
        obj.push(p / n as f64);
        if let Some(us) = common::python("w1_spawn_join.py", &[n.to_string(), "fork".into()]) {
            py.push(us);
        }
        println!(
            "  round {round}: raw-fork {:.1} µs, proc {:.1} µs, proc-process {:.1} µs, python {} µs",
            raw[round - 1],
            ours[round - 1],
            obj[round - 1],
            py.last().map_or("-".to_owned(), |v| format!("{v:.1}"))
        );
    }
    // The exec start methods, interleaved the same way.
    let (mut rex, mut psp, mut pfs) = (vec![], vec![], vec![]);
    let (mut pysp, mut pyfs) = (vec![], vec![]);
    let m = n;
    // The first ForkServer start execs the server: not part of the figure.
    proc_entry(proc::StartMethod::ForkServer);
    for round in 1..=rounds {
        let (mut a, mut b, mut c) = (0.0, 0.0, 0.0);
        for i in 0..m {
            for k in ORDERS[i % 6] {
                match k {
                    0 => a += raw_exec(),
                    1 => b += proc_entry(proc::StartMethod::Spawn),
                    _ => c += proc_entry(proc::StartMethod::ForkServer),
                }
            }
        }
        rex.push(a / m as f64);
        psp.push(b / m as f64);
        pfs.push(c / m as f64);
        for (method, into) in [("spawn", &mut pysp), ("forkserver", &mut pyfs)] {
            if let Some(us) = common::python("w1_spawn_join.py", &[m.to_string(), method.into()]) {
                into.push(us);
            }
        }
        println!(
            "  round {round} (exec, N = {m}): raw-exec {:.1} µs, proc-spawn {:.1} µs, \
             proc-forkserver {:.1} µs, python-spawn {} µs, python-forkserver {} µs",
            a / m as f64,
            b / m as f64,
            c / m as f64,
            pysp.last().map_or("-".to_owned(), |v| format!("{v:.1}")),
            pyfs.last().map_or("-".to_owned(), |v| format!("{v:.1}"))
        );
    }
    common::result("W1", "raw-exec", &rex, "us");
    common::result("W1", "proc-spawn", &psp, "us");
    common::result("W1", "proc-forkserver", &pfs, "us");
    if !pysp.is_empty() {
        common::result("W1", "python-spawn", &pysp, "us");
    }
    if !pyfs.is_empty() {
        common::result("W1", "python-forkserver", &pyfs, "us");
    }
    println!(
        "ratio proc-spawn / raw-exec: {:.2}x",
        common::median(&psp) / common::median(&rex)
    );
    common::result("W1", "raw-fork", &raw, "us");
    common::result("W1", "proc", &ours, "us");
    common::result("W1", "proc-process", &obj, "us");
    if !py.is_empty() {
        common::result("W1", "python", &py, "us");
    }
    let (raw, ours) = (common::median(&raw), common::median(&ours));
    println!("ratio proc / raw-fork: {:.2}x", ours / raw);
    if !py.is_empty() {
        println!(
            "ratio python / proc: {:.1}x faster",
            common::median(&py) / ours
        );
    }
}
