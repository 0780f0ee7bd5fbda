//! Pipe-mode processes: exit statuses, stream separation, environment, cwd, stdin, users,
//! signals, exec failures and concurrency, all with real processes.

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::{PATH, collect, eventually, is_dead, read_to_end, run, sh};
use sandboxd_proc::{Io, Process, Signal, SpawnError, SpawnOptions, StartAt, User};

#[test]
fn exit_zero() {
    let out = run(&sh("exit 0"));
    let end = out.end();
    assert!(end.exited);
    assert_eq!(end.exit_code, 0);
    assert_eq!(end.status, "exit status 0");
    assert_eq!(end.error, None);
}

#[test]
fn exit_three() {
    let end = run(&sh("exit 3")).end.unwrap();
    assert!(end.exited);
    assert_eq!(end.exit_code, 3);
    assert_eq!(end.status, "exit status 3");
    assert_eq!(end.error.as_deref(), Some("exit status 3"));
}

#[test]
fn killed_by_sigkill() {
    let end = run(&sh("kill -9 $$")).end.unwrap();
    assert!(!end.exited);
    assert_eq!(end.exit_code, -1);
    assert_eq!(end.status, "signal: killed");
    assert_eq!(end.error.as_deref(), Some("signal: killed"));
    assert_eq!(end.signal, Some(9));
}

