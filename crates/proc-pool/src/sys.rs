//! The `unsafe` calls of `proc-pool`: running a task function, the
//! parent's pid, and writing into vectors with their length kept outside
//! them ([`Appender`]), or filled in any order ([`Slots`]).

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

/// A vector of values filled chunk by chunk, in any order: a map's values,
/// each chunk's decoded where its result lies in the result ring as soon
/// as it arrives (a chunk that arrived before its turn would otherwise be
/// copied out of the ring into a fresh buffer to wait for it, a page fault
/// per 4 KiB in a fresh process).
///
/// The values live in one allocation, each chunk in its place; a chunk is
/// written from its start, and how far is kept per chunk. Chunks are added
/// at the end ([`add_chunk`](Slots::add_chunk)), also while others are
/// being filled. [`into_vec`](Slots::into_vec) hands the vector over once
/// every chunk is whole; dropped before that, the values written are
/// dropped.
pub(crate) struct Slots<T> {
    /// Length 0; capacity for every chunk's values. Only `add_chunk`
    /// replaces it (moving the values written), never while a chunk is
    /// being written.
    buf: Vec<T>,
    chunks: Vec<SlotChunk>,
    total: usize,
}

struct SlotChunk {
    start: usize,
    len: usize,
    written: usize,
}

impl<T> Slots<T> {
    /// Room for chunks of these lengths, in this order.
    #[cfg(test)]
    pub(crate) fn new(lens: &[usize]) -> Self {
        let mut slots = Slots::with_capacity(lens.iter().sum());
        for &len in lens {
            slots.add_chunk(len);
        }
        slots
    }

    /// No chunks yet; room for `values` values without moving them where
    /// that much can be had (the count may come from an iterator's size
    /// hint, which can promise more than it holds); otherwise the room
    /// grows as chunks are added.
    pub(crate) fn with_capacity(values: usize) -> Self {
        let mut buf = Vec::new();
        let _ = buf.try_reserve_exact(values);
        Slots {
            buf,
            chunks: Vec::new(),
            total: 0,
        }
    }

    /// Adds a chunk of `len` values after the others; its index.
    pub(crate) fn add_chunk(&mut self, len: usize) -> usize {
        let start = self.total;
        let Some(total) = start.checked_add(len) else {
            // (No vector holds that many values.)
            panic!("capacity overflow");
        };
        if total > self.buf.capacity() {
            let mut grown: Vec<T> =
                Vec::with_capacity(total.max(self.buf.capacity().saturating_mul(2)));
            let (old, new) = (self.buf.as_ptr(), grown.as_mut_ptr());
            for c in &self.chunks {
                // SAFETY: the chunk's first `written` slots from `start`
                // hold values (`append_with`), below the old total (within
                // the old buffer's capacity) and below the new one (within
                // the new buffer's); the buffers are distinct allocations.
                // The values move: the old buffer (length 0) is then freed
                // without dropping anything.
                unsafe {
                    std::ptr::copy_nonoverlapping(old.add(c.start), new.add(c.start), c.written)
                };
            }
            self.buf = grown;
        }
        self.chunks.push(SlotChunk {
            start,
            len,
            written: 0,
        });
        self.total = total;
        self.chunks.len() - 1
    }

