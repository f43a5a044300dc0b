//! The process pool: Python's API, failures as results, dead workers
//! replaced, no orphans (one thread: `harness = false`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use common::Unlucky;
use proc::{Pool, PoolError, SpawnError, StartMethod, TaskError};

/// The start method the current test uses (0 Fork, 1 ForkServer, 2 Spawn).
static METHOD: AtomicU8 = AtomicU8::new(0);

fn method() -> StartMethod {
    match METHOD.load(Ordering::Relaxed) {
        1 => StartMethod::ForkServer,
        2 => StartMethod::Spawn,
        _ => StartMethod::Fork,
    }
}

fn make_pool(processes: usize) -> Pool {
    Pool::builder()
        .processes(processes)
        .start_method(method())
        .build()
        .expect("pool")
}

fn main() {
    proc::init();
    if let Ok(mode) = std::env::var("PROC_TEST_MODE") {
        helper_mode(&mode);
        return;
    }
    common::become_subreaper();
    macro_rules! each_method {
        ($name:literal, $secs:literal, $f:ident) => {
            [
                (
                    concat!("fork::", $name),
                    $secs,
                    (|| {
                        METHOD.store(0, Ordering::Relaxed);
                        $f()
                    }) as fn(),
                ),
                (
                    concat!("forkserver::", $name),
                    $secs,
                    (|| {
                        METHOD.store(1, Ordering::Relaxed);
                        $f()
                    }) as fn(),
                ),
                (
                    concat!("spawn::", $name),
                    $secs,
                    (|| {
                        METHOD.store(2, Ordering::Relaxed);
                        $f()
                    }) as fn(),
                ),
            ]
        };
    }
    let mut tests: Vec<common::Test> = vec![
        ("map_chunking_and_order", 30, map_chunking_and_order),
        (
            "imap_ordered_unordered_endless",
            30,
            imap_ordered_unordered_endless,
        ),
        ("get_timeout_is_never_early", 30, get_timeout_is_never_early),
        ("panic_in_map_and_imap", 30, panic_in_map_and_imap),
        (
            "large_chunks_finish_in_any_order",
            60,
            large_chunks_finish_in_any_order,
        ),
        (
            "a_panicking_result_decode_leaves_the_pool_whole",
            60,
            a_panicking_result_decode_leaves_the_pool_whole,
        ),
        (
            "a_map_survives_a_lying_length",
            30,
            a_map_survives_a_lying_length,
        ),
        (
            "a_map_of_large_chunks_stops_at_a_failure_close_or_retirement",
            60,
            a_map_of_large_chunks_stops_at_a_failure_close_or_retirement,
        ),
        (
            "worker_sigkilled_during_a_map_of_large_chunks",
            60,
            worker_sigkilled_during_a_map_of_large_chunks,
        ),
        (
            "worker_sigkilled_during_map",
            60,
            worker_sigkilled_during_map,
        ),
        (
            "worker_sigkilled_during_imap",
            60,
            worker_sigkilled_during_imap,
        ),
        ("maxtasksperchild_recycles", 60, maxtasksperchild_recycles),
        (
            "maxtasksperchild_with_results_waiting_in_the_ring",
            60,
            maxtasksperchild_with_results_waiting_in_the_ring,
        ),
        (
            "initializer_runs_once_per_worker",
            30,
            initializer_runs_once_per_worker,
        ),
        (
            "initializer_failure_fails_tasks",
            30,
            initializer_failure_fails_tasks,
        ),
        ("encode_and_decode_failures", 30, encode_and_decode_failures),
        (
            "panics_in_serde_are_results",
            30,
            panics_in_serde_are_results,
        ),
        ("close_join_semantics", 30, close_join_semantics),
        (
            "terminate_and_drop_leave_nothing",
            30,
            terminate_and_drop_leave_nothing,
        ),
        (
            "replacement_after_threads_started",
            30,
            replacement_after_threads_started,
        ),
        (
            "threaded_parent_needs_forkserver",
            30,
            threaded_parent_needs_forkserver,
        ),
        (
            "workers_die_with_sigkilled_parent",
            30,
            workers_die_with_sigkilled_parent,
        ),
        (
            "spawn_workers_started_on_a_thread_die_with_a_killed_parent",
            30,
            spawn_workers_started_on_a_thread_die_with_a_killed_parent,
        ),
        (
            "a_broken_pool_runs_nothing_more_and_joins",
            30,
            a_broken_pool_runs_nothing_more_and_joins,
        ),
        (
            "a_failed_replacement_keeps_the_zygote",
            30,
            a_failed_replacement_keeps_the_zygote,
        ),
        ("ctrl_c_stops_cleanly", 30, ctrl_c_stops_cleanly),
        (
            "large_arguments_and_results",
            60,
            large_arguments_and_results,
        ),
        ("shared_by_threads", 60, shared_by_threads),
        (
            "polling_ready_makes_progress",
            30,
            polling_ready_makes_progress,
        ),
        (
            "slow_initializer_and_large_task",
            30,
            slow_initializer_and_large_task,
        ),
        (
            "a_killed_zygote_is_replaced",
            30,
            a_killed_zygote_is_replaced,
        ),
        (
            "a_killed_zygote_is_no_initializer_failure",
            30,
            a_killed_zygote_is_no_initializer_failure,
        ),
        (
            "a_corrupted_result_queue_breaks_the_pool",
            30,
            a_corrupted_result_queue_breaks_the_pool,
        ),
        (
            "a_large_task_waits_for_initialized_workers_without_stalling",
            30,
            a_large_task_waits_for_initialized_workers_without_stalling,
        ),
        (
            "a_join_during_terminate_returns_once_workers_are_gone",
            30,
            a_join_during_terminate_returns_once_workers_are_gone,
        ),
        (
            "a_result_streamed_by_a_stopped_worker_does_not_block_terminate",
            30,
            a_result_streamed_by_a_stopped_worker_does_not_block_terminate,
        ),
        (
            "terminate_ends_a_join_reading_a_stopped_workers_stream",
            30,
            terminate_ends_a_join_reading_a_stopped_workers_stream,
        ),
        (
            "submitting_alone_reads_streamed_results",
            30,
            submitting_alone_reads_streamed_results,
        ),
        (
            "terminate_ends_a_join_waiting_on_an_endless_task",
            30,
            terminate_ends_a_join_waiting_on_an_endless_task,
        ),
        (
            "a_zygotes_spare_goes_with_it",
            30,
            a_zygotes_spare_goes_with_it,
        ),
        (
            "an_ended_pools_rings_serve_the_next_pool",
            30,
            an_ended_pools_rings_serve_the_next_pool,
        ),
        (
            "zygote_ends_with_its_pool_not_with_other_children",
            30,
            zygote_ends_with_its_pool_not_with_other_children,
        ),
    ];
    for group in [
        each_method!("apply_and_results", 30, apply_and_results),
        each_method!("panic_is_a_result", 30, panic_is_a_result),
        each_method!("worker_death_is_a_result", 60, worker_death_is_a_result),
    ] {
        tests.extend(group);
    }
    common::run(&tests)
}

fn square(x: u64) -> u64 {
    x * x
}

fn add((a, b): (u64, u64)) -> u64 {
    a + b
}

fn worker_pid(_: ()) -> u32 {
    proc::getpid().as_u32()
}

fn worker_pid_and_parent(_: ()) -> (u32, u32) {
    (proc::getpid().as_u32(), proc::getppid().as_u32())
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

fn sleep_then_pid(ms: u64) -> (u64, u32) {
    std::thread::sleep(Duration::from_millis(ms));
    (ms, proc::getpid().as_u32())
}

fn panicky(x: u64) -> u64 {
    if x % 10 == 3 {
        panic!("no threes: {x}");
    }
    x
}

/// The first item sleeps, so that its chunk finishes after the others;
/// items 5 and 55,000 fail (5 only once that sleep is over).
fn late_first(x: u64) -> u64 {
    if x == 0 {
        std::thread::sleep(Duration::from_millis(300));
    }
    if x == 5 || x == 55_000 {
        panic!("failed at {x}");
    }
    3 * x
}

/// Sleeps `ms` (an argument padded to send a task record over 64 KiB).
fn sleep_padded((ms, pad): (u64, Vec<u8>)) -> usize {
    std::thread::sleep(Duration::from_millis(ms));
    pad.len()
}

/// Fails at once on item 0; the others sleep 100 ms (padded arguments:
/// task records over 64 KiB).
fn fail_first_or_nap((i, pad): (u64, Vec<u8>)) -> usize {
    assert!(i != 0, "first");
    std::thread::sleep(Duration::from_millis(100));
    pad.len()
}

/// A result whose decoding (in the parent) panics on 13.
fn unlucky(x: u64) -> Unlucky {
    Unlucky(x)
}

/// An iterator whose exact `size_hint` is wrong.
struct Lying {
    next: u64,
    end: u64,
    claims: usize,
}

impl Iterator for Lying {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.claims, Some(self.claims))
    }
}

