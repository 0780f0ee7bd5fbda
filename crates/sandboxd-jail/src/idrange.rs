//! Host-wide allocation of the id ranges that sandboxes' user namespaces map to.
//!
//! What the kernel does here: nothing but file creation. A sandbox's uids and gids 0-65535 map to
//! `base..base + 65536` on the host (see `userns.rs`). Two sandboxes sharing a range would share
//! per-uid kernel state (keyrings, inotify and process counts, signals across pid namespaces, file
//! ownership), so every range must belong to one sandbox on the whole host, across every
//! `sandboxd` runtime running there (the tests start many; `sandboxd node`s share a machine).
//!
//! The registry is a directory with one file per claimed range, named by its base id. A claim is
//! made by writing the owner (data dir and sandbox id) to a private temporary file and `link`ing
//! it to the range's name: `link` fails with `EEXIST` when the name is taken, so two runtimes can
//! never claim the same range, and a claim is never seen half-written. Releasing is `unlink`ing
//! one's own claim. A claim whose data dir is gone (the runtime that made it was removed with its
//! state) and whose ids no process uses any more is stale: [`IdRegistry::reclaim_stale`] removes
//! those, holding an exclusive `flock` on the registry so two reclaimers never race.
//!
//! "Gone" is deleted, not merely not found: a data dir on a volume that is unmounted for now (the
//! runtime stopped, a sandbox paused to disk there, its files owned by the range) is not found
//! either, and freeing its range would hand the range to another sandbox while those files wait for
//! the volume to come back, and the paused sandbox to resume, sharing host ids with it. So a claim
//! records where its data dir was ([`Place`]: the identity of each directory from `/` down), and a
//! data dir not found counts as deleted only when its nearest ancestor that is there is still the
//! directory it was, and what is missing below it was on its file system. A volume unmounted at its
//! mount point leaves the mount point's own directory there (another one), or nothing; a data dir
//! deleted, however much of the tree above it went with it, leaves the directory it was deleted
//! from. Claims persist across reboots, so the identities are ones a reboot keeps where file
//! systems allow (`f_fsid`, which ext4 and btrfs derive from their UUID, and inode numbers); a data
//! dir on a tmpfs counts as deleted once the host has rebooted. Claims written before claims
//! recorded a place are judged as they were: a data dir not found is deleted.
//!
//! Where the ranges are: [`FIRST_BASE`] = 0x70000000 (1879048192) up to systemd's "foreign" range
//! at 0x7FFE0000, in 64 Ki steps (4094 ranges). systemd documents 0x70000000-0x7FFDFFFF as free:
//! below is its container range (524288-1879048191, which `systemd-nspawn --private-users=pick`
//! and machined hand out), above 2^31 ids are unsafe for software that stores them signed. Ranges
//! that overlap an account in `/etc/passwd` or `/etc/group`, or a delegation in `/etc/subuid` or
//! `/etc/subgid` (Podman, Docker's userns-remap), are skipped.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::fcntl::{Flock, FlockArg};

/// Ids per sandbox: 0-65535 inside, the classic 16-bit id space every distribution's packages
/// (and `nobody` = 65534) assume.
pub const RANGE_SIZE: u32 = 65536;

/// The first host id handed to sandboxes (see the module docs for why there).
pub const FIRST_BASE: u32 = 0x7000_0000;

/// One past the last host id: systemd's "foreign" range starts here.
const END: u32 = 0x7FFE_0000;

/// How many ranges the host has: 4094.
pub const RANGES: u32 = (END - FIRST_BASE) / RANGE_SIZE;

/// Where the host-wide registry lives unless told otherwise: outside any runtime's data dir, so
/// removing a data dir (which makes its claims stale) never removes other runtimes' claims, and
/// persistent, because a sandbox paused to disk keeps files owned by its range across reboots.
pub const DEFAULT_REGISTRY: &str = "/var/lib/sandboxd-ids";

/// First line of every claim file, so a stray file is never mistaken for a claim.
const MAGIC: &str = "sandboxd id range v1";

/// Name of the lock file that serialises reclaiming.
const LOCK_FILE: &str = ".lock";

/// Prefix of the temporary files claims are written to before being linked into place.
const TEMP_PREFIX: &str = ".claim-";

