//! [`Queue`], [`JoinableQueue`], [`SimpleQueue`]: Python's queues over the
//! shared-memory ring.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{GetError, PutError, QueueError};
use crate::protocol::{self, COUNT_MOD};
use crate::ring::{Bytes, Payload, PopError, PushError, Ring, MAX_CAPACITY, MIN_CAPACITY};
use crate::shm::Segment;
use crate::wait::{self, Waited};

/// The ring size of `Queue::new()`: messages up to half of it travel as one
/// record; larger ones stream through in fragments.
pub const DEFAULT_CAPACITY: usize = 2 << 20;

thread_local! {
    /// Where `put` serializes an item larger than [`SMALL_ITEM`] before
    /// copying it into the ring.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The largest item `put` serializes on the stack.
const SMALL_ITEM: usize = 64;

/// postcard's output for a larger item: a vector that grows as needed.
/// (A fixed buffer grown and retried after `SerializeBufferFull` misses
/// the items that fill it inside `collect_str`: postcard reports
/// `CollectStrError` for those.)
struct VecOut<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecOut<'_> {
    type Output = ();

    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Configures a queue: the message bound (Python's `maxsize`) and the ring's
/// size in bytes.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let q = proc_queue::Queue::<u32>::builder().maxsize(10).capacity(64 * 1024).build()?;
/// assert_eq!(q.maxsize(), Some(10));
/// assert_eq!(q.capacity(), 64 * 1024);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct QueueBuilder<T> {
    maxsize: usize,
    capacity: usize,
    _t: PhantomData<fn(T) -> T>,
}

impl<T: Serialize + DeserializeOwned> QueueBuilder<T> {
    /// At most `n` messages at once (0: no bound, as Python's `maxsize <= 0`);
    /// at most 2^24 - 1.
    pub fn maxsize(mut self, n: usize) -> Self {
        self.maxsize = n;
        self
    }

    /// The ring's size in bytes, rounded up to a power of two between 4 KiB
    /// and 128 MiB (default [`DEFAULT_CAPACITY`]).
    pub fn capacity(mut self, bytes: usize) -> Self {
        self.capacity = bytes;
        self
    }

    /// Creates the queue.
    ///
    /// # Errors
    ///
    /// [`QueueError::InvalidSetting`] for a bound or size out of range,
    /// [`QueueError::Io`] if the shared memory cannot be created.
    pub fn build(self) -> Result<Queue<T>, QueueError> {
        if self.maxsize >= COUNT_MOD as usize {
            return Err(QueueError::InvalidSetting(format!(
                "maxsize {} is above the limit {}",
                self.maxsize,
                COUNT_MOD - 1
            )));
        }
        if self.capacity > MAX_CAPACITY {
            return Err(QueueError::InvalidSetting(format!(
                "capacity {} is above the limit {MAX_CAPACITY}",
                self.capacity
            )));
        }
        let capacity = self.capacity.max(MIN_CAPACITY).next_power_of_two();
        let segment = Segment::create(capacity, self.maxsize as u64)?;
        Ok(Queue {
            ring: Arc::new(Ring::new(segment)),
            _t: PhantomData,
        })
    }
}

/// A multi-producer, multi-consumer FIFO queue between processes (Python's
/// `multiprocessing.Queue`), on a ring buffer in shared memory.
///
/// Create it before forking: parent and children then share it (it lives in
/// a `memfd` mapped `MAP_SHARED`). Clone it freely; every clone, in every
/// process and thread, is the same queue. Items are serialized with
/// postcard; `Vec<u8>` payloads have a one-copy path in
/// [`put_bytes`](Queue::put_bytes) / [`get_bytes`](Queue::get_bytes).
///
/// A process killed at any point inside `put` or `get` leaves the queue
/// working for everyone else: a message whose put did not finish is never
/// delivered, a message whose get did not finish is delivered to the next
/// consumer (for messages up to half the ring; a larger message streams
/// through, and if its consumer dies midway the rest of it is discarded and
/// it counts as taken), and the counters stay exact.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use proc_queue::Queue;
///
/// let q = Queue::new()?;
/// q.put("hello".to_owned())?;
/// assert_eq!(q.qsize(), 1);
/// assert_eq!(q.get()?, "hello");
/// assert!(q.empty());
/// # Ok(()) }
/// ```
pub struct Queue<T> {
    ring: Arc<Ring>,
    _t: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            ring: Arc::clone(&self.ring),
            _t: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("qsize", &self.ring.len())
            .field("maxsize", &self.ring.segment().maxsize())
            .field("capacity", &self.ring.capacity())
            .field("closed", &self.ring.is_closed())
            .finish()
    }
}

