//! The pool: its workers, their queues, and the bookkeeping that knows
//! which worker holds which task.
//!
//! Each worker has its own task queue; all workers share one result queue.
//! The pool (in the calling process, under a mutex, no helper thread)
//! sends tasks to the least loaded worker, remembers what it sent to whom,
//! and reads results whenever a caller waits for one. When a worker dies,
//! the pool reads back what is still in its queue: the tasks it finds there
//! go to other workers, and of those the worker had taken, the first one
//! without a result is the one it was running (it fails with
//! [`TaskError::WorkerDied`]); the others it had taken but not started are
//! sent again. Then a replacement starts on the same queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use proc_core::task::TaskFn;
use proc_core::{Builder, JoinError, JoinHandle, Pid, SpawnError, StartMethod, Zygote};
use proc_queue::{GetError, Queue, Received};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{PoolError, TaskError};
use crate::result::{AsyncResult, IMap, MapResult, MapSink};
use crate::wire;
use crate::worker::{worker_main, WorkerArgs};

/// Each worker's task ring (bytes). A fresh pool pays for every ring page
/// it touches the first time (a page fault and a zeroed page: several µs
/// each on a VM), so the rings are no larger than a map's chunks need to
/// travel whole: a chunk of a map of a million `u64`s over two workers
/// (125,000 items, 1 MB) fits in half of it.
const TASK_RING: usize = 2 << 20;
/// The result ring (bytes), shared by the workers. As small as the task
/// ring, for the same reason: a map's 1 MB chunk results still travel
/// whole (at most two in it at once), and a fresh pool's first map of a
/// million `u64`s (W6) measured 1.056 and 1.100 against a 4 MiB ring (100
/// and 60 alternated runs; 1 MiB, where they stream, measured 1.049).
const RESULT_RING: usize = 2 << 20;
/// Largest task message put without streaming (half the ring, less the
/// record header).
const SINGLE_MAX: usize = TASK_RING / 2 - 64;
/// A batch of small tasks sent as one message: at most this many bytes...
const BATCH_BYTES: usize = 64 << 10;
/// ...and this many tasks.
const BATCH_TASKS: usize = 256;
/// Tasks shorter than this (on average) are held back while every worker
/// has work queued, and sent in batches: at most `BATCH_TASKS` of them,
/// about 25 ms of work, wait for the caller's next call into the pool.
const BATCH_BELOW_MICROS: u32 = 100;
/// How often workers are checked for death while results flow.
const CHECK_EVERY: Duration = Duration::from_millis(20);
/// The longest a waiting caller sleeps on the result queue before it
/// checks the workers.
const PUMP_SLICE: Duration = Duration::from_millis(10);
/// How long terminate() waits after SIGTERM before SIGKILL.
const TERMINATE_GRACE: Duration = Duration::from_secs(1);
/// How long a worker retired by `maxtasksperchild` may take to exit
/// before it is killed.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// A pool of worker processes (Python's `multiprocessing.Pool`).
///
/// Tasks are *entries*: a function item or non-capturing closure
/// `fn(A) -> R` with serde arguments and result (a tuple `A` covers
/// Python's `args` and `starmap`), so they run under every start method.
///
/// # Dropping
///
/// Dropping a pool that was not joined terminates it, as leaving Python's
/// `with Pool() as pool:` block does: workers get SIGTERM (SIGKILL after a
/// second), are reaped, and results not yet in fail with
/// [`TaskError::Terminated`]. To wait for the work instead, call
/// [`close`](Pool::close) then [`join`](Pool::join). No worker outlives the
/// pool's process, even when it is SIGKILLed.
///
/// Once a joined or terminated pool is dropped (its last result handle
/// too), its shared-memory rings — no process uses them any more — are
/// kept, emptied, for the next pools this process makes: up to eight
/// (2 MiB for each worker's tasks, 2 MiB for the results, of which what
/// was used stays resident) until the process ends.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use proc_pool::Pool;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// let pool = Pool::new(2)?;
/// let pending = pool.apply_async(square, 7)?;
/// assert_eq!(pool.map(square, 1..=4)?, vec![1, 4, 9, 16]);
/// assert_eq!(pending.get()?, 49);
/// pool.close();
/// pool.join()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// How a pool is made (Python's `Pool(processes, initializer, initargs,
/// maxtasksperchild)` and `context`).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use proc_pool::Pool;
///
/// static SEED: AtomicU64 = AtomicU64::new(0);
///
/// fn init(seed: u64) {
///     SEED.store(seed, Ordering::Relaxed); // once in every worker
/// }
/// fn salted(x: u64) -> u64 {
///     x + SEED.load(Ordering::Relaxed)
/// }
///
/// let pool = Pool::builder()
///     .processes(2)
///     .initializer(init, 1000)?
///     .maxtasksperchild(50) // each worker is replaced after 50 tasks
///     .build()?;
/// assert_eq!(pool.map(salted, 0..200)?[199], 1199);
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct PoolBuilder {
    processes: Option<usize>,
    maxtasks: Option<u64>,
    initializer: Option<(TaskFn, Vec<u8>)>,
    method: Option<StartMethod>,
}

impl PoolBuilder {
    /// The number of worker processes (default: [`proc_core::cpu_count`]).
    pub fn processes(mut self, n: usize) -> Self {
        self.processes = Some(n);
        self
    }

    /// Replace each worker after it has run `n` tasks (Python's
    /// `maxtasksperchild`; default: never).
    pub fn maxtasksperchild(mut self, n: u64) -> Self {
        self.maxtasks = Some(n.max(1));
        self
    }

    /// Run `f(args)` once in every worker before its first task,
    /// replacements included (Python's `initializer` and `initargs`). If
    /// it panics, the pool stops starting workers and its tasks fail with
    /// [`TaskError::InitializerFailed`].
    ///
    /// # Errors
    ///
    /// [`TaskError::ArgsEncode`] if `args` does not serialize.
    pub fn initializer<A>(mut self, f: fn(A), args: A) -> Result<Self, TaskError>
    where
        A: Serialize + DeserializeOwned,
    {
        let mut chunk = Vec::new();
        wire::encode_one(&args, &mut chunk).map_err(TaskError::ArgsEncode)?;
        self.initializer = Some((TaskFn::new(wire::run_chunk::<A, ()>, f), chunk));
        Ok(self)
    }

    /// How workers are started (default: the process-wide
    /// [`proc_core::get_start_method`]). With [`StartMethod::Fork`] the
    /// first ones are forked from this process when the pool is made and
    /// their replacements come from a [`Zygote`] forked then too (this
    /// process must be single-threaded then, not later); with
    /// `ForkServer` from the fork server; with `Spawn` each is a fresh
    /// exec. The last two need [`proc_core::init`] in `main`.
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.method = Some(method);
        self
    }

    /// Starts the workers.
    ///
    /// # Errors
    ///
    /// [`PoolError::NoProcesses`] for zero processes;
    /// [`PoolError::Spawn`] when a worker (or, for `Fork`, the zygote:
    /// [`SpawnError::Threaded`] if this process has threads) cannot be
    /// started; [`PoolError::Queue`] when shared memory runs out.
    pub fn build(self) -> Result<Pool, PoolError> {
        let processes = self.processes.unwrap_or_else(proc_core::cpu_count);
        if processes == 0 {
            return Err(PoolError::NoProcesses);
        }
        let method = self.method.unwrap_or_else(proc_core::get_start_method);
        let results = ring(RESULT_RING)?;
        let config = Config {
            maxtasks: self.maxtasks,
            initializer: self.initializer,
        };
        let mut state = State {
            workers: Vec::with_capacity(processes),
            zygote: None,
            pending: VecDeque::new(),
            done: HashMap::default(),
            abandoned: HashSet::default(),
            next_id: 0,
            phase: Phase::Running,
            pumping: false,
            joining: false,
            reaping: None,
            results_read: 0,
            untracked: false,
            results_broken: false,
            retiring: Vec::new(),
            broken: None,
            unready_deaths: 0,
            last_retry: Instant::now(),
            no_workers_since: None,
            last_check: Instant::now(),
            started: 0,
            unfinished: 0,
            task_micros: f64::from(BATCH_BELOW_MICROS) * 10.0,
            spare: Vec::new(),
            method,
        };
        for _ in 0..processes {
            let queue = ring(TASK_RING)?;
            state.workers.push(Worker {
                queue,
                handle: None,
                outstanding: VecDeque::new(),
                budget: config.maxtasks,
                ready: false,
                remote: false,
                settle_at: None,
            });
        }
        if let Err(e) = start_all(&config, &mut state, &results) {
            // Nothing half-made stays behind: started workers are stopped
            // and reaped (the zygote, dropped with the state, ends too).
            for w in &mut state.workers {
                w.queue.close();
                if let Some(mut handle) = w.handle.take() {
                    let _ = handle.kill();
                    let _ = handle.wait();
                }
            }
            return Err(e.into());
        }
        Ok(Pool {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                cond: Condvar::new(),
                results,
                config,
                owner: std::process::id(),
            }),
        })
    }
}

