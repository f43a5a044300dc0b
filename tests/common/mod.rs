//! A tiny test runner for `harness = false` targets.
//!
//! libtest runs every test on a thread of its own, and the safe `spawn`
//! refuses to fork a process with more than one thread; these targets run
//! their tests one after the other on the main thread instead. Every test
//! has a deadline: `alarm(2)` ends the binary if a test hangs (the last
//! `test … ` line printed names the test). Run by `cargo test` outside a
//! terminal (CI), the binary leads a process group of its own, and a
//! missed deadline or the end of the run ends every process left in it:
//! one that a failed or hung test left blocked for ever would otherwise
//! keep the output pipe of whoever runs the tests open. In a terminal's
//! foreground group (so that Ctrl-C still reaches it), or when it leads a
//! group already (a shell pipeline's, shared with the other commands), it
//! stays where it is.
#![allow(dead_code)]

use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// One test: a name, a deadline in seconds, a body that panics on failure.
pub type Test = (&'static str, u32, fn());

/// Runs `tests` (or those whose name contains the first command-line
/// argument that is not a flag), prints libtest-like lines and a closing
/// `N passed, N failed` line, and exits 1 if any failed.
pub fn run(tests: &[Test]) -> ! {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    lead_own_group();
    let (mut passed, mut failed) = (0, 0);
    let mut failures = Vec::new();
    for &(name, deadline_s, body) in tests {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        // SAFETY: alarm only arms a timer; SIGALRM ends the whole test
        // binary (and its group, see lead_own_group): the deadline.
        unsafe { libc::alarm(deadline_s) };
        let started = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(body));
        // SAFETY: as above; 0 disarms the timer.
        unsafe { libc::alarm(0) };
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok ({:.0?})", started.elapsed());
            }
            Err(_) => {
                failed += 1;
                failures.push(name);
                println!("FAILED");
            }
        }
    }
    println!();
    if !failures.is_empty() {
        println!("failures: {}", failures.join(", "));
    }
    println!(
        "test result: {}. {passed} passed, {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    let _ = std::io::stdout().flush();
    // Passing tests may leave a fork server (it ends with this process)
    // or a sleeper whose handle was dropped; after a failure, whatever
    // the failed test started is here too.
    let left = end_leftovers();
    if left > 0 && failed > 0 {
        println!("ended {left} process(es) the tests left behind");
    }
    std::process::exit(i32::from(failed > 0))
}

/// The process group this binary was in before it made its own (0: it
/// did not make one).
static OUTER_GROUP: AtomicI32 = AtomicI32::new(0);

