//! The `Spawn` start method: entries run in a fresh exec of this test
//! binary, whose `main` starts with `proc::init()`; results, panics, exit
//! codes and signals come back as with fork, and a threaded parent is fine.

mod common;

use std::time::Duration;

use proc::{Builder, JoinError, JoinableQueue, PutError, Queue, QueueError, StartMethod};
use serde::{Deserialize, Serialize};

fn main() {
    proc::init();
    common::run(&[
        ("value_comes_back", 20, value_comes_back),
        ("panic_comes_back", 20, panic_comes_back),
        ("exit_code_comes_back", 20, exit_code_comes_back),
        ("sigkill_comes_back", 20, sigkill_comes_back),
        ("threaded_parent", 20, threaded_parent),
        ("child_is_a_fresh_process", 20, child_is_a_fresh_process),
        (
            "fork_method_runs_entries_too",
            20,
            fork_method_runs_entries_too,
        ),
        ("queues_cross_a_spawn", 30, queues_cross_a_spawn),
    ]);
}

fn spawn() -> Builder {
    Builder::new().start_method(StartMethod::Spawn)
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Stats {
    count: usize,
    sum: u64,
    label: String,
}

fn stats((label, values): (String, Vec<u64>)) -> Stats {
    Stats {
        count: values.len(),
        sum: values.iter().sum(),
        label,
    }
}

fn value_comes_back() {
    let child = spawn()
        .spawn_entry(stats, ("xs".to_owned(), vec![1, 2, 3]))
        .expect("spawn");
    assert_eq!(
        child.join().expect("join"),
        Stats {
            count: 3,
            sum: 6,
            label: "xs".into()
        }
    );
    // A non-capturing closure is an entry too.
    let child = spawn().spawn_entry(|x: u32| x * 2, 21).expect("spawn");
    assert_eq!(child.join().expect("join"), 42);
}

fn boom(n: u32) -> u32 {
    panic!("entry failed on {n}")
}

fn panic_comes_back() {
    let child = spawn().spawn_entry(boom, 7).expect("spawn");
    match child.join() {
        Err(JoinError::Panicked { message, location }) => {
            assert_eq!(message, "entry failed on 7");
            assert!(location
                .expect("location")
                .starts_with("tests/start_spawn.rs:"));
        }
        other => panic!("expected a panic, got {other:?}"),
    }
}

fn leave(code: i32) -> u8 {
    proc::exit(code)
}

fn exit_code_comes_back() {
    let child = spawn().spawn_entry(leave, 9).expect("spawn");
    assert!(matches!(child.join(), Err(JoinError::Exited { code: 9 })));
}

fn nap(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn sigkill_comes_back() {
    let mut child = spawn().spawn_entry(nap, 30_000).expect("spawn");
    assert_eq!(
        child.wait_timeout(Duration::from_millis(50)).expect("wait"),
        None
    );
    child.kill().expect("kill");
    assert!(matches!(
        child.join(),
        Err(JoinError::Signaled { signal: 9, .. })
    ));
}

fn threaded_parent() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    // Fork refuses here; Spawn does not need to.
    assert!(matches!(
        proc::spawn(|| 1u8),
        Err(proc::SpawnError::Threaded { .. })
    ));
    let child = spawn()
        .spawn_entry(|x: u8| x + 1, 1)
        .expect("spawn from a threaded parent");
    assert_eq!(child.join().expect("join"), 2);
    drop(tx);
    thread.join().expect("thread");
}

fn who(_: ()) -> (String, bool, u32, u32, Option<String>) {
    let me = proc::current_process();
    let stdin = std::fs::read_link("/proc/self/fd/0")
        .ok()
        .map(|p| p.display().to_string());
    (
        me.name().to_owned(),
        me.daemon(),
        proc::getppid().as_u32(),
        proc::getpid().as_u32(),
        stdin,
    )
}

fn child_is_a_fresh_process() {
    let child = spawn()
        .name("fresh")
        .daemon(true)
        .spawn_entry(who, ())
        .expect("spawn");
    let pid = child.pid().as_u32();
    let (name, daemon, ppid, own, stdin) = child.join().expect("join");
    assert_eq!(
        (name.as_str(), daemon, ppid, own),
        ("fresh", true, std::process::id(), pid)
    );
    assert_eq!(stdin.as_deref(), Some("/dev/null"));
}

fn fork_method_runs_entries_too() {
    let child = Builder::new()
        .spawn_entry(stats, ("f".to_owned(), vec![5]))
        .expect("spawn");
    assert_eq!(child.join().expect("join").sum, 5);
}

fn produce((q, n): (Queue<u64>, u64)) -> u64 {
    for i in 0..n {
        q.put(i).expect("put");
    }
    n
}

fn consume(q: JoinableQueue<u64>) -> u64 {
    let mut sum = 0;
    while let Ok(v) = q.get() {
        sum += v;
        q.task_done().expect("task_done");
    }
    sum
}

fn queues_cross_a_spawn() {
    // A producer entry in a spawned child puts into the parent's queue...
    let q: Queue<u64> = Queue::with_maxsize(16).expect("queue");
    let producer = spawn()
        .spawn_entry(produce, (q.clone(), 10_000))
        .expect("spawn");
    let sum: u64 = (0..10_000).map(|_| q.get().expect("get")).sum();
    assert_eq!(producer.join().expect("join"), 10_000);
    assert_eq!(sum, 10_000 * 9_999 / 2);
    // ... and a consumer entry takes from it, reporting task_done.
    let jobs: JoinableQueue<u64> = JoinableQueue::new().expect("queue");
    let consumer = spawn().spawn_entry(consume, jobs.clone()).expect("spawn");
    for i in 1..=100 {
        jobs.put(i).expect("put");
    }
    jobs.join();
    jobs.close();
    assert_eq!(consumer.join().expect("join"), 5050);
    // A queue cannot be sent through a queue (its descriptor would not follow).
    let outer: Queue<Queue<u8>> = Queue::new().expect("queue");
    let inner: Queue<u8> = Queue::new().expect("queue");
    assert!(matches!(
        outer.put(inner),
        Err(PutError::Failed(_, QueueError::Encode(_)))
    ));
}
