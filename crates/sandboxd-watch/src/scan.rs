//! Walking directories to add watches: at start, when a directory appears, and after an overflow.
//!
//! The kernel only reports what happens after a watch exists, and a directory made inside a
//! watched one (`mkdir -p a/b/c`) can be filled before we read its `IN_CREATE`. So a directory
//! that appears is watched *first* and listed *second*: anything made before the watch is in the
//! listing, anything made after is in the queue, and what is in both is deduplicated by the
//! markers of [`Tree`](crate::tree::Tree). The walk is iterative (no recursion limit on depth) and
//! reports a parent before its children.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::DirEntryExt;
use std::path::{Path, PathBuf};

use crate::error::WatchError;
use crate::event::EventKind;
use crate::inotify::{add_error, is_skippable};
use crate::state::State;
use crate::tree::Insert;

/// What a walk reports.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Watcher start: watch everything, report nothing (envd reports nothing that existed before).
    Start,
    /// A directory appeared: report every entry under it.
    Appeared,
    /// After an overflow: re-add watches everywhere; report only directories the tree did not
    /// know, and everything under them.
    Rescan,
}

/// One directory entry as `readdir(3)` gives it, without a `stat`.
struct Entry {
    name: OsString,
    ino: u64,
    is_dir: bool,
}

impl State {
    /// Adds watches on the root and, if recursive, every directory under it. Used once, at start.
    pub(crate) fn watch_initial(&mut self) -> Result<(), WatchError> {
        if !self.recursive {
            return Ok(());
        }
        self.walk(PathBuf::new(), Mode::Start, None)
    }

    /// A directory appeared at `path` (created, or moved in): watch it and what is inside, and
    /// report its contents. If the kernel says it was watched already (it was moved within the
    /// tree), only its recorded path changes. Errors are kept for the end of the batch.
    pub(crate) fn watch_new_dir(&mut self, path: &Path) {
        if let Err(err) = self.walk(path.to_path_buf(), Mode::Appeared, None) {
            self.fail(err);
        }
    }

    /// After an overflow: re-add watches on the whole tree, report directories that appeared
    /// unseen, and drop watches on directories no longer inside it. Closes the watcher if the
    /// root itself is gone or replaced.
    pub(crate) fn rescan(&mut self) {
        match self.watches.add_root(&self.root) {
            Ok(handle) if handle.get_watch_descriptor_id() == self.root_wd => {}
            Ok(handle) => {
                // Another directory now has the root's path: the watched one is gone.
                self.watches.remove(handle);
                self.close();
                return;
            }
            Err(err) if is_skippable(&err) => {
                self.close();
                return;
            }
            Err(err) => {
                self.fail(WatchError::Io(err));
                return;
            }
        }
        if !self.recursive {
            return;
        }
        let mut seen = std::collections::HashSet::new();
        seen.insert(self.root_wd);
        if let Err(err) = self.walk(PathBuf::new(), Mode::Rescan, Some(&mut seen)) {
            // Some directories are unwatched; keep the others and report the error.
            self.fail(err);
            return;
        }
        for wd in self.tree.wds() {
            if !seen.contains(&wd)
                && let Some(handle) = self.tree.forget(wd)
            {
                self.watches.remove(handle);
            }
        }
    }

    /// The walk shared by the three modes. `top` is relative to the root; in [`Mode::Appeared`]
    /// its own CREATE was reported by the caller.
    fn walk(
        &mut self,
        top: PathBuf,
        mode: Mode,
        mut seen: Option<&mut std::collections::HashSet<i32>>,
    ) -> Result<(), WatchError> {
        // (directory, whether to report its entries)
        let mut stack = vec![(top, mode == Mode::Appeared)];
        while let Some((dir, report)) = stack.pop() {
            let abs = self.root.join(&dir);
            let added = if dir.as_os_str().is_empty() {
                self.watches.add_root(&abs)
            } else {
                self.watches.add_subdir(&abs)
            };
            let handle = match added {
                Ok(handle) => handle,
                Err(err) if is_skippable(&err) => continue,
                Err(err) => return Err(add_error(err, &abs)),
            };
            let wd = handle.get_watch_descriptor_id();
            if let Some(seen) = seen.as_deref_mut() {
                seen.insert(wd);
            }
            let insert = self.tree.insert(handle, &dir);
            if insert != Insert::New {
                // Found inside the tree: whatever IN_MOVED_FROM it had, it did not leave.
                self.moving.retain(|&w| w != wd);
                if mode == Mode::Appeared {
                    // Watched already, so its contents were reported already.
                    continue;
                }
            }
            let entries = match list(&abs) {
                Ok(entries) => entries,
                Err(err) if is_skippable(&err) => continue,
                Err(err) => return Err(WatchError::Io(err)),
            };
            for entry in entries {
                let child = dir.join(&entry.name);
                // In a rescan, a directory the tree does not know appeared while events were lost.
                let report_child = report
                    || (mode == Mode::Rescan && entry.is_dir && self.tree.wd_at(&child).is_none());
                if report_child {
                    self.tree.mark(wd, &entry.name, entry.ino);
                    self.pending.event(&child, EventKind::Create);
                }
                if entry.is_dir {
                    stack.push((child, report_child));
                }
            }
        }
        Ok(())
    }
}

/// Lists a directory. Types come from `d_type`; only filesystems that leave it unknown cost a `stat`.
fn list(dir: &Path) -> io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) if is_skippable(&err) => continue,
            Err(err) => return Err(err),
        };
        let is_dir = match entry.file_type() {
            Ok(file_type) => file_type.is_dir(),
            Err(err) if is_skippable(&err) => continue,
            Err(err) => return Err(err),
        };
        entries.push(Entry {
            ino: entry.ino(),
            name: entry.file_name(),
            is_dir,
        });
    }
    Ok(entries)
}
