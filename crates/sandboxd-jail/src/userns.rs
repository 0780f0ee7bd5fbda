//! The sandbox's user namespace: uids and gids 0-65535 inside are the host's `base..base+65536`,
//! a range that belongs to this sandbox alone (see `idrange.rs`).
//!
//! What the kernel does here. A user namespace gives the processes in it their own view of ids
//! and capabilities that count only over namespaces it owns: root inside holds `CAP_SYS_ADMIN`
//! over its own mount and network namespaces, and nothing over the host's. Files keep their host
//! owners (`base + uid`), and every per-user kernel counter and object is keyed by the host id:
//! keyrings, key quotas, `RLIMIT_NPROC`, inotify instances and watches.
//!
//! *Who creates the namespace matters.* The kernel charges per-user counters ("ucounts": inotify
//! instances and watches, user namespaces, `RLIMIT_NPROC`, pending signals, message queues, locked
//! memory) at every level of the user-namespace tree: in the sandbox's namespace to the uid inside,
//! and in the parent to *the namespace's creator*. A namespace created by host root would charge
//! every sandbox's inotify instances to host root, so 128 `inotify_init`s in one sandbox would
//! exhaust host root's `fs.inotify.max_user_instances` for the host and every other sandbox
//! (measured: exactly that happens; with the creator below, the host and other sandboxes keep
//! their full budgets). So the process that builds the sandbox ("A", host root) takes the range's
//! base id as its effective uid for the moment of one `clone(CLONE_NEWUSER)`, which creates the
//! namespace with that owner and a short-lived helper ("X") in it; A, root again, writes X's
//! `uid_map` and `gid_map` (multi-id maps need `CAP_SETUID`/`CAP_SETGID` in the parent namespace),
//! opens `/proc/<X>/ns/user`, and lets X exit. The open descriptor keeps the namespace alive; A
//! later `setns`es into it (`enter`) and becomes root inside.
//!
//! A keeps its capabilities across that change of effective uid (`SECBIT_NO_SETUID_FIXUP`), so
//! the creation counts as privileged: distributions that restrict *unprivileged* user namespaces
//! (Debian's `kernel.unprivileged_userns_clone=0`, Ubuntu's AppArmor
//! `apparmor_restrict_unprivileged_userns`) do not apply to it, while the namespace's owner, and so
//! the counters, are still the range's uid. No process of the range exists yet to reach A meanwhile.
//!
//! Everything here runs in A after `fork` (possibly of a multithreaded process): system calls on
//! bytes prepared before the fork, and ids changed with raw system calls, which affect only the
//! calling thread (glibc's wrappers would try to signal every thread of the process).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, pipe2, write};

use crate::report::{AtStep, Step, StepError};
use crate::sys::exit_now;

/// Longest `/proc/<pid>/<leaf>` path built here: "/proc/" + 10 digits + "/" + the leaf.
const PROC_PATH_MAX: usize = 48;

/// `/proc/<pid>/<leaf>` as a C string in `buf`, without allocating.
fn proc_path<'a>(buf: &'a mut [u8; PROC_PATH_MAX], pid: Pid, leaf: &[u8]) -> &'a CStr {
    let mut digits = [0u8; 10];
    let mut n = pid.as_raw().unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut i = 0;
    for b in b"/proc/" {
        buf[i] = *b;
        i += 1;
    }
    for d in digits[..len].iter().rev() {
        buf[i] = *d;
        i += 1;
    }
    buf[i] = b'/';
    i += 1;
    for b in leaf.iter().take(PROC_PATH_MAX - i - 1) {
        buf[i] = *b;
        i += 1;
    }
    buf[i] = 0;
    CStr::from_bytes_until_nul(&buf[..=i]).unwrap_or(c"/")
}

/// `setgroups(0, NULL)`, `setresgid(id, id, id)`, `setresuid(id, id, id)` as raw system calls on
/// the calling thread only. Async-signal-safe.
pub(crate) fn become_ids(id: u32) -> Result<(), Errno> {
    // SAFETY: setgroups with a zero count never reads the (null) list; setresgid/setresuid take
    // integers. Raw syscalls touch only this thread's credentials, which is all there is here.
    unsafe {
        Errno::result(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        Errno::result(libc::syscall(libc::SYS_setresgid, id, id, id))?;
        Errno::result(libc::syscall(libc::SYS_setresuid, id, id, id))?;
    }
    Ok(())
}

/// `SECBIT_NO_SETUID_FIXUP` (linux/securebits.h): changing uids leaves capabilities alone.
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// Sets the calling thread's effective uid only (`setresuid(-1, euid, -1)`), raw. Async-signal-safe.
fn set_euid(euid: u32) -> Result<(), Errno> {
    // SAFETY: integer arguments; -1 (as u32::MAX) leaves the real and saved uids alone.
    Errno::result(unsafe { libc::syscall(libc::SYS_setresuid, u32::MAX, euid, u32::MAX) }).map(drop)
}

/// Sets the calling thread's securebits. Async-signal-safe.
fn set_securebits(bits: libc::c_ulong) -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) }).map(drop)
}

