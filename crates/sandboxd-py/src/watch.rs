//! Binding of `sandboxd-watch`: a recursive inotify watcher whose pending events cross into
//! Python as one list per call, `(kind, name)` tuples with envd's `EventType` numbers.
//!
//! The inotify fd is exposed through `fileno()` so asyncio waits on it with `loop.add_reader`
//! (no thread per watch); `wait()` blocks with the GIL released for callers without a loop.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sandboxd_watch::{DEFAULT_PENDING_CAP, Item, WatchError, Watcher as CoreWatcher};

/// Batch item kind for lost events (kernel overflow or the pending cap), after envd's 1..=5.
const WATCH_OVERFLOW: i32 = 100;
/// Batch item kind for the watched directory itself going away.
const WATCH_CLOSED: i32 = 101;

/// Adds the watcher class and its constants to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("WATCH_OVERFLOW", WATCH_OVERFLOW)?;
    m.add("WATCH_CLOSED", WATCH_CLOSED)?;
    m.add_class::<Watcher>()?;
    Ok(())
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
            Item::Overflow { .. } => (WATCH_OVERFLOW, String::new()),
            Item::Closed => (WATCH_CLOSED, String::new()),
        })
        .collect()
}

/// A recursive (or flat) inotify watch on one directory.
#[pyclass(module = "sandboxd._core", name = "Watcher")]
pub(crate) struct Watcher {
    /// `None` once closed. The mutex serialises reads of the inotify fd: a batch is decoded
    /// against the watcher's directory tree, which only one reader may update at a time.
    inner: Mutex<Option<CoreWatcher>>,
    /// The fd number, kept after close so `fileno()` stays cheap (and `-1` once closed).
    fd: std::sync::atomic::AtomicI32,
}

impl Watcher {
    fn with<T>(&self, f: impl FnOnce(&mut CoreWatcher) -> Result<T, WatchError>) -> PyResult<T> {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let watcher = guard
            .as_mut()
            .ok_or_else(|| PyValueError::new_err("the watcher is closed"))?;
        f(watcher).map_err(to_pyerr)
    }
}

#[pymethods]
impl Watcher {
    #[new]
    #[pyo3(signature = (path, recursive, pending_cap = DEFAULT_PENDING_CAP))]
    fn new(py: Python<'_>, path: PathBuf, recursive: bool, pending_cap: usize) -> PyResult<Self> {
        let watcher = py
            .detach(|| CoreWatcher::with_pending_cap(&path, recursive, pending_cap))
            .map_err(to_pyerr)?;
        let fd = watcher.as_raw_fd();
        Ok(Watcher {
            inner: Mutex::new(Some(watcher)),
            fd: std::sync::atomic::AtomicI32::new(fd),
        })
    }

    /// The inotify fd, readable when events are pending.
    fn fileno(&self) -> PyResult<i32> {
        match self.fd.load(std::sync::atomic::Ordering::Relaxed) {
            -1 => Err(PyValueError::new_err("the watcher is closed")),
            fd => Ok(fd),
        }
    }

    /// True once the watched directory went away or `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        let guard = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.as_ref().is_none_or(CoreWatcher::is_closed)
    }

    /// Every pending event, without blocking.
    fn read_batch(&self, py: Python<'_>) -> PyResult<Vec<(i32, String)>> {
        py.detach(|| self.with(CoreWatcher::read_batch))
            .map(to_tuples)
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
        py.detach(|| self.with(|w| w.wait(timeout))).map(to_tuples)
    }

    /// Removes the watch. Idempotent; the kernel work (about a millisecond) runs without the GIL.
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
