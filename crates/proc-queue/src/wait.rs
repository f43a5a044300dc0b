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

fn multi_cpu() -> bool {
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
        let seq = signal.register();
        if ready() {
            signal.unregister();
            return Waited::Ready;
        }
        let now = Instant::now();
        let end = [deadline, slice_end].into_iter().flatten().min();
        let timeout = match end {
            Some(end) if end <= now => {
                signal.unregister();
                return Waited::TimedOut;
            }
            Some(end) => Some(end - now),
            None => None,
        };
        shm::futex_wait(signal.seq, seq, timeout);
        signal.unregister();
        if ready() {
            return Waited::Ready;
        }
    }
}

/// Wakes the sleepers of `signal` if there are any.
pub(crate) fn notify(signal: &Signal<'_>) {
    if signal.notify() {
        shm::futex_wake_all(signal.seq);
    }
}
