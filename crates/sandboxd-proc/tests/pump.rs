//! `pump`: a subscriber's output written to a socket as chunked Connect data frames, over a
//! non-blocking Unix socket pair with a real child: every byte arrives framed and in order, a peer
//! that leaves ends it as `Closed` (the process goes on), a cancel cuts it between or inside a frame
//! (the rest of that frame returned), and a lag is reported instead of written (after whole frames,
//! when the peer stopped reading past the stall timeout).

mod common;

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::sh;
use nix::sys::eventfd::{EfdFlags, EventFd};
use sandboxd_proc::pump::{Framing, Pumped, pump};
use sandboxd_proc::{Process, StartAt};

fn framing() -> Framing {
    Framing {
        stdout: vec![1, 2, 1],
        stderr: vec![1, 2, 2],
        pty: vec![1, 2, 3],
        keepalive: b"7\r\n\x00\x00\x00\x00\x02\x0a\x00\r\n".to_vec(),
        keepalive_interval: Duration::from_secs(60),
    }
}

/// Parses chunked frames from `raw`: the stdout payload bytes (field path 1.2.1) and the count of
/// keepalives, checking every chunk and envelope.
fn parse(mut raw: &[u8]) -> (Vec<u8>, usize) {
    let (mut out, mut keepalives) = (Vec::new(), 0);
    while !raw.is_empty() {
        let line = raw.iter().position(|&b| b == b'\r').unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line]).unwrap(), 16).unwrap();
        let chunk = &raw[line + 2..line + 2 + size];
        assert_eq!(&raw[line + 2 + size..line + 4 + size], b"\r\n");
        raw = &raw[line + 4 + size..];
        assert_eq!(chunk[0], 0);
        let len = u32::from_be_bytes(chunk[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 5, chunk.len());
        let mut message = &chunk[5..];
        let mut depth = 0;
        while depth < 3 && !message.is_empty() {
            let (tag, mut i, mut n, mut shift) = (message[0], 1, 0usize, 0);
            loop {
                n |= usize::from(message[i] & 0x7f) << shift;
                shift += 7;
                i += 1;
                if message[i - 1] < 0x80 {
                    break;
                }
            }
            assert_eq!(tag & 7, 2);
            message = &message[i..i + n];
            depth += 1;
        }
        if depth == 3 {
            out.extend_from_slice(message);
        } else {
            keepalives += 1;
        }
    }
    (out, keepalives)
}

#[test]
fn every_byte_arrives_framed_and_in_order_then_the_end() {
    const TOTAL: usize = 8 << 20;
    // Subscribed from the start, as the agent is: a subscriber added after `spawn` could begin
    // after output the ring had let go of with nobody to wait for (tests/flow.rs).
    let (_process, mut sub) =
        Process::spawn_subscribed(&sh(&format!("head -c {TOTAL} /dev/zero"))).unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cancel = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let reader = std::thread::spawn(move || {
        let mut raw = Vec::new();
        theirs.read_to_end(&mut raw).unwrap();
        raw
    });
    let outcome = pump(&mut sub, ours.as_fd(), cancel.as_fd(), &framing(), 1 << 20).unwrap();
    assert_eq!(outcome, Pumped::End);
    assert!(
        sub.next_batch(1 << 20).end.is_some(),
        "the end is left for the caller"
    );
    drop(ours);
    let (stdout, keepalives) = parse(&reader.join().unwrap());
    assert_eq!(keepalives, 0);
    assert_eq!(stdout.len(), TOTAL);
    assert!(stdout.iter().all(|&b| b == 0));
}

#[test]
fn a_peer_that_leaves_ends_it_and_the_process_goes_on() {
    let process = Process::spawn(&sh("exec cat /dev/zero")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cancel = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0; 1 << 20];
        let mut got = 0;
        while got < 4 << 20 {
            got += theirs.read(&mut buf).unwrap();
        }
    });
    let outcome = pump(&mut sub, ours.as_fd(), cancel.as_fd(), &framing(), 1 << 20).unwrap();
    reader.join().unwrap();
    assert_eq!(outcome, Pumped::Closed);
    assert!(process.end().is_none(), "the process outlives its stream");
    process.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn a_cancel_leaves_whole_frames_with_the_rest_it_returns() {
    let process = Process::spawn(&sh("exec cat /dev/zero")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cancel = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let outcome = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300)); // nobody reads: the socket fills
            cancel.write(1).unwrap();
        });
        pump(&mut sub, ours.as_fd(), cancel.as_fd(), &framing(), 1 << 20).unwrap()
    });
    // Cut short in a frame (the socket filled mid-frame) or between two (it waits for the socket
    // to drain before taking more output): either way, what was written plus the rest is whole.
    let Pumped::Cancelled(rest) = outcome else {
        panic!("{outcome:?}")
    };
    drop(sub);
    let mut raw = Vec::new();
    ours.set_nonblocking(false).unwrap();
    theirs.set_nonblocking(true).unwrap();
    let mut buf = vec![0; 1 << 20];
    while let Ok(n) = theirs.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    raw.extend_from_slice(&rest);
    let (stdout, _) = parse(&raw);
    assert!(!stdout.is_empty() && stdout.iter().all(|&b| b == 0));
    process.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn a_peer_that_leaves_while_the_process_is_quiet_ends_it_at_once() {
    // Nothing to write, so only the hang-up (POLLRDHUP) can tell: not at the process's next output.
    let process = Process::spawn(&sh("printf x; exec sleep 5")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cancel = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0; 64];
        let _ = theirs.read(&mut buf).unwrap(); // the frame with "x", then leave
    });
    let started = std::time::Instant::now();
    let outcome = pump(&mut sub, ours.as_fd(), cancel.as_fd(), &framing(), 1 << 20).unwrap();
    reader.join().unwrap();
    assert_eq!(outcome, Pumped::Closed);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    process.signal(nix::sys::signal::Signal::SIGKILL).unwrap();
}

#[test]
fn a_peer_that_stops_reading_past_the_stall_timeout_gets_whole_frames_then_the_lag() {
    // While the socket is full the pump takes no output: the ring's stall policy lets the process
    // run on, and once the peer reads again what it had is followed by the lag, not by a torn frame.
    const TOTAL: usize = 32 << 20;
    let mut opts = sh(&format!("head -c {TOTAL} /dev/zero"));
    opts.stall_timeout = Duration::from_millis(200);
    let process = Process::spawn(&opts).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cancel = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
    let reader = std::thread::spawn(move || {
        let mut raw = vec![0; 1 << 20];
        theirs.read_exact(&mut raw).unwrap();
        std::thread::sleep(Duration::from_millis(1500)); // stalled: the process ends meanwhile
        theirs.read_to_end(&mut raw).unwrap();
        raw
    });
    let outcome = pump(&mut sub, ours.as_fd(), cancel.as_fd(), &framing(), 1 << 20).unwrap();
    drop(ours);
    let Pumped::Lagged(lost) = outcome else {
        panic!("{outcome:?}")
    };
    let (stdout, _) = parse(&reader.join().unwrap());
    assert!(lost > 0);
    assert!(
        stdout.len() as u64 + lost <= TOTAL as u64,
        "{} + {lost}",
        stdout.len()
    );
}
