//! The exec start methods, `Spawn` and `ForkServer`: entries run in a fresh
//! exec of this test binary (or a child of its fork server), whose `main`
//! starts with `proc::init()`; results, panics, exit codes and signals come
//! back as with fork, and a threaded parent is fine. Every test runs under
//! both methods.

mod common;

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use proc::{Builder, JoinError, JoinableQueue, PutError, Queue, QueueError, StartMethod};
use serde::{Deserialize, Serialize};

static METHOD: AtomicU8 = AtomicU8::new(0);

fn main() {
    proc::init();
    common::become_subreaper();
    macro_rules! both {
        ($name:literal, $secs:literal, $f:ident) => {
            [
                (
                    concat!("spawn::", $name),
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
            ]
        };
    }
    let tests: Vec<common::Test> = [
        both!("value_comes_back", 20, value_comes_back),
        both!("panic_comes_back", 20, panic_comes_back),
        both!("exit_code_comes_back", 20, exit_code_comes_back),
        both!("sigkill_comes_back", 20, sigkill_comes_back),
        both!(
            "killed_after_returning_is_a_signal",
            20,
            killed_after_returning_is_a_signal
        ),
        both!("threaded_parent", 20, threaded_parent),
        both!("child_is_a_fresh_process", 20, child_is_a_fresh_process),
        both!("queues_cross_a_spawn", 30, queues_cross_a_spawn),
        both!(
            "a_queue_passed_by_value_arrives",
            20,
            a_queue_passed_by_value_arrives
        ),
        both!(
            "parent_process_names_the_parent",
            20,
            parent_process_names_the_parent
        ),
        both!(
            "signalling_an_ended_child_is_harmless",
            20,
            signalling_an_ended_child_is_harmless
        ),
        both!(
            "an_active_child_while_it_runs",
            20,
            an_active_child_while_it_runs
        ),
        both!(
            "a_child_starts_unblocked_with_the_programs_arguments",
            20,
            a_child_starts_unblocked_with_the_programs_arguments
        ),
        both!("a_start_with_stdin_closed", 20, a_start_with_stdin_closed),
        both!("requests_small_and_large", 30, requests_small_and_large),
    ]
    .into_iter()
    .flatten()
    .chain([
        (
            "spawn_via_fork_where_posix_spawn_cannot_keep_descriptors",
            60,
            spawn_via_fork_where_posix_spawn_cannot_keep_descriptors as fn(),
        ),
        (
            "a_spawned_child_without_its_descriptors_exits",
            20,
            a_spawned_child_without_its_descriptors_exits as fn(),
        ),
        (
            "fork_method_runs_entries_too",
            20,
            fork_method_runs_entries_too as fn(),
        ),
        (
            "forkserver_dies_with_its_parent",
            30,
            forkserver_dies_with_its_parent as fn(),
        ),
        (
            "a_killed_spare_is_replaced_by_a_fork",
            20,
            a_killed_spare_is_replaced_by_a_fork as fn(),
        ),
        (
            "the_spare_holds_no_request_descriptors",
            20,
            the_spare_holds_no_request_descriptors as fn(),
        ),
        (
            "a_zygotes_children_get_the_programs_signal_actions",
            20,
            a_zygotes_children_get_the_programs_signal_actions as fn(),
        ),
        (
            "a_process_objects_entry_start_keeps_names_consecutive",
            20,
            a_process_objects_entry_start_keeps_names_consecutive as fn(),
        ),
        (
            "a_forked_copy_of_a_handle_takes_no_status",
            20,
            a_forked_copy_of_a_handle_takes_no_status as fn(),
        ),
        ("emfile_keeps_the_server", 30, emfile_keeps_the_server),
        (
            "a_zygotes_children_read_dev_null",
            30,
            a_zygotes_children_read_dev_null,
        ),
        (
            "failed_starts_leak_no_slot",
            60,
            failed_starts_leak_no_slot as fn(),
        ),
        (
            "starts_from_a_thread_that_ends_live_on",
            30,
            starts_from_a_thread_that_ends_live_on as fn(),
        ),
        (
            "first_starts_from_two_threads_at_once",
            40,
            first_starts_from_two_threads_at_once as fn(),
        ),
        (
            "a_queue_of_a_hostile_size_is_refused",
            20,
            a_queue_of_a_hostile_size_is_refused as fn(),
        ),
        (
            "servers_report_statuses_with_sigchld_ignored",
            30,
            servers_report_statuses_with_sigchld_ignored as fn(),
        ),
        (
            "a_dead_zygotes_number_reused_is_left_alone",
            20,
            a_dead_zygotes_number_reused_is_left_alone as fn(),
        ),
        (
            "quick_ends_through_the_spare_report_their_statuses",
            60,
            quick_ends_through_the_spare_report_their_statuses as fn(),
        ),
        (
            "a_direct_start_outlives_its_dropped_zygote",
            60,
            a_direct_start_outlives_its_dropped_zygote as fn(),
        ),
        (
            "a_child_outlives_its_killed_zygote",
            30,
            a_child_outlives_its_killed_zygote as fn(),
        ),
        (
            "many_shared_descriptors_cross_or_are_refused",
            60,
            many_shared_descriptors_cross_or_are_refused as fn(),
        ),
        (
            "a_daemon_forked_on_a_thread_outlives_the_thread",
            30,
            a_daemon_forked_on_a_thread_outlives_the_thread as fn(),
        ),
        (
            "small_and_large_requests_cross",
            60,
            small_and_large_requests_cross as fn(),
        ),
        (
            "a_dead_server_with_a_spare_offered_is_an_error",
            30,
            a_dead_server_with_a_spare_offered_is_an_error as fn(),
        ),
        (
            "starts_and_queues_survive_a_storm_of_signals",
            90,
            starts_and_queues_survive_a_storm_of_signals as fn(),
        ),
    ])
    .collect();
    common::run(&tests);
}

fn spawn() -> Builder {
    let method = if METHOD.load(Ordering::Relaxed) == 0 {
        StartMethod::Spawn
    } else {
        StartMethod::ForkServer
    };
    Builder::new().start_method(method)
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

fn an_active_child_while_it_runs() {
    let child = spawn()
        .name("napper")
        .spawn_entry(nap_for, 150)
        .expect("spawn");
    let listed = proc::active_children();
    let me = listed
        .iter()
        .find(|c| c.pid() == child.pid())
        .unwrap_or_else(|| panic!("{:?} not among {listed:?}", child.pid()));
    assert_eq!(me.name(), "napper");
    let pid = child.pid();
    child.join().expect("join");
    assert!(proc::active_children().iter().all(|c| c.pid() != pid));
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

/// Returns at once, but leaves a non-daemon child of its own, which its
/// exit waits for (as Python's does).
fn returns_with_a_child(ms: u64) -> u64 {
    proc::spawn(move || std::thread::sleep(Duration::from_millis(ms)))
        .map(std::mem::forget)
        .expect("grandchild");
    7
}

fn killed_after_returning_is_a_signal() {
    // The value is written, then the child waits for its own child at
    // exit and is killed there: join reports the signal, as it does for
    // every start method, not the value.
    let child = spawn()
        .spawn_entry(returns_with_a_child, 2_000)
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(300));
    child.terminate().expect("terminate");
    match child.join() {
        Err(JoinError::Signaled { signal, .. }) => assert_eq!(signal, libc::SIGTERM),
        other => panic!("{other:?}"),
    }
    // Without the kill the value comes back (after the grandchild ends).
    let child = spawn()
        .spawn_entry(returns_with_a_child, 50)
        .expect("spawn");
    assert_eq!(child.join().expect("join"), 7);
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
        proc::parent_process().map_or(0, |p| p.pid().as_u32()),
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
    // The requester is the child's parent process (with ForkServer its OS
    // parent is the server).
    let (name, daemon, ppid, own, stdin) = child.join().expect("join");
    assert_eq!(
        (name.as_str(), daemon, ppid, own),
        ("fresh", true, std::process::id(), pid)
    );
    assert_eq!(stdin.as_deref(), Some("/dev/null"));
}

/// The child's blocked signals (`SigBlk` of /proc/self/status) and its
/// arguments.
fn mask_and_args(_: ()) -> (u64, Vec<String>) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).expect("hex"))
        .expect("SigBlk");
    (blocked, std::env::args().collect())
}

