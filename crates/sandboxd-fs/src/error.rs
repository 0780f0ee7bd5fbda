//! Errors of the file core: the errno a system call returned, and the path(s) it was called on.
//!
//! The kernel reports *what* failed (an errno); the caller needs to know *where*, so every
//! [`Error::Os`] carries the path, and for `rename(2)` the second path too. The Python binding turns
//! these into `OSError(errno, strerror, filename, None, filename2)`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A failed file operation.
#[derive(Debug)]
pub enum Error {
    /// A system call failed on `path` (and `path2`, for two-path calls such as `rename(2)`).
    Os {
        /// The error the call returned; [`io::Error::raw_os_error`] is the errno when there is one.
        source: io::Error,
        /// The path the call was made on.
        path: PathBuf,
        /// The second path of a two-path call (the destination of a rename).
        path2: Option<PathBuf>,
    },
    /// A write, commit or read on a writer or reader that was already committed, aborted or closed.
    Closed {
        /// The path the object was opened for.
        path: PathBuf,
    },
}

/// The result type of the file core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An OS error that happened on `path`.
    pub fn os(source: io::Error, path: impl Into<PathBuf>) -> Self {
        Self::Os {
            source,
            path: path.into(),
            path2: None,
        }
    }

    /// An OS error from an errno, on `path`.
    pub fn errno(errno: i32, path: impl Into<PathBuf>) -> Self {
        Self::os(io::Error::from_raw_os_error(errno), path)
    }

    /// The errno of the failure, if the kernel reported one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Os { source, .. } => source.raw_os_error(),
            Self::Closed { .. } => None,
        }
    }

    /// The C library's message for the errno (`strerror(3)`), e.g. "No such file or directory".
    pub fn strerror(&self) -> Option<&'static str> {
        self.raw_os_error()
            .map(|errno| nix::errno::Errno::from_raw(errno).desc())
    }

    /// The kind of the failure ([`io::ErrorKind::NotFound`], ...).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            Self::Os { source, .. } => source.kind(),
            Self::Closed { .. } => io::ErrorKind::Other,
        }
    }

    /// The path the failure happened on.
    pub fn path(&self) -> &Path {
        match self {
            Self::Os { path, .. } | Self::Closed { path } => path,
        }
    }

    /// The second path of a two-path call, if any.
    pub fn path2(&self) -> Option<&Path> {
        match self {
            Self::Os { path2, .. } => path2.as_deref(),
            Self::Closed { .. } => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Os {
                source,
                path,
                path2: None,
            } => write!(f, "{source}: {}", path.display()),
            Self::Os {
                source,
                path,
                path2: Some(path2),
            } => {
                write!(f, "{source}: {} -> {}", path.display(), path2.display())
            }
            Self::Closed { path } => write!(f, "I/O operation on closed file: {}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Os { source, .. } => Some(source),
            Self::Closed { .. } => None,
        }
    }
}

/// Attaches the path(s) to an `io::Result`.
pub(crate) trait IoResultExt<T> {
    /// The error happened on `path`.
    fn at(self, path: &Path) -> Result<T>;
    /// The error happened on `path` and `path2` (a rename).
    fn at2(self, path: &Path, path2: &Path) -> Result<T>;
}

impl<T> IoResultExt<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::os(source, path))
    }

    fn at2(self, path: &Path, path2: &Path) -> Result<T> {
        self.map_err(|source| Error::Os {
            source,
            path: path.into(),
            path2: Some(path2.into()),
        })
    }
}

impl<T> IoResultExt<T> for nix::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(io::Error::from).at(path)
    }

    fn at2(self, path: &Path, path2: &Path) -> Result<T> {
        self.map_err(io::Error::from).at2(path, path2)
    }
}
