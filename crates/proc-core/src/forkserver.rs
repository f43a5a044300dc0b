//! The fork server: this executable, exec'd once (when the first
//! `StartMethod::ForkServer` start asks for it) and kept single-threaded,
//! forks a child for every request (Python's `forkserver`). From its
//! second request on it keeps one child forked ahead, a *spare*, and
//! offers it to the requester: the next start hands its descriptors to the
//! spare directly and tells the server after (no round trip through the
//! server), and the server forks the next spare meanwhile, off the
//! requester's path. (A zygote serves the same way.)
//!
//! Requests travel over a `SOCK_SEQPACKET` socket pair (no socket file, so
//! only this process can talk to its server and nothing is left behind),
//! each carrying descriptors: the request and result memfds and any
//! descriptor the arguments share (to the spare, or to the server with a
//! `Fork` request; a request of at most 16 KiB for a spare travels inside
//! the message instead of in a memfd), and the write end of a pipe for the child's exit status
//! (to the server, with the `Fork` request or the `Took` that follows a
//! direct start). The server answers a `Fork` with the child's pid and a
//! pidfd for it (a spare's come with its offer). The child is the server's:
//! the server reaps it and writes its raw wait status into that pipe, which
//! is what the requester's `JoinHandle` waits on. The server ends with its requester (it watches the requester's
//! pidfd), even when the requester is SIGKILLed, whichever thread started
//! it; daemon children die with the server.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::builder::Builder;
use crate::children;
use crate::entry::{self, Prepared, RequestSource};
use crate::error::SpawnError;
use crate::handle::JoinHandle;
use crate::pid::Pid;
use crate::sys::{self, Fork, ForkPermit};

/// The variable that makes `init()` run the server loop (its value: the
/// server's end of the socket pair).
pub(crate) const ENV: &str = "PROC_FORKSERVER_FD";

