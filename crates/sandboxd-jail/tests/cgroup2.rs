//! The cgroup v2 code path on a cgroup v1 host: in a private mount namespace of this test
//! process only, the unified hierarchy is mounted over `/sys/fs/cgroup`, so the crate detects v2
//! and puts sandboxes in `/sandboxd/<id>` of the unified hierarchy. On a hybrid host the v2
//! hierarchy has no controllers (they are bound to v1), so this checks joining, the cgroup
//! namespace, the device allow-list (a BPF program), freeze/thaw (`cgroup.freeze`), kill
//! (`cgroup.kill`), CPU stats and cleanup, and that a limit is refused, naming what to enable.
//! Skipped when not root, or when the host already is v2 (the other tests cover it).
//! `harness = false`: `unshare(CLONE_NEWNS)` needs a single-threaded process.

mod common;

use std::fs;
use std::io::ErrorKind;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use sandboxd_jail::{
    Budget, CgroupVersion, Limits, cgroup_version, configure_budget, list_sandboxes, spawn_sandbox,
};

fn main() {
    if !common::can_run("cgroup2") {
        return;
    }
    if cgroup_version().unwrap() == CgroupVersion::V2 {
        eprintln!("cgroup2: skipped (the host is cgroup v2; the other tests cover it)");
        return;
    }
    // Our own mount namespace, private, so nothing below is visible on the host.
    unshare(CloneFlags::CLONE_NEWNS).unwrap();
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .unwrap();
    if let Err(e) = mount(
        Some("cgroup2"),
        "/sys/fs/cgroup",
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        eprintln!("cgroup2: skipped (cannot mount cgroup2: {e})");
        return;
    }
    assert_eq!(cgroup_version().unwrap(), CgroupVersion::V2);
    common::template();

    let script = "echo \"$(cat /proc/self/cgroup)\" > /tmp/cg; \
                  while :; do date +%s%N > /tmp/c; sleep 0.02; done";
    let sb = common::start("cg2", script, Limits::default());
    let dirs = sb.handle.cgroup_dirs();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].ends_with(format!("sandboxd/{}/{}", sb.spec.instance, sb.spec.id)));
    assert!(
        list_sandboxes(&common::instance())
            .unwrap()
            .contains(&sb.spec.id)
    );

    let read = |f: &str| fs::read_to_string(sb.upper_file(f)).unwrap_or_default();
    let deadline = Instant::now() + common::RUN_TIMEOUT;
    while !read("/tmp/cg").ends_with('\n') || read("/tmp/c").is_empty() {
        assert!(Instant::now() < deadline, "payload never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        read("/tmp/cg").lines().any(|l| l == "0::/"),
        "cgroup namespace rooted at the sandbox: {}",
        read("/tmp/cg")
    );

    // The device allow-list is a BPF program on v2: a host-root process moved into the sandbox's
    // cgroup (still in the host's v1 devices group, which allows everything) cannot open a device
    // outside the list.
    let probe = format!(
        "echo $$ > {}/cgroup.procs; head -c1 /dev/zero >/dev/null && echo zero-ok; \
         (exec 3</dev/loop-control) 2>/dev/null && echo loop-opened || echo loop-denied",
        dirs[0].display()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&probe)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains("zero-ok") && out.contains("loop-denied"),
        "{out}"
    );

    sb.handle.freeze().unwrap();
    let frozen = read("/tmp/c");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(read("/tmp/c"), frozen, "no progress while frozen");
    sb.handle.thaw().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_ne!(read("/tmp/c"), frozen, "progress after thaw");

    let stats = sb.handle.stats().unwrap();
    assert!(stats.cpu_usage_ns.unwrap() > 0, "{stats:?}");

    // This hierarchy offers no controller (a hybrid host binds them all to v1), like a v2 host
    // that does not delegate them to the runtime: a limit is refused, naming its file and what
    // to enable, and a create that asks for one leaves nothing behind.
    let offered = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap();
    let offers = |c: &str| offered.split_whitespace().any(|x| x == c);
    if !offers("cpu") {
        let err = sb.handle.set_cpu_weight(1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(err.to_string().contains("cpu.weight"), "{err}");
    }
    if !offers("memory") {
        let (mut spec, dir) = common::spec("cg2-limited");
        spec.limits.memory_bytes = Some(256 << 20);
        let err = spawn_sandbox(&spec, common::bash("true")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("memory.max") && msg.contains("'memory' controller"),
            "{msg}"
        );
        assert!(
            !list_sandboxes(&common::instance())
                .unwrap()
                .contains(&spec.id)
        );
        drop(dir);
        let budget = Budget {
            memory_bytes: Some(1 << 30),
            pids_max: None,
        };
        let err = configure_budget(&common::instance(), &budget, &budget).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
        assert!(err.to_string().contains("memory.max"), "{err}");
    }

    sb.handle.freeze().unwrap();
    sb.handle.kill().unwrap();
    assert!(!dirs[0].exists());
    assert!(
        !list_sandboxes(&common::instance())
            .unwrap()
            .contains(&sb.spec.id)
    );
    drop(sb); // also removes the shared parent if it is empty
    println!("test cgroup2_freeze_kill_cleanup ... ok\ntest result: ok. 1 passed");
}
