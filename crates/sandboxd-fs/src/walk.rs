//! envd's `ListDir` (spec §4.1): `realpath(3)` the requested directory, then a pre-order walk with
//! `getdents(2)` and `lstat(2)`, in the order of Go's `filepath.WalkDir`.
//!
//! Entries of each directory are sorted by the bytes of their names (as Go's `os.ReadDir` sorts
//! them); each directory's subtree follows it directly. Symlinked directories are listed but never
//! descended. The walk keeps its own stack instead of recursing, so a deep tree cannot exhaust the
//! (Python worker) thread's stack.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::entry::{EntryInfo, describe};
use crate::error::{Error, IoResultExt, Result};

/// Lists `path` to `depth` levels (0 is taken as 1), as envd's `ListDir`.
///
/// Symlinks in `path` itself are resolved (a missing path gives `ENOENT`, a loop `ELOOP`); the
/// result must be a directory (else `ENOTDIR`). The root itself is not listed. Each entry's `path`
/// is `path` joined with its relative path, not the resolved one. Entries that vanish during the
/// walk are skipped; any other error (e.g. `EACCES` on a subdirectory) fails the listing, as in envd.
pub fn list_dir(path: &Path, depth: u32) -> Result<Vec<EntryInfo>> {
    let depth = depth.max(1);
    let root = fs::canonicalize(path).at(path)?;
    if !fs::metadata(&root).at(path)?.is_dir() {
        return Err(Error::errno(libc::ENOTDIR, path));
    }

    let mut entries = Vec::new();
    let mut stack = vec![Frame {
        names: sorted_names(&root).at(path)?,
        real: root,
        shown: path.into(),
        level: 1,
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(name) = frame.names.next() else {
            stack.pop();
            continue;
        };
        let real = frame.real.join(&name);
        let shown = frame.shown.join(&name);
        let level = frame.level;
        let lstat = match fs::symlink_metadata(&real) {
            Ok(lstat) => lstat,
            Err(e) if vanished(&e) => continue,
            Err(e) => return Err(Error::os(e, shown)),
        };
        entries.push(describe(&real, &shown, &lstat));
        if lstat.is_dir() && level < depth {
            match sorted_names(&real) {
                Ok(names) => stack.push(Frame {
                    names,
                    real,
                    shown,
                    level: level + 1,
                }),
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(Error::os(e, shown)),
            }
        }
    }
    Ok(entries)
}

/// A directory whose entries are being visited.
struct Frame {
    /// The names not visited yet, in order.
    names: std::vec::IntoIter<OsString>,
    /// The directory's resolved path, used for system calls.
    real: PathBuf,
    /// The directory's path as reported.
    shown: PathBuf,
    /// Depth of the directory's entries below the root (1 for the root's own entries).
    level: u32,
}

/// The names in `dir`, sorted by their bytes (`OsString`'s order on Unix).
fn sorted_names(dir: &Path) -> io::Result<std::vec::IntoIter<OsString>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort_unstable();
    Ok(names.into_iter())
}

/// Whether an error means the entry disappeared (or was replaced by a non-directory) mid-walk.
fn vanished(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

#[cfg(test)]
mod tests {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::entry::FileType;

    /// A tree: a/, a/x, a/y/, a/y/deep, b, c -> a (symlink), B (upper case sorts first), `é` (UTF-8
    /// bytes sort after ASCII).
    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("a/y")).unwrap();
        fs::write(d.join("a/x"), "x").unwrap();
        fs::write(d.join("a/y/deep"), "deep").unwrap();
        fs::write(d.join("b"), "b").unwrap();
        fs::write(d.join("B"), "B").unwrap();
        fs::write(d.join("é"), "").unwrap();
        symlink(d.join("a"), d.join("c")).unwrap();
        dir
    }

    fn relative(root: &Path, entries: &[EntryInfo]) -> Vec<String> {
        let prefix = format!("{}/", root.display());
        entries
            .iter()
            .map(|e| e.path.strip_prefix(&prefix).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn depth_and_lexical_preorder() {
        let dir = tree();
        let root = dir.path();
        let one = list_dir(root, 0).unwrap();
        assert_eq!(relative(root, &one), ["B", "a", "b", "c", "é"]);
        assert_eq!(
            relative(root, &list_dir(root, 1).unwrap()),
            relative(root, &one)
        );
        let two = list_dir(root, 2).unwrap();
        assert_eq!(
            relative(root, &two),
            ["B", "a", "a/x", "a/y", "b", "c", "é"]
        );
        let all = list_dir(root, 100).unwrap();
        assert_eq!(
            relative(root, &all),
            ["B", "a", "a/x", "a/y", "a/y/deep", "b", "c", "é"]
        );

        let c = all.iter().find(|e| e.name == "c").unwrap();
        assert!(c.is_symlink);
        assert_eq!(c.file_type, FileType::Directory);
        let deep = all.iter().find(|e| e.name == "deep").unwrap();
        assert_eq!((deep.file_type, deep.size), (FileType::File, 4));
    }

    #[test]
    fn a_symlinked_root_is_followed_and_paths_stay_as_requested() {
        let dir = tree();
        let link = dir.path().join("c");
        let entries = list_dir(&link, 2).unwrap();
        assert_eq!(relative(&link, &entries), ["x", "y", "y/deep"]);
        assert_eq!(entries[0].name, "x");
    }

    #[test]
    fn root_errors() {
        let dir = tree();
        let d = dir.path();
        let err = list_dir(&d.join("missing"), 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        let err = list_dir(&d.join("b"), 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(err.path(), d.join("b"));
        symlink(d.join("l2"), d.join("l1")).unwrap();
        symlink(d.join("l1"), d.join("l2")).unwrap();
        let err = list_dir(&d.join("l1"), 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        symlink(d.join("nowhere"), d.join("dangling")).unwrap();
        let err = list_dir(&d.join("dangling"), 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn byte_order_not_locale_order() {
        let dir = tempfile::tempdir().unwrap();
        for name in [&b"\xff"[..], b"a", b"_", b"Z", b"a.b", b"a-b"] {
            fs::write(dir.path().join(std::ffi::OsStr::from_bytes(name)), "").unwrap();
        }
        let names: Vec<_> = list_dir(dir.path(), 1)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["Z", "_", "a", "a-b", "a.b", "\u{fffd}"]);
    }

    #[test]
    fn empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list_dir(dir.path(), 3).unwrap().is_empty());
    }
}
