//! What the user namespace, idmapped layers, seccomp filter, device list, disk and limits give a
//! sandbox, checked from inside (a script run as the sandbox's root) and from the host. Root only;
//! skips otherwise.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;
use sandboxd_jail::{
    CgroupVersion, Disk, Limits, RANGE_SIZE, copy_sparse, format_image, mount_disk,
};

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
        .trim()
}

#[test]
fn ids_inside_map_to_the_sandboxes_own_range_and_templates_stay_canonical() {
    if !can_run("ids") {
        return;
    }
    let sb = start(
        "ids",
        "exec >/tmp/out 2>&1
echo uid_map: $(cat /proc/self/uid_map)
echo gid_map: $(cat /proc/self/gid_map)
echo etc-owner: $(stat -c %u:%g /etc/passwd)
echo usr-owner: $(stat -c %u:%g /usr/bin/env)
echo home-owner: $(stat -c %u /home/user)
echo root > /root/by-root
python3 -c 'import os; os.setgid(1000); os.setuid(1000); open(\"/home/user/by-user\", \"w\").write(\"u\")'
echo x >> /etc/passwd
sleep 60",
        Limits::default(),
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !fs::read_to_string(sb.upper_file("/tmp/out"))
        .unwrap_or_default()
        .contains("home-owner")
    {
        assert!(Instant::now() < deadline, "payload never wrote its facts");
        sleep(Duration::from_millis(20));
    }
    sleep(Duration::from_millis(200));
    let out = fs::read_to_string(sb.upper_file("/tmp/out")).unwrap();
    let base = sb.spec.id_base;
    assert_eq!(
        line(&out, "uid_map:"),
        format!("0 {base} {RANGE_SIZE}"),
        "{out}"
    );
    assert_eq!(
        line(&out, "gid_map:"),
        format!("0 {base} {RANGE_SIZE}"),
        "{out}"
    );
    assert_eq!(
        sb.uid_map().split_whitespace().collect::<Vec<_>>(),
        ["0", &base.to_string(), "65536"]
    );
    // The template and /usr look root-owned (and `user`-owned) inside...
    assert_eq!(line(&out, "etc-owner:"), "0:0", "{out}");
    assert_eq!(line(&out, "usr-owner:"), "0:0", "{out}");
    assert_eq!(line(&out, "home-owner:"), "1000", "{out}");
    // ...while on disk the template keeps its real owners, and new files belong to the range.
    assert_eq!(
        fs::metadata(template().join("etc/passwd")).unwrap().uid(),
        0
    );
    assert_eq!(
        fs::metadata(template().join("home/user")).unwrap().uid(),
        1000
    );
    let by_root = fs::metadata(sb.upper_file("/root/by-root")).unwrap();
    assert_eq!((by_root.uid(), by_root.gid()), (base, base));
    let by_user = fs::metadata(sb.upper_file("/home/user/by-user")).unwrap();
    assert_eq!((by_user.uid(), by_user.gid()), (base + 1000, base + 1000));
    // A file copied up from the template keeps its owner inside, the range's root on the host.
    assert_eq!(
        fs::metadata(sb.upper_file("/etc/passwd")).unwrap().uid(),
        base
    );
    assert!(
        !fs::read_to_string(template().join("etc/passwd"))
            .unwrap()
            .contains("\nx\n")
    );
    // The sandbox's processes run as the range on the host.
    let status = fs::read_to_string(format!("/proc/{}/status", sb.handle.init_pid())).unwrap();
    assert!(
        line(&status, "Uid:").starts_with(&base.to_string()),
        "{status}"
    );
}

#[test]
fn seccomp_denies_what_dockers_profile_denies_and_keeps_setuid_working() {
    if !can_run("seccomp") {
        return;
    }
    let out = run(
        "seccomp",
        r#"
grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status | tr -d '\t'
python3 - <<'EOF'
import ctypes, errno, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    e = ctypes.get_errno()
    print(f"{name}:", "ok" if r >= 0 else errno.errorcode.get(e, e))
call("keyctl", 250, 0, -3, 0, 0, 0)                 # KEYCTL_GET_KEYRING_ID @u
call("add_key", 248, b"user", b"x", b"y", 1, -3)
call("bpf", 321, 0, 0, 0)
call("perf_event_open", 298, 0, 0, -1, -1, 0)
call("userfaultfd", 323, 0)
call("io_uring_setup", 425, 1, 0)
call("open_by_handle_at", 304, -100, 0, 0)
call("unshare_user", 272, 0x10000000)              # CLONE_NEWUSER
call("unshare_files", 272, 0x400)                  # CLONE_FILES: allowed
call("clone3", 435, 0, 0)
call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, 0)
call("setns", 308, 0, 0)
call("personality_noaslr", 135, 0x0040000)
call("personality_query", 135, 0xffffffff)
call("x32_getpid", 39 | 0x40000000)
call("sync", 162)                                   # answered 0, not run (seccomp.rs)
try:
    socket.socket(40, socket.SOCK_STREAM)
    print("vsock: ok")
except OSError as e:
    print("vsock:", errno.errorcode[e.errno])
EOF
cp /usr/bin/id /tmp/suid-id && chmod 4755 /tmp/suid-id
python3 -c 'import os; os.setgid(1000); os.setuid(1000); os.execv("/tmp/suid-id", ["id", "-u"])' | sed 's/^/setuid-euid: /'
"#,
    );
    assert!(out.contains("Seccomp:2"), "{out}");
    assert!(
        out.contains("NoNewPrivs:0"),
        "setuid must keep working: {out}"
    );
    for (call, want) in [
        ("keyctl:", "EPERM"),
        ("add_key:", "EPERM"),
        ("bpf:", "EPERM"),
        ("perf_event_open:", "EPERM"),
        ("userfaultfd:", "EPERM"),
        ("io_uring_setup:", "EPERM"),
        ("open_by_handle_at:", "EPERM"),
        ("unshare_user:", "EPERM"),
        ("unshare_files:", "ok"),
        ("clone3:", "ENOSYS"),
        ("mount:", "EPERM"),
        ("setns:", "EPERM"),
        ("personality_noaslr:", "EPERM"),
        ("personality_query:", "ok"),
        ("x32_getpid:", "ENOSYS"),
        ("sync:", "ok"),
        ("vsock:", "EPERM"),
    ] {
        assert_eq!(line(&out, call), want, "{call} {out}");
    }
    // A setuid-root program run by `user` gets root inside: the sandbox's root, an unprivileged
    // host uid (see ids_inside_map...), so offering sudo is safe.
    assert_eq!(line(&out, "setuid-euid:"), "0", "{out}");
}

