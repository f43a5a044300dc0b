//! `proc`: Python's `multiprocessing` for Rust.
//!
//! Run work in real OS processes, wait for them, and get their typed results
//! back; write a process as a struct with a `run` method, as Python's process
//! classes do. The pieces live in their own crates and are re-exported here:
//!
//! | Python | `proc` |
//! |---|---|
//! | `Process(target=f, args=...)` | [`Process::new`]`(move \|\| f(args))` |
//! | `p.start()`, `p.join([timeout])` | [`Process::start`], [`Process::join`], [`Process::join_timeout`] |
//! | `p.name`, `p.daemon`, `p.pid`, `p.is_alive()`, `p.exitcode` | [`Process::name`], [`Process::set_daemon`], [`Process::pid`], [`Process::is_alive`], [`Process::exitcode`] |
//! | `p.terminate()`, `p.kill()` | [`Process::terminate`], [`Process::kill`] |
//! | a target's return value (not in Python) | [`spawn`] → [`JoinHandle::join`] |
//! | `class P(Process): def run(self)` | `impl` [`ProcessClass`] `for P` |
//! | `Queue(maxsize)`, `put`, `get`, `put_nowait`, `get_nowait` | [`Queue::with_maxsize`], [`Queue::put`], [`Queue::get`], [`Queue::try_put`], [`Queue::try_get`] |
//! | `q.put(x, timeout=t)`, `q.get(timeout=t)` | [`Queue::put_timeout`], [`Queue::get_timeout`] |
//! | `qsize()`, `empty()`, `full()`, `close()` | [`Queue::qsize`], [`Queue::empty`], [`Queue::full`], [`Queue::close`] |
//! | `JoinableQueue`, `SimpleQueue` | [`JoinableQueue`], [`SimpleQueue`] |
//! | `Pool(processes, initializer, initargs, maxtasksperchild)` | [`Pool::new`], [`Pool::builder`] ([`PoolBuilder::initializer`], [`PoolBuilder::maxtasksperchild`], [`PoolBuilder::start_method`]) |
//! | `pool.apply(f, args)`, `pool.apply_async(f, args)` → `AsyncResult` (`get`, `wait`, `ready`, `successful`) | [`Pool::apply`], [`Pool::apply_async`] → [`AsyncResult`] ([`AsyncResult::get`], [`AsyncResult::get_timeout`], [`AsyncResult::wait`], [`AsyncResult::ready`], [`AsyncResult::successful`]) |
//! | `pool.map`, `map_async`, `imap`, `imap_unordered`, `chunksize=` | [`Pool::map`], [`Pool::map_async`], [`Pool::imap`], [`Pool::imap_unordered`], [`Pool::map_chunked`], [`Pool::imap_chunked`] |
//! | `pool.close()`, `pool.join()`, `pool.terminate()` | [`Pool::close`], [`Pool::join`], [`Pool::terminate`] |
//! | `set_start_method("spawn")`, `get_context("spawn")` | [`set_start_method`], [`get_context`], [`Builder::start_method`] with [`StartMethod::Spawn`] and [`Builder::spawn_entry`]; [`init`] first in `main` |
//! | `os.getpid()`, `os.getppid()`, `sys.exit(info)` | [`getpid`], [`getppid`], [`exit`] |
//! | `current_process()`, `parent_process()`, `active_children()`, `cpu_count()` | [`current_process`], [`parent_process`], [`active_children`], [`cpu_count`] |
//!
//! # Examples
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use proc::prelude::*;
//!
//! let child = spawn(|| (1..=10u64).product::<u64>())?;
//! assert_eq!(child.join()?, 3_628_800);
//! let q: Queue<u64> = Queue::new()?;
//! q.put(7)?;
//! assert_eq!(q.get()?, 7);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub use proc_class::ProcessClass;
pub use proc_core::{
    active_children, cpu_count, current_process, exit, get_context, get_start_method, getpid,
    getppid, handoff, init, parent_process, set_start_method, spawn, Builder, Context, DecodeError,
    ExitInfo, JoinError, JoinHandle, Pid, Process, ProcessError, ProcessInfo, SpawnError,
    StartMethod, StartMethodError, Stdin, Zygote,
};
pub use proc_pool::{AsyncResult, IMap, MapResult, Pool, PoolBuilder, PoolError, TaskError};
pub use proc_queue::{
    GetError, JoinableQueue, PutError, Queue, QueueBuilder, QueueError, Received, SimpleQueue,
};

/// The names most programs need: `use proc::prelude::*;`.
pub mod prelude {
    pub use proc_class::ProcessClass;
    pub use proc_core::{spawn, Builder, JoinHandle, Process};
    pub use proc_pool::Pool;
    pub use proc_queue::{JoinableQueue, Queue, SimpleQueue};
}
