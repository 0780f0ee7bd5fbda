//! A running (or finished) process and what can be done to it. The kernel side: input goes into
//! the stdin pipe or the PTY master (non-blocking, so a write gives up after a bounded time);
//! signals go to the process group with `killpg(2)` (the child is a session and group leader, so
//! this reaches its whole tree unless a descendant moved to another group); resizing is an ioctl
//! on the PTY master.
//!
//! Each process has one named thread, `proc-<pid>`, that reads its output into the ring until EOF,
//! then waits for and reaps the child, closes stdin and the PTY master, and records the [`End`]
//! (a thread kept from an ended process when one is waiting: `readers.rs`).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::fanout::{Output, lock};
use crate::fdio;
use crate::pty::{self, WinSize};
use crate::reader::{PIPE_CHUNK_BYTES, PTY_CHUNK_BYTES, PTY_GATHER_BYTES, pump, pump_pty};
use crate::readers;
use crate::reap;
use crate::ring::{Batch, Cursor, Stream};
use crate::spawn::{self, Io, SpawnOptions};
use crate::status::End;
use crate::subscriber::{StartAt, Subscriber};

/// State shared by the handles of one process, its subscribers and its reader thread.
pub(crate) struct Inner {
    pid: libc::pid_t,
    /// The output ring and its wakers.
    pub(crate) output: Output,
    /// Invariant: `Some` while the stdin pipe is open (pipes mode with stdin enabled, before
    /// `close_stdin` and before the end). Held only to clone or take the `Arc`; writers write
    /// through their clone without this lock, so `close_stdin` never waits for a slow write (the
    /// child sees EOF when the last in-flight write finishes).
    stdin: Mutex<Option<Arc<OwnedFd>>>,
    /// Serializes stdin writes so that two callers' inputs do not interleave. Held for at most the
    /// caller's write timeout.
    stdin_writer: Mutex<()>,
    /// True for a PTY process (whether or not its master is still open).
    has_pty: bool,
    /// Invariant: the PTY master (non-blocking) of a PTY process, `Some` until its end is
    /// recorded; held only to clone or take the `Arc`, as `stdin`. Closed with the end rather than
    /// kept with the ended process (connectable for 30 s): nothing can reach the terminal then,
    /// and every descriptor kept open is copied into each later child's descriptor table and
    /// closed again at its `exec`, 0.1–0.23 µs per descriptor on every spawn (docs/benchmarks.md,
    /// `rtt7`).
    pty: Mutex<Option<Arc<OwnedFd>>>,
    /// Serializes PTY writes, like `stdin_writer`.
    pty_writer: Mutex<()>,
    /// Invariant: false until the reader thread has collected the child's status with `waitpid`.
    /// While false the child is at worst a zombie, so its pid and group id cannot be reused; held
    /// across `killpg` and across that `waitpid` (which does not block: the child has already
    /// terminated), so a signal can never reach a recycled process group.
    reaped: Mutex<bool>,
}

impl Inner {
    pub(crate) fn pid_u32(&self) -> u32 {
        self.pid as u32
    }
}

/// A handle to a spawned process. Cheap to clone; all clones refer to the same process.
///
/// Dropping handles never kills the process: it keeps running, its reader thread keeps draining
/// and reaping it, and its state is freed after it ends and the last handle and subscriber are
/// gone. Keep a handle to let late subscribers see the [`End`] (envd keeps ended processes
/// connectable for 30 s).
#[derive(Clone)]
pub struct Process {
    inner: Arc<Inner>,
}

impl Process {
    /// Starts a process and its reader thread.
    ///
    /// Output produced before the first subscriber attaches is kept only as far as the ring
    /// allows (nobody is waited for): use [`spawn_subscribed`](Self::spawn_subscribed) to read a
    /// fast writer's output from its first byte.
    ///
    /// Errors: a missing or non-directory `cwd` (`NotFound`/`NotADirectory`, naming it); an exec
    /// or pre-exec failure such as `ENOENT`/`EACCES`/`EPERM`, as an `io::Error` of that kind whose
    /// message names the program (and, for a pre-exec step such as `chdir` or `setuid`, the step)
    /// and whose inner error is a [`SpawnError`](crate::SpawnError) carrying the errno. No child
    /// is left behind on error.
    pub fn spawn(opts: &SpawnOptions) -> io::Result<Process> {
        Ok(Process::start(opts, false)?.0)
    }

