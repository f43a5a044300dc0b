//! Starting a child process: [`Builder`], [`spawn`], and what the child does
//! between `fork` and `_exit`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::panic;
use std::sync::{Once, OnceLock};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::children;
use crate::current;
use crate::error::SpawnError;
use crate::handle::JoinHandle;
use crate::pid::Pid;
use crate::sys::{self, Fork, ForkPermit, ThreadCheck};

/// What a child's standard input is connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Stdin {
    /// `/dev/null`: reading gives end-of-file at once (the default, as in
    /// Python, where children cannot call `input()`).
    #[default]
    Null,
    /// The parent's standard input, shared with the parent.
    Inherit,
}

/// Configures a child process before it starts: name, daemon flag, stdin.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let child = proc_core::Builder::new()
///     .name("adder")
///     .spawn(|| (proc_core::current_process().name().to_owned(), 2 + 2))?;
/// assert_eq!(child.join()?, ("adder".to_owned(), 4));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a Builder does nothing until `spawn` is called"]
pub struct Builder {
    pub(crate) start_method: crate::entry::StartMethod,
    name: Option<String>,
    /// The identity path, when a `Process` object fixed it at creation.
    path: Option<Vec<u32>>,
    daemon: bool,
    stdin: Stdin,
}

impl Builder {
    /// A builder with the defaults: the next `Process-N` name, not a daemon,
    /// stdin from `/dev/null`, the process-wide start method for entries.
    pub fn new() -> Self {
        Builder {
            start_method: crate::entry::get_start_method(),
            ..Builder::default()
        }
    }

    /// Names the child (what `current_process().name()` says inside it).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Uses the name and identity path that a `Process` object was given
    /// when it was created.
    pub(crate) fn identity(mut self, name: String, path: Vec<u32>) -> Self {
        self.name = Some(name);
        self.path = Some(path);
        self
    }

    /// Makes the child a daemon: it is terminated when this process exits
    /// normally, and killed (`SIGKILL`, via `PR_SET_PDEATHSIG`) when this
    /// process dies in any other way, even by `SIGKILL`.
    ///
    /// The kernel ties the death signal to the thread that forked; the safe
    /// `spawn` only forks from a single-threaded process, where that thread
    /// is the main thread (a daemon forked by `spawn_unchecked` on another
    /// thread gets no death signal, as a `Spawn` daemon below). A
    /// `ForkServer` daemon dies with the fork server,
    /// which ends with this process whatever thread started it. A `Spawn`
    /// daemon started from a thread other than the main one gets no death
    /// signal (that thread's end would kill it while this process runs
    /// on): it is terminated when this process exits normally, as in
    /// Python, but outlives a `SIGKILL` of this process.
    ///
    /// Unlike Python, which refuses ("daemonic processes are not allowed to
    /// have children"), a daemon may start processes (a pool's workers are
    /// daemons, and tasks may start processes). When a daemon is ended at
    /// this process's exit, its own daemon children die with it, but its
    /// other children are not joined: they are orphaned and run on.
    pub fn daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// Chooses how [`spawn_entry`](Builder::spawn_entry) starts the child
    /// (the closure `spawn` always forks).
    pub fn start_method(mut self, method: crate::entry::StartMethod) -> Self {
        self.start_method = method;
        self
    }

    /// The name, daemon flag and stdin policy, for a start method that
    /// builds the child itself.
    pub(crate) fn settings(&self) -> (Option<String>, Option<Vec<u32>>, bool, Stdin) {
        (
            self.name.clone(),
            self.path.clone(),
            self.daemon,
            self.stdin,
        )
    }

    /// Chooses the child's standard input.
    pub fn stdin(mut self, stdin: Stdin) -> Self {
        self.stdin = stdin;
        self
    }

