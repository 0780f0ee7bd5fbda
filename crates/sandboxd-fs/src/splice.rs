//! Moving the rest of a request body from a socket into a file without copying it through user
//! space: `splice(2)` moves the socket's received pages into a pipe (no copy), and a second
//! `splice` writes the pipe into the file (one copy, into the page cache), where `read(2)` plus
//! `write(2)` copy every byte twice and wake a user-space reader for every piece.
//!
//! The socket is the server's, non-blocking, and shared with its event loop (which does not read it
//! meanwhile); this module waits for it with `poll(2)`. A client that sends nothing for `idle` is
//! given up on ([`Received::TimedOut`]); one that closes its side early leaves a short count
//! ([`Received::Closed`]). A client that sends, but slower than [`MIN_RATE`] on average once `idle`
//! has passed, is given up on too ([`Received::TooSlow`]): otherwise one byte per `idle` less a
//! moment would hold the worker thread for `len` times `idle` (Apache's `mod_reqtimeout` has the same
//! rule, `body=...,MinRate=...`; Go's `net/http`, envd's server, has only a whole-request
//! `ReadTimeout`, which envd leaves off, and a goroutine per connection is cheap where a thread is not).
//!
//! The server stops a move (it is shutting down, the connection is lost) through a stop descriptor,
//! an eventfd it makes readable: it wakes the wait, and it is checked between pieces
//! ([`Received::Stopped`]). `shutdown(SHUT_RD)` on the socket is not enough: the kernel still hands
//! out the bytes already queued (and a fast client keeps the queue full), so the move went on. Exactly `len` bytes are taken from the socket and no more: whatever
//! the client sent after the body (a pipelined request) stays there for the server.
//!
//! Where the kernel refuses to splice (`EINVAL`: a file system without `splice_write`, a socket
//! type without `splice_read`), the same loop runs with `read(2)`/`write(2)` through a buffer.

#![allow(unsafe_code)] // splice(2), poll(2), read(2): libc calls on descriptors the caller keeps open

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Bytes one `splice` asks for, and the pipe's size (`F_SETPIPE_SZ`): 1 MiB is Linux's default
/// `pipe-max-size`, so it is granted without privilege, and it moves a fast sender's data in a few
/// calls per MiB (the default 64 KiB pipe needs one call pair per 64 KiB).
pub const PIPE_SIZE: usize = 1 << 20;

/// The slowest average a body may arrive at, in bytes per second, once the first `idle` has passed:
/// the deadline is `idle` plus one second per `MIN_RATE` bytes moved. 4 KiB/s is a 32 kbit/s link,
/// slower than any link an upload of a megabyte or more (the only bodies moved here) is sent over (a
/// user on a poor mobile link must not get a 408), while a client that wants to hold a thread for
/// an hour must send 14 MiB.
pub const MIN_RATE: u64 = 4 << 10;

/// The read/write fallback's buffer: one allocation per body, as big as a pipe's worth.
const FALLBACK_BUFFER: usize = PIPE_SIZE;

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// All `len` bytes are in the file.
    Complete,
    /// The client closed its side (or reset the connection) after this many bytes.
    Closed(u64),
    /// Nothing arrived for `idle` after this many bytes.
    TimedOut(u64),
    /// The body arrived slower than [`MIN_RATE`] (after `idle`); this many bytes had come.
    TooSlow(u64),
    /// The stop descriptor became readable after this many bytes.
    Stopped(u64),
}

/// What a transfer must keep to: its deadline (`idle` from its start, plus a second per
/// [`MIN_RATE`] bytes), and its stop descriptor.
pub(crate) struct Pace {
    started: Instant,
    idle: Duration,
    stop: Option<RawFd>,
}

impl Pace {
    pub(crate) fn new(idle: Duration, stop: Option<RawFd>) -> Self {
        Self {
            started: Instant::now(),
            idle,
            stop,
        }
    }

    /// Checked before each piece: why the transfer ends now, if it does.
    pub(crate) fn check(&self, moved: u64) -> Option<Received> {
        if self.stop.is_some_and(readable_now) {
            Some(Received::Stopped(moved))
        } else if self.behind(moved) {
            Some(Received::TooSlow(moved))
        } else {
            None
        }
    }

    /// When the body must have gone past `moved` bytes; None when the clock cannot add that far.
    fn deadline(&self, moved: u64) -> Option<Instant> {
        let earned = Duration::from_micros(
            (u128::from(moved) * 1_000_000 / u128::from(MIN_RATE)).min(u128::from(u64::MAX)) as u64,
        );
        self.started.checked_add(self.idle)?.checked_add(earned)
    }

