//! Atomic replacement of a file for uploads (`POST /files`, spec §3.5): the bytes go to a hidden
//! temporary file created with `open(O_CREAT|O_EXCL)` in the target's directory, and `commit`
//! `rename(2)`s it over the target, so readers see the old file or the new one, never a mix.
//!
//! The guarantee is that a client that disconnects, or an upload that fails (`ENOSPC`, a bad
//! request part), never leaves a torn or partial file: the temporary file is removed by
//! [`AtomicWriter::abort`] or by `Drop`. There is deliberately no `fsync(2)`: crash durability is
//! not promised (envd, which truncates and writes in place, does not promise it either), and an
//! `fsync` per upload would cost far more than the transfer on most disks. After a kernel crash the
//! target may thus be empty or old, and a stray `.<name>.sandboxd-<random>.tmp` may remain.
//!
//! Differences from envd's in-place `O_TRUNC` write, all consequences of replacing the inode: hard
//! links to the old file keep the old content, and xattrs outside `user.e2b.*` are not carried
//! over. A symlink target is written through (the link's resolved target is replaced, the link
//! stays); a dangling symlink is replaced by the new file.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt, fchown};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{Error, IoResultExt, Result};
use crate::metadata::{Metadata, set_metadata_file};
use crate::ops::{ensure_dirs, is_root, remove_made_dirs};
use crate::splice::{self, Failure, Received};

/// Mode of a new file before the umask, as envd's `os.OpenFile(..., 0o666)`.
pub const NEW_FILE_MODE: u32 = 0o666;

/// How many bytes of the target's name the temporary name keeps: with the leading `.` and the
/// `.sandboxd-<16 hex>.tmp` suffix (30 bytes) it stays within `NAME_MAX` (255) for any target name.
const TEMP_NAME_KEEP: usize = 200;

/// How many random names are tried before giving up with `EEXIST`; a collision of 64-bit random
/// names means something else is wrong.
const TEMP_ATTEMPTS: usize = 16;

/// A file being written atomically. See the module documentation.
#[derive(Debug)]
pub struct AtomicWriter {
    /// The temporary file; `None` once sealed, committed or aborted.
    file: Option<File>,
    /// True between [`seal`](Self::seal) and the commit or abort: the temporary file is complete
    /// and closed, only its rename is left.
    sealed: bool,
    /// The path as requested.
    path: PathBuf,
    /// The file the commit replaces: `path`, or its resolved target if it is a symlink.
    target: PathBuf,
    /// The temporary file's path.
    temp: PathBuf,
    /// Bytes written so far.
    written: u64,
    /// Owner given to the file at commit, when running as root.
    uid: u32,
    /// Group given to the file at commit, when running as root.
    gid: u32,
    /// Whether `commit` succeeded.
    committed: bool,
    /// The parent directories `create` made for the file, root-most first: an abort removes them
    /// again while they are empty.
    made_dirs: Vec<PathBuf>,
}

