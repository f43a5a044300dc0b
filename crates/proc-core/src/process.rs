//! [`Process`]: Python's `multiprocessing.Process` life cycle.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use crate::builder::{Builder, Stdin};
use crate::current;
use crate::error::{JoinError, ProcessError};
use crate::handle::JoinHandle;
use crate::pid::Pid;
use crate::sys;

type Target = Box<dyn FnOnce() + Send + 'static>;

enum State {
    /// Not started yet.
    Created,
    /// Started: the handle to wait on.
    Started(JoinHandle<()>),
    /// This object describes the process that is running this code (inside
    /// a process class's `run`).
    Current,
}

/// A process object with Python's life cycle: create it with a target, set
/// its attributes, `start()` it, `join()` it.
///
/// The seed's five steps:
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use proc_core::Process;
///
/// // 1. wrap the work in a function (a closure carries its arguments)
/// let greeting = String::from("hello");
/// // 2. create the process object, bound to the function
/// let mut p = Process::new(move || println!("{greeting} from {}", proc_core::getpid()));
/// // 3. set attributes before start
/// p.set_name("greeter")?;
/// p.set_daemon(false)?;
/// assert_eq!(p.pid(), None);
/// // 4. start: the child is created and runs the target
/// p.start()?;
/// assert!(p.pid().is_some());
/// // 5. join: wait for it and collect its exit status
/// p.join()?;
/// assert_eq!(p.exitcode(), Some(0));
/// # Ok(()) }
/// ```
///
/// # Drop
///
/// Dropping a started process does not wait for it: the child is detached
/// as a dropped [`JoinHandle`] is (reaped when it exits, never a zombie;
/// a non-daemon child is still waited for when this process exits).
#[must_use = "a Process does nothing until `start` is called"]
pub struct Process {
    name: String,
    path: Vec<u32>,
    daemon: bool,
    stdin: Stdin,
    target: Option<Target>,
    state: State,
    status: Option<ExitStatus>,
    /// The process that made this object: only it starts, waits for or
    /// signals the child (Python asserts the same).
    owner: libc::pid_t,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("daemon", &self.daemon)
            .field("pid", &self.pid())
            .field("exit_status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Default for Process {
    /// A process without a target: started, it runs nothing and exits with 0
    /// (Python's `Process()`). Process classes build on this.
    fn default() -> Self {
        let (name, path) = current::next_child_identity();
        Process {
            name,
            path,
            daemon: false,
            stdin: Stdin::Null,
            target: None,
            state: State::Created,
            status: None,
            owner: sys::cached_pid(),
        }
    }
}

impl Process {
    /// The base part of a process class `C` (Python's `super().__init__()`
    /// in `class C(Process)`): [`Process::default()`] named after the class,
    /// `C-N`, as Python names an instance of `class Counter(Process)`
    /// `Counter-1` (numbered as `Process-N` is: by position among this
    /// process's children, `Counter-2:1` in a child). The class name is
    /// the type's own, without its module path or generic arguments.
    ///
    /// ```
    /// use proc_core::Process;
    /// struct Counter;
    /// let base = Process::for_class::<Counter>();
    /// assert!(base.name().starts_with("Counter-"));
    /// ```
    pub fn for_class<C: ?Sized>() -> Self {
        let mut process = Process::default();
        process.name = current::class_name(class_name::<C>(), &process.path);
        process
    }

    /// A process that will run `target` (Python's `Process(target=...)`; the
    /// closure captures what Python passes as `args` and `kwargs`). Its name
    /// is `Process-N`, numbered as Python numbers them.
    pub fn new<F>(target: F) -> Self
    where
        F: FnOnce() + Send + 'static,
    {
        Process {
            target: Some(Box::new(target)),
            ..Process::default()
        }
    }

