//! A tripwire: an inotify instance whose only use is to become readable once anything it watches
//! has changed. The agent keeps its account lookups (`/etc/passwd`, `/etc/group`) for as long as
//! the tripwire is quiet, which a `poll(2)` with no timeout tells in one syscall, where asking the
//! files themselves took a `stat(2)` each (a path walk: 10-14 µs each on the CI VM, per RPC).
//!
//! Nothing here follows an event's meaning (a rename, a watch gone with its inode): once it is
//! readable the caller re-reads what it guards and calls [`Tripwire::rearm`], which discards the
//! queued events and watches the paths again, on whatever inodes they name now. The kernel queues
//! an event before the modifying syscall returns, so a change that finished before the caller
//! polls is seen by that poll.
//!
//! Re-armed in place rather than replaced: closing an inotify instance that holds watches waits
//! for an SRCU grace period (`fsnotify_destroy_group`), 1-50 ms measured on the CI VM's 6.18
//! kernel under load, blocking the caller's thread (the agent's event loop) on every trip, where
//! `rearm` takes a few `inotify_add_watch` calls.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;

use inotify::{Inotify, WatchDescriptor, WatchMask};

/// Every change to a watched directory's entries or to a watched file's content, metadata or
/// name. `DONT_FOLLOW`: a symlink is watched as itself, never its target (the caller does not
/// rely on a tripwire where a path it cares about is a symlink).
const TRIP_EVENTS: WatchMask = WatchMask::MODIFY
    .union(WatchMask::ATTRIB)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::DONT_FOLLOW);

/// The most reads of 16 KiB [`Tripwire::rearm`] makes to empty the queue: more than a full queue
/// at the default `max_queued_events` (16384 events of 16-48 bytes each) takes.
const DRAIN_READS: usize = 64;

/// A non-blocking, close-on-exec inotify instance with a watch on each of a list of paths
/// (directories see their entries change; files their content).
pub struct Tripwire {
    inotify: Inotify,
    watched: Vec<WatchDescriptor>,
}

impl Tripwire {
    /// A tripwire on `paths`. Fails with the first path that cannot be watched (`ENOENT`,
    /// `EACCES`, `ENOSPC` at `max_user_watches`; `EMFILE` at `max_user_instances`).
    pub fn new<P: AsRef<Path>>(paths: &[P]) -> io::Result<Self> {
        let mut wire = Self {
            inotify: Inotify::init()?,
            watched: Vec::new(),
        };
        wire.rearm(paths)?;
        Ok(wire)
    }

