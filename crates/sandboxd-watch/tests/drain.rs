//! The drain thread on real temporary directories and real inotify instances: it keeps up with a
//! writer while nobody takes its items, its buffer is bounded by bytes with the loss reported in
//! place, `sync` watches new directories at once, and dropping it stops the thread.

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, Instant};

use sandboxd_watch::{
    DEFAULT_BUFFER_BYTES, Drainer, EventKind, ITEM_OVERHEAD_BYTES, Item, TAKEOVER_AFTER,
};

const EXPECT_WITHIN: Duration = Duration::from_secs(20);

/// Takes items until `done` says so (or fails after [`EXPECT_WITHIN`]).
fn take_until(drainer: &Drainer, mut done: impl FnMut(&[Item]) -> bool) -> Vec<Item> {
    let deadline = Instant::now() + EXPECT_WITHIN;
    let mut items = Vec::new();
    while !done(&items) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out after {} items", items.len());
        items.extend(drainer.wait(Some(left)).expect("wait"));
    }
    items
}

fn creates(items: &[Item]) -> HashSet<String> {
    items
        .iter()
        .filter_map(Item::as_event)
        .filter(|e| e.kind == EventKind::Create)
        .map(|e| e.name.clone())
        .collect()
}

#[test]
fn fifty_thousand_files_made_while_nobody_reads_all_arrive() {
    // More than three full kernel queues (16384 events by default) are made while the consumer
    // sleeps: only the drain thread reads, and it must keep up with the writer.
    const FILES: usize = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    for i in 0..FILES {
        fs::File::create(dir.path().join(i.to_string())).unwrap();
    }
    let items = take_until(&drainer, |items| creates(items).len() >= FILES);
    assert!(
        !items.iter().any(|i| matches!(i, Item::Overflow { .. })),
        "the drain thread fell behind the kernel"
    );
    assert_eq!(creates(&items).len(), FILES);
}

#[test]
fn a_full_buffer_drops_reports_the_count_in_place_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about ten events with short names.
    let drainer = Drainer::new(dir.path(), false, 10 * (ITEM_OVERHEAD_BYTES + 4)).unwrap();
    for i in 0..100 {
        fs::File::create(dir.path().join(format!("a{i}"))).unwrap();
    }
    drainer.sync();
    let first = drainer.take(usize::MAX).unwrap();
    let overflow_at = first
        .iter()
        .position(|i| matches!(i, Item::Overflow { .. }))
        .expect("an overflow item");
    assert!((5..=10).contains(&overflow_at), "{first:?}");
    let Item::Overflow {
        dropped_hint: Some(dropped),
    } = first[overflow_at]
    else {
        panic!("the buffer's loss carries its count: {first:?}");
    };
    assert_eq!(dropped as usize + overflow_at, 100);
    // Watching goes on once there is room.
    fs::File::create(dir.path().join("after")).unwrap();
    let later = take_until(&drainer, |items| creates(items).contains("after"));
    assert!(!later.iter().any(|i| matches!(i, Item::Overflow { .. })));
}

#[test]
fn sync_watches_a_new_directory_before_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    assert_eq!(drainer.watch_count(), 1);
    fs::create_dir_all(dir.path().join("a/b")).unwrap();
    drainer.sync();
    assert_eq!(drainer.watch_count(), 3);
    fs::File::create(dir.path().join("a/b/f")).unwrap();
    let items = take_until(&drainer, |items| creates(items).contains("a/b/f"));
    assert_eq!(
        creates(&items),
        HashSet::from(["a", "a/b", "a/b/f"].map(String::from))
    );
}

