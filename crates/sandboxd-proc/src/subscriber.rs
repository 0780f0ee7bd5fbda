//! One reader of a process's output: a cursor into the process's ring plus an eventfd that the
//! kernel reports readable when there is something new for this reader. While it lives, the
//! subscriber takes part in flow control: the process waits for it while it is the most advanced
//! reader or keeps reading, within the bounds of the stall timeout (see the crate docs). Falling
//! behind otherwise only loses the oldest output, reported as a [`Lag`](crate::Lag).

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use crate::fanout::ReaderId;
use crate::process::Inner;
use crate::ring::{Batch, Cursor};
use crate::wake::Waker;

/// Where a new subscriber starts reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// At the oldest chunk still in the ring: replays output produced before subscribing (all of
    /// it, unless more than the ring's budget was produced), then continues live.
    Oldest,
    /// At the next chunk to be produced: live output only.
    Now,
}

/// A reader of one process's output with its own cursor and wake-up fd.
///
/// Asyncio use: `loop.add_reader(sub.wake_fd(), cb)`; in `cb` call [`next_batch`](Self::next_batch)
/// (which also resets the fd). The fd is readable whenever `next_batch` would return something
/// (chunks, a lag or the end) and may occasionally be readable spuriously (an empty batch).
/// After the end has been returned, the fd stays readable. Blocking use: [`recv`](Self::recv).
///
/// Flow control: while the subscriber lives, the process's reader thread waits for it rather than
/// evict output it has not read, if it is the most advanced subscriber or keeps reading — unless
/// it leaves output unread for the stall timeout, or holds back a faster subscriber for the stall
/// timeout in total, after which it is [stalled](Self::is_stalled) for good. Dropping it (or
/// [`close`](Self::close)) unregisters it; the process is unaffected.
pub struct Subscriber {
    inner: Arc<Inner>,
    id: ReaderId,
    waker: Arc<Waker>,
    cursor: Cursor,
}

impl Subscriber {
    pub(crate) fn new(inner: Arc<Inner>, start: StartAt) -> std::io::Result<Subscriber> {
        let (id, waker, cursor) = inner.output.subscribe(start == StartAt::Oldest)?;
        // Readable from the start if there is already something to read. A push between
        // `subscribe` and the arming is caught by the `ready` check below.
        waker.reset_and_arm();
        if inner.output.ready(cursor) {
            waker.signal();
        }
        Ok(Subscriber {
            inner,
            id,
            waker,
            cursor,
        })
    }

    /// The next chunk this subscriber will read.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The pid of the process this subscriber reads.
    pub fn pid(&self) -> u32 {
        self.inner.pid_u32()
    }

    /// The eventfd that becomes readable when there is something for this subscriber
    /// (`EFD_CLOEXEC | EFD_NONBLOCK`; owned by the subscriber, valid while it lives).
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.waker.fd()
    }

    /// Returns everything available now (never blocks): a lag if output was evicted before this
    /// subscriber read it, then chunks up to `max_bytes` of payload (at least one chunk if any is
    /// available), then the end once all output has been read. Advances the cursor and resets the
    /// wake-up fd (re-signalling it at once if `Batch::more` or the end is set).
    pub fn next_batch(&mut self, max_bytes: usize) -> Batch {
        // Order matters: reset+arm first, read second. If a push lands after our read, the
        // producer sees `armed` (its swap is ordered after our store by the ring mutex) and
        // writes the fd; if it lands before, our read returns it.
        self.waker.reset_and_arm();
        let batch = self
            .inner
            .output
            .next_batch_for(self.id, self.cursor, max_bytes);
        self.cursor = batch.next;
        if batch.more || batch.end.is_some() {
            self.waker.signal();
        }
        batch
    }

    /// Blocks (without any Python-visible lock; this is plain Rust) until `next_batch` would
    /// return something or `timeout` passes (`None`: no limit). Returns whether something is ready.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        self.inner.output.wait_ready(self.cursor, timeout)
    }

    /// [`wait`](Self::wait) then [`next_batch`](Self::next_batch): an empty batch means the
    /// timeout passed.
    pub fn recv(&mut self, max_bytes: usize, timeout: Option<Duration>) -> Batch {
        self.wait(timeout);
        self.next_batch(max_bytes)
    }

    /// True once flow control has given up on this subscriber, because it left output unread for
    /// the stall timeout while the process waited for it, or held back a faster subscriber for the
    /// stall timeout in total. The process then never waits for it again, and it gets a
    /// [`Lag`](crate::Lag) whenever it falls a ring behind.
    pub fn is_stalled(&self) -> bool {
        self.inner.output.is_stalled(self.id)
    }

    /// Unregisters the subscriber and closes its wake-up fd; the same as dropping it.
    pub fn close(self) {}
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.inner.output.unsubscribe(self.id, &self.waker);
    }
}

impl fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber")
            .field("pid", &self.inner.pid_u32())
            .field("cursor", &self.cursor)
            .finish()
    }
}