/// The issue's attack: from a nested user namespace, mount the cgroup hierarchy and raise the
/// limits. With nested user namespaces allowed (the filter out of the way), the kernel's own rules
/// must still stop it: every cgroup file belongs to host root, which the namespace does not map.
#[test]
fn cgroup_remount_from_a_nested_userns_cannot_lift_limits() {
    if !can_run("remount") {
        return;
    }
    let (mut spec, dir) = spec("remount");
    spec.nested_userns = true;
    spec.limits = Limits {
        memory_bytes: Some(256 << 20),
        pids_max: Some(64),
        cpu_cores: Some(0.5),
        ..Limits::default()
    };
    let sb = start_with(
        spec,
        dir,
        r#"exec >/tmp/out 2>&1
mkdir -p /tmp/c
unshare -U -r -C -m sh -c '
  mount -t cgroup -o memory none /tmp/c && echo mounted-v1
  echo 3221225472 > /tmp/c/memory.limit_in_bytes && echo raised-memory
  umount /tmp/c
  mount -t cgroup -o pids none /tmp/c && echo 100000 > /tmp/c/pids.max && echo raised-pids
  umount /tmp/c
  mount -t cgroup -o cpu none /tmp/c && echo -1 > /tmp/c/cpu.cfs_quota_us && echo raised-cpu
  mkdir /tmp/c/child && echo made-child-group
  umount /tmp/c
  mount -t cgroup2 none /tmp/c && echo max > /tmp/c/memory.max && echo raised-v2
  true'
echo attack-done"#,
    );
    let out = sb.output();
    assert!(out.contains("attack-done"), "{out}");
    for raised in [
        "raised-memory",
        "raised-pids",
        "raised-cpu",
        "made-child-group",
        "raised-v2",
    ] {
        assert!(!out.contains(raised), "{raised}: {out}");
    }
    let dirs = sb.handle.cgroup_dirs();
    let read = |f: &str| {
        let d = dirs.iter().find(|d| d.join(f).exists()).unwrap();
        fs::read_to_string(d.join(f)).unwrap().trim().to_owned()
    };
    match sb.handle.cgroup_version() {
        CgroupVersion::V1 => {
            assert_eq!(read("memory.limit_in_bytes"), (256u64 << 20).to_string());
            assert_eq!(read("pids.max"), "64");
            assert_eq!(read("cpu.cfs_quota_us"), "50000");
        }
        CgroupVersion::V2 => {
            assert_eq!(read("memory.max"), (256u64 << 20).to_string());
            assert_eq!(read("pids.max"), "64");
        }
    }
}

