//! The same job under each start method, with each one's start+join time.
//!
//! Run: `cargo run --release --example start_methods`

use std::time::Instant;

use proc::{Builder, Queue, StartMethod};

/// The job: sum the squares of a range, and report through a queue.
fn job((range, out): ((u64, u64), Queue<String>)) -> u64 {
    let sum = (range.0..range.1).map(|x| x * x).sum();
    out.put(format!(
        "pid {} summed {}..{}",
        proc::getpid(),
        range.0,
        range.1
    ))
    .expect("report");
    sum
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First line of main: in a child started by Spawn, this runs the entry.
    proc::init();
    let reports: Queue<String> = Queue::new()?;
    for method in [
        StartMethod::Fork,
        StartMethod::Spawn,
        StartMethod::ForkServer,
        StartMethod::ForkServer,
    ] {
        let t = Instant::now();
        let child = Builder::new()
            .start_method(method)
            .spawn_entry(job, ((1, 1_000), reports.clone()))?;
        let sum = child.join()?;
        let took = t.elapsed();
        println!(
            "{method:?}: sum {sum}, start+join {:.2} ms; {}",
            took.as_secs_f64() * 1e3,
            reports.get()?
        );
    }
    // (The first ForkServer start also starts the server; the second shows
    // the steady cost.) With threads running, fork is refused and the exec
    // methods still work.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    match proc::spawn(|| 1) {
        Err(e) => println!("fork with a thread running: {e}"),
        Ok(h) => println!("fork with a thread running: started {}", h.pid()),
    }
    for method in [StartMethod::Spawn, StartMethod::ForkServer] {
        let child = Builder::new()
            .start_method(method)
            .spawn_entry(job, ((0, 10), reports.clone()))?;
        println!(
            "{method:?} with a thread running: sum {}; {}",
            child.join()?,
            reports.get()?
        );
    }
    drop(tx);
    thread.join().expect("thread");
    Ok(())
}