#[test]
fn the_fd_is_readable_exactly_while_items_wait() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), false, DEFAULT_BUFFER_BYTES).unwrap();
    let readable = || {
        use std::os::fd::AsFd;
        let mut fds = [nix::poll::PollFd::new(
            drainer.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() > 0
    };
    assert!(!readable());
    fs::File::create(dir.path().join("x")).unwrap();
    let deadline = Instant::now() + EXPECT_WITHIN;
    while !readable() {
        assert!(
            Instant::now() < deadline,
            "the drain thread never signalled"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(drainer.take(1).unwrap().len(), 1);
    assert!(!readable(), "nothing left, so not readable");
}

#[test]
fn a_deleted_root_closes_it_and_drop_stops_the_thread() {
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    fs::create_dir(&root).unwrap();
    let drainer = Drainer::new(&root, true, DEFAULT_BUFFER_BYTES).unwrap();
    fs::remove_dir(&root).unwrap();
    let items = take_until(&drainer, |items| items.contains(&Item::Closed));
    assert_eq!(items.last(), Some(&Item::Closed));
    assert!(drainer.is_closed());
    let started = Instant::now();
    drop(drainer);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A live one stops on drop too.
    let live = Drainer::new(parent.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    drop(live);
}

/// Whether the drainer's eventfd is readable within `wait` (items, or an error, are buffered).
fn buffered_within(drainer: &Drainer, wait: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(drainer.as_fd(), PollFlags::POLLIN)];
    let millis = PollTimeout::try_from(wait.as_millis() as u64).unwrap();
    poll(&mut fds, millis).unwrap() > 0
}

/// Calls `read_kernel` until it brings items (returned) or hands the queue back (`None`); fails
/// after [`EXPECT_WITHIN`].
fn read_kernel_until_items(drainer: &Drainer) -> Option<Vec<Item>> {
    let deadline = Instant::now() + EXPECT_WITHIN;
    loop {
        if !drainer.read_kernel() {
            return None;
        }
        let items = drainer.take(usize::MAX).unwrap();
        if !items.is_empty() {
            return Some(items);
        }
        assert!(Instant::now() < deadline, "nothing came from the kernel");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_parked_thread_leaves_the_kernel_queue_to_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    drainer.park();
    assert!(drainer.is_parked());
    fs::File::create(dir.path().join("a")).unwrap();
    // A consumer that reads (within TAKEOVER_AFTER) keeps the queue: the thread reads nothing.
    let items =
        read_kernel_until_items(&drainer).expect("one file is no reason to hand the queue back");
    assert!(drainer.is_parked());
    assert_eq!(creates(&items), HashSet::from(["a".to_string()]));
    // The consumer knows what it read: the eventfd stays for what the thread buffers.
    assert!(!buffered_within(&drainer, Duration::ZERO));
    // Nothing was left for the thread to take over, however long the consumer now waits.
    assert!(!buffered_within(&drainer, TAKEOVER_AFTER * 10));
    assert_eq!(drainer.takeovers(), 0);
    assert!(drainer.is_parked());
    // Unparked, the thread reads again by itself.
    drainer.unpark();
    fs::File::create(dir.path().join("b")).unwrap();
    let items = take_until(&drainer, |items| creates(items).contains("b"));
    assert_eq!(creates(&items), HashSet::from(["b".to_string()]));
}

#[test]
fn a_new_directory_read_while_parked_is_handled_by_the_thread_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    drainer.park();
    fs::File::create(dir.path().join("before")).unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::File::create(dir.path().join("sub/inner")).unwrap();
    // The directory's event is held for the thread, which watches and walks it, not the consumer.
    let deadline = Instant::now() + EXPECT_WITHIN;
    while drainer.read_kernel() {
        assert!(Instant::now() < deadline, "the queue was never handed back");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(!drainer.is_parked());
    // The consumer parks the thread again at once (as a stream that found nothing to send does):
    // the held events must still be handled, though the kernel will not signal them again.
    drainer.park();
    let items = take_until(&drainer, |items| creates(items).contains("sub/inner"));
    let names: Vec<&str> = items
        .iter()
        .filter_map(Item::as_event)
        .filter(|e| e.kind == EventKind::Create)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(names, ["before", "sub", "sub/inner"]);
}

#[test]
fn a_burst_read_while_parked_hands_the_queue_back() {
    let dir = tempfile::tempdir().unwrap();
    let drainer = Drainer::new(dir.path(), false, DEFAULT_BUFFER_BYTES).unwrap();
    drainer.park();
    let files = sandboxd_watch::HANDBACK_ITEMS + 1;
    for i in 0..files {
        fs::File::create(dir.path().join(i.to_string())).unwrap();
    }
    assert!(!drainer.read_kernel(), "a burst stays with the consumer");
    assert!(!drainer.is_parked());
    let items = take_until(&drainer, |items| creates(items).len() >= files);
    assert_eq!(creates(&items).len(), files);
}

#[test]
fn a_parked_consumer_that_stops_reading_loses_nothing_the_thread_takes_over() {
    // The consumer parks, then does not read (an event loop busy elsewhere, or off the CPU) while
    // a burst larger than the kernel queue (fs.inotify.max_queued_events, 16384 by default) is
    // made: the thread must notice the unread queue and drain it, or the kernel drops events.
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("burst")).unwrap();
    let drainer = Drainer::new(dir.path(), true, DEFAULT_BUFFER_BYTES).unwrap();
    drainer.park();
    let n = 20_000;
    for i in 0..n {
        fs::File::create(dir.path().join(format!("burst/{i}"))).unwrap();
    }
    let items = take_until(&drainer, |items| creates(items).len() >= n);
    assert!(
        !items
            .iter()
            .any(|item| matches!(item, Item::Overflow { .. })),
        "events were lost while the consumer did not read"
    );
    assert_eq!(creates(&items).len(), n);
    assert!(drainer.takeovers() >= 1);
    // The consumer finds the queue taken back, and may park again.
    assert!(!drainer.is_parked());
    assert!(!drainer.read_kernel());
    drainer.park();
    fs::File::create(dir.path().join("after")).unwrap();
    let items = read_kernel_until_items(&drainer).expect("one file after parking again");
    assert_eq!(creates(&items), HashSet::from(["after".to_string()]));
}
