//! Isolation primitives of the sandboxd runtime: a sandbox is a process tree in fresh mount, pid,
//! UTS, IPC, network and cgroup namespaces, rooted in an overlayfs over a template, limited and
//! frozen through its cgroup (v1 or v2, detected at run time), with a tiny init of ours as PID 1.
//!
//! Plain Rust; the PyO3 binding wraps this API. Everything here needs root.
//!
//! # API
//!
//! * [`build_base_template`] writes the built-in template root (host `/usr` + private `/etc`...).
//! * [`SandboxSpec`] (id, hostname, layers, [`Limits`]) describes a sandbox.
//! * [`spawn_sandbox`] starts one from any process (the runtime, multithreaded or not) running an
//!   [`InitCommand`], and returns a [`SandboxHandle`].
//! * [`enter_sandbox`] starts one from a freshly forked single-threaded process (a Python zygote's
//!   child) and *returns inside it*: see the recipe below.
//! * [`SandboxHandle`]: init pid, netns path, pidfd, `freeze`/`thaw`, `kill`, `stats`, `wait`,
//!   `exit_code`, `connect`; [`SandboxHandle::adopt`] re-attaches after a runtime restart,
//!   [`list_sandboxes`] and [`kill_sandbox`] find and clean up what a previous runtime left.
//! * [`become_subreaper`]: lets the runtime reap the inits of finished sandboxes (see
//!   [`SandboxHandle`]).
//! * [`connect_in_netns`] opens a TCP connection to `127.0.0.1:<port>` inside a sandbox: how the
//!   runtime proxies HTTP in. Nothing is published on the host's interfaces.
//!
//! # Processes
//!
//! ```text
//! caller ──fork──▶ A ──(setsid, join cgroup, unshare, lo up)──fork──▶ B = PID 1 (init)
//!   (runtime or            A exits once B reports; B is re-parented          │ mounts, pivot_root
//!    zygote)               to the host's init and outlives the caller        └──fork──▶ C = PID 2
//!                                                                                   (the payload)
//! ```
//!
//! B is the sandbox's init ([`SandboxHandle::init_pid`]): it reaps orphans, forwards SIGTERM,
//! SIGINT and SIGHUP to C, and exits with C's status when C exits, which makes the kernel kill
//! everything else in the sandbox. With [`spawn_sandbox`], `fork` → A is done for you and C
//! `execve`s the [`InitCommand`]. With [`enter_sandbox`], *you* fork A.
//!
//! # Recipe: a Python zygote becomes a sandboxed agent without `exec`
//!
//! The zygote is a single-threaded Python process that has already imported the agent:
//!
//! ```python
//! r, w = os.pipe()
//! pid = os.fork()                       # A: a single-threaded copy of the zygote
//! if pid == 0:
//!     os.close(r)
//!     try:
//!         where = _core.enter_sandbox(spec)   # returns in TWO processes:
//!     except OSError as e:                    # only ever raised in A
//!         os.write(w, b"E" + str(e).encode()); os._exit(1)
//!     if where.inside:                  # C: PID 2 in the sandbox, / is its root, cwd /
//!         os.close(w)                   #    (C inherited every descriptor A had)
//!         run_agent()                   #    never return into the zygote's code
//!         os._exit(0)
//!     os.write(w, b"P%d" % where.init_pid)    # A: report the init's host pid...
//!     os._exit(0)                             #    ...and exit at once
//! os.close(w)
//! msg = read_all(r)                     # "P<pid>" or "E<error>" (EOF once A and C closed it)
//! os.waitpid(pid, 0)                    # reap A (B and C are not the zygote's children)
//! # runtime: handle = SandboxHandle.adopt(id, init_pid); on "E": kill_sandbox(id)
//! ```
//!
//! Notes for the binding: call `enter_sandbox` *holding* the GIL (the forks inside copy the
//! calling thread, which then owns the GIL in every copy; B never runs Python), and in C call
//! `PyOS_AfterFork_Child()` before returning to Python, as `os.fork()` would (it resets the
//! threading module's idea of the main thread and runs the `os.register_at_fork` hooks, which
//! reseed `random`). C is uid 0 with only [`PAYLOAD_CAPABILITIES`]; it keeps the zygote's
//! stdio, so point those at a log before forking.
//!
//! # What a sandbox gets
//!
//! Its own hostname, IPC, loopback-only network (`lo` up, nothing else), cgroup namespace rooted
//! at its cgroup, and pid namespace; a root that is an overlay of the template with the host's
//! `/usr` read-only, a fresh `/proc` (host-wide `/proc/sys` and friends read-only or masked),
//! read-only `/sys`, a minimal `/dev` with its own devpts, and its own `/etc/hostname` and
//! `/etc/hosts`. uid 0 inside is the host's uid 0 (no user namespace) but holds only
//! [`PAYLOAD_CAPABILITIES`] (no `CAP_SYS_ADMIN`, `CAP_MKNOD`, `CAP_SYS_MODULE`...). No seccomp
//! filter and no device cgroup: the capability set is the boundary.
//!
//! # Cost
//!
//! `examples/isolation_cost.rs` (release, 300 runs each, 2-core VM with a load average of 2-4
//! from other work, cgroup v1; ranges over five runs): the raw baseline — `unshare(pid, mnt,
//! ipc, uts, net)` + overlay mount + exec `/bin/true` — takes 1.9–2.9 ms p50; [`spawn_sandbox`]
//! up to the payload's exec 2.7–4.8 ms p50, 1.3–1.6× the raw figure for the cgroup, `lo`,
//! `/proc`, `/sys`, `/dev`, the masks, `pivot_root` and the init, with a 17–21 ms p99 (joining a
//! v1 cgroup sometimes waits for an RCU grace period); a whole create-run-`kill` cycle 4.2–7.1
//! ms p50. fork + exec of `/bin/true` alone is 0.5–0.7 ms.
//!
//! The init is a copy-on-write fork of the process that created the sandbox and keeps the pages
//! it had at that moment: cheap from a small, idle zygote, but a creator whose heap keeps
//! changing (a busy runtime calling [`spawn_sandbox`]) leaves each init holding old copies of
//! the pages it changes since.
//!
//! Needs Linux ≥ 5.4 (pidfds) and root.
//!
//! # Safety of `fork` here
//!
//! Code that runs between `fork` and `execve` (or the return into the payload) makes only
//! async-signal-safe calls on bytes prepared before the fork, so [`spawn_sandbox`] is sound from
//! a multithreaded caller. Errors after a fork travel as `(step, errno)` records on a pipe and
//! become [`std::io::Error`]s (kind from the errno, message naming the step) in the caller.
#![deny(unsafe_code)]

