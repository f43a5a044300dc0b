//! Entries and the `Spawn` start method: a child that is a fresh exec of
//! this executable, running a function named by its offset from a known
//! symbol (`init`).
//!
//! An entry is a function item or non-capturing closure `fn(A) -> R`. Its
//! address, and the address of the monomorphised trampoline that decodes
//! `A` and runs it, are sent as offsets from `init`'s address: the child is
//! the same executable (it execs `/proc/self/exe`, which is the parent's own
//! file even if the path was rebuilt meanwhile, and it checks the file's
//! device and inode), so the same offsets name the same functions there.
//! The request travels in a `memfd` the child inherits; the result comes
//! back as with the fork start method. Python's `spawn` start method does
//! the same by pickling the function's qualified name.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::builder::{run_and_exit, Builder, Outcome, Stdin};
use crate::children;
use crate::current;
use crate::error::SpawnError;
use crate::handle::JoinHandle;
use crate::pid::Pid;
use crate::sys;

/// How a child process is started (Python's start methods).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartMethod {
    /// Fork this process: fast, and the child sees everything the caller
    /// had (the safe API refuses when this process has other threads).
    #[default]
    Fork,
    /// Exec this executable afresh and run an entry in it: works from any
    /// program, threads or not; needs [`init`] as the first line of `main`.
    Spawn,
    /// Ask a fork server (this executable, exec'd once and kept
    /// single-threaded) to fork a child that runs the entry: Spawn's safety
    /// at close to fork's speed; needs [`init`] too. The child's stdin is
    /// `/dev/null`.
    ForkServer,
}

static DEFAULT_METHOD: std::sync::OnceLock<StartMethod> = std::sync::OnceLock::new();

/// Sets the process-wide start method that [`Builder::new`] uses for
/// [`spawn_entry`](Builder::spawn_entry), once (Python's
/// `set_start_method`).
///
/// # Examples
///
/// ```
/// use proc_core::StartMethod;
/// proc_core::set_start_method(StartMethod::Fork).expect("first call");
/// assert!(proc_core::set_start_method(StartMethod::Spawn).is_err());
/// assert_eq!(proc_core::get_start_method(), StartMethod::Fork);
/// ```
///
/// # Errors
///
/// [`StartMethodError::AlreadySet`] if it was set (or read) before.
pub fn set_start_method(method: StartMethod) -> Result<(), StartMethodError> {
    DEFAULT_METHOD
        .set(method)
        .map_err(|_| StartMethodError::AlreadySet {
            current: get_start_method(),
        })
}

/// The process-wide start method (`Fork` unless
/// [`set_start_method`] chose another); reading it fixes it, as Python's
/// `get_start_method()` does.
pub fn get_start_method() -> StartMethod {
    *DEFAULT_METHOD.get_or_init(StartMethod::default)
}

/// Why the start method could not be set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartMethodError {
    /// It was already set, or already read (and so fixed).
    #[error("the start method is already {current:?}")]
    AlreadySet {
        /// The method in force.
        current: StartMethod,
    },
}

/// A start method to use without changing the process-wide one (Python's
/// `get_context(method)`).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let ctx = proc_core::get_context(Some(proc_core::StartMethod::Fork));
/// let child = ctx.spawn_entry(|n: u64| n * n, 12)?;
/// assert_eq!(child.join()?, 144);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    method: StartMethod,
}

/// The context of `method`, or of the process-wide method for `None`.
pub fn get_context(method: Option<StartMethod>) -> Context {
    Context {
        method: method.unwrap_or_else(get_start_method),
    }
}

impl Context {
    /// This context's start method.
    pub fn start_method(&self) -> StartMethod {
        self.method
    }

    /// A [`Builder`] that starts entries with this context's method.
    pub fn builder(&self) -> Builder {
        Builder::new().start_method(self.method)
    }

    /// Starts the entry `f(args)` with this context's method (see
    /// [`Builder::spawn_entry`]).
    ///
    /// # Errors
    ///
    /// As [`Builder::spawn_entry`].
    pub fn spawn_entry<A, R>(&self, f: fn(A) -> R, args: A) -> Result<JoinHandle<R>, SpawnError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.builder().spawn_entry(f, args)
    }
}

