//! What each inotify event means for the tree, and which envd events it produces.
//!
//! The kernel reports, per watched directory: `IN_CREATE`, `IN_MODIFY`, `IN_ATTRIB`, `IN_DELETE`,
//! `IN_MOVED_FROM`/`IN_MOVED_TO` for its children (with the child's name), and `IN_ATTRIB`,
//! `IN_DELETE_SELF`, `IN_MOVE_SELF`, `IN_IGNORED`, `IN_UNMOUNT` for itself (without a name).
//! Child events are reported under their path; self events of subdirectories only update the
//! tree (their parent already reported the same change under the child's name); self events of
//! the root are reported under [`ROOT_NAME`] and, when the root is gone, close the watcher.
//!
//! Renames: `rename(2)` queues `IN_MOVED_FROM` on the old parent, `IN_MOVED_TO` on the new
//! parent, then `IN_MOVE_SELF` on the moved inode, in that order. For a directory, `IN_MOVED_TO`
//! re-adds the watch at the new path; the kernel hands back the descriptor the directory already
//! had, which is how the tree learns where the subtree went. A directory whose `IN_MOVE_SELF`
//! arrives while it is still waiting for that left the tree: its watches are removed.

use std::path::{Path, PathBuf};

use inotify::EventMask;

use crate::error::WatchError;
use crate::event::{Item, ROOT_NAME};
use crate::inotify::{RawEvent, WatchSet};
use crate::mapping;
use crate::pending::Pending;
use crate::tree::Tree;

/// How many directories can be between `IN_MOVED_FROM` and `IN_MOVE_SELF` at once. The two are
/// queued by the same `rename(2)` call, so only renames racing each other overlap; 256 is far
/// more than two cores produce, and past it the oldest is forgotten (that directory, if it really
/// left the tree, keeps its watches until they are removed by a rescan or its deletion).
const MOVES_CAP: usize = 256;

/// Everything a watcher knows apart from the read side of the inotify instance.
pub(crate) struct State {
    /// The watched directory (absolute).
    pub root: PathBuf,
    /// Whether subdirectories are watched.
    pub recursive: bool,
    /// Adds and removes watches.
    pub watches: WatchSet,
    /// Watched directories by descriptor and path, and scan markers.
    pub tree: Tree,
    /// The root's watch descriptor.
    pub root_wd: i32,
    /// Items for the next batch.
    pub pending: Pending,
    /// Watch descriptors of directories seen in `IN_MOVED_FROM` and not yet found again inside the
    /// tree; an `IN_MOVE_SELF` for one of them means it left the tree.
    pub moving: Vec<i32>,
    /// The root is gone and every watch removed.
    pub closed: bool,
    /// The first error met while handling events, returned once the events read with it are handled.
    pub failed: Option<WatchError>,
}

impl State {
    /// Handles one event from the kernel.
    pub(crate) fn handle(&mut self, event: RawEvent<'_>) {
        if self.closed {
            return;
        }
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            self.on_overflow();
            return;
        }
        let Some(dir) = self.tree.path_of(event.wd) else {
            // A watch we removed already (its IN_IGNORED, or events queued before the removal).
            return;
        };
        match event.name {
            Some(name) => {
                let path = dir.join(name);
                self.on_child(event.wd, name, &path, event.mask);
            }
            None => self.on_self(event.wd, event.mask),
        }
    }

    /// Records the first error; later ones are usually its consequences.
    pub(crate) fn fail(&mut self, err: WatchError) {
        if self.failed.is_none() {
            self.failed = Some(err);
        }
    }

    fn on_child(&mut self, wd: i32, name: &std::ffi::OsStr, path: &Path, mask: EventMask) {
        let appears = mask.intersects(EventMask::CREATE | EventMask::MOVED_TO);
        let leaves = mask.intersects(EventMask::DELETE | EventMask::MOVED_FROM);
        let is_dir = mask.contains(EventMask::ISDIR);

        // A scan reported this entry already, unless an event since made the marker stale.
        let marker = if appears || leaves {
            self.tree.take_marker(wd, name)
        } else {
            None
        };
        let already_reported =
            appears && marker.is_some_and(|ino| self.scanned_entry_is_still_there(path, mask, ino));

        if leaves && is_dir && self.recursive {
            // Remember its watch: an IN_MOVE_SELF for it that no IN_MOVED_TO preceded means it left.
            if mask.contains(EventMask::MOVED_FROM)
                && let Some(moved) = self.tree.wd_at(path)
            {
                self.moving.retain(|&w| w != moved);
                if self.moving.len() >= MOVES_CAP {
                    self.moving.remove(0);
                }
                self.moving.push(moved);
            }
        }

        if already_reported {
            return;
        }
        for kind in mapping::kinds(mask) {
            self.pending.event(path, kind);
        }
        if appears && is_dir && self.recursive {
            // Watch first, then scan: whatever was made inside before the watch existed is
            // reported by the scan, whatever comes after by the kernel, and markers dedupe the two.
            self.watch_new_dir(path);
        }
    }

    /// Whether the entry a create event names is the one a scan reported (and so must not be
    /// reported again). `IN_CREATE` needs no check: the name cannot be created again without an
    /// `IN_DELETE`/`IN_MOVED_FROM` clearing the marker first. `IN_MOVED_TO` can replace an entry
    /// in place, so the inode now at the path must be the one the scan saw.
    fn scanned_entry_is_still_there(&self, path: &Path, mask: EventMask, ino: u64) -> bool {
        if mask.contains(EventMask::CREATE) {
            return true;
        }
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(self.root.join(path)).is_ok_and(|meta| meta.ino() == ino)
    }

    fn on_self(&mut self, wd: i32, mask: EventMask) {
        if wd == self.root_wd {
            if mask.contains(EventMask::IGNORED) || mask.contains(EventMask::UNMOUNT) {
                self.close();
                return;
            }
            for kind in mapping::kinds(mask) {
                self.pending.event_named(ROOT_NAME, kind);
            }
            if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF) {
                self.close();
            }
            return;
        }
        if mask.contains(EventMask::IGNORED) {
            self.tree.forget(wd);
            self.moving.retain(|&w| w != wd);
        } else if mask.contains(EventMask::MOVE_SELF)
            && let Some(at) = self.moving.iter().position(|&w| w == wd)
        {
            // Its IN_MOVED_FROM came and no IN_MOVED_TO found it inside the tree: it left.
            self.moving.remove(at);
            if let Some(path) = self.tree.path_of(wd).map(Path::to_path_buf) {
                for handle in self.tree.remove_under(&path) {
                    self.watches.remove(handle);
                }
            }
        }
    }

    /// The kernel dropped events: say so, then bring the tree back in line with the disk.
    fn on_overflow(&mut self) {
        self.pending.control(Item::Overflow { dropped_hint: None });
        self.tree.clear_markers();
        self.moving.clear();
        self.rescan();
    }

    /// The root is gone: report it, remove every watch left (a moved root still has live ones),
    /// and ignore whatever the kernel still has queued.
    pub(crate) fn close(&mut self) {
        for handle in self.tree.clear() {
            self.watches.remove(handle);
        }
        self.moving.clear();
        self.closed = true;
        self.pending.control(Item::Closed);
    }
}
