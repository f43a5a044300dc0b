//! [`JoinHandle`]: waiting for a child and taking its result.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::builder::Outcome;
use crate::children::{self, SlotId};
use crate::error::{DecodeError, JoinError};
use crate::pid::Pid;
use crate::sys::{self, Reap};

/// An owned permission to join a child process and take its return value
/// (`std::thread::JoinHandle`'s shape, `std::process::Child`'s waits).
///
/// # Drop
///
/// Dropping a handle without joining detaches the child: it keeps running,
/// its return value is discarded, and it is reaped as soon as it exits (by
/// a `SIGCHLD` handler that `proc` installs on the first detach, chaining any
/// handler that was installed before), so it never lingers as a zombie. A
/// detached child that is not a daemon is still waited for when this
/// process exits, as Python does.
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut child = proc_core::spawn(|| "done".to_owned())?;
/// println!("started {} ({})", child.name(), child.pid());
/// let status = child.wait()?;
/// assert!(status.success());
/// assert_eq!(child.join()?, "done");
/// # Ok(()) }
/// ```
#[must_use = "dropping a JoinHandle detaches the child and discards its result"]
pub struct JoinHandle<T> {
    pid: Pid,
    name: String,
    result: File,
    /// The slot in this process's child table (`None` for a fork-server
    /// child, which the server reaps).
    slot: Option<SlotId>,
    /// The process that started the child: only there does `slot` name
    /// this child (a forked copy of the handle is a copy of memory; the
    /// copy's process has a table of its own).
    owner: libc::pid_t,
    /// A fork-server child: its pidfd and the pipe its exit status arrives on.
    remote: Option<Remote>,
    status: Option<Reaped>,
    pidfd: Option<OwnedFd>,
    _result: PhantomData<fn() -> T>,
}

struct Remote {
    pidfd: OwnedFd,
    status: File,
}

#[derive(Clone, Copy)]
enum Reaped {
    Status(ExitStatus),
    Lost,
}

impl<T> fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinHandle")
            .field("pid", &self.pid)
            .field("name", &self.name)
            .field("exit_status", &self.exit_status())
            .finish_non_exhaustive()
    }
}

impl<T> JoinHandle<T> {
    pub(crate) fn new(pid: Pid, name: String, result: File, slot: SlotId) -> Self {
        JoinHandle {
            pid,
            name,
            result,
            slot: Some(slot),
            owner: sys::cached_pid(),
            remote: None,
            status: None,
            pidfd: None,
            _result: PhantomData,
        }
    }

