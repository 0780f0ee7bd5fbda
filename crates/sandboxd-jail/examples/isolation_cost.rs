//! Isolation cost, each figure beside its baseline, as JSON on stdout:
//!
//! * `fork_exec_true`: fork + exec + wait of `/bin/true` (no isolation; the floor).
//! * `raw_unshare_overlay_exec_true`: the raw baseline before user namespaces — fork,
//!   `unshare(pid, mnt, ipc, uts, net)`, private propagation, an overlay mount (the built-in
//!   template over a fresh upper dir), fork into the new pid namespace, exec `/bin/true`, wait.
//! * `raw_userns_idmap_overlay_seccomp_exec_true`: the raw cost of today's isolation — the same,
//!   plus a user namespace created by a helper running as the range's base uid (with its maps
//!   written from outside), an idmapped copy of the template mounted inside, overlayfs with
//!   `userxattr`, and the sandbox's seccomp filter installed before the exec.
//! * `spawn_sandbox_until_exec`: `spawn_sandbox` running `/bin/true`, until it returns (the
//!   payload's exec has succeeded): adds the cgroup (limits, device list), `lo`, `/proc`, `/sys`,
//!   `/dev`, the boot id, the idmapped `/usr`, `pivot_root`, the init, capabilities, rlimits and
//!   the pidfd/netns handles.
//! * `spawn_sandbox_with_disk_until_exec`: the same with a disk image (a copy of a formatted
//!   empty ext4 image made before the clock starts): adds the loop device and the ext4 mount.
//! * `spawn_sandbox_with_pooled_disk_until_exec`: the same with the disk mounted before the clock
//!   starts ([`sandboxd_jail::mount_disk`]), as the runtime's pool of ready disks does.
//! * `sandbox_lifecycle`: `spawn_sandbox` plus waiting for the sandbox to exit and `kill()`
//!   (cgroup removal): a whole create-run-destroy cycle.
//!
//! Run as root, on a release build: `cargo run --release -p sandboxd-jail --example
//! isolation_cost -- [runs]` (default 200).
#![allow(unsafe_code)] // fork and raw system calls, for the raw baselines.

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::chown;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, chdir, execv, fork, pipe, read, write};
use sandboxd_jail::{
    DEFAULT_INSTANCE, DEFAULT_REGISTRY, Disk, IdRegistry, InitCommand, SandboxSpec,
    build_base_template, cgroup_version, copy_sparse, format_image, mount_disk,
    remove_instance_if_empty, seccomp_filter, spawn_sandbox,
};

/// Runs measured when no count is given: enough for a stable p99 in a few seconds.
const DEFAULT_RUNS: usize = 200;

/// Runs discarded first, to warm the page cache and the kernel's slabs.
const WARMUP_RUNS: usize = 10;

/// Size of the disk image in the disk scenario: the runtime's default quota.
const DISK_MB: u64 = 10240;

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

/// `setgroups([])`, then all three gids and uids to `id`, on this thread only.
fn become_ids(id: u32) -> bool {
    // SAFETY: integer arguments (and a null list with a zero count).
    unsafe {
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
            && libc::syscall(libc::SYS_setresgid, id, id, id) == 0
            && libc::syscall(libc::SYS_setresuid, id, id, id) == 0
    }
}

/// An idmapped, read-only, detached copy of `path` (open_tree + mount_setattr).
fn idmapped(path: &std::ffi::CStr, userns: &OwnedFd) -> Option<OwnedFd> {
    // SAFETY: open_tree reads a C string and returns a descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: reads `attr` of the given size and an empty path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    (r == 0).then_some(tree)
}

/// One raw run with today's isolation (see the module docs); returns fork to reaped child.
fn raw_userns_run(
    template: &Path,
    dir: &Path,
    base: u32,
    filter: &[seccompiler::sock_filter],
) -> Duration {
    for d in ["upper", "work", "merged", "lower0"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    for d in ["upper", "work"] {
        chown(dir.join(d), Some(base), Some(base)).unwrap();
    }
    let template = std::ffi::CString::new(template.to_str().unwrap()).unwrap();
    let dir_c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    let map = format!("0 {base} 65536\n");
    let t = Instant::now();
    // SAFETY: this example is single-threaded.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            std::process::exit(raw_userns_child(&template, &dir_c, base, &map, filter))
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).unwrap();
            let took = t.elapsed();
            assert_eq!(
                status,
                WaitStatus::Exited(child, 0),
                "raw userns run failed"
            );
            took
        }
    }
}

