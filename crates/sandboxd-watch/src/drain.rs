//! Reading a watcher's kernel queue as fast as the kernel fills it, on a thread of its own.
//!
//! The kernel queues at most `fs.inotify.max_queued_events` (16384 by default) events per inotify
//! instance and drops the rest, saying only `IN_Q_OVERFLOW`. A process that creates files at the
//! kernel's pace (a `git checkout`, `tar x`, `seq 1 10000 | xargs touch`: 200-300k events/s on two
//! cores) fills that queue in well under 100 ms, so a reader that shares its thread with anything
//! else (an event loop encoding and sending the previous events) loses some. A [`Drainer`] reads the
//! queue on a dedicated thread the moment the kernel makes it readable, handles the events (the
//! watcher's tree, new directories watched and scanned) and keeps the resulting items in a buffer
//! bounded by **bytes** (names included), not by a small event count, from which the consumer takes
//! them at its own pace. The consumer waits on an eventfd ([`Drainer::as_raw_fd`]) that is readable
//! while items are buffered, so asyncio can `add_reader` it.
//!
//! A consumer that waits on an event loop can also take the kernel queue over while it waits
//! ([`Drainer::park`]): the thread then stops polling the kernel, the loop polls the inotify
//! descriptor itself ([`Drainer::kernel_fd`]) and reads it with [`Drainer::read_kernel`], one
//! `read(2)` at a time, so an event wakes one thread instead of two (the drain thread, then the
//! loop through the eventfd). The thread takes over again ([`Drainer::unpark`]) whenever the
//! consumer stops waiting for long, and by itself on a backlog ([`HANDBACK_ITEMS`]) or on events
//! that can be costly to handle (a directory appearing or going, an overflow), so the kernel
//! queue is still read at the kernel's pace and no walk of the tree runs on the loop. And it keeps
//! an eye on a parked queue: one that stays readable and unread for [`TAKEOVER_AFTER`] (the loop
//! busy with something else, or off the CPU) is taken back, so a burst does not overflow the kernel
//! queue while nobody reads it; an idle watch never wakes the thread.
//!
//! Loss still has one cause left, a consumer that stays behind by more than the buffer holds: the
//! events past the bound are dropped, counted and reported in place as an [`Item::Overflow`], as the
//! watcher's own pending cap does, and watching goes on.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::error::WatchError;
use crate::event::Item;
use crate::watcher::Watcher;

/// Default bound on the bytes a drainer buffers for its consumer: 16 MiB, about 200 000 events with
/// short names (each costs its name plus [`ITEM_OVERHEAD_BYTES`]), that is a dozen full kernel
/// queues. A consumer that reads as fast as it is given events never comes near it; one that stops
/// reading costs at most this much before its events are dropped (and reported as lost).
pub const DEFAULT_BUFFER_BYTES: usize = 16 << 20;

/// What a buffered item costs beyond its name: the `Item` itself (32 bytes), the name's heap
/// allocation header and rounding, and the deque slot.
pub const ITEM_OVERHEAD_BYTES: usize = 64;

/// Items one [`Drainer::read_kernel`] may bring before it hands the queue back to the thread: more
/// means a burst is under way, which the thread reads at the kernel's pace while the consumer
/// sends what it has. At the ~200 µs of agent CPU measured per lone event (events in a batch cost
/// far less), 64 events keep the consumer from the kernel for ~13 ms at most, well inside what the
/// kernel queue holds at full pace (16384 events at 300k/s is ~55 ms).
pub const HANDBACK_ITEMS: usize = 64;

/// How long a parked consumer may leave a readable kernel queue unread before the thread takes it
/// over (see [`Drainer::park`]). A consumer that is merely alive reads within a few hundred
/// microseconds of an event; one that has not read for this long is busy with something else or
/// off the CPU (a loaded host), and at the kernel's full pace the queue lasts ~55 ms (16384 events
/// at 300k/s), so two of these (the worst case, see `run`) plus the thread's own wake-up leave a
/// wide margin. The thread wakes every `TAKEOVER_AFTER` only while the queue is readable or was
/// read since its last look, never while the watch is idle.
pub const TAKEOVER_AFTER: Duration = Duration::from_millis(5);

