//! Describing one filesystem entry as envd's `EntryInfo` (spec §2.1, §4.1): `lstat(2)`, plus
//! `realpath(3)` and `stat(2)` of the target for symlinks, owner names, and `user.e2b.*` xattrs.
//!
//! The `permissions` string reproduces Go's `os.FileMode.String()` exactly, because envd sends it
//! verbatim and SDK users see it. Names and paths that are not valid UTF-8 are converted lossily
//! (U+FFFD for invalid bytes): the wire carries protobuf strings, which must be UTF-8.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{IoResultExt, Result};
use crate::metadata::{Metadata, read_metadata};
use crate::users::{group_name, user_name};

/// envd's `filesystem.FileType` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum FileType {
    /// Anything that is not a regular file or a directory, and symlinks whose target is missing.
    Unspecified = 0,
    /// A regular file (or a symlink to one).
    File = 1,
    /// A directory (or a symlink to one).
    Directory = 2,
    /// A symlink. envd never reports it in `type` (a link takes its target's type and sets
    /// `is_symlink`), but the enum value exists on the wire.
    Symlink = 3,
}

/// One entry, as envd builds `filesystem.EntryInfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The base name of the entry.
    pub name: String,
    /// The path as requested (for [`crate::list_dir`]: the requested directory joined with the
    /// entry's relative path), not the resolved one.
    pub path: String,
    /// The entry's type; for a symlink, its target's type.
    pub file_type: FileType,
    /// `st_size` of the entry itself (for a symlink: the length of the link text).
    pub size: u64,
    /// Permission bits (`& 0o777`); for a symlink, its target's (0 if the target is missing).
    pub mode: u32,
    /// Go's `FileMode.String()` of the entry itself, e.g. `drwxr-xr-x` or `Lrwxrwxrwx`.
    pub permissions: String,
    /// Owner's user name, or the uid in decimal if it has none.
    pub owner: String,
    /// Group name, or the gid in decimal if it has none.
    pub group: String,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds within the second.
    pub mtime_nsec: u32,
    /// For symlinks only: the fully resolved target, or the link's own path if it cannot be resolved.
    pub symlink_target: Option<String>,
    /// Whether the entry is a symlink.
    pub is_symlink: bool,
    /// The `user.e2b.*` attributes, prefix stripped (the target's, for a symlink).
    pub metadata: Metadata,
}

/// `lstat`s `path` and describes it.
pub fn entry_info(path: &Path) -> Result<EntryInfo> {
    let lstat = fs::symlink_metadata(path).at(path)?;
    Ok(describe(path, path, &lstat))
}

/// Describes an entry whose `lstat` is `lstat`: system calls go to `real`, while `shown` is the
/// path reported (they differ when [`crate::list_dir`] walks a directory reached through a symlink).
pub(crate) fn describe(real: &Path, shown: &Path, lstat: &fs::Metadata) -> EntryInfo {
    let is_symlink = lstat.file_type().is_symlink();
    let (file_type, mode, symlink_target) = if is_symlink {
        // Go: `filepath.EvalSymlinks(path)`, or the path itself if that fails, then `os.Stat`.
        let resolved = fs::canonicalize(real).ok();
        let target = fs::metadata(resolved.as_deref().unwrap_or(real));
        let (file_type, mode) = match target {
            Ok(t) => (file_type_of(t.mode()), t.mode() & 0o777),
            Err(_) => (FileType::Unspecified, 0),
        };
        let shown_target = resolved.unwrap_or_else(|| PathBuf::from(shown));
        (file_type, mode, Some(lossy(&shown_target)))
    } else {
        (file_type_of(lstat.mode()), lstat.mode() & 0o777, None)
    };
    let name = shown
        .file_name()
        .map_or_else(|| lossy(shown), |n| n.to_string_lossy().into_owned());
    EntryInfo {
        name,
        path: lossy(shown),
        file_type,
        size: lstat.size(),
        mode,
        permissions: permissions_string(lstat.mode()),
        owner: user_name(lstat.uid()),
        group: group_name(lstat.gid()),
        mtime_sec: lstat.mtime(),
        // The kernel keeps nanoseconds in 0..1e9.
        mtime_nsec: u32::try_from(lstat.mtime_nsec()).unwrap_or(0),
        symlink_target,
        is_symlink,
        metadata: read_metadata(real),
    }
}

