//! The output fan-out: replay, lag, wake-up fds, batches, and that a subscriber that does not read
//! never slows the other subscribers (flow control itself is tested in `flow.rs`).

mod common;

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use common::{collect, sh};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use sandboxd_proc::{Cursor, DEFAULT_RING_BYTES, Process, StartAt, Subscriber};

fn readable(fd: BorrowedFd<'_>, timeout_ms: u16) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(timeout_ms)).unwrap() == 1
}

/// Drains a subscriber to the end; returns (bytes received, bytes reported lost, lag events).
fn drain(sub: &mut Subscriber) -> (u64, u64, u64) {
    let (mut got, mut lost, mut lags) = (0u64, 0u64, 0u64);
    loop {
        let batch = sub.recv(1 << 20, Some(Duration::from_secs(30)));
        assert!(!batch.is_empty(), "timed out");
        if let Some(lag) = batch.lagged {
            lost += lag.bytes;
            lags += 1;
        }
        got += batch.bytes() as u64;
        if batch.end.is_some() {
            return (got, lost, lags);
        }
    }
}

#[test]
fn idle_subscriber_never_blocks_producer_or_others() {
    const TOTAL: u64 = 50 << 20;
    let started = Instant::now();
    let process = Process::spawn(&sh("head -c 52428800 /dev/zero")).unwrap();
    // A subscribes and then never reads until the process has ended.
    let mut idle = process.subscribe(StartAt::Oldest).unwrap();
    let idle_start = idle.cursor();
    let mut eager = process.subscribe(StartAt::Oldest).unwrap();
    let eager_start = eager.cursor();
    let reader = std::thread::Builder::new()
        .name("eager-reader".into())
        .spawn(move || (drain(&mut eager), eager.cursor()))
        .unwrap();

    let end = process
        .wait(Some(Duration::from_secs(30)))
        .expect("process stalled");
    let elapsed = started.elapsed();
    assert!(end.success(), "{end:?}");
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");

    // The eager reader got every byte: the process waited for it (flow control), never for the
    // idle one.
    let ((got, lost, lags), eager_end) = reader.join().unwrap();
    assert_eq!((got, lost), (TOTAL - eager_start.offset, 0));
    assert_eq!(eager_end.offset, TOTAL);
    eprintln!("eager: got {got} lost {lost} in {lags} lags; process took {elapsed:?}");

    // The idle one lost all but the ring's worth, and is told exactly how much.
    let first = idle.next_batch(usize::MAX);
    let lag = first.lagged.expect("idle subscriber should have lagged");
    let retained = first.bytes() as u64;
    assert!(retained <= DEFAULT_RING_BYTES as u64);
    assert!(retained > (DEFAULT_RING_BYTES as u64) / 2);
    assert_eq!(idle_start.offset + lag.bytes + retained, TOTAL);
    assert!(first.end.is_some(), "end comes with the last chunk");
}

#[test]
fn replay_of_output_before_subscribing() {
    let process = Process::spawn(&sh("echo hello; echo world >&2")).unwrap();
    process.wait(Some(Duration::from_secs(10))).unwrap();
    // Nobody was subscribed while it ran; everything is still there.
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let batch = sub.next_batch(usize::MAX);
    assert!(batch.lagged.is_none());
    let text: Vec<u8> = batch
        .chunks
        .iter()
        .flat_map(|c| c.data.iter().copied())
        .collect();
    assert_eq!(text.len(), 12);
    assert!(batch.end.unwrap().success());
    // The end stays readable.
    assert!(sub.next_batch(usize::MAX).end.is_some());
    // "From now" after the end sees only the end.
    let mut late = process.subscribe(StartAt::Now).unwrap();
    let batch = late.next_batch(usize::MAX);
    assert!(batch.chunks.is_empty() && batch.end.is_some());
}