/// Fourth line's key: where the data dir was when claimed (see [`Place`]).
const PLACE_KEY: &str = "place=";

/// A claim file as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// First host id of the range (uid and gid alike).
    pub base: u32,
    /// The data dir of the runtime that owns it (absolute).
    pub data_dir: PathBuf,
    /// The sandbox it belongs to.
    pub sandbox_id: String,
    /// Where the data dir was when claimed; `None` for claims made before claims recorded it (or
    /// whose data dir could not be looked at then).
    pub place: Option<Place>,
}

/// Where a claim's data dir was when it was claimed, so that a data dir not found later can be told
/// deleted (its range is free) from not there for now (a volume unmounted at its mount point: its
/// files, owned by the range, come back with it, and the range must still be its sandbox's alone).
/// Claims outlive reboots (`/var/lib/sandboxd-ids`), so mount ids, which a reboot renumbers, are of
/// no use here (runtime marks, in `/run`, use them: `python/sandboxd/runtime/leftovers.py`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    /// The identity of every directory from `/` down to the data dir itself, as far as they could
    /// be looked at then.
    pub dirs: Vec<DirId>,
    /// The boot (`/proc/sys/kernel/random/boot_id`) during which the claim was made, when the data
    /// dir was on a file system that lives in memory (tmpfs, ramfs): its files end with that boot.
    pub volatile_boot: Option<String>,
}