fn lossy(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The envd file type of a `st_mode` (after following symlinks).
fn file_type_of(st_mode: u32) -> FileType {
    match st_mode & libc::S_IFMT {
        libc::S_IFREG => FileType::File,
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        _ => FileType::Unspecified,
    }
}

// Go's `io/fs.FileMode` bits: the type and special bits are the top bits, one per letter of
// "dalTLDpSugct?" from bit 31 down; the permission bits are Unix's.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_DEVICE: u32 = 1 << 26;
const GO_MODE_NAMED_PIPE: u32 = 1 << 25;
const GO_MODE_SOCKET: u32 = 1 << 24;
const GO_MODE_SETUID: u32 = 1 << 23;
const GO_MODE_SETGID: u32 = 1 << 22;
const GO_MODE_CHAR_DEVICE: u32 = 1 << 21;
const GO_MODE_STICKY: u32 = 1 << 20;
/// The letters of the type and special bits, most significant bit first.
const GO_MODE_LETTERS: &[u8; 13] = b"dalTLDpSugct?";

/// Converts a Unix `st_mode` to Go's `FileMode` as `os.Lstat` does on Linux (`fillFileStatFromSys`).
fn go_file_mode(st_mode: u32) -> u32 {
    let mut mode = st_mode & 0o777;
    mode |= match st_mode & libc::S_IFMT {
        libc::S_IFBLK => GO_MODE_DEVICE,
        libc::S_IFCHR => GO_MODE_DEVICE | GO_MODE_CHAR_DEVICE,
        libc::S_IFDIR => GO_MODE_DIR,
        libc::S_IFIFO => GO_MODE_NAMED_PIPE,
        libc::S_IFLNK => GO_MODE_SYMLINK,
        libc::S_IFSOCK => GO_MODE_SOCKET,
        _ => 0,
    };
    if st_mode & libc::S_ISGID != 0 {
        mode |= GO_MODE_SETGID;
    }
    if st_mode & libc::S_ISUID != 0 {
        mode |= GO_MODE_SETUID;
    }
    if st_mode & libc::S_ISVTX != 0 {
        mode |= GO_MODE_STICKY;
    }
    mode
}

/// Go's `os.FileMode.String()` of a Unix `st_mode`: one letter per type or special bit set, in the
/// order `dalTLDpSugct?` (`-` if none), then `rwxrwxrwx` with `-` for missing permissions.
/// Examples: `drwxr-xr-x`, `dtrwxrwxrwx` (/tmp), `urwxr-xr-x` (setuid), `Dcrw-rw-rw-` (/dev/null).
pub fn permissions_string(st_mode: u32) -> String {
    let mode = go_file_mode(st_mode);
    let mut s = String::with_capacity(GO_MODE_LETTERS.len() + 9);
    for (i, &letter) in GO_MODE_LETTERS.iter().enumerate() {
        if mode & (1 << (31 - i)) != 0 {
            s.push(char::from(letter));
        }
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, &letter) in b"rwxrwxrwx".iter().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 {
            char::from(letter)
        } else {
            '-'
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn permissions_match_go_for_every_type_and_special_bit() {
        let cases = [
            (libc::S_IFREG | 0o644, "-rw-r--r--"),
            (libc::S_IFREG, "----------"),
            (libc::S_IFDIR | 0o755, "drwxr-xr-x"),
            (libc::S_IFDIR | 0o1777, "dtrwxrwxrwx"),
            (libc::S_IFDIR | 0o2775, "dgrwxrwxr-x"),
            (libc::S_IFREG | 0o4755, "urwxr-xr-x"),
            (libc::S_IFREG | 0o7777, "ugtrwxrwxrwx"),
            (libc::S_IFLNK | 0o777, "Lrwxrwxrwx"),
            (libc::S_IFCHR | 0o666, "Dcrw-rw-rw-"),
            (libc::S_IFCHR | 0o1666, "Dctrw-rw-rw-"),
            (libc::S_IFBLK | 0o660, "Drw-rw----"),
            (libc::S_IFIFO | 0o644, "prw-r--r--"),
            (libc::S_IFSOCK | 0o755, "Srwxr-xr-x"),
        ];
        for (st_mode, want) in cases {
            assert_eq!(permissions_string(st_mode), want, "st_mode {st_mode:o}");
        }
    }

    #[test]
    fn real_files_of_every_kind() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        let sticky = d.join("sticky");
        fs::create_dir(&sticky).unwrap();
        chmod(&sticky, 0o1777);
        let e = entry_info(&sticky).unwrap();
        assert_eq!(
            (e.permissions.as_str(), e.file_type, e.mode),
            ("dtrwxrwxrwx", FileType::Directory, 0o777)
        );

        let suid = d.join("suid");
        fs::write(&suid, "#!/bin/sh\n").unwrap();
        chmod(&suid, 0o4755);
        let e = entry_info(&suid).unwrap();
        assert_eq!(
            (e.permissions.as_str(), e.file_type, e.mode, e.size),
            ("urwxr-xr-x", FileType::File, 0o755, 10)
        );

        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        chmod(&fifo, 0o644);
        let e = entry_info(&fifo).unwrap();
        assert_eq!(
            (e.permissions.as_str(), e.file_type),
            ("prw-r--r--", FileType::Unspecified)
        );

        let sock = d.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        chmod(&sock, 0o755);
        let e = entry_info(&sock).unwrap();
        assert_eq!(
            (e.permissions.as_str(), e.file_type),
            ("Srwxr-xr-x", FileType::Unspecified)
        );

        let e = entry_info(Path::new("/dev/null")).unwrap();
        assert_eq!(
            (e.permissions.as_str(), e.file_type, e.name.as_str()),
            ("Dcrw-rw-rw-", FileType::Unspecified, "null")
        );
    }

    #[test]
    fn plain_file_fields() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.txt");
        fs::write(&f, "hello").unwrap();
        chmod(&f, 0o640);
        let meta = fs::metadata(&f).unwrap();
        let e = entry_info(&f).unwrap();
        assert_eq!(e.name, "a.txt");
        assert_eq!(e.path, f.to_str().unwrap());
        assert_eq!(e.file_type, FileType::File);
        assert_eq!((e.size, e.mode), (5, 0o640));
        assert_eq!(e.permissions, "-rw-r-----");
        assert_eq!(e.owner, user_name(meta.uid()));
        assert_eq!(e.group, group_name(meta.gid()));
        assert_eq!(
            (e.mtime_sec, i64::from(e.mtime_nsec)),
            (meta.mtime(), meta.mtime_nsec())
        );
        assert_eq!(e.symlink_target, None);
        assert!(!e.is_symlink);
        assert!(e.metadata.is_empty());
    }

    #[test]
    fn symlinks_take_the_target_type_and_mode_but_keep_their_own_permissions_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let d = fs::canonicalize(dir.path()).unwrap();
        let file = d.join("file");
        fs::write(&file, "0123456789").unwrap();
        chmod(&file, 0o600);
        let sub = d.join("sub");
        fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o750);

        // A relative link to a file, and a link to that link: both resolve fully.
        let to_file = d.join("to_file");
        symlink("file", &to_file).unwrap();
        let chain = d.join("chain");
        symlink(&to_file, &chain).unwrap();
        for link in [&to_file, &chain] {
            let e = entry_info(link).unwrap();
            assert!(e.is_symlink);
            assert_eq!(e.file_type, FileType::File);
            assert_eq!(e.mode, 0o600);
            assert_eq!(e.permissions, "Lrwxrwxrwx");
            assert_eq!(e.symlink_target.as_deref(), file.to_str());
            let link_len = fs::read_link(link).unwrap().as_os_str().len() as u64;
            assert_eq!(e.size, link_len);
        }

        let to_dir = d.join("to_dir");
        symlink(&sub, &to_dir).unwrap();
        let e = entry_info(&to_dir).unwrap();
        assert_eq!(
            (e.file_type, e.mode, e.is_symlink),
            (FileType::Directory, 0o750, true)
        );
        assert_eq!(e.symlink_target.as_deref(), sub.to_str());

        // Broken link and a loop: type UNSPECIFIED, mode 0, target is the link itself.
        let broken = d.join("broken");
        symlink("nowhere", &broken).unwrap();
        let a = d.join("loop_a");
        let b = d.join("loop_b");
        symlink(&b, &a).unwrap();
        symlink(&a, &b).unwrap();
        for link in [&broken, &a] {
            let e = entry_info(link).unwrap();
            assert!(e.is_symlink);
            assert_eq!((e.file_type, e.mode), (FileType::Unspecified, 0));
            assert_eq!(e.permissions, "Lrwxrwxrwx");
            assert_eq!(e.symlink_target.as_deref(), link.to_str());
        }
    }

    #[test]
    fn missing_path_is_enoent_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = entry_info(&missing).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(err.path(), missing);
        let err = entry_info(&dir.path().join("missing/child")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn non_utf8_names_are_lossy() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(std::ffi::OsStr::from_bytes(b"bad\xffname"));
        fs::write(&f, "").unwrap();
        let e = entry_info(&f).unwrap();
        assert_eq!(e.name, "bad\u{fffd}name");
    }

    #[test]
    fn metadata_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, "").unwrap();
        xattr::set(&f, "user.e2b.owner", b"me").unwrap();
        xattr::set(&f, "user.unrelated", b"x").unwrap();
        let e = entry_info(&f).unwrap();
        assert_eq!(e.metadata.get("owner").map(String::as_str), Some("me"));
        assert_eq!(e.metadata.len(), 1);
    }
}
