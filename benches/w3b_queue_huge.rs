//! W3b queue-huge: as W2 with N messages of 8 MiB each, larger than the
//! default ring, which they stream through (proc: `put_bytes` /
//! `get_bytes`). Figure: GB/s of payload. N = 100 (`PROC_BENCH_QUICK=1`: 10,
//! one round).

mod common;

const SIZE: usize = 8 << 20;

fn main() {
    let n: usize = if common::quick() { 10 } else { 100 };
    println!("W3b: N = {n} x 8 MiB");
    common::interleave(
        "W3b",
        "GB/s",
        true,
        vec![
            common::System {
                name: "proc",
                run: Box::new(|| Some(common::bytes_proc(n, SIZE))),
            },
            common::System {
                name: "crossbeam-threads",
                run: Box::new(|| Some(common::bytes_crossbeam(n, SIZE))),
            },
            common::python_system("W3b", n as u64),
        ],
    );
}