impl<T> AsRawFd for Queue<T> {
    /// The shared segment's file descriptor (a `memfd`).
    fn as_raw_fd(&self) -> RawFd {
        self.ring.segment().raw_fd()
    }
}

/// A queue crosses an exec start (`StartMethod::Spawn`) as an entry's
/// argument: its shared memory's descriptor travels with the entry (see
/// `proc_core::handoff`), and the child maps the same segment. Serializing
/// a queue anywhere else (into another queue, say) is an error.
impl<T> Serialize for Queue<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let index = proc_core::handoff::share_fd(self.ring.segment().fd())
            .map_err(serde::ser::Error::custom)?;
        serializer.serialize_u32(index)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let index = u32::deserialize(deserializer)?;
        let fd = proc_core::handoff::take_shared_fd(index).map_err(serde::de::Error::custom)?;
        let segment = Segment::open(std::fs::File::from(fd)).map_err(serde::de::Error::custom)?;
        Ok(Queue {
            ring: Arc::new(Ring::new(segment)),
            _t: PhantomData,
        })
    }
}

fn deadline_after(timeout: Duration) -> Option<Instant> {
    // A timeout too large to represent is no timeout at all.
    Instant::now().checked_add(timeout)
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// A queue without a message bound and a ring of [`DEFAULT_CAPACITY`]
    /// bytes (Python's `Queue()`).
    ///
    /// Unlike Python's, whose feeder thread buffers without limit in the
    /// putting process (and loses what it holds if that process dies),
    /// what is queued lives in the ring: with it full, `put` waits and
    /// `try_put` fails with `Full`, bound or not. Putting more than the
    /// ring holds before any consumer runs ("put all the work, then start
    /// the consumers") waits for ever; size the ring for it with
    /// [`builder`](Queue::builder)`().capacity(..)` (up to 128 MiB).
    ///
    /// # Errors
    ///
    /// [`QueueError::Io`] if the shared memory cannot be created.
    pub fn new() -> Result<Self, QueueError> {
        Self::builder().build()
    }

    /// A queue holding at most `maxsize` messages (Python's
    /// `Queue(maxsize)`; 0 means no bound).
    ///
    /// # Errors
    ///
    /// As [`QueueBuilder::build`].
    pub fn with_maxsize(maxsize: usize) -> Result<Self, QueueError> {
        Self::builder().maxsize(maxsize).build()
    }

    /// A builder for the message bound and the ring size.
    pub fn builder() -> QueueBuilder<T> {
        QueueBuilder {
            maxsize: 0,
            capacity: DEFAULT_CAPACITY,
            _t: PhantomData,
        }
    }

    /// Puts `item`, waiting while the queue is full: `maxsize` messages
    /// queued, or no room left in the ring (Python's `put(item)`).
    ///
    /// # Errors
    ///
    /// [`PutError::Closed`] if the queue is closed, [`PutError::Failed`] if
    /// the item does not serialize or the segment is broken; the item comes
    /// back in each.
    pub fn put(&self, item: T) -> Result<(), PutError<T>> {
        self.put_deadline(item, None, false)
    }

    /// Puts `item`, waiting at most `timeout` for room (Python's
    /// `put(item, timeout=t)`). Never gives up before `timeout`. A message
    /// larger than half the ring streams through: if it cannot finish in
    /// time, the part already sent is withdrawn (consumers discard it).
    ///
    /// # Errors
    ///
    /// [`PutError::Timeout`] if the queue stayed full; otherwise as
    /// [`put`](Queue::put).
    pub fn put_timeout(&self, item: T, timeout: Duration) -> Result<(), PutError<T>> {
        self.put_deadline(item, deadline_after(timeout), false)
    }

    /// Puts `item` only if there is room now (Python's `put_nowait`); a
    /// message larger than half the ring fits only while consumers drain
    /// it as fast as it streams in. Like Python's, it waits for another
    /// producer that holds the queue while writing a record (at most
    /// 2 ms, and only while the queue has room).
    ///
    /// # Errors
    ///
    /// [`PutError::Full`] if there is no room; otherwise as
    /// [`put`](Queue::put).
    #[doc(alias = "put_nowait")]
    pub fn try_put(&self, item: T) -> Result<(), PutError<T>> {
        self.put_deadline(item, Some(Instant::now()), true)
    }

    fn put_deadline(
        &self,
        item: T,
        deadline: Option<Instant>,
        nowait: bool,
    ) -> Result<(), PutError<T>> {
        // Small items serialize on the stack; larger ones in a reused
        // per-thread buffer.
        let mut small = [0u8; SMALL_ITEM];
        if let Ok(out) = postcard::to_slice(&item, &mut small) {
            let pushed = self.ring.push(&[out], false, deadline);
            return finish_put(pushed, item, nowait);
        }
        self.put_large(item, deadline, nowait)
    }

    /// [`put_deadline`](Queue::put_deadline) for an item larger than the
    /// stack buffer. Out of line, so that the small items' path stays
    /// small enough to be inlined into its callers (with this code inline
    /// it was not, and a put of a number cost ~3 ns more: `queue_cost`).
    #[inline(never)]
    fn put_large(
        &self,
        item: T,
        deadline: Option<Instant>,
        nowait: bool,
    ) -> Result<(), PutError<T>> {
        // (Taken out of its cell, not borrowed: an item whose `Serialize`
        // puts to a queue itself finds the cell empty, not borrowed.)
        let mut buf = SCRATCH
            .try_with(|scratch| scratch.take())
            .unwrap_or_default();
        buf.clear();
        let pushed = match postcard::serialize_with_flavor(&item, VecOut(&mut buf)) {
            Ok(()) => self.ring.push(&[&buf], false, deadline),
            Err(e) => Err(PushError::Failed(QueueError::Encode(e.to_string()))),
        };
        let _ = SCRATCH.try_with(|scratch| scratch.replace(buf));
        finish_put(pushed, item, nowait)
    }

    /// Takes the oldest item, waiting while the queue is empty (Python's
    /// `get()`).
    ///
    /// # Errors
    ///
    /// [`GetError::Closed`] once the queue is closed and drained (instead
    /// of waiting forever); [`GetError::Failed`] if the message does not
    /// decode as `T` (it is consumed; the queue keeps working), announces
    /// more bytes than this process can allocate (`TooLarge`: it is taken
    /// out of the queue, for every consumer), or the segment is broken.
    pub fn get(&self) -> Result<T, GetError> {
        self.get_deadline(None, false)
    }

    /// Takes the oldest item, waiting at most `timeout` (Python's
    /// `get(timeout=t)`). Never gives up before `timeout`; may return later
    /// when a message larger than half the ring is already streaming in.
    ///
    /// # Errors
    ///
    /// [`GetError::Timeout`] if nothing arrived; otherwise as
    /// [`get`](Queue::get).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, GetError> {
        self.get_deadline(deadline_after(timeout), false)
    }

    /// Takes the oldest item if there is one now (Python's `get_nowait`).
    ///
    /// # Errors
    ///
    /// [`GetError::Empty`] if there is none; otherwise as
    /// [`get`](Queue::get).
    #[doc(alias = "get_nowait")]
    pub fn try_get(&self) -> Result<T, GetError> {
        self.get_deadline(Some(Instant::now()), true)
    }

    fn get_deadline(&self, deadline: Option<Instant>, nowait: bool) -> Result<T, GetError> {
        let popped = self.ring.pop(deadline, |p: Payload<'_>| {
            let bytes = p.bytes.as_slice();
            if p.raw {
                // A byte string put with put_bytes: give postcard its length
                // prefix back.
                let mut prefixed = Vec::with_capacity(bytes.len() + 10);
                encode_varint(bytes.len() as u64, &mut prefixed);
                prefixed.extend_from_slice(bytes);
                postcard::from_bytes::<T>(&prefixed)
            } else {
                decode::<T>(bytes)
            }
        });
        finish_get(popped, nowait)?.map_err(|e| GetError::Failed(QueueError::Decode(e.to_string())))
    }
}