/// A directory's identity: its inode number on its file system, and that file system's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirId {
    /// `statfs`'s `f_fsid`: ext4 and btrfs derive it from the file system's UUID, so it survives a
    /// reboot (and a disk found at another device number); 0 when the file system has none.
    pub fsid: u64,
    /// `st_dev`: what tells file systems apart when they have no `fsid`. The kernel may number
    /// devices differently at the next boot.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl DirId {
    fn of(path: &Path) -> io::Result<DirId> {
        use std::os::unix::fs::MetadataExt;
        let meta = fs::metadata(path)?;
        let fsid = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        Ok(DirId {
            fsid: fsid.filesystem_id(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// The same file system: the same `fsid` when either has one, else the same device.
    fn same_fs(&self, other: &DirId) -> bool {
        if self.fsid != 0 || other.fsid != 0 {
            self.fsid == other.fsid
        } else {
            self.dev == other.dev
        }
    }

    /// The same directory: the same inode of the same file system.
    fn same(&self, other: &DirId) -> bool {
        self.ino == other.ino && self.same_fs(other)
    }
}

/// tmpfs's `f_type` is in nix; ramfs's is not (linux/magic.h).
const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);

impl Place {
    /// Where `data_dir` (absolute) is now: its directories' identities from `/` down, stopping at
    /// the first that cannot be looked at.
    fn of(data_dir: &Path) -> Place {
        let mut paths: Vec<&Path> = data_dir.ancestors().collect();
        paths.reverse();
        let dirs: Vec<DirId> = paths.iter().map_while(|p| DirId::of(p).ok()).collect();
        let volatile = (dirs.len().checked_sub(1))
            .and_then(|deepest| paths.get(deepest))
            .and_then(|p| nix::sys::statfs::statfs(*p).ok())
            .is_some_and(|s| {
                let kind = s.filesystem_type();
                kind == nix::sys::statfs::TMPFS_MAGIC || kind == RAMFS_MAGIC
            });
        Place {
            dirs,
            volatile_boot: if volatile { boot_id() } else { None },
        }
    }

    fn render(&self) -> String {
        let dirs: Vec<String> = self
            .dirs
            .iter()
            .map(|d| format!("{}:{}:{}", d.fsid, d.dev, d.ino))
            .collect();
        let mut line = format!("{PLACE_KEY}{}", dirs.join(" "));
        if let Some(boot) = &self.volatile_boot {
            line.push_str(&format!(" volatile={boot}"));
        }
        line
    }

    fn parse(line: &str) -> Option<Place> {
        let mut place = Place {
            dirs: Vec::new(),
            volatile_boot: None,
        };
        for word in line.strip_prefix(PLACE_KEY)?.split_whitespace() {
            if let Some(boot) = word.strip_prefix("volatile=") {
                place.volatile_boot = Some(boot.to_owned());
                continue;
            }
            let mut n = word.split(':').map(|v| v.parse::<u64>().ok());
            let (fsid, dev, ino) = (n.next()??, n.next()??, n.next()??);
            place.dirs.push(DirId { fsid, dev, ino });
        }
        Some(place)
    }

    /// Whether `data_dir` (this place's, and not found) was deleted, rather than is not there for
    /// now. Deleted when
    ///
    /// * it was on a file system in memory and the host has rebooted since (its files went then);
    /// * or its nearest ancestor that can be seen is still the very directory it was (the data dir
    ///   was deleted from it, however far up), and the topmost missing one was on that directory's
    ///   file system: a missing directory that was on another one was a mount point, which cannot be
    ///   deleted while mounted, so it was unmounted and may come back.
    ///
    /// A volume unmounted at its mount point leaves the mount point's directory (another directory,
    /// of the file system below), or no directory at all where the volume's root was: not deleted.
    /// The walk up to the nearest ancestor that can be seen is what frees the ranges of data dirs
    /// removed with a whole tree (test suites' temporary directories), which would otherwise be
    /// claimed for good. A directory that cannot be looked at (`EACCES`) tells nothing: not deleted.
    fn deleted(&self, data_dir: &Path) -> bool {
        if self
            .volatile_boot
            .as_ref()
            .is_some_and(|b| boot_id().is_some_and(|now| &now != b))
        {
            return true;
        }
        let mut paths: Vec<&Path> = data_dir.ancestors().collect();
        paths.reverse();
        for depth in (0..paths.len()).rev() {
            match DirId::of(paths[depth]) {
                Ok(now) => {
                    let Some(then) = self.dirs.get(depth) else {
                        // Not there when claimed (nor the data dir): nothing to tell it by.
                        return true;
                    };
                    return now.same(then)
                        && self
                            .dirs
                            .get(depth + 1)
                            .is_none_or(|child| child.same_fs(then));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => return false,
            }
        }
        false
    }
}

/// This boot's id; `None` without procfs.
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
}

/// The host-wide registry of id ranges.
#[derive(Debug)]
pub struct IdRegistry {
    dir: PathBuf,
    /// Host id intervals `[start, end)` used by accounts or delegated in `/etc/sub[ug]id`.
    taken_by_host: Vec<(u64, u64)>,
}

impl IdRegistry {
    /// Opens (creating, mode 0700) the registry in `dir`, and reads which host ids accounts and
    /// sub-id delegations use.
    pub fn open(dir: &Path) -> io::Result<IdRegistry> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut taken = Vec::new();
        for file in ["/etc/passwd", "/etc/group"] {
            taken.extend(account_ids(&fs::read_to_string(file).unwrap_or_default()));
        }
        for file in ["/etc/subuid", "/etc/subgid"] {
            taken.extend(sub_id_ranges(&fs::read_to_string(file).unwrap_or_default()));
        }
        Ok(IdRegistry {
            dir: dir.to_owned(),
            taken_by_host: taken,
        })
    }

    /// The registry's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn usable(&self, base: u32) -> bool {
        let (start, end) = (u64::from(base), u64::from(base) + u64::from(RANGE_SIZE));
        !self
            .taken_by_host
            .iter()
            .any(|&(s, e)| s < end && start < e)
    }

    /// Claims a free range for `sandbox_id` of the runtime whose data dir is `data_dir`; returns
    /// its base. When every range is taken, stale claims are reclaimed once and the search
    /// repeated; then `StorageFull` (ENOSPC).
    pub fn claim(&self, data_dir: &Path, sandbox_id: &str) -> io::Result<u32> {
        let data_dir = absolute(data_dir)?;
        let temp = self.write_temp(&data_dir, sandbox_id)?;
        let result = self.link_free(&temp).or_else(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) && !self.reclaim_stale()?.is_empty() {
                self.link_free(&temp)
            } else {
                Err(e)
            }
        });
        let _ = fs::remove_file(&temp);
        result
    }

    /// Links `temp` to the first free, usable range name, starting from a per-process rotating
    /// position so concurrent runtimes rarely try the same name.
    fn link_free(&self, temp: &Path) -> io::Result<u32> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let start = NEXT
            .load(Ordering::Relaxed)
            .wrapping_add(std::process::id());
        for i in 0..RANGES {
            let slot = start.wrapping_add(i) % RANGES;
            let base = FIRST_BASE + slot * RANGE_SIZE;
            if !self.usable(base) {
                continue;
            }
            match fs::hard_link(temp, self.path(base)) {
                Ok(()) => {
                    NEXT.store(
                        slot.wrapping_add(1).wrapping_sub(std::process::id()),
                        Ordering::Relaxed,
                    );
                    return Ok(base);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "all {RANGES} sandbox id ranges in {} are claimed by live sandboxes",
                self.dir.display()
            ),
        ))
    }

    fn write_temp(&self, data_dir: &Path, sandbox_id: &str) -> io::Result<PathBuf> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.dir.join(name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(render(data_dir, sandbox_id, &Place::of(data_dir))?.as_bytes())?;
        Ok(path)
    }

    fn path(&self, base: u32) -> PathBuf {
        self.dir.join(base.to_string())
    }

    /// Releases the range at `base` if `data_dir`'s runtime claimed it for `sandbox_id`; a claim
    /// held by anyone else is left alone. Idempotent.
    pub fn release(&self, base: u32, data_dir: &Path, sandbox_id: &str) -> io::Result<()> {
        let data_dir = absolute(data_dir)?;
        match self.read(base)? {
            Some(c) if c.data_dir == data_dir && c.sandbox_id == sandbox_id => {
                match fs::remove_file(self.path(base)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// Reads the claim of the range at `base`, if any: `None` also for a file that is no claim
    /// (unparseable, not UTF-8, a directory). Its range stays taken (its name is), and it is never
    /// freed; an error for it instead stopped [`claims`](Self::claims) and so
    /// [`reclaim_stale`](Self::reclaim_stale), which every runtime's start runs (review8).
    pub fn read(&self, base: u32) -> io::Result<Option<Claim>> {
        match fs::read_to_string(self.path(base)) {
            Ok(s) => Ok(parse(base, &s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e)
                if e.kind() == io::ErrorKind::InvalidData
                    || e.kind() == io::ErrorKind::IsADirectory =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Every claim in the registry.
    pub fn claims(&self) -> io::Result<Vec<Claim>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let name = e?.file_name();
            let Some(base) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(c) = self.read(base)? {
                out.push(c);
            }
        }
        out.sort_by_key(|c| c.base);
        Ok(out)
    }

    /// The claims made by the runtime whose data dir is `data_dir`.
    pub fn claims_of(&self, data_dir: &Path) -> io::Result<Vec<Claim>> {
        let data_dir = absolute(data_dir)?;
        Ok(self
            .claims()?
            .into_iter()
            .filter(|c| c.data_dir == data_dir)
            .collect())
    }

    /// Removes stale claims (data dir gone, no process with an id in the range) and leftover
    /// temporary files of dead processes; returns the bases freed. Serialised by `flock`.
    pub fn reclaim_stale(&self) -> io::Result<Vec<u32>> {
        let lock = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(LOCK_FILE))?;
        let _held =
            Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
        let in_use = ids_of_live_processes()?;
        let mut freed = Vec::new();
        for claim in self.claims()? {
            if claim.data_dir.exists() {
                continue;
            }
            // A claim from before claims recorded their place: its data dir not found is taken for
            // deleted, as it always was (one on a volume unmounted for now included).
            if claim
                .place
                .as_ref()
                .is_some_and(|p| !p.deleted(&claim.data_dir))
            {
                continue;
            }
            let (start, end) = (claim.base, claim.base + RANGE_SIZE);
            if in_use.iter().any(|id| (start..end).contains(id)) {
                continue;
            }
            // Under the lock nobody else removes claims, and a stale claim cannot change (its
            // owner is gone); re-read anyway so a file replaced meanwhile is never removed.
            if self.read(claim.base)?.as_ref() == Some(&claim) {
                fs::remove_file(self.path(claim.base))?;
                freed.push(claim.base);
            }
        }
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(TEMP_PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(freed)
    }
}

fn absolute(p: &Path) -> io::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn render(data_dir: &Path, sandbox_id: &str, place: &Place) -> io::Result<String> {
    let dir = data_dir
        .to_str()
        .filter(|s| !s.contains('\n'))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "data dir must be UTF-8 without newlines",
            )
        })?;
    if sandbox_id.contains('\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "sandbox id contains a newline",
        ));
    }
    // The place is a fourth line: runtimes from before it read the first three and ignore the rest
    // (`parse`), so they still read, release and reclaim (by their rule) these claims.
    Ok(format!(
        "{MAGIC}\ndata_dir={dir}\nsandbox={sandbox_id}\n{}\n",
        place.render()
    ))
}

