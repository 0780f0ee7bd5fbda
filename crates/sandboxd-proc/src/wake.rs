//! A wake-up file descriptor for one subscriber. The kernel's eventfd is a 64-bit counter that
//! `poll(2)`/epoll report readable while it is non-zero, so an asyncio loop can `add_reader` it;
//! we write 1 to make it readable and read it to reset it.
//!
//! Writes are coalesced with an "armed" flag: the producer writes only when the subscriber has
//! declared (by arming) that it has caught up and is about to wait, so a fast producer costs one
//! eventfd write per wait cycle of each subscriber, not one per chunk.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::eventfd::{EfdFlags, EventFd};

/// An eventfd plus the armed flag that coalesces writes to it.
#[derive(Debug)]
pub(crate) struct Waker {
    fd: EventFd,
    /// True when the subscriber has read everything it was told about and wants the next
    /// notification. The producer swaps it to false before writing, so at most one write is
    /// outstanding per arming. SeqCst pairs with the ring mutex: see `Subscriber::next_batch`.
    armed: AtomicBool,
}

impl Waker {
    /// A new, unarmed, unreadable waker (`EFD_CLOEXEC | EFD_NONBLOCK`).
    pub(crate) fn new() -> io::Result<Waker> {
        let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(Waker {
            fd,
            armed: AtomicBool::new(false),
        })
    }

    /// Producer side: makes the fd readable if the subscriber is armed. Never blocks (the fd is
    /// non-blocking, and the counter cannot realistically reach its 2^64-2 limit).
    pub(crate) fn notify(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.signal();
        }
    }

    /// Makes the fd readable unconditionally (used when more data is already waiting).
    pub(crate) fn signal(&self) {
        let _ = self.fd.write(1);
    }

    /// Subscriber side: resets the fd to unreadable, then arms. The caller must read the ring
    /// *after* this, so that anything pushed after the read is guaranteed to notify.
    pub(crate) fn reset_and_arm(&self) {
        // EAGAIN (already unreadable) is the common case and is fine.
        let _ = self.fd.read();
        self.armed.store(true, Ordering::SeqCst);
    }

    /// The fd to poll for readability.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
