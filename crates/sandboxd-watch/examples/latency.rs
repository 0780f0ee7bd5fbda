//! Write→event latency of a `Watcher` on this machine, beside raw inotify. Not a pass/fail test.
//!
//! ```text
//! cargo run --release -p sandboxd-watch --example latency [DIR] [SAMPLES]
//! ```
//!
//! Three measurements, each a 1-byte `write(2)` to a file in a watched directory and the time
//! until its WRITE event is in hand:
//! - `same thread`: write, then `Watcher::wait` on the same thread (syscall cost, no wake-up);
//! - `other thread`: the reader is blocked in `Watcher::wait` while another thread writes
//!   (includes the kernel waking the reader: the floor an SDK client can see);
//! - `raw inotify, other thread`: the baseline, the `inotify` crate's blocking read on a plain
//!   watch, with no tree, mapping or batching.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sandboxd_watch::{EventKind, Item, Watcher};

/// Samples discarded first, while caches, the page cache and the scheduler settle.
const WARMUP: usize = 1_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let base = args.next().map_or_else(std::env::temp_dir, PathBuf::from);
    let samples: usize = args
        .next()
        .map_or(20_000, |s| s.parse().expect("SAMPLES must be a number"));
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    println!(
        "write→event latency, {samples} samples, in {}",
        base.display()
    );
    report(
        "sandboxd-watch, same thread",
        same_thread(dir.path(), samples),
    );
    report(
        "sandboxd-watch, other thread",
        other_thread(dir.path(), samples),
    );
    report(
        "raw inotify, other thread",
        raw_other_thread(dir.path(), samples),
    );
}

fn open(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open")
}

fn is_write(items: &[Item]) -> bool {
    items
        .iter()
        .any(|item| item.as_event().is_some_and(|e| e.kind == EventKind::Write))
}

fn same_thread(dir: &Path, samples: usize) -> Vec<Duration> {
    let mut file = open(&dir.join("same"));
    let mut watcher = Watcher::new(dir, true).expect("watcher");
    let mut out = Vec::with_capacity(samples);
    for i in 0..WARMUP + samples {
        let start = Instant::now();
        file.write_all(b"x").expect("write");
        while !is_write(&watcher.wait(Some(Duration::from_secs(5))).expect("wait")) {}
        if i >= WARMUP {
            out.push(start.elapsed());
        }
    }
    out
}

fn other_thread(dir: &Path, samples: usize) -> Vec<Duration> {
    let mut watcher = Watcher::new(dir, true).expect("watcher");
    let path = dir.join("other");
    open(&path);
    watcher.read_batch().expect("drain");
    run_with_writer(path, samples, move || {
        while !is_write(&watcher.wait(Some(Duration::from_secs(5))).expect("wait")) {}
    })
}

fn raw_other_thread(dir: &Path, samples: usize) -> Vec<Duration> {
    let mut inotify = inotify::Inotify::init().expect("inotify");
    inotify
        .watches()
        .add(dir, inotify::WatchMask::MODIFY)
        .expect("watch");
    let mut buffer = vec![0u8; 64 * 1024];
    run_with_writer(dir.join("raw"), samples, move || {
        let mut events = inotify.read_events_blocking(&mut buffer).expect("read");
        assert!(events.next().is_some());
    })
}

/// A writer thread writes one byte per round; `wait_for_event` returns once its event is read.
fn run_with_writer(
    path: PathBuf,
    samples: usize,
    mut wait_for_event: impl FnMut(),
) -> Vec<Duration> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (sent_tx, sent_rx) = mpsc::channel::<Instant>();
    let mut file = open(&path);
    let writer = std::thread::Builder::new()
        .name("latency-writer".into())
        .spawn(move || {
            while go_rx.recv().is_ok() {
                let start = Instant::now();
                file.write_all(b"x").expect("write");
                if sent_tx.send(start).is_err() {
                    break;
                }
            }
        })
        .expect("spawn");
    let mut out = Vec::with_capacity(samples);
    for i in 0..WARMUP + samples {
        go_tx.send(()).expect("go");
        wait_for_event();
        let end = Instant::now();
        let start = sent_rx.recv().expect("start time");
        if i >= WARMUP {
            out.push(end.saturating_duration_since(start));
        }
    }
    drop(go_tx);
    writer.join().expect("writer");
    out
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    println!(
        "{what:>30}: p50 {:7.1} µs   p90 {:7.1} µs   p99 {:7.1} µs",
        at(0.50),
        at(0.90),
        at(0.99)
    );
}
