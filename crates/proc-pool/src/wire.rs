//! What travels between the pool and its workers.
//!
//! A task message (pool → one worker's queue) is one or more task records:
//! the id (8 bytes, little-endian), the postcard `TaskFn`, the length of
//! the arguments (4 bytes) and the arguments. The arguments of every task
//! are a *chunk*: a sequence of `A`s in the pool's [codec](crate::codec)
//! (an `apply` is a chunk of one).
//!
//! A result message (worker → the pool's result queue) is a postcard
//! header `(worker index, id)`, the task's run time in µs (4 bytes), then
//! the runner's output: a tag byte, then for [`ITEMS`] the count (8
//! bytes), the number `k` of items before the first failure (8 bytes),
//! `k` plain `R`s and then the other items as `Result<R, TaskError>`s, all
//! in the codec; or for [`FAILED`] one postcard `TaskError` for the whole
//! task. (A chunk that fails nowhere is plain `R`s: no per-item tag to
//! write or read.)

use proc_core::task::{catch_panic, Panic, TaskFn};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{Decoder, Encoder};
use crate::error::TaskError;
use crate::sys::Slots;

/// The output holds one result per item.
pub(crate) const ITEMS: u8 = 0;
/// The output is one error for the whole task.
pub(crate) const FAILED: u8 = 1;

/// The result id a worker uses to report that its initializer failed.
pub(crate) const INIT_FAILED: u64 = u64::MAX;
/// The result id a worker uses to report that its initializer returned.
pub(crate) const INIT_DONE: u64 = u64::MAX - 1;

/// Appends `value` in postcard (headers and errors); on failure `out` is
/// as it was. Headers fit a stack buffer: no allocation per task.
fn append_postcard<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    let mut small = [0u8; 64];
    match postcard::to_slice(value, &mut small) {
        Ok(bytes) => out.extend_from_slice(bytes),
        Err(_) => {
            if let Ok(bytes) = postcard::to_stdvec(value) {
                out.extend_from_slice(&bytes);
            }
        }
    }
}

/// Starts a task record in `out` (empty): the id (set by [`set_record_id`]
/// when the pool takes it), the function, room for the length. The encoded
/// chunk goes after it, then [`end_record`] with the position returned.
pub(crate) fn begin_record(func: TaskFn, out: &mut Vec<u8>) -> usize {
    out.extend_from_slice(&[0; 8]);
    append_postcard(&func, out);
    out.extend_from_slice(&[0; 4]);
    out.len() - 4
}

/// Ends the record begun by [`begin_record`] (`len_at`: what it returned):
/// writes the chunk's length.
pub(crate) fn end_record(out: &mut [u8], len_at: usize) -> Result<(), String> {
    let len = out.len() - len_at - 4;
    let len = u32::try_from(len).map_err(|_| format!("{len} bytes of arguments in one task"))?;
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Sets the id of a record made by [`begin_record`].
pub(crate) fn set_record_id(out: &mut [u8], id: u64) {
    out[..8].copy_from_slice(&id.to_le_bytes());
}

fn take_func(bytes: &[u8]) -> Option<(TaskFn, &[u8])> {
    postcard::take_from_bytes::<TaskFn>(bytes).ok()
}

/// One task record read from a task message.
pub(crate) struct TaskRecord<'a> {
    pub(crate) id: u64,
    pub(crate) func: TaskFn,
    pub(crate) args: &'a [u8],
}

/// Reads the next task record of `bytes`; `None` when malformed.
pub(crate) fn take_task(bytes: &[u8]) -> Option<(TaskRecord<'_>, &[u8])> {
    let id = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let (func, rest) = take_func(&bytes[8..])?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let rest = &rest[4..];
    if rest.len() < len {
        return None;
    }
    let (args, rest) = rest.split_at(len);
    Some((TaskRecord { id, func, args }, rest))
}

/// The task records of a task message (the valid prefix): each id with a
/// copy of its whole record, ready to be sent again.
pub(crate) fn task_records(message: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut records = Vec::new();
    let mut rest = message;
    while let Some((record, tail)) = take_task(rest) {
        let len = rest.len() - tail.len();
        records.push((record.id, rest[..len].to_vec()));
        rest = tail;
    }
    records
}

/// Appends a result header; returns where its run time goes (see
/// [`set_micros`]).
pub(crate) fn result_header(worker: u32, id: u64, out: &mut Vec<u8>) -> usize {
    append_postcard(&(worker, id), out);
    out.extend_from_slice(&[0; 4]);
    out.len() - 4
}