#[derive(Debug)]
struct Config {
    maxtasks: Option<u64>,
    initializer: Option<(TaskFn, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Closed,
    Joined,
    Terminated,
}

/// A task record (header and arguments) and its id.
#[derive(Debug)]
struct Task {
    id: u64,
    record: Vec<u8>,
}

#[derive(Debug)]
struct Worker {
    /// Its task queue; its index in `State::workers` is its name in
    /// result messages.
    queue: Queue<()>,
    /// `None` while no process serves this queue.
    handle: Option<JoinHandle<()>>,
    /// Sent to this worker, no result yet, in the order sent.
    outstanding: VecDeque<Task>,
    /// Tasks this worker process may still be sent (`maxtasksperchild`).
    budget: Option<u64>,
    /// Whether this worker process reported its initializer done.
    ready: bool,
    /// Whether its process is a child of a zygote or of the fork server,
    /// which report its status (lost if they die first).
    remote: bool,
    /// Its process is dead: settled once `State::results_read` reaches
    /// this (the results it finished read; see `check_workers`).
    settle_at: Option<u64>,
}

/// How often an empty worker slot is given a new process again.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long replacements are retried while no worker runs at all, before
/// the pool fails its tasks with `NoWorkers`.
const NO_WORKERS_GRACE: Duration = Duration::from_secs(2);

/// Workers dying before their initializer is done, in a row, that break
/// the pool (see `Shared::settle_dead`).
const UNREADY_DEATHS: u32 = 3;

/// Task ids are sequential: a multiply spreads them well enough, at a
/// fraction of SipHash's cost.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdBuild = std::hash::BuildHasherDefault<IdHasher>;

/// A finished task: the result message and where the runner output starts
/// in it, or an error the pool decided.
#[derive(Debug)]
pub(crate) enum Done {
    Output { message: Vec<u8>, start: usize },
    Failed(TaskError),
}

impl Done {
    /// The task's items.
    pub(crate) fn items<R: DeserializeOwned>(
        &self,
        expected: usize,
    ) -> Result<Vec<Result<R, TaskError>>, TaskError> {
        let mut items = Vec::with_capacity(expected);
        self.for_each(expected, |item| {
            items.push(item);
            true
        })?;
        Ok(items)
    }

    /// Hands each item to `each`, in order, until it returns false.
    pub(crate) fn for_each<R: DeserializeOwned>(
        &self,
        expected: usize,
        each: impl FnMut(Result<R, TaskError>) -> bool,
    ) -> Result<(), TaskError> {
        match self {
            Done::Output { message, start } => {
                wire::for_each_item(&message[*start..], expected, each)
            }
            Done::Failed(e) => Err(e.clone()),
        }
    }

    /// Whether every item succeeded (without decoding the values).
    pub(crate) fn successful(&self) -> bool {
        match self {
            Done::Failed(_) => false,
            Done::Output { message, start } => wire::all_ok(&message[*start..]).unwrap_or(false),
        }
    }
}

/// A taker of results that reads them where they lie in the result ring,
/// with no copy: a blocking map, decoding each chunk's values into their
/// places as the chunk's result comes, in any order. It is handed to the
/// pool by the thread waiting for those results ([`Inner::take_with`]),
/// and used while that thread reads the ring; results read by other
/// threads meanwhile are copied for it as for any taker.
pub(crate) trait Sink {
    /// Takes on task `id`, of `items` items, as it is submitted.
    fn add(&mut self, id: u64, items: usize);
    /// Whether it reads task `id`'s output (one of its tasks, not read
    /// yet).
    fn wants(&self, id: u64) -> bool;
    /// Reads task `id`'s output (the runner's output, see [`wire`]).
    ///
    /// It runs under the pool's lock, with the result ring's consumer side
    /// held: it decodes (the caller's `Deserialize`), and must not call
    /// into the pool.
    fn read(&mut self, id: u64, output: &[u8]);
    /// Takes the failure of task `id` as a whole.
    fn fail(&mut self, id: u64, error: TaskError);
}

/// A [`Sink`] in the hands of the thread reading the result ring.
struct Direct<'a> {
    sink: &'a mut dyn Sink,
    /// A panic of the sink's `read` (its `Deserialize`), for its thread to
    /// go on with once the pool's lock is let go (it ends the thread's
    /// `progress_with`).
    panic: Option<Box<dyn std::any::Any + Send>>,
}

impl<'a> Direct<'a> {
    fn new(sink: &'a mut dyn Sink) -> Self {
        Direct { sink, panic: None }
    }

    /// The sink back, once the pool's lock is let go; a panic of its
    /// `read` goes on from here.
    fn finish(self) -> &'a mut dyn Sink {
        if let Some(panic) = self.panic {
            std::panic::resume_unwind(panic);
        }
        self.sink
    }
}

/// A worker's handle that `join` waits on, with when the worker retired
/// if `maxtasksperchild` retired it.
type Reaping = (JoinHandle<()>, Option<Instant>);

#[derive(Debug)]
struct State {
    workers: Vec<Worker>,
    zygote: Option<Zygote>,
    /// Tasks not yet in any worker's queue, in order.
    pending: VecDeque<Task>,
    /// Finished tasks whose results nobody has taken yet.
    done: HashMap<u64, Done, IdBuild>,
    /// Tasks whose result nobody will take (dropped handles).
    abandoned: HashSet<u64, IdBuild>,
    next_id: u64,
    phase: Phase,
    /// A caller is waiting on the result queue (without the lock).
    pumping: bool,
    /// A `join` or `terminate` is waiting for the workers to exit (their
    /// handles are out of the state), and, for a join, those handles:
    /// `terminate` stops the workers through them.
    joining: bool,
    reaping: Option<Arc<Vec<Reaping>>>,
    /// Result messages taken from the result queue so far.
    results_read: u64,
    /// A worker process may exist that the pool holds no handle of (a
    /// remote start that failed once its request had left, a wait that
    /// failed): the pool's rings go to no other pool.
    untracked: bool,
    /// The result queue failed (see `results_failed`).
    results_broken: bool,
    /// Workers retired by `maxtasksperchild`, not reaped yet, and when.
    retiring: Vec<(JoinHandle<()>, Instant)>,
    /// Set when the initializer failed: every task fails with it.
    broken: Option<TaskError>,
    /// Worker processes that died before their initializer was done, in a
    /// row (with an initializer: see `settle_dead`).
    unready_deaths: u32,
    /// When an empty worker slot was last given a new process.
    last_retry: Instant,
    /// Since when no worker process runs (their replacements failing).
    no_workers_since: Option<Instant>,
    last_check: Instant,
    /// Worker processes started so far (for their names).
    started: u64,
    /// Tasks submitted and not finished.
    unfinished: usize,
    /// A moving average of how long a task runs (µs).
    task_micros: f64,
    /// Buffers of finished messages, for the next ones.
    spare: Vec<Vec<u8>>,
    /// How workers are started now: the configured method, or the fork
    /// server once a `Fork` pool's zygote is gone in a threaded process.
    method: StartMethod,
}

/// Buffers kept for reuse, and the largest kept: memory reused is memory
/// whose pages are already mapped (a fresh megabyte costs 256 page faults,
/// several µs each on a VM).
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX_BYTES: usize = 8 << 20;

impl State {
    /// Whether a large task submitted now would go out at once, to a
    /// worker with at most one other task queued behind the one it runs
    /// (and no task pending before it), or to the replacement of a retired
    /// worker with nothing left to run (`dispatch` starts it); also when no
    /// worker lives (it is then for the pool to start one or fail the
    /// task).
    fn room_for_large(&self) -> bool {
        if !self.pending.is_empty() {
            return false;
        }
        let mut live = self
            .workers
            .iter()
            .filter(|w| w.handle.is_some())
            .peekable();
        live.peek().is_none()
            || live.any(|w| match w.budget {
                Some(0) => w.outstanding.is_empty(),
                _ => w.outstanding.len() < 2,
            })
    }

    fn buffer(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_default()
    }

