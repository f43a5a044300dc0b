//! Every syscall and every `unsafe` block of `proc-core`.
//!
//! The split follows std's `process.rs` / `sys::process`: the rest of the
//! crate calls the small, safe wrappers below and never touches `libc`
//! directly. Each wrapper documents which of its callers' invariants it
//! relies on.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// The result of [`fork`], seen from each side.
pub(crate) enum Fork {
    /// In the parent: the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// Proof that forking and then running arbitrary code in the child is
/// sound: the process had one thread when it was made, or the caller of an
/// unsafe API vouched for it.
pub(crate) struct ForkPermit(());

impl ForkPermit {
    /// Checks that this process has exactly one thread.
    ///
    /// A second thread could only be started by this very thread, which is
    /// busy forking, so the answer holds until the fork.
    ///
    /// A thread that was just joined has left user space for good, but the
    /// kernel counts it until its task is released, which on a busy machine
    /// can take milliseconds. Once such a thread has dropped its address
    /// space (its `vsize` in `/proc/self/task/<tid>/stat` is 0) it can never
    /// run user code again, so when the quick count says more than 1, the
    /// threads are counted one by one, ignoring those, for up to
    /// `SETTLE`. The joiner is woken a moment before the exiting thread
    /// drops its address space; if the exiting thread is preempted in
    /// between, that moment lasts a scheduler slice (2 ms was seen to be
    /// too short under load). Only a process that really has other threads
    /// pays the wait, before its `Threaded` error.
    pub(crate) fn single_threaded() -> Result<ForkPermit, ThreadCheck> {
        match thread_count() {
            Ok(1) => return Ok(ForkPermit(())),
            Ok(_) => {}
            Err(e) => return Err(ThreadCheck::Unknown(e)),
        }
        let since = std::time::Instant::now();
        loop {
            match threads_with_memory() {
                Ok(1) => return Ok(ForkPermit(())),
                Ok(threads) if since.elapsed() > SETTLE => {
                    return Err(ThreadCheck::Threaded(threads))
                }
                Ok(_) => std::thread::yield_now(),
                Err(e) => return Err(ThreadCheck::Unknown(e)),
            }
        }
    }