/// The environment variable that tells [`init`] it runs in a spawned child
/// (its value: the request and result descriptors).
const ENV: &str = "PROC_SPAWN_FDS";

static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// What a spawned child is asked to do.
#[derive(Serialize, Deserialize)]
struct Request {
    /// The parent's executable: (device, inode) of `/proc/self/exe`.
    exe: (u64, u64),
    /// Offset of the trampoline from `init`.
    trampoline: i64,
    /// Offset of the entry from `init`.
    entry: i64,
    args: Vec<u8>,
    /// Descriptors shared by the arguments (see `handoff`), kept open across
    /// the exec under the same numbers.
    fds: Vec<i32>,
    name: String,
    path: Vec<u32>,
    daemon: bool,
    /// Whether the start ran on the parent's main thread: only then may a
    /// daemon take a parent-death signal, which follows the thread that
    /// started it, not the process.
    started_on_main_thread: bool,
    parent: i32,
    /// The parent's name and daemon flag (for `parent_process()`).
    parent_name: String,
    parent_daemon: bool,
}

/// The first line of `main` in a program that starts processes with
/// [`StartMethod::Spawn`]:
///
/// ```no_run
/// # #[allow(clippy::needless_doctest_main)]
/// fn main() {
///     proc_core::init();
///     // ... the program ...
/// }
/// ```
///
/// In an ordinary start it returns at once. In a child started with
/// `Spawn` it runs the requested entry and exits: nothing after `init()` in
/// `main` runs in the child.
pub fn init() {
    INIT_CALLED.store(true, Ordering::Relaxed);
    if let Some(fd) = std::env::var_os(crate::forkserver::ENV) {
        std::env::remove_var(crate::forkserver::ENV);
        crate::forkserver::serve(&fd.to_string_lossy());
    }
    let Some(fds) = std::env::var_os(ENV) else {
        return;
    };
    // Not for this child's own children (or any program it execs).
    std::env::remove_var(ENV);
    run_spawned(&fds.to_string_lossy())
}

pub(crate) fn anchor() -> i64 {
    init as *const () as i64
}

/// The function a spawned child calls: decodes `A`, runs the entry at
/// `entry`, sends back its outcome, exits.
fn trampoline<A, R>(proof: &sys::SameExe, entry: usize, args: &[u8], result: &File) -> !
where
    A: DeserializeOwned,
    R: Serialize,
{
    match postcard::from_bytes::<A>(args) {
        Ok(a) => {
            let f = sys::entry_at::<A, R>(proof, entry);
            run_and_exit(result, move || f(a))
        }
        Err(e) => finish_with(result, &Outcome::<()>::ArgsDecodeFailed(e.to_string())),
    }
}

fn finish_with(result: &File, outcome: &Outcome<()>) -> ! {
    if let Ok(bytes) = postcard::to_stdvec(outcome) {
        let _ = result.write_all_at(&bytes, 0);
    }
    current::finish_child(1)
}

/// In a spawned child: reads the request, checks it, runs the entry (and
/// never returns). Returns only when the variable does not name a request
/// made by a proc parent, so that `init()` then carries on as an ordinary
/// start.
fn run_spawned(fds: &str) {
    let mut it = fds.split(',').map(|s| s.parse::<i32>());
    let (Some(Ok(req_fd)), Some(Ok(res_fd))) = (it.next(), it.next()) else {
        eprintln!("proc: malformed {ENV}; ignoring it");
        return;
    };
    // Only the memfds a proc parent made: a stray variable (set by hand,
    // or leaked into an unrelated start) must not make init() take over
    // and write into whatever descriptors it names.
    let ours = |fd: i32, name: &str| {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .is_ok_and(|p| p.to_string_lossy().starts_with(&format!("/memfd:{name}")))
    };
    if !ours(req_fd, "proc-request") || !ours(res_fd, "proc-result") {
        // Started by a proc parent (the variable's third field is its pid)
        // whose descriptors did not arrive: this child must not go on
        // through the program's `main` (it could start children that fail
        // the same way).
        if it.next().and_then(Result::ok) == Some(sys::getppid()) {
            eprintln!("proc: the descriptors named by {ENV} did not arrive; exiting");
            sys::exit_now(1)
        }
        eprintln!("proc: {ENV} does not name a spawn request; ignoring it");
        return;
    }
    let (Some(request_file), Some(result)) =
        (sys::inherited_file(req_fd), sys::inherited_file(res_fd))
    else {
        eprintln!("proc: the descriptors named by {ENV} are not open");
        sys::exit_now(1)
    };
    // Inherited under the numbers the request lists.
    run_request(RequestSource::File(request_file), result, None, None)
}

