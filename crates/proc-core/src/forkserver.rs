//! The fork server: this executable, exec'd once (when the first
//! `StartMethod::ForkServer` start asks for it) and kept single-threaded,
//! forks a child for every request (Python's `forkserver`). From its
//! second request on it keeps one child forked ahead, a *spare* waiting
//! for the next request's descriptors: a request then costs the server a
//! message instead of a fork, and the fork of the next spare comes after
//! the reply. (A zygote serves the same way.)
//!
//! Requests travel over a `SOCK_SEQPACKET` socket pair (no socket file, so
//! only this process can talk to its server and nothing is left behind),
//! each carrying descriptors: the request and result memfds, the write end
//! of a pipe for the child's exit status, and any descriptor the arguments
//! share. The server answers with the child's pid and a pidfd for it. The
//! child is the server's: the server reaps it and writes its raw wait
//! status into that pipe, which is what the requester's `JoinHandle` waits
//! on. The server ends with its requester (it watches the requester's
//! pidfd), even when the requester is SIGKILLed, whichever thread started
//! it; daemon children die with the server.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
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
    let prepared = entry::prepare(&builder, f, args, true)?;
    let me = sys::getpid();
    let mut conn = CONN.lock();
    if conn.as_ref().is_none_or(|(owner, _)| *owner != me) {
        *conn = Some((me, start_server().map_err(SpawnError::Exec)?));
    }
    let Some((_, sock)) = conn.as_ref() else {
        return Err(SpawnError::Exec(std::io::Error::other("no fork server")));
    };
    match ask(sock, prepared) {
        Err(Asked::ServerGone(e)) => {
            // The next start makes a new one.
            *conn = None;
            Err(SpawnError::Exec(e))
        }
        Err(Asked::Local(e)) => Err(e),
        Ok(handle) => Ok(handle),
    }
}

enum Asked {
    /// The server did not answer.
    ServerGone(std::io::Error),
    /// Something on this side failed.
    Local(SpawnError),
}

/// Sends the prepared request to the server behind `sock`; returns the
/// handle of the child it forked.
fn ask<R>(sock: &OwnedFd, prepared: Prepared) -> Result<JoinHandle<R>, Asked> {
    let sent = send(sock, prepared)?;
    receive(sock, sent)
}

/// A request sent, its reply not yet read.
struct Sent {
    result: File,
    status_read: File,
    name: String,
    daemon: bool,
}

fn send(sock: &OwnedFd, prepared: Prepared) -> Result<Sent, Asked> {
    let Prepared {
        request_file,
        result,
        fds,
        name,
        daemon,
        ..
    } = prepared;
    let (status_read, status_write) = sys::pipe()
        .map_err(SpawnError::ResultChannel)
        .map_err(Asked::Local)?;
    let mut send = vec![
        request_file.as_raw_fd(),
        result.as_raw_fd(),
        status_write.as_raw_fd(),
    ];
    send.extend(fds.iter().map(|fd| fd.as_raw_fd()));
    sys::send_request(sock, &send).map_err(Asked::ServerGone)?;
    Ok(Sent {
        result,
        status_read,
        name,
        daemon,
    })
}

fn receive<R>(sock: &OwnedFd, sent: Sent) -> Result<JoinHandle<R>, Asked> {
    let Some((pid, pidfd)) = sys::receive_reply(sock).map_err(Asked::ServerGone)? else {
        // The server is fine; this one child could not be started.
        return Err(Asked::Local(SpawnError::Fork(std::io::Error::other(
            "the fork server could not start the child (fork or pidfd_open failed there)",
        ))));
    };
    crate::remote::register(pid, &pidfd, sent.daemon, &sent.name);
    Ok(JoinHandle::new_remote(
        Pid::from_raw(pid),
        sent.name,
        sent.result,
        pidfd,
        sent.status_read,
    ))
}

/// The sockets of this process's zygotes, with the identity of the socket
/// each number held when registered: a new zygote closes its copies, and
/// any other forked child lets go of them, so that each zygote sees the
/// end of its own connection. A number is acted on only while it still
/// names that socket (a number closed and reused since must be left
/// alone).
static ZYGOTE_SOCKETS: parking_lot::Mutex<(libc::pid_t, Vec<(RawFd, sys::FdIdentity)>)> =
    parking_lot::const_mutex((0, Vec::new()));

/// Takes `sock`, the socket of a zygote of `owner`, out of the registry
/// (before it is closed).
fn unregister_socket(owner: libc::pid_t, sock: &OwnedFd) {
    let mut siblings = ZYGOTE_SOCKETS.lock();
    if siblings.0 == owner {
        let raw = sock.as_raw_fd();
        siblings.1.retain(|&(fd, _)| fd != raw);
    }
}

