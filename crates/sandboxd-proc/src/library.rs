//! A shared library loaded into this process by path (`dlopen(3)`), and unloaded again by the one
//! who loaded it. The standalone agent loads a stand-in whose only content is a `DT_SONAME`, so that
//! a library naming that soname as needed finds it loaded already (`sandboxd.agent.lean`).
//!
//! This is here, not in Python through `ctypes`, because loading `ctypes` costs an agent ~0.45 MiB
//! of resident memory (see `malloc`).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_void};
use std::io;

/// A library this process loaded with `RTLD_NOW | RTLD_LOCAL`. Dropping it keeps the library
/// loaded; [`Library::close`] unloads it.
#[derive(Debug)]
pub struct Library {
    handle: *mut c_void,
}

// SAFETY: a dlopen handle is a process-wide token; glibc's dlclose may be called from any thread.
unsafe impl Send for Library {}

impl Library {
    /// Loads the library at `path`, all its symbols resolved now; the loader's message as the
    /// error (kind `Other`) when it refuses.
    pub fn open(path: &str) -> io::Result<Library> {
        let path = CString::new(path).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid NUL-terminated path; the flags are plain values. Running the library's
        // initialisers is the caller's choice of library.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(io::Error::other(last_error()));
        }
        Ok(Library { handle })
    }

    /// Unloads the library (once: later calls do nothing); whether the loader accepted it.
    pub fn close(&mut self) -> bool {
        if self.handle.is_null() {
            return true;
        }
        // SAFETY: the handle came from dlopen and is closed once (it is nulled here).
        let closed = unsafe { libc::dlclose(self.handle) } == 0;
        self.handle = std::ptr::null_mut();
        closed
    }
}

fn last_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the loader, valid until the
    // next dl* call on this thread; it is copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        return "dlopen failed".into();
    }
    // SAFETY: see above.
    unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::Library;

    #[test]
    fn a_library_of_the_system_loads_and_unloads_and_a_missing_one_is_an_error() {
        let mut lib = Library::open("libm.so.6").expect("libm loads");
        assert!(lib.close());
        assert!(lib.close()); // a second close does nothing
        let err = Library::open("/nonexistent/libnothing.so").unwrap_err();
        assert!(err.to_string().contains("libnothing"), "{err}");
        assert!(Library::open("nul\0inside").is_err());
    }
}