fn raw_userns_child(
    template: &std::ffi::CStr,
    dir: &std::ffi::CStr,
    base: u32,
    map: &str,
    filter: &[seccompiler::sock_filter],
) -> i32 {
    let (ready_r, ready_w) = pipe().unwrap();
    let (go_r, go_w) = pipe().unwrap();
    // SAFETY: single-threaded.
    let helper = match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop((ready_r, go_w));
            if !become_ids(base) || unshare(CloneFlags::CLONE_NEWUSER).is_err() {
                std::process::exit(10);
            }
            let _ = write(&ready_w, b"u");
            let _ = read(&go_r, &mut [0u8; 1]);
            std::process::exit(0)
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, go_r));
    if read(&ready_r, &mut [0u8; 1]).unwrap_or(0) != 1 {
        return 11;
    }
    for f in ["uid_map", "gid_map"] {
        fs::write(format!("/proc/{helper}/{f}"), map).unwrap();
    }
    let userns = OwnedFd::from(fs::File::open(format!("/proc/{helper}/ns/user")).unwrap());
    drop(go_w);
    let Some(layer) = idmapped(template, &userns) else {
        return 12;
    };
    chdir(dir).unwrap();
    if setns(&userns, CloneFlags::CLONE_NEWUSER).is_err() || !become_ids(0) {
        return 13;
    }
    let flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    if unshare(flags).is_err()
        || mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_err()
    {
        return 14;
    }
    // SAFETY: single-threaded.
    let code = match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // SAFETY: move_mount reads two C strings.
            let moved = unsafe {
                libc::syscall(
                    libc::SYS_move_mount,
                    layer.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    c"lower0".as_ptr(),
                    libc::MOVE_MOUNT_F_EMPTY_PATH,
                )
            };
            let opts = "lowerdir=lower0,upperdir=upper,workdir=work,userxattr";
            if moved != 0
                || mount(
                    Some("overlay"),
                    "merged",
                    Some("overlay"),
                    MsFlags::empty(),
                    Some(opts),
                )
                .is_err()
            {
                std::process::exit(15);
            }
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: the kernel copies `len` instructions from `filter`, which outlives the call.
            let r = unsafe {
                libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog)
            };
            if r != 0 {
                std::process::exit(16);
            }
            let _ = execv(c"/bin/true", &[c"true"]);
            std::process::exit(127)
        }
        ForkResult::Parent { child } => match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, c)) => c,
            _ => 3,
        },
    };
    let _ = waitpid(helper, None);
    code
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

    let registry = IdRegistry::open(Path::new(DEFAULT_REGISTRY)).unwrap();
    let range = registry.claim(base.path(), "isolation-cost").unwrap();
    let filter = seccomp_filter(false).unwrap();
    let raw_userns = measure(runs, |i| {
        let dir = base.path().join(format!("rawu{i}"));
        let took = raw_userns_run(&template, &dir, range, &filter);
        std::fs::remove_dir_all(&dir).unwrap();
        took
    });

    let mut lifecycle = Vec::new();
    let until_exec = measure(runs, |i| {
        let dir = base.path().join(format!("sb{i}"));
        let spec = SandboxSpec::new(
            format!("cost{}-{i}", std::process::id()),
            &template,
            &dir,
            range,
        );
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

    let disk_template = base.path().join("disk.img");
    format_image(&disk_template, DISK_MB).unwrap();
    // pooled: the disk is mounted before the clock starts, as the runtime's pool does.
    let disk_run = |i: usize, pooled: bool| {
        let dir = base.path().join(format!("sd{i}"));
        fs::create_dir_all(&dir).unwrap();
        let mut spec = SandboxSpec::new(
            format!("costd{}-{i}", std::process::id()),
            &template,
            &dir,
            range,
        );
        let image = dir.join("disk.img");
        copy_sparse(&disk_template, &image).unwrap();
        spec.disk = Some(if pooled {
            Disk::Mounted(Arc::new(mount_disk(&image).unwrap()))
        } else {
            Disk::Image(image)
        });
        let t = Instant::now();
        let h = spawn_sandbox(&spec, exec_true()).unwrap();
        let spawned = t.elapsed();
        drop(spec);
        assert!(h.wait(Duration::from_secs(10)).unwrap());
        h.kill().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        spawned
    };
    let with_disk = measure(runs, |i| disk_run(i, false));
    let with_pooled_disk = measure(runs, |i| disk_run(i, true));
    let _ = registry.release(range, base.path(), "isolation-cost");
    // The sandboxes above lived in the default instance's group (`sandboxd/default`): leave the
    // host as it was, unless another user of that instance still has a sandbox in it.
    let _ = remove_instance_if_empty(DEFAULT_INSTANCE);

    println!(
        "{{\"runs\": {runs}, \"cgroup\": \"{:?}\", \"fork_exec_true\": {fork_exec}, \
         \"raw_unshare_overlay_exec_true\": {raw}, \
         \"raw_userns_idmap_overlay_seccomp_exec_true\": {raw_userns}, \
         \"spawn_sandbox_until_exec\": {until_exec}, \
         \"spawn_sandbox_with_disk_until_exec\": {with_disk}, \
         \"spawn_sandbox_with_pooled_disk_until_exec\": {with_pooled_disk}, \
         \"sandbox_lifecycle\": {lifecycle}}}",
        cgroup_version().unwrap()
    );
}
