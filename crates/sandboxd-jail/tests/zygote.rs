//! Tests that need a single-threaded process, so no libtest harness (`harness = false`): a
//! zygote-style `fork` + [`enter_sandbox`], a sandbox that outlives the runtime that spawned it,
//! and the refusal of `enter_sandbox` in a multithreaded process. Root only; skips otherwise.
// `fork` is unsafe; here it is exactly what is being tested, in a single-threaded process.
#![allow(unsafe_code)]

mod common;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork, pipe};
use sandboxd_jail::{
    Budget, CgroupVersion, Entered, InitCommand, Limits, PremadeCgroup, SandboxHandle,
    become_subreaper, cgroup_version, configure_budget, enter_sandbox, enter_sandbox_then,
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
            // By number: the payload shares A's memory (and so this frame), so it closes its
            // own descriptors without touching A's values.
            let report_fd = w.as_raw_fd();
            let go_fd = go_r.as_raw_fd();
            // glibc's tid word in this thread's struct pthread (glibc's fork gave it to the kernel
            // as clear_child_tid), which the payload inherits with the thread pointer.
            let mut tid_word: *mut libc::pid_t = std::ptr::null_mut();
            // SAFETY: the kernel writes one pointer into `tid_word`.
            let r = unsafe {
                libc::prctl(
                    libc::PR_GET_TID_ADDRESS,
                    std::ptr::from_mut(&mut tid_word) as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            };
            assert_eq!(r, 0);
            let mut payload = || -> i32 {
                // The payload's copy of A's report pipe (A's descriptors are the payload's).
                // SAFETY: the payload's own descriptor table entry.
                unsafe { libc::close(report_fd) };
                // Seen by the init (and A) too when they share this memory: the test reads it
                // through the init's /proc/<pid>/mem.
                SHARED_MARK.store(MARK, Ordering::SeqCst);
                let mut rest = Vec::new();
                // SAFETY: the payload's copy of `go`'s read end, used only here.
                unsafe { fs::File::from_raw_fd(go_fd) }
                    .read_to_end(&mut rest)
                    .unwrap();
                // Now that A has exited (the test reaped it before closing `go`): what recursive
                // mutexes take as the owner's id must be the payload's own tid (A's would be
                // wrong; zero, what A's exit writes to its clear_child_tid, worse).
                // SAFETY: the struct pthread's tid word, mapped for the process's life.
                let word = unsafe { tid_word.read_volatile() };
                // SAFETY: gettid takes no arguments.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
                let facts = format!(
                    "pid={} ppid={} hostname={} cwd={} work-visible={} tid-word-is-own={}\n",
                    std::process::id(),
                    nix::unistd::getppid(),
                    fs::read_to_string("/etc/hostname").unwrap().trim(),
                    std::env::current_dir().unwrap().display(),
                    std::path::Path::new("/work").exists(),
                    word == tid,
                );
                fs::write("/tmp/zygote-then", facts).unwrap();
                // A status the init must pass on.
                7
            };
            // Returns only on failure (on success A writes `P<init pid>` and exits).
            let e = enter_sandbox_then(&spec, None, report_fd, &mut payload);
            nix::unistd::write(&w, format!("E{e}").as_bytes()).unwrap();
            std::process::exit(1)
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
                .trim_end()
                .parse()
                .unwrap();
            let handle = SandboxHandle::adopt(&spec.instance, &spec.id, init_pid)
                .unwrap()
                .with_merged_dir(spec.dir.join("merged"));
            // The init and the payload are one memory: the payload's mark is in the init's.
            let mark = wait_for_mark(init_pid);
            assert_eq!(
                mark, MARK,
                "the payload's write is not in the init's memory"
            );
            drop(go_w);
            assert!(
                handle.wait(common::RUN_TIMEOUT).unwrap(),
                "the init did not exit after its payload"
            );
            assert_eq!(handle.exit_code(), Some(7));
            let facts = wait_for_file(&spec.upper_dir().unwrap().join("tmp/zygote-then"));
            assert_eq!(
                facts.trim(),
                format!(
                    "pid=2 ppid=1 hostname={} cwd=/ work-visible=false tid-word-is-own=true",
                    spec.id
                )
            );
            handle.kill().unwrap();
        }
    }
}