/// A private fork server forked (not exec'd) from this process while it
/// is single-threaded: it keeps this process's memory picture as of its
/// creation and forks children that run entries on request, from then on,
/// whatever threads this process starts later. A process pool's
/// replacement workers come from one (Python's `fork` pools have no such
/// thing and fork the threaded parent).
///
/// No [`init`](crate::init) is needed: the zygote was never exec'd. It
/// ignores SIGINT (the parent decides what Ctrl-C means), dies with this
/// process (even by SIGKILL), and ends when the `Zygote` is dropped; the
/// children it forked stay (a daemon child dies with it). From its second
/// request on it keeps one child forked ahead, waiting for the next
/// request (a copy-on-write copy of the zygote: one more process while the
/// zygote lives).
///
/// # Examples
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// fn double(x: u32) -> u32 {
///     x * 2
/// }
/// let zygote = proc_core::Zygote::new()?;
/// // Threads started now do not matter: the zygote forks, not this process.
/// std::thread::spawn(|| ()).join().ok();
/// let child = zygote.spawn_entry(proc_core::Builder::new(), double, 21)?;
/// assert_eq!(child.join()?, 42);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Zygote {
    sock: parking_lot::Mutex<Option<OwnedFd>>,
    pid: Pid,
    owner: libc::pid_t,
}

/// In a child just forked from `parent`: lets go of the copies of the
/// parent's zygote sockets (each zygote exits when its connection ends, so
/// a copy kept here would keep it alive for as long as this child lives).
/// Each number is pointed at `null` rather than closed, since the
/// `Zygote` objects this child's memory holds still own the numbers.
pub(crate) fn release_inherited_zygotes(parent: libc::pid_t, null: &File) {
    // Only a child of a threaded parent (`spawn_unchecked`) can find the
    // lock held: it then keeps the copies rather than wait forever.
    let Some(mut siblings) = ZYGOTE_SOCKETS.try_lock() else {
        return;
    };
    if siblings.0 == parent {
        for &(fd, identity) in &siblings.1 {
            if sys::fd_identity(fd) == Some(identity) {
                sys::cover_inherited(fd, null);
            }
        }
    }
    *siblings = (sys::getpid(), Vec::new());
}

impl Zygote {
    /// Forks the zygote.
    ///
    /// # Errors
    ///
    /// [`SpawnError::Threaded`] if this process has more than one thread
    /// (use the fork server, [`StartMethod::ForkServer`](crate::StartMethod::ForkServer),
    /// instead), and the other [`SpawnError`] variants when the OS refuses.
    pub fn new() -> Result<Zygote, SpawnError> {
        let permit = match ForkPermit::single_threaded() {
            Ok(permit) => permit,
            Err(sys::ThreadCheck::Threaded(threads)) => {
                return Err(SpawnError::Threaded { threads })
            }
            Err(sys::ThreadCheck::Unknown(e)) => return Err(SpawnError::ThreadCheck(e)),
        };
        let (ours, theirs) = sys::seqpacket_pair().map_err(SpawnError::Exec)?;
        children::init();
        crate::builder::install_panic_hook();
        let slot = children::reserve().ok_or(SpawnError::TooManyChildren)?;
        children::name(slot, "Zygote");
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        let me = sys::getpid();
        let mut siblings = ZYGOTE_SOCKETS.lock();
        if siblings.0 != me {
            // Inherited: those sockets are not this process's.
            *siblings = (me, Vec::new());
        }
        match sys::fork(permit) {
            Err(e) => {
                children::unreserve(slot);
                Err(SpawnError::Fork(e))
            }
            Ok(Fork::Child) => {
                drop(ours);
                for &(fd, identity) in &siblings.1 {
                    if sys::fd_identity(fd) == Some(identity) {
                        sys::close_inherited(fd);
                    }
                }
                drop(siblings);
                // Nor is the parent's fork server connection this one's.
                *CONN.lock() = None;
                serve_on(theirs, me)
            }
            Ok(Fork::Parent(pid)) => {
                if let Some(identity) = sys::fd_identity(ours.as_raw_fd()) {
                    siblings.1.push((ours.as_raw_fd(), identity));
                }
                drop(siblings);
                children::register_hidden(slot, pid);
                drop(theirs);
                Ok(Zygote {
                    sock: parking_lot::Mutex::new(Some(ours)),
                    pid: Pid::from_raw(pid),
                    owner: me,
                })
            }
        }
    }