/// A child starts with no signal blocked even if the thread that started
/// it blocks some (as std's `Command` does for its children), and gets
/// this program's arguments.
fn a_child_starts_unblocked_with_the_programs_arguments() {
    // SAFETY: sigset_t is plain data (all zeroes is a valid value).
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the mask change is this thread's
    // and undone below.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let child = spawn().spawn_entry(mask_and_args, ());
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    let (blocked, args) = child.expect("spawn").join().expect("join");
    // (With ForkServer the mask is the server's, which an earlier test in
    // this run may have started: only a fresh Spawn is checked.)
    if METHOD.load(Ordering::Relaxed) == 0 {
        assert_eq!(blocked, 0, "blocked signals {blocked:#x}");
    }
    assert_eq!(args, std::env::args().collect::<Vec<_>>());
}

fn byte_sum(bytes: Vec<u8>) -> (usize, u64) {
    (bytes.len(), bytes.iter().map(|&b| u64::from(b)).sum())
}

/// Requests on each side of the size that a fork server's spare takes
/// inline (16 KiB), one after another so that spares take most of them.
fn requests_small_and_large() {
    for len in [0, 10, 16_000, 16 << 10, (16 << 10) + 1, 100_000, 3 << 20, 5] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let want = byte_sum(bytes.clone());
        let child = spawn().spawn_entry(byte_sum, bytes).expect("spawn");
        assert_eq!(child.join().expect("join"), want, "{len} bytes");
    }
}

/// A start from a process whose stdin is closed: descriptor 0 is free, and
/// the request's descriptor (or the server's socket) must not take it,
/// or the child's stdin (`/dev/null`) replaces it across the exec.
fn a_start_with_stdin_closed() {
    let method = METHOD.load(Ordering::Relaxed);
    // In a child of its own, whose descriptor table is its alone.
    let child = proc::spawn(move || {
        // SAFETY: closes this child's stdin, which nothing in it reads.
        unsafe { libc::close(0) };
        let method = if method == 0 {
            StartMethod::Spawn
        } else {
            StartMethod::ForkServer
        };
        Builder::new()
            .start_method(method)
            .spawn_entry(|x: u32| x * 2, 21)
            .map_err(|e| e.to_string())
            .and_then(|h| h.join().map_err(|e| e.to_string()))
    })
    .expect("fork");
    assert_eq!(child.join().expect("join"), Ok(42));
}

