//! Errors of `proc-queue`: flow control (hand-written, handing the item
//! back) and failures (`QueueError`).

use std::fmt;
use std::io;

/// Why a queue operation failed (not flow control).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The shared segment holds values no correct peer writes (a corrupted
    /// header, record, or position): the queue cannot be trusted any more.
    #[error("queue segment corrupted: {0}")]
    Corrupted(String),
    /// A message did not decode as the queue's type (two processes
    /// disagree on it, or the payload is damaged). The message was
    /// consumed; the queue keeps working.
    #[error("message does not decode as the queue's type: {0}")]
    Decode(String),
    /// The item could not be serialized.
    #[error("item could not be serialized: {0}")]
    Encode(String),
    /// A message announced a size this process cannot hold.
    #[error("message of {0} bytes is too large for this process")]
    TooLarge(u64),
    /// `task_done()` was called more times than items were put
    /// (Python's `ValueError`).
    #[error("task_done() called too many times")]
    TaskDoneTooManyTimes,
    /// A builder setting is out of range.
    #[error("invalid queue setting: {0}")]
    InvalidSetting(String),
    /// Creating or mapping the shared segment failed.
    #[error("shared memory setup failed")]
    Io(#[from] io::Error),
}

/// Why `put`, `put_timeout` or `try_put` did not put the item; every variant
/// hands the item back.
pub enum PutError<T> {
    /// The queue is full (`try_put` only, Python's `queue.Full`).
    Full(T),
    /// The queue stayed full until the deadline (`put_timeout`).
    Timeout(T),
    /// The queue is closed.
    Closed(T),
    /// The item could not be put (serialization, or a broken segment).
    Failed(T, QueueError),
}

impl<T> PutError<T> {
    /// The item that was not put.
    pub fn into_inner(self) -> T {
        match self {
            PutError::Full(t)
            | PutError::Timeout(t)
            | PutError::Closed(t)
            | PutError::Failed(t, _) => t,
        }
    }

    /// Whether the queue was full.
    pub fn is_full(&self) -> bool {
        matches!(self, PutError::Full(_))
    }

    /// Whether the deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, PutError::Timeout(_))
    }

    /// Whether the queue is closed.
    pub fn is_closed(&self) -> bool {
        matches!(self, PutError::Closed(_))
    }

    /// The failure, for [`PutError::Failed`].
    pub fn error(&self) -> Option<&QueueError> {
        match self {
            PutError::Failed(_, e) => Some(e),
            _ => None,
        }
    }
}

impl<T> fmt::Debug for PutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutError::Full(_) => f.write_str("Full(..)"),
            PutError::Timeout(_) => f.write_str("Timeout(..)"),
            PutError::Closed(_) => f.write_str("Closed(..)"),
            PutError::Failed(_, e) => f.debug_tuple("Failed").field(&"..").field(e).finish(),
        }
    }
}

impl<T> fmt::Display for PutError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutError::Full(_) => f.write_str("queue is full"),
            PutError::Timeout(_) => f.write_str("timed out waiting for room in the queue"),
            PutError::Closed(_) => f.write_str("queue is closed"),
            PutError::Failed(_, e) => write!(f, "put failed: {e}"),
        }
    }
}

impl<T> std::error::Error for PutError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PutError::Failed(_, e) => Some(e),
            _ => None,
        }
    }
}

/// Why `get`, `get_timeout` or `try_get` returned no item.
#[derive(Debug)]
pub enum GetError {
    /// The queue is empty (`try_get` only, Python's `queue.Empty`).
    Empty,
    /// Nothing arrived before the deadline (`get_timeout`).
    Timeout,
    /// The queue is closed and everything put before was taken: the end of
    /// the stream.
    Closed,
    /// A message could not be taken (it did not decode, or the segment is
    /// broken).
    Failed(QueueError),
}

impl GetError {
    /// Whether the queue was empty.
    pub fn is_empty(&self) -> bool {
        matches!(self, GetError::Empty)
    }

    /// Whether the deadline passed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, GetError::Timeout)
    }

    /// Whether the queue is closed and drained.
    pub fn is_closed(&self) -> bool {
        matches!(self, GetError::Closed)
    }
}

impl fmt::Display for GetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GetError::Empty => f.write_str("queue is empty"),
            GetError::Timeout => f.write_str("timed out waiting for an item"),
            GetError::Closed => f.write_str("queue is closed and drained"),
            GetError::Failed(e) => write!(f, "get failed: {e}"),
        }
    }
}

impl std::error::Error for GetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GetError::Failed(e) => Some(e),
            _ => None,
        }
    }
}