/// How a task ends its own worker.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy)]
enum Death {
    Kill,
    Abort,
    Segfault,
    Exit(i32),
}

fn die(how: Death) -> u64 {
    match how {
        // SAFETY: a plain signal to this process.
        Death::Kill => unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        },
        Death::Abort => std::process::abort(),
        // std's SIGSEGV handler lets a raised signal pass: restore the
        // default first, as a real invalid access would end.
        // SAFETY: SIG_DFL is a valid disposition; raise signals this process.
        Death::Segfault => unsafe {
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            libc::raise(libc::SIGSEGV);
        },
        Death::Exit(code) => std::process::exit(code),
    }
    std::thread::sleep(Duration::from_secs(10));
    0
}

fn apply_and_results() {
    let pool = make_pool(2);
    assert_eq!(pool.processes(), 2);
    assert_eq!(pool.apply(square, 7), Ok(49));
    assert_eq!(pool.apply(add, (2, 40)), Ok(42));
    let results: Vec<_> = (0..200u64)
        .map(|i| pool.apply_async(square, i).expect("submit"))
        .collect();
    let total: u64 = results.into_iter().map(|r| r.get().expect("get")).sum();
    assert_eq!(total, (0..200u64).map(|i| i * i).sum::<u64>());
    let slow = pool.apply_async(sleep_ms, 150).expect("submit");
    assert!(!slow.ready());
    assert_eq!(slow.successful(), None);
    assert!(!slow.wait_timeout(Duration::from_millis(10)));
    slow.wait();
    assert!(slow.ready());
    assert_eq!(slow.successful(), Some(true));
    assert_eq!(slow.get(), Ok(150));
    // After get_timeout has taken the value, still ready and successful
    // (as in Python); a failed task is unsuccessful after it too.
    let mut quick = pool.apply_async(square, 3).expect("submit");
    assert_eq!(quick.get_timeout(Duration::from_secs(5)), Ok(9));
    assert!(quick.ready());
    assert_eq!(quick.successful(), Some(true));
    let mut failing = pool.apply_async(panicky, 3).expect("submit");
    assert!(failing.get_timeout(Duration::from_secs(5)).is_err());
    assert_eq!(failing.successful(), Some(false));
    let pids: HashSet<u32> = (0..20)
        .map(|_| pool.apply_async(worker_pid, ()).expect("submit"))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|r| r.get().expect("pid"))
        .collect();
    let workers: HashSet<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    assert!(pids.is_subset(&workers), "{pids:?} vs {workers:?}");
    pool.close();
    pool.join().expect("join");
}

fn map_chunking_and_order() {
    let pool = make_pool(2);
    let n = 10_000u64;
    let expected: Vec<u64> = (0..n).map(|i| i * i).collect();
    assert_eq!(pool.map(square, 0..n).expect("map"), expected);
    assert_eq!(pool.map_chunked(square, 0..n, 7).expect("map"), expected);
    assert_eq!(pool.map(square, Vec::<u64>::new()).expect("empty"), vec![]);
    let pairs: Vec<(u64, u64)> = (0..100).map(|i| (i, 2 * i)).collect();
    assert_eq!(
        pool.map(add, pairs).expect("starmap"),
        (0..100).map(|i| 3 * i).collect::<Vec<_>>()
    );
    let mut pending = pool.map_async(square, 0..1000u64).expect("map_async");
    pending.wait();
    assert!(pending.ready());
    assert_eq!(
        pending
            .get_timeout(Duration::from_secs(5))
            .expect("get")
            .len(),
        1000
    );
    assert_eq!(
        pending.get_timeout(Duration::from_secs(1)),
        Err(TaskError::Taken)
    );
}

/// Serializes, except the value 5.
#[derive(Debug)]
struct NotFive(u64);

impl serde::Serialize for NotFive {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 5 {
            return Err(serde::ser::Error::custom("five"));
        }
        s.serialize_u64(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for NotFive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(NotFive)
    }
}

fn unwrap_not_five(x: NotFive) -> u64 {
    x.0
}

fn imap_ordered_unordered_endless() {
    let pool = make_pool(2);
    // An item that cannot be sent fails in its own place, after the items
    // before it (sent, still running), not ahead of them.
    let out: Vec<Result<u64, TaskError>> =
        pool.imap(unwrap_not_five, (0..10).map(NotFive)).collect();
    assert_eq!(out.len(), 10);
    for (i, r) in out.iter().enumerate() {
        match (i, r) {
            (5, Err(TaskError::ArgsEncode(_))) => {}
            (i, Ok(v)) if i != 5 && *v == i as u64 => {}
            other => panic!("{other:?} in {out:?}"),
        }
    }
    // In chunks of 4, its whole chunk (4..8) fails in place, each item
    // once; a map of them fails.
    let out: Vec<Result<u64, TaskError>> = pool
        .imap_chunked(unwrap_not_five, (0..10).map(NotFive), 4)
        .collect();
    assert_eq!(out.len(), 10);
    for (i, r) in out.iter().enumerate() {
        match (i, r) {
            (4..8, Err(TaskError::ArgsEncode(m))) => assert!(m.contains("five"), "{m}"),
            (i, Ok(v)) if !(4..8).contains(&i) && *v == i as u64 => {}
            other => panic!("{other:?} in {out:?}"),
        }
    }
    assert!(matches!(
        pool.map_chunked(unwrap_not_five, (0..10).map(NotFive), 4),
        Err(TaskError::ArgsEncode(_))
    ));
    let ordered: Vec<u64> = pool
        .imap(square, 0..500u64)
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(ordered, (0..500u64).map(|i| i * i).collect::<Vec<_>>());
    let chunked: Vec<u64> = pool
        .imap_chunked(square, 0..500u64, 16)
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(chunked, ordered);
    let mut unordered: Vec<u64> = pool
        .imap_unordered(sleep_ms, [40, 1, 30, 2, 20, 3])
        .map(|r| r.expect("item"))
        .collect();
    // The short tasks overtake the long ones.
    assert_ne!(unordered, vec![40, 1, 30, 2, 20, 3]);
    unordered.sort_unstable();
    assert_eq!(unordered, vec![1, 2, 3, 20, 30, 40]);
    // An endless input: only what is consumed (plus a bounded window) runs.
    let first: Vec<u64> = pool
        .imap(square, 0u64..)
        .take(2000)
        .map(|r| r.expect("item"))
        .collect();
    assert_eq!(first[1999], 1999 * 1999);
    let mut endless = pool.imap_unordered_chunked(square, 0u64.., 10);
    let some: u64 = endless
        .by_ref()
        .take(100)
        .inspect(|r| assert!(r.is_ok(), "{r:?}"))
        .count() as u64;
    assert_eq!(some, 100);
    drop(endless);
    // The pool is still fine after the abandoned tasks.
    assert_eq!(pool.apply(square, 12), Ok(144));
}

fn get_timeout_is_never_early() {
    let pool = make_pool(1);
    let mut slow = pool.apply_async(sleep_ms, 300).expect("submit");
    let t = Instant::now();
    assert_eq!(
        slow.get_timeout(Duration::from_millis(100)),
        Err(TaskError::Timeout)
    );
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(100), "{waited:?}");
    assert!(waited < Duration::from_millis(250), "{waited:?}");
    assert_eq!(slow.get_timeout(Duration::from_secs(5)), Ok(300));
    assert_eq!(
        slow.get_timeout(Duration::from_secs(5)),
        Err(TaskError::Taken)
    );
}

fn panic_is_a_result() {
    let pool = make_pool(1);
    let before = pool.apply(worker_pid, ()).expect("pid");
    match pool.apply(panicky, 13) {
        Err(TaskError::Panicked { message, location }) => {
            assert_eq!(message, "no threes: 13");
            let location = location.expect("location");
            assert!(location.starts_with("tests/pool.rs:"), "{location}");
        }
        other => panic!("{other:?}"),
    }
    let failed = pool.apply_async(panicky, 3).expect("submit");
    failed.wait();
    assert_eq!(failed.successful(), Some(false));
    // The same worker goes on.
    assert_eq!(pool.apply(worker_pid, ()), Ok(before));
    assert_eq!(pool.apply(panicky, 4), Ok(4));
}

fn panic_in_map_and_imap() {
    let pool = make_pool(2);
    match pool.map(panicky, 0..100) {
        Err(TaskError::Panicked { message, .. }) => assert_eq!(message, "no threes: 3"),
        other => panic!("{other:?}"),
    }
    let results: Vec<_> = pool.imap_chunked(panicky, 0..100, 7).collect();
    assert_eq!(results.len(), 100);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => assert_eq!(v, i as u64),
            Err(TaskError::Panicked { .. }) => assert_eq!(i % 10, 3),
            Err(e) => panic!("{i}: {e}"),
        }
    }
}