/// The start that C libraries without `dup2(fd, fd)` clearing
/// close-on-exec in `posix_spawn` get (std's `Command` and a fork; forced
/// here by `PROC_SPAWN_VIA_FORK`): a few of this file's tests, run by a
/// copy of this binary.
fn spawn_via_fork_where_posix_spawn_cannot_keep_descriptors() {
    for test in [
        "spawn::value_comes_back",
        "spawn::queues_cross_a_spawn",
        "spawn::a_start_with_stdin_closed",
        "forkserver::a_child_starts_unblocked",
    ] {
        let out = std::process::Command::new("/proc/self/exe")
            .arg(test)
            .env("PROC_SPAWN_VIA_FORK", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("exec");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{test}: {stdout}");
        assert!(stdout.contains("1 passed, 0 failed"), "{test}: {stdout}");
    }
}

/// A child whose spawn variable names this process as its parent but
/// whose descriptors are not there (a C library that did not keep them
/// across the exec) exits at `init()` instead of running the program's
/// `main` (here: the test binary with a filter that matches nothing).
fn a_spawned_child_without_its_descriptors_exits() {
    let out = std::process::Command::new("/proc/self/exe")
        .arg("no test has this name")
        .env("PROC_SPAWN_FDS", format!("98,99,{}", std::process::id()))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not arrive"), "{stderr}");
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

fn drain(q: Queue<u64>) -> u64 {
    std::iter::from_fn(|| q.try_get().ok()).sum()
}

fn a_queue_passed_by_value_arrives() {
    // The argument is this process's last handle: serialized, then dropped
    // (its descriptor closed) before the child is started. What travels
    // must be a descriptor of the start's own.
    let q: Queue<u64> = Queue::new().expect("queue");
    for i in 1..=3 {
        q.put(i).expect("put");
    }
    let child = spawn().spawn_entry(drain, q).expect("spawn");
    assert_eq!(child.join().expect("join"), 6);
}

fn forkserver_dies_with_its_parent() {
    // A fork child starts a daemon entry through its fork server and
    // reports both pids; then it is SIGKILLed. The server (and with it the
    // daemon) must not outlive it. This process is a subreaper: the orphans
    // come here to be reaped.
    let dir = common::temp_dir("forkserver-kill");
    let pids = dir.join("pids");
    let pids_in_child = pids.clone();
    let middle = proc::spawn(move || {
        let child = Builder::new()
            .start_method(StartMethod::ForkServer)
            .daemon(true)
            .spawn_entry(nap, 60_000)
            .expect("forkserver start");
        // From its second request on the server keeps a spare forked
        // ahead: the third start goes to it. Not a daemon, it must outlive
        // the server.
        Builder::new()
            .start_method(StartMethod::ForkServer)
            .spawn_entry(nap, 0)
            .expect("forkserver start")
            .join()
            .expect("join");
        let lasting = Builder::new()
            .start_method(StartMethod::ForkServer)
            .spawn_entry(nap, 60_000)
            .expect("forkserver start");
        let server = common::ppid_of(child.pid().as_u32()).expect("server pid");
        assert_eq!(common::ppid_of(lasting.pid().as_u32()), Some(server));
        // The spare made after the third start.
        let mut spare = None;
        assert!(common::eventually(Duration::from_secs(5), || {
            spare = common::children_of(server)
                .into_iter()
                .find(|&(p, s)| {
                    s != 'Z' && p != child.pid().as_u32() && p != lasting.pid().as_u32()
                })
                .map(|(p, _)| p);
            spare.is_some()
        }));
        std::fs::write(
            &pids_in_child,
            format!(
                "{server} {} {} {}\n",
                child.pid(),
                spare.expect("spare"),
                lasting.pid()
            ),
        )
        .expect("write");
        nap(60_000);
    })
    .expect("spawn");
    assert!(common::eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&pids).is_ok_and(|s| s.ends_with('\n'))
    }));
    let text = std::fs::read_to_string(&pids).expect("pids");
    let all: Vec<u32> = text
        .split_whitespace()
        .map(|s| s.parse::<u32>().expect("pid"))
        .collect();
    let (server, daemon, spare, lasting) = (all[0], all[1], all[2], all[3]);
    middle.kill().expect("kill");
    let _ = middle.join();
    for pid in [server, daemon, spare] {
        assert!(
            common::eventually(Duration::from_secs(10), || {
                common::reap_adopted(pid).is_some() || common::proc_state(pid).is_none()
            }),
            "process {pid} outlived its SIGKILLed requester"
        );
    }
    // Alive, and still alive a while later (a signal on its way would
    // have landed by then).
    let alive = || common::proc_state(lasting).is_some_and(|s| s != 'Z');
    let mut survived = alive();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        survived &= alive();
    }
    // SAFETY: a plain kill of the child this test made outlive its parent.
    unsafe { libc::kill(lasting as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(10), || {
        common::reap_adopted(lasting).is_some() || common::proc_state(lasting).is_none()
    }));
    assert!(
        survived,
        "a child that is not a daemon died with the server"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// This process's descriptors and what each names.
fn open_fds() -> Vec<(i32, String)> {
    std::fs::read_dir("/proc/self/fd")
        .expect("fd dir")
        .filter_map(|e| {
            let fd = e.ok()?.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            Some((fd, link.to_string_lossy().into_owned()))
        })
        .collect()
}

/// A zygote found dead closes its socket; the number, free again, may be
/// reused for anything, and forked children must leave that alone (they
/// let go only of live zygote sockets they inherited).
fn a_dead_zygotes_number_reused_is_left_alone() {
    let before = open_fds();
    let zygote = proc::Zygote::new().expect("zygote");
    let with = open_fds();
    let (socket, link) = with
        .into_iter()
        .find(|fd| !before.contains(fd) && fd.1.starts_with("socket:"))
        .expect("the zygote's socket");
    // SAFETY: a plain kill of the zygote this test started.
    unsafe { libc::kill(zygote.pid().as_u32() as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(zygote.pid().as_u32()).is_none_or(|s| s == 'Z')
    }));
    assert!(zygote.spawn_entry(Builder::new(), boom, 1).is_err());
    assert!(
        !open_fds().contains(&(socket, link)),
        "the socket is closed"
    );
    // The number now names a pipe's write end (the read end well away).
    let mut ends = [0; 2];
    // SAFETY: `ends` is valid storage for two descriptors.
    assert_eq!(unsafe { libc::pipe(ends.as_mut_ptr()) }, 0);
    // SAFETY: plain descriptor calls on this test's own descriptors.
    let read = unsafe {
        let read = libc::fcntl(ends[0], libc::F_DUPFD_CLOEXEC, 100);
        assert!(read >= 100);
        libc::close(ends[0]);
        if ends[1] != socket {
            assert_eq!(libc::dup2(ends[1], socket), socket);
            libc::close(ends[1]);
        }
        read
    };
    let child = proc::spawn(move || {
        // SAFETY: writing two bytes from a valid buffer.
        unsafe { libc::write(socket, b"ok".as_ptr().cast(), 2) }
    })
    .expect("spawn");
    assert_eq!(
        child.join().expect("join"),
        2,
        "the child could write to it"
    );
    let mut got = [0u8; 2];
    // SAFETY: reading into a valid two-byte buffer.
    assert_eq!(unsafe { libc::read(read, got.as_mut_ptr().cast(), 2) }, 2);
    assert_eq!(&got, b"ok");
    for fd in [read, socket] {
        // SAFETY: descriptors this test opened.
        unsafe { libc::close(fd) };
    }
    drop(zygote);
}

/// The fork server keeps a spare child forked ahead of the next request;
/// one killed while it waits is replaced by a fork, and nothing fails.
fn a_killed_spare_is_replaced_by_a_fork() {
    let server_start = || Builder::new().start_method(StartMethod::ForkServer);
    // The server makes a spare once it has served two requests.
    server_start()
        .spawn_entry(nap, 0)
        .expect("spawn")
        .join()
        .expect("join");
    let napping = server_start().spawn_entry(nap, 30_000).expect("spawn");
    let server = common::ppid_of(napping.pid().as_u32()).expect("server");
    let mut spare = None;
    assert!(common::eventually(Duration::from_secs(5), || {
        spare = common::children_of(server)
            .into_iter()
            .find(|&(p, s)| p != napping.pid().as_u32() && s != 'Z')
            .map(|(p, _)| p);
        spare.is_some()
    }));
    let spare = spare.expect("spare");
    // SAFETY: a plain kill of the fork server's idle spare.
    unsafe { libc::kill(spare as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(spare).is_none()
    }));
    let child = server_start()
        .spawn_entry(stats, ("after".to_owned(), vec![4]))
        .expect("spawn");
    assert_ne!(child.pid().as_u32(), spare);
    let replaced = child.pid().as_u32();
    assert_eq!(child.join().expect("join").label, "after");
    // And a new spare is made.
    assert!(common::eventually(Duration::from_secs(5), || {
        common::children_of(server)
            .into_iter()
            .any(|(p, s)| s != 'Z' && p != napping.pid().as_u32() && p != replaced && p != spare)
    }));
    napping.kill().expect("kill");
    assert!(matches!(
        napping.join(),
        Err(JoinError::Signaled { signal: 9, .. })
    ));
}

