//! The bounded ring of a process's recent output. The kernel hands us output one `read(2)` at a
//! time; each read becomes one [`Chunk`] with a sequence number. The ring keeps the newest chunks
//! up to a byte budget and evicts the oldest first, so memory stays bounded however fast the
//! process writes and however slowly (or never) anyone reads.
//!
//! This module is plain data with no locking or waking; `fanout.rs` puts it behind a mutex.
//!
//! Positions: every chunk has a sequence number (0, 1, 2, …) and a byte offset (the number of
//! output bytes produced before it). A [`Cursor`] names the next chunk a reader wants, by both, so
//! that a reader whose chunks were evicted can be told exactly how many chunks and bytes it lost.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::status::End;

/// Default ring budget per process: 1 MiB. envd keeps a 64-event channel (up to 2 MiB of 32 KiB
/// pipe reads) but drops everything while nobody is subscribed; 1 MiB holds a typical command's
/// whole output for replay while capping a runaway writer at a known cost per process.
pub const DEFAULT_RING_BYTES: usize = 1 << 20;

/// What each chunk costs the budget beyond its payload: roughly the `Arc` header, the allocator's
/// own header and the ring slot. Without it, a process that writes one byte at a time could pin
/// tens of MiB of bookkeeping under a 1 MiB budget.
pub const CHUNK_OVERHEAD_BYTES: usize = 64;

/// Which file descriptor a chunk was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The process's standard output pipe.
    Stdout,
    /// The process's standard error pipe.
    Stderr,
    /// The PTY master (a PTY merges stdout and stderr into one stream).
    Pty,
}

/// One `read(2)` worth of output.
#[derive(Clone, Debug)]
pub struct Chunk {
    /// Sequence number of this chunk within its process (0 for the first).
    pub seq: u64,
    /// Where the bytes came from.
    pub stream: Stream,
    /// The bytes (shared with the ring, so handing a chunk out copies nothing).
    pub data: Arc<[u8]>,
}

/// A reader's position: the next chunk it wants.
///
/// `seq` is the sequence number of that chunk and `offset` the count of output bytes before it.
/// Obtain cursors from the process (`oldest_cursor`, `now_cursor`) and from [`Batch::next`];
/// a cursor from the future is treated as "now", and `offset` is used only to count lost bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cursor {
    /// Sequence number of the next chunk wanted.
    pub seq: u64,
    /// Output bytes produced before that chunk.
    pub offset: u64,
}

/// Output a reader missed because it was evicted before the reader got to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lag {
    /// Number of chunks lost.
    pub chunks: u64,
    /// Number of payload bytes lost.
    pub bytes: u64,
}

/// What one call to `next_batch` returns: everything available from a cursor, in order.
///
/// Read it as: first the gap `lagged` (if any), then `chunks`, then `end` (if any). `end` is set
/// only when the batch reaches the last chunk the process will ever produce, and it is returned
/// again on every later call from that point, so the End stays readable after exit.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Set when the reader's cursor pointed at evicted output; the batch resumes at the oldest
    /// retained chunk.
    pub lagged: Option<Lag>,
    /// The chunks, oldest first, with consecutive sequence numbers.
    pub chunks: Vec<Chunk>,
    /// How the process ended, once the reader has seen all of its output.
    pub end: Option<End>,
    /// The cursor to pass next time.
    pub next: Cursor,
    /// True when more chunks were available than `max_bytes` allowed; call again at once.
    pub more: bool,
}

impl Batch {
    /// True when the batch carries nothing: no chunk, no lag and no end.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.lagged.is_none() && self.end.is_none()
    }

    /// Total payload bytes in `chunks`.
    pub fn bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }
}

/// A retained chunk.
struct Stored {
    stream: Stream,
    data: Arc<[u8]>,
}

/// The ring itself. Invariants: `chunks[i]` has sequence number `first_seq + i`;
/// `next_seq == first_seq + chunks.len()`; `first_offset` is the byte offset of `chunks[0]` (or
/// `next_offset` when empty); `charged` is the sum of `len + CHUNK_OVERHEAD_BYTES` over `chunks`
/// and stays `<= capacity` unless a single chunk alone exceeds it.
pub(crate) struct Ring {
    chunks: VecDeque<Stored>,
    first_seq: u64,
    first_offset: u64,
    next_seq: u64,
    next_offset: u64,
    charged: usize,
    capacity: usize,
    end: Option<End>,
}

