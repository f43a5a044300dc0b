//! W4 ping-pong: two queues; the child loops get-from-q1 / put-to-q2; the
//! parent does N round trips of one integer. Figure: µs per round trip.
//! N = 100,000 (`PROC_BENCH_QUICK=1`: 10,000, one round).

mod common;

use std::time::Instant;

fn proc_run(n: u64) -> f64 {
    let q1: proc::Queue<u64> = proc::Queue::new().expect("queue");
    let q2: proc::Queue<u64> = proc::Queue::new().expect("queue");
    let (c1, c2) = (q1.clone(), q2.clone());
    let child = proc::spawn(move || {
        for _ in 0..n {
            let v = c1.get().expect("get");
            c2.put(v).expect("put");
        }
    })
    .expect("spawn");
    q1.put(0).expect("warm-up");
    assert_eq!(q2.get().expect("warm-up"), 0);
    let t = Instant::now();
    for i in 1..n {
        q1.put(i).expect("put");
        assert_eq!(q2.get().expect("get"), i);
    }
    let el = t.elapsed().as_secs_f64();
    child.join().expect("join");
    el / (n - 1) as f64 * 1e6
}

fn crossbeam_run(n: u64) -> f64 {
    let (tx1, rx1) = crossbeam_channel::bounded::<u64>(1);
    let (tx2, rx2) = crossbeam_channel::bounded::<u64>(1);
    let child = std::thread::spawn(move || {
        for _ in 0..n {
            tx2.send(rx1.recv().expect("recv")).expect("send");
        }
    });
    tx1.send(0).expect("warm-up");
    rx2.recv().expect("warm-up");
    let t = Instant::now();
    for i in 1..n {
        tx1.send(i).expect("send");
        assert_eq!(rx2.recv().expect("recv"), i);
    }
    let el = t.elapsed().as_secs_f64();
    child.join().expect("join");
    el / (n - 1) as f64 * 1e6
}

fn main() {
    let n: u64 = if common::quick() { 10_000 } else { 100_000 };
    println!("W4 ping-pong: N = {n}");
    common::interleave(
        "W4",
        "us",
        false,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(n))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(crossbeam_run(n))),
            },
            common::python_system("W4", n),
        ],
    );
}
