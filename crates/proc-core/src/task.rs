//! Task functions: an entry `fn(A) -> R` named so that a long-lived child
//! of this executable (a pool worker) can run it many times on encoded
//! input, and panics caught with their message and location.
//!
//! A [`TaskFn`] holds three offsets from `init`: the entry, a *runner* that
//! decodes the input, calls the entry and encodes the output (its format is
//! the caller's, e.g. `proc-pool`'s chunks), and the type-erased shim that
//! joins them, plus a checksum of the three. A child started as an entry
//! (any start method) has checked that it runs its requester's executable,
//! so the same offsets name the same functions there; a child that was not
//! started that way refuses to call a `TaskFn`, and so does any process for
//! a `TaskFn` whose checksum does not match (corrupted bytes).
//!
//! The checksum guards against corruption, not against a hostile peer: a
//! `TaskFn` is as trusted as the channel it came through (Python's pool
//! trusts its pickles the same way), so [`TaskFn::call`] is `unsafe`: its
//! caller vouches for where the value came from. `proc-pool` sends them
//! only through queues private to the pool's processes.

use std::panic::{self, AssertUnwindSafe};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::sys;

/// What decodes a task's input, runs the entry and encodes its output.
pub type Runner<A, R> = fn(fn(A) -> R, &[u8], &mut Vec<u8>);

/// An entry and its runner, named across processes of this executable (see
/// the [module docs](self)).
///
/// # Examples
///
/// ```
/// use proc_core::task::TaskFn;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
/// fn run(f: fn(u64) -> u64, input: &[u8], out: &mut Vec<u8>) {
///     let x = u64::from_le_bytes(input.try_into().unwrap_or_default());
///     out.extend_from_slice(&f(x).to_le_bytes());
/// }
/// let task = TaskFn::new(run, square);
/// // Only a child started as an entry may call it.
/// // SAFETY: `task` was made here by TaskFn::new.
/// assert!(unsafe { task.call(&7u64.to_le_bytes(), &mut Vec::new()) }.is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskFn {
    shim: i64,
    runner: i64,
    entry: i64,
    check: u64,
}

/// Why a [`TaskFn`] was not called.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskFnError {
    /// This process was not started as an entry of its requester's
    /// executable, so offsets from elsewhere mean nothing here.
    #[error("this process was not started as an entry of the executable that named the task")]
    NotAnEntryChild,
    /// The offsets do not match their checksum.
    #[error("the task function's offsets are corrupted")]
    Corrupted,
}

fn checksum(shim: i64, runner: i64, entry: i64) -> u64 {
    // splitmix64 over the three words: any flipped bit changes the sum.
    let mut h = 0x5052_4f43_5441_534bu64; // "PROCTASK"
    for word in [shim, runner, entry] {
        h ^= word as u64;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

fn shim<A, R>(proof: &sys::SameExe, runner: usize, entry: usize, input: &[u8], out: &mut Vec<u8>) {
    let run = sys::task_runner_at::<A, R>(proof, runner);
    let f = sys::entry_at::<A, R>(proof, entry);
    run(f, input, out)
}

impl TaskFn {
    /// Names `f` and the `runner` that calls it.
    pub fn new<A, R>(runner: Runner<A, R>, f: fn(A) -> R) -> TaskFn
    where
        A: DeserializeOwned,
        R: Serialize,
    {
        let base = crate::entry::anchor();
        let erased: sys::TaskShim = shim::<A, R>;
        let shim = (erased as *const () as i64).wrapping_sub(base);
        let runner = (runner as *const () as i64).wrapping_sub(base);
        let entry = (f as *const () as i64).wrapping_sub(base);
        TaskFn {
            shim,
            runner,
            entry,
            check: checksum(shim, runner, entry),
        }
    }

    /// Runs the runner on `input`, appending to `output`.
    ///
    /// # Safety
    ///
    /// `self` was made by [`TaskFn::new`] in this process's requester (the
    /// process that started it as an entry, which runs the same executable)
    /// or in this process, and reached it unaltered: a `TaskFn` is three
    /// code addresses, and one built or edited by hand (the checksum is no
    /// secret) names arbitrary code. Send them only over channels private
    /// to the requester and its children; the checksum then catches
    /// accidental corruption.
    ///
    /// # Errors
    ///
    /// [`TaskFnError::NotAnEntryChild`] unless this process was started as
    /// an entry ([`Builder::spawn_entry`](crate::Builder::spawn_entry) or
    /// [`Zygote::spawn_entry`](crate::Zygote::spawn_entry));
    /// [`TaskFnError::Corrupted`] if the offsets fail their checksum.
    #[allow(unsafe_code)] // the contract is the caller's; the transmutes are in `sys`
    pub unsafe fn call(&self, input: &[u8], output: &mut Vec<u8>) -> Result<(), TaskFnError> {
        let proof = sys::started_same_exe().ok_or(TaskFnError::NotAnEntryChild)?;
        if checksum(self.shim, self.runner, self.entry) != self.check {
            return Err(TaskFnError::Corrupted);
        }
        let base = crate::entry::anchor();
        let at = |offset: i64| base.wrapping_add(offset) as usize;
        let shim = sys::task_shim_at(proof, at(self.shim));
        shim(proof, at(self.runner), at(self.entry), input, output);
        Ok(())
    }
}

/// A panic caught by [`catch_panic`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Panic {
    /// The panic message (`"Box<dyn Any>"` for a payload that is not a
    /// string).
    pub message: String,
    /// Where it happened (`file:line:column`), when proc's panic hook saw
    /// it (it is installed in every child that runs an entry).
    pub location: Option<String>,
}

/// Runs `f`, catching a panic with its message and location.
pub fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, Panic> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => Ok(value),
        Err(payload) => {
            let message = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_owned()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "Box<dyn Any>".to_owned()
            };
            // Dropping a panic payload can itself panic: keep it from unwinding.
            std::mem::forget(payload);
            Err(Panic {
                message,
                location: crate::builder::take_panic_location(),
            })
        }
    }
}

/// Makes this process ignore SIGINT: for workers, whose parent decides
/// what Ctrl-C (sent to the whole process group) means.
///
/// # Errors
///
/// The OS error if the disposition could not be changed.
pub fn ignore_sigint() -> std::io::Result<()> {
    sys::set_disposition(libc::SIGINT, sys::Disposition::IGNORE).map(|_| ())
}

/// Stops printing panic messages in this process: for workers whose panics
/// travel back as results (with message and location), so a failing batch
/// does not flood stderr. The hook still records each panic's location.
pub fn quiet_panics() {
    crate::builder::install_panic_hook();
    crate::builder::QUIET_PANICS.store(true, std::sync::atomic::Ordering::Relaxed);
}
