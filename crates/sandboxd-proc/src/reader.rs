//! Draining a child's output descriptors. The kernel buffers what the child writes (64 KiB per
//! pipe by default; a few KiB in the PTY line discipline) and blocks the child's `write(2)` when
//! the buffer is full (a child's stdout pipe is enlarged to 1 MiB once it floods, within a budget:
//! see [`crate::pipesize`]). We read as soon as `poll(2)` reports data, in chunks of up to
//! [`PIPE_CHUNK_BYTES`] / [`PTY_CHUNK_BYTES`], and hand every chunk to the ring, which may make us
//! wait for the leading subscriber (flow control, bounded by the stall timeout; see the crate
//! docs) — while we wait, the full pipe paces the child. A pipe ends with `read` returning 0; a
//! PTY master ends with `EIO` once every slave descriptor is closed.
//!
//! One thread per process runs this loop over that process's (at most two) descriptors; see the
//! crate docs for why threads rather than a shared epoll loop.
//!
//! A PTY master is read by [`pump_pty`] instead, which gathers its reads while it floods. The line
//! discipline hands over at most ~4 KiB per read (its read buffer, `N_TTY_BUF_SIZE`), and each read
//! is one turn of a three-party cycle in the kernel: our read wakes the writer (the child, in
//! `write(2)` to the slave), whose write queues the tty's flush work (a kworker), which moves the
//! bytes into the master's read buffer and wakes us. A direct reader of a PTY pays that cycle per
//! 4 KiB too; what the agent must not add is its own work per 4 KiB on top. Pushed one read at a
//! time, each 4 KiB also cost a chunk, a ring lock and, often, an eventfd write that woke the
//! subscriber's thread, which sent a 4 KiB Connect frame that woke the client: on 2 cores those
//! wake-ups competed with the cycle itself, and 64 MiB of PTY output went out as ~12,000 frames.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll, ppoll};
use nix::sys::time::TimeSpec;

use crate::fanout::Output;
use crate::fdio;
use crate::pipesize::{self, Enlarged};
use crate::ring::Stream;

/// Largest read from a stdout/stderr pipe: 256 KiB. A child's stdout pipe is enlarged to 1 MiB
/// at its first full read, when the budget allows ([`crate::STDOUT_PIPE_BYTES`]), so a flooding child is drained in a few
/// large reads per wake-up instead of two 32 KiB ones per 64 KiB; a quarter of the pipe (and of
/// the 1 MiB ring) per chunk lets the ring take the next read while the subscriber still holds
/// the last ones. Measured end to end (256 MiB through the agent, same run): 1 MiB pipe with
/// 256 KiB reads 0.27–0.29 s of agent CPU, with 1 MiB reads 0.25–0.26 s, the old 64 KiB pipe with
/// 32 KiB reads 0.38 s. The read buffer starts at [`FIRST_READ_BYTES`] and doubles only while
/// reads fill it, so a process that writes little keeps a small buffer.
pub const PIPE_CHUNK_BYTES: usize = 256 * 1024;

/// First read buffer of a pipe: 32 KiB, envd's read size, plenty for anything but a flood.
const FIRST_READ_BYTES: usize = 32 * 1024;

/// Read size for a PTY master: 16 KiB, as envd (creack/pty). The line discipline hands over about
/// 4 KiB per read whatever the buffer, so 4, 16 and 64 KiB measured the same (see the crate docs).
pub const PTY_CHUNK_BYTES: usize = 16 * 1024;

/// Largest chunk [`pump_pty`] gathers from a flooding PTY's reads: 64 KiB, sixteen of the line
/// discipline's ~4 KiB reads, so a flood costs the ring, the subscriber and the client one chunk,
/// one wake-up and one frame per 64 KiB instead of per 4 KiB. (The agent hands a binary stream's
/// socket to a writer thread once a batch reaches 64 KiB, so a PTY flood now reaches it with its
/// first full chunk.) Capped at a quarter of the ring, so that a small ring still holds several.
pub const PTY_GATHER_BYTES: usize = 64 * 1024;

/// The longest gathered PTY output waits for more before it is pushed: 1 ms. Only output that
/// follows another read by less than this is gathered at all (a flood); the first read after a
/// quiet moment (a prompt, the echo of a keystroke) is pushed at once, so interactive use sees no
/// added latency, and the tail of a burst at most this much.
pub const PTY_GATHER_WAIT: Duration = Duration::from_millis(1);

/// Reads per descriptor before going back to `poll`, so that a flooded stdout cannot starve stderr.
const READS_PER_WAKEUP: usize = 4;