/// `postcard::from_bytes`, inlined into the get: called, it handed its
/// result back through memory, written as a tag byte and a value and read
/// back as one 16-byte load, which waits for those stores to drain (store
/// forwarding fails).
#[inline(always)]
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> postcard::Result<T> {
    T::deserialize(&mut postcard::Deserializer::from_bytes(bytes))
}

fn finish_put<T>(pushed: Result<(), PushError>, item: T, nowait: bool) -> Result<(), PutError<T>> {
    match pushed {
        Ok(()) => Ok(()),
        Err(PushError::Full) if nowait => Err(PutError::Full(item)),
        Err(PushError::Full) => Err(PutError::Timeout(item)),
        Err(PushError::Closed) => Err(PutError::Closed(item)),
        Err(PushError::Failed(e)) => Err(PutError::Failed(item, e)),
    }
}

fn finish_get<R>(popped: Result<R, PopError>, nowait: bool) -> Result<R, GetError> {
    match popped {
        Ok(r) => Ok(r),
        Err(PopError::Empty) if nowait => Err(GetError::Empty),
        Err(PopError::Empty) => Err(GetError::Timeout),
        Err(PopError::Closed) => Err(GetError::Closed),
        // Only a whole get stops at a streamed message (see there).
        Err(PopError::Streamed) => Err(GetError::Timeout),
        Err(PopError::Failed(e)) => Err(GetError::Failed(e)),
    }
}

