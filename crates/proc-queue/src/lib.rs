//! Python's `multiprocessing.Queue` for Rust processes, on a ring buffer in
//! shared memory.
//!
//! - [`Queue<T>`]: `put` / `get` (blocking), `put_timeout` / `get_timeout`,
//!   `try_put` / `try_get` (Python's `*_nowait`), `qsize`, `empty`, `full`,
//!   `close`, with typed errors that hand the item back; `put_bytes` /
//!   `get_bytes` move byte strings with one copy each way.
//! - [`JoinableQueue<T>`]: `task_done` and `join`.
//! - [`SimpleQueue<T>`]: the small API.
//!
//! The ring lives in a `memfd` mapped `MAP_SHARED`: a queue created before a
//! fork is shared by parent and child. Producers take turns under one
//! lock, consumers under another; a lock's holder is known by a robust
//! process-shared mutex it holds for its life, so a process killed inside
//! `put` or `get` is detected (the kernel marks that mutex `EOWNERDEAD`)
//! and the next one carries on; nothing is ever published half-written (see
//! [`Queue`] for the exact guarantees). There is no feeder thread: a `put`
//! has written the message into shared memory when it returns.
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use proc_queue::Queue;
//!
//! let q: Queue<(u32, String)> = Queue::new()?;
//! let producer = q.clone();
//! let child = proc_core::spawn(move || {
//!     for i in 0..3 {
//!         producer.put((i, format!("item {i}"))).expect("put");
//!     }
//!     producer.close();
//! })?;
//! let mut got = Vec::new();
//! while let Ok(item) = q.get() {
//!     got.push(item);
//! }
//! child.join()?;
//! assert_eq!(got.len(), 3);
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

#[cfg(not(loom))]
mod error;
mod protocol;
#[cfg(not(loom))]
mod queue;
#[cfg(not(loom))]
mod ring;
#[cfg(not(loom))]
#[allow(unsafe_code)]
mod shm;
mod sync;
#[cfg(not(loom))]
mod wait;

#[cfg(not(loom))]
pub use error::{GetError, PutError, QueueError};
#[cfg(not(loom))]
pub use queue::{JoinableQueue, Queue, QueueBuilder, Received, SimpleQueue, DEFAULT_CAPACITY};
