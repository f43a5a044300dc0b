//! Process ids.

use std::fmt;

/// A process id.
///
/// # Examples
///
/// ```
/// let me = proc_core::getpid();
/// assert!(me.as_u32() > 0);
/// ```
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Pid(libc::pid_t);

impl Pid {
    pub(crate) fn from_raw(pid: libc::pid_t) -> Self {
        Pid(pid)
    }

    pub(crate) fn raw(self) -> libc::pid_t {
        self.0
    }

    /// The id as the `u32` that `std::process::id()` returns.
    pub fn as_u32(self) -> u32 {
        self.0 as u32
    }
}

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Pid> for u32 {
    fn from(pid: Pid) -> u32 {
        pid.as_u32()
    }
}
