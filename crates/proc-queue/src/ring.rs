//! The ring: variable-size records in the shared segment, written by one
//! producer at a time and read by one consumer at a time (each side holds
//! its lock, see `shm`), committed with the position words of `protocol`.
//!
//! A record is a 16-byte header and its payload, padded to 16 bytes, so
//! every payload starts 16-byte aligned (glibc's memcpy is ~15x slower when
//! source and destination differ by 1–15 bytes modulo 4096):
//!
//! ```text
//! len: u32 | flags: u8 | 0: u8 | 0: u16 | seq: u32 | check: u32 | payload…
//! ```
//!
//! A whole message of at most 8 bytes (not a raw byte string) takes a
//! compact record instead: one header word and the payload word, 8-byte
//! aligned (a copy that small has no alignment cliff):
//!
//! ```text
//! len: 4 bits | check: 28 bits | flags: u8 (COMPACT|FIRST|LAST) | seq: 24 bits | payload: u64
//! ```
//!
//! `PAD` fills the end of the ring when a record does not fit there. A
//! message up to half the ring is one record (`FIRST | LAST`); a larger one
//! streams through as fragments (`FIRST`, …, `LAST`), the first starting
//! with a 16-byte block holding the total length; a producer whose deadline
//! passes mid-stream, or whose queue was closed while nobody takes from the
//! ring, withdraws the message with an `ABORT` record (it always keeps 16
//! bytes free for one). Positions and message
//! counts only move at commits, so a process killed anywhere leaves nothing
//! half-visible: an uncommitted record is overwritten later, a record a
//! consumer was reading stays for the next consumer.

use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use crate::error::QueueError;
use crate::protocol::{self, Signal, COUNT_MOD};
use crate::shm::{Guard, LockError, Segment};
use crate::wait::{self, Waited};

const HDR: usize = 16;
const FIRST: u8 = 1;
const LAST: u8 = 2;
const PAD: u8 = 4;
/// The payload starts with a 16-byte block whose last bytes are a postcard
/// length prefix: the bytes after it are a raw byte string, 16-aligned.
pub(crate) const RAW: u8 = 8;
/// Withdraws the streamed message `seq` whose producer gave up (its
/// deadline passed, or the queue was closed and nobody took from the
/// ring): consumers drop the part they took.
const ABORT: u8 = 16;
const KNOWN_FLAGS: u8 = FIRST | LAST | PAD | RAW | ABORT;
/// A whole message of at most [`COMPACT_MAX`] bytes in one 16-byte record:
/// an 8-byte header word (length, check, flags, count) and the payload
/// word. Half the size of a full record for the commonest messages (a
/// number, a small tuple): a consumer reading records just written on
/// another core moves half as many cache lines (W2 with 16-byte records
/// measured 17-19 against 13-15 M msg/s for 32-byte ones).
const COMPACT: u8 = 32;
const COMPACT_MAX: usize = 8;

/// The largest ring: message counts are kept modulo 2^24, and a ring must
/// never hold that many records (the smallest record is 16 bytes).
pub(crate) const MAX_CAPACITY: usize = 128 << 20;
/// The smallest ring.
pub(crate) const MIN_CAPACITY: usize = 4096;

/// How often a consumer waiting for the rest of a streamed message checks
/// that its producer is still alive.
const LIVENESS_SLICE: Duration = Duration::from_millis(20);

/// How long a producer streaming a message into a closed queue waits for
/// room while the consumers take nothing, before it withdraws the message
/// (`Closed`), and how often it looks meanwhile.
const CLOSE_GRACE: Duration = Duration::from_millis(200);
const CLOSE_SLICE: Duration = Duration::from_millis(20);

/// Decodes a whole message and then `retire`s it, also when `decode`
/// panics: the panic goes on to the caller of `get` (it is the caller's
/// `Deserialize` that panicked), and the message is taken, as one that
/// fails to decode is, instead of staying at the head for every later get
/// to meet again. The guard is forgotten on the normal path (no cost
/// there).
#[inline]
fn decode_then_retire<R>(
    decode: &mut impl FnMut(Payload<'_>) -> R,
    payload: Payload<'_>,
    retire: impl Fn(),
) -> R {
    struct RetireOnUnwind<F: Fn()>(F);
    impl<F: Fn()> Drop for RetireOnUnwind<F> {
        fn drop(&mut self) {
            (self.0)();
        }
    }
    let unwinding = RetireOnUnwind(&retire);
    let out = decode(payload);
    std::mem::forget(unwinding);
    retire();
    out
}

fn round16(n: usize) -> usize {
    (n + 15) & !15
}

/// How far ahead of its record a producer starting a new cache line asks
/// for the line it will write later (`prefetchw`, in the free room only).
///
/// Every line of the ring was read by a consumer on the previous lap, so
/// the producer's first store to it waits for the line to be taken back
/// from the consumer's core, and the put's next locked instruction waits
/// for that store. Asked for 512 bytes (32 small records) early, the line
/// is there when the put comes. W2 on the 16-core Xeon: 1.129 (40
/// alternated runs; 1.076 at 1 KiB, 0.983 at 2 KiB), W7 0.992, W4
/// unchanged; on the 2-vCPU card machine 1.103 and 1.030 (20 and 30 runs).
const PREFETCH_AHEAD: usize = 512;

/// The block of 128 bytes (two cache lines: the adjacent-line prefetcher
/// fetches pairs) that ring position `pos` lies in (see
/// [`Ring::at_producers_pair`]).
fn block(pos: u64) -> u64 {
    pos >> 7
}

/// Records up to this size are written with a single copy.
const SMALL: usize = 64;

/// How long a consumer that finds the ring empty, right after two gets in
/// a row that did not wait, leaves the producers' position word alone
/// before it looks again.
///
/// "Did not wait": the get found its message at its first look. One that
/// waited for it (after a delay or not), or timed out, did; waits for the
/// rest of a streamed message, or for a closing producer, do not count.
///
/// Such a consumer is keeping up with a stream: looking at once, it finds
/// one new record per look, and every look takes the position word's
/// cache line away from the producer, which takes it back for its next
/// commit. On a 16-core Xeon that regime ran W2 at ~4 M msg/s (against
/// 13–14 M when the producer happened to stay ahead). Left alone for a
/// moment, the producer commits a few records in a row and the consumer
/// takes them together. Delaying every wait, W2 there measured medians of
/// 4.3, 5.6, 10.5 and 8.4 M msg/s for 0, 150, 400 ns and 1 µs, and W4 1.17,
/// 1.07, 1.13 and 1.74 µs; delaying after one get that did not wait, W2
/// 4.12 → 5.83 M and W4 1.12 → 1.12 µs there (12 alternated runs). On the
/// 2-vCPU card machine that one-get rule cost W4 ~10% (a reply that came
/// before its get marked a stream). With at most one message in flight
/// each way, a request/reply exchange has two gets in a row that do not
/// wait only when the peer answers before each get is called (the caller
/// preempted between its put and its get, twice), while a consumer taking
/// a batch has them at every batch (BENCHMARKS.md).
///
/// The same delay lets the producer finish the cache lines it is writing
/// (see `Ring::at_producers_pair`). With that rule in place a longer delay
/// measured better: 1600 against 400 ns, W2 1.061 and W7 1.058 on the
/// 2-vCPU card machine (400 and 150 alternated runs; 800 ns: 1.028,
/// 1.022), W4 1.000 (300; a ratio of round-trip times, as below), W5
/// 1.022, W6 0.998, W3 0.998; on the 16-core Xeon W2 1.148, W7 1.198, W4
/// 0.968 (40 each).
const BATCH_DELAY: Duration = Duration::from_nanos(1600);

/// Gets in a row that did not wait before a consumer counts as streaming.
const STREAM_RUN: u32 = 2;

/// How long a `try_put` that finds the producer lock held, while the queue
/// has room, waits for the holder to finish its record.
const TRY_GRACE: Duration = Duration::from_millis(2);

/// A record header's 16 bytes.
/// A record header as its two little-endian words.
#[inline]
fn header_words(len: u32, flags: u8, seq: u32) -> (u64, u64) {
    let a = u64::from(len) | (u64::from(flags) << 32);
    let b = u64::from(seq) | (u64::from(check_word(len, flags, seq)) << 32);
    (a, b)
}

fn header_bytes(len: u32, flags: u8, seq: u32) -> [u8; HDR] {
    let (a, b) = header_words(len, flags, seq);
    let mut out = [0u8; HDR];
    out[..8].copy_from_slice(&a.to_le_bytes());
    out[8..].copy_from_slice(&b.to_le_bytes());
    out
}

/// A compact header's 28-bit check: the top bits of the full check, which
/// depend on every bit of its inputs (the low bits of a product do not
/// depend on the high bits of its factor).
fn compact_check(len: u32, flags: u8, seq: u32) -> u32 {
    check_word(len, flags, seq) >> 4
}

fn check_word(len: u32, flags: u8, seq: u32) -> u32 {
    (len ^ (u32::from(flags) << 24) ^ seq.rotate_left(7)).wrapping_mul(0x9E37_79B1) ^ 0x5EED_C0DE
}

/// A record header as read from the ring (validated).
#[derive(Debug, Clone, Copy)]
struct Record {
    len: usize,
    flags: u8,
    seq: u32,
    /// Where the payload starts, from the record's start.
    at: usize,
    /// The bytes the record takes.
    rec: usize,
}

/// Why a push did not happen.
pub(crate) enum PushError {
    /// No room (or the message bound is reached) and the deadline passed.
    Full,
    /// The queue is closed.
    Closed,
    /// The segment is broken.
    Failed(QueueError),
}

/// Why a pop did not happen.
pub(crate) enum PopError {
    /// Nothing arrived before the deadline.
    Empty,
    /// The queue is closed and drained.
    Closed,
    /// The oldest message is streamed, and the pop takes whole ones only.
    Streamed,
    /// The segment is broken.
    Failed(QueueError),
}

/// A message's payload handed to the consumer's decoder. For a raw
/// message, the bytes are the byte string itself (its prefix block already
/// skipped); otherwise postcard.
pub(crate) struct Payload<'a> {
    /// Where the bytes are.
    pub(crate) bytes: Bytes<'a>,
    /// Whether the message was put raw.
    pub(crate) raw: bool,
}