/// How long [`pump`] waits before it polls again once it has emptied a stdout pipe that is
/// flooding (emptied again less than [`PIPE_FLOOD_WINDOW`] after the last time): 50 µs, in which
/// a child writing at a direct reader's 2-5 GB/s puts 100-250 KiB more into its pipe.
///
/// Without it the output path has two steady states and a flood can fall into the slow one for
/// good. A pipe wakes its reader at every write that finds it empty; a reader that keeps up with
/// the child (`head` writes 4 KiB at a time) empties the pipe at each wake-up, so every few KiB
/// become a chunk, an eventfd wake-up of the subscriber's thread, a Connect frame and a wake-up of
/// the client, and that work per chunk is what keeps the reader from ever falling behind far
/// enough to read more at once (nor to fill a read, which is what enlarges the pipe and grows the
/// read: see [`drain`]). With the wait the pipe fills meanwhile, so the next read is large, and
/// the first full one enlarges the pipe. Measured (`head -c … /dev/zero` to the bench's binary
/// client, two agents alternating; frames per run, MB/s):
///
/// | size, rounds | without the wait: frames, worst; MB/s median (slowest) | with it |
/// |---|---|---|
/// | 256 MiB, 30 | 11 runs over 800, up to 8,441; 1,040 (572) | 3 over 500, up to 1,395; 1,133 (791) |
/// | 64 MiB, 40 | up to 11,137; 1,025 (215) | up to 670; 1,071 (621) |
/// | 2 MiB, 40 | up to 473 (4 KiB frames); 269 (40) | up to 11; 302 (172) |
///
/// A child that writes less often than every [`PIPE_FLOOD_WINDOW`] is never waited for, so its
/// output goes out at once, as before; a flood's last bytes, and its end, wait at most this once.
const PIPE_FLOOD_NAP: Duration = Duration::from_micros(50);

/// See [`PIPE_FLOOD_NAP`]: 1 ms between two emptyings of the pipe makes a flood, as
/// [`PTY_GATHER_WAIT`] does for a PTY's reads.
const PIPE_FLOOD_WINDOW: Duration = Duration::from_millis(1);

/// Tells a flood from output that comes now and then, by when a pipe was last emptied.
#[derive(Default)]
struct FloodClock {
    emptied_at: Option<Instant>,
}

impl FloodClock {
    /// The pipe was emptied at `now`: whether that came less than [`PIPE_FLOOD_WINDOW`] after
    /// the last time (the first emptying is never a flood).
    fn emptied(&mut self, now: Instant) -> bool {
        let flood = self
            .emptied_at
            .is_some_and(|then| now.saturating_duration_since(then) < PIPE_FLOOD_WINDOW);
        self.emptied_at = Some(now);
        flood
    }
}

/// Whether a descriptor still has output to come, and whether the last read emptied it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Read until it would block, or a read came back short: the descriptor is empty for now.
    Emptied,
    /// Stopped after [`READS_PER_WAKEUP`] full reads: there may be more waiting.
    More,
    Closed,
}

/// Reads every source until it reaches end-of-file, pushing each read into `output` as one chunk
/// of up to `chunk_bytes`. The sources must be non-blocking. Returns when all have ended; each
/// source is closed as soon as it ends.
pub(crate) fn pump(mut sources: Vec<(OwnedFd, Stream)>, chunk_bytes: usize, output: &Output) {
    let chunk_bytes = chunk_bytes.max(1);
    let mut buf = vec![0u8; chunk_bytes.min(FIRST_READ_BYTES)];
    // The stdout pipe's share of the enlarged-pipe budget ([`pipesize`]): `None` until tried, at
    // the first read that fills the buffer, so only a process that floods its stdout holds one.
    // Given back when this returns, once every source is closed.
    let mut stdout_pipe: Option<Option<Enlarged>> = None;
    let mut evicted = Vec::new();
    let mut clock = FloodClock::default();
    while !sources.is_empty() {
        let ready: Vec<bool> = {
            let mut fds: Vec<PollFd<'_>> = sources
                .iter()
                .map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                // Cannot happen with valid descriptors; treat it as the end of all of them
                // rather than spinning.
                Err(_) => return,
            }
            fds.iter()
                .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
                .collect()
        };
        let mut index = 0;
        // Whether this wake-up emptied stdout while it floods: then wait before the next poll.
        let mut flooding = false;
        sources.retain(|(fd, stream)| {
            let is_ready = ready[index];
            index += 1;
            if !is_ready {
                return true;
            }
            let status = drain(
                fd,
                *stream,
                &mut buf,
                chunk_bytes,
                &mut stdout_pipe,
                &mut evicted,
                output,
            );
            if *stream == Stream::Stdout && status == Status::Emptied {
                flooding = clock.emptied(Instant::now());
            }
            status != Status::Closed
        });
        if flooding && !sources.is_empty() {
            std::thread::sleep(PIPE_FLOOD_NAP);
        }
    }
}