    /// The zygote's pid.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Whether the zygote still serves this process: its connection is
    /// open (a start found it gone, or this is a forked copy of its owner,
    /// otherwise) and its process has not ended. A start that failed while
    /// it serves failed on this side (descriptors, memory) or in its fork.
    pub fn is_serving(&self) -> bool {
        sys::getpid() == self.owner
            && self.sock.lock().is_some()
            && !matches!(sys::has_exited(self.pid.raw()), Ok(true))
    }

    /// Starts the entry `f(args)` in a child forked by the zygote, named
    /// and flagged as `builder` says (its start method is ignored), and
    /// returns the same [`JoinHandle`] as [`Builder::spawn_entry`]. The
    /// child's stdin is `/dev/null`; its OS parent is the zygote.
    ///
    /// # Errors
    ///
    /// [`SpawnError::Exec`] when the zygote is gone (killed, or this is a
    /// forked copy of its owner), or when a descriptor could not be sent;
    /// [`SpawnError::Encode`] when the arguments do not serialize.
    pub fn spawn_entry<A, R>(
        &self,
        builder: Builder,
        f: fn(A) -> R,
        args: A,
    ) -> Result<JoinHandle<R>, SpawnError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let mut handles = self.spawn_entries(f, vec![(builder, args)])?;
        handles
            .pop()
            .ok_or_else(|| SpawnError::Exec(std::io::Error::other("the zygote gave no child")))
    }
}

