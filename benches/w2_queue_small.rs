//! W2 queue-small: one child process puts N integers (u64 0..N) into one
//! queue; the parent gets all N; clock from before the child starts to after
//! the last get and the join. Figure: messages/s. N = 1,000,000
//! (`PROC_BENCH_QUICK=1`: 100,000, one round).

mod common;

use std::time::Instant;

fn proc_run(n: u64) -> f64 {
    let q: proc::Queue<u64> = proc::Queue::new().expect("queue");
    let producer = q.clone();
    let t = Instant::now();
    let child = proc::spawn(move || {
        for i in 0..n {
            producer.put(i).expect("put");
        }
    })
    .expect("spawn");
    let mut sum = 0;
    for _ in 0..n {
        sum += q.get().expect("get");
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, n * (n - 1) / 2);
    n as f64 / el
}

fn crossbeam_run(n: u64) -> f64 {
    let (tx, rx) = crossbeam_channel::unbounded::<u64>();
    let t = Instant::now();
    let child = std::thread::spawn(move || {
        for i in 0..n {
            tx.send(i).expect("send");
        }
    });
    let mut sum = 0;
    for _ in 0..n {
        sum += rx.recv().expect("recv");
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, n * (n - 1) / 2);
    n as f64 / el
}

fn main() {
    let n: u64 = if common::quick() { 100_000 } else { 1_000_000 };
    println!("W2 queue-small: N = {n}");
    common::interleave(
        "W2",
        "msg/s",
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
            common::python_system("W2", n),
        ],
    );
}