    /// Puts `tasks` back at the front of the pending ones, in their order.
    fn requeue_front(&mut self, tasks: Vec<Task>) {
        for task in tasks.into_iter().rev() {
            self.pending.push_front(task);
        }
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > 0
            && self.spare.len() < SPARE_BUFFERS
            && buf.capacity() <= SPARE_MAX_BYTES
        {
            buf.clear();
            self.spare.push(buf);
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    state: Mutex<State>,
    cond: Condvar,
    results: Queue<()>,
    config: Config,
    /// The process that made the pool (a forked copy of a handle is not).
    owner: u32,
}

/// Starts a process for every worker of a new pool.
fn start_all(config: &Config, state: &mut State, results: &Queue<()>) -> Result<(), SpawnError> {
    // With `Fork`, this process is single-threaded now (each fork checks):
    // the first workers are forked from it directly (the zygote is not in
    // the state yet), and the zygote, forked just before them with the same
    // memory picture, starts the replacements (the process may have
    // threads by then). (The zygote forking half of them meanwhile
    // measured no faster here.)
    let zygote = match state.method {
        StartMethod::Fork => Some(Zygote::new()?),
        _ => None,
    };
    for i in 0..state.workers.len() {
        let handle = start_worker(config, state, i, results)?;
        state.workers[i].handle = Some(handle);
    }
    state.zygote = zygote;
    Ok(())
}

/// What worker `i`'s process is started with.
fn worker_start(
    config: &Config,
    state: &State,
    i: usize,
    results: &Queue<()>,
) -> (Builder, WorkerArgs) {
    let prefix = match state.method {
        StartMethod::Spawn => "Spawn",
        StartMethod::ForkServer => "ForkServer",
        _ => "Fork",
    };
    let builder = Builder::new()
        .name(format!("{prefix}PoolWorker-{}", state.started))
        .daemon(true)
        .start_method(state.method);
    let worker = &state.workers[i];
    let args = WorkerArgs {
        index: i as u32,
        tasks: worker.queue.clone(),
        results: results.clone(),
        maxtasks: config.maxtasks,
        initializer: config.initializer.clone(),
    };
    (builder, args)
}

/// Takes every message left in a worker's task queue (its worker gone or
/// not to run them), handing each to `each`; a garbled one is skipped (up
/// to 64 of them).
fn take_untaken(queue: &Queue<()>, mut each: impl FnMut(Vec<u8>)) {
    let mut failures = 0;
    while failures < 64 {
        match queue.try_get_bytes() {
            Ok(message) => each(message),
            Err(GetError::Failed(_)) => failures += 1,
            Err(_) => break,
        }
    }
}

/// Starts a process for worker `i`.
fn start_worker(
    config: &Config,
    state: &mut State,
    i: usize,
    results: &Queue<()>,
) -> Result<JoinHandle<()>, SpawnError> {
    state.started += 1;
    let (builder, args) = worker_start(config, state, i, results);
    state.workers[i].remote = state.zygote.is_some() || state.method == StartMethod::ForkServer;
    match &state.zygote {
        Some(zygote) => zygote.spawn_entry(builder, worker_main, args),
        None => builder.spawn_entry(worker_main, args),
    }
}

/// A map's input: the caller's iterator, where its length is known, or
/// its items collected to learn it.
enum Items<I: Iterator> {
    Known(I),
    Collected(std::vec::IntoIter<I::Item>),
}

impl<I: Iterator> Iterator for Items<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        match self {
            Items::Known(items) => items.next(),
            Items::Collected(items) => items.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Items::Known(items) => items.size_hint(),
            Items::Collected(items) => items.size_hint(),
        }
    }
}

impl Pool {
    /// A pool of `processes` workers started with the process-wide start
    /// method (Python's `Pool(processes)`).
    ///
    /// # Errors
    ///
    /// As [`PoolBuilder::build`].
    pub fn new(processes: usize) -> Result<Pool, PoolError> {
        Pool::builder().processes(processes).build()
    }

    /// A builder for the other settings.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of worker processes.
    pub fn processes(&self) -> usize {
        self.inner.state.lock().workers.len()
    }

    /// The pids of the worker processes running now.
    pub fn worker_pids(&self) -> Vec<Pid> {
        let state = self.inner.state.lock();
        state
            .workers
            .iter()
            .filter_map(|w| w.handle.as_ref().map(JoinHandle::pid))
            .collect()
    }

