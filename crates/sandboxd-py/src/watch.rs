//! Binding of `sandboxd-watch`: a recursive inotify watcher whose events cross into Python as one
//! list per call, `(kind, name)` tuples with envd's `EventType` numbers.
//!
//! Each watcher is a `Drainer`: its own thread reads the kernel's queue as fast as the kernel fills
//! it, into a buffer bounded by bytes, so a busy event loop no longer makes the kernel drop events.
//! `fileno()` is the eventfd that is readable while events are buffered, for `loop.add_reader`;
//! `wait()` blocks with the GIL released for callers without a loop. An event loop that waits for
//! events can take the kernel queue over while it waits (`park()`, `kernel_fileno()`,
//! `read_kernel()`), so an event wakes the loop directly instead of the thread and then the loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sandboxd_watch::{DEFAULT_BUFFER_BYTES, Drainer, Item, TAKEOVER_AFTER, WatchError};

/// Batch item kind for lost events (kernel overflow or the pending cap), after envd's 1..=5.
const WATCH_OVERFLOW: i32 = 100;
/// Batch item kind for the watched directory itself going away.
const WATCH_CLOSED: i32 = 101;

/// Adds the watcher class and its constants to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("WATCH_OVERFLOW", WATCH_OVERFLOW)?;
    m.add("WATCH_CLOSED", WATCH_CLOSED)?;
    m.add("WATCH_BUFFER_BYTES", DEFAULT_BUFFER_BYTES)?;
    m.add("WATCH_TAKEOVER_S", TAKEOVER_AFTER.as_secs_f64())?;
    m.add_class::<Watcher>()?;
    m.add_class::<Tripwire>()?;
    Ok(())
}

/// An inotify instance that becomes readable once anything at its paths changes
/// (``sandboxd_watch::Tripwire``); ``rearm`` makes it quiet again, in place. GIL released while
/// watches are added.
#[pyclass(module = "sandboxd._core", name = "Tripwire")]
struct Tripwire {
    inner: Option<sandboxd_watch::Tripwire>,
}

#[pymethods]
impl Tripwire {
    #[new]
    fn new(py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<Self> {
        let inner = py.detach(|| sandboxd_watch::Tripwire::new(&paths))?;
        Ok(Self { inner: Some(inner) })
    }

    /// The inotify descriptor, to poll for ``POLLIN``.
    fn fileno(&self) -> PyResult<i32> {
        use std::os::fd::{AsFd, AsRawFd};
        Ok(self.open()?.as_fd().as_raw_fd())
    }

    fn rearm(&mut self, py: Python<'_>, paths: Vec<PathBuf>) -> PyResult<()> {
        let inner = self.inner.as_mut().ok_or_else(closed)?;
        py.detach(|| inner.rearm(&paths)).map_err(PyErr::from)
    }

    /// Closes the descriptor (idempotent).
    fn close(&mut self) {
        self.inner = None;
    }
}

impl Tripwire {
    fn open(&self) -> PyResult<&sandboxd_watch::Tripwire> {
        self.inner.as_ref().ok_or_else(closed)
    }
}

fn closed() -> PyErr {
    PyValueError::new_err("tripwire is closed")
}

fn to_pyerr(err: WatchError) -> PyErr {
    let message = err.to_string();
    match err.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, message)),
        None => PyOSError::new_err(message),
    }
}

fn to_tuples(items: Vec<Item>) -> Vec<(i32, String)> {
    items
        .into_iter()
        .map(|item| match item {
            Item::Event(event) => (event.kind.number(), event.name),
            Item::Overflow { dropped_hint } => (
                WATCH_OVERFLOW,
                dropped_hint.map_or_else(String::new, |n| n.to_string()),
            ),
            Item::Closed => (WATCH_CLOSED, String::new()),
        })
        .collect()
}

/// A recursive (or flat) inotify watch on one directory.
#[pyclass(module = "sandboxd._core", name = "Watcher")]
pub(crate) struct Watcher {
    /// `None` once closed. Held only to clone the `Arc` (or to take it on close): the drainer
    /// synchronises its own reads.
    inner: Mutex<Option<Arc<Drainer>>>,
    /// The fd number, kept after close so `fileno()` stays cheap (and `-1` once closed).
    fd: std::sync::atomic::AtomicI32,
}

