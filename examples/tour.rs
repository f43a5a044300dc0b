//! A guided tour of `proc`: each section of the seed (Python's
//! multiprocessing summary) in turn, printing what happens.
//!
//! Run: `cargo run --release --example tour`

use std::time::{Duration, Instant};

use proc::{Process, ProcessClass};

fn section(title: &str) {
    println!("\n== {title} ==");
}

struct Greeter {
    base: Process,
    greeting: String,
}

impl ProcessClass for Greeter {
    fn process(&self) -> &Process {
        &self.base
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.base
    }
    fn run(&mut self) {
        println!(
            "  {} says {:?} from pid {}",
            self.name(),
            self.greeting,
            proc::getpid()
        );
    }
}

/// An entry for the Spawn start method: a plain function.
fn square(n: u64) -> u64 {
    n * n
}

/// A pool task that ends its worker, as the OOM killer would.
fn die(_: ()) -> u64 {
    std::process::abort()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First line of main: in a child started by the Spawn method, this runs
    // the entry instead of the tour.
    proc::init();
    section("1. creation flow: function -> Process -> attributes -> start -> join");
    let mut p = Process::new(|| println!("  hello from the child, pid {}", proc::getpid()));
    p.set_name("hello")?;
    p.start()?;
    p.join()?;
    println!("  {} ended with exitcode {:?}", p.name(), p.exitcode());

    section("2. every child has its own copy of memory, and no stdin");
    let mut data = vec![1, 2, 3];
    let child = proc::spawn(|| {
        data.push(4);
        data.len()
    })?;
    println!(
        "  child saw {} items; parent still has {:?}",
        child.join()?,
        data
    );

    section("3. attributes: name, pid, is_alive, daemon");
    let mut s = Process::new(|| std::thread::sleep(Duration::from_millis(200)));
    println!(
        "  before start: name={} pid={:?} alive={}",
        s.name(),
        s.pid(),
        s.is_alive()
    );
    s.start()?;
    println!("  running:      pid={:?} alive={}", s.pid(), s.is_alive());
    s.join()?;
    println!(
        "  joined:       alive={} exitcode={:?}",
        s.is_alive(),
        s.exitcode()
    );
    println!(
        "  set_daemon after start: {}",
        s.set_daemon(true).unwrap_err()
    );

    section("4. functions: getpid, getppid, exit(info)");
    let child = proc::spawn(|| (proc::getpid(), proc::getppid()))?;
    let (pid, ppid) = child.join()?;
    println!(
        "  child pid {pid}, its parent {ppid} (this process is {})",
        proc::getpid()
    );
    let mut e = Process::new(|| proc::exit("  (child printed this to stderr and exited with 1)"));
    e.start()?;
    e.join()?;
    println!("  exitcode after exit(message): {:?}", e.exitcode());

    section("5. process class: a struct with `run`");
    let mut g = Greeter {
        base: Process::default(),
        greeting: "good morning".into(),
    };
    g.start()?;
    g.join()?;
    println!("  {} exitcode {:?}", g.name(), g.exitcode());

    section("6. typed results and failures come back to the parent");
    let ok = proc::spawn(|| (1..=10u64).sum::<u64>())?;
    println!("  sum 1..=10 = {}", ok.join()?);
    let bad = proc::spawn(|| -> u64 { panic!("division by zero") })?;
    println!("  panicking child: {}", bad.join().unwrap_err());
    let killed = proc::spawn(|| std::thread::sleep(Duration::from_secs(60)))?;
    killed.kill()?;
    println!("  killed child: {}", killed.join().unwrap_err());

    section("7. queue: put/get between processes, bounds, timeouts, close");
    let q: proc::Queue<(u32, String)> = proc::Queue::with_maxsize(2)?;
    let producer = q.clone();
    let child = proc::spawn(move || {
        for i in 0..5 {
            producer.put((i, format!("message {i}"))).expect("put");
        }
        producer.close();
    })?;
    while let Ok((i, text)) = q.get() {
        println!("  got #{i}: {text} (qsize now {})", q.qsize());
    }
    child.join()?;
    println!("  after close and drain: get -> {}", q.get().unwrap_err());
    let empty: proc::Queue<u8> = proc::Queue::new()?;
    let t = Instant::now();
    let err = empty.get_timeout(Duration::from_millis(30)).unwrap_err();
    println!(
        "  get_timeout(30 ms) on an empty queue: {err} after {:.0?}",
        t.elapsed()
    );

    section("8. pool: apply_async many tasks, map, close, join; a dead worker is a result");
    let pool = proc::Pool::new(2)?;
    let pending: Vec<_> = (1..=5u64)
        .map(|i| pool.apply_async(square, i))
        .collect::<Result<_, _>>()?;
    let squares: Vec<u64> = pending
        .into_iter()
        .map(|r| r.get())
        .collect::<Result<_, _>>()?;
    println!("  apply_async square(1..=5) = {squares:?}");
    println!(
        "  map(square, 0..100_000) sums to {}",
        pool.map(square, 0..100_000u64)?.iter().sum::<u64>()
    );
    println!(
        "  a task that kills its worker: {}",
        pool.apply(die, ()).unwrap_err()
    );
    println!("  the pool replaced it: workers {:?}", pool.worker_pids());
    pool.close();
    pool.join()?;

    section("9. start methods: fork (a copy of this process) and spawn (a fresh exec)");
    for method in [proc::StartMethod::Fork, proc::StartMethod::Spawn] {
        let t = Instant::now();
        let child = proc::Builder::new()
            .start_method(method)
            .spawn_entry(square, 12)?;
        println!(
            "  {method:?}: square(12) = {} in {:.2} ms",
            child.join()?,
            t.elapsed().as_secs_f64() * 1e3
        );
    }

    section("10. start+join cost");
    let n = 100;
    let t = Instant::now();
    for _ in 0..n {
        proc::spawn(|| ())?.join()?;
    }
    println!(
        "  {:.0} µs per start+join ({n} runs)",
        t.elapsed().as_secs_f64() / n as f64 * 1e6
    );
    Ok(())
}