/// Reads from one ready descriptor until it would block, reads short, ends, or has been read
/// [`READS_PER_WAKEUP`] times. A read that fills `buf` doubles it, up to `max_bytes`, and the
/// first such read from stdout enlarges its pipe.
fn drain(
    fd: &OwnedFd,
    stream: Stream,
    buf: &mut Vec<u8>,
    max_bytes: usize,
    stdout_pipe: &mut Option<Option<Enlarged>>,
    evicted: &mut Vec<Arc<[u8]>>,
    output: &Output,
) -> Status {
    let mut reads = 0;
    while reads < READS_PER_WAKEUP {
        // A pipe is read straight into a chunk of the size it holds (no copy out of `buf`); a PTY,
        // ~4 KiB a read, and a pipe that looks empty, are read into `buf`.
        let direct = match stream {
            Stream::Pty => Ok(None),
            Stream::Stdout | Stream::Stderr => fdio::read_chunk(fd.as_fd(), buf.len()),
        };
        let read = match direct {
            Ok(Some(chunk)) => Ok((chunk.len(), Some(chunk))),
            Ok(None) => nix::unistd::read(fd, buf).map(|n| (n, None)),
            Err(errno) => Err(errno),
        };
        match read {
            Ok((0, _)) => return Status::Closed,
            Ok((n, chunk)) => {
                reads += 1;
                output.push(
                    stream,
                    chunk.unwrap_or_else(|| Arc::from(&buf[..n])),
                    evicted,
                );
                if n < buf.len() {
                    return Status::Emptied;
                }
                if buf.len() < max_bytes {
                    buf.resize((buf.len() * 2).min(max_bytes), 0);
                }
                if stream == Stream::Stdout && stdout_pipe.is_none() {
                    *stdout_pipe = Some(pipesize::enlarge(fd.as_fd()));
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Status::Emptied,
            // EIO is the PTY master's end-of-file; any other error also ends this source.
            Err(_) => return Status::Closed,
        }
    }
    Status::More
}

/// Reads a PTY master (non-blocking) until it ends (`EIO` once every slave descriptor is closed),
/// in reads of up to `read_bytes`, gathering them into chunks of up to `gather_bytes` while it
/// floods (see [`PTY_GATHER_BYTES`] and [`PTY_GATHER_WAIT`]). Everything gathered is pushed before
/// this returns, in order, so the end the caller records next still comes after all the output.
///
/// It reads again at once after a read, and waits in `poll` only once a read finds nothing
/// (`EAGAIN`). A read of a master that finds its buffer empty first waits for the tty's flush work
/// in flight (`tty_buffer_flush_work` in `n_tty_read`), which the previous read set going, so in a
/// flood it nearly always returns the next ~4 KiB without sleeping in `poll` and being woken: `poll`
/// before every read (as [`pump`] does for pipes) measured 45–67 MB/s for 64 MiB where a blocking
/// read, or this, measured 84–121 (a C reader, same runs, 4 rounds; `EAGAIN` on 3–27 % of reads).
pub(crate) fn pump_pty(fd: OwnedFd, read_bytes: usize, gather_bytes: usize, output: &Output) {
    let read_bytes = read_bytes.max(1);
    let gather_bytes = gather_bytes.max(read_bytes);
    // Bytes `[..len]` are read and not yet pushed; zeroed once, then read into in place.
    let mut buf = vec![0u8; gather_bytes];
    let mut len = 0;
    // When the gathered bytes must go out: the first one's read plus `PTY_GATHER_WAIT`.
    let mut due: Option<Instant> = None;
    let mut last_read: Option<Instant> = None;
    let mut evicted = Vec::new();
    let mut flush = |len: &mut usize, due: &mut Option<Instant>, buf: &[u8]| {
        if *len > 0 {
            output.push(Stream::Pty, Arc::from(&buf[..*len]), &mut evicted);
        }
        *len = 0;
        *due = None;
    };
    loop {
        let want = read_bytes.min(gather_bytes - len);
        match nix::unistd::read(&fd, &mut buf[len..len + want]) {
            Ok(0) => break,
            Ok(n) => {
                let now = Instant::now();
                let flooding = last_read.is_some_and(|t| now.duration_since(t) < PTY_GATHER_WAIT);
                last_read = Some(now);
                len += n;
                let due_at = *due.get_or_insert(now + PTY_GATHER_WAIT);
                if !flooding || len == gather_bytes || now >= due_at {
                    flush(&mut len, &mut due, &buf);
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => {
                // Nothing to read now: wait for more, or, with output gathered, at most until it is due.
                let left = due.map(|due| due.saturating_duration_since(Instant::now()));
                if left.is_some_and(|left| left.is_zero()) {
                    flush(&mut len, &mut due, &buf);
                    continue;
                }
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                match ppoll(&mut fds, left.map(TimeSpec::from_duration), None) {
                    Ok(0) => flush(&mut len, &mut due, &buf),
                    Ok(_) | Err(Errno::EINTR) => {}
                    // Cannot happen with a valid descriptor; end rather than spin.
                    Err(_) => break,
                }
            }
            // EIO is the master's end-of-file; any other error also ends it.
            Err(_) => break,
        }
    }
    flush(&mut len, &mut due, &buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_a_pipe_emptied_again_within_the_window() {
        let start = Instant::now();
        let mut clock = FloodClock::default();
        assert!(!clock.emptied(start), "the first emptying is never a flood");
        assert!(clock.emptied(start + Duration::from_micros(40)));
        let later = start + Duration::from_micros(40) + PIPE_FLOOD_WINDOW;
        assert!(
            !clock.emptied(later),
            "a whole window after the last is not a flood"
        );
        assert!(clock.emptied(later + PIPE_FLOOD_WINDOW - Duration::from_nanos(1)));
    }
}
