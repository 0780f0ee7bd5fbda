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
//! their full budgets). So a short-lived helper ("X") drops to the range's base id, `unshare`s
//! the user namespace and waits; the process that stays root on the host ("A") writes X's
//! `uid_map` and `gid_map` (multi-id maps need `CAP_SETUID`/`CAP_SETGID` in the parent namespace,
//! which X gave up), opens `/proc/<X>/ns/user`, and lets X exit. The open descriptor keeps the
//! namespace alive; A later `setns`es into it (`enter`) and becomes root inside.
//!
//! X keeps `CAP_SYS_ADMIN` (and nothing else) across its change of uid (`PR_SET_KEEPCAPS`), so the
//! creation counts as privileged: distributions that restrict *unprivileged* user namespaces
//! (Debian's `kernel.unprivileged_userns_clone=0`, Ubuntu's AppArmor
//! `apparmor_restrict_unprivileged_userns`) do not apply to it, while the namespace's owner, and so
//! the counters, are still the range's uid. X runs only this code, is not dumpable after its uid
//! change, and no process of its range exists yet to reach it.
//!
//! Everything here runs in A after `fork` (possibly of a multithreaded process): system calls on
//! bytes prepared before the fork, and ids changed with raw system calls, which affect only the
//! calling thread (glibc's wrappers would try to signal every thread of the process).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork, pipe2, write};

use crate::capabilities;
use crate::report::{AtStep, Record, Step, StepError, read_record, write_record};
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

/// `PR_SET_KEEPCAPS`: the permitted capabilities survive the next change from uid 0 to another.
fn keep_caps() -> Result<(), Errno> {
    // SAFETY: integer arguments only.
    Errno::result(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }).map(drop)
}

/// Creates a user namespace owned by host uid `base` whose ids 0-65535 map to `base..`, with
/// `map` (`"0 <base> 65536\n"`) as both its uid and gid map. Returns a descriptor of it and the
/// helper's pid, which the caller must reap (with `waitpid`) before it exits; the helper exits
/// on its own. Async-signal-safe; the caller must be host root.
pub(crate) fn create(
    base: u32,
    map: &[u8],
    deadline: Instant,
) -> Result<(OwnedFd, Pid), StepError> {
    let (ready_r, ready_w) = pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)?;
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)?;
    // SAFETY: the child ("X") makes only async-signal-safe calls and leaves through exit_now.
    match unsafe { fork() }.at(Step::Fork)? {
        ForkResult::Child => {
            drop(ready_r);
            drop(go_w);
            let made = keep_caps()
                .and_then(|()| become_ids(base))
                .and_then(|()| capabilities::set_only(1 << capabilities::CAP_SYS_ADMIN))
                .and_then(|()| unshare(CloneFlags::CLONE_NEWUSER));
            match made {
                Ok(()) => write_record(ready_w.as_fd(), Record::InitPid(0)),
                Err(e) => {
                    write_record(
                        ready_w.as_fd(),
                        Record::Failed(StepError::new(Step::UserNamespace, e)),
                    );
                    exit_now(1)
                }
            }
            // Stay until A has written the maps and opened the namespace (it then closes its end;
            // end of file here, also if A died).
            let mut b = [0u8; 1];
            while let Err(Errno::EINTR) = nix::unistd::read(&go_r, &mut b) {}
            exit_now(0)
        }
        ForkResult::Parent { child } => {
            drop(ready_w);
            drop(go_r);
            let fail = |e: StepError| {
                let _ = kill(child, Signal::SIGKILL);
                while let Err(Errno::EINTR) = waitpid(child, None) {}
                e
            };
            match read_record(ready_r.as_fd(), deadline) {
                Ok(Some(Record::InitPid(_))) => {}
                Ok(Some(Record::Failed(e))) => return Err(fail(e)),
                Ok(None) => return Err(fail(StepError::new(Step::UserNamespace, Errno::ECHILD))),
                Err(e) => return Err(fail(e)),
            }
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
    }
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
