//! End-to-end tests on real temporary directories and a real inotify instance.
//!
//! Every test holds [`KERNEL_LIMITS`] for reading while it has a watcher; the one test that
//! lowers `/proc/sys/fs/inotify/max_queued_events` holds it for writing, so that no other test
//! creates an instance while the lowered value is in force.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use sandboxd_watch::{Event, EventKind, Item, ROOT_NAME, WatchError, Watcher};

static KERNEL_LIMITS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    KERNEL_LIMITS.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    KERNEL_LIMITS.write().unwrap_or_else(|e| e.into_inner())
}

/// How long a test waits for events it expects before failing.
const EXPECT_WITHIN: Duration = Duration::from_secs(10);
/// How long a test listens after the expected events, to catch duplicates and strays.
const SETTLE: Duration = Duration::from_millis(50);

fn ev(kind: EventKind, name: &str) -> Event {
    Event {
        name: name.to_string(),
        kind,
    }
}

fn events(items: &[Item]) -> Vec<Event> {
    items
        .iter()
        .filter_map(|item| item.as_event().cloned())
        .collect()
}

/// Collects items until `done` says so, then for [`SETTLE`] more.
fn collect_until(watcher: &mut Watcher, done: impl Fn(&[Item]) -> bool) -> Vec<Item> {
    collect_more(watcher, Vec::new(), done)
}

/// Like [`collect_until`], after `items` that were collected already.
fn collect_more(
    watcher: &mut Watcher,
    mut items: Vec<Item>,
    done: impl Fn(&[Item]) -> bool,
) -> Vec<Item> {
    let deadline = Instant::now() + EXPECT_WITHIN;
    while !done(&items) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; got so far: {items:#?}");
        items.extend(watcher.wait(Some(left)).expect("wait"));
        if watcher.is_closed() {
            break;
        }
    }
    items.extend(settle(watcher));
    items
}

/// Reads until nothing arrives for [`SETTLE`].
fn settle(watcher: &mut Watcher) -> Vec<Item> {
    let mut items = Vec::new();
    loop {
        let batch = watcher.wait(Some(SETTLE)).expect("wait");
        if batch.is_empty() {
            return items;
        }
        items.extend(batch);
    }
}

fn has_events(expected: &[Event]) -> impl Fn(&[Item]) -> bool + '_ {
    move |items| {
        let got = events(items);
        expected.iter().all(|e| got.contains(e))
    }
}

fn create_count(items: &[Item]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in events(items) {
        if event.kind == EventKind::Create {
            *counts.entry(event.name).or_insert(0) += 1;
        }
    }
    counts
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn missing_root_is_not_found_and_a_file_is_not_a_directory() {
    let _guard = shared();
    let dir = tempdir();
    let missing = dir.path().join("missing");
    let err = Watcher::new(&missing, true).unwrap_err();
    assert!(
        matches!(&err, WatchError::NotFound(p) if p == &missing),
        "{err:?}"
    );
    assert_eq!(err.raw_os_error(), Some(2));
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::NotFound
    );

    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = Watcher::new(&file, false).unwrap_err();
    assert!(
        matches!(&err, WatchError::NotADirectory(p) if p == &file),
        "{err:?}"
    );
    assert_eq!(err.raw_os_error(), Some(20));

    assert_eq!(WatchError::WatchLimit.raw_os_error(), Some(28));
    assert!(
        WatchError::WatchLimit
            .to_string()
            .contains("fs.inotify.max_user_watches")
    );
    assert_eq!(WatchError::InstanceLimit.raw_os_error(), Some(24));
    assert!(
        WatchError::InstanceLimit
            .to_string()
            .contains("fs.inotify.max_user_instances")
    );
    assert!(WatchError::WatchLimit.is_resource_exhausted());
}

