//! Real OS processes with Python's `multiprocessing.Process` life cycle, and
//! a std-like typed [`spawn`].
//!
//! This crate is the fork start method of `proc`: a child is a copy of the
//! caller that runs one closure, sends its return value back (serialized
//! with postcard through an in-memory file), and ends.
//!
//! - [`spawn`] / [`Builder`] → [`JoinHandle<T>`]: `std::thread`'s shape for
//!   processes, with the child's typed result, panic, exit code or signal.
//! - [`Process`]: Python's object, step by step (`new`, set `name` /
//!   `daemon`, `start`, `join`, `is_alive`, `pid`, `exitcode`, `terminate`,
//!   `kill`).
//! - [`getpid`], [`getppid`], [`exit`], [`current_process`],
//!   [`parent_process`], [`active_children`], [`cpu_count`].
//!
//! # Soundness of fork
//!
//! After `fork` only the calling thread exists in the child; a lock that
//! another thread held stays held forever. The safe [`spawn`] therefore
//! forks only when this process has exactly one thread (read from
//! `/proc/self/stat`) and otherwise returns [`SpawnError::Threaded`];
//! [`Builder::spawn_unchecked`] skips the check for callers who take the
//! responsibility.
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let child = proc_core::spawn(|| proc_core::getpid())?;
//! let pid = child.pid();
//! assert_eq!(child.join()?, pid);
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

mod builder;
mod children;
mod current;
mod entry;
mod error;
mod forkserver;
mod handle;
pub mod handoff;
mod pid;
mod process;
mod remote;
#[allow(unsafe_code)]
mod sys;
pub mod task;

pub use builder::{spawn, Builder, Stdin};
pub use current::{
    active_children, cpu_count, current_process, exit, getpid, getppid, parent_process, ExitInfo,
    ProcessInfo,
};
pub use entry::{
    get_context, get_start_method, init, set_start_method, Context, StartMethod, StartMethodError,
};
pub use error::{DecodeError, JoinError, ProcessError, SpawnError};
pub use forkserver::Zygote;
pub use handle::JoinHandle;
pub use pid::Pid;
pub use process::Process;
