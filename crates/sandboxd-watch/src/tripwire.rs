//! A tripwire: an inotify instance whose only use is to become readable once anything it watches
//! has changed. The agent keeps its account lookups (`/etc/passwd`, `/etc/group`) for as long as
//! the tripwire is quiet, which a `poll(2)` with no timeout tells in one syscall, where asking the
//! files themselves took a `stat(2)` each (a path walk: 10-14 µs each on the CI VM, per RPC).
//!
//! Nothing here reads the events: the caller throws the instance away once it is readable and
//! makes a new one when it next needs it, so no event's meaning (a rename, a watch gone with its
//! inode) has to be followed. The kernel queues an event before the modifying syscall returns, so
//! a change that finished before the caller polls is seen by that poll.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use inotify::{Inotify, WatchMask};

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

/// A new non-blocking, close-on-exec inotify instance with a watch on each of `paths` (directories
/// see their entries change; files their content). Fails with the first path that cannot be
/// watched (`ENOENT`, `EACCES`, `ENOSPC` at `max_user_watches`, `EMFILE` at `max_user_instances`).
pub fn tripwire<P: AsRef<Path>>(paths: &[P]) -> io::Result<OwnedFd> {
    let inotify = Inotify::init()?;
    let mut watches = inotify.watches();
    for path in paths {
        watches.add(path, TRIP_EVENTS)?;
    }
    Ok(OwnedFd::from(inotify))
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::fd::AsFd;

    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

    use super::*;

    fn tripped(fd: &OwnedFd) -> bool {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
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
            let fd = tripwire(&[dir.path(), file.as_path()]).unwrap();
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
        let fd = tripwire(&[dir.path(), file.as_path()]).unwrap();
        assert!(!tripped(&fd));
        fs::write(&link, "b\n").unwrap();
        assert!(tripped(&fd));
    }

    #[test]
    fn a_missing_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = tripwire(&[dir.path().join("missing")]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_enoent()));
    }

    fn libc_enoent() -> i32 {
        nix::errno::Errno::ENOENT as i32
    }
}
