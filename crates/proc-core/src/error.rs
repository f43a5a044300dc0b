//! Errors of `proc-core`.

use std::io;

/// Why a child process could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpawnError {
    /// The process has other threads, so forking and then running arbitrary
    /// code in the child is not safe.
    #[error(
        "cannot fork safely: this process has {threads} threads, and after fork a lock held by \
         another thread stays held in the child; start processes before starting threads, run an \
         entry with StartMethod::Spawn or StartMethod::ForkServer (Builder::spawn_entry), or \
         take responsibility with the unsafe `Builder::spawn_unchecked`"
    )]
    Threaded {
        /// How many threads the process had.
        threads: usize,
    },
    /// Whether the process is single-threaded could not be read from `/proc`.
    #[error("cannot tell whether this process is single-threaded (is /proc mounted?)")]
    ThreadCheck(#[source] io::Error),
    /// More children are alive at once than the child table holds.
    #[error("too many live children: join or drop some handles first")]
    TooManyChildren,
    /// `/dev/null` could not be opened for the child's standard input.
    #[error("failed to open /dev/null for the child's stdin")]
    Stdin(#[source] io::Error),
    /// Creating the file that carries the result back failed.
    #[error("failed to create the result channel")]
    ResultChannel(#[source] io::Error),
    /// A `Spawn` start without `proc::init()` as the first line of `main`:
    /// the new process would run the whole program again.
    #[error(
        "the Spawn start method needs proc::init() as the first line of main \
         (the child re-executes this program and init() runs its entry)"
    )]
    InitMissing,
    /// The executable could not be started (exec failed).
    #[error("failed to start the executable")]
    Exec(#[source] io::Error),
    /// The entry's arguments could not be serialized.
    #[error("the entry's arguments could not be serialized: {0}")]
    Encode(String),
    /// `fork` itself failed (out of memory, or the process limit was hit).
    #[error("fork failed")]
    Fork(#[source] io::Error),
}

/// Why joining a child did not produce its return value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The child's closure panicked.
    #[error("child process panicked at {}: {message}", location.as_deref().unwrap_or("<unknown>"))]
    Panicked {
        /// The panic message.
        message: String,
        /// `file:line:column` of the panic, where the panic hook saw it.
        location: Option<String>,
    },
    /// The child exited (by `proc::exit`, `std::process::exit` or similar)
    /// before returning a value.
    #[error("child process exited with status {code} before returning a value")]
    Exited {
        /// The exit status code.
        code: i32,
    },
    /// The child was killed by a signal.
    #[error("child process was killed by signal {signal}{}", if *core_dumped { " (core dumped)" } else { "" })]
    Signaled {
        /// The signal number (9 for SIGKILL).
        signal: i32,
        /// Whether a core dump was written.
        core_dumped: bool,
    },
    /// The child could not serialize its return value.
    #[error("child process could not serialize its result: {0}")]
    Encode(String),
    /// The bytes the child sent back do not decode as the expected type.
    #[error("the child's result does not decode as the expected type")]
    Decode(#[source] DecodeError),
    /// A child started by exec refused to run its entry: it is not the same
    /// executable as its parent (rebuilt on disk meanwhile), or the request
    /// it received was malformed.
    #[error("child refused its entry: {0}")]
    Refused(String),
    /// The child was already reaped by someone else (for example a
    /// `SIGCHLD` set to `SIG_IGN`, or an exit handler), so its status is lost.
    #[error("the child's exit status was collected elsewhere")]
    StatusLost,
    /// Waiting for the child failed.
    #[error("waiting for the child failed")]
    Io(#[source] io::Error),
}

/// The cause of [`JoinError::Decode`]: what the decoder said.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub(crate) String);

/// Misuse of a [`Process`](crate::Process) object, or a failure to start or
/// wait for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// `start()` was called on a process that was already started.
    #[error("process already started")]
    AlreadyStarted,
    /// `join()`, `terminate()` or `kill()` before `start()`.
    #[error("process not started yet")]
    NotStarted,
    /// An attribute that must be set before `start()` was set afterwards.
    #[error("`{0}` must be set before start()")]
    SetAfterStart(&'static str),
    /// `start()`, `join()`, `terminate()` or `kill()` in another process
    /// than the one that made the object (a forked child's copy).
    #[error("a Process can only be started, joined or signalled by the process that made it")]
    NotOwner,
    /// The process could not be started.
    #[error("failed to start the process")]
    Spawn(#[from] SpawnError),
    /// Waiting for or signalling the process failed.
    #[error("waiting for or signalling the process failed")]
    Io(#[from] io::Error),
}
