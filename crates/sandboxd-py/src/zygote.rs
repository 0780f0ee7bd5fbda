//! The zygote's serve loop (`sandboxd.runtime.zygote`), in Rust: receive a create request from the
//! runtime, hand it to the spare "A" or fork one, read A's report and answer, fork the next spare.
//!
//! Why not Python: the zygote's memory is shared copy-on-write with every live sandbox (the spare and
//! each "A" are its forks; the sandbox's init and agent are clones of A). Every page its loop writes
//! after a fork is a private copy made by a page fault in the zygote: the Python loop wrote ~190 pages
//! a create (reference counts of the objects it touched, pymalloc's free lists, the interpreter's
//! own state), ~28 % of the zygote's CPU (`docs/benchmarks.md`, `cold14`). This loop runs no Python
//! in the zygote: it writes its own stack, a few allocations at the heap's top and the kernel's
//! buffers. Python runs only in the forks (the callbacks, which never return), after
//! `PyOS_AfterFork_Child()`, as in `os.fork()`'s child.
//!
//! It keeps the Python loop's protocol and behaviour: one JSON request per `SOCK_SEQPACKET` message
//! with the disk and the volumes' mounts as `SCM_RIGHTS`, one JSON answer per create, sent as soon as A
//! has written its whole report line; A reaped at the EOF that follows; a spare forked once no create
//! has been in flight for `spare_delay` (at once when the zygote starts). JSON is read and written
//! with `serde_json`.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    send, sendmsg, socketpair,
};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, pipe2};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use serde_json::{Value, json};

/// The largest request (`zygote.MAX_MESSAGE`).
const MAX_MESSAGE: usize = 1 << 16;

/// A's report is one atomic write of at most `PIPE_BUF` bytes (`zygote.REPORT_MAX`).
const REPORT_MAX: usize = libc::PIPE_BUF;

/// Adds `zygote_serve` to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(zygote_serve, m)?)?;
    Ok(())
}

/// A spare "A", forked ahead of need, waiting for its request on `channel`.
struct Spare {
    pid: Pid,
    report: OwnedFd,
    channel: OwnedFd,
}

/// A create in flight: A's pid, the sandbox's id (as the request gave it), what A said so far, and
/// whether the runtime has had its answer.
struct Pending {
    pid: Pid,
    id: Value,
    said: Vec<u8>,
    answered: bool,
}

/// Serve create requests on `sock` (the zygote's end of its socket to the runtime) until the
/// runtime closes its end. `spare(channel, report, premake)` runs in a spare's fork: its request
/// channel, the pipe it reports on, and the last request's JSON (its instance and limits, for the
/// cgroup it makes ahead) or None. `sandbox(request, fds, log, report)` runs in a fork made at
/// request time: the request as received, its descriptors, the agent's log, the report pipe. Neither
/// may return (they end with `os._exit`); one that does exits the fork with status 1.
///
/// The next spare is forked `spare_delay` seconds after the last create's A has exited, not at
/// once: A exits once the sandbox's agent runs, which is when the agent starts, the runtime links
/// the sandbox and sends its `/init`, and the client's first command comes; a fork of this large
/// process beside them took a CPU they wait for on a 2-core host (`docs/benchmarks.md`, `cold19`).
/// A request in the meantime forks its A on the spot, as a burst's do.
#[pyfunction]
#[pyo3(signature = (sock, spare, sandbox, spare_delay = 0.0))]
fn zygote_serve(
    py: Python<'_>,
    sock: RawFd,
    spare: Py<PyAny>,
    sandbox: Py<PyAny>,
    spare_delay: f64,
) -> PyResult<()> {
    if !(spare_delay.is_finite() && (0.0..=60.0).contains(&spare_delay)) {
        return Err(PyValueError::new_err(
            "spare_delay must be between 0 and 60 seconds",
        ));
    }
    // SAFETY: the caller's socket object holds `sock` open for the whole call.
    #[allow(unsafe_code)]
    let sock = unsafe { BorrowedFd::borrow_raw(sock) };
    let mut lp = Loop {
        py,
        sock,
        spare_cb: spare,
        sandbox_cb: sandbox,
        pending: HashMap::new(),
        spare: None,
        premake: None,
        spare_delay: Duration::from_secs_f64(spare_delay),
        spare_due: Instant::now(),
    };
    let result = lp.serve();
    if let Some(spare) = lp.spare.take() {
        // It exits when its channel closes.
        drop(spare.channel);
        drop(spare.report);
        wait(spare.pid);
    }
    result
}