    /// A permit without the check.
    ///
    /// # Safety
    ///
    /// After the fork only the calling thread exists in the child. The
    /// caller guarantees that the child does nothing that could wait on a
    /// lock or observe state that another thread of the parent held or was
    /// changing at the moment of the fork.
    pub(crate) unsafe fn assume_fork_safe() -> ForkPermit {
        ForkPermit(())
    }
}

/// How long a thread count above 1 is re-checked (see `single_threaded`).
const SETTLE: Duration = Duration::from_millis(25);

/// Why [`ForkPermit::single_threaded`] refused.
pub(crate) enum ThreadCheck {
    /// The process has this many threads.
    Threaded(usize),
    /// `/proc/self/stat` could not be read.
    Unknown(io::Error),
}

/// Forks the calling process; `permit` shows that the child may run
/// arbitrary code.
#[allow(clippy::disallowed_methods)] // the one place allowed to fork
pub(crate) fn fork(permit: ForkPermit) -> io::Result<Fork> {
    let ForkPermit(()) = permit;
    // SAFETY: fork has no memory-safety preconditions of its own; what may
    // run in the child afterwards is covered by the permit (one thread, or
    // the unsafe caller's promise).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// `/proc/self/task`, opened once per process: `self` is resolved at open
/// time, so a forked child (another pid) opens its own.
static TASK_DIR: parking_lot::Mutex<Option<(libc::pid_t, std::fs::File)>> =
    parking_lot::const_mutex(None);

/// The number of threads of this process.
///
/// procfs gives the `task` directory a link count of 2 + the number of
/// threads (`proc_task_getattr`), so one `fstat` answers; where that count
/// looks wrong, field 20 of `/proc/self/stat` does (slower: it takes the
/// task list lock).
fn thread_count() -> io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let me = getpid();
    let mut guard = TASK_DIR.lock();
    let dir = match &*guard {
        Some((pid, dir)) if *pid == me => dir,
        _ => {
            &guard
                .insert((me, std::fs::File::open("/proc/self/task")?))
                .1
        }
    };
    let links = dir.metadata()?.nlink();
    if links >= 3 {
        return Ok((links - 2) as usize);
    }
    let stat = std::fs::read("/proc/self/stat")?;
    parse_thread_count(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/self/stat"))
}

/// The threads of this process that still have an address space (that can
/// still run user code), counted one by one in `/proc/self/task`.
fn threads_with_memory() -> io::Result<usize> {
    let mut count = 0;
    for entry in std::fs::read_dir("/proc/self/task")? {
        let mut path = entry?.path();
        path.push("stat");
        // A thread that ended between the listing and the read is gone.
        let Ok(stat) = std::fs::read(&path) else {
            continue;
        };
        if stat_field(&stat, 23).is_some_and(|vsize| vsize != 0) {
            count += 1;
        }
    }
    Ok(count)
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/<pid>/stat` line, for
/// fields after the command name.
fn stat_field(stat: &[u8], n: usize) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or
    // parentheses itself: fields are counted from the last ')'.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After the name come field 3 (state), 4, ...
    rest.split_ascii_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()
}

/// Field 20 (`num_threads`) of a `/proc/<pid>/stat` line.
fn parse_thread_count(stat: &[u8]) -> Option<usize> {
    stat_field(stat, 20).and_then(|n| usize::try_from(n).ok())
}

/// Creates an anonymous in-memory file (close-on-exec) that carries a
/// child's result back to its parent.
pub(crate) fn memfd(name: &CStr) -> io::Result<std::fs::File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of
    // the call; the flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // (A start may keep it open across an exec under its own number.)
    Ok(std::fs::File::from(above_stdio(fd)?))
}

fn status_from_raw(raw: libc::c_int) -> ExitStatus {
    ExitStatus::from_raw(raw)
}

/// What a non-blocking `waitpid` found.
pub(crate) enum Reap {
    /// The child had exited and is now reaped.
    Exited(ExitStatus),
    /// The child is still running.
    Running,
    /// There is no such child (already reaped, or SIGCHLD is ignored).
    NoChild,
}

/// `waitpid(pid, WNOHANG)`, async-signal-safe (used by the SIGCHLD handler).
pub(crate) fn waitpid_nohang(pid: libc::pid_t) -> io::Result<Reap> {
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: `raw` is a valid out-pointer for the call.
        let r = unsafe { libc::waitpid(pid, &mut raw, libc::WNOHANG) };
        if r == pid {
            return Ok(Reap::Exited(status_from_raw(raw)));
        }
        if r == 0 {
            return Ok(Reap::Running);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(Reap::NoChild),
            _ => return Err(err),
        }
    }
}

/// `waitpid(pid, 0)`: blocks until the child exits and reaps it.
pub(crate) fn waitpid_blocking(pid: libc::pid_t) -> io::Result<Reap> {
    loop {
        let mut raw: libc::c_int = 0;
        // SAFETY: `raw` is a valid out-pointer for the call.
        let r = unsafe { libc::waitpid(pid, &mut raw, 0) };
        if r == pid {
            return Ok(Reap::Exited(status_from_raw(raw)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => return Ok(Reap::NoChild),
            _ => return Err(err),
        }
    }
}

/// The exit status of the child `pid` if it has exited, without reaping it
/// (`waitid(P_PID, WEXITED | WNOHANG | WNOWAIT)`); `Ok(None)` while it
/// runs. `Err` with `ECHILD` if there is no such child.
pub(crate) fn peek_exit(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid out-pointer; the id type and flags are valid.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid filled `info`; si_pid is 0 when no child changed state.
        if unsafe { info.si_pid() } == 0 {
            return Ok(None);
        }
        // SAFETY: for a child that exited, si_status holds its exit code or
        // the signal that ended it, as si_code says.
        let value = unsafe { info.si_status() };
        let raw = match info.si_code {
            libc::CLD_EXITED => (value & 0xff) << 8,
            libc::CLD_DUMPED => value | 0x80,
            _ => value,
        };
        return Ok(Some(status_from_raw(raw)));
    }
}

/// Whether the child `pid` has exited (or is no longer ours), without
/// reaping it.
pub(crate) fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    match peek_exit(pid) {
        Ok(status) => Ok(status.is_some()),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Opens a pidfd for `pid`; `Ok(None)` where the kernel has no `pidfd_open`.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS) => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(true)` if readable.
/// `Ok(false)` also when a signal cut the wait short (EINTR): it does not
/// mean the timeout passed, and every caller re-checks its own deadline
/// (as `handle::poll_until` does).
pub(crate) fn poll_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Duration,
) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // Round up so that a wait is never shorter than asked.
    let ms = if Duration::from_millis(ms as u64) < timeout {
        ms.saturating_add(1)
    } else {
        ms
    };
    // SAFETY: `pfd` is one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(r > 0)
}

/// Sends `signal` to `pid`.
pub(crate) fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's id.
pub(crate) fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail and has no preconditions.
    unsafe { libc::getpid() }
}