#[test]
fn ops_map_to_envd_events_in_order() {
    let _guard = shared();
    let dir = tempdir();
    fs::create_dir(dir.path().join("sub")).unwrap();
    let mut watcher = Watcher::new(dir.path(), true).unwrap();
    let root = dir.path();

    for base in ["", "sub/"] {
        let a = root.join(format!("{base}a.txt"));
        let b = root.join(format!("{base}b.txt"));
        let mut file = fs::File::create(&a).unwrap();
        file.write_all(b"hello").unwrap();
        drop(file);
        fs::set_permissions(&a, fs::Permissions::from_mode(0o600)).unwrap();
        fs::rename(&a, &b).unwrap();
        fs::remove_file(&b).unwrap();

        let expected = [
            ev(EventKind::Create, &format!("{base}a.txt")),
            ev(EventKind::Write, &format!("{base}a.txt")),
            ev(EventKind::Chmod, &format!("{base}a.txt")),
            ev(EventKind::Rename, &format!("{base}a.txt")),
            ev(EventKind::Create, &format!("{base}b.txt")),
            ev(EventKind::Remove, &format!("{base}b.txt")),
        ];
        let items = collect_until(&mut watcher, has_events(&expected));
        assert_eq!(events(&items), expected);
    }

    // The root's own attribute change is reported as ".".
    fs::set_permissions(root, fs::Permissions::from_mode(0o750)).unwrap();
    let items = collect_until(&mut watcher, |items| !items.is_empty());
    assert_eq!(events(&items), [ev(EventKind::Chmod, ROOT_NAME)]);

    // A subdirectory's attribute change is reported once, by its parent.
    fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o700)).unwrap();
    let items = collect_until(&mut watcher, |items| !items.is_empty());
    assert_eq!(events(&items), [ev(EventKind::Chmod, "sub")]);
}

#[test]
fn non_recursive_sees_only_direct_children() {
    let _guard = shared();
    let dir = tempdir();
    fs::create_dir(dir.path().join("old")).unwrap();
    let mut watcher = Watcher::new(dir.path(), false).unwrap();
    assert_eq!(watcher.watch_count(), 1);
    fs::write(dir.path().join("old/inside.txt"), b"x").unwrap();
    fs::create_dir(dir.path().join("new")).unwrap();
    fs::write(dir.path().join("new/inside.txt"), b"x").unwrap();
    fs::write(dir.path().join("top.txt"), b"x").unwrap();
    let expected = [
        ev(EventKind::Create, "new"),
        ev(EventKind::Create, "top.txt"),
        ev(EventKind::Write, "top.txt"),
    ];
    let items = collect_until(&mut watcher, has_events(&expected));
    assert_eq!(events(&items), expected);
    assert_eq!(watcher.watch_count(), 1);
}

const DEEP: [&str; 6] = ["a", "a/b", "a/b/c", "a/b/c/d", "a/b/c/d/e", "a/b/c/d/e/f"];

fn assert_deep_burst(items: &[Item], iteration: usize) {
    let counts = create_count(items);
    for name in DEEP {
        assert_eq!(
            counts.get(name),
            Some(&1),
            "iteration {iteration}: CREATE {name} count; items: {items:#?}"
        );
    }
    assert_eq!(
        counts.len(),
        DEEP.len(),
        "iteration {iteration}: unexpected CREATEs: {items:#?}"
    );
    assert!(
        !items
            .iter()
            .any(|i| matches!(i, Item::Overflow { .. } | Item::Closed)),
        "{items:#?}"
    );
    // Parents are reported before their children.
    let order: Vec<&str> = events(items)
        .iter()
        .filter(|e| e.kind == EventKind::Create)
        .map(|e| DEEP.iter().copied().find(|d| *d == e.name).unwrap())
        .collect();
    assert_eq!(order, DEEP, "iteration {iteration}");
}

/// Reads until `done`, without the settling pause: the caller joins its writer and then drains.
fn read_until(
    watcher: &mut Watcher,
    items: &mut Vec<Item>,
    spin: bool,
    done: impl Fn(&[Item]) -> bool,
) {
    let deadline = Instant::now() + EXPECT_WITHIN;
    while !done(items) {
        assert!(
            Instant::now() < deadline,
            "timed out; got so far: {items:#?}"
        );
        if spin {
            items.extend(watcher.read_batch().unwrap());
        } else {
            items.extend(watcher.wait(Some(EXPECT_WITHIN)).unwrap());
        }
    }
}

/// Takes everything still queued. Once the writer's syscalls have returned, their events are in
/// the kernel queue, so one non-blocking drain sees any duplicate or stray.
fn drain(watcher: &mut Watcher, items: &mut Vec<Item>) {
    loop {
        let batch = watcher.read_batch().unwrap();
        if batch.is_empty() {
            return;
        }
        items.extend(batch);
    }
}

