//! A `multipart/form-data` body (`POST /files` as the SDKs' `files.write` sends it) read straight
//! from the socket by a worker thread, its parts' data written to their files without Python
//! touching a byte.
//!
//! Through the event loop every piece of a multipart body was copied four times in Python (the
//! HTTP parser's callback, uvicorn's buffer, `receive()`'s `bytes`, the multipart parser's slice of
//! each part's data) and scanned for the boundary in pure Python. Here one `read(2)` fills a buffer,
//! `memchr`'s `memmem` (SIMD) finds the delimiter, and `write(2)` takes the data to the file: one
//! copy into user space, one into the page cache. (The data cannot be `splice`d: the boundary
//! must be looked for in it.)
//!
//! The caller drives it a part at a time: [`MultipartReader::next_part`] gives a part's header
//! block (the caller decides where the part goes: it knows users and paths), then
//! [`MultipartReader::copy_part`] writes the part's data to that file, or drops it. Exactly the
//! body's `Content-Length` is read from the socket, the epilogue after the closing delimiter
//! included, so a pipelined request after it stays there for the server. Time limits are those of
//! [`crate::splice`]: `idle` without a byte, [`crate::splice::MIN_RATE`] on average after it, and
//! the stop descriptor.
//!
//! The grammar is RFC 2046 §5.1.1's, read as Go's `mime/multipart` (envd's parser) reads it: a
//! preamble before the first delimiter is skipped, as is transport padding (spaces and tabs) after
//! a delimiter; CRLF `--` boundary followed by anything but padding, CR, LF or `--` is data (a file
//! may hold it), not a delimiter; a part's headers end at an empty line and may not exceed
//! [`MAX_HEADERS`]. (The event loop's path, `python-multipart` for chunked and gzip bodies, refuses a
//! preamble and padding that this reader and envd take.)

use std::time::Duration;

use memchr::memmem::Finder;

use crate::atomic::AtomicWriter;
use crate::error::Result;
use crate::splice::{Pace, Received, read_fd};

/// The largest header block of one part (16 KiB, as the event loop's path allows per header):
/// a `Content-Disposition` with a long file name and a `Content-Type` need far less.
pub const MAX_HEADERS: usize = 16 << 10;

/// The longest boundary taken (RFC 2046 allows 70 characters; some clients send more).
pub const MAX_BOUNDARY: usize = 256;

/// Bytes one `read(2)` asks for at most: big enough that a fast sender costs few calls per MiB,
/// small enough to stay in the caches between the read, the search and the write.
const BUFFER: usize = 256 << 10;

/// What [`MultipartReader::next_part`] and [`MultipartReader::copy_part`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A part begins: its header block (header lines, each ending in CRLF; empty when it has none).
    Part(Vec<u8>),
    /// The part's data is all written (or dropped).
    PartDone,
    /// The closing delimiter and the whole epilogue are read: the body is complete.
    End,
    /// The transfer ended early: the client closed, was silent, too slow, or the reader was stopped.
    Ended(Received),
    /// The body is not multipart as its boundary says: why, for the client.
    Malformed(&'static str),
}

/// Where the reader stands in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Just after a delimiter: a part's headers follow, or `--` closes the body.
    Delimiter,
    /// Inside a part's data.
    Data,
    /// The body is complete.
    Done,
}

/// Whether CRLF `--` boundary followed by `after` is a delimiter, as Go's `mime/multipart` decides
/// (`matchAfterPrefix`): yes when padding, CR, LF or `--` follows, or the body ends there; no when
/// any other byte does (`--foobar` is not the boundary `--foo`). None until the bytes that decide
/// it have arrived (`ended`: the whole body is in the buffer).
fn is_delimiter(after: &[u8], ended: bool) -> Option<bool> {
    match after {
        [] => ended.then_some(true),
        [b' ' | b'\t' | b'\r' | b'\n', ..] | [b'-', b'-', ..] => Some(true),
        [b'-'] => ended.then_some(false),
        _ => Some(false),
    }
}

