//! Daemon children: killed when the parent dies (even by SIGKILL),
//! terminated at normal exit; non-daemon children are joined at exit.

mod common;

use std::path::Path;
use std::time::Duration;

use proc::{Builder, JoinError};

fn main() {
    proc::init();
    if let Ok(mode) = std::env::var("PROC_TEST_MODE") {
        helper_mode(&mode);
        return;
    }
    common::become_subreaper();
    common::run(&[
        (
            "daemon_dies_with_sigkilled_parent",
            30,
            daemon_dies_with_sigkilled_parent,
        ),
        (
            "main_exit_terminates_daemons_joins_others",
            30,
            main_exit_handles_children,
        ),
        (
            "child_exit_terminates_daemons_joins_others",
            30,
            child_exit_handles_children,
        ),
        (
            "helpers_end_at_exit_with_sigterm_ignored",
            30,
            helpers_end_at_exit_with_sigterm_ignored,
        ),
    ]);
}

fn sleep_long() {
    std::thread::sleep(Duration::from_secs(60));
}

fn read_pids(path: &Path) -> (u32, u32) {
    assert!(
        common::eventually(Duration::from_secs(10), || std::fs::read_to_string(path)
            .is_ok_and(|s| s.ends_with('\n'))),
        "pids never written"
    );
    let text = std::fs::read_to_string(path).expect("pids");
    let mut it = text
        .split_whitespace()
        .map(|s| s.parse::<u32>().expect("pid"));
    (
        it.next().expect("daemon pid"),
        it.next().expect("other pid"),
    )
}

fn daemon_dies_with_sigkilled_parent() {
    let dir = common::temp_dir("daemon-kill");
    let pids = dir.join("pids");
    let pids_in_child = pids.clone();
    let middle = proc::spawn(move || {
        let daemon = Builder::new()
            .daemon(true)
            .spawn(sleep_long)
            .expect("daemon");
        let other = Builder::new().spawn(sleep_long).expect("other");
        std::fs::write(
            &pids_in_child,
            format!("{} {}\n", daemon.pid(), other.pid()),
        )
        .expect("write");
        sleep_long();
        drop((daemon, other));
    })
    .expect("spawn");
    let (daemon, other) = read_pids(&pids);
    middle.kill().expect("kill the parent of the daemon");
    assert!(matches!(
        middle.join(),
        Err(JoinError::Signaled { signal: 9, .. })
    ));
    // This test process is a subreaper: the orphans are adopted by it.
    let mut daemon_status = None;
    assert!(
        common::eventually(Duration::from_secs(10), || {
            daemon_status = common::reap_adopted(daemon);
            daemon_status.is_some()
        }),
        "the daemon outlived its SIGKILLed parent"
    );
    let status = daemon_status.expect("status");
    assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    // A non-daemon child is not tied to its parent's life.
    assert_eq!(common::reap_adopted(other), None);
    assert!(matches!(common::proc_state(other), Some('S' | 'R')));
    // SAFETY: plain kill of our adopted child.
    unsafe { libc::kill(other as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(10), || {
        common::reap_adopted(other).is_some()
    }));
    let _ = std::fs::remove_dir_all(dir);
}

fn main_exit_handles_children() {
    let dir = common::temp_dir("main-exit");
    let exe = std::env::current_exe().expect("current_exe");
    let out = std::process::Command::new(exe)
        .env("PROC_TEST_MODE", "exit-handlers")
        .env("PROC_TEST_DIR", &dir)
        .output()
        .expect("run helper");
    assert!(out.status.success(), "{out:?}");
    // Right at the helper's exit: the non-daemon child had finished its work
    // (it was joined), and neither child is left running or unreaped.
    assert!(
        dir.join("marker").exists(),
        "the non-daemon child was not joined"
    );
    let (daemon, other) = read_pids(&dir.join("pids"));
    assert_eq!(common::proc_state(daemon), None, "daemon still there");
    assert_eq!(common::proc_state(other), None, "non-daemon still there");
    let _ = std::fs::remove_dir_all(dir);
}

fn child_exit_handles_children() {
    let dir = common::temp_dir("child-exit");
    let dir_in_child = dir.clone();
    let child = proc::spawn(move || start_daemon_and_worker(&dir_in_child)).expect("spawn");
    child.join().expect("join");
    assert!(
        dir.join("marker").exists(),
        "the non-daemon grandchild was not joined"
    );
    let (daemon, other) = read_pids(&dir.join("pids"));
    assert_eq!(common::proc_state(daemon), None, "daemon still there");
    assert_eq!(common::proc_state(other), None, "non-daemon still there");
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a daemon that would sleep for a minute and a worker that writes
/// `marker` after 300 ms, records their pids, and drops both handles.
fn start_daemon_and_worker(dir: &Path) {
    let daemon = Builder::new()
        .daemon(true)
        .spawn(sleep_long)
        .expect("daemon");
    let marker = dir.join("marker");
    let worker = proc::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        std::fs::write(marker, b"done").expect("marker");
    })
    .expect("worker");
    std::fs::write(
        dir.join("pids"),
        format!("{} {}\n", daemon.pid(), worker.pid()),
    )
    .expect("pids");
}

/// Its OS parent: for a fork-server child, the server.
fn parent_pid(_: ()) -> u32 {
    proc::getppid().as_u32()
}

/// A program that ignores SIGTERM (inherited by a zygote it forks, and
/// across the fork server's exec) and leaves a fork server and a zygote
/// alive at its exit: the exit handlers must still end them, not wait
/// for them for ever.
fn helpers_end_at_exit_with_sigterm_ignored() {
    let dir = common::temp_dir("helpers-exit");
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = std::process::Command::new(exe)
        .env("PROC_TEST_MODE", "helpers-sigterm-ignored")
        .env("PROC_TEST_DIR", &dir)
        .spawn()
        .expect("run helper");
    let exited = common::eventually(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(exited, "the program did not exit: it waits for its helpers");
    assert!(child.wait().expect("status").success());
    let (server, zygote) = read_pids(&dir.join("pids"));
    for helper in [server, zygote] {
        assert!(
            common::eventually(Duration::from_secs(5), || {
                common::proc_state(helper).is_none() || common::reap_adopted(helper).is_some()
            }),
            "helper {helper} still there"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn helper_mode(mode: &str) {
    match mode {
        "helpers-sigterm-ignored" => {
            let dir = std::env::var_os("PROC_TEST_DIR").expect("PROC_TEST_DIR");
            // SAFETY: SIG_IGN is a valid disposition; no handler runs.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            let server = Builder::new()
                .start_method(proc::StartMethod::ForkServer)
                .spawn_entry(parent_pid, ())
                .expect("forkserver start")
                .join()
                .expect("join");
            let zygote = proc::Zygote::new().expect("zygote");
            std::fs::write(
                Path::new(&dir).join("pids"),
                format!("{server} {}\n", zygote.pid()),
            )
            .expect("pids");
            // Alive at exit, as one kept in a static would be.
            std::mem::forget(zygote);
        }
        "exit-handlers" => {
            let dir = std::env::var_os("PROC_TEST_DIR").expect("PROC_TEST_DIR");
            start_daemon_and_worker(Path::new(&dir));
            // Returning from main runs the exit handlers.
        }
        other => panic!("unknown mode {other}"),
    }
}