impl AtomicWriter {
    /// Starts writing `path`.
    ///
    /// Missing parent directories are created (0755, chowned to `uid`:`gid` when root). An
    /// existing target keeps its permission bits; a new one gets `0o666 & !umask`. A directory
    /// (or a symlink to one) is `EISDIR`; a parent that is not a directory is `ENOTDIR`.
    pub fn create(path: &Path, uid: u32, gid: u32) -> Result<Self> {
        let (target, existing) = match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Err(Error::errno(libc::EISDIR, path)),
            Ok(meta) => {
                let is_link = fs::symlink_metadata(path)
                    .at(path)?
                    .file_type()
                    .is_symlink();
                let target = if is_link {
                    fs::canonicalize(path).at(path)?
                } else {
                    path.into()
                };
                (target, Some(meta))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (path.to_path_buf(), None),
            Err(e) => return Err(Error::os(e, path)),
        };
        let name = target
            .file_name()
            .ok_or_else(|| Error::errno(libc::EISDIR, path))?;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let made_dirs = if existing.is_none() {
            ensure_dirs(&dir, uid, gid)?
        } else {
            Vec::new()
        };
        let mode = existing
            .as_ref()
            .map_or(NEW_FILE_MODE, |m| m.mode() & 0o777);

        let mut attempt = 0;
        let (file, temp) = loop {
            let temp = dir.join(temp_name(name));
            let opened = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_CLOEXEC)
                .open(&temp);
            match opened {
                Ok(file) => break (file, temp),
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists && attempt + 1 < TEMP_ATTEMPTS =>
                {
                    attempt += 1
                }
                Err(e) => {
                    remove_made_dirs(&made_dirs);
                    return Err(Error::os(e, path));
                }
            }
        };
        let writer = Self {
            file: Some(file),
            sealed: false,
            path: path.into(),
            target,
            temp,
            written: 0,
            uid,
            gid,
            committed: false,
            made_dirs,
        };
        if existing.is_some() {
            // The umask applied at open; an existing file's bits are kept exactly, as O_TRUNC would.
            let file = writer.file.as_ref().expect("just opened");
            file.set_permissions(Permissions::from_mode(mode))
                .at(path)?;
        }
        Ok(writer)
    }

    /// The path as requested.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file that [`commit`](Self::commit) replaces (the resolved target of a symlink).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file's path.
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the writer still accepts writes (neither sealed, committed nor aborted).
    pub fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Whether [`commit`](Self::commit) succeeded.
    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// Appends all of `data`, retrying short and interrupted writes. A full disk is `ENOSPC`.
    /// After commit or abort this fails with [`Error::Closed`].
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let file = self.file.as_mut().ok_or_else(|| Error::Closed {
            path: self.path.clone(),
        })?;
        file.write_all(data).at(&self.path)?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Appends exactly `len` bytes read from `socket` (a non-blocking stream socket the caller keeps
    /// open for the call), moved with `splice(2)` where the kernel allows it (see [`crate::splice`]).
    /// Gives up after `idle` without a byte, below [`splice::MIN_RATE`] on average after the first
    /// `idle`, when the client closes early, or when `stop` (a descriptor: an eventfd) becomes
    /// readable: the returned
    /// [`Received`] says which, and the caller aborts. A full disk is `ENOSPC`, as for [`write`](Self::write).
    pub fn receive_from(
        &mut self,
        socket: RawFd,
        len: u64,
        idle: Duration,
        stop: Option<RawFd>,
    ) -> Result<Received> {
        let file = self.file.as_ref().ok_or_else(|| Error::Closed {
            path: self.path.clone(),
        })?;
        let (moved, received) = match splice::receive(socket, file, len, idle, stop) {
            Ok(done) => done,
            Err(Failure::File(e) | Failure::Setup(e)) => return Err(Error::os(e, &self.path)),
        };
        self.written += moved;
        Ok(received)
    }

    /// Sets the `user.e2b.*` metadata (the new file has no other; an empty set on a filesystem
    /// without xattrs is fine), gives the file to `uid`:`gid` when root, and renames it over the
    /// target. A failed commit removes the temporary file: the writer is closed either way. After
    /// [`seal`](Self::seal) only the rename is left, and `metadata` is not looked at.
    pub fn commit(&mut self, metadata: &Metadata) -> Result<()> {
        if !self.sealed {
            self.seal(metadata)?;
        }
        self.sealed = false;
        match fs::rename(&self.temp, &self.target).at(&self.path) {
            Ok(()) => {
                self.committed = true;
                Ok(())
            }
            Err(e) => {
                let _ = self.discard();
                Err(e)
            }
        }
    }

    /// Everything [`commit`](Self::commit) does but the rename: the metadata and owner are set and
    /// the temporary file is closed. An upload of many files seals each as its part ends, so that it
    /// holds one descriptor at a time however many parts it has (not one per part until the
    /// commit, which let a body of 65,000 tiny parts use up the agent's descriptors). A failed seal
    /// removes the temporary file (and the directories made for it, as an abort): the writer is
    /// closed either way.
    pub fn seal(&mut self, metadata: &Metadata) -> Result<()> {
        let file = self.file.take().ok_or_else(|| Error::Closed {
            path: self.path.clone(),
        })?;
        // The temporary file is this writer's own, made new (`O_EXCL`): it has no `user.e2b.*`
        // attribute to replace, so without metadata there is nothing to list or set.
        let mut result = if metadata.is_empty() {
            Ok(())
        } else {
            set_metadata_file(&file, &self.path, metadata)
        };
        if result.is_ok() && is_root() {
            result = fchown(&file, Some(self.uid), Some(self.gid)).at(&self.path);
        }
        drop(file);
        match result {
            Ok(()) => self.sealed = true,
            Err(_) => {
                let _ = self.discard();
            }
        }
        result
    }

    /// Removes the temporary file, and the parent directories `create` made for it while they are
    /// empty (another writer's file in one keeps it: abort the writers of an upload last first), and
    /// leaves the target untouched. Does nothing once committed or aborted.
    pub fn abort(&mut self) -> Result<()> {
        let sealed = std::mem::take(&mut self.sealed);
        if self.file.take().is_none() && !sealed {
            return Ok(());
        }
        self.discard()
    }

    /// Removes the temporary file (one already gone is not an error), then the parent directories
    /// `create` made for it while they are empty: what an abort, a failed seal and a failed commit
    /// leave behind, nothing.
    fn discard(&mut self) -> Result<()> {
        let removed = match fs::remove_file(&self.temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::os(e, &self.temp)),
            _ => Ok(()),
        };
        remove_made_dirs(&std::mem::take(&mut self.made_dirs));
        removed
    }
}