/// Looks at a quiet queue (neither read nor readable since the last look) before the drain thread
/// waits for the next event instead of looking again (see `run`). Events that come every few
/// milliseconds (a shell loop, an editor saving) then keep the thread on its timer, woken apart from
/// them, rather than woken by each one at the moment the consumer is; a watch that goes quiet
/// costs this many wake-ups more, then none.
const QUIET_LOOKS: u32 = 2;

/// Stack of the drain thread. It handles events and walks new directories iteratively (no
/// recursion), so a small stack is enough; the default 2 MiB would be mapped for nothing.
const DRAIN_STACK_BYTES: usize = 256 << 10;

/// A [`Watcher`] whose kernel queue is drained on a thread of its own into a byte-bounded buffer.
///
/// Take items with [`take`](Drainer::take) when its file descriptor is readable; call
/// [`sync`](Drainer::sync) to have everything the kernel holds right now handled (new directories
/// watched) before an operation that depends on it. Dropping it stops the thread and removes every
/// watch.
pub struct Drainer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the drain thread and the consumer share.
struct Shared {
    /// Invariant: held while the kernel queue is read and its items appended, so items enter the
    /// buffer in kernel order whoever reads (the thread, or a consumer's `sync`). Lock order:
    /// `watcher`, then `buffer`.
    watcher: Mutex<Watcher>,
    /// Invariant: `wake` is readable exactly when `items` is non-empty or `failed` is set (both
    /// changed only with this lock held), except for items a parked consumer read itself with
    /// [`Drainer::read_kernel`] (it knows they are there). Held only for memory moves, never across a syscall that
    /// can block.
    buffer: Mutex<Buffer>,
    /// The consumer's eventfd.
    wake: EventFd,
    /// Written once by `Drop` to stop the thread.
    stop: EventFd,
    /// Written to make the thread look at `parked` again.
    control: EventFd,
    /// Set while the consumer reads the kernel queue itself (see [`Drainer::park`]): the thread
    /// then does not poll the inotify descriptor.
    parked: AtomicBool,
    /// The watcher's inotify descriptor (owned by the watcher), for a consumer that polls it.
    kernel_fd: RawFd,
    /// Set while the watcher holds events a parked consumer's read left for the thread (changed
    /// only with the `watcher` lock held): the thread handles them even if the consumer has parked
    /// it again meanwhile, since the kernel will not make its descriptor readable for them.
    handoff: AtomicBool,
    /// Set once the watched directory is gone (its `Closed` item is buffered); readable without
    /// waiting for a drain in progress.
    closed: AtomicBool,
    /// Reads of the kernel queue made by anyone but the thread (a parked consumer's
    /// [`Drainer::read_kernel`], a [`Drainer::sync`]): the thread, watching a parked consumer,
    /// takes the queue over when this has not moved for [`TAKEOVER_AFTER`] while the queue was
    /// readable.
    reads: AtomicU64,
    /// How many times the thread took the queue from a consumer that had left it unread.
    takeovers: AtomicU64,
}

