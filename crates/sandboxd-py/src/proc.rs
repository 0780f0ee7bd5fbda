//! Bindings of `sandboxd-proc`: spawning a process (pipes or PTY), its output subscribers, input,
//! signals and resizing, for the `process.Process` service.
//!
//! Every call that can block — spawning (a vfork-style clone and exec, user lookup through NSS), waiting for output
//! or the end, writing input — runs inside `py.detach` and is bounded by a timeout. Waits without
//! a timeout are cut into slices of [`WAIT_SLICE`], between which the GIL is taken back to run
//! signal handlers, so Ctrl-C interrupts them. Asyncio waits on `Subscriber.fileno()` (an
//! eventfd) with `loop.add_reader` instead of blocking at all.
//!
//! Errors are Python's built-in exceptions: `OSError` subclasses chosen by errno
//! (`FileNotFoundError`, `PermissionError`, `BrokenPipeError`, `TimeoutError`,
//! `ProcessLookupError`, ...), `io.UnsupportedOperation` for an operation the process's kind of
//! I/O does not offer, `LookupError` for an unknown user and `ValueError` for bad arguments.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyLookupError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use sandboxd_proc as core;

use crate::chunk::OutputChunk;

pyo3::import_exception!(io, UnsupportedOperation);

/// `Batch.chunks` stream id of standard output (envd's `DataEvent.stdout` field number).
const STREAM_STDOUT: i32 = 1;
/// `Batch.chunks` stream id of standard error (`DataEvent.stderr`).
const STREAM_STDERR: i32 = 2;
/// `Batch.chunks` stream id of PTY output (`DataEvent.pty`).
const STREAM_PTY: i32 = 3;