#[test]
fn mkdir_p_burst_reports_every_level_once() {
    let _guard = shared();
    // On the disk's filesystem, and many more times on tmpfs, where the writer is fastest and the
    // race with the scans tightest. Vary how the reader interleaves with the writer: mostly
    // blocked in wait() (it wakes on the first IN_CREATE while the writer goes on), one time in
    // four spinning on read_batch() (scans start within a microsecond of each mkdir).
    let mut bases = vec![(std::env::temp_dir(), 200)];
    if Path::new("/dev/shm").is_dir() {
        bases.push((PathBuf::from("/dev/shm"), 1000));
    }
    for (base, iterations) in bases {
        let started = Instant::now();
        for iteration in 0..iterations {
            let dir = tempfile::tempdir_in(&base).unwrap();
            let root = dir.path().to_path_buf();
            let mut watcher = Watcher::new(&root, true).unwrap();
            let writer = std::thread::spawn(move || {
                fs::create_dir_all(root.join("a/b/c/d/e")).unwrap();
                fs::File::create(root.join("a/b/c/d/e/f")).unwrap();
            });
            let mut items = Vec::new();
            read_until(&mut watcher, &mut items, iteration % 4 == 3, |items| {
                create_count(items).len() >= DEEP.len()
            });
            writer.join().unwrap();
            drain(&mut watcher, &mut items);
            assert_deep_burst(&items, iteration);
        }
        eprintln!(
            "{iterations} bursts in {}: {:?}",
            base.display(),
            started.elapsed()
        );
    }
}

#[test]
fn mkdir_p_from_a_shell_reports_every_level_once() {
    let _guard = shared();
    for iteration in 0..50 {
        let dir = tempdir();
        let mut watcher = Watcher::new(dir.path(), true).unwrap();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("mkdir -p a/b/c/d/e && touch a/b/c/d/e/f")
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let mut items = Vec::new();
        read_until(&mut watcher, &mut items, false, |items| {
            create_count(items).len() >= DEEP.len()
        });
        drain(&mut watcher, &mut items);
        assert_deep_burst(&items, iteration);
    }
}

#[test]
fn renames_within_into_and_out_of_the_tree() {
    let _guard = shared();
    let dir = tempdir();
    let outside = tempdir();
    let root = dir.path();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("a.txt"), b"x").unwrap();
    let mut watcher = Watcher::new(root, true).unwrap();

    fs::rename(root.join("a.txt"), root.join("sub/b.txt")).unwrap();
    let expected = [
        ev(EventKind::Rename, "a.txt"),
        ev(EventKind::Create, "sub/b.txt"),
    ];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );

    fs::rename(root.join("sub/b.txt"), outside.path().join("b.txt")).unwrap();
    let expected = [ev(EventKind::Rename, "sub/b.txt")];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );

    fs::rename(outside.path().join("b.txt"), root.join("c.txt")).unwrap();
    let expected = [ev(EventKind::Create, "c.txt")];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
}

#[test]
fn a_renamed_directory_keeps_naming_its_children() {
    let _guard = shared();
    let dir = tempdir();
    let root = dir.path();
    fs::create_dir_all(root.join("d1/inner")).unwrap();
    let mut watcher = Watcher::new(root, true).unwrap();
    assert_eq!(watcher.watch_count(), 3);

    fs::rename(root.join("d1"), root.join("d2")).unwrap();
    fs::write(root.join("d2/inner/f.txt"), b"x").unwrap();
    let expected = [
        ev(EventKind::Rename, "d1"),
        ev(EventKind::Create, "d2"),
        ev(EventKind::Create, "d2/inner/f.txt"),
        ev(EventKind::Write, "d2/inner/f.txt"),
    ];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );

    // Into a new subdirectory, then the old place is made again, all before the watcher reads:
    // scans of the new directories report what they find, so the order across directories
    // follows the scans, but every event comes once and under its current name.
    fs::create_dir(root.join("x")).unwrap();
    fs::rename(root.join("d2"), root.join("x/d3")).unwrap();
    fs::create_dir(root.join("d2")).unwrap();
    fs::write(root.join("x/d3/inner/g.txt"), b"").unwrap();
    fs::write(root.join("d2/h.txt"), b"").unwrap();
    let mut expected = vec![
        ev(EventKind::Create, "x"),
        ev(EventKind::Rename, "d2"),
        ev(EventKind::Create, "x/d3"),
        ev(EventKind::Create, "d2"),
        ev(EventKind::Create, "x/d3/inner/g.txt"),
        ev(EventKind::Create, "d2/h.txt"),
    ];
    let mut got = events(&collect_until(&mut watcher, has_events(&expected)));
    got.sort_by(|a, b| a.name.cmp(&b.name));
    expected.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(got, expected);

    // One step at a time, the order is the kernel's.
    fs::rename(root.join("x/d3"), root.join("d2/d4")).unwrap();
    fs::write(root.join("d2/d4/inner/g.txt"), b"more").unwrap();
    let expected = [
        ev(EventKind::Rename, "x/d3"),
        ev(EventKind::Create, "d2/d4"),
        ev(EventKind::Write, "d2/d4/inner/g.txt"),
    ];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
    assert_eq!(watcher.watch_count(), 5);
}

