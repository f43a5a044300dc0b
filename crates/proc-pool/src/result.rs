//! Handles to results still on their way: [`AsyncResult`], [`MapResult`]
//! and the [`IMap`] iterator.

use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::TaskError;
use crate::pool::{Done, Inner, Sink};
use crate::sys::Slots;
use crate::wire;

fn deadline(timeout: Duration) -> Option<Instant> {
    Some(Instant::now() + timeout)
}

/// The result of one task, on its way (Python's `AsyncResult`).
///
/// Dropping it forgets the result (the task still runs).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// fn greet(name: String) -> String {
///     format!("hello, {name}")
/// }
/// let pool = proc_pool::Pool::new(1)?;
/// let pending = pool.apply_async(greet, "world".to_string())?;
/// pending.wait();
/// assert_eq!(pending.successful(), Some(true));
/// assert_eq!(pending.get()?, "hello, world");
/// # Ok(()) }
/// ```
pub struct AsyncResult<R> {
    inner: Arc<Inner>,
    id: u64,
    taken: bool,
    /// Once taken: whether the task succeeded.
    succeeded: Option<bool>,
    _result: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for AsyncResult<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("id", &self.id)
            .field("taken", &self.taken)
            .finish()
    }
}

impl<R: DeserializeOwned> AsyncResult<R> {
    pub(crate) fn new(inner: Arc<Inner>, id: u64) -> Self {
        AsyncResult {
            inner,
            id,
            taken: false,
            succeeded: None,
            _result: PhantomData,
        }
    }

    /// Waits for the result (Python's `get()`).
    ///
    /// # Errors
    ///
    /// The task's [`TaskError`].
    pub fn get(mut self) -> Result<R, TaskError> {
        self.take(None)
    }

    /// Waits at most `timeout` for the result (Python's `get(timeout)`).
    /// A result larger than 1 MiB (half the pool's result ring) streams in
    /// fragments: once one has begun to arrive, the call that reads it
    /// (this one, [`wait_timeout`](AsyncResult::wait_timeout) or
    /// [`ready`](AsyncResult::ready), for any task of the pool) reads it
    /// whole, for as long as its worker takes to write it.
    ///
    /// # Errors
    ///
    /// [`TaskError::Timeout`] if it is not ready (call again later);
    /// [`TaskError::Taken`] after an earlier call returned it; else the
    /// task's [`TaskError`].
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<R, TaskError> {
        self.take(deadline(timeout))
    }

    fn take(&mut self, deadline: Option<Instant>) -> Result<R, TaskError> {
        if self.taken {
            return Err(TaskError::Taken);
        }
        let done = self.inner.take(self.id, deadline).ok_or(match deadline {
            Some(_) => TaskError::Timeout,
            None => TaskError::Terminated,
        })?;
        self.taken = true;
        let value = one(&done);
        self.succeeded = Some(value.is_ok());
        value
    }

    /// Waits until the result is ready (Python's `wait()`).
    pub fn wait(&self) {
        if !self.taken {
            self.inner.wait(self.id, None);
        }
    }

    /// Waits at most `timeout`; whether the result is ready.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.taken || self.inner.wait(self.id, deadline(timeout))
    }

    /// Whether the result is ready (Python's `ready()`).
    pub fn ready(&self) -> bool {
        self.taken || self.inner.peek(self.id).is_some()
    }

    /// Whether the task succeeded, or `None` while it is not ready (Python
    /// raises `ValueError` then).
    pub fn successful(&self) -> Option<bool> {
        self.succeeded.or_else(|| self.inner.peek(self.id))
    }
}

impl<R> Drop for AsyncResult<R> {
    fn drop(&mut self) {
        if !self.taken {
            self.inner.abandon([self.id]);
        }
    }
}

fn one<R: DeserializeOwned>(done: &Done) -> Result<R, TaskError> {
    done.items::<R>(1)?
        .pop()
        .unwrap_or_else(|| Err(TaskError::Corrupted("no item".into())))
}