/// The `PATH` given to children when the caller passes none and the agent has none itself: the
/// usual Debian/Ubuntu default for root, which includes every directory a normal user's has.
const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Smallest chunk `next_batch(views=True)` lends as an `OutputChunk`: 16 KiB. Smaller ones (a PTY
/// gives ~4 KiB a read, a slow writer's pipe a few bytes) are joined into one `bytes`: copying
/// them costs less than an object, a `memoryview` and an iovec for each (PTY output, same run:
/// 40 MB/s with every 4 KiB read lent, 54 MB/s with them joined).
const VIEW_MIN_BYTES: usize = 16 * 1024;

/// Default `max_bytes` of `Subscriber.next_batch`: 1 MiB, the ring's default size, so that one
/// call drains a full ring, and the size where a streamed message's fixed cost stops mattering
/// (see DESIGN.md's figures for grpcio).
const DEFAULT_MAX_BATCH_BYTES: usize = 1 << 20;

/// Longest GIL-free stretch of a blocking wait. Between slices the GIL is re-taken to run Python
/// signal handlers; 100 ms keeps Ctrl-C responsive while costing nothing measurable (a wait that
/// ends early returns at once, not at a slice boundary).
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Adds this binding's classes, functions and constants to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(tune_malloc, m)?)?;
    m.add_function(wrap_pyfunction!(trim_malloc, m)?)?;
    m.add_function(wrap_pyfunction!(hold_free_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(collapse_anonymous, m)?)?;
    m.add_function(wrap_pyfunction!(split_huge_mappings, m)?)?;
    m.add_function(wrap_pyfunction!(default_ignored_glibc_signals, m)?)?;
    m.add_class::<SharedLibrary>()?;
    m.add("STREAM_STDOUT", STREAM_STDOUT)?;
    m.add("STREAM_STDERR", STREAM_STDERR)?;
    m.add("STREAM_PTY", STREAM_PTY)?;
    m.add("PTY_GATHER_BYTES", core::PTY_GATHER_BYTES)?;
    m.add_class::<End>()?;
    m.add_class::<Batch>()?;
    m.add_class::<OutputChunk>()?;
    m.add_class::<Subscriber>()?;
    m.add_class::<Process>()?;
    Ok(())
}

/// Set glibc's two internal signals (32 and 33), which Python's `signal` module cannot reach, back
/// to their default when they are ignored (a `posix_spawn` parent leaves them so); a handler glibc
/// installed is left alone.
#[pyfunction]
fn default_ignored_glibc_signals() {
    core::default_ignored_glibc_signals();
}

/// Set glibc's mmap threshold, trim threshold and top pad (bytes) and its arena limit (0: the
/// default) for this process; whether all were accepted (`False`, nothing changed, on another C
/// library).
#[pyfunction]
fn tune_malloc(
    mmap_threshold: usize,
    trim_threshold: usize,
    top_pad: usize,
    arena_max: usize,
) -> bool {
    core::tune_malloc(mmap_threshold, trim_threshold, top_pad, arena_max)
}

/// Return the allocator's free memory to the kernel (`malloc_trim(0)`), with the GIL released;
/// whether any was released (`False` on another C library).
#[pyfunction]
fn trim_malloc(py: Python<'_>) -> bool {
    py.detach(core::trim_malloc)
}

/// Take every free chunk of the allocator's main heap and never give it back, so that later
/// allocations come from the heap's top (`0` on another C library); the bytes held. For the main
/// thread of a process about to fork many children (the zygote): a child's allocations then write
/// a few contiguous pages instead of the scattered chunks' and their neighbours' (copy-on-write
/// faults).
#[pyfunction]
fn hold_free_chunks() -> usize {
    core::hold_free_chunks()
}

/// Gather every whole, 2 MiB-aligned range of this process's private anonymous memory (the heap,
/// Python's arenas) into transparent huge pages (`madvise(MADV_COLLAPSE)`, the GIL released); the
/// bytes collapsed (`0` where the kernel cannot: before Linux 6.1, huge pages `never`, another C
/// library). For a process about to fork many children (the zygote): a fork copies one page-table
/// entry per huge page instead of 512.
#[pyfunction]
fn collapse_anonymous(py: Python<'_>) -> usize {
    py.detach(core::collapse_anonymous)
}

/// `split_huge_mappings()`: this process's huge pages mapped by 4 KiB entries again, the pages kept
/// (the GIL released); the 2 MiB ranges gone through.
#[pyfunction]
fn split_huge_mappings(py: Python<'_>) -> usize {
    py.detach(core::split_huge_mappings)
}

/// A shared library loaded into this process by path (`dlopen`, `RTLD_NOW | RTLD_LOCAL`); it stays
/// loaded until `close()`.
#[pyclass(module = "sandboxd._core", frozen)]
struct SharedLibrary {
    library: Mutex<core::Library>,
}

#[pymethods]
impl SharedLibrary {
    #[new]
    fn new(path: &str) -> PyResult<Self> {
        let library =
            core::Library::open(path).map_err(|err| PyOSError::new_err(err.to_string()))?;
        Ok(SharedLibrary {
            library: Mutex::new(library),
        })
    }

    /// Unload it (once; later calls do nothing); whether the loader accepted.
    fn close(&self) -> bool {
        lock(&self.library).close()
    }
}

// ------------------------------------------------------------------------------------- errors

/// Converts a core I/O error into the Python exception `os` functions would raise for it. An
/// error without errno gets the errno of its kind ([`core::errno`]), so that `OSError.__new__`
/// still picks the subclass (`BrokenPipeError` for "stdin not enabled or closed", `TimeoutError`
/// for a write timeout); `Unsupported` becomes `io.UnsupportedOperation`, and `InvalidInput`
/// (a NUL byte in an argument) `ValueError`.
fn to_pyerr(err: io::Error) -> PyErr {
    match err.kind() {
        io::ErrorKind::Unsupported => return UnsupportedOperation::new_err(err.to_string()),
        io::ErrorKind::InvalidInput if err.raw_os_error().is_none() => {
            return PyValueError::new_err(err.to_string());
        }
        _ => {}
    }
    match (err.raw_os_error(), core::errno(&err)) {
        (Some(errno), _) => PyOSError::new_err((errno, strerror(errno))),
        (None, Some(errno)) => PyOSError::new_err((errno, err.to_string())),
        (None, None) => PyOSError::new_err(err.to_string()),
    }
}

/// The C library's message for `errno`, as `os.strerror` gives it.
fn strerror(errno: i32) -> String {
    io::Error::from_raw_os_error(errno)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Converts a `Process::spawn` error: exec failures name the program (`filename`), a bad cwd names
/// the cwd, as `subprocess.Popen` does.
fn spawn_error(err: io::Error, program: &str, cwd: Option<&str>) -> PyErr {
    if let Some(spawn) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<core::SpawnError>())
    {
        return match spawn.os_error().raw_os_error() {
            // A step before `execve` names itself ("chdir to '/home/user': Permission denied"):
            // the bare errno would read as the program's, which it is not.
            Some(errno) => {
                let what = match spawn.step() {
                    Some(step) => format!("{step}: {}", strerror(errno)),
                    None => strerror(errno),
                };
                PyOSError::new_err((errno, what, program.to_owned()))
            }
            None => to_pyerr(io::Error::new(spawn.os_error().kind(), spawn.to_string())),
        };
    }
    // The core checks the cwd before spawning and reports it by kind alone (no errno).
    if let (Some(cwd), None, Some(errno)) = (cwd, err.raw_os_error(), core::errno(&err)) {
        let what = match err.kind() {
            io::ErrorKind::NotFound => Some("cwd does not exist"),
            io::ErrorKind::NotADirectory => Some("cwd is not a directory"),
            _ => None,
        };
        if let Some(what) = what {
            return PyOSError::new_err((errno, what, cwd.to_owned()));
        }
    }
    to_pyerr(err)
}

/// The longest timeout honoured as given; longer ones (and `inf`) are clamped to it, which keeps
/// deadline arithmetic (`Instant + Duration`) from overflowing. A year is "no limit" in practice.
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A timeout in seconds as a `Duration`: `None` means no limit, a negative value "do not wait"
/// (as `threading.Event.wait`), and NaN is a `ValueError`.
fn timeout(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_nan() => Err(PyValueError::new_err("timeout must be a number, not NaN")),
        Some(s) => Ok(Some(
            Duration::try_from_secs_f64(s.max(0.0)).map_or(MAX_TIMEOUT, |d| d.min(MAX_TIMEOUT)),
        )),
    }
}

