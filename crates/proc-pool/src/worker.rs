//! The worker process: takes task messages from its own queue, runs each
//! task, puts each result on the pool's result queue.

use std::time::{Duration, Instant};

use proc_core::task::TaskFn;
use proc_queue::{GetError, Queue};
use serde::{Deserialize, Serialize};

use crate::error::TaskError;
use crate::wire;

/// What a worker is started with (an entry's arguments: the queues travel
/// as shared descriptors).
#[derive(Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    pub(crate) index: u32,
    pub(crate) tasks: Queue<()>,
    pub(crate) results: Queue<()>,
    pub(crate) maxtasks: Option<u64>,
    /// The initializer and its encoded arguments (a chunk of one).
    pub(crate) initializer: Option<(TaskFn, Vec<u8>)>,
}

/// Exit code of a worker that found a malformed task message.
const CORRUPTED_EXIT: i32 = 3;
/// Exit code of a worker whose parent is gone.
const PARENT_GONE_EXIT: i32 = 4;
/// How often an idle worker checks that its parent lives.
const PARENT_CHECK: Duration = Duration::from_secs(1);

/// The worker's entry: returns when its queue is closed, when it has run
/// `maxtasks` tasks, or when its initializer failed.
pub(crate) fn worker_main(args: WorkerArgs) {
    let WorkerArgs {
        index,
        tasks,
        results,
        maxtasks,
        initializer,
    } = args;
    // The process ends when this returns: unmapping the rings one by one
    // first would only add work (and TLB shootdowns) to the exit.
    let tasks = std::mem::ManuallyDrop::new(tasks);
    let results = std::mem::ManuallyDrop::new(results);
    // Ctrl-C goes to the whole process group; the parent decides.
    let _ = proc_core::task::ignore_sigint();
    // A panic is the task's result, with message and location.
    proc_core::task::quiet_panics();
    let mut out = Vec::with_capacity(4096);
    if let Some((func, input)) = initializer {
        let mut output = Vec::new();
        let failure = match crate::sys::call_task(&func, &input, &mut output) {
            Err(e) => Some(TaskError::Corrupted(e.to_string())),
            Ok(()) => match wire::decode_items::<()>(&output, 1) {
                Err(e) => Some(e),
                Ok(mut items) => items.pop().and_then(Result::err),
            },
        };
        if let Some(error) = failure {
            wire::result_header(index, wire::INIT_FAILED, &mut out);
            wire::failed(&error, &mut out);
            let _ = results.put_bytes(&out);
            return;
        }
        // Ready: a worker that dies before this was ended by its
        // initializer (or while it ran).
        wire::result_header(index, wire::INIT_DONE, &mut out);
        if results.put_bytes(&out).is_err() {
            return;
        }
        out.clear();
    }
    let mut ran = 0u64;
    let mut message = Vec::new();
    // A worker dies with its parent: by the parent-death signal, and, where
    // that signal could not be armed (a Spawn worker started on a thread
    // other than the main one: the signal follows that thread), by seeing
    // itself adopted while it waits for work.
    let parent = crate::sys::parent_pid();
    loop {
        match tasks.get_bytes_into_timeout(&mut message, PARENT_CHECK) {
            Ok(()) => {}
            Err(GetError::Timeout) => {
                if crate::sys::parent_pid() != parent {
                    proc_core::exit(PARENT_GONE_EXIT);
                }
                continue;
            }
            // Closed: the pool is done with this worker.
            Err(_) => return,
        }
        let mut rest = &message[..];
        while !rest.is_empty() {
            let Some((record, tail)) = wire::take_task(rest) else {
                proc_core::exit(CORRUPTED_EXIT);
            };
            rest = tail;
            out.clear();
            let micros_at = wire::result_header(index, record.id, &mut out);
            let mark = out.len();
            let started = Instant::now();
            if let Err(e) = crate::sys::call_task(&record.func, record.args, &mut out) {
                out.truncate(mark);
                wire::failed(&TaskError::Corrupted(e.to_string()), &mut out);
            }
            let micros = started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            wire::set_micros(&mut out, micros_at, micros);
            if results.put_bytes(&out).is_err() {
                return;
            }
            ran += 1;
            if maxtasks.is_some_and(|max| ran >= max) {
                return;
            }
        }
    }
}
