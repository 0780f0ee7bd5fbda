//! Reaping one child. When a child terminates the kernel keeps it as a zombie — its pid reserved,
//! its wait status stored — until the parent collects it with `waitpid(2)`. We wait in two steps:
//! `waitid(P_PID, WEXITED | WNOWAIT)` sleeps until the child has terminated but leaves the zombie
//! in place, and only then, under the caller's lock, `waitpid(pid)` collects the status and frees
//! the pid. Until that second step the pid (and so the process-group id) cannot be reused, which
//! is what makes signalling the group race-free. We never call `waitpid(-1)`: other code in the
//! same process owns its own children.
//!
//! The raw status word is decoded here rather than through nix, whose `WaitStatus` cannot
//! represent a death by a real-time signal.
#![allow(unsafe_code)]

use std::io;

/// Sleeps until child `pid` has terminated, without reaping it. Retries on `EINTR`.
/// Fails with `ECHILD` if `pid` is not (or no longer) our child.
pub(crate) fn wait_terminated(pid: libc::pid_t) -> io::Result<()> {
    loop {
        // SAFETY: `siginfo_t` is plain data for which all-zero bytes is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable `siginfo_t`; waitid writes at most one into it.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Collects the wait status of the terminated child `pid` and frees its pid. Call it only after
/// [`wait_terminated`] returned, so that it does not block. Retries on `EINTR`.
pub(crate) fn reap(pid: libc::pid_t) -> io::Result<i32> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a live, writable int; waitpid writes one status word into it.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