fn produce_then_parent((q, n): (Queue<u64>, u64)) -> u32 {
    for i in 0..n {
        q.put(i).expect("put");
    }
    // SAFETY: getppid has no preconditions.
    unsafe { libc::getppid() as u32 }
}

/// The spare forked after a request holds none of that request's
/// descriptors (a queue's memory, a result file): a copy held by an idle
/// process would keep them alive, or a pipe from ever seeing its end.
fn the_spare_holds_no_request_descriptors() {
    // Two requests first: the server keeps a spare from then on, and the
    // third goes to it.
    for _ in 0..2 {
        Builder::new()
            .start_method(StartMethod::ForkServer)
            .spawn_entry(nap, 0)
            .expect("spawn")
            .join()
            .expect("join");
    }
    let q: Queue<u64> = Queue::new().expect("queue");
    let child = Builder::new()
        .start_method(StartMethod::ForkServer)
        .spawn_entry(produce_then_parent, (q.clone(), 3))
        .expect("spawn");
    let pid = child.pid().as_u32();
    let server = child.join().expect("join");
    assert_eq!(q.qsize(), 3);
    let mut spare = None;
    assert!(common::eventually(Duration::from_secs(5), || {
        spare = common::children_of(server)
            .into_iter()
            .find(|&(p, s)| p != pid && s != 'Z')
            .map(|(p, _)| p);
        spare.is_some()
    }));
    let spare = spare.expect("spare");
    let links = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{spare}/fd"))
            .map(|dir| {
                dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .map(|l| l.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    // None of the request's files, none of the server's children
    // (pidfds), one socket: its own channel (not the server's connection,
    // nor the channel of the spare before it). The spare lets go of what
    // it inherited just after the fork: give it a moment.
    let clean = |links: &[String]| {
        links
            .iter()
            .all(|l| !l.contains("memfd:proc-") && !l.contains("pidfd"))
            && links.iter().filter(|l| l.starts_with("socket:")).count() == 1
    };
    assert!(
        common::eventually(Duration::from_secs(2), || clean(&links())),
        "the spare holds {:?}",
        links()
    );
}

/// In a fresh process: SIGCHLD ignored (which an exec keeps), then a
/// fork server's and a zygote's children that panic and exit non-zero.
fn under_ignored_sigchld(_: ()) -> Vec<String> {
    // SAFETY: SIG_IGN is a valid disposition; this process is fresh and
    // single-threaded.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut out = Vec::new();
    let server = || Builder::new().start_method(StartMethod::ForkServer);
    out.push(format!(
        "{:?}",
        server().spawn_entry(boom, 3).expect("spawn").join()
    ));
    out.push(format!(
        "{:?}",
        server().spawn_entry(leave, 4).expect("spawn").join()
    ));
    let zygote = proc::Zygote::new().expect("zygote");
    out.push(format!(
        "{:?}",
        zygote
            .spawn_entry(Builder::new(), boom, 5)
            .expect("spawn")
            .join()
    ));
    out.push(format!(
        "{:?}",
        zygote
            .spawn_entry(Builder::new(), leave, 6)
            .expect("spawn")
            .join()
    ));
    out
}

/// Runs the entry `f` in a fresh process (a Spawn child, whose child
/// table, fork server and signal dispositions are its own) and returns
/// its value.
fn in_fresh_process<R>(f: fn(()) -> R) -> R
where
    R: serde::Serialize + serde::de::DeserializeOwned,
{
    Builder::new()
        .start_method(StartMethod::Spawn)
        .spawn_entry(f, ())
        .expect("spawn")
        .join()
        .expect("join")
}

fn servers_report_statuses_with_sigchld_ignored() {
    // The servers must reap their children themselves: with SIGCHLD
    // ignored the kernel would, and the statuses (and these joins) would
    // be lost.
    let out = in_fresh_process(under_ignored_sigchld);
    assert!(out[0].contains("entry failed on 3"), "{out:?}");
    assert_eq!(out[1], "Err(Exited { code: 4 })", "{out:?}");
    assert!(out[2].contains("entry failed on 5"), "{out:?}");
    assert_eq!(out[3], "Err(Exited { code: 6 })", "{out:?}");
}

fn queue_size(q: Queue<u64>) -> usize {
    q.try_put(1).expect("put");
    q.qsize()
}

fn a_queue_of_a_hostile_size_is_refused() {
    // Another process rewrote the segment's capacity field (offset 16) and
    // cut the file to match: a power of two too small for a record, one
    // above the largest ring. The receiving side refuses the queue with a
    // typed error instead of panicking on it (or trusting it). The first
    // round, unchanged, is the control: the queue passed by value (its
    // last handle here) arrives. (A segment: a page of header, the ring,
    // 32 KiB of life slots.)
    let around = 4096 + 32 * 1024;
    for (capacity, len) in [
        (2u64 << 20, around + (2 << 20)),
        (16, around + 16),
        (256 << 20, around + (256 << 20)),
    ] {
        let q: Queue<u64> = Queue::new().expect("queue");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&q)
            ))
            .expect("open segment");
        std::os::unix::fs::FileExt::write_all_at(&file, &capacity.to_le_bytes(), 16)
            .expect("write");
        file.set_len(len).expect("truncate");
        let child = Builder::new()
            .start_method(StartMethod::Spawn)
            .spawn_entry(queue_size, q)
            .expect("spawn");
        match (capacity, child.join()) {
            (0x20_0000, Ok(1)) => {}
            (0x20_0000, other) => panic!("the control failed: {other:?}"),
            (_, Err(JoinError::Decode(e))) => {
                assert!(e.to_string().contains("arguments"), "{e}")
            }
            (_, other) => panic!("expected a decode error, got {other:?}"),
        }
    }
}