/// This process's connection to its server: (owner pid, link).
static CONN: parking_lot::Mutex<Option<(libc::pid_t, Link)>> = parking_lot::const_mutex(None);

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
        *conn = Some((me, Link::new(start_server().map_err(SpawnError::Exec)?)));
    }
    let Some((_, link)) = conn.as_mut() else {
        return Err(SpawnError::Exec(std::io::Error::other("no fork server")));
    };
    let asked =
        link.settle()
            .map_err(Asked::ServerGone)
            .and_then(|()| match link.send(prepared)? {
                Started::Direct(handle) => Ok(handle),
                Started::Sent(sent) => link.receive(sent),
            });
    match asked {
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

/// A spare child offered by the server: the next request goes to it.
#[derive(Debug)]
struct Offer {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    chan: OwnedFd,
}

/// This side of a connection to a fork server or zygote.
///
/// The protocol: each request (`Fork`, or `Took` after handing a request
/// to the offered spare directly) is followed, after the reply to a
/// `Fork`, by one word about the spare (an offer or none). Those words are
/// read lazily, at the next start, so that the fork of a new spare stays
/// off the path of the start that used the last one.
#[derive(Debug)]
struct Link {
    sock: OwnedFd,
    offer: Option<Offer>,
    /// Words about the spare still to read: one per request sent.
    owed: usize,
}

/// A request on its way: started already (handed to a spare), or sent to
/// the server and waiting for its reply.
enum Started<R> {
    Direct(JoinHandle<R>),
    Sent(Sent),
}

/// A request sent, its reply not yet read.
struct Sent {
    result: File,
    status_read: File,
    name: String,
    daemon: bool,
}

impl Link {
    fn new(sock: OwnedFd) -> Link {
        Link {
            sock,
            offer: None,
            owed: 0,
        }
    }

    /// Takes in a word about the spare.
    fn keep(&mut self, word: sys::FromServer) {
        self.owed = self.owed.saturating_sub(1);
        if let sys::FromServer::Offer(pid, pidfd, chan) = word {
            // (An offer still held here is of a spare that died: the
            // server offers one only when it has none.)
            self.offer = Some(Offer { pid, pidfd, chan });
        }
    }

    /// Reads the words about the spare still owed.
    fn settle(&mut self) -> std::io::Result<()> {
        while self.owed > 0 {
            match sys::receive_from_server(&self.sock)? {
                sys::FromServer::Reply(_) | sys::FromServer::ReplyWithoutPidfd(_) => {
                    return Err(std::io::Error::other("fork server out of step"))
                }
                word => self.keep(word),
            }
        }
        Ok(())
    }

    /// Starts `prepared`: handed to the offered spare, or sent to the
    /// server (whose reply [`receive`](Link::receive) reads).
    fn send<R>(&mut self, prepared: Prepared) -> Result<Started<R>, Asked> {
        let Prepared {
            request,
            result,
            fds,
            name,
            daemon,
            ..
        } = prepared;
        // With the request, result and status descriptors, one message.
        if fds.len() > sys::MAX_FDS_PER_MESSAGE - 3 {
            return Err(Asked::Local(SpawnError::Encode(format!(
                "the arguments share {} descriptors; a fork-server or zygote start carries at most {}",
                fds.len(),
                sys::MAX_FDS_PER_MESSAGE - 3
            ))));
        }
        let (status_read, status_write) = sys::pipe()
            .map_err(SpawnError::ResultChannel)
            .map_err(Asked::Local)?;
        // A request handed to a spare travels inline when it is small (no
        // memfd to make, fill, and for the child to read and free: ~18% of
        // a spare child's CPU was the last close of the request's memfd);
        // otherwise, and for the server, in a memfd.
        let request_file = if self.offer.is_none() || request.len() > sys::INLINE_REQUEST_MAX {
            Some(entry::request_memfd(&request).map_err(Asked::Local)?)
        } else {
            None
        };
        // The descriptors of a request in a memfd: the memfd, the result's,
        // `status` (for the server), then the shared ones.
        let with_memfd = |file: &File, status: Option<RawFd>| {
            let mut send = vec![file.as_raw_fd(), result.as_raw_fd()];
            send.extend(status);
            send.extend(fds.iter().map(|fd| fd.as_raw_fd()));
            send
        };
        if let Some(Offer { pid, pidfd, chan }) = self.offer.take() {
            let sent = match &request_file {
                Some(file) => sys::send_request(&chan, &with_memfd(file, None)),
                None => {
                    let mut send = vec![result.as_raw_fd()];
                    send.extend(fds.iter().map(|fd| fd.as_raw_fd()));
                    match sys::send_inline_request(&chan, &request, &send) {
                        // Not sent, the spare still there (a socket buffer
                        // smaller than the message, say): in a memfd then.
                        Err(e) if !sys::peer_gone(&e) => {
                            let file = entry::request_memfd(&request).map_err(Asked::Local)?;
                            sys::send_request(&chan, &with_memfd(&file, None))
                        }
                        sent => sent,
                    }
                }
            };
            // An error means the spare is gone (killed from outside, or it
            // saw the server end) or the message could not be sent: the
            // server forks a child instead. A spare still alive is ended
            // (through its pidfd: no pid reuse), so that the server, seeing
            // it go, makes and offers another.
            if sent.is_err() {
                let _ = sys::pidfd_signal(pidfd.as_fd(), libc::SIGKILL);
            } else {
                drop(chan);
                if let Err(e) = sys::send_took(&self.sock, pid, status_write.as_raw_fd()) {
                    // The server is gone: nobody would reap or report it.
                    let _ = sys::pidfd_signal(pidfd.as_fd(), libc::SIGKILL);
                    return Err(Asked::ServerGone(e));
                }
                self.owed += 1;
                crate::remote::register(pid, &pidfd, daemon, &name);
                return Ok(Started::Direct(JoinHandle::new_remote(
                    Pid::from_raw(pid),
                    name,
                    result,
                    pidfd,
                    status_read,
                )));
            }
        }
        let request_file = match request_file {
            Some(file) => file,
            None => entry::request_memfd(&request).map_err(Asked::Local)?,
        };
        let send = with_memfd(&request_file, Some(status_write.as_raw_fd()));
        sys::send_request(&self.sock, &send).map_err(Asked::ServerGone)?;
        self.owed += 1;
        Ok(Started::Sent(Sent {
            result,
            status_read,
            name,
            daemon,
        }))
    }

    /// Reads the reply to the oldest request sent to the server.
    fn receive<R>(&mut self, sent: Sent) -> Result<JoinHandle<R>, Asked> {
        let reply = loop {
            match sys::receive_from_server(&self.sock).map_err(Asked::ServerGone)? {
                sys::FromServer::Reply(reply) => break reply,
                sys::FromServer::ReplyWithoutPidfd(pid) => {
                    // A child this process could never wait for, nor stop
                    // safely later: it is ended now. (Its pid is still its
                    // own: the server reaps it only once it has ended, and
                    // a pid comes back only after the pid space wraps.)
                    let _ = sys::kill(pid, libc::SIGKILL);
                    return Err(Asked::Local(SpawnError::Fork(std::io::Error::other(
                        "the fork server started the child, but this process had no descriptor to spare for its pidfd: it was ended",
                    ))));
                }
                word => self.keep(word),
            }
        };
        let Some((pid, pidfd)) = reply else {
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
    link: parking_lot::Mutex<Option<Link>>,
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
        // Its children's stdin, as the fork server's is (opened here: the
        // child below only redirects).
        let null = crate::builder::dev_null().map_err(SpawnError::Stdin)?;
        // Known here once per process, the zygote inherits it: looked up
        // in a fresh process, /proc/self/exe took ~a quarter of a zygote's
        // start-up (procfs makes that process's entries on first use; W8
        // profile), on the CPU its pool's first workers were waiting for.
        let _ = sys::exe_identity();
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
                if sys::stdin_from_dev_null(null).is_err() {
                    sys::exit_now(1);
                }
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
                    link: parking_lot::Mutex::new(Some(Link::new(ours))),
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
            && self.link.lock().is_some()
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
        let mut link = self.link.lock();
        let Some(conn) = link.as_mut() else {
            return Err(gone());
        };
        // In windows: every request carries descriptors, and a socket holds
        // only so many in flight.
        const WINDOW: usize = 16;
        let mut handles = Vec::with_capacity(prepared.len());
        let mut failure = conn.settle().err().map(Asked::ServerGone);
        let mut prepared = prepared.into_iter().peekable();
        while failure.is_none() && prepared.peek().is_some() {
            let mut started = Vec::with_capacity(WINDOW);
            for p in prepared.by_ref().take(WINDOW) {
                match conn.send(p) {
                    Ok(s) => started.push(s),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            // Every request sent gets its reply read, so that the next
            // exchange on this socket starts in step.
            for s in started {
                match s {
                    Started::Direct(h) => handles.push(h),
                    Started::Sent(s) => match conn.receive(s) {
                        Ok(h) => handles.push(h),
                        Err(e @ Asked::ServerGone(_)) => {
                            failure = Some(e);
                            break;
                        }
                        Err(e) => {
                            failure.get_or_insert(e);
                        }
                    },
                }
            }
        }
        match failure {
            None => Ok(handles),
            Some(Asked::Local(e)) => Err(e),
            Some(Asked::ServerGone(e)) => {
                if let Some(gone) = link.take() {
                    unregister_socket(self.owner, &gone.sock);
                }
                Err(SpawnError::Exec(e))
            }
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(link) = self.link.get_mut().take() {
            unregister_socket(self.owner, &link.sock);
            // The zygote sees the end of its connection and exits (and so
            // does an offered spare); the child table reaps it.
            drop(link);
        }
    }
}

/// Execs the server and returns this side of its socket.
fn start_server() -> std::io::Result<OwnedFd> {
    let (ours, theirs) = sys::seqpacket_pair()?;
    let theirs = sys::above_stdio(theirs)?;
    let null = crate::builder::dev_null()?.as_raw_fd();
    children::init();
    let slot =
        children::reserve().ok_or_else(|| std::io::Error::other("too many live children"))?;
    children::name(slot, "ForkServer");
    let spec = sys::ExecSpec {
        var: (ENV, theirs.as_raw_fd().to_string()),
        keep: &[theirs.as_raw_fd()],
        stdin: Some(null),
    };
    let pid = match sys::spawn_exe(&spec) {
        Ok(pid) => pid,
        Err(e) => {
            children::unreserve(slot);
            return Err(e);
        }
    };
    // A daemon of this process: terminated at exit, reaped when it ends.
    children::register_hidden(slot, pid);
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

/// A child forked ahead of the next request. The server offers it to the
/// requester as soon as it is forked (its pid, a pidfd and the other end
/// of the channel it waits on) and keeps only what it needs to reap it:
/// the requester hands the next request's descriptors to it directly and
/// then tells the server (`Took`, with the status pipe), so a start costs
/// no round trip through the server at all; the fork of the next spare
/// comes after, off the requester's path.
struct Spare {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

/// A child the server reaps: (pid, pidfd, status pipe: where its raw wait
/// status goes).
type Live = (libc::pid_t, OwnedFd, Option<File>);

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
    // Only the server holds the write end: a spare sees the server gone
    // when the read end reports the hang-up.
    let Ok((alive_read, alive_write)) = sys::pipe() else {
        sys::exit_now(1)
    };
    let mut live: Vec<Live> = Vec::new();
    // The spare offered to the requester, if any (one at a time; made once
    // a second request came, so that a zygote whose pool never replaces a
    // worker keeps no idle copy of itself).
    let mut spare: Option<Spare> = None;
    // A spare that ended before its `Took` was read: its raw wait status,
    // for the `Took` that may follow (the requester sends it right after
    // the request, so any other message means none is coming).
    let mut ended_spare: Option<(libc::pid_t, i32)> = None;
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
            end_serving(&sock, spare.take(), &mut live);
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
                    if let Some(status) = status {
                        let _ = status.write_all(&exit.into_raw().to_le_bytes());
                    }
                    false
                }
                // Reaped by someone else after all: its status is gone, and
                // the pipe closing tells the requester so.
                Ok(sys::Reap::NoChild) => false,
                _ => true,
            }
        });
        if ended.next().copied().unwrap_or(false) {
            // The spare ended: killed from outside while it waited, or it
            // took a request (and may be done already) whose `Took` is
            // still on its way.
            if let Some(gone) = spare.take() {
                match sys::waitpid_nohang(gone.pid) {
                    Ok(sys::Reap::Exited(exit)) => {
                        use std::os::unix::process::ExitStatusExt;
                        ended_spare = Some((gone.pid, exit.into_raw()));
                    }
                    // Reaped by someone else: its status is gone.
                    Ok(sys::Reap::NoChild) => {}
                    // Not yet (or the call failed): look again.
                    _ => spare = Some(gone),
                }
            }
        }
        if !ready[0] {
            continue;
        }
        let message = match sys::receive_request(&sock) {
            Ok(Some(message)) => message,
            // The requester closed its end (it is gone, or dropped its
            // zygote): reap the children that have ended, so that none is
            // left a zombie for whoever adopts it, and go.
            Ok(None) => end_serving(&sock, spare.take(), &mut live),
            // (A signal does not end the receive: it is retried there; a
            // request whose descriptors were cut short is read, and
            // refused.) A socket that fails: the server cannot answer in
            // step. Its end tells the requester, whose next start makes
            // another.
            Err(_) => end_serving(&sock, spare.take(), &mut live),
        };
        served = served.saturating_add(1);
        match message {
            sys::ToServer::Took(pid, status) => {
                let status = status.map(File::from);
                match (spare.take(), ended_spare.take()) {
                    (Some(taken), _) if taken.pid == pid => {
                        live.push((taken.pid, taken.pidfd, status));
                    }
                    (other, Some((ended, raw))) if ended == pid => {
                        spare = other;
                        if let Some(mut status) = status {
                            let _ = status.write_all(&raw.to_le_bytes());
                        }
                    }
                    // Not ours (the pipe closing tells the requester).
                    (other, _) => spare = other,
                }
            }
            sys::ToServer::Fork(fds) => {
                ended_spare = None;
                // A request to fork while a spare is offered: the requester
                // could not use it (sending to it failed, and it ended it;
                // or it never got it, having no descriptor to spare). It is
                // ended here, so that another is offered after this one.
                if let Some(stale) = spare.take() {
                    kill_and_reap(stale.pid);
                }
                let own = Own {
                    sock: &sock,
                    requester: requester_fd.as_ref(),
                    alive: (&alive_read, &alive_write),
                    live: &live,
                    spare: spare.as_ref().map(|s| &s.pidfd),
                };
                let (child, replied) = fork_for(fds, &own, server, program);
                live.extend(child);
                if !replied {
                    // The requester would wait for the reply for ever.
                    end_serving(&sock, spare.take(), &mut live);
                }
            }
        }
        // After each request, one word about the spare: a new one, or none.
        let made = if spare.is_none() && served >= 2 {
            let own = Own {
                sock: &sock,
                requester: requester_fd.as_ref(),
                alive: (&alive_read, &alive_write),
                live: &live,
                spare: None,
            };
            make_spare(server, &own, program)
        } else {
            None
        };
        // The requester waits for the word: one that cannot be sent ends
        // the server (the requester sees its end, and its next start makes
        // another), rather than leave the two out of step.
        let said = match made {
            Some((new, chan)) => {
                let offered = sys::offer(&sock, Some((new.pid, &new.pidfd, &chan))).is_ok();
                // Only the requester holds its end of the channel now.
                drop(chan);
                if offered {
                    spare = Some(new);
                    true
                } else {
                    kill_and_reap(new.pid);
                    sys::offer(&sock, None).is_ok()
                }
            }
            None => sys::offer(&sock, None).is_ok(),
        };
        if !said {
            end_serving(&sock, spare.take(), &mut live);
        }
    }
}

/// The server's own descriptors, which none of its children keeps (their
/// owners live in the server's frame, which a child never returns to).
struct Own<'a> {
    sock: &'a OwnedFd,
    requester: Option<&'a OwnedFd>,
    /// The pipe whose hang-up tells a spare that the server is gone: (read
    /// end, which a spare keeps, write end).
    alive: (&'a File, &'a File),
    live: &'a [Live],
    spare: Option<&'a OwnedFd>,
}

