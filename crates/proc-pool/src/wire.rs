//! What travels between the pool and its workers.
//!
//! A task message (pool → one worker's queue) is one or more task records:
//! a postcard header `(id, TaskFn, len)` followed by `len` bytes of
//! arguments. The arguments of every task are a *chunk*: a varint count
//! then that many postcard-encoded `A`s (an `apply` is a chunk of one).
//!
//! A result message (worker → the pool's result queue) is a postcard
//! header `(worker index, id)` followed by the runner's output: a tag byte,
//! then for [`ITEMS`] a varint count, the number `k` of items before the
//! first failure (8 bytes, little-endian), `k` postcard `R`s and then the
//! other items as postcard `Result<R, TaskError>`s; or for [`FAILED`] one
//! postcard `TaskError` for the whole task. (A chunk that fails nowhere is
//! plain `R`s: no per-item tag to write or read.)

use proc_core::task::{catch_panic, Panic, TaskFn};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::TaskError;

/// The output holds one result per item.
pub(crate) const ITEMS: u8 = 0;
/// The output is one error for the whole task.
pub(crate) const FAILED: u8 = 1;

/// The result id a worker uses to report that its initializer failed.
pub(crate) const INIT_FAILED: u64 = u64::MAX;

/// A postcard flavor that appends to a borrowed buffer, so one serializer
/// can write many values in place.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Varints are 1–10 bytes: a call to memcpy costs more than they do.
        if data.len() <= 16 {
            self.0.reserve(16);
            for &b in data {
                self.0.push(b);
            }
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// A serializer appending to `out`.
fn writer(out: &mut Vec<u8>) -> postcard::Serializer<Append<'_>> {
    postcard::Serializer {
        output: Append(out),
    }
}

/// Appends `value` in postcard; on failure `out` is as it was.
pub(crate) fn append<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    let mark = out.len();
    let mut ser = writer(out);
    match value.serialize(&mut ser) {
        Ok(()) => Ok(()),
        Err(e) => {
            ser.output.0.truncate(mark);
            Err(e.to_string())
        }
    }
}

/// Appends a varint (postcard's encoding of lengths).
pub(crate) fn append_varint(mut n: u64, out: &mut Vec<u8>) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a varint.
pub(crate) fn take_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut n = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        n |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((n, &bytes[i + 1..]));
        }
    }
    None
}

/// Starts a task record in `out` (empty): the id (set by [`set_record_id`]
/// when the pool takes it), the function, room for the length. The encoded
/// chunk goes after it, then [`end_record`].
pub(crate) fn begin_record(func: TaskFn, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0; 8]);
    // A TaskFn cannot fail to serialize.
    let _ = append(&func, out);
    out.extend_from_slice(&[0; 4]);
}

