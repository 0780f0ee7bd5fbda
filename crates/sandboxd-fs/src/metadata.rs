//! File metadata as extended attributes: the `user.e2b.*` namespace (spec §2.1 `metadata`, §3.5).
//!
//! envd stores the `X-Metadata-<key>` headers of an upload as xattrs `user.e2b.<key>` and reports
//! them, prefix stripped, in every `EntryInfo`. Reading is best effort (a filesystem without
//! xattrs, or a file that vanished, simply has no metadata); writing replaces the whole
//! `user.e2b.*` set. Like envd (Go's `unix.Getxattr`/`Setxattr`), paths are dereferenced: a
//! symlink reports and receives its target's metadata (the kernel refuses `user.*` attributes on
//! symlinks themselves).
//!
//! Validation of keys and values (ASCII 0x20–0x7E, key ≤ 246 bytes, total ≤ 4096 bytes) is
//! protocol policy and lives in Python. Names or values that are not valid UTF-8 (set by other
//! tools) are read lossily, with U+FFFD in place of invalid bytes.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use xattr::FileExt;

use crate::error::{IoResultExt, Result};

/// The xattr namespace of E2B file metadata; keys are reported without it.
pub const METADATA_PREFIX: &str = "user.e2b.";

/// File metadata: key (without [`METADATA_PREFIX`]) to value, sorted by key.
pub type Metadata = BTreeMap<String, String>;

/// Reads the `user.e2b.*` attributes of `path` (following symlinks). Any error yields what could
/// be read so far, usually nothing.
pub fn read_metadata(path: &Path) -> Metadata {
    let mut metadata = Metadata::new();
    let Ok(names) = xattr::list_deref(path) else {
        return metadata;
    };
    for name in names {
        let Some(key) = name.as_bytes().strip_prefix(METADATA_PREFIX.as_bytes()) else {
            continue;
        };
        // A value removed between list and get is skipped, as envd skips ENODATA.
        if let Ok(Some(value)) = xattr::get_deref(path, &name) {
            metadata.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    metadata
}

/// Replaces the `user.e2b.*` attributes of `path` (following symlinks) with `metadata`.
///
/// A filesystem without xattr support is an error (`ENOTSUP`) only when `metadata` is not empty:
/// clearing nothing always succeeds.
pub fn set_metadata(path: &Path, metadata: &Metadata) -> Result<()> {
    replace(
        metadata,
        || xattr::list_deref(path).map(Iterator::collect),
        |name, value| xattr::set_deref(path, name, value),
        |name| xattr::remove_deref(path, name),
    )
    .at(path)
}

/// Replaces the `user.e2b.*` attributes of the open `file` (reported as `path` in errors).
pub(crate) fn set_metadata_file(file: &File, path: &Path, metadata: &Metadata) -> Result<()> {
    replace(
        metadata,
        || file.list_xattr().map(Iterator::collect),
        |name, value| file.set_xattr(name, value),
        |name| file.remove_xattr(name),
    )
    .at(path)
}

/// The replace algorithm, over path- or fd-based xattr calls: set every new key, then remove the
/// old `user.e2b.*` keys that are not in `metadata`.
fn replace(
    metadata: &Metadata,
    list: impl FnOnce() -> io::Result<Vec<OsString>>,
    mut set: impl FnMut(&OsStr, &[u8]) -> io::Result<()>,
    mut remove: impl FnMut(&OsStr) -> io::Result<()>,
) -> io::Result<()> {
    let old = match list() {
        Ok(names) => names,
        Err(e) if metadata.is_empty() && is_unsupported(&e) => return Ok(()),
        Err(e) => return Err(e),
    };
    for (key, value) in metadata {
        set(&attribute_name(key), value.as_bytes())?;
    }
    for name in old {
        let Some(key) = name.as_bytes().strip_prefix(METADATA_PREFIX.as_bytes()) else {
            continue;
        };
        if std::str::from_utf8(key).is_ok_and(|key| metadata.contains_key(key)) {
            continue;
        }
        match remove(&name) {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            other => other?,
        }
    }
    Ok(())
}

/// `user.e2b.<key>`.
fn attribute_name(key: &str) -> OsString {
    let mut name = Vec::with_capacity(METADATA_PREFIX.len() + key.len());
    name.extend_from_slice(METADATA_PREFIX.as_bytes());
    name.extend_from_slice(key.as_bytes());
    OsString::from_vec(name)
}

/// Whether the filesystem does not support (user) extended attributes.
fn is_unsupported(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOTSUP) || e.raw_os_error() == Some(libc::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn set_replaces_only_the_e2b_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        xattr::set(&f, "user.other", b"keep").unwrap();
        set_metadata(&f, &md(&[("a", "1"), ("b", "2")])).unwrap();
        assert_eq!(read_metadata(&f), md(&[("a", "1"), ("b", "2")]));
        set_metadata(&f, &md(&[("b", "3"), ("c", "")])).unwrap();
        assert_eq!(read_metadata(&f), md(&[("b", "3"), ("c", "")]));
        set_metadata(&f, &Metadata::new()).unwrap();
        assert!(read_metadata(&f).is_empty());
        assert_eq!(
            xattr::get(&f, "user.other").unwrap().as_deref(),
            Some(&b"keep"[..])
        );
    }

    #[test]
    fn symlinks_are_followed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        let l = dir.path().join("l");
        std::fs::write(&f, "x").unwrap();
        std::os::unix::fs::symlink(&f, &l).unwrap();
        set_metadata(&l, &md(&[("k", "v")])).unwrap();
        assert_eq!(read_metadata(&f), md(&[("k", "v")]));
        assert_eq!(read_metadata(&l), md(&[("k", "v")]));
    }

    #[test]
    fn missing_files_have_no_metadata_and_cannot_get_some() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(read_metadata(&missing).is_empty());
        let err = set_metadata(&missing, &md(&[("k", "v")])).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(err.path(), missing);
    }
}
