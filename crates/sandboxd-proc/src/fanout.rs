//! The output fan-out of one process: the ring behind a mutex, a condition variable for blocking
//! readers, the flow-control registry of live subscribers, and their eventfd wakers.
//!
//! Flow control (the policy is in the crate docs): before the producer (the process's reader
//! thread) pushes a chunk, it waits on the `room` condition variable while the push would evict
//! output that a *protected* subscriber has not read. It gives up on (stalls) a subscriber that
//! leaves output unread for the stall timeout, or that has held back a faster subscriber for the
//! stall timeout in total. Everything else the producer does is non-blocking: it takes the ring
//! lock for a push (a pointer move plus, at most, a few evictions), releases it, and pokes waiting
//! readers with `futex` wakes and eventfd writes.

use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::ring::{Batch, Cursor, Ring, Stream};
use crate::status::End;
use crate::wake::Waker;

/// Default [`SpawnOptions::stall_timeout`](crate::SpawnOptions::stall_timeout): 2 s. A reader that
/// is alive but briefly busy — a garbage-collection pause, a scheduler hiccup on a loaded 2-core
/// box, a TCP send buffer draining to a slow client — resumes well within it, while a client that
/// is truly gone costs the process one pause of 2 s, which a person barely notices and which is far
/// below the E2B SDK's 60 s timeouts and 50 s keepalive interval.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Identifies a subscriber in the flow-control registry.
pub(crate) type ReaderId = u64;

/// A live subscriber as the producer sees it.
struct Reader {
    id: ReaderId,
    /// The sequence number of the next chunk it will read (its cursor as of its last read).
    seq: u64,
    /// True once it has called `next_batch`: a subscriber that never reads is only waited for
    /// while it is the most advanced one.
    has_read: bool,
    /// Since when it has had output to read without reading: set by the first push after it
    /// caught up, and reset by each of its reads. `None` while it has read everything.
    pending_since: Option<Instant>,
    /// How long, in total, the producer waited for it while a more advanced subscriber had
    /// nothing left to read.
    held_back: Duration,
    /// True while the producer is waiting for it (scratch for `wait_for_room`).
    blocking: bool,
    /// Set when the producer gave up on it; it is never waited for again.
    stalled: bool,
}

impl Reader {
    /// True when it has left output unread for `limit`.
    fn is_stale(&self, now: Instant, limit: Duration) -> bool {
        self.pending_since
            .is_some_and(|since| now.saturating_duration_since(since) >= limit)
    }
}

/// The ring plus everything readers and the producer coordinate on.
struct State {
    ring: Ring,
    /// Threads inside `Condvar::wait_timeout` on `Output::cond`; the producer skips the futex
    /// wake when it is zero.
    waiters: usize,
    /// The live subscribers, in subscription order (a handful; scanned on each push that needs
    /// to evict, and when a push follows a reader that had caught up).
    readers: Vec<Reader>,
    /// The id the next subscriber gets.
    next_id: ReaderId,
    /// True while the producer waits on `Output::room`; readers skip the wake when it is false.
    producer_waiting: bool,
}

/// One process's output, shared by its reader thread and all of its readers.
pub(crate) struct Output {
    /// Invariant: held only for memcpy-sized work — pushing one chunk (with its evictions, whose
    /// payloads are freed after unlocking), cloning `Arc`s of up to one batch, reading or moving a
    /// cursor, or scanning the registry. Never held across a syscall that can block, and never
    /// while notifying wakers; the producer's flow-control wait releases it (condvar wait).
    state: Mutex<State>,
    /// Readers wait here for output; signalled after each push and at the end, when
    /// `State::waiters > 0`.
    cond: Condvar,
    /// The producer waits here for room; signalled when a subscriber's cursor advances, when one
    /// subscribes or leaves, while `State::producer_waiting` is true.
    room: Condvar,
    /// Invariant: the wakers of the live subscribers, in subscription order. Held only to add or
    /// remove one, or by the producer while it makes non-blocking eventfd writes to armed ones.
    /// Never held together with `state`.
    wakers: Mutex<Vec<Arc<Waker>>>,
    /// How long the producer waits for a subscriber that leaves output unread, and how long in
    /// total a slower subscriber may hold back a faster one.
    stall_timeout: Duration,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data consistent
/// before anything that can panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Output {
    /// An empty fan-out whose ring holds `capacity` bytes and whose producer waits at most
    /// `stall_timeout` for a leading subscriber that makes no progress.
    pub(crate) fn new(capacity: usize, stall_timeout: Duration) -> Output {
        Output {
            state: Mutex::new(State {
                ring: Ring::new(capacity),
                waiters: 0,
                readers: Vec::new(),
                next_id: 0,
                producer_waiting: false,
            }),
            cond: Condvar::new(),
            room: Condvar::new(),
            wakers: Mutex::new(Vec::new()),
            stall_timeout,
        }
    }

