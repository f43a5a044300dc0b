//! The `unsafe` calls of `proc-pool`: running a task function, advice to
//! the kernel about a large result vector, the parent's pid.

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

/// Asks the kernel to back the 2 MiB-aligned part of `buf`'s allocation
/// with transparent huge pages (where THP is on for `madvise`), if it is
/// 4 MiB or more: a large result vector is then faulted in a few 2 MiB
/// pages instead of 512 small ones per 2 MiB (each small fault costs µs on
/// a VM).
///
/// The advice stays with the address range after the vector is freed:
/// where the allocator reuses that range (glibc serves blocks this large
/// from its heap once one has been freed), memory there may be backed by
/// huge pages too — resident memory in 2 MiB steps, for fewer faults.
pub(crate) fn advise_huge_pages<T>(buf: &Vec<T>) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_ptr() as usize;
    let bytes = buf.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes < 2 * HUGE {
        return;
    }
    let from = start.next_multiple_of(HUGE);
    let to = (start + bytes) / HUGE * HUGE;
    if to <= from {
        return;
    }
    // SAFETY: [from, to) lies inside `buf`'s allocation, which is mapped
    // memory of this process; MADV_HUGEPAGE changes only how the kernel
    // backs it, never its contents or validity.
    unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
}

/// The parent's process id (it changes when the parent dies: the process
/// is adopted by a subreaper or init).
pub(crate) fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid cannot fail and has no preconditions.
    unsafe { libc::getppid() }
}

#[cfg(test)]
mod tests {
    use super::advise_huge_pages;

    #[test]
    fn advised_vectors_keep_their_contents() {
        // Small (no 2 MiB-aligned part) and large (several) allocations.
        for n in [0usize, 10, 1 << 18, 3 << 20] {
            let mut v: Vec<u64> = Vec::with_capacity(n);
            advise_huge_pages(&v);
            v.extend(0..n as u64);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
        }
    }
}