    /// Appends to chunk `chunk` at most `n` values made by `next` from
    /// `state` (no more than the chunk has room for), stopping early where
    /// `next` returns `None`; returns the state. Nothing is written for a
    /// chunk that does not exist.
    ///
    /// The count stays in a local while the values are written (see
    /// [`Appender`]), and the state is moved in, so that a decoder's
    /// position in it can stay in a register too. If `next` panics, the
    /// values written so far are kept (and dropped with the slots).
    pub(crate) fn append_with<S>(
        &mut self,
        chunk: usize,
        n: usize,
        mut state: S,
        mut next: impl FnMut(&mut S) -> Option<T>,
    ) -> S {
        /// Stores the chunk's written count when dropped.
        struct Written<'a> {
            slot: &'a mut usize,
            count: usize,
        }
        impl Drop for Written<'_> {
            #[inline]
            fn drop(&mut self) {
                *self.slot = self.count;
            }
        }
        let base = self.buf.as_mut_ptr();
        let Some(c) = self.chunks.get_mut(chunk) else {
            return state;
        };
        let start = c.start;
        let end = c.written + n.min(c.len - c.written);
        let bytes = (end - c.written).saturating_mul(std::mem::size_of::<T>());
        if bytes >= POPULATE_MIN {
            // SAFETY: slots `start + written .. start + end` lie within the
            // buffer's capacity (see the write below), which this process
            // owns; `bytes` is their size.
            unsafe { populate_for_write(base.add(start + c.written).cast(), bytes) };
        }
        let mut written = Written {
            count: c.written,
            slot: &mut c.written,
        };
        while written.count < end {
            let Some(value) = next(&mut state) else {
                break;
            };
            // SAFETY: the buffer has capacity for `total` values and is not
            // replaced meanwhile (`self` is borrowed here; `next` sees only
            // `state`); the chunks' ranges `start..start + len` lie below
            // `total` one after the other (`add_chunk`); `written.count <
            // end <= len`, and the slot is past the chunk's written values:
            // nothing is overwritten, and only this chunk's range is
            // written.
            unsafe { base.add(start + written.count).write(value) };
            written.count += 1;
        }
        state
    }

    /// Appends one value to chunk `chunk`; false (the value dropped) when
    /// the chunk is whole or does not exist.
    pub(crate) fn push(&mut self, chunk: usize, value: T) -> bool {
        let mut value = Some(value);
        let before = self.chunks.get(chunk).map_or(0, |c| c.written);
        self.append_with(chunk, 1, (), |_| value.take());
        self.chunks.get(chunk).is_some_and(|c| c.written > before)
    }

    /// The whole vector, once every chunk is whole.
    pub(crate) fn into_vec(mut self) -> Option<Vec<T>> {
        if self.chunks.iter().any(|c| c.written < c.len) {
            return None;
        }
        let mut vec = std::mem::take(&mut self.buf);
        self.chunks.clear();
        // SAFETY: every chunk is whole, and the chunks cover `0..total`
        // one after the other (`add_chunk`): the first `total` slots hold
        // values, within the capacity. The slots give up their claim on them
        // (their chunks are cleared, so their drop drops nothing).
        unsafe { vec.set_len(self.total) };
        Some(vec)
    }
}

impl<T> Drop for Slots<T> {
    fn drop(&mut self) {
        let base = self.buf.as_mut_ptr();
        for c in &self.chunks {
            // SAFETY: the chunk's first `written` slots from `start` hold
            // values written by `append_with` and not handed over (see
            // `into_vec`); each is dropped once, here, and the buffer
            // (length 0) then frees the memory without dropping anything.
            unsafe {
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(
                    base.add(c.start),
                    c.written,
                ));
            }
        }
    }
}

/// A range of fresh memory at least this large is faulted in with one call
/// before values are written into it (see [`populate_for_write`]).
const POPULATE_MIN: usize = 256 << 10;