    /// Starts `f` in a new child process (fork start method) and returns a
    /// handle whose [`join`](JoinHandle::join) gives back `f`'s return value.
    ///
    /// The child is a copy of this process: it sees every value `f` captures
    /// or borrows, as they are at the time of the call, and its changes stay
    /// in the child. It runs only `f`, then ends; it never returns into the
    /// caller's frames and never runs this process's exit handlers.
    ///
    /// # Errors
    ///
    /// [`SpawnError::Threaded`] if this process has more than one thread
    /// (forking and then running arbitrary code is unsound there), and the
    /// other [`SpawnError`] variants when the OS refuses.
    pub fn spawn<F, T>(self, f: F) -> Result<JoinHandle<T>, SpawnError>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        self.try_spawn(f).map_err(|(err, _f)| err)
    }

    /// As [`spawn`](Builder::spawn), but hands `f` back when the child could
    /// not be started.
    pub(crate) fn try_spawn<F, T>(self, f: F) -> Result<JoinHandle<T>, (SpawnError, F)>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        match ForkPermit::single_threaded() {
            Ok(permit) => self.spawn_inner(permit, f),
            Err(ThreadCheck::Threaded(threads)) => Err((SpawnError::Threaded { threads }, f)),
            Err(ThreadCheck::Unknown(e)) => Err((SpawnError::ThreadCheck(e), f)),
        }
    }

    /// Starts `f` in a new child process without checking that this process
    /// is single-threaded.
    ///
    /// # Safety
    ///
    /// Only the calling thread exists in the child. If other threads exist,
    /// any lock they held at the moment of the fork (the allocator's, stdout's,
    /// a `Mutex` of yours) stays locked forever in the child. The caller
    /// guarantees that `f`, and the child's bookkeeping around it (allocation,
    /// serializing the result, flushing stdout), cannot deadlock or observe
    /// torn state because of that: for example the other threads never hold
    /// such locks, or the allocator is fork-safe (glibc's malloc is).
    ///
    /// # Errors
    ///
    /// As [`spawn`](Builder::spawn), except for the thread check.
    #[allow(unsafe_code)] // the public unsafe entry point; the fork itself is in `sys`
    pub unsafe fn spawn_unchecked<F, T>(self, f: F) -> Result<JoinHandle<T>, SpawnError>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        // SAFETY: the caller's promise, stated in `# Safety` above, is the
        // permit's contract.
        let permit = unsafe { ForkPermit::assume_fork_safe() };
        self.spawn_inner(permit, f).map_err(|(err, _f)| err)
    }

    fn spawn_inner<F, T>(self, permit: ForkPermit, f: F) -> Result<JoinHandle<T>, (SpawnError, F)>
    where
        F: FnOnce() -> T,
        T: Serialize + DeserializeOwned,
    {
        children::init();
        install_panic_hook();
        let null = match (self.stdin, dev_null()) {
            (Stdin::Null, Err(e)) => return Err((SpawnError::Stdin(e), f)),
            (_, null) => null.ok(),
        };
        let Some(slot) = children::reserve() else {
            return Err((SpawnError::TooManyChildren, f));
        };
        let result = match sys::memfd(c"proc-result") {
            Ok(fd) => fd,
            Err(e) => {
                children::unreserve(slot);
                return Err((SpawnError::ResultChannel(e), f));
            }
        };
        let (name, path) = current::child_identity(self.name, self.path);
        children::name(slot, &name);
        // Unflushed output would otherwise be printed by both processes.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let parent = sys::getpid();
        let forked_on_main_thread = sys::on_main_thread();
        match sys::fork(permit) {
            Err(e) => {
                children::unreserve(slot);
                Err((SpawnError::Fork(e), f))
            }
            Ok(Fork::Child) => {
                let setup = ChildSetup {
                    null,
                    stdin: self.stdin,
                    name,
                    path,
                    daemon: self.daemon,
                    parent,
                    forked_on_main_thread,
                };
                run_child(setup, &result, f)
            }
            Ok(Fork::Parent(pid)) => {
                children::register(slot, pid, self.daemon);
                Ok(JoinHandle::new(Pid::from_raw(pid), name, result, slot))
            }
        }
    }
}

