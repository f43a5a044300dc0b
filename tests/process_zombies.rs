//! Dropped, unjoined handles never leave zombies.

mod common;

use std::time::Duration;

fn main() {
    common::run(&[
        (
            "dropped_handles_leave_no_zombies",
            60,
            dropped_handles_leave_no_zombies,
        ),
        (
            "dropped_process_objects_leave_no_zombies",
            30,
            dropped_process_objects,
        ),
    ]);
}

fn count(me: u32) -> (usize, usize) {
    let children = common::children_of(me);
    let zombies = children.iter().filter(|(_, s)| *s == 'Z').count();
    (children.len() - zombies, zombies)
}

fn assert_no_zombies_once_all_ended() {
    let me = std::process::id();
    // Wait (with a deadline) until no child is still running ...
    assert!(
        common::eventually(Duration::from_secs(30), || count(me).0 == 0),
        "children still running: {:?}",
        count(me)
    );
    // ... then there must be no zombie: each one is reaped as its SIGCHLD
    // arrives (the short grace covers signal delivery, not a sweep).
    assert!(
        common::eventually(Duration::from_millis(500), || count(me).1 == 0),
        "zombies left: {:?}",
        common::children_of(me)
    );
}

fn dropped_handles_leave_no_zombies() {
    for i in 0..500u32 {
        let handle = proc::spawn(move || i).expect("spawn");
        drop(handle);
    }
    assert_no_zombies_once_all_ended();
    // Some children still running when dropped, too.
    for i in 0..20u64 {
        drop(
            proc::spawn(move || std::thread::sleep(Duration::from_millis(10 * i))).expect("spawn"),
        );
    }
    assert_no_zombies_once_all_ended();
}

fn dropped_process_objects() {
    for _ in 0..50 {
        let mut p = proc::Process::new(|| ());
        p.start().expect("start");
    }
    assert_no_zombies_once_all_ended();
}
