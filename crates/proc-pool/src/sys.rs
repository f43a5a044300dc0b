//! The `unsafe` calls of `proc-pool`: running a task function, the
//! parent's pid, and writing into vectors with their length kept outside
//! them ([`Appender`], [`extend_with`]).

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

/// The parent's process id (it changes when the parent dies: the process
/// is adopted by a subreaper or init).
pub(crate) fn parent_pid() -> libc::pid_t {
    // SAFETY: getppid cannot fail and has no preconditions.
    unsafe { libc::getppid() }
}

/// Appends bytes to a vector, keeping the length in itself while it lives
/// and storing it into the vector when dropped (a panic included).
///
/// `Vec::extend_from_slice` in a loop reads and writes the vector's length
/// in memory for every value: its bytes are written through a pointer that
/// may, for all the compiler knows, point at that length, and its growth
/// path takes the vector's address. A chunk's encoding and its worker's
/// loop wrote a million 8-byte values that way at ~1-2.5 ns each (one
/// store-to-load chain per value). An `Appender` held in a local keeps
/// pointer, length and capacity in registers; only growing (out of line,
/// handed the vector, not the appender) touches the vector.
pub(crate) struct Appender<'a> {
    vec: &'a mut Vec<u8>,
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

impl<'a> Appender<'a> {
    pub(crate) fn new(vec: &'a mut Vec<u8>) -> Self {
        let (ptr, len, cap) = (vec.as_mut_ptr(), vec.len(), vec.capacity());
        Appender { vec, ptr, len, cap }
    }

    /// The vector's length, with what was appended.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub(crate) fn extend_from_slice(&mut self, bytes: &[u8]) {
        if self.cap - self.len < bytes.len() {
            (self.ptr, self.cap) = grow(self.vec, self.len, bytes.len());
        }
        // SAFETY: `ptr` is the vector's buffer and `cap` its capacity (set
        // at `new` and by `grow`, the only places that change the buffer:
        // the vector is borrowed mutably for the appender's life), so
        // `len + bytes.len() <= cap` bytes from `ptr` are the buffer's;
        // `bytes` is a shared borrow, so it cannot overlap that buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(self.len), bytes.len());
        }
        self.len += bytes.len();
    }

    #[inline]
    pub(crate) fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    /// Shortens to `len` bytes (no effect if already shorter).
    #[inline]
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for Appender<'_> {
    fn drop(&mut self) {
        // SAFETY: `len <= cap`, and the first `len` bytes of the buffer
        // are initialized: the vector's own, then the appended ones
        // (`truncate` only lowers `len`).
        unsafe { self.vec.set_len(self.len) };
    }
}

/// Appends to `v` at most `n` values made by `next` from `state`, stopping
/// early where `next` returns `None`; returns the state.
///
/// The values go into room reserved at once, with the count in a local:
/// `push` in a loop reads and writes the vector's length in memory for
/// every value (a million decoded results, W6) and takes its address on
/// its growth path. The state is moved in, so that the decoder's position
/// in it can stay in a register too. If `next` panics, the values written
/// so far stay in the vector.
pub(crate) fn extend_with<T, S>(
    v: &mut Vec<T>,
    n: usize,
    mut state: S,
    mut next: impl FnMut(&mut S) -> Option<T>,
) -> S {
    /// Sets the vector's length to what was written when dropped.
    struct SetLen<'a, T> {
        v: &'a mut Vec<T>,
        len: usize,
    }
    impl<T> Drop for SetLen<'_, T> {
        #[inline]
        fn drop(&mut self) {
            // SAFETY: every slot below `len` holds a value: the vector's
            // own below its old length, then those written in the loop.
            unsafe { self.v.set_len(self.len) };
        }
    }
    v.reserve(n);
    let ptr = v.as_mut_ptr();
    let mut written = SetLen { len: v.len(), v };
    let end = written.len + n;
    while written.len < end {
        let Some(value) = next(&mut state) else {
            break;
        };
        // SAFETY: `reserve(n)` made room for `end` values from `ptr`, and
        // the buffer cannot move meanwhile (the vector is borrowed here
        // until the end; `next` sees only `state`); `len < end`, and the
        // slot is past the initialized ones, so nothing is overwritten.
        unsafe { ptr.add(written.len).write(value) };
        written.len += 1;
    }
    state
}

/// Makes room for `extra` more bytes after the first `len` (initialized)
/// ones; the buffer's new address and capacity.
#[cold]
#[inline(never)]
fn grow(vec: &mut Vec<u8>, len: usize, extra: usize) -> (*mut u8, usize) {
    // SAFETY: the first `len <= capacity` bytes are initialized (the
    // appender's invariant), so the vector may claim them before it grows
    // (growing copies only its first `len` bytes).
    unsafe { vec.set_len(len) };
    vec.reserve(extra);
    (vec.as_mut_ptr(), vec.capacity())
}

#[cfg(test)]
mod tests {
    use super::{extend_with, Appender};

    #[test]
    fn extend_with_writes_what_it_is_given_and_keeps_it_on_a_panic() {
        let mut v = vec![String::from("a")];
        let left = extend_with(&mut v, 5, 0u32, |i| {
            *i += 1;
            (*i <= 3).then(|| i.to_string())
        });
        assert_eq!(left, 4);
        assert_eq!(v, ["a", "1", "2", "3"]);
        let left = extend_with(&mut v, 2, 10u32, |i| {
            *i += 1;
            Some(i.to_string())
        });
        assert_eq!(left, 12);
        assert_eq!(v, ["a", "1", "2", "3", "11", "12"]);
        // A panic in the middle: the values before it are kept (and
        // dropped with the vector: Miri or a leak checker would tell).
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            extend_with(&mut v, 4, 0u32, |i| {
                *i += 1;
                assert!(*i < 3, "third");
                Some(format!("p{i}"))
            })
        }));
        assert!(r.is_err());
        assert_eq!(v, ["a", "1", "2", "3", "11", "12", "p1", "p2"]);
    }

    #[test]
    fn an_appender_grows_truncates_and_sets_the_length() {
        let mut v = vec![7u8, 8];
        {
            let mut a = Appender::new(&mut v);
            assert_eq!(a.len(), 2);
            for i in 0..10_000u32 {
                a.extend_from_slice(&i.to_le_bytes());
            }
            a.push(1);
            assert_eq!(a.len(), 2 + 40_000 + 1);
            a.truncate(6);
            a.truncate(100);
            assert_eq!(a.len(), 6);
        }
        assert_eq!(v, [7, 8, 0, 0, 0, 0]);
        // A panic while appending keeps what was appended before it.
        let mut v = Vec::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut a = Appender::new(&mut v);
            a.extend_from_slice(b"kept");
            panic!("in the middle");
        }));
        assert!(r.is_err());
        assert_eq!(v, b"kept");
    }
}
