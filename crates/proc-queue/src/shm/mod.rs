//! Every `unsafe` block of `proc-queue`: the shared segment (a `memfd`
//! mapped `MAP_SHARED`, so a forked child shares it rather than copying it),
//! its header, robust process-shared mutexes, futexes, and the raw copies
//! in and out of the ring.
//!
//! Every byte here may have been written by a crashed, buggy or hostile
//! peer: this module only hands out bounds-checked views; the ring validates
//! every length and position it reads before it asks for one.

use std::cell::UnsafeCell;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memmap2::MmapRaw;

use crate::ring::{MAX_CAPACITY, MIN_CAPACITY};

/// Identifies a `proc-queue` segment.
const MAGIC: u64 = u64::from_le_bytes(*b"procQ\0\x01\0");
/// The layout version.
const VERSION: u32 = 3;
/// Where the ring's bytes start: one page for the header.
pub(crate) const DATA_OFFSET: usize = 4096;

/// A cache-line-aligned (128 bytes: the adjacent-line prefetcher pairs
/// lines) cell, so that the producer's and the consumer's hot words never
/// share a line.
#[repr(C, align(128))]
pub(crate) struct Line<T>(pub(crate) T);

/// A robust, process-shared mutex living in the segment.
#[repr(C, align(128))]
pub(crate) struct RobustMutex(UnsafeCell<libc::pthread_mutex_t>);

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
    pub(crate) producer_lock: RobustMutex,
    pub(crate) consumer_lock: RobustMutex,
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