/// In a child (exec'd, or forked by the fork server): reads the request,
/// checks it, takes the shared descriptors (`shared`, or those inherited
/// under the numbers the request lists), runs the entry, exits. `parent`
/// is the process the daemon check expects as parent (the fork server), or
/// `None` for the requester itself.
pub(crate) fn run_request(
    source: RequestSource,
    result: File,
    shared: Option<Vec<std::os::fd::OwnedFd>>,
    parent: Option<i32>,
) -> ! {
    let bytes = match source {
        RequestSource::File(file) => file
            .metadata()
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
            .and_then(|len| {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, 0).ok()?;
                Some(buf)
            }),
        RequestSource::Inline(bytes) => Some(bytes),
    };
    let request = bytes.and_then(|b| postcard::from_bytes::<Request>(&b).ok());
    let Some(request) = request else {
        finish_with(&result, &Outcome::Refused("malformed request".into()))
    };
    let Some(proof) = sys::same_exe(request.exe) else {
        finish_with(
            &result,
            &Outcome::Refused("this is not the executable that made the request".into()),
        )
    };
    // Task functions sent to this child later (pool workers) rely on it.
    sys::remember_same_exe(proof);
    let expected_parent = parent.unwrap_or(request.parent);
    // A daemon dies with its parent: the fork server (single-threaded),
    // or the program when the start ran on its main thread. Started from
    // another thread, whose end would send the signal while the program
    // runs on, it is only terminated at the program's exit (as Python's
    // daemons are), not when the program is killed (pool workers watch
    // for that themselves). Either way a parent already gone (the check
    // after arming the signal closes that window) ends it now.
    let tie = parent.is_some() || request.started_on_main_thread;
    if request.daemon
        && ((tie && sys::set_parent_death_signal(libc::SIGKILL).is_err())
            || sys::getppid() != expected_parent)
    {
        sys::exit_now(1);
    }
    let shared = match shared {
        Some(fds) => fds,
        None => {
            let mut fds = Vec::with_capacity(request.fds.len());
            for &fd in &request.fds {
                match sys::inherited_file(fd) {
                    Some(file) => fds.push(std::os::fd::OwnedFd::from(file)),
                    None => finish_with(
                        &result,
                        &Outcome::Refused(format!("shared descriptor {fd} is not open")),
                    ),
                }
            }
            fds
        }
    };
    crate::handoff::receive(shared);
    current::enter_child(
        request.name,
        request.path,
        request.daemon,
        request.parent,
        Some((request.parent_name, request.parent_daemon)),
    );
    crate::builder::install_panic_hook();
    let base = anchor();
    let trampoline_addr = base.wrapping_add(request.trampoline) as usize;
    let entry_addr = base.wrapping_add(request.entry) as usize;
    let run = sys::trampoline_at(&proof, trampoline_addr);
    run(&proof, entry_addr, &request.args, &result)
}

/// Where a child finds its request.
pub(crate) enum RequestSource {
    /// A memfd holding it (an exec start, a fork-server `Fork` request, a
    /// request too large to travel inline).
    File(File),
    /// The bytes themselves, which came in the message that handed the
    /// request to a spare.
    Inline(Vec<u8>),
}