    /// Runs `f(args)` in a worker and waits for its result (Python's
    /// `apply`).
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use proc_pool::{Pool, TaskError};
    ///
    /// fn divide((a, b): (u32, u32)) -> u32 {
    ///     a / b
    /// }
    /// let pool = Pool::new(1)?;
    /// assert_eq!(pool.apply(divide, (84, 2)), Ok(42));
    /// // A panic is the task's error; the worker goes on.
    /// assert!(matches!(pool.apply(divide, (1, 0)), Err(TaskError::Panicked { .. })));
    /// assert_eq!(pool.apply(divide, (9, 3)), Ok(3));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The task's [`TaskError`].
    pub fn apply<A, R>(&self, f: fn(A) -> R, args: A) -> Result<R, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        self.apply_async(f, args)?.get()
    }

    /// Sends `f(args)` to a worker and returns at once (Python's
    /// `apply_async`).
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use proc_pool::{Pool, TaskError};
    ///
    /// fn slow_square(x: u64) -> u64 {
    ///     std::thread::sleep(Duration::from_millis(100));
    ///     x * x
    /// }
    /// let pool = Pool::new(2)?;
    /// let mut pending = pool.apply_async(slow_square, 9)?;
    /// assert!(!pending.ready());
    /// assert_eq!(pending.get_timeout(Duration::from_millis(1)), Err(TaskError::Timeout));
    /// assert_eq!(pending.get_timeout(Duration::from_secs(5)), Ok(81));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`TaskError::NotRunning`] after [`close`](Pool::close) or
    /// [`terminate`](Pool::terminate); [`TaskError::ArgsEncode`] if `args`
    /// does not serialize.
    pub fn apply_async<A, R>(&self, f: fn(A) -> R, args: A) -> Result<AsyncResult<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let func = TaskFn::new(wire::run_chunk::<A, R>, f);
        let mut record = Vec::with_capacity(96);
        let len_at = wire::begin_record(func, &mut record);
        wire::encode_one(&args, &mut record).map_err(TaskError::ArgsEncode)?;
        wire::end_record(&mut record, len_at).map_err(TaskError::ArgsEncode)?;
        let id = self.inner.submit(record)?;
        Ok(AsyncResult::new(self.inner.clone(), id))
    }

    /// Applies `f` to every item, in chunks, and returns the results in
    /// order (Python's `map`), or the first failure in order.
    ///
    /// The chunk size is Python's: `ceil(n / (4 × processes))`. Unlike
    /// [`map_async`](Pool::map_async), which sends every chunk at once,
    /// large chunks (over 64 KiB of arguments) are taken from the input
    /// and sent as the workers take them, and each chunk's results are
    /// decoded into their places as they arrive, in any order (a result's
    /// `Deserialize` then runs under the pool's lock: it must not use the
    /// pool). Once a chunk has failed, the rest of the input is not sent:
    /// the answer is that failure or an earlier one. A pool closed or
    /// terminated from another thread while a map still sends its chunks
    /// fails the map with [`TaskError::NotRunning`], unless a chunk sent
    /// before failed.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// fn area((w, h): (u32, u32)) -> u32 {
    ///     w * h
    /// }
    /// let pool = proc_pool::Pool::new(2)?;
    /// // A tuple argument is Python's starmap.
    /// assert_eq!(pool.map(area, [(2, 3), (4, 5)])?, vec![6, 20]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// The first item's [`TaskError`], in input order.
    pub fn map<A, R, I>(&self, f: fn(A) -> R, items: I) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let (items, chunksize) = self.default_chunks(items);
        self.map_blocking(f, items, chunksize)
    }

    /// [`map`](Pool::map) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`map`](Pool::map).
    pub fn map_chunked<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.map_blocking(f, items.into_iter(), chunksize.max(1))
    }

    /// Sends the chunks of a [`map`](Pool::map) and returns at once
    /// (Python's `map_async`).
    ///
    /// # Errors
    ///
    /// As [`apply_async`](Pool::apply_async).
    pub fn map_async<A, R, I>(&self, f: fn(A) -> R, items: I) -> Result<MapResult<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let (items, chunksize) = self.default_chunks(items);
        self.submit_chunks(f, items, chunksize)
    }

    /// The items of a map and Python's chunk size for them, `ceil(n / (4 ×
    /// processes))`. Where the length is known, the chunks are taken
    /// straight from the iterator, with no copy of the whole input.
    fn default_chunks<A, I>(&self, items: I) -> (Items<I::IntoIter>, usize)
    where
        I: IntoIterator<Item = A>,
    {
        let items = items.into_iter();
        let quarters = self.processes() * 4;
        match items.size_hint() {
            (low, Some(high)) if low == high => {
                (Items::Known(items), low.div_ceil(quarters).max(1))
            }
            _ => {
                let items: Vec<A> = items.collect();
                let chunksize = items.len().div_ceil(quarters).max(1);
                (Items::Collected(items.into_iter()), chunksize)
            }
        }
    }

    /// A blocking map: each chunk is encoded and sent when a worker can
    /// take it, and the results that arrive meanwhile are decoded into
    /// their places straight from the result ring.
    ///
    /// Large chunks (records over [`BATCH_BYTES`]) are sent no faster
    /// than the workers take them: at most one waits queued for each
    /// worker. Encoded all at once, as `map_async` must, the chunks beyond
    /// those wait in their own buffers, fresh memory for each in a fresh
    /// process (in W6, the first map of a pool, four of its eight 1 MB
    /// chunks waited so: some 1,000 page faults). Smaller ones go out as
    /// they are encoded, to be batched.
    fn map_blocking<A, R, I>(
        &self,
        f: fn(A) -> R,
        mut items: I,
        chunksize: usize,
    ) -> Result<Vec<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: Iterator<Item = A>,
    {
        let mut chunks = wire::ChunkRecords::new(f, chunksize);
        let mut sink = MapSink::with_capacity(&self.inner, items.size_hint().0);
        loop {
            let mut record = self.inner.buffer();
            let Some((len, encoded)) = chunks.next(&mut items, &mut record) else {
                self.inner.recycle(record);
                return sink.finish();
            };
            let sent = encoded.and_then(|()| {
                let large = record.len() > BATCH_BYTES;
                self.inner.submit_with(record, len, Some(&mut sink))?;
                Ok(large)
            });
            match sent {
                Ok(large) => {
                    if large {
                        self.inner.wait_for_room(&mut sink);
                    }
                    if sink.failed() {
                        // The answer is decided: nothing later counts.
                        return sink.finish();
                    }
                }
                // The chunks sent before come first in input order.
                Err(e) => return sink.finish().and(Err(e)),
            }
        }
    }

    /// [`map_async`](Pool::map_async) with an explicit chunk size.
    ///
    /// # Errors
    ///
    /// As [`apply_async`](Pool::apply_async).
    pub fn map_async_chunked<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> Result<MapResult<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.submit_chunks(f, items, chunksize.max(1))
    }

    fn submit_chunks<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> Result<MapResult<R>, TaskError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let mut chunks = wire::ChunkRecords::new(f, chunksize);
        let mut result = MapResult::new(self.inner.clone());
        let mut items = items.into_iter();
        // Each chunk goes out as soon as it is encoded: the workers start
        // while the rest is being encoded.
        loop {
            let mut record = self.inner.buffer();
            let Some((len, encoded)) = chunks.next(&mut items, &mut record) else {
                self.inner.recycle(record);
                return Ok(result);
            };
            encoded?;
            let id = self.inner.submit(record)?;
            result.push(id, len);
        }
    }

    /// Applies `f` to every item lazily, one item per task, yielding the
    /// results in order (Python's `imap`). Only a bounded number of tasks
    /// is in flight, so an endless iterator works.
    ///
    /// Items are sent as the iterator is consumed: unlike Python, where
    /// every item is queued at once, an iterator consumed after
    /// [`close`](Pool::close) yields the results of what was in flight,
    /// then `Err(TaskError::NotRunning)` for the items of the next chunk,
    /// and ends (the rest of the input is not taken). Consume it before
    /// closing the pool. An item that cannot be sent (its argument does
    /// not serialize) fails in its own place.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// fn collatz_steps(mut n: u64) -> u32 {
    ///     let mut steps = 0;
    ///     while n != 1 {
    ///         n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
    ///         steps += 1;
    ///     }
    ///     steps
    /// }
    /// let pool = proc_pool::Pool::new(2)?;
    /// // The first number needing more than 100 steps, from an endless input.
    /// let first = (1u64..)
    ///     .zip(pool.imap(collatz_steps, 1u64..))
    ///     .find(|(_, steps)| *steps.as_ref().unwrap_or(&0) > 100)
    ///     .map(|(n, _)| n);
    /// assert_eq!(first, Some(27));
    /// # Ok(()) }
    /// ```
    pub fn imap<A, R, I>(&self, f: fn(A) -> R, items: I) -> IMap<R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_chunked(f, items, 1)
    }

    /// [`imap`](Pool::imap) sending `chunksize` items per task.
    pub fn imap_chunked<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> IMap<R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_with(f, items, chunksize, true)
    }

    /// As [`imap`](Pool::imap), yielding results in the order they finish
    /// (Python's `imap_unordered`).
    pub fn imap_unordered<A, R, I>(&self, f: fn(A) -> R, items: I) -> IMap<R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_unordered_chunked(f, items, 1)
    }

    /// [`imap_unordered`](Pool::imap_unordered) sending `chunksize` items
    /// per task.
    pub fn imap_unordered_chunked<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
    ) -> IMap<R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        self.imap_with(f, items, chunksize, false)
    }

    /// The iterator behind the four `imap` calls: at most 8 tasks per
    /// worker in flight.
    fn imap_with<A, R, I>(
        &self,
        f: fn(A) -> R,
        items: I,
        chunksize: usize,
        ordered: bool,
    ) -> IMap<R, I::IntoIter>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let window = self.processes() * 8;
        IMap::new(
            self.inner.clone(),
            wire::ChunkRecords::new(f, chunksize),
            items.into_iter(),
            window,
            ordered,
        )
    }

    /// No more tasks: the workers finish what was sent and then exit
    /// (Python's `close`).
    pub fn close(&self) {
        let mut state = self.inner.state.lock();
        if state.phase == Phase::Running {
            state.phase = Phase::Closed;
        }
    }

    /// Stops the workers now (SIGTERM, then SIGKILL after a second) and
    /// reaps them; tasks not finished fail with [`TaskError::Terminated`]
    /// (Python's `terminate`). While a [`join`](Pool::join) on another
    /// thread waits for the workers to exit (one running an endless task,
    /// say), it has that join SIGKILL them and returns once the join is
    /// done.
    ///
    /// # Examples
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use proc_pool::{Pool, TaskError};
    ///
    /// fn forever(_: ()) {
    ///     loop {
    ///         std::thread::sleep(std::time::Duration::from_secs(1));
    ///     }
    /// }
    /// let pool = Pool::new(1)?;
    /// let stuck = pool.apply_async(forever, ())?;
    /// pool.terminate();
    /// assert_eq!(stuck.get(), Err(TaskError::Terminated));
    /// # Ok(()) }
    /// ```
    pub fn terminate(&self) {
        self.inner.terminate();
    }

    /// Waits for every task to finish and every worker to exit, after
    /// [`close`](Pool::close) or [`terminate`](Pool::terminate) (Python's
    /// `join`). Workers that die meanwhile are still replaced, so every
    /// task ends with a result or a [`TaskError`].
    ///
    /// # Errors
    ///
    /// [`PoolError::StillRunning`] if neither was called.
    pub fn join(&self) -> Result<(), PoolError> {
        self.inner.join()
    }
}

/// The rings of pools that ended, for the next pools of this process
/// (owned by the process of that pid: a forked child does not take its
/// parent's, which the parent may hand to its own next pool).
static RING_CACHE: parking_lot::Mutex<(u32, Vec<Queue<()>>)> =
    parking_lot::const_mutex((0, Vec::new()));

/// At most this many rings are kept.
const RING_CACHE_MAX: usize = 8;

/// A ring of `capacity` bytes for a new pool: one a pool of this process
/// left, emptied, or a new one. Making a ring (a memfd, its size, a
/// mapping, the faults of its first use) and dropping it again were a
/// sixth of a short-lived pool's cost in the parent (W8).
fn ring(capacity: usize) -> Result<Queue<()>, proc_queue::QueueError> {
    let cached = ring_cache().and_then(|mut cache| {
        let at = cache.iter().position(|q| q.capacity() == capacity);
        at.map(|i| cache.swap_remove(i))
    });
    match cached.map(Queue::into_fresh) {
        Some(Ok(queue)) => Ok(queue),
        _ => Queue::builder().capacity(capacity).build(),
    }
}

/// Keeps the rings of a pool whose processes are all gone for the next
/// pools of this process (see [`ring`]).
fn keep_rings(rings: impl IntoIterator<Item = Queue<()>>) {
    // (Held by another thread: these are dropped.)
    let Some(mut cache) = ring_cache() else {
        return;
    };
    for ring in rings {
        if cache.len() < RING_CACHE_MAX {
            cache.push(ring);
        }
    }
}

/// This process's ring cache, if its lock is free: tried, because a child
/// forked while a thread of its parent held it would wait for ever. One
/// inherited across a fork is the parent's, not ours to use: emptied.
fn ring_cache() -> Option<parking_lot::MappedMutexGuard<'static, Vec<Queue<()>>>> {
    let mut cache = RING_CACHE.try_lock()?;
    let me = std::process::id();
    if cache.0 != me {
        cache.1.clear();
        cache.0 = me;
    }
    Some(parking_lot::MutexGuard::map(cache, |c| &mut c.1))
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Joined or terminated, and the wait for the workers over: every
        // worker process of the pool (retired ones too) is gone, and the
        // zygote, which only forks, takes no more requests. No process
        // uses the rings any more; results and tasks left in them are
        // dropped when the next pool empties them.
        let state = self.state.get_mut();
        let ended = self.owner == std::process::id()
            && matches!(state.phase, Phase::Joined | Phase::Terminated)
            && !state.untracked
            && !state.joining
            && !state.results_broken
            && state.retiring.is_empty()
            && state.workers.iter().all(|w| w.handle.is_none());
        if ended {
            let tasks = state.workers.drain(..).map(|w| w.queue);
            keep_rings(tasks.chain(std::iter::once(self.results.clone())));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let phase = self.inner.state.lock().phase;
        if phase != Phase::Joined {
            self.inner.terminate();
        }
    }
}

impl Inner {
    /// Queues a task; returns its id.
    pub(crate) fn submit(&self, record: Vec<u8>) -> Result<u64, TaskError> {
        self.submit_locked(record, 0, None)
    }

