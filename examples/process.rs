//! The seed's first sections: the creation flow, what a child sees, the
//! process object's attributes and the process functions.
//!
//! Run: `cargo run --example process`

use std::time::Duration;

use proc::Process;

/// 1. Wrap the work in a function.
fn count_down(label: &str, from: u32) {
    for i in (1..=from).rev() {
        println!(
            "  [{label}] {i} (pid {}, parent {})",
            proc::getpid(),
            proc::getppid()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("main process: {}", proc::current_process());

    // 2. Create the process object, bound to the function (the closure
    //    carries what Python passes as args/kwargs).
    let mut a = Process::new(|| count_down("a", 3));
    let mut b = Process::new(|| count_down("b", 2));

    // 3. Set attributes before start.
    a.set_name("counter-a")?;
    println!(
        "before start: {} pid={:?} alive={}",
        a.name(),
        a.pid(),
        a.is_alive()
    );

    // 4. Start: now the children really exist and run their functions,
    //    independently and in no particular order.
    a.start()?;
    b.start()?;
    println!(
        "started: {} pid={:?} alive={}, {} pid={:?}",
        a.name(),
        a.pid(),
        a.is_alive(),
        b.name(),
        b.pid()
    );

    // 5. Join: wait for them and reclaim their resources.
    a.join()?;
    b.join()?;
    println!(
        "joined: a exitcode={:?}, b exitcode={:?}",
        a.exitcode(),
        b.exitcode()
    );

    // Each process has its own copy of memory: changes stay in the child.
    // (The closure changes the parent's own vector, not a copy moved into
    // it: with a thread, the parent would see the push.)
    let mut seen = vec![10];
    let child = proc::spawn(|| {
        seen.push(11);
        println!("  child sees {seen:?}");
    })?;
    child.join()?;
    println!("parent still sees {seen:?}");

    // No stdin in children: reading gives end-of-file at once.
    let child = proc::spawn(|| {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map(|n| n == 0)
            .unwrap_or(true)
    })?;
    println!("child's stdin is empty: {}", child.join()?);

    // Daemon: ends with its parent; usually not joined.
    let mut d = Process::new(|| std::thread::sleep(Duration::from_secs(60)));
    d.set_daemon(true)?;
    d.start()?;
    println!(
        "daemon {} started (pid {:?}); it is terminated when main exits",
        d.name(),
        d.pid()
    );
    if let Err(e) = d.set_daemon(false) {
        println!("set daemon after start: error: {e}");
    }

    // sys.exit(info): a message goes to stderr and the exit code is 1.
    let mut e = Process::new(|| proc::exit("giving up"));
    e.start()?;
    e.join()?;
    println!("exit(\"giving up\") gave exitcode {:?}", e.exitcode());

    // terminate / kill: the exit code is minus the signal number.
    let mut s = Process::new(|| std::thread::sleep(Duration::from_secs(60)));
    s.start()?;
    println!(
        "join(100 ms) on a sleeper: {:?}",
        s.join_timeout(Duration::from_millis(100))?
    );
    s.terminate()?;
    s.join()?;
    println!("after terminate: exitcode {:?}", s.exitcode());

    // The typed way: spawn returns the child's result, or why there is none.
    let child = proc::spawn(|| (1..=20u64).product::<u64>())?;
    println!("20! computed in pid {}: {}", child.pid(), child.join()?);
    let child = proc::spawn(|| -> u64 { panic!("no result for you") })?;
    println!("a panicking child: {}", child.join().unwrap_err());

    println!("active children now: {:?}", proc::active_children());
    println!("cpu_count: {}", proc::cpu_count());
    Ok(())
}