impl<T> Queue<T> {
    /// How many messages are in the queue now: completed puts minus
    /// completed gets, exact at the instant it is read (Python's `qsize()`,
    /// which raises `NotImplementedError` on macOS).
    pub fn qsize(&self) -> usize {
        self.ring.len()
    }

    /// This queue emptied for use as a new one: no message, not closed,
    /// the same capacity and bound. It saves making a new shared segment
    /// (a memfd, a mapping, the faults of its first use): for a program
    /// that makes and drops queues of one size again and again, such as
    /// the pool's, whose workers are all gone once it is joined.
    ///
    /// Only for a queue that no other process uses any more: one that
    /// still did would find a fresh queue under its feet (its puts and
    /// gets would fail with typed errors or meet the new queue's
    /// messages). Every other handle in this process must be dropped.
    ///
    /// # Errors
    ///
    /// Gives the queue back, unchanged, when another handle of it exists in
    /// this process (a clone).
    pub fn into_fresh(mut self) -> Result<Queue<T>, Queue<T>> {
        let Some(ring) = Arc::get_mut(&mut self.ring) else {
            return Err(self);
        };
        ring.reset();
        Ok(self)
    }

    /// Whether the queue holds no message now (Python's `empty()`).
    pub fn empty(&self) -> bool {
        self.qsize() == 0
    }

    /// Whether the queue holds `maxsize` messages now (Python's `full()`;
    /// always false without a bound, though a `put` also waits for room in
    /// the ring: see [`Queue::new`]).
    pub fn full(&self) -> bool {
        match self.maxsize() {
            Some(max) => self.qsize() >= max,
            None => false,
        }
    }

    /// The message bound, `None` when there is none.
    pub fn maxsize(&self) -> Option<usize> {
        match self.ring.segment().maxsize() {
            0 => None,
            n => Some(n as usize),
        }
    }