    /// [`submit`](Inner::submit) for a task of `items` items that `sink`
    /// takes (see [`take_with`](Inner::take_with)): it is added to the
    /// sink before it can finish, and the results this submission reads
    /// are the sink's to read where they lie if it wants them. (Read
    /// without it, a map's results would be copied out of the ring while
    /// the map still sends chunks.)
    pub(crate) fn submit_with(
        &self,
        record: Vec<u8>,
        items: usize,
        sink: Option<&mut dyn Sink>,
    ) -> Result<u64, TaskError> {
        let mut direct = sink.map(Direct::new);
        let submitted = self.submit_locked(record, items, direct.as_mut());
        if let Some(direct) = direct {
            direct.finish();
        }
        submitted
    }

    fn submit_locked(
        &self,
        mut record: Vec<u8>,
        items: usize,
        mut direct: Option<&mut Direct<'_>>,
    ) -> Result<u64, TaskError> {
        let mut state = self.state.lock();
        if state.phase != Phase::Running {
            return Err(TaskError::NotRunning);
        }
        let id = state.next_id;
        state.next_id += 1;
        if let Some(d) = direct.as_deref_mut() {
            d.sink.add(id, items);
        }
        if let Some(error) = &state.broken {
            let error = error.clone();
            state.done.insert(id, Done::Failed(error));
            return Ok(id);
        }
        wire::set_record_id(&mut record, id);
        state.pending.push_back(Task { id, record });
        state.unfinished += 1;
        self.dispatch_held(&mut state);
        // Results are read here too: a caller that only submits must not
        // leave the workers waiting for room to put theirs. (A result
        // larger than the ring is not counted in `qsize` until its last
        // part is in: every 64th submission looks anyway.)
        let look = id % 64 == 0 || !self.results.empty();
        if look && self.drain_results(&mut state, direct.as_deref_mut()) && !state.pumping {
            // A streamed one, read without the lock.
            self.pump(&mut state, Duration::ZERO, direct);
        }
        // A clock read costs more than the rest of a submission: look every
        // 64 tasks.
        if id % 64 == 0 && state.last_check.elapsed() > CHECK_EVERY {
            self.check_workers(&mut state);
        }
        Ok(id)
    }

    /// Forgets the results of `ids` (their handle was dropped).
    pub(crate) fn abandon(&self, ids: impl IntoIterator<Item = u64>) {
        let mut state = self.state.lock();
        for id in ids {
            if state.done.remove(&id).is_none() && id < state.next_id {
                state.abandoned.insert(id);
            }
        }
    }

    /// Takes the result of `id`, waiting until `deadline`.
    pub(crate) fn take(&self, id: u64, deadline: Option<Instant>) -> Option<Done> {
        let mut state = self.state.lock();
        if self.progress(&mut state, deadline, |s| s.done.contains_key(&id)) {
            state.done.remove(&id)
        } else {
            None
        }
    }

    /// Waits until task `id` is done, until `deadline`, and has `sink` take
    /// it: read where it lies in the result ring if this thread reads it
    /// from there, else from the copy made by whichever thread did (or
    /// its failure as a whole). Other results that `sink` wants and this
    /// thread reads meanwhile are read too. False on timeout (a pool
    /// terminated under it fails the task: the sink takes that failure).
    /// A panic of the sink's `read` goes on to the caller.
    pub(crate) fn take_with(
        &self,
        id: u64,
        deadline: Option<Instant>,
        sink: &mut dyn Sink,
    ) -> bool {
        let mut direct = Direct::new(sink);
        let done = {
            let mut state = self.state.lock();
            let over = self.progress_with(&mut state, deadline, Some(&mut direct), |s, sink| {
                s.done.contains_key(&id) || sink.is_some_and(|sink| !sink.wants(id))
            });
            if over && direct.panic.is_none() && direct.sink.wants(id) {
                state.done.remove(&id)
            } else {
                None
            }
        };
        let sink = direct.finish();
        let Some(done) = done else {
            return !sink.wants(id);
        };
        match &done {
            Done::Output { message, start } => sink.read(id, &message[*start..]),
            Done::Failed(e) => sink.fail(id, e.clone()),
        }
        self.give_back(done);
        true
    }

    /// Waits until a worker can take another large task at once (see
    /// [`State::room_for_large`]), or the pool runs no more; `sink` reads
    /// the results this thread reads meanwhile (see
    /// [`take_with`](Inner::take_with)).
    pub(crate) fn wait_for_room(&self, sink: &mut dyn Sink) {
        let mut direct = Direct::new(sink);
        {
            let mut state = self.state.lock();
            self.progress_with(&mut state, None, Some(&mut direct), |s, _| {
                s.phase != Phase::Running || s.broken.is_some() || s.room_for_large()
            });
        }
        direct.finish();
    }

    /// Waits until `id` is done (without taking it); whether it is.
    pub(crate) fn wait(&self, id: u64, deadline: Option<Instant>) -> bool {
        let mut state = self.state.lock();
        self.progress(&mut state, deadline, |s| s.done.contains_key(&id))
    }

    /// Whether `id` is done, and if so whether it succeeded.
    pub(crate) fn peek(&self, id: u64) -> Option<bool> {
        let mut state = self.state.lock();
        self.progress(&mut state, Some(Instant::now()), |s| {
            s.done.contains_key(&id)
        });
        state.done.get(&id).map(Done::successful)
    }

    /// Takes the result of whichever of `ids` finishes first.
    pub(crate) fn take_any(&self, ids: &[u64], deadline: Option<Instant>) -> Option<(u64, Done)> {
        let mut state = self.state.lock();
        let found = |s: &mut State| ids.iter().any(|id| s.done.contains_key(id));
        if !self.progress(&mut state, deadline, found) {
            return None;
        }
        let id = *ids.iter().find(|id| state.done.contains_key(id))?;
        state.done.remove(&id).map(|d| (id, d))
    }

    /// Moves work forward until `until` holds (true) or `deadline` passes
    /// (false): sends pending tasks, reads results, replaces dead workers.
    fn progress(
        &self,
        state: &mut MutexGuard<'_, State>,
        deadline: Option<Instant>,
        mut until: impl FnMut(&mut State) -> bool,
    ) -> bool {
        self.progress_with(state, deadline, None, |s, _| until(s))
    }