/// The bytes of a message: still in the ring (a one-record message), or
/// reassembled from fragments (the decoder may keep the buffer: no second
/// copy).
pub(crate) enum Bytes<'a> {
    Ring(&'a [u8]),
    Assembled(Vec<u8>),
}

impl Bytes<'_> {
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Ring(b) => b,
            Bytes::Assembled(v) => v,
        }
    }
}

/// What a get hands on to [`Ring::pop_waiting`] about the consumer lock.
enum ConsumerLock<'a> {
    /// Taken (by the fast path, which then found a record it leaves).
    Taken(Guard<'a>),
    /// Not taken: the lock's fast path failed (the word held, or neither
    /// of the two tags at hand is this segment's).
    FastTried,
    /// Not tried yet.
    Untried,
}

/// The ring over one segment.
pub(crate) struct Ring {
    seg: Segment,
    cap: usize,
    /// Largest message written as one record.
    max_single: usize,
    /// Largest fragment payload of a streamed message.
    max_fragment: usize,
    /// How many of the last gets through this ring (this handle, its
    /// clones and threads in this process) in a row found their message
    /// without waiting, up to [`STREAM_RUN`] (see [`BATCH_DELAY`]; a hint:
    /// a race costs at most one delay).
    immediate: AtomicU32,
    /// The 128-byte block (position / 128, plus one; 0: none) in which a
    /// get through this handle (its clones, threads in this process) last
    /// let the producer go ahead (see
    /// [`Ring::at_producers_pair`]): its other records are taken at once.
    deferred: AtomicU64,
}

impl Ring {
    pub(crate) fn new(seg: Segment) -> Ring {
        let cap = seg.capacity();
        Ring {
            seg,
            cap,
            max_single: cap / 2 - HDR,
            max_fragment: cap / 4,
            immediate: AtomicU32::new(0),
            deferred: AtomicU64::new(0),
        }
    }

    /// Empties the ring for use as a new one (see [`Segment::reset`]).
    pub(crate) fn reset(&mut self) {
        *self.immediate.get_mut() = 0;
        *self.deferred.get_mut() = 0;
        self.seg.reset();
    }

    pub(crate) fn segment(&self) -> &Segment {
        &self.seg
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    #[inline]
    fn data_signal(&self) -> Signal<'_> {
        let h = self.seg.header();
        let s = &h.data.0;
        Signal {
            seq: &s.seq,
            waiters: &s.waiters,
            sleepers: &h.sleepers.0.data,
        }
    }

