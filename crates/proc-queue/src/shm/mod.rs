//! Every `unsafe` block of `proc-queue`: the shared segment (a `memfd`
//! mapped `MAP_SHARED`, so a forked child shares it rather than copying it),
//! its header, the two locks and their life slots, futexes, and the raw
//! copies in and out of the ring.
//!
//! Every byte here may have been written by a crashed, buggy or hostile
//! peer: this module only hands out bounds-checked views; the ring validates
//! every length and position it reads before it asks for one.
//!
//! # The locks
//!
//! Producers share one lock, consumers another. A put or a get takes its
//! side's lock once, so the lock is on the hot path of every message. A
//! robust process-shared `pthread_mutex_t` would do (the kernel marks it
//! when its owner dies), but glibc's robust lock and unlock cost ~17 ns
//! against ~5.5 ns for a compare-and-swap and a store (the owner list
//! kept for the kernel, the pending-operation marks): a third of W2's
//! time. So the hot lock is a plain word, and the robust mutexes are kept
//! off the hot path:
//!
//! - The segment holds [`SLOTS`] *life slots*: a robust mutex and a
//!   generation each. A thread that first locks in a segment takes a free
//!   slot (its mutex, free or left by a dead owner), bumps its generation,
//!   and keeps the mutex for as long as the thread lives (or until the
//!   segment is dropped in this process). Its *tag* is the slot's number
//!   and that generation.
//! - A lock word is 0 when free, else the holder's tag, plus [`WAITERS`]
//!   while someone sleeps on it. Locking is one compare-and-swap from 0 to
//!   the tag; unlocking, one from the tag to 0 (a word that no longer
//!   holds the tag is left alone), and a futex wake-up when `WAITERS` was
//!   set.
//! - A waiter that finds the word held asks whether the holder lives: the
//!   holder's slot still has the tag's generation and its mutex is held
//!   (a `trylock` fails). A dead holder's mutex is free or marked dead by
//!   the kernel, or its slot was taken since by another thread (a new
//!   generation): the waiter takes the word over. Sleepers wake to ask
//!   again every [`CHECK_PERIOD`], doubling up to [`CHECK_PERIOD_MAX`]
//!   while one holder keeps the lock (no futex wake-up comes from a
//!   death). No pid is involved: pid reuse and pid namespaces cannot fool
//!   it. A word that holds the asker's own tag (which it does not hold)
//!   is corruption, a typed error, never taken over.
//!
//! A held robust mutex sits in its thread's robust list (glibc's, walked
//! by the kernel at the thread's exit and updated by glibc at every robust
//! lock and unlock), so a segment must stay mapped while a thread of this
//! process holds a slot in it: each held slot keeps the mapping alive
//! ([`Mapping`]), the thread lets its slots go at its exit, and a dropped
//! segment's slots are let go by the dropping thread at once and by the
//! other threads at their next registration in another segment. A thread
//! that used a queue another thread dropped, and never touches a queue
//! again, keeps its mapping until it exits. A forked child's thread holds
//! none of its parent's slots (glibc empties a child's robust list), so
//! a fork counter, bumped by a `pthread_atfork` handler registered before
//! any thread takes a slot, tells a child's copies of its parent's
//! entries apart (a child made by a raw `clone` runs no handler: it must
//! not use its parent's queues before an `exec`). When every slot but the
//! [`RESERVED`] ones is held by live threads, or a thread already holds
//! [`OWN_SLOTS_MAX`] (the kernel marks at most 2048 robust mutexes of a
//! dying thread), a thread borrows a slot for each lock it takes, once
//! the word looks free (slower, never stuck: a borrowed slot is held only
//! while its lock is), and asks for one of its own again now and then.
//!
//! As with any process-shared robust mutex, a peer that overwrites the
//! list pointers of a mutex this process holds can make glibc write
//! through them: the segment is trusted that far.

use std::cell::{Cell, RefCell, UnsafeCell};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use crate::ring::{MAX_CAPACITY, MIN_CAPACITY};

/// Identifies a `proc-queue` segment.
const MAGIC: u64 = u64::from_le_bytes(*b"procQ\0\x01\0");
/// The layout version.
const VERSION: u32 = 4;
/// Where the ring's bytes start: one page for the header.
pub(crate) const DATA_OFFSET: usize = 4096;

/// A cache-line-aligned (128 bytes: the adjacent-line prefetcher pairs
/// lines) cell, so that the producer's and the consumer's hot words never
/// share a line.
#[repr(C, align(128))]
pub(crate) struct Line<T>(pub(crate) T);

/// A lock word in the segment (see the module's notes on the locks).
#[repr(C, align(128))]
pub(crate) struct LockWord(AtomicU32);

/// How many life slots a segment holds...
pub(crate) const SLOTS: usize = 512;
/// ...of which the first few are only borrowed for one lock's hold (by
/// threads that find every other slot held).
const RESERVED: usize = 4;
/// The bytes of one slot.
const SLOT_SIZE: usize = 64;
/// The slots' bytes, after the ring's.
const SLOTS_BYTES: usize = SLOTS * SLOT_SIZE;

/// A lock word's bits: the holder's slot number plus one...
const SLOT_MASK: u32 = (1 << 10) - 1;
/// ...its slot's generation...
const GEN_SHIFT: u32 = 10;
const GEN_MASK: u32 = (1 << 21) - 1;
/// ...and whether someone sleeps on the word.
pub(crate) const WAITERS: u32 = 1 << 31;
const _: () = assert!(SLOTS <= SLOT_MASK as usize && GEN_SHIFT + 21 == 31);

/// How long a sleeper on a held lock waits before it asks again whether
/// the holder lives (a holder's death wakes nobody), at first...
const CHECK_PERIOD: Duration = if cfg!(test) {
    // Long in unit tests, so that a wake-up that failed shows.
    Duration::from_secs(2)
} else {
    Duration::from_millis(10)
};
/// ...and at most, the period doubling while one holder keeps the lock.
const CHECK_PERIOD_MAX: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_millis(80)
};

/// One life slot: a robust, process-shared mutex that its owner thread
/// holds for as long as it uses the segment, and the generation its owner
/// took it at.
#[repr(C, align(64))]
struct Slot {
    life: UnsafeCell<libc::pthread_mutex_t>,
    gen: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == SLOT_SIZE);

/// What the producers share.
#[repr(C)]
pub(crate) struct ProducerSide {
    /// Position word (see `protocol`): where the next record goes.
    pub(crate) tail: AtomicU64,
    /// The last head position a producer saw (so it rarely reads the
    /// consumers' line).
    pub(crate) cached_head: AtomicU64,
}

/// What the consumers share.
#[repr(C)]
pub(crate) struct ConsumerSide {
    /// Position word: where the next record to read starts.
    pub(crate) head: AtomicU64,
    /// The last tail position a consumer saw.
    pub(crate) cached_tail: AtomicU64,
}

/// One direction of wake-ups: the futex sequence and the sleeper count,
/// on a line of their own (the waker does a read-modify-write here on every
/// commit; sharing the line with the other direction would bounce it
/// between the producer's and the consumer's cores).
#[repr(C)]
pub(crate) struct SignalWords {
    pub(crate) seq: AtomicU32,
    pub(crate) waiters: AtomicU32,
}

