//! Pseudo-terminal pairs. Opening `/dev/ptmx` makes the kernel allocate a master and a slave
//! (`/dev/pts/N`); what the child writes to the slave is read from the master, passed through the
//! line discipline (echo, `\n` → `\r\n`, …). When every slave fd is closed, `read(2)` on the master
//! fails with `EIO`, which is how a PTY says end-of-file. The window size lives in the kernel's
//! tty and is changed with `TIOCSWINSZ`, which also sends `SIGWINCH` to the foreground group.
//!
//! Both ends are opened `O_CLOEXEC` from the start (not `openpty(3)`, which leaves a window where a
//! concurrent fork in another thread could inherit them and hold the slave open, delaying EIO).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{OFlag, open};
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::stat::Mode;

/// A terminal window size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WinSize {
    /// Columns (characters per line).
    pub cols: u16,
    /// Rows (lines).
    pub rows: u16,
}

impl Default for WinSize {
    /// 80 × 24, the classic terminal size.
    fn default() -> Self {
        WinSize { cols: 80, rows: 24 }
    }
}

/// A freshly opened PTY pair.
pub(crate) struct PtyPair {
    /// The master: ours to read output from, write input to, and resize.
    pub(crate) master: OwnedFd,
    /// The slave: becomes the child's stdin, stdout, stderr and controlling terminal.
    pub(crate) slave: OwnedFd,
}

/// Opens a master/slave pair, both `O_CLOEXEC` and `O_NOCTTY`, with the given window size.
pub(crate) fn open_pair(size: WinSize) -> io::Result<PtyPair> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    let slave = open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_size(master.as_fd(), size)?;
    Ok(PtyPair { master, slave })
}

/// Sets the window size of the terminal behind `fd` (master or slave) with `TIOCSWINSZ`.
pub(crate) fn set_size(fd: BorrowedFd<'_>, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a valid open descriptor for the borrow's lifetime, and TIOCSWINSZ reads
    // exactly one `struct winsize` from the pointer, which points at a live local.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &ws as *const libc::winsize,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the window size of the terminal behind `fd` with `TIOCGWINSZ`.
pub(crate) fn get_size(fd: BorrowedFd<'_>) -> io::Result<WinSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is valid for the borrow, and TIOCGWINSZ writes exactly one `struct winsize`
    // into the pointer, which points at a live, writable local.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCGWINSZ,
            &mut ws as *mut libc::winsize,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(WinSize {
        cols: ws.ws_col,
        rows: ws.ws_row,
    })
}
