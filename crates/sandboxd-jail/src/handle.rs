//! [`SandboxHandle`]: the runtime's grip on a running sandbox — its init, its network namespace,
//! its cgroup — whether the runtime started it or re-adopted it after a restart.
//!
//! What the kernel does here: a pidfd refers to one process for its whole life, so, unlike a bare
//! pid, it can never come to mean a newer process that reused the number; it becomes readable
//! when that process exits, even for a process that is not our child (so the runtime can `poll`
//! or `loop.add_reader` it). The namespace file `/proc/<pid>/ns/net`, once opened, keeps the
//! network namespace reachable the same way. Everything else goes through the cgroup.
//!
//! Reaping: the init is not the creator's child (it was re-parented when the intermediate process
//! exited), so when it exits, *its new parent* must reap it — the host's init, or the nearest
//! ancestor that set `PR_SET_CHILD_SUBREAPER`. If that parent never reaps (some container or VM
//! inits do not), each finished sandbox leaves a `[sandboxd-init] <defunct>` zombie. A runtime
//! that calls [`become_subreaper`] before creating sandboxes gets them back as children (they
//! still survive its death, moving on to the host's init) and [`SandboxHandle::wait`] then reaps
//! each one through its pidfd and records [`SandboxHandle::exit_code`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};

use crate::cgroup::{Cgroup, CgroupVersion, Stats};
use crate::disk::{DiskUsage, disk_usage};
use crate::mounts::detach_if_mounted;
use crate::netns::{connect_in_netns_fd, socket_in_netns};
use crate::spec::validate_id;
use crate::sys::{pidfd_open, pidfd_send_signal};

/// How long freeze and thaw may take. Freezing waits for every task to reach a stopping point;
/// tasks in uninterruptible I/O can delay that, so allow seconds, not milliseconds.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`SandboxHandle::kill`] waits for the cgroup to empty and be removed. SIGKILL cannot
/// be blocked, but a task exits only once it leaves uninterruptible sleep.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// `exit_code` before the init has been reaped by us.
const NO_EXIT_CODE: i32 = i32::MIN;

