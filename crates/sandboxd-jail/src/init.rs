//! The sandbox's PID 1: a tiny init that starts the payload, reaps orphans and passes signals on.
//!
//! What the kernel does here: the first process of a pid namespace is its init. Every process
//! orphaned inside the namespace is re-parented to it, and it alone must `wait` for them or they
//! stay zombies. The kernel never delivers a signal to it from inside the namespace unless it
//! handles that signal, and when it exits the kernel SIGKILLs everything else in the namespace.
//!
//! So our init blocks the signals it cares about and takes them synchronously with `sigwait`
//! (no handler runs, so no async-signal-safety puzzle; blocked signals are queued even for an
//! init): on `SIGCHLD` it reaps every exited child with `waitpid(-1, WNOHANG)`, on `SIGTERM`,
//! `SIGINT` or `SIGHUP` it sends the same signal to the payload, and when the payload itself exits
//! it exits with the payload's status (`128 + signal` if it was killed), which tears the namespace
//! down. It runs with `/dev/null` as stdio, no other descriptor and no capability, so it holds
//! nothing of the process that created the sandbox and is worth nothing to an attacker inside.
//!
//! It is a forked copy of that process, not a separate binary: the copy shares the caller's memory
//! pages copy-on-write and writes almost none of them. With `enter_sandbox_then` it is not even a
//! copy: a `CLONE_VM` clone that shares the caller's memory (`namespaces.rs`).
#![allow(unsafe_code)]

use std::os::fd::BorrowedFd;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sys::signal::{
    SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, kill, sigaction, sigprocmask,
};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, dup2_stderr, dup2_stdin, dup2_stdout, fork, setsid};

use crate::capabilities::{drop_all, restrict_to_payload_set};
use crate::report::{AtStep, Record, Step, StepError, write_record};
use crate::seccomp;
use crate::spec::Prepared;
use crate::sys::{close_from, exit_now};

/// Signals the init passes on to the payload: the ones a supervisor uses to ask for a clean stop.
const FORWARDED: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

/// The init's name in `/proc/1/comm` inside the sandbox (at most 15 bytes).
const INIT_NAME: &std::ffi::CStr = c"sandboxd-init";

/// Exit status of the init when its payload was killed by signal `n`: `128 + n`, as shells report.
const SIGNALED_BASE: i32 = 128;

/// Forks the payload from PID 1. Returns `Ok(())` in the payload, with the caller's signal mask
/// and `SIGCHLD` disposition restored, its `RLIMIT_NOFILE` set, the seccomp filter installed and
/// its capabilities reduced to [`crate::PAYLOAD_CAPABILITIES`]. In PID 1 it never returns: it
/// drops every capability, closes every descriptor (including the setup `report` pipe) and runs
/// the init loop until the payload exits. Async-signal-safe.
///
/// `payload_mask`: the signal mask the payload starts with, when the caller's is not it (the init
/// cloned with every signal blocked, `namespaces.rs`); `None`: the caller's.
pub(crate) fn fork_payload_and_serve(
    report: BorrowedFd<'_>,
    p: &Prepared,
    payload_mask: Option<&SigSet>,
) -> Result<(), StepError> {
    let mut watched = SigSet::empty();
    for s in FORWARDED {
        watched.add(s);
    }
    watched.add(Signal::SIGCHLD);
    let mut old_mask = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&watched), Some(&mut old_mask)).at(Step::Signals)?;
    // The caller may ignore SIGCHLD (then the kernel auto-reaps and waitpid never sees the
    // payload's status); the init needs the default.
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL involves no handler code.
    let old_chld = unsafe { sigaction(Signal::SIGCHLD, &default) }.at(Step::Signals)?;

    // SAFETY: we are single-threaded (PID 1 of a namespace we just created, forked from a
    // single thread), and both sides only make async-signal-safe calls until exec or return.
    match unsafe { fork() }.at(Step::Fork)? {
        ForkResult::Child => {
            // SAFETY: restores the disposition the caller had; no handler runs here.
            unsafe { sigaction(Signal::SIGCHLD, &old_chld) }.at(Step::Signals)?;
            let mask = payload_mask.unwrap_or(&old_mask);
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None).at(Step::Signals)?;
            if let Some(n) = p.open_files {
                let limit = libc::rlimit64 {
                    rlim_cur: n,
                    rlim_max: n,
                };
                // SAFETY: prlimit64 on ourselves (pid 0) reads `limit`, which outlives the call.
                let r = unsafe {
                    libc::prlimit64(0, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut())
                };
                Errno::result(r).at(Step::Rlimits)?;
            }
            // Installed while the payload still holds CAP_SYS_ADMIN over the sandbox's user
            // namespace, so no_new_privs stays off (setuid programs keep working inside).
            seccomp::install(&p.seccomp).at(Step::Seccomp)?;
            restrict_to_payload_set()
        }
        ForkResult::Parent { child } => {
            if let Err(e) = drop_all() {
                write_record(report, Record::Failed(e));
                let _ = kill(child, Signal::SIGKILL);
            }
            serve(child, &watched)
        }
    }
}

fn serve(payload: Pid, watched: &SigSet) -> ! {
    let _ = nix::sys::prctl::set_name(INIT_NAME);
    // Its own session, so a signal to the creating process's group never reaches the init.
    let _ = setsid();
    if let Ok(null) = open(c"/dev/null", OFlag::O_RDWR, Mode::empty()) {
        let _ = dup2_stdin(&null);
        let _ = dup2_stdout(&null);
        let _ = dup2_stderr(&null);
    }
    // Closes the setup report pipe (so the creator sees end of file) and anything inherited.
    let _ = close_from(3);

    loop {
        match watched.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(payload) {
                    exit_now(code);
                }
            }
            Ok(sig) => {
                let _ = kill(payload, sig);
            }
            Err(_) => {}
        }
    }
}

/// Reaps every exited child. Returns the exit code for the init once the payload is gone.
fn reap(payload: Pid) -> Option<i32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == payload => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == payload => {
                return Some(SIGNALED_BASE + sig as i32);
            }
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) | Err(Errno::EINTR) => continue,
            // No children at all: the payload is gone and we missed its status.
            Err(_) => return Some(SIGNALED_BASE + Signal::SIGKILL as i32),
        }
    }
}