    /// [`progress`](Inner::progress) with a sink for the results this
    /// thread reads (see [`take_with`](Inner::take_with)); `until` sees
    /// it. A panic of the sink's `read` ends it too (true).
    fn progress_with(
        &self,
        state: &mut MutexGuard<'_, State>,
        deadline: Option<Instant>,
        mut direct: Option<&mut Direct<'_>>,
        mut until: impl FnMut(&mut State, Option<&dyn Sink>) -> bool,
    ) -> bool {
        let mut until = |state: &mut State, direct: &Option<&mut Direct<'_>>| match direct {
            Some(d) if d.panic.is_some() => true,
            Some(d) => until(state, Some(&*d.sink)),
            None => until(state, None),
        };
        loop {
            if until(state, &direct) {
                return true;
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if d <= now => {
                    // One last step without waiting: send what is pending,
                    // notice dead workers, look at what has arrived (a
                    // caller polling `ready()` must see progress too).
                    if !state.pumping {
                        self.dispatch(state);
                        if state.last_check.elapsed() > CHECK_EVERY {
                            self.check_workers(state);
                        }
                        if self.drain_results(state, direct.as_deref_mut()) {
                            // A streamed result: read as it comes (the
                            // lock let go, so terminate() can stop its
                            // writer if it never comes).
                            self.pump(state, Duration::ZERO, direct.as_deref_mut());
                        }
                    }
                    return until(state, &direct);
                }
                Some(d) => (d - now).min(PUMP_SLICE),
                None => PUMP_SLICE,
            };
            if state.pumping {
                // Another thread reads the result queue: wait for its news.
                let _ = self.cond.wait_for(state, left);
                continue;
            }
            self.dispatch(state);
            self.rebalance(state);
            if state.last_check.elapsed() > CHECK_EVERY {
                self.check_workers(state);
            }
            if until(state, &direct) {
                return true;
            }
            match self.pump(state, left, direct.as_deref_mut()) {
                Pumped::Read => {}
                Pumped::Nothing => self.check_workers(state),
                Pumped::Over => return until(state, &direct),
            }
        }
    }

    /// Reads results for up to `wait` (and the rest of a streamed result
    /// it starts), with the pool's lock let go meanwhile: a result
    /// streamed by a worker that stopped (SIGSTOP) must not keep other
    /// threads — `terminate()` among them — out of the pool. The caller
    /// is the pumping thread (none other is). While it reads, no death is
    /// settled (see `check_workers`): a worker stopped midway through a
    /// streamed result holds up the settling of other workers' deaths
    /// until it goes on or is killed (timed waits still return).
    ///
    /// The result that ends the wait is handled where it lies in the ring
    /// (see [`handle_result`](Inner::handle_result)), with the pool's lock
    /// taken again for that while the ring's consumer side is held: no
    /// thread waits for that side while it holds the pool's lock (reads
    /// under the pool's lock only try it).
    fn pump(
        &self,
        state: &mut MutexGuard<'_, State>,
        wait: Duration,
        mut direct: Option<&mut Direct<'_>>,
    ) -> Pumped {
        state.pumping = true;
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            MutexGuard::unlocked(state, || {
                self.results.get_bytes_with_timeout(wait, |message| {
                    let mut state = self.state.lock();
                    self.handle_result(&mut state, message, direct.as_deref_mut());
                })
            })
        }));
        // (Cleared on every way out: a flag left set would keep every other
        // caller waiting for news from a reader that is gone.)
        state.pumping = false;
        let got = got.unwrap_or_else(|panic| {
            self.cond.notify_all();
            std::panic::resume_unwind(panic)
        });
        let pumped = match got {
            Ok(()) => {
                // (Stopping at another streamed one: the next pump reads it.)
                self.drain_results(state, direct);
                Pumped::Read
            }
            Err(GetError::Timeout | GetError::Empty) => Pumped::Nothing,
            // Only terminate() closes it; it failed every task.
            Err(GetError::Closed) => Pumped::Over,
            Err(GetError::Failed(e)) => {
                // The result queue is corrupted (or a result cannot be
                // held in memory): a result's task cannot be named, and
                // a record that cannot be read stays where it is.
                self.results_failed(state, &e);
                Pumped::Over
            }
        };
        self.cond.notify_all();
        pumped
    }

    /// Handles the results already in the queue (at most 4096: a steady
    /// stream must not keep the caller here forever). True if it stopped
    /// at a streamed result (see [`read_results`](Inner::read_results)).
    fn drain_results(&self, state: &mut State, direct: Option<&mut Direct<'_>>) -> bool {
        self.read_results(state, 4096, direct)
    }

    /// Handles up to `limit` results already in the queue; stops when it
    /// is empty, or when it fails (see [`results_failed`](Inner::results_failed)).
    /// The pool's lock is held: a result streamed in fragments (larger
    /// than half the ring) is left for [`pump`](Inner::pump), which waits
    /// for its rest without the lock; true if it stopped at one.
    fn read_results(
        &self,
        state: &mut State,
        limit: usize,
        mut direct: Option<&mut Direct<'_>>,
    ) -> bool {
        for _ in 0..limit {
            let read = self.results.try_get_whole_bytes_with(|message| {
                self.handle_result(state, message, direct.as_deref_mut());
            });
            match read {
                Ok(()) => {}
                Err(GetError::Timeout) => return true,
                Err(GetError::Failed(e)) => {
                    self.results_failed(state, &e);
                    break;
                }
                Err(_) => break,
            }
        }
        false
    }

    /// The result queue failed (corrupted bytes, or a result too large to
    /// hold): which tasks' results are lost cannot be told, and a record
    /// that cannot be read blocks the ones behind it. The pool breaks:
    /// every unfinished task fails with the error rather than waiting for
    /// ever. Its workers stay until `terminate`, or until `join`, which
    /// stops them (they could wait for room in that queue for ever).
    fn results_failed(&self, state: &mut State, error: &proc_queue::QueueError) {
        state.results_broken = true;
        self.break_pool(
            state,
            TaskError::Corrupted(format!("the pool's result queue failed: {error}")),
        );
    }

    /// Handles one result message where it lies in the result ring (the
    /// ring's consumer side is held meanwhile): `direct`'s sink reads it
    /// there if it wants it; otherwise it is copied for its taker.
    fn handle_result(
        &self,
        state: &mut State,
        message: Received<'_>,
        direct: Option<&mut Direct<'_>>,
    ) {
        state.results_read += 1;
        let Some((worker, id, micros, output)) = wire::take_result(&message) else {
            // A message that does not even name its task: the queue's
            // bytes were changed under it (see `results_failed`).
            self.results_failed(
                state,
                &proc_queue::QueueError::Corrupted("a result message without its header".into()),
            );
            return;
        };
        if id == wire::INIT_DONE {
            if let Some(w) = state.workers.get_mut(worker as usize) {
                w.ready = true;
            }
            state.unready_deaths = 0;
            return;
        }
        // How long tasks take decides whether small ones are batched.
        state.task_micros += (f64::from(micros) - state.task_micros) / 16.0;
        let start = message.len() - output.len();
        if id == wire::INIT_FAILED {
            let error = match wire::decode_items::<()>(output, 1) {
                Err(TaskError::Panicked { message, location }) => {
                    TaskError::InitializerFailed(match location {
                        Some(l) => format!("{message} at {l}"),
                        None => message,
                    })
                }
                Err(e) => TaskError::InitializerFailed(e.to_string()),
                Ok(_) => TaskError::InitializerFailed("unknown".into()),
            };
            self.break_pool(state, error);
            return;
        }
        let found = state
            .workers
            .get_mut(worker as usize)
            .and_then(|w| take_outstanding(w, id))
            .or_else(|| {
                state
                    .workers
                    .iter_mut()
                    .find_map(|w| take_outstanding(w, id))
            });
        let Some(task) = found else {
            // Not (or no longer) expected: a duplicate or a stray.
            return;
        };
        state.recycle(task.record);
        if let Some(direct) = direct.filter(|d| d.panic.is_none() && d.sink.wants(id)) {
            // Its taker reads it here. (A panic of its `Deserialize` is its
            // thread's, once the pool's lock is let go.)
            let sink = &mut *direct.sink;
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sink.read(id, output);
            }));
            if let Err(panic) = read {
                // Taken all the same (the sink does not forget it later).
                let error = TaskError::ResultDecode("decoding the result panicked".into());
                direct.sink.fail(id, error);
                direct.panic = Some(panic);
            }
            state.unfinished = state.unfinished.saturating_sub(1);
            state.abandoned.remove(&id);
            return;
        }
        let mut copy = state.buffer();
        message.into_buf(&mut copy);
        self.finish(
            state,
            id,
            Done::Output {
                message: copy,
                start,
            },
        );
    }

    fn finish(&self, state: &mut State, id: u64, done: Done) {
        state.unfinished = state.unfinished.saturating_sub(1);
        if !state.abandoned.remove(&id) {
            state.done.insert(id, done);
        } else if let Done::Output { message, .. } = done {
            state.recycle(message);
        }
    }

    /// A buffer for a task record (recycled from finished tasks).
    pub(crate) fn buffer(&self) -> Vec<u8> {
        self.state.lock().buffer()
    }

    /// Takes back a buffer that was not used.
    pub(crate) fn recycle(&self, buffer: Vec<u8>) {
        self.state.lock().recycle(buffer);
    }

    /// Takes back the buffer of a result that was read.
    pub(crate) fn give_back(&self, done: Done) {
        if let Done::Output { message, .. } = done {
            self.recycle(message);
        }
    }

    /// As [`dispatch`](Inner::dispatch) for a caller that returns at once:
    /// short tasks wait for a batch while every worker has work queued.
    fn dispatch_held(&self, state: &mut State) {
        let short = state.task_micros < f64::from(BATCH_BELOW_MICROS);
        if short
            && state.pending.len() < BATCH_TASKS
            && state
                .workers
                .iter()
                .all(|w| w.handle.is_none() || !w.queue.empty())
        {
            return;
        }
        self.dispatch(state);
    }

    /// Sends pending tasks to the least loaded workers.
    fn dispatch(&self, state: &mut State) {
        if state.pending.is_empty() {
            return;
        }
        self.replace_retired(state);
        let mut full = vec![false; state.workers.len()];
        while !state.pending.is_empty() {
            let Some(w) = state
                .workers
                .iter()
                .enumerate()
                .filter(|(i, w)| !full[*i] && w.handle.is_some() && w.budget != Some(0))
                .min_by_key(|(_, w)| w.outstanding.len())
                .map(|(i, _)| i)
            else {
                break;
            };
            let worker = &mut state.workers[w];
            let first_len = state.pending.front().map_or(0, |t| t.record.len());
            if first_len > SINGLE_MAX {
                // Streams through the ring: only to a worker waiting for it
                // (not one in its initializer: the bounded put below,
                // under the pool's lock, would wait out its timeout on
                // every dispatch meanwhile, and stall the other threads).
                let initializing = self.config.initializer.is_some() && !worker.ready;
                if !worker.outstanding.is_empty() || initializing {
                    full[w] = true;
                    continue;
                }
                let Some(task) = state.pending.pop_front() else {
                    break;
                };
                match put_streamed(worker, &task.record) {
                    Ok(()) => {
                        worker.budget = worker.budget.map(|b| b - 1);
                        // Alone in its message: if the worker dies before
                        // taking it, it is read back from the queue; once
                        // taken, it is the one running. No copy is kept.
                        let Task { id, record } = task;
                        worker.outstanding.push_back(Task {
                            id,
                            record: Vec::new(),
                        });
                        state.recycle(record);
                    }
                    Err(()) => {
                        state.pending.push_front(task);
                        full[w] = true;
                    }
                }
                continue;
            }
            let budget = worker
                .budget
                .map_or(BATCH_TASKS, |b| (b as usize).min(BATCH_TASKS));
            let mut batch: Vec<Task> = Vec::new();
            let mut bytes = 0;
            while let Some(task) = state.pending.front() {
                let len = task.record.len();
                if batch.len() >= budget
                    || len > SINGLE_MAX
                    || (!batch.is_empty() && bytes + len > BATCH_BYTES.max(first_len))
                {
                    break;
                }
                bytes += len;
                if let Some(task) = state.pending.pop_front() {
                    batch.push(task);
                }
            }
            let sent = if batch.len() == 1 {
                worker.queue.try_put_bytes(&batch[0].record)
            } else {
                let mut message = Vec::with_capacity(bytes);
                for task in &batch {
                    message.extend_from_slice(&task.record);
                }
                worker.queue.try_put_bytes(&message)
            };
            match sent {
                Ok(()) => {
                    worker.budget = worker.budget.map(|b| b - batch.len() as u64);
                    if batch.len() == 1 {
                        // As for a streamed task: no copy needed.
                        let Task { id, record } = batch.pop().expect("one task");
                        worker.outstanding.push_back(Task {
                            id,
                            record: Vec::new(),
                        });
                        state.recycle(record);
                    } else {
                        // A batch: if the worker dies in it, the tasks after
                        // the running one are sent again from these copies.
                        worker.outstanding.extend(batch);
                    }
                }
                Err(_) => {
                    state.requeue_front(batch);
                    full[w] = true;
                }
            }
        }
    }

    /// Moves a queued message from a busy worker to an idle one.
    fn rebalance(&self, state: &mut State) {
        if !state.pending.is_empty() {
            return;
        }
        let idle = state
            .workers
            .iter()
            .any(|w| w.handle.is_some() && w.outstanding.is_empty() && w.budget != Some(0));
        if !idle {
            return;
        }
        let Some(donor) = state
            .workers
            .iter_mut()
            .filter(|w| w.handle.is_some() && w.outstanding.len() >= 2 && !w.queue.empty())
            .max_by_key(|w| w.outstanding.len())
        else {
            return;
        };
        let Ok(message) = donor.queue.try_get_bytes() else {
            return;
        };
        let mut moved = Vec::new();
        for (id, record) in wire::task_records(&message) {
            if take_outstanding(donor, id).is_some() {
                donor.budget = donor.budget.map(|b| b + 1);
                moved.push(Task { id, record });
            }
        }
        state.requeue_front(moved);
        self.dispatch(state);
    }

    /// Starts replacements for the workers that used up
    /// `maxtasksperchild`. A retired worker exits right after its last
    /// result (it takes nothing more from its queue): it is reaped later
    /// (see [`reap_retiring`](Inner::reap_retiring)), not waited for here,
    /// under the pool's lock.
    fn replace_retired(&self, state: &mut State) {
        for i in 0..state.workers.len() {
            let w = &mut state.workers[i];
            if w.budget == Some(0) && w.outstanding.is_empty() {
                if let Some(handle) = w.handle.take() {
                    state.retiring.push((handle, Instant::now()));
                }
                self.restart(state, i);
            }
        }
    }

    /// Reaps the retired workers that have exited; one still there after
    /// [`RETIRE_GRACE`] is killed.
    fn reap_retiring(&self, state: &mut State) {
        let untracked = &mut state.untracked;
        state
            .retiring
            .retain_mut(|(handle, since)| match handle.try_wait() {
                Ok(Some(_)) | Err(JoinError::StatusLost) => false,
                Err(_) => {
                    // Gone from the pool's view, not known to be gone.
                    *untracked = true;
                    false
                }
                Ok(None) => {
                    kill_if_overdue(handle, *since);
                    true
                }
            });
    }

    /// Looks for dead workers; settles their tasks and replaces them.
    fn check_workers(&self, state: &mut State) {
        if !state.retiring.is_empty() {
            self.reap_retiring(state);
        }
        if state.pumping {
            // Another thread is reading the result queue (and may hold a
            // result it has not handed over yet): settling a death now could
            // miss that result. The reader checks when it is back.
            return;
        }
        let now = Instant::now();
        state.last_check = now;
        // A worker whose replacement could not be started (a passing fork
        // or descriptor failure) is tried again, now and then.
        let retry = now.duration_since(state.last_retry) >= RETRY_EVERY;
        for i in 0..state.workers.len() {
            let status = match state.workers[i].handle.as_mut().map(JoinHandle::try_wait) {
                None if retry => {
                    state.last_retry = now;
                    self.restart(state, i);
                    continue;
                }
                None | Some(Ok(None)) => continue,
                Some(Ok(Some(status))) => Some(status),
                Some(Err(JoinError::StatusLost)) => None,
                Some(Err(_)) => {
                    state.untracked = true;
                    None
                }
            };
            // Everything it finished is in the result queue by now (nobody
            // else reads it: see above), and is read before its tasks are
            // settled. Whole results are read here; one streamed in
            // fragments is for `pump` to read without the lock, so the
            // death is settled once as many results as the queue held when
            // it was seen have been read (the status stays with the handle;
            // results that arrive meanwhile do not move the mark).
            self.read_results(state, usize::MAX, None);
            let queued = self.results.qsize() as u64;
            let read = state.results_read;
            let at = *state.workers[i].settle_at.get_or_insert(read + queued);
            if read < at {
                continue;
            }
            state.workers[i].settle_at = None;
            self.settle_dead(state, i, status);
        }
    }

    /// Worker `i` exited with `status` (its results were read: see
    /// `check_workers`): the tasks
    /// still in its queue go back to pending, the one it was running fails.
    fn settle_dead(&self, state: &mut State, i: usize, status: Option<std::process::ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let worker = &mut state.workers[i];
        worker.handle = None;
        // What it had not taken yet, read back with the records themselves.
        let mut queued: HashMap<u64, Vec<u8>, IdBuild> = HashMap::default();
        take_untaken(&worker.queue, |message| {
            queued.extend(wire::task_records(&message));
        });
        let error = TaskError::WorkerDied {
            signal: status.and_then(|s| s.signal()),
            code: status.and_then(|s| s.code()),
        };
        // It runs one message at a time and reports each task as it ends:
        // the tasks it took without reporting are those of one message, and
        // the first of them is the one it was running. The others were
        // kept (a batch's copies); a single task has no others.
        let mut back = Vec::new();
        let mut failed = Vec::new();
        let mut died = false;
        for task in std::mem::take(&mut worker.outstanding) {
            if let Some(record) = queued.remove(&task.id) {
                back.push(Task {
                    id: task.id,
                    record,
                });
            } else if !died {
                died = true;
                failed.push(task.id);
            } else if task.record.is_empty() {
                // No copy to send again: it cannot run, so it fails too.
                failed.push(task.id);
            } else {
                back.push(task);
            }
        }
        state.requeue_front(back);
        for id in failed {
            self.finish(state, id, Done::Failed(error.clone()));
        }
        // An initializer that ends its process (abort, exit, a crash)
        // reports nothing; three workers in a row dying so before they were
        // ready is taken as that, not replaced for ever. A SIGKILL is not
        // counted: that is a kill from outside, or the death of the zygote
        // the worker came from (all its initializing workers at once),
        // and such workers are just replaced.
        // (So does a status lost with the zygote or fork server that was
        // to report it: its children die with it. A child of this process
        // whose status is lost, SIGCHLD ignored say, still counts.)
        let lost_with_server = status.is_none() && state.workers[i].remote;
        let killed = lost_with_server || status.is_some_and(|s| s.signal() == Some(libc::SIGKILL));
        if self.config.initializer.is_some() && !state.workers[i].ready && !killed {
            state.unready_deaths += 1;
            if state.unready_deaths >= UNREADY_DEATHS {
                let reason = match status {
                    Some(s) if s.signal().is_some() => format!("signal {:?}", s.signal()),
                    Some(s) => format!("exit status {:?}", s.code()),
                    None => "an unknown status".to_owned(),
                };
                let message = format!(
                    "{UNREADY_DEATHS} workers in a row ended before it was ready (the last with {reason})"
                );
                self.break_pool(state, TaskError::InitializerFailed(message));
                return;
            }
        }
        self.restart(state, i);
        self.cond.notify_all();
    }

    /// Starts a new process on worker `i`'s queue, if there is work for it.
    fn restart(&self, state: &mut State, i: usize) {
        state.workers[i].ready = false;
        // A mark set for the process before (a retired one replaced
        // without being settled) is not this one's.
        state.workers[i].settle_at = None;
        let wanted = matches!(state.phase, Phase::Running)
            || (state.phase == Phase::Closed && state.unfinished > 0);
        if !wanted || state.broken.is_some() {
            return;
        }
        state.workers[i].budget = self.config.maxtasks;
        let mut started = start_worker(&self.config, state, i, &self.results);
        if started.is_err() && state.workers[i].remote {
            // Its request may have reached the server (see below).
            state.untracked = true;
        }
        if started.is_err() && state.zygote.as_ref().is_some_and(|z| !z.is_serving()) {
            // The zygote is gone (killed: its workers died with it). A new
            // one if this process is still single-threaded; else the fork
            // server from now on (it needs `init()` in main). (One that
            // still serves is kept: dropping it would end it, and with it
            // every worker it started.)
            state.zygote = None;
            match Zygote::new() {
                Ok(zygote) => state.zygote = Some(zygote),
                Err(_) => state.method = StartMethod::ForkServer,
            }
            started = start_worker(&self.config, state, i, &self.results);
        }
        match started {
            Ok(handle) => {
                state.workers[i].handle = Some(handle);
                state.no_workers_since = None;
            }
            Err(e) => {
                if state.workers[i].remote {
                    // Its request may have reached the server, which may
                    // have started a worker this pool cannot wait for (one
                    // whose pidfd this process could not receive is ended
                    // at once; one whose zygote died before its reply dies
                    // with it, a moment later).
                    state.untracked = true;
                }
                if state.workers.iter().all(|w| w.handle.is_none()) {
                    // No worker left. A failure that may pass (descriptors,
                    // memory, a fork) is retried by the worker check for a
                    // while; one that will not (the fork server without
                    // `init()`) ends the pool now.
                    let since = *state.no_workers_since.get_or_insert_with(Instant::now);
                    if matches!(e, SpawnError::InitMissing) || since.elapsed() >= NO_WORKERS_GRACE {
                        self.break_pool(state, TaskError::NoWorkers(e.to_string()));
                    }
                }
            }
        }
    }

    /// Fails every unfinished task with `error` and stops taking work.
    fn break_pool(&self, state: &mut State, error: TaskError) {
        if state.broken.is_none() {
            state.broken = Some(error.clone());
        }
        // What the live workers have not taken yet must not run: it has
        // failed already (and its results would only fill the result ring).
        for w in &state.workers {
            take_untaken(&w.queue, drop);
        }
        self.fail_unfinished(state, &error);
        self.cond.notify_all();
    }

    /// Fails every task not finished yet (pending or sent) with `error`.
    fn fail_unfinished(&self, state: &mut State, error: &TaskError) {
        let mut failed: Vec<u64> = state.pending.drain(..).map(|t| t.id).collect();
        for w in &mut state.workers {
            failed.extend(w.outstanding.drain(..).map(|t| t.id));
        }
        for id in failed {
            self.finish(state, id, Done::Failed(error.clone()));
        }
    }

    fn terminate(&self) {
        let mut state = self.state.lock();
        if state.phase == Phase::Joined {
            // A join on another thread may still wait for a worker (one
            // running an endless task, or one stopped while it streams a
            // result that join is reading): they are stopped here, and this
            // returns once the join has seen them go.
            if state.joining {
                if let Some(handles) = &state.reaping {
                    for (handle, _) in handles.iter() {
                        let _ = handle.kill();
                    }
                }
                while state.joining {
                    self.cond.wait(&mut state);
                }
            }
            return;
        }
        if state.phase == Phase::Terminated {
            // Another terminate may still be reaping the workers.
            while state.joining {
                self.cond.wait(&mut state);
            }
            return;
        }
        state.phase = Phase::Terminated;
        state.joining = true;
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for w in &mut state.workers {
            w.queue.close();
            if let Some(handle) = w.handle.take() {
                let _ = handle.terminate();
                handles.push(handle);
            }
        }
        for (handle, _) in state.retiring.drain(..) {
            let _ = handle.terminate();
            handles.push(handle);
        }
        self.fail_unfinished(&mut state, &TaskError::Terminated);
        // The zygote reaps the workers: it goes after them.
        let zygote = state.zygote.take();
        self.results.close();
        drop(state);
        self.cond.notify_all();
        // A join (or terminate) on another thread returns once they are
        // reaped.
        let _done = JoinDone(self);
        let deadline = Instant::now() + TERMINATE_GRACE;
        for handle in &mut handles {
            let left = deadline.saturating_duration_since(Instant::now());
            if !matches!(handle.wait_timeout(left), Ok(Some(_))) {
                let _ = handle.kill();
                if let Err(JoinError::Io(_)) = handle.wait() {
                    // Not known to be gone.
                    self.state.lock().untracked = true;
                }
            }
        }
        drop(zygote);
    }

    fn join(&self) -> Result<(), PoolError> {
        let mut state = self.state.lock();
        match state.phase {
            Phase::Running => return Err(PoolError::StillRunning),
            Phase::Joined | Phase::Terminated => {
                // Another join may still be waiting for the workers.
                while state.joining {
                    self.cond.wait(&mut state);
                }
                return Ok(());
            }
            Phase::Closed => {}
        }
        self.progress(&mut state, None, |s| s.unfinished == 0);
        if state.phase != Phase::Closed {
            // Terminated meanwhile, or another join got here first.
            while state.joining {
                self.cond.wait(&mut state);
            }
            return Ok(());
        }
        state.phase = Phase::Joined;
        state.joining = true;
        let killed = state.results_broken;
        // Each handle with, for a worker retired by `maxtasksperchild`,
        // when it retired.
        let mut handles: Vec<Reaping> = Vec::new();
        for w in &mut state.workers {
            // A closed queue tells an idle worker to exit.
            w.queue.close();
            handles.extend(w.handle.take().map(|handle| (handle, None)));
        }
        handles.extend(
            state
                .retiring
                .drain(..)
                .map(|(handle, since)| (handle, Some(since))),
        );
        let zygote = state.zygote.take();
        // Shared with `terminate`, which may stop them meanwhile.
        let handles = Arc::new(handles);
        state.reaping = Some(Arc::clone(&handles));
        drop(state);
        // Whatever happens below, the wait is over for `terminate` and a
        // second `join` when this returns.
        let done = JoinDone(self);
        // Waiting for each to be gone (its pidfd) is enough: the zygote
        // reaps its children when it sees the end of its connection (one
        // hop shorter than waiting for the status it reports), this
        // process reaps its own (the first workers) as their handles drop.
        // Meanwhile stray results (of tasks already settled: a broken
        // pool's) are read away, so that no worker waits for room to put
        // one, and retired workers past their grace are killed.
        // A worker that never exits (an endless task of a broken pool's,
        // or one stopped while it streams a result read here) keeps this
        // waiting, as Python's join does, until `terminate` on another
        // thread stops the workers. After the result queue failed, they
        // are stopped at once: one may wait for room in that queue for
        // ever.
        if killed {
            for (handle, _) in handles.iter() {
                let _ = handle.kill();
            }
        }
        for (handle, _) in handles.iter() {
            loop {
                match handle.wait_ended_timeout(Duration::from_millis(100)) {
                    Ok(true) => break,
                    Err(_) => {
                        // Not known to be gone.
                        self.state.lock().untracked = true;
                        break;
                    }
                    Ok(false) => {}
                }
                while self.results.try_get_bytes().is_ok() {}
                for (retired, since) in handles.iter() {
                    if let Some(since) = *since {
                        kill_if_overdue(retired, since);
                    }
                }
            }
        }
        drop(zygote);
        // (`terminate` uses its share only under the lock.)
        self.state.lock().reaping = None;
        if let Ok(handles) = Arc::try_unwrap(handles) {
            for (mut handle, _) in handles {
                let _ = handle.try_wait();
            }
        }
        drop(done);
        Ok(())
    }
}