/// Ends the record begun by [`begin_record`]: writes the chunk's length.
pub(crate) fn end_record(out: &mut [u8]) -> Result<(), String> {
    let header = 8 + take_func(&out[8..]).map_or(0, |(_, rest)| out.len() - 8 - rest.len());
    let len = out.len() - header - 4;
    let len = u32::try_from(len).map_err(|_| format!("{len} bytes of arguments in one task"))?;
    out[header..header + 4].copy_from_slice(&len.to_le_bytes());
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

/// The ids of the task records of a task message (the valid prefix).
pub(crate) fn task_ids(mut bytes: &[u8]) -> Vec<(u64, usize, usize)> {
    let start = bytes.as_ptr() as usize;
    let mut ids = Vec::new();
    while !bytes.is_empty() {
        let begin = bytes.as_ptr() as usize - start;
        match take_task(bytes) {
            Some((record, rest)) => {
                bytes = rest;
                ids.push((record.id, begin, bytes.as_ptr() as usize - start));
            }
            None => break,
        }
    }
    ids
}

/// Appends a result header; returns where its run time goes (see
/// [`set_micros`]).
pub(crate) fn result_header(worker: u32, id: u64, out: &mut Vec<u8>) -> usize {
    let _ = append(&(worker, id), out);
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
    let _ = append(error, out);
}

impl From<Panic> for TaskError {
    fn from(p: Panic) -> Self {
        TaskError::Panicked {
            message: p.message,
            location: p.location,
        }
    }
}

/// Encodes a chunk of arguments (postcard's encoding of a sequence: a
/// varint count, then the items).
pub(crate) fn encode_chunk<A: Serialize>(items: &[A], out: &mut Vec<u8>) -> Result<(), String> {
    append(items, out)
}

/// The runner of every task: decodes the chunk item by item, runs `f` on
/// each (a panic fails that item only), appends each result.
pub(crate) fn run_chunk<A, R>(f: fn(A) -> R, input: &[u8], out: &mut Vec<u8>)
where
    A: DeserializeOwned,
    R: Serialize,
{
    let Some((count, rest)) = take_varint(input) else {
        failed(&TaskError::ArgsDecode("malformed chunk".into()), out);
        return;
    };
    out.push(ITEMS);
    append_varint(count, out);
    let plain_at = out.len();
    out.extend_from_slice(&count.to_le_bytes());
    let mut plain = true;
    let mut de = postcard::Deserializer::from_bytes(rest);
    let mut ser = writer(out);
    for done in 0..count {
        let fail = |ser: &mut postcard::Serializer<Append<'_>>, plain: &mut bool, error| {
            if *plain {
                // From here on every item carries its Result tag.
                *plain = false;
                ser.output.0[plain_at..plain_at + 8].copy_from_slice(&done.to_le_bytes());
            }
            let _ = Err::<(), TaskError>(error).serialize(ser);
        };
        let a = match A::deserialize(&mut de) {
            Ok(a) => a,
            Err(e) => {
                // The rest of the chunk cannot be found: all of it fails.
                let error = TaskError::ArgsDecode(e.to_string());
                for _ in done..count {
                    fail(&mut ser, &mut plain, error.clone());
                }
                return;
            }
        };
        match catch_panic(|| f(a)) {
            Ok(value) => {
                let mark = ser.output.0.len();
                let written = if plain {
                    value.serialize(&mut ser)
                } else {
                    Ok::<&R, ()>(&value).serialize(&mut ser)
                };
                if let Err(e) = written {
                    ser.output.0.truncate(mark);
                    fail(&mut ser, &mut plain, TaskError::Encode(e.to_string()));
                }
            }
            Err(panic) => fail(&mut ser, &mut plain, TaskError::from(panic)),
        }
    }
}

/// Whether runner output reports success for every item (without decoding
/// them); `None` if malformed.
pub(crate) fn all_ok(output: &[u8]) -> Option<bool> {
    let (&tag, rest) = output.split_first()?;
    match tag {
        FAILED => Some(false),
        ITEMS => {
            let (count, rest) = take_varint(rest)?;
            let plain = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            Some(plain == count)
        }
        _ => None,
    }
}

/// Reads runner output for `expected` items, handing each to `each` in
/// order; stops early when `each` returns false.
pub(crate) fn for_each_item<R: DeserializeOwned>(
    output: &[u8],
    expected: usize,
    mut each: impl FnMut(Result<R, TaskError>) -> bool,
) -> Result<(), TaskError> {
    let bad = |what: &str| TaskError::Corrupted(format!("result message: {what}"));
    let (&tag, rest) = output.split_first().ok_or_else(|| bad("empty"))?;
    match tag {
        FAILED => {
            let error = postcard::from_bytes::<TaskError>(rest).map_err(|e| bad(&e.to_string()))?;
            Err(error)
        }
        ITEMS => {
            let (count, rest) = take_varint(rest).ok_or_else(|| bad("count"))?;
            if count as usize != expected {
                return Err(bad("item count"));
            }
            let plain = rest
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .filter(|&p| p <= count)
                .ok_or_else(|| bad("plain count"))? as usize;
            let mut de = postcard::Deserializer::from_bytes(&rest[8..]);
            for done in 0..expected {
                let item = if done < plain {
                    R::deserialize(&mut de).map(Ok)
                } else {
                    <Result<R, TaskError>>::deserialize(&mut de)
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
        _ => Err(bad("tag")),
    }
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
