//! The inotify instance: its file descriptor, the watches on it, and decoding what `read(2)` returns.
//!
//! `inotify_init1(IN_NONBLOCK | IN_CLOEXEC)` gives a file descriptor that the kernel fills with
//! `struct inotify_event` records (16-byte header, then the name padded with NULs) in the order the
//! operations happened. `inotify_add_watch` on an inode that is already watched returns the same
//! watch descriptor (wd) again, which lets a caller ask the kernel "which watch is at this path now".
//! When the queue passes `fs.inotify.max_queued_events` the kernel appends one `IN_Q_OVERFLOW`
//! (wd -1) and drops events until it is read. A removed watch (`inotify_rm_watch`, or its inode
//! deleted or unmounted) ends with `IN_IGNORED`.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::WatchError;

/// What every directory watch listens for: the ops envd maps (create, write, remove, rename,
/// chmod, for children and for the directory itself). `EXCL_UNLINK` drops events for children
/// after they are unlinked (writes through a still-open descriptor would otherwise show up as
/// WRITE of a name already reported removed). `ONLYDIR` makes the kernel refuse non-directories
/// atomically, so a directory replaced by a file between our check and the add is not watched.
const DIR_EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::MODIFY)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::EXCL_UNLINK)
    .union(WatchMask::ONLYDIR);

/// Subdirectories found while walking are watched without following symlinks: a symlink to a
/// directory is reported as an entry, never descended into (as `filepath.WalkDir` does in envd).
const SUBDIR_EVENTS: WatchMask = DIR_EVENTS.union(WatchMask::DONT_FOLLOW);

/// Bytes per `read(2)`. An event takes 16 bytes plus its name padded to 16, so 64 KiB holds about
/// 2000 events with short names (and at least 240 with 255-byte names): one syscall drains a burst
/// the size of a typical `git checkout` step, while the buffer stays small beside the pending cap.
pub(crate) const READ_BUFFER_BYTES: usize = 64 * 1024;

/// The most events one `read(2)` into [`READ_BUFFER_BYTES`] can return (header-only events, 16 bytes
/// each). The reader stops reading while the pending buffer has less room than this, so kernel
/// events are never dropped by our own cap unless a scan burst filled it.
pub(crate) const MAX_EVENTS_PER_READ: usize = READ_BUFFER_BYTES / 16;

/// One decoded `struct inotify_event`, borrowing its name from the read buffer.
#[derive(Debug)]
pub(crate) struct RawEvent<'a> {
    /// The watch the event belongs to, or -1 for `IN_Q_OVERFLOW`.
    pub wd: i32,
    /// The event bits and flags.
    pub mask: EventMask,
    /// The name of the child inside the watched directory; `None` for events on the directory itself.
    pub name: Option<&'a OsStr>,
}

/// The read side of the instance: the file descriptor and the buffer `read(2)` fills.
pub(crate) struct Reader {
    inotify: Inotify,
    buffer: Box<[u8]>,
    /// Events a [`read_light`](Reader::read_light) took from the kernel but left unhandled, because
    /// one of them can make handling costly. The next [`read`](Reader::read) handles them first.
    held: Vec<(i32, EventMask, Option<OsString>)>,
}

/// What [`Reader::read_light`] did.
pub(crate) enum LightRead {
    /// Nothing was queued.
    Empty,
    /// The events read were handled.
    Handled,
    /// Events are held for a full [`Reader::read`] (some of them can be costly to handle).
    Held,
}

/// Whether handling an event can cost work that grows with the tree: a directory that appears (it
/// is watched and walked), moves away or goes (its watches are removed one by one), the watched
/// directory itself going, or an overflow (a rescan of everything).
fn is_costly(mask: EventMask) -> bool {
    mask.intersects(
        EventMask::ISDIR
            | EventMask::Q_OVERFLOW
            | EventMask::DELETE_SELF
            | EventMask::MOVE_SELF
            | EventMask::UNMOUNT,
    )
}

/// The watch side of the instance: adds and removes watches. It shares the file descriptor with
/// the [`Reader`], and lives apart from it so that events borrowed from the read buffer can be
/// handled while watches are added.
pub(crate) struct WatchSet {
    watches: Watches,
}

/// Creates an instance. `EMFILE` (too many instances for this user) becomes [`WatchError::InstanceLimit`].
pub(crate) fn open() -> Result<(Reader, WatchSet), WatchError> {
    let inotify = Inotify::init().map_err(|err| match err.raw_os_error() {
        Some(errno) if errno == Errno::EMFILE as i32 => WatchError::InstanceLimit,
        _ => WatchError::Io(err),
    })?;
    let watches = inotify.watches();
    let reader = Reader {
        inotify,
        buffer: vec![0; READ_BUFFER_BYTES].into_boxed_slice(),
        held: Vec::new(),
    };
    Ok((reader, WatchSet { watches }))
}