/// This process's id as last read: 0 until then, and again in a forked
/// child (a fork handler clears it there).
static PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forget_pid() {
    // Async-signal-safe: one atomic store.
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// This process's id without a system call on every use (the pool asks
/// on every check of its workers). A child forked by `fork()` (glibc runs
/// the handler) reads it afresh; one made by a raw `clone` without the
/// handler would see its parent's.
pub(crate) fn cached_pid() -> libc::pid_t {
    use std::sync::atomic::Ordering;
    let pid = PID.load(Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    static HANDLER: std::sync::Once = std::sync::Once::new();
    HANDLER.call_once(|| {
        // SAFETY: registers a handler that only stores to an atomic (so
        // it is async-signal-safe, as a child handler must be); it stays
        // valid for the life of the program.
        unsafe { libc::pthread_atfork(None, None, Some(forget_pid)) };
    });
    let pid = getpid();
    PID.store(pid, Ordering::Relaxed);
    pid
}

/// Whether the calling thread is the process's main thread (whose end is
/// the process's end).
pub(crate) fn on_main_thread() -> bool {
    // SAFETY: gettid cannot fail and has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    tid == libc::c_long::from(cached_pid())
}

/// The parent's process id.
pub(crate) fn getppid() -> libc::pid_t {
    // SAFETY: getppid cannot fail and has no preconditions.
    unsafe { libc::getppid() }
}

/// Asks the kernel to send `signal` to this process when its parent dies.
pub(crate) fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number as its one argument.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Points standard input at `null`, an open `/dev/null` (a child gets no
/// terminal input, as in Python).
pub(crate) fn stdin_from_dev_null(null: &std::fs::File) -> io::Result<()> {
    // SAFETY: both descriptors are open; dup2 replaces fd 0 atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ends this process at once with `code`: no exit handlers, no unwinding
/// into the frames a forked child shares with its parent.
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Registers `hook` to run at normal process exit (`atexit`).
pub(crate) fn at_exit(hook: extern "C" fn()) -> io::Result<()> {
    // SAFETY: `hook` is a plain function that lives for the whole program.
    if unsafe { libc::atexit(hook) } == 0 {
        Ok(())
    } else {
        Err(io::Error::other("atexit failed"))
    }
}

// The SIGCHLD handler that was in place before ours, called after ours so
// that a program's own handler keeps working. Written once, before our
// handler is installed, and only read afterwards.
static SIGCHLD_INSTALL: parking_lot::Mutex<()> = parking_lot::const_mutex(());
static PREVIOUS_SIGCHLD_FN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PREVIOUS_SIGCHLD_SIGINFO: AtomicBool = AtomicBool::new(false);
static SIGCHLD_INSTALLED: AtomicBool = AtomicBool::new(false);
static SIGCHLD_REAP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn on_sigchld(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno slot; saving and
    // restoring it keeps the interrupted code's errno intact.
    let errno = unsafe { *libc::__errno_location() };
    // SYNC: pairs with the Release store in install_sigchld_reaper.
    let reap = SIGCHLD_REAP.load(Ordering::Acquire);
    if reap != 0 {
        // SAFETY: the value was stored from a `fn()` in install_sigchld_reaper.
        let reap: fn() = unsafe { std::mem::transmute::<usize, fn()>(reap) };
        reap();
    }
    // SYNC: pairs with the Release store in install_sigchld_reaper.
    let prev = PREVIOUS_SIGCHLD_FN.load(Ordering::Acquire);
    if prev != 0 {
        if PREVIOUS_SIGCHLD_SIGINFO.load(Ordering::Relaxed) {
            // SAFETY: `prev` is the sa_sigaction of the previous handler,
            // installed with SA_SIGINFO, called with the arguments we got.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev) };
            f(sig, info, ctx);
        } else {
            // SAFETY: `prev` is the sa_handler of the previous handler.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev) };
            f(sig);
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// A signal's disposition: [`IGNORE`](Disposition::IGNORE),
/// [`DEFAULT`](Disposition::DEFAULT), or one [`set_disposition`] returned
/// (so never an arbitrary address).
#[derive(Clone, Copy)]
pub(crate) struct Disposition(libc::sighandler_t);

impl Disposition {
    /// The signal is ignored.
    pub(crate) const IGNORE: Disposition = Disposition(libc::SIG_IGN);
    /// The signal's default action.
    pub(crate) const DEFAULT: Disposition = Disposition(libc::SIG_DFL);
}

/// Sets `signal`'s disposition to `to`; returns the previous one.
pub(crate) fn set_disposition(signal: libc::c_int, to: Disposition) -> io::Result<Disposition> {
    // SAFETY: `to` is SIG_IGN, SIG_DFL, or what signal() returned for a
    // signal in this process (a handler of this program, possibly
    // inherited across fork): a valid disposition in every case.
    let previous = unsafe { libc::signal(signal, to.0) };
    if previous == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(Disposition(previous))
}

/// A signal's whole action (handler, flags, mask) as `sigaction` gave it.
#[derive(Clone, Copy)]
pub(crate) struct SavedAction(libc::sigaction);

/// Sets `signal`'s disposition to `to` (no flags, empty mask); returns the
/// whole previous action, for [`restore_action`].
pub(crate) fn replace_action(signal: libc::c_int, to: Disposition) -> io::Result<SavedAction> {
    // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, no flags,
    // an empty mask); it is filled in before use.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = to.0;
    // SAFETY: as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigaction structs for the call; `to` is
    // SIG_IGN, SIG_DFL or a handler this process had (see Disposition).
    if unsafe { libc::sigaction(signal, &new, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SavedAction(old))
}

/// Puts back an action [`replace_action`] returned for `signal`, flags and
/// mask included (`signal()` would drop `SA_SIGINFO` and the mask).
pub(crate) fn restore_action(signal: libc::c_int, saved: &SavedAction) -> io::Result<()> {
    // SAFETY: `saved` is what sigaction reported for this signal in this
    // process (or its parent, across a fork): a valid action.
    if unsafe { libc::sigaction(signal, &saved.0, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Closes descriptor `fd`, a copy this (just forked) process inherited and
/// that nothing in it owns: a zygote drops the sockets of its siblings.
pub(crate) fn close_inherited(fd: RawFd) {
    // SAFETY: closing a descriptor number has no memory-safety
    // preconditions; the caller names one that no object in this process
    // uses (its owner lives in the parent).
    unsafe { libc::close(fd) };
}

/// What a descriptor refers to: (device, inode) of its open file.
pub(crate) type FdIdentity = (u64, u64);

/// The identity of the open file behind `fd`, `None` if it is not open.
pub(crate) fn fd_identity(fd: RawFd) -> Option<FdIdentity> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into valid storage; any descriptor
    // number may be asked about.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Points descriptor `fd`, a copy this (just forked) process inherited,
/// at `null` instead: the copy is let go, while the number stays taken
/// for the object here that owns it and may close it later.
pub(crate) fn cover_inherited(fd: RawFd, null: &std::fs::File) {
    // SAFETY: dup3 onto an open descriptor number replaces it atomically;
    // `null` is open. The caller names a number whose owner here only
    // ever closes it.
    unsafe { libc::dup3(null.as_raw_fd(), fd, libc::O_CLOEXEC) };
}

/// Installs (once) a SIGCHLD handler that calls `reap` and then whatever
/// handler was installed before. Where SIGCHLD was ignored (the kernel then
/// reaps every child itself) nothing is installed. `reap` must be
/// async-signal-safe.
pub(crate) fn install_sigchld_reaper(reap: fn()) -> io::Result<()> {
    let _serialised = SIGCHLD_INSTALL.lock();
    if SIGCHLD_INSTALLED.load(Ordering::Relaxed) {
        return Ok(());
    }
    // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `old`.
    if unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if old.sa_sigaction == libc::SIG_IGN {
        SIGCHLD_INSTALLED.store(true, Ordering::Relaxed);
        return Ok(());
    }
    if old.sa_sigaction != libc::SIG_DFL {
        PREVIOUS_SIGCHLD_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Relaxed);
        // SYNC: pairs with the Acquire load in on_sigchld.
        PREVIOUS_SIGCHLD_FN.store(old.sa_sigaction, Ordering::Release);
    }
    // SYNC: pairs with the Acquire load in on_sigchld.
    SIGCHLD_REAP.store(reap as usize, Ordering::Release);
    // SAFETY: as above.
    let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = on_sigchld as *const () as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_NOCLDSTOP;
    // SAFETY: `new.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // SAFETY: `new` is a fully initialised action whose handler is an
    // `extern "C"` function of the SA_SIGINFO shape.
    if unsafe { libc::sigaction(libc::SIGCHLD, &new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    SIGCHLD_INSTALLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// (device, inode) of this process's executable file.
///
/// A process's executable changes only by exec, which starts it with fresh
/// statics: the first answer stays true for the process's life, and for
/// the children it forks, which inherit it (a `stat` of `/proc/self/exe`
/// per start saved). Plain atomics, not a `OnceLock`: a child forked while
/// another thread filled it must not find it half-initialised.
pub(crate) fn exe_identity() -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    static KNOWN: AtomicBool = AtomicBool::new(false);
    static DEV: AtomicU64 = AtomicU64::new(0);
    static INO: AtomicU64 = AtomicU64::new(0);
    // SYNC: Acquire pairs with the Release below: DEV and INO are set.
    if KNOWN.load(Ordering::Acquire) {
        return Ok((DEV.load(Ordering::Relaxed), INO.load(Ordering::Relaxed)));
    }
    let meta = std::fs::metadata("/proc/self/exe")?;
    // Racing threads store the same values.
    DEV.store(meta.dev(), Ordering::Relaxed);
    INO.store(meta.ino(), Ordering::Relaxed);
    // SYNC: Release publishes DEV and INO.
    KNOWN.store(true, Ordering::Release);
    Ok((meta.dev(), meta.ino()))
}

/// The descriptor number of `file`.
pub(crate) fn raw_fd(file: &std::fs::File) -> RawFd {
    file.as_raw_fd()
}

/// Takes ownership of descriptor `fd`, inherited across exec, if it is open.
pub(crate) fn inherited_file(fd: RawFd) -> Option<std::fs::File> {
    // SAFETY: F_GETFD only queries the descriptor's flags.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open (checked) and was passed to this
    // process for it alone to use (its number came in the spawn request's
    // environment variable, which init() removed).
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Not for grandchildren started by exec.
    // SAFETY: F_SETFD with FD_CLOEXEC only changes the descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(file)
}

/// What [`spawn_exe`] starts: this executable again, with this process's
/// arguments and environment plus one variable.
pub(crate) struct ExecSpec<'a> {
    /// The variable that tells the exec'd `init()` what to do, and its value.
    pub(crate) var: (&'a str, String),
    /// Descriptors (close-on-exec here) to keep open, under the same numbers,
    /// in the exec'd child.
    pub(crate) keep: &'a [RawFd],
    /// A descriptor to give the child as its stdin (`/dev/null`), or `None`
    /// to share this process's.
    pub(crate) stdin: Option<RawFd>,
}

/// Starts `/proc/self/exe` as `spec` says and returns the child's pid.
///
/// `posix_spawn`, not `fork` + `exec`: glibc starts the child with
/// `CLONE_VM | CLONE_VFORK`, so this process's page tables are not copied
/// (std's `Command` does the same, but only without a `pre_exec` hook,
/// and keeping descriptors open across the exec needs one there). The
/// descriptors are kept with `dup2(fd, fd)` file actions, which clear
/// close-on-exec in the child alone (POSIX, glibc 2.29+), so no other
/// thread's exec in this process inherits them. As std does for its
/// children: an empty signal mask and `SIGPIPE` at its default.
///
/// Where `dup2(fd, fd)` may not clear close-on-exec (glibc before 2.29, or
/// another C library), or where the variable `PROC_SPAWN_VIA_FORK` is set
/// (a way out, and how the tests reach that path), the start goes through
/// std's `Command` with a `pre_exec` hook that clears it (a fork).
///
/// A kept descriptor numbered 0 to 2 (this process had closed a standard
/// stream when it was made) would be the child's stdin, stdout or stderr:
/// refused with `InvalidInput` (the callers make theirs above 2, see
/// [`above_stdio`]).
pub(crate) fn spawn_exe(spec: &ExecSpec<'_>) -> io::Result<libc::pid_t> {
    if spec.keep.iter().any(|&fd| fd <= 2) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a descriptor to keep across the exec is numbered 0, 1 or 2",
        ));
    }
    if !dup2_clears_cloexec() || std::env::var_os("PROC_SPAWN_VIA_FORK").is_some() {
        return spawn_with_command(spec);
    }
    use std::ffi::CString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let nul = |bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a nul byte in an argument or variable",
            )
        })
    };
    let mut argv = Vec::new();
    for arg in std::env::args_os() {
        argv.push(nul(arg.into_vec())?);
    }
    if argv.is_empty() {
        argv.push(nul(b"proc".to_vec())?);
    }
    let (name, value) = &spec.var;
    let mut envp = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k.as_bytes() == name.as_bytes() {
            continue;
        }
        let mut kv = k.into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp.push(nul(kv)?);
    }
    envp.push(nul(format!("{name}={value}").into_bytes())?);
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let mut envp_ptrs: Vec<*mut libc::c_char> =
        envp.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp_ptrs.push(std::ptr::null_mut());
    let path = c"/proc/self/exe";

    let check = |code: libc::c_int| {
        if code == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(code))
        }
    };
    // SAFETY: both structures are zeroed storage that the init calls
    // initialise before any other use, and that are destroyed (below) on
    // every path after a successful init; every pointer handed to
    // posix_spawn (path, argv, envp and their strings) outlives the call,
    // and argv/envp end with a null pointer. The descriptors named in file
    // actions are the caller's and open for the whole call (the child
    // dup2s its copies of them).
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        check(libc::posix_spawn_file_actions_init(&mut actions))?;
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
            libc::posix_spawn_file_actions_destroy(&mut actions);
            return Err(e);
        }
        let result = (|| {
            for &fd in spec.keep {
                check(libc::posix_spawn_file_actions_adddup2(&mut actions, fd, fd))?;
            }
            if let Some(fd) = spec.stdin {
                check(libc::posix_spawn_file_actions_adddup2(&mut actions, fd, 0))?;
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            check(libc::posix_spawnattr_setsigmask(&mut attr, &empty))?;
            let mut default: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut default);
            libc::sigaddset(&mut default, libc::SIGPIPE);
            check(libc::posix_spawnattr_setsigdefault(&mut attr, &default))?;
            check(libc::posix_spawnattr_setflags(
                &mut attr,
                (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
            ))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                &actions,
                &attr,
                argv_ptrs.as_ptr(),
                envp_ptrs.as_ptr(),
            ))?;
            Ok(pid)
        })();
        libc::posix_spawnattr_destroy(&mut attr);
        libc::posix_spawn_file_actions_destroy(&mut actions);
        result
    }
}