fn large_chunks_finish_in_any_order() {
    let pool = make_pool(2);
    // Chunks of 10,000 (80 KB records, sent as the workers take them):
    // the first finishes last, and the others' values wait in their
    // places meanwhile.
    let n = 60_000u64;
    let expected: Vec<u64> = (0..n).map(|x| 3 * x).collect();
    let ok = |x: u64| if x == 5 || x == 55_000 { 1 } else { x };
    let args: Vec<u64> = (0..n).map(ok).collect();
    let expected_ok: Vec<u64> = args.iter().map(|&x| 3 * x).collect();
    assert_eq!(
        pool.map_chunked(late_first, args.clone(), 10_000)
            .expect("map"),
        expected_ok
    );
    let pending = pool
        .map_async_chunked(late_first, args, 10_000)
        .expect("map_async");
    assert_eq!(pending.get().expect("get"), expected_ok);
    // The first failure in input order wins, though the last chunk's
    // came first.
    for map in [
        pool.map_chunked(late_first, 0..n, 10_000),
        pool.map_async_chunked(late_first, 0..n, 10_000)
            .expect("map_async")
            .get(),
    ] {
        match map {
            Err(TaskError::Panicked { message, .. }) => assert_eq!(message, "failed at 5"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(pool.map(square, 0..n).expect("map").len(), expected.len());
    pool.close();
    pool.join().expect("join");
}

fn a_panicking_result_decode_leaves_the_pool_whole() {
    let pool = make_pool(2);
    // The panic of a result's Deserialize is the map's caller's, whether
    // the result was decoded where it lay in the result ring or from a
    // copy, in large chunks or small ones; the pool goes on.
    for chunksize in [10_000, 3] {
        let map = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.map_chunked(unlucky, 0..40_000u64, chunksize)
        }));
        assert!(map.is_err(), "chunks of {chunksize}");
        let values = pool
            .map_chunked(unlucky, 14..40_000u64, chunksize)
            .expect("map");
        assert_eq!(values.len(), 40_000 - 14);
        assert_eq!(values[0], Unlucky(14));
    }
    let pending = pool.map_async(unlucky, 0..100u64).expect("map_async");
    let get = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pending.get()));
    assert!(get.is_err());
    assert_eq!(pool.apply(square, 12), Ok(144));
    pool.close();
    let t = Instant::now();
    pool.join().expect("join");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

fn a_map_survives_a_lying_length() {
    let pool = make_pool(2);
    // More items than claimed: the values' room grows; fewer: the map is
    // as short as the input.
    // (And a claim no memory could hold: the values' room is not
    // reserved for it.)
    for (end, claims) in [
        (1000, 10),
        (10, 1000),
        (70_000, 30_000),
        (100, usize::MAX / 2),
    ] {
        let lying = Lying {
            next: 0,
            end,
            claims,
        };
        let expected: Vec<u64> = (0..end).map(|i| i * i).collect();
        assert_eq!(pool.map(square, lying).expect("map"), expected, "{end}");
    }
}

fn a_map_of_large_chunks_stops_at_a_failure_close_or_retirement() {
    let pad = vec![1u8; 70_000];
    // A failure: the rest of the input is not sent (all 20 would take
    // ~1 s on two workers).
    let pool = make_pool(2);
    let args: Vec<(u64, Vec<u8>)> = (0..20).map(|i| (i, pad.clone())).collect();
    let t = Instant::now();
    match pool.map_chunked(fail_first_or_nap, args, 1) {
        Err(TaskError::Panicked { message, .. }) => assert_eq!(message, "first"),
        other => panic!("{other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    // Closed from another thread midway: the chunks sent finish, the map
    // says NotRunning, and the pool joins.
    let args: Vec<(u64, Vec<u8>)> = (0..10).map(|_| (150, pad.clone())).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            pool.close();
        });
        match pool.map_chunked(sleep_padded, args, 1) {
            Err(TaskError::NotRunning) => {}
            other => panic!("{other:?}"),
        }
    });
    pool.join().expect("join");
    // Workers retired after every task: the map goes on with their
    // replacements.
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(1)
        .start_method(method())
        .build()
        .expect("pool");
    let args: Vec<(u64, Vec<u8>)> = (0..6).map(|_| (1, pad.clone())).collect();
    let t = Instant::now();
    assert_eq!(
        pool.map_chunked(sleep_padded, args, 1).expect("map"),
        vec![70_000; 6]
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    pool.close();
    pool.join().expect("join");
}

fn worker_sigkilled_during_a_map_of_large_chunks() {
    let pool = make_pool(2);
    // As `worker_sigkilled_during_map`, through a blocking map of task
    // records over 64 KiB (sent as the workers take them).
    let pad = vec![7u8; 70_000];
    let args: Vec<(u64, Vec<u8>)> = (0..6).map(|_| (200, pad.clone())).collect();
    let victim = pool.worker_pids()[0];
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: a plain kill of a worker process.
        unsafe { libc::kill(victim.as_u32() as i32, libc::SIGKILL) };
    });
    let t = Instant::now();
    match pool.map_chunked(sleep_padded, args.clone(), 1) {
        Err(TaskError::WorkerDied { signal, .. }) => assert_eq!(signal, Some(libc::SIGKILL)),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    killer.join().expect("killer");
    // The pool goes on with a replacement.
    assert!(!pool.worker_pids().contains(&victim));
    assert_eq!(
        pool.map_chunked(sleep_padded, args, 1).expect("map"),
        vec![70_000; 6]
    );
}

fn worker_death_is_a_result() {
    let pool = make_pool(2);
    let before: HashSet<_> = pool.worker_pids().into_iter().collect();
    for (how, signal, code) in [
        (Death::Kill, Some(libc::SIGKILL), None),
        (Death::Abort, Some(libc::SIGABRT), None),
        (Death::Segfault, Some(libc::SIGSEGV), None),
        (Death::Exit(7), None, Some(7)),
    ] {
        // Tasks around the fatal one all complete.
        let around: Vec<_> = (0..10u64)
            .map(|i| pool.apply_async(square, i).expect("submit"))
            .collect();
        let fatal = pool.apply_async(die, how).expect("submit");
        let after: Vec<_> = (10..20u64)
            .map(|i| pool.apply_async(square, i).expect("submit"))
            .collect();
        let t = Instant::now();
        assert_eq!(fatal.get(), Err(TaskError::WorkerDied { signal, code }));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        for (i, r) in around.into_iter().chain(after).enumerate() {
            assert_eq!(r.get(), Ok((i * i) as u64));
        }
    }
    let now: HashSet<_> = pool.worker_pids().into_iter().collect();
    assert_eq!(now.len(), 2, "replacements started");
    assert_ne!(now, before);
    assert_eq!(pool.apply(square, 9), Ok(81));
    pool.close();
    pool.join().expect("join");
}

fn worker_sigkilled_during_map() {
    let pool = make_pool(2);
    // 6 tasks of 200 ms, one per chunk: 100 ms in, both workers are in the
    // middle of their first task when one is killed (with short tasks, a
    // kill could fall between two of them: an idle worker's death fails
    // nothing).
    let pending = pool
        .map_async_chunked(sleep_ms, vec![200u64; 6], 1)
        .expect("map");
    std::thread::sleep(Duration::from_millis(100));
    let victim = pool.worker_pids()[0];
    // SAFETY: a plain kill of a worker process.
    unsafe { libc::kill(victim.as_u32() as i32, libc::SIGKILL) };
    match pending.get() {
        Err(TaskError::WorkerDied { signal, .. }) => assert_eq!(signal, Some(libc::SIGKILL)),
        other => panic!("{other:?}"),
    }
    // The pool goes on with a replacement.
    assert!(!pool.worker_pids().contains(&victim));
    assert_eq!(pool.map(square, 0..100u64).expect("map").len(), 100);
}

fn worker_sigkilled_during_imap() {
    let pool = make_pool(2);
    let mut died = 0;
    let mut seen = 0;
    let mut victim = None;
    // Items 11 to 14 take long: the kill after item 10's result, 50 ms
    // later, finds both workers inside one of them. (With every item
    // alike, the worker that had just reported item 10 could be killed
    // before taking its next task: an idle worker's death fails nothing.)
    let sleeps: Vec<u64> = (0..60)
        .map(|i| if (11..15).contains(&i) { 300 } else { 15 })
        .collect();
    for (i, r) in pool.imap(sleep_then_pid, sleeps.clone()).enumerate() {
        seen += 1;
        match r {
            Ok((ms, _)) => assert_eq!(ms, sleeps[i]),
            Err(TaskError::WorkerDied { signal, .. }) => {
                assert_eq!(signal, Some(libc::SIGKILL));
                died += 1;
            }
            Err(e) => panic!("{e}"),
        }
        if i == 10 {
            std::thread::sleep(Duration::from_millis(50));
            let pid = pool.worker_pids()[1];
            // SAFETY: a plain kill of a worker process.
            unsafe { libc::kill(pid.as_u32() as i32, libc::SIGKILL) };
            victim = Some(pid);
        }
    }
    assert_eq!(seen, 60, "every item has a result");
    assert_eq!(died, 1, "exactly the running task failed");
    assert!(!pool.worker_pids().contains(&victim.expect("killed")));
}