    /// The process's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renames the process: before `start()`, the name the child gets;
    /// inside a process class's `run` (the object describes the running
    /// process), the running process's own name, as Python's
    /// `self.name = …` there renames `current_process()`.
    ///
    /// # Errors
    ///
    /// [`ProcessError::SetAfterStart`] once started, in the parent: the
    /// child already runs under its old name.
    pub fn set_name(&mut self, name: impl Into<String>) -> Result<(), ProcessError> {
        if matches!(self.state, State::Current) {
            self.name = name.into();
            crate::current::rename(&self.name);
            return Ok(());
        }
        self.check_not_started("name")?;
        self.name = name.into();
        Ok(())
    }

    /// Whether the process is a daemon.
    pub fn daemon(&self) -> bool {
        self.daemon
    }

    /// Makes the process a daemon (or not): a daemon is terminated when this
    /// process exits, and killed if this process dies any other way, even by
    /// `SIGKILL`. Daemons are usually not joined.
    ///
    /// ```compile_fail
    /// // `set_daemon` needs `&mut`, and must come before `start()` at run time.
    /// let p = proc_core::Process::new(|| ());
    /// p.set_daemon(true);
    /// ```
    ///
    /// # Errors
    ///
    /// [`ProcessError::SetAfterStart`] once started.
    pub fn set_daemon(&mut self, daemon: bool) -> Result<(), ProcessError> {
        self.check_not_started("daemon")?;
        self.daemon = daemon;
        Ok(())
    }

    /// Chooses the child's standard input (default: `/dev/null`).
    ///
    /// # Errors
    ///
    /// [`ProcessError::SetAfterStart`] once started.
    pub fn set_stdin(&mut self, stdin: Stdin) -> Result<(), ProcessError> {
        self.check_not_started("stdin")?;
        self.stdin = stdin;
        Ok(())
    }

    /// Whether this process made this object (a forked child holds a copy
    /// of its parent's objects, whose children are not its own).
    fn check_owner(&self) -> Result<(), ProcessError> {
        if sys::cached_pid() == self.owner {
            Ok(())
        } else {
            Err(ProcessError::NotOwner)
        }
    }

    fn check_not_started(&self, what: &'static str) -> Result<(), ProcessError> {
        match self.state {
            State::Created => Ok(()),
            _ => Err(ProcessError::SetAfterStart(what)),
        }
    }

    /// Starts the child, which runs the target (Python's `start()`).
    ///
    /// # Errors
    ///
    /// [`ProcessError::AlreadyStarted`] the second time;
    /// [`ProcessError::Spawn`] if the child could not be started (the target
    /// is kept, so `start()` can be tried again).
    pub fn start(&mut self) -> Result<(), ProcessError> {
        let builder = self.prepare_start()?;
        let target: Target = self.target.take().unwrap_or_else(|| Box::new(|| ()));
        match builder.try_spawn(target) {
            Ok(handle) => self.attach(handle),
            Err((err, target)) => {
                self.target = Some(target);
                Err(err.into())
            }
        }
    }

    /// The [`Builder`] that starting this process uses (name, daemon, stdin),
    /// for process classes that start their own `run` and then
    /// [`attach`](Self::attach) the handle.
    ///
    /// # Errors
    ///
    /// [`ProcessError::AlreadyStarted`] if already started.
    pub fn prepare_start(&self) -> Result<Builder, ProcessError> {
        self.check_owner()?;
        if !matches!(self.state, State::Created) {
            return Err(ProcessError::AlreadyStarted);
        }
        Ok(Builder::new()
            .identity(self.name.clone(), self.path.clone())
            .daemon(self.daemon)
            .stdin(self.stdin))
    }

    /// Records that this process was started as `handle`.
    ///
    /// # Errors
    ///
    /// [`ProcessError::AlreadyStarted`] if already started (the handle is
    /// dropped, which detaches its child).
    pub fn attach(&mut self, handle: JoinHandle<()>) -> Result<(), ProcessError> {
        if !matches!(self.state, State::Created) {
            return Err(ProcessError::AlreadyStarted);
        }
        self.state = State::Started(handle);
        Ok(())
    }