fn parse(base: u32, s: &str) -> Option<Claim> {
    let mut lines = s.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let data_dir = lines.next()?.strip_prefix("data_dir=")?;
    let sandbox_id = lines.next()?.strip_prefix("sandbox=")?;
    Some(Claim {
        base,
        data_dir: PathBuf::from(data_dir),
        sandbox_id: sandbox_id.to_owned(),
        place: lines.next().and_then(Place::parse),
    })
}

/// `[id, id + 1)` for every numeric id (third field) of a passwd or group file.
fn account_ids(text: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    text.lines()
        .filter_map(|l| l.split(':').nth(2)?.parse::<u64>().ok())
        .map(|id| (id, id + 1))
}

/// `[start, start + count)` for every `name:start:count` line of `/etc/subuid` or `/etc/subgid`.
fn sub_id_ranges(text: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    text.lines().filter_map(|l| {
        let mut f = l.split(':').skip(1);
        let start = f.next()?.trim().parse::<u64>().ok()?;
        let count = f.next()?.trim().parse::<u64>().ok()?;
        Some((start, start + count))
    })
}

/// Every real, effective, saved and filesystem uid and gid of every process on the host, zombies
/// left out.
fn ids_of_live_processes() -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for e in fs::read_dir("/proc")? {
        let e = e?;
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue; // exited meanwhile
        };
        if zombie(&status) {
            continue;
        }
        for line in status.lines() {
            if let Some(rest) = line
                .strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
            {
                ids.extend(
                    rest.split_whitespace()
                        .filter_map(|v| v.parse::<u32>().ok()),
                );
            }
        }
    }
    Ok(ids)
}