    /// [`spawn`](Self::spawn), with a subscriber registered before the reader thread reads the
    /// first byte: it misses nothing, and flow control holds the output for it from the start (so
    /// a fast writer cannot overflow the ring in the moment between spawning and subscribing).
    pub fn spawn_subscribed(opts: &SpawnOptions) -> io::Result<(Process, Subscriber)> {
        let (process, subscriber) = Process::start(opts, true)?;
        Ok((process, subscriber.expect("requested")))
    }

    fn start(opts: &SpawnOptions, subscribe: bool) -> io::Result<(Process, Option<Subscriber>)> {
        // No larger than the ring: a chunk is kept whole, so a bigger one would overrun its bound.
        let chunk = opts
            .read_chunk_bytes
            .unwrap_or(match opts.io {
                Io::Pipes { .. } => PIPE_CHUNK_BYTES,
                Io::Pty(_) => PTY_CHUNK_BYTES,
            })
            .min(opts.ring_bytes.max(1));
        // A PTY's reads are gathered up to this (at least one read; see `reader::pump_pty`).
        let gather = PTY_GATHER_BYTES.min(opts.ring_bytes / 4).max(chunk);
        let spawned = spawn::spawn(opts)?;
        let pid = spawned.pid;
        let inner = Arc::new(Inner {
            pid,
            output: Output::new(opts.ring_bytes, opts.stall_timeout),
            stdin: Mutex::new(spawned.stdin.map(Arc::new)),
            stdin_writer: Mutex::new(()),
            has_pty: spawned.pty.is_some(),
            pty: Mutex::new(spawned.pty.map(Arc::new)),
            pty_writer: Mutex::new(()),
            reaped: Mutex::new(false),
        });
        let subscriber = if subscribe {
            match Subscriber::new(Arc::clone(&inner), StartAt::Oldest) {
                Ok(subscriber) => Some(subscriber),
                Err(err) => {
                    spawn::abandon(pid);
                    return Err(err);
                }
            }
        } else {
            None
        };
        let thread_inner = Arc::clone(&inner);
        let outputs = spawned.outputs;
        let started = readers::run(
            format!("proc-{pid}"),
            Box::new(move || follow(thread_inner, outputs, chunk, gather)),
        );
        if let Err(err) = started {
            spawn::abandon(pid);
            return Err(err);
        }
        Ok((Process { inner }, subscriber))
    }

    /// The process id (also its process-group and session id).
    pub fn pid(&self) -> u32 {
        self.inner.pid_u32()
    }

    /// True when the process was started with a PTY.
    pub fn has_pty(&self) -> bool {
        self.inner.has_pty
    }

    /// A new subscriber with its own cursor and wake-up fd, starting at the oldest retained
    /// output (replay) or at the next output to be produced.
    pub fn subscribe(&self, start: StartAt) -> io::Result<Subscriber> {
        Subscriber::new(Arc::clone(&self.inner), start)
    }

    /// The cursor of the oldest output still in the ring.
    pub fn oldest_cursor(&self) -> Cursor {
        self.inner.output.oldest()
    }

    /// The cursor of the next output to be produced.
    pub fn now_cursor(&self) -> Cursor {
        self.inner.output.now()
    }

    /// Stateless read: everything available from `cursor` (see [`Batch`]), up to `max_bytes` of
    /// payload but at least one chunk when any is available. Never blocks beyond the ring lock.
    pub fn next_batch(&self, cursor: Cursor, max_bytes: usize) -> Batch {
        self.inner.output.next_batch(cursor, max_bytes)
    }

    /// Blocks until `next_batch(cursor, _)` would return something or `timeout` passes (`None`:
    /// no limit). Returns whether something is ready.
    pub fn wait_output(&self, cursor: Cursor, timeout: Option<Duration>) -> bool {
        self.inner.output.wait_ready(cursor, timeout)
    }

    /// How the process ended, once it has ended and all its output is in the ring.
    pub fn end(&self) -> Option<End> {
        self.inner.output.end()
    }