/// Records how long the task ran, in microseconds, in its result header.
pub(crate) fn set_micros(out: &mut [u8], at: usize, micros: u32) {
    if let Some(slot) = out.get_mut(at..at + 4) {
        slot.copy_from_slice(&micros.to_le_bytes());
    }
}

/// Reads a result header: (worker index, id, run time in µs, runner
/// output).
pub(crate) fn take_result(bytes: &[u8]) -> Option<(u32, u64, u32, &[u8])> {
    let ((worker, id), rest) = postcard::take_from_bytes::<(u32, u64)>(bytes).ok()?;
    let micros = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    Some((worker, id, micros, &rest[4..]))
}

/// Appends a whole-task failure as runner output.
pub(crate) fn failed(error: &TaskError, out: &mut Vec<u8>) {
    out.push(FAILED);
    append_postcard(error, out);
}

impl From<Panic> for TaskError {
    fn from(p: Panic) -> Self {
        TaskError::Panicked {
            message: p.message,
            location: p.location,
        }
    }
}

/// Encodes a chunk of at most `max` arguments taken from `items` (a
/// length, then the items), straight from the iterator: a copy of the
/// chunk first was a megabyte written and read again per W6 chunk. How
/// many it took, and whether they all encoded; after one that failed, the
/// rest of the chunk's items are taken (and counted) but not encoded, and
/// the record (its count left at 0) is not to be sent.
pub(crate) fn encode_items<A: Serialize>(
    items: &mut impl Iterator<Item = A>,
    max: usize,
    out: &mut Vec<u8>,
) -> (usize, Result<(), String>) {
    let count_at = out.len();
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut taken = 0;
    let mut enc = Encoder::new(out);
    for item in items.by_ref().take(max) {
        taken += 1;
        if let Err(e) = enc.encode(&item) {
            drop(enc);
            let rest = items.by_ref().take(max - taken).count();
            return (taken + rest, Err(e.to_string()));
        }
    }
    drop(enc);
    out[count_at..count_at + 8].copy_from_slice(&(taken as u64).to_le_bytes());
    (taken, Ok(()))
}

/// A map's chunks encoded into task records one at a time (`map`, `map_async`
/// and `imap` alike): [`begin_record`], the chunk's items
/// ([`encode_items`]), [`end_record`].
pub(crate) struct ChunkRecords {
    func: TaskFn,
    chunksize: usize,
    /// Room to reserve for the next record: the last one's size and an
    /// eighth (the chunks of a map are alike).
    capacity: usize,
}

impl ChunkRecords {
    /// Records of `f`'s tasks over chunks of `chunksize` items (at least
    /// one).
    pub(crate) fn new<A, R>(f: fn(A) -> R, chunksize: usize) -> Self
    where
        A: DeserializeOwned,
        R: Serialize,
    {
        ChunkRecords {
            func: TaskFn::new(run_chunk::<A, R>, f),
            chunksize: chunksize.max(1),
            capacity: 64,
        }
    }

    /// Encodes the next chunk of `items` into `record` (empty): how many
    /// items it took, and whether the record may be sent (else the chunk's
    /// [`TaskError::ArgsEncode`]); `None` once `items` is done.
    pub(crate) fn next<A: Serialize>(
        &mut self,
        items: &mut impl Iterator<Item = A>,
        record: &mut Vec<u8>,
    ) -> Option<(usize, Result<(), TaskError>)> {
        record.reserve(self.capacity);
        let len_at = begin_record(self.func, record);
        let (len, encoded) = encode_items(items, self.chunksize, record);
        if len == 0 {
            return None;
        }
        let ended = encoded
            .and_then(|()| end_record(record, len_at))
            .map_err(TaskError::ArgsEncode);
        if ended.is_ok() {
            self.capacity = self.capacity.max(record.len() + record.len() / 8);
        }
        Some((len, ended))
    }
}

/// Encodes a chunk of one argument.
pub(crate) fn encode_one<A: Serialize>(item: &A, out: &mut Vec<u8>) -> Result<(), String> {
    Encoder::new(out)
        .encode(&(1u64, item))
        .map_err(|e| e.to_string())
}