impl Watcher {
    fn drainer(&self) -> PyResult<Arc<Drainer>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the watcher is closed"))
    }
}

#[pymethods]
impl Watcher {
    #[new]
    #[pyo3(signature = (path, recursive, buffer_bytes = DEFAULT_BUFFER_BYTES))]
    fn new(py: Python<'_>, path: PathBuf, recursive: bool, buffer_bytes: usize) -> PyResult<Self> {
        let drainer = py
            .detach(|| Drainer::new(&path, recursive, buffer_bytes))
            .map_err(to_pyerr)?;
        let fd = drainer.as_raw_fd();
        Ok(Watcher {
            inner: Mutex::new(Some(Arc::new(drainer))),
            fd: std::sync::atomic::AtomicI32::new(fd),
        })
    }

    /// The eventfd that is readable while events are buffered.
    fn fileno(&self) -> PyResult<i32> {
        match self.fd.load(std::sync::atomic::Ordering::Relaxed) {
            -1 => Err(PyValueError::new_err("the watcher is closed")),
            fd => Ok(fd),
        }
    }

    /// The inotify descriptor, readable while the kernel holds events (for a parked consumer).
    fn kernel_fileno(&self) -> PyResult<i32> {
        Ok(self.drainer()?.kernel_fd())
    }

    /// The caller reads the kernel queue itself while it waits (see `Drainer::park`); the thread
    /// takes it back by itself if the caller leaves it unread for `WATCH_TAKEOVER_S`.
    fn park(&self) -> PyResult<()> {
        self.drainer()?.park();
        Ok(())
    }

    /// The drain thread reads the kernel queue again.
    fn unpark(&self) -> PyResult<()> {
        self.drainer()?.unpark();
        Ok(())
    }

    /// One bounded read of the kernel queue into the buffer, for a parked caller; returns whether
    /// the caller still holds the queue (see `Drainer::read_kernel`). A closed watcher: False.
    fn read_kernel(&self) -> bool {
        let drainer = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        drainer.is_some_and(|d| d.read_kernel())
    }

    /// True once the watched directory went away or `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        let drainer = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        drainer.is_none_or(|d| d.is_closed())
    }

    /// Up to `max_items` buffered events (all of them for `None`), oldest first, without blocking.
    #[pyo3(signature = (max_items = None))]
    fn read_batch(&self, max_items: Option<usize>) -> PyResult<Vec<(i32, String)>> {
        // With the GIL held: the take only moves items under the buffer's lock, which the drain
        // thread holds for memory moves alone, never while it needs the GIL; dropping the GIL and
        // taking it back cost more than the take.
        self.drainer()?
            .take(max_items.unwrap_or(usize::MAX))
            .map(to_tuples)
            .map_err(to_pyerr)
    }

    /// Handles what the kernel holds right now, before the drain thread gets to it: a directory
    /// created before this call is watched when it returns.
    fn sync(&self, py: Python<'_>) -> PyResult<()> {
        let drainer = self.drainer()?;
        py.detach(|| drainer.sync());
        Ok(())
    }

    /// Waits up to `timeout` seconds (forever for `None`) with the GIL released, then returns
    /// what is pending.
    #[pyo3(signature = (timeout))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Vec<(i32, String)>> {
        let timeout = match timeout {
            Some(t) if !(t.is_finite() && t >= 0.0) => {
                return Err(PyValueError::new_err(
                    "timeout must be a non-negative number",
                ));
            }
            Some(t) => Some(Duration::from_secs_f64(t)),
            None => None,
        };
        let drainer = self.drainer()?;
        py.detach(|| drainer.wait(timeout))
            .map(to_tuples)
            .map_err(to_pyerr)
    }

    /// Stops the drain thread and removes the watch. Idempotent; the work (joining the thread,
    /// removing one watch per directory) runs without the GIL.
    fn close(&self, py: Python<'_>) {
        self.fd.store(-1, std::sync::atomic::Ordering::Relaxed);
        let watcher = {
            let mut guard = self
                .inner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            guard.take()
        };
        py.detach(move || drop(watcher));
    }
}