mod capabilities;
mod cgroup;
mod devices;
mod disk;
mod handle;
mod idmap;
mod idrange;
mod init;
mod mounts;
mod namespaces;
mod netns;
mod report;
mod seccomp;
mod spawn;
mod spec;
mod sys;
mod template;
mod userns;

pub use capabilities::PAYLOAD_CAPABILITIES;
pub use cgroup::{
    Budget, CGROUP_PARENT, CgroupVersion, Stats, cgroup_version, configure_budget, list_sandboxes,
    remove_instance_if_empty,
};
pub use disk::{Disk, DiskUsage, copy_sparse, disk_usage, format_image, mount_disk};
pub use handle::{FREEZE_TIMEOUT, KILL_TIMEOUT, SandboxHandle, become_subreaper, kill_sandbox};
pub use idmap::check_idmapped_mounts;
pub use idrange::{Claim, DEFAULT_REGISTRY, FIRST_BASE, IdRegistry, RANGE_SIZE, RANGES};
pub use namespaces::{Entered, SETUP_TIMEOUT, enter_sandbox};
pub use netns::{connect_in_netns, connect_in_netns_fd, socket_in_netns};
pub use seccomp::seccomp_filter;
pub use spawn::{InitCommand, spawn_sandbox};
pub use spec::{DEFAULT_INSTANCE, Limits, MAX_ID_LEN, MAX_LAYERS, SandboxSpec};
pub use template::{USER_UID, build_base_template};
