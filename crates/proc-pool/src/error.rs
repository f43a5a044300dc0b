//! The pool's errors.

use serde::{Deserialize, Serialize};

/// Why a task gave no result.
///
/// # Examples
///
/// A worker that dies mid-task fails that task, and only that one:
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use proc_pool::{Pool, TaskError};
///
/// fn crash(_: ()) {
///     std::process::abort(); // as if the OOM killer struck
/// }
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let pool = Pool::new(2)?;
/// let before = pool.apply_async(double, 1)?;
/// let fatal = pool.apply_async(crash, ())?;
/// let after = pool.apply_async(double, 2)?;
/// assert_eq!(fatal.get(), Err(TaskError::WorkerDied { signal: Some(6), code: None }));
/// assert_eq!((before.get()?, after.get()?), (2, 4));
/// assert_eq!(pool.worker_pids().len(), 2); // replaced
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task panicked; the worker went on with the next task.
    #[error("the task panicked: {message}{}", location.as_ref().map(|l| format!(" at {l}")).unwrap_or_default())]
    Panicked {
        /// The panic message.
        message: String,
        /// Where (`file:line:column`), when known.
        location: Option<String>,
    },
    /// The worker running the task died (SIGKILL, abort, segfault, the OOM
    /// killer, an `exit` inside the task); the pool started a replacement.
    #[error("the worker running the task died ({})", describe_death(*signal, *code))]
    WorkerDied {
        /// The signal that killed it.
        signal: Option<i32>,
        /// Its exit code, when it exited.
        code: Option<i32>,
    },
    /// The task's arguments failed to serialize (nothing was sent).
    #[error("the task's arguments could not be serialized: {0}")]
    ArgsEncode(String),
    /// The worker could not decode the task's arguments.
    #[error("the worker could not decode the task's arguments: {0}")]
    ArgsDecode(String),
    /// The task's result failed to serialize in the worker.
    #[error("the task's result could not be serialized: {0}")]
    Encode(String),
    /// The result could not be decoded as the task's result type.
    #[error("the task's result could not be decoded: {0}")]
    ResultDecode(String),
    /// The pool was terminated (or dropped) before the task finished.
    #[error("the pool was terminated before the task finished")]
    Terminated,
    /// The pool no longer takes tasks: [`close`](crate::Pool::close) or
    /// [`terminate`](crate::Pool::terminate) was called.
    #[error("the pool is not running (closed or terminated)")]
    NotRunning,
    /// The initializer failed in a worker: the pool stopped starting
    /// workers (Python's pool restarts them forever).
    #[error("the pool's initializer failed in a worker: {0}")]
    InitializerFailed(String),
    /// No worker could be started to run the task.
    #[error("the pool could not start a worker: {0}")]
    NoWorkers(String),
    /// A task or result message was corrupted.
    #[error("a pool message was corrupted: {0}")]
    Corrupted(String),
    /// [`get_timeout`](crate::AsyncResult::get_timeout): not ready yet
    /// (the result stays retrievable).
    #[error("the result is not ready yet")]
    Timeout,
    /// The result was already taken by an earlier `get_timeout`.
    #[error("the result was already taken")]
    Taken,
}

fn describe_death(signal: Option<i32>, code: Option<i32>) -> String {
    match (signal, code) {
        (Some(s), _) => format!("killed by signal {s}"),
        (None, Some(c)) => format!("exit code {c}"),
        (None, None) => "status unknown".to_owned(),
    }
}

/// Why the pool itself failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A pool needs at least one worker.
    #[error("a pool needs at least one worker process")]
    NoProcesses,
    /// Starting the zygote or a worker failed.
    #[error("starting a worker failed: {0}")]
    Spawn(#[from] proc_core::SpawnError),
    /// Creating the pool's queues failed.
    #[error("creating the pool's queues failed: {0}")]
    Queue(#[from] proc_queue::QueueError),
    /// [`join`](crate::Pool::join) before [`close`](crate::Pool::close) or
    /// [`terminate`](crate::Pool::terminate) (Python raises `ValueError`).
    #[error("join() needs close() or terminate() first")]
    StillRunning,
}
