//! W5 pool-apply-async: a pool of 2 workers already started; submit N
//! `apply_async(square, i)`, then get every result in order and check the
//! sum. Figure: tasks/s (pool start excluded). N = 100,000
//! (`PROC_BENCH_QUICK=1`: 10,000, one round; `PROC_BENCH_WORKERS=<n>`:
//! another worker count, for scaling runs).

mod common;

use std::time::Instant;

fn square(x: u64) -> u64 {
    x * x
}

fn expected(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

fn proc_run(n: u64, method: proc::StartMethod) -> f64 {
    let pool = proc::Pool::builder()
        .processes(common::workers())
        .start_method(method)
        .build()
        .expect("pool");
    assert_eq!(pool.apply(square, 1), Ok(1), "workers up");
    let t = Instant::now();
    let pending: Vec<_> = (0..n)
        .map(|i| pool.apply_async(square, i).expect("submit"))
        .collect();
    let mut sum = 0;
    for r in pending {
        sum += r.get().expect("get");
    }
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, expected(n));
    pool.close();
    pool.join().expect("join");
    n as f64 / el
}

fn threads_run(n: u64) -> f64 {
    let t = Instant::now();
    let out = common::thread_pool_map(common::workers(), (0..n).collect(), square);
    let el = t.elapsed().as_secs_f64();
    assert_eq!(out.iter().sum::<u64>(), expected(n));
    n as f64 / el
}

fn main() {
    proc::init();
    let n: u64 = if common::quick() { 10_000 } else { 100_000 };
    println!(
        "W5 pool-apply-async: N = {n}, {} workers",
        common::workers()
    );
    common::interleave(
        "W5",
        "tasks/s",
        true,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(n, proc::StartMethod::Fork))),
            },
            common::System {
                name: "proc-forkserver",
                run: Box::new(|| Some(proc_run(n, proc::StartMethod::ForkServer))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(threads_run(n))),
            },
            common::python_pool_system("W5", n),
        ],
    );
}
