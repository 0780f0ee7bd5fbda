//! The map between inotify watch descriptors and directory paths relative to the root, and the
//! markers that keep a scan and the kernel queue from both reporting one entry.
//!
//! The kernel names events by watch descriptor plus child name only; the path of a watched
//! directory is ours to track, and it changes when the directory (or any ancestor) is renamed.
//! The kernel keeps one watch per inode, so a renamed directory keeps its descriptor: renaming a
//! subtree here is a prefix rewrite of every path under it.
//!
//! Markers: when a new directory is scanned after its watch was added, an entry created between
//! the add and the scan is seen by the scan *and* has an `IN_CREATE` (or `IN_MOVED_TO`) queued. The
//! scan records a marker (directory wd, name, inode) for each entry it reports; the first create
//! event for that name consumes the marker instead of being reported again. An `IN_DELETE` or
//! `IN_MOVED_FROM` for the name clears it, since a later create for that name is then a real one.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use inotify::WatchDescriptor;

/// How many scan markers a watcher keeps at most. A marker only matters until the create events
/// that were queued when its scan ran have been read, which is at most one kernel queue
/// (`max_queued_events`, 16384 by default) later; 4× that covers several full queues of scans in
/// flight. Past the cap the oldest marker goes, which at worst lets one duplicate CREATE through
/// (never loses one). About 100 bytes each: under 7 MiB at the cap.
pub(crate) const MARKER_CAP: usize = 65_536;

/// A watched directory.
struct Dir {
    /// The descriptor, kept to remove the watch.
    handle: WatchDescriptor,
    /// Its path relative to the root (empty for the root).
    path: PathBuf,
    /// Entries a scan reported and no event has mentioned since: name → (inode, marker sequence).
    markers: HashMap<OsString, (u64, u64)>,
}

/// What [`Tree::insert`] found at a watch descriptor the kernel returned.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Insert {
    /// A directory not watched before.
    New,
    /// Already watched at this path.
    Same,
    /// Already watched at another path: the directory was renamed; the subtree now has the new path.
    Moved,
}

/// The watched directories of one watcher.
#[derive(Default)]
pub(crate) struct Tree {
    dirs: HashMap<i32, Dir>,
    by_path: BTreeMap<PathBuf, i32>,
    /// Markers in the order they were made: (sequence, wd, name). An entry whose marker was
    /// consumed stays here until it reaches the front; the length never passes [`MARKER_CAP`].
    marker_order: VecDeque<(u64, i32, OsString)>,
    next_marker: u64,
}

impl Tree {
    /// Records that the kernel returned `handle` for the directory now at `path`.
    pub(crate) fn insert(&mut self, handle: WatchDescriptor, path: &Path) -> Insert {
        let wd = handle.get_watch_descriptor_id();
        if let Some(dir) = self.dirs.get(&wd) {
            if dir.path == path {
                return Insert::Same;
            }
            let from = dir.path.clone();
            self.rename(&from, path);
            return Insert::Moved;
        }
        self.by_path.insert(path.to_path_buf(), wd);
        self.dirs.insert(
            wd,
            Dir {
                handle,
                path: path.to_path_buf(),
                markers: HashMap::new(),
            },
        );
        Insert::New
    }

    /// The path of the directory watched as `wd`.
    pub(crate) fn path_of(&self, wd: i32) -> Option<&Path> {
        self.dirs.get(&wd).map(|dir| dir.path.as_path())
    }

    /// The watch descriptor of the directory at `path`, if it is watched.
    pub(crate) fn wd_at(&self, path: &Path) -> Option<i32> {
        self.by_path.get(path).copied()
    }

    /// Every watch descriptor, for a rescan to compare against what it finds.
    pub(crate) fn wds(&self) -> Vec<i32> {
        self.dirs.keys().copied().collect()
    }

