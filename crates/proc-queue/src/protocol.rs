//! The ring's synchronisation protocol, on atomics only, so that loom can
//! model-check it with threads standing in for processes.
//!
//! - **Positions.** Producers and consumers each own one 64-bit word: the
//!   byte position they reached (40 bits, modulo 2^40) and how many whole
//!   messages passed it (24 bits, modulo 2^24). One `Release` store commits
//!   both at once, so a process killed between two stores cannot leave a
//!   position and a count that disagree; the reader pairs it with `Acquire`
//!   before touching the bytes (Lamport's single-producer ring, with the
//!   producer side and the consumer side each serialised by a lock).
//! - **Wake-ups.** An event count: a sleeper reads the futex sequence,
//!   registers with an `AcqRel` read-modify-write on the waiter count, then
//!   re-checks the ring; a waker publishes, then does an `AcqRel`
//!   read-modify-write on the same waiter count and bumps the sequence and
//!   wakes only if someone is registered. Both RMWs are on one location, so
//!   either the waker sees the sleeper or the sleeper sees the publication:
//!   no lost wake-up, with no `SeqCst` fence.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Bits of a position word that hold the byte position.
pub(crate) const POS_BITS: u32 = 40;
const POS_MASK: u64 = (1 << POS_BITS) - 1;
/// How many messages the count field tells apart (2^24).
pub(crate) const COUNT_MOD: u32 = 1 << (64 - POS_BITS);

/// Packs a byte position and a message count into one word.
pub(crate) fn pack(pos: u64, count: u32) -> u64 {
    (pos & POS_MASK) | (u64::from(count % COUNT_MOD) << POS_BITS)
}

/// The byte position of a word.
pub(crate) fn pos(word: u64) -> u64 {
    word & POS_MASK
}

/// The message count of a word.
pub(crate) fn count(word: u64) -> u32 {
    (word >> POS_BITS) as u32
}

/// Bytes between `head` and `tail` positions (modulo 2^40).
pub(crate) fn distance(tail: u64, head: u64) -> u64 {
    tail.wrapping_sub(head) & POS_MASK
}

/// Messages between `head` and `tail` counts (modulo 2^24).
pub(crate) fn count_distance(tail: u32, head: u32) -> u32 {
    tail.wrapping_sub(head) % COUNT_MOD
}

/// Commits a side's new position word: everything written before becomes
/// visible to whoever loads it with [`observe`].
#[inline]
pub(crate) fn commit(word: &AtomicU64, value: u64) {
    // SYNC: Release pairs with the Acquire in observe() on the other side.
    word.store(value, Ordering::Release);
}

/// Reads the other side's position word.
#[inline]
pub(crate) fn observe(word: &AtomicU64) -> u64 {
    // SYNC: Acquire pairs with the Release in commit().
    word.load(Ordering::Acquire)
}

/// One direction of wake-ups ("data arrived", "space freed", "tasks done").
pub(crate) struct Signal<'a> {
    /// The futex word: bumped on every wake-up that found a sleeper.
    pub(crate) seq: &'a AtomicU32,
    /// How many are registered to sleep.
    pub(crate) waiters: &'a AtomicU32,
    /// Who is registered (pids, see `wait`), so that the registration of a
    /// process killed while asleep can be taken back. Not part of the
    /// wake-up protocol itself (loom's models leave it empty).
    pub(crate) sleepers: &'a [std::sync::atomic::AtomicU32],
}

impl Signal<'_> {
    /// Before sleeping: the sequence to sleep on. Register, then re-check
    /// the condition, then sleep only if the sequence is still this value.
    pub(crate) fn register(&self) -> u32 {
        // SYNC: Acquire pairs with the Release bump in notify().
        let seq = self.seq.load(Ordering::Acquire);
        // SYNC: AcqRel RMW on `waiters`, ordered against notify()'s RMW on
        // the same location (see the module docs).
        self.waiters.fetch_add(1, Ordering::AcqRel);
        seq
    }

    /// After sleeping (or deciding not to).
    pub(crate) fn unregister(&self) {
        self.waiters.fetch_sub(1, Ordering::Relaxed);
    }

    /// After publishing: whether a sleeper must be woken; if so the
    /// sequence has been bumped and the caller wakes the futex.
    #[inline]
    pub(crate) fn notify(&self) -> bool {
        // SYNC: AcqRel RMW on the same location as register()'s: whichever
        // comes second in its modification order sees the other.
        if self.waiters.fetch_add(0, Ordering::AcqRel) == 0 {
            return false;
        }
        // SYNC: Release pairs with the Acquire in register().
        self.seq.fetch_add(1, Ordering::Release);
        true
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn words_pack_and_wrap() {
        let w = pack((1 << POS_BITS) + 5, COUNT_MOD + 3);
        assert_eq!(pos(w), 5);
        assert_eq!(count(w), 3);
        assert_eq!(distance(2, (1 << POS_BITS) - 3), 5);
        assert_eq!(count_distance(1, COUNT_MOD - 1), 2);
    }
}

