//! `Queue`, `JoinableQueue`, `SimpleQueue` across processes: order, types,
//! bounds, timeouts, close, messages larger than the ring, decode errors.

mod common;

use std::time::{Duration, Instant};

use common::Unlucky;
use proc::{GetError, JoinableQueue, PutError, Queue, QueueError, SimpleQueue};
use serde::{Deserialize, Serialize};

fn main() {
    common::run(&[
        ("fifo_across_fork", 20, fifo_across_fork),
        ("typed_messages", 10, typed_messages),
        (
            "items_that_write_themselves_as_text",
            10,
            items_that_write_themselves_as_text,
        ),
        ("bound_full_empty_qsize", 10, bound_full_empty_qsize),
        ("timeouts_are_never_early", 10, timeouts_are_never_early),
        ("close_ends_the_stream", 10, close_ends_the_stream),
        (
            "try_put_with_room_is_not_full_under_contention",
            30,
            try_put_with_room_is_not_full_under_contention,
        ),
        (
            "close_during_a_put_loses_nothing",
            30,
            close_during_a_put_loses_nothing,
        ),
        (
            "close_wakes_blocked_putters_and_getters",
            10,
            close_wakes_blocked,
        ),
        ("messages_of_every_size", 60, messages_of_every_size),
        (
            "small_messages_of_every_length_through_the_wrap",
            30,
            small_messages_through_the_wrap,
        ),
        ("bytes_round_trip_with_typed_view", 20, bytes_round_trip),
        ("bytes_read_where_they_lie", 20, bytes_read_where_they_lie),
        (
            "decode_error_keeps_queue_working",
            10,
            decode_error_keeps_queue_working,
        ),
        (
            "timed_out_stream_is_withdrawn",
            20,
            timed_out_stream_is_withdrawn,
        ),
        (
            "withdrawn_stream_whose_last_part_waits_at_the_wrap",
            10,
            withdrawn_stream_at_the_wrap,
        ),
        (
            "a_whole_get_leaves_a_stream_of_a_stopped_producer",
            20,
            a_whole_get_leaves_a_stream,
        ),
        ("into_fresh_empties_a_queue", 20, into_fresh_empties_a_queue),
        (
            "close_ends_a_stream_that_nobody_drains",
            20,
            close_ends_a_stream_that_nobody_drains,
        ),
        (
            "a_killed_lock_holder_is_taken_over",
            30,
            a_killed_lock_holder_is_taken_over,
        ),
        ("joinable_queue", 20, joinable_queue),
        ("simple_queue", 10, simple_queue),
        (
            "many_producers_many_consumers",
            60,
            many_producers_many_consumers,
        ),
    ]);
}

fn fifo_across_fork() {
    let q: Queue<u64> = Queue::new().expect("queue");
    let producer = q.clone();
    let child = proc::spawn(move || {
        for i in 0..100_000u64 {
            producer.put(i).expect("put");
        }
    })
    .expect("spawn");
    for i in 0..100_000u64 {
        assert_eq!(q.get().expect("get"), i);
    }
    child.join().expect("child");
    assert!(q.empty());
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Job {
    Resize { path: String, width: u32 },
    Stop,
}

fn typed_messages() {
    let q: Queue<Job> = Queue::new().expect("queue");
    let jobs = vec![
        Job::Resize {
            path: "a.png".into(),
            width: 64,
        },
        Job::Stop,
    ];
    for j in &jobs {
        q.put(j.clone()).expect("put");
    }
    let child_q = q.clone();
    let child = proc::spawn(move || (child_q.get().expect("get"), child_q.get().expect("get")))
        .expect("spawn");
    assert_eq!(
        child.join().expect("join"),
        (jobs[0].clone(), jobs[1].clone())
    );
}

/// Serialized with `collect_str` (as its `Display` would be): postcard
/// reports such an item overflowing a fixed output as `CollectStrError`,
/// not `SerializeBufferFull`.
#[derive(Debug, Clone, PartialEq)]
struct Shown(String);

impl Serialize for Shown {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Shown {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Shown)
    }
}

