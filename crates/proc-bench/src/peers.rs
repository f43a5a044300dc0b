//! The Rust peers (procspawn, ipc-channel, ipmpsc) and the raw pipe floor,
//! on the bench card's workloads, one measurement per process.
//!
//! Each function runs one workload once with the card's sizes (smaller in
//! quick mode), checks its result (sums, counts) and returns the figure in
//! the card's unit. Children of the queue workloads are started with
//! `proc::spawn` (a fork) before the clock's end, as for every system.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::FromRawFd;
use std::time::Instant;

use ipc_channel::ipc;
use ipmpsc::{Receiver, Sender, SharedRingBuffer};

/// The ring ipmpsc gets: its W3b needs 32 MiB (the card's anchor).
const IPMPSC_RING: u32 = 32 << 20;

/// Peers that cannot run a workload the card's way, and why.
type NotRun = &'static [(&'static str, &'static str)];

/// The peers that run `workload`, and why some do not.
pub fn systems(workload: &str) -> (&'static [&'static str], NotRun) {
    match workload {
        "W1" | "W5" | "W6" | "W8" => (&["procspawn"], &[]),
        "W2" | "W3" | "W3b" | "W4" => (&["ipc-channel", "ipmpsc", "raw-pipe"], &[]),
        "W7" => (
            &[],
            &[
                (
                    "ipc-channel",
                    "a receiver has one consumer: no 2-consumer W7",
                ),
                (
                    "ipmpsc",
                    "multi-producer, single-consumer: no 2-consumer W7",
                ),
            ],
        ),
        _ => (&[], &[]),
    }
}

/// Runs `system` on `workload` once; `(figure, unit)`.
pub fn measure(workload: &str, system: &str, quick: bool) -> Option<(f64, &'static str)> {
    let q = |full: u64, small: u64| if quick { small } else { full };
    Some(match (workload, system) {
        ("W1", "procspawn") => (procspawn_w1(q(200, 20)), "us"),
        ("W2", "ipmpsc") => (ipmpsc_w2(q(1_000_000, 100_000)), "msg/s"),
        ("W2", "ipc-channel") => (ipc_w2(q(1_000_000, 100_000)), "msg/s"),
        ("W2", "raw-pipe") => (pipe_w2(q(1_000_000, 100_000)), "msg/s"),
        ("W3", "ipmpsc") => (ipmpsc_bytes(q(10_000, 1_000), 64 << 10), "GB/s"),
        ("W3", "ipc-channel") => (ipc_bytes(q(10_000, 1_000), 64 << 10), "GB/s"),
        ("W3", "raw-pipe") => (pipe_bytes(q(10_000, 1_000), 64 << 10), "GB/s"),
        ("W3b", "ipmpsc") => (ipmpsc_bytes(q(100, 10), 8 << 20), "GB/s"),
        ("W3b", "ipc-channel") => (ipc_bytes(q(100, 10), 8 << 20), "GB/s"),
        ("W3b", "raw-pipe") => (pipe_bytes(q(100, 10), 8 << 20), "GB/s"),
        ("W4", "ipmpsc") => (ipmpsc_w4(q(100_000, 10_000)), "us"),
        ("W4", "ipc-channel") => (ipc_w4(q(100_000, 10_000)), "us"),
        ("W4", "raw-pipe") => (pipe_w4(q(100_000, 10_000)), "us"),
        ("W5", "procspawn") => (procspawn_w5(q(100_000, 2_000)), "tasks/s"),
        ("W6", "procspawn") => (procspawn_w6(q(1_000_000, 100_000)), "items/s"),
        ("W8", "procspawn") => (procspawn_w8(q(20, 5)), "ms"),
        _ => return None,
    })
}

fn noop(_: ()) {}

fn square(x: u64) -> u64 {
    x * x
}

fn square_chunk(xs: Vec<u64>) -> Vec<u64> {
    xs.into_iter().map(square).collect()
}

fn squares_sum(n: u64) -> u64 {
    (0..n).map(square).sum()
}

fn procspawn_w1(n: u64) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        procspawn::spawn((), noop).join().expect("procspawn join");
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn procspawn_w5(n: u64) -> f64 {
    let pool = procspawn::Pool::new(2).expect("procspawn pool");
    assert_eq!(pool.spawn(1, square).join().expect("warm"), 1);
    let t = Instant::now();
    // procspawn holds 4 descriptors per queued task: with the card's
    // 100,000 in flight it runs out of them (EMFILE). It gets windows of
    // WINDOW tasks, submitted then joined, which keeps its workers busy.
    const WINDOW: u64 = 2_000;
    let mut sum = 0;
    let mut next = 0;
    while next < n {
        let end = (next + WINDOW).min(n);
        let handles: Vec<_> = (next..end).map(|i| pool.spawn(i, square)).collect();
        for h in handles {
            sum += h.join().expect("join");
        }
        next = end;
    }
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, squares_sum(n));
    pool.shutdown();
    n as f64 / el
}

