//! Throughput floor of the crate: `head -c SIZE /dev/zero` through the pipe path and the PTY path,
//! with one subscriber reading everything, beside a plain `std::process` pipe read as baseline.
//!
//! ```text
//! cargo run --release -p sandboxd-proc --example throughput -- [SIZE_MIB] [CHUNK_KIB,...] [pipe|pty|all] [RING_MIB] [STALL_MS]
//! ```
//!
//! `SIZE_MIB` defaults to 1024 (1 GiB). `CHUNK_KIB` is a comma-separated list of read sizes to try
//! (default: the crate's defaults, 32 KiB for pipes and 16 KiB for the PTY). For each run it prints
//! MB/s from spawn to End, and the bytes the subscriber received and (if it fell behind) lost.
//! `RING_MIB` (default 1) sets the ring budget; `STALL_MS` (default: the crate's 2 s) the stall
//! timeout, where 0 turns flow control off (then a subscriber that is descheduled for a
//! millisecond loses output from a small ring, which shows as "lost").

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_proc::{Io, Process, SpawnOptions, WinSize};

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(1024, |s| s.parse().expect("SIZE_MIB"));
    let chunks: Vec<Option<usize>> = match args.next() {
        None => vec![None],
        Some(list) => list
            .split(',')
            .map(|k| Some(k.parse::<usize>().expect("CHUNK_KIB") * 1024))
            .collect(),
    };
    let which = args.next().unwrap_or_else(|| "all".to_owned());
    let ring_mib: usize = args.next().map_or(1, |s| s.parse().expect("RING_MIB"));
    let ring = ring_mib << 20;
    let stall = args
        .next()
        .map_or(sandboxd_proc::DEFAULT_STALL_TIMEOUT, |s| {
            Duration::from_millis(s.parse().expect("STALL_MS"))
        });
    let bytes = mib << 20;
    let head = format!("head -c {bytes} /dev/zero");

    println!(
        "{mib} MiB of zeros, ring {ring_mib} MiB, stall timeout {stall:?}; MB/s = 10^6 bytes per second, spawn to end"
    );
    if which != "pty" {
        baseline(&head, bytes);
        for &chunk in &chunks {
            run(
                "pipe",
                &head,
                Io::Pipes { stdin: false },
                chunk,
                (ring, stall),
                bytes,
            );
        }
    }
    if which == "pipe" {
        return;
    }
    for &chunk in &chunks {
        // The PTY as envd runs it: cooked mode, output post-processing on.
        run(
            "pty (cooked)",
            &head,
            Io::Pty(WinSize::default()),
            chunk,
            (ring, stall),
            bytes,
        );
        // The PTY in raw mode, no output processing: the line discipline's floor.
        let raw = format!("stty raw -echo; {head}");
        run(
            "pty (raw)",
            &raw,
            Io::Pty(WinSize::default()),
            chunk,
            (ring, stall),
            bytes,
        );
    }
}

/// `std::process` with a 64 KiB read loop: what a bare pipe gives on this machine.
fn baseline(head: &str, bytes: u64) {
    let started = Instant::now();
    let mut child = Command::new("/bin/sh")
        .args(["-c", head])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        let n = out.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    child.wait().expect("wait");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got, bytes);
    println!(
        "{:<14} {:>8} {:>9.0} MB/s",
        "baseline pipe",
        "64 KiB",
        bytes as f64 / secs / 1e6
    );
}

fn run(
    label: &str,
    script: &str,
    io: Io,
    chunk: Option<usize>,
    (ring, stall): (usize, Duration),
    bytes: u64,
) {
    let mut opts = SpawnOptions::new("/bin/sh").args(["-c", script]).io(io);
    opts.path = Some("/usr/bin:/bin".into());
    opts.read_chunk_bytes = chunk;
    opts.ring_bytes = ring;
    opts.stall_timeout = stall;
    let started = Instant::now();
    let (process, mut sub) = Process::spawn_subscribed(&opts).expect("spawn");
    let (mut got, mut lost, mut batches) = (0u64, 0u64, 0u64);
    let end = loop {
        let batch = sub.recv(4 << 20, Some(Duration::from_secs(120)));
        batches += 1;
        if let Some(lag) = batch.lagged {
            lost += lag.bytes;
        }
        got += batch.bytes() as u64;
        if let Some(end) = batch.end {
            break end;
        }
    };
    let secs = started.elapsed().as_secs_f64();
    assert!(end.success(), "{end:?}");
    let chunk_kib = chunk.unwrap_or(match io {
        Io::Pipes { .. } => sandboxd_proc::PIPE_CHUNK_BYTES,
        Io::Pty(_) => sandboxd_proc::PTY_CHUNK_BYTES,
    }) >> 10;
    let chunks = process.now_cursor().seq;
    println!(
        "{label:<14} {:>5} KiB {:>9.0} MB/s  ({} chunks, avg {:.1} KiB; {batches} batches; subscriber got {got} B, lost {lost} B)",
        chunk_kib,
        (got + lost) as f64 / secs / 1e6,
        chunks,
        (got + lost) as f64 / chunks.max(1) as f64 / 1024.0,
    );
    // In cooked mode the PTY would only turn "\n" into "\r\n"; zeros pass through unchanged.
    assert!(got + lost >= bytes);
}
