//! W6 pool-map: a pool of 2 workers already started; `map(square, 0..N)`
//! with the system's default chunking (proc and Python: ceil(N / 8)); check
//! the sum. Figure: items/s. N = 1,000,000 (`PROC_BENCH_QUICK=1`:
//! 100,000, one round; `PROC_BENCH_WORKERS=<n>`: another worker count,
//! chunks of ceil(N / 4n), for scaling runs).

mod common;

use std::time::Instant;

fn square(x: u64) -> u64 {
    x * x
}

fn expected(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

fn proc_run(n: u64) -> f64 {
    let pool = proc::Pool::new(common::workers()).expect("pool");
    assert_eq!(pool.apply(square, 1), Ok(1), "workers up");
    let t = Instant::now();
    let out = pool.map(square, 0..n).expect("map");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(out.iter().sum::<u64>(), expected(n));
    pool.close();
    pool.join().expect("join");
    n as f64 / el
}

fn threads_run(n: u64) -> f64 {
    // The same chunking, as many threads: the in-process ceiling.
    let workers = common::workers() as u64;
    let chunk = n.div_ceil(4 * workers);
    let t = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            std::thread::spawn(move || {
                let mut parts = Vec::new();
                let mut c = w;
                while c * chunk < n {
                    let lo = c * chunk;
                    let hi = (lo + chunk).min(n);
                    parts.push((c, (lo..hi).map(square).collect::<Vec<u64>>()));
                    c += workers;
                }
                parts
            })
        })
        .collect();
    let mut parts: Vec<(u64, Vec<u64>)> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    parts.sort_by_key(|(c, _)| *c);
    let out: Vec<u64> = parts.into_iter().flat_map(|(_, v)| v).collect();
    let el = t.elapsed().as_secs_f64();
    assert_eq!(out.iter().sum::<u64>(), expected(n));
    n as f64 / el
}

fn main() {
    proc::init();
    let n: u64 = if common::quick() { 100_000 } else { 1_000_000 };
    let workers = common::workers();
    println!(
        "W6 pool-map: N = {n}, {workers} workers, chunks of ceil(N/{})",
        4 * workers
    );
    common::interleave(
        "W6",
        "items/s",
        true,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(n))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(threads_run(n))),
            },
            common::python_pool_system("W6", n),
        ],
    );
}