/// Runs `wait(slice)` with the GIL released, in slices of at most [`WAIT_SLICE`], until it returns
/// `Some` or `limit` passes (`None`: no limit); runs Python signal handlers between slices.
fn sliced_wait<T: Send>(
    py: Python<'_>,
    limit: Option<Duration>,
    wait: impl Fn(Duration) -> PyResult<Option<T>> + Sync,
) -> PyResult<Option<T>> {
    let deadline = limit.map(|limit| Instant::now() + limit);
    loop {
        let slice = match deadline {
            None => WAIT_SLICE,
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .min(WAIT_SLICE),
        };
        if let Some(done) = py.detach(|| wait(slice))? {
            return Ok(Some(done));
        }
        if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}

/// Locks a mutex, ignoring poisoning: a panic inside leaves the subscriber usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// ------------------------------------------------------------------------------------- classes

/// How a process ended, mapped exactly as envd maps Go's `ProcessState` (spec §4.2).
#[pyclass(frozen, module = "sandboxd._core", name = "End")]
pub(crate) struct End(core::End);

#[pymethods]
impl End {
    #[getter]
    fn exited(&self) -> bool {
        self.0.exited
    }

    #[getter]
    fn exit_code(&self) -> i32 {
        self.0.exit_code
    }

    #[getter]
    fn status(&self) -> &str {
        &self.0.status
    }

    #[getter]
    fn error(&self) -> Option<&str> {
        self.0.error.as_deref()
    }

    fn __repr__(&self) -> String {
        format!(
            "End(exited={}, exit_code={}, status={:?})",
            if self.0.exited { "True" } else { "False" },
            self.0.exit_code,
            self.0.status
        )
    }
}

/// What a subscriber may read now: lost output (if it fell behind), chunks, and the end.
#[pyclass(frozen, module = "sandboxd._core", name = "Batch")]
pub(crate) struct Batch {
    /// Bytes evicted before this subscriber read them (0 when nothing was lost).
    #[pyo3(get)]
    lagged_bytes: u64,
    /// `(STREAM_*, data)` in order, one item per run of consecutive chunks of one stream: `data`
    /// is the run joined into one `bytes`, or with `views` a list of the run's big chunks, lent
    /// uncopied (`OutputChunk`), and of the stretches of small ones between them, joined.
    #[pyo3(get)]
    chunks: Py<PyList>,
    /// Set once every chunk has been read and the process has been reaped.
    #[pyo3(get)]
    end: Option<Py<End>>,
    /// True when more is already available (the byte budget cut this batch).
    #[pyo3(get)]
    more: bool,
}

fn stream_id(stream: core::Stream) -> i32 {
    match stream {
        core::Stream::Stdout => STREAM_STDOUT,
        core::Stream::Stderr => STREAM_STDERR,
        core::Stream::Pty => STREAM_PTY,
    }
}

/// `chunks` as one `bytes` (one copy).
fn joined<'py>(py: Python<'py>, chunks: &[core::Chunk]) -> PyResult<Bound<'py, PyBytes>> {
    if let [one] = chunks {
        return Ok(PyBytes::new(py, &one.data));
    }
    let len = chunks.iter().map(|c| c.data.len()).sum();
    PyBytes::new_with(py, len, |buf| {
        let mut at = 0;
        for chunk in chunks {
            buf[at..at + chunk.data.len()].copy_from_slice(&chunk.data);
            at += chunk.data.len();
        }
        Ok(())
    })
}