fn procspawn_w6(n: u64) -> f64 {
    let pool = procspawn::Pool::new(2).expect("procspawn pool");
    assert_eq!(pool.spawn(1, square).join().expect("warm"), 1);
    let t = Instant::now();
    // procspawn has no map: the chunks are made by hand, as Python's map
    // would make them (ceil(N / 8)).
    let chunk = n.div_ceil(8);
    let handles: Vec<_> = (0..n)
        .step_by(chunk as usize)
        .map(|lo| pool.spawn((lo..(lo + chunk).min(n)).collect(), square_chunk))
        .collect();
    let mut out = Vec::with_capacity(n as usize);
    for h in handles {
        out.extend(h.join().expect("join"));
    }
    let el = t.elapsed().as_secs_f64();
    assert_eq!(out.iter().sum::<u64>(), squares_sum(n));
    pool.shutdown();
    n as f64 / el
}

fn procspawn_w8(cycles: u64) -> f64 {
    let mut ms = Vec::new();
    for _ in 0..cycles {
        let t = Instant::now();
        let pool = procspawn::Pool::new(2).expect("procspawn pool");
        assert_eq!(pool.spawn(3, square).join().expect("task"), 9);
        pool.shutdown();
        drop(pool);
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The median as everywhere else on the card: the mean of the middle
    // two of an even count.
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    }
}

fn ring() -> (String, SharedRingBuffer) {
    SharedRingBuffer::create_temp(IPMPSC_RING).expect("ipmpsc ring")
}

fn ipmpsc_w2(n: u64) -> f64 {
    let (name, buffer) = ring();
    let rx = Receiver::new(buffer);
    let t = Instant::now();
    let child = proc::spawn(move || {
        let tx = Sender::new(SharedRingBuffer::open(&name).expect("open"));
        for i in 0..n {
            tx.send(&i).expect("send");
        }
    })
    .expect("spawn");
    let mut sum = 0u64;
    for _ in 0..n {
        sum += rx.recv::<u64>().expect("recv");
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, n * (n - 1) / 2);
    n as f64 / el
}