impl Drop for AtomicWriter {
    /// An uncommitted writer removes its temporary file.
    fn drop(&mut self) {
        let _ = self.abort();
    }
}

/// `.<name>.sandboxd-<16 random hex digits>.tmp`, with `name` cut to [`TEMP_NAME_KEEP`] bytes.
fn temp_name(name: &OsStr) -> std::ffi::OsString {
    let name = name.as_bytes();
    let mut temp = Vec::with_capacity(TEMP_NAME_KEEP + 32);
    temp.push(b'.');
    temp.extend_from_slice(&name[..name.len().min(TEMP_NAME_KEEP)]);
    temp.extend_from_slice(format!(".sandboxd-{:016x}.tmp", random_u64()).as_bytes());
    OsStr::from_bytes(&temp).to_owned()
}

/// A random 64-bit number without a dependency: std's `RandomState` keys come from the OS's
/// random source; a process-wide counter makes successive numbers differ.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::metadata::read_metadata;
    use crate::test_util::current_umask;

    const NOBODY: u32 = 65534;

    /// Names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn md(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn commit_creates_the_file_with_parents_metadata_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/file.txt");
        let mut w = AtomicWriter::create(&target, NOBODY, NOBODY).unwrap();
        let temp_name = w
            .temp_path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            temp_name.starts_with(".file.txt.sandboxd-") && temp_name.ends_with(".tmp"),
            "{temp_name}"
        );
        assert_eq!(names(&dir.path().join("a/b")), [temp_name]);
        w.write(b"hello ").unwrap();
        w.write(b"").unwrap();
        w.write(b"world").unwrap();
        assert_eq!(w.written(), 11);
        assert!(!target.exists());
        w.commit(&md(&[("k", "v")])).unwrap();
        assert!(w.is_committed() && !w.is_open());
        assert_eq!(fs::read(&target).unwrap(), b"hello world");
        assert_eq!(names(&dir.path().join("a/b")), ["file.txt"]);
        assert_eq!(read_metadata(&target), md(&[("k", "v")]));
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(meta.mode() & 0o777, NEW_FILE_MODE & !current_umask());
        if is_root() {
            assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
            assert_eq!(fs::metadata(dir.path().join("a")).unwrap().uid(), NOBODY);
        }
        // Closed for good.
        assert!(matches!(w.write(b"x"), Err(Error::Closed { .. })));
        assert!(matches!(
            w.commit(&Metadata::new()),
            Err(Error::Closed { .. })
        ));
        w.abort().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"hello world");
    }

    #[test]
    fn old_content_stays_until_commit_and_permissions_and_metadata_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        fs::write(&target, "old").unwrap();
        // 0o666 would become 0o644 under the usual umask if the bits were not kept exactly.
        fs::set_permissions(&target, Permissions::from_mode(0o666)).unwrap();
        crate::metadata::set_metadata(&target, &md(&[("old", "1")])).unwrap();
        let mut w = AtomicWriter::create(&target, 0, 0).unwrap();
        w.write(b"new content").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"old");
        w.commit(&Metadata::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new content");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o666);
        assert!(read_metadata(&target).is_empty());
    }

    #[test]
    fn abort_removes_the_parents_it_made_while_empty_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("kept")).unwrap();
        let mut w = AtomicWriter::create(&dir.path().join("kept/a/b/f"), 0, 0).unwrap();
        w.write(b"partial").unwrap();
        w.abort().unwrap();
        assert_eq!(names(&dir.path().join("kept")), Vec::<String>::new());

        // A file another writer put in one of them keeps it, and those above it: aborted last first,
        // an upload's writers leave nothing.
        let mut first = AtomicWriter::create(&dir.path().join("x/f1"), 0, 0).unwrap();
        let mut second = AtomicWriter::create(&dir.path().join("x/y/f2"), 0, 0).unwrap();
        second.write(b"2").unwrap();
        first.abort().unwrap(); // first: x still holds y and f2's temporary file
        assert!(dir.path().join("x/y").is_dir());
        second.abort().unwrap();
        assert!(!dir.path().join("x/y").exists());
        assert!(dir.path().join("x").is_dir()); // made by the first, whose abort is over

        let mut a = AtomicWriter::create(&dir.path().join("p/q/f1"), 0, 0).unwrap();
        let mut b = AtomicWriter::create(&dir.path().join("p/q/r/f2"), 0, 0).unwrap();
        b.abort().unwrap();
        a.abort().unwrap();
        assert!(!dir.path().join("p").exists());

        // Committed: nothing is taken back.
        let mut c = AtomicWriter::create(&dir.path().join("m/n/f"), 0, 0).unwrap();
        c.write(b"kept").unwrap();
        c.commit(&Metadata::new()).unwrap();
        c.abort().unwrap();
        assert_eq!(fs::read(dir.path().join("m/n/f")).unwrap(), b"kept");
    }

    #[test]
    fn abort_and_drop_leave_no_temp_file_and_the_old_content() {
        // Whether the file was sealed first (complete and closed, only its rename left) or not.
        for seal in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("f");
            fs::write(&target, "old").unwrap();
            let partial = || {
                let mut w = AtomicWriter::create(&target, 0, 0).unwrap();
                w.write(b"partial").unwrap();
                if seal {
                    w.seal(&Metadata::new()).unwrap();
                }
                assert_eq!(names(dir.path()).len(), 2);
                w
            };

            let mut w = partial();
            w.abort().unwrap();
            w.abort().unwrap();
            assert!(matches!(w.write(b"x"), Err(Error::Closed { .. })));
            assert!(matches!(
                w.commit(&Metadata::new()),
                Err(Error::Closed { .. })
            ));
            assert_eq!(names(dir.path()), ["f"]);

            drop(partial());
            assert_eq!(names(dir.path()), ["f"]);
            assert_eq!(fs::read(&target).unwrap(), b"old");

            // A new file that is never committed never appears.
            drop(AtomicWriter::create(&dir.path().join("new"), 0, 0).unwrap());
            assert_eq!(names(dir.path()), ["f"]);
        }
    }

    /// How many of this process's descriptors are open on `path`: counted by what each one names,
    /// not in total, which the other tests running beside this one change at any moment.
    fn fds_on(path: &Path) -> usize {
        fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    #[test]
    fn a_sealed_file_is_closed_complete_and_only_renamed_by_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        fs::write(&target, "old").unwrap();
        let mut w = AtomicWriter::create(&target, NOBODY, NOBODY).unwrap();
        w.write(b"sealed content").unwrap();
        let temp = w.temp_path().to_owned();
        assert_eq!(fds_on(&temp), 1);
        w.seal(&md(&[("k", "v")])).unwrap();
        assert_eq!(
            fds_on(&temp),
            0,
            "the temporary file's descriptor is closed"
        );
        assert!(!w.is_open() && !w.is_committed());
        assert!(matches!(w.write(b"x"), Err(Error::Closed { .. })));
        assert!(matches!(
            w.seal(&Metadata::new()),
            Err(Error::Closed { .. })
        ));
        assert_eq!(
            fs::read(&target).unwrap(),
            b"old",
            "nothing replaced before the commit"
        );
        assert_eq!(read_metadata(&temp), md(&[("k", "v")]));
        if is_root() {
            assert_eq!(fs::metadata(&temp).unwrap().uid(), NOBODY);
        }
        // The commit's own metadata is not looked at: the seal's stands.
        w.commit(&md(&[("other", "1")])).unwrap();
        assert!(w.is_committed());
        assert_eq!(fs::read(&target).unwrap(), b"sealed content");
        assert_eq!(read_metadata(&target), md(&[("k", "v")]));
        assert_eq!(names(dir.path()), ["f"]);
        assert!(matches!(
            w.commit(&Metadata::new()),
            Err(Error::Closed { .. })
        ));
    }

    #[test]
    fn failed_commit_removes_the_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let mut w = AtomicWriter::create(&target, 0, 0).unwrap();
        // The target becomes a non-empty directory: rename(2) fails.
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "").unwrap();
        let err = w.commit(&Metadata::new()).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::EISDIR | libc::ENOTEMPTY)),
            "{err}"
        );
        assert_eq!(err.path(), target);
        assert!(!w.is_open());
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn directories_and_non_directory_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = AtomicWriter::create(dir.path(), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        symlink(dir.path(), dir.path().join("dirlink")).unwrap();
        let err = AtomicWriter::create(&dir.path().join("dirlink"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EISDIR));
        fs::write(dir.path().join("file"), "").unwrap();
        let err = AtomicWriter::create(&dir.path().join("file/child"), 0, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    }

    #[test]
    fn a_symlink_is_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let d = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(d.join("real")).unwrap();
        fs::write(d.join("real/f"), "old").unwrap();
        symlink("real/f", d.join("link")).unwrap();
        let mut w = AtomicWriter::create(&d.join("link"), 0, 0).unwrap();
        assert_eq!(w.target(), d.join("real/f"));
        assert_eq!(w.temp_path().parent(), Some(d.join("real").as_path()));
        w.write(b"new").unwrap();
        w.commit(&Metadata::new()).unwrap();
        assert!(
            fs::symlink_metadata(d.join("link"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(d.join("real/f")).unwrap(), b"new");
    }

    #[test]
    fn long_names_fit_name_max() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("n".repeat(255));
        let mut w = AtomicWriter::create(&target, 0, 0).unwrap();
        assert!(w.temp_path().file_name().unwrap().len() <= 255);
        w.write(b"x").unwrap();
        w.commit(&Metadata::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"x");
    }

    #[test]
    fn receive_from_appends_after_writes_and_counts_the_bytes() {
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsRawFd;

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        let mut w = AtomicWriter::create(&target, 0, 0).unwrap();
        w.write(b"head:").unwrap();
        client.write_all(b"body and more").unwrap();
        let got = w.receive_from(server.as_raw_fd(), 8, Duration::from_secs(5), None);
        assert_eq!(got.unwrap(), Received::Complete);
        assert_eq!(w.written(), 13);
        w.commit(&Metadata::new()).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"head:body and");
        let err = w
            .receive_from(server.as_raw_fd(), 1, Duration::from_secs(5), None)
            .unwrap_err();
        assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    }

    #[test]
    fn temp_names_differ() {
        let a = temp_name(OsStr::new("x"));
        let b = temp_name(OsStr::new("x"));
        assert_ne!(a, b);
    }
}