/// Whether a `/proc/<pid>/status` is a process that has exited and waits to be reaped: it holds no
/// file, mapping or task its ids could act through any more, only its entry. A sandbox's init is one
/// for a while after a runtime's sweep kills it (its runtime gone, PID 1 reaps it, when it gets to
/// it), and counting it kept that sandbox's range claimed until the next runtime's start. A leader
/// that exited before its threads is `Z` too, but its other threads still run (`Threads:` above 1).
fn zombie(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    field("State:").is_some_and(|s| s.starts_with('Z'))
        && field("Threads:")
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (tempfile::TempDir, IdRegistry) {
        let t = tempfile::tempdir().unwrap();
        let r = IdRegistry::open(&t.path().join("ids")).unwrap();
        (t, r)
    }

    #[test]
    fn ranges_sit_between_systemds_container_and_foreign_ranges() {
        assert_eq!(FIRST_BASE, 1_879_048_192);
        assert_eq!(RANGES, 4094);
        assert!(u64::from(FIRST_BASE) + u64::from(RANGES) * u64::from(RANGE_SIZE) <= 0x7FFE_0000);
    }

    #[test]
    fn claims_are_exclusive_and_released_only_by_their_owner() {
        let (t, r) = registry();
        let data = t.path().join("data");
        fs::create_dir(&data).unwrap();
        let a = r.claim(&data, "a").unwrap();
        let b = r.claim(&data, "b").unwrap();
        assert_ne!(a, b);
        assert_eq!((a - FIRST_BASE) % RANGE_SIZE, 0);
        assert_eq!(r.read(a).unwrap().unwrap().sandbox_id, "a");
        // Someone else's release leaves the claim alone.
        r.release(a, &data, "b").unwrap();
        assert!(r.read(a).unwrap().is_some());
        r.release(a, &data, "a").unwrap();
        assert!(r.read(a).unwrap().is_none());
        r.release(a, &data, "a").unwrap(); // idempotent
        assert_eq!(r.claims_of(&data).unwrap().len(), 1);
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(r.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.starts_with(TEMP_PREFIX)),
            "{names:?}"
        );
    }

    #[test]
    fn concurrent_claims_never_share_a_range() {
        let (t, r) = registry();
        let r = std::sync::Arc::new(r);
        let data = t.path().to_owned();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (r, data) = (r.clone(), data.clone());
                std::thread::spawn(move || {
                    (0..50)
                        .map(|j| r.claim(&data, &format!("s{i}-{j}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u32> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn stale_claims_are_reclaimed_only_when_their_data_dir_is_gone() {
        let (t, r) = registry();
        let live = t.path().join("live");
        let gone = t.path().join("gone");
        fs::create_dir(&live).unwrap();
        fs::create_dir(&gone).unwrap();
        let kept = r.claim(&live, "x").unwrap();
        let stale = r.claim(&gone, "y").unwrap();
        fs::remove_dir(&gone).unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), vec![stale]);
        assert!(r.read(kept).unwrap().is_some());
        assert!(r.read(stale).unwrap().is_none());
    }

    /// A registry whose claims go to the last `n` ranges: the host's runtimes, whose processes have
    /// ids of their ranges (which keeps a stale claim), rarely have those.
    fn registry_at_the_top(n: u32) -> (tempfile::TempDir, IdRegistry) {
        let (t, mut r) = registry();
        r.taken_by_host = vec![(
            u64::from(FIRST_BASE),
            u64::from(FIRST_BASE) + u64::from((RANGES - n) * RANGE_SIZE),
        )];
        (t, r)
    }

    #[test]
    fn a_data_dir_whose_volume_is_away_keeps_its_claim_and_a_deleted_one_is_freed() {
        // No mount needed: a volume away is a directory in its place that is not the one the data
        // dir was in (what an unmounted volume leaves: its mount point's own directory).
        let (t, r) = registry_at_the_top(3);
        let (volume, away) = (t.path().join("volume"), t.path().join("away"));
        let data = volume.join("data");
        fs::create_dir_all(&data).unwrap();
        let tree = t.path().join("tree");
        let deep = tree.join("a/b/data");
        fs::create_dir_all(&deep).unwrap();
        let on_volume = r.claim(&data, "v").unwrap();
        let in_tree = r.claim(&deep, "t").unwrap();
        let place = r.read(on_volume).unwrap().unwrap().place.unwrap();
        assert_eq!(place.dirs.len(), data.ancestors().count());

        fs::rename(&volume, &away).unwrap();
        fs::create_dir(&volume).unwrap();
        // The whole tree the other data dir was in is deleted: its nearest ancestor left (the
        // temporary directory) is the one it was in, so it is freed, though its parent is gone.
        fs::remove_dir_all(&tree).unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), vec![in_tree]);
        assert!(r.read(on_volume).unwrap().is_some());

        // The volume back, the data dir deleted from it: freed.
        fs::remove_dir(&volume).unwrap();
        fs::rename(&away, &volume).unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), Vec::<u32>::new());
        fs::remove_dir(&data).unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), vec![on_volume]);
    }

    #[test]
    fn a_claim_from_before_claims_recorded_their_place_is_freed_as_before() {
        let (t, r) = registry_at_the_top(1);
        let gone = t.path().join("volume/data");
        let base = FIRST_BASE + (RANGES - 1) * RANGE_SIZE;
        fs::write(
            r.dir().join(base.to_string()),
            format!("{MAGIC}\ndata_dir={}\nsandbox=old\n", gone.display()),
        )
        .unwrap();
        assert_eq!(r.read(base).unwrap().unwrap().place, None);
        assert_eq!(r.reclaim_stale().unwrap(), vec![base]);
    }

    #[test]
    fn claims_with_a_place_keep_the_three_lines_earlier_runtimes_read() {
        let (t, r) = registry();
        let base = r.claim(t.path(), "s").unwrap();
        let text = fs::read_to_string(r.dir().join(base.to_string())).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(
            lines[..3],
            [
                MAGIC,
                &format!("data_dir={}", t.path().display()),
                "sandbox=s"
            ]
        );
        // The earlier parser: the magic, then exactly two lines, the rest ignored.
        let mut old = text.lines();
        assert_eq!(old.next(), Some(MAGIC));
        assert!(old.next().unwrap().starts_with("data_dir="));
        assert!(old.next().unwrap().starts_with("sandbox="));
        assert_eq!(Place::parse(lines[3]), r.read(base).unwrap().unwrap().place);
    }

    #[test]
    fn a_data_dir_in_memory_is_deleted_once_the_host_has_rebooted() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("volume/data");
        fs::create_dir_all(&data).unwrap();
        let mut place = Place::of(&data);
        // Its volume away (another directory in its place): not deleted, in this boot or another,
        // unless its files lived in memory and that memory is gone.
        fs::rename(t.path().join("volume"), t.path().join("away")).unwrap();
        fs::create_dir(t.path().join("volume")).unwrap();
        place.volatile_boot = None;
        assert!(!place.deleted(&data));
        place.volatile_boot = boot_id();
        assert!(!place.deleted(&data));
        place.volatile_boot = Some("an-earlier-boot".to_owned());
        assert!(place.deleted(&data));
    }

    #[test]
    fn claims_crafted_or_corrupted_are_read_without_a_panic_and_freed_only_by_the_rules() {
        // review8: a claim file is root's, but a disk that lost a write or a hand that edited one
        // must not stop every runtime's start (`reclaim_stale` runs at each) nor free a range
        // that its rules keep.
        let (t, r) = registry_at_the_top(8);
        let gone = t.path().join("gone/data");
        let base = |n: u32| FIRST_BASE + (RANGES - 8 + n) * RANGE_SIZE;
        let claim = |n: u32, dir: &str, place: &str| {
            fs::write(
                r.dir().join(base(n).to_string()),
                format!("{MAGIC}\ndata_dir={dir}\nsandbox=s{n}\n{place}\n"),
            )
            .unwrap();
        };
        let dir = gone.to_str().unwrap();
        // A place line that does not parse is no place: the claim is judged as one from before
        // claims recorded it (data dir not found: freed), whatever is wrong with it.
        claim(0, dir, "place=garbage");
        claim(1, dir, "place=1:2");
        claim(2, dir, "place=99999999999999999999999:1:1");
        // A place that parses but is not where the data dir was: kept (its ancestors are not the
        // directories recorded), however long.
        claim(
            3,
            dir,
            &format!("place={}", vec!["1:1:1"; 10_000].join(" ")),
        );
        // A relative data dir (no runtime writes one): nothing of it is found, nothing told.
        claim(4, "relative/data", "place=1:1:1 1:1:2");
        // Bytes that are not UTF-8, and a directory where a claim would be.
        fs::write(r.dir().join(base(5).to_string()), b"\xff\xfe\n\x00").unwrap();
        fs::create_dir(r.dir().join(base(6).to_string())).unwrap();

        let read: Vec<u32> = r.claims().unwrap().iter().map(|c| c.base).collect();
        assert_eq!(read, (0..5).map(base).collect::<Vec<_>>());
        assert_eq!(r.reclaim_stale().unwrap(), vec![base(0), base(1), base(2)]);
        assert!(r.read(base(3)).unwrap().is_some());
        assert!(r.read(base(4)).unwrap().is_some());
        // The unreadable ones are left as they are, and their ranges are not handed out.
        assert!(r.dir().join(base(5).to_string()).is_file());
        assert!(r.dir().join(base(6).to_string()).is_dir());
        let claimed: Vec<u32> = (0..8)
            .map(|n| r.claim(t.path(), &format!("new{n}")).unwrap_or(0))
            .collect();
        assert!(
            !claimed.contains(&base(5)) && !claimed.contains(&base(6)),
            "{claimed:?}"
        );
    }

    /// Mounts made by a test, unmounted (lazily, last first) when it ends, however it ends.
    struct Mounts(Vec<PathBuf>);

    impl Mounts {
        fn mount(&mut self, source: &Path, target: &Path, fstype: Option<&str>) {
            use nix::mount::{MsFlags, mount};
            let flags = if fstype.is_none() {
                MsFlags::MS_BIND
            } else {
                MsFlags::empty()
            };
            mount(Some(source), target, fstype, flags, Some("size=1m")).unwrap();
            self.0.push(target.to_owned());
        }

        fn umount(&mut self, target: &Path) {
            nix::mount::umount(target).unwrap();
            self.0.retain(|p| p != target);
        }
    }

    impl Drop for Mounts {
        fn drop(&mut self) {
            for target in self.0.iter().rev() {
                let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    #[test]
    fn a_data_dir_on_an_unmounted_volume_keeps_its_claim() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (mounts)");
            return;
        }
        let (t, r) = registry_at_the_top(2);
        let (backing, volume, root) = (
            t.path().join("backing"),
            t.path().join("volume"),
            t.path().join("root"),
        );
        for dir in [&backing, &volume, &root] {
            fs::create_dir(dir).unwrap();
        }
        let mut mounts = Mounts(Vec::new());
        // A bind mount of a directory of the same file system: only the inode tells the volume's
        // root from its mount point's directory. And a tmpfs that is the data dir itself.
        mounts.mount(&backing, &volume, None);
        mounts.mount(Path::new("sandboxd-test"), &root, Some("tmpfs"));
        let data = volume.join("data");
        fs::create_dir(&data).unwrap();
        let on_volume = r.claim(&data, "v").unwrap();
        let at_root = r.claim(&root, "r").unwrap();

        mounts.umount(&volume);
        mounts.umount(&root);
        // The mount point's directory is gone too: the data dir was another file system's root.
        fs::remove_dir(&root).unwrap();
        assert!(!data.exists() && volume.is_dir());
        assert_eq!(r.reclaim_stale().unwrap(), Vec::<u32>::new());
        assert!(r.read(on_volume).unwrap().is_some());
        assert!(r.read(at_root).unwrap().is_some());

        mounts.mount(&backing, &volume, None);
        fs::remove_dir(&data).unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), vec![on_volume]);
        mounts.umount(&volume);
    }

    #[test]
    fn a_stale_claim_waits_for_its_processes_but_not_for_their_zombies() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a process with an id of the range)");
            return;
        }
        use std::os::unix::process::CommandExt;
        use std::process::{Command, Stdio};
        let (t, mut r) = registry();
        // The last range: the host's runtimes claim from the first, and a process of theirs with an
        // id of this test's range would keep its claim.
        r.taken_by_host = vec![(
            u64::from(FIRST_BASE),
            u64::from(FIRST_BASE) + u64::from((RANGES - 1) * RANGE_SIZE),
        )];
        let gone = t.path().join("gone");
        fs::create_dir(&gone).unwrap();
        let stale = r.claim(&gone, "z").unwrap();
        assert_eq!(stale, FIRST_BASE + (RANGES - 1) * RANGE_SIZE);
        fs::remove_dir(&gone).unwrap();
        let mut child = Command::new("sleep")
            .arg("60")
            .uid(stale + 1000)
            .gid(stale + 1000)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        assert_eq!(r.reclaim_stale().unwrap(), Vec::<u32>::new());
        assert!(r.read(stale).unwrap().is_some());
        // Killed and not yet reaped (this process waits for it only below): a zombie.
        child.kill().unwrap();
        let status = format!("/proc/{}/status", child.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !zombie(&fs::read_to_string(&status).unwrap()) {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never became a zombie"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let freed = r.reclaim_stale();
        child.wait().unwrap();
        assert_eq!(freed.unwrap(), vec![stale]);
        assert!(r.read(stale).unwrap().is_none());
    }

    #[test]
    fn a_zombie_is_told_from_a_leader_whose_threads_run() {
        assert!(zombie("Name:\tsleep\nState:\tZ (zombie)\nThreads:\t1\n"));
        assert!(!zombie("Name:\tsleep\nState:\tZ (zombie)\nThreads:\t3\n"));
        assert!(!zombie("Name:\tsleep\nState:\tS (sleeping)\nThreads:\t1\n"));
        assert!(!zombie("State:\tZ (zombie)\n"));
    }

    #[test]
    fn host_accounts_and_sub_ids_are_avoided() {
        let (_t, mut r) = registry();
        r.taken_by_host = sub_id_ranges(&format!("podman:{}:65536\n", FIRST_BASE + 5)).collect();
        r.taken_by_host.extend(account_ids(&format!(
            "x:x:{}:1::/:/bin/sh\n",
            FIRST_BASE + RANGE_SIZE + 7
        )));
        assert!(!r.usable(FIRST_BASE));
        assert!(!r.usable(FIRST_BASE + RANGE_SIZE));
        assert!(r.usable(FIRST_BASE + 2 * RANGE_SIZE));
    }
}