    /// Quiet again, watching `paths` as they are now: each is watched (the same watch for an
    /// inode already watched, a new one for a path that names another inode since), the watches
    /// on inodes no path names any more are removed (an old `/etc/passwd` kept alive by a hard
    /// link would otherwise keep its watch, one more per replacement, up to `max_user_watches`),
    /// and then the queued events are discarded. Discarding them last is safe for a caller that
    /// re-reads after this returns: a change whose event is discarded had finished before, and
    /// every later one queues a new event. Errors as [`Tripwire::new`]'s; the tripwire is then
    /// not to be trusted, but may be re-armed (the watches it did add are removed then if unneeded).
    pub fn rearm<P: AsRef<Path>>(&mut self, paths: &[P]) -> io::Result<()> {
        let mut watches = self.inotify.watches();
        let mut now = Vec::with_capacity(paths.len());
        for path in paths {
            match watches.add(path, TRIP_EVENTS) {
                Ok(wd) => now.push(wd),
                Err(err) => {
                    // Kept track of, for the next rearm to remove what it does not need.
                    for wd in now {
                        if !self.watched.contains(&wd) {
                            self.watched.push(wd);
                        }
                    }
                    return Err(err);
                }
            }
        }
        for old in std::mem::take(&mut self.watched) {
            if !now.contains(&old) {
                // EINVAL: the kernel removed it already, with its inode.
                let _ = watches.remove(old);
            }
        }
        self.watched = now;
        // Bounded: writers in the sandbox could refill the queue as fast as it is read. Events
        // left behind only make the next poll trip again, and the caller re-read once more.
        let mut buffer = [0; 16 * 1024];
        for _ in 0..DRAIN_READS {
            match self.inotify.read_events(&mut buffer) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

impl AsFd for Tripwire {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsFd;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    use super::*;

    fn tripped(wire: &Tripwire) -> bool {
        let mut fds = [PollFd::new(wire.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn quiet_until_a_watched_path_changes_then_stays_tripped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        fs::write(&file, "a\n").unwrap();
        let other = tempfile::tempdir().unwrap();

        // An edit in place, a rename over the file, a new entry, an attribute change.
        type Change = fn(&Path, &Path);
        let changes: [(&str, Change); 4] = [
            ("write", |file, _| fs::write(file, "a\nb\n").unwrap()),
            ("rename over", |file, dir| {
                let new = dir.join("passwd+");
                fs::write(&new, "c\n").unwrap();
                fs::rename(&new, file).unwrap();
            }),
            ("new entry", |_, dir| {
                fs::write(dir.join("group"), "g\n").unwrap()
            }),
            ("chmod", |file, _| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
            }),
        ];
        for (what, change) in changes {
            let fd = Tripwire::new(&[dir.path(), file.as_path()]).unwrap();
            fs::write(other.path().join("elsewhere"), "x").unwrap();
            let _ = fs::read(&file).unwrap(); // reading changes nothing
            assert!(!tripped(&fd), "{what}: tripped before any change");
            change(&file, dir.path());
            assert!(tripped(&fd), "{what}: not tripped by the change");
            assert!(tripped(&fd), "{what}: a tripwire stays tripped");
        }
    }

    #[test]
    fn a_write_through_another_hard_link_trips_the_file_watch() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        fs::write(&file, "a\n").unwrap();
        let link = elsewhere.path().join("link");
        fs::hard_link(&file, &link).unwrap();
        let fd = Tripwire::new(&[dir.path(), file.as_path()]).unwrap();
        assert!(!tripped(&fd));
        fs::write(&link, "b\n").unwrap();
        assert!(tripped(&fd));
    }

    #[test]
    fn a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tripwire::new(&[dir.path().join("missing")]).err().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc_enoent()));
    }

    #[test]
    fn rearmed_it_watches_the_new_inode_and_forgets_the_replaced_one() {
        let dir = tempfile::tempdir().unwrap();
        let keep = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        fs::write(&file, "a\n").unwrap();
        let mut wire = Tripwire::new(&[dir.path(), file.as_path()]).unwrap();
        for round in 0..5 {
            // The old inode stays alive through a hard link elsewhere, as a hostile root can keep it.
            let old = keep.path().join(format!("old{round}"));
            fs::hard_link(&file, &old).unwrap();
            let new = dir.path().join("passwd+");
            fs::write(&new, format!("{round}\n")).unwrap();
            fs::rename(&new, &file).unwrap();
            assert!(tripped(&wire), "round {round}: the rename did not trip it");
            wire.rearm(&[dir.path(), file.as_path()]).unwrap();
            assert!(!tripped(&wire), "round {round}: still tripped after rearm");
            fs::write(&old, "stale\n").unwrap();
            assert!(
                !tripped(&wire),
                "round {round}: the replaced inode is still watched"
            );
        }
        assert_eq!(wire.watched.len(), 2);
        fs::write(&file, "in place\n").unwrap();
        assert!(tripped(&wire), "the current inode is not watched");
    }

    #[test]
    fn a_failed_rearm_leaves_no_watch_the_next_one_does_not_ask_for() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let file = dir.path().join("passwd");
        let stray = other.path().join("stray");
        fs::write(&file, "a\n").unwrap();
        fs::write(&stray, "s\n").unwrap();
        let mut wire = Tripwire::new(&[dir.path(), file.as_path()]).unwrap();
        let missing = dir.path().join("missing");
        assert!(
            wire.rearm(&[dir.path(), stray.as_path(), missing.as_path()])
                .is_err()
        );
        wire.rearm(&[dir.path(), file.as_path()]).unwrap();
        assert!(!tripped(&wire));
        fs::write(&stray, "t\n").unwrap();
        assert!(
            !tripped(&wire),
            "the failed rearm's watch on stray was left behind"
        );
        fs::write(&file, "b\n").unwrap();
        assert!(tripped(&wire));
    }

    fn libc_enoent() -> i32 {
        nix::errno::Errno::ENOENT as i32
    }
}
