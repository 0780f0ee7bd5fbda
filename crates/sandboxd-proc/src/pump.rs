//! A subscriber's output written straight to a client's socket by the calling thread, as the data
//! frames of a binary Connect stream over HTTP/1.1 chunked encoding.
//!
//! Through an event loop, each batch of output costs a wake-up, Python objects for the batch and its
//! frame and the loop's write (and, on asyncio's own loop, a copy of every byte to join the frame's
//! pieces). Here one thread waits with `poll(2)` on three descriptors: the subscriber's eventfd
//! (output is ready), the socket (writable, or the peer hung up: `POLLRDHUP`) and a cancel eventfd
//! (the caller wants its socket back). Each batch becomes one `sendmsg(2)` of iovecs pointing into
//! the ring's own chunks: the HTTP chunk header, the 5-byte Connect envelope header, the protobuf
//! tags and lengths, then the bytes themselves, so the kernel's copy into the socket is the only one.
//!
//! The socket is non-blocking (an event loop's): a full socket returns `EAGAIN` and the thread
//! waits in `poll` for `POLLOUT`, holding at most one batch (`max_bytes`) of the ring's chunks;
//! meanwhile the subscriber does not read, so the ring's flow control and stall policy treat it as
//! they treat any reader that stopped (crate docs). Bytes a client sends meanwhile (a pipelined
//! request) are never read here: they wait in the socket for the event loop.
//!
//! The pump stops, returning the socket to its caller between frames, when the batch reaches the
//! process's end (the caller writes the end event itself), when the subscriber fell behind the ring
//! (a lag), when the peer is gone, or when cancelled; a frame cut short by a cancel is returned as
//! bytes, so that the caller can finish it before writing anything else.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, sendmsg};

use crate::ring::{Chunk, Stream};
use crate::subscriber::Subscriber;

/// The name the calling thread takes while it pumps (its `comm`, as `top -H` and
/// `/proc/<pid>/task/*/comm` show it): a thread lent for one stream is then told apart from the
/// event loop's in profiles, and tests can see that a stream was handed off.
pub const THREAD_NAME: &std::ffi::CStr = c"output-pump";

/// Iovecs per `sendmsg`: well under the kernel's `UIO_MAXIOV` (1024). A 1 MiB batch of 4 KiB PTY
/// reads is 256 chunks plus a few headers per frame; more than this is sent in several calls.
const MAX_IOVECS: usize = 512;

/// How the Connect data message for each stream starts: the protobuf field numbers from the
/// response message down to the `bytes` field (e.g. `StartResponse.event` 1, `ProcessEvent.data`
/// 2, `DataEvent.stdout` 1), one path per [`Stream`].
#[derive(Clone, Debug)]
pub struct Framing {
    /// Field path for [`Stream::Stdout`].
    pub stdout: Vec<u32>,
    /// Field path for [`Stream::Stderr`].
    pub stderr: Vec<u32>,
    /// Field path for [`Stream::Pty`].
    pub pty: Vec<u32>,
    /// A complete keepalive frame (HTTP chunk included), sent after `keepalive_interval` without
    /// a frame.
    pub keepalive: Vec<u8>,
    /// See `keepalive`.
    pub keepalive_interval: Duration,
}

/// Why [`pump`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Pumped {
    /// Everything up to the process's end was written; the subscriber's next batch holds the end.
    End,
    /// The subscriber fell this many bytes behind the ring (the batch's chunks were not written).
    Lagged(u64),
    /// The peer closed or reset the connection.
    Closed,
    /// The cancel descriptor became readable; the bytes are the rest of a frame cut short (empty
    /// when the cancel came between frames).
    Cancelled(Vec<u8>),
}

enum Piece {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
    Static(&'static [u8]),
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        match self {
            Piece::Owned(v) => v,
            Piece::Shared(a) => a,
            Piece::Static(s) => s,
        }
    }
}

