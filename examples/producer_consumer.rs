//! Several producer processes and several consumer processes on one queue:
//! producers hash chunks of work and report results; consumers aggregate;
//! a `JoinableQueue` tells the parent when every job is done.
//!
//! Run: `cargo run --release --example producer_consumer`

use std::time::Instant;

use proc::{JoinableQueue, Queue};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    id: u32,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    id: u32,
    worker: u32,
    hash: u64,
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const JOBS: u32 = 2_000;
    const WORKERS: u32 = 3;
    let jobs: JoinableQueue<Job> = JoinableQueue::from_queue(Queue::builder().maxsize(64).build()?);
    let results: Queue<Done> = Queue::new()?;
    let t = Instant::now();

    // Consumers of jobs (workers): hash each job, report, mark it done.
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (jobs, results) = (jobs.clone(), results.clone());
            proc::spawn(move || {
                let mut count = 0u32;
                while let Ok(job) = jobs.get() {
                    results
                        .put(Done {
                            id: job.id,
                            worker: w,
                            hash: fnv1a(&job.data),
                        })
                        .expect("report");
                    jobs.task_done().expect("task_done");
                    count += 1;
                }
                count
            })
        })
        .collect::<Result<_, _>>()?;

    // Two producer processes split the job ids.
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            let jobs = jobs.clone();
            proc::spawn(move || {
                for id in (p..JOBS).step_by(2) {
                    let data = (0..4096u32).map(|i| (i * 31 + id) as u8).collect();
                    jobs.put(Job { id, data }).expect("put job");
                }
            })
        })
        .collect::<Result<_, _>>()?;
    for p in producers {
        p.join()?;
    }
    jobs.join(); // every job put has been marked done
    jobs.close(); // the workers' get() now ends with Closed
    let mut per_worker = Vec::new();
    for w in workers {
        per_worker.push(w.join()?);
    }
    let mut seen = vec![false; JOBS as usize];
    while let Ok(done) = results.try_get() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 31 + done.id) as u8).collect();
        assert_eq!(
            done.hash,
            fnv1a(&data),
            "job {} hashed wrong by worker {}",
            done.id,
            done.worker
        );
        seen[done.id as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "a job was lost");
    println!(
        "{JOBS} jobs hashed by {WORKERS} worker processes {per_worker:?} in {:.1} ms, all checked",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