/// Rarely written words.
#[repr(C)]
pub(crate) struct Misc {
    pub(crate) closed: AtomicU32,
    pub(crate) join_seq: AtomicU32,
    pub(crate) join_waiters: AtomicU32,
    /// `JoinableQueue`: how many messages were marked done (modulo 2^24).
    pub(crate) done: AtomicU32,
}

/// How many sleepers of one direction are tracked by pid (more sleep
/// untracked: counted, but not taken back if killed asleep).
pub(crate) const SLEEPER_SLOTS: usize = 32;

/// The sleepers of each direction: a pid, with `wait::REGISTERED` set while
/// it is counted in the direction's `waiters` (0: free).
#[repr(C)]
pub(crate) struct Sleepers {
    pub(crate) data: [AtomicU32; SLEEPER_SLOTS],
    pub(crate) space: [AtomicU32; SLEEPER_SLOTS],
    pub(crate) join: [AtomicU32; SLEEPER_SLOTS],
}

/// The segment header: one page before the ring bytes.
#[repr(C)]
pub(crate) struct Header {
    magic: u64,
    version: u32,
    _reserved: u32,
    capacity: u64,
    maxsize: u64,
    pub(crate) producer_lock: LockWord,
    pub(crate) consumer_lock: LockWord,
    pub(crate) producer: Line<ProducerSide>,
    pub(crate) consumer: Line<ConsumerSide>,
    /// "Data arrived": producers wake consumers.
    pub(crate) data: Line<SignalWords>,
    /// "Space freed": consumers wake producers.
    pub(crate) space: Line<SignalWords>,
    pub(crate) misc: Line<Misc>,
    pub(crate) sleepers: Line<Sleepers>,
}

const _: () = assert!(std::mem::size_of::<Header>() <= DATA_OFFSET);

/// A segment's mapping: shared by its [`Segment`] and by the life slots
/// this process's threads hold in it ([`Held`]), so that it stays mapped
/// while a robust list holds one of its mutexes.
struct Mapping {
    map: MmapRaw,
    /// Set when the segment is dropped: the threads holding a slot here
    /// let it go at their next registration or at their exit.
    retired: AtomicBool,
}

/// A mapped queue segment.
pub(crate) struct Segment {
    map: Arc<Mapping>,
    file: File,
    capacity: usize,
    maxsize: u64,
}

// SAFETY: the segment is plain shared memory; every access to it goes
// through atomics, the robust mutexes, or copies whose exclusivity the ring
// protocol guarantees (the lock-holding side owns the bytes it touches).
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a segment with a ring of `capacity` bytes (a power of two,
    /// a multiple of the page size) and the given message bound.
    pub(crate) fn create(capacity: usize, maxsize: u64) -> io::Result<Segment> {
        // SAFETY: the name is a valid C string; MFD_CLOEXEC is a valid flag.
        let fd = unsafe { libc::memfd_create(c"proc-queue".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a fresh descriptor nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len((DATA_OFFSET + capacity + SLOTS_BYTES) as u64)?;
        let map = MmapRaw::map_raw(&file)?;
        let segment = Segment {
            map: Arc::new(Mapping {
                map,
                retired: AtomicBool::new(false),
            }),
            file,
            capacity,
            maxsize,
        };
        // SAFETY: the mapping is fresh, private to this process until the
        // segment is shared, page-aligned and at least a page long, so it
        // holds a Header; the memfd starts zeroed, which is a valid state for
        // every atomic in it.
        unsafe { segment.write_header() };
        for i in 0..SLOTS {
            // SAFETY: slot `i` lies inside the mapping (it is DATA_OFFSET +
            // capacity + SLOTS_BYTES long); nobody else sees the segment yet.
            unsafe { init_robust_mutex(segment.slot(i).life.get())? };
        }
        Ok(segment)
    }

    /// Puts the header back as [`create`](Segment::create) made it (no
    /// message, not closed, nobody registered, locks free); the ring's
    /// bytes stay (positions at 0 make them unread), and so do the life
    /// slots (this process's threads may hold theirs). For a segment that
    /// no other process uses any more, nor another mapping of it in this
    /// one: the caller's contract (`&mut` rules out other handles of this
    /// `Segment`).
    pub(crate) fn reset(&mut self) {
        // SAFETY: the mapping holds a Header (checked at create/open) and
        // `&mut self` means no other handle of this process touches it; no
        // other process does (this function's contract). All-zero is the
        // state `create` starts from (the memfd starts zeroed).
        unsafe {
            std::ptr::write_bytes(self.base(), 0, std::mem::size_of::<Header>());
            self.write_header();
        }
    }

    /// Writes what a new header holds over an all-zero one: identity and
    /// sizes.
    ///
    /// # Safety
    ///
    /// The header is all zeroes and nothing else uses it meanwhile.
    unsafe fn write_header(&self) {
        let header = self.base().cast::<Header>();
        // SAFETY: the mapping holds a Header; exclusive per the contract.
        unsafe {
            std::ptr::addr_of_mut!((*header).magic).write(MAGIC);
            std::ptr::addr_of_mut!((*header).version).write(VERSION);
            std::ptr::addr_of_mut!((*header).capacity).write(self.capacity as u64);
            std::ptr::addr_of_mut!((*header).maxsize).write(self.maxsize);
        }
    }

    /// Maps an existing segment from its file (a descriptor received from
    /// another process), validating its header.
    pub(crate) fn open(file: File) -> io::Result<Segment> {
        let len = file.metadata()?.len();
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if len < DATA_OFFSET as u64 {
            return Err(bad("queue segment shorter than its header"));
        }
        let map = MmapRaw::map_raw(&file)?;
        let header = map.as_ptr().cast::<Header>();
        // SAFETY: the mapping is at least a page long (checked above) and
        // page-aligned; these fields are plain integers written once at
        // creation; a torn or hostile value is harmless, it is validated
        // below before anything depends on it.
        let (magic, version, capacity, maxsize) = unsafe {
            (
                std::ptr::addr_of!((*header).magic).read_volatile(),
                std::ptr::addr_of!((*header).version).read_volatile(),
                std::ptr::addr_of!((*header).capacity).read_volatile(),
                std::ptr::addr_of!((*header).maxsize).read_volatile(),
            )
        };
        if magic != MAGIC || version != VERSION {
            return Err(bad("not a proc-queue segment of this version"));
        }
        let fits = capacity
            .checked_add((DATA_OFFSET + SLOTS_BYTES) as u64)
            .is_some_and(|n| n == len);
        let sized = (MIN_CAPACITY as u64..=MAX_CAPACITY as u64).contains(&capacity);
        if !capacity.is_power_of_two() || !fits || !sized {
            return Err(bad("queue segment capacity does not match its size"));
        }
        Ok(Segment {
            map: Arc::new(Mapping {
                map,
                retired: AtomicBool::new(false),
            }),
            file,
            capacity: capacity as usize,
            maxsize,
        })
    }

    /// Where the mapping starts.
    #[inline]
    fn base(&self) -> *mut u8 {
        self.map.map.as_mut_ptr()
    }

    /// The ring's size in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The message bound (0: none).
    pub(crate) fn maxsize(&self) -> u64 {
        self.maxsize
    }

    /// The segment's file descriptor (for passing to another process).
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The segment's file, borrowed.
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.file.as_fd()
    }

    /// The shared header.
    #[inline]
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header (created or validated);
        // its mutable parts are atomics and UnsafeCells, so a shared
        // reference is sound while peers change them.
        unsafe { &*self.base().cast::<Header>() }
    }

    #[inline]
    fn data(&self) -> *mut u8 {
        // SAFETY: DATA_OFFSET is inside the mapping (it is DATA_OFFSET +
        // capacity bytes long).
        unsafe { self.base().add(DATA_OFFSET) }
    }

    #[inline]
    fn check(&self, offset: usize, len: usize) {
        // The ring computes offsets from validated positions; a failure here
        // is a bug in this crate, never a peer's doing.
        assert!(
            offset <= self.capacity && len <= self.capacity - offset,
            "ring access out of bounds"
        );
    }

    /// Asks the CPU to fetch the ring's cache line at `offset` for
    /// writing (a hint: nothing happens where the CPU has no such
    /// prefetch, and a line is only moved, never changed).
    #[inline]
    pub(crate) fn prefetch_for_write(&self, offset: usize) {
        self.check(offset, 1);
        #[cfg(target_arch = "x86_64")]
        if has_prefetchw() {
            // SAFETY: in bounds (checked); the CPU has the instruction
            // (asked above); a prefetch reads nothing into the program and
            // writes nothing: it cannot fault or change memory.
            // (`_mm_prefetch` with `_MM_HINT_ET0` emits a read prefetch
            // unless the crate is built for `prfchw`.)
            unsafe {
                std::arch::asm!(
                    "prefetchw [{}]",
                    in(reg) self.data().add(offset),
                    options(nostack, preserves_flags, readonly)
                );
            }
        }
    }

    /// Copies `bytes` into the ring at `offset`.
    #[inline]
    pub(crate) fn write(&self, offset: usize, bytes: &[u8]) {
        self.check(offset, bytes.len());
        // SAFETY: in bounds (checked); the caller holds the producer lock
        // and writes only between tail and head, bytes no consumer reads.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data().add(offset), bytes.len())
        };
    }

    /// Writes `words`, little-endian, into the ring at `offset`: a record
    /// assembled in registers goes out with word stores (no copy through
    /// a stack buffer, whose byte stores a wide load would have to wait
    /// for).
    #[inline]
    pub(crate) fn write_words<const N: usize>(&self, offset: usize, words: [u64; N]) {
        self.check(offset, N * 8);
        let dst = self.data();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: in bounds (checked); as for `write`, the caller holds
            // the producer lock and writes where no consumer reads.
            unsafe { std::ptr::write_unaligned(dst.add(offset + i * 8).cast::<u64>(), w.to_le()) };
        }
    }

    /// Reads one little-endian `u64` from the ring at `offset`.
    #[inline]
    pub(crate) fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        // SAFETY: in bounds (checked); an unaligned volatile read of plain
        // bytes: a peer writing concurrently can only make the value wrong,
        // which the ring validates.
        let v = unsafe { self.data().add(offset).cast::<u64>().read_unaligned() };
        u64::from_le(v)
    }

    /// A view of `len` ring bytes at `offset`.
    ///
    /// The bytes are published and, by protocol, no producer writes them
    /// until the consumer holding the lock moves past them.
    #[inline]
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        self.check(offset, len);
        // SAFETY: in bounds (checked); the caller holds the consumer lock
        // and the bytes lie between head and tail, which producers leave
        // alone. A peer that breaks the protocol can change what is read,
        // not where: the view stays inside the mapping.
        unsafe { std::slice::from_raw_parts(self.data().add(offset), len) }
    }
}

