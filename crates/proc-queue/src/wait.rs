//! Waiting for the other side: spin briefly, then sleep on a futex.
//!
//! On this kind of VM a sleeping peer takes 50–60 µs to wake, while a cache
//! line crosses cores in ~0.1 µs; spinning for a few µs first turns most
//! waits into the fast kind. When both processes share one core, spinning
//! only burns the slice the peer needs, so the budget adapts: it doubles
//! when a spin succeeds and shrinks by a quarter when it fails (down to
//! 4 µs, about what a futex sleep and wake cost on one core), and is 0 on a
//! single CPU. (With a 1 µs floor the budget could get stuck below a
//! ping-pong round trip, so that every hop slept.)

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::protocol::Signal;
use crate::shm;

const MIN_SPIN_NS: u32 = 4_000;
const MAX_SPIN_NS: u32 = 50_000;

/// The current spin budget in nanoseconds (process-wide, adaptive).
static SPIN_NS: AtomicU32 = AtomicU32::new(20_000);

pub(crate) fn multi_cpu() -> bool {
    static MULTI: OnceLock<bool> = OnceLock::new();
    *MULTI.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// How a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Waited {
    /// The condition holds.
    Ready,
    /// The deadline (or the slice) passed first.
    TimedOut,
}

/// Waits until `ready()` holds, `deadline` passes, or `slice` (a bound on
/// one call, for callers that check something else periodically) runs out.
/// `ready` is re-checked after every wake-up; the futex is `signal`'s.
pub(crate) fn wait_for(
    signal: &Signal<'_>,
    deadline: Option<Instant>,
    slice: Option<Duration>,
    mut ready: impl FnMut() -> bool,
) -> Waited {
    if ready() {
        return Waited::Ready;
    }
    let start = Instant::now();
    let budget = if multi_cpu() {
        SPIN_NS.load(Ordering::Relaxed)
    } else {
        0
    };
    if budget > 0 {
        let budget = Duration::from_nanos(u64::from(budget));
        let limit = [deadline, slice.map(|s| start + s)]
            .into_iter()
            .flatten()
            .min();
        // Back off exponentially between checks, from one `pause` (~30 ns
        // here) to 16: early checks catch a quick answer (ping-pong
        // latency), later ones leave the line alone for the writer.
        let mut step = 0u32;
        loop {
            for _ in 0..1u32 << step.min(4) {
                std::hint::spin_loop();
            }
            step += 1;
            if ready() {
                let b = SPIN_NS.load(Ordering::Relaxed);
                SPIN_NS.store(b.saturating_mul(2).min(MAX_SPIN_NS), Ordering::Relaxed);
                return Waited::Ready;
            }
            let now = Instant::now();
            if now - start >= budget || limit.is_some_and(|l| now >= l) {
                break;
            }
        }
        let b = SPIN_NS.load(Ordering::Relaxed);
        SPIN_NS.store((b / 4 * 3).max(MIN_SPIN_NS), Ordering::Relaxed);
    }
    let slice_end = slice.map(|s| start + s);
    loop {
        let mut registered = Registration::new(signal);
        if ready() {
            return Waited::Ready;
        }
        let now = Instant::now();
        let end = [deadline, slice_end].into_iter().flatten().min();
        let timeout = match end {
            Some(end) if end <= now => return Waited::TimedOut,
            Some(end) => (end - now).min(BACKSTOP),
            None => BACKSTOP,
        };
        registered.track();
        shm::futex_wait(signal.seq, registered.seq, Some(timeout));
        drop(registered);
        if ready() {
            return Waited::Ready;
        }
    }
}

/// The longest one sleep lasts before the sleeper re-checks by itself: a
/// backstop, should a wake-up ever be missed (see [`forget_dead_sleepers`]).
const BACKSTOP: Duration = Duration::from_secs(1);

/// Set in a sleeper slot while its pid is counted in `waiters`.
const REGISTERED: u32 = 1 << 31;

/// One registration to sleep on a signal (see `protocol::Signal`), with the
/// sleeper's pid in a slot while it sleeps, so that a sleeper killed in
/// its sleep can be discounted by a later waker.
///
/// The order keeps every window in which a death would leave things wrong
/// to a few instructions, and on the side of a count too high (more
/// wake-up calls), never too low (a missed wake-up): count in, then (only
/// when about to sleep: the pid costs a system call) take a slot marked
/// as counted; on the way out, unmark, count out, free the slot.
struct Registration<'a> {
    signal: &'a Signal<'a>,
    slot: Option<(&'a AtomicU32, u32)>,
    /// The futex sequence to sleep on.
    seq: u32,
}

impl<'a> Registration<'a> {
    fn new(signal: &'a Signal<'a>) -> Self {
        Registration {
            signal,
            slot: None,
            seq: signal.register(),
        }
    }