    /// The ring's size in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// Closes the queue for every handle in every process: further puts
    /// fail with `Closed`, blocked puts wake up with `Closed`, and consumers
    /// take what is left, then get `Closed` instead of waiting forever. A
    /// put already past its check when `close` comes either completes,
    /// and its message is delivered before any consumer sees `Closed`, or
    /// fails with `Closed`. A put midway through a message larger than
    /// half the ring goes on while consumers take from the ring, and fails
    /// with `Closed` (its message withdrawn) once they have taken nothing
    /// for 200 ms: a consumer that spends longer than that between gets can
    /// see such a message withdrawn after a close.
    pub fn close(&self) {
        self.ring.close();
    }

    /// Whether [`close`](Queue::close) was called (through any handle).
    pub fn is_closed(&self) -> bool {
        self.ring.is_closed()
    }

    /// Puts a byte string with one copy into the ring, 16-byte aligned. It
    /// arrives as a `Vec<u8>` from [`get_bytes`](Queue::get_bytes), or from
    /// `get` on a `Queue<Vec<u8>>` (or `serde_bytes::ByteBuf`).
    ///
    /// # Errors
    ///
    /// As [`put`](Queue::put); the error carries `()`.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<(), PutError<()>> {
        self.put_bytes_deadline(bytes, None, false)
    }

    /// [`put_bytes`](Queue::put_bytes) waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`put_timeout`](Queue::put_timeout).
    pub fn put_bytes_timeout(&self, bytes: &[u8], timeout: Duration) -> Result<(), PutError<()>> {
        self.put_bytes_deadline(bytes, deadline_after(timeout), false)
    }

    /// [`put_bytes`](Queue::put_bytes) only if there is room now.
    ///
    /// # Errors
    ///
    /// As [`try_put`](Queue::try_put).
    pub fn try_put_bytes(&self, bytes: &[u8]) -> Result<(), PutError<()>> {
        self.put_bytes_deadline(bytes, Some(Instant::now()), true)
    }

    fn put_bytes_deadline(
        &self,
        bytes: &[u8],
        deadline: Option<Instant>,
        nowait: bool,
    ) -> Result<(), PutError<()>> {
        // A 16-byte block ending with postcard's length prefix, so that the
        // record is also a valid postcard `Vec<u8>` and the bytes start
        // 16-byte aligned.
        let mut prefix = Vec::with_capacity(10);
        encode_varint(bytes.len() as u64, &mut prefix);
        let mut block = [0u8; 16];
        block[16 - prefix.len()..].copy_from_slice(&prefix);
        finish_put(self.ring.push(&[&block, bytes], true, deadline), (), nowait)
    }

    /// Takes the oldest message as a byte string, with one copy out of the
    /// ring (for messages put by [`put_bytes`](Queue::put_bytes), or any
    /// postcard byte string such as a `Vec<u8>` item).
    ///
    /// # Errors
    ///
    /// As [`get`](Queue::get); a message that is not a byte string is a
    /// [`QueueError::Decode`] failure.
    pub fn get_bytes(&self) -> Result<Vec<u8>, GetError> {
        self.get_bytes_deadline(None, false)
    }

    /// [`get_bytes`](Queue::get_bytes) waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`get_timeout`](Queue::get_timeout).
    pub fn get_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>, GetError> {
        self.get_bytes_deadline(deadline_after(timeout), false)
    }

    /// [`get_bytes`](Queue::get_bytes) only if a message is there now.
    ///
    /// # Errors
    ///
    /// As [`try_get`](Queue::try_get).
    pub fn try_get_bytes(&self) -> Result<Vec<u8>, GetError> {
        self.get_bytes_deadline(Some(Instant::now()), true)
    }

    fn get_bytes_deadline(
        &self,
        deadline: Option<Instant>,
        nowait: bool,
    ) -> Result<Vec<u8>, GetError> {
        let mut out = Vec::new();
        self.get_bytes_into_deadline(&mut out, deadline, nowait)?;
        Ok(out)
    }

    /// As [`get_bytes`](Queue::get_bytes), into `buf` (cleared first): a
    /// buffer reused from message to message saves an allocation, and for
    /// large messages the page faults of fresh memory, on every get.
    ///
    /// # Errors
    ///
    /// As [`get_bytes`](Queue::get_bytes); `buf` is then empty.
    pub fn get_bytes_into(&self, buf: &mut Vec<u8>) -> Result<(), GetError> {
        self.get_bytes_into_deadline(buf, None, false)
    }

    /// [`get_bytes_into`](Queue::get_bytes_into) waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`get_timeout`](Queue::get_timeout).
    pub fn get_bytes_into_timeout(
        &self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<(), GetError> {
        self.get_bytes_into_deadline(buf, deadline_after(timeout), false)
    }

    /// [`get_bytes_into`](Queue::get_bytes_into) only if a message is there
    /// now.
    ///
    /// # Errors
    ///
    /// As [`try_get`](Queue::try_get).
    pub fn try_get_bytes_into(&self, buf: &mut Vec<u8>) -> Result<(), GetError> {
        self.get_bytes_into_deadline(buf, Some(Instant::now()), true)
    }

    /// [`try_get_bytes_into`](Queue::try_get_bytes_into) only if the oldest
    /// message is in the ring whole: a message larger than half the ring
    /// streams through in fragments, and taking it means waiting for its
    /// producer to write the rest (for ever, if that process is stopped).
    /// Such a message is left for a blocking get: this never waits. For a
    /// consumer that reads while it holds a lock of its own, and takes a
    /// streamed message after letting go of it.
    ///
    /// # Errors
    ///
    /// As [`try_get`](Queue::try_get), and [`GetError::Timeout`] when the
    /// oldest message is a streamed one (taking it now would mean waiting).
    pub fn try_get_whole_bytes_into(&self, buf: &mut Vec<u8>) -> Result<(), GetError> {
        let got = self.try_get_whole_bytes_with(|m| m.into_buf(buf));
        if got.is_err() {
            buf.clear();
        }
        got
    }

    /// Takes the oldest message as a byte string and hands it to `read`
    /// as a [`Received`]: its bytes where they lie in the shared ring, with
    /// no copy (for a message streamed in fragments, larger than half the
    /// ring, in the buffer they were put together in, which `read` may
    /// keep); returns what `read` returns.
    ///
    /// `read` runs while this handle holds the queue's consumer side:
    /// other gets wait for it, so it should only decode or copy (a get on
    /// this queue from inside `read` waits for ever). The message is taken
    /// when `read` returns, also when it panics (the panic goes on to the
    /// caller).
    ///
    /// # Errors
    ///
    /// As [`get_bytes`](Queue::get_bytes); `read` is then not called.
    pub fn get_bytes_with<R>(&self, read: impl FnOnce(Received<'_>) -> R) -> Result<R, GetError> {
        self.get_bytes_with_deadline(None, false, read)
    }

    /// [`get_bytes_with`](Queue::get_bytes_with) waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`get_timeout`](Queue::get_timeout).
    pub fn get_bytes_with_timeout<R>(
        &self,
        timeout: Duration,
        read: impl FnOnce(Received<'_>) -> R,
    ) -> Result<R, GetError> {
        self.get_bytes_with_deadline(deadline_after(timeout), false, read)
    }

    /// [`get_bytes_with`](Queue::get_bytes_with) only if the oldest message
    /// is in the ring whole now (see
    /// [`try_get_whole_bytes_into`](Queue::try_get_whole_bytes_into)): this
    /// never waits.
    ///
    /// # Errors
    ///
    /// As [`try_get_whole_bytes_into`](Queue::try_get_whole_bytes_into).
    pub fn try_get_whole_bytes_with<R>(
        &self,
        read: impl FnOnce(Received<'_>) -> R,
    ) -> Result<R, GetError> {
        let mut read = Some(read);
        let popped = self
            .ring
            .try_pop_whole(|p| received(p).map(|m| read.take().map(|r| r(m))));
        read_result(finish_get(popped, true))
    }

    fn get_bytes_with_deadline<R>(
        &self,
        deadline: Option<Instant>,
        nowait: bool,
        read: impl FnOnce(Received<'_>) -> R,
    ) -> Result<R, GetError> {
        let mut read = Some(read);
        let popped = self
            .ring
            .pop_bytes(deadline, |p| received(p).map(|m| read.take().map(|r| r(m))));
        read_result(finish_get(popped, nowait))
    }

    fn get_bytes_into_deadline(
        &self,
        buf: &mut Vec<u8>,
        deadline: Option<Instant>,
        nowait: bool,
    ) -> Result<(), GetError> {
        let got = self.get_bytes_with_deadline(deadline, nowait, |m| m.into_buf(buf));
        if got.is_err() {
            buf.clear();
        }
        got
    }
}

/// A byte-string message taken by [`Queue::get_bytes_with`]: it
/// dereferences to the message's bytes where they lie, in the shared ring
/// (valid until the reader returns) or, for a message streamed in
/// fragments, in the buffer it was put together in.
pub struct Received<'a>(Held<'a>);

enum Held<'a> {
    Ring(&'a [u8]),
    /// A streamed message's buffer and where its bytes start in it.
    Assembled(Vec<u8>, usize),
}

impl std::ops::Deref for Received<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Held::Ring(bytes) => bytes,
            Held::Assembled(buf, start) => &buf[*start..],
        }
    }
}