fn items_that_write_themselves_as_text() {
    // Sizes on both sides of put's stack buffer and of any buffer size a
    // thread's earlier puts left behind.
    let q: Queue<Shown> = Queue::new().expect("queue");
    let sizes = [0, 10, 63, 64, 65, 200, 300, 5_000, 100, 70_000, 1_000];
    for n in sizes {
        q.put(Shown("x".repeat(n))).expect("put");
    }
    let child_q = q.clone();
    let child = proc::spawn(move || {
        let mut lens = Vec::new();
        for _ in 0..sizes.len() {
            let item = child_q.get().expect("get");
            assert!(item.0.bytes().all(|b| b == b'x'));
            lens.push(item.0.len());
        }
        // And back, from a process whose puts have not run before.
        child_q
            .put(Shown("y".repeat(300)))
            .expect("put from the child");
        lens
    })
    .expect("spawn");
    assert_eq!(child.join().expect("join"), sizes.to_vec());
    assert_eq!(q.get().expect("get"), Shown("y".repeat(300)));
}

fn bound_full_empty_qsize() {
    let q: Queue<String> = Queue::with_maxsize(3).expect("queue");
    assert_eq!(q.maxsize(), Some(3));
    assert!(q.empty() && !q.full());
    for i in 0..3 {
        q.try_put(format!("m{i}")).expect("room");
        assert_eq!(q.qsize(), i + 1);
    }
    assert!(q.full());
    match q.try_put("extra".to_owned()) {
        Err(PutError::Full(item)) => assert_eq!(item, "extra"),
        other => panic!("expected Full, got {other:?}"),
    }
    assert_eq!(q.try_get().expect("item"), "m0");
    assert_eq!(q.qsize(), 2);
    assert!(!q.full());
    q.try_get().expect("m1");
    q.try_get().expect("m2");
    assert!(matches!(q.try_get(), Err(GetError::Empty)));
    assert!(q.empty());
    let unbounded: Queue<u8> = Queue::new().expect("queue");
    assert_eq!(unbounded.maxsize(), None);
    assert!(!unbounded.full());
    assert!(Queue::<u8>::with_maxsize(1 << 24).is_err());
}

fn timeouts_are_never_early() {
    let q: Queue<u8> = Queue::with_maxsize(1).expect("queue");
    for d in [Duration::from_millis(1), Duration::from_millis(30)] {
        let t = Instant::now();
        assert!(matches!(q.get_timeout(d), Err(GetError::Timeout)));
        let took = t.elapsed();
        assert!(took >= d, "get_timeout woke early: {took:?} < {d:?}");
        assert!(
            took < d + Duration::from_millis(500),
            "get_timeout far too late: {took:?}"
        );
    }
    q.put(1).expect("put");
    let t = Instant::now();
    match q.put_timeout(2, Duration::from_millis(30)) {
        Err(PutError::Timeout(item)) => assert_eq!(item, 2),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(30));
    // An item arriving during the wait is taken.
    let producer = q.clone();
    let _ = q.get().expect("drain");
    let child = proc::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        producer.put(9).expect("put");
    })
    .expect("spawn");
    assert_eq!(q.get_timeout(Duration::from_secs(5)).expect("arrives"), 9);
    child.join().expect("child");
}