/// The runner of every task: decodes the chunk item by item, runs `f` on
/// each, appends each result. A panic in `f`, or in serializing or
/// dropping its result, fails that item only; one while decoding an
/// argument fails the whole task (the items after it cannot be found).
pub(crate) fn run_chunk<A, R>(f: fn(A) -> R, input: &[u8], out: &mut Vec<u8>)
where
    A: DeserializeOwned,
    R: Serialize,
{
    let mut de = Decoder::new(input);
    let start = out.len();
    let count = match de.decode::<u64>() {
        // Each item takes at least a byte, unless it is zero-sized (a map
        // over `()`s): a garbled count cannot make the loop below run away.
        Ok(n) if n <= input.len() as u64 || (std::mem::size_of::<A>() == 0 && n <= 1 << 24) => n,
        _ => {
            failed(&TaskError::ArgsDecode("malformed chunk".into()), out);
            return;
        }
    };
    out.push(ITEMS);
    out.extend_from_slice(&count.to_le_bytes());
    let plain_at = out.len();
    out.extend_from_slice(&count.to_le_bytes());
    // The items run in stretches, each under one panic catch (a catch per
    // item kept `f` from being inlined into the loop: ~6% of W6's CPU). A
    // panic ends the stretch at its item, which fails alone (whatever of
    // its result was written is dropped); the next stretch starts after it.
    let mut at = Progress {
        rest: de.rest(),
        done: 0,
        // (Set by each item before it is read.)
        mark: out.len(),
        decoding: false,
        plain: true,
    };
    while at.done < count {
        let error = match catch_panic(|| run_stretch(f, &mut at, out, count)) {
            Ok(Stop::Done) => return,
            Ok(Stop::Encode(e)) => {
                // (The encoder took back what it had written of it.)
                fail_item(out, &mut at, plain_at, TaskError::Encode(e.to_string()));
                continue;
            }
            // The rest of the chunk cannot be found: the whole task fails
            // (one error, not one per item).
            Ok(Stop::Decode(e)) => TaskError::ArgsDecode(e.to_string()),
            Err(panic) if at.decoding => {
                TaskError::ArgsDecode(format!("decoding an argument panicked: {}", panic.message))
            }
            Err(panic) => {
                out.truncate(at.mark);
                fail_item(out, &mut at, plain_at, TaskError::from(panic));
                continue;
            }
        };
        out.truncate(start);
        failed(&error, out);
        return;
    }
}

/// Where a chunk's items stand between stretches.
struct Progress<'de> {
    /// The arguments not decoded yet.
    rest: &'de [u8],
    /// Items done (their results written).
    done: u64,
    /// Where the current item's result starts.
    mark: usize,
    /// Whether the panic came from decoding the current item's argument
    /// rather than from `f`, its result's encoding or its result's drop
    /// (all of which fail the item alone).
    decoding: bool,
    /// Whether every item so far succeeded: results are written without
    /// their `Result` tag until one fails.
    plain: bool,
}

/// How a stretch ended (a panic ends one too).
enum Stop {
    Done,
    Decode(crate::codec::Error),
    Encode(crate::codec::Error),
}

/// A stretch's working copy of the progress: plain locals while it runs
/// (kept in registers: in the [`Progress`] behind a reference, every item
/// stored and reloaded the decoder's position, the output's length and the
/// counters), stored back when it ends, by a panic too.
struct Stretch<'p, 'de, 'o> {
    home: &'p mut Progress<'de>,
    de: Decoder<'de>,
    enc: Encoder<'o>,
    done: u64,
    mark: usize,
    decoding: bool,
}

impl Drop for Stretch<'_, '_, '_> {
    #[inline]
    fn drop(&mut self) {
        self.home.rest = self.de.rest();
        self.home.done = self.done;
        self.home.mark = self.mark;
        self.home.decoding = self.decoding;
    }
}