/// Exit status reported for an init killed by signal `n`: `128 + n`, as shells do.
const SIGNALED_BASE: i32 = 128;

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`): sandbox inits created
/// from now on are re-parented to it rather than to the host's init, so [`SandboxHandle::wait`]
/// can reap them. Call it once, early, in the runtime. See the module docs.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// A running (or finished) sandbox. Dropping the handle does not stop the sandbox.
#[derive(Debug)]
pub struct SandboxHandle {
    id: String,
    init_pid: i32,
    pidfd: OwnedFd,
    /// The init's exit status once [`SandboxHandle::wait`] reaped it, else [`NO_EXIT_CODE`].
    exit_code: AtomicI32,
    /// The sandbox's network namespace, opened while the init was alive; `None` if it had already
    /// exited by then.
    netns: Option<OwnedFd>,
    cgroup: Cgroup,
    merged_dir: Option<PathBuf>,
}

impl SandboxHandle {
    /// Builds a handle for init `init_pid` while it cannot have been reused (it is the child of a
    /// live process, or already checked to be in the cgroup behind a pidfd).
    pub(crate) fn attach(
        id: &str,
        init_pid: i32,
        cgroup: Cgroup,
        merged_dir: Option<PathBuf>,
    ) -> io::Result<SandboxHandle> {
        let pidfd = pidfd_open(init_pid)?;
        Ok(Self::with_pidfd(id, init_pid, pidfd, cgroup, merged_dir))
    }

    fn with_pidfd(
        id: &str,
        init_pid: i32,
        pidfd: OwnedFd,
        cgroup: Cgroup,
        merged_dir: Option<PathBuf>,
    ) -> SandboxHandle {
        let netns = File::open(format!("/proc/{init_pid}/ns/net"))
            .ok()
            .map(OwnedFd::from);
        SandboxHandle {
            id: id.to_owned(),
            init_pid,
            pidfd,
            exit_code: AtomicI32::new(NO_EXIT_CODE),
            netns,
            cgroup,
            merged_dir,
        }
    }

    /// Re-attaches to sandbox `id` of runtime `instance` whose init is `init_pid` (all recorded by
    /// a previous runtime process). Fails with `NotFound` if that process is gone or is not in the
    /// sandbox's cgroup (e.g. the pid was reused); to clean up such a sandbox use
    /// [`crate::kill_sandbox`].
    ///
    /// The adopted handle does not know the merged dir; see [`SandboxHandle::with_merged_dir`].
    pub fn adopt(instance: &str, id: &str, init_pid: i32) -> io::Result<SandboxHandle> {
        validate_id(id)?;
        let cgroup = Cgroup::locate(instance, id)?;
        let not_found = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {init_pid} is not the init of sandbox {id}"),
            )
        };
        let pidfd = pidfd_open(init_pid).map_err(|_| not_found())?;
        // The pidfd pins the process; checking membership after opening it closes the race with
        // pid reuse.
        if !cgroup.contains(init_pid).unwrap_or(false) {
            return Err(not_found());
        }
        Ok(Self::with_pidfd(id, init_pid, pidfd, cgroup, None))
    }

    /// Records the merged dir so [`SandboxHandle::kill`] can make sure nothing stays mounted there
    /// in the caller's namespace.
    pub fn with_merged_dir(mut self, merged_dir: impl Into<PathBuf>) -> SandboxHandle {
        self.merged_dir = Some(merged_dir.into());
        self
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Pid of the sandbox's init (its PID 1), as seen from the caller's pid namespace. Record it
    /// to [`SandboxHandle::adopt`] the sandbox after a restart.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    /// `/proc/<init pid>/ns/net`: the sandbox's network namespace, for [`crate::connect_in_netns`]
    /// or `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.init_pid))
    }

    /// A pidfd of the init: readable once the init has exited (the sandbox is over). For
    /// `loop.add_reader`, or `poll`.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Which cgroup version the host uses.
    pub fn cgroup_version(&self) -> CgroupVersion {
        self.cgroup.version()
    }

    /// The sandbox cgroup's directories (one on v2, one per controller hierarchy on v1).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup.dirs()
    }

    /// Connects to `127.0.0.1:port` inside the sandbox; see [`crate::connect_in_netns`].
    pub fn connect(&self, port: u16, timeout: Duration) -> io::Result<OwnedFd> {
        match &self.netns {
            Some(ns) => connect_in_netns_fd(ns.as_fd(), port, timeout),
            None => crate::connect_in_netns(&self.netns_path(), port, timeout),
        }
    }

    /// A new TCP socket in the sandbox's network namespace, non-blocking and close-on-exec, not
    /// connected: the caller connects it where it waits for sockets anyway (an event loop), with no
    /// thread of its own blocked in `connect`. See [`crate::socket_in_netns`] (a helper thread
    /// enters the namespace; the caller's threads never do).
    pub fn socket(&self) -> io::Result<OwnedFd> {
        match &self.netns {
            Some(ns) => socket_in_netns(ns.as_fd()),
            None => socket_in_netns(File::open(self.netns_path())?.as_fd()),
        }
    }

    /// Freezes every process of the sandbox (they stay in memory, using no CPU) and returns once
    /// the kernel reports the whole cgroup frozen. Waits at most [`FREEZE_TIMEOUT`].
    pub fn freeze(&self) -> io::Result<()> {
        self.cgroup.freeze(FREEZE_TIMEOUT)
    }

    /// Resumes a frozen sandbox. Waits at most [`FREEZE_TIMEOUT`].
    pub fn thaw(&self) -> io::Result<()> {
        self.cgroup.thaw(FREEZE_TIMEOUT)
    }

    /// Sets the sandbox's CPU weight against the other sandboxes ([`crate::Limits::cpu_weight`]):
    /// a claimed warm sandbox goes back to [`crate::DEFAULT_CPU_WEIGHT`]. One cgroup file write.
    pub fn set_cpu_weight(&self, weight: u64) -> io::Result<()> {
        crate::spec::check_cpu_weight(weight)?;
        self.cgroup.set_cpu_weight(weight)
    }

    /// Memory, CPU time and task count, from the cgroup.
    pub fn stats(&self) -> io::Result<Stats> {
        self.cgroup.stats()
    }

    /// Size and use of the sandbox's root filesystem as `df /` shows them inside: overlayfs
    /// reports its writable layer's filesystem, which is the sandbox's disk when it has one. Read
    /// through `/proc/<init>/root`, so it works whatever is (or is not) mounted on the host.
    pub fn disk_usage(&self) -> io::Result<DiskUsage> {
        disk_usage(&PathBuf::from(format!("/proc/{}/root/", self.init_pid)))
    }

    /// Whether the init is still running.
    pub fn is_running(&self) -> io::Result<bool> {
        Ok(!self.wait(Duration::ZERO)?)
    }

    /// The init's exit status (the payload's exit code, or `128 + signal`), known only once
    /// [`SandboxHandle::wait`] has seen the init exit *and* the caller is its parent (see
    /// [`become_subreaper`]).
    pub fn exit_code(&self) -> Option<i32> {
        Some(self.exit_code.load(Ordering::Relaxed)).filter(|c| *c != NO_EXIT_CODE)
    }

    /// Reaps the exited init if we are its parent; otherwise its parent will.
    fn reap(&self) {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG;
        let code = match waitid(Id::PIDFd(self.pidfd.as_fd()), flags) {
            Ok(WaitStatus::Exited(_, code)) => code,
            Ok(WaitStatus::Signaled(_, sig, _)) => SIGNALED_BASE + sig as i32,
            _ => return,
        };
        self.exit_code.store(code, Ordering::Relaxed);
    }

    /// Waits up to `timeout` for the init to exit. Returns `true` if it has exited (and then
    /// reaps it when the caller is its parent).
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Round up, so a sub-millisecond remainder sleeps instead of spinning.
            let ms = u16::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if left.is_zero() => return Ok(false),
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {
                    self.reap();
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Kills every process of the sandbox, waits until they are gone, makes sure the overlay is
    /// not mounted in the caller's namespace, and removes the cgroup. Works on a frozen sandbox
    /// and on one that already exited; idempotent. The upper, work and merged dirs are left for
    /// the caller to keep (filesystem pause) or delete. Waits at most about [`KILL_TIMEOUT`].
    ///
    /// The init goes first: SIGKILL to a PID namespace's init makes the kernel kill every other
    /// process of the namespace (those of namespaces nested in it too) and stop it from forking,
    /// and the init's exit completes only once they are all reaped. So its pidfd says when the
    /// whole sandbox is gone, without polling the cgroup: the sweep after it finds the cgroup empty
    /// in one read, and stays for anything in the cgroup outside the namespace (nothing, as the
    /// jail builds it). A frozen task dies of a SIGKILL only once thawed (cgroup v1), so a frozen
    /// sandbox is thawed after the signal, and every one of its tasks is signalled before the thaw:
    /// the others would otherwise run from the thaw until the init's exit got to them.
    pub fn kill(&self) -> io::Result<()> {
        match pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {} // exited already
            Err(e) => return Err(e),
        }
        if self.cgroup.exists() {
            self.cgroup.kill_then_thaw_if_frozen(FREEZE_TIMEOUT)?;
        }
        self.wait(KILL_TIMEOUT)?;
        self.cgroup.kill_all(KILL_TIMEOUT)?;
        if let Some(merged) = &self.merged_dir {
            detach_if_mounted(merged)?;
        }
        self.cgroup.remove(KILL_TIMEOUT)
    }
}

/// Kills sandbox `id` of runtime `instance` and removes its cgroup without a handle: for
/// sandboxes found after a restart ([`crate::list_sandboxes`]) whose init is gone or unknown.
/// Idempotent.
pub fn kill_sandbox(instance: &str, id: &str) -> io::Result<()> {
    validate_id(id)?;
    let cgroup = Cgroup::locate(instance, id)?;
    cgroup.kill_all(KILL_TIMEOUT)?;
    cgroup.remove(KILL_TIMEOUT)
}
