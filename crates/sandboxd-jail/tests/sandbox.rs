//! End-to-end sandbox tests: isolation, networking, freeze, kill, init duties and limits.
//! They need root and skip cleanly otherwise. Every sandbox is killed and its cgroup removed by
//! a guard, even when an assertion fails.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{SockaddrIn, connect};
use sandboxd_jail::{
    CgroupVersion, InitCommand, Limits, SandboxHandle, connect_in_netns, kill_sandbox,
    list_sandboxes, spawn_sandbox,
};

#[test]
fn builtin_template_runs_login_shell_python_and_user() {
    if !can_run("builtin_template") {
        return;
    }
    let out = run(
        "tmpl",
        r#"
bash -l -c 'echo hi'
python3 -c 'import os; os.setgid(1000); os.setuid(1000); os.execv("/usr/bin/id", ["id", "-un"])'
hostname
ls -A /home/user; echo end-of-home
ls /
id -un
python3 -c 1 && echo python-ok
env -i /bin/bash -l -c 'echo "PATH=$PATH"'
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    let id = test_id("tmpl");
    assert_eq!(lines[0], "hi", "{out}");
    assert_eq!(lines[1], "user", "{out}");
    assert_eq!(lines[2], id, "{out}");
    assert_eq!(lines[3], "end-of-home", "/home/user should be empty: {out}");
    for d in ["bin", "etc", "home", "proc", "root", "tmp", "usr", "var"] {
        assert!(lines.contains(&d), "missing /{d}: {out}");
    }
    assert!(lines.contains(&"root"), "{out}");
    assert!(lines.contains(&"python-ok"), "{out}");
    assert!(
        out.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "the login profile sets PATH: {out}"
    );
}

#[test]
fn host_files_processes_and_loopback_are_invisible() {
    if !can_run("isolation") {
        return;
    }
    // A listener on the host's loopback: the sandbox has its own 127.0.0.1 and must not reach it.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = run(
        "iso",
        &format!(
            r#"
test -e /work && echo work-visible || echo no-work
echo "root:[$(ls -A /root)]"
echo "hostname:$(cat /etc/hostname)"
echo "pids:$(cd /proc && ls -d [0-9]* | sort -n | tr '\n' ' ')"
echo "pid1:$(cat /proc/1/comm)"
echo "self:$$"
echo "net:$(ls /sys/class/net | tr '\n' ' ')"
echo "cgroup:$(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\n' ' ')"
(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo host-loopback-reached || echo host-loopback-blocked
echo "usr-ro:$(touch /usr/x 2>&1 | grep -c 'Read-only')"
grep -E '^Sig(Blk|Ign)' /proc/self/status | tr '\t' ' '
"#
        ),
    );
    println!("{out}");
    assert!(out.contains("no-work"), "{out}");
    assert!(out.contains("root:[]"), "{out}");
    assert!(
        out.contains(&format!("hostname:{}", test_id("iso"))),
        "{out}"
    );
    let pids_line = out.lines().find(|l| l.starts_with("pids:")).unwrap();
    let pids: Vec<u32> = pids_line[5..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids[0], 1, "{out}");
    assert!(
        pids.len() < 8 && pids.iter().all(|p| *p < 50),
        "only the sandbox's own processes: {out}"
    );
    assert!(out.contains("pid1:sandboxd-init"), "{out}");
    assert!(out.contains("self:2"), "the payload is PID 2: {out}");
    assert!(out.contains("net:lo "), "only lo: {out}");
    assert!(out.contains("cgroup:/ "), "cgroup namespace root: {out}");
    assert!(out.contains("host-loopback-blocked"), "{out}");
    assert!(out.contains("usr-ro:1"), "/usr is read-only: {out}");
    // The test process ignores SIGPIPE (Rust does); the payload must not inherit that.
    assert!(out.contains("SigBlk: 0000000000000000"), "{out}");
    let ignored = out
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn: "))
        .unwrap();
    let ignored = u64::from_str_radix(ignored.trim(), 16).unwrap();
    // Bits 31 and 32 are signals 32 and 33, which glibc reserves and will not reset.
    assert_eq!(ignored & !0x1_8000_0000, 0, "no ignored signals: {out}");
    assert!(
        listener.accept().is_err(),
        "nothing may have connected to the host listener"
    );
}

#[test]
fn files_written_in_one_sandbox_are_not_visible_in_another() {
    if !can_run("separate_layers") {
        return;
    }
    let out = run(
        "writer",
        "echo secret > /tmp/secret; echo x >> /etc/passwd; mkdir -p /home/user/w; echo wrote",
    );
    assert_eq!(out.trim(), "wrote");
    let out = run(
        "reader",
        "test -e /tmp/secret && echo leak-tmp; grep -c '^x$' /etc/passwd; test -e /home/user/w && echo leak-home; echo done",
    );
    assert_eq!(out.trim(), "0\ndone", "{out}");
    // And the template itself is untouched.
    assert!(!template().join("tmp/secret").exists());
}

#[test]
fn connect_in_netns_reaches_a_listener_inside() {
    if !can_run("connect_in_netns") {
        return;
    }
    let server = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8123))