    /// Whether `moved` bytes came too late.
    fn behind(&self, moved: u64) -> bool {
        self.deadline(moved).is_some_and(|d| Instant::now() >= d)
    }

    /// Waits for the socket to become readable: within `idle` and the deadline. None when it did;
    /// otherwise why the transfer ends.
    pub(crate) fn wait(&self, socket: RawFd, moved: u64) -> Option<Received> {
        let left = self.deadline(moved).map_or(self.idle, |d| {
            self.idle.min(d.saturating_duration_since(Instant::now()))
        });
        match wait_readable(socket, self.stop, left) {
            Wake::Ready => return None,
            Wake::Stop => return Some(Received::Stopped(moved)),
            Wake::Quiet => {}
        }
        if self.behind(moved) {
            Some(Received::TooSlow(moved))
        } else {
            Some(Received::TimedOut(moved))
        }
    }
}

/// Which side of the transfer failed.
#[derive(Debug)]
pub enum Failure {
    /// Writing the file failed (`ENOSPC`, `EDQUOT`, `EIO`): the upload's error.
    File(io::Error),
    /// Setting up the transfer (a pipe) failed.
    Setup(io::Error),
}

/// Moves exactly `len` bytes from `socket` (a non-blocking stream socket, open for the whole call)
/// to `file` at its current position, until `stop` (a descriptor, open for the whole call) becomes
/// readable; see the module documentation.
pub fn receive(
    socket: RawFd,
    file: &File,
    len: u64,
    idle: Duration,
    stop: Option<RawFd>,
) -> Result<(u64, Received), Failure> {
    if len == 0 {
        return Ok((0, Received::Complete));
    }
    let (read_end, write_end) = pipe().map_err(Failure::Setup)?;
    // A smaller pipe still works (the loop asks for what fits); only the call count grows.
    // SAFETY: F_SETPIPE_SZ on a pipe this function owns; no pointers are passed.
    unsafe {
        libc::fcntl(
            write_end.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_SIZE as libc::c_int,
        )
    };
    let pace = Pace::new(idle, stop);
    let mut moved = 0u64;
    while moved < len {
        if let Some(end) = pace.check(moved) {
            return Ok((moved, end));
        }
        let want = (len - moved).min(PIPE_SIZE as u64) as usize;
        // SAFETY: both descriptors are open (the caller's socket, this function's pipe); null
        // offsets mean "the descriptor's own position", as splice(2) requires for a socket and pipe.
        let n = unsafe {
            libc::splice(
                socket,
                std::ptr::null_mut(),
                write_end.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n > 0 {
            drain_pipe(&read_end, file, n as usize).map_err(Failure::File)?;
            moved += n as u64;
            continue;
        }
        if n == 0 {
            return Ok((moved, Received::Closed(moved)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => {
                if at_urgent_mark(socket) {
                    // splice(2) stops at TCP urgent data's mark and says EAGAIN while poll(2) says
                    // readable: the loop would spin, never idle. read(2) steps over the urgent byte
                    // (out of band, as the event loop's recv does) and takes what follows it.
                    match read_into(socket, file, len - moved)? {
                        Step::Moved(n) => {
                            moved += n as u64;
                            continue;
                        }
                        Step::Closed => return Ok((moved, Received::Closed(moved))),
                        Step::Empty => {}
                    }
                }
                if let Some(end) = pace.wait(socket, moved) {
                    return Ok((moved, end));
                }
            }
            Some(libc::EINTR) => {}
            Some(libc::EINVAL) if moved == 0 => return receive_copying(socket, file, len, pace),
            _ => return Ok((moved, Received::Closed(moved))), // ECONNRESET and the like: the client is gone
        }
    }
    Ok((moved, Received::Complete))
}

/// Writes the `count` bytes in the pipe to `file` (at its position), blocking on the disk.
fn drain_pipe(read_end: &OwnedFd, file: &File, mut count: usize) -> io::Result<()> {
    while count > 0 {
        // SAFETY: the pipe and the file are open for the call; null offsets use their positions.
        let n = unsafe {
            libc::splice(
                read_end.as_raw_fd(),
                std::ptr::null_mut(),
                file.as_raw_fd(),
                std::ptr::null_mut(),
                count,
                libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if err.raw_os_error() == Some(libc::EINVAL) {
                return copy_pipe(read_end, file, count); // the file system cannot splice_write
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "splice wrote nothing",
            ));
        }
        count -= n as usize;
    }
    Ok(())
}

/// The pipe's `count` bytes written with `read`/`write`, for a file that cannot take a splice.
fn copy_pipe(read_end: &OwnedFd, mut file: &File, mut count: usize) -> io::Result<()> {
    let mut buffer = vec![0u8; count.min(FALLBACK_BUFFER)];
    while count > 0 {
        let n = read_fd(
            read_end.as_raw_fd(),
            &mut buffer[..count.min(FALLBACK_BUFFER)],
        )?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "pipe emptied early",
            ));
        }
        file.write_all(&buffer[..n])?;
        count -= n;
    }
    Ok(())
}

/// The same transfer through a buffer, where the socket cannot be spliced.
fn receive_copying(
    socket: RawFd,
    mut file: &File,
    len: u64,
    pace: Pace,
) -> Result<(u64, Received), Failure> {
    let mut buffer = vec![0u8; (len.min(FALLBACK_BUFFER as u64)) as usize];
    let mut moved = 0u64;
    while moved < len {
        if let Some(end) = pace.check(moved) {
            return Ok((moved, end));
        }
        let want = (len - moved).min(buffer.len() as u64) as usize;
        match read_fd(socket, &mut buffer[..want]) {
            Ok(0) => return Ok((moved, Received::Closed(moved))),
            Ok(n) => {
                file.write_all(&buffer[..n]).map_err(Failure::File)?;
                moved += n as u64;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if let Some(end) = pace.wait(socket, moved) {
                    return Ok((moved, end));
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(_) => return Ok((moved, Received::Closed(moved))),
        }
    }
    Ok((moved, Received::Complete))
}

/// How a [`send_file`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// All of it went.
    Done,
    /// The file ended first (it shrank since its size was taken).
    Short,
    /// The peer left (or reset the connection).
    Closed,
    /// The peer took no byte for `idle`: its connection is given up on, as the event loop's
    /// idle timeout gives up on a client that sends nothing.
    Stalled,
    /// The stop descriptor became readable.
    Stopped,
    /// The kernel cannot `sendfile` from this file (`EINVAL`, `ENOSYS`); nothing was sent.
    Unsupported,
}

/// Bytes one `sendfile(2)` is asked for: the kernel sends what the socket's buffer takes anyway.
const SEND_STEP: usize = 4 << 20;

/// Sends `len` bytes of `file`, from its position (which moves on), to `socket` (non-blocking,
/// shared with an event loop that does not write it meanwhile) with `sendfile(2)`: the page
/// cache's pages go to the socket without a copy through user space. Waits for room with
/// `poll(2)`, at most `idle` at a time ([`Sent::Stalled`]: a client that stops reading would
/// otherwise hold the thread, and the file, for as long as it keeps the connection open), and stops
/// when `stop` (an eventfd) becomes readable. A failed read of the file (`EIO`) is the error; see
/// [`Sent`] for the rest.
pub fn send_file(
    file: &File,
    socket: RawFd,
    len: u64,
    stop: RawFd,
    idle: Duration,
) -> io::Result<(u64, Sent)> {
    let mut sent = 0u64;
    while sent < len {
        if readable_now(stop) {
            return Ok((sent, Sent::Stopped));
        }
        let want = (len - sent).min(SEND_STEP as u64) as usize;
        // SAFETY: both descriptors are open for the call; a null offset means the file's position.
        let n = unsafe { libc::sendfile(socket, file.as_raw_fd(), std::ptr::null_mut(), want) };
        if n > 0 {
            sent += n as u64;
            continue;
        }
        if n == 0 {
            return Ok((sent, Sent::Short));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => match wait_for(socket, libc::POLLOUT, Some(stop), idle) {
                Wake::Ready => {}
                Wake::Stop => return Ok((sent, Sent::Stopped)),
                Wake::Quiet => return Ok((sent, Sent::Stalled)),
            },
            Some(libc::EINTR) => {}
            Some(libc::EINVAL | libc::ENOSYS) if sent == 0 => return Ok((0, Sent::Unsupported)),
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ETIMEDOUT) => {
                return Ok((sent, Sent::Closed));
            }
            _ => return Err(err),
        }
    }
    Ok((sent, Sent::Done))
}

/// `SIOCATMARK` (`<asm-generic/sockios.h>`; not in the libc crate for Linux): whether a socket's
/// next byte is at TCP urgent data's mark.
const SIOCATMARK: libc::Ioctl = 0x8905;

/// Bytes [`read_into`] reads at an urgent mark: once per urgent byte a client sends, so small.
const MARK_READ: usize = 64 << 10;

/// Whether the socket's reading position is at TCP urgent data's mark (false on any error).
fn at_urgent_mark(socket: RawFd) -> bool {
    let mut at: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one c_int through the pointer, which points at one.
    let done = unsafe { libc::ioctl(socket, SIOCATMARK, &mut at as *mut libc::c_int) };
    done == 0 && at != 0
}

/// What one [`read_into`] did.
enum Step {
    Moved(usize),
    Closed,
    Empty,
}

/// One `read(2)` of at most `left` bytes (and [`MARK_READ`]) from the socket, written to `file`.
fn read_into(socket: RawFd, mut file: &File, left: u64) -> Result<Step, Failure> {
    let mut buffer = vec![0u8; left.min(MARK_READ as u64) as usize];
    loop {
        return match read_fd(socket, &mut buffer) {
            Ok(0) => Ok(Step::Closed),
            Ok(n) => {
                file.write_all(&buffer[..n]).map_err(Failure::File)?;
                Ok(Step::Moved(n))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Ok(Step::Empty),
            Err(_) => Ok(Step::Closed),
        };
    }
}

pub(crate) fn read_fd(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of its length; `fd` is open for the call.
    let n = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// What a wait saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The socket is readable (or closed, or failed: the next read says which).
    Ready,
    /// The stop descriptor is readable.
    Stop,
    /// Neither, within the time.
    Quiet,
}

/// Waits until `fd` becomes readable (or closed, or failed), or `stop` does, within `idle`. An
/// `idle` past what the clock can add (an absurd `--idle-timeout`) waits without a deadline.
fn wait_readable(fd: RawFd, stop: Option<RawFd>, idle: Duration) -> Wake {
    wait_for(fd, libc::POLLIN | libc::POLLRDHUP, stop, idle)
}

/// Waits until `fd` has one of `events` (or is closed, or failed), or `stop` is readable, within
/// `idle` (without a deadline past what the clock can add).
fn wait_for(fd: RawFd, events: libc::c_short, stop: Option<RawFd>, idle: Duration) -> Wake {
    let deadline = Instant::now().checked_add(idle);
    loop {
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let timeout = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        let mut pfds = [
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.unwrap_or(-1), // a negative descriptor is skipped by poll(2)
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, as the count says.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, timeout) };
        if n > 0 {
            return if pfds[1].revents != 0 {
                Wake::Stop
            } else {
                Wake::Ready
            };
        }
        if n == 0 {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Wake::Quiet;
            }
            continue; // poll's timeout is in whole milliseconds, rounded down
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Wake::Ready; // let the next read report it
        }
    }
}

