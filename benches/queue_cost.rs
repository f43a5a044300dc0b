//! The queue's own CPU cost per operation, without a peer: one thread puts
//! N numbers into a queue large enough to hold them all, then gets them
//! back; then the same thread puts and gets on two queues in turn, each
//! operation on the other queue than the one before (a pool worker's
//! pattern: tasks in from one ring, results out to another); then byte
//! strings of 64 bytes (`put_bytes`, `get_bytes_into`). No process, no
//! other core, no waiting: what is left is the work of `put` and `get`
//! themselves (serializing, the lock, the record, the commit, the wake-up
//! check), which the card's W2 and W7 measure only mixed with the traffic
//! between two cores. Not a card workload.
//!
//! Figure: ns per operation, the median of 15 passes (`PROC_BENCH_QUICK=1`:
//! 3 passes of a tenth of N), printed as `COST <what> <median> ns (min ..)`.
//! N = 1,000,000.

mod common;

use std::time::Instant;

fn median_min(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    (xs[xs.len() / 2], xs[0])
}

fn report(what: &str, xs: Vec<f64>) {
    let (median, min) = median_min(xs);
    println!("COST {what} {median:.2} ns (min {min:.2})");
}

fn main() {
    let quick = common::quick();
    let n: u64 = if quick { 100_000 } else { 1_000_000 };
    let passes = if quick { 3 } else { 15 };
    println!("queue cost: {n} operations per pass, {passes} passes, one thread");
    // 16 bytes per small record: room for every number at once.
    let q: proc::Queue<u64> = proc::Queue::builder()
        .capacity(32 << 20)
        .build()
        .expect("queue");
    let other: proc::Queue<u64> = proc::Queue::builder()
        .capacity(32 << 20)
        .build()
        .expect("queue");
    let (mut put, mut get, mut pair) = (Vec::new(), Vec::new(), Vec::new());
    let (mut put_bytes, mut get_bytes) = (Vec::new(), Vec::new());
    let record = [7u8; 64];
    let mut back = Vec::new();
    for _ in 0..passes {
        let t = Instant::now();
        for i in 0..n {
            q.put(i).expect("put");
        }
        put.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        let t = Instant::now();
        let mut sum = 0u64;
        for _ in 0..n {
            sum = sum.wrapping_add(q.get().expect("get"));
        }
        get.push(t.elapsed().as_secs_f64() * 1e9 / n as f64);
        assert_eq!(sum, n * (n - 1) / 2);
        // Every operation on the other queue than the one before.
        let t = Instant::now();
        for i in 0..n {
            q.put(i).expect("put");
            other.put(i).expect("put");
            sum = sum.wrapping_add(q.get().expect("get"));
            sum = sum.wrapping_sub(other.get().expect("get"));
        }
        pair.push(t.elapsed().as_secs_f64() * 1e9 / (4 * n) as f64);
        assert_eq!(sum, n * (n - 1) / 2);
        // Byte strings of 64 bytes (a pool's task and result records),
        // read into one reused buffer: 96-byte records, a quarter of N
        // fits the ring.
        let bytes_n = n / 4;
        let t = Instant::now();
        for _ in 0..bytes_n {
            q.put_bytes(&record).expect("put_bytes");
        }
        put_bytes.push(t.elapsed().as_secs_f64() * 1e9 / bytes_n as f64);
        let t = Instant::now();
        for _ in 0..bytes_n {
            q.get_bytes_into(&mut back).expect("get_bytes_into");
        }
        get_bytes.push(t.elapsed().as_secs_f64() * 1e9 / bytes_n as f64);
        assert_eq!(back, record);
    }
    report("put-u64", put);
    report("get-u64", get);
    report("alternating-queues-per-op", pair);
    report("put_bytes-64", put_bytes);
    report("get_bytes_into-64", get_bytes);
}