/// Makes this binary a process group's leader (every process the tests
/// start joins it) and makes a missed deadline end the whole group —
/// unless it sits in a terminal's foreground group or leads a group
/// already (see the module docs).
fn lead_own_group() {
    // SAFETY: getpid, getpgrp and tcgetpgrp change no memory.
    let (me, outer, terminal) = unsafe { (libc::getpid(), libc::getpgrp(), libc::tcgetpgrp(2)) };
    if outer == me || terminal == outer {
        return;
    }
    // SAFETY: setpgid changes no memory.
    if unsafe { libc::setpgid(0, 0) } != 0 {
        return;
    }
    OUTER_GROUP.store(outer, Ordering::Relaxed);
    GROUP_LEADER.store(me, Ordering::Relaxed);
    // SAFETY: on_alarm only makes async-signal-safe calls (write, kill).
    unsafe {
        libc::signal(
            libc::SIGALRM,
            on_alarm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };
}

extern "C" fn on_alarm(_: libc::c_int) {
    // SAFETY: getpid, signal, raise, write and kill are async-signal-safe;
    // `msg` is valid.
    unsafe {
        if libc::getpid() != GROUP_LEADER.load(Ordering::Relaxed) {
            // A forked child that inherited this handler: SIGALRM does
            // what it would do there without it.
            libc::signal(libc::SIGALRM, libc::SIG_DFL);
            libc::raise(libc::SIGALRM);
            return;
        }
        let msg = b"TIMED OUT: ending this test binary and every process it started\n";
        libc::write(2, msg.as_ptr().cast(), msg.len());
        // This process leads the group (the handler is only installed then).
        libc::kill(0, libc::SIGKILL);
    }
}

/// The pid of the binary that made the group (see `on_alarm`).
static GROUP_LEADER: AtomicI32 = AtomicI32::new(0);

/// Ends the processes left in this binary's own process group (if it made
/// one); how many there were. The binary first moves back to its outer
/// group, then SIGKILLs its own by its number: one call, so no pid read
/// here can have been reused by another process meanwhile.
fn end_leftovers() -> usize {
    let outer = OUTER_GROUP.load(Ordering::Relaxed);
    if outer == 0 {
        return 0;
    }
    let me = std::process::id();
    let left = group_members(me);
    // SAFETY: setpgid changes no memory.
    if left > 0 && unsafe { libc::setpgid(0, outer) } == 0 {
        // SAFETY: kill changes no memory; the group `me` holds only
        // processes started from this binary.
        unsafe { libc::kill(-(me as i32), libc::SIGKILL) };
    }
    left
}

/// How many live processes other than `leader` are in its process group.
fn group_members(leader: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != leader)
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the command's `)`: state, ppid, pgrp.
            let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                return false;
            };
            let mut fields = after.split_whitespace();
            let state = fields.next();
            let pgrp = fields.nth(1).and_then(|p| p.parse::<u32>().ok());
            pgrp == Some(leader) && state != Some("Z")
        })
        .count()
}

/// Polls `cond` until it holds or `timeout` passes; whether it held.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, …), or `None` if
/// there is no such process.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().next()?.chars().next()
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
pub fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The pids and states of this process's children, read from `/proc`.
pub fn children_of(parent: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let mut fields = stat[close + 1..].split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next());
        let ppid = fields.next().and_then(|s| s.parse::<u32>().ok());
        if let (Some(state), Some(ppid)) = (state, ppid) {
            if ppid == parent {
                out.push((pid, state));
            }
        }
    }
    out
}

/// A fresh, empty directory under the system temp dir for one test.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("proc-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Makes this process the reaper of its orphaned descendants, so a test can
/// wait for grandchildren whose parent it killed.
pub fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes one integer argument.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
}

/// `waitpid(pid, WNOHANG)` for a process that is not one of `proc`'s handles
/// (an adopted orphan): `Some(raw status)` once it has ended.
pub fn reap_adopted(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
    (r == pid as i32).then_some(status)
}

/// Runs `f` while this process can open no new descriptor (its limit
/// lowered to 3, every number above 2 already taken or refused); the
/// limit is back when it returns.
pub fn without_spare_descriptors<R>(f: impl FnOnce() -> R) -> R {
    with_descriptor_limit(3, f)
}

/// Runs `f` with this process's soft descriptor limit at `limit` (so only
/// descriptor numbers below it can be opened), then puts it back.
pub fn with_descriptor_limit<R>(limit: u64, f: impl FnOnce() -> R) -> R {
    let mut saved = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut saved) };
    let tight = libc::rlimit {
        rlim_cur: limit as libc::rlim_t,
        rlim_max: saved.rlim_max,
    };
    // SAFETY: a valid rlimit; put back below.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &tight) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &saved) };
    out
}

/// Appends one byte to the file `path` (across processes); how many
/// bytes it holds after (the calls so far).
pub fn count_call(path: &str) -> u64 {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .expect("counter");
    f.write_all(b"x").expect("count");
    std::fs::metadata(path).expect("counter").len()
}

/// A number whose decoding panics on 13 (a `Deserialize` that panics, for
/// the queue's gets and the pool's results).
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct Unlucky(pub u64);

impl<'de> serde::Deserialize<'de> for Unlucky {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        assert!(n != 13, "unlucky 13");
        Ok(Unlucky(n))
    }
}