impl std::fmt::Debug for Received<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.len())
            .finish()
    }
}

impl Received<'_> {
    /// Puts the bytes into `buf`, cleared first: a streamed message's own
    /// buffer takes its place where `buf` is smaller (no copy, and none of
    /// the message held twice), otherwise they are copied into it.
    pub fn into_buf(self, buf: &mut Vec<u8>) {
        buf.clear();
        match self.0 {
            Held::Assembled(own, 0) if buf.capacity() < own.len() => *buf = own,
            held => buf.extend_from_slice(&Received(held)),
        }
    }
}

/// A byte-string message's bytes: a raw one's as they are, a postcard
/// byte string's after its length prefix (checked).
fn received(p: Payload<'_>) -> Result<Received<'_>, QueueError> {
    let bytes = p.bytes.as_slice();
    let start = if p.raw {
        0
    } else {
        match decode_varint(bytes) {
            Some((len, used)) if bytes.len() - used == len as usize => used,
            _ => return Err(QueueError::Decode("message is not a byte string".into())),
        }
    };
    Ok(Received(match p.bytes {
        Bytes::Ring(bytes) => Held::Ring(&bytes[start..]),
        Bytes::Assembled(buf) => Held::Assembled(buf, start),
    }))
}

/// What a get that hands the bytes to a reader returns: the reader's
/// value (it is called once per message taken).
fn read_result<R>(got: Result<Result<Option<R>, QueueError>, GetError>) -> Result<R, GetError> {
    match got? {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(GetError::Failed(QueueError::Corrupted(
            "a get read two messages".into(),
        ))),
        Err(e) => Err(GetError::Failed(e)),
    }
}

fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn decode_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A [`Queue`] whose consumers report each item done, so that producers can
/// wait for all work to finish (Python's `JoinableQueue`).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let q = proc_queue::JoinableQueue::new()?;
/// q.put(1u32)?;
/// let worker = q.clone();
/// let child = proc_core::spawn(move || {
///     let item = worker.get().expect("item");
///     worker.task_done().expect("task_done");
///     item
/// })?;
/// q.join(); // returns once the child called task_done
/// assert_eq!(child.join()?, 1);
/// assert!(q.task_done().is_err()); // one too many
/// # Ok(()) }
/// ```
#[derive(Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("queue", &self.queue)
            .field("unfinished_tasks", &self.unfinished_tasks())
            .finish()
    }
}