struct Loop<'py, 'fd> {
    py: Python<'py>,
    sock: BorrowedFd<'fd>,
    spare_cb: Py<PyAny>,
    sandbox_cb: Py<PyAny>,
    /// report pipe → its create
    pending: HashMap<RawFd, (OwnedFd, Pending)>,
    spare: Option<Spare>,
    /// The last request that named an instance: what the next spare makes its cgroup with.
    premake: Option<Vec<u8>>,
    spare_delay: Duration,
    /// When the next spare is forked, if none is ready and no create is in flight: `spare_delay`
    /// after the last create's A exited.
    spare_due: Instant,
}

impl Loop<'_, '_> {
    fn serve(&mut self) -> PyResult<()> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let mut timeout = None;
            if self.spare.is_none() && self.pending.is_empty() {
                let left = self.spare_due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // One that cannot be forked now (out of memory or processes) is not an error:
                    // the next create forks at request time, and answers an error if that fails too.
                    self.spare = self.fork_spare().ok();
                } else {
                    timeout = Some(left);
                }
            }
            let ready = self.wait_ready(timeout)?;
            for fd in ready {
                if fd == self.sock.as_raw_fd() {
                    if !self.request(&mut buf)? {
                        return Ok(());
                    }
                } else {
                    self.report(fd)?;
                }
            }
        }
    }

    /// The descriptors that can be read now (the runtime's socket, A's report pipes), waiting at
    /// most `timeout` (rounded up to a millisecond) for one; none when it passes first.
    fn wait_ready(&self, timeout: Option<Duration>) -> PyResult<Vec<RawFd>> {
        let timeout = timeout.map_or(PollTimeout::NONE, |t| {
            let ms = t.as_micros().div_ceil(1000).min(i32::MAX as u128);
            PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX)
        });
        let mut fds = Vec::with_capacity(1 + self.pending.len());
        fds.push(PollFd::new(self.sock, PollFlags::POLLIN));
        for (pipe, _) in self.pending.values() {
            fds.push(PollFd::new(pipe.as_fd(), PollFlags::POLLIN));
        }
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(PyOSError::new_err((e as i32, e.desc()))),
            }
        }
        Ok(fds
            .iter()
            .filter(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|p| p.as_fd().as_raw_fd())
            .collect())
    }

    /// One request from the runtime; false at its end (the runtime closed its socket).
    fn request(&mut self, buf: &mut [u8]) -> PyResult<bool> {
        let (len, truncated, fds) = receive(self.sock.as_raw_fd(), buf)?;
        if len == 0 {
            return Ok(false);
        }
        // A request that is not JSON is the runtime's bug: the zygote stops, as the Python loop did.
        // One cut to the buffer's size says so (the runtime refuses longer ones: zygote_client.encode).
        if truncated {
            return Err(PyValueError::new_err(format!(
                "a request longer than {MAX_MESSAGE} bytes (cut)"
            )));
        }
        let data = &buf[..len];
        let request: Value = serde_json::from_slice(data)
            .map_err(|e| PyValueError::new_err(format!("a request that is not JSON: {e}")))?;
        let Some(id) = request.get("id").cloned() else {
            return Err(PyValueError::new_err("a request without an id"));
        };
        if request.get("instance").is_some() {
            self.premake = Some(data.to_vec());
        }
        let used = self.spare.take();
        let started = match used.map(|spare| Self::hand_to_spare(spare, data, &request, &fds)) {
            Some(Ok(started)) => Ok(started),
            _ => self.fork_sandbox(data, &request, &fds),
        };
        for fd in fds {
            drop(fd); // A has its copy; later creates must not inherit this one
        }
        match started {
            Ok((pid, pipe)) => {
                let pending = Pending {
                    pid,
                    id,
                    said: Vec::new(),
                    answered: false,
                };
                self.pending.insert(pipe.as_raw_fd(), (pipe, pending));
            }
            Err(why) => self.answer(&id, &why)?,
        }
        Ok(true)
    }

    /// Send the request (as received) to `spare`, with the agent's log and `fds`; A's pid and the pipe
    /// it reports on. The spare is used up either way: on an error its channel is closed (a spare
    /// still waiting exits), it is reaped (no zombie) and its pipe closed (it must not reach later
    /// sandboxes), and the caller forks at request time.
    fn hand_to_spare(
        spare: Spare,
        data: &[u8],
        request: &Value,
        fds: &[OwnedFd],
    ) -> Result<(Pid, OwnedFd), String> {
        let sent = open_log(request).and_then(|log| {
            let mut all = vec![log.as_raw_fd()];
            all.extend(fds.iter().map(AsRawFd::as_raw_fd));
            sendmsg::<()>(
                spare.channel.as_raw_fd(),
                &[IoSlice::new(data)],
                &[ControlMessage::ScmRights(&all)],
                MsgFlags::empty(),
                None,
            )
            .map(drop)
            .map_err(errno_message)
        });
        drop(spare.channel);
        match sent {
            Ok(()) => Ok((spare.pid, spare.report)),
            Err(why) => {
                drop(spare.report);
                wait(spare.pid);
                Err(why)
            }
        }
    }

    /// Fork "A" for `request` at request time; its pid and the pipe it reports on.
    fn fork_sandbox(
        &self,
        data: &[u8],
        request: &Value,
        fds: &[OwnedFd],
    ) -> Result<(Pid, OwnedFd), String> {
        let log = open_log(request)?;
        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(errno_message)?;
        match self.fork()? {
            ForkResult::Child => {
                drop(r);
                let py = self.py;
                let fd_list: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                let args = (
                    PyBytes::new(py, data),
                    fd_list,
                    log.into_raw_fd(),
                    w.into_raw_fd(),
                );
                run_child(py, self.sandbox_cb.bind(py).call1(args))
            }
            ForkResult::Parent { child } => Ok((child, r)),
        }
    }

    /// Fork a spare, which makes its cgroup with the last request's instance and limits.
    fn fork_spare(&self) -> Result<Spare, String> {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(errno_message)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(errno_message)?;
        match self.fork()? {
            ForkResult::Child => {
                drop(r);
                drop(ours);
                let py = self.py;
                let premake = self.premake.as_deref().map(|p| PyBytes::new(py, p));
                let args = (theirs.into_raw_fd(), w.into_raw_fd(), premake);
                run_child(py, self.spare_cb.bind(py).call1(args))
            }
            ForkResult::Parent { child } => Ok(Spare {
                pid: child,
                report: r,
                channel: ours,
            }),
        }
    }

    /// `fork()`; in the child, the zygote's descriptors a sandbox must not keep are closed (the socket
    /// to the runtime: a process inside could forge answers; other creates' report pipes), and the
    /// interpreter's fork-sensitive state is reset as `os.fork()` does.
    #[allow(unsafe_code)]
    fn fork(&self) -> Result<ForkResult, String> {
        // SAFETY: the zygote is single-threaded; the child only closes descriptors and runs the
        // interpreter's own after-fork reset before calling Python, as `os.fork()`'s child does.
        let forked = unsafe { nix::unistd::fork() }.map_err(errno_message)?;
        if let ForkResult::Child = forked {
            let _ = nix::unistd::close(self.sock.as_raw_fd());
            for fd in self.pending.keys() {
                let _ = nix::unistd::close(*fd);
            }
            if let Some(spare) = &self.spare {
                let _ = nix::unistd::close(spare.report.as_raw_fd());
                let _ = nix::unistd::close(spare.channel.as_raw_fd());
            }
            crate::jail::after_fork_child();
        }
        Ok(forked)
    }

    /// What A said on `fd`: the answer once its line is whole; at its end, A reaped.
    fn report(&mut self, fd: RawFd) -> PyResult<()> {
        let mut chunk = [0u8; REPORT_MAX];
        let Some((pipe, pending)) = self.pending.get_mut(&fd) else {
            return Ok(());
        };
        let n = loop {
            match nix::unistd::read(pipe.as_fd(), &mut chunk) {
                Ok(n) => break n,
                Err(Errno::EINTR) => continue,
                Err(_) => break 0, // as its end: A is reaped and answered with what it said
            }
        };
        if n > 0 {
            pending.said.extend_from_slice(&chunk[..n]);
            if !pending.answered && pending.said.ends_with(b"\n") {
                pending.answered = true;
                let (id, said) = (pending.id.clone(), pending.said.clone());
                self.answer_report(&id, &said)?;
            }
            return Ok(());
        }
        let Some((pipe, pending)) = self.pending.remove(&fd) else {
            return Ok(());
        };
        drop(pipe);
        if self.pending.is_empty() {
            self.spare_due = Instant::now() + self.spare_delay;
        }
        wait(pending.pid);
        if !pending.answered {
            self.answer_report(&pending.id, &pending.said)?;
        }
        Ok(())
    }

    /// The answer to A's report: `P<init pid>` or `E<why>`.
    fn answer_report(&self, id: &Value, said: &[u8]) -> PyResult<()> {
        let message = said.strip_suffix(b"\n").unwrap_or(said);
        if let Some(pid) = message.strip_prefix(b"P")
            && let Some(pid) = std::str::from_utf8(pid)
                .ok()
                .and_then(|p| p.trim().parse::<i64>().ok())
        {
            return self.send(&json!({"id": id, "ok": true, "init_pid": pid}));
        }
        let why = message.get(1..).unwrap_or_default();
        self.answer(id, &String::from_utf8_lossy(why))
    }

    /// A create's failure, with its reason.
    fn answer(&self, id: &Value, why: &str) -> PyResult<()> {
        let error = if why.is_empty() {
            "sandbox setup failed"
        } else {
            why
        };
        self.send(&json!({"id": id, "ok": false, "error": error}))
    }

    fn send(&self, answer: &Value) -> PyResult<()> {
        let data = answer.to_string();
        loop {
            match send(self.sock.as_raw_fd(), data.as_bytes(), MsgFlags::empty()) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(PyOSError::new_err((e as i32, e.desc()))),
            }
        }
    }
}