fn maxtasksperchild_recycles() {
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(3)
        .build()
        .expect("pool");
    let results = pool
        .map_chunked(sleep_then_pid, vec![1u64; 30], 1)
        .expect("map");
    assert_eq!(results.len(), 30);
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    for (_, pid) in &results {
        *per_pid.entry(*pid).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    assert!(per_pid.len() >= 10, "{per_pid:?}");
    // apply_async too: nothing lost or duplicated.
    let pending: Vec<_> = (0..25u64)
        .map(|i| pool.apply_async(sleep_then_pid, i % 2).expect("submit"))
        .collect();
    for (i, r) in pending.into_iter().enumerate() {
        let (ms, pid) = r.get().expect("result");
        assert_eq!(ms, (i % 2) as u64);
        *per_pid.entry(pid).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    pool.close();
    pool.join().expect("join");
    // Retired workers are reaped after their replacements start, not
    // waited for: join leaves none of them behind either.
    for pid in per_pid.keys() {
        assert!(
            common::eventually(Duration::from_secs(2), || {
                common::proc_state(*pid).is_none_or(|s| s == 'Z')
            }),
            "worker {pid} still runs after join"
        );
    }
}

static INIT_CALLS: AtomicU32 = AtomicU32::new(0);
static INIT_ARG: AtomicU32 = AtomicU32::new(0);

fn init_worker(arg: u32) {
    INIT_CALLS.fetch_add(1, Ordering::SeqCst);
    INIT_ARG.store(arg, Ordering::SeqCst);
}

fn init_state(kill: bool) -> (u32, u32, u32) {
    if kill {
        // SAFETY: a plain signal to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    (
        proc::getpid().as_u32(),
        INIT_CALLS.load(Ordering::SeqCst),
        INIT_ARG.load(Ordering::SeqCst),
    )
}

fn initializer_runs_once_per_worker() {
    let pool = Pool::builder()
        .processes(2)
        .initializer(init_worker, 77)
        .expect("initializer")
        .build()
        .expect("pool");
    let mut pids = HashSet::new();
    for round in 0..3 {
        for (pid, calls, arg) in pool.map(init_state, vec![false; 20]).expect("map") {
            assert_eq!((calls, arg), (1, 77));
            pids.insert(pid);
        }
        if round < 2 {
            assert!(matches!(
                pool.apply(init_state, true),
                Err(TaskError::WorkerDied { .. })
            ));
        }
    }
    // Replacements ran it too.
    assert!(pids.len() >= 3, "{pids:?}");
}

fn failing_init(_: ()) {
    panic!("cannot initialize");
}

fn aborting_init(_: ()) {
    std::process::abort();
}

/// A pool of two whose workers run `init` first.
fn pool_initialized_by(init: fn(())) -> Pool {
    Pool::builder()
        .processes(2)
        .initializer(init, ())
        .expect("initializer")
        .build()
        .expect("pool")
}

fn initializer_failure_fails_tasks() {
    let pool = pool_initialized_by(failing_init);
    let t = Instant::now();
    match pool.apply(square, 2) {
        Err(TaskError::InitializerFailed(message)) => {
            assert!(message.contains("cannot initialize"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        pool.map(square, 0..10),
        Err(TaskError::InitializerFailed(_))
    ));
    assert!(t.elapsed() < Duration::from_secs(5));
    // An initializer that ends the process instead of panicking (abort, a
    // segfault, exit) reports nothing: workers dying before they are
    // ready, over and over, mean the same. (Without this the pool
    // replaced them for ever and every get waited.)
    let pool = pool_initialized_by(aborting_init);
    let t = Instant::now();
    match pool.apply(square, 2) {
        Err(TaskError::InitializerFailed(message)) => {
            assert!(message.contains("before it was ready"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Serializes only in the parent (fails in a worker), deserializes nowhere
/// if `fail_decode`.
#[derive(Debug)]
struct Picky {
    fail_decode: bool,
}

impl serde::Serialize for Picky {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if proc::parent_process().is_some() && !self.fail_decode {
            return Err(serde::ser::Error::custom("not serializable here"));
        }
        s.serialize_bool(self.fail_decode)
    }
}

impl<'de> serde::Deserialize<'de> for Picky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fail_decode = <bool as serde::Deserialize>::deserialize(d)?;
        if fail_decode {
            return Err(serde::de::Error::custom("refusing to decode"));
        }
        Ok(Picky { fail_decode })
    }
}

fn make_picky(_: ()) -> Picky {
    Picky { fail_decode: false }
}

fn take_picky(_: Picky) -> u32 {
    1
}

fn encode_and_decode_failures() {
    let pool = make_pool(1);
    let pid = pool.apply(worker_pid, ()).expect("pid");
    match pool.apply(make_picky, ()) {
        // (postcard keeps no custom message, only the kind)
        Err(TaskError::Encode(m)) => assert!(!m.is_empty()),
        other => panic!("{other:?}"),
    }
    match pool.apply(take_picky, Picky { fail_decode: true }) {
        Err(TaskError::ArgsDecode(m)) => assert!(!m.is_empty()),
        other => panic!("{other:?}"),
    }
    // Neither killed the worker.
    assert_eq!(pool.apply(worker_pid, ()), Ok(pid));
}

/// In a worker: panics when serialized holding 7, when dropped holding
/// 11, when deserialized holding 13.
#[derive(Debug, PartialEq)]
struct Touchy(u64);

impl Drop for Touchy {
    fn drop(&mut self) {
        if self.0 == 11 && proc::parent_process().is_some() {
            panic!("dropping eleven");
        }
    }
}

impl serde::Serialize for Touchy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == 7 && proc::parent_process().is_some() {
            panic!("serializing seven");
        }
        s.serialize_u64(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Touchy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = <u64 as serde::Deserialize>::deserialize(d)?;
        if v == 13 && proc::parent_process().is_some() {
            panic!("decoding thirteen");
        }
        Ok(Touchy(v))
    }
}

fn touchy(x: u64) -> Touchy {
    if x == 3 {
        panic!("no threes");
    }
    Touchy(x)
}

fn untouchy(x: Touchy) -> u64 {
    x.0
}

fn panics_in_serde_are_results() {
    let pool = make_pool(1);
    let pid = pool.apply(worker_pid, ()).expect("pid");
    // One chunk: the task's panic (3), its result's serialization's (7)
    // and its result's drop's (11) fail their own items; the others
    // around and between them stand.
    let results: Vec<_> = pool.imap_chunked(touchy, 0..30, 30).collect();
    assert_eq!(results.len(), 30);
    for (i, r) in results.into_iter().enumerate() {
        match (i, r) {
            (3, Err(TaskError::Panicked { message, .. })) => assert_eq!(message, "no threes"),
            (7, Err(TaskError::Panicked { message, .. })) => {
                assert_eq!(message, "serializing seven")
            }
            (11, Err(TaskError::Panicked { message, .. })) => {
                assert_eq!(message, "dropping eleven")
            }
            (i, Ok(v)) if ![3, 7, 11].contains(&i) => assert_eq!(v, Touchy(i as u64)),
            (i, other) => panic!("{i}: {other:?}"),
        }
    }
    // A panic at the chunk's first and last items.
    let results: Vec<_> = pool.imap_chunked(touchy, [3, 1, 7], 3).collect();
    assert!(
        matches!(&results[0], Err(TaskError::Panicked { message, .. }) if message == "no threes")
    );
    assert_eq!(results[1], Ok(Touchy(1)));
    assert!(
        matches!(&results[2], Err(TaskError::Panicked { message, .. }) if message == "serializing seven")
    );
    // An argument whose decoding panics: the rest of its chunk cannot be
    // found, so the chunk fails as one.
    match pool.map_chunked(untouchy, (0..30).map(Touchy), 30) {
        Err(TaskError::ArgsDecode(m)) => assert!(m.contains("decoding thirteen"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Neither killed the worker.
    assert_eq!(pool.apply(worker_pid, ()), Ok(pid));
    assert_eq!(
        pool.map(untouchy, (20..25).map(Touchy)),
        Ok(vec![20, 21, 22, 23, 24])
    );
}

fn close_join_semantics() {
    let pool = make_pool(2);
    assert!(matches!(pool.join(), Err(PoolError::StillRunning)));
    let pending: Vec<_> = (0..6)
        .map(|_| pool.apply_async(sleep_ms, 30).expect("submit"))
        .collect();
    pool.close();
    assert_eq!(
        pool.apply_async(square, 1).map(|_| ()),
        Err(TaskError::NotRunning)
    );
    let workers = pool.worker_pids();
    pool.join().expect("join");
    // Everything finished before join returned, and the workers are gone.
    for r in pending {
        assert!(r.ready());
        assert_eq!(r.get(), Ok(30));
    }
    for pid in workers {
        assert!(
            common::eventually(Duration::from_secs(2), || common::proc_state(pid.as_u32())
                .is_none()),
            "worker {pid:?} left"
        );
    }
}

fn terminate_and_drop_leave_nothing() {
    let me = std::process::id();
    let pool = make_pool(2);
    let long = pool.apply_async(sleep_ms, 20_000).expect("submit");
    let queued = pool.apply_async(sleep_ms, 20_000).expect("submit");
    std::thread::sleep(Duration::from_millis(50));
    let workers = pool.worker_pids();
    let t = Instant::now();
    pool.terminate();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(long.get(), Err(TaskError::Terminated));
    assert_eq!(queued.get(), Err(TaskError::Terminated));
    pool.join().expect("join after terminate");
    for pid in &workers {
        assert_eq!(common::proc_state(pid.as_u32()), None, "{pid:?}");
    }
    // Dropping a busy pool, many times: no process or zombie is left.
    for _ in 0..10 {
        let busy_pool = make_pool(2);
        let _busy = busy_pool.apply_async(sleep_ms, 10_000).expect("submit");
        let workers = busy_pool.worker_pids();
        drop(busy_pool);
        for pid in workers {
            assert!(common::eventually(Duration::from_secs(3), || {
                common::proc_state(pid.as_u32()).is_none()
            }));
        }
    }
    assert!(common::eventually(Duration::from_secs(3), || {
        common::children_of(me)
            .iter()
            .all(|&(_, state)| state != 'Z')
    }));
}

fn replacement_after_threads_started() {
    let pool = Pool::new(2).expect("pool");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    // This process has two threads now: the zygote still forks workers.
    for _ in 0..3 {
        assert!(matches!(
            pool.apply(die, Death::Kill),
            Err(TaskError::WorkerDied { .. })
        ));
        assert_eq!(pool.apply(square, 5), Ok(25));
    }
    assert_eq!(pool.worker_pids().len(), 2);
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("thread");
}

fn threaded_parent_needs_forkserver() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    match Pool::builder()
        .processes(1)
        .start_method(StartMethod::Fork)
        .build()
    {
        Err(PoolError::Spawn(SpawnError::Threaded { .. })) => {}
        other => panic!("{other:?}"),
    }
    let pool = Pool::builder()
        .processes(2)
        .start_method(StartMethod::ForkServer)
        .build()
        .expect("forkserver pool");
    assert_eq!(pool.map(square, 0..10u64).expect("map").len(), 10);
    assert!(matches!(
        pool.apply(die, Death::Kill),
        Err(TaskError::WorkerDied { .. })
    ));
    assert_eq!(pool.apply(square, 6), Ok(36));
    stop.store(true, Ordering::Relaxed);
    thread.join().expect("thread");
}

/// Runs this test binary in `mode`; returns the child and its pid file.
fn helper(mode: &str, tag: &str, own_group: bool) -> (std::process::Child, std::path::PathBuf) {
    use std::os::unix::process::CommandExt;
    let dir = common::temp_dir(tag);
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("exe"));
    cmd.env("PROC_TEST_MODE", mode)
        .env("PROC_TEST_DIR", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if own_group {
        cmd.process_group(0);
    }
    (cmd.spawn().expect("helper"), dir.join("pids"))
}

fn read_pids(file: &std::path::Path) -> Vec<u32> {
    assert!(
        common::eventually(Duration::from_secs(10), || file.exists()),
        "the helper wrote no pids"
    );
    std::fs::read_to_string(file)
        .expect("pids")
        .split_whitespace()
        .map(|p| p.parse().expect("pid"))
        .collect()
}

/// Writes the pool's worker pids to `dir/pids` (whole, by a rename).
fn write_worker_pids(pool: &Pool, dir: &std::path::Path) {
    let pids: Vec<String> = pool
        .worker_pids()
        .iter()
        .map(|p| p.as_u32().to_string())
        .collect();
    let tmp = dir.join("pids.tmp");
    std::fs::write(&tmp, pids.join(" ")).expect("write");
    std::fs::rename(tmp, dir.join("pids")).expect("rename");
}

fn helper_mode(mode: &str) {
    let dir = std::path::PathBuf::from(std::env::var_os("PROC_TEST_DIR").expect("dir"));
    if mode == "spawn-from-thread" {
        // A Spawn pool made on a thread that then ends, its workers idle.
        let pool = std::thread::spawn(|| {
            let pool = Pool::builder()
                .processes(2)
                .start_method(StartMethod::Spawn)
                .build()
                .expect("pool");
            assert_eq!(pool.map(square, 0..4u64).expect("map"), [0, 1, 4, 9]);
            pool
        })
        .join()
        .expect("thread");
        write_worker_pids(&pool, &dir);
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    if mode == "sigint" {
        // Ctrl-C's default action, whatever this process inherited: a test
        // run started in the background (a shell's `&`) has SIGINT ignored.
        // SAFETY: sets a disposition to the default, before any thread.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    }
    let pool = Pool::new(2).expect("pool");
    // Busy workers, a task queued behind them.
    let _busy: Vec<_> = (0..4)
        .map(|_| pool.apply_async(sleep_ms, 60_000).expect("submit"))
        .collect();
    write_worker_pids(&pool, &dir);
    match mode {
        "wait" | "sigint" => std::thread::sleep(Duration::from_secs(60)),
        other => panic!("unknown mode {other}"),
    }
}

/// Starts the helper in `mode`, SIGKILLs it once its two workers run, and
/// checks that they go too (adopted by this subreaper process, reaped).
fn workers_die_with_killed_helper(mode: &str, tag: &str) {
    let (mut child, file) = helper(mode, tag, false);
    let workers = read_pids(&file);
    assert_eq!(workers.len(), 2);
    child.kill().expect("kill");
    child.wait().expect("wait");
    for pid in workers {
        assert!(
            common::eventually(Duration::from_secs(10), || {
                common::reap_adopted(pid);
                common::proc_state(pid).is_none()
            }),
            "worker {pid} outlived its parent"
        );
    }
}

fn workers_die_with_sigkilled_parent() {
    workers_die_with_killed_helper("wait", "pool-parent-kill");
}

fn spawn_workers_started_on_a_thread_die_with_a_killed_parent() {
    // Started on a thread that has ended, Spawn workers have no death
    // signal (it would follow that thread); idle, they notice within a
    // second or so that they were adopted, and go.
    workers_die_with_killed_helper("spawn-from-thread", "pool-thread-kill");
}

/// A Fork pool of one whose worker died (a task killed it) while no
/// descriptor could be opened, so that its replacement failed to start
/// from the zygote (the next call starts one).
fn pool_of_one_whose_replacement_failed() -> Pool {
    let pool = Pool::builder()
        .processes(1)
        .start_method(StartMethod::Fork)
        .build()
        .expect("pool");
    assert_eq!(pool.apply(square, 2), Ok(4));
    let died = common::without_spare_descriptors(|| pool.apply(die, Death::Kill));
    assert!(
        matches!(died, Err(TaskError::WorkerDied { .. })),
        "{died:?}"
    );
    pool
}

/// A Fork pool of 2 whose third initializer (the first replacement's)
/// fails, breaking the pool; calls are counted in `dir`.
fn pool_failing_third_initializer(dir: &std::path::Path) -> Pool {
    let counter = dir.join("calls").to_string_lossy().into_owned();
    Pool::builder()
        .processes(2)
        .initializer(init_fails_third_time, counter)
        .expect("initializer")
        .start_method(StartMethod::Fork)
        .build()
        .expect("pool")
}

/// Counts its calls in the file `path` (across processes); the third
/// panics.
fn init_fails_third_time(path: String) {
    if common::count_call(&path) == 3 {
        panic!("third initializer");
    }
}

/// Counts its run in the file `path`; returns 64 KiB.
fn counted_64_kib((x, path): (u64, String)) -> Vec<u8> {
    common::count_call(&path);
    vec![x as u8; 64 << 10]
}

/// Counts its run of item `x` in the file `path`; returns 1.5 MiB (more
/// than half the result ring: streamed, yet it fits in the ring whole).
fn counted_1536_kib((x, path): (u64, String)) -> Vec<u8> {
    common::count_call(&format!("{path}.{x}"));
    vec![x as u8; 3 << 19]
}

/// Workers retired after each task while their large results wait in
/// the result ring (the caller pauses between items): a retired worker's
/// death seen while its result waits must not leave a mark on its slot
/// that settles the next process's death before its results are read.
/// Every item arrives, each task ran once.
fn maxtasksperchild_with_results_waiting_in_the_ring() {
    let dir = common::temp_dir("pool-retire-large");
    let path = dir.join("runs").to_string_lossy().into_owned();
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(1)
        .build()
        .expect("pool");
    let items: Vec<(u64, String)> = (0..40).map(|x| (x, path.clone())).collect();
    for (x, r) in pool.imap_chunked(counted_1536_kib, items, 1).enumerate() {
        let v = r.unwrap_or_else(|e| panic!("item {x}: {e:?}"));
        assert!(v.len() == 3 << 19 && v[0] == x as u8, "item {x}");
        std::thread::sleep(Duration::from_millis(25));
    }
    for x in 0..40 {
        let runs = std::fs::read_to_string(format!("{path}.{x}")).unwrap_or_default();
        assert_eq!(runs.len(), 1, "item {x} ran {} times", runs.len());
    }
    pool.close();
    pool.join().expect("join");
}

fn a_broken_pool_runs_nothing_more_and_joins() {
    // A replacement's initializer fails (the third call: after the first
    // two workers ran their two tasks each) while the other worker still
    // has thousands of tasks queued. They have failed with the pool: they
    // must not run, and their results must not fill the result ring so
    // that join waits for ever.
    let dir = common::temp_dir("pool-broken-join");
    let counter = dir.join("calls").to_string_lossy().into_owned();
    let runs = dir.join("runs").to_string_lossy().into_owned();
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(2)
        .initializer(init_fails_third_time, counter)
        .expect("initializer")
        .start_method(StartMethod::Fork)
        .build()
        .expect("pool");
    let results: Vec<_> = (0..5_000u64)
        .map(|i| {
            pool.apply_async(counted_64_kib, (i, runs.clone()))
                .expect("submit")
        })
        .collect();
    pool.close();
    let t = Instant::now();
    pool.join().expect("join");
    assert!(t.elapsed() < Duration::from_secs(20));
    let mut ok = 0;
    for r in results {
        match r.get() {
            Ok(v) => {
                assert_eq!(v.len(), 64 << 10);
                ok += 1;
            }
            Err(TaskError::InitializerFailed(m)) => assert!(m.contains("third"), "{m}"),
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(ok < 5_000);
    // Tasks that ran: those that succeeded, and at most the one each
    // worker was running when the pool broke.
    let ran = std::fs::metadata(&runs).map_or(0, |m| m.len());
    assert!(ran <= ok + 2, "{ran} tasks ran, {ok} succeeded");
    let _ = std::fs::remove_dir_all(dir);
}

fn a_failed_replacement_keeps_the_zygote() {
    // Both workers come from the zygote (maxtasksperchild 1 replaces the
    // first ones). One runs a long task; the other dies while no new
    // descriptor can be opened, so its replacement fails on this side.
    // The zygote still serves: it must be kept (dropping it ends it, and
    // with it the worker running the long task), and the empty slot gets
    // a worker again once descriptors are back.
    let pool = Pool::builder()
        .processes(2)
        .maxtasksperchild(1)
        .start_method(StartMethod::Fork)
        .build()
        .expect("pool");
    let firsts: Vec<_> = (0..2)
        .map(|i| pool.apply_async(square, i).expect("submit"))
        .collect();
    for r in firsts {
        r.get().expect("warm-up task");
    }
    let long = pool.apply_async(sleep_ms, 1_500).expect("submit");
    std::thread::sleep(Duration::from_millis(200));
    let died = common::without_spare_descriptors(|| pool.apply(die, Death::Kill));
    assert!(
        matches!(died, Err(TaskError::WorkerDied { .. })),
        "{died:?}"
    );
    assert_eq!(long.get().expect("the long task"), 1_500);
    // Both slots serve again.
    assert_eq!(
        pool.map(square, 0..8u64).expect("map"),
        (0..8u64).map(|x| x * x).collect::<Vec<_>>()
    );
    // A pool of one whose only replacement fails for a moment: it must
    // not give up for good (NoWorkers) but start a worker once it can.
    let single = pool_of_one_whose_replacement_failed();
    assert_eq!(single.apply(square, 3), Ok(9));
}

fn ctrl_c_stops_cleanly() {
    let (mut child, file) = helper("sigint", "pool-sigint", true);
    let workers = read_pids(&file);
    let pgid = child.id() as i32;
    // Ctrl-C: SIGINT to the whole foreground process group.
    // SAFETY: a plain signal to the helper's process group.
    unsafe { libc::kill(-pgid, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the helper hung on SIGINT");
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(stderr.trim().is_empty(), "a storm of errors: {stderr}");
    for pid in workers {
        assert!(
            common::eventually(Duration::from_secs(10), || {
                common::reap_adopted(pid);
                common::proc_state(pid).is_none()
            }),
            "worker {pid} outlived Ctrl-C"
        );
    }
}

fn checksum(bytes: Vec<u8>) -> (usize, u64, Vec<u8>) {
    let sum = bytes.iter().map(|&b| u64::from(b)).sum();
    let echo = bytes.iter().rev().copied().collect();
    (bytes.len(), sum, echo)
}

fn large_arguments_and_results() {
    let pool = make_pool(2);
    // Larger than half a task ring (streamed to an idle worker) and than
    // half the result ring (streamed back), and small ones around them.
    for size in [0usize, 1, 4096, 5 << 20] {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let sum: u64 = data.iter().map(|&b| u64::from(b)).sum();
        let small = pool.apply_async(square, 3).expect("submit");
        let (len, got, echo) = pool.apply(checksum, data.clone()).expect("large task");
        assert_eq!((len, got), (size, sum), "size {size}");
        assert!(echo.iter().eq(data.iter().rev()), "size {size}");
        assert_eq!(small.get(), Ok(9));
    }
}

fn sum_to(n: u64) -> u64 {
    (0..=n).sum()
}

fn shared_by_threads() {
    let pool = std::sync::Arc::new(make_pool(2));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                let pending: Vec<_> = (0..300u64)
                    .map(|i| pool.apply_async(sum_to, t * 1000 + i).expect("submit"))
                    .collect();
                for (i, r) in pending.into_iter().enumerate() {
                    let n = t * 1000 + i as u64;
                    assert_eq!(r.get(), Ok(n * (n + 1) / 2));
                }
                let mapped = pool.map(square, 0..1000u64).expect("map");
                assert_eq!(mapped[999], 999 * 999);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    pool.close();
    pool.join().expect("join");
}

/// Waits for `ready()` by polling only (no get, no wait).
fn poll_ready(ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready() {
        assert!(Instant::now() < deadline, "ready() never became true");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn polling_ready_makes_progress() {
    let pool = make_pool(1);
    // Short tasks get batched while the worker has work queued; a caller
    // that only polls ready() must still see every one of them finish.
    let pending: Vec<_> = (0..300u64)
        .map(|i| pool.apply_async(square, i).expect("submit"))
        .collect();
    let last = pending.last().expect("tasks");
    poll_ready(|| last.ready());
    assert!(pending.iter().all(|r| r.ready()));
    // A worker death is noticed by polling too.
    let fatal = pool.apply_async(die, Death::Kill).expect("submit");
    poll_ready(|| fatal.ready());
    assert_eq!(fatal.successful(), Some(false));
    assert!(matches!(fatal.get(), Err(TaskError::WorkerDied { .. })));
    // A MapResult taken by get_timeout: wait() returns at once.
    let mut mapped = pool.map_async(square, 0..10u64).expect("map");
    assert_eq!(
        mapped
            .get_timeout(Duration::from_secs(5))
            .expect("get")
            .len(),
        10
    );
    mapped.wait();
    assert!(mapped.wait_timeout(Duration::ZERO));
}

fn sleepy_init(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn slow_initializer_and_large_task() {
    // Timed from before the worker exists, so that the bound below holds
    // however long this process is descheduled on the way.
    let t = Instant::now();
    let pool = Pool::builder()
        .processes(1)
        .initializer(sleepy_init, 400)
        .expect("initializer")
        .build()
        .expect("pool");
    // Streamed to a worker still in its initializer: retried, not stuck.
    let data = vec![3u8; 5 << 20];
    let (len, sum, _) = pool.apply(checksum, data).expect("large task");
    assert_eq!((len, sum), (5 << 20, 3 * (5 << 20)));
    // The task ran after the initializer.
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    // terminate() is not held up by a worker in its initializer.
    let pool = Pool::builder()
        .processes(1)
        .initializer(sleepy_init, 5_000)
        .expect("initializer")
        .build()
        .expect("pool");
    let big = pool
        .apply_async(checksum, vec![1u8; 5 << 20])
        .expect("submit");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!big.ready());
    let t = Instant::now();
    pool.terminate();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(big.get(), Err(TaskError::Terminated));
}

fn a_killed_zygote_is_replaced() {
    let me = std::process::id();
    let pool = Pool::new(2).expect("pool");
    assert_eq!(pool.apply(square, 2), Ok(4));
    let first: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    for w in &first {
        assert_eq!(
            common::ppid_of(*w),
            Some(me),
            "the first workers are forked directly"
        );
    }
    // A replacement comes from the zygote.
    // SAFETY: a plain kill of one of this pool's workers.
    unsafe { libc::kill(first[0] as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(5), || {
        let _ = pool.apply(square, 3);
        !pool.worker_pids().iter().any(|p| p.as_u32() == first[0])
    }));
    let workers: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    let replacement = *workers
        .iter()
        .find(|w| !first.contains(w))
        .expect("a replacement");
    let zygote = common::ppid_of(replacement).expect("the replacement's parent");
    assert_ne!(zygote, me, "replacements come from a zygote");
    // SAFETY: a plain kill of this pool's zygote.
    unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
    // Its workers die with it; the pool starts a new zygote and new workers.
    assert!(common::eventually(Duration::from_secs(5), || {
        common::reap_adopted(replacement);
        common::proc_state(replacement).is_none_or(|s| s == 'Z')
    }));
    assert_eq!(
        pool.map(square, 0..100u64)
            .expect("map after the zygote died"),
        (0..100u64).map(|i| i * i).collect::<Vec<_>>()
    );
    let now: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&replacement));
    // Forked directly or by a zygote, the workers are this process's
    // active children.
    let active = proc::active_children();
    for w in &now {
        let child = active
            .iter()
            .find(|c| c.pid().as_u32() == *w)
            .unwrap_or_else(|| panic!("worker {w} not among {active:?}"));
        assert!(child.name().starts_with("ForkPoolWorker-"), "{child:?}");
        assert!(child.daemon());
    }
    for w in &now {
        let parent = common::ppid_of(*w).expect("a worker's parent");
        assert_ne!(parent, zygote);
        if !workers.contains(w) {
            assert_ne!(parent, me, "a replacement of the new zygote");
        }
    }
    pool.close();
    pool.join().expect("join");
}

/// Sleeps for 3 s while the file `path` exists.
fn init_slow_while(path: String) {
    if std::path::Path::new(&path).exists() {
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// Workers that die with their zygote while their initializer runs report
/// no status (the zygote reported it): that is a kill from outside, not an
/// initializer that ended its process, and must not break the pool.
fn a_killed_zygote_is_no_initializer_failure() {
    let marker = std::env::temp_dir().join(format!("proc-init-slow-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let pool = Pool::builder()
        .processes(3)
        .initializer(init_slow_while, marker.display().to_string())
        .expect("initializer")
        .start_method(StartMethod::Fork)
        .build()
        .expect("pool");
    assert_eq!(pool.map(square, 0..30u64).expect("map").len(), 30);
    let first: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    // From now on a worker's initializer takes 3 s: the replacements of
    // the killed first workers (from the zygote) are all in theirs.
    std::fs::write(&marker, b"").expect("marker");
    for w in &first {
        // SAFETY: a plain kill of one of this pool's workers.
        unsafe { libc::kill(*w as i32, libc::SIGKILL) };
    }
    let mut replacements = Vec::new();
    assert!(common::eventually(Duration::from_secs(5), || {
        let _ = pool.apply_async(square, 1);
        replacements = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
        replacements.len() == 3 && replacements.iter().all(|w| !first.contains(w))
    }));
    let zygote = common::ppid_of(replacements[0]).expect("a replacement's parent");
    assert_ne!(
        zygote,
        std::process::id(),
        "replacements come from the zygote"
    );
    // SAFETY: a plain kill of this pool's zygote; its workers die with it.
    unsafe { libc::kill(zygote as i32, libc::SIGKILL) };
    // New workers (a new zygote) start, take 3 s in their initializer (so
    // none reports ready while the three deaths are settled), and run the
    // tasks; the pool is not broken with InitializerFailed.
    let mapped = pool.map(square, 0..20u64);
    std::fs::remove_file(&marker).expect("remove marker");
    assert_eq!(mapped, Ok((0..20u64).map(|i| i * i).collect::<Vec<_>>()));
    pool.close();
    pool.join().expect("join");
}

/// In a worker: overwrites the head position of the pool's result queue
/// (a 2 MiB ring: a page of header, the ring, 32 KiB of life slots; the
/// consumers' position word at byte 512, as in proc-queue's corruption
/// test) with a position out of range. Task rings have the same size, so
/// every 2 MiB queue segment the worker can reach is hit: the result
/// ring, its own task ring, and, where the worker inherited them from
/// this test process (Fork), the other worker's task ring and rings
/// cached from earlier pools (reset when reused). What the test checks
/// stays the result ring's: the worker's put of this task's result fails
/// there and it exits without reading its task ring again; the other
/// worker runs `endless` and never reads its ring again either; the
/// pool's own reads of task rings (to drop what a broken pool's workers
/// did not take) give up on a corrupted one after 64 failed reads.
fn corrupt_result_queue(_: ()) -> u32 {
    let mut hit = 0;
    for entry in std::fs::read_dir("/proc/self/fd").expect("fds").flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if !target.to_string_lossy().starts_with("/memfd:proc-queue") {
            continue;
        }
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(entry.path())
        else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len != (2 << 20) + 4096 + 32 * 1024 {
            continue;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of the segment's first page,
        // written once and unmapped; the pool's own mappings see the change,
        // which is the point of the test.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::ptr::write_volatile(p.cast::<u8>().add(512).cast::<u64>(), 0x00AB_CDEF_0123_4567);
            libc::munmap(p, 4096);
        }
        hit += 1;
    }
    hit
}

/// A result queue whose bytes were changed under the pool gives its
/// waiters a typed error instead of a hang (or a spin), and `join` stops
/// the workers (one runs an endless task here) rather than wait for them.
fn a_corrupted_result_queue_breaks_the_pool() {
    let pool = make_pool(2);
    assert_eq!(pool.apply(square, 3), Ok(9));
    let stuck = pool.apply_async(endless, ()).expect("submit");
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    match pool.apply(corrupt_result_queue, ()) {
        Err(TaskError::Corrupted(m)) => assert!(m.contains("result queue"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(stuck.get(), Err(TaskError::Corrupted(_))));
    assert!(matches!(
        pool.apply(square, 2),
        Err(TaskError::Corrupted(_))
    ));
    pool.close();
    pool.join().expect("join");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

/// A task too large for one ring record streams to an idle worker under
/// the pool's lock; while the workers run their initializer nobody reads,
/// and the pool's calls must not wait out a streaming attempt each.
fn a_large_task_waits_for_initialized_workers_without_stalling() {
    let pool = Pool::builder()
        .processes(2)
        .initializer(sleepy_init, 1500)
        .expect("initializer")
        .start_method(method())
        .build()
        .expect("pool");
    let bytes = vec![7u8; 3 << 20];
    let big = pool.apply_async(checksum, bytes.clone()).expect("submit");
    // (Each call below dispatches; a streaming attempt on each of the two
    // initializing workers took 2 x 131 ms: five calls ~1 s.)
    let t = Instant::now();
    for _ in 0..5 {
        assert!(!big.ready());
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "five ready() took {:?}",
        t.elapsed()
    );
    let (len, sum, back) = big.get().expect("result");
    assert_eq!((len, sum), (bytes.len(), 7 * bytes.len() as u64));
    assert_eq!(back, bytes);
    pool.close();
    pool.join().expect("join");
}

/// Ignores SIGTERM, then runs for ever.
fn stubborn(_: ()) {
    // SAFETY: changes this worker process's SIGTERM disposition only.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    endless(());
}

/// `terminate` gives workers a grace period after SIGTERM; a `join` on
/// another thread meanwhile returns only once they are gone.
fn a_join_during_terminate_returns_once_workers_are_gone() {
    let pool = make_pool(1);
    let _stuck = pool.apply_async(stubborn, ()).expect("submit");
    std::thread::sleep(Duration::from_millis(300));
    let pids: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    assert_eq!(pids.len(), 1);
    std::thread::scope(|s| {
        let terminator = s.spawn(|| pool.terminate());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!terminator.is_finished(), "the worker ignores SIGTERM");
        assert!(pool.join().is_ok());
        let state = common::proc_state(pids[0]);
        assert!(
            state.is_none_or(|s| s == 'Z'),
            "worker still {state:?} after join"
        );
        terminator.join().expect("terminate");
    });
}

fn bytes_of(len: usize) -> Vec<u8> {
    vec![7; len]
}

/// A worker stopped (SIGSTOP) while it streams a large result back: a
/// thread polling `ready()` reads the stream without holding the pool's
/// lock, so `terminate()` on another thread still stops that worker.
fn a_result_streamed_by_a_stopped_worker_does_not_block_terminate() {
    let pool = make_pool(1);
    let pid = pool.apply(worker_pid, ()).expect("worker");
    // Sixteen times the result ring: the worker fills it and waits for room.
    let big = pool.apply_async(bytes_of, 32 << 20).expect("submit");
    std::thread::sleep(Duration::from_millis(500));
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid) == Some('S')
    }));
    // SAFETY: a signal to one of this pool's workers.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid) == Some('T')
    }));
    let small = pool.apply_async(square, 2).expect("submit");
    std::thread::scope(|s| {
        // It finds the stream at the head of the result queue and waits
        // for the rest.
        let poller = s.spawn(|| small.ready());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!poller.is_finished());
        let t = Instant::now();
        pool.terminate();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(poller.join().expect("poller"), "failed by terminate");
    });
    assert!(matches!(big.get(), Err(TaskError::Terminated)));
    assert!(matches!(small.get(), Err(TaskError::Terminated)));
}

fn bytes_after((ms, len): (u64, usize)) -> Vec<u8> {
    std::thread::sleep(Duration::from_millis(ms));
    vec![7; len]
}

/// A broken pool's worker streams a result nobody waits for; stopped
/// (SIGSTOP) midway, it keeps `join` (which reads such stray results
/// away) waiting in that read: `terminate()` from another thread must
/// still stop it and end the join.
fn terminate_ends_a_join_reading_a_stopped_workers_stream() {
    let dir = common::temp_dir("pool-stopped-stream-join");
    let pool = pool_failing_third_initializer(&dir);
    // 32 MiB after 400 ms: sixteen times the result ring.
    let big = pool
        .apply_async(bytes_after, (400, 32 << 20))
        .expect("submit");
    let idle = pool.apply(worker_pid, ()).expect("the idle worker");
    let streamer = pool
        .worker_pids()
        .into_iter()
        .map(|p| p.as_u32())
        .find(|&p| p != idle)
        .expect("the other worker");
    // The replacement of the idle one fails its initializer: broken.
    // SAFETY: a plain kill of one of this pool's workers.
    unsafe { libc::kill(idle as i32, libc::SIGKILL) };
    assert!(matches!(big.get(), Err(TaskError::InitializerFailed(_))));
    // Nobody reads its result: it fills the ring and waits for room.
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: a signal to one of this pool's workers.
    assert_eq!(unsafe { libc::kill(streamer as i32, libc::SIGSTOP) }, 0);
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(streamer) == Some('T')
    }));
    pool.close();
    std::thread::scope(|s| {
        let joiner = s.spawn(|| pool.join());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!joiner.is_finished(), "join waits for the stopped worker");
        let t = Instant::now();
        pool.terminate();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(joiner.join().expect("joiner").is_ok());
    });
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(streamer).is_none_or(|s| s == 'Z')
    }));
}

fn touch(path: String) {
    std::fs::write(path, b"").expect("touch");
}

/// A result larger than the result ring, and a caller that only submits
/// tasks after it: the submissions read it, so that its worker goes on to
/// the next tasks without anyone waiting on a result.
fn submitting_alone_reads_streamed_results() {
    let dir = common::temp_dir("pool-submit-reads");
    let marker = dir.join("ran").to_string_lossy().into_owned();
    let pool = make_pool(1);
    let big = pool.apply_async(bytes_of, 16 << 20).expect("submit");
    std::thread::sleep(Duration::from_millis(300));
    let mut pending = Vec::new();
    let ran = common::eventually(Duration::from_secs(10), || {
        pending.push(pool.apply_async(touch, marker.clone()).expect("submit"));
        std::thread::sleep(Duration::from_millis(20));
        std::path::Path::new(&marker).exists()
    });
    assert!(ran, "the worker stayed blocked on its streamed result");
    assert_eq!(big.get().map(|v| v.len()), Ok(16 << 20));
    for r in pending {
        assert_eq!(r.get(), Ok(()));
    }
}

/// The shared-memory rings this process has open.
fn rings_open() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:proc-queue"))
        })
        .count()
}