impl Builder {
    /// Starts the entry `f` with `args` in a new child process, by this
    /// builder's start method, and returns the same [`JoinHandle`] as
    /// [`spawn`](Builder::spawn): the child's result, panic, exit code or
    /// signal come back the same way.
    ///
    /// An entry is a function item or a closure that captures nothing,
    /// living in the executable (not in a dynamic library); its arguments
    /// and result cross the process boundary with postcard. With
    /// [`StartMethod::Spawn`](crate::StartMethod::Spawn) the child is a fresh exec of this executable,
    /// which works from a program with any number of threads, and `main`
    /// must start with [`init`](crate::init).
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// fn add((a, b): (u32, u32)) -> u32 {
    ///     a + b
    /// }
    /// let child = proc_core::Builder::new().spawn_entry(add, (2, 3))?;
    /// assert_eq!(child.join()?, 5);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`spawn`](Builder::spawn) for the fork start method; with
    /// `Spawn`, [`SpawnError::InitMissing`] when `main` did not call
    /// `init()`, and [`SpawnError::Exec`] when the executable cannot be
    /// started.
    pub fn spawn_entry<A, R>(self, f: fn(A) -> R, args: A) -> Result<JoinHandle<R>, SpawnError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        match self.start_method {
            crate::entry::StartMethod::Fork => self.spawn(move || {
                // Task functions named by the parent name the same code
                // here (see `task`).
                sys::remember_same_exe(sys::forked_same_exe());
                f(args)
            }),
            crate::entry::StartMethod::Spawn => crate::entry::spawn_exec(self, f, args),
            crate::entry::StartMethod::ForkServer => crate::forkserver::spawn(self, f, args),
        }
    }
}

/// Starts `f` in a new child process with the default [`Builder`] and
/// returns a handle whose [`join`](JoinHandle::join) gives back `f`'s return
/// value (the fork start method; `std::thread::spawn`'s shape).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let numbers = vec![1u64, 2, 3];
/// let child = proc_core::spawn(move || numbers.iter().sum::<u64>())?;
/// assert_eq!(child.join()?, 6);
/// # Ok(()) }
/// ```
///
/// The result must be serializable:
///
/// ```compile_fail
/// struct NotSerde;
/// let _ = proc_core::spawn(|| NotSerde);
/// ```
///
/// # Errors
///
/// See [`Builder::spawn`].
pub fn spawn<F, T>(f: F) -> Result<JoinHandle<T>, SpawnError>
where
    F: FnOnce() -> T,
    T: Serialize + DeserializeOwned,
{
    Builder::new().spawn(f)
}

/// What travels back from the child in its result file.
#[derive(Serialize, Deserialize)]
pub(crate) enum Outcome<T> {
    /// The closure returned this value.
    Value(T),
    /// The closure panicked.
    Panicked {
        message: String,
        location: Option<String>,
    },
    /// The value could not be serialized.
    EncodeFailed(String),
    /// The entry's arguments did not decode (Spawn start method).
    ArgsDecodeFailed(String),
    /// The child refused to run the entry (Spawn start method: another
    /// executable, or a malformed request).
    Refused(String),
}

struct ChildSetup {
    /// `/dev/null`, opened in the parent (always there when `stdin` is
    /// `Stdin::Null`).
    null: Option<&'static File>,
    stdin: Stdin,
    name: String,
    path: Vec<u32>,
    daemon: bool,
    parent: libc::pid_t,
    /// Whether the fork ran on the parent's main thread (the kernel ties a
    /// death signal to the thread that forked).
    forked_on_main_thread: bool,
}

/// `/dev/null`, opened once (close-on-exec) so that a child only `dup2`s it.
pub(crate) fn dev_null() -> std::io::Result<&'static File> {
    static NULL: OnceLock<File> = OnceLock::new();
    if let Some(null) = NULL.get() {
        return Ok(null);
    }
    let file = File::open("/dev/null")?;
    Ok(NULL.get_or_init(|| file))
}

/// Where the last panic happened, and in which process (a forked child
/// inherits its parent's value; the pid tells them apart).
static PANIC_LOCATION: parking_lot::Mutex<Option<(libc::pid_t, String)>> =
    parking_lot::const_mutex(None);

/// Set in processes whose panics are reported as results (pool workers):
/// the hook records them without printing.
pub(crate) static QUIET_PANICS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Where the last panic in this process happened, if the hook saw it.
pub(crate) fn take_panic_location() -> Option<String> {
    let me = sys::getpid();
    PANIC_LOCATION
        .lock()
        .take()
        .filter(|(pid, _)| *pid == me)
        .map(|(_, l)| l)
}

