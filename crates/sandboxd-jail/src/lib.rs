//! Isolation primitives of the sandboxd runtime: a sandbox is a process tree in its own user
//! namespace (its uids a host range of its own) and fresh mount, pid, UTS, IPC, network and cgroup
//! namespaces, rooted in an overlayfs over an idmapped template with its writable layer on its own
//! disk, behind a seccomp filter, limited and frozen through its cgroup (v1 or v2, detected at run
//! time), with a tiny init of ours as PID 1.
//!
//! Plain Rust; the PyO3 binding wraps this API. Everything here needs root.
//!
//! # API
//!
//! * [`build_base_template`] writes the built-in template root (host `/usr` + private `/etc`...).
//! * [`IdRegistry`] claims a sandbox's host id range, host-wide; [`format_image`],
//!   [`copy_sparse`] and [`mount_disk`] make its disk; [`configure_budget`] writes the host-wide
//!   limits of all sandboxes; [`check_idmapped_mounts`] tells whether the host can do all this.
//! * [`SandboxSpec`] (id, instance, id range, layers, [`Disk`], [`Limits`], [`VolumeMount`]s)
//!   describes a sandbox; [`validate_volume_target`] checks a volume's mount point alone.
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
//! The zygote itself calls [`enter_sandbox_then`]
//! (`_core.enter_sandbox(spec, payload=run_agent, report_fd=w)`): B and C are both `CLONE_VM`
//! clones sharing A's memory, so a create copies the zygote's page tables once (its fork of A)
//! instead of three times as the recipe does; C runs the closure instead of returning, and A, on
//! success, writes `P<init pid>\n` and exits inside the call, never running Python again (C runs
//! Python on that same memory). It returns only a failure, once B and C are gone.
//!
//! Notes for the binding: call `enter_sandbox` *holding* the GIL (the forks inside copy the
//! calling thread, which then owns the GIL in every copy; B never runs Python), and in C call
//! `PyOS_AfterFork_Child()` before returning to Python, as `os.fork()` would (it resets the
//! threading module's idea of the main thread and runs the `os.register_at_fork` hooks, which
//! reseed `random`). C is root of the sandbox's user namespace with only
//! [`PAYLOAD_CAPABILITIES`], under the seccomp filter; it keeps the zygote's stdio, so point
//! those at a log before forking.
//!
//! # What a sandbox gets
//!
//! Its own user namespace: uids and gids 0-65535 are the host's `id_base..id_base+65536`, created
//! by that range's uid so per-user kernel counters are the sandbox's own (`userns.rs`). Its own
//! hostname, IPC, loopback-only network (`lo` up, nothing else), cgroup namespace rooted at its
//! cgroup, and pid namespace; a root that is an overlay of the idmapped template (root-owned
//! inside, unchanged on disk) with the host's `/usr` idmapped and read-only, its writable layer on
//! its own ext4 disk (the quota; `disk.rs`), a fresh `/proc` (host-wide `/proc/sys` and friends
//! read-only or masked, its own `boot_id`), read-only `/sys`, a minimal `/dev` with its own
//! devpts, and its own `/etc/hostname` and `/etc/hosts`. Root inside holds only
//! [`PAYLOAD_CAPABILITIES`], over its own namespaces only; a seccomp filter after Docker's default
//! profile (`seccomp.rs`), a device allow-list (`devices.rs`), limits in a cgroup whose files it
//! cannot write, and `RLIMIT_NOFILE` and inotify limits it cannot raise.
//!
//! # Cost
//!
//! `examples/isolation_cost.rs` (release, 200 runs each, 2-core VM shared with other work, cgroup
//! v1): the raw cost of the isolation — a user namespace made by the range's uid, an idmapped
//! template under overlayfs, the seccomp filter, exec `/bin/true` — is 3.5 ms p50 beside 3.0 ms
//! for `unshare(pid, mnt, ipc, uts, net)` + overlay + exec without a user namespace (1.15x);
//! [`spawn_sandbox`] up to the payload's exec 4.2 ms p50 (the cgroup, devices, `lo`, `/proc`,
//! `/sys`, `/dev`, the masks, `pivot_root`, the init), with a 20 ms p99 (joining a v1 cgroup
//! sometimes waits for an RCU grace period); a whole create-run-`kill` cycle 6.3 ms p50. A disk
//! mounted on the create path adds a loop device and an ext4 mount (0.5-10 ms, more on a loaded
//! host): mount it ahead of need ([`mount_disk`], [`Disk::Mounted`]). fork + exec of `/bin/true`
//! alone is about 1 ms.
//!
//! The init is a copy-on-write fork of the process that created the sandbox and keeps the pages
//! it had at that moment: cheap from a small, idle zygote, but a creator whose heap keeps
//! changing (a busy runtime calling [`spawn_sandbox`]) leaves each init holding old copies of
//! the pages it changes since.
//!
//! Needs Linux ≥ 5.19 (idmapped mounts under overlayfs; see `docs/security.md`) and root.
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
mod raw;
mod report;
mod seccomp;
mod spawn;
mod spec;
mod sys;
mod template;
mod userns;

pub use capabilities::PAYLOAD_CAPABILITIES;
pub use cgroup::{
    Budget, CGROUP_PARENT, CgroupVersion, PremadeCgroup, Stats, cgroup_version, configure_budget,
    list_sandboxes, remove_instance_if_empty, remove_left_instance,
};
pub use disk::{
    Disk, DiskUsage, copy_sparse, disk_usage, format_image, format_template_image, mount_disk,
    mount_scratch_disk,
};
pub use handle::{FREEZE_TIMEOUT, KILL_TIMEOUT, SandboxHandle, become_subreaper, kill_sandbox};
pub use idmap::check_idmapped_mounts;
pub use idrange::{Claim, DEFAULT_REGISTRY, FIRST_BASE, IdRegistry, RANGE_SIZE, RANGES};
pub use namespaces::{Entered, SETUP_TIMEOUT, enter_sandbox, enter_sandbox_then};
pub use netns::{connect_in_netns, connect_in_netns_fd, socket_in_netns};
pub use seccomp::seccomp_filter;
pub use spawn::{InitCommand, spawn_sandbox};
pub use spec::{
    DEFAULT_CPU_WEIGHT, DEFAULT_INSTANCE, Limits, MAX_CPU_WEIGHT, MAX_ID_LEN, MAX_LAYERS,
    MAX_VOLUMES, SandboxSpec, VolumeMount, validate_volume_target,
};
pub use template::{USER_UID, build_base_template};
