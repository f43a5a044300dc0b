//! Fault test of the pool: workers SIGKILLed at random moments while tasks
//! of mixed lengths run (through `apply_async`, `imap` and
//! `imap_unordered`, with and without `maxtasksperchild`). Afterwards
//! every task has exactly one outcome — its right value, or `WorkerDied`
//! from SIGKILL —, no task ran twice (each logs its start in a file), at
//! most one task fails per kill, and nothing hangs. Every round then runs
//! a blocking `map` of task records over 64 KiB (sent as the workers take
//! them, results decoded where they lie) under the same kills: its answer
//! is every value or `WorkerDied` from SIGKILL, and none of its tasks ran
//! twice either.
//!
//! Every fourth round's pool uses the fork server (the other rounds:
//! `Fork`, replacements from the zygote). `PROC_SOAK=1` runs 100 rounds
//! instead of 6.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proc::{Pool, StartMethod, TaskError};

/// The ids of the blocking map's tasks (apart from the others').
const MAP_IDS: u64 = 1_000_000;

fn main() {
    proc::init();
    common::run(&[(
        "workers_sigkilled_at_random_moments",
        600,
        workers_sigkilled,
    )]);
}

/// A task: logs its start, works for `micros`, returns `id * id`.
fn task((id, micros, log): (u64, u64, String)) -> u64 {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&log)
        .expect("log");
    // One short O_APPEND write: atomic, whole lines only.
    file.write_all(format!("{id}\n").as_bytes()).expect("log");
    let until = Instant::now() + Duration::from_micros(micros);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
    id * id
}

/// [`task`] with its arguments padded to send a task record over 64 KiB.
fn padded_task((id, micros, log, pad): (u64, u64, String, Vec<u8>)) -> u64 {
    task((id, micros, log)) + pad.len() as u64
}

