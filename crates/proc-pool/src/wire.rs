//! What travels between the pool and its workers.
//!
//! A task message (pool → one worker's queue) is one or more task records:
//! a postcard header `(id, TaskFn, len)` followed by `len` bytes of
//! arguments. The arguments of every task are a *chunk*: a varint count
//! then that many postcard-encoded `A`s (an `apply` is a chunk of one).
//!
//! A result message (worker → the pool's result queue) is a postcard
//! header `(worker index, id)` followed by the runner's output: a tag byte,
//! then for [`ITEMS`] a varint count and that many postcard
//! `Result<R, TaskError>`s, or for [`FAILED`] one postcard `TaskError` for
//! the whole task.

use proc_core::task::{catch_panic, Panic, TaskFn};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::TaskError;

/// The output holds one result per item.
pub(crate) const ITEMS: u8 = 0;
/// The output is one error for the whole task.
pub(crate) const FAILED: u8 = 1;

/// The result id a worker uses to report that its initializer failed.
pub(crate) const INIT_FAILED: u64 = u64::MAX;

/// An `Extend<u8>` over a borrowed buffer, so postcard appends in place.
struct Sink<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Sink<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl<'a> Extend<&'a u8> for Sink<'_> {
    fn extend<I: IntoIterator<Item = &'a u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// Appends `value` in postcard; on failure `out` is as it was.
pub(crate) fn append<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    let mark = out.len();
    match postcard::to_extend(value, Sink(out)) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(mark);
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

/// Appends a task record: header, then the encoded chunk.
pub(crate) fn task_record(id: u64, func: TaskFn, chunk: &[u8], out: &mut Vec<u8>) {
    // A (u64, TaskFn, u32) header cannot fail to serialize.
    let _ = append(&(id, func, chunk.len() as u32), out);
    out.extend_from_slice(chunk);
}

/// One task record read from a task message.
pub(crate) struct TaskRecord<'a> {
    pub(crate) id: u64,
    pub(crate) func: TaskFn,
    pub(crate) args: &'a [u8],
}

/// Reads the next task record of `bytes`; `None` when malformed.
pub(crate) fn take_task(bytes: &[u8]) -> Option<(TaskRecord<'_>, &[u8])> {
    let ((id, func, len), rest) = postcard::take_from_bytes::<(u64, TaskFn, u32)>(bytes).ok()?;
    let len = len as usize;
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

/// Appends a result header.
pub(crate) fn result_header(worker: u32, id: u64, out: &mut Vec<u8>) {
    let _ = append(&(worker, id), out);
}

/// Reads a result header: (worker index, id, runner output).
pub(crate) fn take_result(bytes: &[u8]) -> Option<(u32, u64, &[u8])> {
    let ((worker, id), rest) = postcard::take_from_bytes::<(u32, u64)>(bytes).ok()?;
    Some((worker, id, rest))
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

/// Encodes a chunk of arguments.
pub(crate) fn encode_chunk<A: Serialize>(items: &[A], out: &mut Vec<u8>) -> Result<(), String> {
    append_varint(items.len() as u64, out);
    for item in items {
        append(item, out)?;
    }
    Ok(())
}

/// The runner of every task: decodes the chunk item by item, runs `f` on
/// each (a panic fails that item only), appends each result.
pub(crate) fn run_chunk<A, R>(f: fn(A) -> R, input: &[u8], out: &mut Vec<u8>)
where
    A: DeserializeOwned,
    R: Serialize,
{
    let Some((count, mut rest)) = take_varint(input) else {
        failed(&TaskError::ArgsDecode("malformed chunk".into()), out);
        return;
    };
    out.push(ITEMS);
    append_varint(count, out);
    for done in 0..count {
        let a = match postcard::take_from_bytes::<A>(rest) {
            Ok((a, tail)) => {
                rest = tail;
                a
            }
            Err(e) => {
                // The rest of the chunk cannot be found: all of it fails.
                let error = TaskError::ArgsDecode(e.to_string());
                for _ in done..count {
                    out.push(1);
                    let _ = append(&error, out);
                }
                return;
            }
        };
        match catch_panic(|| f(a)) {
            Ok(value) => {
                out.push(0);
                if let Err(e) = append(&value, out) {
                    out.pop();
                    out.push(1);
                    let _ = append(&TaskError::Encode(e), out);
                }
            }
            Err(panic) => {
                out.push(1);
                let _ = append(&TaskError::from(panic), out);
            }
        }
    }
}

/// Decodes runner output for `expected` items.
pub(crate) fn decode_items<R: DeserializeOwned>(
    output: &[u8],
    expected: usize,
) -> Result<Vec<Result<R, TaskError>>, TaskError> {
    let bad = |what: &str| TaskError::Corrupted(format!("result message: {what}"));
    let (&tag, rest) = output.split_first().ok_or_else(|| bad("empty"))?;
    match tag {
        FAILED => {
            let error = postcard::from_bytes::<TaskError>(rest).map_err(|e| bad(&e.to_string()))?;
            Err(error)
        }
        ITEMS => {
            let (count, mut rest) = take_varint(rest).ok_or_else(|| bad("count"))?;
            if count as usize != expected {
                return Err(bad("item count"));
            }
            let mut items = Vec::with_capacity(expected);
            for _ in 0..expected {
                match postcard::take_from_bytes::<Result<R, TaskError>>(rest) {
                    Ok((item, tail)) => {
                        rest = tail;
                        items.push(item);
                    }
                    Err(e) => {
                        // The rest cannot be found either.
                        let error = TaskError::ResultDecode(e.to_string());
                        items.resize_with(expected, || Err(error.clone()));
                        break;
                    }
                }
            }
            Ok(items)
        }
        _ => Err(bad("tag")),
    }
}