fn close_ends_the_stream() {
    let q: Queue<u32> = Queue::new().expect("queue");
    let producer = q.clone();
    let child = proc::spawn(move || {
        for i in 0..1000 {
            producer.put(i).expect("put");
        }
        producer.close();
    })
    .expect("spawn");
    let mut got = 0;
    loop {
        match q.get() {
            Ok(v) => {
                assert_eq!(v, got);
                got += 1;
            }
            Err(GetError::Closed) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, 1000);
    child.join().expect("child");
    assert!(q.is_closed());
    match q.put(5) {
        Err(PutError::Closed(5)) => {}
        other => panic!("expected Closed(5), got {other:?}"),
    }
    assert!(matches!(q.try_get(), Err(GetError::Closed)));
}

fn close_during_a_put_loses_nothing() {
    // A put that passed its check for close() and is still copying when
    // close() comes either fails with Closed or is delivered: consumers
    // get Closed only once no put is left in flight. Large messages make
    // the window wide; many rounds make hitting it likely.
    // Odd rounds: a 128 KiB ring, so every message streams through in
    // fragments (a close may then withdraw one midway: that put fails).
    let m = pattern(256 * 1024, 11);
    for round in 0..60 {
        let cap = if round % 2 == 0 { 4 << 20 } else { 128 << 10 };
        let q: Queue<Vec<u8>> = Queue::builder().capacity(cap).build().expect("queue");
        let producer = q.clone();
        let msg = m.clone();
        let child = proc::spawn(move || {
            let mut ok = 0u32;
            loop {
                match producer.put_bytes(&msg) {
                    Ok(()) => ok += 1,
                    Err(PutError::Closed(())) => return ok,
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .expect("spawn");
        let mut got = 0u32;
        // Take a few, then close while the producer is busy.
        for _ in 0..(round % 5) {
            q.get_bytes().expect("get");
            got += 1;
        }
        q.close();
        loop {
            match q.get_bytes() {
                Ok(v) => {
                    assert!(v == m);
                    got += 1;
                }
                Err(GetError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let put = child.join().expect("join");
        assert_eq!(got, put, "round {round}: a put succeeded after Closed");
        assert_eq!(q.qsize(), 0);
    }
}

fn close_wakes_blocked() {
    // A consumer blocked on an empty queue.
    let q: Queue<u32> = Queue::new().expect("queue");
    let consumer = q.clone();
    let child =
        proc::spawn(move || matches!(consumer.get(), Err(GetError::Closed))).expect("spawn");
    std::thread::sleep(Duration::from_millis(50));
    q.close();
    assert!(
        child.join().expect("join"),
        "blocked get did not end with Closed"
    );
    // A producer blocked on a full queue.
    let q: Queue<u32> = Queue::with_maxsize(1).expect("queue");
    q.put(1).expect("put");
    let producer = q.clone();
    let child =
        proc::spawn(move || matches!(producer.put(2), Err(PutError::Closed(2)))).expect("spawn");
    std::thread::sleep(Duration::from_millis(50));
    q.close();
    assert!(
        child.join().expect("join"),
        "blocked put did not end with Closed"
    );
    assert_eq!(q.get().expect("the item put before close"), 1);
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn messages_of_every_size() {
    let cap = 64 * 1024;
    let q: Queue<Vec<u8>> = Queue::builder().capacity(cap).build().expect("queue");
    let mut sizes = vec![0usize, 1, 15, 16, 17, 100, 4095, 4096, 4097];
    for base in [cap / 4, cap / 2, cap, 3 * cap] {
        for delta in [-33i64, -32, -17, -16, -1, 0, 1, 16, 17] {
            sizes.push((base as i64 + delta) as usize);
        }
    }
    sizes.push(1 << 20);
    let producer = q.clone();
    let sizes_in_child = sizes.clone();
    let child = proc::spawn(move || {
        for (i, &n) in sizes_in_child.iter().enumerate() {
            let data = pattern(n, i as u64);
            if i % 2 == 0 {
                producer.put_bytes(&data).expect("put_bytes");
            } else {
                producer.put(data).expect("put");
            }
        }
    })
    .expect("spawn");
    for (i, &n) in sizes.iter().enumerate() {
        let got = if i % 3 == 0 {
            q.get().expect("get")
        } else {
            q.get_bytes().expect("get_bytes")
        };
        assert_eq!(got.len(), n, "message {i}");
        assert!(
            got == pattern(n, i as u64),
            "message {i} of {n} bytes corrupted"
        );
    }
    child.join().expect("child");
    assert!(q.empty());
}

/// Every length that takes the put's one-record fast path (a record of at
/// most 64 bytes: typed puts of 0 to 47 bytes, and empty ones of `()`),
/// many times round the smallest ring, with raw puts (which take the
/// general path) in between: the fast path meets the end of the ring, a
/// full ring and a stale view of the consumer's position, and hands each
/// of those to the general path.
fn small_messages_through_the_wrap() {
    let q: Queue<Vec<u8>> = Queue::builder().capacity(4096).build().expect("queue");
    const ROUNDS: usize = 150;
    const LENGTHS: usize = 50;
    let producer = q.clone();
    let child = proc::spawn(move || {
        for round in 0..ROUNDS {
            for n in 0..LENGTHS {
                let data = pattern(n, (round * LENGTHS + n) as u64);
                if (round + n) % 2 == 0 {
                    producer.put_bytes(&data).expect("put_bytes");
                } else {
                    producer.put(data).expect("put");
                }
            }
        }
    })
    .expect("spawn");
    for round in 0..ROUNDS {
        for n in 0..LENGTHS {
            let got = q.get().expect("get");
            assert!(
                got == pattern(n, (round * LENGTHS + n) as u64),
                "round {round}: message of {n} bytes came back as {got:?}"
            );
        }
    }
    child.join().expect("child");
    assert!(q.empty());
    // Zero-byte messages: 16-byte records, header only.
    let units: Queue<()> = Queue::builder().capacity(4096).build().expect("queue");
    let producer = units.clone();
    let child = proc::spawn(move || {
        for _ in 0..2_000 {
            producer.put(()).expect("put");
        }
    })
    .expect("spawn");
    for i in 0..2_000 {
        let got = units.get_timeout(Duration::from_secs(10));
        assert!(got.is_ok(), "unit {i}: {got:?}");
    }
    child.join().expect("child");
    assert_eq!(units.qsize(), 0);
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Frame {
    id: u32,
    #[serde(with = "serde_bytes")]
    pixels: Vec<u8>,
}

fn bytes_round_trip() {
    let q: Queue<Vec<u8>> = Queue::new().expect("queue");
    let big = pattern(3 << 20, 7); // larger than the default ring
    q.put_bytes(b"small").expect("put");
    let child_q = q.clone();
    let big_in_child = big.clone();
    let child = proc::spawn(move || child_q.put_bytes(&big_in_child).is_ok()).expect("spawn");
    assert_eq!(q.get().expect("typed view of put_bytes"), b"small");
    assert!(q.get_bytes().expect("big") == big);
    assert!(child.join().expect("join"));
    // serde_bytes fields travel inside typed messages too.
    let frames: Queue<Frame> = Queue::new().expect("queue");
    frames
        .put(Frame {
            id: 1,
            pixels: pattern(70_000, 1),
        })
        .expect("put");
    assert_eq!(
        frames.get().expect("get"),
        Frame {
            id: 1,
            pixels: pattern(70_000, 1)
        }
    );
}

fn bytes_read_where_they_lie() {
    let q: Queue<Vec<u8>> = Queue::new().expect("queue");
    let big = pattern(3 << 20, 9); // streamed: larger than half the ring
    q.put_bytes(b"first").expect("put");
    q.put(b"typed".to_vec()).expect("put");
    let child_q = q.clone();
    let big_in_child = big.clone();
    let child = proc::spawn(move || child_q.put_bytes(&big_in_child).is_ok()).expect("spawn");
    // The reader's value comes back; raw and postcard byte strings alike.
    assert_eq!(q.get_bytes_with(|b| b.len()).ok(), Some(5));
    assert_eq!(
        q.get_bytes_with_timeout(Duration::from_secs(5), |b| b.to_vec())
            .ok(),
        Some(b"typed".to_vec())
    );
    // A streamed message is not taken by a get that never waits; a
    // blocking one reads it whole.
    let deadline = Instant::now() + Duration::from_secs(10);
    while q.qsize() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    match q.try_get_whole_bytes_with(|_| ()) {
        Err(GetError::Timeout) => {}
        other => panic!("{other:?}"),
    }
    // Kept: a streamed message's own buffer is handed over, not copied.
    let kept = q
        .get_bytes_with(|m| {
            let mut buf = Vec::new();
            m.into_buf(&mut buf);
            buf
        })
        .expect("streamed");
    assert!(kept == big);
    assert!(child.join().expect("join"));
    // From the ring: copied into the buffer given (cleared first).
    q.put_bytes(b"ring").expect("put");
    let mut buf = b"old".to_vec();
    q.get_bytes_with(|m| m.into_buf(&mut buf)).expect("get");
    assert_eq!(buf, b"ring");
    assert!(matches!(
        q.try_get_whole_bytes_with(|_| ()),
        Err(GetError::Empty)
    ));
    assert!(matches!(
        q.get_bytes_with_timeout(Duration::from_millis(20), |_| ()),
        Err(GetError::Timeout)
    ));
    // A reader that panics: the panic is the caller's, the message taken.
    q.put_bytes(b"boom").expect("put");
    q.put_bytes(b"after").expect("put");
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        q.get_bytes_with(|b| -> usize { panic!("reader saw {}", b.len()) })
    }));
    assert!(read.is_err());
    assert_eq!(
        q.try_get_whole_bytes_with(|b| b.to_vec()).ok(),
        Some(b"after".to_vec())
    );
    // A message that is not a byte string: a typed error, not the reader.
    let nums: Queue<u64> = Queue::new().expect("queue");
    nums.put(7).expect("put");
    assert!(matches!(
        nums.get_bytes_with(|_| -> () { panic!("not a byte string") }),
        Err(GetError::Failed(QueueError::Decode(_)))
    ));
    assert!(nums.empty());
    q.close();
    assert!(matches!(q.get_bytes_with(|_| ()), Err(GetError::Closed)));
}

fn decode_error_keeps_queue_working() {
    let q: Queue<String> = Queue::new().expect("queue");
    // Bytes that are not a valid String (a process that disagrees on the type).
    q.put_bytes(&[0xff, 0xfe, 0xfd]).expect("put");
    q.put("fine".to_owned()).expect("put");
    match q.get() {
        Err(GetError::Failed(QueueError::Decode(_))) => {}
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert_eq!(q.get().expect("next message"), "fine");
    let nums: Queue<u64> = Queue::new().expect("queue");
    nums.put(7).expect("put");
    assert!(matches!(
        nums.get_bytes(),
        Err(GetError::Failed(QueueError::Decode(_)))
    ));
    assert!(nums.empty());
    // A Deserialize that panics: the panic reaches the caller of get, and
    // the message is taken, as one that fails to decode is (before: it
    // stayed at the head and every later get panicked on it again).
    let picky: Queue<Unlucky> = Queue::new().expect("queue");
    picky.put(Unlucky(13)).expect("put");
    picky.put(Unlucky(1)).expect("put");
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| picky.get()));
    assert!(first.is_err(), "the decoding panic reaches the caller");
    assert_eq!(picky.qsize(), 1);
    assert_eq!(picky.get().expect("next message"), Unlucky(1));
    // The same for a message that streamed through in fragments.
    let big: Queue<(Vec<u8>, Unlucky)> = Queue::builder().capacity(4096).build().expect("queue");
    let producer = big.clone();
    let child = proc::spawn(move || {
        producer.put((vec![1; 10_000], Unlucky(13))).is_ok()
            && producer.put((vec![2; 3], Unlucky(2))).is_ok()
    })
    .expect("spawn");
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| big.get()));
    assert!(first.is_err());
    assert_eq!(big.get().expect("next").1, Unlucky(2));
    assert!(child.join().expect("join"));
}

fn close_ends_a_stream_that_nobody_drains() {
    // A message four times the ring, no consumer: the put fills the ring
    // with its first fragments and waits for room. close() (here from the
    // parent) ends it with Closed — before, a put past its first fragment
    // finished "regardless" and waited for ever, holding the producer
    // lock — and nobody ever sees a piece of the message.
    let q: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
    let started: Queue<u8> = Queue::new().expect("queue");
    let (producer, tell) = (q.clone(), started.clone());
    let child = proc::spawn(move || {
        let big = pattern(64 * 1024, 5);
        tell.put(1).expect("put");
        let t = Instant::now();
        let closed = matches!(producer.put_bytes(&big), Err(PutError::Closed(())));
        (closed, t.elapsed())
    })
    .expect("spawn");
    // The put began; 100 ms later its first fragments fill the ring.
    started.get().expect("started");
    std::thread::sleep(Duration::from_millis(100));
    assert!(q.qsize() == 0, "a part of the message counted as a message");
    q.close();
    // The stuck put still holds the producer lock (it withdraws its
    // message only after the close grace): a try says Closed, not Full.
    assert!(matches!(q.try_put(vec![1]), Err(PutError::Closed(_))));
    // A timed put past its first fragment whose deadline passes on a
    // closed queue says Closed, not Timeout (its own message withdrawn).
    let timed = {
        let q2: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
        let producer = q2.clone();
        let child = proc::spawn(move || {
            let big = pattern(64 * 1024, 6);
            match producer.put_timeout(big, Duration::from_millis(300)) {
                Err(PutError::Closed(_)) => "closed".to_owned(),
                Err(e) => format!("{e:?}"),
                Ok(()) => "ok".to_owned(),
            }
        })
        .expect("spawn");
        std::thread::sleep(Duration::from_millis(150));
        q2.close();
        child.join().expect("join")
    };
    assert_eq!(timed, "closed");
    let (closed, took) = child.join().expect("join");
    assert!(closed, "the put did not end with Closed");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(matches!(q.get_bytes(), Err(GetError::Closed)));
    assert!(matches!(q.put(vec![1]), Err(PutError::Closed(_))));
}

fn timed_out_stream_is_withdrawn() {
    // A message four times the ring, no consumer: the put gives up at its
    // deadline, hands the item back, and consumers never see a piece of it.
    let q: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
    let big = pattern(64 * 1024, 3);
    let t = Instant::now();
    match q.put_timeout(big.clone(), Duration::from_millis(30)) {
        Err(PutError::Timeout(item)) => assert!(item == big),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(30));
    assert!(matches!(q.try_put_bytes(&big), Err(PutError::Full(()))));
    assert_eq!(q.qsize(), 0);
    q.put(b"next".to_vec()).expect("put");
    assert_eq!(q.get().expect("get"), b"next");
    // With a consumer draining, the same put goes through.
    let consumer = q.clone();
    let child =
        proc::spawn(move || consumer.get_bytes().map(|v| v.len()).unwrap_or(0)).expect("spawn");
    q.put_timeout(big, Duration::from_secs(10))
        .expect("put with a consumer");
    assert_eq!(child.join().expect("join"), 64 * 1024);
}

fn a_whole_get_leaves_a_stream() {
    // A producer streams a message four times the ring, stops midway (the
    // ring full of its first fragments), then is stopped by SIGSTOP: a
    // whole get returns at once (Timeout: it would have to wait) instead
    // of waiting for the rest; an
    // ordinary get takes the stream once the producer goes on.
    let q: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
    let producer = q.clone();
    let big = pattern(64 * 1024, 9);
    let sent = big.clone();
    let child = proc::spawn(move || {
        producer.put_bytes(&sent).expect("put big");
        producer.put_bytes(b"after").expect("put after");
    })
    .expect("spawn");
    let pid = child.pid().as_u32() as i32;
    // Blocked on the full ring once its state is 'S'.
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid as u32) == Some('S')
    }));
    // SAFETY: a signal to our own child, which `child` still holds.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid as u32) == Some('T')
    }));
    let mut buf = Vec::new();
    let t = Instant::now();
    assert!(matches!(
        q.try_get_whole_bytes_into(&mut buf),
        Err(GetError::Timeout)
    ));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(buf.is_empty());
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(q.get_bytes().expect("the stream") == big);
    assert!(common::eventually(Duration::from_secs(5), || {
        q.try_get_whole_bytes_into(&mut buf).is_ok()
    }));
    assert_eq!(buf, b"after");
    assert!(matches!(
        q.try_get_whole_bytes_into(&mut buf),
        Err(GetError::Empty)
    ));
    child.join().expect("join");
}

