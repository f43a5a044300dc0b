//! The process class: a struct with its own fields implements `run` and
//! gets Python's `start` / `join` and base attributes.

mod common;

use std::time::Duration;

use proc::{Process, ProcessClass, ProcessError};

fn main() {
    common::run(&[
        ("seed_steps", 10, seed_steps),
        ("run_sees_its_own_process", 10, run_sees_its_own_process),
        ("errors_and_signals", 10, errors_and_signals),
        (
            "a_class_names_its_processes",
            10,
            a_class_names_its_processes,
        ),
    ]);
}

/// Python names an instance of `class Summer(Process)` `Summer-N`, numbered
/// with the other processes this one made; a child's are `…-N:M`.
fn a_class_names_its_processes() {
    struct Generic<T>(#[allow(dead_code)] T);
    let plain = Process::default();
    let n: u32 = plain
        .name()
        .strip_prefix("Process-")
        .and_then(|n| n.parse().ok())
        .expect("Process-N");
    let mut summer = Summer {
        base: Process::for_class::<Summer>(),
        numbers: vec![1, 2],
        expected: 3,
    };
    assert_eq!(summer.name(), format!("Summer-{}", n + 1));
    assert_eq!(
        Process::for_class::<Generic<u8>>().name(),
        format!("Generic-{}", n + 2)
    );
    summer.start().expect("start");
    summer.join().expect("join");
    assert_eq!(summer.exitcode(), Some(3));
    // In a child, its first class instance is numbered under the child.
    let child = proc::spawn(|| Process::for_class::<Summer>().name().to_owned()).expect("spawn");
    let inner = child.join().expect("join");
    assert!(
        inner.starts_with("Summer-") && inner.ends_with(":1"),
        "{inner}"
    );
}

/// Step 1: "inherit Process" (carry the base part). Step 2: extend
/// `__init__` with own attributes. Step 3: override `run`.
struct Summer {
    base: Process,
    numbers: Vec<i32>,
    expected: i32,
}

impl Summer {
    fn new(numbers: Vec<i32>, expected: i32) -> Self {
        Summer {
            base: Process::default(),
            numbers,
            expected,
        }
    }
}

impl ProcessClass for Summer {
    fn process(&self) -> &Process {
        &self.base
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.base
    }
    fn run(&mut self) {
        let sum: i32 = self.numbers.iter().sum();
        if sum != self.expected {
            panic!("sum {sum} != {}", self.expected);
        }
        // Report the sum through the exit code.
        proc::exit(sum)
    }
}

fn seed_steps() {
    // Use: instantiate, start (runs `run`), join.
    let mut s = Summer::new(vec![1, 2, 3, 4], 10);
    assert!(s.name().starts_with("Process-"));
    assert_eq!(s.pid(), None);
    s.start().expect("start");
    assert!(s.pid().is_some());
    s.join().expect("join");
    assert_eq!(s.exitcode(), Some(10));
    assert!(!s.is_alive());
    // The parent's copy of the fields is untouched.
    assert_eq!(s.numbers, vec![1, 2, 3, 4]);
}

struct Introspect {
    base: Process,
}

impl ProcessClass for Introspect {
    fn process(&self) -> &Process {
        &self.base
    }
    fn process_mut(&mut self) -> &mut Process {
        &mut self.base
    }
    fn run(&mut self) {
        let me = proc::current_process();
        let mut ok = self.pid() == Some(proc::getpid())
            && self.is_alive()
            && self.name() == "introspect"
            && me.name() == "introspect"
            && self.daemon()
            && me.daemon();
        // Python's `self.name = …` inside run renames the running process.
        ok &= self.set_name("renamed").is_ok()
            && self.name() == "renamed"
            && proc::current_process().name() == "renamed";
        proc::exit(if ok { 0 } else { 2 })
    }
}

fn run_sees_its_own_process() {
    let mut p = Introspect {
        base: Process::default(),
    };
    p.set_name("introspect").expect("name");
    p.set_daemon(true).expect("daemon");
    p.start().expect("start");
    p.join().expect("join");
    assert_eq!(p.exitcode(), Some(0));
}

fn errors_and_signals() {
    let mut s = Summer::new(vec![1], 2);
    assert!(matches!(s.join(), Err(ProcessError::NotStarted)));
    s.start().expect("start");
    assert!(matches!(s.start(), Err(ProcessError::AlreadyStarted)));
    assert!(matches!(
        s.set_daemon(true),
        Err(ProcessError::SetAfterStart("daemon"))
    ));
    s.join().expect("join");
    assert_eq!(s.exitcode(), Some(1), "a panic in run is exit code 1");

    struct Sleeper(Process);
    impl ProcessClass for Sleeper {
        fn process(&self) -> &Process {
            &self.0
        }
        fn process_mut(&mut self) -> &mut Process {
            &mut self.0
        }
        fn run(&mut self) {
            std::thread::sleep(Duration::from_secs(30));
        }
    }
    let mut p = Sleeper(Process::default());
    p.start().expect("start");
    assert_eq!(
        p.join_timeout(Duration::from_millis(50))
            .expect("join_timeout"),
        None
    );
    assert!(p.is_alive());
    p.kill().expect("kill");
    p.join().expect("join");
    assert_eq!(p.exitcode(), Some(-9));
}