#[test]
fn devices_outside_the_list_cannot_be_opened_even_by_host_root_in_the_cgroup() {
    if !can_run("devices") {
        return;
    }
    let sb = start("devices", "exec sleep 60", Limits::default());
    // A host-root process (every capability) moved into the sandbox's cgroup: only the device
    // list stands between it and the host's devices.
    let procs: Vec<String> = sb
        .handle
        .cgroup_dirs()
        .iter()
        .map(|d| d.join("cgroup.procs").display().to_string())
        .collect();
    let host_nodes: Vec<&str> = [
        "/dev/loop-control",
        "/dev/kmsg",
        "/dev/mem",
        "/dev/vda",
        "/dev/sda",
    ]
    .into_iter()
    .filter(|p| Path::new(p).exists())
    .collect();
    assert!(!host_nodes.is_empty());
    let mut script = format!("for f in {}; do echo $$ > $f; done\n", procs.join(" "));
    script.push_str("head -c1 /dev/zero >/dev/null && echo zero-ok\n");
    for node in &host_nodes {
        script.push_str(&format!(
            "(exec 3<{node}) 2>/dev/null && echo {node}:opened || echo {node}:denied\n"
        ));
    }
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("zero-ok"), "{out}");
    for node in &host_nodes {
        assert!(out.contains(&format!("{node}:denied")), "{node}: {out}");
    }
    if sb.handle.cgroup_version() == CgroupVersion::V1 {
        let list = sb
            .handle
            .cgroup_dirs()
            .iter()
            .find_map(|d| fs::read_to_string(d.join("devices.list")).ok());
        let list = list.expect("devices.list");
        assert!(
            list.contains("c 1:3 rwm") && list.contains("c 136:* rwm"),
            "{list}"
        );
        assert!(!list.contains("a *:*"), "{list}");
    }
}

fn disk_spec(name: &str, mb: u64, pooled: bool) -> (sandboxd_jail::SandboxSpec, TestDir) {
    let (mut spec, dir) = spec(name);
    let image = dir.path().join("disk.img");
    let formatted = dir.path().join("template.img");
    format_image(&formatted, mb).unwrap();
    copy_sparse(&formatted, &image).unwrap();
    spec.disk = Some(if pooled {
        Disk::Mounted(Arc::new(mount_disk(&image).unwrap()))
    } else {
        Disk::Image(image)
    });
    (spec, dir)
}

fn loop_devices_backed_by(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|f| f.starts_with(dir.to_str().unwrap()))
        })
        .count()
}

