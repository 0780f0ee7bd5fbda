//! Bindings of `sandboxd-fs`: entry info, listing, mkdir/rename/remove, metadata, and the chunked
//! reader and atomic writer used by `GET /files` and `POST /files`.
//!
//! Every call into the kernel runs inside `py.detach`, so other Python threads (and the event
//! loop, when called through `asyncio.to_thread`) keep running while a disk is slow.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sandboxd_fs as core;

use crate::errors::to_pyerr;

/// Adds this binding's functions, classes and constants to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FILE_TYPE_UNSPECIFIED", core::FileType::Unspecified as i32)?;
    m.add("FILE_TYPE_FILE", core::FileType::File as i32)?;
    m.add("FILE_TYPE_DIRECTORY", core::FileType::Directory as i32)?;
    m.add("FILE_TYPE_SYMLINK", core::FileType::Symlink as i32)?;
    m.add("READ_CHUNK", core::READ_CHUNK)?;
    m.add("RECEIVE_MIN_RATE", core::splice::MIN_RATE)?;
    m.add_class::<EntryInfo>()?;
    m.add_class::<FileReader>()?;
    m.add_class::<AtomicWriter>()?;
    m.add_class::<MultipartReader>()?;
    m.add("MULTIPART_MAX_BOUNDARY", core::multipart::MAX_BOUNDARY)?;
    m.add_function(wrap_pyfunction!(entry_info, m)?)?;
    m.add_function(wrap_pyfunction!(list_dir, m)?)?;
    m.add_function(wrap_pyfunction!(make_dir, m)?)?;
    m.add_function(wrap_pyfunction!(rename, m)?)?;
    m.add_function(wrap_pyfunction!(remove_all, m)?)?;
    m.add_function(wrap_pyfunction!(set_metadata, m)?)?;
    Ok(())
}

/// One filesystem entry, built as envd builds `filesystem.EntryInfo` (spec §4.1).
#[pyclass(frozen, module = "sandboxd._core", name = "EntryInfo")]
pub(crate) struct EntryInfo(core::EntryInfo);

#[pymethods]
impl EntryInfo {
    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }

    #[getter]
    fn path(&self) -> &str {
        &self.0.path
    }

    #[getter(r#type)]
    fn file_type(&self) -> i32 {
        self.0.file_type as i32
    }

    #[getter]
    fn size(&self) -> u64 {
        self.0.size
    }

    #[getter]
    fn mode(&self) -> u32 {
        self.0.mode
    }

    #[getter]
    fn permissions(&self) -> &str {
        &self.0.permissions
    }

    #[getter]
    fn owner(&self) -> &str {
        &self.0.owner
    }

    #[getter]
    fn group(&self) -> &str {
        &self.0.group
    }

    #[getter]
    fn mtime_sec(&self) -> i64 {
        self.0.mtime_sec
    }

    #[getter]
    fn mtime_nsec(&self) -> u32 {
        self.0.mtime_nsec
    }

    #[getter]
    fn symlink_target(&self) -> Option<&str> {
        self.0.symlink_target.as_deref()
    }

    #[getter]
    fn is_symlink(&self) -> bool {
        self.0.is_symlink
    }

    #[getter]
    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.0.metadata
    }

    fn __repr__(&self) -> String {
        let e = &self.0;
        format!(
            "EntryInfo(path={:?}, type={}, size={}, permissions={:?}, owner={:?}, group={:?}, symlink_target={:?})",
            e.path, e.file_type as i32, e.size, e.permissions, e.owner, e.group, e.symlink_target
        )
    }
}

/// `lstat` `path` and describe it; a symlink's type and mode are its target's.
#[pyfunction]
fn entry_info(py: Python<'_>, path: PathBuf) -> PyResult<EntryInfo> {
    py.detach(|| core::entry_info(&path))
        .map(EntryInfo)
        .map_err(to_pyerr)
}

/// List `path` to `depth` levels (0 means 1), lexically, as envd's `ListDir`.
#[pyfunction]
fn list_dir(py: Python<'_>, path: PathBuf, depth: u32) -> PyResult<Vec<EntryInfo>> {
    let entries = py
        .detach(|| core::list_dir(&path, depth))
        .map_err(to_pyerr)?;
    Ok(entries.into_iter().map(EntryInfo).collect())
}

/// Create `path` and its missing parents (0755, chowned to uid/gid when running as root).
#[pyfunction]
fn make_dir(py: Python<'_>, path: PathBuf, uid: u32, gid: u32) -> PyResult<EntryInfo> {
    py.detach(|| core::make_dir(&path, uid, gid))
        .map(EntryInfo)
        .map_err(to_pyerr)
}

