//! The fork server: this executable, exec'd once (when the first
//! `StartMethod::ForkServer` start asks for it) and kept single-threaded,
//! forks a child for every request (Python's `forkserver`).
//!
//! Requests travel over a `SOCK_SEQPACKET` socket pair (no socket file, so
//! only this process can talk to its server and nothing is left behind),
//! each carrying descriptors: the request and result memfds, the write end
//! of a pipe for the child's exit status, and any descriptor the arguments
//! share. The server answers with the child's pid and a pidfd for it. The
//! child is the server's: the server reaps it and writes its raw wait
//! status into that pipe, which is what the requester's `JoinHandle` waits
//! on. The server dies with its requester (`PR_SET_PDEATHSIG`), even when
//! the requester is SIGKILLed; daemon children die with the server.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Command, Stdio};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::builder::Builder;
use crate::children;
use crate::entry::{self, Prepared};
use crate::error::SpawnError;
use crate::handle::JoinHandle;
use crate::pid::Pid;
use crate::sys::{self, Fork, ForkPermit};

/// The variable that makes `init()` run the server loop (its value: the
/// server's end of the socket pair).
pub(crate) const ENV: &str = "PROC_FORKSERVER_FD";

/// This process's connection to its server: (owner pid, socket).
static CONN: parking_lot::Mutex<Option<(libc::pid_t, OwnedFd)>> = parking_lot::const_mutex(None);

/// Starts the entry `f(args)` in a child forked by the fork server.
pub(crate) fn spawn<A, R>(
    builder: Builder,
    f: fn(A) -> R,
    args: A,
) -> Result<JoinHandle<R>, SpawnError>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned,
{
    let Prepared {
        request_file,
        result,
        fds,
        name,
        daemon,
        ..
    } = entry::prepare(&builder, f, args)?;
    let (status_read, status_write) = sys::pipe().map_err(SpawnError::ResultChannel)?;
    let mut send = vec![
        request_file.as_raw_fd(),
        result.as_raw_fd(),
        status_write.as_raw_fd(),
    ];
    send.extend_from_slice(&fds);
    let me = sys::getpid();
    let mut conn = CONN.lock();
    if conn.as_ref().is_none_or(|(owner, _)| *owner != me) {
        *conn = Some((me, start_server().map_err(SpawnError::Exec)?));
    }
    let reply = conn.as_ref().map(|(_, sock)| sys::request(sock, &send));
    let (pid, pidfd) = match reply {
        Some(Ok(reply)) => reply,
        Some(Err(e)) => {
            // The server is gone: the next start makes a new one.
            *conn = None;
            return Err(SpawnError::Exec(e));
        }
        None => return Err(SpawnError::Exec(std::io::Error::other("no fork server"))),
    };
    drop(conn);
    drop(status_write);
    crate::remote::register(pid, &pidfd, daemon);
    Ok(JoinHandle::new_remote(
        Pid::from_raw(pid),
        name,
        result,
        pidfd,
        status_read,
    ))
}

/// Execs the server and returns this side of its socket.
fn start_server() -> std::io::Result<OwnedFd> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.env(ENV, theirs.as_raw_fd().to_string());
    cmd.stdin(Stdio::null());
    sys::keep_across_exec(&mut cmd, &[theirs.as_raw_fd()]);
    children::init();
    let slot =
        children::reserve().ok_or_else(|| std::io::Error::other("too many live children"))?;
    children::name(slot, "ForkServer");
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            children::unreserve(slot);
            return Err(e);
        }
    };
    // A daemon of this process: terminated at exit, reaped when it ends.
    children::register_hidden(slot, child.id() as libc::pid_t);
    drop(child);
    drop(theirs);
    Ok(ours)
}

/// The server loop (in the exec'd server, from `init()`): never returns.
pub(crate) fn serve(fd: &str) -> ! {
    let Some(sock) = fd
        .parse()
        .ok()
        .and_then(sys::inherited_file)
        .map(OwnedFd::from)
    else {
        eprintln!("proc: malformed {ENV}");
        sys::exit_now(1)
    };
    let requester = sys::getppid();
    let server = sys::getpid();
    if sys::set_parent_death_signal(libc::SIGKILL).is_err() || sys::getppid() != requester {
        sys::exit_now(0);
    }
    // Children not yet reaped: (pid, pidfd, status pipe).
    let mut live: Vec<(libc::pid_t, OwnedFd, File)> = Vec::new();
    loop {
        let ready = {
            let mut watch: Vec<std::os::fd::BorrowedFd<'_>> = vec![sock.as_fd()];
            watch.extend(live.iter().map(|(_, pidfd, _)| pidfd.as_fd()));
            match sys::poll_many(&watch) {
                Ok(ready) => ready,
                Err(_) => continue,
            }
        };
        // Children that ended: report their status, forget them.
        let mut ended = ready[1..].iter();
        live.retain_mut(|(pid, _, status)| {
            if !ended.next().copied().unwrap_or(false) {
                return true;
            }
            match sys::waitpid_nohang(*pid) {
                Ok(sys::Reap::Exited(exit)) => {
                    use std::os::unix::process::ExitStatusExt;
                    let _ = status.write_all(&exit.into_raw().to_le_bytes());
                    false
                }
                _ => true,
            }
        });
        if !ready[0] {
            continue;
        }
        let fds = match sys::receive(&sock) {
            Ok(Some(fds)) => fds,
            // The requester closed its end: it is gone.
            Ok(None) => sys::exit_now(0),
            Err(_) => continue,
        };
        if fds.len() < 3 {
            let _ = sys::reply(&sock, -1, None);
            continue;
        }
        let mut fds = fds.into_iter();
        let (Some(request), Some(result), Some(status)) = (fds.next(), fds.next(), fds.next())
        else {
            continue;
        };
        let shared: Vec<OwnedFd> = fds.collect();
        let permit = match ForkPermit::single_threaded() {
            Ok(permit) => permit,
            Err(_) => sys::exit_now(1),
        };
        match sys::fork(permit) {
            Ok(Fork::Child) => {
                drop(sock);
                drop(live);
                drop(status);
                entry::run_request(
                    File::from(request),
                    File::from(result),
                    Some(shared),
                    Some(server),
                )
            }
            Ok(Fork::Parent(pid)) => {
                let pidfd = sys::pidfd_open(pid).ok().flatten();
                let _ = sys::reply(&sock, pid, pidfd.as_ref());
                if let Some(pidfd) = pidfd {
                    live.push((pid, pidfd, File::from(status)));
                }
            }
            Err(_) => {
                let _ = sys::reply(&sock, -1, None);
            }
        }
    }
}
