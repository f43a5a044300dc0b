//! A thread that lasts as long as the process, for starts whose child takes
//! a parent-death signal.
//!
//! The kernel sends `PR_SET_PDEATHSIG`'s signal when the *thread* that
//! started the child ends, not the process. A start on the main thread is
//! fine (its end is the process's); one on another thread, which may end
//! while the program runs on, is made from this thread instead, created on
//! the first such start and never ended.

use std::io;
use std::sync::mpsc;

use crate::sys;

type Job = Box<dyn FnOnce() + Send>;

/// The thread's queue of jobs, and the process it belongs to (a forked
/// child inherits the sender, not the thread).
static THREAD: parking_lot::Mutex<Option<(libc::pid_t, mpsc::Sender<Job>)>> =
    parking_lot::const_mutex(None);

/// Runs `f` on the calling thread if it is the main thread, else on the
/// lasting thread; returns what `f` returned.
///
/// # Errors
///
/// If the lasting thread could not be started.
pub(crate) fn run<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> io::Result<R> {
    if sys::on_main_thread() {
        return Ok(f());
    }
    let (done, result) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = done.send(f());
    });
    let gone = || io::Error::other("proc's lasting thread is gone");
    {
        let me = sys::getpid();
        let mut thread = THREAD.lock();
        let jobs = match &*thread {
            Some((owner, jobs)) if *owner == me => jobs.clone(),
            _ => {
                let (jobs, incoming) = mpsc::channel::<Job>();
                std::thread::Builder::new()
                    .name("proc-lasting".into())
                    .spawn(move || {
                        for job in incoming {
                            // A job that panics loses its own answer only.
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                    })?;
                *thread = Some((me, jobs.clone()));
                jobs
            }
        };
        jobs.send(job).map_err(|_| gone())?;
    }
    result.recv().map_err(|_| gone())
}
