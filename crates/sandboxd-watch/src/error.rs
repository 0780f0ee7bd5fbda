//! Errors a watcher reports, each tied to the errno the kernel gave.
//!
//! The kernel limits inotify per user: `inotify_init1(2)` fails with `EMFILE` once the user holds
//! `fs.inotify.max_user_instances` instances, and `inotify_add_watch(2)` fails with `ENOSPC` once the
//! user holds `fs.inotify.max_user_watches` watches. Both get their own variant here so that the
//! caller can answer `resource_exhausted` and name the sysctl to raise, instead of a generic error.

use std::fmt;
use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

/// Why a watcher could not be created or could not keep watching.
#[derive(Debug)]
#[non_exhaustive]
pub enum WatchError {
    /// The directory to watch does not exist (`ENOENT`).
    NotFound(PathBuf),
    /// The path to watch exists but is not a directory (`ENOTDIR`).
    NotADirectory(PathBuf),
    /// `inotify_add_watch` hit `fs.inotify.max_user_watches` (`ENOSPC`).
    ///
    /// Report it as `resource_exhausted: raise fs.inotify.max_user_watches`.
    WatchLimit,
    /// `inotify_init1` hit `fs.inotify.max_user_instances` (`EMFILE`).
    ///
    /// Report it as `resource_exhausted: raise fs.inotify.max_user_instances`.
    InstanceLimit,
    /// Any other I/O error from the kernel.
    Io(io::Error),
}

impl WatchError {
    /// The errno that best describes this error, for callers that map errors by errno (as Python's
    /// `OSError` subclasses do).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            WatchError::NotFound(_) => Some(Errno::ENOENT as i32),
            WatchError::NotADirectory(_) => Some(Errno::ENOTDIR as i32),
            WatchError::WatchLimit => Some(Errno::ENOSPC as i32),
            WatchError::InstanceLimit => Some(Errno::EMFILE as i32),
            WatchError::Io(err) => err.raw_os_error(),
        }
    }

    /// True for the two inotify limits, which callers report as `resource_exhausted`.
    pub fn is_resource_exhausted(&self) -> bool {
        matches!(self, WatchError::WatchLimit | WatchError::InstanceLimit)
    }
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::NotFound(path) => write!(f, "path {} not found", path.display()),
            WatchError::NotADirectory(path) => {
                write!(f, "path {} is not a directory", path.display())
            }
            WatchError::WatchLimit => f.write_str(
                "inotify watch limit reached (ENOSPC): raise fs.inotify.max_user_watches",
            ),
            WatchError::InstanceLimit => f.write_str(
                "inotify instance limit reached (EMFILE): raise fs.inotify.max_user_instances",
            ),
            WatchError::Io(err) => write!(f, "inotify: {err}"),
        }
    }
}

impl std::error::Error for WatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WatchError::Io(err) => Some(err),
            _ => None,
        }
    }
}

impl From<io::Error> for WatchError {
    fn from(err: io::Error) -> Self {
        WatchError::Io(err)
    }
}

impl From<WatchError> for io::Error {
    /// Keeps the errno's `ErrorKind` (so `NotFound` stays `NotFound`) and this error's message.
    fn from(err: WatchError) -> Self {
        match err {
            WatchError::Io(err) => err,
            other => {
                let kind = other.raw_os_error().map_or(io::ErrorKind::Other, |errno| {
                    io::Error::from_raw_os_error(errno).kind()
                });
                io::Error::new(kind, other)
            }
        }
    }
}
