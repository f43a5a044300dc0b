//! W8 pool-startup: create a pool of 2 workers, run one trivial task to
//! completion, close and join. Figure: ms per cycle, the median of 20
//! cycles (`PROC_BENCH_QUICK=1`: 5 cycles, one round).

mod common;

use std::time::Instant;

fn square(x: u64) -> u64 {
    x * x
}

fn proc_run(cycles: u64, method: proc::StartMethod) -> f64 {
    let mut ms = Vec::new();
    for _ in 0..cycles {
        let t = Instant::now();
        let pool = proc::Pool::builder()
            .processes(2)
            .start_method(method)
            .build()
            .expect("pool");
        assert_eq!(pool.apply(square, 3), Ok(9));
        pool.close();
        pool.join().expect("join");
        // The whole cycle: dropping the pool (its zygote) too.
        drop(pool);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    common::median(&ms)
}

fn main() {
    proc::init();
    let cycles: u64 = if common::quick() { 5 } else { 20 };
    println!("W8 pool-startup: {cycles} cycles of create(2) + one task + close + join");
    common::interleave(
        "W8",
        "ms",
        false,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(proc_run(cycles, proc::StartMethod::Fork))),
            },
            common::System {
                name: "proc-forkserver",
                run: Box::new(|| Some(proc_run(cycles, proc::StartMethod::ForkServer))),
            },
            // Workers exec'd, like procspawn's: the like-for-like pair.
            common::System {
                name: "proc-spawn",
                run: Box::new(|| Some(proc_run(cycles, proc::StartMethod::Spawn))),
            },
            common::python_pool_system("W8", cycles),
        ],
    );
}