/// A mapped queue segment.
pub(crate) struct Segment {
    map: MmapRaw,
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
        file.set_len((DATA_OFFSET + capacity) as u64)?;
        let map = MmapRaw::map_raw(&file)?;
        let segment = Segment {
            map,
            file,
            capacity,
            maxsize,
        };
        // SAFETY: the mapping is fresh, private to this process until the
        // segment is shared, page-aligned and at least a page long, so it
        // holds a Header; the memfd starts zeroed, which is a valid state for
        // every atomic in it.
        unsafe { segment.write_header()? };
        Ok(segment)
    }

    /// Puts the header back as [`create`](Segment::create) made it (no
    /// message, not closed, nobody registered, fresh locks); the ring's
    /// bytes stay (positions at 0 make them unread). For a segment that
    /// no other process uses any more, nor another mapping of it in this
    /// one: the caller's contract (`&mut` rules out other handles of this
    /// `Segment`).
    pub(crate) fn reset(&mut self) -> io::Result<()> {
        // SAFETY: the mapping holds a Header (checked at create/open) and
        // `&mut self` means no other handle of this process touches it; no
        // other process does (this function's contract). All-zero is the
        // state `create` starts from (the memfd starts zeroed).
        unsafe {
            std::ptr::write_bytes(self.map.as_mut_ptr(), 0, std::mem::size_of::<Header>());
            self.write_header()
        }
    }

    /// Writes what a new header holds over an all-zero one: identity,
    /// sizes, the two robust locks.
    ///
    /// # Safety
    ///
    /// The header is all zeroes and nothing else uses it meanwhile.
    unsafe fn write_header(&self) -> io::Result<()> {
        let header = self.map.as_mut_ptr().cast::<Header>();
        // SAFETY: the mapping holds a Header; exclusive per the contract.
        unsafe {
            std::ptr::addr_of_mut!((*header).magic).write(MAGIC);
            std::ptr::addr_of_mut!((*header).version).write(VERSION);
            std::ptr::addr_of_mut!((*header).capacity).write(self.capacity as u64);
            std::ptr::addr_of_mut!((*header).maxsize).write(self.maxsize);
            init_robust_mutex(std::ptr::addr_of_mut!((*header).producer_lock))?;
            init_robust_mutex(std::ptr::addr_of_mut!((*header).consumer_lock))?;
        }
        Ok(())
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
        let fits = capacity.checked_add(DATA_OFFSET as u64) == Some(len);
        let sized = (MIN_CAPACITY as u64..=MAX_CAPACITY as u64).contains(&capacity);
        if !capacity.is_power_of_two() || !fits || !sized {
            return Err(bad("queue segment capacity does not match its size"));
        }
        Ok(Segment {
            map,
            file,
            capacity: capacity as usize,
            maxsize,
        })
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
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    #[inline]
    fn data(&self) -> *mut u8 {
        // SAFETY: DATA_OFFSET is inside the mapping (it is DATA_OFFSET +
        // capacity bytes long).
        unsafe { self.map.as_mut_ptr().add(DATA_OFFSET) }
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
/// `m` points to writable memory for a `RobustMutex` that no other process
/// or thread uses yet.
unsafe fn init_robust_mutex(m: *mut RobustMutex) -> io::Result<()> {
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
            check(libc::pthread_mutex_init(
                UnsafeCell::raw_get(std::ptr::addr_of!((*m).0)),
                attr.as_ptr(),
            ))
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

/// Why a lock was not taken.
pub(crate) enum LockError {
    /// The deadline passed (or, for `try_lock`, the lock is held).
    Busy,
    /// The mutex is unusable (a peer left it inconsistent, or the bytes were
    /// corrupted).
    Broken(io::Error),
}

/// A held robust mutex; unlocks on drop.
///
/// When the previous owner died holding it, `lock` has already made it
/// consistent again: the ring needs no repair, because its state only
/// changes at single-word commits.
pub(crate) struct Guard<'a> {
    mutex: &'a RobustMutex,
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

impl RobustMutex {
    fn raw(&self) -> *mut libc::pthread_mutex_t {
        self.0.get()
    }

    /// Locks, waiting until `deadline` (`None`: forever, `Some(now)`: try).
    ///
    /// A held lock is usually released within a few hundred nanoseconds
    /// (a critical section is one record), so a held lock is re-tried,
    /// spinning briefly and then yielding the CPU, before the waiter sleeps
    /// in the kernel.
    #[inline]
    pub(crate) fn lock(&self, deadline: Option<Instant>) -> Result<Guard<'_>, LockError> {
        // SAFETY: the mutex was initialised as robust and shared.
        match unsafe { libc::pthread_mutex_trylock(self.raw()) } {
            0 => Ok(Guard { mutex: self }),
            libc::EBUSY => self.lock_contended(deadline),
            code => self.acquired(code),
        }
    }

    /// [`lock`](RobustMutex::lock) once the lock was found held.
    #[cold]
    fn lock_contended(&self, deadline: Option<Instant>) -> Result<Guard<'_>, LockError> {
        for tries in 0..SPIN_TRIES {
            // SAFETY: the mutex was initialised as robust and shared.
            let code = unsafe { libc::pthread_mutex_trylock(self.raw()) };
            if code != libc::EBUSY {
                return self.acquired(code);
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
        loop {
            let code = match deadline {
                // SAFETY: as above.
                None => unsafe { libc::pthread_mutex_lock(self.raw()) },
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        // SAFETY: as above.
                        unsafe { libc::pthread_mutex_trylock(self.raw()) }
                    } else {
                        // pthread's deadline is on CLOCK_REALTIME: a step
                        // of the clock forward ends the wait early (the loop
                        // re-checks the monotonic deadline); a step back
                        // while it waits lengthens it by the step (a known
                        // limit: pthread_mutex_clocklock, glibc 2.30, would
                        // avoid it).
                        let abs = realtime_after(d - now);
                        // SAFETY: as above; `abs` is a valid timespec.
                        unsafe { libc::pthread_mutex_timedlock(self.raw(), &abs) }
                    }
                }
            };
            match code {
                libc::EBUSY => return Err(LockError::Busy),
                libc::ETIMEDOUT => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(LockError::Busy);
                    }
                }
                libc::EINTR | libc::EAGAIN => {}
                code => return self.acquired(code),
            }
        }
    }

    /// The guard for a lock call that returned `code` (0, `EOWNERDEAD`, or
    /// an error), recovering the mutex from a dead owner.
    fn acquired(&self, code: libc::c_int) -> Result<Guard<'_>, LockError> {
        match code {
            0 => Ok(Guard { mutex: self }),
            libc::EOWNERDEAD => {
                // SAFETY: we own the mutex now; marking it consistent is
                // what EOWNERDEAD asks of the new owner.
                let r = unsafe { libc::pthread_mutex_consistent(self.raw()) };
                let guard = Guard { mutex: self };
                check(r).map_err(LockError::Broken)?;
                Ok(guard)
            }
            other => Err(LockError::Broken(io::Error::from_raw_os_error(other))),
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: this guard owns the lock.
        unsafe { libc::pthread_mutex_unlock(self.mutex.raw()) };
    }
}

fn realtime_after(d: Duration) -> libc::timespec {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + d;
    libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
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
