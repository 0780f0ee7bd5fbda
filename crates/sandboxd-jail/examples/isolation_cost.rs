//! Isolation cost, each figure beside its baseline, as JSON on stdout:
//!
//! * `fork_exec_true`: fork + exec + wait of `/bin/true` (no isolation; the floor).
//! * `raw_unshare_overlay_exec_true`: the design doc's raw baseline — fork, `unshare(pid, mnt,
//!   ipc, uts, net)`, private propagation, an overlay mount (the built-in template over a fresh
//!   upper dir), fork into the new pid namespace, exec `/bin/true`, wait.
//! * `spawn_sandbox_until_exec`: `spawn_sandbox` running `/bin/true`, until it returns (the
//!   payload's exec has succeeded): adds the cgroup, `lo`, `/proc`, `/sys`, `/dev`, the `/usr`
//!   bind, `pivot_root`, the init, and the pidfd/netns handles.
//! * `sandbox_lifecycle`: the same plus waiting for the sandbox to exit and `kill()` (cgroup
//!   removal): a whole create-run-destroy cycle.
//!
//! Run as root, on a release build: `cargo run --release -p sandboxd-jail --example
//! isolation_cost -- [runs]` (default 200).
#![allow(unsafe_code)] // fork, for the raw baseline.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, execv, fork};
use sandboxd_jail::{InitCommand, SandboxSpec, build_base_template, cgroup_version, spawn_sandbox};

/// Runs measured when no count is given: enough for a stable p99 in a few seconds.
const DEFAULT_RUNS: usize = 200;

/// Runs discarded first, to warm the page cache and the kernel's slabs.
const WARMUP_RUNS: usize = 10;

fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3;
    format!(
        "{{\"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"min_ms\": {:.3}}}",
        at(0.50),
        at(0.99),
        at(0.0)
    )
}

fn measure(runs: usize, mut f: impl FnMut(usize) -> Duration) -> String {
    for i in 0..WARMUP_RUNS {
        f(i);
    }
    percentiles((0..runs).map(|i| f(WARMUP_RUNS + i)).collect())
}

/// One raw run: returns the time from fork to the reaped child.
fn raw_run(template: &Path, dir: &Path) -> Duration {
    let upper = dir.join("upper");
    let work = dir.join("work");
    let merged = dir.join("merged");
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        template.display(),
        upper.display(),
        work.display()
    );
    let t = Instant::now();
    // SAFETY: this example is single-threaded.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            let flags = CloneFlags::CLONE_NEWPID
                | CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWNET;
            let ok = unshare(flags).is_ok()
                && mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .is_ok()
                && mount(
                    Some("overlay"),
                    &merged,
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(opts.as_str()),
                )
                .is_ok();
            if !ok {
                std::process::exit(2);
            }
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    let _ = execv(c"/bin/true", &[c"true"]);
                    std::process::exit(127)
                }
                Ok(ForkResult::Parent { child }) => {
                    let code = match waitpid(child, None) {
                        Ok(WaitStatus::Exited(_, c)) => c,
                        _ => 3,
                    };
                    std::process::exit(code)
                }
                Err(_) => std::process::exit(4),
            }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).unwrap();
            let took = t.elapsed();
            assert_eq!(status, WaitStatus::Exited(child, 0), "raw run failed");
            took
        }
    }
}

fn exec_true() -> InitCommand {
    InitCommand::Exec {
        program: "/bin/true".into(),
        args: vec![],
        env: vec![],
        cwd: None,
    }
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
        .prefix("sandboxd-isolation-cost-")
        .tempdir_in("/tmp")
        .unwrap();
    let template = base.path().join("template");
    build_base_template(&template).unwrap();

    let fork_exec = measure(runs, |_| {
        let t = Instant::now();
        let st = Command::new("/bin/true").status().unwrap();
        assert!(st.success());
        t.elapsed()
    });

    let raw = measure(runs, |i| {
        let dir = base.path().join(format!("raw{i}"));
        let took = raw_run(&template, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        took
    });

    let mut lifecycle = Vec::new();
    let until_exec = measure(runs, |i| {
        let dir = base.path().join(format!("sb{i}"));
        let spec = SandboxSpec::new(format!("cost{}-{i}", std::process::id()), &template, &dir);
        let t = Instant::now();
        let h = spawn_sandbox(&spec, exec_true()).unwrap();
        let spawned = t.elapsed();
        assert!(h.wait(Duration::from_secs(10)).unwrap());
        h.kill().unwrap();
        lifecycle.push(t.elapsed());
        std::fs::remove_dir_all(&dir).unwrap();
        spawned
    });
    let lifecycle = percentiles(lifecycle.split_off(WARMUP_RUNS));

    println!(
        "{{\"runs\": {runs}, \"cgroup\": \"{:?}\", \"fork_exec_true\": {fork_exec}, \
         \"raw_unshare_overlay_exec_true\": {raw}, \"spawn_sandbox_until_exec\": {until_exec}, \
         \"sandbox_lifecycle\": {lifecycle}}}",
        cgroup_version().unwrap()
    );
}
