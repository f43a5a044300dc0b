//! W3 queue-large: as W2 with N messages of 64 KiB of bytes each (proc:
//! `put_bytes` / `get_bytes`). Figure: GB/s of payload. N = 10,000
//! (`PROC_BENCH_QUICK=1`: 1,000, one round).

mod common;

use std::time::Instant;

const SIZE: usize = 64 * 1024;

fn proc_run(n: usize) -> f64 {
    let q: proc::Queue<Vec<u8>> = proc::Queue::new().expect("queue");
    let producer = q.clone();
    let t = Instant::now();
    let child = proc::spawn(move || {
        let payload = vec![7u8; SIZE];
        for _ in 0..n {
            producer.put_bytes(&payload).expect("put");
        }
    })
    .expect("spawn");
    let mut total = 0;
    for _ in 0..n {
        let v = q.get_bytes().expect("get");
        assert_eq!(v[SIZE - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total, n * SIZE);
    total as f64 / el / 1e9
}

fn crossbeam_run(n: usize) -> f64 {
    let (tx, rx) = crossbeam_channel::unbounded::<Vec<u8>>();
    let t = Instant::now();
    let child = std::thread::spawn(move || {
        let payload = vec![7u8; SIZE];
        for _ in 0..n {
            tx.send(payload.clone()).expect("send");
        }
    });
    let mut total = 0;
    for _ in 0..n {
        let v = rx.recv().expect("recv");
        assert_eq!(v[SIZE - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    total as f64 / el / 1e9
}

fn main() {
    let n = if common::quick() { 1_000 } else { 10_000 };
    println!("W3 queue-large: N = {n} x 64 KiB");
    common::interleave(
        "W3",
        "GB/s",
        true,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(n))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(crossbeam_run(n))),
            },
            common::System {
                name: "python",
                run: Box::new(|| {
                    common::python("queue_workloads.py", &["W3".into(), n.to_string()])
                }),
            },
        ],
    );
}
