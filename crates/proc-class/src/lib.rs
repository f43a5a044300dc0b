//! The process class: Python's "subclass `Process` and override `run`".
//!
//! In Python a process class inherits from `Process`, extends `__init__`
//! with its own attributes (calling `super().__init__()` for the base ones)
//! and overrides `run()`; `start()` then runs `run()` in a new process.
//! Here a struct carries its own fields plus a [`Process`] (the base part,
//! what `super().__init__()` sets up), implements [`ProcessClass::run`],
//! and gets `start`, `join`, `name`, `daemon`, `pid`, `is_alive`, … from
//! the trait.
//!
//! The child is a fork of the caller: inside `run`, `self` is the child's
//! copy of the struct, with every field as it was at `start()`.
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use proc_class::ProcessClass;
//! use proc_core::Process;
//!
//! // 1. "inherit": carry the base part
//! struct Counter {
//!     base: Process,
//!     // 2. "__init__": the class's own attributes
//!     upto: u32,
//! }
//!
//! impl ProcessClass for Counter {
//!     fn process(&self) -> &Process { &self.base }
//!     fn process_mut(&mut self) -> &mut Process { &mut self.base }
//!     // 3. "override run()"
//!     fn run(&mut self) {
//!         let sum: u32 = (1..=self.upto).sum();
//!         if sum != 55 { proc_core::exit("wrong sum") }
//!     }
//! }
//!
//! // `super().__init__()`: the base part, named `Counter-N` as in Python
//! let mut c = Counter { base: Process::for_class::<Counter>(), upto: 10 };
//! assert!(c.name().starts_with("Counter-"));
//! c.set_name("counter")?;
//! c.start()?; // runs `run` in a new process
//! c.join()?;
//! assert_eq!(c.exitcode(), Some(0));
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use std::process::ExitStatus;
use std::time::Duration;

pub use proc_core::{Pid, Process, ProcessError};

/// A process class: implement [`run`](ProcessClass::run) and the two
/// accessors to the base [`Process`], and the trait provides Python's
/// `start`, `join`, attributes and signals.
pub trait ProcessClass {
    /// The base part (Python's attributes set by `Process.__init__`).
    fn process(&self) -> &Process;

    /// The base part, mutably.
    fn process_mut(&mut self) -> &mut Process;

    /// What the process does: runs in the child, on the child's copy of
    /// `self`, when [`start`](ProcessClass::start) is called. A panic here
    /// gives the child exit code 1, as an exception in Python's `run` does.
    fn run(&mut self);

    /// Starts a child process that calls [`run`](ProcessClass::run)
    /// (Python's `start()`).
    ///
    /// # Errors
    ///
    /// [`ProcessError::AlreadyStarted`] the second time, and
    /// [`ProcessError::Spawn`] if the child could not be started.
    fn start(&mut self) -> Result<(), ProcessError>
    where
        Self: Sized,
    {
        let builder = self.process().prepare_start()?;
        let handle = builder.spawn(|| {
            // In the child: `self` is the child's copy.
            self.process_mut().become_current();
            self.run();
        })?;
        self.process_mut().attach(handle)
    }

    /// Waits for the child to end and returns its exit status (Python's
    /// `join()`).
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`.
    fn join(&mut self) -> Result<ExitStatus, ProcessError> {
        self.process_mut().join()
    }

    /// Waits at most `timeout`; `Ok(None)` if the child is still running.
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`.
    fn join_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ProcessError> {
        self.process_mut().join_timeout(timeout)
    }

    /// Whether the child is running (Python's `is_alive()`).
    fn is_alive(&self) -> bool {
        self.process().is_alive()
    }

    /// The child's pid; `None` before `start()`.
    fn pid(&self) -> Option<Pid> {
        self.process().pid()
    }

    /// The process's name.
    fn name(&self) -> &str {
        self.process().name()
    }

    /// Renames the process: before `start()`, the name the child gets;
    /// inside `run`, the running process's own name (Python's
    /// `self.name = …` there).
    ///
    /// # Errors
    ///
    /// [`ProcessError::SetAfterStart`] once started, in the parent.
    fn set_name(&mut self, name: &str) -> Result<(), ProcessError> {
        self.process_mut().set_name(name)
    }

    /// Whether the process is a daemon.
    fn daemon(&self) -> bool {
        self.process().daemon()
    }

    /// Makes the process a daemon (or not).
    ///
    /// # Errors
    ///
    /// [`ProcessError::SetAfterStart`] once started.
    fn set_daemon(&mut self, daemon: bool) -> Result<(), ProcessError> {
        self.process_mut().set_daemon(daemon)
    }

    /// The exit code: `None` while running, minus the signal number after a
    /// signal.
    fn exitcode(&self) -> Option<i32> {
        self.process().exitcode()
    }

    /// Sends `SIGTERM`.
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`.
    fn terminate(&mut self) -> Result<(), ProcessError> {
        self.process_mut().terminate()
    }

    /// Sends `SIGKILL`.
    ///
    /// # Errors
    ///
    /// [`ProcessError::NotStarted`] before `start()`.
    fn kill(&mut self) -> Result<(), ProcessError> {
        self.process_mut().kill()
    }
}