/// Faults in the whole pages of the `len` bytes at `ptr` for writing, in
/// one call, contents unchanged (`MADV_POPULATE_WRITE`, Linux 5.14; on an
/// older kernel the call fails and nothing happens: the writes fault the
/// pages in one by one).
///
/// A map's values go into fresh memory in a fresh process (8 MB in W6):
/// faulted one page at a time by the writes, 8 MB took 3.1 ms on the card
/// machine (1.52 us a page, a fresh process after 2 s idle); populated in
/// one call, 2.0 ms (1.0 us a page). Pages already there cost only the
/// walk over them.
///
/// # Safety
///
/// `ptr..ptr + len` must lie in memory this process owns and has mapped
/// writable (an allocation of its own, such as a vector's spare
/// capacity).
unsafe fn populate_for_write(ptr: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize).saturating_add(len) & !(PAGE - 1);
    if end > start {
        // SAFETY: `start..end` lies within the caller's memory (whole pages
        // inside `ptr..ptr + len`), mapped writable and owned by this
        // process (the function's contract);
        // MADV_POPULATE_WRITE only faults its pages in, as a write would,
        // without changing what they hold. Its failure (an older kernel)
        // changes nothing.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
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
    use super::{Appender, Slots};

    #[test]
    fn slots_fill_in_any_order_and_drop_what_was_written() {
        let mut slots = Slots::<String>::new(&[2, 3, 0, 2]);
        let left = slots.append_with(1, 5, 0u32, |i| {
            *i += 1;
            Some(format!("b{i}"))
        });
        // No more than the chunk has room for.
        assert_eq!(left, 3);
        assert!(!slots.push(1, "extra".into()));
        assert!(!slots.push(9, "nowhere".into()));
        slots.append_with(3, 2, 0u32, |i| {
            *i += 1;
            (*i <= 1).then(|| format!("d{i}"))
        });
        assert!(slots.push(3, "d2".into()));
        assert!(slots.push(0, "a1".into()));
        // Not whole yet (chunk 1 has 3 of 3, 0 has 1 of 2): nothing handed
        // over, and the values written are dropped.
        assert_eq!(slots.into_vec(), None);
        // Whole: every value in its place.
        let mut slots = Slots::<String>::new(&[2, 3, 0, 2]);
        for chunk in [3, 1, 0] {
            slots.append_with(chunk, usize::MAX, 0u32, |i| {
                *i += 1;
                Some(format!("{chunk}.{i}"))
            });
        }
        let v = slots.into_vec().expect("whole");
        assert_eq!(v, ["0.1", "0.2", "1.1", "1.2", "1.3", "3.1", "3.2"]);
        // A panic in the middle of a chunk: the values before it are kept
        // and dropped with the slots (valgrind or Miri would tell).
        let mut slots = Slots::<String>::new(&[4, 1]);
        slots.push(1, "z".into());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            slots.append_with(0, 4, 0u32, |i| {
                *i += 1;
                assert!(*i < 3, "third");
                Some(format!("p{i}"))
            })
        }));
        assert!(r.is_err());
        assert!(slots.push(0, "p3".into()));
        assert!(slots.into_vec().is_none());
        // Chunks added while others are filled: the values written move
        // with the buffer when it grows.
        let mut slots = Slots::<String>::with_capacity(1);
        let a = slots.add_chunk(2);
        slots.push(a, "a1".into());
        let b = slots.add_chunk(3);
        slots.append_with(b, 3, 0u32, |i| {
            *i += 1;
            Some(format!("b{i}"))
        });
        let c = slots.add_chunk(1);
        slots.push(c, "c1".into());
        slots.push(a, "a2".into());
        assert_eq!(
            slots.into_vec().expect("whole"),
            ["a1", "a2", "b1", "b2", "b3", "c1"]
        );
        // Chunks large enough to be faulted in first (the second starts
        // mid-page): the values are what was written.
        let mut big = Slots::<u64>::new(&[100_000, 300_001]);
        big.append_with(1, usize::MAX, 0u64, |i| {
            *i += 1;
            Some(*i)
        });
        big.append_with(0, usize::MAX, 0u64, |i| {
            *i += 1;
            Some(*i)
        });
        let big = big.into_vec().expect("whole");
        assert!(big[..100_000].iter().copied().eq(1..=100_000));
        assert!(big[100_000..].iter().copied().eq(1..=300_001));
        // Values of a type without size, and no chunks at all.
        let mut units = Slots::<()>::new(&[3]);
        units.append_with(0, 3, (), |_| Some(()));
        assert_eq!(units.into_vec(), Some(vec![(), (), ()]));
        assert_eq!(Slots::<u8>::new(&[]).into_vec(), Some(Vec::new()));
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