s.listen()
for _ in range(2):
    c, _ = s.accept()
    c.sendall(b"hello from inside " + c.recv(16))
    c.close()
"#;
    let host_port_free = TcpStream::connect("127.0.0.1:8123").is_err();
    let sb = start(
        "netns",
        &format!("exec python3 -c '{server}'"),
        Limits::default(),
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    let fd = loop {
        match sb.handle.connect(8123, Duration::from_secs(1)) {
            Ok(fd) => break fd,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(Instant::now() < deadline, "listener never came up");
                sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    // The sandbox's listener is not on the host's loopback.
    if host_port_free {
        assert!(TcpStream::connect("127.0.0.1:8123").is_err());
    }
    let mut s = TcpStream::from(fd);
    s.write_all(b"one").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from inside one");

    // The free function, by path.
    let fd = connect_in_netns(&sb.handle.netns_path(), 8123, Duration::from_secs(2)).unwrap();
    let mut s = TcpStream::from(fd);
    s.write_all(b"two").unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from inside two");
    assert!(sb.handle.wait(RUN_TIMEOUT).unwrap());
}

#[test]
fn connect_to_a_closed_port_is_refused_quickly() {
    if !can_run("connect_refused") {
        return;
    }
    let sb = start("refused", "exec sleep 60", Limits::default());
    let t = Instant::now();
    let err = sb.handle.connect(9, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(t.elapsed() < Duration::from_millis(500));

    // `socket()` (the runtime connects it itself) is made in the sandbox's namespace: a port that
    // listens on the host's loopback is closed there.
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
    let sock = sb.handle.socket().unwrap();
    let flags = OFlag::from_bits_truncate(fcntl(&sock, FcntlArg::F_GETFL).unwrap());
    assert!(flags.contains(OFlag::O_NONBLOCK));
    fcntl(&sock, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).unwrap();
    let refused = connect(sock.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, port)).unwrap_err();
    assert_eq!(refused, Errno::ECONNREFUSED);
}

/// Reads the counter the payload of `freeze_and_thaw` keeps writing.
fn counter(sb: &TestSandbox) -> u64 {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Ok(s) = fs::read_to_string(sb.upper_file("/tmp/c"))
            && let Ok(n) = s.trim().parse()
        {
            return n;
        }
        assert!(Instant::now() < deadline, "counter never appeared");
        sleep(Duration::from_millis(10));
    }
}

#[test]
fn freeze_stops_the_sandbox_and_thaw_resumes_it() {
    if !can_run("freeze") {
        return;
    }
    let script = r#"exec python3 -c '
import os, time
i = 0
while True:
    i += 1
    with open("/tmp/c.tmp", "w") as f:
        f.write(str(i))
    os.replace("/tmp/c.tmp", "/tmp/c")
    time.sleep(0.005)
'"#;
    let sb = start("freeze", script, Limits::default());
    let first = counter(&sb);
    sleep(Duration::from_millis(100));
    assert!(counter(&sb) > first, "counter runs");

    sb.handle.freeze().unwrap();
    let frozen = counter(&sb);
    sleep(Duration::from_millis(300));
    assert_eq!(counter(&sb), frozen, "no progress while frozen");
    // Freezing twice is fine, and stats work while frozen.
    sb.handle.freeze().unwrap();
    assert!(sb.handle.stats().unwrap().pids_current.unwrap_or(1) >= 1);

    sb.handle.thaw().unwrap();
    sleep(Duration::from_millis(300));
    assert!(counter(&sb) > frozen, "progress after thaw");
}

#[test]
fn kill_frees_processes_cgroups_mounts_and_dirs() {
    if !can_run("kill") {
        return;
    }
    let (spec, dir) = spec("kill");
    let sb = start_with(
        spec,
        dir,
        "sleep 1000 & sleep 1000 & (sleep 1000 &) ; echo started > /tmp/s; wait",
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !sb.upper_file("/tmp/s").exists() {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(10));
    }
    let cgroup_dirs = sb.handle.cgroup_dirs();
    assert!(cgroup_dirs.iter().all(|d| d.is_dir()));
    assert!(list_sandboxes(&instance()).unwrap().contains(&sb.spec.id));
    assert!(sb.handle.stats().unwrap().pids_current.unwrap_or(5) >= 5);

    // Kill it frozen: the harder case (v1 needs a thaw for SIGKILL to land).
    sb.handle.freeze().unwrap();
    sb.handle.kill().unwrap();
    assert!(sb.handle.wait(Duration::ZERO).unwrap(), "init gone");
    for d in &cgroup_dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert!(!list_sandboxes(&instance()).unwrap().contains(&sb.spec.id));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(sb.dir().to_str().unwrap()),
        "no host mount mentions the sandbox dir"
    );
    fs::remove_dir_all(sb.spec.upper_dir().unwrap()).expect("upper dir removable");
    fs::remove_dir_all(sb.dir().join("work")).expect("work dir removable");
    // kill is idempotent.
    sb.handle.kill().unwrap();
    kill_sandbox(&sb.spec.instance, &sb.spec.id).unwrap();
}