/// A request's bytes in a memfd of their own.
pub(crate) fn request_memfd(bytes: &[u8]) -> Result<File, SpawnError> {
    let file = sys::memfd(c"proc-request").map_err(SpawnError::ResultChannel)?;
    file.write_all_at(bytes, 0)
        .map_err(SpawnError::ResultChannel)?;
    Ok(file)
}

/// What an exec or fork-server start sends to its child.
pub(crate) struct Prepared {
    /// The encoded [`Request`].
    pub(crate) request: Vec<u8>,
    pub(crate) result: File,
    /// Descriptors shared by the arguments (this process's duplicates).
    pub(crate) fds: Vec<std::os::fd::OwnedFd>,
    pub(crate) name: String,
    pub(crate) daemon: bool,
    stdin: Stdin,
}

/// Builds the request for the entry `f(args)`.
pub(crate) fn prepare<A, R>(
    builder: &Builder,
    f: fn(A) -> R,
    args: A,
    needs_init: bool,
) -> Result<Prepared, SpawnError>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    if needs_init && !INIT_CALLED.load(Ordering::Relaxed) {
        return Err(SpawnError::InitMissing);
    }
    let (name, path, daemon, stdin) = builder.settings();
    let (name, path) = current::child_identity(name, path);
    let me = current::current_process();
    let (args, fds) = crate::handoff::collect(|| postcard::to_stdvec(&args));
    let args = args.map_err(|e| SpawnError::Encode(e.to_string()))?;
    let trampoline: sys::Trampoline = trampoline::<A, R>;
    let request = Request {
        exe: sys::exe_identity().map_err(SpawnError::Exec)?,
        trampoline: (trampoline as *const () as i64).wrapping_sub(anchor()),
        entry: (f as *const () as i64).wrapping_sub(anchor()),
        args,
        fds: fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect(),
        name: name.clone(),
        path,
        daemon,
        started_on_main_thread: sys::on_main_thread(),
        parent: sys::getpid(),
        parent_name: me.name().to_owned(),
        parent_daemon: me.daemon(),
    };
    let bytes = postcard::to_stdvec(&request).map_err(|e| SpawnError::Encode(e.to_string()))?;
    let result = sys::memfd(c"proc-result").map_err(SpawnError::ResultChannel)?;
    Ok(Prepared {
        request: bytes,
        result,
        fds,
        name,
        daemon,
        stdin,
    })
}

/// Starts `f(args)` in a fresh exec of this executable.
pub(crate) fn spawn_exec<A, R>(
    builder: Builder,
    f: fn(A) -> R,
    args: A,
) -> Result<JoinHandle<R>, SpawnError>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    let Prepared {
        request,
        result,
        fds,
        name,
        daemon,
        stdin,
    } = prepare(&builder, f, args, true)?;
    let request_file = request_memfd(&request)?;
    children::init();
    let slot = children::reserve().ok_or(SpawnError::TooManyChildren)?;
    children::name(slot, &name);
    let null = match stdin {
        Stdin::Null => match crate::builder::dev_null() {
            Ok(null) => Some(null.as_raw_fd()),
            Err(e) => {
                children::unreserve(slot);
                return Err(SpawnError::Exec(e));
            }
        },
        _ => None,
    };
    let mut keep = vec![sys::raw_fd(&request_file), sys::raw_fd(&result)];
    keep.extend(fds.iter().map(AsRawFd::as_raw_fd));
    let spec = sys::ExecSpec {
        var: (
            ENV,
            format!(
                "{},{},{}",
                sys::raw_fd(&request_file),
                sys::raw_fd(&result),
                sys::getpid()
            ),
        ),
        keep: &keep,
        stdin: null,
    };
    let pid = match sys::spawn_exe(&spec) {
        Ok(pid) => pid,
        Err(e) => {
            children::unreserve(slot);
            return Err(SpawnError::Exec(e));
        }
    };
    children::register(slot, pid, daemon);
    Ok(JoinHandle::new(Pid::from_raw(pid), name, result, slot))
}