/// Items waiting for the consumer.
struct Buffer {
    items: VecDeque<Item>,
    /// Bytes charged for `items` (names plus [`ITEM_OVERHEAD_BYTES`] each).
    bytes: usize,
    /// The bound on `bytes`; control items (overflow, closed) are always admitted.
    cap: usize,
    /// Events dropped since the buffer filled, reported as one `Overflow` once there is room.
    dropped: u64,
    /// An error met while draining (a new directory that could not be watched), for the next take.
    failed: Option<WatchError>,
    /// Whether `wake` was written and not read since: a take that empties the buffer reads it only
    /// then. Items a parked consumer read itself come without a write, and a `read(2)` of the
    /// eventfd for nothing cost each of their takes a syscall (two an event: the stream takes
    /// until a take comes back empty).
    signalled: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Buffer {
    fn cost(item: &Item) -> usize {
        ITEM_OVERHEAD_BYTES + item.as_event().map_or(0, |event| event.name.len())
    }

    /// Appends a batch, dropping (and counting) events past the bound.
    fn extend(&mut self, batch: Vec<Item>) {
        for item in batch {
            let cost = Self::cost(&item);
            if let Item::Event(_) = item {
                if self.dropped > 0 || self.bytes + cost > self.cap {
                    self.dropped += 1;
                    continue;
                }
            } else {
                self.flush_dropped();
            }
            self.bytes += cost;
            self.items.push_back(item);
        }
    }

    fn flush_dropped(&mut self) {
        if self.dropped > 0 {
            self.items.push_back(Item::Overflow {
                dropped_hint: Some(self.dropped),
            });
            self.bytes += ITEM_OVERHEAD_BYTES;
            self.dropped = 0;
        }
    }

    fn take(&mut self, max_items: usize) -> Vec<Item> {
        if self.items.len() < max_items {
            // Everything goes, so there is room again: the loss is reported where it happened,
            // after the events before it and before anything read later.
            self.flush_dropped();
        }
        let n = max_items.min(self.items.len());
        let taken: Vec<Item> = self.items.drain(..n).collect();
        self.bytes -= taken.iter().map(Self::cost).sum::<usize>();
        if self.items.is_empty() {
            self.flush_dropped(); // for the next take (the descriptor stays readable)
        }
        taken
    }
}

impl Shared {
    /// Reads everything the kernel holds now and buffers the items; with `until_parked`, stops
    /// early once the consumer has taken the queue over. Returns whether draining is over: the
    /// watched directory is gone (its `Closed` item is buffered), or reading the instance failed
    /// (the error is buffered).
    fn drain(&self, until_parked: bool) -> bool {
        let mut watcher = lock(&self.watcher);
        loop {
            let result = watcher.read_batch();
            self.handoff
                .store(watcher.holds_events(), Ordering::Release);
            if let Some(over) = self.deliver(&watcher, result, true) {
                return over;
            }
            if until_parked
                && self.parked.load(Ordering::Acquire)
                && !self.handoff.load(Ordering::Acquire)
            {
                return false;
            }
        }
    }

    /// Buffers the result of one read and, with `wake`, wakes the consumer if the buffer was idle.
    /// Returns `None` if items were read (the caller may read again), else whether draining is
    /// over (see [`drain`](Shared::drain)).
    fn deliver(
        &self,
        watcher: &Watcher,
        result: Result<Vec<Item>, WatchError>,
        wake: bool,
    ) -> Option<bool> {
        let mut buffer = lock(&self.buffer);
        let was_idle = buffer.items.is_empty() && buffer.failed.is_none();
        let over = match result {
            Ok(batch) if batch.is_empty() => {
                let closed = watcher.is_closed();
                self.closed.store(closed, Ordering::Release);
                return Some(closed);
            }
            Ok(batch) => {
                buffer.extend(batch);
                // Before the wake-up: whoever takes the `Closed` item finds `is_closed` true.
                if watcher.is_closed() {
                    self.closed.store(true, Ordering::Release);
                }
                false
            }
            Err(err) => {
                // A directory that could not be watched leaves the rest watched; an error
                // reading the instance itself ends draining.
                let fatal = matches!(err, WatchError::Io(_));
                buffer.failed.get_or_insert(err);
                fatal
            }
        };
        if wake && was_idle && (!buffer.items.is_empty() || buffer.failed.is_some()) {
            let _ = self.wake.write(1);
            buffer.signalled = true;
        }
        over.then_some(true)
    }

    /// Makes `wake` unreadable again if it was written (the buffer is empty and has no error).
    fn unsignal(&self, buffer: &mut Buffer) {
        if buffer.signalled {
            let _ = self.wake.read();
            buffer.signalled = false;
        }
    }