#[test]
fn init_reaps_orphans() {
    if !can_run("orphans") {
        return;
    }
    let out = run(
        "orphans",
        r#"python3 -c '
import os, subprocess, time
subprocess.run(["sh", "-c", "sleep 0.3 & echo $! > /tmp/orphan"], check=True)
pid = int(open("/tmp/orphan").read())
stat = open(f"/proc/{pid}/stat").read()
print("orphan-parent", stat.rsplit(")", 1)[1].split()[1])
time.sleep(1.0)
print("orphan-exists", os.path.exists(f"/proc/{pid}"))
zombies = []
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            st = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if st == "Z":
            zombies.append(p)
print("zombies", zombies)
'"#,
    );
    assert!(
        out.contains("orphan-parent 1"),
        "re-parented to our init: {out}"
    );
    assert!(out.contains("orphan-exists False"), "reaped: {out}");
    assert!(out.contains("zombies []"), "{out}");
}

#[test]
fn init_forwards_sigterm_and_exits_with_the_payload() {
    if !can_run("sigterm") {
        return;
    }
    let sb = start(
        "sigterm",
        "trap 'echo got-term > /tmp/t; exit 3' TERM; echo ready > /tmp/r; while :; do sleep 0.05; done",
        Limits::default(),
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !sb.upper_file("/tmp/r").exists() {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(10));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.handle.init_pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(sb.handle.wait(RUN_TIMEOUT).unwrap());
    assert_eq!(
        fs::read_to_string(sb.upper_file("/tmp/t")).unwrap(),
        "got-term\n"
    );
    // We are a subreaper (see common::template), so wait() reaped the init and kept its status.
    assert_eq!(sb.handle.exit_code(), Some(3));
}

#[test]
fn limits_are_written_and_enforced() {
    if !can_run("limits") {
        return;
    }
    let limits = Limits {
        memory_bytes: Some(256 << 20),
        cpu_cores: Some(0.5),
        pids_max: Some(16),
        cpu_weight: Some(1),
        ..Limits::default()
    };
    let sb = start(
        "limits",
        r#"exec >/tmp/out 2>&1; python3 -c '
import os
kids, refused = [], 0
for _ in range(40):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused += 1
        continue
    if pid == 0:
        import time; time.sleep(2); os._exit(0)
    kids.append(pid)
print("forked", len(kids), "refused", refused)
'; sleep 30"#,
        limits,
    );
    let read = |dir: &Path, f: &str| fs::read_to_string(dir.join(f)).unwrap().trim().to_owned();
    let dirs = sb.handle.cgroup_dirs();
    let find = |f: &str| {
        dirs.iter()
            .find(|d| d.join(f).exists())
            .unwrap_or_else(|| panic!("no {f}"))
    };
    match sb.handle.cgroup_version() {
        CgroupVersion::V1 => {
            assert_eq!(
                read(find("memory.limit_in_bytes"), "memory.limit_in_bytes"),
                (256u64 << 20).to_string()
            );
            assert_eq!(read(find("cpu.cfs_quota_us"), "cpu.cfs_quota_us"), "50000");
            assert_eq!(
                read(find("cpu.cfs_period_us"), "cpu.cfs_period_us"),
                "100000"
            );
            assert_eq!(read(find("pids.max"), "pids.max"), "16");
            assert_eq!(read(find("cpu.shares"), "cpu.shares"), "10");
            sb.handle.set_cpu_weight(100).unwrap();
            assert_eq!(read(find("cpu.shares"), "cpu.shares"), "1024");
        }
        CgroupVersion::V2 => {
            assert_eq!(
                read(find("memory.max"), "memory.max"),
                (256u64 << 20).to_string()
            );
            assert_eq!(read(find("cpu.max"), "cpu.max"), "50000 100000");
            assert_eq!(read(find("pids.max"), "pids.max"), "16");
            assert_eq!(read(find("cpu.weight"), "cpu.weight"), "1");
            sb.handle.set_cpu_weight(100).unwrap();
            assert_eq!(read(find("cpu.weight"), "cpu.weight"), "100");
        }
    }
    let deadline = Instant::now() + RUN_TIMEOUT;
    let out = loop {
        let s = fs::read_to_string(sb.upper_file("/tmp/out")).unwrap_or_default();
        if s.contains("forked") {
            break s;
        }
        assert!(Instant::now() < deadline, "fork loop never finished");
        sleep(Duration::from_millis(20));
    };
    let refused: u32 = out.split_whitespace().last().unwrap().parse().unwrap();
    assert!(
        sb.handle.set_cpu_weight(0).is_err(),
        "weight 0 is out of range"
    );
    assert!(refused > 0, "pids.max must stop the fork loop: {out}");

    let stats = sb.handle.stats().unwrap();
    assert!(stats.memory_bytes.unwrap() > 0, "{stats:?}");
    assert!(stats.cpu_usage_ns.unwrap() > 0, "{stats:?}");
    assert!(stats.pids_current.unwrap() >= 2, "{stats:?}");
}

#[test]
fn exec_failure_is_reported_and_cleaned_up() {
    if !can_run("exec_failure") {
        return;
    }
    let (spec, _dir) = spec("badexec");
    let err = spawn_sandbox(
        &spec,
        InitCommand::Exec {
            program: "/nonexistent/program".into(),
            args: vec![],
            env: env(),
            cwd: None,
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("execve"), "{err}");
    assert!(!list_sandboxes(&instance()).unwrap().contains(&spec.id));

    let (spec, _dir) = common::spec("badcwd");
    let err = spawn_sandbox(
        &spec,
        InitCommand::Exec {
            program: "/bin/true".into(),
            args: vec![],
            env: env(),
            cwd: Some("/does/not/exist".into()),
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("cwd"), "{err}");
    assert!(!list_sandboxes(&instance()).unwrap().contains(&spec.id));
}

#[test]
fn fork_payload_runs_inside() {
    if !can_run("fork_payload") {
        return;
    }
    let (spec, dir) = spec("forkpay");
    let handle = spawn_sandbox(
        &spec,
        InitCommand::Fork(Box::new(|| {
            // Async-signal-safe only: we are a forked copy of a multithreaded test process.
            use nix::fcntl::{OFlag, open};
            use nix::sys::stat::Mode;
            let Ok(fd) = open(
                c"/tmp/fork-ok",
                OFlag::O_WRONLY | OFlag::O_CREAT,
                Mode::from_bits_truncate(0o644),
            ) else {
                return 1;
            };
            let pid = nix::unistd::getpid().as_raw();
            let _ = nix::unistd::write(&fd, if pid == 2 { b"pid2" } else { b"pidX" });
            7
        })),
    )
    .unwrap();
    let sb = TestSandbox::from_parts(handle, spec, dir);
    assert!(sb.handle.wait(RUN_TIMEOUT).unwrap());
    assert_eq!(
        fs::read_to_string(sb.upper_file("/tmp/fork-ok")).unwrap(),
        "pid2"
    );
    assert_eq!(sb.handle.exit_code(), Some(7));
}

#[test]
fn adopt_checks_the_pid_belongs_to_the_sandbox() {
    if !can_run("adopt") {
        return;
    }
    let sb = start("adopt", "exec sleep 60", Limits::default());
    let again = SandboxHandle::adopt(&sb.spec.instance, &sb.spec.id, sb.handle.init_pid()).unwrap();
    assert_eq!(again.init_pid(), sb.handle.init_pid());
    assert!(again.is_running().unwrap());
    let wrong = SandboxHandle::adopt(&sb.spec.instance, &sb.spec.id, std::process::id() as i32)
        .unwrap_err();
    assert_eq!(wrong.kind(), std::io::ErrorKind::NotFound);
    assert!(SandboxHandle::adopt(&sb.spec.instance, "no-such-sandbox", 1).is_err());
    // Another instance's sandbox of the same id is another sandbox.
    assert!(SandboxHandle::adopt("other-instance", &sb.spec.id, sb.handle.init_pid()).is_err());
    // The adopted handle controls the same sandbox.
    again.kill().unwrap();
    assert!(sb.handle.wait(Duration::from_secs(5)).unwrap());
}

#[test]
fn a_second_spawn_with_a_live_id_is_refused() {
    if !can_run("duplicate") {
        return;
    }
    let sb = start("dup", "exec sleep 60", Limits::default());
    let (mut spec, _dir) = spec("other");
    spec.id = sb.spec.id.clone();
    let err = spawn_sandbox(
        &spec,
        InitCommand::Exec {
            program: "/bin/true".into(),
            args: vec![],
            env: env(),
            cwd: None,
        },
    )
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
    assert!(
        sb.handle.is_running().unwrap(),
        "the first one is untouched"
    );
}

#[test]
fn root_inside_is_confined() {
    if !can_run("confined_root") {
        return;
    }
    // Every probe is harmless even if it succeeded: /proc/sys/kernel/hostname is per-UTS-namespace,
    // the mknod lands in the sandbox's upper dir, the tmpfs mount in its own mount namespace.
    let out = run(
        "confined",
        r#"
grep CapEff /proc/self/status
grep CapEff /proc/1/status
mount -t tmpfs t /tmp 2>/dev/null && echo mount-allowed || echo mount-denied
umount /proc/kcore 2>/dev/null && echo umount-allowed || echo umount-denied
echo x 2>/dev/null > /proc/sys/kernel/hostname && echo sysctl-writable || echo sysctl-readonly
echo "kcore-bytes:$(head -c 16 /proc/kcore | wc -c)"
mknod /tmp/sda b 8 0 2>/dev/null && echo mknod-allowed || echo mknod-denied
touch /tmp/f && chown 1000:1000 /tmp/f && echo chown-ok
"#,
    );
    assert!(
        out.contains("CapEff:\t00000000a00425fb"),
        "payload set: {out}"
    );
    assert!(
        out.contains("CapEff:\t0000000000000000"),
        "init has none: {out}"
    );
    for want in [
        "mount-denied",
        "umount-denied",
        "sysctl-readonly",
        "kcore-bytes:0",
        "mknod-denied",
        "chown-ok",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
}

#[test]
fn filesystem_pause_keeps_the_writable_layer() {
    if !can_run("filesystem_pause") {
        return;
    }
    // Stop a sandbox, keep its dirs and id range, start it again from the same upper dir.
    let (spec, dir) = spec("fspause");
    let script = "echo kept > /home/user/note; mkdir -p /opt/app; \
                  cat /proc/sys/kernel/random/boot_id > /tmp/boot1";
    let handle = spawn_sandbox(&spec, bash(script)).unwrap();
    assert!(handle.wait(RUN_TIMEOUT).unwrap());
    handle.kill().unwrap();
    let second = start_with(
        spec,
        dir,
        "exec >/tmp/out 2>&1; cat /home/user/note; test -d /opt/app && echo dir-kept; \
         cmp -s /tmp/boot1 /proc/sys/kernel/random/boot_id && echo same-boot || echo new-boot",
    );
    assert_eq!(second.output(), "kept\ndir-kept\nnew-boot\n");
}