    /// How many directories are watched.
    pub(crate) fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Gives the subtree at `from` the path `to`. Whatever was recorded at `to` (a directory the
    /// rename replaced, whose watch the kernel is removing) is forgotten first.
    pub(crate) fn rename(&mut self, from: &Path, to: &Path) {
        if from.as_os_str().is_empty() || from == to {
            return;
        }
        for (path, wd) in Self::drain_under(&mut self.by_path, to) {
            if path.starts_with(from) {
                // Only a stale map (events lost) can nest `from` under `to`; keep the moving subtree.
                self.by_path.insert(path, wd);
                continue;
            }
            // The replaced directory is being deleted by the kernel (an empty directory, since
            // rename(2) only replaces those); its last events and IN_IGNORED are not ours to name.
            self.dirs.remove(&wd);
        }
        for (path, wd) in Self::drain_under(&mut self.by_path, from) {
            let new_path = match path.strip_prefix(from) {
                Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
                Ok(rest) => to.join(rest),
                Err(_) => continue,
            };
            if let Some(dir) = self.dirs.get_mut(&wd) {
                dir.path.clone_from(&new_path);
            }
            self.by_path.insert(new_path, wd);
        }
    }

    /// Forgets the directory at `path` and everything under it, returning their descriptors so
    /// the caller can remove the watches.
    pub(crate) fn remove_under(&mut self, path: &Path) -> Vec<WatchDescriptor> {
        let drained = Self::drain_under(&mut self.by_path, path);
        drained
            .into_iter()
            .filter_map(|(_, wd)| self.dirs.remove(&wd).map(|dir| dir.handle))
            .collect()
    }

    /// Forgets one directory (its watch is gone: `IN_IGNORED`, or a rescan did not find it).
    /// Returns its descriptor if it was known.
    pub(crate) fn forget(&mut self, wd: i32) -> Option<WatchDescriptor> {
        let dir = self.dirs.remove(&wd)?;
        if self.by_path.get(&dir.path) == Some(&wd) {
            self.by_path.remove(&dir.path);
        }
        Some(dir.handle)
    }

    /// Forgets everything, returning every descriptor.
    pub(crate) fn clear(&mut self) -> Vec<WatchDescriptor> {
        self.by_path.clear();
        self.marker_order.clear();
        self.dirs.drain().map(|(_, dir)| dir.handle).collect()
    }

    /// Notes that a scan reported `name` (inode `ino`) inside the directory watched as `wd`.
    pub(crate) fn mark(&mut self, wd: i32, name: &OsStr, ino: u64) {
        let Some(dir) = self.dirs.get_mut(&wd) else {
            return;
        };
        let seq = self.next_marker;
        self.next_marker += 1;
        dir.markers.insert(name.to_os_string(), (ino, seq));
        self.marker_order.push_back((seq, wd, name.to_os_string()));
        while self.marker_order.len() > MARKER_CAP {
            let Some((old_seq, old_wd, old_name)) = self.marker_order.pop_front() else {
                break;
            };
            if let Some(dir) = self.dirs.get_mut(&old_wd)
                && dir
                    .markers
                    .get(&old_name)
                    .is_some_and(|&(_, s)| s == old_seq)
            {
                dir.markers.remove(&old_name);
            }
        }
    }

    /// Removes the marker for `name` in the directory watched as `wd`, returning the inode the
    /// scan saw.
    pub(crate) fn take_marker(&mut self, wd: i32, name: &OsStr) -> Option<u64> {
        let dir = self.dirs.get_mut(&wd)?;
        if dir.markers.is_empty() {
            return None;
        }
        dir.markers.remove(name).map(|(ino, _)| ino)
    }

    /// Drops every marker (after a kernel overflow the events that would consume them may be lost).
    pub(crate) fn clear_markers(&mut self) {
        self.marker_order.clear();
        for dir in self.dirs.values_mut() {
            dir.markers.clear();
        }
    }

    /// Removes and returns the entries of `map` at `path` or under it. Paths order by component,
    /// so a subtree is one contiguous range starting at its root.
    fn drain_under(map: &mut BTreeMap<PathBuf, i32>, path: &Path) -> Vec<(PathBuf, i32)> {
        let keys: Vec<PathBuf> = map
            .range::<Path, _>((std::ops::Bound::Included(path), std::ops::Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(path))
            .map(|(key, _)| key.clone())
            .collect();
        keys.into_iter()
            .filter_map(|key| map.remove(&key).map(|wd| (key, wd)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use super::Tree;

    #[test]
    fn a_subtree_is_one_range() {
        let mut map: BTreeMap<PathBuf, i32> = BTreeMap::new();
        for (i, p) in ["", "a", "a b", "a/b", "a/b/c", "a-", "ab", "b"]
            .iter()
            .enumerate()
        {
            map.insert(PathBuf::from(p), i as i32);
        }
        let drained: Vec<_> = Tree::drain_under(&mut map, Path::new("a"))
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            drained,
            [
                PathBuf::from("a"),
                PathBuf::from("a/b"),
                PathBuf::from("a/b/c")
            ]
        );
        assert_eq!(map.len(), 5);
    }
}