/// The results of a [`map_async`](crate::Pool::map_async), on their way.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// fn cube(x: i64) -> i64 {
///     x * x * x
/// }
/// let pool = proc_pool::Pool::new(2)?;
/// let pending = pool.map_async(cube, -3..=3)?;
/// // ... other work meanwhile ...
/// assert_eq!(pending.get()?, vec![-27, -8, -1, 0, 1, 8, 27]);
/// # Ok(()) }
/// ```
pub struct MapResult<R> {
    inner: Arc<Inner>,
    /// (task id, items in its chunk), in order.
    chunks: Vec<(u64, usize)>,
    taken: bool,
    _result: PhantomData<fn() -> R>,
}

impl<R> fmt::Debug for MapResult<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapResult")
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

impl<R: DeserializeOwned> MapResult<R> {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        MapResult {
            inner,
            chunks: Vec::new(),
            taken: false,
            _result: PhantomData,
        }
    }

    pub(crate) fn push(&mut self, id: u64, len: usize) {
        self.chunks.push((id, len));
    }

    /// Waits for every result; the first failure in order wins.
    ///
    /// # Errors
    ///
    /// The first failing item's [`TaskError`].
    pub fn get(mut self) -> Result<Vec<R>, TaskError> {
        self.take(None)
    }

    /// [`get`](MapResult::get) waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`AsyncResult::get_timeout`].
    pub fn get_timeout(&mut self, timeout: Duration) -> Result<Vec<R>, TaskError> {
        self.take(deadline(timeout))
    }

    fn take(&mut self, deadline: Option<Instant>) -> Result<Vec<R>, TaskError> {
        if self.taken {
            return Err(TaskError::Taken);
        }
        if deadline.is_some() && !self.wait_until(deadline) {
            return Err(TaskError::Timeout);
        }
        self.taken = true;
        let chunks = std::mem::take(&mut self.chunks);
        let mut sink = MapSink::with_capacity(&self.inner, chunks.iter().map(|&(_, n)| n).sum());
        for (id, len) in chunks {
            sink.add(id, len);
        }
        sink.finish()
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        self.chunks
            .iter()
            .all(|&(id, _)| self.inner.wait(id, deadline))
    }

    /// Waits until every result is in.
    pub fn wait(&self) {
        if !self.taken {
            self.wait_until(None);
        }
    }

    /// Waits at most `timeout`; whether every result is in.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.taken || self.wait_until(deadline(timeout))
    }

    /// Whether every result is in.
    pub fn ready(&self) -> bool {
        self.taken
            || self
                .chunks
                .iter()
                .all(|&(id, _)| self.inner.peek(id).is_some())
    }
}

impl<R> Drop for MapResult<R> {
    fn drop(&mut self) {
        if !self.taken {
            self.inner.abandon(self.chunks.iter().map(|&(id, _)| id));
        }
    }
}

/// The values of a map, taken by [`MapResult`] or by a blocking
/// [`map`](crate::Pool::map) as it sends its chunks: each chunk's decoded
/// into its place where its result lies in the result ring (see [`Sink`]),
/// in whatever order the chunks finish. Dropped unfinished, it forgets the
/// tasks it did not take.
pub(crate) struct MapSink<'a, R> {
    inner: &'a Inner,
    /// (task id, items in its chunk), in order (ids ascending).
    chunks: Vec<(u64, usize)>,
    values: Slots<R>,
    /// Per chunk: taken (`Ok`), or its error.
    outcome: Vec<Option<Result<(), TaskError>>>,
    /// The first chunk known to have failed: the later ones are taken
    /// without being decoded (the map's answer is an error by then).
    failed_at: usize,
}

impl<'a, R: DeserializeOwned> MapSink<'a, R> {
    /// Room for `values` values (more move them once).
    pub(crate) fn with_capacity(inner: &'a Inner, values: usize) -> Self {
        // (Small pages: on this project's VMs, with free page reporting,
        // a 2 MiB page often comes from memory handed back to the host,
        // and a fresh pool's first map then waited for 512 host faults at
        // once: W6 spread 48-115 M items/s with MADV_HUGEPAGE, 90-114
        // without, same median, nine rounds each.)
        MapSink {
            inner,
            chunks: Vec::new(),
            values: Slots::with_capacity(values),
            outcome: Vec::new(),
            failed_at: usize::MAX,
        }
    }

