//! What one process start costs the agent: `/bin/true` started N times from a process with a large,
//! resident heap (the Python agent holds ~40 MB), beside `std::process::Command` started both ways
//! std can start it, in the same run.
//!
//! ```text
//! cargo run --release -p sandboxd-proc --example spawn_cost -- [N] [HEAP_MIB] [TOUCH_MIB]
//! ```
//!
//! `N` (default 2000) starts per path, interleaved round by round so that load from elsewhere hits
//! every path alike. `HEAP_MIB` (default 64) of heap is allocated in 1 MiB blocks and every page
//! written first, like a Python heap of small pages (no transparent huge pages: each block is its
//! own mapping, not 2 MiB aligned). After each start `TOUCH_MIB` (default 16) of that heap is
//! written again, one byte a page, and timed: after a `fork` each of those pages is write-protected
//! until the next write faults it back in, which the agent pays for later, outside the spawn call.
//!
//! Per path it prints p50/p99 in µs of the spawn call, of spawn to exit status (or [`End`] through
//! sandboxd-proc, which includes its reader thread), and p50 of the heap touch afterwards. The paths:
//!
//! * `std posix_spawn`: `Command` with pipes and no `pre_exec`, which std starts with glibc's
//!   `posix_spawn` (`clone(CLONE_VM | CLONE_VFORK)`): the floor.
//! * `std fork (pre_exec)`: the same with an empty `pre_exec` hook, which makes std `fork()`.
//! * `sandboxd-proc pipes` / `sandboxd-proc pty`: [`Process::spawn`] then [`Process::wait`].
//!
//! [`End`]: sandboxd_proc::End

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_proc::{Io, Process, SpawnOptions, WinSize};

/// A page, as the heap is written.
const PAGE_BYTES: usize = 4096;

/// Block size of the heap: above glibc's 128 KiB mmap threshold, so each is its own mapping.
const BLOCK_BYTES: usize = 1 << 20;

/// One way of starting `/bin/true`: returns (spawn call, spawn to exit).
type Start = fn() -> (Duration, Duration);

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(2000, |s| s.parse().expect("N"));
    let heap_mib: usize = args.next().map_or(64, |s| s.parse().expect("HEAP_MIB"));
    let touch_mib: usize = args.next().map_or(16, |s| s.parse().expect("TOUCH_MIB"));

    let mut heap: Vec<Vec<u8>> = (0..heap_mib).map(|_| vec![1u8; BLOCK_BYTES]).collect();
    let touch_blocks = touch_mib.min(heap_mib);
    println!(
        "/bin/true x {n} per path, {heap_mib} MiB resident heap, {touch_blocks} MiB of it rewritten after each start; µs"
    );

    let paths: [(&str, Start); 4] = [
        ("std posix_spawn", std_posix_spawn),
        ("std fork (pre_exec)", std_fork),
        ("sandboxd-proc pipes", || {
            sandboxd(Io::Pipes { stdin: false })
        }),
        ("sandboxd-proc pty", || {
            sandboxd(Io::Pty(WinSize::default()))
        }),
    ];
    // Untimed warm-up: page cache, dynamic loader, thread stacks.
    for (_, start) in &paths {
        for _ in 0..20 {
            start();
        }
    }
    let mut samples = vec![(Vec::new(), Vec::new(), Vec::new()); paths.len()];
    for round in 0..n {
        for k in 0..paths.len() {
            // Alternate the order, so that no path always runs right after another.
            let k = if round % 2 == 0 {
                k
            } else {
                paths.len() - 1 - k
            };
            let (spawn, total) = (paths[k].1)();
            let touch = rewrite(&mut heap[..touch_blocks], round);
            samples[k].0.push(spawn);
            samples[k].1.push(total);
            samples[k].2.push(touch);
        }
    }

    println!(
        "{:<22} {:>13} {:>15} {:>12}",
        "path", "spawn p50/p99", "to exit p50/p99", "touch p50"
    );
    for ((label, _), (spawn, total, touch)) in paths.iter().zip(&mut samples) {
        println!(
            "{label:<22} {:>6.0}/{:<6.0} {:>7.0}/{:<7.0} {:>12.0}",
            percentile(spawn, 50.0),
            percentile(spawn, 99.0),
            percentile(total, 50.0),
            percentile(total, 99.0),
            percentile(touch, 50.0),
        );
    }
}

fn std_command() -> Command {
    let mut cmd = Command::new("/bin/true");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn std_posix_spawn() -> (Duration, Duration) {
    run_std(std_command())
}

// The baseline needs `pre_exec`, which is unsafe; nothing else in this example is.
#[allow(unsafe_code)]
fn std_fork() -> (Duration, Duration) {
    let mut cmd = std_command();
    // SAFETY: the hook does nothing; its presence alone makes std fork instead of posix_spawn.
    unsafe {
        cmd.pre_exec(|| Ok(()));
    }
    run_std(cmd)
}

fn run_std(mut cmd: Command) -> (Duration, Duration) {
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn");
    let spawned = started.elapsed();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    (spawned, started.elapsed())
}

fn sandboxd(io: Io) -> (Duration, Duration) {
    let opts = SpawnOptions::new("/bin/true").io(io);
    let started = Instant::now();
    let process = Process::spawn(&opts).expect("spawn");
    let spawned = started.elapsed();
    let end = process.wait(Some(Duration::from_secs(10))).expect("end");
    assert!(end.success(), "{end:?}");
    (spawned, started.elapsed())
}

/// Writes one byte in each page of `blocks` (a new value each round, so no write is a no-op).
fn rewrite(blocks: &mut [Vec<u8>], round: usize) -> Duration {
    let started = Instant::now();
    for block in &mut *blocks {
        for page in block.chunks_mut(PAGE_BYTES) {
            page[0] = round as u8;
        }
    }
    std::hint::black_box(&blocks);
    started.elapsed()
}

/// The `p`th percentile in µs (nearest rank).
fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1e6
}