impl<T> std::ops::Deref for JoinableQueue<T> {
    type Target = Queue<T>;

    /// Every `Queue` method (`put`, `get`, `qsize`, `close`, …).
    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// An unbounded joinable queue (Python's `JoinableQueue()`).
    ///
    /// # Errors
    ///
    /// As [`Queue::new`].
    pub fn new() -> Result<Self, QueueError> {
        Ok(JoinableQueue {
            queue: Queue::new()?,
        })
    }

    /// A joinable queue over a queue built with [`Queue::builder`]. The
    /// queue must be fresh (nothing put yet): every put counts as a task.
    pub fn from_queue(queue: Queue<T>) -> Self {
        JoinableQueue { queue }
    }
}

impl<T> JoinableQueue<T> {
    /// Items put and not yet marked done.
    ///
    /// Counted modulo 2^24, as the ring counts its messages: at most
    /// 16,777,215 items may be taken and not yet marked done at once (the
    /// ring itself never holds that many); past it the count wraps, `join`
    /// may return early and `task_done` report too many calls.
    pub fn unfinished_tasks(&self) -> usize {
        let done = &self.queue.ring.segment().header().misc.0.done;
        let done = done.load(Ordering::Acquire);
        protocol::count_distance(self.queue.ring.puts(), done) as usize
    }