#[cfg(all(test, loom))]
#[allow(unsafe_code)] // loom's UnsafeCell is how the model checks the payload accesses
mod loom_models {
    //! Threads stand in for processes: one producer, one consumer, a ring
    //! of two slots, the futex emulated by a mutex and condvar (the kernel
    //! checks the value and sleeps atomically, as the condvar's mutex does).
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::{Arc, Condvar, Mutex};

    struct Futex {
        lock: Mutex<()>,
        cv: Condvar,
    }

    impl Futex {
        fn wait(&self, word: &AtomicU32, expected: u32) {
            let mut g = self.lock.lock().unwrap();
            while word.load(Ordering::Acquire) == expected {
                g = self.cv.wait(g).unwrap();
            }
        }
        fn wake(&self) {
            let _g = self.lock.lock().unwrap();
            self.cv.notify_all();
        }
    }

    struct Shared {
        tail: AtomicU64,
        head: AtomicU64,
        data_seq: AtomicU32,
        data_waiters: AtomicU32,
        space_seq: AtomicU32,
        space_waiters: AtomicU32,
        slots: [UnsafeCell<u64>; 2],
        data_futex: Futex,
        space_futex: Futex,
    }

    const SLOT: u64 = 8;

    fn wait_until(signal: Signal<'_>, futex: &Futex, mut ready: impl FnMut() -> bool) {
        loop {
            if ready() {
                return;
            }
            let seq = signal.register();
            if ready() {
                signal.unregister();
                return;
            }
            futex.wait(signal.seq, seq);
            signal.unregister();
        }
    }

    #[test]
    fn no_lost_wakeups_and_payloads_visible() {
        loom::model(|| {
            let s = Arc::new(Shared {
                tail: AtomicU64::new(0),
                head: AtomicU64::new(0),
                data_seq: AtomicU32::new(0),
                data_waiters: AtomicU32::new(0),
                space_seq: AtomicU32::new(0),
                space_waiters: AtomicU32::new(0),
                slots: [UnsafeCell::new(0), UnsafeCell::new(0)],
                data_futex: Futex {
                    lock: Mutex::new(()),
                    cv: Condvar::new(),
                },
                space_futex: Futex {
                    lock: Mutex::new(()),
                    cv: Condvar::new(),
                },
            });
            const N: u64 = 3;
            let p = s.clone();
            let producer = loom::thread::spawn(move || {
                let mut tail = 0u64;
                for i in 0..N {
                    let space = Signal {
                        seq: &p.space_seq,
                        waiters: &p.space_waiters,
                        sleepers: &[],
                    };
                    // Wait for a free slot (two slots of SLOT bytes).
                    wait_until(space, &p.space_futex, || {
                        distance(tail, pos(observe(&p.head))) < 2 * SLOT
                    });
                    let idx = ((tail / SLOT) % 2) as usize;
                    // SAFETY: the slot is free: the consumer committed past it.
                    p.slots[idx].with_mut(|v| unsafe { *v = 100 + i });
                    tail += SLOT;
                    commit(&p.tail, pack(tail, (i + 1) as u32));
                    let data = Signal {
                        seq: &p.data_seq,
                        waiters: &p.data_waiters,
                        sleepers: &[],
                    };
                    if data.notify() {
                        p.data_futex.wake();
                    }
                }
            });
            let mut head = 0u64;
            for i in 0..N {
                let data = Signal {
                    seq: &s.data_seq,
                    waiters: &s.data_waiters,
                    sleepers: &[],
                };
                wait_until(data, &s.data_futex, || {
                    distance(pos(observe(&s.tail)), head) > 0
                });
                let idx = ((head / SLOT) % 2) as usize;
                // SAFETY: the slot was published by the producer's commit.
                let v = s.slots[idx].with(|v| unsafe { *v });
                assert_eq!(v, 100 + i);
                head += SLOT;
                commit(&s.head, pack(head, (i + 1) as u32));
                let space = Signal {
                    seq: &s.space_seq,
                    waiters: &s.space_waiters,
                    sleepers: &[],
                };
                if space.notify() {
                    s.space_futex.wake();
                }
            }
            producer.join().unwrap();
            assert_eq!(
                count_distance(count(observe(&s.tail)), count(observe(&s.head))),
                0
            );
        });
    }
}