fn into_fresh_empties_a_queue() {
    let q: Queue<u64> = Queue::builder()
        .capacity(4096)
        .maxsize(5)
        .build()
        .expect("queue");
    q.put(1).expect("put");
    q.put(2).expect("put");
    q.close();
    let other = q.clone();
    let q = q.into_fresh().expect_err("a clone of it exists");
    assert_eq!(q.qsize(), 2, "given back unchanged");
    drop(other);
    let q = q.into_fresh().expect("the only handle");
    assert_eq!(q.qsize(), 0);
    assert!(!q.is_closed());
    assert_eq!(q.maxsize(), Some(5));
    assert_eq!(q.capacity(), 4096);
    assert!(matches!(q.try_get(), Err(GetError::Empty)));
    for i in 0..5 {
        q.put(i).expect("put");
    }
    assert!(q.full(), "the bound holds again");
    for i in 0..5 {
        assert_eq!(q.get().expect("get"), i);
    }
    // Shared with a child as a new queue would be.
    let theirs = q.clone();
    let child = proc::spawn(move || theirs.get().expect("get")).expect("spawn");
    q.put(7).expect("put");
    assert_eq!(child.join().expect("join"), 7);
}

fn withdrawn_stream_at_the_wrap() {
    // A streamed message whose last fragment does not fit before the end
    // of the ring: the producer pads the end and waits for room at the
    // start; when it gives up there, its ABORT record must still have a
    // place of its own, not on top of unread data. With the smallest ring,
    // 4040 bytes stream as three fragments of 1040 and a last one of 1024
    // that meets the wrap with the ring (nearly) full; the consumer's head
    // at offset 0, then elsewhere.
    for first in [None, Some(b"head".to_vec())] {
        let q: Queue<Vec<u8>> = Queue::builder().capacity(4096).build().expect("queue");
        if let Some(first) = &first {
            q.put(first.clone()).expect("put");
            assert_eq!(q.get().expect("get"), *first);
        }
        let big = pattern(4040, 5);
        match q.try_put_bytes(&big) {
            Err(PutError::Full(())) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(q.qsize(), 0);
        // The withdrawn parts still take room until a consumer passes
        // them: the next message goes through with one.
        let consumer = q.clone();
        let child = proc::spawn(move || consumer.get_bytes().expect("get")).expect("spawn");
        q.put_bytes(b"x").expect("put after a withdrawn stream");
        assert_eq!(child.join().expect("join"), b"x");
        assert_eq!(q.qsize(), 0);
        // And the ring carries messages of every size after it.
        for n in [1, 100, 1000, 2000, 5000] {
            let m = pattern(n, n as u64);
            let consumer = q.clone();
            let child = proc::spawn(move || consumer.get_bytes().expect("get")).expect("spawn");
            q.put_bytes(&m).expect("put");
            assert!(child.join().expect("join") == m, "{n} bytes");
        }
    }
}

/// A child that streams a message four times `q`'s ring into it and is
/// SIGKILLed midway, holding the producer lock; returns once it is gone.
fn kill_a_producer_holding_the_lock(q: &Queue<Vec<u8>>) {
    let producer = q.clone();
    let child = proc::spawn(move || {
        let _ = producer.put_bytes(&pattern(64 * 1024, 11));
    })
    .expect("spawn");
    let pid = child.pid().as_u32();
    // Blocked on the full ring, holding the lock (its word, at byte 128 of
    // the segment, names the holder).
    let fd = std::os::fd::AsRawFd::as_raw_fd(q);
    let segment = std::fs::File::open(format!("/proc/self/fd/{fd}")).expect("open");
    let lock_word = || {
        let mut word = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&segment, &mut word, 128).expect("read");
        u32::from_le_bytes(word)
    };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid) == Some('S') && lock_word() != 0
    }));
    // SAFETY: a signal to our own child, which `child` still holds.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(child.join().is_err(), "the producer was not killed");
}