#[test]
fn a_directory_moved_out_loses_its_watches_and_one_moved_in_is_reported() {
    let _guard = shared();
    let dir = tempdir();
    let outside = tempdir();
    let root = dir.path();
    fs::create_dir_all(root.join("out/deeper")).unwrap();
    let mut watcher = Watcher::new(root, true).unwrap();
    assert_eq!(watcher.watch_count(), 3);

    fs::rename(root.join("out"), outside.path().join("out")).unwrap();
    let expected = [ev(EventKind::Rename, "out")];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
    assert_eq!(watcher.watch_count(), 1);
    fs::write(outside.path().join("out/deeper/ignored.txt"), b"x").unwrap();
    assert_eq!(events(&settle(&mut watcher)), []);

    // Moved back in: watched again, with its contents reported.
    fs::rename(outside.path().join("out"), root.join("back")).unwrap();
    let expected = [
        ev(EventKind::Create, "back"),
        ev(EventKind::Create, "back/deeper"),
        ev(EventKind::Create, "back/deeper/ignored.txt"),
    ];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
    assert_eq!(watcher.watch_count(), 3);
    fs::write(root.join("back/deeper/seen.txt"), b"").unwrap();
    let expected = [ev(EventKind::Create, "back/deeper/seen.txt")];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
}

#[test]
fn root_deleted_closes_the_watcher() {
    let _guard = shared();
    let parent = tempdir();
    let root = parent.path().join("root");
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("sub/f"), b"x").unwrap();
    let mut watcher = Watcher::new(&root, true).unwrap();
    fs::remove_dir_all(&root).unwrap();
    let items = collect_until(&mut watcher, |items| items.contains(&Item::Closed));
    assert!(watcher.is_closed());
    assert_eq!(items.last(), Some(&Item::Closed), "{items:#?}");
    let evs = events(&items);
    assert_eq!(evs.last(), Some(&ev(EventKind::Remove, ROOT_NAME)));
    assert!(evs.contains(&ev(EventKind::Remove, "sub/f")));
    assert!(evs.contains(&ev(EventKind::Remove, "sub")));
    // Closed: waits return at once, and nothing more comes.
    let start = Instant::now();
    assert!(
        watcher
            .wait(Some(Duration::from_secs(5)))
            .unwrap()
            .is_empty()
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[test]
fn root_moved_closes_the_watcher_and_stops_watching() {
    let _guard = shared();
    let parent = tempdir();
    let root = parent.path().join("root");
    fs::create_dir_all(root.join("sub")).unwrap();
    let mut watcher = Watcher::new(&root, true).unwrap();
    fs::rename(&root, parent.path().join("moved")).unwrap();
    let items = collect_until(&mut watcher, |items| items.contains(&Item::Closed));
    assert_eq!(
        items,
        [Item::Event(ev(EventKind::Rename, ROOT_NAME)), Item::Closed]
    );
    assert_eq!(watcher.watch_count(), 0);
    fs::write(parent.path().join("moved/sub/f"), b"x").unwrap();
    assert!(watcher.read_batch().unwrap().is_empty());
}

#[test]
fn the_fd_is_readable_when_events_are_pending_and_read_batch_never_blocks() {
    let _guard = shared();
    let dir = tempdir();
    let mut watcher = Watcher::new(dir.path(), false).unwrap();
    let start = Instant::now();
    assert!(watcher.read_batch().unwrap().is_empty());
    assert!(
        watcher
            .wait(Some(Duration::from_millis(20)))
            .unwrap()
            .is_empty()
    );
    assert!(start.elapsed() >= Duration::from_millis(20));

    fs::write(dir.path().join("f"), b"").unwrap();
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&watcher),
        nix::poll::PollFlags::POLLIN,
    )];
    assert_eq!(
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16)).unwrap(),
        1
    );
    assert_eq!(
        events(&watcher.read_batch().unwrap()),
        [ev(EventKind::Create, "f")]
    );
    assert!(watcher.read_batch().unwrap().is_empty());
    assert_eq!(
        std::os::fd::AsRawFd::as_raw_fd(&watcher),
        watcher.as_raw_fd()
    );
}