    /// Takes every chunk in order, each decoded into its place as it
    /// arrives (the chunks that finish meanwhile too, in any order); the
    /// values, or the first failing item's error in input order.
    pub(crate) fn finish(mut self) -> Result<Vec<R>, TaskError> {
        for i in 0..self.chunks.len() {
            let id = self.chunks[i].0;
            if self.wants(id) && !self.inner.take_with(id, None, &mut self) {
                self.fail(id, TaskError::Terminated);
            }
        }
        // (`failed_at` is the first chunk in input order that failed.)
        if let Some(Some(Err(e))) = self.outcome.get(self.failed_at) {
            return Err(e.clone());
        }
        let values = std::mem::replace(&mut self.values, Slots::with_capacity(0));
        values
            .into_vec()
            .ok_or_else(|| TaskError::Corrupted("a map's results are missing values".into()))
    }

    /// Whether a chunk taken so far failed (the map's answer is then an
    /// error whatever comes later).
    pub(crate) fn failed(&self) -> bool {
        self.failed_at != usize::MAX
    }

    fn index(&self, id: u64) -> Option<usize> {
        self.chunks.binary_search_by_key(&id, |&(id, _)| id).ok()
    }

    fn settle(&mut self, i: usize, outcome: Result<(), TaskError>) {
        if outcome.is_err() {
            self.failed_at = self.failed_at.min(i);
        }
        self.outcome[i] = Some(outcome);
    }
}

impl<R: DeserializeOwned> Sink for MapSink<'_, R> {
    /// Adds the next chunk: task `id` (above the others'), `len` items.
    fn add(&mut self, id: u64, len: usize) {
        self.chunks.push((id, len));
        self.values.add_chunk(len);
        self.outcome.push(None);
    }

    fn wants(&self, id: u64) -> bool {
        self.index(id).is_some_and(|i| self.outcome[i].is_none())
    }

    fn read(&mut self, id: u64, output: &[u8]) {
        let Some(i) = self.index(id).filter(|&i| self.outcome[i].is_none()) else {
            return;
        };
        let outcome = if i > self.failed_at {
            Ok(())
        } else {
            wire::fill_items(output, self.chunks[i].1, &mut self.values, i)
        };
        self.settle(i, outcome);
    }

    fn fail(&mut self, id: u64, error: TaskError) {
        if let Some(i) = self.index(id).filter(|&i| self.outcome[i].is_none()) {
            self.settle(i, Err(error));
        }
    }
}

impl<R> Drop for MapSink<'_, R> {
    fn drop(&mut self) {
        if self.outcome.iter().all(Option::is_some) {
            return;
        }
        let untaken = self
            .chunks
            .iter()
            .zip(&self.outcome)
            .filter(|(_, o)| o.is_none())
            .map(|(&(id, _), _)| id);
        self.inner.abandon(untaken);
    }
}

/// The lazy iterator of [`imap`](crate::Pool::imap) and
/// [`imap_unordered`](crate::Pool::imap_unordered): one `Result` per input
/// item. It pulls input only to keep a bounded number of tasks in flight,
/// so the input may be endless; dropping it forgets the tasks in flight.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// fn nap(ms: u64) -> u64 {
///     std::thread::sleep(std::time::Duration::from_millis(ms));
///     ms
/// }
/// let pool = proc_pool::Pool::new(2)?;
/// // In the order they finish: the short naps overtake the long one.
/// let done: Vec<u64> = pool
///     .imap_unordered(nap, [300, 1, 2])
///     .collect::<Result<_, _>>()?;
/// assert_eq!(done.last(), Some(&300));
/// # Ok(()) }
/// ```
pub struct IMap<R, I> {
    inner: Arc<Inner>,
    chunks: wire::ChunkRecords,
    input: Option<I>,
    window: usize,
    ordered: bool,
    /// (task id, or why the chunk was not sent; items) in input order.
    inflight: VecDeque<(Result<u64, TaskError>, usize)>,
    /// Results of the current chunk, ready to hand out.
    ready: std::vec::IntoIter<Result<R, TaskError>>,
}