impl Ring {
    /// An empty ring with a budget of `capacity` bytes (payload plus per-chunk overhead).
    pub(crate) fn new(capacity: usize) -> Ring {
        Ring {
            chunks: VecDeque::new(),
            first_seq: 0,
            first_offset: 0,
            next_seq: 0,
            next_offset: 0,
            charged: 0,
            capacity,
            end: None,
        }
    }

    /// Appends a chunk, evicting the oldest ones as needed. Evicted payloads are moved into
    /// `evicted` so that the caller can free them after releasing its lock.
    pub(crate) fn push(&mut self, stream: Stream, data: Arc<[u8]>, evicted: &mut Vec<Arc<[u8]>>) {
        debug_assert!(self.end.is_none(), "output after end");
        self.make_room(data.len(), u64::MAX, evicted);
        let cost = data.len() + CHUNK_OVERHEAD_BYTES;
        self.next_offset += data.len() as u64;
        self.next_seq += 1;
        self.charged += cost;
        self.chunks.push_back(Stored { stream, data });
    }

    /// Flow control: makes room for a chunk of `len` payload bytes by evicting only chunks older
    /// than `keep_from` (the cursor of the most advanced flow-controlled reader). Returns true
    /// when the chunk now fits, or when the ring is empty (an oversized chunk is kept alone); false
    /// when pushing it would evict a chunk at or after `keep_from`, which the caller must then wait
    /// for. Evicting early here is harmless: [`push`](Self::push) of this chunk would evict the
    /// same chunks anyway.
    pub(crate) fn make_room(
        &mut self,
        len: usize,
        keep_from: u64,
        evicted: &mut Vec<Arc<[u8]>>,
    ) -> bool {
        let cost = len + CHUNK_OVERHEAD_BYTES;
        while self.charged + cost > self.capacity && self.first_seq < keep_from {
            let Some(old) = self.chunks.pop_front() else {
                break;
            };
            self.charged -= old.data.len() + CHUNK_OVERHEAD_BYTES;
            self.first_seq += 1;
            self.first_offset += old.data.len() as u64;
            evicted.push(old.data);
        }
        self.chunks.is_empty() || self.charged + cost <= self.capacity
    }

    /// Records the end. Later chunks are a logic error.
    pub(crate) fn finish(&mut self, end: End) {
        self.end = Some(end);
    }

    /// The recorded end, if the process has ended and all its output has been pushed.
    pub(crate) fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// The cursor of the oldest retained chunk.
    pub(crate) fn oldest(&self) -> Cursor {
        Cursor {
            seq: self.first_seq,
            offset: self.first_offset,
        }
    }

    /// The cursor of the next chunk to be produced.
    pub(crate) fn now(&self) -> Cursor {
        Cursor {
            seq: self.next_seq,
            offset: self.next_offset,
        }
    }

    /// True when a read from `cursor` would return something (chunks, a lag, or the end).
    pub(crate) fn ready(&self, cursor: Cursor) -> bool {
        cursor.seq < self.next_seq || self.end.is_some()
    }