/// Writes `count` files under `dir` on another thread, while `watcher` reads, and checks that
/// every CREATE (`count` plus those named in `extra`) arrived exactly once, or that an overflow
/// was reported.
fn burst(watcher: &mut Watcher, dir: PathBuf, count: usize, extra: &[&str]) {
    let writer = std::thread::spawn(move || {
        for i in 0..count {
            fs::File::create(dir.join(i.to_string())).unwrap();
        }
    });
    let want = count + extra.len();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut overflowed = false;
    let mut tally = |items: Vec<Item>, counts: &mut HashMap<String, usize>| {
        for item in items {
            match item {
                Item::Event(Event {
                    name,
                    kind: EventKind::Create,
                }) => *counts.entry(name).or_insert(0) += 1,
                Item::Overflow { .. } => overflowed = true,
                _ => {}
            }
        }
    };
    let deadline = Instant::now() + EXPECT_WITHIN;
    while counts.len() < want {
        assert!(
            Instant::now() < deadline,
            "timed out with {} of {want} CREATEs",
            counts.len()
        );
        tally(watcher.wait(Some(EXPECT_WITHIN)).unwrap(), &mut counts);
        if counts.len() < want && writer.is_finished() {
            // Everything the writer did is queued now; one drain tells whether it all came.
            let mut rest = Vec::new();
            drain(watcher, &mut rest);
            tally(rest, &mut counts);
            break;
        }
    }
    writer.join().unwrap();
    let mut rest = Vec::new();
    drain(watcher, &mut rest);
    tally(rest, &mut counts);
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicate CREATEs: {dups:?}");
    if overflowed {
        eprintln!(
            "burst of {count}: overflow reported after {} CREATEs",
            counts.len()
        );
    } else {
        assert_eq!(
            counts.len(),
            want,
            "CREATEs missing and no overflow reported"
        );
        for name in extra {
            assert!(counts.contains_key(*name));
        }
    }
}

#[test]
fn ten_thousand_files_all_arrive_or_an_overflow_is_reported() {
    let _guard = shared();
    let dir = tempdir();
    let mut watcher = Watcher::new(dir.path(), true).unwrap();
    burst(&mut watcher, dir.path().to_path_buf(), 10_000, &[]);
}

#[test]
fn ten_thousand_files_in_a_new_directory_arrive_once() {
    let _guard = shared();
    let dir = tempdir();
    let mut watcher = Watcher::new(dir.path(), true).unwrap();
    let sub = dir.path().join("new");
    fs::create_dir(&sub).unwrap();
    // The directory's scan races the writer: names can come from the scan, the queue, or both.
    burst(&mut watcher, sub, 10_000, &["new"]);
}

#[test]
fn the_pending_cap_turns_a_big_scan_into_an_overflow_and_watching_goes_on() {
    let _guard = shared();
    let dir = tempdir();
    let outside = tempdir();
    let big = outside.path().join("big");
    fs::create_dir(&big).unwrap();
    for i in 0..200 {
        fs::write(big.join(i.to_string()), b"").unwrap();
    }
    let mut watcher = Watcher::with_pending_cap(dir.path(), true, 50).unwrap();
    fs::rename(&big, dir.path().join("big")).unwrap();
    let items = collect_until(&mut watcher, |items| !items.is_empty());
    assert_eq!(events(&items).len(), 50);
    assert_eq!(
        items.last(),
        Some(&Item::Overflow {
            dropped_hint: Some(151)
        }),
        "{:?}",
        &items[45..]
    );

    fs::write(dir.path().join("big/after"), b"").unwrap();
    let expected = [ev(EventKind::Create, "big/after")];
    assert_eq!(
        events(&collect_until(&mut watcher, has_events(&expected))),
        expected
    );
}

/// Sets a file under /proc/sys to a value and puts the old value back when dropped, panic or not.
struct SysctlGuard {
    path: &'static str,
    old: String,
}