/// A pool that ended leaves its rings to the next pool of the process,
/// emptied: the tasks a terminated pool left queued in them never run in
/// the next pool (whose task ids start again at 0), nor reach it.
/// (In a child, whose pool cache starts empty: its parent's is not its.)
fn an_ended_pools_rings_serve_the_next_pool() {
    let (before, during, answers) = proc::spawn(|| {
        let first = make_pool(2);
        // Both workers busy, tasks queued in their rings behind them.
        let busy: Vec<_> = (0..2)
            .map(|_| first.apply_async(sleep_ms, 10_000).expect("submit"))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..50u64 {
            drop(first.apply_async(square, 1000 + i).expect("submit"));
        }
        first.terminate();
        drop(busy);
        drop(first);
        let before = rings_open();
        let next = make_pool(2);
        let during = rings_open();
        let answers = next.map(square, 0..1000u64).expect("map");
        let single = next.apply(square, 12).expect("apply");
        next.close();
        next.join().expect("join");
        drop(next);
        // And a pool after a joined one.
        let after_next = rings_open();
        let third = make_pool(2);
        assert_eq!(rings_open(), after_next, "a joined pool's rings serve too");
        let last = third.apply(square, 5).expect("apply");
        drop(third);
        // A pool whose replacement failed to start from its zygote (no
        // descriptor to spare): such a worker could exist without the
        // pool holding it, so its rings go to no other pool.
        let unsure = pool_of_one_whose_replacement_failed();
        assert_eq!(unsure.apply(square, 3), Ok(9));
        unsure.close();
        unsure.join().expect("join");
        let with_unsure = rings_open();
        drop(unsure);
        let kept = rings_open() == with_unsure;
        (
            before,
            during,
            answers.iter().sum::<u64>() + single + last + u64::from(kept),
        )
    })
    .expect("spawn")
    .join()
    .expect("join");
    assert_eq!(during, before, "the next pool made new rings");
    assert_eq!(answers, (0..1000u64).map(|x| x * x).sum::<u64>() + 144 + 25);
}