/// Appends `value` as a protobuf varint (base 128, least significant group first), the form of
/// field keys, lengths and integer fields on the wire.
pub fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// The bytes in front of a data frame's payload of `size` bytes: HTTP chunk header, Connect
/// envelope header, then the nested length-delimited fields of `path` (as `NestedBytes` encodes).
fn frame_head(path: &[u32], size: usize) -> Vec<u8> {
    let mut tags: Vec<Vec<u8>> = Vec::with_capacity(path.len());
    let mut inner = size as u64;
    for number in path.iter().rev() {
        let mut head = Vec::with_capacity(8);
        varint(&mut head, u64::from(*number) << 3 | 2);
        varint(&mut head, inner);
        inner += head.len() as u64;
        tags.push(head);
    }
    let envelope = inner; // the message's size: what the envelope header announces
    let chunk = envelope + 5;
    let mut out = format!("{chunk:x}\r\n").into_bytes();
    out.push(0);
    out.extend_from_slice(&(envelope as u32).to_be_bytes());
    for head in tags.iter().rev() {
        out.extend_from_slice(head);
    }
    out
}

/// The frames of `chunks`: one data message per run of consecutive chunks of one stream.
fn frames(framing: &Framing, chunks: Vec<Chunk>, out: &mut Vec<Piece>) {
    let mut i = 0;
    while i < chunks.len() {
        let stream = chunks[i].stream;
        let mut j = i;
        let mut size = 0;
        while j < chunks.len() && chunks[j].stream == stream {
            size += chunks[j].data.len();
            j += 1;
        }
        let path = match stream {
            Stream::Stdout => &framing.stdout,
            Stream::Stderr => &framing.stderr,
            Stream::Pty => &framing.pty,
        };
        out.push(Piece::Owned(frame_head(path, size)));
        for chunk in &chunks[i..j] {
            out.push(Piece::Shared(chunk.data.clone()));
        }
        out.push(Piece::Static(b"\r\n"));
        i = j;
    }
}

/// Pending pieces and how much of the first one is already written.
struct Pending {
    pieces: Vec<Piece>,
    first: usize,
    offset: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.first == self.pieces.len()
    }

    /// Writes what the socket takes now; `Ok(true)` when everything is written, `Ok(false)` on
    /// `EAGAIN`.
    fn write(&mut self, sock: BorrowedFd<'_>) -> io::Result<bool> {
        while !self.is_empty() {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS.min(self.pieces.len()));
            for (k, piece) in self.pieces[self.first..]
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
            {
                let bytes = piece.bytes();
                iov.push(IoSlice::new(if k == 0 {
                    &bytes[self.offset..]
                } else {
                    bytes
                }));
            }
            let sent =
                match sendmsg::<()>(sock.as_raw_fd(), &iov, &[], MsgFlags::MSG_NOSIGNAL, None) {
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
            drop(iov);
            self.advance(sent);
        }
        self.pieces.clear();
        self.first = 0;
        self.offset = 0;
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 && !self.is_empty() {
            let left = self.pieces[self.first].bytes().len() - self.offset;
            if n >= left {
                n -= left;
                self.first += 1;
                self.offset = 0;
            } else {
                self.offset += n;
                n = 0;
            }
        }
        while !self.is_empty() && self.pieces[self.first].bytes().len() == self.offset {
            self.first += 1;
            self.offset = 0;
        }
    }

    /// The unwritten rest, as one buffer.
    fn rest(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, piece) in self.pieces[self.first..].iter().enumerate() {
            let bytes = piece.bytes();
            out.extend_from_slice(if k == 0 { &bytes[self.offset..] } else { bytes });
        }
        out
    }
}

/// `POLLRDHUP` (the peer shut down its side), which nix does not name.
fn rdhup() -> PollFlags {
    PollFlags::from_bits_retain(libc::POLLRDHUP)
}

/// Whether the socket's `revents` say the peer is gone. nix's `revents()` is None when the kernel
/// set a bit nix does not name: of those, only `POLLRDHUP` is asked for, so None is a hang-up too
/// (read as "nothing happened", it had the thread spin on a socket whose peer had left).
fn gone(revents: Option<PollFlags>) -> bool {
    revents.is_none_or(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | rdhup()))
}

