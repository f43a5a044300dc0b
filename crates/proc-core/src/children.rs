//! The table of this process's children: who reaps each one, which are
//! daemons, and what happens to them when this process exits.
//!
//! Each child started by `proc` holds one slot from spawn until it is reaped.
//! A slot's state machine decides who may call `waitpid` on its pid, so that
//! a pid is never waited on after it was reaped (it may belong to a new,
//! unrelated child by then):
//!
//! ```text
//! FREE -> RESERVED (spawn) -> OWNED (forked; the JoinHandle reaps it)
//!   OWNED -> FREE                (the handle joined it)
//!   OWNED -> DETACHED            (the handle was dropped unjoined)
//!   DETACHED -> REAPING -> FREE  (the SIGCHLD handler or a sweep reaped it)
//!   REAPING -> REAPING_AGAIN     (a SIGCHLD arrived while another reaper looked)
//! ```
//!
//! Detached children are reaped from a SIGCHLD handler (installed on the
//! first detach, chaining any handler that was there before), so a dropped
//! handle never leaves a zombie behind; every spawn also sweeps, in case a
//! program replaced that handler. The idea of reaping at exit (daemons
//! terminated, the rest joined) is Python's `multiprocessing.util._exit_function`.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

use crate::sys::{self, Reap};

const SLOTS: usize = 16 * 1024;

const FREE: u8 = 0;
const RESERVED: u8 = 1;
const OWNED: u8 = 2;
const DETACHED: u8 = 3;
const REAPING: u8 = 4;
const REAPING_AGAIN: u8 = 5;