    /// Everything available from `cursor`, up to `max_bytes` of payload (but always at least one
    /// chunk when one is available, so a reader always makes progress).
    pub(crate) fn read(&self, cursor: Cursor, max_bytes: usize) -> Batch {
        let mut at = if cursor.seq > self.next_seq {
            self.now()
        } else {
            cursor
        };
        let mut lagged = None;
        if at.seq < self.first_seq {
            lagged = Some(Lag {
                chunks: self.first_seq - at.seq,
                bytes: self.first_offset.saturating_sub(at.offset),
            });
            at = self.oldest();
        }
        // `at.seq` is within [first_seq, next_seq], so the index is within [0, len].
        let start = (at.seq - self.first_seq) as usize;
        let mut chunks = Vec::new();
        let mut bytes = 0usize;
        for stored in self.chunks.range(start..) {
            let len = stored.data.len();
            if !chunks.is_empty() && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            chunks.push(Chunk {
                seq: at.seq,
                stream: stored.stream,
                data: Arc::clone(&stored.data),
            });
            at.seq += 1;
            at.offset += len as u64;
        }
        let more = at.seq < self.next_seq;
        let end = if more { None } else { self.end.clone() };
        Batch {
            lagged,
            chunks,
            end,
            next: at,
            more,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(ring: &mut Ring, bytes: &[u8]) -> usize {
        let mut evicted = Vec::new();
        ring.push(Stream::Stdout, Arc::from(bytes), &mut evicted);
        evicted.len()
    }

    #[test]
    fn replay_then_live() {
        let mut ring = Ring::new(DEFAULT_RING_BYTES);
        push(&mut ring, b"a");
        push(&mut ring, b"bc");
        let batch = ring.read(ring.oldest(), usize::MAX);
        assert!(batch.lagged.is_none() && batch.end.is_none() && !batch.more);
        assert_eq!(batch.chunks.len(), 2);
        assert_eq!(batch.next, Cursor { seq: 2, offset: 3 });
        assert!(ring.read(batch.next, usize::MAX).is_empty());
        push(&mut ring, b"d");
        let live = ring.read(batch.next, usize::MAX);
        assert_eq!(&*live.chunks[0].data, b"d");
        assert_eq!(live.chunks[0].seq, 2);
        ring.finish(End::exited(0));
        let end = ring.read(live.next, usize::MAX);
        assert!(end.chunks.is_empty());
        assert_eq!(end.end, Some(End::exited(0)));
        // The end stays readable.
        assert!(ring.read(live.next, usize::MAX).end.is_some());
    }

    #[test]
    fn eviction_reports_exact_lag() {
        let unit = 100 + CHUNK_OVERHEAD_BYTES;
        let mut ring = Ring::new(unit * 3);
        let start = ring.now();
        let mut evicted = 0;
        for _ in 0..10 {
            evicted += push(&mut ring, &[7u8; 100]);
        }
        assert_eq!(evicted, 7);
        let batch = ring.read(start, usize::MAX);
        assert_eq!(
            batch.lagged,
            Some(Lag {
                chunks: 7,
                bytes: 700
            })
        );
        assert_eq!(batch.chunks.len(), 3);
        assert_eq!(batch.chunks[0].seq, 7);
        assert_eq!(
            batch.next,
            Cursor {
                seq: 10,
                offset: 1000
            }
        );
    }

    #[test]
    fn max_bytes_bounds_batches_but_always_progresses() {
        let mut ring = Ring::new(DEFAULT_RING_BYTES);
        for _ in 0..4 {
            push(&mut ring, &[0u8; 10]);
        }
        let first = ring.read(ring.oldest(), 25);
        assert_eq!(first.chunks.len(), 2);
        assert!(first.more);
        let tiny = ring.read(first.next, 1);
        assert_eq!(tiny.chunks.len(), 1);
        ring.finish(End::exited(1));
        let rest = ring.read(tiny.next, 1000);
        assert_eq!(rest.chunks.len(), 1);
        assert_eq!(rest.end, Some(End::exited(1)));
    }

    #[test]
    fn make_room_evicts_only_what_the_leader_has_read() {
        let unit = 100 + CHUNK_OVERHEAD_BYTES;
        let mut ring = Ring::new(unit * 3);
        for _ in 0..3 {
            push(&mut ring, &[1u8; 100]);
        }
        let mut evicted = Vec::new();
        // The leader has read chunk 0 only: one eviction makes room.
        assert!(ring.make_room(100, 1, &mut evicted));
        assert_eq!((evicted.len(), ring.oldest().seq), (1, 1));
        ring.push(Stream::Stdout, Arc::from(&[2u8; 100][..]), &mut evicted);
        assert_eq!(evicted.len(), 1, "push after make_room evicts nothing more");
        // The leader is still at chunk 1, the oldest: no room without losing its output.
        assert!(!ring.make_room(100, 1, &mut evicted));
        assert_eq!(ring.oldest().seq, 1);
        // Caught up: everything may go, even for a chunk larger than the ring.
        assert!(ring.make_room(10_000, ring.now().seq, &mut evicted));
        assert_eq!(ring.oldest(), ring.now());
    }

    #[test]
    fn oversized_chunk_is_kept_alone_and_future_cursor_is_now() {
        let mut ring = Ring::new(10);
        push(&mut ring, &[1u8; 50]);
        assert_eq!(push(&mut ring, &[2u8; 50]), 1);
        assert_eq!(ring.read(ring.oldest(), usize::MAX).chunks.len(), 1);
        let future = Cursor {
            seq: 99,
            offset: 9999,
        };
        let batch = ring.read(future, usize::MAX);
        assert!(batch.is_empty());
        assert_eq!(batch.next, ring.now());
    }
}