fn nap_for(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// In a fresh process: its first two starts, from two threads at once.
fn two_first_starts(_: ()) -> (usize, Vec<String>) {
    let barrier = std::sync::Barrier::new(2);
    let handles: Vec<_> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..2)
            .map(|_| {
                scope.spawn(|| {
                    barrier.wait();
                    Builder::new()
                        .start_method(StartMethod::Spawn)
                        .spawn_entry(nap_for, 150)
                        .expect("spawn")
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    let live = proc::active_children().len();
    let joined = handles
        .into_iter()
        .map(|h| format!("{:?}", h.join()))
        .collect();
    (live, joined)
}

fn first_starts_from_two_threads_at_once() {
    // Each round is a fresh process whose child table is not yet its own:
    // both threads' first starts must get slots of their own (a second
    // reset of the table would hand the first one's slot out again).
    for _ in 0..8 {
        let (live, joined) = in_fresh_process(two_first_starts);
        assert_eq!(live, 2, "{joined:?}");
        assert_eq!(joined, ["Ok(150)", "Ok(150)"]);
    }
}

/// In a fresh process: a thread starts a fork-server child, a fork-server
/// daemon and a Spawn daemon, hands them over and ends.
fn started_from_a_thread(_: ()) -> Vec<String> {
    let handles = std::thread::spawn(|| {
        let server = || Builder::new().start_method(StartMethod::ForkServer);
        let started = (
            server().spawn_entry(nap_for, 400).expect("spawn"),
            server()
                .daemon(true)
                .spawn_entry(nap_for, 60_000)
                .expect("spawn"),
            Builder::new()
                .start_method(StartMethod::Spawn)
                .daemon(true)
                .spawn_entry(nap_for, 60_000)
                .expect("spawn"),
        );
        // Until the children are set up (an exec'd one arms its death
        // signal after its start-up).
        std::thread::sleep(Duration::from_millis(150));
        started
    })
    .join()
    .expect("thread");
    let (child, server_daemon, spawn_daemon) = handles;
    // The thread is gone; none of them may have gone with it.
    std::thread::sleep(Duration::from_millis(150));
    let mut out = vec![
        format!("{}", server_daemon.is_finished()),
        format!("{}", spawn_daemon.is_finished()),
    ];
    out.push(format!("{:?}", child.join()));
    for daemon in [server_daemon, spawn_daemon] {
        daemon.terminate().expect("terminate");
        out.push(format!("{:?}", daemon.join()));
    }
    out
}

fn starts_from_a_thread_that_ends_live_on() {
    // The kernel's parent-death signal follows the thread that forked: a
    // fork server (and its children) or a daemon tied to it would die when
    // that thread ends, though the program runs on.
    let out = in_fresh_process(started_from_a_thread);
    assert_eq!(
        out,
        [
            "false",
            "false",
            "Ok(400)",
            "Err(Signaled { signal: 15, core_dumped: false })",
            "Err(Signaled { signal: 15, core_dumped: false })"
        ]
    );
}

fn signalling_an_ended_child_is_harmless() {
    // Python's terminate() and kill() do nothing once the process is gone;
    // a fork-server child is gone (reaped by the server) soon after it ends.
    let child = spawn().spawn_entry(nap_for, 0).expect("spawn");
    assert!(child
        .wait_ended_timeout(Duration::from_secs(5))
        .expect("wait"));
    std::thread::sleep(Duration::from_millis(100));
    child.terminate().expect("terminate");
    child.kill().expect("kill");
    assert_eq!(child.join().expect("join"), 0);
}

/// In a fresh process (so /dev/null is not open yet): more failed starts
/// than the child table has slots, then one that must work.
fn fail_then_start(_: ()) -> String {
    let worked = common::without_spare_descriptors(|| {
        (0..16_500).find_map(|i| {
            // (Unchecked: the thread check reads /proc, which needs a
            // descriptor too. This process is single-threaded.)
            // SAFETY: no other thread exists.
            unsafe { Builder::new().spawn_unchecked(|| ()) }
                .ok()
                .map(|child| (i, child))
        })
    });
    if let Some((i, child)) = worked {
        let _ = child.join();
        return format!("start {i} worked with no descriptor to spare");
    }
    match proc::spawn(|| 5u8) {
        Ok(child) => format!("{:?}", child.join()),
        Err(e) => format!("{e:?}"),
    }
}

/// Its OS parent (for a fork-server child, the server).
fn parent_of_mine(_: ()) -> u32 {
    proc::getppid().as_u32()
}

/// In a fresh process: a ForkServer start while this process has only
/// two descriptor numbers to spare. The word about the server's next
/// spare (a pidfd and a channel) cannot be received whole then: that is
/// this side's trouble, not the server's end — the server (and the
/// daemon child it runs) must stay, and the next start use it.
fn emfile_while_receiving_keeps_the_server(_: ()) -> String {
    let start = |ms: u64, daemon: bool| {
        Builder::new()
            .daemon(daemon)
            .start_method(StartMethod::ForkServer)
            .spawn_entry(nap_then, ms)
    };
    for _ in 0..2 {
        start(0, false).expect("start").join().expect("join");
    }
    let daemon = start(30_000, true).expect("daemon");
    let server = common::ppid_of(daemon.pid().as_u32());
    let open: std::collections::HashSet<i32> = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    let mut free = 0;
    let limit = (0..)
        .find(|n| {
            free += usize::from(!open.contains(n));
            free == 2
        })
        .expect("a limit")
        + 1;
    let tried =
        common::with_descriptor_limit(limit as u64, || start(0, false).map(|child| child.join()));
    let again = Builder::new()
        .start_method(StartMethod::ForkServer)
        .spawn_entry(parent_of_mine, ())
        .expect("a start after")
        .join()
        .expect("join");
    let same_server = Some(again) == server;
    let daemon_alive = common::proc_state(daemon.pid().as_u32()).is_some_and(|s| s != 'Z');
    daemon.kill().expect("kill");
    let _ = daemon.join();
    format!(
        "same server {same_server}, daemon alive {daemon_alive}, tried {}",
        tried.is_err()
    )
}

fn emfile_keeps_the_server() {
    let out = in_fresh_process(emfile_while_receiving_keeps_the_server);
    assert!(
        out.starts_with("same server true, daemon alive true"),
        "{out}"
    );
}

fn stdin_target(_: ()) -> String {
    std::fs::read_link("/proc/self/fd/0")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// A zygote made while the program's stdin is a pipe (a terminal, say):
/// its children read `/dev/null`, as other children do.
fn a_zygotes_children_read_dev_null() {
    let mut ends = [0; 2];
    // SAFETY: valid out-array; the descriptors are closed below. This
    // runner is single-threaded, so fd 0 changes under nobody.
    let zygote = unsafe {
        assert_eq!(libc::pipe(ends.as_mut_ptr()), 0);
        let saved = libc::dup(0);
        libc::dup2(ends[0], 0);
        let zygote = proc::Zygote::new();
        libc::dup2(saved, 0);
        libc::close(saved);
        libc::close(ends[0]);
        libc::close(ends[1]);
        zygote
    };
    let zygote = zygote.expect("zygote");
    let got = zygote
        .spawn_entry(Builder::new(), stdin_target, ())
        .expect("spawn")
        .join()
        .expect("join");
    assert_eq!(got, "/dev/null");
}

fn failed_starts_leak_no_slot() {
    let out = in_fresh_process(fail_then_start);
    assert_eq!(out, "Ok(5)");
}

fn a_forked_copy_of_a_handle_takes_no_status() {
    // A fork-server child's handle copied into a forked child: waiting on
    // the copy must not read the status the server reports to the owner.
    let mut child = Builder::new()
        .start_method(StartMethod::ForkServer)
        .spawn_entry(leave, 3)
        .expect("spawn");
    // (The forked child works on its copy of this process's memory.)
    let copy_saw = proc::spawn(|| format!("{:?}", child.wait()))
        .expect("spawn")
        .join()
        .expect("join");
    assert_eq!(copy_saw, "Err(StatusLost)");
    let status = child.wait().expect("the owner's status");
    assert_eq!(status.code(), Some(3));
}

extern "C" fn on_signal_with_info(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The flags and handler of `signal`'s action in this process.
fn action_of(signal: libc::c_int) -> (libc::c_int, bool) {
    // SAFETY: a zeroed sigaction is valid storage.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`.
    unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) };
    (
        old.sa_flags & (libc::SA_SIGINFO | libc::SA_NOCLDSTOP),
        old.sa_sigaction == on_signal_with_info as *const () as usize,
    )
}

/// Per signal: its SA_SIGINFO / SA_NOCLDSTOP flags, whether its handler
/// is `on_signal_with_info`.
type Actions = Vec<(libc::c_int, bool)>;

fn report_actions(_: ()) -> Actions {
    vec![action_of(libc::SIGCHLD), action_of(libc::SIGINT)]
}

/// In a fresh process: SIGCHLD and SIGINT handlers with SA_SIGINFO (and
/// SA_NOCLDSTOP), then a zygote's child reports what it has.
fn zygote_child_actions(_: ()) -> (Actions, Actions) {
    for (signal, extra) in [(libc::SIGCHLD, libc::SA_NOCLDSTOP), (libc::SIGINT, 0)] {
        // SAFETY: a zeroed sigaction is valid.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_signal_with_info as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | extra;
        // SAFETY: a valid action whose handler does nothing.
        unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) };
    }
    let here = report_actions(());
    let zygote = proc::Zygote::new().expect("zygote");
    let there = zygote
        .spawn_entry(Builder::new(), report_actions, ())
        .expect("spawn")
        .join()
        .expect("join");
    (here, there)
}

fn a_zygotes_children_get_the_programs_signal_actions() {
    // A zygote changes SIGINT, SIGPIPE and SIGCHLD for itself; its children
    // get the program's actions back whole, flags included (as children
    // forked by the program would have them).
    let (here, there) = in_fresh_process(zygote_child_actions);
    assert_eq!(
        here,
        [
            (libc::SA_SIGINFO | libc::SA_NOCLDSTOP, true),
            (libc::SA_SIGINFO, true)
        ]
    );
    assert_eq!(there, here);
}

fn parent_of_me(_: ()) -> Option<(String, bool)> {
    proc::parent_process().map(|p| (p.name().to_owned(), p.daemon()))
}

fn parent_process_names_the_parent() {
    // A child named "outer" (a daemon) starts an entry: the entry's
    // parent_process() is "outer", as in Python, not a fresh MainProcess.
    let method = METHOD.load(Ordering::Relaxed);
    let seen = Builder::new()
        .name("outer")
        .daemon(true)
        .spawn(move || {
            METHOD.store(method, Ordering::Relaxed);
            spawn()
                .spawn_entry(parent_of_me, ())
                .expect("spawn")
                .join()
                .expect("join")
        })
        .expect("spawn")
        .join()
        .expect("join");
    assert_eq!(seen, Some(("outer".to_owned(), true)));
}

fn nothing(_: ()) {}

fn number_of(name: &str) -> u32 {
    name.rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("Process-N")
}

fn a_process_objects_entry_start_keeps_names_consecutive() {
    // A Process object takes its name when it is made; starting it as an
    // entry (the process-class pattern) must not take another number.
    let mut p = proc::Process::new(|| ());
    let first = number_of(p.name());
    let handle = p
        .prepare_start()
        .expect("prepare")
        .start_method(StartMethod::Spawn)
        .spawn_entry(nothing, ())
        .expect("spawn");
    p.attach(handle).expect("attach");
    p.join().expect("join");
    let q = proc::Process::new(|| ());
    assert_eq!(
        number_of(q.name()),
        first + 1,
        "{} after {}",
        q.name(),
        p.name()
    );
}

/// Starts that go to the offered spare directly; the child often ends
/// before the server has read the requester's word that it was taken.
fn quick_ends(_: ()) -> Vec<String> {
    let mut wrong = Vec::new();
    let server = || Builder::new().start_method(StartMethod::ForkServer);
    let zygote = proc::Zygote::new().expect("zygote");
    for round in 0..40 {
        let code = 10 + round % 7;
        let via_server = server().spawn_entry(leave, code).expect("spawn").join();
        let via_zygote = zygote
            .spawn_entry(Builder::new(), leave, code)
            .expect("spawn")
            .join();
        for (who, got) in [("server", via_server), ("zygote", via_zygote)] {
            if !matches!(got, Err(JoinError::Exited { code: c }) if c == code) {
                wrong.push(format!("{who} round {round}: {got:?}"));
            }
        }
    }
    wrong
}

fn quick_ends_through_the_spare_report_their_statuses() {
    let wrong = in_fresh_process(quick_ends);
    assert!(wrong.is_empty(), "{wrong:?}");
}

/// A start after the fork server was killed while its spare was offered
/// to this process: an error (nothing on the way raises SIGPIPE, which is
/// at its default here, as many command-line programs set it), then a new
/// server.
fn after_a_dead_server(_: ()) -> (String, String) {
    // SAFETY: SIG_DFL is a valid disposition; this process is fresh and
    // single-threaded.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let server = || Builder::new().start_method(StartMethod::ForkServer);
    // Two starts: the server has made and offered its spare.
    server()
        .spawn_entry(nap, 0)
        .expect("spawn")
        .join()
        .expect("join");
    let child = server().spawn_entry(nap, 300).expect("spawn");
    let pid = common::ppid_of(child.pid().as_u32()).expect("server");
    child.join().expect("join");
    // SAFETY: a plain kill of this process's own fork server.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(pid).is_none_or(|s| s == 'Z')
    }));
    let first = server().spawn_entry(leave, 3).map(|c| c.join());
    let second = server().spawn_entry(leave, 4).map(|c| c.join());
    (format!("{:?}", first.map(|_| ())), format!("{second:?}"))
}

