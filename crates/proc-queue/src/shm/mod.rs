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
//!   the tag; unlocking, one swap to 0 (and a futex wake-up when
//!   `WAITERS` was set).
//! - A waiter that finds the word held asks whether the holder lives: the
//!   holder's slot still has the tag's generation and its mutex is held
//!   (a `trylock` fails). A dead holder's mutex is free or marked dead by
//!   the kernel, or its slot was taken since by another thread (a new
//!   generation): the waiter takes the word over. Sleepers wake every
//!   [`CHECK_PERIOD`] to ask again (no futex wake-up comes from a death).
//!   No pid is involved: pid reuse and pid namespaces cannot fool it.
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
//! a fork counter tells a child's copies of its parent's entries apart.
//! When every slot but the [`RESERVED`] ones is held by live threads, a
//! thread borrows a reserved slot for each lock it takes (slower, never
//! stuck: a reserved slot is held only while its lock is).
//!
//! As with any process-shared robust mutex, a peer that overwrites the
//! list pointers of a mutex this process holds can make glibc write
//! through them: the segment is trusted that far.

use std::cell::{RefCell, UnsafeCell};
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
/// the holder lives (a holder's death wakes nobody).
const CHECK_PERIOD: Duration = Duration::from_millis(10);

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
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the mapping holds a Header (checked at create/open) and
        // `&mut self` means no other handle of this process touches it; no
        // other process does (this function's contract). All-zero is the
        // state `create` starts from (the memfd starts zeroed).
        unsafe {
            std::ptr::write_bytes(self.base(), 0, std::mem::size_of::<Header>());
            self.write_header();
        }
        Ok(())
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

/// A life slot this thread holds (or, with no slot, a note that every
/// slot was held when it asked: it borrows reserved ones).
struct Held {
    map: Arc<Mapping>,
    /// The slot, inside `map`'s mapping, which `map` keeps mapped.
    slot: Option<*const Slot>,
    tag: u32,
    /// [`FORKS`] when the slot was taken: a child's copy of its parent's
    /// entry has an older count, and holds nothing.
    forks: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
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
}

/// How many forks this process descends through (see [`Held::forks`]).
static FORKS: AtomicU64 = AtomicU64::new(0);
/// Whether [`forked`] was registered with `pthread_atfork`.
static AT_FORK: AtomicBool = AtomicBool::new(false);

/// Runs in the child of every `fork` (a `pthread_atfork` handler): only
/// an atomic increment, which is async-signal-safe.
extern "C" fn forked() {
    FORKS.fetch_add(1, Ordering::Relaxed);
}

/// Why a lock was not taken.
pub(crate) enum LockError {
    /// The deadline passed (or, for a try, the lock is held).
    Busy,
    /// The lock is unusable (its word names no slot: corrupted bytes, or a
    /// slot's mutex that glibc refuses).
    Broken(io::Error),
}

/// A held lock; unlocks on drop.
///
/// When the previous holder died holding it, `lock` took the word over:
/// the ring needs no repair, because its state only changes at
/// single-word commits.
pub(crate) struct Guard<'a> {
    word: &'a AtomicU32,
    /// A reserved slot borrowed for this hold.
    borrowed: Option<&'a Slot>,
}

/// Whether a lock word's holder lives.
enum Holder {
    Alive,
    Gone,
    Corrupt(io::Error),
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

    /// This thread's tag in this segment, taking a life slot at its first
    /// lock here; `None` when it has none (every slot held, or its
    /// thread-local state already destroyed): it borrows one per lock.
    #[inline]
    fn my_tag(&self) -> Option<u32> {
        let forks = FORKS.load(Ordering::Relaxed);
        HELD.try_with(|held| {
            let mut held = held.try_borrow_mut().ok()?;
            match held
                .iter()
                .find(|h| Arc::ptr_eq(&h.map, &self.map) && h.forks == forks)
            {
                Some(h) => h.slot.map(|_| h.tag),
                None => self.register(&mut held, forks),
            }
        })
        .ok()
        .flatten()
    }

    /// [`my_tag`](Segment::my_tag)'s first call in this segment: drops the
    /// entries a fork left (a child holds none of its parent's slots) and
    /// those of dropped segments, then takes a slot.
    #[cold]
    fn register(&self, held: &mut Vec<Held>, forks: u64) -> Option<u32> {
        held.retain(|h| h.forks == forks && !h.map.retired.load(Ordering::Acquire));
        if !AT_FORK.swap(true, Ordering::AcqRel) {
            // SAFETY: `forked` is an `extern "C" fn()` that only does an
            // atomic increment, valid in a fork's child.
            unsafe { libc::pthread_atfork(None, None, Some(forked)) };
        }
        let (slot, tag) = match self.claim(RESERVED..SLOTS) {
            Some((slot, tag)) => (Some(slot as *const Slot), tag),
            None => (None, 0),
        };
        held.push(Held {
            map: Arc::clone(&self.map),
            slot,
            tag,
            forks,
        });
        slot.map(|_| tag)
    }

