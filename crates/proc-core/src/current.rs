//! The current process: its ids, its name, its children, and how it exits
//! (Python's `os.getpid`, `os.getppid`, `sys.exit`, `current_process`,
//! `parent_process`, `active_children`, `cpu_count`).

use std::fmt;
use std::io::Write;

use crate::children;
use crate::pid::Pid;
use crate::sys;

/// Who this process is in the `proc` family tree.
struct Identity {
    name: String,
    daemon: bool,
    /// Python's `_identity`: `[]` in the main process, `[2, 1]` for the first
    /// child of the second child (named `Process-2:1`).
    path: Vec<u32>,
    /// How many children have been named so far.
    counter: u32,
    parent: Option<ProcessInfo>,
}

static IDENTITY: parking_lot::Mutex<Option<Identity>> = parking_lot::const_mutex(None);

fn with_identity<R>(f: impl FnOnce(&mut Identity) -> R) -> R {
    let mut guard = IDENTITY.lock();
    let id = guard.get_or_insert_with(|| Identity {
        name: "MainProcess".to_owned(),
        daemon: false,
        path: Vec::new(),
        counter: 0,
        parent: None,
    });
    f(id)
}

/// Renames this process (a process class's `self.name = …` inside `run`).
pub(crate) fn rename(name: &str) {
    with_identity(|id| name.clone_into(&mut id.name));
}

/// The next default child name, `Process-N` (or `Process-1:N` in a child),
/// and the identity path that goes with it.
pub(crate) fn next_child_identity() -> (String, Vec<u32>) {
    with_identity(|id| {
        id.counter += 1;
        let mut path = id.path.clone();
        path.push(id.counter);
        (default_name(&path), path)
    })
}

/// A start's child identity: the name and path a `Process` object took
/// when it was made, else the next default one (keeping a given name).
pub(crate) fn child_identity(name: Option<String>, path: Option<Vec<u32>>) -> (String, Vec<u32>) {
    match (name, path) {
        (Some(name), Some(path)) => (name, path),
        (name, _) => {
            let (default_name, path) = next_child_identity();
            (name.unwrap_or(default_name), path)
        }
    }
}

fn default_name(path: &[u32]) -> String {
    class_name("Process", path)
}

/// Python's default name of an instance of `class`: the class name, then
/// the position (`Process-2:1`).
pub(crate) fn class_name(class: &str, path: &[u32]) -> String {
    let parts: Vec<String> = path.iter().map(u32::to_string).collect();
    format!("{class}-{}", parts.join(":"))
}

/// Becomes the child described by `name`/`path`, in a freshly forked child
/// (whose memory holds its parent's identity) or, with the parent's name
/// and daemon flag in `parent`, in a child that does not hold it (an exec,
/// or a child of the fork server).
pub(crate) fn enter_child(
    name: String,
    path: Vec<u32>,
    daemon: bool,
    parent_pid: libc::pid_t,
    parent: Option<(String, bool)>,
) {
    with_identity(|id| {
        let (parent_name, parent_daemon) =
            parent.unwrap_or_else(|| (std::mem::take(&mut id.name), id.daemon));
        let parent = ProcessInfo {
            name: parent_name,
            pid: Pid::from_raw(parent_pid),
            daemon: parent_daemon,
        };
        *id = Identity {
            name,
            daemon,
            path,
            counter: 0,
            parent: Some(parent),
        };
    });
}

/// Whether this process is a child started by `proc`.
pub(crate) fn is_child() -> bool {
    with_identity(|id| id.parent.is_some())
}

/// A snapshot of a process's identity: name, pid and daemon flag.
///
/// # Examples
///
/// ```
/// let me = proc_core::current_process();
/// assert_eq!(me.name(), "MainProcess");
/// assert_eq!(me.pid(), proc_core::getpid());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    name: String,
    pid: Pid,
    daemon: bool,
}

impl ProcessInfo {
    /// The process's name (`MainProcess`, `Process-1`, or the name given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the process is a daemon.
    pub fn daemon(&self) -> bool {
        self.daemon
    }
}

impl fmt::Display for ProcessInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {})", self.name, self.pid)
    }
}

/// This process's id (Python's `os.getpid()`).
///
/// # Examples
///
/// ```
/// assert_eq!(proc_core::getpid().as_u32(), std::process::id());
/// ```
pub fn getpid() -> Pid {
    Pid::from_raw(sys::getpid())
}

/// The parent process's id (Python's `os.getppid()`).
///
/// # Examples
///
/// ```
/// assert!(proc_core::getppid().as_u32() > 0);
/// ```
pub fn getppid() -> Pid {
    Pid::from_raw(sys::getppid())
}

