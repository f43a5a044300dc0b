//! The seed's Pool section: create a pool, add many short tasks with
//! `apply_async`, close it, join it; then what Python's pool cannot do.
//!
//! Run: `cargo run --example pool`

use std::time::{Duration, Instant};

use proc::{Pool, TaskError};

/// An event function: runs in a worker process.
fn work((label, ms): (String, u64)) -> String {
    std::thread::sleep(Duration::from_millis(ms));
    format!("{label} done in worker {}", proc::getpid())
}

fn square(x: u64) -> u64 {
    x * x
}

fn fragile(x: u64) -> u64 {
    if x == 3 {
        panic!("three is unlucky");
    }
    if x == 5 {
        // The worker dies mid-task, as if the OOM killer took it.
        std::process::abort();
    }
    x
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    proc::init();
    // 1. Create the pool (default: one worker per CPU).
    let pool = Pool::new(proc::cpu_count())?;
    println!(
        "pool of {} workers: {:?}",
        pool.processes(),
        pool.worker_pids()
    );

    // 2. Add events to the pool's queue.
    let start = Instant::now();
    let pending: Vec<_> = (0..6)
        .map(|i| pool.apply_async(work, (format!("task {i}"), 50)))
        .collect::<Result<_, _>>()?;
    for r in pending {
        println!("  {} ({:?})", r.get()?, start.elapsed());
    }

    // Results come back typed; map chunks the input as Python does.
    let squares = pool.map(square, 0..1000)?;
    println!("sum of squares below 1000: {}", squares.iter().sum::<u64>());

    // A panic is a result, and a dead worker is replaced.
    for (x, result) in (0..8).zip(pool.imap(fragile, 0..8)) {
        match result {
            Ok(v) => println!("  fragile({x}) = {v}"),
            Err(TaskError::Panicked { message, .. }) => {
                println!("  fragile({x}) panicked: {message}")
            }
            Err(e) => println!("  fragile({x}) failed: {e}"),
        }
    }
    println!("workers now: {:?}", pool.worker_pids());

    // 3. Close the pool: no more events.
    pool.close();
    // 4. Join: wait for the workers to finish and exit.
    pool.join()?;
    println!("joined after {:?}", start.elapsed());
    Ok(())
}
