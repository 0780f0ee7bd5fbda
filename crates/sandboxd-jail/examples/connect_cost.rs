//! Cost of reaching a port inside a sandbox, beside its baseline, as JSON on stdout:
//!
//! * `host_loopback_connect`: a plain `TcpStream::connect` to a listener on the host's own
//!   127.0.0.1 (the floor).
//! * `socket_in_netns`: the helper thread alone (spawn, `setns`, `socket`, join).
//! * `connect_in_netns`: a complete connection to a listener inside a sandbox (helper thread,
//!   non-blocking connect, poll, back to blocking).
//!
//! Each side's listener accepts and drops connections in a loop. Run as root, on a release
//! build: `cargo run --release -p sandboxd-jail --example connect_cost -- [runs]` (default 2000).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use sandboxd_jail::{
    DEFAULT_REGISTRY, IdRegistry, InitCommand, SandboxSpec, build_base_template, socket_in_netns,
    spawn_sandbox,
};

/// Connections measured when no count is given: a few tenths of a second each.
const DEFAULT_RUNS: usize = 2000;

/// Port of the listener inside the sandbox (any port works: the sandbox has its own loopback).
const INNER_PORT: u16 = 8000;

/// Listen backlog: the default `somaxconn` (4096). With std's 128, a burst of connects made while
/// the accepting process waits for a CPU overflows the queue, and the kernel's 1 s SYN
/// retransmit would pollute the figures.
const BACKLOG: i32 = 4096;

/// A loopback listener with a deep backlog (`TcpListener::bind` uses 128).
fn listen(port: u16) -> TcpListener {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let s = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&s, sockopt::ReuseAddr, &true).unwrap();
    use std::os::fd::AsRawFd;
    bind(s.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).unwrap();
    listen(&s, Backlog::new(BACKLOG).unwrap()).unwrap();
    TcpListener::from(s)
}

/// Kills the sandbox even if a measurement panics.
struct Guard(sandboxd_jail::SandboxHandle);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e6;
    format!(
        "{{\"p50_us\": {:.1}, \"p99_us\": {:.1}, \"min_us\": {:.1}}}",
        at(0.50),
        at(0.99),
        at(0.0)
    )
}

fn measure(runs: usize, mut f: impl FnMut()) -> String {
    for _ in 0..runs / 10 {
        f();
    }
    percentiles(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("runs"))
        .unwrap_or(DEFAULT_RUNS);
    if !nix::unistd::geteuid().is_root() {
        println!("{{\"error\": \"needs root\"}}");
        return;
    }
    sandboxd_jail::become_subreaper().unwrap();
    let base = tempfile::Builder::new()
        .prefix("sandboxd-connect-cost-")
        .tempdir_in("/tmp")
        .unwrap();
    let template = base.path().join("template");
    build_base_template(&template).unwrap();

    // Host baseline.
    let host = listen(0);
    let host_addr = host.local_addr().unwrap();
    std::thread::Builder::new()
        .name("host-accept".into())
        .spawn(move || {
            for c in host.incoming() {
                drop(c);
            }
        })
        .unwrap();
    let host_loopback = measure(runs, || drop(TcpStream::connect(host_addr).unwrap()));

    // A sandbox whose payload (a fork of this single-threaded example) accepts forever.
    let id = format!("connect-cost-{}", std::process::id());
    let registry = IdRegistry::open(Path::new(DEFAULT_REGISTRY)).unwrap();
    let range = registry.claim(base.path(), &id).unwrap();
    let spec = SandboxSpec::new(&id, &template, &base.path().join("sb"), range);
    let guard = Guard(
        spawn_sandbox(
            &spec,
            InitCommand::Fork(Box::new(|| {
                let l = listen(INNER_PORT);
                for c in l.incoming() {
                    drop(c);
                }
                0
            })),
        )
        .unwrap(),
    );
    let handle = &guard.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.connect(INNER_PORT, Duration::from_secs(1)).is_err() {
        assert!(Instant::now() < deadline, "inner listener never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ns = std::fs::File::open(handle.netns_path()).unwrap();
    use std::os::fd::AsFd;
    let socket_only = measure(runs, || drop(socket_in_netns(ns.as_fd()).unwrap()));
    let full = measure(runs, || {
        drop(handle.connect(INNER_PORT, Duration::from_secs(1)).unwrap())
    });
    drop(guard);
    let _ = registry.release(range, base.path(), &id);

    println!(
        "{{\"runs\": {runs}, \"host_loopback_connect\": {host_loopback}, \
         \"socket_in_netns\": {socket_only}, \"connect_in_netns\": {full}}}"
    );
}