#[test]
fn the_disk_quota_is_enforced_shown_and_freed() {
    if !can_run("disk") {
        return;
    }
    for pooled in [false, true] {
        let (spec, dir) = disk_spec(if pooled { "diskp" } else { "disk" }, 64, pooled);
        let mut sb = start_with(
            spec,
            dir,
            "exec >/dev/shm/out 2>&1
df -k / | tail -1 | awk '{print \"df-kb:\", $2}'
dd if=/dev/zero of=/home/user/big bs=1M count=100 2>&1 | grep -o 'No space left on device'
sync
echo write-status: $?
touch /tmp/after && echo small-write-ok
rm /home/user/big && dd if=/dev/zero of=/home/user/ten bs=1M count=10 2>/dev/null && echo room-again
sleep 60",
        );
        let out_path = sb.upper_file("/dev/shm/out");
        let deadline = Instant::now() + RUN_TIMEOUT;
        let out = loop {
            let s = fs::read_to_string(&out_path).unwrap_or_default();
            if s.contains("room-again") || Instant::now() > deadline {
                break s;
            }
            sleep(Duration::from_millis(50));
        };
        let df_kb: u64 = line(&out, "df-kb:").parse().unwrap();
        assert!(
            (50 << 10..=64 << 10).contains(&df_kb),
            "df shows the quota: {out}"
        );
        assert!(out.contains("No space left on device"), "{out}");
        assert!(out.contains("room-again"), "{out}");
        let usage = sb.handle.disk_usage().unwrap();
        assert!(
            usage.total_bytes <= 64 << 20 && usage.total_bytes > 50 << 20,
            "{usage:?}"
        );
        assert!(usage.used_bytes >= 10 << 20, "{usage:?}");
        // Nothing of the disk is mounted on the host; its loop device goes with the sandbox.
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(sb.dir().to_str().unwrap()),
            "{mountinfo}"
        );
        assert_eq!(loop_devices_backed_by(sb.dir()), 1);
        // Our copy of a pooled disk's descriptor keeps it mounted: the runtime closes its copy once
        // the sandbox has started, as here.
        sb.spec.disk = None;
        sb.handle.kill().unwrap();
        let deadline = Instant::now() + RUN_TIMEOUT;
        while loop_devices_backed_by(sb.dir()) > 0 {
            assert!(Instant::now() < deadline, "loop device left behind");
            sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn boot_id_is_the_sandboxes_own_and_survives_a_freeze() {
    if !can_run("boot_id") {
        return;
    }
    let host = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let script = "while :; do cat /proc/sys/kernel/random/boot_id > /tmp/b.tmp; mv /tmp/b.tmp /tmp/b; sleep 0.02; done";
    let a = start("boota", script, Limits::default());
    let b = start("bootb", script, Limits::default());
    let read = |sb: &TestSandbox| {
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            if let Ok(s) = fs::read_to_string(sb.upper_file("/tmp/b"))
                && s.len() == 37
            {
                return s;
            }
            assert!(Instant::now() < deadline, "no boot id");
            sleep(Duration::from_millis(20));
        }
    };
    let (ida, idb) = (read(&a), read(&b));
    assert_ne!(ida, host);
    assert_ne!(ida, idb);
    // Written on the sandbox's own /dev, not bound from a file of the host's disk (whose fsync
    // and syncfs would flush the host's disk).
    assert!(!a.dir().join("boot_id").exists());
    a.handle.freeze().unwrap();
    a.handle.thaw().unwrap();
    sleep(Duration::from_millis(100));
    assert_eq!(read(&a), ida, "a full pause keeps the boot id");
}

#[test]
fn per_sandbox_limits_on_files_and_inotify_hold_and_spare_the_host() {
    if !can_run("user_limits") {
        return;
    }
    let (mut spec, dir) = spec("ulimits");
    spec.limits = Limits {
        open_files: Some(1000),
        inotify_instances: Some(8),
        ..Limits::default()
    };
    let sb = start_with(
        spec,
        dir,
        r#"exec >/tmp/out 2>&1
echo nofile: $(ulimit -n) $(ulimit -Hn)
ulimit -Hn 2000 2>/dev/null && echo raised-nofile || echo nofile-stays
echo 100 > /proc/sys/user/max_inotify_instances 2>/dev/null && echo raised-inotify || echo inotify-stays
python3 - <<'EOF'
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 1000:
    fd = libc.inotify_init()
    if fd < 0:
        break
    fds.append(fd)
print("inotify-instances:", len(fds))
EOF
sleep 60"#,
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !fs::read_to_string(sb.upper_file("/tmp/out"))
        .unwrap_or_default()
        .contains("inotify-instances")
    {
        assert!(Instant::now() < deadline, "payload never finished");
        sleep(Duration::from_millis(20));
    }
    let out = fs::read_to_string(sb.upper_file("/tmp/out")).unwrap();
    assert_eq!(line(&out, "nofile:"), "1000 1000", "{out}");
    assert!(
        out.contains("nofile-stays") && out.contains("inotify-stays"),
        "{out}"
    );
    assert_eq!(line(&out, "inotify-instances:"), "8", "{out}");
}

/// The user namespace is created by the range's uid, so the sandbox's inotify instances count
/// against that uid on the host, not against host root's (whose limit the host and every other
/// sandbox would then share).
#[test]
fn a_sandbox_exhausting_its_inotify_instances_leaves_host_root_its_own() {
    if !can_run("inotify_owner") {
        return;
    }
    let sb = start(
        "inotify",
        r#"exec >/tmp/out 2>&1
python3 - <<'EOF'
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
fds = []
while len(fds) < 100000:
    fd = libc.inotify_init()
    if fd < 0:
        break
    fds.append(fd)
print("held", len(fds), flush=True)
time.sleep(60)
EOF"#,
        Limits::default(),
    );
    let deadline = Instant::now() + RUN_TIMEOUT;
    while !fs::read_to_string(sb.upper_file("/tmp/out"))
        .unwrap_or_default()
        .contains("held")
    {
        assert!(Instant::now() < deadline, "payload never finished");
        sleep(Duration::from_millis(20));
    }
    let out = fs::read_to_string(sb.upper_file("/tmp/out")).unwrap();
    let held: usize = line(&out, "held").parse().unwrap();
    let host_limit: usize = fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        held, host_limit,
        "the sandbox is held to the host's per-user limit, as its own uid"
    );
    // Host root can still make inotify instances (this test process is host root).
    let made = Command::new("python3")
        .args(["-c", "import ctypes; l=ctypes.CDLL(None); print(sum(l.inotify_init() >= 0 for _ in range(16)))"])
        .output()
        .unwrap();
    let made: usize = String::from_utf8_lossy(&made.stdout)
        .trim()
        .parse()
        .unwrap();
    // Had the namespace been created by host root, the sandbox's instances would be host root's,
    // and host root would get none now.
    assert!(made > 0, "host root has no inotify instance left");
}

#[test]
fn the_start_check_accepts_the_template_and_explains_a_filesystem_without_idmapping() {
    if !can_run("check") {
        return;
    }
    sandboxd_jail::check_idmapped_mounts(template()).unwrap();
    // procfs cannot be idmapped: the error names the step and what the host needs.
    let err = sandboxd_jail::check_idmapped_mounts(Path::new("/proc")).unwrap_err();
    assert!(err.to_string().contains("idmapped mount"), "{err}");
    assert!(err.to_string().contains("Linux >= 5.12"), "{err}");
}

/// A burst of creates mounts many disks at once: the loop devices the kernel names race between
/// threads (and runtimes); every mount must still get one.
#[test]
fn many_disks_mounted_at_once_all_get_a_loop_device() {
    if !can_run("loop_burst") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("sandboxd-jail-loops-")
        .tempdir_in("/tmp")
        .unwrap();
    let formatted = dir.path().join("template.img");
    format_image(&formatted, 64).unwrap();
    let images: Vec<_> = (0..24)
        .map(|i| {
            let image = dir.path().join(format!("{i}.img"));
            copy_sparse(&formatted, &image).unwrap();
            image
        })
        .collect();
    let mounts: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = images
            .iter()
            .map(|image| s.spawn(move || mount_disk(image)))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for m in &mounts {
        assert!(m.is_ok(), "{m:?}");
    }
    drop(mounts);
    let deadline = Instant::now() + RUN_TIMEOUT;
    while loop_devices_backed_by(dir.path()) > 0 {
        assert!(Instant::now() < deadline, "loop devices left behind");
        sleep(Duration::from_millis(20));
    }
}