fn a_killed_lock_holder_is_taken_over() {
    // A process killed holding a queue's lock: the others take the lock
    // over (its holder's life slot shows the death) and nobody sees a
    // piece of its message.
    //
    // 1. A holder forked after its parent had locked in the segment: the
    //    fork's copy of the parent's slot is not the child's; it takes its
    //    own, whose death a process without that copy sees.
    let q: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
    let go: Queue<u8> = Queue::new().expect("queue");
    let ready: Queue<u8> = Queue::new().expect("queue");
    let (late, go_rx, ready_tx) = (q.clone(), go.clone(), ready.clone());
    let other = proc::spawn(move || {
        // Its slot taken before the holder's death: the death shows as
        // the holder's slot marked by the kernel (not as a slot taken
        // again, the second part's case).
        assert!(matches!(late.try_get(), Err(GetError::Empty)));
        ready_tx.put(1).expect("put");
        go_rx.get().expect("go");
        let t = Instant::now();
        let put = late.put_timeout(b"after".to_vec(), Duration::from_secs(10));
        (put.is_ok(), t.elapsed())
    })
    .expect("spawn");
    ready.get().expect("ready");
    q.put(vec![0]).expect("put");
    assert_eq!(q.get().expect("get"), vec![0]);
    kill_a_producer_holding_the_lock(&q);
    go.put(1).expect("put");
    let (put, took) = other.join().expect("join");
    assert!(put, "the other process's put failed");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // (The dead producer's fragments fill the ring until a get discards
    // them.)
    assert_eq!(
        q.get_timeout(Duration::from_secs(5)).expect("get"),
        b"after"
    );
    q.put(b"parent".to_vec()).expect("put");
    assert_eq!(
        q.get_timeout(Duration::from_secs(5)).expect("get"),
        b"parent"
    );
    assert!(matches!(q.try_get(), Err(GetError::Empty)));
    // 2. The dead holder's slot taken again (by the next process to lock,
    //    which here is the one that wants the lock): a new generation, so
    //    the word's holder is gone although its slot is held.
    let q: Queue<Vec<u8>> = Queue::builder().capacity(16 * 1024).build().expect("queue");
    kill_a_producer_holding_the_lock(&q);
    let next = q.clone();
    let put = proc::spawn(move || {
        next.put_timeout(b"next".to_vec(), Duration::from_secs(10))
            .is_ok()
    })
    .expect("spawn");
    assert!(put.join().expect("join"), "the next process's put failed");
    assert_eq!(q.get_timeout(Duration::from_secs(5)).expect("get"), b"next");
    assert!(matches!(q.try_get(), Err(GetError::Empty)));
}