    fn set_parked(&self, parked: bool) {
        if self.parked.swap(parked, Ordering::AcqRel) != parked {
            let _ = self.control.write(1);
        }
    }
}

impl Drainer {
    /// Watches `root` (see [`Watcher::new`]) and starts draining it, buffering at most
    /// `buffer_bytes` (see [`DEFAULT_BUFFER_BYTES`]). The initial walk runs in the caller's thread.
    pub fn new(root: &Path, recursive: bool, buffer_bytes: usize) -> Result<Drainer, WatchError> {
        let watcher = Watcher::new(root, recursive)?;
        // The thread polls its own descriptor for the same inotify instance, so it never needs the
        // watcher's lock to wait.
        let inotify = watcher
            .as_fd()
            .try_clone_to_owned()
            .map_err(WatchError::Io)?;
        let kernel_fd = watcher.as_raw_fd();
        let flags = EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK;
        let shared = Arc::new(Shared {
            watcher: Mutex::new(watcher),
            buffer: Mutex::new(Buffer {
                items: VecDeque::new(),
                bytes: 0,
                cap: buffer_bytes.max(ITEM_OVERHEAD_BYTES),
                dropped: 0,
                failed: None,
                signalled: false,
            }),
            wake: EventFd::from_flags(flags).map_err(io_error)?,
            stop: EventFd::from_flags(flags).map_err(io_error)?,
            control: EventFd::from_flags(flags).map_err(io_error)?,
            parked: AtomicBool::new(false),
            kernel_fd,
            handoff: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            reads: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
        });
        let epoll = epoll_set(&shared, &inotify)?;
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("watch-drain".into())
            .stack_size(DRAIN_STACK_BYTES)
            .spawn(move || run(&for_thread, &epoll, &inotify))
            .map_err(WatchError::Io)?;
        Ok(Drainer {
            shared,
            thread: Some(thread),
        })
    }

    /// The consumer's eventfd: readable while items (or an error) are waiting. Owned by the drainer.
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.wake.as_fd().as_raw_fd()
    }

    /// Handles everything the kernel holds right now (the thread may not have woken yet), so that a
    /// directory created before this call is watched when it returns.
    pub fn sync(&self) {
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        self.shared.drain(false);
    }

    /// The watcher's inotify descriptor, readable while the kernel holds events; for a consumer
    /// that reads the queue itself while parked (see [`park`](Drainer::park)). Owned by the drainer.
    pub fn kernel_fd(&self) -> RawFd {
        self.shared.kernel_fd
    }

    /// The consumer takes the kernel queue over: it polls [`kernel_fd`](Drainer::kernel_fd) as well
    /// as the eventfd, and calls [`read_kernel`](Drainer::read_kernel) when it is readable. The
    /// thread stops reading the kernel (after the read it may be in) but keeps an eye on it: the
    /// first event after a quiet spell wakes it once (its wait entry is behind the consumer's, see
    /// `run`), and while the queue stays busy it looks every [`TAKEOVER_AFTER`]; when the queue has
    /// been readable and unread by the consumer for that long, the thread unparks itself and drains
    /// (the consumer is busy with something else, or off the CPU). The consumer then finds itself
    /// unparked ([`read_kernel`](Drainer::read_kernel) returns false, [`is_parked`](Drainer::is_parked)
    /// says so) and may park again. A consumer should still [`unpark`](Drainer::unpark) when it
    /// knows it will stop waiting for long: the take-over is the safety net, not the plan.
    pub fn park(&self) {
        self.shared.set_parked(true);
    }

    /// The thread reads the kernel queue again (the default).
    pub fn unpark(&self) {
        self.shared.set_parked(false);
    }

    /// How many times the thread took the kernel queue from a parked consumer that had left it
    /// readable and unread for [`TAKEOVER_AFTER`] (see [`park`](Drainer::park)).
    pub fn takeovers(&self) -> u64 {
        self.shared.takeovers.load(Ordering::Relaxed)
    }

    /// Whether the consumer holds the kernel queue (see [`park`](Drainer::park)).
    pub fn is_parked(&self) -> bool {
        self.shared.parked.load(Ordering::Acquire)
    }

