//! `proc::spawn` / `Builder` / `JoinHandle`: typed results, panics, exit
//! codes, signals, decode errors, the single-thread check, stdin, identity.

mod common;

use std::time::{Duration, Instant};

use proc::{Builder, JoinError, SpawnError, Stdin};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

fn main() {
    if let Ok(mode) = std::env::var("PROC_TEST_MODE") {
        helper_mode(&mode);
        return;
    }
    common::run(&[
        ("returns_typed_value", 10, returns_typed_value),
        ("borrows_and_copies", 10, borrows_and_copies),
        (
            "panic_comes_back_with_message_and_location",
            10,
            panic_comes_back,
        ),
        ("exit_codes_and_messages", 10, exit_codes_and_messages),
        ("signals", 10, signals),
        (
            "signalling_a_child_reaped_elsewhere_is_harmless",
            10,
            signalling_a_child_reaped_elsewhere_is_harmless,
        ),
        ("decode_mismatch_is_typed", 10, decode_mismatch_is_typed),
        ("encode_failure_is_typed", 10, encode_failure_is_typed),
        ("large_result", 20, large_result),
        (
            "a_result_that_writes_itself_as_text",
            10,
            a_result_that_writes_itself_as_text,
        ),
        ("threaded_parent_is_refused", 10, threaded_parent_is_refused),
        (
            "stdin_is_dev_null_by_default",
            10,
            stdin_is_dev_null_by_default,
        ),
        ("identity_and_names", 10, identity_and_names),
        (
            "a_timed_wait_without_a_descriptor_to_spare",
            10,
            a_timed_wait_without_a_descriptor_to_spare,
        ),
        (
            "active_children_and_cpu_count",
            10,
            active_children_and_cpu_count,
        ),
        ("waits_with_timeouts", 10, waits_with_timeouts),
        (
            "wait_ended_timeout_outlasts_signals",
            10,
            wait_ended_timeout_outlasts_signals,
        ),
        (
            "a_handle_inherited_by_a_child_leaves_its_children_alone",
            10,
            inherited_handle_leaves_childs_table_alone,
        ),
        (
            "stdout_flushed_and_no_parent_exit_handlers",
            20,
            stdout_and_exit_handlers,
        ),
    ]);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Report {
    name: String,
    values: Vec<u64>,
    ratio: Option<f64>,
}

fn returns_typed_value() {
    let child = proc::spawn(|| Report {
        name: "sum".into(),
        values: (1..=5).collect(),
        ratio: Some(0.5),
    })
    .expect("spawn");
    let pid = child.pid();
    assert!(pid.as_u32() != std::process::id());
    let report = child.join().expect("join");
    assert_eq!(
        report,
        Report {
            name: "sum".into(),
            values: vec![1, 2, 3, 4, 5],
            ratio: Some(0.5)
        }
    );
    let unit = proc::spawn(|| ()).expect("spawn");
    unit.join().expect("unit result");
}

fn borrows_and_copies() {
    let mut data = vec![1u32, 2, 3];
    // The child works on its own copy of `data`: its push stays there.
    let child = proc::spawn(|| {
        data.push(4);
        data.len()
    })
    .expect("spawn");
    assert_eq!(child.join().expect("join"), 4);
    assert_eq!(data, vec![1, 2, 3]);
}

fn panic_comes_back() {
    let child = proc::spawn(|| -> u8 { panic!("boom {}", 7) }).expect("spawn");
    match child.join() {
        Err(JoinError::Panicked { message, location }) => {
            assert_eq!(message, "boom 7");
            let location = location.expect("location");
            assert!(location.starts_with("tests/spawn_join.rs:"), "{location}");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    // A non-string payload still comes back as a panic.
    let child = proc::spawn(|| -> u8 { std::panic::panic_any(42u32) }).expect("spawn");
    assert!(matches!(child.join(), Err(JoinError::Panicked { .. })));
}

fn exit_codes_and_messages() {
    let child = proc::spawn(|| -> u8 { proc::exit("fatal: bad input") }).expect("spawn");
    assert!(matches!(child.join(), Err(JoinError::Exited { code: 1 })));
    let child = proc::spawn(|| -> u8 { proc::exit(7) }).expect("spawn");
    assert!(matches!(child.join(), Err(JoinError::Exited { code: 7 })));
    let child = proc::spawn(|| -> u8 { proc::exit(()) }).expect("spawn");
    let err = child.join().unwrap_err();
    assert!(matches!(err, JoinError::Exited { code: 0 }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "child process exited with status 0 before returning a value"
    );
    let child = proc::spawn(|| -> u8 { std::process::exit(3) }).expect("spawn");
    assert!(matches!(child.join(), Err(JoinError::Exited { code: 3 })));
}

fn signals() {
    let child = proc::spawn(|| -> u8 {
        // SAFETY: raise only sends a signal to this (child) process.
        unsafe { libc::raise(libc::SIGKILL) };
        0
    })
    .expect("spawn");
    assert!(matches!(
        child.join(),
        Err(JoinError::Signaled { signal: 9, .. })
    ));

    let mut child = proc::spawn(|| std::thread::sleep(Duration::from_secs(30))).expect("spawn");
    assert!(!child.is_finished());
    child.kill().expect("kill");
    let status = child.wait().expect("wait");
    assert!(!status.success());
    let err = child.join().unwrap_err();
    assert!(
        matches!(
            err,
            JoinError::Signaled {
                signal: 9,
                core_dumped: false
            }
        ),
        "{err:?}"
    );

    let child = proc::spawn(|| std::thread::sleep(Duration::from_secs(30))).expect("spawn");
    child.terminate().expect("terminate");
    assert!(matches!(
        child.join(),
        Err(JoinError::Signaled { signal: 15, .. })
    ));
}

/// A type that serializes fine but never deserializes, as when two
/// processes disagree on a type.
#[derive(Debug)]
struct Picky;

impl Serialize for Picky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(1)
    }
}

impl<'de> Deserialize<'de> for Picky {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u8::deserialize(d)?;
        Err(serde::de::Error::custom(format!("unexpected {v}")))
    }
}

/// A type whose serialization fails in the child.
#[derive(Debug)]
struct Unsendable;

impl Serialize for Unsendable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("cannot leave this process"))
    }
}