/// Create the destination's missing parents, then `rename(2)`; returns the destination's entry.
#[pyfunction]
fn rename(
    py: Python<'_>,
    source: PathBuf,
    destination: PathBuf,
    uid: u32,
    gid: u32,
) -> PyResult<EntryInfo> {
    py.detach(|| core::rename(&source, &destination, uid, gid))
        .map(EntryInfo)
        .map_err(to_pyerr)
}

/// Remove `path` recursively without following symlinks; a missing path is not an error.
#[pyfunction]
fn remove_all(py: Python<'_>, path: PathBuf) -> PyResult<()> {
    py.detach(|| core::remove_all(&path)).map_err(to_pyerr)
}

/// Replace the `user.e2b.*` extended attributes of `path` with `metadata`.
#[pyfunction]
fn set_metadata(py: Python<'_>, path: PathBuf, metadata: core::Metadata) -> PyResult<()> {
    py.detach(|| core::set_metadata(&path, &metadata))
        .map_err(to_pyerr)
}

/// The `ValueError` Python's own file objects raise after `close()`.
fn closed(path: &Path) -> PyErr {
    to_pyerr(core::Error::Closed { path: path.into() })
}

/// A file opened for chunked reading; iterating yields chunks until EOF.
#[pyclass(module = "sandboxd._core", name = "FileReader")]
pub(crate) struct FileReader {
    inner: core::FileReader,
}

#[pymethods]
impl FileReader {
    #[new]
    #[pyo3(signature = (path, offset = 0, length = None, chunk = core::READ_CHUNK))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        offset: u64,
        length: Option<u64>,
        chunk: usize,
    ) -> PyResult<Self> {
        if chunk == 0 {
            return Err(PyValueError::new_err("chunk must be positive"));
        }
        let inner = py
            .detach(|| core::FileReader::open(&path, offset, length, chunk))
            .map_err(to_pyerr)?;
        Ok(Self { inner })
    }

    /// The file's size when it was opened.
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Whether `size` tells how many bytes the read gives: true for a regular file on a disk
    /// filesystem; false for `/proc` and `/sys` files (whose `st_size` is 0 or a page), devices and
    /// FIFOs, which are read until EOF.
    #[getter]
    fn sized(&self) -> bool {
        self.inner.is_sized()
    }

    /// Bytes still to read; None for a stream read to its end.
    #[getter]
    fn remaining(&self) -> Option<u64> {
        self.inner.remaining()
    }

    /// Sends the rest of a sized read to the stream socket `fd` (non-blocking; the caller keeps it
    /// open and writes nothing else to it meanwhile) with `sendfile(2)`, without the GIL, until
    /// `stop_fd` (an eventfd) becomes readable: `(outcome, sent)`, outcome "done", "short" (the
    /// file ended first), "closed" (the peer left), "stalled" (the socket took nothing for
    /// `idle_timeout` seconds), "stopped" or "unsupported" (nothing sent: a stream, or a file the
    /// kernel cannot sendfile from). A failed read raises `OSError`.
    fn send_to(
        &mut self,
        py: Python<'_>,
        fd: i32,
        stop_fd: i32,
        idle_timeout: f64,
    ) -> PyResult<(&'static str, u64)> {
        use core::splice::Sent;
        let idle = Duration::try_from_secs_f64(idle_timeout).map_err(|_| {
            PyValueError::new_err("idle_timeout must be a non-negative number of seconds")
        })?;
        let inner = &mut self.inner;
        let (how, sent) = py
            .detach(|| inner.send_to(fd, stop_fd, idle))
            .map_err(to_pyerr)?;
        let how = match how {
            Sent::Done => "done",
            Sent::Short => "short",
            Sent::Closed => "closed",
            Sent::Stalled => "stalled",
            Sent::Stopped => "stopped",
            Sent::Unsupported => "unsupported",
        };
        Ok((how, sent))
    }

    /// The next chunk; `b""` at the end.
    ///
    /// The `bytes` object is allocated at the chunk's size and filled by `read(2)` with the GIL
    /// released, so a chunk is copied once (kernel to Python); only a short read (a file that
    /// shrank, or a stream) costs a second copy into a smaller object.
    fn read<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        if self.inner.is_closed() {
            return Err(closed(self.inner.path()));
        }
        let want = self.inner.next_len();
        if want == 0 {
            return Ok(PyBytes::new(py, b""));
        }
        let reader = &mut self.inner;
        let mut got = 0;
        let bytes = PyBytes::new_with(py, want, |buf| {
            got = py.detach(|| reader.read_into(buf)).map_err(to_pyerr)?;
            Ok(())
        })?;
        if got == want {
            Ok(bytes)
        } else {
            Ok(PyBytes::new(py, &bytes.as_bytes()[..got]))
        }
    }

    /// Close the file; later reads raise `ValueError`.
    fn close(&mut self) {
        self.inner.close();
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let chunk = self.read(py)?;
        Ok((!chunk.as_bytes().is_empty()).then_some(chunk))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (exc_type = None, exc = None, tb = None))]
    fn __exit__(
        &mut self,
        exc_type: Option<Bound<'_, PyAny>>,
        exc: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) {
        let _ = (exc_type, exc, tb);
        self.inner.close();
    }
}