impl Batch {
    /// Builds the Python batch, joining each run of consecutive chunks of one stream into a
    /// single `bytes` (a 1 MiB PTY batch is ~256 reads of 4 KiB: one object instead of 256), or,
    /// with `views`, handing the run's chunks over as a list of [`OutputChunk`] (no copy).
    fn new(py: Python<'_>, batch: core::Batch, views: bool) -> PyResult<Batch> {
        let chunks = PyList::empty(py);
        for run in batch.chunks.chunk_by(|a, b| a.stream == b.stream) {
            let data = if views {
                // Big chunks are lent; each stretch of small ones between them is joined.
                let list = PyList::empty(py);
                let mut small = 0;
                for (i, chunk) in run.iter().enumerate() {
                    if chunk.data.len() >= VIEW_MIN_BYTES {
                        if small < i {
                            list.append(joined(py, &run[small..i])?)?;
                        }
                        list.append(OutputChunk(chunk.data.clone()))?;
                        small = i + 1;
                    }
                }
                if small < run.len() {
                    list.append(joined(py, &run[small..])?)?;
                }
                list.into_any()
            } else {
                joined(py, run)?.into_any()
            };
            let item = PyTuple::new(
                py,
                [
                    stream_id(run[0].stream).into_pyobject(py)?.into_any(),
                    data.into_any(),
                ],
            )?;
            chunks.append(item)?;
        }
        let end = batch.end.map(|end| Py::new(py, End(end))).transpose()?;
        Ok(Batch {
            lagged_bytes: batch.lagged.map_or(0, |lag| lag.bytes),
            chunks: chunks.unbind(),
            end,
            more: batch.more,
        })
    }
}

#[pymethods]
impl Batch {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Batch(lagged_bytes={}, chunks={}, end={}, more={})",
            self.lagged_bytes,
            self.chunks.bind(py).len(),
            if self.end.is_some() { "End" } else { "None" },
            if self.more { "True" } else { "False" }
        )
    }
}

/// A cursor into a process's output ring with an eventfd that is readable whenever `next_batch`
/// would return something. While open it takes part in the process's flow control (see the
/// `sandboxd-proc` crate docs): the process waits for the most advanced subscriber and for those
/// that keep reading, but at most the stall timeout for one that stopped.
#[pyclass(frozen, module = "sandboxd._core", name = "Subscriber")]
pub(crate) struct Subscriber {
    /// Invariant: `Some` until `close`. Held for one `next_batch` (memcpy-sized) or one wait slice
    /// of at most [`WAIT_SLICE`], always with the GIL released, so no thread ever holds the GIL
    /// while blocked on it.
    inner: Mutex<Option<core::Subscriber>>,
    /// The eventfd's number, for `fileno` without taking the lock.
    fd: i32,
    /// Set by `close`, before the subscriber (and its fd) is dropped.
    closed: AtomicBool,
}