fn a_dead_server_with_a_spare_offered_is_an_error() {
    let (first, second) = in_fresh_process(after_a_dead_server);
    assert!(first.starts_with("Err(Exec"), "{first}");
    assert_eq!(second, "Ok(Err(Exited { code: 4 }))");
}

fn nap_then(ms: u64) -> u64 {
    nap(ms);
    ms + 1
}

/// A child handed to the zygote's spare, the zygote dropped right after:
/// the child is not a daemon, so it runs to its end and its value comes
/// back (the spare must not die with the zygote once it took a request).
fn a_direct_start_outlives_its_dropped_zygote() {
    for round in 0..12 {
        let zygote = proc::Zygote::new().expect("zygote");
        // Two starts: the zygote has made and offered its spare.
        for _ in 0..2 {
            zygote
                .spawn_entry(Builder::new(), nap, 0)
                .expect("spawn")
                .join()
                .expect("join");
        }
        let child = zygote
            .spawn_entry(Builder::new(), nap_then, 20)
            .expect("spawn");
        drop(zygote);
        assert_eq!(child.join().expect("join"), 21, "round {round}");
    }
}

/// A zygote killed while its child (not a daemon) runs: the child runs on,
/// and its handle says so until it ends (what is lost with the zygote is
/// the status it would have reported, not the child).
fn a_child_outlives_its_killed_zygote() {
    let zygote = proc::Zygote::new().expect("zygote");
    let mut child = zygote
        .spawn_entry(Builder::new(), nap_then, 600)
        .expect("spawn");
    let zpid = zygote.pid().as_u32();
    // SAFETY: a plain kill of the zygote made above.
    unsafe { libc::kill(zpid as libc::pid_t, libc::SIGKILL) };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::proc_state(zpid).is_none_or(|s| s == 'Z')
    }));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "{:?}",
        child.try_wait()
    );
    assert!(!child.is_finished());
    assert!(matches!(
        child.wait_timeout(Duration::from_millis(20)),
        Ok(None)
    ));
    assert_eq!(child.join().expect("join"), 601);
    drop(zygote);
}