/// Installs (once per process) a panic hook that records where a panic
/// happened, for [`JoinError::Panicked`](crate::JoinError::Panicked), and
/// then calls the hook that was there before. Installed in the parent, so
/// that a child does not pay for it; a hook the program sets later replaces
/// it, and panics then come back without a location.
pub(crate) fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if let (Some(loc), Some(mut slot)) = (info.location(), PANIC_LOCATION.try_lock()) {
                *slot = Some((sys::getpid(), loc.to_string()));
            }
            if !QUIET_PANICS.load(std::sync::atomic::Ordering::Relaxed) {
                previous(info);
            }
        }));
    });
}

/// The child side: set up, run `f`, send its outcome, exit. Never returns.
fn run_child<F, T>(setup: ChildSetup, result: &File, f: F) -> !
where
    F: FnOnce() -> T,
    T: Serialize,
{
    if setup.daemon {
        // If the parent died between fork and prctl, the signal will never
        // come: the getppid re-check catches that window. Forked from a
        // thread other than the main one (`spawn_unchecked`), the signal
        // would come when that thread ends, while the program runs on: no
        // signal then (terminated at normal exit, as a Spawn daemon).
        if (setup.forked_on_main_thread && sys::set_parent_death_signal(libc::SIGKILL).is_err())
            || sys::getppid() != setup.parent
        {
            sys::exit_now(1);
        }
    }
    if let (Stdin::Null, Some(null)) = (setup.stdin, setup.null) {
        if sys::stdin_from_dev_null(null).is_err() {
            sys::exit_now(1);
        }
    }
    if let Some(null) = setup.null {
        // The parent's zygotes must see their connections end when the
        // parent drops them, not when this child exits.
        crate::forkserver::release_inherited_zygotes(setup.parent, null);
    }
    current::enter_child(setup.name, setup.path, setup.daemon, setup.parent, None);
    run_and_exit(result, f)
}

/// In a child, set up as the start method wants: runs `f`, sends its
/// outcome (value, or panic message and location) through `result`, and
/// exits without returning.
pub(crate) fn run_and_exit<F, T>(result: &File, f: F) -> !
where
    F: FnOnce() -> T,
    T: Serialize,
{
    let mut small = [0u8; 256];
    let large;
    let (bytes, code): (&[u8], i32) = match crate::task::catch_panic(f) {
        // Most results fit the stack buffer: no allocation in the child.
        Ok(value) => match postcard::to_slice(&Outcome::Value(&value), &mut small) {
            Ok(bytes) => (bytes, 0),
            // Too large for the stack buffer: postcard says so with
            // `SerializeBufferFull`, or with `CollectStrError` from inside
            // a `collect_str` (also its answer to a `Display` that fails:
            // a growing buffer tells the two apart).
            Err(postcard::Error::SerializeBufferFull | postcard::Error::CollectStrError) => {
                match postcard::to_stdvec(&Outcome::Value(&value)) {
                    Ok(bytes) => {
                        large = bytes;
                        (&large, 0)
                    }
                    Err(e) => {
                        large = encode_failure(&e.to_string());
                        (&large, 1)
                    }
                }
            }
            Err(e) => {
                large = encode_failure(&e.to_string());
                (&large, 1)
            }
        },
        Err(crate::task::Panic { message, location }) => {
            let outcome = Outcome::<()>::Panicked { message, location };
            large = postcard::to_stdvec(&outcome).unwrap_or_default();
            (&large, 1)
        }
    };
    // At offset 0 whatever the shared file offset says. A failed write
    // leaves the parent with an exit status and no value, which it reports
    // as such.
    let written = result.write_all_at(bytes, 0).is_ok();
    let end = bytes.len() as u64;
    current::finish_child_then(code, move || {
        // Everything is done and the exit status will be 0: the mark after
        // the outcome says so, for a parent that learns of the exit before
        // it can read the status (a fork-server child, see `join`).
        if written && code == 0 {
            let _ = result.write_all_at(&[EXITING_ZERO], end);
        }
    })
}

/// Written after a child's outcome just before it exits with status 0.
pub(crate) const EXITING_ZERO: u8 = 0xE0;

fn encode_failure(message: &str) -> Vec<u8> {
    postcard::to_stdvec(&Outcome::<()>::EncodeFailed(message.to_owned())).unwrap_or_default()
}
