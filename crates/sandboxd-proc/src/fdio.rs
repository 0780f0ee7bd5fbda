//! Non-blocking descriptor I/O. With `O_NONBLOCK` the kernel returns `EAGAIN` instead of putting
//! the caller to sleep when a pipe or PTY is empty (read) or full (write); `poll(2)` then sleeps
//! until the descriptor is ready or a timeout passes. This is what lets a write to a child that
//! never reads its stdin give up after a bounded time instead of stranding the calling thread.

use std::io;
use std::os::fd::BorrowedFd;
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