fn put_in_each(queues: Vec<Queue<u64>>) -> usize {
    for (i, q) in queues.iter().enumerate() {
        q.put(i as u64).expect("put");
    }
    queues.len()
}

/// A start whose arguments share many descriptors (one per queue): 100
/// cross (more than one message's old 64-descriptor buffer held) through
/// the server, its spare and a zygote; more than one message can carry is
/// a clear error, and the server goes on serving.
fn many_shared_descriptors_cross_or_are_refused() {
    let make = |n: usize| -> Vec<Queue<u64>> {
        (0..n)
            .map(|_| Queue::builder().capacity(4096).build().expect("queue"))
            .collect()
    };
    let server = || Builder::new().start_method(StartMethod::ForkServer);
    let zygote = proc::Zygote::new().expect("zygote");
    // Three starts each way: the third goes to the offered spare.
    for round in 0..3 {
        let queues = make(100);
        let via_server = server()
            .spawn_entry(put_in_each, queues.clone())
            .expect("spawn");
        assert_eq!(via_server.join().expect("join"), 100, "round {round}");
        let via_zygote = zygote
            .spawn_entry(Builder::new(), put_in_each, queues.clone())
            .expect("spawn");
        assert_eq!(via_zygote.join().expect("join"), 100, "round {round}");
        for (i, q) in queues.iter().enumerate() {
            assert_eq!(q.try_get().ok(), Some(i as u64));
            assert_eq!(q.try_get().ok(), Some(i as u64));
        }
    }
    let too_many = make(251);
    match server().spawn_entry(put_in_each, too_many.clone()) {
        Err(proc::SpawnError::Encode(message)) => {
            assert!(message.contains("251 descriptors"), "{message}")
        }
        other => panic!("expected an Encode error, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(
        zygote.spawn_entry(Builder::new(), put_in_each, too_many),
        Err(proc::SpawnError::Encode(_))
    ));
    assert_eq!(
        server()
            .spawn_entry(put_in_each, make(3))
            .expect("spawn")
            .join()
            .expect("join"),
        3
    );
}

/// In a fresh process: a daemon forked (`spawn_unchecked`) on a thread
/// that then ends; the death signal would follow that thread.
fn fork_daemon_from_a_thread(_: ()) -> String {
    let child = std::thread::spawn(|| {
        // SAFETY: the closure only sleeps and returns a number; this
        // process's other thread holds no lock meanwhile.
        unsafe {
            Builder::new()
                .daemon(true)
                .spawn_unchecked(|| nap_then(300))
        }
        .expect("spawn")
    })
    .join()
    .expect("thread");
    format!("{:?}", child.join())
}

fn a_daemon_forked_on_a_thread_outlives_the_thread() {
    assert_eq!(in_fresh_process(fork_daemon_from_a_thread), "Ok(301)");
}

fn sum_bytes(bytes: Vec<u8>) -> (usize, u64) {
    (bytes.len(), bytes.iter().map(|&b| u64::from(b)).sum())
}

/// Requests from empty to 300 kB (each travels in a memfd), through the
/// fork server (forked and spare children) and a zygote.
fn small_and_large_requests_cross() {
    let server = || Builder::new().start_method(StartMethod::ForkServer);
    let zygote = proc::Zygote::new().expect("zygote");
    for len in [0usize, 100, 8 << 10, (8 << 10) + 1, 300_000] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let want = sum_bytes(bytes.clone());
        for round in 0..3 {
            let got = server()
                .spawn_entry(sum_bytes, bytes.clone())
                .expect("spawn")
                .join()
                .expect("join");
            assert_eq!(got, want, "server, {len} bytes, round {round}");
            let got = zygote
                .spawn_entry(Builder::new(), sum_bytes, bytes.clone())
                .expect("spawn")
                .join()
                .expect("join");
            assert_eq!(got, want, "zygote, {len} bytes, round {round}");
        }
    }
}