#[test]
fn replay_then_live() {
    let process = Process::spawn(&sh("echo early; sleep 0.3; echo late")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let out = collect(&process);
    assert_eq!(out.stdout, b"early\nlate\n");
    let (got, lost, _) = drain(&mut sub);
    assert_eq!((got, lost), (11, 0));
}

#[test]
fn replay_beyond_ring_reports_lag_to_stateless_readers() {
    let process = Process::spawn(&sh("head -c 3145728 /dev/zero")).unwrap();
    process.wait(Some(Duration::from_secs(10))).unwrap();
    let oldest = process.oldest_cursor();
    assert!(oldest.offset >= (3 << 20) - DEFAULT_RING_BYTES as u64);
    let batch = process.next_batch(Cursor::default(), usize::MAX);
    let lag = batch.lagged.unwrap();
    assert_eq!(lag.bytes, oldest.offset);
    assert_eq!(lag.chunks, oldest.seq);
    assert_eq!(lag.bytes + batch.bytes() as u64, 3 << 20);
    assert_eq!(batch.next, process.now_cursor());
}

#[test]
fn batches_respect_max_bytes() {
    let process = Process::spawn(&sh("for i in 1 2 3 4 5; do echo $i; sleep 0.02; done")).unwrap();
    process.wait(Some(Duration::from_secs(10))).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let mut chunks = 0;
    loop {
        let batch = sub.next_batch(1);
        assert!(batch.chunks.len() <= 1);
        chunks += batch.chunks.len();
        if batch.end.is_some() {
            break;
        }
        assert!(batch.more || batch.chunks.is_empty());
    }
    assert_eq!(chunks, 5);
}

#[test]
fn wake_fd_signals_new_output_and_end() {
    let process = Process::spawn(&sh("sleep 0.3; echo hi; sleep 0.3")).unwrap();
    let mut sub = process.subscribe(StartAt::Now).unwrap();
    assert!(!readable(sub.wake_fd(), 100), "readable before any output");
    assert!(readable(sub.wake_fd(), 5000), "no wake-up for output");
    let batch = sub.next_batch(usize::MAX);
    assert_eq!(&*batch.chunks[0].data, b"hi\n");
    // Reading resets it.
    assert!(!readable(sub.wake_fd(), 0));
    assert!(readable(sub.wake_fd(), 5000), "no wake-up for the end");
    let batch = sub.next_batch(usize::MAX);
    assert!(batch.end.is_some());
    // After the end it stays readable, so an event loop always comes back for it.
    assert!(readable(sub.wake_fd(), 0));
}

#[test]
fn wake_fd_stays_readable_while_more_is_pending() {
    let process = Process::spawn(&sh("echo a; sleep 0.05; echo b; sleep 0.05; echo c")).unwrap();
    process.wait(Some(Duration::from_secs(10))).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    assert!(
        readable(sub.wake_fd(), 0),
        "replayable output should make it readable"
    );
    let first = sub.next_batch(1);
    assert!(first.more);
    assert!(
        readable(sub.wake_fd(), 0),
        "more pending must keep it readable"
    );
}

#[test]
fn blocking_wait_times_out() {
    let process = Process::spawn(&sh("exec sleep 100")).unwrap();
    let sub = process.subscribe(StartAt::Now).unwrap();
    let started = Instant::now();
    assert!(!sub.wait(Some(Duration::from_millis(200))));
    assert!(started.elapsed() >= Duration::from_millis(200));
    process.signal(sandboxd_proc::Signal::SIGKILL).unwrap();
    assert!(sub.wait(Some(Duration::from_secs(10))));
}

#[test]
fn many_subscribers_each_get_everything() {
    let process = Process::spawn(&sh("head -c 200000 /dev/urandom | od -An -v -tx1")).unwrap();
    let subs: Vec<Subscriber> = (0..8)
        .map(|_| process.subscribe(StartAt::Oldest).unwrap())
        .collect();
    let handles: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let mut data = Vec::new();
                loop {
                    let b = s.recv(4096, Some(Duration::from_secs(30)));
                    assert!(b.lagged.is_none());
                    for c in &b.chunks {
                        data.extend_from_slice(&c.data);
                    }
                    if b.end.is_some() {
                        return data;
                    }
                }
            })
        })
        .collect();
    let results: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results[0].len() > 200000);
    assert!(results.iter().all(|r| r == &results[0]));
}