fn closed_subscriber() -> PyErr {
    PyValueError::new_err("I/O operation on closed subscriber")
}

impl Subscriber {
    fn new(inner: core::Subscriber) -> Subscriber {
        Subscriber {
            fd: inner.wake_fd().as_raw_fd(),
            inner: Mutex::new(Some(inner)),
            closed: AtomicBool::new(false),
        }
    }

    fn do_close(&self, py: Python<'_>) {
        self.closed.store(true, Ordering::SeqCst);
        let taken = py.detach(|| lock(&self.inner).take());
        // Dropping unregisters it from flow control and closes the eventfd.
        drop(taken);
    }
}

#[pymethods]
impl Subscriber {
    /// The eventfd to `add_reader`; valid until `close`.
    fn fileno(&self) -> PyResult<i32> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed_subscriber());
        }
        Ok(self.fd)
    }

    /// Non-blocking: everything available from the cursor, up to `max_bytes` (at least one chunk).
    /// With `views`, each run's data is a list of pieces: its chunks of at least 16 KiB lent as
    /// `OutputChunk`, the small ones between them joined into `bytes`.
    #[pyo3(signature = (max_bytes = DEFAULT_MAX_BATCH_BYTES, views = false))]
    fn next_batch(&self, py: Python<'_>, max_bytes: usize, views: bool) -> PyResult<Batch> {
        let batch = py
            .detach(|| lock(&self.inner).as_mut().map(|s| s.next_batch(max_bytes)))
            .ok_or_else(closed_subscriber)?;
        Batch::new(py, batch, views)
    }

    /// Writes this subscriber's output to the non-blocking socket `sock` as binary Connect data
    /// frames in HTTP/1.1 chunks (GIL released, in the calling thread; `sandboxd_proc::pump`)
    /// until the process's end, a lag, the peer leaving or `cancel` (an eventfd) becoming
    /// readable. `paths` are the field numbers down to the bytes field for stdout, stderr and PTY
    /// output; `keepalive` a whole chunk, sent after `keepalive_interval` seconds without a frame.
    /// Returns `("end", 0, b"")`, `("lagged", bytes_lost, b"")`, `("closed", 0, b"")` or
    /// `("cancelled", 0, rest_of_a_frame_cut_short)`. Both descriptors must stay open until it
    /// returns.
    #[allow(unsafe_code)]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (sock, cancel, paths, keepalive, keepalive_interval, max_bytes = DEFAULT_MAX_BATCH_BYTES))]
    fn pump<'py>(
        &self,
        py: Python<'py>,
        sock: i32,
        cancel: i32,
        paths: (Vec<u32>, Vec<u32>, Vec<u32>),
        keepalive: Vec<u8>,
        keepalive_interval: f64,
        max_bytes: usize,
    ) -> PyResult<(&'static str, u64, Bound<'py, PyBytes>)> {
        if sock < 0 || cancel < 0 {
            return Err(PyValueError::new_err("pump needs open descriptors"));
        }
        let interval = Duration::try_from_secs_f64(keepalive_interval)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err("keepalive_interval must be a positive number of seconds")
            })?;
        let framing = core::pump::Framing {
            stdout: paths.0,
            stderr: paths.1,
            pty: paths.2,
            keepalive,
            keepalive_interval: interval,
        };
        // SAFETY: the caller keeps both descriptors open until this call returns (documented
        // above; http_server's hand-off owns a dup of the socket and the cancel eventfd for the
        // call's duration), and the borrows do not outlive the call.
        let (sock, cancel) =
            unsafe { (BorrowedFd::borrow_raw(sock), BorrowedFd::borrow_raw(cancel)) };
        let outcome = py
            .detach(|| {
                let mut guard = lock(&self.inner);
                guard
                    .as_mut()
                    .map(|s| core::pump::pump(s, sock, cancel, &framing, max_bytes))
            })
            .ok_or_else(closed_subscriber)?
            .map_err(to_pyerr)?;
        Ok(match outcome {
            core::pump::Pumped::End => ("end", 0, PyBytes::new(py, b"")),
            core::pump::Pumped::Lagged(n) => ("lagged", n, PyBytes::new(py, b"")),
            core::pump::Pumped::Closed => ("closed", 0, PyBytes::new(py, b"")),
            core::pump::Pumped::Cancelled(rest) => ("cancelled", 0, PyBytes::new(py, &rest)),
        })
    }

    /// Blocks (GIL released) until something is available or `timeout` seconds pass.
    #[pyo3(signature = (timeout))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        let ready = sliced_wait(py, self::timeout(timeout)?, |slice| {
            let guard = lock(&self.inner);
            let sub = guard.as_ref().ok_or_else(closed_subscriber)?;
            Ok(sub.wait(Some(slice)).then_some(()))
        })?;
        Ok(ready.is_some())
    }

    /// Unregisters (the process no longer waits for this subscriber) and closes the eventfd; later
    /// calls raise `ValueError`. Idempotent.
    fn close(&self, py: Python<'_>) {
        self.do_close(py);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (exc_type = None, exc = None, tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        exc: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) {
        let _ = (exc_type, exc, tb);
        self.do_close(py);
    }

    fn __repr__(&self) -> String {
        if self.closed.load(Ordering::SeqCst) {
            "<Subscriber closed>".to_owned()
        } else {
            format!("<Subscriber fd={}>", self.fd)
        }
    }
}