/// Initialises a robust, process-shared mutex in place.
///
/// # Safety
///
/// `m` points to writable memory for a `pthread_mutex_t` that no other
/// process or thread uses yet.
unsafe fn init_robust_mutex(m: *mut libc::pthread_mutex_t) -> io::Result<()> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
    // SAFETY: attr is valid storage; the calls follow POSIX's order
    // (init, set, use, destroy); `m` is valid per this function's contract.
    unsafe {
        check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
        let r = (|| {
            check(libc::pthread_mutexattr_setpshared(
                attr.as_mut_ptr(),
                libc::PTHREAD_PROCESS_SHARED,
            ))?;
            check(libc::pthread_mutexattr_setrobust(
                attr.as_mut_ptr(),
                libc::PTHREAD_MUTEX_ROBUST,
            ))?;
            check(libc::pthread_mutex_init(m, attr.as_ptr()))
        })();
        libc::pthread_mutexattr_destroy(attr.as_mut_ptr());
        r
    }
}

fn check(code: libc::c_int) -> io::Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code))
    }
}

impl Slot {
    /// Tries to take the slot's mutex: `Ok(true)` when taken (it was free,
    /// or its owner died: made consistent again), `Ok(false)` when a live
    /// thread holds it.
    fn take(&self) -> io::Result<bool> {
        // SAFETY: slots are initialised as robust, shared mutexes when the
        // segment is created; a peer's garbage in one gives an error code.
        match unsafe { libc::pthread_mutex_trylock(self.life.get()) } {
            0 => Ok(true),
            libc::EBUSY => Ok(false),
            libc::EOWNERDEAD => {
                // SAFETY: this thread holds the mutex now; marking it
                // consistent is what EOWNERDEAD asks of the new owner.
                let r = unsafe { libc::pthread_mutex_consistent(self.life.get()) };
                if r != 0 {
                    self.release();
                    return Err(io::Error::from_raw_os_error(r));
                }
                Ok(true)
            }
            code => Err(io::Error::from_raw_os_error(code)),
        }
    }

    /// Lets the slot's mutex go (this thread took it).
    fn release(&self) {
        // SAFETY: as in `take`; this thread holds the mutex.
        unsafe { libc::pthread_mutex_unlock(self.life.get()) };
    }

    /// The slot's current generation.
    fn gen(&self) -> u32 {
        self.gen.load(Ordering::Acquire) & GEN_MASK
    }
}

/// A life slot this thread holds (or, with no slot, a note that it found
/// every slot held, or holds as many as it may: it borrows one per lock).
struct Held {
    map: Arc<Mapping>,
    /// The slot, inside `map`'s mapping, which `map` keeps mapped.
    slot: Option<*const Slot>,
    tag: u32,
    /// [`FORKS`] when the slot was taken: a child's copy of its parent's
    /// entry has an older count, and holds nothing.
    forks: u64,
    /// Locks taken without a slot since the last try for one.
    misses: u32,
}

impl Drop for Held {
    fn drop(&mut self) {
        let map = Arc::as_ptr(&self.map) as usize;
        for entry in [&LAST, &BEFORE] {
            let _ = entry.try_with(|entry| {
                if entry.get().0 == map {
                    entry.set((0, 0, 0));
                }
            });
        }
        if let Some(slot) = self.slot {
            if self.forks == FORKS.load(Ordering::Relaxed) {
                // SAFETY: the slot lies in `self.map`'s mapping, still
                // mapped (the Arc is dropped after this); this thread took
                // it (same fork count: same process).
                unsafe { (*slot).release() };
            }
        }
    }
}