/// A seccomp filter for the test's supervisor: `prctl(PR_CAPBSET_DROP, 0)` (the init's first
/// capability dropped, which the payload keeps and never drops) waits for the supervisor's answer
/// on the returned listener; everything else is allowed.
fn hold_the_inits_capability_drop() -> OwnedFd {
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let program = [
        insn(LD_ABS, 0, 0, 0), // seccomp_data.nr
        insn(JEQ, 0, 5, libc::SYS_prctl as u32),
        insn(LD_ABS, 0, 0, 16), // args[0], low half
        insn(JEQ, 0, 3, libc::PR_CAPBSET_DROP as u32),
        insn(LD_ABS, 0, 0, 24), // args[1], low half
        insn(JEQ, 0, 1, 0),
        insn(RET, 0, 0, 0x7fc0_0000), // SECCOMP_RET_USER_NOTIF
        insn(RET, 0, 0, 0x7fff_0000), // SECCOMP_RET_ALLOW
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: the kernel copies the program; SECCOMP_FILTER_FLAG_NEW_LISTENER (8) returns a new
    // descriptor (root: no no_new_privs needed).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            8,
            std::ptr::from_ref(&fprog),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this descriptor.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Answers the next call held by [`hold_the_inits_capability_drop`] with `EPERM`, within a few
/// seconds; false if none came.
fn refuse_held_call(listener: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack.
    if unsafe { libc::poll(&mut pfd, 1, 10_000) } != 1 {
        return false;
    }
    // struct seccomp_notif (80 bytes: id, pid, flags, seccomp_data) and seccomp_notif_resp.
    let mut notif = [0u64; 10];
    // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one struct seccomp_notif into `notif`.
    let r = unsafe { libc::ioctl(listener.as_raw_fd(), 0xc050_2100, notif.as_mut_ptr()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    #[repr(C)]
    struct Resp {
        id: u64,
        val: i64,
        error: i32,
        flags: u32,
    }
    let mut resp = Resp {
        id: notif[0],
        val: 0,
        error: -libc::EPERM,
        flags: 0,
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one struct seccomp_notif_resp.
    let r = unsafe { libc::ioctl(listener.as_raw_fd(), 0xc018_2101, &mut resp) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    true
}

/// A failure of the init's own set-up once the payload already runs the closure (here its
/// capability drop refused, held by a supervisor until the payload has said it started; the
/// setup deadline expiring while the init finishes is the other way): the init kills the payload
/// mid-closure, and A, whose memory that was, must not return into its caller (the zygote would
/// run Python on a heap and interpreter a killed payload was changing). A reports the failure
/// itself, raw, and exits 1; the caller's code after `enter_sandbox_then` never runs.
fn a_failure_after_the_payload_started_never_returns_into_the_caller() {
    let (spec, _dir) = common::spec("zygote-late");
    let _cleanup = Cleanup(spec.id.clone());
    let (r, w) = pipe().unwrap();
    let (started_r, started_w) = pipe().unwrap();
    // SAFETY: single-threaded here (no harness).
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            // The supervisor: its filter is A's, B's and C's too.
            drop(r);
            let listener = hold_the_inits_capability_drop();
            // SAFETY: still single-threaded.
            match unsafe { fork() }.unwrap() {
                ForkResult::Child => {
                    // A.
                    drop(listener);
                    drop(started_r);
                    let report_fd = w.as_raw_fd();
                    let started_fd = started_w.as_raw_fd();
                    let mut payload = || -> i32 {
                        // SAFETY: the payload's own copies, by number.
                        unsafe {
                            libc::close(report_fd);
                            libc::write(started_fd, b"s".as_ptr().cast(), 1);
                            libc::close(started_fd);
                        }
                        loop {
                            // SAFETY: waits for the signal that kills it.
                            unsafe { libc::pause() };
                        }
                    };
                    let e = enter_sandbox_then(&spec, None, report_fd, &mut payload);
                    let _ = nix::unistd::write(&w, format!("RETURNED E{e}\n").as_bytes());
                    std::process::exit(3)
                }
                ForkResult::Parent { child } => {
                    drop(w);
                    drop(started_w);
                    let mut byte = [0u8; 1];
                    let n = fs::File::from(started_r).read(&mut byte).unwrap();
                    let refused = n == 1 && refuse_held_call(&listener);
                    let status = waitpid(child, None).unwrap();
                    let ok = refused && status == WaitStatus::Exited(child, 1);
                    if !ok {
                        eprintln!("started={n} refused={refused} A: {status:?}");
                    }
                    // SAFETY: ends the supervisor without running the test's clean-up twice.
                    unsafe { libc::_exit(if ok { 0 } else { 1 }) }
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(w);
            drop(started_r);
            drop(started_w);
            let msg = read_all(r);
            let status = waitpid(child, None).unwrap();
            assert!(
                !msg.contains("RETURNED"),
                "A returned into its caller: {msg}"
            );
            assert!(
                msg.starts_with("Esandbox setup failed while dropping capabilities (errno 1)"),
                "{msg}"
            );
            assert_eq!(status, WaitStatus::Exited(child, 0), "{msg}");
        }
    }
}

/// What the payload of `zygote_child_enters_sandbox_then` writes into [`SHARED_MARK`].
const MARK: u64 = 0x5a5a_c0de_0011_0001;

/// Zero in this process and in every fork of it; [`MARK`] in the memory the payload writes.
static SHARED_MARK: AtomicU64 = AtomicU64::new(0);

/// [`SHARED_MARK`] as the init `pid` sees it (read through `/proc/<pid>/mem`, as host root), once
/// it is not zero or after a few seconds: the payload sets it as it starts.
fn wait_for_mark(pid: i32) -> u64 {
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut value = 0;
    for _ in 0..200 {
        let mut buf = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(
            &mem,
            &mut buf,
            std::ptr::from_ref(&SHARED_MARK) as u64,
        )
        .unwrap();
        value = u64::from_ne_bytes(buf);
        if value != 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    value
}

/// The pre-made groups (`.spare-<pid>`) in this test process's instance, in every hierarchy.
fn premade_groups() -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for hierarchy in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let instance = hierarchy.path().join("sandboxd").join(common::instance());
        for e in fs::read_dir(&instance).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(".spare-") {
                found.push(e.path());
            }
        }
    }
    found
}

/// The instance's group, as a runtime makes it at its start: a spare makes its group only in one
/// that exists.
fn make_instance_group() {
    configure_budget(&common::instance(), &Budget::default(), &Budget::default()).unwrap();
}

/// The limits a pre-made group is made with, all different from [`requested`]'s.
fn premade_limits() -> Limits {
    Limits {
        memory_bytes: Some(512 << 20),
        cpu_cores: Some(0.5),
        pids_max: Some(100),
        ..Limits::default()
    }
}

/// What the sandbox asks for.
fn requested() -> Limits {
    Limits {
        memory_bytes: Some(256 << 20),
        cpu_cores: Some(1.0),
        pids_max: Some(64),
        ..Limits::default()
    }
}

/// Forks "A", which makes a group ahead of need (as the zygote's spare does), then enters the
/// sandbox with it; the payload waits for end of file on a pipe
/// this returns the write end of. Returns A's report (`P<init pid>` or `E<error>`).
fn enter_with_premade(spec: &sandboxd_jail::SandboxSpec) -> (String, OwnedFd) {
    make_instance_group();
    let (r, w) = pipe().unwrap();
    let (go_r, go_w) = pipe().unwrap();
    // SAFETY: this test binary is single-threaded here (no harness), like the Python zygote.
    match unsafe { fork() }.unwrap() {
        ForkResult::Child => {
            drop(r);
            drop(go_w);
            let report_fd = w.as_raw_fd();
            let go_fd = go_r.as_raw_fd();
            let report = |msg: String| -> ! {
                nix::unistd::write(&w, msg.as_bytes()).unwrap();
                std::process::exit(0)
            };
            let premade = match PremadeCgroup::make(&spec.instance, &premade_limits()) {
                Ok(p) => p,
                Err(e) => report(format!("M{e}")),
            };
            let mut payload = || -> i32 {
                // A's report: its end of file says the sandbox is up. By number, as in
                // zygote_child_enters_sandbox_then: this is A's memory too.
                // SAFETY: the payload's own descriptor table entries.
                unsafe { libc::close(report_fd) };
                let mut rest = Vec::new();
                // SAFETY: as above, used only here.
                unsafe { fs::File::from_raw_fd(go_fd) }
                    .read_to_end(&mut rest)
                    .unwrap();
                0
            };
            // Returns only on failure (on success A writes `P<init pid>` and exits 0).
            let e = enter_sandbox_then(spec, Some(premade), report_fd, &mut payload);
            report(format!("E{e}"))
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
            (msg, go_w)
        }
    }
}

/// The sandbox `enter_with_premade` reported (`P<init pid>`), adopted, with its init's pid; and no
/// group left under a pre-made name.
fn adopted_without_premade_groups(
    spec: &sandboxd_jail::SandboxSpec,
    msg: &str,
) -> (SandboxHandle, i32) {
    let init_pid: i32 = msg
        .strip_prefix('P')
        .unwrap_or_else(|| panic!("enter_sandbox_then failed: {msg}"))
        .trim_end()
        .parse()
        .unwrap();
    let handle = SandboxHandle::adopt(&spec.instance, &spec.id, init_pid).unwrap();
    assert_eq!(premade_groups(), Vec::<std::path::PathBuf>::new());
    (handle, init_pid)
}

/// The sandbox's limits, read from its group on the host: (memory, CPU quota, pids, devices).
fn limits_of(handle: &SandboxHandle) -> (String, String, String, String) {
    let dirs = handle.cgroup_dirs();
    let read = |name: &str| {
        dirs.iter()
            .find_map(|d| fs::read_to_string(d.join(name)).ok())
            .unwrap_or_else(|| panic!("no {name} in {dirs:?}"))
            .trim()
            .to_owned()
    };
    (
        read("memory.limit_in_bytes"),
        read("cpu.cfs_quota_us"),
        read("pids.max"),
        read("devices.list"),
    )
}

/// A group made ahead of need becomes the sandbox's with the request's limits (not those it was
/// made with) and the device allow-list; none is left under its own name. On v2 (no rename) no
/// group can be pre-made, and saying so is the whole contract.
fn premade_cgroup_becomes_the_sandboxs() {
    let (mut spec, _dir) = common::spec("premade");
    spec.limits = requested();
    let _cleanup = Cleanup(spec.id.clone());
    let (msg, go) = enter_with_premade(&spec);
    if cgroup_version().unwrap() == CgroupVersion::V2 {
        assert!(msg.starts_with("M"), "{msg}");
        assert!(msg.contains("v2"), "{msg}");
        return;
    }
    let (handle, init_pid) = adopted_without_premade_groups(&spec, &msg);
    let (memory, quota, pids, devices) = limits_of(&handle);
    assert_eq!(memory, (256u64 << 20).to_string());
    assert_eq!(quota, "100000");
    assert_eq!(pids, "64");
    // The allow-list (deny all, then the listed devices), as a group made at request time has.
    assert!(!devices.contains("a *:* rwm"), "{devices}");
    assert!(devices.contains("c 1:3 rwm"), "{devices}");
    assert!(devices.contains("c 136:* rwm"), "{devices}");
    // The init and the payload are in it, under the sandbox's name.
    for d in handle.cgroup_dirs() {
        let procs = fs::read_to_string(d.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == init_pid.to_string()),
            "{}: {procs}",
            d.display()
        );
    }
    drop(go);
    handle.kill().unwrap();
    assert!(handle.cgroup_dirs().iter().all(|d| !d.exists()));
}

/// The sandbox's name is taken in one hierarchy (an empty group: a hostile leftover): the rename is
/// refused there, the renames made are undone, the pre-made group is removed, and the sandbox's
/// group is made as usual, with the request's limits.
fn premade_cgroup_refused_rename_falls_back() {
    if cgroup_version().unwrap() == CgroupVersion::V2 {
        return;
    }
    let (mut spec, _dir) = common::spec("premade-taken");
    spec.limits = requested();
    let _cleanup = Cleanup(spec.id.clone());
    let taken = std::path::Path::new("/sys/fs/cgroup/pids/sandboxd")
        .join(common::instance())
        .join(&spec.id);
    fs::create_dir_all(&taken).unwrap();
    let taken_inode = fs::metadata(&taken).unwrap().ino();
    let (msg, go) = enter_with_premade(&spec);
    let (handle, _) = adopted_without_premade_groups(&spec, &msg);
    let (memory, quota, pids, _) = limits_of(&handle);
    assert_eq!(
        (memory.as_str(), quota.as_str(), pids.as_str()),
        ("268435456", "100000", "64")
    );
    // The taken group was refused as a target, not replaced: the sandbox's group there is it.
    assert_eq!(fs::metadata(&taken).unwrap().ino(), taken_inode);
    drop(go);
    handle.kill().unwrap();
}

/// An entry that fails after the group was pre-made (here: its template is gone) leaves no
/// pre-made group behind, and the sandbox's own is removed by `kill_sandbox` as before.
fn premade_cgroup_removed_on_failure() {
    if cgroup_version().unwrap() == CgroupVersion::V2 {
        return;
    }
    let (mut spec, _dir) = common::spec("premade-fail");
    spec.limits = requested();
    spec.lower_dirs = vec!["/nonexistent-template".into()];
    let _cleanup = Cleanup(spec.id.clone());
    let (msg, _go) = enter_with_premade(&spec);
    assert!(msg.starts_with('E'), "{msg}");
    assert_eq!(premade_groups(), Vec::<std::path::PathBuf>::new());
    kill_sandbox(&spec.instance, &spec.id).unwrap();
    let left: Vec<_> = fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|h| {
            h.path()
                .join("sandboxd")
                .join(common::instance())
                .join(&spec.id)
        })
        .filter(|d| d.exists())
        .collect();
    assert_eq!(left, Vec::<std::path::PathBuf>::new());
}

/// A pre-made group is made only in an existing instance group (none is made for it); it carries
/// its limits and the device allow-list from the start, and goes when dropped unused; one that does not fit the request (it has a memory limit, the request none) is
/// not used: the sandbox's group is made afresh, without the pre-made limit.
fn premade_cgroup_unused_or_unfit_is_removed() {
    if cgroup_version().unwrap() == CgroupVersion::V2 {
        return;
    }
    common::remove_empty_cgroup_parents();
    let error = PremadeCgroup::make(&common::instance(), &premade_limits()).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
    // No instance group was made for it (`sandboxd/` itself may be gone: on a host with no other
    // runtime, removing this process's empty instance group removes its parent too).
    assert!(
        !std::path::Path::new("/sys/fs/cgroup/pids/sandboxd")
            .join(common::instance())
            .exists()
    );
    make_instance_group();
    let made = PremadeCgroup::make(&common::instance(), &premade_limits()).unwrap();
    let groups = premade_groups();
    assert_eq!(groups.len(), 6, "{groups:?}"); // memory, cpu, cpuacct, pids, freezer, devices
    for d in &groups {
        let read = |name: &str| fs::read_to_string(d.join(name)).ok();
        if let Some(memory) = read("memory.limit_in_bytes") {
            assert_eq!(memory.trim(), (512u64 << 20).to_string());
        }
        if let Some(pids) = read("pids.max") {
            assert_eq!(pids.trim(), "100");
        }
        if let Some(quota) = read("cpu.cfs_quota_us") {
            assert_eq!(quota.trim(), "50000");
        }
        if let Some(devices) = read("devices.list") {
            assert!(!devices.contains("a *:* rwm"), "{devices}");
        }
    }
    drop(made);
    assert_eq!(premade_groups(), Vec::<std::path::PathBuf>::new());

    let (mut spec, _dir) = common::spec("premade-unfit");
    spec.limits = Limits {
        memory_bytes: None,
        ..requested()
    };
    let _cleanup = Cleanup(spec.id.clone());
    let (msg, go) = enter_with_premade(&spec);
    let (handle, _) = adopted_without_premade_groups(&spec, &msg);
    let (memory, quota, pids, _) = limits_of(&handle);
    assert_ne!(
        memory,
        (512u64 << 20).to_string(),
        "the pre-made limit leaked"
    );
    assert_eq!((quota.as_str(), pids.as_str()), ("100000", "64"));
    drop(go);
    handle.kill().unwrap();
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
    let tests: [(&str, fn()); 9] = [
        ("zygote_child_enters_sandbox", zygote_child_enters_sandbox),
        ("sandbox_survives_its_runtime", sandbox_survives_its_runtime),
        // After the others: it makes this process a subreaper.
        (
            "zygote_child_enters_sandbox_then",
            zygote_child_enters_sandbox_then,
        ),
        (
            "premade_cgroup_becomes_the_sandboxs",
            premade_cgroup_becomes_the_sandboxs,
        ),
        (
            "premade_cgroup_refused_rename_falls_back",
            premade_cgroup_refused_rename_falls_back,
        ),
        (
            "premade_cgroup_removed_on_failure",
            premade_cgroup_removed_on_failure,
        ),
        (
            "premade_cgroup_unused_or_unfit_is_removed",
            premade_cgroup_unused_or_unfit_is_removed,
        ),
        (
            "a_failure_after_the_payload_started_never_returns_into_the_caller",
            a_failure_after_the_payload_started_never_returns_into_the_caller,
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