/// A request, whether it was cut to `buf`'s size, and its descriptors (the disk's, then each
/// volume's mount). Received without `MSG_CMSG_CLOEXEC`, as Python's `socket.recv_fds`: the fork at
/// request time keeps them.
fn receive(sock: RawFd, buf: &mut [u8]) -> PyResult<(usize, bool, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 1 + sandboxd_jail::MAX_VOLUMES]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        match recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::empty()) {
            Ok(msg) => {
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(received) = cmsg {
                            for fd in received {
                                // SAFETY: the kernel just installed it in this process for us.
                                #[allow(unsafe_code)]
                                fds.push(unsafe {
                                    <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                                });
                            }
                        }
                    }
                }
                return Ok((msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), fds));
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(PyOSError::new_err((e as i32, e.desc()))),
        }
    }
}

/// The agent's log file, opened by the zygote (as host root, outside the sandbox), as the Python
/// loop's `_open_log`; its errors worded as Python's, which the create's answer carries. Never
/// through a link (`O_NOFOLLOW`), nor a terminal made the zygote's (`O_NOCTTY`): the path is the
/// runtime's (`<data dir>/sandboxes/<id>/agent.log`, in a directory only host root can write), so
/// this is a second lock behind that one, against a file root appends to wherever a link points.
fn open_log(request: &Value) -> Result<OwnedFd, String> {
    let path = match request.get("log") {
        Some(Value::String(path)) => path,
        Some(_) => return Err("TypeError: the request's log is not a path".into()),
        None => return Err("KeyError: 'log'".into()),
    };
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| match e.raw_os_error() {
            Some(errno) => format!(
                "OSError: [Errno {errno}] {}: '{path}'",
                Errno::from_raw(errno).desc()
            ),
            None => format!("OSError: {e}: '{path}'"),
        })
}

fn errno_message(e: Errno) -> String {
    format!("OSError: [Errno {}] {}", e as i32, e.desc())
}

/// Reap `pid`, retrying if interrupted.
fn wait(pid: Pid) {
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
}

/// In a fork, after its callback (which should never return): a fork must never come back into the
/// zygote's loop, so whatever happened, it exits here.
#[allow(unsafe_code)]
fn run_child(py: Python<'_>, result: PyResult<Bound<'_, PyAny>>) -> ! {
    if let Err(e) = result {
        e.print(py);
    }
    // SAFETY: `_exit` ends the process at once, running nothing of the zygote's.
    unsafe { libc::_exit(1) }
}