    /// Marks one item taken with `get` as processed (Python's
    /// `task_done()`). A get that failed on its message (`Decode`,
    /// `TooLarge`, or a `Deserialize` that panicked) took that message
    /// too: it needs its `task_done` as well.
    ///
    /// # Errors
    ///
    /// [`QueueError::TaskDoneTooManyTimes`] if every item put is already
    /// done (Python's `ValueError`).
    pub fn task_done(&self) -> Result<(), QueueError> {
        let done = &self.queue.ring.segment().header().misc.0.done;
        let mut current = done.load(Ordering::Acquire);
        loop {
            let puts = self.queue.ring.puts();
            if protocol::count_distance(puts, current) == 0 {
                return Err(QueueError::TaskDoneTooManyTimes);
            }
            // (`current` may be any value a peer wrote there.)
            let next = current.wrapping_add(1) % COUNT_MOD;
            // SYNC: AcqRel pairs with join()'s Acquire load of `done`.
            match done.compare_exchange(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    if protocol::count_distance(self.queue.ring.puts(), next) == 0 {
                        wait::notify(&self.queue.ring.join_signal());
                    }
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Waits until every item put has been marked done (Python's `join()`).
    pub fn join(&self) {
        let _ = self.join_deadline(None);
    }

    /// Waits at most `timeout` for every item to be done; whether they were.
    pub fn join_timeout(&self, timeout: Duration) -> bool {
        self.join_deadline(deadline_after(timeout))
    }

    fn join_deadline(&self, deadline: Option<Instant>) -> bool {
        wait::wait_for(&self.queue.ring.join_signal(), deadline, None, || {
            self.unfinished_tasks() == 0
        }) == Waited::Ready
    }
}

/// The plain queue of Python's `SimpleQueue`: `put`, `get`, `empty`,
/// `close`, no bound and no timeouts.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let q = proc_queue::SimpleQueue::new()?;
/// q.put(vec![1, 2, 3])?;
/// assert!(!q.empty());
/// assert_eq!(q.get()?, vec![1, 2, 3]);
/// # Ok(()) }
/// ```
#[derive(Serialize, Deserialize)]
#[serde(transparent, bound = "")]
pub struct SimpleQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleQueue")
            .field("queue", &self.queue)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// A new, empty queue.
    ///
    /// # Errors
    ///
    /// As [`Queue::new`].
    pub fn new() -> Result<Self, QueueError> {
        Ok(SimpleQueue {
            queue: Queue::new()?,
        })
    }

    /// Puts `item`.
    ///
    /// # Errors
    ///
    /// As [`Queue::put`].
    pub fn put(&self, item: T) -> Result<(), PutError<T>> {
        self.queue.put(item)
    }

    /// Takes the oldest item, waiting while there is none.
    ///
    /// # Errors
    ///
    /// As [`Queue::get`].
    pub fn get(&self) -> Result<T, GetError> {
        self.queue.get()
    }

    /// Whether the queue is empty now.
    pub fn empty(&self) -> bool {
        self.queue.empty()
    }

    /// Closes the queue (see [`Queue::close`]).
    pub fn close(&self) {
        self.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            65_536,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            encode_varint(v, &mut out);
            assert_eq!(decode_varint(&out), Some((v, out.len())));
            // postcard agrees.
            assert_eq!(postcard::to_stdvec(&v).expect("postcard"), out);
        }
        assert_eq!(decode_varint(&[0x80; 11]), None);
    }
}
