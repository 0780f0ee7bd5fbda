//! Non-blocking descriptor I/O. With `O_NONBLOCK` the kernel returns `EAGAIN` instead of putting
//! the caller to sleep when a pipe or PTY is empty (read) or full (write); `poll(2)` then sleeps
//! until the descriptor is ready or a timeout passes. This is what lets a write to a child that
//! never reads its stdin give up after a bounded time instead of stranding the calling thread.
//!
//! [`read_chunk`] reads a pipe straight into the shared chunk the ring keeps: `ioctl(FIONREAD)`
//! says how many bytes the pipe holds, so the chunk is allocated at exactly that size and `read(2)`
//! fills it, instead of reading into a scratch buffer and copying the bytes out of it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Sets `O_NONBLOCK` on the open file description behind `fd`.
///
/// Only call it on descriptions we alone use (our end of a pipe, a PTY master): the flag is shared
/// by every descriptor that refers to the same description.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Writes all of `data` to the non-blocking `fd`, waiting in `poll(2)` while it is full, for at
/// most `timeout` in total. On timeout returns `ErrorKind::TimedOut` saying how much was written.
pub(crate) fn write_all(fd: BorrowedFd<'_>, data: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut written = 0;
    while written < data.len() {
        match nix::unistd::write(fd, &data[written..]) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "wrote {written} of {} bytes before the {timeout:?} timeout: the process is not reading its input",
                            data.len()
                        ),
                    ));
                }
                let ms = PollTimeout::try_from(left.max(Duration::from_millis(1)))
                    .unwrap_or(PollTimeout::MAX);
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                match poll(&mut fds, ms) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Bytes waiting in the pipe `fd` (`ioctl(FIONREAD)`); 0 when it is empty, at end-of-file, or the
/// call fails (then a plain `read` tells which).
#[allow(unsafe_code)]
fn available(fd: BorrowedFd<'_>) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one `int` through the pointer, which points at `count`, a live
    // `c_int`; `fd` is a valid open descriptor for the duration of the borrow.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut count) };
    if rc == 0 {
        usize::try_from(count).unwrap_or(0)
    } else {
        0
    }
}

/// Reads up to `max_bytes` from the non-blocking pipe `fd` into a new chunk of exactly the size
/// read: `Ok(None)` when the pipe holds nothing now (FIONREAD said 0), in which case the caller
/// reads as before, to learn whether it is empty (`EAGAIN`) or at its end (0).
#[allow(unsafe_code)]
pub(crate) fn read_chunk(fd: BorrowedFd<'_>, max_bytes: usize) -> nix::Result<Option<Arc<[u8]>>> {
    let want = available(fd).min(max_bytes);
    if want == 0 {
        return Ok(None);
    }
    let mut chunk = Arc::<[u8]>::new_uninit_slice(want);
    let Some(slots) = Arc::get_mut(&mut chunk) else {
        unreachable!("a new Arc has one owner")
    };
    loop {
        // SAFETY: `slots` is `want` bytes of writable memory owned by `chunk`, which nothing else
        // references yet; read(2) writes at most `want` bytes into it.
        let rc = unsafe { libc::read(fd.as_raw_fd(), slots.as_mut_ptr().cast(), want) };
        match usize::try_from(rc) {
            // SAFETY: the kernel initialised every one of the `want` bytes.
            Ok(n) if n == want => return Ok(Some(unsafe { chunk.assume_init() })),
            // A pipe with one reader holds at least what FIONREAD counted; should it still read
            // short, only the initialised prefix is kept (copied once).
            Ok(n) => {
                // SAFETY: the kernel initialised the first `n` bytes (`n < want`).
                let read: &[u8] = unsafe { std::slice::from_raw_parts(slots.as_ptr().cast(), n) };
                return Ok(if n == 0 { None } else { Some(Arc::from(read)) });
            }
            Err(_) => match Errno::last() {
                Errno::EINTR => {}
                errno => return Err(errno),
            },
        }
    }
}