impl Own<'_> {
    /// In a child of the server: closes them all but the `alive` read end.
    fn close_in_child(&self) {
        sys::close_inherited(self.sock.as_raw_fd());
        if let Some(fd) = self.requester {
            sys::close_inherited(fd.as_raw_fd());
        }
        sys::close_inherited(self.alive.1.as_raw_fd());
        for (_, pidfd, status) in self.live {
            sys::close_inherited(pidfd.as_raw_fd());
            if let Some(status) = status {
                sys::close_inherited(status.as_raw_fd());
            }
        }
        if let Some(fd) = self.spare {
            sys::close_inherited(fd.as_raw_fd());
        }
    }
}

/// Serves a `Fork` request: forks its child and replies with the child's
/// pid and pidfd (or -1); returns the child to reap, and whether the reply
/// went out.
fn fork_for(
    fds: Vec<OwnedFd>,
    own: &Own<'_>,
    server: libc::pid_t,
    program: ProgramSignals,
) -> (Option<Live>, bool) {
    let refuse = || (None, sys::reply(own.sock, -1, None).is_ok());
    if fds.len() < 3 {
        return refuse();
    }
    let mut fds = fds.into_iter();
    let (Some(request), Some(result), Some(status)) = (fds.next(), fds.next(), fds.next()) else {
        return refuse();
    };
    let shared: Vec<OwnedFd> = fds.collect();
    let status = File::from(status);
    let permit = match ForkPermit::single_threaded() {
        Ok(permit) => permit,
        Err(_) => sys::exit_now(1),
    };
    // The spare made next must not hold copies of this request's
    // descriptors (a pipe in the arguments would never see its end): they
    // are dropped on return, before it is forked.
    match sys::fork(permit) {
        Ok(Fork::Child) => {
            own.close_in_child();
            sys::close_inherited(own.alive.0.as_raw_fd());
            drop(status);
            program.restore();
            run_child(
                RequestSource::File(File::from(request)),
                result,
                shared,
                server,
            )
        }
        Ok(Fork::Parent(pid)) => match sys::pidfd_open(pid).ok().flatten() {
            Some(pidfd) => {
                let replied = sys::reply(own.sock, pid, Some(&pidfd)).is_ok();
                (Some((pid, pidfd, Some(status))), replied)
            }
            None => {
                // Without a pidfd neither side could wait for it: it
                // must not run unwatched (nor stay a zombie).
                kill_and_reap(pid);
                refuse()
            }
        },
        Err(_) => refuse(),
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

/// The requester is gone: ends the spare, unless a `Took` still queued
/// says it took a request (the requester went right after a start: it runs
/// on, as a child started a moment earlier would), reaps the children that
/// have ended, so that none is left a zombie for whoever adopts it, and
/// exits (daemon children die with the server: their death signal).
fn end_serving(sock: &OwnedFd, mut spare: Option<Spare>, live: &mut [Live]) -> ! {
    while spare.is_some() && sys::readable_now(sock.as_fd()) {
        match sys::receive_request(sock) {
            Ok(Some(sys::ToServer::Took(pid, status)))
                if spare.as_ref().is_some_and(|s| s.pid == pid) =>
            {
                // A child now; reaped (and its status reported) here if it
                // is done already.
                spare = None;
                let mut status = status.map(File::from);
                report_if_ended(pid, &mut status);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    if let Some(spare) = spare {
        kill_and_reap(spare.pid);
    }
    for (pid, _, status) in live.iter_mut() {
        report_if_ended(*pid, status);
    }
    sys::exit_now(0)
}

/// Reaps `pid` if it has ended and writes its raw wait status to `status`
/// (its requester's pipe), as the serving loop does.
fn report_if_ended(pid: libc::pid_t, status: &mut Option<File>) {
    use std::os::unix::process::ExitStatusExt;
    if let Ok(sys::Reap::Exited(exit)) = sys::waitpid_nohang(pid) {
        if let Some(status) = status {
            let _ = status.write_all(&exit.into_raw().to_le_bytes());
        }
    }
}

/// Ends the server's child `pid` and reaps it.
fn kill_and_reap(pid: libc::pid_t) {
    let _ = sys::kill(pid, libc::SIGKILL);
    let _ = sys::waitpid_blocking(pid);
}

/// In a child of the server: runs the request's entry; never returns into
/// the server's (or, in a zygote, its requester's) frames, not even by a
/// panic before the entry's own catch.
fn run_child(
    request: RequestSource,
    result: OwnedFd,
    shared: Vec<OwnedFd>,
    server: libc::pid_t,
) -> ! {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        entry::run_request(request, File::from(result), Some(shared), Some(server))
    }));
    sys::exit_now(1)
}

/// Forks a spare child (see [`Spare`]) and returns it with the other end
/// of its channel, for the offer; `None` if that fails (the next request
/// forks then).
///
/// The spare is set up as a child forked for a request would be (SIGINT,
/// SIGPIPE and SIGCHLD as the program has them) and then waits for a
/// request on its channel, or for the server's end (the hang-up of the
/// `alive` pipe; a server that ends in order ends its spare itself): then
/// it runs a request already sent to it, if any, and otherwise ends.
/// (Forked copies of the requester may hold copies of the channel, so the
/// channel's end alone would not do; nor would a death signal, which could
/// kill a spare that already took a request.)
fn make_spare(
    server: libc::pid_t,
    own: &Own<'_>,
    program: ProgramSignals,
) -> Option<(Spare, OwnedFd)> {
    let (ours, theirs) = sys::seqpacket_pair().ok()?;
    let permit = ForkPermit::single_threaded().ok()?;
    match sys::fork(permit) {
        Ok(Fork::Child) => {
            drop(ours);
            own.close_in_child();
            program.restore();
            let buf = sys::request_buffer();
            let (inline, fds) = loop {
                let ready = match sys::poll_many(&[theirs.as_fd(), own.alive.0.as_fd()]) {
                    Ok(ready) => ready,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => sys::exit_now(0),
                };
                if !ready[0] {
                    // The server is gone: a request already here still runs.
                    if sys::readable_now(theirs.as_fd()) {
                        continue;
                    }
                    sys::exit_now(0)
                }
                match sys::receive(&theirs, buf) {
                    Ok(Some(received)) => break received,
                    // The requester is gone, or dropped it.
                    _ => sys::exit_now(0),
                }
            };
            drop(theirs);
            sys::close_inherited(own.alive.0.as_raw_fd());
            let mut fds = fds.into_iter();
            let request = match inline {
                Some(bytes) => RequestSource::Inline(bytes),
                None => match fds.next() {
                    Some(file) => RequestSource::File(File::from(file)),
                    None => sys::exit_now(0),
                },
            };
            let Some(result) = fds.next() else {
                sys::exit_now(0)
            };
            run_child(request, result, fds.collect(), server)
        }
        Ok(Fork::Parent(pid)) => match sys::pidfd_open(pid).ok().flatten() {
            Some(pidfd) => Some((Spare { pid, pidfd }, ours)),
            None => {
                kill_and_reap(pid);
                None
            }
        },
        Err(_) => None,
    }
}
