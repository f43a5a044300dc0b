//! Python's `multiprocessing.Pool` for Rust: worker processes fed with
//! tasks, that never hang on a dead worker.
//!
//! - [`Pool::new`] / [`Pool::builder`] (`processes`, `initializer`,
//!   `maxtasksperchild`, start method).
//! - [`apply`](Pool::apply), [`apply_async`](Pool::apply_async) →
//!   [`AsyncResult`] (`get`, `get_timeout`, `wait`, `wait_timeout`,
//!   `ready`, `successful`).
//! - [`map`](Pool::map) / [`map_async`](Pool::map_async) with Python's
//!   chunking, [`imap`](Pool::imap) and
//!   [`imap_unordered`](Pool::imap_unordered) (lazy, bounded: an endless
//!   input works).
//! - [`close`](Pool::close), [`join`](Pool::join),
//!   [`terminate`](Pool::terminate).
//!
//! Tasks are *entries*: a function item or non-capturing closure
//! `fn(A) -> R` whose argument and result are serde types (a tuple `A`
//! covers several arguments), so they run under every start method.
//!
//! # Failures are results
//!
//! A task that panics gives [`TaskError::Panicked`] with its message and
//! location, and the worker goes on. A worker that dies while running a
//! task (SIGKILL, abort, segfault, the OOM killer) fails that task with
//! [`TaskError::WorkerDied`] within tens of milliseconds; the pool starts a
//! replacement and every other task still completes (Python's `Pool` hangs
//! forever there). Workers ignore SIGINT (the parent decides what Ctrl-C
//! means) and die with the parent, even when it is SIGKILLed.
//!
//! # Workers outlive threads
//!
//! With the `Fork` start method the first workers are forked from the
//! caller when the pool is made, and so is a [`Zygote`] that starts their
//! replacements, with the same memory picture: the pool keeps replacing
//! workers after the program has started threads. With `ForkServer` they
//! come from the fork server, with `Spawn` from a fresh exec.
//!
//! [`Zygote`]: proc_core::Zygote
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use proc_pool::Pool;
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! let pool = Pool::new(2)?;
//! let results: Vec<_> = (0..10).map(|i| pool.apply_async(square, i)).collect();
//! let mut total = 0;
//! for r in results {
//!     total += r?.get()?;
//! }
//! assert_eq!(total, 285);
//! pool.close();
//! pool.join()?;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

mod codec;
mod error;
mod pool;
mod result;
#[allow(unsafe_code)]
mod sys;
mod wire;
mod worker;

pub use error::{PoolError, TaskError};
pub use pool::{Pool, PoolBuilder};
pub use result::{AsyncResult, IMap, MapResult};