fn joinable_queue() {
    let q: JoinableQueue<u32> = JoinableQueue::new().expect("queue");
    for i in 0..10 {
        q.put(i).expect("put");
    }
    assert_eq!(q.unfinished_tasks(), 10);
    assert!(!q.join_timeout(Duration::from_millis(20)));
    let worker = q.clone();
    let child = proc::spawn(move || {
        let mut sum = 0;
        for _ in 0..10 {
            sum += worker.get().expect("get");
            std::thread::sleep(Duration::from_millis(2));
            worker.task_done().expect("task_done");
        }
        sum
    })
    .expect("spawn");
    q.join();
    assert_eq!(q.unfinished_tasks(), 0);
    assert_eq!(child.join().expect("join"), 45);
    assert!(matches!(
        q.task_done(),
        Err(QueueError::TaskDoneTooManyTimes)
    ));
    assert!(q.join_timeout(Duration::ZERO));
}

fn simple_queue() {
    let q: SimpleQueue<(u8, String)> = SimpleQueue::new().expect("queue");
    assert!(q.empty());
    let producer = q.clone();
    let child = proc::spawn(move || producer.put((1, "one".into())).is_ok()).expect("spawn");
    assert_eq!(q.get().expect("get"), (1, "one".to_owned()));
    assert!(child.join().expect("join"));
    q.close();
    assert!(matches!(q.get(), Err(GetError::Closed)));
}

