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
//! copy: a `CLONE_VM` clone that shares the caller's memory (`namespaces.rs`), and so is the
//! payload ([`clone_payload_and_serve`]), which is why everything the init does once the payload
//! exists is a raw system call (`raw.rs`).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::errno::Errno;
use nix::sys::signal::{
    SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal, kill, sigaction, sigprocmask,
};
use nix::unistd::{ForkResult, Pid, fork};

use crate::capabilities::{drop_all, restrict_to_payload_set};
use crate::raw;
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
        ForkResult::Child => payload_setup(p, payload_mask.unwrap_or(&old_mask), &old_chld, true),
        ForkResult::Parent { child } => {
            if let Err(e) = drop_all() {
                write_record(report, Record::Failed(e));
                let _ = kill(child, Signal::SIGKILL);
            }
            serve(child, &watched)
        }
    }
}

/// In the payload, first: the caller's `SIGCHLD` disposition and signal `mask` back, its
/// `RLIMIT_NOFILE`, the seccomp filter (unless `install_filter` is false: it has the init's,
/// inherited) and the payload's capabilities.
fn payload_setup(
    p: &Prepared,
    mask: &SigSet,
    old_chld: &SigAction,
    install_filter: bool,
) -> Result<(), StepError> {
    // SAFETY: restores the disposition the caller had; no handler runs here.
    unsafe { sigaction(Signal::SIGCHLD, old_chld) }.at(Step::Signals)?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None).at(Step::Signals)?;
    if let Some(n) = p.open_files {
        let limit = libc::rlimit64 {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: prlimit64 on ourselves (pid 0) reads `limit`, which outlives the call.
        let r = unsafe { libc::prlimit64(0, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
        Errno::result(r).at(Step::Rlimits)?;
    }
    if install_filter {
        // Installed while the payload still holds CAP_SYS_ADMIN over the sandbox's user
        // namespace, so no_new_privs stays off (setuid programs keep working inside).
        seccomp::install(&p.seccomp).at(Step::Seccomp)?;
    }
    restrict_to_payload_set()
}

/// Where the payload's clone starts ([`clone_payload_and_serve`]): in the init's frame, which
/// the init never leaves (it serves from there until it exits) and never writes again.
struct PayloadStart<'a> {
    p: &'a Prepared,
    /// The write end of the setup report pipe (the payload's copy, by number).
    report: RawFd,
    mask: SigSet,
    old_chld: SigAction,
    run: *mut (dyn FnMut() -> i32 + 'a),
}

/// As [`fork_payload_and_serve`], for an init that is itself a `CLONE_VM` clone of the caller
/// ("A", `namespaces.rs`): the payload is one more clone sharing the same memory, on its own
/// stack (`stack_top`, at least a main thread's 8 MiB below it, with a guard page), and runs
/// `run` there, exiting with its value. So the only copy of the caller's page tables a sandbox
/// costs is the caller's own fork, and the payload does not fault in again, copy-on-write, the
/// pages the caller had already made its own. Returns only on a failure before the payload
/// exists; in the init, once it exists, never returns.
///
/// Why this is sound, with three tasks on one memory and one thread-local storage block:
/// - A waits for the setup report and then exits, making only raw system calls (`raw.rs`) from
///   before the init's clone on: it never runs Python again once the payload may (two
///   interpreters on one heap). It keeps every signal blocked meanwhile, so no handler of the
///   caller's runs on the payload's memory, and it has cleared its `clear_child_tid`, so that
///   its exit does not zero the `struct pthread`'s tid the payload now uses (below).
/// - The init, from the clone on, touches nothing but its own stack: every call below is a raw
///   system call, none of libc's (which would write `errno`, or the `struct pthread` once the
///   payload has threads) and none of std's thread-locals. It is under the payload's seccomp
///   filter (installed just before the clone, so the payload inherits that one filter) and
///   drops every capability, so that a payload able to write its memory (the same memory) gains
///   nothing by making the init run its code.
/// - The payload inherits A's thread pointer: glibc's `struct pthread` of A. glibc's `raise`,
///   `abort` and `pthread_kill(pthread_self())` ask the kernel for the tid (`gettid`) since 2.34
///   rather than trusting the cached one, but recursive and error-checking mutexes (the dynamic
///   loader's lock, taken by every `dlopen` of a Python extension) record and compare the cached
///   tid as their owner: so the kernel writes the payload's own tid there as it starts
///   (`CLONE_CHILD_SETTID` on `tid`, the address glibc gave the kernel as A's `clear_child_tid`).
///   `pthread_self()` is A's pointer, a valid one the payload alone uses from now on (CPython's
///   thread ident, re-read by `PyOS_AfterFork_Child`). `pthread_getattr_np` of the main thread
///   would describe the process's original stack, not the one the payload runs on; CPython
///   3.11 does not call it (its recursion limit is a counter). The kernel registers no rseq area
///   for a `CLONE_VM` child, so `sched_getcpu` reads A's last CPU, a hint only. glibc's fork
///   handlers do not run (this is no `fork`): A is single-threaded and holds no lock of libc's
///   while it waits, so there is nothing for them to reset.
/// - Signals: no `CLONE_SIGHAND`, so dispositions are the payload's own copy (the caller's
///   `SIGCHLD` restored); it gets the caller's mask, the init keeps every signal blocked and
///   takes them with `sigwait`; the payload's exit signal is `SIGCHLD` to the init, as a
///   fork's. Kill, freeze and thaw act on the cgroup's tasks, as before.
/// - Memory: the init and the payload share RSS (the cgroup charges each page once, as it did).
///   A core dump of the payload kills every user of its memory, the init included: the sandbox
///   then ends as it would when its payload dies.
pub(crate) fn clone_payload_and_serve(
    report: BorrowedFd<'_>,
    p: &Prepared,
    payload_mask: &SigSet,
    stack_top: *mut libc::c_void,
    tid: *mut libc::pid_t,
    run: *mut (dyn FnMut() -> i32 + '_),
) -> Result<std::convert::Infallible, StepError> {
    let mut watched = SigSet::empty();
    for s in FORWARDED {
        watched.add(s);
    }
    watched.add(Signal::SIGCHLD);
    // Every signal is blocked already (the init is born so); SIGCHLD's default disposition, as
    // in fork_payload_and_serve.
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing SIG_DFL involves no handler code.
    let old_chld = unsafe { sigaction(Signal::SIGCHLD, &default) }.at(Step::Signals)?;
    let start = PayloadStart {
        p,
        report: report.as_raw_fd(),
        mask: *payload_mask,
        old_chld,
        run,
    };
    // The filter first, in the init, so that the payload is born under it (a clone inherits the
    // filter itself, not a copy): one program loaded per sandbox, not one for each task (a load
    // is ~78 µs of CPU: the kernel compiles the program and emulates it for every call number to
    // cache the calls it always allows; see `seccomp.rs`, `search`).
    // Installed while the init still holds CAP_SYS_ADMIN over the sandbox's user namespace, so
    // no_new_privs stays off (setuid programs keep working inside); the clone below passes it
    // (no namespace flag; `clone`, not `clone3`).
    seccomp::install(&p.seccomp).at(Step::Seccomp)?;
    let settid = if tid.is_null() {
        0
    } else {
        libc::CLONE_CHILD_SETTID
    };
    // SAFETY: `stack_top` is the top of a mapping only the payload uses, 16-byte aligned;
    // payload_main never returns; `start` stays in this frame, unchanged, for the init's life
    // (serve never returns); `tid` is null or the struct pthread's tid word.
    let cloned = unsafe {
        libc::clone(
            payload_main,
            stack_top,
            libc::CLONE_VM | libc::SIGCHLD | settid,
            std::ptr::from_ref(&start).cast_mut().cast(),
            std::ptr::null_mut::<libc::pid_t>(),
            std::ptr::null_mut::<libc::c_void>(),
            tid,
        )
    };
    if cloned < 0 {
        return Err(StepError::new(Step::Fork, Errno::last()));
    }
    // From here on: raw system calls only (see above).
    let child = Pid::from_raw(cloned);
    if let Err(e) = drop_all() {
        write_record(report, Record::Failed(e));
        let _ = raw::kill(cloned, libc::SIGKILL);
    }
    std::hint::black_box(&start);
    serve(child, &watched)
}

/// The payload's clone (see [`clone_payload_and_serve`]): set up, then run the closure on this
/// stack and exit with its value. Never returns.
extern "C" fn payload_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is clone_payload_and_serve's `start`, which the init keeps, unchanged.
    let start = unsafe { &*arg.cast::<PayloadStart<'_>>() };
    match payload_setup(start.p, &start.mask, &start.old_chld, false) {
        Ok(()) => {
            // The payload's copy of the write end: A hears end of file once the init's is closed
            // too.
            let _ = raw::close(start.report);
            // SAFETY: the caller's closure, in its own (shared) memory, which nothing else runs
            // code on from now on: A only waits, raw, and exits; the init only serves, raw.
            let code = unsafe { (*start.run)() };
            exit_now(code)
        }
        Err(e) => {
            // SAFETY: the payload's copy of the write end, still open.
            write_record(
                unsafe { BorrowedFd::borrow_raw(start.report) },
                Record::Failed(e),
            );
            exit_now(1)
        }
    }
}

/// The init's loop. Raw system calls only (`raw.rs`): with the zygote, the init shares its memory
/// (and its `errno`) with the payload, which may already run.
fn serve(payload: Pid, watched: &SigSet) -> ! {
    let _ = raw::prctl(libc::PR_SET_NAME, INIT_NAME.as_ptr() as usize, 0, 0, 0);
    // Its own session, so a signal to the creating process's group never reaches the init.
    // SAFETY: takes no arguments.
    let _ = unsafe { raw::call(libc::SYS_setsid, &[]) };
    // SAFETY: a NUL-terminated path in static memory.
    let null = unsafe {
        raw::call(
            libc::SYS_openat,
            &[
                libc::AT_FDCWD as usize,
                c"/dev/null".as_ptr() as usize,
                libc::O_RDWR as usize,
                0,
            ],
        )
    };
    if let Ok(null) = null {
        for fd in 0..=2 {
            if fd != null {
                // SAFETY: integers only. dup3 (not dup2, which aarch64 lacks) refuses equal
                // numbers, hence the check.
                let _ = unsafe { raw::call(libc::SYS_dup3, &[null, fd, 0]) };
            }
        }
    }
    // Closes the setup report pipe (so the creator sees end of file) and anything inherited.
    let _ = close_from(3);

    // SAFETY: nix's SigSet is a libc sigset_t (repr(transparent)).
    let set: &libc::sigset_t = watched.as_ref();
    loop {
        match raw::sigwait(set) {
            Ok(libc::SIGCHLD) => {
                if let Some(code) = reap(payload) {
                    exit_now(code);
                }
            }
            Ok(sig) => {
                let _ = raw::kill(payload.as_raw(), sig);
            }
            Err(_) => {}
        }
    }
}

/// Reaps every exited child. Returns the exit code for the init once the payload is gone. Raw,
/// as [`serve`].
fn reap(payload: Pid) -> Option<i32> {
    loop {
        match raw::wait4(-1, libc::WNOHANG) {
            Ok((0, _)) => return None,
            Ok((pid, status)) if pid == payload.as_raw() => {
                if libc::WIFEXITED(status) {
                    return Some(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    return Some(SIGNALED_BASE + libc::WTERMSIG(status));
                }
            }
            Ok(_) | Err(Errno::EINTR) => continue,
            // No children at all: the payload is gone and we missed its status.
            Err(_) => return Some(SIGNALED_BASE + Signal::SIGKILL as i32),
        }
    }
}