impl<'de> Deserialize<'de> for Unsendable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Ok(Unsendable)
    }
}

fn decode_mismatch_is_typed() {
    let child = proc::spawn(|| Picky).expect("spawn");
    let err = child.join().unwrap_err();
    assert!(matches!(err, JoinError::Decode(_)), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
}

fn encode_failure_is_typed() {
    let child = proc::spawn(|| Unsendable).expect("spawn");
    match child.join() {
        // postcard reports serde's custom errors without their text.
        Err(JoinError::Encode(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected an encode error, got {other:?}"),
    }
}

/// Serialized with `collect_str` (as its `Display` would be): postcard
/// reports such a value overflowing a fixed output as `CollectStrError`,
/// not `SerializeBufferFull`.
#[derive(Debug, PartialEq)]
struct Shown(String);

impl Serialize for Shown {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Shown {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Shown)
    }
}

fn a_result_that_writes_itself_as_text() {
    // Under and over the child's stack buffer for its result.
    for n in [10, 300, 70_000] {
        let child = proc::spawn(move || Shown("z".repeat(n))).expect("spawn");
        assert_eq!(child.join().expect("join"), Shown("z".repeat(n)));
    }
}

fn large_result() {
    let child = proc::spawn(|| (0..1_000_000u32).collect::<Vec<u32>>()).expect("spawn");
    let v = child.join().expect("join");
    assert_eq!(v.len(), 1_000_000);
    assert!(v.iter().enumerate().all(|(i, &x)| i as u32 == x));
}

fn threaded_parent_is_refused() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let _ = rx.recv();
    });
    match proc::spawn(|| 1u8) {
        Err(SpawnError::Threaded { threads }) => assert!(threads >= 2),
        other => panic!("expected SpawnError::Threaded, got {other:?}"),
    }
    let msg = proc::spawn(|| 1u8).unwrap_err().to_string();
    assert!(msg.contains("spawn_unchecked"), "{msg}");
    // The way out: the exec start methods, named.
    assert!(
        msg.contains("StartMethod::Spawn") && msg.contains("StartMethod::ForkServer"),
        "{msg}"
    );
    // The other thread holds no lock the child needs: the unchecked spawn is
    // sound here.
    // SAFETY: the only other thread is blocked in `recv` on a channel the
    // child never touches.
    let child = unsafe { Builder::new().spawn_unchecked(|| 5u8) }.expect("spawn_unchecked");
    assert_eq!(child.join().expect("join"), 5);
    drop(tx);
    thread.join().expect("thread");
    // Single-threaded again: the safe path works.
    assert_eq!(proc::spawn(|| 6u8).expect("spawn").join().expect("join"), 6);
}

