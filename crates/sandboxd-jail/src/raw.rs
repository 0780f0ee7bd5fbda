//! System calls made with the `syscall` instruction itself, never through libc.
//!
//! Why: since the zygote's sandboxes share one address space between three tasks ("A", the init
//! "B" and the payload "C", see `namespaces.rs`), they also share one thread-local storage block:
//! one `errno`, one glibc `struct pthread`, one set of malloc's per-thread caches. Once the payload
//! runs Python, the other two must not write any of it. A libc wrapper writes `errno` whenever a
//! call fails (and some, `prctl`'s probe past the last capability for one, fail on purpose); a
//! cancellation point may write the `struct pthread` once a thread exists. These do neither: the
//! result comes back in a register, a negative value being the error, and nothing but the caller's
//! stack is touched.
#![allow(unsafe_code)]

use nix::errno::Errno;

// The two architectures written below (both built: x86_64 natively, aarch64 with
// `cargo build --target aarch64-unknown-linux-gnu`); another needs its own `syscall6`.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("sandboxd-jail's raw system calls are written for x86_64 and aarch64 only");

/// One system call with up to six arguments; returns the kernel's raw result (`-errno` on
/// failure).
///
/// # Safety
/// The caller must pass arguments valid for `nr` (pointers to memory that outlives the call).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn syscall6(nr: i64, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the x86_64 Linux system call convention; rcx and r11 are clobbered by `syscall`.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// As the x86_64 version, with the aarch64 convention (`svc 0`, number in x8).
///
/// # Safety
/// As the x86_64 version.
#[cfg(target_arch = "aarch64")]
#[inline(always)]
pub(crate) unsafe fn syscall6(nr: i64, a: [usize; 6]) -> isize {
    let ret: isize;
    // SAFETY: the aarch64 Linux system call convention.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1],
            in("x2") a[2],
            in("x3") a[3],
            in("x4") a[4],
            in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

/// A raw result as `Result`: the kernel returns `-4095..=-1` for errors.
pub(crate) fn check(r: isize) -> Result<usize, Errno> {
    if (-4095..0).contains(&r) {
        Err(Errno::from_raw(-r as i32))
    } else {
        Ok(r as usize)
    }
}

/// `syscall6` with fewer arguments, checked.
///
/// # Safety
/// As [`syscall6`].
pub(crate) unsafe fn call(nr: i64, args: &[usize]) -> Result<usize, Errno> {
    let mut a = [0usize; 6];
    a[..args.len()].copy_from_slice(args);
    // SAFETY: forwarded to the caller.
    check(unsafe { syscall6(nr, a) })
}

/// `exit_group`: ends every thread of the calling process (one, in our uses) now.
pub(crate) fn exit_group(code: i32) -> ! {
    // SAFETY: takes an integer, never returns.
    unsafe { syscall6(libc::SYS_exit_group, [code as usize, 0, 0, 0, 0, 0]) };
    // Not reached; the kernel does not return from exit_group.
    #[allow(clippy::empty_loop)]
    loop {}
}

/// `write`, retried on `EINTR` until all of `buf` is written or it fails.
pub(crate) fn write_all(fd: i32, buf: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        // SAFETY: the kernel reads `rest.len()` bytes of `rest`, which outlives the call.
        match unsafe {
            call(
                libc::SYS_write,
                &[fd as usize, rest.as_ptr() as usize, rest.len()],
            )
        } {
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read` into `buf`.
pub(crate) fn read(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which outlives the call.
    unsafe {
        call(
            libc::SYS_read,
            &[fd as usize, buf.as_mut_ptr() as usize, buf.len()],
        )
    }
}

/// `close`.
pub(crate) fn close(fd: i32) -> Result<(), Errno> {
    // SAFETY: takes an integer.
    unsafe { call(libc::SYS_close, &[fd as usize]) }.map(drop)
}

/// `kill`.
pub(crate) fn kill(pid: i32, sig: i32) -> Result<(), Errno> {
    // SAFETY: takes integers.
    unsafe { call(libc::SYS_kill, &[pid as usize, sig as usize]) }.map(drop)
}

/// `prctl` with integer arguments only.
pub(crate) fn prctl(option: i32, a: usize, b: usize, c: usize, d: usize) -> Result<usize, Errno> {
    // SAFETY: the options we pass take integers (or, for PR_SET_NAME, a pointer the caller keeps
    // alive).
    unsafe { call(libc::SYS_prctl, &[option as usize, a, b, c, d]) }
}

/// `wait4(pid, &status, options, NULL)`: `(pid, status)`.
pub(crate) fn wait4(pid: i32, options: i32) -> Result<(i32, i32), Errno> {
    let mut status: i32 = 0;
    // SAFETY: the kernel writes one int into `status`, on our stack.
    let r = unsafe {
        call(
            libc::SYS_wait4,
            &[
                pid as usize,
                std::ptr::from_mut(&mut status) as usize,
                options as usize,
                0,
            ],
        )
    }?;
    Ok((r as i32, status))
}

/// Kernel sigset size for `rt_sig*` calls (the kernel's `sigset_t`, 64 signals).
const KERNEL_SIGSET: usize = 8;

/// `rt_sigtimedwait(set, NULL, NULL)`: takes one pending signal of `set` (which must be blocked),
/// waiting for one; returns its number.
pub(crate) fn sigwait(set: &libc::sigset_t) -> Result<i32, Errno> {
    // SAFETY: the kernel reads the first 8 bytes of `set` (a libc sigset_t is larger).
    unsafe {
        call(
            libc::SYS_rt_sigtimedwait,
            &[std::ptr::from_ref(set) as usize, 0, 0, KERNEL_SIGSET],
        )
    }
    .map(|s| s as i32)
}

/// `ppoll` on one descriptor for `POLLIN`, at most `timeout`; true when readable.
pub(crate) fn poll_in(fd: i32, timeout: std::time::Duration) -> Result<bool, Errno> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: one pollfd and one timespec on our stack; no signal mask change (NULL).
    let n = unsafe {
        call(
            libc::SYS_ppoll,
            &[
                std::ptr::from_mut(&mut pfd) as usize,
                1,
                std::ptr::from_ref(&ts) as usize,
                0,
                KERNEL_SIGSET,
            ],
        )
    }?;
    Ok(n > 0)
}