struct Slot {
    state: AtomicU8,
    daemon: AtomicBool,
    /// An internal helper (the fork server): not listed by `live`.
    hidden: AtomicBool,
    pid: AtomicI32,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            daemon: AtomicBool::new(false),
            hidden: AtomicBool::new(false),
            pid: AtomicI32::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
/// One past the highest slot ever reserved: the scans stop there. Slots are
/// taken lowest first, so this stays near the most children alive at once.
static HIGH: AtomicUsize = AtomicUsize::new(0);
/// The process this table describes. A forked child inherits its parent's
/// table; it resets it only when it starts children of its own, so that a
/// child that does not write nothing here (and copies no page of it).
static OWNER: AtomicI32 = AtomicI32::new(0);
/// Held while a process takes the table over from its parent.
static RESETTING: parking_lot::Mutex<()> = parking_lot::const_mutex(());
/// Names of the children, by slot, for `active_children`.
static NAMES: parking_lot::Mutex<Vec<Option<String>>> = parking_lot::const_mutex(Vec::new());

/// A reserved slot of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlotId(usize);

/// Registers the exit hook (once per process image).
pub(crate) fn init() {
    static AT_EXIT: Once = Once::new();
    AT_EXIT.call_once(|| {
        // Without the hook, children are still reaped (by their handles or
        // the SIGCHLD reaper); only the exit-time join/terminate is lost.
        let _ = sys::at_exit(at_exit);
    });
}

extern "C" fn at_exit() {
    finish_children();
}

/// Reserves a slot for a child about to be forked.
pub(crate) fn reserve() -> Option<SlotId> {
    let me = sys::getpid();
    // SYNC: Acquire pairs with the Release store below: a thread that sees
    // the table as this process's sees it reset.
    if OWNER.load(Ordering::Acquire) != me {
        // Two threads' first starts must not both reset: the second would
        // free the slot the first just took.
        let _resetting = RESETTING.lock();
        if OWNER.load(Ordering::Acquire) != me {
            reset_inherited();
            OWNER.store(me, Ordering::Release);
        }
    }
    sweep();
    for (i, slot) in TABLE.iter().enumerate() {
        // SYNC: Acquire pairs with the Release stores that free a slot.
        if slot.state.load(Ordering::Relaxed) == FREE
            && slot
                .state
                .compare_exchange(FREE, RESERVED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            HIGH.fetch_max(i + 1, Ordering::AcqRel);
            slot.hidden.store(false, Ordering::Relaxed);
            return Some(SlotId(i));
        }
    }
    None
}

/// Gives back a slot whose fork failed.
pub(crate) fn unreserve(slot: SlotId) {
    // SYNC: pairs with the Acquire in reserve().
    TABLE[slot.0].state.store(FREE, Ordering::Release);
}

/// Names the child about to be forked into `slot` (before the fork, so that
/// the parent's heap writes are not copy-on-write faults afterwards).
pub(crate) fn name(slot: SlotId, name: &str) {
    let mut names = NAMES.lock();
    if names.len() <= slot.0 {
        names.resize(slot.0 + 1, None);
    }
    names[slot.0] = Some(name.to_owned());
}

/// Records an internal helper process (the fork server) that no handle
/// owns: a daemon, reaped as soon as it ends, not listed by
/// `active_children`.
pub(crate) fn register_hidden(slot: SlotId, pid: libc::pid_t) {
    let s = &TABLE[slot.0];
    s.hidden.store(true, Ordering::Relaxed);
    register(slot, pid, true);
    detach(slot);
}

/// Records the forked child in its slot; its handle now owns the reaping.
pub(crate) fn register(slot: SlotId, pid: libc::pid_t, daemon: bool) {
    let s = &TABLE[slot.0];
    s.pid.store(pid, Ordering::Relaxed);
    s.daemon.store(daemon, Ordering::Relaxed);
    // SYNC: Release publishes pid and daemon to the reaper's Acquire loads.
    s.state.store(OWNED, Ordering::Release);
}

/// Whether this process's own children are in the table (false in a
/// forked child that has not started any).
fn owned() -> bool {
    OWNER.load(Ordering::Relaxed) == sys::getpid()
}

/// The owning handle reaped its child: the slot is free again.
pub(crate) fn release(slot: SlotId) {
    let name = NAMES.lock().get_mut(slot.0).and_then(Option::take);
    drop(name);
    // SYNC: pairs with the Acquire in reserve().
    TABLE[slot.0].state.store(FREE, Ordering::Release);
}

/// The owning handle was dropped before its child was reaped: from now on the
/// SIGCHLD reaper (or the next sweep) reaps it.
pub(crate) fn detach(slot: SlotId) {
    // Installing first means no exit after the state change goes unnoticed.
    let _ = sys::install_sigchld_reaper(sweep);
    // SYNC: Release pairs with the Acquire in try_reap.
    TABLE[slot.0].state.store(DETACHED, Ordering::Release);
    try_reap(slot.0);
}

/// Reaps a detached child if it has exited. Async-signal-safe: atomics and
/// `waitpid` only.
fn try_reap(i: usize) {
    let s = &TABLE[i];
    loop {
        // SYNC: Acquire pairs with the Release in detach()/register().
        match s
            .state
            .compare_exchange(DETACHED, REAPING, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => {}
            Err(REAPING) => {
                // Someone else is looking; tell them to look once more.
                if s.state
                    .compare_exchange(REAPING, REAPING_AGAIN, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                return;
            }
            Err(_) => return,
        }
        let pid = s.pid.load(Ordering::Relaxed);
        match sys::waitpid_nohang(pid) {
            Ok(Reap::Exited(_)) | Ok(Reap::NoChild) | Err(_) => {
                // SYNC: pairs with the Acquire in reserve().
                s.state.store(FREE, Ordering::Release);
                return;
            }
            Ok(Reap::Running) => {
                match s.state.compare_exchange(
                    REAPING,
                    DETACHED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return,
                    Err(_) => {
                        // REAPING_AGAIN: the child may have exited meanwhile.
                        s.state.store(DETACHED, Ordering::Release);
                    }
                }
            }
        }
    }
}

/// Reaps every detached child that has exited (the SIGCHLD handler).
fn sweep() {
    // In a forked child that started no children of its own, the table is
    // still its parent's: those pids are not its children, and one of them,
    // reaped by the parent and reused, could be a child of this process that
    // someone else waits for.
    if !owned() {
        return;
    }
    // SYNC: pairs with the fetch_max in reserve().
    let high = HIGH.load(Ordering::Acquire);
    for (i, slot) in TABLE[..high].iter().enumerate() {
        let st = slot.state.load(Ordering::Relaxed);
        if st == DETACHED || st == REAPING {
            try_reap(i);
        }
    }
}

/// Forgets the parent's children in a forked child that is about to start
/// children of its own: they are not this process's children.
fn reset_inherited() {
    let high = HIGH.load(Ordering::Relaxed);
    for slot in &TABLE[..high] {
        slot.state.store(FREE, Ordering::Relaxed);
    }
    HIGH.store(0, Ordering::Relaxed);
    // The parent's names are left allocated, not freed: freeing them would
    // write to (and so copy) heap pages the child shares with its parent.
    std::mem::forget(std::mem::take(&mut *NAMES.lock()));
}

/// A live child: its pid, name and daemon flag.
pub(crate) struct LiveChild {
    pub(crate) pid: libc::pid_t,
    pub(crate) name: String,
    pub(crate) daemon: bool,
}

/// The children that are still running, this process's own and those the
/// fork server or a zygote started for it; reaps detached ones that ended.
pub(crate) fn live() -> Vec<LiveChild> {
    let remote = crate::remote::live();
    if !owned() {
        return remote;
    }
    sweep();
    let high = HIGH.load(Ordering::Acquire);
    let names = NAMES.lock();
    let mut out = Vec::new();
    for (i, s) in TABLE[..high].iter().enumerate() {
        let st = s.state.load(Ordering::Acquire);
        if !matches!(st, OWNED | DETACHED | REAPING | REAPING_AGAIN)
            || s.hidden.load(Ordering::Relaxed)
        {
            continue;
        }
        let pid = s.pid.load(Ordering::Relaxed);
        if matches!(sys::has_exited(pid), Ok(false)) {
            out.push(LiveChild {
                pid,
                name: names.get(i).cloned().flatten().unwrap_or_default(),
                daemon: s.daemon.load(Ordering::Relaxed),
            });
        }
    }
    out.extend(remote);
    out
}

/// What Python does at exit: terminate the daemon children, then wait for
/// every child (daemon or not) to end.
pub(crate) fn finish_children() {
    crate::remote::finish();
    if !owned() {
        return;
    }
    let high = HIGH.load(Ordering::Acquire);
    for s in &TABLE[..high] {
        let st = s.state.load(Ordering::Acquire);
        if matches!(st, OWNED | DETACHED) && s.daemon.load(Ordering::Relaxed) {
            // A helper of this process (the fork server, a zygote: hidden)
            // is killed outright: it may have inherited an ignored SIGTERM
            // or the program's handler for it, and the wait below would
            // then last for ever; nothing of the program's runs in it.
            let signal = if s.hidden.load(Ordering::Relaxed) {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            let _ = sys::kill(s.pid.load(Ordering::Relaxed), signal);
        }
    }
    for s in &TABLE[..high] {
        loop {
            let st = s.state.load(Ordering::Acquire);
            match st {
                OWNED => {
                    // A handle still exists but the program is ending: wait
                    // for the child as Python's exit handler does.
                    let _ = sys::waitpid_blocking(s.pid.load(Ordering::Relaxed));
                    s.state.store(FREE, Ordering::Release);
                    break;
                }
                DETACHED => {
                    if s.state
                        .compare_exchange(DETACHED, REAPING, Ordering::Acquire, Ordering::Relaxed)
                        .is_ok()
                    {
                        let _ = sys::waitpid_blocking(s.pid.load(Ordering::Relaxed));
                        s.state.store(FREE, Ordering::Release);
                        break;
                    }
                }
                REAPING | REAPING_AGAIN => std::thread::yield_now(),
                _ => break,
            }
        }
    }
}