/// This process's name, pid and daemon flag (Python's `current_process()`).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let child = proc_core::spawn(|| proc_core::current_process().name().to_owned())?;
/// assert!(child.join()?.starts_with("Process-"));
/// # Ok(()) }
/// ```
pub fn current_process() -> ProcessInfo {
    with_identity(|id| ProcessInfo {
        name: id.name.clone(),
        pid: getpid(),
        daemon: id.daemon,
    })
}

/// The process that started this one, or `None` in the main process
/// (Python's `parent_process()`).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// assert!(proc_core::parent_process().is_none());
/// let child = proc_core::spawn(|| proc_core::parent_process().map(|p| p.pid().as_u32()))?;
/// assert_eq!(child.join()?, Some(std::process::id()));
/// # Ok(()) }
/// ```
pub fn parent_process() -> Option<ProcessInfo> {
    with_identity(|id| id.parent.clone())
}

/// The children this process started that are still running (Python's
/// `active_children()`), whatever their start method: those the fork
/// server or a [`Zygote`](crate::Zygote) forked for it are listed too.
/// Children whose handles were dropped and that have ended are reaped on
/// the way.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let child = proc_core::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)))?;
/// assert!(proc_core::active_children().iter().any(|c| c.pid() == child.pid()));
/// child.join()?;
/// assert!(proc_core::active_children().is_empty());
/// # Ok(()) }
/// ```
pub fn active_children() -> Vec<ProcessInfo> {
    children::live()
        .into_iter()
        .map(|c| ProcessInfo {
            name: c.name,
            pid: Pid::from_raw(c.pid),
            daemon: c.daemon,
        })
        .collect()
}

/// The number of CPUs this process may use: its CPU affinity and, in a
/// container, its cgroup CPU quota (std's `available_parallelism`). Python's
/// `cpu_count()` counts every CPU of the machine and its
/// `process_cpu_count()` (3.13) the affinity only; this is the number of
/// workers that can run at once, which is what `Pool::new`'s default needs.
///
/// # Examples
///
/// ```
/// assert!(proc_core::cpu_count() >= 1);
/// ```
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What [`exit`] exits with: a status code, or a message printed to stderr
/// before exiting with status 1 (Python's `sys.exit(info)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitInfo {
    /// Exit with this status code.
    Code(i32),
    /// Print this to stderr, then exit with status 1.
    Message(String),
}

impl From<i32> for ExitInfo {
    fn from(code: i32) -> Self {
        ExitInfo::Code(code)
    }
}

impl From<()> for ExitInfo {
    fn from((): ()) -> Self {
        ExitInfo::Code(0)
    }
}

impl From<&str> for ExitInfo {
    fn from(msg: &str) -> Self {
        ExitInfo::Message(msg.to_owned())
    }
}

impl From<String> for ExitInfo {
    fn from(msg: String) -> Self {
        ExitInfo::Message(msg)
    }
}

/// Exits the current process (Python's `sys.exit(info)`).
///
/// A message is printed to stderr and the status is 1; an integer is the
/// status; `()` is status 0. In the main process this is
/// `std::process::exit` (exit handlers run: daemon children are terminated,
/// the others joined). In a child started by `proc`, stdout and stderr are
/// flushed, the child's own children are handled the same way, and the child
/// ends at once without running its parent's exit handlers.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let child = proc_core::spawn(|| -> () { proc_core::exit(3) })?;
/// assert!(matches!(child.join(), Err(proc_core::JoinError::Exited { code: 3 })));
/// # Ok(()) }
/// ```
pub fn exit(info: impl Into<ExitInfo>) -> ! {
    let code = match info.into() {
        ExitInfo::Code(code) => code,
        ExitInfo::Message(msg) => {
            let _ = writeln!(std::io::stderr(), "{msg}");
            1
        }
    };
    if is_child() {
        finish_child(code)
    } else {
        std::process::exit(code)
    }
}

/// Ends a child started by `proc`: flushes stdio, terminates its daemon
/// children and joins the others, then `_exit`s.
pub(crate) fn finish_child(code: i32) -> ! {
    finish_child_then(code, || {})
}

/// As [`finish_child`], running `last` just before the exit itself (after
/// the flush and the wait for this child's own children).
pub(crate) fn finish_child_then(code: i32, last: impl FnOnce()) -> ! {
    // stderr is unbuffered; stdout keeps a partial line until flushed.
    let _ = std::io::stdout().flush();
    children::finish_children();
    last();
    sys::exit_now(code)
}
