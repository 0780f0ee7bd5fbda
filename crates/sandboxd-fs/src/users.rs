//! Owner and group names of files: `getpwuid_r(3)` / `getgrgid_r(3)`, cached.
//!
//! A listing of a large directory asks for the same few ids thousands of times, and each lookup
//! may read `/etc/passwd` or `/etc/group` through NSS. Names are therefore cached per id. Users
//! and groups are created inside a running sandbox (`useradd`), so a cache is dropped when its
//! database file changes; that is checked at most once per [`RECHECK_INTERVAL`]. An id without an
//! entry is shown as its number, as envd does (Go's `user.LookupId` failing).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::unistd::{Gid, Group, Uid, User};

/// How long a cache is trusted before the database file's identity is compared again. One second
/// makes a freshly created user show up by name almost at once and costs one `stat` per second.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The file whose changes invalidate the user-name cache.
const PASSWD: &str = "/etc/passwd";
/// The file whose changes invalidate the group-name cache.
const GROUP: &str = "/etc/group";

/// Identity of a database file: (device, inode, size, mtime seconds, mtime nanoseconds). Tools
/// such as `useradd` replace the file by rename, which changes the inode; editors may rewrite it
/// in place, which changes the size or mtime.
type Stamp = Option<(u64, u64, u64, i64, i64)>;

/// Cached names for one database.
struct NameCache {
    /// Names by id, valid for the file identified by `stamp`.
    names: BTreeMap<u32, String>,
    /// Identity of the database file when `names` was last known to be valid.
    stamp: Stamp,
    /// Whether the database file is missing or a regular file. Anything else there (a FIFO the
    /// sandbox's root left, which NSS would open and wait on for ever) is not read: ids show as
    /// numbers, as for a missing file.
    plain: bool,
    /// When `stamp` was last compared with the file; `None` before the first lookup.
    checked: Option<Instant>,
}

impl NameCache {
    const fn new() -> Self {
        Self {
            names: BTreeMap::new(),
            stamp: None,
            plain: true,
            checked: None,
        }
    }

    /// Compares `db` with the cache's stamp, at most once per [`RECHECK_INTERVAL`], dropping the
    /// names when it changed.
    fn refresh(&mut self, db: &Path) {
        let now = Instant::now();
        if self
            .checked
            .is_none_or(|at| now.duration_since(at) >= RECHECK_INTERVAL)
        {
            let (stamp, plain) = stamp(db);
            if stamp != self.stamp || plain != self.plain {
                self.names.clear();
                self.stamp = stamp;
                self.plain = plain;
            }
            self.checked = Some(now);
        }
    }
}

fn stamp(db: &Path) -> (Stamp, bool) {
    match fs::metadata(db) {
        Ok(m) => (
            Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec())),
            m.file_type().is_file(),
        ),
        Err(_) => (None, true),
    }
}

/// The name of `id` in `cache`, validated against `db` first; `lookup` on a miss. The lookup runs
/// without the cache's lock held: it may read the database through NSS, and one slow or stuck
/// lookup must not stop every other listing's.
fn name_of(
    cache: &Mutex<NameCache>,
    id: u32,
    db: &Path,
    lookup: impl FnOnce(u32) -> Option<String>,
) -> String {
    let stamp = {
        let mut c = lock(cache);
        c.refresh(db);
        if let Some(name) = c.names.get(&id) {
            return name.clone();
        }
        if !c.plain {
            return id.to_string();
        }
        c.stamp
    };
    let name = lookup(id).unwrap_or_else(|| id.to_string());
    let mut c = lock(cache);
    if c.stamp == stamp {
        c.names.entry(id).or_insert_with(|| name.clone());
    }
    name
}

/// User names by uid. Invariant: every name is what `getpwuid_r` returned (or the numeric uid)
/// while `/etc/passwd` had the cache's stamp, at most [`RECHECK_INTERVAL`] before it was last checked.
static USERS: Mutex<NameCache> = Mutex::new(NameCache::new());
/// Group names by gid, with the same invariant for `getgrgid_r` and `/etc/group`.
static GROUPS: Mutex<NameCache> = Mutex::new(NameCache::new());

fn lock(cache: &Mutex<NameCache>) -> MutexGuard<'_, NameCache> {
    // A panic while holding the lock leaves at worst a stale name: keep going.
    cache.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The name of user `uid`, or the uid as a decimal string when it has no entry.
pub fn user_name(uid: u32) -> String {
    name_of(&USERS, uid, Path::new(PASSWD), |id| {
        User::from_uid(Uid::from_raw(id))
            .ok()
            .flatten()
            .map(|u| u.name)
    })
}

/// The name of group `gid`, or the gid as a decimal string when it has no entry.
pub fn group_name(gid: u32) -> String {
    name_of(&GROUPS, gid, Path::new(GROUP), |id| {
        Group::from_gid(Gid::from_raw(id))
            .ok()
            .flatten()
            .map(|g| g.name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_a_name_and_unknown_ids_are_numeric() {
        assert_eq!(user_name(0), "root");
        assert_eq!(group_name(0), "root");
        assert_eq!(user_name(3_999_999_999), "3999999999");
        assert_eq!(group_name(3_999_999_999), "3999999999");
    }

    #[test]
    fn cache_is_dropped_when_the_database_changes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("passwd");
        fs::write(&db, "a").unwrap();
        let cache = Mutex::new(NameCache::new());
        assert_eq!(name_of(&cache, 7, &db, |_| None), "7");
        // Cached: the lookup is not called again.
        assert_eq!(name_of(&cache, 7, &db, |_| Some("seven".into())), "7");
        fs::write(&db, "ab").unwrap();
        lock(&cache).checked = None; // pretend the recheck interval has passed
        assert_eq!(name_of(&cache, 7, &db, |_| Some("seven".into())), "seven");
    }

    #[test]
    fn a_database_that_is_not_a_regular_file_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("passwd");
        nix::unistd::mkfifo(&db, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let cache = Mutex::new(NameCache::new());
        let looked_up = |_| -> Option<String> { panic!("a FIFO's lookup would wait for ever") };
        assert_eq!(name_of(&cache, 7, &db, looked_up), "7");
        fs::remove_file(&db).unwrap();
        fs::write(&db, "a").unwrap();
        lock(&cache).checked = None;
        assert_eq!(name_of(&cache, 7, &db, |_| Some("seven".into())), "seven");
    }
}