impl<R, I> fmt::Debug for IMap<R, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IMap")
            .field("inflight", &self.inflight.len())
            .field("ordered", &self.ordered)
            .finish()
    }
}

impl<A, R, I> IMap<R, I>
where
    A: Serialize,
    R: DeserializeOwned,
    I: Iterator<Item = A>,
{
    pub(crate) fn new(
        inner: Arc<Inner>,
        chunks: wire::ChunkRecords,
        input: I,
        window: usize,
        ordered: bool,
    ) -> Self {
        IMap {
            inner,
            chunks,
            input: Some(input),
            window: window.max(2),
            ordered,
            inflight: VecDeque::new(),
            ready: Vec::new().into_iter(),
        }
    }

    /// Sends chunks until the window is full or the input ends.
    fn top_up(&mut self) {
        while self.inflight.len() < self.window {
            let Some(input) = self.input.as_mut() else {
                return;
            };
            let mut record = Vec::new();
            let Some((len, encoded)) = self.chunks.next(input, &mut record) else {
                self.input = None;
                return;
            };
            let sent = encoded.and_then(|()| self.inner.submit(record));
            let failed = sent.is_err();
            if sent == Err(TaskError::NotRunning) {
                // The input ends here: the pool no longer runs.
                self.input = None;
            }
            // A chunk that could not be sent is reported in place of its
            // items, in input order (after the chunks before it).
            self.inflight.push_back((sent, len));
            if failed {
                return;
            }
        }
    }
}

/// `len` copies of `error`.
fn vec_of_errors<R>(error: &TaskError, len: usize) -> Vec<Result<R, TaskError>> {
    (0..len).map(|_| Err(error.clone())).collect()
}

impl<A, R, I> Iterator for IMap<R, I>
where
    A: Serialize,
    R: DeserializeOwned,
    I: Iterator<Item = A>,
{
    type Item = Result<R, TaskError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(item) = self.ready.next() {
                return Some(item);
            }
            self.top_up();
            if let Some(item) = self.ready.next() {
                return Some(item);
            }
            if self.inflight.is_empty() {
                return None;
            }
            let (len, done) = if self.ordered {
                match self.inflight.pop_front()? {
                    (Ok(id), len) => (len, self.inner.take(id, None)),
                    (Err(e), len) => {
                        self.ready = vec_of_errors(&e, len).into_iter();
                        continue;
                    }
                }
            } else if let Some(at) = self.inflight.iter().position(|(s, _)| s.is_err()) {
                // Unordered: a chunk that was not sent is ready now.
                if let Some((Err(e), len)) = self.inflight.remove(at) {
                    self.ready = vec_of_errors(&e, len).into_iter();
                }
                continue;
            } else {
                let ids: Vec<u64> = self
                    .inflight
                    .iter()
                    .filter_map(|(s, _)| s.as_ref().ok().copied())
                    .collect();
                let (id, done) = self.inner.take_any(&ids, None)?;
                let at = self
                    .inflight
                    .iter()
                    .position(|(s, _)| s.as_ref().ok() == Some(&id))?;
                let (_, len) = self.inflight.remove(at)?;
                (len, Some(done))
            };
            let items = match done.map(|d| d.items::<R>(len)) {
                Some(Ok(items)) => items,
                Some(Err(e)) => vec_of_errors(&e, len),
                None => vec_of_errors(&TaskError::Terminated, len),
            };
            self.ready = items.into_iter();
        }
    }
}

impl<R, I> Drop for IMap<R, I> {
    fn drop(&mut self) {
        self.inner.abandon(
            self.inflight
                .iter()
                .filter_map(|(s, _)| s.as_ref().ok().copied()),
        );
    }
}
