//! The one `unsafe` call of `proc-pool`.

use proc_core::task::{TaskFn, TaskFnError};

/// Runs a task function that came through a worker's task queue.
///
/// The queue is private to the pool: it was created by the pool's process
/// (a `memfd` shared only with the workers it started, by descriptor), and
/// only that process puts task messages into it, each `TaskFn` made there by
/// `TaskFn::new` and sent unaltered; the worker is an entry child of that
/// process (same executable). The checksum inside `TaskFn` catches bytes
/// corrupted on the way.
pub(crate) fn call_task(
    func: &TaskFn,
    input: &[u8],
    output: &mut Vec<u8>,
) -> Result<(), TaskFnError> {
    // SAFETY: as above: `func` was made by TaskFn::new in this worker's
    // requester and reached it through a queue only that process writes.
    unsafe { func.call(input, output) }
}
