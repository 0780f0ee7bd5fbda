//! `OutputChunk`: one chunk of a process's output ring, lent to Python without a copy.
//!
//! Python's buffer protocol (PEP 3118) lets an object expose memory it owns to `memoryview`,
//! `bytes.join`, `binascii` and socket writes (uvloop's `writelines`, a `writev(2)`). A chunk of
//! the ring is an immutable `Arc<[u8]>`: the object holds one reference, so the memory stays valid
//! and unchanged for as long as any view of it exists (a view holds the object), and it is exposed
//! read-only. Process output sent as binary Connect frames goes from the ring to the socket this
//! way, with no copy in user space (measured in benches/README.md, scenario `commands`).

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use pyo3::ffi;
use pyo3::prelude::*;

/// A read-only chunk of process output (supports the buffer protocol; `bytes(chunk)` copies it).
#[pyclass(frozen, module = "sandboxd._core", name = "OutputChunk")]
pub(crate) struct OutputChunk(pub(crate) Arc<[u8]>);

#[pymethods]
impl OutputChunk {
    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Fills `view` with this chunk's bytes, read-only (a writable request fails with
    /// `BufferError`), holding a reference to the object.
    #[allow(unsafe_code)]
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let data: &[u8] = &slf.get().0;
        let len = ffi::Py_ssize_t::try_from(data.len())
            .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("chunk too large"))?;
        // SAFETY: `view` is the Py_buffer the interpreter passes to bf_getbuffer. The pointer and
        // length describe memory owned by the `Arc<[u8]>` inside `slf`; PyBuffer_FillInfo stores a
        // new reference to `slf` in `view.obj`, so the object (and the Arc's memory, which is never
        // mutated) outlives every view. `readonly = 1` makes PyBUF_WRITABLE requests fail, so the
        // cast to `*mut` is never written through.
        let status = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                data.as_ptr() as *mut c_void,
                len,
                1,
                flags,
            )
        };
        if status == 0 {
            Ok(())
        } else {
            Err(PyErr::fetch(slf.py()))
        }
    }

    /// Nothing to release: the view's reference to this object keeps the bytes alive.
    #[allow(unsafe_code)]
    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}

    fn __repr__(&self) -> String {
        format!("OutputChunk({} bytes)", self.0.len())
    }
}