impl Reader {
    /// Reads whatever is queued, without blocking, and calls `handle` for each event in kernel order
    /// (events held by [`read_light`](Reader::read_light) first, by themselves). Returns `false`
    /// when nothing was queued.
    pub(crate) fn read(&mut self, mut handle: impl FnMut(RawEvent<'_>)) -> io::Result<bool> {
        if !self.held.is_empty() {
            for (wd, mask, name) in std::mem::take(&mut self.held) {
                handle(RawEvent {
                    wd,
                    mask,
                    name: name.as_deref(),
                });
            }
            return Ok(true);
        }
        let events = loop {
            match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => break events,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        };
        for event in events {
            handle(RawEvent {
                wd: event.wd.get_watch_descriptor_id(),
                mask: event.mask,
                name: event.name,
            });
        }
        Ok(true)
    }

    /// One `read(2)` like [`read`](Reader::read), for a caller that must not spend long (an event
    /// loop): the events are handled only if none of them can be costly (see `is_costly`);
    /// otherwise they are held, in order, for the next [`read`](Reader::read), which a thread of
    /// its own should make. Reads nothing while events are held.
    pub(crate) fn read_light(
        &mut self,
        mut handle: impl FnMut(RawEvent<'_>),
    ) -> io::Result<LightRead> {
        if !self.held.is_empty() {
            return Ok(LightRead::Held);
        }
        let events = loop {
            match self.inotify.read_events(&mut self.buffer) {
                Ok(events) => break events,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(LightRead::Empty),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        };
        let events: Vec<_> = events.collect();
        if events.iter().any(|event| is_costly(event.mask)) {
            self.held = events
                .into_iter()
                .map(|event| {
                    let wd = event.wd.get_watch_descriptor_id();
                    (wd, event.mask, event.name.map(OsStr::to_os_string))
                })
                .collect();
            return Ok(LightRead::Held);
        }
        for event in events {
            handle(RawEvent {
                wd: event.wd.get_watch_descriptor_id(),
                mask: event.mask,
                name: event.name,
            });
        }
        Ok(LightRead::Handled)
    }

    /// Whether events are held for the next [`read`](Reader::read).
    pub(crate) fn holds_events(&self) -> bool {
        !self.held.is_empty()
    }

    /// Waits until the file descriptor is readable or `timeout` passes (`None`: no limit).
    /// Returns whether it is readable. Sub-millisecond timeouts round up to 1 ms (poll's unit).
    pub(crate) fn poll(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let poll_timeout = match deadline {
                None => PollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let millis = left.as_nanos().div_ceil(1_000_000);
                    PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

impl AsFd for Reader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

impl AsRawFd for Reader {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}

impl WatchSet {
    /// Watches the root directory, following a symlink if the root is one.
    pub(crate) fn add_root(&mut self, path: &Path) -> io::Result<WatchDescriptor> {
        self.watches.add(path, DIR_EVENTS)
    }

    /// Watches a directory inside the tree, without following symlinks. If the inode is watched
    /// already, the kernel returns its existing descriptor.
    pub(crate) fn add_subdir(&mut self, path: &Path) -> io::Result<WatchDescriptor> {
        self.watches.add(path, SUBDIR_EVENTS)
    }

    /// Removes a watch. The kernel queues `IN_IGNORED` for it. Errors (the watch is already gone)
    /// are ignored: the only thing that matters is that it is gone.
    pub(crate) fn remove(&mut self, wd: WatchDescriptor) {
        let _ = self.watches.remove(wd);
    }
}

/// Turns an `inotify_add_watch` error into the crate's error: `ENOSPC` is the watch limit.
pub(crate) fn add_error(err: io::Error, path: &Path) -> WatchError {
    match err.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC) => WatchError::WatchLimit,
        Some(Errno::ENOENT) => WatchError::NotFound(path.to_path_buf()),
        Some(Errno::ENOTDIR) => WatchError::NotADirectory(path.to_path_buf()),
        _ => WatchError::Io(err),
    }
}

/// True for errors that mean "this directory cannot be watched or listed any more, skip it": it
/// vanished or was replaced (`ENOENT`, `ENOTDIR`, `ELOOP`, `ESTALE`), or this user may not read it
/// (`EACCES`, `EPERM`). The events that made it vanish, if any, follow in the queue.
pub(crate) fn is_skippable(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(
            Errno::ENOENT
                | Errno::ENOTDIR
                | Errno::ELOOP
                | Errno::ESTALE
                | Errno::EACCES
                | Errno::EPERM
        )
    )
}