    /// For a parked consumer whose [`kernel_fd`](Drainer::kernel_fd) is readable: one bounded
    /// read of the kernel queue into the buffer (take the items with [`take`](Drainer::take); the
    /// eventfd is not written for them, the caller knows).
    /// Hands the queue back to the thread (unparks) when the read brought more than
    /// [`HANDBACK_ITEMS`], or events that can be costly to handle (left for the thread), or an
    /// error; and, without reading, when the thread is still reading (it may be walking a new
    /// directory for long: a consumer that kept the queue would find the descriptor readable again
    /// at once and spin until the walk ends). Its items come through the eventfd; a consumer should
    /// park again only once that has fired.
    /// Returns whether the consumer still holds the queue.
    pub fn read_kernel(&self) -> bool {
        if !self.is_parked() {
            return false;
        }
        self.shared.reads.fetch_add(1, Ordering::Relaxed);
        let mut watcher = match self.shared.watcher.try_lock() {
            Ok(watcher) => watcher,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.unpark();
                return false;
            }
        };
        let keep = match watcher.read_light() {
            Ok(Some(batch)) => {
                let keep = batch.len() <= HANDBACK_ITEMS;
                self.shared.deliver(&watcher, Ok(batch), false);
                keep
            }
            Ok(None) => {
                // Held for the thread: it must handle them even if this consumer parks it again
                // before it runs.
                self.shared.handoff.store(true, Ordering::Release);
                false
            }
            Err(err) => {
                self.shared.deliver(&watcher, Err(err), false);
                false
            }
        };
        drop(watcher);
        if !keep {
            self.unpark();
        }
        keep
    }

    /// Takes up to `max_items` buffered items, oldest first, without blocking (empty if there are
    /// none). An error met while draining is returned once, by itself; the items stay for the next
    /// call.
    pub fn take(&self, max_items: usize) -> Result<Vec<Item>, WatchError> {
        let mut buffer = lock(&self.shared.buffer);
        if let Some(err) = buffer.failed.take() {
            if buffer.items.is_empty() {
                self.shared.unsignal(&mut buffer);
            }
            return Err(err);
        }
        let items = buffer.take(max_items);
        if buffer.items.is_empty() {
            self.shared.unsignal(&mut buffer);
        }
        Ok(items)
    }

    /// Waits until items are buffered or `timeout` passes (`None`: no limit), then takes them all
    /// (empty on timeout). Meant to be called without the GIL and with a bounded timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Vec<Item>, WatchError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let items = self.take(usize::MAX)?;
            if !items.is_empty() || self.is_closed() {
                return Ok(items);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) || !wait_readable(&self.shared.wake, left)? {
                return Ok(Vec::new());
            }
        }
    }

    /// Whether the watched directory is gone (its `Closed` item was buffered).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// How many directories hold a watch now.
    pub fn watch_count(&self) -> usize {
        lock(&self.shared.watcher).watch_count()
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        let _ = self.shared.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl AsFd for Drainer {
    /// The consumer's eventfd (see [`Drainer::as_raw_fd`]).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer")
            .field("fd", &self.as_raw_fd())
            .finish_non_exhaustive()
    }
}

/// Tokens of the drain thread's epoll set.
const STOP: u64 = 0;
const CONTROL: u64 = 1;
const KERNEL: u64 = 2;

/// How the drain thread's epoll set holds the kernel descriptor.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KernelInterest {
    /// Level-triggered: the thread reads the queue (not parked).
    Read,
    /// One-shot, armed: the consumer reads the queue; the first event wakes the thread once.
    Watch,
    /// One-shot, fired: the thread looks every [`TAKEOVER_AFTER`] instead of at every event.
    Fired,
}

