//! The Python-style `Process` object: attributes, the life cycle, and every
//! misuse error (start twice, daemon after start, join before start).

mod common;

use std::time::{Duration, Instant};

use proc::{Process, ProcessError, SpawnError};

fn main() {
    common::run(&[
        ("attributes_before_start", 10, attributes_before_start),
        ("five_steps_with_attributes", 10, five_steps_with_attributes),
        ("start_twice_is_an_error", 10, start_twice_is_an_error),
        (
            "attributes_after_start_are_errors",
            10,
            attributes_after_start_are_errors,
        ),
        (
            "calls_before_start_are_errors",
            10,
            calls_before_start_are_errors,
        ),
        ("exitcodes", 10, exitcodes),
        ("join_timeout_terminate", 10, join_timeout_terminate),
        ("failed_start_keeps_target", 10, failed_start_keeps_target),
        ("default_names_count_up", 10, default_names_count_up),
        (
            "only_the_maker_starts_or_joins",
            10,
            only_the_maker_starts_or_joins,
        ),
    ]);
}

fn attributes_before_start() {
    let p = Process::new(|| ());
    assert!(p.name().starts_with("Process-"), "{}", p.name());
    assert_eq!(p.pid(), None);
    assert_eq!(p.exitcode(), None);
    assert!(!p.is_alive());
    assert!(!p.daemon());
}

fn five_steps_with_attributes() {
    let expected = String::from("greeter");
    let mut p = Process::new(move || {
        let me = proc::current_process();
        // Report what the child saw through its exit code.
        let ok = me.name() == expected
            && me.daemon()
            && proc::getppid() == proc::parent_process().unwrap().pid();
        proc::exit(if ok { 0 } else { 3 })
    });
    p.set_name("greeter").expect("name");
    p.set_daemon(true).expect("daemon");
    assert_eq!(p.name(), "greeter");
    assert!(p.daemon());
    p.start().expect("start");
    let pid = p.pid().expect("pid after start");
    assert_ne!(pid, proc::getpid());
    let status = p.join().expect("join");
    assert!(status.success());
    assert_eq!(p.exitcode(), Some(0));
    assert!(!p.is_alive());
    // join again: the same answer at once.
    assert_eq!(p.join().expect("join again"), status);
    assert_eq!(p.pid(), Some(pid));
}

fn start_twice_is_an_error() {
    let mut p = Process::new(|| ());
    p.start().expect("start");
    assert!(matches!(p.start(), Err(ProcessError::AlreadyStarted)));
    p.join().expect("join");
    assert!(matches!(p.start(), Err(ProcessError::AlreadyStarted)));
}

fn attributes_after_start_are_errors() {
    let mut p = Process::new(|| ());
    p.start().expect("start");
    let err = p.set_daemon(true).unwrap_err();
    assert!(
        matches!(err, ProcessError::SetAfterStart("daemon")),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "`daemon` must be set before start()");
    assert!(!p.daemon(), "a refused set must not change the attribute");
    assert!(matches!(
        p.set_name("late"),
        Err(ProcessError::SetAfterStart("name"))
    ));
    p.join().expect("join");
}

fn calls_before_start_are_errors() {
    let mut p = Process::new(|| ());
    assert!(matches!(p.join(), Err(ProcessError::NotStarted)));
    assert!(matches!(
        p.join_timeout(Duration::from_millis(1)),
        Err(ProcessError::NotStarted)
    ));
    assert!(matches!(p.terminate(), Err(ProcessError::NotStarted)));
    assert!(matches!(p.kill(), Err(ProcessError::NotStarted)));
}

fn run_to_end(target: impl FnOnce() + Send + 'static) -> Option<i32> {
    let mut p = Process::new(target);
    p.start().expect("start");
    p.join().expect("join");
    p.exitcode()
}

fn exitcodes() {
    assert_eq!(run_to_end(|| ()), Some(0));
    assert_eq!(run_to_end(|| panic!("target failed")), Some(1));
    assert_eq!(run_to_end(|| proc::exit("goodbye")), Some(1));
    assert_eq!(run_to_end(|| proc::exit(5)), Some(5));
    let mut p = Process::new(|| std::thread::sleep(Duration::from_secs(30)));
    p.start().expect("start");
    assert!(p.is_alive());
    assert_eq!(p.exitcode(), None);
    p.kill().expect("kill");
    p.join().expect("join");
    assert_eq!(p.exitcode(), Some(-9));
    // Signalling an ended process does nothing.
    p.kill().expect("kill after end");
    p.terminate().expect("terminate after end");
}

fn join_timeout_terminate() {
    let mut p = Process::new(|| std::thread::sleep(Duration::from_secs(30)));
    p.start().expect("start");
    let t = Instant::now();
    assert_eq!(
        p.join_timeout(Duration::from_millis(150))
            .expect("join_timeout"),
        None
    );
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "woke early: {:?}",
        t.elapsed()
    );
    assert!(p.is_alive());
    p.terminate().expect("terminate");
    let status = p
        .join_timeout(Duration::from_secs(5))
        .expect("join_timeout");
    assert!(status.is_some());
    assert_eq!(p.exitcode(), Some(-15));
    assert!(!p.is_alive());
}

fn failed_start_keeps_target() {
    let mut p = Process::new(|| proc::exit(4));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    let err = p.start().unwrap_err();
    assert!(
        matches!(err, ProcessError::Spawn(SpawnError::Threaded { .. })),
        "{err:?}"
    );
    assert_eq!(p.pid(), None);
    drop(tx);
    thread.join().expect("thread");
    p.start().expect("start after the thread ended");
    p.join().expect("join");
    assert_eq!(p.exitcode(), Some(4), "the original target ran");
}

fn default_names_count_up() {
    let a = Process::new(|| ());
    let b = Process::default();
    let n = |p: &Process| {
        p.name()
            .trim_start_matches("Process-")
            .parse::<u32>()
            .expect("number")
    };
    assert_eq!(n(&b), n(&a) + 1);
}

fn only_the_maker_starts_or_joins() {
    // A forked child holds copies of its parent's Process objects; like
    // Python (which asserts), it may not start, join or signal them.
    let mut unstarted = Process::new(|| ());
    let mut started = Process::new(|| std::thread::sleep(Duration::from_millis(300)));
    started.start().expect("start");
    let seen = proc::spawn(|| {
        format!(
            "{:?} {:?} {:?}",
            unstarted.start().err(),
            started.join().err(),
            started.terminate().err()
        )
    })
    .expect("spawn")
    .join()
    .expect("join");
    assert_eq!(seen, "Some(NotOwner) Some(NotOwner) Some(NotOwner)");
    // Here they work as ever.
    assert!(started.join().expect("join").success());
    unstarted.start().expect("start");
    assert!(unstarted.join().expect("join").success());
}