    /// Blocks until [`end`](Self::end) is available or `timeout` passes (`None`: no limit).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<End> {
        self.inner.output.wait_end(timeout)
    }

    /// Writes all of `data` to the stdin pipe, waiting at most `timeout` while the pipe is full.
    ///
    /// Errors: `Unsupported` for a PTY process (use [`write_pty`](Self::write_pty));
    /// `BrokenPipe` when stdin was not enabled, was closed, or the process ended, or when the
    /// child closed its end (`EPIPE`; the host must ignore `SIGPIPE`, as Rust programs and
    /// CPython do); `TimedOut` (saying how much was written) when the child does not read.
    pub fn write_stdin(&self, data: &[u8], timeout: Duration) -> io::Result<()> {
        if self.has_pty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "process has a PTY: write to the PTY instead",
            ));
        }
        let Some(fd) = lock(&self.inner.stdin).clone() else {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin not enabled or closed",
            ));
        };
        let _turn = lock(&self.inner.stdin_writer);
        fdio::write_all(fd.as_fd(), data, timeout)
    }

    /// Closes the stdin pipe so the child reads EOF. Idempotent, and a no-op when stdin was not
    /// enabled. `Unsupported` for a PTY process (send Ctrl-D, `\x04`, instead), as envd.
    pub fn close_stdin(&self) -> io::Result<()> {
        if self.has_pty() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "process has a PTY: send Ctrl-D instead of closing stdin",
            ));
        }
        let taken = lock(&self.inner.stdin).take();
        drop(taken);
        Ok(())
    }

    /// Writes all of `data` to the PTY (the child reads it as terminal input), waiting at most
    /// `timeout` while the terminal's input queue is full. `Unsupported` without a PTY; `TimedOut`
    /// when the child does not read; `BrokenPipe` once the process has ended (its master closed).
    pub fn write_pty(&self, data: &[u8], timeout: Duration) -> io::Result<()> {
        let master = self.master()?;
        let _turn = lock(&self.inner.pty_writer);
        fdio::write_all(master.as_fd(), data, timeout)
    }

    /// Changes the PTY's window size (`TIOCSWINSZ`); the kernel sends `SIGWINCH` to the terminal's
    /// foreground process group. `Unsupported` without a PTY; `BrokenPipe` once the process has
    /// ended.
    pub fn resize(&self, size: WinSize) -> io::Result<()> {
        pty::set_size(self.master()?.as_fd(), size)
    }

    /// The PTY's current window size (`TIOCGWINSZ`). `Unsupported` without a PTY; `BrokenPipe`
    /// once the process has ended.
    pub fn size(&self) -> io::Result<WinSize> {
        pty::get_size(self.master()?.as_fd())
    }

    /// Sends `signal` to the process's group (`killpg`), which reaches the process and every
    /// descendant that stayed in its group. Works while the child is a zombie whose descendants
    /// still run. After the child has been reaped, fails with `ESRCH` (`ProcessLookupError`)
    /// without sending anything, so it can never hit a recycled pid.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let reaped = lock(&self.inner.reaped);
        if *reaped {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        killpg(Pid::from_raw(self.inner.pid), signal)?;
        Ok(())
    }

    /// The PTY master, kept open by the returned clone for as long as the caller uses it.
    fn master(&self) -> io::Result<Arc<OwnedFd>> {
        if !self.inner.has_pty {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "process has no PTY",
            ));
        }
        lock(&self.inner.pty).clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "process has ended: its PTY is closed",
            )
        })
    }
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.inner.pid)
            .field("pty", &self.has_pty())
            .field("end", &self.end())
            .finish()
    }
}

/// The body of the `proc-<pid>` thread: drain output to EOF, then wait for the child, reap it,
/// close stdin and the PTY master, and record the end (envd's order: both pipes at EOF, then `wait()`, then `end`).
fn follow(inner: Arc<Inner>, mut outputs: Vec<(OwnedFd, Stream)>, chunk: usize, gather: usize) {
    match outputs.pop() {
        Some((master, Stream::Pty)) if outputs.is_empty() => {
            pump_pty(master, chunk, gather, &inner.output);
        }
        last => {
            outputs.extend(last);
            pump(outputs, chunk, &inner.output);
        }
    }
    let pid = inner.pid;
    let end = match reap::wait_terminated(pid) {
        Ok(()) => {
            let mut reaped = lock(&inner.reaped);
            let status = reap::reap(pid);
            *reaped = true;
            match status {
                Ok(status) => End::from_wait_status(status),
                Err(err) => End::unknown(&format!("cannot collect exit status: {err}")),
            }
        }
        Err(err) => {
            *lock(&inner.reaped) = true;
            End::unknown(&format!("cannot wait for process: {err}"))
        }
    };
    let stdin = lock(&inner.stdin).take();
    drop(stdin);
    let master = lock(&inner.pty).take();
    drop(master);
    inner.output.finish(end);
}