fn ipmpsc_bytes(n: u64, size: usize) -> f64 {
    let (name, buffer) = ring();
    let rx = Receiver::new(buffer);
    let t = Instant::now();
    let child = proc::spawn(move || {
        let tx = Sender::new(SharedRingBuffer::open(&name).expect("open"));
        let payload = serde_bytes::ByteBuf::from(vec![7u8; size]);
        for _ in 0..n {
            tx.send(&payload).expect("send");
        }
    })
    .expect("spawn");
    let mut total = 0;
    for _ in 0..n {
        let v: serde_bytes::ByteBuf = rx.recv().expect("recv");
        assert_eq!(v[size - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total as u64, n * size as u64);
    total as f64 / el / 1e9
}

fn ipmpsc_w4(n: u64) -> f64 {
    let (there_name, there) = ring();
    let (back_name, back) = ring();
    let tx = Sender::new(there);
    let child = proc::spawn(move || {
        let rx = Receiver::new(SharedRingBuffer::open(&there_name).expect("open"));
        let tx = Sender::new(SharedRingBuffer::open(&back_name).expect("open"));
        for _ in 0..n {
            let x: u64 = rx.recv().expect("recv");
            tx.send(&x).expect("send");
        }
    })
    .expect("spawn");
    let rx = Receiver::new(back);
    tx.send(&0u64).expect("warm");
    assert_eq!(rx.recv::<u64>().expect("warm"), 0);
    let t = Instant::now();
    for i in 1..n {
        tx.send(&i).expect("send");
        assert_eq!(rx.recv::<u64>().expect("recv"), i);
    }
    let el = t.elapsed().as_secs_f64();
    child.join().expect("join");
    el * 1e6 / (n - 1) as f64
}

fn ipc_w2(n: u64) -> f64 {
    let (tx, rx) = ipc::channel::<u64>().expect("channel");
    let t = Instant::now();
    let child = proc::spawn(move || {
        for i in 0..n {
            tx.send(i).expect("send");
        }
    })
    .expect("spawn");
    let mut sum = 0u64;
    for _ in 0..n {
        sum += rx.recv().expect("recv");
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, n * (n - 1) / 2);
    n as f64 / el
}

fn ipc_bytes(n: u64, size: usize) -> f64 {
    let (tx, rx) = ipc::bytes_channel().expect("channel");
    let t = Instant::now();
    let child = proc::spawn(move || {
        let payload = vec![7u8; size];
        for _ in 0..n {
            tx.send(&payload).expect("send");
        }
    })
    .expect("spawn");
    let mut total = 0;
    for _ in 0..n {
        let v = rx.recv().expect("recv");
        assert_eq!(v[size - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total as u64, n * size as u64);
    total as f64 / el / 1e9
}

fn ipc_w4(n: u64) -> f64 {
    let (there_tx, there_rx) = ipc::channel::<u64>().expect("channel");
    let (back_tx, back_rx) = ipc::channel::<u64>().expect("channel");
    let child = proc::spawn(move || {
        for _ in 0..n {
            let x = there_rx.recv().expect("recv");
            back_tx.send(x).expect("send");
        }
    })
    .expect("spawn");
    there_tx.send(0).expect("warm");
    assert_eq!(back_rx.recv().expect("warm"), 0);
    let t = Instant::now();
    for i in 1..n {
        there_tx.send(i).expect("send");
        assert_eq!(back_rx.recv().expect("recv"), i);
    }
    let el = t.elapsed().as_secs_f64();
    child.join().expect("join");
    el * 1e6 / (n - 1) as f64
}

/// A pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe to fill.
    let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(r, 0, "pipe");
    // SAFETY: pipe just created both descriptors; nothing else owns them.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

fn pipe_w2(n: u64) -> f64 {
    let (read, write) = pipe();
    let theirs = write.try_clone().expect("dup");
    drop(write);
    let t = Instant::now();
    // (The forked child holds copies of every descriptor; nothing here
    // waits for an end of file.)
    let child = proc::spawn(move || {
        let mut w = BufWriter::with_capacity(64 << 10, theirs);
        for i in 0..n {
            w.write_all(&i.to_le_bytes()).expect("write");
        }
        w.flush().expect("flush");
    })
    .expect("spawn");
    let mut r = BufReader::with_capacity(64 << 10, read);
    let mut sum = 0u64;
    let mut buf = [0u8; 8];
    for _ in 0..n {
        r.read_exact(&mut buf).expect("read");
        sum += u64::from_le_bytes(buf);
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(sum, n * (n - 1) / 2);
    n as f64 / el
}

fn pipe_bytes(n: u64, size: usize) -> f64 {
    let (mut read, write) = pipe();
    let mut theirs = write.try_clone().expect("dup");
    drop(write);
    let t = Instant::now();
    let child = proc::spawn(move || {
        let payload = vec![7u8; size];
        for _ in 0..n {
            theirs.write_all(&payload).expect("write");
        }
    })
    .expect("spawn");
    let mut total = 0;
    for _ in 0..n {
        let mut v = vec![0u8; size];
        read.read_exact(&mut v).expect("read");
        assert_eq!(v[size - 1], 7);
        total += v.len();
    }
    child.join().expect("join");
    let el = t.elapsed().as_secs_f64();
    assert_eq!(total as u64, n * size as u64);
    total as f64 / el / 1e9
}

fn pipe_w4(n: u64) -> f64 {
    let (there_r, mut there_w) = pipe();
    let (mut back_r, back_w) = pipe();
    let mut child_r = there_r.try_clone().expect("dup");
    let mut child_w = back_w.try_clone().expect("dup");
    drop((there_r, back_w));
    let child = proc::spawn(move || {
        let mut buf = [0u8; 8];
        for _ in 0..n {
            child_r.read_exact(&mut buf).expect("read");
            child_w.write_all(&buf).expect("write");
        }
    })
    .expect("spawn");
    let mut buf = [0u8; 8];
    there_w.write_all(&0u64.to_le_bytes()).expect("warm");
    back_r.read_exact(&mut buf).expect("warm");
    let t = Instant::now();
    for i in 1..n {
        there_w.write_all(&i.to_le_bytes()).expect("write");
        back_r.read_exact(&mut buf).expect("read");
        assert_eq!(u64::from_le_bytes(buf), i);
    }
    let el = t.elapsed().as_secs_f64();
    child.join().expect("join");
    el * 1e6 / (n - 1) as f64
}