#[test]
fn sigterm_from_signal_method() {
    let process = Process::spawn(&sh("echo ready; exec sleep 100")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let first = sub.recv(usize::MAX, Some(Duration::from_secs(10)));
    assert_eq!(&*first.chunks[0].data, b"ready\n");
    process.signal(Signal::SIGTERM).unwrap();
    let end = process.wait(Some(Duration::from_secs(10))).expect("ended");
    assert_eq!(end.status, "signal: terminated");
    assert_eq!(end.error.as_deref(), Some("signal: terminated"));
    assert_eq!(end.exit_code, -1);
}

#[test]
fn stdout_and_stderr_are_separate() {
    let out = run(&sh("echo out; echo err >&2; echo out2"));
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");
    assert!(out.pty.is_empty());
}

#[test]
fn environment_is_not_inherited() {
    // Cargo sets CARGO_PKG_NAME (and much more) for this test process; none of it may leak.
    assert!(std::env::var_os("CARGO_PKG_NAME").is_some());
    let me = User::current().unwrap();
    let mut opts = SpawnOptions::new("env").env("FOO", "bar");
    opts.path = Some(PATH.into());
    let out = run(&opts);
    assert!(out.end().success(), "{:?}", out.end());
    let mut lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    lines.sort();
    let mut want = vec![
        format!("HOME={}", me.home.display()),
        format!("USER={}", me.name),
        format!("LOGNAME={}", me.name),
        format!("PATH={PATH}"),
        "FOO=bar".to_owned(),
    ];
    want.sort();
    assert_eq!(lines, want);
}

#[test]
fn caller_env_wins() {
    let opts = sh("echo $HOME $USER $X")
        .env("HOME", "/custom")
        .env("X", "1")
        .env("X", "2");
    assert_eq!(
        run(&opts).stdout_str(),
        "/custom root 2\n".replace("root", &User::current().unwrap().name)
    );
}

#[test]
fn cwd_is_applied_and_checked() {
    let mut opts = sh("pwd");
    opts.cwd = Some("/tmp".into());
    assert_eq!(run(&opts).stdout_str(), "/tmp\n");

    opts.cwd = Some("/does/not/exist".into());
    let err = Process::spawn(&opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("/does/not/exist"), "{err}");
}

#[test]
fn stdin_disabled_reads_eof_immediately() {
    let started = Instant::now();
    let mut opts = SpawnOptions::new("cat");
    opts.path = Some(PATH.into());
    let process = Process::spawn(&opts).unwrap();
    let out = collect(&process);
    assert!(out.end().success());
    assert!(out.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = process
        .write_stdin(b"x", Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    process.close_stdin().unwrap();
}

#[test]
fn stdin_pipe_write_and_close() {
    let mut opts = SpawnOptions::new("cat").io(Io::Pipes { stdin: true });
    opts.path = Some(PATH.into());
    let process = Process::spawn(&opts).unwrap();
    process
        .write_stdin(b"hello ", Duration::from_secs(5))
        .unwrap();
    process
        .write_stdin(b"world", Duration::from_secs(5))
        .unwrap();
    // cat keeps running until stdin closes.
    assert!(process.wait(Some(Duration::from_millis(200))).is_none());
    process.close_stdin().unwrap();
    process.close_stdin().unwrap(); // idempotent
    let out = collect(&process);
    assert_eq!(out.stdout, b"hello world");
    assert!(out.end().success());
    let err = process
        .write_stdin(b"late", Duration::from_secs(1))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BrokenPipe);
    assert_eq!(
        process
            .write_pty(b"x", Duration::from_secs(1))
            .unwrap_err()
            .kind(),
        ErrorKind::Unsupported
    );
}

#[test]
fn stdin_write_times_out_instead_of_blocking() {
    let process = Process::spawn(&sh("exec sleep 100").io(Io::Pipes { stdin: true })).unwrap();
    let started = Instant::now();
    let err = process
        .write_stdin(&vec![b'x'; 4 << 20], Duration::from_millis(300))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut);
    assert!(err.to_string().contains("of 4194304 bytes"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    process.signal(Signal::SIGKILL).unwrap();
    assert_eq!(
        process.wait(Some(Duration::from_secs(10))).unwrap().status,
        "signal: killed"
    );
}

#[test]
fn exec_failure_names_the_binary() {
    let err = Process::spawn(&SpawnOptions::new("/nonexistent/tool")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("/nonexistent/tool"), "{err}");
    let inner = err.get_ref().unwrap().downcast_ref::<SpawnError>().unwrap();
    assert_eq!(inner.program(), "/nonexistent/tool");
    assert_eq!(inner.os_error().raw_os_error(), Some(libc::ENOENT));

    // A file without any execute bit: EACCES even for root.
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("not-executable");
    std::fs::write(&plain, "#!/bin/sh\n").unwrap();
    let err = Process::spawn(&SpawnOptions::new(&plain)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.to_string().contains("not-executable"), "{err}");

    // A bare name not on PATH.
    let mut opts = SpawnOptions::new("no-such-command-xyz");
    opts.path = Some(PATH.into());
    let err = Process::spawn(&opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("no-such-command-xyz"), "{err}");
}

#[test]
fn oom_score_adj_is_set_in_the_child_only() {
    let ours = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
    let mut opts = sh("cat /proc/self/oom_score_adj");
    assert_eq!(run(&opts).stdout_str(), ours, "None inherits ours");
    opts.oom_score_adj = Some(100);
    assert_eq!(run(&opts).stdout_str(), "100\n");
    assert_eq!(
        std::fs::read_to_string("/proc/self/oom_score_adj").unwrap(),
        ours
    );
    // Out of range: the kernel refuses the write, and the process runs anyway.
    opts.oom_score_adj = Some(5000);
    let out = run(&opts);
    assert!(out.end().success());
    assert_eq!(out.stdout_str(), ours);
}

#[test]
fn runs_as_another_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut opts =
        sh("id -u; id -g; id -G; echo $HOME $USER $LOGNAME; cat /proc/self/oom_score_adj");
    opts.user = Some(User::lookup("nobody").unwrap());
    opts.oom_score_adj = Some(100);
    let out = run(&opts);
    assert!(
        out.end().success(),
        "{:?} {:?}",
        out.end(),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines[0], "65534");
    assert_eq!(lines[1], "65534");
    assert!(
        !lines[2].split(' ').any(|g| g == "0"),
        "kept root's groups: {}",
        lines[2]
    );
    assert_eq!(lines[3], "/nonexistent nobody nobody");
    assert_eq!(
        lines[4], "100",
        "oom_score_adj is written before the user switch"
    );
}

#[test]
fn group_kill_reaches_grandchildren() {
    let process = Process::spawn(&sh("sleep 100 & echo $!; wait")).unwrap();
    let mut sub = process.subscribe(StartAt::Oldest).unwrap();
    let batch = sub.recv(usize::MAX, Some(Duration::from_secs(10)));
    let grandchild: i32 = String::from_utf8_lossy(&batch.chunks[0].data)
        .trim()
        .parse()
        .unwrap();
    assert!(!is_dead(grandchild));
    let started = Instant::now();
    process.signal(Signal::SIGKILL).unwrap();
    let end = process.wait(Some(Duration::from_secs(10))).expect("ended");
    assert_eq!(end.status, "signal: killed");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(eventually(Duration::from_secs(5), || is_dead(grandchild)));
}

#[test]
fn grandchild_holding_the_pipe_delays_end_and_can_be_killed() {
    // The shell exits at once, but the background sleep keeps stdout open: envd waits for EOF on
    // both pipes before `wait()`, so the end only comes once the group is killed. The signal
    // must work while the shell is a zombie.
    let process = Process::spawn(&sh("sleep 100 & exit 7")).unwrap();
    assert!(process.wait(Some(Duration::from_millis(300))).is_none());
    process.signal(Signal::SIGKILL).unwrap();
    let end = process.wait(Some(Duration::from_secs(10))).expect("ended");
    assert_eq!(end.status, "exit status 7");
}

#[test]
fn no_zombie_and_no_signal_after_reap() {
    let process = Process::spawn(&sh("exit 0")).unwrap();
    process.wait(Some(Duration::from_secs(10))).unwrap();
    let pid = process.pid();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} not reaped"
    );
    let err = process.signal(Signal::SIGKILL).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
}