thread_local! {
    /// The life slots this thread holds, one per segment it locked in.
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
    /// The last of them used, for `lock`'s fast path: the mapping's
    /// address (0: none), the tag, [`FORKS`] when it was taken. Cleared
    /// when its entry goes (so the address, kept mapped by the entry
    /// meanwhile, cannot name another mapping). Plain data without a
    /// destructor: a cheap access, valid while other thread-locals are
    /// destroyed.
    static LAST: Cell<(usize, u32, u64)> = const { Cell::new((0, 0, 0)) };
    /// The one used before `LAST` (another segment), kept the same way: a
    /// thread that takes from one queue and puts to another (a pool's
    /// worker, a request/reply loop) finds both at hand.
    static BEFORE: Cell<(usize, u32, u64)> = const { Cell::new((0, 0, 0)) };
}

/// How many slots of its own a thread holds at most: the kernel walks at
/// most 2048 entries of a thread's robust list when it dies (glibc's own
/// robust mutexes need room too).
const OWN_SLOTS_MAX: usize = 1024;
/// How many locks a thread without a slot of its own in a segment takes
/// (borrowing) before it asks for one again.
const RETRY_AFTER: u32 = 1024;

/// How many forks this process descends through (see [`Held::forks`]).
static FORKS: AtomicU64 = AtomicU64::new(0);

/// Whether [`forked`] is registered with `pthread_atfork`: [`AT_FORK_DONE`],
/// [`AT_FORK_FAILED`], 0 (not yet), or the pid of the process registering
/// it now.
static AT_FORK: AtomicU32 = AtomicU32::new(0);
const AT_FORK_DONE: u32 = u32::MAX;
const AT_FORK_FAILED: u32 = u32::MAX - 1;

/// Runs in the child of every `fork` (a `pthread_atfork` handler): only
/// an atomic increment, which is async-signal-safe.
extern "C" fn forked() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Whether the fork handler is registered, registering it first if need
/// be. No thread holds a slot of its own before it is: a slot taken before
/// would be shared, unnoticed, by a child forked meanwhile.
fn fork_handler_registered() -> bool {
    let me = std::process::id();
    let mut waited = 0u32;
    loop {
        match AT_FORK.load(Ordering::Acquire) {
            AT_FORK_DONE => return true,
            AT_FORK_FAILED => return false,
            // Another thread of this process registers it now: wait for
            // it, a while. (The mark could also be a parent's, from a
            // fork while it registered, inherited by a process whose pid
            // is that parent's again. Registering twice is harmless: the
            // counter is only compared for equality.)
            state if state == me && waited < 10_000 => {
                waited += 1;
                std::thread::yield_now();
            }
            // Not yet, or a parent's mark from a fork while it registered
            // (its thread is not here to finish): this thread registers.
            state => {
                if AT_FORK
                    .compare_exchange(state, me, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // SAFETY: `forked` is an `extern "C" fn()` that only
                    // does an atomic increment, valid in a fork's child.
                    let r = unsafe { libc::pthread_atfork(None, None, Some(forked)) };
                    let done = if r == 0 { AT_FORK_DONE } else { AT_FORK_FAILED };
                    AT_FORK.store(done, Ordering::Release);
                    return r == 0;
                }
            }
        }
    }
}

/// Why a lock was not taken.
pub(crate) enum LockError {
    /// The deadline passed (or, for a try, the lock is held).
    Busy,
    /// The lock is unusable (its word names no life slot, or this thread's
    /// own though it does not hold it: corrupted bytes; or a slot's mutex
    /// that glibc refuses).
    Broken(io::Error),
}

/// A held lock; unlocks on drop.
///
/// When the previous holder died holding it, `lock` took the word over:
/// the ring needs no repair, because its state only changes at
/// single-word commits.
pub(crate) struct Guard<'a> {
    word: &'a AtomicU32,
    /// The tag this hold put in the word.
    me: u32,
    /// [`FORKS`] when it was taken: a fork's child (a fork from code run
    /// under the lock) does not release its parent's hold.
    forks: u64,
    /// A slot borrowed for this hold.
    borrowed: Option<&'a Slot>,
}

/// Whether a lock word's holder lives.
enum Holder {
    Alive,
    Gone,
    Corrupt(io::Error),
}

/// How a locker names itself in the word.
#[derive(Clone, Copy)]
enum Me {
    /// By its own slot's tag (and [`FORKS`] when it was looked up: the
    /// guard's, so that a fork between two reads cannot split them).
    Own(u32, u64),
    /// By a slot borrowed for the hold, taken only once the word looks
    /// free (so a borrowed slot is held only while its lock is).
    Borrowing,
}

/// How many times `lock` re-tries a held lock before it sleeps in the
/// kernel...
const SPIN_TRIES: usize = 64;
/// ...spinning between the first tries, yielding the CPU between the
/// others: with more processes than CPUs (W7: six on two) the holder is
/// often preempted, and spinning only delays it further; yielding lets it
/// (or other work) run. Measured on the bench card's W7 (4 producers, 2
/// consumers, 2 vCPUs), medians of 8 alternated runs: spinning throughout
/// 6.8 M msg/s; yielding after 1 try 8.3 M, after 2 tries 9.2 M, after 4
/// 8.5 M, after 32 8.0 M.
const SPIN_BEFORE_YIELD: usize = 2;

impl Segment {
    /// Life slot `i` (below [`SLOTS`]).
    fn slot(&self, i: usize) -> &Slot {
        assert!(i < SLOTS, "life slot out of range");
        // SAFETY: the slots follow the ring's bytes, inside the mapping
        // (its length was set or checked to hold them); each is 64-byte
        // aligned (the mapping is page-aligned, DATA_OFFSET and capacity
        // are multiples of a page); their mutable parts are an UnsafeCell
        // and an atomic, so a shared reference is sound while peers use
        // them.
        unsafe {
            &*self
                .base()
                .add(DATA_OFFSET + self.capacity + i * SLOT_SIZE)
                .cast::<Slot>()
        }
    }

    /// Takes the first slot of `range` that is free (or whose owner
    /// died), bumping its generation: the slot and the tag it gives.
    fn claim(&self, range: Range<usize>) -> Option<(&Slot, u32)> {
        range.into_iter().find_map(|i| {
            let slot = self.slot(i);
            // A slot that glibc refuses (corrupted) is passed over.
            if !matches!(slot.take(), Ok(true)) {
                return None;
            }
            let gen = slot.gen.fetch_add(1, Ordering::AcqRel).wrapping_add(1) & GEN_MASK;
            Some((slot, (i as u32 + 1) | (gen << GEN_SHIFT)))
        })
    }

