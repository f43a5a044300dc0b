//! A segment whose positions, counters or records were corrupted (random
//! byte flips) gives typed errors: no panic, no hang, no undefined
//! behaviour (the ring never reads or writes outside its mapping).
//!
//! The lock words are flipped too (a word naming no life slot is a typed
//! error, one naming a slot nobody holds is taken over); the life slots'
//! robust mutexes are left alone: glibc owns their format.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::time::Duration;

use proc_queue::{GetError, Queue};
use proptest::prelude::*;

const CAP: usize = 16 * 1024;
const DATA: usize = 4096;

/// Byte ranges of the segment a flip may hit: the fixed header fields, the
/// two lock words, the producer's and consumer's position words, the
/// signals, and the ring.
fn regions() -> Vec<(usize, usize)> {
    vec![
        (0, 40),
        (128, 132),
        (256, 260),
        (384, 400),
        (512, 528),
        (640, 672),
        (DATA, DATA + CAP),
    ]
}

fn flip_strategy() -> impl Strategy<Value = (usize, u64, u8)> {
    (0..regions().len(), any::<u64>(), 1u8..=255).prop_map(|(r, at, x)| (r, at, x))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn flipped_bytes_give_typed_errors(
        sizes in proptest::collection::vec(0usize..20_000, 1..12),
        flips in proptest::collection::vec(flip_strategy(), 1..8),
    ) {
        let q: Queue<Vec<u8>> = Queue::builder().capacity(CAP).build().expect("queue");
        for (i, &n) in sizes.iter().enumerate() {
            // Leave some messages half-streamed or unread.
            let _ = q.try_put_bytes(&vec![i as u8; n]);
            // And short typed ones (compact 16-byte records).
            let _ = q.try_put(vec![i as u8; n % 8]);
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", q.as_raw_fd()))
            .expect("open segment");
        // SAFETY: the mapping is used only to flip bytes while no other
        // thread touches this queue.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("map");
        let regions = regions();
        for (r, at, x) in flips {
            let (lo, hi) = regions[r];
            let i = lo + (at as usize) % (hi - lo);
            map[i] ^= x;
        }
        let mut results = Vec::new();
        for _ in 0..2 * sizes.len() + 2 {
            results.push(q.try_get_bytes().map(|v| v.len()));
        }
        results.push(q.get_bytes_timeout(Duration::from_millis(2)).map(|v| v.len()));
        let _ = q.try_put_bytes(b"after");
        let _ = q.try_put(vec![1, 2, 3]);
        let _ = q.put_timeout(vec![4], Duration::from_millis(2));
        let _ = (q.qsize(), q.empty(), q.full(), q.is_closed());
        results.push(q.get_timeout(Duration::from_millis(2)).map(|v| v.len()));
        for r in results {
            match r {
                Ok(_) | Err(GetError::Empty | GetError::Timeout | GetError::Closed | GetError::Failed(_)) => {}
            }
        }
    }
}

#[test]
fn a_garbled_record_header_is_reported() {
    let q: Queue<u64> = Queue::builder().capacity(CAP).build().expect("queue");
    q.put(42).expect("put");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", q.as_raw_fd()))
        .expect("open segment");
    // SAFETY: as above.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }.expect("map");
    map[DATA] ^= 0x04; // the first record's length (a compact record: its low 4 bits)
    match q.try_get() {
        Err(GetError::Failed(proc_queue::QueueError::Corrupted(msg))) => {
            assert!(msg.contains("checksum"), "{msg}")
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[test]
fn threads_share_a_queue() {
    let q: Queue<u32> = Queue::with_maxsize(8).expect("queue");
    let producers: Vec<_> = (0..3)
        .map(|t| {
            let q = q.clone();
            std::thread::spawn(move || {
                for i in 0..1000 {
                    q.put(t * 1000 + i).expect("put");
                }
            })
        })
        .collect();
    let mut seen = vec![false; 3000];
    for _ in 0..3000 {
        let v = q.get_timeout(Duration::from_secs(10)).expect("get");
        assert!(
            !std::mem::replace(&mut seen[v as usize], true),
            "duplicate {v}"
        );
    }
    for p in producers {
        p.join().expect("producer");
    }
    assert!(q.empty());
}
