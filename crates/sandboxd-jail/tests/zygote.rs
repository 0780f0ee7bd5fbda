//! Tests that need a single-threaded process, so no libtest harness (`harness = false`): a
//! zygote-style `fork` + [`enter_sandbox`], a sandbox that outlives the runtime that spawned it,
//! and the refusal of `enter_sandbox` in a multithreaded process. Root only; skips otherwise.
// `fork` is unsafe; here it is exactly what is being tested, in a single-threaded process.
#![allow(unsafe_code)]

mod common;

use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pipe};
use sandboxd_jail::{
    Entered, InitCommand, SandboxHandle, become_subreaper, enter_sandbox, enter_sandbox_then,
    kill_sandbox, list_sandboxes, spawn_sandbox,
};

/// Kills sandbox `id` (and removes its cgroup) when dropped, even if a check panicked.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = kill_sandbox(&common::instance(), &self.0);
        common::remove_empty_cgroup_parents();
    }
}

fn read_all(fd: OwnedFd) -> String {
    let mut s = String::new();
    fs::File::from(fd).read_to_string(&mut s).unwrap();
    s
}

fn wait_for_file(path: &std::path::Path) -> String {
    let deadline = Instant::now() + common::RUN_TIMEOUT;
    loop {
        if let Ok(s) = fs::read_to_string(path)
            && s.ends_with('\n')
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the Python zygote does: fork, call `enter_sandbox` in the child, continue as the payload.
fn zygote_child_enters_sandbox() {
    let (spec, _dir) = common::spec("zygote");
    let _cleanup = Cleanup(spec.id.clone());
    let (r, w) = pipe().unwrap();
    // SAFETY: this test binary is single-threaded here (no harness), like the Python zygote.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(r);
            match enter_sandbox(&spec) {
                Ok(Entered::Inside) => {
                    drop(w);
                    let facts = format!(
                        "pid={} hostname={} cwd={} work-visible={} cgroup={}\n",
                        std::process::id(),
                        fs::read_to_string("/etc/hostname").unwrap().trim(),
                        std::env::current_dir().unwrap().display(),
                        std::path::Path::new("/work").exists(),
                        fs::read_to_string("/proc/self/cgroup")
                            .unwrap()
                            .lines()
                            .all(|l| l.ends_with(":/")),
                    );
                    fs::write("/tmp/zygote", facts).unwrap();
                    // Stay up until the "runtime" kills the sandbox.
                    loop {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                Ok(Entered::Outside { init_pid }) => {
                    nix::unistd::write(&w, format!("P{init_pid}").as_bytes()).unwrap();
                    std::process::exit(0)
                }
                Err(e) => {
                    nix::unistd::write(&w, format!("E{e}").as_bytes()).unwrap();
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(w);
            let msg = read_all(r);
            assert_eq!(
                waitpid(child, None).unwrap(),
                WaitStatus::Exited(child, 0),
                "{msg}"
            );
            let init_pid: i32 = msg
                .strip_prefix('P')
                .unwrap_or_else(|| panic!("enter_sandbox failed: {msg}"))
                .parse()
                .unwrap();
            let handle = SandboxHandle::adopt(&spec.instance, &spec.id, init_pid)
                .unwrap()
                .with_merged_dir(spec.dir.join("merged"));
            let facts = wait_for_file(&spec.upper_dir().unwrap().join("tmp/zygote"));
            assert_eq!(
                facts.trim(),
                format!(
                    "pid=2 hostname={} cwd=/ work-visible=false cgroup=true",
                    spec.id
                )
            );
            handle.kill().unwrap();
            assert!(
                !list_sandboxes(&common::instance())
                    .unwrap()
                    .contains(&spec.id)
            );
        }
    }
}

/// The zygote's way since `enter_sandbox_then`: the init is a clone sharing A's memory and forks
/// the payload, which runs a closure. The payload must be the init's child (PID 2, parent PID 1),
/// so that the init sees it exit and exits with its status: a payload forked by A instead would be
/// re-parented, when A exits, through A's pid namespace (to this process, a subreaper), and the
/// init would never see it.
fn zygote_child_enters_sandbox_then() {
    let (spec, _dir) = common::spec("zygote-then");
    let _cleanup = Cleanup(spec.id.clone());
    // The init comes back to this process when A exits, so its exit status can be read.
    become_subreaper().unwrap();
    let (r, w) = pipe().unwrap();
    // The payload exits once this process has adopted the init (end of file on `go`).
    let (go_r, go_w) = pipe().unwrap();
    // SAFETY: this test binary is single-threaded here (no harness), like the Python zygote.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(r);
            drop(go_w);
            let mut report = Some(w);
            let mut go = Some(go_r);
            let mut payload = || -> i32 {
                // The payload's copy of A's report pipe (A's descriptors are the payload's).
                drop(report.take());
                let mut rest = Vec::new();
                fs::File::from(go.take().unwrap())
                    .read_to_end(&mut rest)
                    .unwrap();
                let facts = format!(
                    "pid={} ppid={} hostname={} cwd={} work-visible={}\n",
                    std::process::id(),
                    nix::unistd::getppid(),
                    fs::read_to_string("/etc/hostname").unwrap().trim(),
                    std::env::current_dir().unwrap().display(),
                    std::path::Path::new("/work").exists(),
                );
                fs::write("/tmp/zygote-then", facts).unwrap();
                // A status the init must pass on.
                7
            };
            let entered = enter_sandbox_then(&spec, &mut payload);
            let w = report.take().unwrap();
            match entered {
                Ok(init_pid) => {
                    nix::unistd::write(&w, format!("P{init_pid}").as_bytes()).unwrap();
                    std::process::exit(0)
                }
                Err(e) => {
                    nix::unistd::write(&w, format!("E{e}").as_bytes()).unwrap();
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(w);
            drop(go_r);
            let msg = read_all(r);
            assert_eq!(
                waitpid(child, None).unwrap(),
                WaitStatus::Exited(child, 0),
                "{msg}"
            );
            let init_pid: i32 = msg
                .strip_prefix('P')
                .unwrap_or_else(|| panic!("enter_sandbox_then failed: {msg}"))
                .parse()
                .unwrap();
            let handle = SandboxHandle::adopt(&spec.instance, &spec.id, init_pid)
                .unwrap()
                .with_merged_dir(spec.dir.join("merged"));
            drop(go_w);
            assert!(
                handle.wait(common::RUN_TIMEOUT).unwrap(),
                "the init did not exit after its payload"
            );
            assert_eq!(handle.exit_code(), Some(7));
            let facts = wait_for_file(&spec.upper_dir().unwrap().join("tmp/zygote-then"));
            assert_eq!(
                facts.trim(),
                format!("pid=2 ppid=1 hostname={} cwd=/ work-visible=false", spec.id)
            );
            handle.kill().unwrap();
        }
    }
}

/// The runtime spawns a sandbox and is then SIGKILLed; the sandbox keeps running and a new
/// runtime adopts and kills it.
fn sandbox_survives_its_runtime() {
    let (spec, _dir) = common::spec("survive");
    let _cleanup = Cleanup(spec.id.clone());
    let (r, w) = pipe().unwrap();
    // SAFETY: single-threaded here; the child behaves like a runtime process.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(r);
            let handle = spawn_sandbox(
                &spec,
                InitCommand::Exec {
                    program: "/bin/bash".into(),
                    args: vec![
                        "-c".into(),
                        "while :; do date +%s%N > /tmp/alive; sleep 0.05; done".into(),
                    ],
                    env: common::env(),
                    cwd: None,
                },
            );
            let msg = match handle {
                Ok(h) => format!("P{}\n", h.init_pid()),
                Err(e) => format!("E{e}\n"),
            };
            nix::unistd::write(&w, msg.as_bytes()).unwrap();
            drop(w);
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        ForkResult::Parent { child: runtime } => {
            drop(w);
            let mut line = String::new();
            let mut f = fs::File::from(r);
            let mut b = [0u8; 1];
            while !line.ends_with('\n') && f.read(&mut b).unwrap() == 1 {
                line.push(b[0] as char);
            }
            kill(runtime, Signal::SIGKILL).unwrap();
            waitpid(runtime, None).unwrap();
            let init_pid: i32 = line
                .trim()
                .strip_prefix('P')
                .unwrap_or_else(|| panic!("spawn failed: {line}"))
                .parse()
                .unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let handle =
                SandboxHandle::adopt(&spec.instance, &spec.id, init_pid).expect("sandbox survived");
            assert!(handle.is_running().unwrap());
            let alive = spec.upper_dir().unwrap().join("tmp/alive");
            let before = wait_for_file(&alive);
            std::thread::sleep(Duration::from_millis(300));
            assert_ne!(fs::read_to_string(&alive).unwrap(), before, "still working");
            assert_ne!(parent_of(init_pid), runtime.as_raw());
            handle.kill().unwrap();
            assert!(
                !list_sandboxes(&common::instance())
                    .unwrap()
                    .contains(&spec.id)
            );
        }
    }
}

fn parent_of(pid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// `unshare` cannot work in a multithreaded process; the error says so before touching anything.
fn enter_sandbox_refuses_a_multithreaded_process() {
    let (spec, _dir) = common::spec("threads");
    let _t = std::thread::spawn(|| std::thread::sleep(Duration::from_secs(2)));
    let err = enter_sandbox(&spec).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("single-threaded"), "{err}");
    assert!(
        !list_sandboxes(&common::instance())
            .unwrap()
            .contains(&spec.id)
    );
}

fn main() {
    if !common::can_run("zygote") {
        return;
    }
    common::template();
    let tests: [(&str, fn()); 4] = [
        ("zygote_child_enters_sandbox", zygote_child_enters_sandbox),
        ("sandbox_survives_its_runtime", sandbox_survives_its_runtime),
        // After the others: it makes this process a subreaper.
        (
            "zygote_child_enters_sandbox_then",
            zygote_child_enters_sandbox_then,
        ),
        // Last: it leaves this process multithreaded.
        (
            "enter_sandbox_refuses_a_multithreaded_process",
            enter_sandbox_refuses_a_multithreaded_process,
        ),
    ];
    for (name, test) in tests {
        test();
        println!("test {name} ... ok");
    }
    println!("test result: ok. {} passed", tests.len());
}