    /// How this thread names itself in this segment's lock words, taking
    /// a life slot at its first lock here.
    #[inline]
    fn me(&self) -> Me {
        let forks = FORKS.load(Ordering::Relaxed);
        HELD.try_with(|held| {
            let Ok(mut held) = held.try_borrow_mut() else {
                return Me::Borrowing;
            };
            match held
                .iter_mut()
                .find(|h| Arc::ptr_eq(&h.map, &self.map) && h.forks == forks)
            {
                Some(h) if h.slot.is_some() => Me::Own(h.tag, forks),
                Some(h) => {
                    h.misses += 1;
                    if h.misses < RETRY_AFTER {
                        return Me::Borrowing;
                    }
                    held.retain(|h| !(Arc::ptr_eq(&h.map, &self.map) && h.forks == forks));
                    self.register(&mut held, forks)
                }
                None => self.register(&mut held, forks),
            }
        })
        .unwrap_or(Me::Borrowing)
    }

    /// [`me`](Segment::me) without an entry for this segment: drops the
    /// entries a fork left (a child holds none of its parent's slots) and
    /// those of dropped segments, then takes a slot.
    #[cold]
    fn register(&self, held: &mut Vec<Held>, forks: u64) -> Me {
        held.retain(|h| h.forks == forks && !h.map.retired.load(Ordering::Acquire));
        let own = held.iter().filter(|h| h.slot.is_some()).count();
        let claimed = if own < OWN_SLOTS_MAX && fork_handler_registered() {
            self.claim(RESERVED..SLOTS)
        } else {
            None
        };
        held.push(Held {
            map: Arc::clone(&self.map),
            slot: claimed.map(|(slot, _)| slot as *const Slot),
            tag: claimed.map_or(0, |(_, tag)| tag),
            forks,
            misses: 0,
        });
        match claimed {
            Some((_, tag)) => Me::Own(tag, forks),
            None => Me::Borrowing,
        }
    }

    /// Locks `word`, waiting until `deadline` (`None`: forever,
    /// `Some(now)`: try).
    ///
    /// A held lock is usually released within a few hundred nanoseconds
    /// (a critical section is one record), so a held lock is re-tried,
    /// spinning briefly and then yielding the CPU, before the waiter sleeps
    /// in the kernel.
    #[inline(always)]
    pub(crate) fn lock<'a>(
        &'a self,
        word: &'a LockWord,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        match self.lock_fast(word) {
            Some(guard) => Ok(guard),
            None => self.lock_slow(&word.0, deadline),
        }
    }

    /// The common case of [`lock`](Segment::lock): the word is free and
    /// this segment is one of the last two this thread locked in (its tag
    /// at hand). `None` otherwise; nothing was taken then.
    #[inline(always)]
    pub(crate) fn lock_fast<'a>(&'a self, word: &'a LockWord) -> Option<Guard<'a>> {
        let forks = FORKS.load(Ordering::Relaxed);
        let this = Arc::as_ptr(&self.map) as usize;
        let (map, tag, at) = LAST.get();
        if map == this && at == forks {
            return Guard::acquire(&word.0, 0, tag, 0, forks, None);
        }
        let (map, tag, at) = BEFORE.get();
        if map == this && at == forks {
            return Guard::acquire(&word.0, 0, tag, 0, forks, None);
        }
        None
    }

    /// [`lock`](Segment::lock) after its [`lock_fast`](Segment::lock_fast)
    /// failed (no second try of the same compare-and-swap).
    pub(crate) fn lock_after_fast<'a>(
        &'a self,
        word: &'a LockWord,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        self.lock_slow(&word.0, deadline)
    }

    /// [`lock`](Segment::lock) when this segment is neither of the last
    /// two this thread locked in, or the word is held.
    #[inline(never)]
    fn lock_slow<'a>(
        &'a self,
        word: &'a AtomicU32,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        let me = self.me();
        if let Me::Own(tag, forks) = me {
            let this = Arc::as_ptr(&self.map) as usize;
            let last = LAST.get();
            if last.0 != this {
                BEFORE.set(last);
            }
            LAST.set((this, tag, forks));
            if let Some(guard) = Guard::acquire(word, 0, tag, 0, forks, None) {
                return Ok(guard);
            }
        }
        self.lock_contended(word, me, deadline)
    }

    /// Sets `word` from `from` to this locker's tag plus `bits`: the guard,
    /// or `None` when the word changed meanwhile (or no slot could be
    /// borrowed).
    fn take<'a>(
        &'a self,
        word: &'a AtomicU32,
        me: Me,
        from: u32,
        bits: u32,
        attempts: usize,
    ) -> Option<Guard<'a>> {
        let (tag, forks, borrowed) = match me {
            Me::Own(tag, forks) => (tag, forks, None),
            Me::Borrowing => {
                // A slot may be free again in a moment (another borrower
                // between its claim and its release).
                let (slot, tag) = (0..attempts).find_map(|attempt| {
                    if attempt > 0 {
                        std::thread::yield_now();
                    }
                    self.claim(0..RESERVED)
                        .or_else(|| self.claim(RESERVED..SLOTS))
                })?;
                (tag, FORKS.load(Ordering::Relaxed), Some(slot))
            }
        };
        let guard = Guard::acquire(word, from, tag, bits, forks, borrowed);
        if guard.is_none() {
            if let Some(slot) = borrowed {
                slot.release();
            }
        }
        guard
    }

    /// [`lock`](Segment::lock) once the word was found held (or the locker
    /// has no slot of its own).
    #[cold]
    fn lock_contended<'a>(
        &'a self,
        word: &'a AtomicU32,
        me: Me,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        for tries in 0..SPIN_TRIES {
            let v = word.load(Ordering::Relaxed);
            if v == 0 {
                if let Some(guard) = self.take(word, me, 0, 0, 1) {
                    return Ok(guard);
                }
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                // A try, or the deadline passed: the lock is still taken
                // from a holder that is gone.
                return match self.holder(v, me) {
                    Holder::Gone => self
                        .take(word, me, v, v & WAITERS, 4)
                        .ok_or(LockError::Busy),
                    Holder::Corrupt(e) => Err(LockError::Broken(e)),
                    Holder::Alive => Err(LockError::Busy),
                };
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(LockError::Busy);
            }
            if tries < SPIN_BEFORE_YIELD {
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        // The period of the holder checks grows while one holder keeps the
        // lock (a put waiting for room holds it), so that sleepers behind a
        // long hold cost little; it starts again for each new holder.
        let mut period = (CHECK_PERIOD, 0);
        let mut slept = false;
        loop {
            let v = word.load(Ordering::Relaxed);
            // Free, or its holder gone: taken, unless another locker came
            // first (again at once) or no slot could be borrowed (after a
            // short wait, below).
            let takeable = if v == 0 {
                true
            } else {
                match self.holder(v, me) {
                    Holder::Gone => true,
                    Holder::Corrupt(e) => return Err(LockError::Broken(e)),
                    Holder::Alive => false,
                }
            };
            if takeable {
                // Others may sleep behind a free word: wake one at the
                // unlock.
                let bits = if v == 0 { WAITERS } else { v & WAITERS };
                if let Some(guard) = self.take(word, me, v, bits, 4) {
                    return Ok(guard);
                }
                if matches!(me, Me::Own(..)) || word.load(Ordering::Relaxed) != v {
                    continue;
                }
            }
            let holder = v & !WAITERS;
            let mut wait = if period.1 == holder {
                period.0
            } else {
                CHECK_PERIOD
            };
            period = (wait.saturating_mul(2).min(CHECK_PERIOD_MAX), holder);
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    if slept {
                        // This sleeper may have taken the unlock's wake-up:
                        // pass it on.
                        futex_wake_one(word);
                    }
                    return Err(LockError::Busy);
                }
                wait = wait.min(d - now);
            }
            if takeable {
                // Free (or its holder gone), but every slot is held: none
                // to borrow. Wait a little, passing on a wake-up this
                // sleeper may have taken (others can use the free word).
                if std::mem::take(&mut slept) {
                    futex_wake_one(word);
                }
                std::thread::sleep(wait.min(Duration::from_millis(1)));
                continue;
            }
            if v & WAITERS == 0
                && word
                    .compare_exchange(v, v | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            futex_wait(word, v | WAITERS, Some(wait));
            slept = true;
        }
    }

    /// Whether the holder of a lock word `v` lives (see the module's notes).
    fn holder(&self, v: u32, me: Me) -> Holder {
        let tag = v & !WAITERS;
        if matches!(me, Me::Own(mine, _) if mine == tag) {
            // This thread's own tag, though it does not hold the lock (no
            // call here takes a lock it holds): bytes written by someone
            // else — or a child forked in a way that ran no fork handler
            // (a raw `clone`), sharing its parent's slot. Taking the lock
            // over could let two holders in.
            return Holder::Corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lock word {v:#x} holds this thread's own tag"),
            ));
        }
        let number = (tag & SLOT_MASK) as usize;
        if number == 0 || number > SLOTS {
            return Holder::Corrupt(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lock word {v:#x} names no life slot"),
            ));
        }
        let slot = self.slot(number - 1);
        let gen = tag >> GEN_SHIFT;
        if slot.gen() != gen {
            // The slot was taken again since: its holder of then is gone.
            return Holder::Gone;
        }
        match slot.take() {
            Ok(true) => {
                slot.release();
                Holder::Gone
            }
            // Held: by the holder, or by a thread taking the slot anew
            // that has not bumped its generation yet.
            Ok(false) if slot.gen() == gen => Holder::Alive,
            Ok(false) => Holder::Gone,
            Err(e) => Holder::Corrupt(e),
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        self.map.retired.store(true, Ordering::Release);
        // This thread lets its slot here go now; the others at their next
        // registration or their exit.
        let _ = HELD.try_with(|held| {
            if let Ok(mut held) = held.try_borrow_mut() {
                held.retain(|h| !Arc::ptr_eq(&h.map, &self.map));
            }
        });
    }
}