/// A multipart body being read from a socket. See the module documentation.
pub struct MultipartReader {
    /// `finder`'s needle: CRLF `--` boundary.
    finder: Finder<'static>,
    /// Bytes read and not yet consumed are `buf[pos..]`.
    buf: Vec<u8>,
    pos: usize,
    /// Body bytes still in the socket.
    left: u64,
    /// Body bytes read from the socket so far (the pace's count).
    read: u64,
    pace: Pace,
    state: State,
}

impl MultipartReader {
    /// A reader of a body with `boundary`, of which `prefix` was already read (the server's
    /// buffer) and `left` bytes are still in the socket. The boundary must be 1 to
    /// [`MAX_BOUNDARY`] bytes (the caller checks). With `left` 0 the whole body is `prefix` (a small
    /// one, held in memory): the reader never reads, and the socket passed to it is not used.
    pub fn new(
        boundary: &[u8],
        prefix: &[u8],
        left: u64,
        idle: Duration,
        stop: Option<i32>,
    ) -> Self {
        let mut needle = b"\r\n--".to_vec();
        needle.extend_from_slice(boundary);
        // The first delimiter may open the body without the CRLF that precedes every other one:
        // a CRLF put before the body lets one needle find them all (a preamble gains two bytes
        // nobody reads).
        let mut buf = Vec::with_capacity(BUFFER.max(prefix.len() + 2));
        buf.extend_from_slice(b"\r\n");
        buf.extend_from_slice(prefix);
        Self {
            finder: Finder::new(&needle).into_owned(),
            buf,
            pos: 0,
            left,
            read: 0,
            pace: Pace::new(idle, stop),
            state: State::Preamble,
        }
    }

    /// Body bytes read from the socket so far.
    pub fn received(&self) -> u64 {
        self.read
    }

    /// Reads up to the next part's header block and returns it ([`Step::Part`]), or reads the
    /// epilogue after the closing delimiter ([`Step::End`]). The rest of the current part's data,
    /// when [`copy_part`](Self::copy_part) was not called or did not finish, is dropped.
    pub fn next_part(&mut self, socket: i32) -> Result<Step> {
        loop {
            match self.state {
                State::Done => return Ok(Step::End),
                State::Preamble | State::Data => match self.copy_part(socket, None)? {
                    Step::PartDone => {}
                    other => return Ok(other),
                },
                State::Delimiter => return self.after_delimiter(socket),
            }
        }
    }

    /// Writes the current part's data to `file` (drops it when None) up to the next delimiter:
    /// [`Step::PartDone`], or why it stopped. A failed write (`ENOSPC`) is the error.
    pub fn copy_part(&mut self, socket: i32, mut file: Option<&mut AtomicWriter>) -> Result<Step> {
        if !matches!(self.state, State::Preamble | State::Data) {
            return Ok(Step::PartDone);
        }
        let needle = self.finder.needle().len();
        let keep = self.state == State::Data; // a preamble is dropped
        let mut scan = self.pos; // bytes in `pos..scan` are data: a match there was not a delimiter
        loop {
            if let Some(at) = self.finder.find(&self.buf[scan..]) {
                let end = scan + at;
                match is_delimiter(&self.buf[end + needle..], self.left == 0) {
                    Some(false) => {
                        scan = end + 1;
                        continue;
                    }
                    decided => {
                        if keep && let Some(file) = file.as_deref_mut() {
                            file.write(&self.buf[self.pos..end])?;
                        }
                        if decided == Some(true) {
                            self.pos = end + needle;
                            self.state = State::Delimiter;
                            return Ok(Step::PartDone);
                        }
                        // Undecided until the next bytes arrive: the match waits at the start.
                        self.pos = end;
                        if let Some(step) =
                            self.fill(socket, "the body ended before its closing boundary")
                        {
                            return Ok(step);
                        }
                        scan = self.pos;
                        continue;
                    }
                }
            }
            // What cannot hold the start of a delimiter is data for sure.
            let safe = self.buf.len().saturating_sub(needle - 1).max(self.pos);
            if keep && let Some(file) = file.as_deref_mut() {
                file.write(&self.buf[self.pos..safe])?;
            }
            self.pos = safe;
            if let Some(step) = self.fill(socket, "the body ended before its closing boundary") {
                return Ok(step);
            }
            scan = self.pos;
        }
    }