/// A storm of SIGUSR2, with a handler installed without SA_RESTART: a
/// POSIX timer of this process sends it every 20 µs, and the handler (in
/// this process only) passes each one on to the processes in `STORM_TO`
/// (a zygote, a queue's producer). Ended, and SIGUSR2 ignored, when the
/// guard drops (a panic included).
struct Storm {
    timer: libc::timer_t,
}

static STORM_FROM: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
static STORM_TO: [std::sync::atomic::AtomicI32; 2] = [
    std::sync::atomic::AtomicI32::new(0),
    std::sync::atomic::AtomicI32::new(0),
];
static STORM_SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn storm_signal(_: libc::c_int) {
    STORM_SEEN.fetch_add(1, Ordering::Relaxed);
    // SAFETY: getpid and kill are async-signal-safe. Only the storm's own
    // process passes signals on (forked copies inherit this handler), and
    // only to processes it has not reaped yet (see `Storm::pass_to`).
    unsafe {
        if libc::getpid() == STORM_FROM.load(Ordering::Relaxed) {
            for to in &STORM_TO {
                let pid = to.load(Ordering::Relaxed);
                if pid > 0 {
                    libc::kill(pid, libc::SIGUSR2);
                }
            }
        }
    }
}

impl Storm {
    fn start() -> Storm {
        // SAFETY: getpid changes no memory.
        STORM_FROM.store(unsafe { libc::getpid() }, Ordering::Relaxed);
        // SAFETY: a plain sigaction for SIGUSR2 with an async-signal-safe
        // handler, and a POSIX timer of this process sending it; both are
        // undone by drop.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = storm_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = 0; // no SA_RESTART
            libc::sigemptyset(&mut action.sa_mask);
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_SIGNAL;
            event.sigev_signo = libc::SIGUSR2;
            let mut timer: libc::timer_t = std::mem::zeroed();
            assert_eq!(
                libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer),
                0
            );
            let every = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000,
            };
            let spec = libc::itimerspec {
                it_interval: every,
                it_value: every,
            };
            assert_eq!(
                libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()),
                0
            );
            Storm { timer }
        }
    }

    /// Passes the signals on to `pid` too (slot `i`; 0 stops). A process
    /// must be taken off before it is reaped: its pid could be reused.
    fn pass_to(&self, i: usize, pid: u32) {
        STORM_TO[i].store(pid as i32, Ordering::Relaxed);
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        for to in &STORM_TO {
            to.store(0, Ordering::Relaxed);
        }
        // SAFETY: the timer made in start; SIGUSR2 ignored rather than
        // reset (its default action would end this process if one were
        // still pending).
        unsafe {
            libc::timer_delete(self.timer);
            libc::signal(libc::SIGUSR2, libc::SIG_IGN);
        }
    }
}

/// In a fresh process under a [`Storm`]: the requester's receives from
/// the fork server and a zygote (and its waits for statuses, its futex
/// waits on a queue) fail with EINTR again and again, and so do the
/// zygote's own receives and polls (the signals are passed on to it) and
/// a producer's blocking puts into a full queue (passed on to it too).
/// Starts through every path and the queue's messages must go on as if
/// nothing happened. (The fork server and its children, exec'd, get
/// none.) Returns what went wrong, and how many signals arrived.
fn under_a_signal_storm(_: ()) -> (Vec<String>, u64) {
    // The storm first: the zygote must inherit the handler (SIGUSR2's
    // default action would end it).
    let storm = Storm::start();
    let zygote = proc::Zygote::new().expect("zygote");
    storm.pass_to(0, zygote.pid().as_u32());
    let mut wrong = Vec::new();
    for round in 0..60u32 {
        let code = 10 + (round % 7) as i32;
        let starts = [
            (
                "server",
                Builder::new()
                    .start_method(StartMethod::ForkServer)
                    .spawn_entry(leave, code),
            ),
            ("zygote", zygote.spawn_entry(Builder::new(), leave, code)),
            (
                "fork",
                Builder::new()
                    .start_method(StartMethod::Fork)
                    .spawn_entry(leave, code),
            ),
        ];
        for (who, started) in starts {
            match started.map(|h| h.join()) {
                Ok(Err(JoinError::Exited { code: c })) if c == code => {}
                other => wrong.push(format!("{who} round {round}: {other:?}")),
            }
        }
        if round % 20 == 0 {
            match Builder::new()
                .start_method(StartMethod::Spawn)
                .spawn_entry(leave, code)
            {
                Ok(h) => match h.join() {
                    Err(JoinError::Exited { code: c }) if c == code => {}
                    other => wrong.push(format!("spawn round {round}: {other:?}")),
                },
                Err(e) => wrong.push(format!("spawn round {round}: {e:?}")),
            }
        }
    }
    // A queue's blocking put and get, across processes: the producer (a
    // fork, which keeps the handler) fills a small ring and waits for
    // room while the signals reach it; this process waits for data.
    storm.pass_to(0, 0);
    let q: Queue<u64> = Queue::builder().capacity(4096).build().expect("queue");
    let producer = q.clone();
    let child = Builder::new()
        .start_method(StartMethod::Fork)
        .spawn_entry(produce, (producer, 20_000))
        .expect("spawn");
    storm.pass_to(1, child.pid().as_u32());
    let mut sum = 0;
    for i in 0..20_000 {
        if i % 2_000 == 0 {
            // Let the ring fill: the producer waits for room. (Not
            // `thread::sleep`: a relative sleep re-entered after every
            // signal makes no progress once the handler takes longer
            // than the signals' interval.)
            let until = std::time::Instant::now() + Duration::from_millis(2);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        match q.get() {
            Ok(v) => sum += v,
            Err(e) => {
                wrong.push(format!("get: {e:?}"));
                break;
            }
        }
    }
    storm.pass_to(1, 0);
    if sum != 20_000 * 19_999 / 2 {
        wrong.push(format!("queue sum {sum}"));
    }
    if let Err(e) = child.join() {
        wrong.push(format!("producer: {e:?}"));
    }
    drop(storm);
    drop(zygote);
    (wrong, STORM_SEEN.load(Ordering::Relaxed))
}

fn starts_and_queues_survive_a_storm_of_signals() {
    let (wrong, signals) = in_fresh_process(under_a_signal_storm);
    assert!(
        wrong.is_empty(),
        "{} failures under {signals} signals: {wrong:?}",
        wrong.len()
    );
    // (Hundreds of thousands where timers are fine-grained; a coarse
    // kernel tick still gives a few hundred.)
    assert!(signals > 100, "only {signals} signals arrived");
}