fn stdin_target() -> Option<String> {
    std::fs::read_link("/proc/self/fd/0")
        .ok()
        .map(|p| p.display().to_string())
}

fn stdin_is_dev_null_by_default() {
    let child = proc::spawn(|| {
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut std::io::stdin(), &mut buf).unwrap_or(usize::MAX);
        (stdin_target(), n)
    })
    .expect("spawn");
    assert_eq!(
        child.join().expect("join"),
        (Some("/dev/null".to_owned()), 0)
    );
    let child = Builder::new()
        .stdin(Stdin::Inherit)
        .spawn(stdin_target)
        .expect("spawn");
    assert_eq!(child.join().expect("join"), stdin_target());
}

fn identity_and_names() {
    let me = proc::current_process();
    assert_eq!(me.name(), "MainProcess");
    assert_eq!(me.pid(), proc::getpid());
    assert!(proc::parent_process().is_none());
    let parent_pid = proc::getpid();
    let child = proc::spawn(move || {
        let me = proc::current_process();
        let parent = proc::parent_process().expect("a parent");
        let grandchild = proc::spawn(|| proc::current_process().name().to_owned())
            .expect("nested spawn")
            .join()
            .expect("nested join");
        (
            me.name().to_owned(),
            parent.name().to_owned(),
            parent.pid(),
            proc::getppid(),
            grandchild,
        )
    })
    .expect("spawn");
    let (name, parent_name, parent, ppid, grandchild) = child.join().expect("join");
    assert!(name.starts_with("Process-"), "{name}");
    assert_eq!(parent_name, "MainProcess");
    assert_eq!(parent, parent_pid);
    assert_eq!(ppid, parent_pid);
    assert_eq!(grandchild, format!("{name}:1"));
    let named = Builder::new().name("worker").daemon(true).spawn(|| {
        let me = proc::current_process();
        (me.name().to_owned(), me.daemon())
    });
    assert_eq!(
        named.expect("spawn").join().expect("join"),
        ("worker".to_owned(), true)
    );
}

fn active_children_and_cpu_count() {
    assert!(proc::cpu_count() >= 1);
    let child = Builder::new()
        .name("sleeper")
        .spawn(|| std::thread::sleep(Duration::from_millis(300)))
        .expect("spawn");
    let active = proc::active_children();
    let entry = active
        .iter()
        .find(|c| c.pid() == child.pid())
        .expect("listed");
    assert_eq!(entry.name(), "sleeper");
    child.join().expect("join");
    assert!(proc::active_children()
        .iter()
        .all(|c| c.name() != "sleeper"));
}

fn waits_with_timeouts() {
    let mut child = proc::spawn(|| {
        std::thread::sleep(Duration::from_millis(400));
        9u8
    })
    .expect("spawn");
    assert!(child.try_wait().expect("try_wait").is_none());
    let t = Instant::now();
    assert!(child
        .wait_timeout(Duration::from_millis(100))
        .expect("wait")
        .is_none());
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "woke early: {:?}",
        t.elapsed()
    );
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .expect("wait")
        .expect("ended");
    assert!(status.success());
    assert!(child.is_finished());
    assert_eq!(child.exit_status(), Some(status));
    assert_eq!(child.join().expect("join"), 9);
}

