//! W7 mpmc: one queue; 4 producer processes put 250,000 integers each; 2
//! consumer processes get until the queue is closed and drained; each sends
//! its count and sum to the parent, which checks them. Figure: messages/s.
//! 1,000,000 in total (`PROC_BENCH_QUICK=1`: 100,000, one round).

mod common;

use std::time::Instant;

const PRODUCERS: u64 = 4;
const CONSUMERS: usize = 2;

fn proc_run(total: u64) -> f64 {
    let per = total / PRODUCERS;
    let q: proc::Queue<u64> = proc::Queue::new().expect("queue");
    let results: proc::Queue<(u64, u64)> = proc::Queue::new().expect("queue");
    let t = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let (q, results) = (q.clone(), results.clone());
            proc::spawn(move || {
                let (mut count, mut sum) = (0u64, 0u64);
                while let Ok(v) = q.get() {
                    count += 1;
                    sum += v;
                }
                results.put((count, sum)).expect("result");
            })
            .expect("spawn")
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let q = q.clone();
            proc::spawn(move || {
                for i in 0..per {
                    q.put(i).expect("put");
                }
            })
            .expect("spawn")
        })
        .collect();
    for p in producers {
        p.join().expect("producer");
    }
    q.close();
    let (mut count, mut sum) = (0, 0);
    for _ in 0..CONSUMERS {
        let (c, s) = results.get().expect("result");
        count += c;
        sum += s;
    }
    for c in consumers {
        c.join().expect("consumer");
    }
    let el = t.elapsed().as_secs_f64();
    assert_eq!(count, per * PRODUCERS);
    assert_eq!(sum, PRODUCERS * per * (per - 1) / 2);
    count as f64 / el
}

fn crossbeam_run(total: u64) -> f64 {
    let per = total / PRODUCERS;
    let (tx, rx) = crossbeam_channel::unbounded::<u64>();
    let t = Instant::now();
    let consumers: Vec<_> = (0..CONSUMERS)
        .map(|_| {
            let rx = rx.clone();
            std::thread::spawn(move || {
                let (mut count, mut sum) = (0u64, 0u64);
                while let Ok(v) = rx.recv() {
                    count += 1;
                    sum += v;
                }
                (count, sum)
            })
        })
        .collect();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..per {
                    tx.send(i).expect("send");
                }
            })
        })
        .collect();
    drop(tx);
    for p in producers {
        p.join().expect("producer");
    }
    let (mut count, mut sum) = (0, 0);
    for c in consumers {
        let (n, s) = c.join().expect("consumer");
        count += n;
        sum += s;
    }
    let el = t.elapsed().as_secs_f64();
    assert_eq!(count, per * PRODUCERS);
    assert_eq!(sum, PRODUCERS * per * (per - 1) / 2);
    count as f64 / el
}

fn main() {
    let total: u64 = if common::quick() { 100_000 } else { 1_000_000 };
    println!("W7 mpmc: {PRODUCERS} producers, {CONSUMERS} consumers, {total} messages");
    common::interleave(
        "W7",
        "msg/s",
        true,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(total))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(crossbeam_run(total))),
            },
            common::python_system("W7", total),
        ],
    );
}