/// Whether a `posix_spawn` file action `dup2(fd, fd)` clears close-on-exec
/// in the child (POSIX 2024; glibc since 2.29). Looked up once.
fn dup2_clears_cloexec() -> bool {
    static KNOWN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *KNOWN.get_or_init(c_library_clears_cloexec)
}

fn c_library_clears_cloexec() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: gnu_get_libc_version takes nothing and returns a pointer
        // to a static NUL-terminated string.
        let version = unsafe { CStr::from_ptr(libc::gnu_get_libc_version()) };
        let mut parts = version
            .to_str()
            .unwrap_or("")
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        (major, minor) >= (2, 29)
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// [`spawn_exe`] through std's `Command`, with a `pre_exec` hook that
/// clears close-on-exec on the kept descriptors.
fn spawn_with_command(spec: &ExecSpec<'_>) -> io::Result<libc::pid_t> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    }
    cmd.args(std::env::args_os().skip(1));
    cmd.env(spec.var.0, &spec.var.1);
    if spec.stdin.is_some() {
        cmd.stdin(std::process::Stdio::null());
    }
    let fds = spec.keep.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl, which is async-signal-safe, on descriptors it owns
    // copies of; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // std's Child does not wait on drop: the caller's table reaps it.
    Ok(cmd.spawn()?.id() as libc::pid_t)
}