    /// Producer: appends one chunk, first waiting (flow control) while it would evict output a
    /// protected subscriber has not read, then wakes readers. `evicted` is scratch space reused
    /// across calls; evicted payloads are dropped here, after the lock is released.
    pub(crate) fn push(&self, stream: Stream, data: Arc<[u8]>, evicted: &mut Vec<Arc<[u8]>>) {
        let waiters = {
            let mut state = self.wait_for_room(lock(&self.state), data.len(), evicted);
            state.ring.push(stream, data, evicted);
            // Readers that had caught up now have output to read: start their stall clocks.
            if state.readers.iter().any(|r| r.pending_since.is_none()) {
                let now = Instant::now();
                for reader in state.readers.iter_mut() {
                    reader.pending_since.get_or_insert(now);
                }
            }
            state.waiters
        };
        evicted.clear();
        self.wake(waiters);
    }

    /// Producer: returns once a chunk of `len` bytes can be pushed without evicting output that a
    /// protected subscriber has not read (evicting only older chunks), waiting on `room` while it
    /// cannot.
    ///
    /// Protected are the live, non-stalled subscribers that are the most advanced (the leaders),
    /// and those that have read at least once and have not left output unread for the stall
    /// timeout. While waiting for the least advanced protected ones (the blockers), the producer
    /// stalls a blocker that leaves its output unread for the stall timeout, or that has held
    /// back, for the stall timeout in total, a subscriber that had read everything and was waiting
    /// for more. So a subscriber that stops reading delays the producer at most once, by the
    /// stall timeout, and one slower than another holds that one back at most the stall timeout
    /// in total; one that reads slowly on its own paces the process, like a pipe.
    fn wait_for_room<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        len: usize,
        evicted: &mut Vec<Arc<[u8]>>,
    ) -> MutexGuard<'a, State> {
        let limit = self.stall_timeout;
        loop {
            let now = Instant::now();
            let Some(leader) = state
                .readers
                .iter()
                .filter(|r| !r.stalled)
                .map(|r| r.seq)
                .max()
            else {
                return state;
            };
            let protected = |r: &Reader| {
                !r.stalled && (r.seq == leader || (r.has_read && !r.is_stale(now, limit)))
            };
            // The leaders are protected, so there is always one.
            let keep_from = state
                .readers
                .iter()
                .filter(|r| protected(r))
                .map(|r| r.seq)
                .min()
                .unwrap_or(leader);
            if state.ring.make_room(len, keep_from, evicted) {
                return state;
            }
            // Some subscriber that reads has read everything and waits for output we hold back.
            let next_seq = state.ring.now().seq;
            let starving = state
                .readers
                .iter()
                .any(|r| !r.stalled && r.has_read && r.seq == next_seq);
            let mut wait = limit;
            let mut gave_up = false;
            for reader in state.readers.iter_mut() {
                reader.blocking = protected(reader) && reader.seq == keep_from;
                if !reader.blocking {
                    continue;
                }
                // A blocker has unread output (it is behind `next_seq`), so its clock runs.
                let unread_for = reader
                    .pending_since
                    .map_or(Duration::ZERO, |since| now.saturating_duration_since(since));
                let left = limit.saturating_sub(unread_for);
                let budget = limit.saturating_sub(reader.held_back);
                if left.is_zero() || (starving && budget.is_zero()) {
                    reader.stalled = true;
                    gave_up = true;
                }
                wait = wait.min(left);
                if starving {
                    wait = wait.min(budget);
                }
            }
            if gave_up {
                continue;
            }
            state.producer_waiting = true;
            state = self
                .room
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.producer_waiting = false;
            if starving {
                let waited = now.elapsed();
                for reader in state.readers.iter_mut().filter(|r| r.blocking) {
                    reader.held_back += waited;
                }
            }
        }
    }

    /// Producer: records the end (after all output was pushed) and wakes readers.
    pub(crate) fn finish(&self, end: End) {
        let waiters = {
            let mut state = lock(&self.state);
            state.ring.finish(end);
            state.waiters
        };
        self.wake(waiters);
    }

    fn wake(&self, waiters: usize) {
        if waiters > 0 {
            self.cond.notify_all();
        }
        for waker in lock(&self.wakers).iter() {
            waker.notify();
        }
    }

    /// Everything available from `cursor`, up to `max_bytes` (at least one chunk when any), for a
    /// reader that is not flow-controlled.
    pub(crate) fn next_batch(&self, cursor: Cursor, max_bytes: usize) -> Batch {
        lock(&self.state).ring.read(cursor, max_bytes)
    }

    /// [`next_batch`](Self::next_batch) for subscriber `id`: also records its new position, and
    /// wakes the producer if it is waiting and this read moved the subscriber forward.
    pub(crate) fn next_batch_for(&self, id: ReaderId, cursor: Cursor, max_bytes: usize) -> Batch {
        let (batch, wake_producer) = {
            let mut state = lock(&self.state);
            let batch = state.ring.read(cursor, max_bytes);
            let caught_up = batch.next.seq == state.ring.now().seq;
            let mut moved = false;
            if let Some(reader) = state.readers.iter_mut().find(|r| r.id == id) {
                moved = batch.next.seq > reader.seq;
                reader.seq = batch.next.seq;
                reader.has_read = true;
                // Reading restarts the stall clock (or stops it, once everything is read).
                reader.pending_since = (!caught_up).then(Instant::now);
            }
            (batch, moved && state.producer_waiting)
        };
        if wake_producer {
            self.room.notify_one();
        }
        batch
    }

    /// True when a read from `cursor` would return something.
    pub(crate) fn ready(&self, cursor: Cursor) -> bool {
        lock(&self.state).ring.ready(cursor)
    }

    /// The cursor of the oldest retained chunk.
    pub(crate) fn oldest(&self) -> Cursor {
        lock(&self.state).ring.oldest()
    }

    /// The cursor of the next chunk to be produced.
    pub(crate) fn now(&self) -> Cursor {
        lock(&self.state).ring.now()
    }

    /// The end, if recorded.
    pub(crate) fn end(&self) -> Option<End> {
        lock(&self.state).ring.end().cloned()
    }

    /// Blocks until a read from `cursor` would return something, or `timeout` passes (`None`
    /// waits without limit). Returns whether something is ready.
    pub(crate) fn wait_ready(&self, cursor: Cursor, timeout: Option<Duration>) -> bool {
        self.wait_until(timeout, |ring| ring.ready(cursor))
    }

    /// Blocks until the end is recorded or `timeout` passes; returns the end if recorded.
    pub(crate) fn wait_end(&self, timeout: Option<Duration>) -> Option<End> {
        if self.wait_until(timeout, |ring| ring.end().is_some()) {
            self.end()
        } else {
            None
        }
    }

    fn wait_until(&self, timeout: Option<Duration>, ready: impl Fn(&Ring) -> bool) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if ready(&state.ring) {
                return true;
            }
            let wait = match deadline {
                None => Duration::from_secs(3600),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return false;
                    }
                    deadline - now
                }
            };
            state.waiters += 1;
            state = self
                .cond
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.waiters -= 1;
        }
    }

    /// Registers a new subscriber starting at the oldest retained chunk (`oldest`) or at the next
    /// one to be produced: its waker, and its position for flow control. Returns its id, waker and
    /// starting cursor.
    pub(crate) fn subscribe(&self, oldest: bool) -> io::Result<(ReaderId, Arc<Waker>, Cursor)> {
        let waker = Arc::new(Waker::new()?);
        lock(&self.wakers).push(Arc::clone(&waker));
        let (id, cursor, wake_producer) = {
            let mut state = lock(&self.state);
            let cursor = if oldest {
                state.ring.oldest()
            } else {
                state.ring.now()
            };
            let id = state.next_id;
            state.next_id += 1;
            let pending_since = state.ring.ready(cursor).then(Instant::now);
            state.readers.push(Reader {
                id,
                seq: cursor.seq,
                has_read: false,
                pending_since,
                held_back: Duration::ZERO,
                blocking: false,
                stalled: false,
            });
            (id, cursor, state.producer_waiting)
        };
        // A subscriber that starts at "now" may be the new leader, with room to spare.
        if wake_producer {
            self.room.notify_one();
        }
        Ok((id, waker, cursor))
    }

    /// Unregisters a subscriber: the producer no longer waits for it.
    ///
    /// The last one to leave frees both lists' room: an ended process is kept, reader-less, for
    /// 30 s after its end (connectable), and the room its one stream had used (~0.3 KiB) would
    /// stay with each of them.
    pub(crate) fn unsubscribe(&self, id: ReaderId, waker: &Arc<Waker>) {
        {
            let mut wakers = lock(&self.wakers);
            wakers.retain(|w| !Arc::ptr_eq(w, waker));
            if wakers.is_empty() {
                *wakers = Vec::new();
            }
        }
        let wake_producer = {
            let mut state = lock(&self.state);
            state.readers.retain(|r| r.id != id);
            if state.readers.is_empty() {
                state.readers = Vec::new();
            }
            state.producer_waiting
        };
        if wake_producer {
            self.room.notify_one();
        }
    }

    /// Whether subscriber `id` was given up on by flow control (false once it has left).
    pub(crate) fn is_stalled(&self, id: ReaderId) -> bool {
        lock(&self.state)
            .readers
            .iter()
            .any(|r| r.id == id && r.stalled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_subscriber_to_leave_frees_the_lists_room() {
        let output = Output::new(1 << 16, DEFAULT_STALL_TIMEOUT);
        let (first, first_waker, _) = output.subscribe(true).unwrap();
        let (second, second_waker, _) = output.subscribe(true).unwrap();
        output.unsubscribe(first, &first_waker);
        assert_eq!(lock(&output.state).readers.len(), 1);
        assert_eq!(lock(&output.wakers).len(), 1);
        output.unsubscribe(second, &second_waker);
        assert_eq!(lock(&output.state).readers.capacity(), 0);
        assert_eq!(lock(&output.wakers).capacity(), 0);
    }
}