    /// After a delimiter: `--` (the close), or transport padding, CRLF and a part's headers.
    fn after_delimiter(&mut self, socket: i32) -> Result<Step> {
        loop {
            let rest = &self.buf[self.pos..];
            if rest.starts_with(b"--") {
                self.state = State::Done;
                return Ok(self.discard_rest(socket));
            }
            let padding = rest
                .iter()
                .take_while(|&&b| b == b' ' || b == b'\t')
                .count();
            let rest = &rest[padding..];
            if rest.len() >= 2 {
                if !rest.starts_with(b"\r\n") {
                    return Ok(Step::Malformed("a boundary is not followed by CRLF"));
                }
                if rest[2..].starts_with(b"\r\n") {
                    // A part without headers: its data begins after the empty line.
                    self.pos += padding + 4;
                    self.state = State::Data;
                    return Ok(Step::Part(Vec::new()));
                }
                if let Some(at) = memchr::memmem::find(&rest[2..], b"\r\n\r\n") {
                    if at + 2 > MAX_HEADERS {
                        return Ok(Step::Malformed("a part's headers are larger than 16 KiB"));
                    }
                    let headers = rest[2..2 + at + 2].to_vec();
                    self.pos += padding + 2 + at + 4;
                    self.state = State::Data;
                    return Ok(Step::Part(headers));
                }
                if rest.len() > MAX_HEADERS + 4 {
                    return Ok(Step::Malformed("a part's headers are larger than 16 KiB"));
                }
            } else if padding > MAX_HEADERS {
                return Ok(Step::Malformed("a boundary is not followed by CRLF"));
            }
            if let Some(step) = self.fill(socket, "the body ended inside a part's headers") {
                return Ok(step);
            }
        }
    }

    /// Reads and drops the rest of the body: the epilogue after the closing delimiter, or the
    /// rest of a body refused midway, so that the refusal reaches a client still sending (a
    /// socket closed with bytes unread is reset, and the reset can overtake the answer).
    /// [`Step::End`] once the whole body is read, or how the transfer ended.
    pub fn discard_rest(&mut self, socket: i32) -> Step {
        self.state = State::Done;
        loop {
            self.pos = self.buf.len();
            if self.left == 0 {
                return Step::End;
            }
            if let Some(step) = self.fill(socket, "") {
                return step;
            }
        }
    }