/// Writes `subscriber`'s output to the non-blocking stream socket `sock` as Connect data frames
/// (see the module docs) until the end, a lag, the peer leaving or `cancel` becoming readable.
/// Batches hold at most `max_bytes` of payload. Blocks the calling thread (call it without any
/// interpreter lock held). The calling thread is renamed [`THREAD_NAME`].
pub fn pump(
    subscriber: &mut Subscriber,
    sock: BorrowedFd<'_>,
    cancel: BorrowedFd<'_>,
    framing: &Framing,
    max_bytes: usize,
) -> io::Result<Pumped> {
    let _ = nix::sys::prctl::set_name(THREAD_NAME); // a name only: nothing depends on it
    let mut pending = Pending {
        pieces: Vec::new(),
        first: 0,
        offset: 0,
    };
    let mut last_sent = Instant::now();
    let mut end = false;
    // False from a batch written until the socket reports writable again: the next batch is taken
    // then, so that output landing meanwhile goes out in one frame (with `TCP_NOTSENT_LOWAT` set by
    // the caller, "writable" means few bytes still unsent: a client that is behind gets fewer,
    // larger frames; one that keeps up, each batch at once).
    let mut hungry = true;
    loop {
        if pending.is_empty() && end {
            return Ok(Pumped::End);
        }
        if pending.is_empty() && hungry {
            let batch = subscriber.next_batch(max_bytes);
            if let Some(lag) = batch.lagged {
                return Ok(Pumped::Lagged(lag.bytes));
            }
            end = batch.end.is_some();
            if !batch.chunks.is_empty() {
                pending.pieces.clear();
                pending.first = 0;
                pending.offset = 0;
                frames(framing, batch.chunks, &mut pending.pieces);
            } else if !end && last_sent.elapsed() >= framing.keepalive_interval {
                pending.pieces.clear();
                pending.first = 0;
                pending.offset = 0;
                pending.pieces.push(Piece::Owned(framing.keepalive.clone()));
            }
            if !pending.is_empty() {
                match pending.write(sock) {
                    Ok(true) => {
                        last_sent = Instant::now();
                        hungry = false;
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) if closed_error(&e) => return Ok(Pumped::Closed),
                    Err(e) => return Err(e),
                }
            } else if end {
                return Ok(Pumped::End);
            }
        }
        // Wait: for the socket when a frame is pending, else for output or the keepalive's time.
        let waiting_to_write = !pending.is_empty() || !hungry;
        let sock_events = rdhup()
            | if waiting_to_write {
                PollFlags::POLLOUT
            } else {
                PollFlags::empty()
            };
        let wake_events = if waiting_to_write {
            PollFlags::empty()
        } else {
            PollFlags::POLLIN
        };
        let mut fds = [
            PollFd::new(sock, sock_events),
            PollFd::new(cancel, PollFlags::POLLIN),
            PollFd::new(subscriber.wake_fd(), wake_events),
        ];
        let timeout = if waiting_to_write {
            PollTimeout::NONE
        } else {
            let due = framing
                .keepalive_interval
                .saturating_sub(last_sent.elapsed());
            PollTimeout::try_from(due.max(Duration::from_millis(1))).unwrap_or(PollTimeout::MAX)
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        if gone(fds[0].revents()) {
            return Ok(Pumped::Closed);
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Pumped::Cancelled(pending.rest()));
        }
        if waiting_to_write
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLOUT))
        {
            if pending.is_empty() {
                hungry = true;
                continue;
            }
            match pending.write(sock) {
                Ok(true) => {
                    last_sent = Instant::now();
                    hungry = false;
                }
                Ok(false) => {}
                Err(e) if closed_error(&e) => return Ok(Pumped::Closed),
                Err(e) => return Err(e),
            }
        }
    }
}

fn closed_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EPIPE | Errno::ECONNRESET | Errno::ENOTCONN | Errno::ESHUTDOWN)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_head_matches_the_nested_encoding() {
        // StartResponse{event(1){data(2){stdout(1): 3 bytes}}}: 0a 07 12 05 0a 03 + data.
        let head = frame_head(&[1, 2, 1], 3);
        assert_eq!(&head[..3], b"e\r\n"); // 5 + 9 = 14 = 0xe
        assert_eq!(&head[3..8], &[0, 0, 0, 0, 9]);
        assert_eq!(&head[8..], &[0x0a, 0x07, 0x12, 0x05, 0x0a, 0x03]);
    }

    #[test]
    fn pending_advances_across_pieces() {
        let mut p = Pending {
            pieces: vec![
                Piece::Static(b"ab"),
                Piece::Owned(b"cde".to_vec()),
                Piece::Static(b"f"),
            ],
            first: 0,
            offset: 0,
        };
        p.advance(3);
        assert_eq!(p.rest(), b"def");
        p.advance(3);
        assert!(p.is_empty());
    }
}