/// What a [`pump`](Inner::pump) did.
enum Pumped {
    /// Read a result (and those behind it).
    Read,
    /// Found none in its time.
    Nothing,
    /// The result queue was closed by `terminate()`, or failed: no result
    /// will come.
    Over,
}

/// Kills a worker retired at `since` that is still there after
/// [`RETIRE_GRACE`].
fn kill_if_overdue(handle: &JoinHandle<()>, since: Instant) {
    if since.elapsed() >= RETIRE_GRACE {
        let _ = handle.kill();
    }
}

/// Ends a `join`'s or `terminate`'s wait for the workers (on every way
/// out of it).
struct JoinDone<'a>(&'a Inner);

impl Drop for JoinDone<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.joining = false;
        state.reaping = None;
        drop(state);
        self.0.cond.notify_all();
    }
}

/// Removes task `id` from `worker`'s outstanding tasks.
fn take_outstanding(worker: &mut Worker, id: u64) -> Option<Task> {
    if worker.outstanding.front().is_some_and(|t| t.id == id) {
        return worker.outstanding.pop_front();
    }
    let at = worker.outstanding.iter().position(|t| t.id == id)?;
    worker.outstanding.remove(at)
}

/// Puts a task too large for one ring record: the worker is idle (and
/// past its initializer), so it takes the fragments as they come. One
/// bounded attempt (the pool's lock is held): a worker that does not read
/// (stopped, say) lets the task wait in pending for the next try.
fn put_streamed(worker: &mut Worker, record: &[u8]) -> Result<(), ()> {
    // At least 100 ms, and time for the copy at a slow 100 MB/s.
    let timeout = Duration::from_millis(100) + Duration::from_micros(record.len() as u64 / 100);
    worker
        .queue
        .put_bytes_timeout(record, timeout)
        .map_err(|_| ())
}