    /// Locks `word`, waiting until `deadline` (`None`: forever,
    /// `Some(now)`: try).
    ///
    /// A held lock is usually released within a few hundred nanoseconds
    /// (a critical section is one record), so a held lock is re-tried,
    /// spinning briefly and then yielding the CPU, before the waiter sleeps
    /// in the kernel.
    #[inline]
    pub(crate) fn lock<'a>(
        &'a self,
        word: &'a LockWord,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        let word = &word.0;
        let Some(me) = self.my_tag() else {
            return self.lock_borrowing(word, deadline);
        };
        if word
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Ok(Guard {
                word,
                borrowed: None,
            });
        }
        self.lock_contended(word, me, deadline)
    }

    /// [`lock`](Segment::lock) for a thread without a slot of its own:
    /// it borrows a reserved one (another if none is free) for the hold.
    #[cold]
    fn lock_borrowing<'a>(
        &'a self,
        word: &'a AtomicU32,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        let (slot, me) = loop {
            if let Some(got) = self
                .claim(0..RESERVED)
                .or_else(|| self.claim(RESERVED..SLOTS))
            {
                break got;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(LockError::Busy);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        match self.lock_contended(word, me, deadline) {
            Ok(mut guard) => {
                guard.borrowed = Some(slot);
                Ok(guard)
            }
            Err(e) => {
                slot.release();
                Err(e)
            }
        }
    }

    /// [`lock`](Segment::lock) once the word was found held.
    #[cold]
    fn lock_contended<'a>(
        &'a self,
        word: &'a AtomicU32,
        me: u32,
        deadline: Option<Instant>,
    ) -> Result<Guard<'a>, LockError> {
        let got = || {
            Ok(Guard {
                word,
                borrowed: None,
            })
        };
        let take = |from: u32, to: u32| {
            word.compare_exchange(from, to, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        };
        for tries in 0..SPIN_TRIES {
            let v = word.load(Ordering::Relaxed);
            if v == 0 {
                if take(0, me) {
                    return got();
                }
                continue;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // A try, or the deadline passed: the lock is still taken
                // from a holder that is gone.
                return match self.holder(v, me) {
                    Holder::Gone if take(v, me | (v & WAITERS)) => got(),
                    Holder::Corrupt(e) => Err(LockError::Broken(e)),
                    _ => Err(LockError::Busy),
                };
            }
            if tries < SPIN_BEFORE_YIELD {
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
        loop {
            let v = word.load(Ordering::Relaxed);
            if v == 0 {
                // Others may sleep behind: wake one at the unlock.
                if take(0, me | WAITERS) {
                    return got();
                }
                continue;
            }
            match self.holder(v, me) {
                Holder::Gone => {
                    if take(v, me | (v & WAITERS)) {
                        return got();
                    }
                    continue;
                }
                Holder::Corrupt(e) => return Err(LockError::Broken(e)),
                Holder::Alive => {}
            }
            let mut wait = CHECK_PERIOD;
            if let Some(d) = deadline {
                let now = Instant::now();
                if now >= d {
                    return Err(LockError::Busy);
                }
                wait = wait.min(d - now);
            }
            if v & WAITERS == 0
                && word
                    .compare_exchange(v, v | WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            futex_wait(word, v | WAITERS, Some(wait));
        }
    }

    /// Whether the holder of a lock word `v` lives (see the module's notes).
    fn holder(&self, v: u32, me: u32) -> Holder {
        let tag = v & !WAITERS;
        if tag == me {
            // This thread's own tag, though it does not hold the lock (no
            // call here takes a lock it holds): a stale word.
            return Holder::Gone;
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

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.word.swap(0, Ordering::Release) & WAITERS != 0 {
            futex_wake_one(self.word);
        }
        if let Some(slot) = self.borrowed {
            slot.release();
        }
    }
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

    /// Whether slot `i`'s mutex is held by a live thread.
    fn held(seg: &Segment, i: usize) -> bool {
        let slot = seg.slot(i);
        match slot.take() {
            Ok(true) => {
                slot.release();
                false
            }
            _ => true,
        }
    }

    #[test]
    fn a_thread_holds_its_slot_until_it_exits() {
        let seg = segment();
        let (locked, done) = (mpsc::channel(), mpsc::channel::<()>());
        let t = {
            let seg = Arc::clone(&seg);
            let (tx, rx) = (locked.0, done.1);
            std::thread::spawn(move || {
                drop(
                    seg.lock(&seg.header().producer_lock, None)
                        .ok()
                        .expect("lock"),
                );
                tx.send(()).expect("send");
                rx.recv().expect("recv");
            })
        };
        locked.1.recv().expect("recv");
        assert!(held(&seg, RESERVED), "the thread's slot is not held");
        assert_eq!(seg.header().producer_lock.0.load(Ordering::Relaxed), 0);
        done.0.send(()).expect("send");
        t.join().expect("join");
        assert!(!held(&seg, RESERVED), "the slot outlived its thread");
    }

    #[test]
    fn with_every_slot_held_threads_borrow_reserved_ones() {
        // More threads than slots, all alive at once: each locks twice,
        // the lock stays exclusive, and the ones left without a slot of
        // their own borrow one per hold.
        let seg = segment();
        let n = SLOTS - RESERVED + 8;
        let barrier = Arc::new(Barrier::new(n));
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (seg, barrier, inside) =
                    (Arc::clone(&seg), Arc::clone(&barrier), Arc::clone(&inside));
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let hold = || {
                            let g = seg.lock(&seg.header().consumer_lock, None);
                            let g = g.ok().expect("lock");
                            assert_eq!(inside.swap(1, Ordering::SeqCst), 0, "two holders");
                            std::thread::yield_now();
                            inside.store(0, Ordering::SeqCst);
                            drop(g);
                        };
                        hold();
                        barrier.wait();
                        hold();
                        let own = seg.my_tag().is_some();
                        barrier.wait();
                        own
                    })
                    .expect("spawn")
            })
            .collect();
        let own = threads
            .into_iter()
            .map(|t| t.join().expect("join"))
            .filter(|&own| own)
            .count();
        assert_eq!(own, SLOTS - RESERVED);
        assert!(
            (0..SLOTS).all(|i| !held(&seg, i)),
            "a slot outlived its thread"
        );
    }

    #[test]
    fn a_word_is_taken_over_only_from_a_holder_that_is_gone() {
        let seg = segment();
        let word = &seg.header().producer_lock;
        // Naming no slot: a typed error, for a try and a wait alike.
        word.0.store(SLOTS as u32 + 1, Ordering::Relaxed);
        assert!(matches!(
            seg.lock(word, Some(Instant::now())),
            Err(LockError::Broken(_))
        ));
        assert!(matches!(seg.lock(word, None), Err(LockError::Broken(_))));
        // A slot nobody holds (its holder died): taken over, even by a try,
        // and the sleepers' mark kept for the unlock.
        word.0.store(
            (RESERVED as u32 + 20) | (7 << GEN_SHIFT) | WAITERS,
            Ordering::Relaxed,
        );
        let g = seg
            .lock(word, Some(Instant::now()))
            .ok()
            .expect("taken over");
        assert_ne!(word.0.load(Ordering::Relaxed) & WAITERS, 0);
        drop(g);
        assert_eq!(word.0.load(Ordering::Relaxed), 0);
        // A live holder: a try is Busy, a timed lock waits its deadline.
        let (locked, done) = (mpsc::channel(), mpsc::channel::<()>());
        let t = {
            let seg = Arc::clone(&seg);
            let (tx, rx) = (locked.0, done.1);
            std::thread::spawn(move || {
                let _g = seg
                    .lock(&seg.header().producer_lock, None)
                    .ok()
                    .expect("lock");
                tx.send(()).expect("send");
                rx.recv().expect("recv");
            })
        };
        locked.1.recv().expect("recv");
        assert!(matches!(
            seg.lock(word, Some(Instant::now())),
            Err(LockError::Busy)
        ));
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_millis(50);
        assert!(matches!(
            seg.lock(word, Some(deadline)),
            Err(LockError::Busy)
        ));
        assert!(Instant::now() >= deadline);
        // Its slot taken again since (a new generation: the holder of the
        // word's generation is gone although the slot is held).
        let tag = word.0.load(Ordering::Relaxed) & !WAITERS;
        let slot = seg.slot((tag & SLOT_MASK) as usize - 1);
        slot.gen.fetch_add(1, Ordering::AcqRel);
        let g = seg
            .lock(word, Some(Instant::now()))
            .ok()
            .expect("taken over");
        slot.gen.fetch_sub(1, Ordering::AcqRel);
        drop(g);
        done.0.send(()).expect("send");
        t.join().expect("join");
        // Released normally, a sleeper is woken by the unlock.
        let g = seg.lock(word, None).ok().expect("lock");
        let waiter = {
            let seg = Arc::clone(&seg);
            std::thread::spawn(move || {
                let t = Instant::now();
                drop(
                    seg.lock(&seg.header().producer_lock, None)
                        .ok()
                        .expect("lock"),
                );
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert_ne!(
            word.0.load(Ordering::Relaxed) & WAITERS,
            0,
            "no sleeper marked"
        );
        drop(g);
        let waited = waiter.join().expect("join");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
    }

    #[test]
    fn a_dropped_segments_slot_is_let_go_before_its_unmapping() {
        // glibc links the robust mutexes a thread holds through the
        // mutexes themselves: a slot left held in an unmapped segment
        // would make the thread's next robust lock write into the hole.
        std::thread::spawn(|| {
            for _ in 0..3 {
                let seg = segment();
                drop(
                    seg.lock(&seg.header().producer_lock, None)
                        .ok()
                        .expect("lock"),
                );
                drop(seg);
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
        })
        .join()
        .expect("join");
    }
}
