//! The public watcher: create it on a directory, then take batches from it, either when its file
//! descriptor is readable (`poll`/`epoll`/asyncio's `add_reader`) or through [`Watcher::wait`].
//!
//! The kernel makes the inotify file descriptor readable as soon as one event is queued, and a
//! non-blocking `read(2)` returns every whole event that fits the buffer. A batch is every event
//! queued at the time of the call, handled in kernel order, with no thread and no timer in between.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::WatchError;
use crate::event::Item;
use crate::inotify::{self, LightRead, MAX_EVENTS_PER_READ, Reader, add_error};
use crate::pending::{DEFAULT_PENDING_CAP, Pending};
use crate::state::State;
use crate::tree::Tree;

/// A watch on one directory (and, if recursive, every directory under it).
///
/// It owns one inotify instance. It does no work in the background: events are read and turned
/// into [`Item`]s only inside [`read_batch`](Watcher::read_batch) and [`wait`](Watcher::wait).
/// Memory is bounded: the read buffer is 64 KiB, the pending items are capped (see
/// [`DEFAULT_PENDING_CAP`]), and the tree holds one entry per
/// watched directory. Dropping the watcher closes the instance and with it every watch.
pub struct Watcher {
    reader: Reader,
    state: State,
}

impl Watcher {
    /// Starts watching `root`: only its direct children, or with `recursive` every directory
    /// under it (symlinks are not followed below the root). Nothing that exists already is reported.
    /// A relative `root` is taken relative to the current directory now.
    ///
    /// Errors: [`WatchError::NotFound`] if `root` does not exist, [`WatchError::NotADirectory`] if
    /// it is not a directory, [`WatchError::InstanceLimit`] / [`WatchError::WatchLimit`] when the
    /// user's inotify instances or watches run out.
    pub fn new(root: &Path, recursive: bool) -> Result<Watcher, WatchError> {
        Watcher::with_pending_cap(root, recursive, DEFAULT_PENDING_CAP)
    }

    /// Like [`new`](Watcher::new), with at most `pending_cap` events held between two batches;
    /// past it events are dropped and counted in an [`Item::Overflow`].
    pub fn with_pending_cap(
        root: &Path,
        recursive: bool,
        pending_cap: usize,
    ) -> Result<Watcher, WatchError> {
        // Scans join paths onto the root long after this call: pin a relative root to today's
        // current directory (lexically; symlinks in it are still followed at each use).
        let root = &std::path::absolute(root).map_err(WatchError::Io)?;
        match std::fs::metadata(root) {
            Ok(meta) if !meta.is_dir() => {
                return Err(WatchError::NotADirectory(root.to_path_buf()));
            }
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(WatchError::NotFound(root.to_path_buf()));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => {
                return Err(WatchError::NotFound(root.to_path_buf()));
            }
            Err(err) => return Err(WatchError::Io(err)),
        }
        let (reader, mut watches) = inotify::open()?;
        let handle = watches.add_root(root).map_err(|err| add_error(err, root))?;
        let root_wd = handle.get_watch_descriptor_id();
        let mut tree = Tree::default();
        tree.insert(handle, Path::new(""));
        let mut state = State {
            root: root.to_path_buf(),
            recursive,
            watches,
            tree,
            root_wd,
            pending: Pending::new(pending_cap),
            moving: Vec::new(),
            closed: false,
            failed: None,
        };
        state.watch_initial()?;
        Ok(Watcher { reader, state })
    }

    /// The inotify file descriptor. It is readable whenever events are queued; call
    /// [`read_batch`](Watcher::read_batch) then. It stays owned by the watcher.
    pub fn as_raw_fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }

    /// Returns every item pending now, without blocking; the batch is empty if there is none.
    ///
    /// A batch stops early, leaving the rest queued in the kernel (the file descriptor stays
    /// readable), when the pending cap is near. After [`Item::Closed`] the batches are empty.
    ///
    /// Errors: [`WatchError::WatchLimit`] when a new directory could not be watched (the rest of
    /// the tree is still watched), or an I/O error reading the instance. The items handled before
    /// the error are kept, and the next call returns them.
    pub fn read_batch(&mut self) -> Result<Vec<Item>, WatchError> {
        if let Some(err) = self.state.failed.take() {
            return Err(err);
        }
        while !self.state.pending.is_nearly_full(MAX_EVENTS_PER_READ) {
            let state = &mut self.state;
            let read = self.reader.read(|event| state.handle(event))?;
            if let Some(err) = self.state.failed.take() {
                return Err(err);
            }
            if !read {
                break;
            }
        }
        Ok(self.state.pending.take())
    }

    /// One bounded read for a caller that must not spend long (an event loop): the items of one
    /// `read(2)` (empty if nothing was queued), or `None` when what was read can be costly to handle
    /// (a directory appeared or went, an overflow): those events are then kept, in order, for the
    /// next [`read_batch`](Watcher::read_batch), which a thread of its own should make.
    pub fn read_light(&mut self) -> Result<Option<Vec<Item>>, WatchError> {
        if let Some(err) = self.state.failed.take() {
            return Err(err);
        }
        let state = &mut self.state;
        match self.reader.read_light(|event| state.handle(event))? {
            LightRead::Held => Ok(None),
            LightRead::Empty | LightRead::Handled => {
                if let Some(err) = self.state.failed.take() {
                    return Err(err);
                }
                Ok(Some(self.state.pending.take()))
            }
        }
    }

    /// Whether a [`read_light`](Watcher::read_light) left events for the next
    /// [`read_batch`](Watcher::read_batch).
    pub fn holds_events(&self) -> bool {
        self.reader.holds_events()
    }

    /// Waits until items are pending or `timeout` passes (`None`: no limit), then returns them
    /// all (empty on timeout). Returns at once if the watcher is closed. Meant to be called with
    /// the GIL released and a bounded timeout, so that a cancelled caller is never stranded.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Vec<Item>, WatchError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let batch = self.read_batch()?;
            if !batch.is_empty() || self.state.closed {
                return Ok(batch);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(batch);
            }
            // Readable but nothing for the caller (say, IN_IGNORED of a removed watch): wait again.
            if !self.reader.poll(left)? {
                return Ok(Vec::new());
            }
        }
    }

    /// Whether the watched directory is gone (the last batch ended with [`Item::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.state.closed
    }

    /// The watched directory, as given to [`new`](Watcher::new) and made absolute.
    pub fn root(&self) -> &Path {
        &self.state.root
    }

    /// Whether subdirectories are watched.
    pub fn is_recursive(&self) -> bool {
        self.state.recursive
    }

    /// How many directories hold a watch now (each counts against `fs.inotify.max_user_watches`).
    pub fn watch_count(&self) -> usize {
        self.state.tree.len()
    }
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.reader.as_raw_fd()
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("root", &self.state.root)
            .field("recursive", &self.state.recursive)
            .field("fd", &self.reader.as_raw_fd())
            .field("watches", &self.state.tree.len())
            .field("closed", &self.state.closed)
            .finish()
    }
}