/// The drain thread: waits for the kernel (or the stop signal) and drains, until stopped or the
/// watched directory is gone; while the consumer is parked, watches that it keeps reading.
///
/// An epoll set, not `poll(2)`, so that the kernel descriptor's wait entry is made once and stays:
/// entries are woken newest first, and the consumer's (registered at each park) is then ahead of
/// the thread's, so the thread's wake-up never delays the consumer's on a lone event. And one-shot
/// while parked, so that a busy queue wakes the thread at most once per [`TAKEOVER_AFTER`], not
/// once per event: the kernel skips a fired one-shot entry in its wake-up loop.
fn run(shared: &Shared, epoll: &Epoll, inotify: &OwnedFd) {
    let mut interest = KernelInterest::Read;
    // While parked and the queue busy: the consumer's read count at the thread's last look.
    let mut watching: Option<u64> = None;
    // Quiet looks in a row while watching (see QUIET_LOOKS).
    let mut quiet = 0;
    let mut events = [EpollEvent::empty(); 3];
    loop {
        let parked = shared.parked.load(Ordering::Acquire);
        if !parked {
            watching = None;
        }
        let want = match (parked, watching) {
            (false, _) => KernelInterest::Read,
            (true, None) => KernelInterest::Watch,
            (true, Some(_)) => KernelInterest::Fired,
        };
        let flags = match (want, interest) {
            (KernelInterest::Read, KernelInterest::Read)
            | (KernelInterest::Watch, KernelInterest::Watch)
            | (KernelInterest::Fired, KernelInterest::Watch | KernelInterest::Fired) => None,
            (KernelInterest::Read, _) => Some(EpollFlags::EPOLLIN),
            // Armed: fires at once if events are queued already (the thread then looks later).
            (KernelInterest::Watch, _) | (KernelInterest::Fired, KernelInterest::Read) => {
                Some(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT)
            }
        };
        if let Some(flags) = flags {
            if epoll
                .modify(inotify, &mut EpollEvent::new(flags, KERNEL))
                .is_err()
            {
                return;
            }
            interest = if want == KernelInterest::Read {
                KernelInterest::Read
            } else {
                KernelInterest::Watch
            };
        }
        let timeout = if watching.is_some() {
            PollTimeout::try_from(TAKEOVER_AFTER).unwrap_or(PollTimeout::MAX)
        } else {
            PollTimeout::NONE
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(_) => return,
        };
        let mut kernel = false;
        for event in &events[..n] {
            match event.data() {
                STOP => return,
                CONTROL => {
                    let _ = shared.control.read();
                }
                _ => kernel = true,
            }
        }
        if kernel && interest == KernelInterest::Watch {
            interest = KernelInterest::Fired;
        }
        // Unparked by the consumer, the queue may hold events (or events the consumer held back
        // for the thread) without the descriptor's edge being seen: drain in any case. Events
        // held back are handled even if the consumer has parked the thread again since.
        let handoff = shared.handoff.load(Ordering::Acquire);
        if handoff || !shared.parked.load(Ordering::Acquire) {
            watching = None;
            if shared.drain(true) {
                return;
            }
            continue;
        }
        let reads = shared.reads.load(Ordering::Relaxed);
        match watching {
            // The first event after a quiet spell: look again in TAKEOVER_AFTER.
            None if kernel => {
                watching = Some(reads);
                quiet = 0;
            }
            // Woken for something else (the consumer's park signal) before the time was up.
            None => {}
            Some(_) if n > 0 => {}
            // The consumer read since the last look: it is alive, and events are coming; look
            // again in TAKEOVER_AFTER rather than at the next event (events that come every few
            // milliseconds then wake the thread once per TAKEOVER_AFTER, on a timer, none of them
            // on an event's path).
            Some(seen) if seen != reads => {
                watching = Some(reads);
                quiet = 0;
            }
            // Neither read nor readable for TAKEOVER_AFTER: after QUIET_LOOKS of these in a row,
            // a quiet spell: wait for the next event.
            Some(_) if !is_readable(inotify) => {
                quiet += 1;
                if quiet >= QUIET_LOOKS {
                    watching = None;
                }
            }
            // Readable and not read for TAKEOVER_AFTER: the consumer is not coming for them.
            Some(_) => {
                watching = None;
                if shared
                    .parked
                    .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    shared.takeovers.fetch_add(1, Ordering::Relaxed);
                    if shared.drain(true) {
                        return;
                    }
                }
            }
        }
    }
}

/// The drain thread's epoll set: the stop and control signals, and the kernel descriptor
/// level-triggered (the thread reads it until the consumer parks). Made before the thread starts,
/// so that running out of descriptors is the caller's error, not a thread that silently ends.
fn epoll_set(shared: &Shared, inotify: &OwnedFd) -> Result<Epoll, WatchError> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io_error)?;
    epoll
        .add(&shared.stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP))
        .and_then(|()| {
            epoll.add(
                &shared.control,
                EpollEvent::new(EpollFlags::EPOLLIN, CONTROL),
            )
        })
        .and_then(|()| epoll.add(inotify, EpollEvent::new(EpollFlags::EPOLLIN, KERNEL)))
        .map_err(io_error)?;
    Ok(epoll)
}

/// Whether the kernel holds events now (a poll that does not wait).
fn is_readable(inotify: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

fn wait_readable(fd: &EventFd, timeout: Option<Duration>) -> Result<bool, WatchError> {
    let millis = timeout.map_or(PollTimeout::NONE, |t| {
        PollTimeout::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(PollTimeout::MAX)
    });
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, millis) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(true),
        Err(errno) => Err(WatchError::Io(errno.into())),
    }
}

fn io_error(errno: Errno) -> WatchError {
    WatchError::Io(io::Error::from(errno))
}