impl<'a> Guard<'a> {
    /// Sets `word` from `from` to `tag` plus `bits`: the hold, or `None`
    /// when the word changed meanwhile (a borrowed slot stays the
    /// caller's to let go then).
    #[inline(always)]
    fn acquire(
        word: &'a AtomicU32,
        from: u32,
        tag: u32,
        bits: u32,
        forks: u64,
        borrowed: Option<&'a Slot>,
    ) -> Option<Guard<'a>> {
        word.compare_exchange(from, tag | bits, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| Guard {
                word,
                me: tag,
                forks,
                borrowed,
            })
    }
}

impl Drop for Guard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.forks == FORKS.load(Ordering::Relaxed) {
            // Only a word that still holds this hold's tag: one taken over
            // meanwhile (this holder was taken for dead) is left alone.
            let mut expected = self.me;
            loop {
                match self
                    .word
                    .compare_exchange(expected, 0, Ordering::Release, Ordering::Relaxed)
                {
                    Ok(v) => {
                        if v & WAITERS != 0 {
                            futex_wake_one(self.word);
                        }
                        break;
                    }
                    Err(now) if now & !WAITERS == self.me => expected = now,
                    Err(_) => break,
                }
            }
            if let Some(slot) = self.borrowed {
                slot.release();
            }
        }
    }
}

/// Whether this CPU reports `prefetchw` (CPUID 0x8000_0001, ECX bit 8:
/// AMD's CPUs, Intel's since Broadwell; one that runs it without reporting
/// it goes without the prefetch), asked once.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_prefetchw() -> bool {
    match PREFETCHW.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => ask_prefetchw(),
    }
}

/// [`has_prefetchw`]'s answer: 0 not asked yet, 1 no, 2 yes.
#[cfg(target_arch = "x86_64")]
static PREFETCHW: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Asks the CPU, for [`has_prefetchw`] (out of line: once per process).
#[cfg(target_arch = "x86_64")]
#[cold]
#[inline(never)]
fn ask_prefetchw() -> bool {
    use std::arch::x86_64::__cpuid;
    // SAFETY: `cpuid` exists on every x86-64 CPU and only reads
    // identification registers; the extended leaf is asked only if the CPU
    // reports it. (`__cpuid` is a safe function in recent Rust releases,
    // an unsafe one in older ones.)
    #[allow(unused_unsafe)]
    let yes = unsafe {
        __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
    };
    PREFETCHW.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
    yes
}

/// Sleeps while `*word == expected`, for at most `timeout` (shared futex:
/// works across processes mapping the same file).
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a valid, aligned u32 for the call; FUTEX_WAIT reads
    // it and sleeps; the timeout pointer is null or valid. Errors (EAGAIN:
    // the value changed; EINTR; ETIMEDOUT) all mean "re-check".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
        );
    }
}

/// Wakes one sleeper on `word`.
fn futex_wake_one(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE only reads its address.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1) };
}

/// Wakes every sleeper on `word`; how many were asleep there.
pub(crate) fn futex_wake_all(word: &AtomicU32) -> usize {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE only reads its address.
    let woken =
        unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
    usize::try_from(woken).unwrap_or(0)
}

/// This process's id.
pub(crate) fn pid() -> u32 {
    std::process::id()
}