impl Zygote {
    /// Starts one child per `(builder, args)` pair, each running `f`: all
    /// requests go out before the first reply is read, so the zygote forks
    /// them back to back.
    ///
    /// # Errors
    ///
    /// As [`spawn_entry`](Zygote::spawn_entry); children started before a
    /// failure are dropped (and, as daemons, die with the zygote).
    pub fn spawn_entries<A, R>(
        &self,
        f: fn(A) -> R,
        starts: Vec<(Builder, A)>,
    ) -> Result<Vec<JoinHandle<R>>, SpawnError>
    where
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        let gone = || SpawnError::Exec(std::io::Error::other("the zygote is gone"));
        if sys::getpid() != self.owner {
            return Err(gone());
        }
        let mut prepared = Vec::with_capacity(starts.len());
        for (builder, args) in starts {
            prepared.push(entry::prepare(&builder, f, args, false)?);
        }
        let mut sock = self.sock.lock();
        let Some(conn) = sock.as_ref() else {
            return Err(gone());
        };
        // In windows: every request carries descriptors, and a socket holds
        // only so many in flight.
        const WINDOW: usize = 16;
        let mut handles = Vec::with_capacity(prepared.len());
        let mut failure = None;
        let mut prepared = prepared.into_iter().peekable();
        while failure.is_none() && prepared.peek().is_some() {
            let mut sent = Vec::with_capacity(WINDOW);
            for p in prepared.by_ref().take(WINDOW) {
                match send(conn, p) {
                    Ok(s) => sent.push(s),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            // Every request sent gets its reply read, so that the next
            // exchange on this socket starts in step.
            for s in sent {
                match receive(conn, s) {
                    Ok(h) => handles.push(h),
                    Err(e @ Asked::ServerGone(_)) => {
                        failure = Some(e);
                        break;
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                    }
                }
            }
        }
        match failure {
            None => Ok(handles),
            Some(Asked::Local(e)) => Err(e),
            Some(Asked::ServerGone(e)) => {
                if let Some(gone) = sock.take() {
                    unregister_socket(self.owner, &gone);
                }
                Err(SpawnError::Exec(e))
            }
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(sock) = self.sock.get_mut().take() {
            unregister_socket(self.owner, &sock);
            // The zygote sees the end of its connection and exits; the
            // child table reaps it.
            drop(sock);
        }
    }
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
    serve_on(sock, sys::getppid())
}

/// A child forked ahead of the next request: it waits on `chan` for the
/// request's descriptors, so that a request costs the server a message
/// instead of a fork (the fork happens after the reply, off the
/// requester's path).
struct Spare {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    chan: OwnedFd,
}

/// The server loop on `sock`, for `requester`: never returns.
fn serve_on(sock: OwnedFd, requester: libc::pid_t) -> ! {
    let server = sys::getpid();
    // The server ends with its requester, even a SIGKILLed one: it watches
    // the requester's pidfd (readable once the whole process has ended). A
    // parent-death signal would follow the *thread* that started the
    // server, and a threaded program's first ForkServer start is often on
    // a thread that ends long before the program; it is only the fallback
    // for kernels without pidfds. (Opened before the parent check: if the
    // requester is still our parent after, the pidfd is the requester's.)
    let requester_fd = sys::pidfd_open(requester).ok().flatten();
    if requester_fd.is_none() && sys::set_parent_death_signal(libc::SIGKILL).is_err() {
        sys::exit_now(0);
    }
    if sys::getppid() != requester {
        sys::exit_now(0);
    }
    // What the server changes for itself, its children get back whole
    // (handler, flags, mask), as children forked by the program would have
    // them. Ctrl-C reaches the whole process group: the requester decides.
    // A requester that learned of a child's end from its pidfd may have
    // closed the status pipe already: writing the status must not kill us.
    // The children are ours to reap: SIGCHLD ignored (which survives exec)
    // or a handler inherited from the program (a zygote) would reap them
    // first and take their statuses.
    let (Ok(sigint), Ok(sigpipe), Ok(sigchld)) = (
        sys::replace_action(libc::SIGINT, sys::Disposition::IGNORE),
        sys::replace_action(libc::SIGPIPE, sys::Disposition::IGNORE),
        sys::replace_action(libc::SIGCHLD, sys::Disposition::DEFAULT),
    ) else {
        sys::exit_now(1)
    };
    let program = ProgramSignals {
        sigint,
        sigpipe,
        sigchld,
    };
    // Known once here, every child inherits it for its same-executable
    // check.
    let _ = sys::exe_identity();
    // Children not yet reaped: (pid, pidfd, status pipe).
    let mut live: Vec<(libc::pid_t, OwnedFd, File)> = Vec::new();
    // Made once a second request came (a zygote whose pool never replaces
    // a worker, or replaces one, never keeps an idle copy of itself).
    let mut spare: Option<Spare> = None;
    let mut served = 0u32;
    loop {
        // [the socket, the requester's pidfd?, the children's, the spare's?]
        let ready = {
            let mut watch: Vec<std::os::fd::BorrowedFd<'_>> = vec![sock.as_fd()];
            watch.extend(requester_fd.iter().map(AsFd::as_fd));
            watch.extend(live.iter().map(|(_, pidfd, _)| pidfd.as_fd()));
            watch.extend(spare.iter().map(|s| s.pidfd.as_fd()));
            match sys::poll_many(&watch) {
                Ok(ready) => ready,
                Err(_) => continue,
            }
        };
        let children = 1 + usize::from(requester_fd.is_some());
        if children == 2 && ready[1] {
            // The requester is gone: as when it closes its end (below).
            end_serving(spare.take(), &live);
        }
        // Children that ended: report their status, forget them.
        let mut ended = ready[children..].iter();
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
                // Reaped by someone else after all: its status is gone, and
                // the pipe closing tells the requester so.
                Ok(sys::Reap::NoChild) => false,
                _ => true,
            }
        });
        if ended.next().copied().unwrap_or(false) {
            // The spare died waiting (killed from outside).
            if let Some(gone) = spare.take() {
                let _ = sys::waitpid_nohang(gone.pid);
            }
        }
        if !ready[0] {
            continue;
        }
        let fds = match sys::receive(&sock) {
            Ok(Some(fds)) => fds,
            // The requester closed its end (it is gone, or dropped its
            // zygote): reap the children that have ended, so that none is
            // left a zombie for whoever adopts it, and go.
            Ok(None) => end_serving(spare.take(), &live),
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
        let status = File::from(status);
        served = served.saturating_add(1);
        // The spare takes it if there is one; else a child is forked now.
        if let Some(Spare { pid, pidfd, chan }) = spare.take() {
            let mut handed: Vec<RawFd> = vec![request.as_raw_fd(), result.as_raw_fd()];
            handed.extend(shared.iter().map(|fd| fd.as_raw_fd()));
            let sent = sys::send_request(&chan, &handed).is_ok();
            drop(chan);
            if sent {
                let _ = sys::reply(&sock, pid, Some(&pidfd));
                live.push((pid, pidfd, status));
                // The next spare must not hold copies of this request's
                // descriptors (a pipe in the arguments would never see
                // its end).
                drop((request, result, shared));
                spare = make_spare(server, &sock, requester_fd.as_ref(), &live, program);
                continue;
            }
            // It died meanwhile: a fork, as without one.
            kill_and_reap(pid);
        }
        let permit = match ForkPermit::single_threaded() {
            Ok(permit) => permit,
            Err(_) => sys::exit_now(1),
        };
        match sys::fork(permit) {
            Ok(Fork::Child) => {
                drop(sock);
                drop(requester_fd);
                drop(live);
                drop(status);
                program.restore();
                run_child(request, result, shared, server)
            }
            Ok(Fork::Parent(pid)) => match sys::pidfd_open(pid).ok().flatten() {
                Some(pidfd) => {
                    let _ = sys::reply(&sock, pid, Some(&pidfd));
                    live.push((pid, pidfd, status));
                }
                None => {
                    // Without a pidfd neither side could wait for it: it
                    // must not run unwatched (nor stay a zombie).
                    kill_and_reap(pid);
                    let _ = sys::reply(&sock, -1, None);
                }
            },
            Err(_) => {
                let _ = sys::reply(&sock, -1, None);
            }
        }
        // (As above: the spare gets none of this request's descriptors.)
        drop((request, result, shared));
        if served >= 2 {
            spare = make_spare(server, &sock, requester_fd.as_ref(), &live, program);
        }
    }
}

