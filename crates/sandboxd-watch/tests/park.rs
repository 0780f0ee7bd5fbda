//! Attacks on the parked mode of the drainer (`park`, `read_kernel`, the hand-back to the thread):
//! a consumer that behaves as the agent's `WatchDir` stream does (it polls the inotify descriptor
//! while parked and the eventfd always, takes everything, parks again at once) against a writer
//! that mixes lone files, bursts around `HANDBACK_ITEMS`, new directories filled at once, and
//! renames in and out of the tree. Every event must arrive exactly once and in the writer's order.

use std::fs;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sandboxd_watch::{DEFAULT_BUFFER_BYTES, Drainer, EventKind, HANDBACK_ITEMS, Item};

const EXPECT_WITHIN: Duration = Duration::from_secs(30);

/// Runs the consumer until `done` holds for what it took, parking the thread whenever it has
/// taken everything (as the stream does), and returns the items in the order taken.
fn consume(drainer: &Drainer, mut done: impl FnMut(&[Item]) -> bool) -> Vec<Item> {
    let deadline = Instant::now() + EXPECT_WITHIN;
    let mut items = Vec::new();
    let mut parked = false;
    loop {
        let taken = drainer.take(usize::MAX).expect("take");
        let empty = taken.is_empty();
        items.extend(taken);
        if done(&items) {
            return items;
        }
        if !empty {
            continue;
        }
        if !parked {
            drainer.park();
            parked = true;
        }
        assert!(
            Instant::now() < deadline,
            "stalled after {} items",
            items.len()
        );
        let kernel = kernel_fd(drainer);
        let mut fds = vec![PollFd::new(drainer.as_fd(), PollFlags::POLLIN)];
        if parked {
            fds.push(PollFd::new(kernel, PollFlags::POLLIN));
        }
        poll(&mut fds, PollTimeout::from(100u16)).expect("poll");
        let kernel_ready = parked && fds[1].revents().is_some_and(|r| !r.is_empty());
        if kernel_ready && !drainer.read_kernel() {
            parked = false;
        }
    }
}

/// The inotify descriptor as a borrowed fd (it lives as long as the drainer).
#[allow(unsafe_code)]
fn kernel_fd(drainer: &Drainer) -> BorrowedFd<'_> {
    // SAFETY: `kernel_fd` is open for as long as `drainer` lives, and the borrow cannot outlive it.
    unsafe { BorrowedFd::borrow_raw(drainer.kernel_fd()) }
}

/// Creates and (un)names entries, returning the envd events the watcher must report, in order.
fn write_round(root: &Path, outside: &Path, round: usize) -> Vec<(EventKind, String)> {
    let mut expected = Vec::new();
    let touch = |name: String, expected: &mut Vec<(EventKind, String)>| {
        fs::File::create(root.join(&name)).unwrap();
        expected.push((EventKind::Create, name));
    };
    // A lone file.
    touch(format!("r{round}-lone"), &mut expected);
    // A burst around the hand-back bound.
    let burst = HANDBACK_ITEMS - 1 + round % 3;
    for i in 0..burst {
        touch(format!("r{round}-b{i}"), &mut expected);
    }
    // A directory created and filled at once: its CREATE first, then its children.
    let dir = format!("r{round}-d");
    fs::create_dir(root.join(&dir)).unwrap();
    expected.push((EventKind::Create, dir.clone()));
    for i in 0..5 {
        touch(format!("{dir}/c{i}"), &mut expected);
    }
    // A file right after the directory (read by whoever holds the queue after the hand-back).
    touch(format!("r{round}-after"), &mut expected);
    // A directory with contents moved in from outside the tree, then out again.
    let from = outside.join(format!("m{round}"));
    fs::create_dir(&from).unwrap();
    fs::File::create(from.join("inside")).unwrap();
    let moved = format!("r{round}-m");
    fs::rename(&from, root.join(&moved)).unwrap();
    expected.push((EventKind::Create, moved.clone()));
    // Its content is seen only if the watcher scanned it before it left again: not expected.
    fs::rename(root.join(&moved), outside.join(format!("gone{round}"))).unwrap();
    expected.push((EventKind::Rename, moved));
    touch(format!("r{round}-last"), &mut expected);
    expected
}

fn kinds_of_interest(items: &[Item]) -> Vec<(EventKind, String)> {
    items
        .iter()
        .filter_map(Item::as_event)
        .filter(|e| matches!(e.kind, EventKind::Create | EventKind::Rename))
        .filter(|e| !e.name.ends_with("-m/inside"))
        .map(|e| (e.kind, e.name.clone()))
        .collect()
}