/// `fd` if it is above 2, else a close-on-exec duplicate numbered 3 or
/// more (and `fd` closed): a descriptor meant to cross an exec under its
/// own number must not take the place of a standard stream there.
pub(crate) fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC duplicates an open descriptor (owned by
    // `fd`) to the lowest free number >= 3.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// A close-on-exec pipe: (read end, write end).
pub(crate) fn pipe() -> io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((std::fs::File::from(r), std::fs::File::from(w)))
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` Unix sockets.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Sends `bytes` in one message, with `fds` attached (SCM_RIGHTS).
fn send_with_fds(sock: &OwnedFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    // (A peer gone is EPIPE: sequenced-packet sockets raise no SIGPIPE.)
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// Receives one message into `buf` with its attached descriptors (up to
/// [`MAX_FDS_PER_MESSAGE`], close-on-exec); returns its length, the
/// descriptors, and whether some of them could not be received (this
/// process had no descriptor numbers to spare: the kernel installs what it
/// can and drops the rest; the message itself is taken whole). A signal
/// does not cut it short.
fn receive_with_fds(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    const FD: usize = std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * FD) as u32) } as usize;
    // u64s: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no buffers); the
    // buffers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both
        // alive and as long as the lengths say.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg: CMSG_FIRSTHDR and CMSG_NXTHDR
    // walk the headers it wrote, within msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a header inside the control buffer (see above).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_DATA points past this header.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            let bytes = (header.cmsg_len as usize).saturating_sub(data as usize - cmsg as usize);
            for i in 0..bytes / FD {
                // SAFETY: the kernel wrote `bytes` bytes of descriptor
                // numbers there (unaligned reads: the data need not be).
                let fd = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>().add(i)) };
                // SAFETY: the kernel just installed this descriptor in this
                // process for us; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((n, fds, msg.msg_flags & libc::MSG_CTRUNC != 0))
}

/// Sends one request carrying `fds` to the fork server (its reply comes
/// with [`receive_from_server`], in order), or to a spare child.
pub(crate) fn send_request(sock: &OwnedFd, fds: &[RawFd]) -> io::Result<()> {
    send_with_fds(sock, b"r", fds)
}

/// The largest request handed to a spare inside its message (larger ones
/// travel in a memfd).
pub(crate) const INLINE_REQUEST_MAX: usize = 16 << 10;

/// Sends a request to a spare child with its bytes in the message (at most
/// [`INLINE_REQUEST_MAX`]) and `fds` (the result's, then the shared ones).
pub(crate) fn send_inline_request(sock: &OwnedFd, request: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if request.len() > INLINE_REQUEST_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "request too large to send inline",
        ));
    }
    let mut message = Vec::with_capacity(1 + request.len());
    message.push(b'i');
    message.extend_from_slice(request);
    send_with_fds(sock, &message, fds)
}

/// A message naming a process: a tag byte, then the pid.
fn tagged_pid(tag: u8, pid: libc::pid_t) -> [u8; 5] {
    let mut msg = [tag; 5];
    msg[1..].copy_from_slice(&pid.to_le_bytes());
    msg
}

/// The pid of a [`tagged_pid`] message of `n` bytes in `buf`, if it is
/// one with `tag`.
fn pid_tagged(tag: u8, buf: &[u8], n: usize) -> Option<libc::pid_t> {
    match buf.get(..5) {
        Some(&[t, a, b, c, d]) if n == 5 && t == tag => Some(i32::from_le_bytes([a, b, c, d])),
        _ => None,
    }
}

/// Tells the fork server that its spare `pid` was handed a request
/// directly; `status` is where the server writes its wait status.
pub(crate) fn send_took(sock: &OwnedFd, pid: libc::pid_t, status: RawFd) -> io::Result<()> {
    send_with_fds(sock, &tagged_pid(b't', pid), &[status])
}

/// What a fork server says.
pub(crate) enum FromServer {
    /// The answer to the oldest unanswered request: a pid and a pidfd, or
    /// `None` when the server could not start the child (it goes on
    /// serving).
    Reply(Option<(libc::pid_t, OwnedFd)>),
    /// The server started the child `pid`, but its pidfd could not be
    /// received (this process had no descriptor to spare).
    ReplyWithoutPidfd(libc::pid_t),
    /// A spare child for the next request: its pid, pidfd and channel.
    Offer(libc::pid_t, OwnedFd, OwnedFd),
    /// No new spare (after each request the server says one or the other).
    NoOffer,
}

/// Waits for the fork server's next message; `Err` when the server is
/// gone or out of step.
pub(crate) fn receive_from_server(sock: &OwnedFd) -> io::Result<FromServer> {
    let mut buf = [0u8; 8];
    let (n, received, cut) = receive_with_fds(sock, &mut buf)?;
    let mut received = received.into_iter();
    if let Some(pid) = pid_tagged(b'o', &buf, n) {
        return match (received.next(), received.next()) {
            (Some(pidfd), Some(chan)) if pid > 0 => Ok(FromServer::Offer(pid, pidfd, chan)),
            // This process had no descriptor to spare for the spare's: as
            // no offer (the server ends that spare at the next request,
            // which it gets without it).
            _ if cut => Ok(FromServer::NoOffer),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "fork server: malformed offer",
            )),
        };
    }
    match n {
        4 => {
            let pid = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            Ok(match received.next() {
                Some(pidfd) if pid > 0 => FromServer::Reply(Some((pid, pidfd))),
                None if pid > 0 && cut => FromServer::ReplyWithoutPidfd(pid),
                _ => FromServer::Reply(None),
            })
        }
        1 if buf[0] == b'n' => Ok(FromServer::NoOffer),
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "fork server closed",
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fork server: unknown message",
        )),
    }
}

/// What a fork server's requester says.
pub(crate) enum ToServer {
    /// Fork a child for this request (its descriptors).
    Fork(Vec<OwnedFd>),
    /// The spare `pid` took a request; the descriptor is its status pipe.
    Took(libc::pid_t, Option<OwnedFd>),
}

/// In the fork server: the requester's next message, or `None` when it
/// closed its end.
pub(crate) fn receive_request(sock: &OwnedFd) -> io::Result<Option<ToServer>> {
    let mut buf = [0u8; 8];
    let (n, fds, cut) = receive_with_fds(sock, &mut buf)?;
    if n == 0 && fds.is_empty() && !cut {
        return Ok(None);
    }
    if let Some(pid) = pid_tagged(b't', &buf, n) {
        return Ok(Some(ToServer::Took(pid, fds.into_iter().next())));
    }
    // A request whose descriptors did not all arrive (the server had no
    // numbers to spare) cannot run: with none, it is refused.
    Ok(Some(ToServer::Fork(if cut { Vec::new() } else { fds })))
}

/// Whether a send's error says the peer is gone (its end closed), rather
/// than that this message could not be sent.
pub(crate) fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
    )
}

/// A buffer for [`receive`]: one byte more than the largest message (a
/// longer one shows as filling it), its pages touched now (a spare makes
/// it before it waits, so that the request's arrival does not fault them
/// in).
pub(crate) fn request_buffer() -> Vec<u8> {
    vec![0xff; INLINE_REQUEST_MAX + 2]
}

/// In a spare child: a request — its bytes if they came inline (then the
/// descriptors are the result's and the shared ones; otherwise the
/// request's memfd comes first) — or `None` when the other end closed, or
/// when the message was malformed or its descriptors cut short (the child
/// must not run without them).
/// `buf` is [`request_buffer`]'s (made before the wait).
#[allow(clippy::type_complexity)]
pub(crate) fn receive(
    sock: &OwnedFd,
    mut buf: Vec<u8>,
) -> io::Result<Option<(Option<Vec<u8>>, Vec<OwnedFd>)>> {
    let (n, fds, cut) = receive_with_fds(sock, &mut buf)?;
    if n == 0 || cut || n == buf.len() {
        return Ok(None);
    }
    match buf[0] {
        b'r' if n == 1 && fds.len() >= 2 => Ok(Some((None, fds))),
        b'i' if !fds.is_empty() => {
            buf.truncate(n);
            buf.remove(0);
            Ok(Some((Some(buf), fds)))
        }
        _ => Ok(None),
    }
}

/// In the fork server: answers a request with `pid` (or -1) and its pidfd.
pub(crate) fn reply(sock: &OwnedFd, pid: libc::pid_t, pidfd: Option<&OwnedFd>) -> io::Result<()> {
    let fds: Vec<RawFd> = pidfd.map(|f| f.as_raw_fd()).into_iter().collect();
    send_with_fds(sock, &pid.to_le_bytes(), &fds)
}

/// In the fork server: offers the spare `(pid, pidfd, channel)` for the
/// next request, or says there is no new one.
pub(crate) fn offer(
    sock: &OwnedFd,
    spare: Option<(libc::pid_t, &OwnedFd, &OwnedFd)>,
) -> io::Result<()> {
    match spare {
        Some((pid, pidfd, chan)) => send_with_fds(
            sock,
            &tagged_pid(b'o', pid),
            &[pidfd.as_raw_fd(), chan.as_raw_fd()],
        ),
        None => send_with_fds(sock, b"n", &[]),
    }
}

/// Waits until one of `fds` is readable; which ones are.
pub(crate) fn poll_many(fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of pollfd of the given length.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Whether `fd` is readable right now.
pub(crate) fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

/// Waits until `fd` is readable (a pidfd: until its process exits).
pub(crate) fn wait_readable(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Sends `signal` to the process behind the pidfd `fd` (no pid reuse race).
pub(crate) fn pidfd_signal(fd: std::os::fd::BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal, a null siginfo and
    // flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Proof that this process runs the very executable file whose identity a
/// spawn request carried (made only by [`same_exe`]; a copy proves the same).
#[derive(Clone, Copy)]
pub(crate) struct SameExe(());

/// Checks that this process's executable is the file `(device, inode)`.
pub(crate) fn same_exe(expected: (u64, u64)) -> Option<SameExe> {
    (exe_identity().ok()? == expected).then_some(SameExe(()))
}

/// The proof a forked child has without checking: it runs its parent's
/// very image, the same code at the same addresses.
pub(crate) fn forked_same_exe() -> SameExe {
    SameExe(())
}

/// The proof a child made when it started its entry: its requester runs the
/// same executable, so function offsets the requester sends name the same
/// functions here (used by task functions, see `task`).
static STARTED_SAME_EXE: std::sync::OnceLock<SameExe> = std::sync::OnceLock::new();

/// Keeps `proof` for the rest of this process's life.
pub(crate) fn remember_same_exe(proof: SameExe) {
    let _ = STARTED_SAME_EXE.set(proof);
}

/// The proof kept by [`remember_same_exe`], if this process is an entry's
/// child.
pub(crate) fn started_same_exe() -> Option<&'static SameExe> {
    STARTED_SAME_EXE.get()
}

/// The type-erased caller of a task function (see `task`): the runner's
/// and the entry's addresses, the input, the output buffer.
pub(crate) type TaskShim = fn(&SameExe, usize, usize, &[u8], &mut Vec<u8>);

/// The task shim at `addr`.
///
/// Task functions come from this process's requester, which computed
/// `addr` (as an offset from `init`) from a `TaskShim` of the executable
/// that `proof` shows this process runs; the offsets are checked against a
/// checksum before this is called.
pub(crate) fn task_shim_at(proof: &SameExe, addr: usize) -> TaskShim {
    let SameExe(()) = *proof;
    // SAFETY: by the above, `addr` is the address of a function of type
    // `TaskShim` in this executable; fn pointers are usize-sized.
    unsafe { std::mem::transmute::<usize, TaskShim>(addr) }
}

/// The task runner `fn(fn(A) -> R, &[u8], &mut Vec<u8>)` at `addr`, called
/// only from the shim that the requester instantiated with the same `A`
/// and `R` as the runner and the entry it named.
pub(crate) fn task_runner_at<A, R>(proof: &SameExe, addr: usize) -> crate::task::Runner<A, R> {
    let SameExe(()) = *proof;
    // SAFETY: as for task_shim_at: `addr` is a runner of exactly this type
    // in this executable (the requester paired it with this shim's types);
    // a function pointer is the size of a usize whatever its signature.
    unsafe { std::mem::transmute_copy::<usize, crate::task::Runner<A, R>>(&addr) }
}

/// What a spawned child calls: the entry's address, its encoded
/// arguments, the result file.
pub(crate) type Trampoline = fn(&SameExe, usize, &[u8], &std::fs::File) -> !;

/// The trampoline at `addr`.
///
/// Spawn requests come from this process's parent, which computed `addr`
/// (as an offset from `init`) from a `Trampoline` of the executable that
/// `proof` shows this process runs: the same file, so the same code at the
/// same offsets.
pub(crate) fn trampoline_at(proof: &SameExe, addr: usize) -> Trampoline {
    let SameExe(()) = *proof;
    // SAFETY: by the above, `addr` is the address of a function of type
    // `Trampoline` in this executable; fn pointers are usize-sized.
    unsafe { std::mem::transmute::<usize, Trampoline>(addr) }
}

/// The entry `fn(A) -> R` at `addr`, called only from the trampoline that
/// the parent instantiated with the same `A` and `R` as the entry it named.
pub(crate) fn entry_at<A, R>(proof: &SameExe, addr: usize) -> fn(A) -> R {
    let SameExe(()) = *proof;
    // SAFETY: as for trampoline_at: `addr` is a `fn(A) -> R` of this
    // executable (the parent paired it with this trampoline's types); a
    // function pointer is the size of a usize whatever its signature.
    unsafe { std::mem::transmute_copy::<usize, fn(A) -> R>(&addr) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_paren() {
        let line =
            b"42 (a (weird) name) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 100 123456 7";
        assert_eq!(stat_field(line, 4), Some(1));
        assert_eq!(parse_thread_count(line), Some(3));
        assert_eq!(stat_field(line, 23), Some(123456));
        assert_eq!(stat_field(b"garbage", 20), None);
        assert_eq!(stat_field(b"1 (x) S", 20), None);
    }

    #[test]
    fn another_executable_is_not_this_one() {
        // What a child started from a rebuilt file would see: its own
        // executable differs from the identity in the request.
        let mine = exe_identity().expect("identity");
        assert!(same_exe(mine).is_some());
        assert!(same_exe((mine.0, mine.1.wrapping_add(1))).is_none());
    }

    #[test]
    fn inline_requests_are_framed_exactly() {
        let (a, b) = seqpacket_pair().expect("pair");
        let (r, w) = pipe().expect("pipe");
        // Empty and largest requests come back whole, with the descriptor.
        for len in [0, 1, INLINE_REQUEST_MAX - 1, INLINE_REQUEST_MAX] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            send_inline_request(&a, &bytes, &[w.as_raw_fd()]).expect("send");
            let (got, fds) = receive(&b, request_buffer())
                .expect("receive")
                .expect("a request");
            assert_eq!(got.as_deref(), Some(&bytes[..]), "{len} bytes");
            assert_eq!(fds.len(), 1);
        }
        // One byte more is refused at the sender.
        let big = vec![0u8; INLINE_REQUEST_MAX + 1];
        assert!(send_inline_request(&a, &big, &[w.as_raw_fd()]).is_err());
        // A longer message than the buffer holds (as a peer could send),
        // an unknown tag, an inline request without its result's
        // descriptor, a memfd request with too few: none is a request.
        let mut long = vec![b'i'];
        long.extend(vec![0u8; INLINE_REQUEST_MAX + 1]);
        send_with_fds(&a, &long, &[w.as_raw_fd()]).expect("send");
        send_with_fds(&a, b"x", &[w.as_raw_fd()]).expect("send");
        send_with_fds(&a, b"i123", &[]).expect("send");
        send_with_fds(&a, b"r", &[w.as_raw_fd()]).expect("send");
        for what in ["too long", "unknown tag", "no result", "memfd short"] {
            assert!(
                receive(&b, request_buffer()).expect("receive").is_none(),
                "{what}"
            );
        }
        // The descriptors of those messages were closed: the pipe's write
        // end is ours alone again, so dropping it gives end of file.
        drop(w);
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut &r, &mut rest).expect("read");
        assert!(rest.is_empty());
        // A memfd request: no bytes, the descriptors as they came.
        let (_r2, w2) = pipe().expect("pipe");
        send_request(&a, &[w2.as_raw_fd(), w2.as_raw_fd()]).expect("send");
        let (got, fds) = receive(&b, request_buffer())
            .expect("receive")
            .expect("a request");
        assert!(got.is_none());
        assert_eq!(fds.len(), 2);
    }

    #[test]
    fn this_process_counts_its_threads() {
        // libtest runs this on a thread of its own: at least 2.
        assert!(thread_count().expect("thread count") >= 2);
        assert!(threads_with_memory().expect("threads") >= 2);
    }
}