/// The dispositions the server changed for itself, which its children get
/// back (a child runs as one forked by the program would).
#[derive(Clone, Copy)]
struct ProgramSignals {
    sigint: sys::SavedAction,
    sigpipe: sys::SavedAction,
    sigchld: sys::SavedAction,
}

impl ProgramSignals {
    /// In a child of the server.
    fn restore(self) {
        let _ = sys::restore_action(libc::SIGINT, &self.sigint);
        let _ = sys::restore_action(libc::SIGPIPE, &self.sigpipe);
        let _ = sys::restore_action(libc::SIGCHLD, &self.sigchld);
    }
}

/// The requester is gone: reaps the children that have ended, so that
/// none is left a zombie for whoever adopts it, ends the spare, and exits
/// (daemon children die with the server: their death signal).
fn end_serving(spare: Option<Spare>, live: &[(libc::pid_t, OwnedFd, File)]) -> ! {
    if let Some(spare) = spare {
        kill_and_reap(spare.pid);
    }
    for (pid, _, _) in live {
        let _ = sys::waitpid_nohang(*pid);
    }
    sys::exit_now(0)
}

/// Ends the server's child `pid` and reaps it.
fn kill_and_reap(pid: libc::pid_t) {
    let _ = sys::kill(pid, libc::SIGKILL);
    let _ = sys::waitpid_blocking(pid);
}

/// In a child of the server: runs the request's entry; never returns into
/// the server's (or, in a zygote, its requester's) frames, not even by a
/// panic before the entry's own catch.
fn run_child(request: OwnedFd, result: OwnedFd, shared: Vec<OwnedFd>, server: libc::pid_t) -> ! {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        entry::run_request(
            File::from(request),
            File::from(result),
            Some(shared),
            Some(server),
        )
    }));
    sys::exit_now(1)
}

/// Forks a spare child (see [`Spare`]); `None` if that fails (the next
/// request forks then).
///
/// The spare is set up as a child forked for a request would be (SIGINT,
/// SIGPIPE and SIGCHLD as the program has them) and then waits. It needs no death
/// signal: only the server holds the other end of its channel, so when
/// the server goes, however it goes, the wait ends and so does the spare.
fn make_spare(
    server: libc::pid_t,
    sock: &OwnedFd,
    requester_fd: Option<&OwnedFd>,
    live: &[(libc::pid_t, OwnedFd, File)],
    program: ProgramSignals,
) -> Option<Spare> {
    let (ours, theirs) = sys::seqpacket_pair().ok()?;
    let permit = ForkPermit::single_threaded().ok()?;
    match sys::fork(permit) {
        Ok(Fork::Child) => {
            drop(ours);
            // Nothing of the server's: its connection, its other children.
            // (Their owners live in the server's frame, which this process
            // never returns to.)
            sys::close_inherited(sock.as_raw_fd());
            if let Some(fd) = requester_fd {
                sys::close_inherited(fd.as_raw_fd());
            }
            for (_, pidfd, status) in live {
                sys::close_inherited(pidfd.as_raw_fd());
                sys::close_inherited(status.as_raw_fd());
            }
            program.restore();
            let fds = loop {
                match sys::receive(&theirs) {
                    Ok(Some(fds)) if fds.len() >= 2 => break fds,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // The server is gone, or dropped it.
                    _ => sys::exit_now(0),
                }
            };
            drop(theirs);
            let mut fds = fds.into_iter();
            let (Some(request), Some(result)) = (fds.next(), fds.next()) else {
                sys::exit_now(0)
            };
            run_child(request, result, fds.collect(), server)
        }
        Ok(Fork::Parent(pid)) => match sys::pidfd_open(pid).ok().flatten() {
            Some(pidfd) => Some(Spare {
                pid,
                pidfd,
                chan: ours,
            }),
            None => {
                kill_and_reap(pid);
                None
            }
        },
        Err(_) => None,
    }
}
