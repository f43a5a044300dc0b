//! The atomics the ring protocol uses: std's, or loom's under `--cfg loom`
//! (so `RUSTFLAGS="--cfg loom" cargo test -p proc-queue --lib --release loom`
//! model-checks the protocol with threads standing in for processes).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
