//! The few raw system calls `nix` does not wrap, each behind a safe function.
//!
//! What the kernel does here: `_exit` ends a process without running the parent's `atexit`
//! handlers or flushing its stdio buffers (a forked child must not flush the parent's buffered
//! output twice); `pidfd_open` gives a descriptor that becomes readable when a process exits, even
//! if it is not our child; `close_range` closes or marks close-on-exec a whole range of
//! descriptors in one call (Linux 5.9+).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

/// Ends the calling process now with `code`. Async-signal-safe.
pub(crate) fn exit_now(code: i32) -> ! {
    // exit_group, as _exit, without libc: the init exits while the payload may share its memory.
    crate::raw::exit_group(code)
}

/// Opens a pidfd for `pid` (Linux 5.3+).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `sig` to the process behind `pidfd` (Linux 5.1+): never to a newer process that reused
/// its number.
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes integers and a null siginfo (the kernel fills one in).
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Highest descriptor handled when `close_range` is missing (Linux < 5.9): the usual soft
/// `RLIMIT_NOFILE`. Descriptors above it are rare in a process that is about to become a sandbox.
const FALLBACK_MAX_FD: i32 = 1024;

/// Closes every descriptor from `first` up. Async-signal-safe.
pub(crate) fn close_from(first: u32) -> Result<(), Errno> {
    // Raw (`raw.rs`): the init closes them while the payload may share its memory.
    // SAFETY: close_range takes integers only; closing descriptors nobody else uses in this
    // (forked) process is harmless.
    let r = unsafe {
        crate::raw::call(
            libc::SYS_close_range,
            &[first as usize, u32::MAX as usize, 0],
        )
    };
    match r {
        Err(Errno::ENOSYS) => {
            for fd in first as i32..=FALLBACK_MAX_FD {
                // As above, one descriptor at a time; EBADF for unused numbers is fine.
                let _ = crate::raw::close(fd);
            }
            Ok(())
        }
        r => r.map(drop),
    }
}

/// Marks every descriptor from `first` up close-on-exec. Async-signal-safe.
pub(crate) fn cloexec_from(first: u32) -> Result<(), Errno> {
    // SAFETY: as above; CLOSE_RANGE_CLOEXEC only sets a flag on each descriptor.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    match Errno::result(r) {
        // ENOSYS: before Linux 5.9; EINVAL: 5.9/5.10 without the CLOEXEC flag (added in 5.11).
        Err(Errno::ENOSYS | Errno::EINVAL) => {
            for fd in first as i32..=FALLBACK_MAX_FD {
                // SAFETY: F_SETFD with an integer flag; EBADF for unused numbers is fine.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            }
            Ok(())
        }
        r => r.map(drop),
    }
}

/// `execve` with argument and environment arrays built before `fork` (each a null-terminated
/// array of pointers into C strings that outlive the call). Returns only on failure.
/// Async-signal-safe.
pub(crate) fn execve_prepared(
    program: &std::ffi::CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> Errno {
    if !(argv.last().is_some_and(|p| p.is_null()) && envp.last().is_some_and(|p| p.is_null())) {
        return Errno::EINVAL;
    }
    // SAFETY: program is a valid C string; argv and envp are null-terminated (checked above)
    // arrays of pointers to C strings the caller keeps alive for the duration of the call.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}