#[test]
fn a_parking_consumer_gets_every_event_once_in_order() {
    const ROUNDS: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    let root = dir.path().to_path_buf();
    let out = outside.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        let mut expected = Vec::new();
        for round in 0..ROUNDS {
            expected.extend(write_round(&root, &out, round));
            if round % 4 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        expected
    });
    let last = format!("r{}-last", ROUNDS - 1);
    let items = consume(&drainer, |items| {
        items
            .iter()
            .filter_map(Item::as_event)
            .any(|e| e.name == last)
    });
    let expected = writer.join().unwrap();
    assert!(
        !items.iter().any(|i| matches!(i, Item::Overflow { .. })),
        "overflow"
    );
    let got = kinds_of_interest(&items);
    // Each event exactly once.
    let mut sorted_got = got.clone();
    let mut sorted_expected = expected.clone();
    sorted_got.sort_by(|a, b| {
        a.1.cmp(&b.1)
            .then(format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
    });
    sorted_expected.sort_by(|a, b| {
        a.1.cmp(&b.1)
            .then(format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
    });
    let missing: Vec<_> = sorted_expected
        .iter()
        .filter(|e| !sorted_got.contains(e))
        .take(5)
        .collect();
    let extra: Vec<_> = sorted_got
        .iter()
        .filter(|e| !sorted_expected.contains(e))
        .take(5)
        .collect();
    assert_eq!(
        sorted_got.len(),
        sorted_expected.len(),
        "missing {missing:?}, unexpected {extra:?}"
    );
    assert_eq!(
        sorted_got, sorted_expected,
        "missing {missing:?}, unexpected {extra:?}"
    );
    // The top-level entries in the writer's order (a new directory's children may come from its
    // scan, in directory order, so only their place after the directory is checked).
    let top = |events: &[(EventKind, String)]| -> Vec<(EventKind, String)> {
        events
            .iter()
            .filter(|e| !e.1.contains('/'))
            .cloned()
            .collect()
    };
    assert_eq!(top(&got), top(&expected), "top-level events out of order");
    for (at, (_, name)) in got.iter().enumerate() {
        if let Some((parent, _)) = name.split_once('/') {
            let created = got[..at]
                .iter()
                .any(|(kind, n)| *kind == EventKind::Create && n == parent);
            assert!(created, "{name} came before its directory's CREATE");
        }
    }
}

#[test]
fn a_parked_consumer_does_not_spin_while_the_thread_holds_the_watcher() {
    // A directory of many directories moved in: the thread takes the queue back and walks it with
    // the watcher locked, while a writer keeps the kernel queue readable. The consumer (as the
    // stream does) parks again only once the thread has buffered something, and `read_kernel`
    // hands the queue back rather than report it kept while the thread holds the watcher: no
    // polling of a readable descriptor it cannot read for the whole walk (a consumer that parked
    // again at once made ~170k calls in 3 s against ~9k, one per event, without the walk).
    const WRITES: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let big = outside.path().join("big");
    for i in 0..20_000 {
        fs::create_dir_all(big.join(format!("d{}/e{i}", i % 100))).unwrap();
    }
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    drainer.park();
    let root = dir.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        fs::rename(&big, root.join("big")).unwrap();
        for i in 0..WRITES {
            fs::File::create(root.join(format!("w{i}"))).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let last = format!("w{}", WRITES - 1);
    let (mut parked, mut may_park, mut calls) = (true, true, 0usize);
    let deadline = Instant::now() + EXPECT_WITHIN;
    let mut seen_last = false;
    while !seen_last {
        assert!(Instant::now() < deadline, "the last write never came");
        let items = drainer.take(usize::MAX).unwrap();
        seen_last = items
            .iter()
            .filter_map(Item::as_event)
            .any(|e| e.name == last);
        if items.is_empty() && !parked && may_park {
            drainer.park();
            parked = true;
        }
        let mut fds = vec![PollFd::new(drainer.as_fd(), PollFlags::POLLIN)];
        if parked {
            fds.push(PollFd::new(kernel_fd(&drainer), PollFlags::POLLIN));
        }
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            may_park = true; // the thread buffered something
        }
        if parked && fds[1].revents().is_some_and(|r| !r.is_empty()) {
            calls += 1;
            if !drainer.read_kernel() {
                parked = false;
                may_park = false;
            }
        }
    }
    writer.join().unwrap();
    // At most one call per event read, and a few per hand-back; a spin makes it many times more.
    assert!(
        calls <= 2 * WRITES,
        "read_kernel called {calls} times for {WRITES} writes: the consumer spun"
    );
}