    /// Marks this object as describing the running process itself: inside
    /// the child, `pid()` is then its own pid and `is_alive()` is true, as in
    /// Python's `run()`.
    pub fn become_current(&mut self) {
        self.state = State::Current;
    }

    /// Waits for the child to end (Python's `join()`) and returns its exit
    /// status; at once if it already ended.
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`; [`ProcessError::Io`]
    /// if waiting fails.
    pub fn join(&mut self) -> Result<ExitStatus, ProcessError> {
        match self.join_inner(None)? {
            Some(status) => Ok(status),
            None => Err(ProcessError::Io(std::io::Error::other("child status lost"))),
        }
    }

    /// Waits at most `timeout` for the child to end (Python's
    /// `join(timeout)`); `Ok(None)` if it is still running.
    ///
    /// # Errors
    ///
    /// As [`join`](Self::join).
    pub fn join_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        self.join_inner(Some(timeout))
    }

    fn join_inner(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, ProcessError> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        if matches!(self.state, State::Started(_)) {
            self.check_owner()?;
        }
        let handle = match &mut self.state {
            State::Created => return Err(ProcessError::NotStarted),
            State::Current => {
                return Err(ProcessError::Io(std::io::Error::new(
                    std::io::ErrorKind::Deadlock,
                    "a process cannot join itself",
                )))
            }
            State::Started(handle) => handle,
        };
        let waited = match timeout {
            None => handle.wait().map(Some),
            Some(timeout) => handle.wait_timeout(timeout),
        };
        match waited {
            Ok(status) => {
                self.status = status;
                Ok(status)
            }
            Err(JoinError::Io(e)) => Err(ProcessError::Io(e)),
            Err(e) => Err(ProcessError::Io(std::io::Error::other(e))),
        }
    }

    /// Whether the child has been started and has not ended yet (Python's
    /// `is_alive()`). Looks without reaping: `join()` (or dropping the
    /// object) reaps.
    pub fn is_alive(&self) -> bool {
        match &self.state {
            State::Created => false,
            State::Current => true,
            State::Started(handle) => self.status.is_none() && !handle.is_finished(),
        }
    }

    /// The child's pid: `None` before `start()` (Python's `pid`).
    pub fn pid(&self) -> Option<Pid> {
        match &self.state {
            State::Created => None,
            State::Started(handle) => Some(handle.pid()),
            State::Current => Some(current::current_process().pid()),
        }
    }

    /// The exit code: `None` while running (or before start), the status
    /// code after a normal exit, and minus the signal number after a
    /// signal, as in Python (`-9` after `kill()`).
    pub fn exitcode(&self) -> Option<i32> {
        let status = match (&self.status, &self.state) {
            (Some(status), _) => *status,
            (None, State::Started(handle)) => handle.peek_status()?,
            (None, _) => return None,
        };
        status.code().or_else(|| status.signal().map(|s| -s))
    }

    /// Sends `SIGTERM` (Python's `terminate()`); nothing if it already ended.
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`; the OS error if the
    /// signal could not be sent.
    pub fn terminate(&mut self) -> Result<(), ProcessError> {
        self.started_handle()?.terminate().map_err(ProcessError::Io)
    }

    /// Sends `SIGKILL` (Python's `kill()`); nothing if it already ended.
    ///
    /// # Errors
    ///
    /// As [`terminate`](Self::terminate).
    pub fn kill(&mut self) -> Result<(), ProcessError> {
        self.started_handle()?.kill().map_err(ProcessError::Io)
    }

    fn started_handle(&self) -> Result<&JoinHandle<()>, ProcessError> {
        match &self.state {
            State::Started(handle) => {
                self.check_owner()?;
                Ok(handle)
            }
            _ => Err(ProcessError::NotStarted),
        }
    }
}

/// The last segment of `C`'s type name, without generic arguments
/// (`my_crate::jobs::Counter<u8>` → `Counter`).
fn class_name<C: ?Sized>() -> &'static str {
    let full = std::any::type_name::<C>();
    let plain = full.split('<').next().unwrap_or(full);
    plain.rsplit("::").next().unwrap_or(plain)
}