fn many_producers_many_consumers() {
    const PRODUCERS: u64 = 3;
    const PER: u64 = 20_000;
    let q: Queue<(u64, u64, u64)> = Queue::with_maxsize(100).expect("queue");
    let results: Queue<(u64, u64)> = Queue::new().expect("results");
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let q = q.clone();
            proc::spawn(move || {
                for i in 0..PER {
                    q.put((p, i, (p * 1_000_003) ^ i)).expect("put");
                }
            })
            .expect("spawn producer")
        })
        .collect();
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let q = q.clone();
            let results = results.clone();
            proc::spawn(move || {
                let (mut n, mut sum) = (0u64, 0u64);
                let mut last = [None::<u64>; PRODUCERS as usize];
                while let Ok((p, i, check)) = q.get() {
                    assert_eq!(check, (p * 1_000_003) ^ i, "corrupted message");
                    // Per producer, a consumer sees increasing sequence numbers.
                    assert!(last[p as usize].is_none_or(|l| l < i), "out of order");
                    last[p as usize] = Some(i);
                    n += 1;
                    sum += i;
                }
                results.put((n, sum)).expect("result");
            })
            .expect("spawn consumer")
        })
        .collect();
    for p in producers {
        p.join().expect("producer");
    }
    q.close();
    for c in consumers {
        c.join().expect("consumer");
    }
    let (mut n, mut sum) = (0, 0);
    for _ in 0..2 {
        let (cn, cs) = results.get().expect("result");
        n += cn;
        sum += cs;
    }
    assert_eq!(n, PRODUCERS * PER);
    assert_eq!(sum, PRODUCERS * PER * (PER - 1) / 2);
}

/// Two threads put at once into a ring with room for everything: the one
/// using `try_put` must not be told `Full` because the other was in the
/// middle of writing a record (Python's `put_nowait` raises `Full` only
/// when the queue is full). A holder preempted mid-record can still make
/// a try fail now and then: the bound allows for that, not for the old
/// behaviour (a `Full` whenever the lock was held at that instant).
fn try_put_with_room_is_not_full_under_contention() {
    const N: u64 = 50_000;
    let q: Queue<u64> = Queue::builder().capacity(8 << 20).build().expect("queue");
    let other = q.clone();
    let putter = std::thread::spawn(move || {
        for i in 0..N {
            other.put(i).expect("put");
        }
    });
    let mut full = 0u64;
    for i in 0..N {
        match q.try_put(i) {
            Ok(()) => {}
            Err(PutError::Full(_)) => full += 1,
            Err(e) => panic!("try_put: {e:?}"),
        }
    }
    putter.join().expect("putter");
    assert_eq!(q.qsize() as u64 + full, 2 * N);
    assert!(
        full * 1000 < N,
        "{full} of {N} try_puts said Full with room left"
    );
}