/// Runs items from `at` on until the chunk's end, a decoding error or an
/// encoding error (that item's).
#[inline(always)]
fn run_stretch<A, R>(f: fn(A) -> R, at: &mut Progress<'_>, out: &mut Vec<u8>, count: u64) -> Stop
where
    A: DeserializeOwned,
    R: Serialize,
{
    let plain = at.plain;
    let mut s = Stretch {
        de: Decoder::new(at.rest),
        enc: Encoder::new(out),
        done: at.done,
        mark: at.mark,
        decoding: false,
        home: at,
    };
    while s.done < count {
        s.mark = s.enc.out.len();
        s.decoding = true;
        let a = match s.de.decode::<A>() {
            Ok(a) => a,
            Err(e) => return Stop::Decode(e),
        };
        s.decoding = false;
        let value = f(a);
        let written = if plain {
            s.enc.encode(&value)
        } else {
            s.enc.encode(&Ok::<&R, ()>(&value))
        };
        // Before the count moves on: a panicking drop is this item's
        // failure (its written result is cut off at `mark`).
        drop(value);
        if let Err(e) = written {
            return Stop::Encode(e);
        }
        s.done += 1;
    }
    Stop::Done
}

/// Writes item `at.done`'s failure after the results so far and counts it.
fn fail_item(out: &mut Vec<u8>, at: &mut Progress<'_>, plain_at: usize, error: TaskError) {
    if at.plain {
        // From here on every item carries its Result tag.
        at.plain = false;
        out[plain_at..plain_at + 8].copy_from_slice(&at.done.to_le_bytes());
    }
    let _ = Encoder::new(out).encode(&Err::<(), TaskError>(error));
    at.done += 1;
}

/// The count and the plain-prefix length of `ITEMS` output.
fn items_header(rest: &[u8]) -> Option<(u64, u64, &[u8])> {
    let count = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let plain = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    (plain <= count).then_some((count, plain, &rest[16..]))
}

/// Whether runner output reports success for every item (without decoding
/// them); `None` if malformed.
pub(crate) fn all_ok(output: &[u8]) -> Option<bool> {
    let (&tag, rest) = output.split_first()?;
    match tag {
        FAILED => Some(false),
        ITEMS => items_header(rest).map(|(count, plain, _)| plain == count),
        _ => None,
    }
}

/// Opens runner output for `expected` items: how many come without their
/// `Result` tag, and the items; the task's error if it failed as a whole.
fn open_items(output: &[u8], expected: usize) -> Result<(usize, Decoder<'_>), TaskError> {
    let bad = |what: &str| TaskError::Corrupted(format!("result message: {what}"));
    let (&tag, rest) = output.split_first().ok_or_else(|| bad("empty"))?;
    match tag {
        FAILED => {
            let error = postcard::from_bytes::<TaskError>(rest).map_err(|e| bad(&e.to_string()))?;
            Err(error)
        }
        ITEMS => {
            let (count, plain, rest) = items_header(rest).ok_or_else(|| bad("header"))?;
            if count != expected as u64 {
                return Err(bad("item count"));
            }
            // (At most `count`: checked with the header.)
            Ok((plain as usize, Decoder::new(rest)))
        }
        _ => Err(bad("tag")),
    }
}

/// Reads runner output for `expected` items, handing each to `each` in
/// order; stops early when `each` returns false.
pub(crate) fn for_each_item<R: DeserializeOwned>(
    output: &[u8],
    expected: usize,
    mut each: impl FnMut(Result<R, TaskError>) -> bool,
) -> Result<(), TaskError> {
    let (plain, mut de) = open_items(output, expected)?;
    for done in 0..expected {
        let item = if done < plain {
            de.decode::<R>().map(Ok)
        } else {
            de.decode::<Result<R, TaskError>>()
        };
        match item {
            Ok(item) => {
                if !each(item) {
                    return Ok(());
                }
            }
            Err(e) => {
                // The rest cannot be found either.
                let error = TaskError::ResultDecode(e.to_string());
                for _ in done..expected {
                    if !each(Err(error.clone())) {
                        break;
                    }
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Writes the `expected` values of runner output into chunk `chunk` of
/// `values` (a map's results); the task's error, or the first failed
/// item's.
pub(crate) fn fill_items<R: DeserializeOwned>(
    output: &[u8],
    expected: usize,
    values: &mut Slots<R>,
    chunk: usize,
) -> Result<(), TaskError> {
    let decode_error = |e: crate::codec::Error| TaskError::ResultDecode(e.to_string());
    let (plain, de) = open_items(output, expected)?;
    // The values before the first failure: decoded straight into their
    // places (see `Slots::append_with`: a million of them in W6).
    let (mut de, error) = values.append_with(chunk, plain, (de, None), |(de, error)| {
        match de.decode::<R>() {
            Ok(v) => Some(v),
            Err(e) => {
                *error = Some(e);
                None
            }
        }
    });
    if let Some(e) = error {
        return Err(decode_error(e));
    }
    for _ in plain..expected {
        match de.decode::<Result<R, TaskError>>() {
            Ok(Ok(v)) => {
                values.push(chunk, v);
            }
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(decode_error(e)),
        }
    }
    Ok(())
}

/// Decodes runner output for `expected` items.
pub(crate) fn decode_items<R: DeserializeOwned>(
    output: &[u8],
    expected: usize,
) -> Result<Vec<Result<R, TaskError>>, TaskError> {
    let mut items = Vec::with_capacity(expected);
    for_each_item(output, expected, |item| {
        items.push(item);
        true
    })?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn double(x: u64) -> u64 {
        x * 2
    }

    /// A chunk of `items` as the pool encodes it.
    fn encode_chunk(items: &[u64], out: &mut Vec<u8>) -> Result<(), String> {
        let (taken, encoded) = encode_items(&mut items.iter(), items.len(), out);
        assert_eq!(taken, items.len());
        encoded
    }

    fn unit(_: ()) -> u8 {
        1
    }

    #[test]
    fn a_chunk_round_trips() {
        let mut input = Vec::new();
        encode_chunk(&[1u64, 2, 3], &mut input).expect("encode");
        let mut out = Vec::new();
        run_chunk(double, &input, &mut out);
        assert_eq!(all_ok(&out), Some(true));
        let items = decode_items::<u64>(&out, 3).expect("items");
        assert_eq!(items, vec![Ok(2), Ok(4), Ok(6)]);
        // A count the parent did not send is an error, not a guess.
        assert!(decode_items::<u64>(&out, 4).is_err());
    }

    #[test]
    fn a_garbled_count_is_one_failure() {
        for count in [u64::MAX, 1 << 40, 4] {
            let mut input = count.to_le_bytes().to_vec();
            input.extend_from_slice(&[0; 8]);
            let mut out = Vec::new();
            run_chunk(double, &input, &mut out);
            assert_eq!(out.first(), Some(&FAILED), "count {count}");
            assert!(matches!(
                decode_items::<u64>(&out, 1),
                Err(TaskError::ArgsDecode(_))
            ));
        }
        // Zero-sized arguments: a count beyond the bound is refused too.
        let mut out = Vec::new();
        run_chunk(unit, &u64::MAX.to_le_bytes(), &mut out);
        assert_eq!(out.first(), Some(&FAILED));
        let mut out = Vec::new();
        run_chunk(unit, &3u64.to_le_bytes(), &mut out);
        assert_eq!(decode_items::<u8>(&out, 3).expect("items").len(), 3);
    }

    /// Fails to serialize when 5, panics when 7 (in `picky`, below).
    #[derive(Debug, PartialEq)]
    struct Picky(u64);

    impl Serialize for Picky {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            if self.0 == 5 {
                return Err(serde::ser::Error::custom("no fives"));
            }
            s.serialize_u64(self.0)
        }
    }

    impl<'de> serde::Deserialize<'de> for Picky {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            u64::deserialize(d).map(Picky)
        }
    }

    fn picky(x: u64) -> Picky {
        assert!(x != 7, "no sevens");
        Picky(x)
    }

    #[test]
    fn failed_items_fail_alone_and_a_map_sees_the_first() {
        let mut input = Vec::new();
        encode_chunk(&(0..12u64).collect::<Vec<_>>(), &mut input).expect("encode");
        let mut out = Vec::new();
        // (The panic message goes to stderr: expected.)
        run_chunk(picky, &input, &mut out);
        assert_eq!(all_ok(&out), Some(false));
        let items = decode_items::<Picky>(&out, 12).expect("items");
        for (i, item) in items.into_iter().enumerate() {
            match (i, item) {
                (5, Err(TaskError::Encode(m))) => assert!(m.contains("no fives"), "{m}"),
                (7, Err(TaskError::Panicked { message, .. })) => assert_eq!(message, "no sevens"),
                (i, Ok(v)) if i != 5 && i != 7 => assert_eq!(v, Picky(i as u64)),
                (i, other) => panic!("{i}: {other:?}"),
            }
        }
        // A map's decoding: the first failure (the values before it are
        // written, and dropped with the slots).
        let mut values = Slots::new(&[1, 12]);
        match fill_items::<Picky>(&out, 12, &mut values, 1) {
            Err(TaskError::Encode(m)) => assert!(m.contains("no fives"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(values.into_vec().is_none());
        // All plain: every value, in its chunk's place.
        let mut plain = Vec::new();
        run_chunk(double, &input, &mut plain);
        let mut values = Slots::new(&[12, 1]);
        fill_items::<u64>(&plain, 12, &mut values, 0).expect("values");
        assert!(values.push(1, 7));
        assert_eq!(
            values.into_vec().expect("whole"),
            [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 7]
        );
        assert!(fill_items::<u64>(&plain, 11, &mut Slots::new(&[11]), 0).is_err());
        // Cut or flipped anywhere: an error or other values, never a panic.
        for cut in 0..plain.len() {
            assert!(fill_items::<u64>(&plain[..cut], 12, &mut Slots::new(&[12]), 0).is_err());
        }
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0xff;
            let _ = fill_items::<Picky>(&bad, 12, &mut Slots::new(&[12]), 0);
        }
    }

    #[test]
    fn garbled_results_are_errors() {
        let mut input = Vec::new();
        encode_chunk(&[1u64, 2], &mut input).expect("encode");
        let mut out = Vec::new();
        run_chunk(double, &input, &mut out);
        for cut in 0..out.len() {
            let _ = decode_items::<u64>(&out[..cut], 2);
        }
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0xff;
            let _ = decode_items::<u64>(&bad, 2);
        }
    }
}
