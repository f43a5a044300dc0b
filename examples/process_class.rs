//! The seed's "process class" section: a struct carries its own fields,
//! implements `run`, and gets `start` / `join` and the base attributes.
//!
//! Run: `cargo run --example process_class`

use std::time::Duration;

use proc::{Process, ProcessClass};

/// 1. "Inherit Process": carry the base part.
struct Downloader {
    base: Process,
    // 2. "Extend __init__": the class's own attributes.
    urls: Vec<String>,
    delay: Duration,
}

impl Downloader {
    fn new(urls: &[&str], delay: Duration) -> Self {
        // `Process::for_class::<Self>()` is `super().__init__()` (the name
        // is `Downloader-N`, as Python's; `Process::default()` would give
        // `Process-N`).
        Downloader {
            base: Process::for_class::<Self>(),
            urls: urls.iter().map(|u| u.to_string()).collect(),
            delay,
        }
    }
}

impl ProcessClass for Downloader {
    fn process(&self) -> &Process {
        &self.base
    }

    fn process_mut(&mut self) -> &mut Process {
        &mut self.base
    }

    // 3. "Override run()": what the child does.
    fn run(&mut self) {
        for url in &self.urls {
            std::thread::sleep(self.delay);
            println!("  [{} pid {}] fetched {url}", self.name(), proc::getpid());
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Use: instantiate, start (which calls run in a new process), join.
    let mut d = Downloader::new(&["a.example/1", "a.example/2"], Duration::from_millis(30));
    d.set_name("downloader")?;
    println!(
        "{}: pid {:?}, alive {}, daemon {}",
        d.name(),
        d.pid(),
        d.is_alive(),
        d.daemon()
    );
    d.start()?;
    println!("{}: pid {:?}, alive {}", d.name(), d.pid(), d.is_alive());
    d.join()?;
    println!(
        "{}: exitcode {:?}, alive {}",
        d.name(),
        d.exitcode(),
        d.is_alive()
    );
    if let Err(e) = d.start() {
        println!("starting it again: error: {e}");
    }
    Ok(())
}
