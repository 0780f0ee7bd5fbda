//! Enlarging a child's stdout pipe. A new pipe buffers 64 KiB (16 pages); a child that floods
//! stdout then blocks in `write(2)` every 64 KiB, and each time the reader thread and the child
//! trade places on the CPU. `fcntl(F_SETPIPE_SZ)` raises the buffer up to
//! `/proc/sys/fs/pipe-max-size` (1 MiB by default), so each wake-up moves up to 16 times more.
//! Measured end to end (256 MiB of `head -c … /dev/zero` through the agent to a Connect client,
//! same run): agent CPU 0.38 → 0.25–0.29 s, and fewer, fuller frames for the client.
//!
//! The cost is kernel memory, charged to the user who made the pipe: once that user holds more
//! than `/proc/sys/fs/pipe-user-pages-soft` (16384 pages, 64 MiB) in pipes, and lacks
//! `CAP_SYS_RESOURCE`/`CAP_SYS_ADMIN`, the kernel gives every new pipe of that user 2 pages and
//! refuses enlargements. So only a pipe that floods is enlarged (the reader thread asks at the
//! first read that fills its buffer), at most [`MAX_ENLARGED_PIPES`] at once, a quarter of that
//! budget; past it, or where the kernel refuses, a pipe keeps its default size, which works the
//! same, only with more wake-ups.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::{FcntlArg, fcntl};

/// Buffer asked for a child's stdout pipe: 1 MiB, the default `pipe-max-size` (a larger request
/// fails without `CAP_SYS_RESOURCE`), and the ring's default size, so one full pipe fills the ring.
pub const STDOUT_PIPE_BYTES: usize = 1 << 20;

/// Pipes enlarged at once, process-wide: 16 × 1 MiB is a quarter of the default per-user soft
/// limit (64 MiB), leaving the rest to the pipes the children themselves make (shell pipelines),
/// which would shrink to 2 pages past it.
const MAX_ENLARGED_PIPES: usize = 16;

static ENLARGED: AtomicUsize = AtomicUsize::new(0);

/// One enlarged pipe's share of [`MAX_ENLARGED_PIPES`], given back when dropped (keep it as long
/// as the pipe is open).
#[derive(Debug)]
pub(crate) struct Enlarged(());

impl Drop for Enlarged {
    fn drop(&mut self) {
        ENLARGED.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Asks the kernel for a [`STDOUT_PIPE_BYTES`] buffer on the pipe `fd` belongs to, if fewer than
/// [`MAX_ENLARGED_PIPES`] are enlarged now. `None` when not done (over budget, or refused: the
/// pipe keeps its size).
pub(crate) fn enlarge(fd: BorrowedFd<'_>) -> Option<Enlarged> {
    ENLARGED
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_ENLARGED_PIPES).then_some(n + 1)
        })
        .ok()?;
    let share = Enlarged(());
    let bytes = i32::try_from(STDOUT_PIPE_BYTES).unwrap_or(i32::MAX);
    fcntl(fd, FcntlArg::F_SETPIPE_SZ(bytes)).ok().map(|_| share)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn enlarges_at_most_the_budget_and_gives_shares_back() {
        // Other tests in this binary spawn processes (and enlarge their pipes) at the same time,
        // so only what holds whatever they do is asserted.
        let pipes: Vec<_> = (0..MAX_ENLARGED_PIPES + 2)
            .map(|_| nix::unistd::pipe().expect("pipe"))
            .collect();
        let shares: Vec<_> = pipes.iter().map(|(r, _)| enlarge(r.as_fd())).collect();
        assert!(shares.iter().filter(|s| s.is_some()).count() <= MAX_ENLARGED_PIPES);
        assert!(shares[MAX_ENLARGED_PIPES..].iter().all(Option::is_none));
        for ((read, _), share) in pipes.iter().zip(&shares) {
            let size = fcntl(read.as_fd(), FcntlArg::F_GETPIPE_SZ).expect("F_GETPIPE_SZ");
            let size = usize::try_from(size).expect("a size");
            assert_eq!(
                size == STDOUT_PIPE_BYTES,
                share.is_some(),
                "share {share:?}, size {size}"
            );
        }
        drop(shares);
        assert!(ENLARGED.load(Ordering::Acquire) <= MAX_ENLARGED_PIPES);
    }
}