/// Whether `fd` (the stop descriptor) is readable now, or failed (a bad descriptor stops the move
/// too): one `poll(2)` that does not wait.
fn readable_now(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, as the count says.
    unsafe { libc::poll(&mut pfd, 1, 0) != 0 }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::thread;

    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (client, server)
    }

    fn read_back(mut file: File) -> Vec<u8> {
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut out = Vec::new();
        file.read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn moves_exactly_len_bytes_and_leaves_the_rest_in_the_socket() {
        let (mut client, mut server) = connected();
        let body = pattern(5 << 20);
        let sent = body.clone();
        let writer = thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.write_all(b"NEXT").unwrap();
            client
        });
        let file = tempfile::tempfile().unwrap();
        let got = receive(
            server.as_raw_fd(),
            &file,
            body.len() as u64,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        assert_eq!(got, (body.len() as u64, Received::Complete));
        let _client = writer.join().unwrap();
        server.set_nonblocking(false).unwrap();
        let mut next = [0u8; 4];
        server.read_exact(&mut next).unwrap();
        assert_eq!(&next, b"NEXT");
        assert_eq!(read_back(file), body);
    }

    #[test]
    fn the_read_write_fallback_moves_the_same_bytes() {
        let (mut client, mut server) = connected();
        let body = pattern((2 << 20) + 17);
        let sent = body.clone();
        let writer = thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client.write_all(b"NEXT").unwrap();
            client
        });
        let file = tempfile::tempfile().unwrap();
        let (moved, received) = receive_copying(
            server.as_raw_fd(),
            &file,
            body.len() as u64,
            Pace::new(Duration::from_secs(5), None),
        )
        .unwrap();
        assert_eq!((moved, received), (body.len() as u64, Received::Complete));
        let client = writer.join().unwrap();
        server.set_nonblocking(false).unwrap();
        let mut next = [0u8; 4];
        server.read_exact(&mut next).unwrap();
        assert_eq!(&next, b"NEXT");
        assert_eq!(read_back(file), body);
        client.shutdown(Shutdown::Write).unwrap();
        server.set_nonblocking(true).unwrap();
        let file = tempfile::tempfile().unwrap();
        let got = receive_copying(
            server.as_raw_fd(),
            &file,
            10,
            Pace::new(Duration::from_secs(5), None),
        )
        .unwrap();
        assert_eq!(got, (0, Received::Closed(0)));
    }

    #[test]
    fn a_client_that_closes_early_is_a_short_count() {
        let (mut client, server) = connected();
        client.write_all(&pattern(1000)).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let file = tempfile::tempfile().unwrap();
        let got = receive(
            server.as_raw_fd(),
            &file,
            5000,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        assert_eq!(got, (1000, Received::Closed(1000)));
    }

    #[test]
    fn an_idle_timeout_past_the_clock_waits_without_a_deadline() {
        let (mut client, server) = connected();
        client.write_all(b"abc").unwrap();
        assert_eq!(
            wait_readable(server.as_raw_fd(), None, Duration::MAX),
            Wake::Ready
        );
    }

    #[test]
    fn a_silent_client_times_out() {
        let (mut client, server) = connected();
        // 64 KiB earn 16 s at MIN_RATE: the idle timeout, not the rate, is what ends the wait.
        client.write_all(&pattern(64 << 10)).unwrap();
        let file = tempfile::tempfile().unwrap();
        let started = Instant::now();
        let got = receive(
            server.as_raw_fd(),
            &file,
            1 << 20,
            Duration::from_millis(200),
            None,
        )
        .unwrap();
        assert_eq!(got, (64 << 10, Received::TimedOut(64 << 10)));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn a_drip_fed_body_is_cut_off_though_no_wait_reaches_idle() {
        let (mut client, server) = connected();
        let dripping = thread::spawn(move || {
            // One byte per 100 ms, each gap well inside the 300 ms idle timeout, until cut off.
            while client.write_all(b"x").is_ok() {
                thread::sleep(Duration::from_millis(100));
                if client.peer_addr().is_err() {
                    break;
                }
            }
        });
        let (done, got) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let file = tempfile::tempfile().unwrap();
            let started = Instant::now();
            let got = receive(
                server.as_raw_fd(),
                &file,
                1 << 20,
                Duration::from_millis(300),
                None,
            );
            done.send((got.unwrap(), started.elapsed())).unwrap();
        });
        let (got, took) = got
            .recv_timeout(Duration::from_secs(5))
            .expect("the drip still holds the thread");
        assert!(matches!(got.1, Received::TooSlow(_)), "{got:?}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        drop(dripping);
    }

    #[test]
    fn a_stop_ends_a_move_though_bytes_are_queued() {
        let (mut client, server) = connected();
        let body = pattern(4 << 20);
        thread::spawn(move || client.write_all(&body).map(|()| client));
        thread::sleep(Duration::from_millis(200)); // as much as the socket holds is queued
        // The server's stop: SHUT_RD alone still let the queued bytes through.
        server.shutdown(Shutdown::Read).unwrap();
        let stop = eventfd();
        signal(&stop);
        let file = tempfile::tempfile().unwrap();
        let got = receive(
            server.as_raw_fd(),
            &file,
            8 << 20,
            Duration::from_secs(5),
            Some(stop.as_raw_fd()),
        )
        .unwrap();
        assert_eq!(got, (0, Received::Stopped(0)), "moved on after the stop");
    }

    #[test]
    fn a_stop_wakes_a_waiting_move_and_one_between_pieces_ends_it() {
        let (mut client, server) = connected();
        client.write_all(b"abc").unwrap();
        let stop = eventfd();
        let (socket, stop_fd) = (server.as_raw_fd(), stop.as_raw_fd());
        let waiting = thread::spawn(move || {
            let file = tempfile::tempfile().unwrap();
            receive(
                socket,
                &file,
                1 << 20,
                Duration::from_secs(30),
                Some(stop_fd),
            )
            .unwrap()
        });
        thread::sleep(Duration::from_millis(200)); // "abc" moved; the move waits for more
        let started = Instant::now();
        signal(&stop);
        assert_eq!(waiting.join().unwrap(), (3, Received::Stopped(3)));
        assert!(started.elapsed() < Duration::from_secs(5));
        // A client streaming as fast as it can (the socket never runs dry) is stopped as well.
        let (mut client, server) = connected();
        thread::spawn(move || {
            let chunk = vec![7u8; 1 << 20];
            while client.write_all(&chunk).is_ok() {}
        });
        let stop = eventfd();
        let (socket, stop_fd) = (server.as_raw_fd(), stop.as_raw_fd());
        let (done, got) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let sink = File::options().write(true).open("/dev/null").unwrap();
            let got = receive(
                socket,
                &sink,
                u64::MAX,
                Duration::from_secs(30),
                Some(stop_fd),
            );
            done.send(got.unwrap()).unwrap();
        });
        thread::sleep(Duration::from_millis(200));
        signal(&stop);
        let got = got
            .recv_timeout(Duration::from_secs(5))
            .expect("the move went on after the stop");
        assert!(matches!(got.1, Received::Stopped(n) if n > 0), "{got:?}");
        drop(server);
    }

    #[test]
    fn a_send_to_a_client_that_stops_reading_ends_after_idle_and_a_reading_one_gets_it_all() {
        let len: usize = 32 << 20; // far more than both sockets' buffers hold
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&pattern(len)).unwrap();
        let stop = eventfd();

        // Connected, then never read: once the buffers are full, no byte moves for `idle`.
        let (client, server) = connected();
        file.seek(SeekFrom::Start(0)).unwrap();
        let started = Instant::now();
        let (sent, how) = send_file(
            &file,
            server.as_raw_fd(),
            len as u64,
            stop.as_raw_fd(),
            Duration::from_millis(300),
        )
        .unwrap();
        assert_eq!(how, Sent::Stalled, "{sent} bytes sent");
        assert!(sent < len as u64);
        assert!(started.elapsed() >= Duration::from_millis(300));
        drop(client);

        // A client that reads, however slowly between reads, is sent every byte.
        let (mut client, server) = connected();
        file.seek(SeekFrom::Start(0)).unwrap();
        let reader = thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).map(|_| got)
        });
        let (sent, how) = send_file(
            &file,
            server.as_raw_fd(),
            len as u64,
            stop.as_raw_fd(),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((sent, how), (len as u64, Sent::Done));
        drop(server);
        assert!(reader.join().unwrap().unwrap() == pattern(len));
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd(2) takes no pointers; a new descriptor is owned by nobody else.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0);
        // SAFETY: as above.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn signal(stop: &OwnedFd) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: eight valid bytes, as eventfd(2) requires, on an open descriptor.
        assert_eq!(
            unsafe { libc::write(stop.as_raw_fd(), one.as_ptr().cast(), 8) },
            8
        );
    }

    #[test]
    fn a_unix_socket_works_too() {
        let (mut client, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let body = pattern(3 << 20);
        let sent = body.clone();
        let writer = thread::spawn(move || client.write_all(&sent).unwrap());
        let file = tempfile::tempfile().unwrap();
        let got = receive(
            server.as_raw_fd(),
            &file,
            body.len() as u64,
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        writer.join().unwrap();
        assert_eq!(got.1, Received::Complete);
        assert_eq!(read_back(file), body);
    }

    #[test]
    fn an_urgent_byte_is_stepped_over_not_spun_on() {
        let (mut client, server) = connected();
        client.write_all(b"in band, ").unwrap();
        // SAFETY: one valid byte, as the length says, on an open socket.
        let sent =
            unsafe { libc::send(client.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
        assert_eq!(sent, 1);
        client.write_all(b"then more").unwrap();
        thread::sleep(Duration::from_millis(100)); // all of it queued: splice stops at the mark
        let file = tempfile::tempfile().unwrap();
        let started = Instant::now();
        let got = receive(server.as_raw_fd(), &file, 18, Duration::from_secs(5), None).unwrap();
        assert_eq!(got, (18, Received::Complete));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(read_back(file), b"in band, then more");
    }

    #[test]
    fn a_file_that_cannot_grow_is_a_file_failure() {
        let (mut client, server) = connected();
        client.write_all(&pattern(4096)).unwrap();
        let full = File::options().write(true).open("/dev/full").unwrap();
        match receive(
            server.as_raw_fd(),
            &full,
            4096,
            Duration::from_secs(5),
            None,
        ) {
            Err(Failure::File(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOSPC)),
            other => panic!("{other:?}"),
        }
    }
}
