//! Core errors as Python exceptions: an errno becomes the built-in `OSError` subclass Python picks
//! for it (`FileNotFoundError` for `ENOENT`, `IsADirectoryError` for `EISDIR`, ...), with `errno`,
//! `strerror`, `filename` and, for renames, `filename2` set, exactly as `os` functions raise them.
//! The service layer maps those in one table to Connect codes and HTTP statuses.

use pyo3::PyErr;
use pyo3::exceptions::{PyOSError, PyValueError};
use sandboxd_fs::Error;

/// Converts a core error into the Python exception the `os` module would raise for it.
///
/// `OSError(errno, strerror, filename[, None, filename2])` is turned into the subclass for the
/// errno by `OSError.__new__` itself. A use of a closed reader or writer is a `ValueError`, as for
/// Python's own file objects; an error without errno (a path with a NUL byte) is a `ValueError` too.
pub(crate) fn to_pyerr(err: Error) -> PyErr {
    let (Some(errno), Some(strerror)) = (err.raw_os_error(), err.strerror()) else {
        return match err {
            Error::Os { ref source, .. } if source.kind() != std::io::ErrorKind::InvalidInput => {
                PyOSError::new_err(err.to_string())
            }
            _ => PyValueError::new_err(err.to_string()),
        };
    };
    // An `OsString` becomes a `str` (decoded as `os.fsdecode` does) where a `PathBuf` would become
    // a `pathlib.Path`: the `os` module reports `filename` as a `str`.
    let path = err.path().as_os_str().to_owned();
    match err.path2() {
        None => PyOSError::new_err((errno, strerror, path)),
        Some(path2) => {
            let path2 = path2.as_os_str().to_owned();
            PyOSError::new_err((errno, strerror, path, None::<i32>, path2))
        }
    }
}