/// Whether process `pid` is gone (a zombie still counts as there until
/// it is reaped). A pid from another pid namespace reads as gone; see
/// `wait` for why that stays harmless.
pub(crate) fn process_gone(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return true;
    };
    // SAFETY: signal 0 only checks that the process exists; no memory is
    // involved.
    let r = unsafe { libc::kill(raw, 0) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{mpsc, Barrier};

    fn segment() -> Arc<Segment> {
        Arc::new(Segment::create(crate::ring::MIN_CAPACITY, 0).expect("segment"))
    }

    #[test]
    fn a_prefetch_changes_no_byte() {
        let seg = segment();
        let cap = seg.capacity();
        let pattern: Vec<u8> = (0..cap).map(|i| (i * 7 + 3) as u8).collect();
        seg.write(0, &pattern);
        for off in (0..cap).step_by(8) {
            seg.prefetch_for_write(off);
        }
        assert_eq!(seg.bytes(0, cap), &pattern[..]);
    }

    /// Slot `i`'s mutex as a trylock finds it: 0 (free), EOWNERDEAD (its
    /// owner died holding it) or EBUSY (a live owner); put back free when
    /// the try took it.
    fn state(seg: &Segment, i: usize) -> libc::c_int {
        let m = seg.slot(i).life.get();
        // SAFETY: an initialised robust mutex of the segment; taken and
        // released by this thread.
        unsafe {
            let code = libc::pthread_mutex_trylock(m);
            if code == libc::EOWNERDEAD {
                libc::pthread_mutex_consistent(m);
            }
            if code == 0 || code == libc::EOWNERDEAD {
                libc::pthread_mutex_unlock(m);
            }
            code
        }
    }

    fn lock_in_a_thread(
        seg: &Arc<Segment>,
        done: mpsc::Receiver<()>,
    ) -> std::thread::JoinHandle<()> {
        let (locked, ok) = mpsc::channel();
        let seg = Arc::clone(seg);
        let t = std::thread::spawn(move || {
            let _g = seg
                .lock(&seg.header().producer_lock, None)
                .ok()
                .expect("lock");
            locked.send(()).expect("send");
            done.recv().expect("recv");
        });
        ok.recv().expect("recv");
        t
    }

    #[test]
    fn a_thread_holds_its_slot_until_it_exits() {
        let seg = segment();
        let (done, rx) = mpsc::channel();
        let t = lock_in_a_thread(&seg, rx);
        assert_eq!(
            state(&seg, RESERVED),
            libc::EBUSY,
            "the thread's slot is not held"
        );
        done.send(()).expect("send");
        t.join().expect("join");
        assert_eq!(seg.header().producer_lock.0.load(Ordering::Relaxed), 0);
        // Let go by the thread, not marked dead by the kernel.
        assert_eq!(state(&seg, RESERVED), 0);
    }

    #[test]
    fn with_every_slot_held_threads_borrow_one_per_hold() {
        // More threads than slots, all alive at once. Each takes the
        // consumer lock and, under it, tries the producer lock (free: only
        // taken under the consumer lock): the locks stay exclusive, the
        // threads left without a slot of their own borrow one per hold,
        // and a borrower never waits holding one (the try under the
        // consumer lock always finds one to borrow).
        let seg = segment();
        let n = SLOTS - RESERVED + 8;
        let barrier = Arc::new(Barrier::new(n));
        let inside = Arc::new(AtomicU32::new(0));
        // Failures are counted, not asserted in the threads: a thread that
        // panicked would leave the others at the barrier for ever.
        let (two_holders, no_producer_lock) =
            (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (done, ended) = mpsc::channel();
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (seg, barrier, inside) =
                    (Arc::clone(&seg), Arc::clone(&barrier), Arc::clone(&inside));
                let done = done.clone();
                let (two_holders, no_producer_lock) =
                    (Arc::clone(&two_holders), Arc::clone(&no_producer_lock));
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let hold = || {
                            let h = seg.header();
                            let Ok(g) = seg.lock(&h.consumer_lock, None) else {
                                two_holders.fetch_add(1, Ordering::SeqCst);
                                return;
                            };
                            if inside.swap(1, Ordering::SeqCst) != 0 {
                                two_holders.fetch_add(1, Ordering::SeqCst);
                            }
                            let p = seg.lock(&h.producer_lock, Some(Instant::now()));
                            if p.is_err() {
                                no_producer_lock.fetch_add(1, Ordering::SeqCst);
                            }
                            std::thread::yield_now();
                            inside.store(0, Ordering::SeqCst);
                            drop(p);
                            drop(g);
                        };
                        hold();
                        barrier.wait();
                        for _ in 0..20 {
                            hold();
                        }
                        let own = matches!(seg.me(), Me::Own(..));
                        barrier.wait();
                        let _ = done.send(());
                        own
                    })
                    .expect("spawn")
            })
            .collect();
        // A deadline: locks that could never be taken would hang here.
        for _ in 0..n {
            ended
                .recv_timeout(Duration::from_secs(60))
                .expect("the threads are stuck");
        }
        let own = threads
            .into_iter()
            .map(|t| t.join().expect("join"))
            .filter(|&own| own)
            .count();
        assert_eq!(two_holders.load(Ordering::SeqCst), 0, "two holders at once");
        assert_eq!(
            no_producer_lock.load(Ordering::SeqCst),
            0,
            "a try for the free producer lock failed"
        );
        assert_eq!(own, SLOTS - RESERVED);
        assert!(
            (0..SLOTS).all(|i| state(&seg, i) == 0),
            "a slot outlived its thread"
        );
    }

    #[test]
    fn a_word_is_taken_over_only_from_a_holder_that_is_gone() {
        let seg = segment();
        let word = &seg.header().producer_lock;
        let tag = |i: usize, gen: u32| (i as u32 + 1) | (gen << GEN_SHIFT);
        // Naming no slot: a typed error, for a try and a wait alike.
        word.0.store(SLOTS as u32 + 1, Ordering::Relaxed);
        assert!(matches!(
            seg.lock(word, Some(Instant::now())),
            Err(LockError::Broken(_))
        ));
        assert!(matches!(seg.lock(word, None), Err(LockError::Broken(_))));
        // This thread's own tag, though it holds nothing: not taken over.
        word.0.store(0, Ordering::Relaxed);
        drop(seg.lock(word, None).ok().expect("lock"));
        let Me::Own(mine, _) = seg.me() else {
            panic!("no slot of its own")
        };
        word.0.store(mine, Ordering::Relaxed);
        assert!(matches!(
            seg.lock(word, Some(Instant::now())),
            Err(LockError::Broken(_))
        ));
        // A free slot at the word's generation (its holder let it go, or
        // was taken for dead): taken over, even by a try, and the
        // sleepers' mark kept for the unlock.
        seg.slot(RESERVED + 20).gen.store(7, Ordering::Relaxed);
        word.0
            .store(tag(RESERVED + 20, 7) | WAITERS, Ordering::Relaxed);
        let g = seg
            .lock(word, Some(Instant::now()))
            .ok()
            .expect("taken over");
        assert_ne!(word.0.load(Ordering::Relaxed) & WAITERS, 0);
        drop(g);
        assert_eq!(word.0.load(Ordering::Relaxed), 0);
        // A holder that died holding its slot (a thread that took a slot
        // by hand and ended without letting it go): the kernel marks the
        // slot, a waiter takes the word over and puts the slot back.
        let (i, dead) = {
            let seg = Arc::clone(&seg);
            std::thread::spawn(move || {
                let (slot, tag) = seg.claim(RESERVED..SLOTS).expect("a slot");
                let i = (tag & SLOT_MASK) as usize - 1;
                assert!(std::ptr::eq(slot, seg.slot(i)));
                seg.header().producer_lock.0.store(tag, Ordering::Relaxed);
                (i, tag)
            })
            .join()
            .expect("join")
        };
        assert_eq!(word.0.load(Ordering::Relaxed), dead);
        let g = seg.lock(word, None).ok().expect("taken over");
        drop(g);
        assert_eq!(state(&seg, i), 0, "the dead holder's slot was not put back");
        // A live holder: a try is Busy, a timed lock waits its deadline.
        let (done, rx) = mpsc::channel();
        let t = lock_in_a_thread(&seg, rx);
        assert!(matches!(
            seg.lock(word, Some(Instant::now())),
            Err(LockError::Busy)
        ));
        let deadline = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            seg.lock(word, Some(deadline)),
            Err(LockError::Busy)
        ));
        assert!(Instant::now() >= deadline);
        // Its slot taken again since (a new generation: the holder of the
        // word's generation is gone although the slot is held).
        let held = word.0.load(Ordering::Relaxed) & !WAITERS;
        let slot = seg.slot((held & SLOT_MASK) as usize - 1);
        slot.gen.fetch_add(1, Ordering::AcqRel);
        let g = seg
            .lock(word, Some(Instant::now()))
            .ok()
            .expect("taken over");
        let taken = word.0.load(Ordering::Relaxed);
        // The old holder's unlock leaves the new hold alone.
        done.send(()).expect("send");
        t.join().expect("join");
        assert_eq!(word.0.load(Ordering::Relaxed), taken);
        slot.gen.fetch_sub(1, Ordering::AcqRel);
        drop(g);
        assert_eq!(word.0.load(Ordering::Relaxed), 0);
        // Released normally, a sleeper is woken by the unlock (here the
        // sleepers' period is 2 s: a missing wake-up shows).
        let g = seg.lock(word, None).ok().expect("lock");
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let seg = Arc::clone(&seg);
            std::thread::spawn(move || {
                let g = seg
                    .lock(&seg.header().producer_lock, None)
                    .ok()
                    .expect("lock");
                tx.send(Instant::now()).expect("send");
                drop(g);
            })
        };
        let marked = Instant::now() + Duration::from_secs(10);
        while word.0.load(Ordering::Relaxed) & WAITERS == 0 {
            assert!(Instant::now() < marked, "no sleeper marked");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Asleep now (or about to be: the wake-up still reaches it).
        std::thread::sleep(Duration::from_millis(20));
        let released = Instant::now();
        drop(g);
        let took = rx.recv().expect("recv").duration_since(released);
        waiter.join().expect("join");
        assert!(took < Duration::from_secs(1), "{took:?}");
    }

    /// Whether this thread's robust list (glibc's, registered with the
    /// kernel) is empty.
    fn robust_list_empty() -> bool {
        let mut head: *mut libc::c_long = std::ptr::null_mut();
        let mut len: libc::size_t = 0;
        // SAFETY: get_robust_list writes the head's address and size of
        // the calling thread (pid 0) into the two locals.
        let r = unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head, &mut len) };
        assert_eq!(r, 0);
        // SAFETY: the head is glibc's, in this thread's descriptor: its
        // first word is the list's first entry, the head itself if empty.
        unsafe { *head as usize == head as usize }
    }

    #[test]
    fn the_two_tags_at_hand_name_live_segments_only() {
        // A thread alternating between two segments locks both on the
        // fast path; an entry goes with its segment, so that a new mapping
        // at the same address is never locked with the old one's tag.
        std::thread::spawn(|| {
            let at = |seg: &Segment| Arc::as_ptr(&seg.map) as usize;
            let (a, b) = (segment(), segment());
            for seg in [&a, &b, &a, &b] {
                drop(
                    seg.lock(&seg.header().producer_lock, None)
                        .ok()
                        .expect("lock"),
                );
            }
            assert_eq!((LAST.get().0, BEFORE.get().0), (at(&b), at(&a)));
            for seg in [&a, &b] {
                let guard = seg.lock_fast(&seg.header().consumer_lock);
                assert!(guard.is_some(), "not on the fast path");
            }
            let old = at(&a);
            drop(a);
            assert!(LAST.get().0 != old && BEFORE.get().0 != old);
            drop(b);
            assert_eq!((LAST.get().0, BEFORE.get().0), (0, 0));
            // A new segment (the allocator may well map it where one of
            // the dropped ones was): no entry names it before this thread
            // locks in it, and then its own tag is taken.
            let c = segment();
            assert!(c.lock_fast(&c.header().producer_lock).is_none());
            drop(c.lock(&c.header().producer_lock, None).ok().expect("lock"));
            assert_eq!(LAST.get().0, at(&c));
        })
        .join()
        .expect("join");
    }

    #[test]
    fn a_dropped_segments_slot_is_let_go_before_its_unmapping() {
        // glibc links the robust mutexes a thread holds through the
        // mutexes themselves: a slot left held in an unmapped segment
        // would make the thread's next robust lock write into the hole.
        std::thread::spawn(|| {
            assert!(robust_list_empty());
            for _ in 0..3 {
                let seg = segment();
                drop(
                    seg.lock(&seg.header().producer_lock, None)
                        .ok()
                        .expect("lock"),
                );
                assert!(!robust_list_empty());
                drop(seg);
                assert!(
                    robust_list_empty(),
                    "a dropped segment's slot is still held"
                );
            }
            HELD.with(|held| assert!(held.borrow().is_empty()));
            // A segment dropped by another thread: let go at this one's
            // next registration.
            let seg = segment();
            drop(
                seg.lock(&seg.header().producer_lock, None)
                    .ok()
                    .expect("lock"),
            );
            std::thread::spawn(move || drop(seg)).join().expect("join");
            let other = segment();
            drop(
                other
                    .lock(&other.header().producer_lock, None)
                    .ok()
                    .expect("lock"),
            );
            HELD.with(|held| assert_eq!(held.borrow().len(), 1));
            drop(other);
            assert!(robust_list_empty());
        })
        .join()
        .expect("join");
    }

    #[test]
    fn a_borrower_without_a_slot_to_borrow_keeps_its_deadline() {
        let seg = segment();
        // One thread holds every slot, reserved ones included.
        let (held, all) = mpsc::channel();
        let (done, end) = mpsc::channel::<()>();
        let holder = {
            let seg = Arc::clone(&seg);
            std::thread::spawn(move || {
                let n = std::iter::from_fn(|| seg.claim(0..SLOTS)).count();
                held.send(n).expect("send");
                end.recv().expect("recv");
            })
        };
        assert_eq!(all.recv().expect("recv"), SLOTS);
        // The word names a holder that is gone (its slot, held, is at a
        // newer generation); a thread that has no slot to borrow waits
        // for one until its deadline, then says Busy.
        let slot = RESERVED + 3;
        let gen = seg.slot(slot).gen().wrapping_sub(1) & GEN_MASK;
        let word = &seg.header().producer_lock;
        word.0
            .store((slot as u32 + 1) | (gen << GEN_SHIFT), Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        {
            let seg = Arc::clone(&seg);
            std::thread::spawn(move || {
                let t = Instant::now();
                let w = &seg.header().producer_lock;
                let r = seg.lock(w, Some(t + Duration::from_millis(50)));
                let busy = matches!(r, Err(LockError::Busy));
                drop(r);
                tx.send((busy, t.elapsed())).expect("send");
            });
        }
        let (busy, took) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the lock went on past its deadline");
        assert!(busy);
        assert!(took >= Duration::from_millis(50), "{took:?}");
        // Once the slots are free again, the word is taken over.
        done.send(()).expect("send");
        holder.join().expect("join");
        drop(seg.lock(word, None).ok().expect("taken over"));
        assert_eq!(word.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_fork_handler_mark_of_this_pid_is_not_waited_on_for_ever() {
        // A mark "registering now" that no thread of this process will
        // finish (a parent's, inherited by a process that got its pid
        // back): registered anyway after a bounded wait.
        AT_FORK.store(std::process::id(), Ordering::Release);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(fork_handler_registered()).expect("send"));
        let registered = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("waited for ever on the mark");
        assert!(registered);
        assert_eq!(AT_FORK.load(Ordering::Acquire), AT_FORK_DONE);
    }
}
