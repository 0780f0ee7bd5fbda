//! Helpers shared by the integration tests: spawn a shell command and collect all its output.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use sandboxd_proc::{End, Io, Process, SpawnOptions, StartAt, Stream, Subscriber};

/// The PATH the tests hand to children.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Options to run `script` with `/bin/sh -c`.
pub fn sh(script: &str) -> SpawnOptions {
    let mut opts = SpawnOptions::new("/bin/sh").args(["-c", script]);
    opts.path = Some(PATH.into());
    opts
}

/// Options to run `script` with `/bin/sh -c` on a PTY of `cols` × `rows`.
pub fn sh_pty(script: &str, cols: u16, rows: u16) -> SpawnOptions {
    sh(script).io(Io::Pty(sandboxd_proc::WinSize { cols, rows }))
}

/// Everything a process printed, by stream, and how it ended.
#[derive(Debug, Default)]
pub struct Collected {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub end: Option<End>,
    /// How many chunks the output came in (one per read of the reader thread).
    pub chunks: usize,
}

impl Collected {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn pty_str(&self) -> String {
        String::from_utf8_lossy(&self.pty).into_owned()
    }
    pub fn end(&self) -> &End {
        self.end.as_ref().expect("no end")
    }
}

/// Reads a process's output from the oldest retained chunk until its end, failing on lag or if
/// it takes longer than `limit`.
pub fn collect_within(process: &Process, limit: Duration) -> Collected {
    let sub = process.subscribe(StartAt::Oldest).expect("subscribe");
    read_to_end(process, sub, limit)
}

/// Reads `sub` (a subscriber of `process`) until the process's end, failing on lag or if it takes
/// longer than `limit`.
pub fn read_to_end(process: &Process, mut sub: Subscriber, limit: Duration) -> Collected {
    let deadline = Instant::now() + limit;
    let mut out = Collected::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "process {} did not end in {limit:?}",
            process.pid()
        );
        let batch = sub.recv(usize::MAX, Some(left));
        assert!(batch.lagged.is_none(), "unexpected lag {:?}", batch.lagged);
        out.chunks += batch.chunks.len();
        for chunk in &batch.chunks {
            match chunk.stream {
                Stream::Stdout => out.stdout.extend_from_slice(&chunk.data),
                Stream::Stderr => out.stderr.extend_from_slice(&chunk.data),
                Stream::Pty => out.pty.extend_from_slice(&chunk.data),
            }
        }
        if let Some(end) = batch.end {
            out.end = Some(end);
            return out;
        }
    }
}

/// [`collect_within`] with a 20 s limit.
pub fn collect(process: &Process) -> Collected {
    collect_within(process, Duration::from_secs(20))
}

/// Spawns `opts` and collects everything.
pub fn run(opts: &SpawnOptions) -> Collected {
    let process = Process::spawn(opts).expect("spawn");
    collect(&process)
}

/// True when `pid` no longer exists or is a zombie (in a container the reaper of orphans may be
/// slow or absent, so a zombie counts as dead).
pub fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            state.starts_with('Z') || state.starts_with('X')
        }
    }
}

/// Polls `cond` every 10 ms for up to `limit`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}