/// Writes a file atomically through a hidden temporary file that `commit` renames over the target.
#[pyclass(module = "sandboxd._core", name = "AtomicWriter")]
pub(crate) struct AtomicWriter {
    inner: core::AtomicWriter,
}

#[pymethods]
impl AtomicWriter {
    #[new]
    fn new(py: Python<'_>, path: PathBuf, uid: u32, gid: u32) -> PyResult<Self> {
        let inner = py
            .detach(|| core::AtomicWriter::create(&path, uid, gid))
            .map_err(to_pyerr)?;
        Ok(Self { inner })
    }

    /// The path as given (a `str`, decoded as `os.fsdecode` does).
    #[getter]
    fn path(&self) -> &OsStr {
        self.inner.path().as_os_str()
    }

    /// The file `commit` replaces: `path`, or the resolved target when `path` was a symlink to
    /// a file as it opened (a `str`, as `path`).
    #[getter]
    fn target(&self) -> &OsStr {
        self.inner.target().as_os_str()
    }

    /// The hidden temporary file the data goes to until `commit` (a `str`, as `path`). Watchers
    /// see its name in the rename that commits the upload.
    #[getter]
    fn temp_path(&self) -> &OsStr {
        self.inner.temp_path().as_os_str()
    }

    /// Bytes written so far.
    #[getter]
    fn written(&self) -> u64 {
        self.inner.written()
    }

    /// Append all of `data` to the temporary file.
    fn write(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.write(data)).map_err(to_pyerr)
    }

    /// Append exactly `length` bytes read from the stream socket `fd` (non-blocking; the caller
    /// keeps it open and does not read it meanwhile), socket → pipe → file with `splice(2)`,
    /// without the GIL. "complete", "closed" (the client closed early), "timed out" (nothing
    /// arrived for `idle_timeout` seconds) or "too slow" (under `RECEIVE_MIN_RATE` bytes/s on average
    /// after the first `idle_timeout`) or "stopped" (`stop_fd`, an eventfd, became readable); a
    /// failed file write raises `OSError` as `write` does.
    #[pyo3(signature = (fd, length, idle_timeout, stop_fd = None))]
    fn receive_from(
        &mut self,
        py: Python<'_>,
        fd: i32,
        length: u64,
        idle_timeout: f64,
        stop_fd: Option<i32>,
    ) -> PyResult<&'static str> {
        let idle = Duration::try_from_secs_f64(idle_timeout).map_err(|_| {
            PyValueError::new_err("idle_timeout must be a non-negative number of seconds")
        })?;
        let inner = &mut self.inner;
        let received = py
            .detach(|| inner.receive_from(fd, length, idle, stop_fd))
            .map_err(to_pyerr)?;
        Ok(match received {
            core::splice::Received::Complete => "complete",
            core::splice::Received::Closed(_) => "closed",
            core::splice::Received::TimedOut(_) => "timed out",
            core::splice::Received::TooSlow(_) => "too slow",
            core::splice::Received::Stopped(_) => "stopped",
        })
    }

    /// Set `user.e2b.*` metadata (replacing any), chown to uid/gid, and rename into place (after
    /// `seal`, only the rename).
    #[pyo3(signature = (metadata = None))]
    fn commit(&mut self, py: Python<'_>, metadata: Option<core::Metadata>) -> PyResult<()> {
        let metadata = metadata.unwrap_or_default();
        let inner = &mut self.inner;
        py.detach(|| inner.commit(&metadata)).map_err(to_pyerr)
    }

    /// Set `user.e2b.*` metadata and chown, as `commit` does, and close the temporary file: the
    /// data is complete, and `commit` only renames it (an upload of many files holds one
    /// descriptor at a time).
    #[pyo3(signature = (metadata = None))]
    fn seal(&mut self, py: Python<'_>, metadata: Option<core::Metadata>) -> PyResult<()> {
        let metadata = metadata.unwrap_or_default();
        let inner = &mut self.inner;
        py.detach(|| inner.seal(&metadata)).map_err(to_pyerr)
    }

    /// Remove the temporary file; the target is untouched. Does nothing after commit or abort.
    fn abort(&mut self, py: Python<'_>) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.abort()).map_err(to_pyerr)
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// With an exception, abort; without one, do nothing (the caller commits explicitly).
    #[pyo3(signature = (exc_type = None, exc = None, tb = None))]
    fn __exit__(
        &mut self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        exc: Option<Bound<'_, PyAny>>,
        tb: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let _ = (exc, tb);
        if exc_type.is_some() {
            self.abort(py)
        } else {
            Ok(())
        }
    }
}