    /// A handle on a child forked by the fork server.
    pub(crate) fn new_remote(
        pid: Pid,
        name: String,
        result: File,
        pidfd: OwnedFd,
        status: File,
    ) -> Self {
        JoinHandle {
            pid,
            name,
            result,
            slot: None,
            owner: sys::cached_pid(),
            remote: Some(Remote { pidfd, status }),
            status: None,
            pidfd: None,
            _result: PhantomData,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, once the child has been waited for.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self.status {
            Some(Reaped::Status(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether the child has ended (`std::thread::JoinHandle::is_finished`).
    /// Does not reap it: [`join`](Self::join) still gets the result.
    pub fn is_finished(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        match &self.remote {
            Some(remote) => sys::readable_now(remote.pidfd.as_fd()),
            None => matches!(sys::has_exited(self.pid.raw()), Ok(true)),
        }
    }

    /// Waits at most `timeout` for the child to end; whether it has.
    ///
    /// Unlike [`wait_timeout`](Self::wait_timeout) this does not collect
    /// the exit status: for a child of the fork server or a
    /// [`Zygote`](crate::Zygote), which reap it and then report its status,
    /// it returns as soon as the child is gone, one hop earlier. (For a
    /// child of this process it waits for the same moment, without reaping.)
    ///
    /// # Errors
    ///
    /// The OS error of the wait.
    pub fn wait_ended_timeout(&self, timeout: Duration) -> std::io::Result<bool> {
        if self.is_finished() {
            return Ok(true);
        }
        match &self.remote {
            Some(remote) => poll_until(remote.pidfd.as_fd(), timeout),
            None => {
                // A pidfd wakes us the moment the child ends (a zombie). It
                // names our child if the child is still unreaped after it
                // was opened: until then nobody else can have its pid.
                if let Ok(Some(pidfd)) = sys::pidfd_open(self.pid.raw()) {
                    if self.is_finished() {
                        return Ok(true);
                    }
                    return poll_until(pidfd.as_fd(), timeout);
                }
                // (A timeout too large to represent is no timeout.)
                let deadline = Instant::now().checked_add(timeout);
                loop {
                    if self.is_finished() {
                        return Ok(true);
                    }
                    let left = deadline.map_or(Duration::MAX, |d| {
                        d.saturating_duration_since(Instant::now())
                    });
                    if left.is_zero() {
                        return Ok(false);
                    }
                    std::thread::sleep(left.min(Duration::from_micros(200)));
                }
            }
        }
    }

    /// The exit status if the child has ended, without reaping it (so that
    /// `&self` suffices); `None` while it runs.
    pub(crate) fn peek_status(&self) -> Option<ExitStatus> {
        match self.status {
            Some(Reaped::Status(s)) => Some(s),
            Some(Reaped::Lost) => None,
            None if self.remote.is_some() => None,
            None => sys::peek_exit(self.pid.raw()).ok().flatten(),
        }
    }

    /// Reaps the child if it has ended, without blocking
    /// (`std::process::Child::try_wait`).
    ///
    /// # Errors
    ///
    /// [`JoinError::Io`] if waiting fails, [`JoinError::StatusLost`] if the
    /// child was reaped elsewhere.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, JoinError> {
        self.wait_deadline(Some(Instant::now()))
    }

    /// Waits for the child to end (without taking its result).
    ///
    /// # Errors
    ///
    /// As [`try_wait`](Self::try_wait).
    pub fn wait(&mut self) -> Result<ExitStatus, JoinError> {
        self.wait_deadline(None)?.ok_or(JoinError::StatusLost)
    }

    /// Waits at most `timeout` for the child to end; `Ok(None)` if it is
    /// still running then. Never returns early.
    ///
    /// # Errors
    ///
    /// As [`try_wait`](Self::try_wait).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, JoinError> {
        let deadline = Instant::now().checked_add(timeout);
        self.wait_deadline(deadline)
    }

    /// Sends `SIGTERM` to the child (Python's `terminate()`); nothing if it
    /// has ended, or was reaped (here, or by other code of this program:
    /// its pid may name another process by then).
    ///
    /// # Errors
    ///
    /// The OS error if the signal could not be sent.
    pub fn terminate(&self) -> std::io::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Sends `SIGKILL` to the child (Python's `kill()`); nothing if it has
    /// ended, or was reaped (as for [`terminate`](Self::terminate)).
    ///
    /// # Errors
    ///
    /// The OS error if the signal could not be sent.
    pub fn kill(&self) -> std::io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    fn signal(&self, signal: libc::c_int) -> std::io::Result<()> {
        // While unreaped the pid is still ours (a zombie at worst), so the
        // signal cannot reach an unrelated process that reused the pid.
        if self.status.is_some() {
            return Ok(());
        }
        match &self.remote {
            // Ended and reaped by the server: nothing to signal (the pidfd
            // still names that process, never another).
            Some(remote) => match sys::pidfd_signal(remote.pidfd.as_fd(), signal) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                sent => sent,
            },
            // Still running and ours: its pid cannot be anyone else's.
            // Ended (a zombie) there is nothing to signal; no longer our
            // child (reaped by other code of this program: a
            // `waitpid(-1)`, SIGCHLD ignored) its pid may name an unrelated
            // process by now, which must not get the signal.
            None => match sys::has_exited(self.pid.raw()) {
                Ok(false) => sys::kill(self.pid.raw(), signal),
                Ok(true) => Ok(()),
                Err(e) => Err(e),
            },
        }
    }

    /// Waits until `deadline` (`None`: forever); `Ok(None)` on timeout.
    fn wait_deadline(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<ExitStatus>, JoinError> {
        loop {
            if let Some(reaped) = self.status {
                return match reaped {
                    Reaped::Status(s) => Ok(Some(s)),
                    Reaped::Lost => Err(JoinError::StatusLost),
                };
            }
            if sys::cached_pid() != self.owner {
                // A copy in a forked child: not its child to wait for (the
                // pid, once reaped by the owner, may be reused by one that
                // is; a fork-server child's status is the owner's to read).
                self.status = Some(Reaped::Lost);
                continue;
            }
            if self.remote.is_some() {
                if !self.wait_remote(deadline)? {
                    return Ok(None);
                }
                continue;
            }
            let reap = match deadline {
                None => sys::waitpid_blocking(self.pid.raw()),
                Some(_) => sys::waitpid_nohang(self.pid.raw()),
            }
            .map_err(JoinError::Io)?;
            match reap {
                Reap::Exited(status) => self.set_reaped(Reaped::Status(status)),
                Reap::NoChild => self.set_reaped(Reaped::Lost),
                Reap::Running => {
                    let Some(deadline) = deadline else { continue };
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    self.sleep_until_exit(deadline - now)?;
                }
            }
        }
    }

    /// Waits for a fork-server child's status to arrive (until `deadline`);
    /// false on timeout.
    fn wait_remote(&mut self, deadline: Option<Instant>) -> Result<bool, JoinError> {
        let Some(remote) = &self.remote else {
            return Ok(true);
        };
        loop {
            let timeout = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d && !sys::readable_now(remote.status.as_fd()) {
                        return Ok(false);
                    }
                    d.saturating_duration_since(now)
                }
            };
            if sys::poll_readable(remote.status.as_fd(), timeout).map_err(JoinError::Io)?
                || sys::readable_now(remote.status.as_fd())
            {
                break;
            }
        }
        let mut raw = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match (&remote.status).read(&mut raw[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(JoinError::Io(e)),
            }
        }
        let reaped = if got == 4 {
            Reaped::Status(ExitStatus::from_raw(i32::from_le_bytes(raw)))
        } else {
            // The server (or zygote) died before reporting: the status is
            // lost, not the child, which may outlive it (a non-daemon has
            // no death signal; a daemon's comes a moment later). Until its
            // pidfd says it is gone, it runs.
            if !readable_by(remote.pidfd.as_fd(), deadline).map_err(JoinError::Io)? {
                return Ok(false);
            }
            Reaped::Lost
        };
        self.set_reaped(reaped);
        Ok(true)
    }

    /// Sleeps until the child exits or `timeout` passes.
    fn sleep_until_exit(&mut self, timeout: Duration) -> Result<(), JoinError> {
        if self.pidfd.is_none() {
            // No pidfd (no descriptor to spare, a sandbox that refuses the
            // call, the child reaped elsewhere meanwhile): the status is
            // polled instead; the caller's next look settles the rest.
            self.pidfd = sys::pidfd_open(self.pid.raw()).ok().flatten();
        }
        match &self.pidfd {
            Some(fd) => {
                sys::poll_readable(fd.as_fd(), timeout).map_err(JoinError::Io)?;
            }
            // Kernels before 5.3: poll the status with a short sleep.
            None => std::thread::sleep(timeout.min(Duration::from_millis(1))),
        }
        Ok(())
    }

    fn set_reaped(&mut self, reaped: Reaped) {
        self.status = Some(reaped);
        self.pidfd = None;
        if let Some(slot) = self.own_slot() {
            children::release(slot);
        }
    }

    /// The child's slot, in the process that started it.
    fn own_slot(&self) -> Option<SlotId> {
        self.slot.filter(|_| sys::cached_pid() == self.owner)
    }
}

impl<T: DeserializeOwned> JoinHandle<T> {
    /// Waits for the child to end and returns the value its closure returned.
    ///
    /// # Errors
    ///
    /// [`JoinError::Panicked`] with the panic's message and location if the
    /// closure panicked; [`JoinError::Exited`] / [`JoinError::Signaled`] if
    /// the child exited or was killed before returning; [`JoinError::Decode`]
    /// if its result does not decode as `T`; [`JoinError::Io`] if waiting
    /// failed.
    pub fn join(mut self) -> Result<T, JoinError> {
        if let (Some(remote), None) = (&self.remote, self.status) {
            // A fork-server child: once it is gone (its pidfd), a value
            // followed by the mark a child writes at the very end of a clean
            // exit (status 0, see `run_and_exit`) is the answer, without
            // waiting for the status the server reports after reaping it,
            // one hop later. Anything else goes by the status.
            readable_by(remote.pidfd.as_fd(), None).map_err(JoinError::Io)?;
            let bytes = read_result(&self.result).map_err(JoinError::Io)?;
            if let Ok((Outcome::Value(value), [crate::builder::EXITING_ZERO])) =
                postcard::take_from_bytes::<Outcome<T>>(&bytes)
            {
                return Ok(value);
            }
        }
        let status = self.wait()?;
        let bytes = read_result(&self.result).map_err(JoinError::Io)?;
        decode_outcome(status, &bytes)
    }
}

/// Waits until `fd` is readable or `timeout` has passed (a signal
/// interrupting the wait does not end it early); whether it is readable.
fn poll_until(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if sys::poll_readable(fd, left)? {
            return Ok(true);
        }
        if start.elapsed() >= timeout {
            return Ok(sys::readable_now(fd));
        }
    }
}

/// Waits until `fd` is readable or `deadline` passes (`None`: for ever);
/// whether it is readable.
fn readable_by(
    fd: std::os::fd::BorrowedFd<'_>,
    deadline: Option<Instant>,
) -> std::io::Result<bool> {
    match deadline {
        None => {
            while !sys::poll_readable(fd, Duration::from_secs(3600))? {}
            Ok(true)
        }
        Some(d) => poll_until(fd, d.saturating_duration_since(Instant::now())),
    }
}

/// Reads the child's whole result file (from offset 0: the file offset is
/// shared with the child).
fn read_result(file: &File) -> std::io::Result<Vec<u8>> {
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| std::io::Error::other("result too large for this platform"))?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Turns the child's exit status and result bytes into `join`'s answer.
fn decode_outcome<T: DeserializeOwned>(status: ExitStatus, bytes: &[u8]) -> Result<T, JoinError> {
    if let Some(signal) = status.signal() {
        return Err(JoinError::Signaled {
            signal,
            core_dumped: status.core_dumped(),
        });
    }
    let code = status.code().unwrap_or(-1);
    if bytes.is_empty() {
        return Err(JoinError::Exited { code });
    }
    match postcard::from_bytes::<Outcome<T>>(bytes) {
        Ok(Outcome::Value(value)) if code == 0 => Ok(value),
        Ok(Outcome::Value(_)) => Err(JoinError::Exited { code }),
        Ok(Outcome::Panicked { message, location }) => {
            Err(JoinError::Panicked { message, location })
        }
        Ok(Outcome::EncodeFailed(message)) => Err(JoinError::Encode(message)),
        Ok(Outcome::ArgsDecodeFailed(message)) => Err(JoinError::Decode(DecodeError(format!(
            "the entry's arguments: {message}"
        )))),
        Ok(Outcome::Refused(message)) => Err(JoinError::Refused(message)),
        Err(e) => Err(JoinError::Decode(DecodeError(e.to_string()))),
    }
}

impl<T> Drop for JoinHandle<T> {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Some(slot) = self.own_slot() {
                children::detach(slot);
            }
        }
    }
}
