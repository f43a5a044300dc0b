//! Descriptors that travel with an entry's arguments.
//!
//! A value that stands for a kernel object (a [`Queue`]'s shared memory, a
//! socket, …) cannot be serialized as bytes alone: its descriptor must reach
//! the child too. Its `Serialize` impl calls [`share_fd`] while
//! [`Builder::spawn_entry`](crate::Builder::spawn_entry) serializes the
//! arguments for an exec start; the descriptor is kept open across the exec
//! and its index is what the bytes carry. In the child, the `Deserialize`
//! impl turns the index back into a descriptor with [`take_shared_fd`].
//! (Python's `multiprocessing` does the same with its `reduction` module.)
//!
//! [`Queue`]: https://docs.rs/proc-queue

use std::cell::RefCell;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// Why a descriptor could not be shared or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShareError {
    /// `share_fd` outside the arguments of an exec start: such a value can
    /// only cross a process boundary as an entry's argument.
    #[error("a value holding a descriptor can only cross a process boundary as an argument of spawn_entry")]
    NotStarting,
    /// `take_shared_fd` with an index that no descriptor came with.
    #[error("no descriptor #{0} came with this process's entry")]
    Missing(u32),
    /// Duplicating the received descriptor failed.
    #[error("duplicating a received descriptor failed")]
    Io(#[from] std::io::Error),
}

thread_local! {
    /// The descriptors collected while an exec start serializes arguments:
    /// the number shared, and a duplicate the start owns (the value that
    /// shared it may be dropped before the child is started: an argument
    /// passed by value is).
    static OUTGOING: RefCell<Option<Vec<(RawFd, OwnedFd)>>> = const { RefCell::new(None) };
}

/// The descriptors this process received with its entry.
static INCOMING: parking_lot::Mutex<Vec<OwnedFd>> = parking_lot::const_mutex(Vec::new());

/// Registers `fd` to travel with the entry whose arguments are being
/// serialized; returns the index to serialize in its place. The same
/// descriptor shared twice gets the same index.
///
/// # Errors
///
/// [`ShareError::NotStarting`] outside the serialization of an exec start's
/// arguments; [`ShareError::Io`] if the descriptor could not be duplicated.
pub fn share_fd(fd: BorrowedFd<'_>) -> Result<u32, ShareError> {
    OUTGOING.with(|out| {
        let mut out = out.borrow_mut();
        let list = out.as_mut().ok_or(ShareError::NotStarting)?;
        let raw = fd.as_raw_fd();
        let index = match list.iter().position(|(f, _)| *f == raw) {
            Some(i) => i,
            None => {
                list.push((raw, fd.try_clone_to_owned()?));
                list.len() - 1
            }
        };
        Ok(index as u32)
    })
}

/// In a child started with an exec start method: a new descriptor for the
/// one shared under `index` by the parent.
///
/// # Errors
///
/// [`ShareError::Missing`] for an index the parent did not share.
pub fn take_shared_fd(index: u32) -> Result<OwnedFd, ShareError> {
    let incoming = INCOMING.lock();
    let fd = incoming
        .get(index as usize)
        .ok_or(ShareError::Missing(index))?;
    Ok(fd.try_clone()?)
}

/// Runs `serialize` while collecting shared descriptors; returns its result
/// and duplicates of the descriptors, in index order, which stay open
/// until the start has handed them over.
pub(crate) fn collect<R>(serialize: impl FnOnce() -> R) -> (R, Vec<OwnedFd>) {
    OUTGOING.with(|out| *out.borrow_mut() = Some(Vec::new()));
    let r = serialize();
    let fds = OUTGOING
        .with(|out| out.borrow_mut().take())
        .unwrap_or_default();
    (r, fds.into_iter().map(|(_, owned)| owned).collect())
}

/// In the child: the descriptors that came with the entry, in index order.
pub(crate) fn receive(fds: Vec<OwnedFd>) {
    *INCOMING.lock() = fds;
}