#[test]
fn reader_thread_is_named() {
    let process = Process::spawn(&sh("exec sleep 100")).unwrap();
    let me = std::process::id();
    let want = format!("proc-{}", process.pid());
    let found = eventually(Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{me}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == want)
            })
    });
    process.signal(Signal::SIGKILL).unwrap();
    assert!(found, "no thread named {want}");
}

#[test]
fn hundred_concurrent_processes() {
    let processes: Vec<Process> = (0..100)
        .map(|i| Process::spawn(&sh(&format!("echo {i}; echo e{i} >&2; exit {}", i % 7))).unwrap())
        .collect();
    let started = Instant::now();
    for (i, process) in processes.iter().enumerate() {
        let out = collect(process);
        assert_eq!(out.stdout_str(), format!("{i}\n"));
        assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
        assert_eq!(out.end().exit_code, (i % 7) as i32);
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// A child that floods its stdout 4 KiB a write (`head`'s size for a pipe) reaches a subscriber
/// that keeps up in large chunks: a reader that has emptied a flooding pipe waits a moment before
/// it polls again (`reader.rs`, `PIPE_FLOOD_NAP`), so the pipe fills meanwhile. Without the wait
/// the reader could follow the child write by write for the whole flood, a few KiB a chunk (and
/// a wake-up and a frame for each, further on).
#[test]
fn a_flood_written_4_kib_at_a_time_is_read_in_large_chunks() {
    const SIZE: usize = 8 << 20;
    let (process, sub) =
        Process::spawn_subscribed(&sh(&format!("head -c {SIZE} /dev/zero"))).expect("spawn");
    let out = read_to_end(&process, sub, Duration::from_secs(20));
    assert!(out.end().success(), "{:?}", out.end());
    assert_eq!(out.stdout.len(), SIZE);
    let chunks = out.chunks;
    // 64 KiB a chunk on average, sixteen of the child's writes. Measured: 35-49 chunks, quiet or
    // beside four busy loops; without the wait 230-412 on a quiet host (35-285 beside the loops).
    assert!(
        chunks <= SIZE / (64 << 10),
        "{chunks} chunks for {SIZE} bytes"
    );
}
