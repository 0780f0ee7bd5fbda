//! envd's `MakeDir`, `Move` and `Remove` (spec §4.1): `mkdir(2)` with `chown(2)` of each created
//! directory, `rename(2)`, and a recursive `unlink(2)`/`rmdir(2)` that never follows symlinks.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, chown};
use std::path::{Component, Path, PathBuf};

use crate::entry::{EntryInfo, entry_info};
use crate::error::{Error, IoResultExt, Result};

/// Mode of every directory created for the caller (before the umask), as envd's `EnsureDirs`.
pub const DIR_MODE: u32 = 0o755;

/// Whether this process may give files away (`chown(2)` to another user): it runs as root.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creates `path` and its missing parents, as envd's `MakeDir`, and describes the new directory.
///
/// An existing directory (symlinks followed) is `EEXIST`; an existing non-directory, at `path` or
/// at a parent, is `ENOTDIR`. Each created directory gets [`DIR_MODE`] and, when running as root,
/// the owner `uid`:`gid`.
pub fn make_dir(path: &Path, uid: u32, gid: u32) -> Result<EntryInfo> {
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => return Err(Error::errno(libc::EEXIST, path)),
        Ok(_) => return Err(Error::errno(libc::ENOTDIR, path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::os(e, path)),
    }
    ensure_dirs(path, uid, gid)?;
    entry_info(path)
}

/// Creates the destination's missing parents (as [`make_dir`] does), then `rename(2)`s `source`
/// to `destination`, and describes the destination. A rename that fails takes back the parents it
/// made.
///
/// A missing source is `ENOENT`; a rename across filesystems stays `EXDEV` (nothing is copied).
pub fn rename(source: &Path, destination: &Path, uid: u32, gid: u32) -> Result<EntryInfo> {
    let made = match destination.parent() {
        Some(parent) => ensure_dirs(parent, uid, gid)?,
        None => Vec::new(),
    };
    if let Err(e) = fs::rename(source, destination).at2(source, destination) {
        remove_made_dirs(&made); // a missing source leaves no directories made for it
        return Err(e);
    }
    entry_info(destination)
}

/// Removes `path` and, for a directory, everything below it, never following symlinks (a link is
/// removed, not its target). A path that does not exist, before or during removal, is not an error.
pub fn remove_all(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.at(path),
    }
}

/// Creates `dir` and its missing ancestors, root-most first, as envd's `EnsureDirs`: each missing
/// one is created with [`DIR_MODE`] and chowned to `uid`:`gid` when running as root. A directory
/// created concurrently by someone else is accepted (and chowned, since its creator may not have
/// yet). An existing non-directory (symlinks followed) is `ENOTDIR`. Returns the directories this
/// call made, root-most first (not one made concurrently by someone else): what
/// [`remove_made_dirs`] takes back. On an error (a disk full half-way) those it made are removed.
pub(crate) fn ensure_dirs(dir: &Path, uid: u32, gid: u32) -> Result<Vec<PathBuf>> {
    // Nearly always the directory is there already: one `stat` of it, not one of every ancestor
    // (an upload of 100 files into `/home/user/project/src` made 500 `stat`s, now 100).
    if fs::metadata(dir).is_ok_and(|meta| meta.is_dir()) {
        return Ok(Vec::new());
    }
    let mut made = Vec::new();
    match make_missing(dir, uid, gid, &mut made) {
        Ok(()) => Ok(made),
        Err(e) => {
            remove_made_dirs(&made); // a disk full half-way: none of them left behind
            Err(e)
        }
    }
}