    /// Moves the unread bytes to the buffer's start and reads more from the socket, at most the
    /// body's rest. None when something was read; otherwise how the transfer ends (`short` is
    /// the complaint when the body has no bytes left).
    fn fill(&mut self, socket: i32, short: &'static str) -> Option<Step> {
        if self.left == 0 {
            return Some(Step::Malformed(short));
        }
        self.buf.drain(..self.pos);
        self.pos = 0;
        let have = self.buf.len();
        let want = (BUFFER.saturating_sub(have).max(MAX_HEADERS) as u64).min(self.left) as usize;
        self.buf.resize(have + want, 0);
        loop {
            if let Some(end) = self.pace.check(self.read) {
                self.buf.truncate(have);
                return Some(Step::Ended(end));
            }
            match read_fd(socket, &mut self.buf[have..]) {
                Ok(0) => {
                    self.buf.truncate(have);
                    return Some(Step::Ended(Received::Closed(self.read)));
                }
                Ok(n) => {
                    self.buf.truncate(have + n);
                    self.left -= n as u64;
                    self.read += n as u64;
                    return None;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if let Some(end) = self.pace.wait(socket, self.read) {
                        self.buf.truncate(have);
                        return Some(Step::Ended(end));
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => {
                    self.buf.truncate(have);
                    return Some(Step::Ended(Received::Closed(self.read)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    const IDLE: Duration = Duration::from_secs(5);

    /// The non-blocking reading end of a socket pair whose other end sends `sent`, then closes.
    fn socket_with(sent: &[u8]) -> UnixStream {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let data = sent.to_vec();
        std::thread::spawn(move || {
            let _ = b.write_all(&data);
        });
        a
    }

    /// Each part's headers and data.
    type Parts = Vec<(Vec<u8>, Vec<u8>)>;

    /// Reads every part, and how the body ended.
    fn parts(body: &[u8], prefix_len: usize, extra: &[u8]) -> (Parts, Step) {
        let dir = tempfile::tempdir().unwrap();
        let (prefix, rest) = body.split_at(prefix_len);
        let mut sent = rest.to_vec();
        sent.extend_from_slice(extra);
        let socket = socket_with(&sent);
        let mut reader = MultipartReader::new(b"XyZ", prefix, rest.len() as u64, IDLE, None);
        let mut found = Vec::new();
        loop {
            match reader.next_part(socket.as_raw_fd()).unwrap() {
                Step::Part(headers) => {
                    let path = dir.path().join(format!("f{}", found.len()));
                    let mut writer = AtomicWriter::create(&path, 0, 0).unwrap();
                    let step = reader
                        .copy_part(socket.as_raw_fd(), Some(&mut writer))
                        .unwrap();
                    if step != Step::PartDone {
                        return (found, step);
                    }
                    writer.commit(&Default::default()).unwrap();
                    found.push((headers, std::fs::read(&path).unwrap()));
                }
                Step::End => {
                    assert_eq!(reader.received(), rest.len() as u64, "all of the body read");
                    return (found, Step::End);
                }
                other => return (found, other),
            }
        }
    }

    fn body(parts: &[(&[u8], &[u8])], preamble: &[u8], epilogue: &[u8]) -> Vec<u8> {
        let mut body = preamble.to_vec();
        for (headers, data) in parts {
            body.extend_from_slice(b"--XyZ\r\n");
            body.extend_from_slice(headers);
            body.extend_from_slice(b"\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"--XyZ--\r\n");
        body.extend_from_slice(epilogue);
        body
    }

    #[test]
    fn parts_arrive_whole_wherever_the_server_buffer_ends() {
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // Data that holds the delimiter's first bytes, and a boundary cut across reads.
        let tricky = b"a\r\n--XyX not it\r\n-\r\n--Xy".to_vec();
        let first = b"Content-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n".as_slice();
        let sent = body(
            &[(first, &big), (b"", &tricky), (b"X-Other: 1\r\n", b"")],
            b"preamble\r\n",
            b"epilogue",
        );
        for prefix in [0, 1, 12, 40, 100_000, sent.len() - 3, sent.len()] {
            let (found, end) = parts(&sent, prefix, b"GET / HTTP/1.1\r\n");
            assert_eq!(end, Step::End, "prefix {prefix}");
            assert_eq!(found.len(), 3);
            assert_eq!(found[0].0, first);
            assert!(found[0].1 == big, "prefix {prefix}: first part differs");
            assert_eq!(found[1], (Vec::new(), tricky.clone()));
            assert_eq!(found[2], (b"X-Other: 1\r\n".to_vec(), Vec::new()));
        }
    }

    #[test]
    fn the_boundary_followed_by_other_bytes_is_data_as_go_reads_it() {
        // In data, and in the preamble: each of these is the delimiter's bytes and one more.
        let tricky = b"1\r\n--XyZX\r\n2\r\n--XyZ-x\r\n--XyZ_".to_vec();
        let first = b"A: b\r\n".as_slice();
        let sent = body(
            &[(first, &tricky), (first, b"--XyZz")],
            b"--XyZpre\r\n",
            b"",
        );
        for prefix in 0..sent.len() {
            let (found, end) = parts(&sent, prefix, b"");
            assert_eq!(end, Step::End, "prefix {prefix}");
            assert_eq!(
                found,
                vec![
                    (first.to_vec(), tricky.clone()),
                    (first.to_vec(), b"--XyZz".to_vec())
                ],
                "prefix {prefix}"
            );
        }
        // A lone `-` after the boundary at the body's very end decides nothing: it is data, and
        // the body has no closing delimiter.
        let (_, end) = parts(b"--XyZ\r\nA: b\r\n\r\nx\r\n--XyZ-", 0, b"");
        assert_eq!(
            end,
            Step::Malformed("the body ended before its closing boundary")
        );
    }

    #[test]
    fn a_body_that_opens_with_its_delimiter_and_has_padding() {
        let sent = b"--XyZ \t\r\nA: b\r\n\r\nhello\r\n--XyZ--".to_vec();
        let (found, end) = parts(&sent, 0, b"");
        assert_eq!(end, Step::End);
        assert_eq!(found, vec![(b"A: b\r\n".to_vec(), b"hello".to_vec())]);
    }

    #[test]
    fn malformed_bodies_are_named() {
        let cases: [(&[u8], &str); 5] = [
            (
                b"--XyZ\r\nA: b\r\n\r\nno end",
                "the body ended before its closing boundary",
            ),
            (
                b"--XyZ\r\nA: b\r\n",
                "the body ended inside a part's headers",
            ),
            (b"--XyZ junk\r\n\r\n", "a boundary is not followed by CRLF"),
            (
                b"--XyZjunk\r\n\r\n",
                "the body ended before its closing boundary",
            ),
            (
                b"no delimiter at all",
                "the body ended before its closing boundary",
            ),
        ];
        for (sent, why) in cases {
            let (_, end) = parts(sent, 0, b"");
            assert_eq!(
                end,
                Step::Malformed(why),
                "{:?}",
                String::from_utf8_lossy(sent)
            );
        }
        let mut huge = b"--XyZ\r\nA: ".to_vec();
        huge.extend(std::iter::repeat_n(b'b', MAX_HEADERS + 10));
        huge.extend_from_slice(b"\r\n\r\ndata\r\n--XyZ--");
        let (_, end) = parts(&huge, 0, b"");
        assert_eq!(
            end,
            Step::Malformed("a part's headers are larger than 16 KiB")
        );
    }

    #[test]
    fn a_client_that_leaves_midway_is_closed_and_a_silent_one_times_out() {
        let sent = b"--XyZ\r\nA: b\r\n\r\nsome data";
        let socket = socket_with(sent);
        let mut reader = MultipartReader::new(b"XyZ", b"", 1000, IDLE, None);
        let fd = socket.as_raw_fd();
        assert_eq!(
            reader.next_part(fd).unwrap(),
            Step::Part(b"A: b\r\n".to_vec())
        );
        let end = reader.copy_part(fd, None).unwrap();
        assert_eq!(end, Step::Ended(Received::Closed(sent.len() as u64)));

        let (socket, _peer) = UnixStream::pair().unwrap();
        socket.set_nonblocking(true).unwrap();
        let mut reader =
            MultipartReader::new(b"XyZ", b"--XyZ\r\n", 100, Duration::from_millis(50), None);
        let end = reader.next_part(socket.as_raw_fd()).unwrap();
        // Silent from the start: the idle time and the pace's first deadline are the same moment.
        assert!(
            matches!(
                end,
                Step::Ended(Received::TimedOut(0) | Received::TooSlow(0))
            ),
            "{end:?}"
        );
    }
}