/// Creates a user namespace owned by host uid `base` whose ids 0-65535 map to `base..`, with
/// `map` (`"0 <base> 65536\n"`) as both its uid and gid map. Returns a descriptor of it and the
/// pid of the helper born in it, which the caller must reap (with `waitpid`) before it exits; the
/// helper exits once this returns. Async-signal-safe; the caller must be host root.
///
/// How: for the moment of one `clone(CLONE_NEWUSER)`, the caller's effective uid is `base`
/// (`SECBIT_NO_SETUID_FIXUP` keeps its capabilities meanwhile), so the kernel records `base` as the
/// new namespace's owner and charges its counters there; the helper ("X") the clone makes is born
/// in the namespace and only waits to be let go. The namespace exists when `clone` returns, so its
/// maps are written at once, without waiting for X to run.
pub(crate) fn create(base: u32, map: &[u8]) -> Result<(OwnedFd, Pid), StepError> {
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)?;
    set_securebits(SECBIT_NO_SETUID_FIXUP).at(Step::UserNamespace)?;
    let cloned = set_euid(base).and_then(|()| {
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: a raw clone with no new stack is a fork: the child continues on a copy of this
        // stack, makes only raw system calls and leaves through exit_now.
        Errno::result(unsafe {
            libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize)
        })
    });
    if cloned == Ok(0) {
        // X: in the new namespace. Wait until A has written the maps and opened the namespace
        // (it then closes its end: end of file here, also if A died).
        drop(go_w);
        let mut b = [0u8; 1];
        while let Err(Errno::EINTR) = nix::unistd::read(&go_r, &mut b) {}
        exit_now(0)
    }
    // A: host root again, in every id, with the usual securebits.
    let restored = set_euid(0).and_then(|()| set_securebits(0));
    drop(go_r);
    let child = Pid::from_raw(cloned.at(Step::UserNamespace)? as i32);
    let fail = |e: StepError| {
        let _ = kill(child, Signal::SIGKILL);
        while let Err(Errno::EINTR) = waitpid(child, None) {}
        e
    };
    restored.map_err(|e| fail(StepError::new(Step::UserNamespace, e)))?;
    let mut buf = [0u8; PROC_PATH_MAX];
    for leaf in [&b"uid_map"[..], &b"gid_map"[..]] {
        let written = open(
            proc_path(&mut buf, child, leaf),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .and_then(|f| write(&f, map));
        if let Err(e) = written {
            return Err(fail(StepError::new(Step::IdMap, e)));
        }
    }
    let ns = open(
        proc_path(&mut buf, child, b"ns/user"),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fail(StepError::new(Step::UserNamespace, e)))?;
    drop(go_w); // X exits.
    Ok((ns, child))
}

/// Moves the calling (single-threaded) process into the user namespace `ns` and makes it root
/// there: uid and gid 0 inside (the range's base on the host), no supplementary groups, every
/// capability over the namespaces that namespace owns and none over the host's.
/// Async-signal-safe.
pub(crate) fn enter(ns: &OwnedFd) -> Result<(), StepError> {
    setns(ns, CloneFlags::CLONE_NEWUSER).at(Step::EnterUserNamespace)?;
    become_ids(0).at(Step::EnterUserNamespace)
}

/// Wraps a raw descriptor returned by a system call.
pub(crate) fn owned(fd: libc::c_long) -> Result<OwnedFd, Errno> {
    let fd = Errno::result(fd)?;
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_paths_are_built_without_allocating() {
        let mut buf = [0u8; PROC_PATH_MAX];
        assert_eq!(
            proc_path(&mut buf, Pid::from_raw(1), b"uid_map"),
            c"/proc/1/uid_map"
        );
        assert_eq!(
            proc_path(&mut buf, Pid::from_raw(4_194_304), b"ns/user"),
            c"/proc/4194304/ns/user"
        );
    }
}
