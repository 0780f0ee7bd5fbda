//! PTY-mode processes: a real terminal, its size, resizing, input, and EIO as end-of-file.

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::{collect, run, sh_pty};
use sandboxd_proc::{
    Io, PTY_CHUNK_BYTES, PTY_GATHER_BYTES, Process, Signal, SpawnError, SpawnOptions, StartAt,
    Stream, WinSize,
};

#[test]
fn tty_is_a_pts() {
    let out = run(&sh_pty("tty", 80, 24));
    assert!(out.end().success(), "{:?}", out.end());
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert!(
        out.pty_str().starts_with("/dev/pts/"),
        "{:?}",
        out.pty_str()
    );
}

#[test]
fn is_session_leader_with_controlling_terminal() {
    // `ps -o` is not always installed; read our own stat instead: session id == pid, and a tty.
    let out = run(&sh_pty("cat /proc/$$/stat", 80, 24));
    let stat = out.pty_str();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After ")": state ppid pgrp session tty_nr ...
    let (pgrp, session, tty_nr) = (fields[2], fields[3], fields[4]);
    let pid = stat.split_whitespace().next().unwrap();
    assert_eq!(pgrp, pid);
    assert_eq!(session, pid);
    assert_ne!(tty_nr, "0");
}

#[test]
fn size_matches_and_resize_works() {
    let process = Process::spawn(&sh_pty("stty size; read x; stty size", 120, 40)).unwrap();
    assert_eq!(
        process.size().unwrap(),
        WinSize {
            cols: 120,
            rows: 40
        }
    );
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text.contains("40 120") {
        assert!(Instant::now() < deadline, "no size in {text:?}");
        let batch = sub.recv(usize::MAX, Some(Duration::from_secs(1)));
        for chunk in batch.chunks {
            assert_eq!(chunk.stream, Stream::Pty);
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
    }
    process
        .resize(WinSize {
            cols: 100,
            rows: 30,
        })
        .unwrap();
    assert_eq!(
        process.size().unwrap(),
        WinSize {
            cols: 100,
            rows: 30
        }
    );
    process.write_pty(b"\n", Duration::from_secs(5)).unwrap();
    let out = collect(&process);
    assert!(out.end().success(), "{:?}", out.end());
    assert!(out.pty_str().contains("30 100"), "{:?}", out.pty_str());
}

#[test]
fn input_is_echoed_and_read() {
    let process = Process::spawn(&sh_pty("read line; echo got:$line", 80, 24)).unwrap();
    process
        .write_pty(b"hello\n", Duration::from_secs(5))
        .unwrap();
    let out = collect(&process);
    let text = out.pty_str();
    // The line discipline echoes the input and turns "\n" into "\r\n".
    assert!(text.contains("hello\r\n"), "{text:?}");
    assert!(text.contains("got:hello\r\n"), "{text:?}");
}

#[test]
fn ctrl_d_ends_cat_and_eio_ends_the_stream() {
    let mut opts = SpawnOptions::new("/bin/cat").io(Io::Pty(WinSize::default()));
    opts.path = Some(common::PATH.into());
    let process = Process::spawn(&opts).unwrap();
    process
        .write_pty(b"abc\n\x04", Duration::from_secs(5))
        .unwrap();
    let out = collect(&process);
    assert!(out.end().success());
    assert!(out.pty_str().contains("abc"), "{:?}", out.pty_str());
}

#[test]
fn output_written_just_before_exit_is_not_lost() {
    let out = run(&sh_pty(
        "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done",
        80,
        24,
    ));
    let text = out.pty_str();
    assert!(text.contains("line0\r\n"));
    assert!(
        text.ends_with("line1999\r\n"),
        "{:?}",
        &text[text.len().saturating_sub(40)..]
    );
}

#[test]
fn pipe_only_operations_are_refused() {
    let process = Process::spawn(&sh_pty("exec sleep 100", 80, 24)).unwrap();
    assert_eq!(
        process
            .write_stdin(b"x", Duration::from_secs(1))
            .unwrap_err()
            .kind(),
        ErrorKind::Unsupported
    );
    assert_eq!(
        process.close_stdin().unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    process.signal(sandboxd_proc::Signal::SIGKILL).unwrap();
    assert_eq!(
        process.wait(Some(Duration::from_secs(10))).unwrap().status,
        "signal: killed"
    );
}

#[test]
fn resize_without_pty_is_refused() {
    let process = Process::spawn(&common::sh("exit 0")).unwrap();
    assert_eq!(
        process.resize(WinSize::default()).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    process.wait(Some(Duration::from_secs(10))).unwrap();
}

#[test]
fn exec_failure_names_the_binary() {
    let opts = SpawnOptions::new("/nonexistent/shell").io(Io::Pty(WinSize::default()));
    let err = Process::spawn(&opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("/nonexistent/shell"), "{err}");
    assert!(
        err.get_ref()
            .unwrap()
            .downcast_ref::<SpawnError>()
            .is_some()
    );
}

#[test]
fn a_flood_arrives_whole_and_in_order_in_gathered_chunks() {
    // ~6.9 MB of numbered lines, each "\n" turned into "\r\n" by the line discipline (ONLCR).
    let (process, mut sub) = Process::spawn_subscribed(&sh_pty("seq 1 1000000", 80, 24)).unwrap();
    let expected: String = (1..=1_000_000).map(|i| format!("{i}\r\n")).collect();
    let mut got = Vec::with_capacity(expected.len());
    let mut largest = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let end = loop {
        assert!(
            Instant::now() < deadline,
            "no end after {} bytes",
            got.len()
        );
        let batch = sub.recv(usize::MAX, Some(Duration::from_secs(5)));
        assert!(batch.lagged.is_none(), "{:?}", batch.lagged);
        for chunk in batch.chunks {
            assert_eq!(chunk.stream, Stream::Pty);
            largest = largest.max(chunk.data.len());
            got.extend_from_slice(&chunk.data);
        }
        if let Some(end) = batch.end {
            break end;
        }
    };
    assert!(end.success(), "{end:?}");
    assert_eq!(got.len(), expected.len());
    let first_difference = got
        .iter()
        .zip(expected.as_bytes())
        .position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "out of order or altered");
    // The line discipline hands over ~4 KiB per read: larger chunks are reads gathered while the
    // process flooded, never more than the gathering bound.
    assert!(
        largest > PTY_CHUNK_BYTES && largest <= PTY_GATHER_BYTES,
        "largest chunk {largest} bytes"
    );
    drop(process);
}

#[test]
fn the_tail_of_a_flood_arrives_while_the_process_goes_quiet() {
    // The last reads of the flood are gathered; they must go out once no more output follows
    // (within PTY_GATHER_WAIT), not wait for the process's next output or its end.
    let total = 1_000_000;
    let process = Process::spawn(&sh_pty(
        &format!("head -c {total} /dev/zero; sleep 60"),
        80,
        24,
    ))
    .unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got < total && Instant::now() < deadline {
        let batch = sub.recv(usize::MAX, Some(Duration::from_secs(1)));
        assert!(
            batch.end.is_none(),
            "the process ended early: {:?}",
            batch.end
        );
        got += batch.bytes();
    }
    assert_eq!(
        got, total,
        "the flood's tail did not arrive while the process slept"
    );
    process.signal(Signal::SIGKILL).unwrap();
    assert!(!collect(&process).end().success());
}

#[test]
fn the_master_is_closed_with_the_end() {
    // Closed, not kept with the ended process (which the agent keeps for late readers): every
    // descriptor kept open is copied into, and closed again by, each later child.
    let process = Process::spawn(&sh_pty("echo bye", 80, 24)).unwrap();
    let c = collect(&process);
    assert_eq!(c.end().exit_code, 0);
    assert!(process.has_pty());
    for err in [
        process.write_pty(b"x", Duration::from_secs(1)).unwrap_err(),
        process.resize(WinSize::default()).unwrap_err(),
        process.size().unwrap_err(),
    ] {
        assert_eq!(err.kind(), ErrorKind::BrokenPipe, "{err}");
    }
}