fn make_missing(dir: &Path, uid: u32, gid: u32, made: &mut Vec<PathBuf>) -> Result<()> {
    let root = is_root();
    let mut current = PathBuf::new();
    for component in dir.components() {
        current.push(component);
        if !matches!(component, Component::Normal(_)) {
            continue; // "/", "." and ".." are never created.
        }
        match fs::metadata(&current) {
            Ok(meta) if meta.is_dir() => continue,
            Ok(_) => return Err(Error::errno(libc::ENOTDIR, &current)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::os(e, &current)),
        }
        match DirBuilder::new().mode(DIR_MODE).create(&current) {
            Ok(()) => made.push(current.clone()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && current.is_dir() => {}
            Err(e) => return Err(Error::os(e, &current)),
        }
        if root {
            chown(&current, Some(uid), Some(gid)).at(&current)?;
        }
    }
    Ok(())
}

/// Removes the directories [`ensure_dirs`] made (`made`, root-most first), deepest first, while they
/// are empty: the first that is not (or is gone, or is no longer a directory: `rmdir` never follows
/// a link at the name) stops it, and the ones above it stay. Best effort: what a failed upload
/// made for its file and nothing else needs.
pub(crate) fn remove_made_dirs(made: &[PathBuf]) {
    for dir in made.iter().rev() {
        if fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    use super::*;
    use crate::entry::FileType;
    use crate::test_util::current_umask;

    /// A uid/gid different from ours, to see that chown happens when we are root.
    const NOBODY: u32 = 65534;

    #[test]
    fn make_dir_creates_parents_with_0755_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/c");
        let e = make_dir(&target, NOBODY, NOBODY).unwrap();
        assert_eq!((e.file_type, e.name.as_str()), (FileType::Directory, "c"));
        for p in ["a", "a/b", "a/b/c"] {
            let meta = fs::metadata(dir.path().join(p)).unwrap();
            let umask_free = DIR_MODE & !current_umask();
            assert_eq!(meta.permissions().mode() & 0o777, umask_free, "{p}");
            if is_root() {
                assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY), "{p}");
            }
        }
        // The pre-existing temp dir is not chowned.
        assert_ne!(fs::metadata(dir.path()).unwrap().uid(), NOBODY);
    }

    #[test]
    fn make_dir_errors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let err = make_dir(d, 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        fs::write(d.join("file"), "").unwrap();
        let err = make_dir(&d.join("file"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        let err = make_dir(&d.join("file/sub/x"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        // A symlink to a directory is an existing directory.
        symlink(d, d.join("link")).unwrap();
        let err = make_dir(&d.join("link"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        // Creating below a symlinked directory goes through the link.
        make_dir(&d.join("link/through"), 0, 0).unwrap();
        assert!(d.join("through").is_dir());
    }

    #[test]
    fn rename_creates_destination_parents() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("src"), "data").unwrap();
        let e = rename(&d.join("src"), &d.join("x/y/dst"), NOBODY, NOBODY).unwrap();
        assert_eq!(
            (e.name.as_str(), e.size, e.file_type),
            ("dst", 4, FileType::File)
        );
        assert!(!d.join("src").exists());
        assert_eq!(fs::read_to_string(d.join("x/y/dst")).unwrap(), "data");
        if is_root() {
            assert_eq!(fs::metadata(d.join("x/y")).unwrap().uid(), NOBODY);
        }
        // Renaming a directory over a file-less name, and a missing source.
        fs::create_dir(d.join("dir")).unwrap();
        rename(&d.join("dir"), &d.join("dir2"), 0, 0).unwrap();
        let err = rename(&d.join("missing"), &d.join("z"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            (err.path(), err.path2()),
            (d.join("missing").as_path(), Some(d.join("z").as_path()))
        );
        // A failed rename leaves none of the parents it made; those that were there stay.
        rename(&d.join("missing"), &d.join("x/new/deeper/z"), 0, 0).unwrap_err();
        assert!(d.join("x/y").is_dir() && !d.join("x/new").exists());
    }

    #[test]
    fn remove_all_is_recursive_and_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("keep")).unwrap();
        fs::write(d.join("keep/precious"), "").unwrap();
        fs::create_dir_all(d.join("tree/a/b")).unwrap();
        fs::write(d.join("tree/a/b/f"), "").unwrap();
        symlink(d.join("keep"), d.join("tree/link")).unwrap();
        symlink(d.join("keep"), d.join("toplink")).unwrap();
        remove_all(&d.join("tree")).unwrap();
        remove_all(&d.join("toplink")).unwrap();
        assert!(!d.join("tree").exists());
        assert!(fs::symlink_metadata(d.join("toplink")).is_err());
        assert!(d.join("keep/precious").exists());
        fs::write(d.join("file"), "").unwrap();
        remove_all(&d.join("file")).unwrap();
        assert!(!d.join("file").exists());
        remove_all(&d.join("missing")).unwrap();
        remove_all(&d.join("missing/deeper")).unwrap();
    }
}
