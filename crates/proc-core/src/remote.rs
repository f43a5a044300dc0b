//! Children of the fork server (or of a zygote), as seen by the process
//! that asked for them: not its own children (the server reaps them), but
//! they are listed by `active_children`, and what Python does at exit
//! still applies: daemons are terminated, the others waited for.

use std::os::fd::{AsFd, OwnedFd};

use crate::sys;

/// A fork-server child: pid, pidfd, daemon flag, name.
type Entry = (libc::pid_t, OwnedFd, bool, String);

/// The fork-server children started by this process (the pid of the owner
/// first: a forked child inherits the list but not the children); entries
/// of ended children are pruned on registration.
static REMOTE: parking_lot::Mutex<(libc::pid_t, Vec<Entry>)> =
    parking_lot::const_mutex((0, Vec::new()));

/// Records a fork-server child for the exit handling and
/// `active_children`.
pub(crate) fn register(pid: libc::pid_t, pidfd: &OwnedFd, daemon: bool, name: &str) {
    let Ok(pidfd) = pidfd.try_clone() else { return };
    let me = sys::getpid();
    let mut remote = REMOTE.lock();
    if remote.0 != me {
        // Inherited from a parent: not this process's.
        remote.1.clear();
        remote.0 = me;
    }
    forget_ended(&mut remote.1);
    remote.1.push((pid, pidfd, daemon, name.to_owned()));
}

/// Drops the entries of children that have ended (their pidfd fired).
fn forget_ended(entries: &mut Vec<Entry>) {
    entries.retain(|(_, fd, _, _)| !sys::readable_now(fd.as_fd()));
}

/// The fork-server children of this process that are still running.
pub(crate) fn live() -> Vec<crate::children::LiveChild> {
    let me = sys::getpid();
    let mut remote = REMOTE.lock();
    if remote.0 != me {
        return Vec::new();
    }
    forget_ended(&mut remote.1);
    remote
        .1
        .iter()
        .map(|(pid, _, daemon, name)| crate::children::LiveChild {
            pid: *pid,
            name: name.clone(),
            daemon: *daemon,
        })
        .collect()
}

/// At exit: terminates the daemon children and waits for the others.
pub(crate) fn finish() {
    let me = sys::getpid();
    let remote = std::mem::take(&mut *REMOTE.lock());
    if remote.0 != me {
        return;
    }
    for (_, pidfd, daemon, _) in &remote.1 {
        if *daemon {
            let _ = sys::pidfd_signal(pidfd.as_fd(), libc::SIGTERM);
        }
    }
    for (_, pidfd, _, _) in &remote.1 {
        let _ = sys::wait_readable(pidfd.as_fd());
    }
}