/// A `multipart/form-data` body read from a socket by a worker thread (`POST /files`): the caller
/// asks for each part's headers, decides where its data goes, and has it written there, without
/// the GIL and without Python touching the bytes (see `sandboxd_fs::multipart`).
#[pyclass(module = "sandboxd._core", name = "MultipartReader")]
pub(crate) struct MultipartReader {
    /// Boxed: its `memmem` searcher holds AVX2 vectors, aligned to 32 bytes, and a Python object's
    /// memory is aligned to 16 only (unboxed, `vmovdqa` faulted on a misaligned object).
    inner: Box<core::multipart::MultipartReader>,
}

/// A step's name for Python: what `RawBody.receive_into` expects of a move ("complete", "closed",
/// ...), or "part"/"part done"; a malformed body raises `ValueError` with the reason.
fn step_name(step: core::multipart::Step) -> PyResult<(&'static str, Option<Vec<u8>>)> {
    use core::multipart::Step;
    use core::splice::Received;
    Ok(match step {
        Step::Part(headers) => ("part", Some(headers)),
        Step::PartDone => ("part done", None),
        Step::End => ("complete", None),
        Step::Ended(Received::Complete) => ("complete", None),
        Step::Ended(Received::Closed(_)) => ("closed", None),
        Step::Ended(Received::TimedOut(_)) => ("timed out", None),
        Step::Ended(Received::TooSlow(_)) => ("too slow", None),
        Step::Ended(Received::Stopped(_)) => ("stopped", None),
        Step::Malformed(why) => return Err(PyValueError::new_err(why)),
    })
}

#[pymethods]
impl MultipartReader {
    /// A reader of a body with `boundary` (1 to `MULTIPART_MAX_BOUNDARY` bytes), of which
    /// `prefix` was read already and `length` bytes are still in the socket; `idle_timeout` and
    /// `stop_fd` as for `AtomicWriter.receive_from`.
    #[new]
    #[pyo3(signature = (boundary, prefix, length, idle_timeout, stop_fd = None))]
    fn new(
        boundary: &[u8],
        prefix: &[u8],
        length: u64,
        idle_timeout: f64,
        stop_fd: Option<i32>,
    ) -> PyResult<Self> {
        if boundary.is_empty() || boundary.len() > core::multipart::MAX_BOUNDARY {
            return Err(PyValueError::new_err(
                "a multipart boundary must be 1 to 256 bytes",
            ));
        }
        let idle = Duration::try_from_secs_f64(idle_timeout).map_err(|_| {
            PyValueError::new_err("idle_timeout must be a non-negative number of seconds")
        })?;
        Ok(Self {
            inner: Box::new(core::multipart::MultipartReader::new(
                boundary, prefix, length, idle, stop_fd,
            )),
        })
    }

    /// Reads to the next part: `("part", headers)` (the header block, each line ending in CRLF),
    /// `("complete", None)` after the closing delimiter and the whole body, or how the transfer
    /// ended (`"closed"`, `"timed out"`, `"too slow"`, `"stopped"`). The current part's unwritten
    /// data is dropped.
    fn next_part(&mut self, py: Python<'_>, fd: i32) -> PyResult<(&'static str, Option<Vec<u8>>)> {
        let inner = &mut self.inner;
        let step = py.detach(|| inner.next_part(fd)).map_err(to_pyerr)?;
        step_name(step)
    }

    /// Reads and drops the rest of the body (after a refusal midway): "complete", or how the
    /// transfer ended.
    fn discard_rest(&mut self, py: Python<'_>, fd: i32) -> PyResult<&'static str> {
        let inner = &mut self.inner;
        let step = py.detach(|| inner.discard_rest(fd));
        Ok(step_name(step)?.0)
    }

    /// Writes the current part's data to `writer` (drops it when None) up to the next delimiter:
    /// "part done", or how the transfer ended. A failed write raises `OSError`.
    #[pyo3(signature = (fd, writer = None))]
    fn copy_part(
        &mut self,
        py: Python<'_>,
        fd: i32,
        mut writer: Option<PyRefMut<'_, AtomicWriter>>,
    ) -> PyResult<&'static str> {
        let inner = &mut self.inner;
        let file = writer.as_deref_mut().map(|w| &mut w.inner);
        let step = py.detach(|| inner.copy_part(fd, file)).map_err(to_pyerr)?;
        Ok(step_name(step)?.0)
    }
}
