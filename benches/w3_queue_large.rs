//! W3 queue-large: as W2 with N messages of 64 KiB of bytes each (proc:
//! `put_bytes` / `get_bytes`). Figure: GB/s of payload. N = 10,000
//! (`PROC_BENCH_QUICK=1`: 1,000, one round).

mod common;

const SIZE: usize = 64 * 1024;

fn main() {
    let n: usize = if common::quick() { 1_000 } else { 10_000 };
    println!("W3: N = {n} x 64 KiB");
    common::interleave(
        "W3",
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
            common::python_system("W3", n as u64),
        ],
    );
}