/// xorshift: this test's only randomness, seeded per round.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn workers_sigkilled() {
    let rounds = if std::env::var_os("PROC_SOAK").is_some() {
        100
    } else {
        6
    };
    let dir = common::temp_dir("pool-faults");
    let (mut total_tasks, mut total_kills, mut total_died) = (0, 0, 0);
    let mut maps_ok = 0u32;
    for round in 0..rounds {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (round as u64 + 1));
        let log = dir.join(format!("round-{round}.log"));
        std::fs::write(&log, b"").expect("log");
        let log_path = log.to_string_lossy().into_owned();
        let mut builder = Pool::builder().processes(2 + round % 2);
        if round % 3 == 1 {
            builder = builder.maxtasksperchild(7);
        }
        if round % 4 == 3 {
            // Workers and replacements from the fork server (its offered
            // spare) instead of this process and its zygote.
            builder = builder.start_method(StartMethod::ForkServer);
        }
        let pool = Arc::new(builder.build().expect("pool"));
        let n = 240u64;
        let args: Vec<(u64, u64, String)> = (0..n)
            .map(|id| {
                // Mostly short, some up to 3 ms.
                let micros = if rng.next() % 8 == 0 {
                    rng.next() % 3000
                } else {
                    rng.next() % 200
                };
                (id, micros, log_path.clone())
            })
            .collect();
        // The killer: SIGKILLs a random worker every 2-12 ms.
        let stop = Arc::new(AtomicBool::new(false));
        let kills = Arc::new(AtomicU32::new(0));
        let killer = {
            let (pool, stop, kills) = (pool.clone(), stop.clone(), kills.clone());
            let mut rng = Rng(rng.next() | 1);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(2000 + rng.next() % 10_000));
                    let pids = pool.worker_pids();
                    if pids.is_empty() {
                        continue;
                    }
                    let pid = pids[(rng.next() % pids.len() as u64) as usize];
                    // SAFETY: a plain kill of a worker process of this test.
                    if unsafe { libc::kill(pid.as_u32() as i32, libc::SIGKILL) } == 0 {
                        kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let started = Instant::now();
        let mut outcomes: Vec<(u64, Result<u64, TaskError>)> = Vec::new();
        match round % 3 {
            0 => {
                let pending: Vec<_> = args
                    .into_iter()
                    .map(|a| (a.0, pool.apply_async(task, a).expect("submit")))
                    .collect();
                for (id, r) in pending {
                    outcomes.push((id, r.get()));
                }
            }
            1 => {
                let ids: Vec<u64> = args.iter().map(|a| a.0).collect();
                for (id, r) in ids.into_iter().zip(pool.imap(task, args)) {
                    outcomes.push((id, r));
                }
            }
            _ => {
                // Unordered: results carry their id (id * id).
                for r in pool.imap_unordered_chunked(task, args, 3) {
                    match r {
                        Ok(v) => outcomes.push(((v as f64).sqrt().round() as u64, Ok(v))),
                        Err(e) => outcomes.push((u64::MAX, Err(e))),
                    }
                }
            }
        }
        // A blocking map of large chunks, still under the kills.
        let pad = vec![7u8; 70_000];
        let padded: Vec<(u64, u64, String, Vec<u8>)> = (0..12)
            .map(|i| {
                (
                    MAP_IDS + i,
                    rng.next() % 2000,
                    log_path.clone(),
                    pad.clone(),
                )
            })
            .collect();
        let mapped = pool.map_chunked(padded_task, padded, 1 + round % 2);
        stop.store(true, Ordering::Relaxed);
        killer.join().expect("killer");
        let elapsed = started.elapsed();
        match &mapped {
            Ok(values) => {
                let expected: Vec<u64> = (MAP_IDS..MAP_IDS + 12).map(|i| i * i + 70_000).collect();
                assert_eq!(values, &expected, "round {round}");
            }
            Err(TaskError::WorkerDied { signal, .. }) => {
                assert_eq!(*signal, Some(libc::SIGKILL), "round {round}");
            }
            Err(e) => panic!("round {round}: map: {e}"),
        }
        let kills = kills.load(Ordering::Relaxed);
        assert!(
            elapsed < Duration::from_secs(60),
            "round {round} took {elapsed:?}"
        );
        // Every task has one outcome: its value, or WorkerDied by SIGKILL.
        assert_eq!(outcomes.len(), n as usize, "round {round}");
        let mut died = 0u32;
        for (id, outcome) in &outcomes {
            match outcome {
                Ok(v) => assert_eq!(*v, id * id, "round {round}"),
                Err(TaskError::WorkerDied { signal, .. }) => {
                    assert_eq!(*signal, Some(libc::SIGKILL), "round {round}");
                    died += 1;
                }
                Err(e) => panic!("round {round}: task {id}: {e}"),
            }
        }
        // A chunk of imap_unordered fails as a whole: up to 3 items per kill.
        let per_kill = if round % 3 == 2 { 3 } else { 1 };
        assert!(
            died <= kills * per_kill,
            "round {round}: {died} tasks failed for {kills} kills"
        );
        // No task ran twice; every task that succeeded ran once.
        let mut starts: HashMap<u64, u32> = HashMap::new();
        for line in std::fs::read_to_string(&log).expect("log").lines() {
            *starts.entry(line.parse().expect("id")).or_default() += 1;
        }
        for (id, count) in &starts {
            assert_eq!(*count, 1, "round {round}: task {id} started {count} times");
        }
        for (id, outcome) in &outcomes {
            if outcome.is_ok() {
                assert_eq!(starts.get(id), Some(&1), "round {round}: task {id}");
            }
        }
        if mapped.is_ok() {
            for id in MAP_IDS..MAP_IDS + 12 {
                assert_eq!(starts.get(&id), Some(&1), "round {round}: map task {id}");
            }
        }
        maps_ok += u32::from(mapped.is_ok());
        pool.close();
        pool.join().expect("join");
        total_tasks += n;
        total_kills += kills;
        total_died += died;
    }
    println!(
        "\n  {rounds} rounds: {total_tasks} tasks, {total_kills} workers SIGKILLed, \
         {total_died} tasks failed with WorkerDied, none lost, none run twice; \
         {maps_ok} of {rounds} maps of large chunks whole, the others WorkerDied"
    );
    let _ = std::fs::remove_dir_all(dir);
}