fn endless(_: ()) {
    loop {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A broken pool fails its tasks but leaves a worker that runs an endless
/// one alone: `join` (two of them at once here) waits for it, as Python's
/// does, until `terminate`, on another thread, stops the workers; then
/// all return.
fn terminate_ends_a_join_waiting_on_an_endless_task() {
    let dir = common::temp_dir("pool-endless-join");
    let pool = pool_failing_third_initializer(&dir);
    let stuck = pool.apply_async(endless, ()).expect("submit");
    std::thread::sleep(Duration::from_millis(200));
    // The other worker (the one free to answer) is killed; its
    // replacement's initializer is the third, fails, and breaks the pool.
    let idle = pool.apply(worker_pid, ()).expect("the idle worker");
    // SAFETY: a plain kill of one of this pool's workers.
    unsafe { libc::kill(idle as i32, libc::SIGKILL) };
    assert!(matches!(stuck.get(), Err(TaskError::InitializerFailed(_))));
    pool.close();
    std::thread::scope(|s| {
        // Two joins at once: neither returns while the workers live.
        let joiners = [s.spawn(|| pool.join()), s.spawn(|| pool.join())];
        std::thread::sleep(Duration::from_millis(300));
        for joiner in &joiners {
            assert!(!joiner.is_finished(), "join waits for the endless worker");
        }
        let t = Instant::now();
        pool.terminate();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        for joiner in joiners {
            assert!(joiner.join().expect("joiner").is_ok());
        }
    });
    // A join after that returns at once.
    assert!(pool.join().is_ok());
}

/// A process forked from the parent while a pool lives inherits a copy of
/// the pool's zygote socket: it must let go of it, or the zygote would live
/// on after its pool until that process ends.
fn zygote_ends_with_its_pool_not_with_other_children() {
    let me = std::process::id();
    // (The fork server of the earlier tests is a child too.)
    let before: Vec<u32> = common::children_of(me)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let pool = Pool::new(2).expect("pool");
    assert_eq!(pool.apply(square, 2), Ok(4));
    let workers: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
    let zygote: Vec<u32> = common::children_of(me)
        .into_iter()
        .filter(|(pid, state)| *state != 'Z' && !workers.contains(pid) && !before.contains(pid))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(
        zygote.len(),
        1,
        "one zygote besides the workers: {zygote:?}"
    );
    let zygote = zygote[0];
    let sleeper = proc::spawn(|| std::thread::sleep(Duration::from_secs(20))).expect("spawn");
    pool.close();
    pool.join().expect("join");
    drop(pool);
    let gone = common::eventually(Duration::from_secs(5), || {
        common::proc_state(zygote).is_none_or(|s| s == 'Z')
    });
    sleeper.kill().expect("kill");
    let _ = sleeper.join();
    assert!(gone, "the zygote outlived its pool");
}

/// A zygote that started several replacements keeps a spare child forked
/// ahead; joining the pool ends the zygote, and the spare with it.
fn a_zygotes_spare_goes_with_it() {
    let pool = Pool::builder()
        .processes(1)
        .maxtasksperchild(1)
        .build()
        .expect("pool");
    // One task per worker process: the later ones run in replacements,
    // which say who their parent is (they exit right after the task).
    let ran: Vec<(u32, u32)> = (0..5)
        .map(|_| pool.apply(worker_pid_and_parent, ()).expect("task"))
        .collect();
    let pids: Vec<u32> = ran.iter().map(|&(pid, _)| pid).collect();
    let zygote = ran.last().expect("a task").1;
    assert_ne!(
        zygote,
        std::process::id(),
        "replacements come from the zygote"
    );
    let mut spare = None;
    assert!(common::eventually(Duration::from_secs(5), || {
        // Neither a worker that ran a task nor the one waiting for the
        // next.
        let workers: Vec<u32> = pool.worker_pids().iter().map(|p| p.as_u32()).collect();
        spare = common::children_of(zygote)
            .into_iter()
            .find(|&(p, s)| s != 'Z' && !pids.contains(&p) && !workers.contains(&p))
            .map(|(p, _)| p);
        spare.is_some()
    }));
    let spare = spare.expect("the zygote's spare");
    pool.close();
    pool.join().expect("join");
    drop(pool);
    for pid in [zygote, spare] {
        assert!(
            common::eventually(Duration::from_secs(5), || {
                common::reap_adopted(pid);
                common::proc_state(pid).is_none_or(|s| s == 'Z')
            }),
            "process {pid} outlived its pool"
        );
    }
}