impl SysctlGuard {
    /// `None` when the value cannot be changed (not root, or /proc/sys read-only).
    fn set(path: &'static str, value: &str) -> Option<SysctlGuard> {
        let old = fs::read_to_string(path).ok()?;
        fs::write(path, value).ok()?;
        Some(SysctlGuard {
            path,
            old: old.trim().to_string(),
        })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        fs::write(self.path, &self.old).expect("restore sysctl");
    }
}

#[test]
fn a_kernel_overflow_is_reported_and_watching_continues() {
    const MAX_QUEUED: &str = "/proc/sys/fs/inotify/max_queued_events";
    const SMALL_QUEUE: usize = 64;
    let dir = tempdir();
    let root = dir.path();
    fs::create_dir(root.join("known")).unwrap();
    let mut watcher = {
        let _exclusive = exclusive();
        let Some(guard) = SysctlGuard::set(MAX_QUEUED, &SMALL_QUEUE.to_string()) else {
            eprintln!("skipped: cannot write {MAX_QUEUED} (not root?)");
            return;
        };
        // The limit is read when the instance is created; put the old value back right after.
        let watcher = Watcher::new(root, true);
        drop(guard);
        watcher.unwrap()
    };
    let _guard = shared();

    // Far more events than the queue holds, without reading; then a directory whose creation is
    // certainly among the dropped events.
    for i in 0..SMALL_QUEUE * 4 {
        fs::write(root.join(format!("f{i}")), b"x").unwrap();
    }
    fs::create_dir(root.join("late")).unwrap();
    fs::create_dir(root.join("known/late2")).unwrap();

    let items = watcher.read_batch().unwrap();
    let overflow_at = items
        .iter()
        .position(|i| *i == Item::Overflow { dropped_hint: None })
        .unwrap_or_else(|| panic!("no overflow in {items:#?}"));
    assert!(
        events(&items[..overflow_at]).len() <= SMALL_QUEUE,
        "the queue held more than its limit"
    );
    // The rescan after the overflow found the directories made while events were dropped.
    let after = events(&items[overflow_at..]);
    assert!(after.contains(&ev(EventKind::Create, "late")), "{after:?}");
    assert!(
        after.contains(&ev(EventKind::Create, "known/late2")),
        "{after:?}"
    );

    // Watching goes on, including inside the directories found by the rescan.
    fs::write(root.join("late/inside"), b"").unwrap();
    fs::write(root.join("known/late2/inside"), b"").unwrap();
    fs::write(root.join("after"), b"").unwrap();
    let expected = [
        ev(EventKind::Create, "late/inside"),
        ev(EventKind::Create, "known/late2/inside"),
        ev(EventKind::Create, "after"),
    ];
    let more = collect_until(&mut watcher, has_events(&expected));
    let got: Vec<Event> = events(&more)
        .into_iter()
        .filter(|e| e.kind == EventKind::Create)
        .collect();
    assert_eq!(got, expected);
    assert!(!watcher.is_closed());
    // The rescan's CREATEs were not repeated by the queue.
    let all: Vec<Item> = items.into_iter().chain(more).collect();
    let counts = create_count(&all);
    assert_eq!(counts.get("late"), Some(&1));
    assert_eq!(counts.get("known/late2"), Some(&1));
}

#[test]
fn root_gone_during_an_overflow_closes_the_watcher() {
    const MAX_QUEUED: &str = "/proc/sys/fs/inotify/max_queued_events";
    let parent = tempdir();
    let root = parent.path().join("root");
    fs::create_dir(&root).unwrap();
    let mut watcher = {
        let _exclusive = exclusive();
        let Some(guard) = SysctlGuard::set(MAX_QUEUED, "16") else {
            eprintln!("skipped: cannot write {MAX_QUEUED} (not root?)");
            return;
        };
        let watcher = Watcher::new(&root, true);
        drop(guard);
        watcher.unwrap()
    };
    let _guard = shared();
    for i in 0..64 {
        fs::write(root.join(format!("f{i}")), b"x").unwrap();
    }
    fs::remove_dir_all(&root).unwrap();
    let items = collect_until(&mut watcher, |items| items.contains(&Item::Closed));
    assert!(items.iter().any(|i| matches!(i, Item::Overflow { .. })));
    assert_eq!(items.last(), Some(&Item::Closed));
    assert!(watcher.is_closed());
}