    /// Puts this process's pid, marked as counted, in a free slot (if any
    /// is free: more sleepers than slots sleep untracked).
    fn track(&mut self) {
        let me = shm::pid();
        let marked = me | REGISTERED;
        self.slot = self
            .signal
            .sleepers
            .iter()
            .find(|slot| {
                slot.compare_exchange(0, marked, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            })
            .map(|slot| (slot, me));
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        match self.slot {
            None => self.signal.unregister(),
            Some((slot, me)) => {
                // Unmark; if the slot is no longer ours, a waker took this
                // registration back (judging this process gone: a pid of
                // another namespace) and counted it out already.
                if slot
                    .compare_exchange(me | REGISTERED, me, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    self.signal.unregister();
                    slot.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

/// How many wake-up calls that found nobody asleep make one look for
/// sleepers that were killed.
const LOOK_EVERY: u32 = 1024;

/// Wake-up calls that found nobody asleep, in this process.
static EMPTY_WAKES: AtomicU32 = AtomicU32::new(0);

/// Wakes the sleepers of `signal` if there are any.
#[inline]
pub(crate) fn notify(signal: &Signal<'_>) {
    if signal.notify() {
        wake(signal);
    }
}

/// The part of [`notify`] that runs only when someone is registered.
#[cold]
fn wake(signal: &Signal<'_>) {
    if shm::futex_wake_all(signal.seq) == 0 {
        // Someone is counted but nobody was asleep: usually a sleeper
        // between its registration and its sleep (or just woken); or one
        // killed in its sleep, whose count would otherwise make every
        // later commit pay a wake-up call. Now and then (the look costs a
        // system call per sleeper), look.
        if EMPTY_WAKES.fetch_add(1, Ordering::Relaxed) % LOOK_EVERY == LOOK_EVERY - 1 {
            forget_dead_sleepers(signal);
        }
    }
}

/// Takes back the registrations of sleepers whose process has ended (and
/// been reaped: a zombie's waits until then).
///
/// Only a pid that reads as ended is touched, so a live sleeper keeps its
/// registration; a pid of another pid namespace (a queue passed to a
/// container) could read as ended while it sleeps, and would then miss a
/// wake-up for at most [`BACKSTOP`] (and not be counted out a second time
/// when it wakes: see `Registration`'s drop).
pub(crate) fn forget_dead_sleepers(signal: &Signal<'_>) {
    for slot in signal.sleepers {
        let v = slot.load(Ordering::Relaxed);
        if v == 0 || !shm::process_gone(v & !REGISTERED) {
            continue;
        }
        if slot
            .compare_exchange(v, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && v & REGISTERED != 0
        {
            signal.unregister();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sleeper_killed_asleep_is_discounted() {
        let seq = AtomicU32::new(0);
        let waiters = AtomicU32::new(0);
        let slots: [AtomicU32; 4] = Default::default();
        let signal = Signal {
            seq: &seq,
            waiters: &waiters,
            sleepers: &slots,
        };
        // A process that has ended (run and reaped).
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("run true");
        let dead = child.id();
        child.wait().expect("wait");
        // What a sleeper killed in its sleep leaves behind...
        signal.register();
        slots[1].store(dead | REGISTERED, Ordering::Relaxed);
        // ...next to a live sleeper (this process) and a dead process's
        // claimed but uncounted slot.
        let mut live = Registration::new(&signal);
        live.track();
        slots[3].store(dead, Ordering::Relaxed);
        assert_eq!(waiters.load(Ordering::Relaxed), 2);
        // Wakers find nobody asleep; within LOOK_EVERY such calls one looks.
        let mut calls = 0;
        while waiters.load(Ordering::Relaxed) != 1 && calls < 2 * LOOK_EVERY {
            notify(&signal);
            calls += 1;
        }
        assert_eq!(waiters.load(Ordering::Relaxed), 1, "after {calls} calls");
        assert_eq!(slots[1].load(Ordering::Relaxed), 0);
        assert_eq!(slots[3].load(Ordering::Relaxed), 0);
        assert_eq!(slots[0].load(Ordering::Relaxed), shm::pid() | REGISTERED);
        // The live one is never touched; it leaves on its own.
        forget_dead_sleepers(&signal);
        assert_eq!(waiters.load(Ordering::Relaxed), 1);
        drop(live);
        assert_eq!(waiters.load(Ordering::Relaxed), 0);
        assert!(slots.iter().all(|s| s.load(Ordering::Relaxed) == 0));
    }

    #[test]
    fn a_registration_taken_back_is_counted_out_once() {
        let seq = AtomicU32::new(0);
        let waiters = AtomicU32::new(0);
        let slots: [AtomicU32; 2] = Default::default();
        let signal = Signal {
            seq: &seq,
            waiters: &waiters,
            sleepers: &slots,
        };
        let mut sleeper = Registration::new(&signal);
        sleeper.track();
        // A waker that judged this sleeper gone (as one in another pid
        // namespace could) takes its registration back, and another
        // sleeper takes the slot.
        let taken = slots[0].swap(0, Ordering::Relaxed);
        assert_eq!(taken, shm::pid() | REGISTERED);
        signal.unregister();
        slots[0].store(12345 | REGISTERED, Ordering::Relaxed);
        signal.register();
        drop(sleeper);
        assert_eq!(waiters.load(Ordering::Relaxed), 1);
        assert_eq!(slots[0].load(Ordering::Relaxed), 12345 | REGISTERED);
    }
}
