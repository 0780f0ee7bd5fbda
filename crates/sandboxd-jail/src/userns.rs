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
//! opens `/proc/<X>/ns/user`, lets X exit and reaps it. The open descriptor keeps the namespace
//! alive; A later `setns`es into it (`enter`) and becomes root inside.
//!
//! X only waits on a pipe, so it is cloned with `CLONE_VM` onto a small stack of its own: it shares
//! A's memory instead of copying A's page tables. A is often a fork of a large process (the Python
//! zygote, ~70 MiB), where a full fork and its teardown cost milliseconds of every create
//! (`docs/benchmarks.md`). X is born with every signal blocked and makes raw system calls only,
//! none that writes memory A uses; A reaps it before going on, so it is gone before any process of
//! the sandbox exists.
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{Pid, pipe2, write};

use crate::report::{AtStep, Step, StepError};

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

/// Bytes of stack for the helper X. Its whole life is [`helper_main`]: two raw system calls from
/// one small frame, plus glibc's `clone` trampoline. 16 KiB is several times that.
const HELPER_STACK_SIZE: usize = 16 * 1024;

/// X's stack: an anonymous mapping of its own for each X (a static buffer would be shared by two
/// threads of the runtime probing at once, see `check_idmapped_mounts`), unmapped once X is reaped.
struct HelperStack(*mut libc::c_void);

impl HelperStack {
    fn map() -> Result<HelperStack, Errno> {
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HELPER_STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        match p {
            libc::MAP_FAILED => Err(Errno::last()),
            p => Ok(HelperStack(p)),
        }
    }

    /// The top of the stack (stacks grow down), 16-byte aligned as a page-aligned mapping is.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of the mapping: `clone`'s initial stack pointer.
        unsafe { self.0.cast::<u8>().add(HELPER_STACK_SIZE).cast() }
    }
}

impl Drop for HelperStack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; X, the only user, has been reaped by now.
        unsafe { libc::munmap(self.0, HELPER_STACK_SIZE) };
    }
}

/// The kernel's `sigset_t` size for `rt_sigprocmask`: 64 signals, one bit each.
const KERNEL_SIGSET_BYTES: usize = 8;

/// X, on its own stack in A's memory: keep every signal blocked (it is born so, see [`create`]; no
/// handler inherited from A may run on memory shared with A), close its copy of the pipe's write end, wait until A closes its own (end
/// of file; also if A dies), and return, which exits. `arg` points to the pipe's two descriptors
/// (read end, write end) in A's frame, which outlives X; X has copies of A's descriptors, not A's
/// table, so it must close its copy of the write end itself. None of the calls can fail here (a
/// `read` with every signal blocked is not interrupted), so glibc's `syscall` never writes
/// `errno`, which lives in A's thread-local storage.
extern "C" fn helper_main(arg: *mut libc::c_void) -> libc::c_int {
    let all: u64 = !0;
    let mut byte = 0u8;
    // SAFETY: `arg` is `create`'s `pipe`, alive until X is reaped, and only read here; the system
    // calls use this stack's own variables, so nothing of A's memory is written.
    unsafe {
        let [read_end, write_end] = *arg.cast::<[RawFd; 2]>();
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            std::ptr::null::<u64>(),
            KERNEL_SIGSET_BYTES,
        );
        libc::syscall(libc::SYS_close, write_end);
        libc::syscall(libc::SYS_read, read_end, &mut byte as *mut u8, 1usize);
    }
    0
}

/// Creates a user namespace owned by host uid `base` whose ids 0-65535 map to `base..`, with
/// `map` (`"0 <base> 65536\n"`) as both its uid and gid map, and returns a descriptor of it. The
/// helper born in the namespace has exited and been reaped when this returns.
/// Async-signal-safe; the caller must be host root (and may be multithreaded: ids change on the
/// calling thread only, and X touches nothing but its own stack).
///
/// How: for the moment of one `clone(CLONE_NEWUSER | CLONE_VM)`, the caller's effective uid is
/// `base` (`SECBIT_NO_SETUID_FIXUP` keeps its capabilities meanwhile), so the kernel records `base`
/// as the new namespace's owner and charges its counters there; the helper ("X") the clone makes is
/// born in the namespace and only waits to be let go ([`helper_main`]). The namespace exists when
/// `clone` returns, so its maps are written at once, without waiting for X to run.
pub(crate) fn create(base: u32, map: &[u8]) -> Result<OwnedFd, StepError> {
    let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)?;
    // Both outlive X, which is reaped below before they go.
    let stack = HelperStack::map().at(Step::UserNamespace)?;
    let pipe: [RawFd; 2] = [go_r.as_raw_fd(), go_w.as_raw_fd()];
    set_securebits(SECBIT_NO_SETUID_FIXUP).at(Step::UserNamespace)?;
    // X is born with every signal blocked (a child inherits the calling thread's mask): until its
    // own mask is set, no handler of the caller's may run in X, on memory shared with the caller.
    // The caller's mask is back as soon as `clone` returns (as glibc's posix_spawn does it).
    let mut caller_mask = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut caller_mask),
    )
    .at(Step::UserNamespace)?;
    let cloned = set_euid(base).and_then(|()| {
        let flags = libc::CLONE_NEWUSER | libc::CLONE_VM | libc::SIGCHLD;
        // SAFETY: the stack is X's alone, its top 16-byte aligned as the ABIs require; X runs
        // helper_main, which only makes raw system calls on its own stack and returns (glibc's
        // trampoline then calls exit). `go_r` and the stack outlive X (it is reaped below).
        Errno::result(unsafe {
            libc::clone(
                helper_main,
                stack.top(),
                flags,
                std::ptr::from_ref(&pipe).cast_mut().cast(),
            )
        })
    });
    // A: host root again, in every id, with the usual securebits and its own signal mask.
    let restored = set_euid(0)
        .and_then(|()| set_securebits(0))
        .and_then(|()| pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&caller_mask), None));
    let child = Pid::from_raw(cloned.at(Step::UserNamespace)?);
    // Let X go (end of file on its pipe) and wait until it has exited.
    let release = move || {
        drop(go_w);
        while let Err(Errno::EINTR) = waitpid(child, None) {}
    };
    if let Err(e) = restored {
        release();
        return Err(StepError::new(Step::UserNamespace, e));
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
            release();
            return Err(StepError::new(Step::IdMap, e));
        }
    }
    let ns = open(
        proc_path(&mut buf, child, b"ns/user"),
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    release();
    drop((go_r, stack));
    ns.at(Step::UserNamespace)
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