#[test]
fn names_that_are_not_utf8_are_replaced_not_dropped() {
    use std::os::unix::ffi::OsStrExt;
    let _guard = shared();
    let dir = tempdir();
    let mut watcher = Watcher::new(dir.path(), true).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(dir.path().join(name), b"").unwrap();
    let expected = [ev(EventKind::Create, "caf\u{fffd}.txt")];
    assert!(has_events(&expected)(&collect_until(
        &mut watcher,
        has_events(&expected)
    )));
}

#[test]
fn watcher_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Watcher>();
}

/// Set in the environment of the child process that runs [`limits_helper_in_a_user_namespace`].
const USERNS_HELPER_ENV: &str = "SANDBOXD_WATCH_USERNS_HELPER";

/// Runs [`limits_helper_in_a_user_namespace`] in a fresh user namespace, whose inotify limits
/// (`/proc/sys/user/max_inotify_*`) are its own: lowering them there leaves the machine's alone.
#[test]
fn watch_and_instance_limits_are_distinct_errors() {
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user"])
        .arg(exe)
        .args([
            "--exact",
            "limits_helper_in_a_user_namespace",
            "--include-ignored",
            "--nocapture",
        ])
        .env(USERNS_HELPER_ENV, "1")
        .output();
    let output = match output {
        Ok(output) => output,
        Err(err) => {
            eprintln!("skipped: cannot run unshare: {err}");
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("unshare failed") {
        eprintln!("skipped: no user namespaces here: {stderr}");
        return;
    }
    assert!(
        output.status.success(),
        "helper failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("1 passed"),
        "helper did not run:\n{stdout}\n{stderr}"
    );
}

/// Only meaningful inside the user namespace made by [`watch_and_instance_limits_are_distinct_errors`].
#[test]
#[ignore = "run by watch_and_instance_limits_are_distinct_errors in its own user namespace"]
fn limits_helper_in_a_user_namespace() {
    const WATCHES: &str = "/proc/sys/user/max_inotify_watches";
    const INSTANCES: &str = "/proc/sys/user/max_inotify_instances";
    // Never touch the machine's limits: only in the child, only in a non-initial user namespace.
    let uid_map = fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let initial = uid_map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"];
    assert!(
        std::env::var_os(USERNS_HELPER_ENV).is_some() && !initial,
        "run only through its driver test"
    );

    let dir = tempdir();
    let root = dir.path();
    fs::create_dir_all(root.join("a/b")).unwrap();

    // EMFILE from inotify_init1.
    fs::write(INSTANCES, "0").unwrap();
    let err = Watcher::new(root, true).unwrap_err();
    assert!(matches!(err, WatchError::InstanceLimit), "{err:?}");
    assert_eq!(err.raw_os_error(), Some(24));
    fs::write(INSTANCES, "128").unwrap();

    // ENOSPC from inotify_add_watch, at start: root, a, a/b need 3 watches.
    fs::write(WATCHES, "2").unwrap();
    let err = Watcher::new(root, true).unwrap_err();
    assert!(matches!(err, WatchError::WatchLimit), "{err:?}");
    assert!(err.is_resource_exhausted());

    // ENOSPC later, for a directory that appears: the error comes first, then the events
    // handled with it, and the rest of the tree is still watched.
    fs::write(WATCHES, "4").unwrap();
    let mut watcher = Watcher::new(root, true).unwrap();
    assert_eq!(watcher.watch_count(), 3);
    fs::create_dir(root.join("c")).unwrap();
    fs::create_dir(root.join("d")).unwrap();
    let deadline = Instant::now() + EXPECT_WITHIN;
    let mut items = Vec::new();
    let mut limit_hit = false;
    while !(limit_hit
        && has_events(&[ev(EventKind::Create, "c"), ev(EventKind::Create, "d")])(&items))
    {
        assert!(
            Instant::now() < deadline,
            "limit_hit={limit_hit}, items={items:#?}"
        );
        match watcher.wait(Some(EXPECT_WITHIN)) {
            Ok(batch) => items.extend(batch),
            Err(WatchError::WatchLimit) => limit_hit = true,
            Err(err) => panic!("{err:?}"),
        }
    }
    assert_eq!(watcher.watch_count(), 4);
    fs::write(root.join("a/b/still.txt"), b"").unwrap();
    let expected = [ev(EventKind::Create, "a/b/still.txt")];
    assert!(has_events(&expected)(&collect_until(
        &mut watcher,
        has_events(&expected)
    )));
}