    #[inline]
    fn space_signal(&self) -> Signal<'_> {
        let h = self.seg.header();
        let s = &h.space.0;
        Signal {
            seq: &s.seq,
            waiters: &s.waiters,
            sleepers: &h.sleepers.0.space,
        }
    }

    pub(crate) fn join_signal(&self) -> Signal<'_> {
        let h = self.seg.header();
        let s = &h.misc.0;
        Signal {
            seq: &s.join_seq,
            waiters: &s.join_waiters,
            sleepers: &h.sleepers.0.join,
        }
    }

    /// Whether `close()` was called on any handle.
    pub(crate) fn is_closed(&self) -> bool {
        let closed = &self.seg.header().misc.0.closed;
        closed.load(std::sync::atomic::Ordering::Acquire) != 0
    }

    /// Closes the queue and wakes every waiter.
    pub(crate) fn close(&self) {
        let h = self.seg.header();
        h.misc
            .0
            .closed
            .store(1, std::sync::atomic::Ordering::Release);
        // Wake unconditionally: the waiters re-check `closed`.
        for sig in [&h.data.0.seq, &h.space.0.seq] {
            sig.fetch_add(1, std::sync::atomic::Ordering::Release);
            crate::shm::futex_wake_all(sig);
        }
    }

    /// Messages in the queue now: completed puts minus completed gets.
    pub(crate) fn len(&self) -> usize {
        let h = self.seg.header();
        let head = protocol::observe(&h.consumer.0.head);
        let tail = protocol::observe(&h.producer.0.tail);
        protocol::count_distance(protocol::count(tail), protocol::count(head)) as usize
    }

    /// Completed puts so far (modulo 2^24).
    pub(crate) fn puts(&self) -> u32 {
        protocol::count(protocol::observe(&self.seg.header().producer.0.tail))
    }

    fn lock_err(e: LockError) -> QueueError {
        match e {
            LockError::Broken(e) => QueueError::Corrupted(format!("queue lock unusable: {e}")),
            LockError::Busy => QueueError::Corrupted("queue lock busy".into()),
        }
    }

    // ----- producer side -----

    /// Writes one message made of `parts` (concatenated). `raw` marks a
    /// payload whose first part is the 16-byte raw prefix block.
    pub(crate) fn push(
        &self,
        parts: &[&[u8]],
        raw: bool,
        deadline: Option<Instant>,
    ) -> Result<(), PushError> {
        let h = self.seg.header();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let _guard: Guard<'_> = match self.seg.lock(&h.producer_lock, deadline) {
            Ok(g) => g,
            // A try (or a timeout) that found the lock held on a closed
            // queue: closed is the answer, not full.
            Err(LockError::Busy) if self.is_closed() => return Err(PushError::Closed),
            // A try (`try_put`) that found the lock held while the queue
            // has room: the holder is writing a record, not waiting for
            // room; wait for it a little rather than call the queue full
            // (Python's `put_nowait` waits for its lock too).
            Err(LockError::Busy) if self.looks_roomy(total) => {
                match self
                    .seg
                    .lock(&h.producer_lock, Some(Instant::now() + TRY_GRACE))
                {
                    Ok(g) => g,
                    Err(LockError::Busy) if self.is_closed() => return Err(PushError::Closed),
                    Err(LockError::Busy) => return Err(PushError::Full),
                    Err(e) => return Err(PushError::Failed(Self::lock_err(e))),
                }
            }
            Err(LockError::Busy) => return Err(PushError::Full),
            Err(e) => return Err(PushError::Failed(Self::lock_err(e))),
        };
        if self.is_closed() {
            return Err(PushError::Closed);
        }
        let maxsize = self.seg.maxsize();
        // The message bound: wait while the queue holds `maxsize` messages.
        if maxsize > 0 {
            let waited = wait::wait_for(&self.space_signal(), deadline, None, || {
                self.len() < maxsize as usize || self.is_closed()
            });
            if self.is_closed() {
                return Err(PushError::Closed);
            }
            if waited == Waited::TimedOut {
                return Err(PushError::Full);
            }
        }
        let raw_flag = if raw { RAW } else { 0 };
        if let [part] = parts {
            if HDR + round16(total) <= SMALL && self.try_write_small(part, FIRST | LAST | raw_flag)
            {
                return Ok(());
            }
        }
        if total <= self.max_single {
            let mut w = Writer::new(parts);
            self.write_record(
                true,
                FIRST | LAST | raw_flag,
                total,
                &mut w,
                true,
                deadline,
                0,
            )
        } else {
            // Stream: a 16-byte total block, then the parts, in fragments.
            let mut total_block = [0u8; 16];
            total_block[..8].copy_from_slice(&(total as u64).to_le_bytes());
            let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 1);
            all.push(&total_block);
            all.extend_from_slice(parts);
            let mut w = Writer::new(&all);
            let mut remaining = total + 16;
            let mut first = true;
            while remaining > 0 {
                let n = remaining.min(self.max_fragment);
                remaining -= n;
                let mut flags = raw_flag;
                if first {
                    flags |= FIRST;
                }
                if remaining == 0 {
                    flags |= LAST;
                }
                let last = remaining == 0;
                // Until the last fragment, keep room for an ABORT record.
                let spare = if last { 0 } else { HDR };
                match self.write_record(first, flags, n, &mut w, last, deadline, spare) {
                    Ok(()) => {}
                    Err(e @ (PushError::Full | PushError::Closed)) if !first => {
                        // The deadline passed midway, or the queue was
                        // closed and nobody takes: withdraw what was sent.
                        self.write_abort();
                        return Err(e);
                    }
                    Err(e) => return Err(e),
                }
                first = false;
            }
            Ok(())
        }
    }

    /// Whether a message of `total` bytes would fit now, read without the
    /// producer lock (a hint: the lock holder may take the room first).
    fn looks_roomy(&self, total: usize) -> bool {
        let maxsize = self.seg.maxsize() as usize;
        if maxsize > 0 && self.len() >= maxsize {
            return false;
        }
        let h = self.seg.header();
        let tail = protocol::pos(protocol::observe(&h.producer.0.tail));
        let head = protocol::pos(protocol::observe(&h.consumer.0.head));
        let used = protocol::distance(tail, head) as usize;
        used <= self.cap && self.cap - used > HDR + round16(total.min(self.max_single)) + HDR
    }

    /// The common case of a put, taken when it applies: a message of one
    /// small record that fits before the end of the ring in the room last
    /// seen free. Written with fixed-size copies (no `memcpy` call);
    /// anything else (a wrap, a wait for room, a corrupted position) is
    /// left to [`write_record`](Ring::write_record). The producer lock is
    /// held.
    #[inline]
    fn try_write_small(&self, payload: &[u8], flags: u8) -> bool {
        let prod = &self.seg.header().producer.0;
        let len = payload.len();
        let compact = len <= COMPACT_MAX && flags == FIRST | LAST;
        let rec = if compact { 16 } else { HDR + round16(len) };
        let tail_word = prod.tail.load(std::sync::atomic::Ordering::Relaxed);
        let tail = protocol::pos(tail_word);
        let off = (tail as usize) & (self.cap - 1);
        let cached = prod.cached_head.load(std::sync::atomic::Ordering::Relaxed);
        let used = protocol::distance(tail, cached) as usize;
        if tail % 16 != 0 || rec > self.cap - off || used > self.cap || self.cap - used < rec {
            return false;
        }
        let seq = protocol::count(tail_word);
        if off % 64 == 0 && self.cap - used >= PREFETCH_AHEAD + 64 {
            self.seg
                .prefetch_for_write((off + PREFETCH_AHEAD) & (self.cap - 1));
        }
        if compact {
            let mut p = 0u64;
            for (i, &b) in payload.iter().enumerate() {
                p |= u64::from(b) << (8 * i);
            }
            let flags = flags | COMPACT;
            let check = u64::from(compact_check(len as u32, flags, seq));
            let a = len as u64 | check << 4 | u64::from(flags) << 32 | u64::from(seq) << 40;
            self.seg.write_words(off, [a, p]);
        } else if len <= 16 {
            // Most small messages (a number, a short tuple): header and
            // payload assembled in registers, byte by byte from the
            // serializer's output (which it wrote byte by byte: a wide
            // load of it would wait for those stores to drain).
            let mut p = [0u64; 2];
            for (i, &b) in payload.iter().enumerate() {
                p[i / 8] |= u64::from(b) << (8 * (i % 8));
            }
            let (a, b) = header_words(len as u32, flags, seq);
            // (Never empty here: an empty payload takes a compact record,
            // and a raw one carries its 16-byte prefix block.)
            debug_assert!(len > 0);
            self.seg.write_words(off, [a, b, p[0], p[1]]);
        } else {
            self.write_small(off, len, flags, seq, |dst| copy_small(dst, payload));
        }
        protocol::commit(
            &prod.tail,
            protocol::pack(tail + rec as u64, (seq + 1) % COUNT_MOD),
        );
        wait::notify(&self.data_signal());
        true
    }

    /// Writes a record of at most [`SMALL`] bytes at `off` with one copy
    /// into the ring: header and payload (`fill` copies the `len` payload
    /// bytes into the slice it is given) assembled on the stack, then
    /// written with a fixed-size copy.
    #[inline]
    fn write_small(
        &self,
        off: usize,
        len: usize,
        flags: u8,
        seq: u32,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let mut buf = [0u8; SMALL];
        buf[..HDR].copy_from_slice(&header_bytes(len as u32, flags, seq));
        fill(&mut buf[HDR..HDR + len]);
        match HDR + round16(len) {
            16 => self.seg.write(off, &buf[..16]),
            32 => self.seg.write(off, &buf[..32]),
            48 => self.seg.write(off, &buf[..48]),
            _ => self.seg.write(off, &buf[..SMALL]),
        }
    }

    /// Waits for room, then writes and commits one record of `len` payload
    /// bytes taken from `w`. `completes` says whether it ends a message;
    /// `spare` bytes must stay free after it.
    #[allow(clippy::too_many_arguments)]
    fn write_record(
        &self,
        first: bool,
        flags: u8,
        len: usize,
        w: &mut Writer<'_>,
        completes: bool,
        deadline: Option<Instant>,
        spare: usize,
    ) -> Result<(), PushError> {
        let h = self.seg.header();
        let prod = &h.producer.0;
        let rec = HDR + round16(len);
        loop {
            let tail_word = prod.tail.load(std::sync::atomic::Ordering::Relaxed);
            let tail = protocol::pos(tail_word);
            if tail % 16 != 0 {
                return Err(PushError::Failed(QueueError::Corrupted(format!(
                    "tail position {tail} not aligned"
                ))));
            }
            let off = (tail as usize) & (self.cap - 1);
            let room_to_end = self.cap - off;
            // A PAD never ends a message: once a part of this message is
            // out, room for its ABORT record stays free after the PAD too
            // (even before the last fragment, whose own `spare` is 0).
            let keep = if rec > room_to_end && !first {
                HDR
            } else {
                spare
            };
            let need = if rec > room_to_end { room_to_end } else { rec } + keep;
            if !self.wait_room(tail, need, deadline, first)? {
                return Err(PushError::Full);
            }
            if rec > room_to_end {
                // Fill the end of the ring with a PAD record and wrap.
                self.write_header(off, (room_to_end - HDR) as u32, PAD, 0);
                protocol::commit(
                    &prod.tail,
                    protocol::pack(tail + room_to_end as u64, protocol::count(tail_word)),
                );
                wait::notify(&self.data_signal());
                continue;
            }
            let seq = protocol::count(tail_word);
            if rec <= SMALL {
                self.write_small(off, len, flags, seq, |dst| w.copy_to_slice(dst));
            } else {
                self.write_header(off, len as u32, flags, seq);
                w.copy_into(&self.seg, off + HDR, len);
            }
            let count = protocol::count(tail_word) + u32::from(completes);
            protocol::commit(
                &prod.tail,
                protocol::pack(tail + rec as u64, count % COUNT_MOD),
            );
            wait::notify(&self.data_signal());
            return Ok(());
        }
    }

    /// Waits until `need` bytes after `tail` are free; false on timeout.
    /// Before a message's first record is out (`first`), a close ends the
    /// wait with `Closed`. Afterwards the message goes on while consumers
    /// take from the ring; once the queue is closed and they have taken
    /// nothing for [`CLOSE_GRACE`], the wait ends with `Closed` (the caller
    /// withdraws the message), so that a put streaming into a closed queue
    /// that nobody drains returns instead of waiting for ever.
    fn wait_room(
        &self,
        tail: u64,
        need: usize,
        deadline: Option<Instant>,
        first: bool,
    ) -> Result<bool, PushError> {
        let h = self.seg.header();
        let prod = &h.producer.0;
        let free = |head: u64| -> Result<usize, PushError> {
            let used = protocol::distance(tail, head) as usize;
            if used > self.cap {
                return Err(PushError::Failed(QueueError::Corrupted(format!(
                    "ring positions out of range (tail {tail}, head {head})"
                ))));
            }
            Ok(self.cap - used)
        };
        let cached = prod.cached_head.load(std::sync::atomic::Ordering::Relaxed);
        if free(cached)? >= need {
            return Ok(true);
        }
        let mut error = None;
        // Where the consumers' position last stood, and since when (once
        // the queue is closed).
        let mut stall: Option<(u64, Instant)> = None;
        loop {
            // Closed: look every slice whether the consumers still take.
            let closed_before = self.is_closed();
            let slice = closed_before.then_some(CLOSE_SLICE);
            let mut look_again = false;
            let waited = wait::wait_for(&self.space_signal(), deadline, slice, || {
                if first && self.is_closed() {
                    error = Some(PushError::Closed);
                    return true;
                }
                let head = protocol::pos(protocol::observe(&h.consumer.0.head));
                match free(head) {
                    Ok(f) if f >= need => {
                        prod.cached_head
                            .store(head, std::sync::atomic::Ordering::Relaxed);
                        true
                    }
                    Ok(_) if self.is_closed() => {
                        if !closed_before {
                            // Closed since this wait began: wait again,
                            // in slices.
                            look_again = true;
                            return true;
                        }
                        let now = Instant::now();
                        match stall {
                            Some((at, since)) if at == head => {
                                if now.duration_since(since) >= CLOSE_GRACE {
                                    error = Some(PushError::Closed);
                                    return true;
                                }
                            }
                            _ => stall = Some((head, now)),
                        }
                        false
                    }
                    Ok(_) => false,
                    Err(e) => {
                        error = Some(e);
                        true
                    }
                }
            });
            if let Some(e) = error {
                return Err(e);
            }
            if look_again {
                continue;
            }
            match waited {
                Waited::Ready => return Ok(true),
                // The deadline, or a slice (then look again). A deadline
                // that passes on a closed queue is answered Closed (the
                // caller withdraws a message begun), as a try is.
                Waited::TimedOut => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        if self.is_closed() {
                            return Err(PushError::Closed);
                        }
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Writes an `ABORT` record for the message being streamed (room for it
    /// was kept free).
    fn write_abort(&self) {
        let prod = &self.seg.header().producer.0;
        let tail_word = prod.tail.load(std::sync::atomic::Ordering::Relaxed);
        let tail = protocol::pos(tail_word);
        let off = (tail as usize) & (self.cap - 1);
        let seq = protocol::count(tail_word);
        self.write_header(off, 0, ABORT, seq);
        protocol::commit(&prod.tail, protocol::pack(tail + HDR as u64, seq));
        wait::notify(&self.data_signal());
    }

    fn write_header(&self, off: usize, len: u32, flags: u8, seq: u32) {
        self.seg.write(off, &header_bytes(len, flags, seq));
    }

    // ----- consumer side -----

    #[inline]
    fn read_header(&self, off: usize, available: usize) -> Result<Record, QueueError> {
        let a = self.seg.read_u64(off);
        let flags = (a >> 32) as u8;
        let corrupt =
            |what: &str| QueueError::Corrupted(format!("record at ring offset {off}: {what}"));
        if flags & COMPACT != 0 {
            // [len: 4 bits, check: 28 bits, flags: 8 bits, seq: 24 bits],
            // then the payload word.
            let len = (a & 0xF) as u32;
            let seq = (a >> 40) as u32;
            if (a >> 4) as u32 & 0x0FFF_FFFF != compact_check(len, flags, seq) {
                return Err(corrupt("header checksum mismatch"));
            }
            if flags != COMPACT | FIRST | LAST || len as usize > COMPACT_MAX {
                return Err(corrupt("malformed compact record"));
            }
            if 16 > self.cap - off || 16 > available {
                return Err(corrupt("length runs past the published data"));
            }
            return Ok(Record {
                len: len as usize,
                flags,
                seq,
                at: 8,
                rec: 16,
            });
        }
        let b = self.seg.read_u64(off + 8);
        let len = a as u32;
        let seq = b as u32;
        if (a >> 40) != 0 || (b >> 32) as u32 != check_word(len, flags, seq) {
            return Err(corrupt("header checksum mismatch"));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(corrupt("unknown flags"));
        }
        let len = len as usize;
        let rec = HDR + round16(len);
        if rec > self.cap - off || rec > available {
            return Err(corrupt("length runs past the published data"));
        }
        Ok(Record {
            len,
            flags,
            seq,
            at: HDR,
            rec,
        })
    }

    /// Reads one message and hands its payload to `decode`; the message is
    /// retired only after `decode` returns (a consumer killed inside leaves
    /// it for the next one).
    #[inline(never)]
    pub(crate) fn pop<R>(
        &self,
        deadline: Option<Instant>,
        decode: impl FnMut(Payload<'_>) -> R,
    ) -> Result<R, PopError> {
        self.pop_with::<false, R>(deadline, decode)
    }

    /// [`pop`](Ring::pop) for a caller that takes byte strings: its fast
    /// path takes raw messages too (a typed get leaves them to the slow
    /// path, so that its decoder's raw branch is compiled out of the fast
    /// path's copy of it; `pop_waiting` still hands it raw messages).
    ///
    /// Both stay out of line: inlined into their callers (with the fast
    /// path inside), a get of a number measured 10 ns more (`queue_cost`).
    #[inline(never)]
    pub(crate) fn pop_bytes<R>(
        &self,
        deadline: Option<Instant>,
        decode: impl FnMut(Payload<'_>) -> R,
    ) -> Result<R, PopError> {
        self.pop_with::<true, R>(deadline, decode)
    }

    #[inline(always)]
    fn pop_with<const RAW_OK: bool, R>(
        &self,
        deadline: Option<Instant>,
        mut decode: impl FnMut(Payload<'_>) -> R,
    ) -> Result<R, PopError> {
        let mut waited = false;
        let popped = match self.pop_ready::<RAW_OK, R>(&mut decode) {
            Ok(out) => Ok(out),
            Err(held) => self.pop_waiting(deadline, false, held, &mut decode, &mut waited),
        };
        let run = self.immediate.load(std::sync::atomic::Ordering::Relaxed);
        let next = if popped.is_ok() && !waited {
            (run + 1).min(STREAM_RUN)
        } else {
            0
        };
        if next != run {
            self.immediate
                .store(next, std::sync::atomic::Ordering::Relaxed);
        }
        popped
    }

    /// Reads the oldest message only if it is there whole now: one record.
    /// A message streaming through in fragments is left where it is (for a
    /// [`pop`](Ring::pop)), so this never waits for a producer to write
    /// the rest.
    pub(crate) fn try_pop_whole<R>(
        &self,
        decode: impl FnMut(Payload<'_>) -> R,
    ) -> Result<R, PopError> {
        let mut waited = false;
        self.pop_waiting(
            Some(Instant::now()),
            true,
            ConsumerLock::Untried,
            decode,
            &mut waited,
        )
    }

    /// The common case of a get, taken when it applies: the consumer lock
    /// free at once, and a whole message of one record at the head (raw
    /// ones only for [`pop_bytes`](Ring::pop_bytes)). Small enough to be
    /// inlined into `pop` and `pop_bytes` with the decoder, so that the
    /// decoded value stays in registers up to their return instead of
    /// being passed on through the stack (where the narrow stores that
    /// built it and the wide loads that copied it out stalled store
    /// forwarding: 17% of `pop`'s samples in W2). Anything else (the lock
    /// held, an empty ring, a streamed, PAD or ABORT record, a corrupted
    /// header) is left to [`pop_waiting`](Ring::pop_waiting), handed the
    /// lock if it was taken.
    #[inline]
    fn pop_ready<const RAW_OK: bool, R>(
        &self,
        decode: &mut impl FnMut(Payload<'_>) -> R,
    ) -> Result<R, ConsumerLock<'_>> {
        let h = self.seg.header();
        let Some(guard) = self.seg.lock_fast(&h.consumer_lock) else {
            return Err(ConsumerLock::FastTried);
        };
        let cons = &h.consumer.0;
        let head_word = cons.head.load(std::sync::atomic::Ordering::Relaxed);
        let head = protocol::pos(head_word);
        let off = (head as usize) & (self.cap - 1);
        let record = match self.available(head) {
            Ok(available) if available > 0 && head % 16 == 0 && !self.at_producers_pair(head) => {
                self.read_header(off, available)
            }
            _ => return Err(ConsumerLock::Taken(guard)),
        };
        // A raw message's bytes follow its 16-byte prefix block (one
        // shorter than that is left to pop_waiting, which reports it).
        // (pop_waiting's whole-record arm does the same skip; one helper
        // for both, returning an Option, made a get of a number 20 → 35 ns
        // in queue_cost: the raw branch was no longer compiled out here.)
        let r = match record {
            Ok(r)
                if r.flags & (FIRST | LAST | PAD | ABORT) == FIRST | LAST
                    && (r.flags & RAW == 0 || (RAW_OK && r.len >= 16)) =>
            {
                r
            }
            _ => return Err(ConsumerLock::Taken(guard)),
        };
        let raw = RAW_OK && r.flags & RAW != 0;
        let skip = if raw { 16 } else { 0 };
        let payload = Payload {
            bytes: Bytes::Ring(self.seg.bytes(off + r.at + skip, r.len - skip)),
            raw,
        };
        let next = protocol::pack(
            head + r.rec as u64,
            (protocol::count(head_word) + 1) % COUNT_MOD,
        );
        let out = decode_then_retire(decode, payload, || {
            protocol::commit(&cons.head, next);
            wait::notify(&self.space_signal());
        });
        drop(guard);
        Ok(out)
    }

    /// Whether a streaming consumer's next record lies in the 128 bytes
    /// (two cache lines: the adjacent-line prefetcher fetches pairs) that
    /// the producer was writing into when the consumer last read its
    /// position.
    ///
    /// A consumer keeping up with a stream would otherwise read each record
    /// just after it is written, while the producer still writes the next
    /// ones into the same lines: the lines travel to the consumer's core
    /// and back, and the producer's next locked instruction waits for them
    /// (the unlock's compare-and-swap: a third of W2's producer samples).
    /// Left alone for a moment (see [`let_producer_ahead`]), the producer
    /// finishes those lines and the consumer takes them whole: W2 on a
    /// 16-core Xeon 6.9 → 11.2 M msg/s (60 alternated runs, ratio 1.645),
    /// W7 1.24, W4 unchanged (BENCHMARKS.md). Only while streaming (see
    /// [`BATCH_DELAY`]): a get that waits takes what it finds at once.
    #[inline]
    fn at_producers_pair(&self, head: u64) -> bool {
        let cached = self
            .seg
            .header()
            .consumer
            .0
            .cached_tail
            .load(std::sync::atomic::Ordering::Relaxed);
        block(head) == block(cached)
            && self.streaming()
            && self.deferred.load(std::sync::atomic::Ordering::Relaxed) != block(head) + 1
    }

    /// Whether this ring's consumer is keeping up with a stream (see
    /// [`BATCH_DELAY`]).
    fn streaming(&self) -> bool {
        self.immediate.load(std::sync::atomic::Ordering::Relaxed) >= STREAM_RUN
    }

    /// [`pop`](Ring::pop); `waited` tells whether it waited for data.
    /// With `whole_only`, a streamed message is not started (`Streamed`).
    /// `held`: the consumer lock, when the caller took it already, or
    /// whether it tried the lock's fast path.
    fn pop_waiting<R>(
        &self,
        deadline: Option<Instant>,
        whole_only: bool,
        held: ConsumerLock<'_>,
        mut decode: impl FnMut(Payload<'_>) -> R,
        waited: &mut bool,
    ) -> Result<R, PopError> {
        let h = self.seg.header();
        let locked = match held {
            ConsumerLock::Taken(g) => Ok(g),
            ConsumerLock::FastTried => self.seg.lock_after_fast(&h.consumer_lock, deadline),
            ConsumerLock::Untried => self.seg.lock(&h.consumer_lock, deadline),
        };
        let _guard = match locked {
            Ok(g) => g,
            Err(LockError::Busy) => return Err(PopError::Empty),
            Err(e) => return Err(PopError::Failed(Self::lock_err(e))),
        };
        let cons = &h.consumer.0;
        // A streamed message being put together: (seq, bytes, total).
        let mut assembly: Option<(u32, Vec<u8>, usize, bool)> = None;
        loop {
            let head_word = cons.head.load(std::sync::atomic::Ordering::Relaxed);
            let head = protocol::pos(head_word);
            if head % 16 != 0 {
                return Err(PopError::Failed(QueueError::Corrupted(format!(
                    "head position {head} not aligned"
                ))));
            }
            let hcount = protocol::count(head_word);
            let available = match self.available(head) {
                Ok(a) => a,
                Err(e) => return Err(PopError::Failed(e)),
            };
            if available == 0 {
                if assembly.is_some() {
                    // The rest of a streamed message: wait (no deadline, the
                    // message is half taken), checking its producer lives.
                    if self.wait_data(head, None, Some(LIVENESS_SLICE), false) == Waited::TimedOut
                        && self.producer_gone(head)
                    {
                        // Its producer died mid-message: drop the part.
                        assembly = None;
                    }
                    continue;
                }
                if self.is_closed() && self.available(head).unwrap_or(0) == 0 {
                    // A put that passed its check for close() before the
                    // close may still be copying: it holds the producer
                    // lock until it commits. Closed only once none is in
                    // flight (a dead holder's lock is taken over here).
                    match self.seg.lock(&h.producer_lock, Some(Instant::now())) {
                        Ok(_quiet) => {
                            if self.available(head).unwrap_or(0) == 0 {
                                return Err(PopError::Closed);
                            }
                        }
                        Err(LockError::Busy) => {
                            // Its record is coming: wait for it a little at
                            // a time (the producer may also be waiting for
                            // room, which this consumer frees).
                            let slice = Some(Duration::from_millis(1));
                            if self.wait_data(head, deadline, slice, false) == Waited::TimedOut
                                && deadline.is_some_and(|d| Instant::now() >= d)
                            {
                                return Err(PopError::Empty);
                            }
                        }
                        Err(e) => return Err(PopError::Failed(Self::lock_err(e))),
                    }
                    continue;
                }
                if !*waited && self.streaming() {
                    let_producer_ahead(deadline);
                }
                *waited = true;
                if self.wait_data(head, deadline, None, true) == Waited::TimedOut {
                    return Err(PopError::Empty);
                }
                continue;
            }
            if !*waited && self.at_producers_pair(head) {
                // Let the producer finish the lines it is writing, then
                // take what is there; not again in this block (a producer
                // that stopped in it costs one delay). (Reading its
                // position first, to delay only when it is still there,
                // measured worse: W2 0.93 of this in 30 alternated runs on
                // the 2-vCPU card machine; that read takes the position
                // word's line from the producer.) The consumer lock stays
                // held meanwhile, as in the delay before a wait: another
                // consumer's try finds it held (`Empty`), its get waits.
                if let_producer_ahead(deadline) {
                    self.deferred
                        .store(block(head) + 1, std::sync::atomic::Ordering::Relaxed);
                }
                *waited = true;
                self.observe_tail();
                continue;
            }
            let off = (head as usize) & (self.cap - 1);
            let r = self.read_header(off, available).map_err(PopError::Failed)?;
            let next = head + r.rec as u64;
            let retire = |count: u32| {
                protocol::commit(&cons.head, protocol::pack(next, count % COUNT_MOD));
                wait::notify(&self.space_signal());
            };
            if r.flags & PAD != 0 {
                retire(hcount);
                continue;
            }
            if r.flags & ABORT != 0 {
                if assembly.as_ref().is_some_and(|a| a.0 == r.seq) {
                    assembly = None;
                }
                retire(hcount);
                continue;
            }
            let payload = self.seg.bytes(off + r.at, r.len);
            match (r.flags & FIRST != 0, r.flags & LAST != 0) {
                (true, true) => {
                    // The common case: decode straight from the ring.
                    let raw = r.flags & RAW != 0;
                    let bytes = if raw {
                        payload.get(16..).ok_or_else(|| {
                            PopError::Failed(QueueError::Corrupted(
                                "raw message without its prefix block".into(),
                            ))
                        })?
                    } else {
                        payload
                    };
                    let payload = Payload {
                        bytes: Bytes::Ring(bytes),
                        raw,
                    };
                    return Ok(decode_then_retire(&mut decode, payload, || {
                        retire(hcount + 1)
                    }));
                }
                (true, false) if whole_only => return Err(PopError::Streamed),
                (true, false) => {
                    // A streamed message starts (any earlier part was
                    // abandoned by a dead producer).
                    // Payload: [total: u64, 8 zero bytes], then for a raw
                    // message its 16-byte prefix block, then the bytes.
                    let raw = r.flags & RAW != 0;
                    let skip = if raw { 32 } else { 16 };
                    let corrupt =
                        |what: &str| PopError::Failed(QueueError::Corrupted(what.to_owned()));
                    if r.len < skip {
                        return Err(corrupt("streamed message without its length block"));
                    }
                    let mut total_bytes = [0u8; 8];
                    total_bytes.copy_from_slice(&payload[..8]);
                    let total = u64::from_le_bytes(total_bytes);
                    // `total` counts what follows the length block. A
                    // message this process cannot hold is taken out of the
                    // way (its first fragment retired; the rest are skipped
                    // as a message whose start is gone, its last counting
                    // it as taken), so that the queue goes on.
                    let too_large = || {
                        retire(hcount);
                        PopError::Failed(QueueError::TooLarge(total))
                    };
                    let Some(body) = usize::try_from(total)
                        .ok()
                        .map(|t| t.checked_sub(skip - 16))
                    else {
                        return Err(too_large());
                    };
                    // (A raw message shorter than its own prefix block.)
                    let Some(body) = body else {
                        return Err(corrupt("streamed message shorter than its prefix block"));
                    };
                    let mut buf = Vec::new();
                    if buf.try_reserve_exact(body).is_err() {
                        return Err(too_large());
                    }
                    if r.len - skip > body {
                        return Err(corrupt("fragment longer than its message"));
                    }
                    buf.extend_from_slice(&payload[skip..]);
                    assembly = Some((r.seq, buf, body, raw));
                    retire(hcount);
                }
                (false, last) => {
                    match &mut assembly {
                        Some((seq, buf, total, raw)) if *seq == r.seq => {
                            if buf.len() + r.len > *total {
                                return Err(PopError::Failed(QueueError::Corrupted(
                                    "fragments longer than their message".into(),
                                )));
                            }
                            buf.extend_from_slice(payload);
                            if last {
                                if buf.len() != *total {
                                    return Err(PopError::Failed(QueueError::Corrupted(
                                        "streamed message shorter than announced".into(),
                                    )));
                                }
                                let payload = Payload {
                                    bytes: Bytes::Assembled(std::mem::take(buf)),
                                    raw: *raw,
                                };
                                return Ok(decode_then_retire(&mut decode, payload, || {
                                    retire(hcount + 1)
                                }));
                            }
                            retire(hcount);
                        }
                        _ => {
                            // The rest of a message whose consumer died after
                            // taking its first part: it cannot be delivered
                            // whole any more. Skip it; its last fragment
                            // still counts the message as taken.
                            retire(hcount + u32::from(last));
                        }
                    }
                }
            }
        }
    }

    /// Reads the producers' position (a load of their line) and keeps it
    /// as the consumers' cached tail.
    #[inline]
    fn observe_tail(&self) -> u64 {
        let h = self.seg.header();
        let tail = protocol::pos(protocol::observe(&h.producer.0.tail));
        h.consumer
            .0
            .cached_tail
            .store(tail, std::sync::atomic::Ordering::Relaxed);
        tail
    }

    /// Published bytes after `head` (validated against the capacity).
    #[inline]
    fn available(&self, head: u64) -> Result<usize, QueueError> {
        let h = self.seg.header();
        let cons = &h.consumer.0;
        let cached = cons.cached_tail.load(std::sync::atomic::Ordering::Relaxed);
        let mut avail = protocol::distance(cached, head);
        if avail == 0 || avail > self.cap as u64 {
            avail = protocol::distance(self.observe_tail(), head);
        }
        if avail > self.cap as u64 {
            return Err(QueueError::Corrupted(format!(
                "ring positions out of range ({avail} bytes published)"
            )));
        }
        Ok(avail as usize)
    }

    /// Waits for data after `head`; `until_closed` also ends the wait when
    /// the queue is closed.
    fn wait_data(
        &self,
        head: u64,
        deadline: Option<Instant>,
        slice: Option<Duration>,
        until_closed: bool,
    ) -> Waited {
        wait::wait_for(&self.data_signal(), deadline, slice, || {
            self.available(head).map_or(true, |a| a > 0) || (until_closed && self.is_closed())
        })
    }

    /// While a consumer waits for the rest of a streamed message: whether
    /// its producer is gone (the producer lock is free, or its owner died,
    /// and still nothing new was published).
    fn producer_gone(&self, head: u64) -> bool {
        let h = self.seg.header();
        match self.seg.lock(&h.producer_lock, Some(Instant::now())) {
            Ok(_guard) => self.available(head).is_ok_and(|a| a == 0),
            Err(_) => false,
        }
    }
}

/// Spins for [`BATCH_DELAY`] (or until `deadline`), without looking at
/// the ring; at once on a single CPU, where it would only delay the
/// producer. Whether it spun at all (not for a try, whose deadline is
/// now).
fn let_producer_ahead(deadline: Option<Instant>) -> bool {
    if !wait::multi_cpu() {
        return false;
    }
    let until = batch_delay_end(Instant::now(), deadline);
    let mut spun = false;
    while Instant::now() < until {
        spun = true;
        for _ in 0..4 {
            std::hint::spin_loop();
        }
    }
    spun
}

/// When a [`BATCH_DELAY`] started at `start` ends: never after `deadline`.
fn batch_delay_end(start: Instant, deadline: Option<Instant>) -> Instant {
    let end = start + BATCH_DELAY;
    deadline.map_or(end, |d| d.min(end))
}

/// Copies `src` (at most `dst.len()` ≤ 48 bytes) to the start of `dst`
/// with two overlapping fixed-size copies, as memcpy does inside for small
/// sizes, without calling it.
#[inline]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    debug_assert!(src.len() <= dst.len() && dst.len() <= 48);
    #[inline(always)]
    fn two<const K: usize>(dst: &mut [u8], src: &[u8]) {
        let n = src.len();
        let mut a = [0u8; K];
        let mut b = [0u8; K];
        a.copy_from_slice(&src[..K]);
        b.copy_from_slice(&src[n - K..]);
        dst[..K].copy_from_slice(&a);
        dst[n - K..n].copy_from_slice(&b);
    }
    match src.len() {
        32.. => two::<32>(dst, src),
        16.. => two::<16>(dst, src),
        8.. => two::<8>(dst, src),
        4.. => two::<4>(dst, src),
        0 => {}
        n => {
            // 1 to 3 bytes: first, middle, last.
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
    }
}

/// Copies a message's parts into the ring, fragment by fragment.
struct Writer<'a> {
    parts: &'a [&'a [u8]],
    part: usize,
    at: usize,
}

impl<'a> Writer<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        Writer {
            parts,
            part: 0,
            at: 0,
        }
    }

    /// Copies the next `dst.len()` bytes into `dst`.
    fn copy_to_slice(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() && self.part < self.parts.len() {
            let p = self.parts[self.part];
            let n = (p.len() - self.at).min(dst.len());
            let (head, rest) = dst.split_at_mut(n);
            head.copy_from_slice(&p[self.at..self.at + n]);
            dst = rest;
            self.at += n;
            if self.at == p.len() {
                self.part += 1;
                self.at = 0;
            }
        }
    }

    /// Copies the next `len` bytes into the ring at `off`.
    fn copy_into(&mut self, seg: &Segment, mut off: usize, mut len: usize) {
        while len > 0 && self.part < self.parts.len() {
            let p = self.parts[self.part];
            let n = (p.len() - self.at).min(len);
            seg.write(off, &p[self.at..self.at + n]);
            off += n;
            len -= n;
            self.at += n;
            if self.at == p.len() {
                self.part += 1;
                self.at = 0;
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_batch_delay_keeps_to_its_deadline() {
        let t = Instant::now();
        assert_eq!(batch_delay_end(t, None), t + BATCH_DELAY);
        assert_eq!(batch_delay_end(t, Some(t)), t, "a try does not delay");
        let soon = t + BATCH_DELAY / 2;
        assert_eq!(batch_delay_end(t, Some(soon)), soon);
        let later = t + BATCH_DELAY * 2;
        assert_eq!(batch_delay_end(t, Some(later)), t + BATCH_DELAY);
        let t = Instant::now();
        let spun = let_producer_ahead(None);
        if wait::multi_cpu() {
            assert!(spun && t.elapsed() >= BATCH_DELAY);
        } else {
            assert!(!spun);
        }
        // A try does not spin.
        assert!(!let_producer_ahead(Some(Instant::now())));
    }

    #[test]
    fn only_gets_that_did_not_wait_mark_a_stream() {
        let ring = Ring::new(Segment::create(1 << 16, 0).expect("segment"));
        let streaming = || ring.streaming();
        let pop = |deadline| ring.pop(deadline, |p| p.bytes.as_slice().to_vec());
        assert!(!streaming());
        for m in [&b"one"[..], b"two"] {
            assert!(ring.push(&[m], false, None).is_ok());
        }
        assert_eq!(pop(None).ok().as_deref(), Some(&b"one"[..]));
        assert!(!streaming(), "one get found without waiting is no stream");
        assert_eq!(pop(None).ok().as_deref(), Some(&b"two"[..]));
        assert!(streaming(), "two in a row are");
        // Empty: this one waits (after the delay) until its deadline.
        let t = Instant::now();
        assert!(matches!(
            pop(Some(t + Duration::from_millis(5))),
            Err(PopError::Empty)
        ));
        assert!(t.elapsed() >= Duration::from_millis(5));
        assert!(!streaming(), "a get that timed out is not streaming");
        for m in [&b"three"[..], b"four"] {
            assert!(ring.push(&[m], false, None).is_ok());
        }
        assert_eq!(pop(None).ok().as_deref(), Some(&b"three"[..]));
        assert_eq!(pop(None).ok().as_deref(), Some(&b"four"[..]));
        assert!(streaming());
        // A get that waited for its message is not either.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                assert!(ring.push(&[b"five"], false, None).is_ok());
            });
            assert_eq!(pop(None).ok().as_deref(), Some(&b"five"[..]));
        });
        assert!(!streaming(), "waited for its message");
    }

    #[test]
    fn a_streaming_consumer_leaves_the_producers_lines_alone() {
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        let mut decode = |p: Payload<'_>| p.bytes.as_slice().to_vec();
        let pop = |deadline| ring.pop(deadline, |p| p.bytes.as_slice().to_vec());
        // Ten one-byte messages: compact records of 16 bytes, eight in the
        // first 128 bytes, two in the next.
        for i in 0..10u8 {
            assert!(ring.push(&[&[i]], false, None).is_ok());
        }
        assert_eq!(pop(None).ok(), Some(vec![0]));
        assert_eq!(pop(None).ok(), Some(vec![1]));
        assert!(ring.streaming());
        // The producer's last position seen is in the next 128 bytes: the
        // records before them are taken at once.
        for i in 2..8u8 {
            assert_eq!(ring.pop_ready::<false, _>(&mut decode).ok(), Some(vec![i]));
        }
        // Now the next record is in them: the fast path leaves it...
        assert!(matches!(
            ring.pop_ready::<false, _>(&mut decode),
            Err(ConsumerLock::Taken(_))
        ));
        // ...and a get takes it after letting the producer go on (a get
        // that waited: no longer streaming), then the last one at once.
        let multi_cpu = wait::multi_cpu(); // (its first call is slow)
        let t = Instant::now();
        assert_eq!(pop(None).ok(), Some(vec![8]));
        let took = t.elapsed();
        if multi_cpu {
            assert!(took >= BATCH_DELAY, "the get let the producer go on");
        }
        assert!(!ring.streaming(), "the get waited for the producer");
        if multi_cpu {
            assert_eq!(
                ring.deferred.load(std::sync::atomic::Ordering::Relaxed),
                2,
                "the second block (the one from 128 bytes on)"
            );
        }
        assert_eq!(ring.pop_ready::<false, _>(&mut decode).ok(), Some(vec![9]));
        // Not streaming, a record in the producer's lines is taken at once.
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        assert!(ring.push(&[b"x"], false, None).is_ok());
        assert!(!ring.streaming());
        assert_eq!(
            ring.pop_ready::<false, _>(&mut decode).ok(),
            Some(b"x".to_vec())
        );
        // Once per block: a producer that stopped inside a block costs a
        // streaming consumer one delay, not one per few records.
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        let pop = |deadline| ring.pop(deadline, |p| p.bytes.as_slice().to_vec());
        for i in 0..3u8 {
            assert!(ring.push(&[&[i]], false, None).is_ok());
        }
        assert_eq!(pop(None).ok(), Some(vec![0]));
        assert_eq!(pop(None).ok(), Some(vec![1]));
        assert_eq!(pop(None).ok(), Some(vec![2]));
        assert!(!ring.streaming(), "deferred");
        if multi_cpu {
            assert_eq!(
                ring.deferred.load(std::sync::atomic::Ordering::Relaxed),
                1,
                "deferred in the first block"
            );
        }
        for i in 3..7u8 {
            assert!(ring.push(&[&[i]], false, None).is_ok());
        }
        assert_eq!(pop(None).ok(), Some(vec![3]));
        assert_eq!(pop(None).ok(), Some(vec![4]));
        assert!(ring.streaming(), "streaming again, in the same block");
        assert_eq!(ring.pop_ready::<false, _>(&mut decode).ok(), Some(vec![5]));
        // A try (deadline now) that meets the producer's lines while
        // streaming does not wait for them, and still takes the record.
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        for i in 0..3u8 {
            assert!(ring.push(&[&[i]], false, None).is_ok());
        }
        let pop = |deadline| ring.pop(deadline, |p| p.bytes.as_slice().to_vec());
        assert_eq!(pop(None).ok(), Some(vec![0]));
        assert_eq!(pop(None).ok(), Some(vec![1]));
        assert!(ring.streaming());
        assert_eq!(pop(Some(Instant::now())).ok(), Some(vec![2]));
    }

    #[test]
    fn small_records_from_registers() {
        for len in 0..=16usize {
            let payload: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37) ^ 0xA5).collect();
            let fast = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
            let bytes = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
            assert!(fast.try_write_small(&payload, FIRST | LAST));
            let tail = protocol::pos(
                fast.seg
                    .header()
                    .producer
                    .0
                    .tail
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            if len <= COMPACT_MAX {
                assert_eq!(tail, 16, "length {len}: a compact record");
            } else {
                bytes.write_small(0, len, FIRST | LAST, 0, |dst| copy_small(dst, &payload));
                let rec = HDR + round16(len);
                assert_eq!(tail, rec as u64);
                assert_eq!(
                    fast.seg.bytes(0, rec),
                    bytes.seg.bytes(0, rec),
                    "length {len}"
                );
            }
            let got = fast.pop(None, |p| p.bytes.as_slice().to_vec());
            assert_eq!(got.ok().as_deref(), Some(&payload[..]), "length {len}");
        }
        // Every length at every offset, the ring's last 16 bytes included
        // (an empty payload's record fits there alone).
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        for i in 0..2000usize {
            let payload: Vec<u8> = (0..(i % 17) as u8).map(|b| b ^ i as u8).collect();
            assert!(ring.push(&[&payload], false, None).is_ok());
            let got = ring.pop(None, |p| p.bytes.as_slice().to_vec());
            assert_eq!(got.ok().as_deref(), Some(&payload[..]), "message {i}");
        }
    }

    #[test]
    fn a_message_too_large_to_hold_is_taken_out_of_the_way() {
        // A streamed message (larger than half the ring) whose length block
        // announces more than this process can allocate, then a small one:
        // the first get says TooLarge, the next one gets the small message
        // (before, every get said TooLarge again and the queue was stuck).
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        let big = vec![7u8; 3000];
        assert!(ring.push(&[&big], false, None).is_ok());
        assert!(ring.push(&[b"next"], false, None).is_ok());
        // The first fragment's payload starts with the total length.
        ring.seg.write(HDR, &(1u64 << 62).to_le_bytes());
        let first = ring.pop(None, |p| p.bytes.as_slice().to_vec());
        assert!(matches!(
            first,
            Err(PopError::Failed(QueueError::TooLarge(_)))
        ));
        let next = ring.pop(None, |p| p.bytes.as_slice().to_vec());
        assert_eq!(next.ok().as_deref(), Some(&b"next"[..]));
        assert_eq!(ring.len(), 0);
    }

    #[test]
    fn raw_messages_on_both_paths() {
        // A byte string taken by pop_bytes (its fast path) and by pop (the
        // slow path, which also reads raw messages): the same bytes, the
        // prefix block skipped; a raw record too short to hold that block
        // is a corruption on both.
        let prefix = [0u8; 16];
        for bytes_path in [false, true] {
            let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
            let take = |ring: &Ring| {
                let decode = |p: Payload<'_>| (p.raw, p.bytes.as_slice().to_vec());
                if bytes_path {
                    ring.pop_bytes(None, decode)
                } else {
                    ring.pop(None, decode)
                }
            };
            for len in [0usize, 1, 15, 16, 100] {
                let body: Vec<u8> = (0..len as u8).collect();
                assert!(ring.push(&[&prefix, &body], true, None).is_ok());
                assert_eq!(take(&ring).ok(), Some((true, body)), "length {len}");
            }
            // By hand: a raw record of 8 bytes, at the head.
            let tail = ring
                .seg
                .header()
                .producer
                .0
                .tail
                .load(std::sync::atomic::Ordering::Relaxed);
            let off = protocol::pos(tail) as usize & (ring.cap - 1);
            ring.write_header(off, 8, FIRST | LAST | RAW, protocol::count(tail));
            protocol::commit(
                &ring.seg.header().producer.0.tail,
                protocol::pack(protocol::pos(tail) + 32, protocol::count(tail) + 1),
            );
            assert!(
                matches!(take(&ring), Err(PopError::Failed(QueueError::Corrupted(_)))),
                "bytes path {bytes_path}"
            );
        }
        // The fast path itself: raw messages for a byte-string get only.
        let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
        let mut decode = |p: Payload<'_>| (p.raw, p.bytes.as_slice().to_vec());
        assert!(ring.push(&[&prefix, b"raw"], true, None).is_ok());
        assert!(matches!(
            ring.pop_ready::<false, _>(&mut decode),
            Err(ConsumerLock::Taken(_))
        ));
        assert_eq!(
            ring.pop_ready::<true, _>(&mut decode).ok(),
            Some((true, b"raw".to_vec()))
        );
    }

    #[test]
    fn every_flipped_bit_of_a_compact_record() {
        let payload = [0x5Au8, 1, 2, 3, 4, 0xFF];
        for bit in 0..128usize {
            let ring = Ring::new(Segment::create(1 << 12, 0).expect("segment"));
            // A record with a message count other than 0, at offset 80.
            for _ in 0..5 {
                assert!(ring.push(&[&payload], false, None).is_ok());
                assert!(ring.pop(None, |_| ()).is_ok());
            }
            assert!(ring.push(&[&payload], false, None).is_ok());
            let at = 80 + bit / 8;
            let byte = ring.seg.bytes(at, 1)[0] ^ (1 << (bit % 8));
            ring.seg.write(at, &[byte]);
            let got = ring.pop(None, |p| p.bytes.as_slice().to_vec());
            if bit < 64 {
                assert!(
                    matches!(got, Err(PopError::Failed(QueueError::Corrupted(_)))),
                    "header bit {bit} went unnoticed"
                );
            } else if bit < 64 + 8 * payload.len() {
                let mut changed = payload.to_vec();
                changed[(bit - 64) / 8] ^= 1 << (bit % 8);
                assert_eq!(got.ok(), Some(changed), "payload bit {bit}");
            } else {
                // Padding after the payload: not read.
                assert_eq!(got.ok().as_deref(), Some(&payload[..]), "padding bit {bit}");
            }
        }
    }

    #[test]
    fn copy_small_copies_every_length() {
        let src: Vec<u8> = (1..=48).collect();
        for n in 0..=48 {
            let mut dst = [0xAAu8; 48];
            copy_small(&mut dst, &src[..n]);
            assert_eq!(&dst[..n], &src[..n], "length {n}");
            assert!(
                dst[n..].iter().all(|&b| b == 0xAA),
                "length {n} wrote past its end"
            );
        }
    }
}
