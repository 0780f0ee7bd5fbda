//! `sandboxd._core`: the PyO3 extension over the sandboxd core crates, the only crate that
//! imports pyo3.
//!
//! Each submodule binds one core crate and registers its functions and classes here; the typed
//! interface and its docstrings are in `python/sandboxd/_core.pyi`. Every call that touches the
//! kernel releases the GIL, and core errors become Python's built-in `OSError` subclasses
//! ([`errors`]).

#![deny(unsafe_code)]

mod chunk;
mod encode;
mod errors;
mod fs;
mod jail;
mod listing;
mod net;
mod proc;
mod watch;
mod zygote;

use pyo3::prelude::*;

/// The module initialiser: `__version__` (the crate version) and each binding's contents.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    encode::register(m)?;
    fs::register(m)?;
    jail::register(m)?;
    listing::register(m)?;
    net::register(m)?;
    proc::register(m)?;
    watch::register(m)?;
    zygote::register(m)?;
    Ok(())
}