fn stdout_and_exit_handlers() {
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .env("PROC_TEST_MODE", "stdout")
        .output()
        .expect("run helper");
    assert!(out.status.success(), "{out:?}");
    // The parent's unflushed "before " is printed once, not again by the
    // child; the child's unterminated line is flushed when it ends; the
    // parent's exit handler runs once, in the parent only.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "before child after\nexit handler\n"
    );
}

extern "C" fn exit_handler() {
    println!("exit handler");
}

fn helper_mode(mode: &str) {
    match mode {
        "stdout" => {
            // SAFETY: registers a plain function to run at exit.
            unsafe { libc::atexit(exit_handler) };
            print!("before ");
            let child = proc::spawn(|| print!("child")).expect("spawn");
            child.join().expect("join");
            println!(" after");
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Other code of the program reaped the child (`waitpid` on its pid): its
/// pid may belong to an unrelated process by now, so `terminate` and
/// `kill` send nothing (and say so by succeeding, as Python's do), and
/// `join` reports the status as lost.
fn signalling_a_child_reaped_elsewhere_is_harmless() {
    let child = proc::spawn(|| 7u8).expect("spawn");
    let pid = child.pid().as_u32() as i32;
    let mut status = 0;
    // SAFETY: waiting for our own child, with a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    child
        .terminate()
        .expect("terminate after someone else reaped it");
    child.kill().expect("kill after someone else reaped it");
    assert!(matches!(child.join(), Err(JoinError::StatusLost)));
}

fn inherited_handle_leaves_childs_table_alone() {
    // A handle of this process's child, moved into a forked child (Python
    // would pickle-refuse it; here it is just copied memory): dropping or
    // waiting on it there must not touch the child's own children, which
    // sit in the same slots of its table.
    for wait_on_it in [false, true] {
        let mut sibling =
            proc::spawn(|| std::thread::sleep(Duration::from_millis(300))).expect("spawn");
        let child = proc::spawn(move || {
            let own = proc::spawn(|| 7u32).expect("spawn");
            std::thread::sleep(Duration::from_millis(50));
            if wait_on_it {
                // Not this process's child: no status to be had.
                assert!(sibling.wait().is_err());
            }
            drop(sibling);
            own.join().ok()
        })
        .expect("spawn");
        assert_eq!(child.join().expect("join"), Some(7));
    }
}

fn wait_ended_timeout_outlasts_signals() {
    // A dropped handle makes proc reap that child from a SIGCHLD handler;
    // the child's exit then interrupts the wait below, which must go on.
    drop(proc::spawn(|| std::thread::sleep(Duration::from_millis(100))).expect("spawn"));
    // Timed from before the child exists: the bound holds however long
    // this process is descheduled on the way.
    let t = Instant::now();
    let child = proc::spawn(|| std::thread::sleep(Duration::from_millis(600))).expect("spawn");
    let ended = child
        .wait_ended_timeout(Duration::from_secs(5))
        .expect("wait");
    assert!(ended, "gave up after {:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    child.join().expect("join");
}

/// A timed wait needs a pidfd to sleep on; without a descriptor to spare
/// it polls instead (before: `Err(Io(EMFILE))` for a child still running,
/// which breaks a `while wait_timeout(..)?.is_none()` loop).
fn a_timed_wait_without_a_descriptor_to_spare() {
    let mut child = proc::spawn(|| {
        std::thread::sleep(Duration::from_millis(1000));
        4u8
    })
    .expect("spawn");
    let waited = common::without_spare_descriptors(|| {
        let t = Instant::now();
        let first = child.wait_timeout(Duration::from_millis(50));
        (first, t.elapsed())
    });
    assert!(matches!(waited.0, Ok(None)), "{:?}", waited.0);
    assert!(waited.1 >= Duration::from_millis(50), "{:?}", waited.1);
    let ended = common::without_spare_descriptors(|| child.wait_timeout(Duration::from_secs(5)));
    assert!(matches!(ended, Ok(Some(s)) if s.success()), "{ended:?}");
    assert_eq!(child.join().expect("join"), 4);
}
