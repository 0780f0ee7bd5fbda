//! Errno values for this crate's errors. Errors that come from a syscall carry the kernel's errno;
//! the ones this crate makes up itself (stdin closed, write timed out, cwd missing) carry only an
//! `io::ErrorKind` and a message. Bindings that report errors the way `os` does (an errno picks the
//! `OSError` subclass) get the errno of that kind from here.

use std::io;

/// The errno describing `err`: the OS error's own, or for an error of this crate without one,
/// the errno of its kind (`NotFound` → `ENOENT`, `NotADirectory` → `ENOTDIR`,
/// `PermissionDenied` → `EACCES`, `BrokenPipe` → `EPIPE`, `TimedOut` → `ETIMEDOUT`,
/// `Unsupported` → `EOPNOTSUPP`, `InvalidInput` → `EINVAL`). `None` for other kinds.
pub fn errno(err: &io::Error) -> Option<i32> {
    if let Some(errno) = err.raw_os_error() {
        return Some(errno);
    }
    Some(match err.kind() {
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::NotADirectory => libc::ENOTDIR,
        io::ErrorKind::PermissionDenied => libc::EACCES,
        io::ErrorKind::BrokenPipe => libc::EPIPE,
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        io::ErrorKind::Unsupported => libc::EOPNOTSUPP,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_errno_and_made_up_ones_get_their_kinds() {
        assert_eq!(
            errno(&io::Error::from_raw_os_error(libc::ESRCH)),
            Some(libc::ESRCH)
        );
        let closed = io::Error::new(io::ErrorKind::BrokenPipe, "stdin not enabled or closed");
        assert_eq!(errno(&closed), Some(libc::EPIPE));
        assert_eq!(errno(&io::Error::other("x")), None);
    }
}