/// A spawned child (own session and process group) whose output goes to a bounded ring.
#[pyclass(frozen, module = "sandboxd._core", name = "Process")]
pub(crate) struct Process {
    process: core::Process,
    /// Invariant: the subscriber registered before the process's first byte was read
    /// (`spawn_subscribed`), until the first `subscribe()` takes it, so that a `subscribe(True)`
    /// right after `spawn` misses nothing however fast the process writes. Until then it holds
    /// the output like a subscriber that has not read yet (at most the stall timeout). Held only
    /// to take it.
    first: Mutex<Option<core::Subscriber>>,
}

#[pymethods]
impl Process {
    /// Start `program` with `args` (`argv[1:]`); see `_core.pyi`.
    #[staticmethod]
    #[pyo3(signature = (
        program, args, env, *, cwd = None, user = None, identity = None, path = None, stdin = true,
        pty = None, ring_bytes = core::DEFAULT_RING_BYTES, oom_score_adj = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        py: Python<'_>,
        program: String,
        args: Vec<String>,
        env: &Bound<'_, PyDict>,
        cwd: Option<String>,
        user: Option<String>,
        identity: Option<(String, u32, u32, String, Vec<u32>)>,
        path: Option<String>,
        stdin: bool,
        pty: Option<(u16, u16)>,
        ring_bytes: usize,
        oom_score_adj: Option<i32>,
    ) -> PyResult<Process> {
        let mut opts = core::SpawnOptions::new(&program).args(&args);
        for (key, value) in env.iter() {
            let key: String = key.extract()?;
            let value: String = value.extract()?;
            if key.is_empty() || key.contains('=') {
                return Err(PyValueError::new_err(format!(
                    "invalid environment variable name {key:?}: it must be non-empty and contain no '='"
                )));
            }
            opts.env.push((key.into(), value.into()));
        }
        opts.path = Some(
            path.map(Into::into)
                .or_else(|| std::env::var_os("PATH"))
                .unwrap_or_else(|| FALLBACK_PATH.into()),
        );
        opts.cwd = cwd.as_ref().map(Into::into);
        opts.io = match pty {
            Some((cols, rows)) => core::Io::Pty(core::WinSize { cols, rows }),
            None => core::Io::Pipes { stdin },
        };
        opts.ring_bytes = ring_bytes;
        if let Some(adj) = oom_score_adj.filter(|adj| !(-1000..=1000).contains(adj)) {
            return Err(PyValueError::new_err(format!(
                "oom_score_adj must be within -1000..=1000, not {adj}"
            )));
        }
        opts.oom_score_adj = oom_score_adj;
        if let Some((name, uid, gid, home, groups)) = identity {
            // Resolved by the caller already (the agent caches its users): no second lookup.
            opts.user = Some(core::User {
                name,
                uid,
                gid,
                groups,
                home: home.into(),
            });
        }
        py.detach(|| {
            if let Some(name) = user.as_ref().filter(|_| opts.user.is_none()) {
                opts.user = Some(core::User::lookup(name).map_err(|err| {
                    if err.kind() == io::ErrorKind::NotFound {
                        PyLookupError::new_err(format!("user '{name}' does not exist"))
                    } else {
                        to_pyerr(err)
                    }
                })?);
            }
            let (process, first) = core::Process::spawn_subscribed(&opts)
                .map_err(|err| spawn_error(err, &program, cwd.as_deref()))?;
            Ok(Process {
                process,
                first: Mutex::new(Some(first)),
            })
        })
    }

    /// The process id (also its process group and session id).
    #[getter]
    fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// True when the process runs on a PTY.
    #[getter]
    fn has_pty(&self) -> bool {
        self.process.has_pty()
    }

    /// A new subscriber; `from_oldest` replays what the ring still holds, else starts at now.
    #[pyo3(signature = (from_oldest = true))]
    fn subscribe(&self, py: Python<'_>, from_oldest: bool) -> PyResult<Subscriber> {
        let first = lock(&self.first).take();
        if let (true, Some(first)) = (from_oldest, first) {
            return Ok(Subscriber::new(first));
        }
        // Not taken (or dropped here, for a subscriber from now): it no longer holds the output.
        let start = if from_oldest {
            core::StartAt::Oldest
        } else {
            core::StartAt::Now
        };
        let sub = py
            .detach(|| self.process.subscribe(start))
            .map_err(to_pyerr)?;
        Ok(Subscriber::new(sub))
    }

    /// The end, once the process has exited and its output is drained.
    fn end(&self) -> Option<End> {
        self.process.end().map(End)
    }

    /// Blocks (GIL released) until the end or `timeout` seconds.
    #[pyo3(signature = (timeout))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<End>> {
        let end = sliced_wait(py, self::timeout(timeout)?, |slice| {
            Ok(self.process.wait(Some(slice)))
        })?;
        Ok(end.map(End))
    }

    /// Writes all of `data` to stdin, waiting at most `timeout` seconds while the pipe is full.
    fn write_stdin(&self, py: Python<'_>, data: &[u8], timeout: f64) -> PyResult<()> {
        let limit = self::timeout(Some(timeout))?.unwrap_or(MAX_TIMEOUT);
        py.detach(|| self.process.write_stdin(data, limit))
            .map_err(to_pyerr)
    }

    /// Closes stdin (the child reads EOF). Idempotent.
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.process.close_stdin()).map_err(to_pyerr)
    }

    /// Writes all of `data` to the PTY, waiting at most `timeout` seconds while it is full.
    fn write_pty(&self, py: Python<'_>, data: &[u8], timeout: f64) -> PyResult<()> {
        let limit = self::timeout(Some(timeout))?.unwrap_or(MAX_TIMEOUT);
        py.detach(|| self.process.write_pty(data, limit))
            .map_err(to_pyerr)
    }

    /// Sets the PTY's window size (the foreground group gets `SIGWINCH`).
    fn resize(&self, cols: u16, rows: u16) -> PyResult<()> {
        self.process
            .resize(core::WinSize { cols, rows })
            .map_err(to_pyerr)
    }

    /// Sends signal number `signal` to the process group.
    fn signal(&self, signal: i32) -> PyResult<()> {
        let signal = core::Signal::try_from(signal)
            .map_err(|_| PyValueError::new_err(format!("invalid signal number {signal}")))?;
        self.process.signal(signal).map_err(to_pyerr)
    }

    fn __repr__(&self) -> String {
        let state = match self.process.end() {
            Some(end) => end.status,
            None => "running".to_owned(),
        };
        format!(
            "<Process pid={} pty={} {state}>",
            self.process.pid(),
            if self.process.has_pty() {
                "True"
            } else {
                "False"
            }
        )
    }
}
