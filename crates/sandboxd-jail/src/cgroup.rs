//! The sandbox's control group, on cgroup v1 or v2 (detected at run time): limits, freezing,
//! killing, usage figures.
//!
//! What the kernel does here: a cgroup is a directory in a cgroup filesystem. Writing a pid to its
//! `cgroup.procs` moves that process (and its future children) into it; its control files cap
//! memory, CPU bandwidth and task count, and freeze every member at once.
//!
//! Sandboxes are grouped per runtime *instance* (one per data dir, so concurrent runtimes and
//! test runs never collide): a sandbox is `sandboxd/<instance>/<id>`. The shared `sandboxd/` and
//! each `sandboxd/<instance>/` carry host-wide budgets ([`configure_budget`]): limits that the sum
//! of all sandboxes cannot exceed, leaving a reserve for the host, since per-sandbox limits alone
//! add up past it (8 sandboxes x 4096 pids is a whole `pid_max`).
//!
//! * **v2** (one unified hierarchy at `/sys/fs/cgroup`): the sandbox is
//!   `/sys/fs/cgroup/sandboxd/<instance>/<id>`. Controllers reach a child only when listed in its
//!   parent's `cgroup.subtree_control`, so we enable `memory cpu pids` on the way down (those
//!   the root offers: a limit whose controller it does not is an `Unsupported` error naming the
//!   file, never skipped). A memory limit also allows no swap (`memory.swap.max` 0, where swap
//!   is accounted), as v1's memory+swap cap does.
//!   Freezing is `cgroup.freeze` (done when `cgroup.events` says `frozen 1`), killing is
//!   `cgroup.kill` (Linux 5.14+). Devices are limited by an eBPF program (`devices.rs`).
//! * **v1** (one hierarchy per controller, possibly co-mounted, e.g. `cpu,cpuacct`): the sandbox is
//!   `<mount>/sandboxd/<instance>/<id>` in each of the memory, cpu, cpuacct, pids, freezer and
//!   devices hierarchies, found in `/proc/self/mountinfo`. Freezing is `freezer.state` (`FROZEN`
//!   once every task has stopped). There is no `cgroup.kill`, so we freeze, SIGKILL every member,
//!   and thaw: a frozen process cannot fork, so none escapes the sweep.
//!
//! A hybrid host (v1 controllers plus an empty v2 hierarchy at `/sys/fs/cgroup/unified`) is v1.
//!
//! Nothing inside can lift these limits: every cgroup file and directory belongs to host root,
//! which is not mapped in the sandbox's user namespace, so root inside (or in a nested namespace
//! that mounts its own view of the hierarchy) can neither write a limit nor create a child group.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nix::unistd::Pid;

use crate::devices;
use crate::spec::{DEFAULT_CPU_WEIGHT, Limits};

/// Where cgroup filesystems are mounted on every distribution we know of.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The parent of every sandbox cgroup, so `ls /sys/fs/cgroup/sandboxd` (v2) or
/// `/sys/fs/cgroup/memory/sandboxd` (v1) lists the runtime instances of this host, each a
/// directory of its sandboxes.
pub const CGROUP_PARENT: &str = "sandboxd";

/// v1 hierarchies a sandbox joins: the three limits, `cpuacct` for CPU time, `freezer` for pause,
/// `devices` for the device allow-list.
const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "freezer", "devices"];

/// v2 controllers enabled for sandboxes (freezing and killing are core v2 files, not controllers).
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// CFS period for CPU limits: the kernel's default (100 ms). A quota is a share of it.
const CFS_PERIOD_US: u64 = 100_000;

/// The kernel refuses CFS quotas below 1 ms.
const MIN_CFS_QUOTA_US: u64 = 1_000;

/// How many times [`Cgroup::create`] retries when the shared parent vanished under it (someone
/// removed it as empty between our two `mkdir`s); one retry nearly always suffices.
const CREATE_ATTEMPTS: u32 = 3;

/// How often to re-read a cgroup file while waiting for a state change. Freezing and killing
/// usually settle in well under a millisecond, so start there.
const POLL_START: Duration = Duration::from_micros(200);

/// Back-off ceiling for the same wait: keeps a slow wait (a process in uninterruptible I/O) cheap.
const POLL_MAX: Duration = Duration::from_millis(10);

/// Which cgroup hierarchy this host uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller under `/sys/fs/cgroup/<controller>`.
    V1,
    /// The unified hierarchy at `/sys/fs/cgroup`.
    V2,
}

/// Detects the cgroup version: v2 when `/sys/fs/cgroup` itself is a cgroup2 filesystem.
pub fn cgroup_version() -> io::Result<CgroupVersion> {
    let st = statfs(CGROUP_ROOT).map_err(io::Error::from)?;
    Ok(if st.filesystem_type() == CGROUP2_SUPER_MAGIC {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    })
}

/// Resource usage of a sandbox, read from its cgroup. `None` when the controller is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Memory charged to the sandbox, in bytes (page cache included, as the kernel counts it).
    pub memory_bytes: Option<u64>,
    /// CPU time consumed by all its processes, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// Tasks (processes and threads) alive in it.
    pub pids_current: Option<u64>,
}

/// The per-controller directories of one sandbox on v1.
#[derive(Clone, Debug, Default)]
struct V1Dirs {
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    pids: Option<PathBuf>,
    freezer: Option<PathBuf>,
    devices: Option<PathBuf>,
}

/// One group's place in the v2 hierarchy.
#[derive(Clone, Debug)]
struct V2Dir {
    /// The unified hierarchy's mount point, [`CGROUP_ROOT`]: `/proc/<pid>/cgroup` names groups
    /// relative to it.
    mount: PathBuf,
    /// The group `sandboxd/` is made in, whose `cgroup.subtree_control` [`Cgroup::create`]
    /// enables controllers in: the mount point itself, except in this module's tests, which run
    /// the v2 code on a group of their own in another cgroup2 mount (a hybrid host's
    /// `/sys/fs/cgroup/unified`) without changing how production finds its layout.
    root: PathBuf,
    /// This group's directory.
    dir: PathBuf,
}

impl V2Dir {
    fn at(rel: &Path) -> V2Dir {
        V2Dir {
            mount: PathBuf::from(CGROUP_ROOT),
            root: PathBuf::from(CGROUP_ROOT),
            dir: Path::new(CGROUP_ROOT).join(rel),
        }
    }
}

#[derive(Clone, Debug)]
enum Layout {
    V1(V1Dirs),
    V2(V2Dir),
}

/// One sandbox's cgroup (paths only; nothing is created until [`Cgroup::create`]).
#[derive(Clone, Debug)]
pub(crate) struct Cgroup {
    instance: String,
    id: String,
    layout: Layout,
}

/// Where `rel` (a path under the cgroup root, e.g. `sandboxd/<instance>/<id>`) lives on this host.
fn layout(rel: &Path) -> io::Result<Layout> {
    Ok(match cgroup_version()? {
        CgroupVersion::V2 => Layout::V2(V2Dir::at(rel)),
        CgroupVersion::V1 => {
            let mounts = v1_mounts()?;
            let dir = |c: &str| {
                mounts
                    .iter()
                    .find(|(controllers, _)| controllers.iter().any(|x| x == c))
                    .map(|(_, mp)| mp.join(rel))
            };
            Layout::V1(V1Dirs {
                memory: dir("memory"),
                cpu: dir("cpu"),
                cpuacct: dir("cpuacct"),
                pids: dir("pids"),
                freezer: dir("freezer"),
                devices: dir("devices"),
            })
        }
    })
}

impl Cgroup {
    /// Finds where sandbox `id` of runtime `instance` has (or would have) its cgroup.
    pub(crate) fn locate(instance: &str, id: &str) -> io::Result<Cgroup> {
        let rel = Path::new(CGROUP_PARENT).join(instance).join(id);
        Ok(Cgroup {
            instance: instance.to_owned(),
            id: id.to_owned(),
            layout: layout(&rel)?,
        })
    }

    /// The cgroup version in use.
    pub(crate) fn version(&self) -> CgroupVersion {
        match self.layout {
            Layout::V1(_) => CgroupVersion::V1,
            Layout::V2(_) => CgroupVersion::V2,
        }
    }

    /// Every directory of this cgroup, without duplicates (co-mounted v1 controllers share one).
    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2(v) => vec![v.dir.clone()],
            Layout::V1(v) => {
                let set: BTreeSet<PathBuf> = [
                    &v.memory, &v.cpu, &v.cpuacct, &v.pids, &v.freezer, &v.devices,
                ]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
                set.into_iter().collect()
            }
        }
    }

    /// The `cgroup.procs` files a process writes `0` into to join.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The files the (single-threaded) process building the sandbox writes `0` into to join: on v1
    /// each hierarchy's `tasks`, on v2 `cgroup.procs`.
    ///
    /// Why `tasks` on v1: a write to `cgroup.procs` moves a whole thread group, under a host-wide
    /// lock (`cgroup_threadgroup_rwsem`) whose write side waits for an RCU grace period when no
    /// other migration ran in the last one, which is every create but those of a burst: 10-20 ms
    /// on this 2-core VM, most of a cold create's jail set-up (`docs/benchmarks.md`). Moving one
    /// thread, the writer itself, takes no such lock (the kernel: "if we migrate a single thread,
    /// we don't care about threadgroup stability"). The writer is a freshly forked process with
    /// one thread, so moving the thread moves the process, and its children are born in the
    /// cgroup. v2 has no `tasks` file for a domain cgroup (its `cgroup.threads` is for threaded
    /// subtrees), so v2 keeps `cgroup.procs`.
    pub(crate) fn join_files(&self) -> Vec<PathBuf> {
        let leaf = match self.layout {
            Layout::V1(_) => "tasks",
            Layout::V2(_) => "cgroup.procs",
        };
        self.dirs().into_iter().map(|d| d.join(leaf)).collect()
    }

    /// Whether the cgroup directory exists (on v1: any of them).
    pub(crate) fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.is_dir())
    }

    /// Creates the directories (idempotent). On v2 also enables the controllers on the way down.
    /// Tolerates the shared parent being removed concurrently (it is recreated).
    pub(crate) fn create(&self) -> io::Result<()> {
        let mut attempts = 0;
        loop {
            match self.create_once() {
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < CREATE_ATTEMPTS => {
                    attempts += 1;
                }
                r => return r,
            }
        }
    }

    fn create_once(&self) -> io::Result<()> {
        match &self.layout {
            Layout::V2(V2Dir { root, dir, .. }) => {
                let top = root.join(CGROUP_PARENT);
                let instance = top.join(&self.instance);
                mkdir_existing_ok(&top)?;
                enable_controllers(root)?;
                mkdir_existing_ok(&instance)?;
                enable_controllers(&top)?;
                enable_controllers(&instance)?;
                mkdir_existing_ok(dir)
            }
            Layout::V1(_) => {
                for d in self.dirs() {
                    if let Some(instance) = d.parent() {
                        if let Some(top) = instance.parent() {
                            mkdir_existing_ok(top)?;
                        }
                        mkdir_existing_ok(instance)?;
                    }
                    mkdir_existing_ok(&d)?;
                }
                Ok(())
            }
        }
    }

    /// Writes the limits and the device allow-list. A limit whose controller is missing is an
    /// `Unsupported` error.
    pub(crate) fn apply(&self, limits: &Limits) -> io::Result<()> {
        match &self.layout {
            Layout::V2(v) => devices::apply_v2(&v.dir)?,
            Layout::V1(v) => devices::apply_v1(need(&v.devices, "devices")?)?,
        }
        self.write_limits(limits.memory_bytes, limits.cpu_cores, limits.pids_max)?;
        match limits.cpu_weight {
            Some(weight) => self.set_cpu_weight(weight),
            None => Ok(()),
        }
    }

    /// Sets the group's CPU weight against its siblings ([`Limits::cpu_weight`]): v2 `cpu.weight`,
    /// v1 `cpu.shares` ([`v1_shares`]). One write.
    pub(crate) fn set_cpu_weight(&self, weight: u64) -> io::Result<()> {
        match &self.layout {
            Layout::V2(v) => write_v2(v, "cpu", "cpu.weight", &weight.to_string()),
            Layout::V1(v) => write_file(
                &need(&v.cpu, "cpu")?.join("cpu.shares"),
                &v1_shares(weight).to_string(),
            ),
        }
    }

    fn write_limits(
        &self,
        memory: Option<u64>,
        cpu: Option<f64>,
        pids: Option<u64>,
    ) -> io::Result<()> {
        match &self.layout {
            Layout::V2(v) => {
                if let Some(bytes) = memory {
                    write_v2(v, "memory", "memory.max", &bytes.to_string())?;
                    // v1 caps memory+swap at the limit (above); v2 counts swap on its own, with no
                    // limit unless set, so a sandbox could otherwise swap out past its limit for
                    // as long as the host has swap. None at all keeps the same bound. The file
                    // exists only where swap is accounted: its open says so, without a stat first.
                    match write_file(&v.dir.join("memory.swap.max"), "0") {
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        r => r?,
                    }
                }
                if let Some(cores) = cpu {
                    let quota = cfs_quota_us(cores);
                    write_v2(v, "cpu", "cpu.max", &format!("{quota} {CFS_PERIOD_US}"))?;
                }
                if let Some(max) = pids {
                    write_v2(v, "pids", "pids.max", &max.to_string())?;
                }
            }
            Layout::V1(v) => {
                if let Some(bytes) = memory {
                    let d = need(&v.memory, "memory")?;
                    let limit = d.join("memory.limit_in_bytes");
                    // With swap accounting, also cap memory+swap so the limit cannot be escaped
                    // by swapping. The kernel keeps memsw >= limit at every step, so lower the
                    // limit first, or raise memsw first when reusing a cgroup with a smaller one.
                    let memsw = Some(d.join("memory.memsw.limit_in_bytes")).filter(|p| p.exists());
                    let value = bytes.to_string();
                    match (write_file(&limit, &value), &memsw) {
                        (Ok(()), Some(m)) => write_file(m, &value)?,
                        (Ok(()), None) => {}
                        (Err(_), Some(m)) => {
                            write_file(m, &value)?;
                            write_file(&limit, &value)?;
                        }
                        (Err(e), None) => return Err(e),
                    }
                }
                if let Some(cores) = cpu {
                    let d = need(&v.cpu, "cpu")?;
                    write_file(&d.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write_file(
                        &d.join("cpu.cfs_quota_us"),
                        &cfs_quota_us(cores).to_string(),
                    )?;
                }
                if let Some(max) = pids {
                    let d = need(&v.pids, "pids")?;
                    write_file(&d.join("pids.max"), &max.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Pids (host view) of every process in the cgroup, sorted. Empty if the cgroup is gone.
    pub(crate) fn pids(&self) -> io::Result<Vec<i32>> {
        let mut set = BTreeSet::new();
        for f in self.procs_files() {
            match fs::read_to_string(&f) {
                Ok(s) => set.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(set.into_iter().collect())
    }

    /// Fails with `AlreadyExists` if the cgroup holds processes: a live sandbox has this id.
    pub(crate) fn ensure_unused(&self) -> io::Result<()> {
        if self.pids()?.is_empty() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("sandbox {} already has running processes", self.id),
            ))
        }
    }

    /// Whether process `pid` is in this cgroup, per `/proc/<pid>/cgroup`.
    pub(crate) fn contains(&self, pid: i32) -> io::Result<bool> {
        let s = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let want = match &self.layout {
            // The path relative to the hierarchy's root, as `/proc/<pid>/cgroup` names it.
            Layout::V2(v) => match v.dir.strip_prefix(&v.mount) {
                Ok(rel) => format!("/{}", rel.display()),
                Err(_) => return Ok(false),
            },
            Layout::V1(_) => format!("/{CGROUP_PARENT}/{}/{}", self.instance, self.id),
        };
        Ok(s.lines().any(|l| {
            let path = l.splitn(3, ':').nth(2).unwrap_or("");
            path == want || path.starts_with(&format!("{want}/"))
        }))
    }

    /// Freezes every process and waits until the kernel reports the whole cgroup frozen.
    pub(crate) fn freeze(&self, timeout: Duration) -> io::Result<()> {
        self.set_frozen(true, timeout)
    }

    /// Thaws the cgroup and waits until it runs again.
    pub(crate) fn thaw(&self, timeout: Duration) -> io::Result<()> {
        self.set_frozen(false, timeout)
    }

    /// Unless the cgroup is thawed already (or gone; one read then): SIGKILL to each of its
    /// processes, then [`Cgroup::thaw`]. Frozen, none can fork or exit between the read of its
    /// processes and the signals, and each thawed task dies before it runs another instruction of
    /// its own. Signalling only some (a PID namespace's init, whose exit kills the rest) lets the
    /// others run from the thaw until the kernel gets to them: a paused sandbox's processes wrote
    /// thousands more times to a volume while it was being killed.
    pub(crate) fn kill_then_thaw_if_frozen(&self, timeout: Duration) -> io::Result<()> {
        let (file, thawed) = match &self.layout {
            Layout::V2(V2Dir { dir, .. }) => (dir.join("cgroup.freeze"), "0"),
            Layout::V1(v) => (need(&v.freezer, "freezer")?.join("freezer.state"), "THAWED"),
        };
        match read_file(&file) {
            Ok(now) if now.trim() == thawed => Ok(()),
            Ok(_) => {
                for pid in self.pids()? {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                self.thaw(timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn set_frozen(&self, frozen: bool, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        match &self.layout {
            Layout::V2(V2Dir { dir, .. }) => {
                write_file(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
                let want = if frozen { "frozen 1" } else { "frozen 0" };
                let events = dir.join("cgroup.events");
                wait_until(deadline, || {
                    Ok(read_file(&events)?.lines().any(|l| l.trim() == want))
                })
            }
            Layout::V1(v) => {
                let state = need(&v.freezer, "freezer")?.join("freezer.state");
                let want = if frozen { "FROZEN" } else { "THAWED" };
                write_file(&state, want)?;
                wait_until(deadline, || {
                    let now = read_file(&state)?;
                    if frozen && now.trim() == "THAWED" {
                        // A concurrent thaw won, or the write raced a fork; ask again.
                        write_file(&state, want)?;
                    }
                    Ok(now.trim() == want)
                })
            }
        }
    }

    /// SIGKILLs every process in the cgroup and waits until it is empty.
    pub(crate) fn kill_all(&self, timeout: Duration) -> io::Result<()> {
        let cgroup_kill = match &self.layout {
            Layout::V2(v) => Some(v.dir.join("cgroup.kill")).filter(|p| p.exists()),
            Layout::V1(_) => None,
        };
        self.kill_all_with(cgroup_kill, timeout)
    }

    /// [`Cgroup::kill_all`] through `cgroup_kill` (v2, Linux 5.14+), or without it by a sweep
    /// (separate so that tests run the sweep on a kernel that has `cgroup.kill`).
    fn kill_all_with(&self, cgroup_kill: Option<PathBuf>, timeout: Duration) -> io::Result<()> {
        if !self.exists() || self.pids()?.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        if let Some(file) = cgroup_kill {
            write_file(&file, "1")?;
        } else {
            // Freeze first so nothing forks between reading cgroup.procs and the kills. A frozen
            // task dies as soon as it is thawed.
            let frozen = self.freeze(timeout).is_ok();
            let killed = self.pids().map(|pids| {
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            });
            // Thawed whether or not the freeze completed: one that timed out (v1's freezer left
            // FREEZING) may have frozen some members already, and a frozen task dies of its
            // SIGKILL only once thawed. Left frozen, they would outlive this kill and every kill
            // after it that timed out the same way.
            let thawed = self.thaw(if frozen {
                timeout
            } else {
                deadline.saturating_duration_since(Instant::now())
            });
            killed?;
            if frozen {
                thawed?;
            }
        }
        wait_until(deadline, || {
            let left = self.pids()?;
            for pid in &left {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            Ok(left.is_empty())
        })
    }

    /// Removes the cgroup directories (and any child cgroups a sandbox made). Must be empty.
    pub(crate) fn remove(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        for d in self.dirs() {
            // Right after the last process exits the kernel may still hold the cgroup for a
            // moment (EBUSY); retry until the deadline.
            wait_until(deadline, || match remove_tree(&d) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
                Err(e) => Err(e),
            })?;
        }
        Ok(())
    }

    /// Reads memory, CPU and task counts.
    pub(crate) fn stats(&self) -> io::Result<Stats> {
        match &self.layout {
            Layout::V2(V2Dir { dir, .. }) => Ok(Stats {
                memory_bytes: read_u64_opt(&dir.join("memory.current"))?,
                cpu_usage_ns: match read_opt(&dir.join("cpu.stat"))? {
                    Some(s) => s
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|us| us * 1_000),
                    None => None,
                },
                pids_current: read_u64_opt(&dir.join("pids.current"))?,
            }),
            Layout::V1(v) => Ok(Stats {
                memory_bytes: opt_file(&v.memory, "memory.usage_in_bytes")?,
                cpu_usage_ns: opt_file(&v.cpuacct, "cpuacct.usage")?,
                pids_current: opt_file(&v.pids, "pids.current")?,
            }),
        }
    }
}

/// How a pre-made group's name starts: a '.', which no sandbox id may start with, so it can never
/// be taken for (or collide with) a sandbox's group.
const PREMADE_PREFIX: &str = ".spare-";

/// A sandbox cgroup made and limited ahead of need, by the process that will later enter a sandbox
/// (the zygote's spare "A", while it waits for its request), under a name of its own
/// (`sandboxd/<instance>/.spare-<pid>`). [`crate::enter_sandbox_then`] renames it to the sandbox's
/// id, rewrites the limits that differ from the request's, and joins it: six `rename`s (one per
/// v1 hierarchy) instead of ~18 `mkdir`s and ~13 control-file writes (the device allow-list is
/// nine) on the create's path.
///
/// Only on cgroup v1: the kernel renames cgroups only there (v2's `rename` is `EPERM`), so on v2
/// [`PremadeCgroup::make`] is `Unsupported` and the group is made at request time as before.
///
/// Security: the group is made by host root, like every sandbox's, and nothing joins it before it
/// carries the sandbox's name and all of the request's limits (the device list included); it is
/// used once (this value is consumed by the entry, and is neither `Clone` nor `Copy`), and it is
/// removed when dropped unused, when the entry cannot use it, and at a runtime's start if a killed
/// zygote left one ([`configure_budget`]).
#[derive(Debug)]
pub struct PremadeCgroup {
    group: Option<Cgroup>,
    memory_bytes: Option<u64>,
    cpu_cores: Option<f64>,
    pids_max: Option<u64>,
    cpu_weight: Option<u64>,
}

impl PremadeCgroup {
    /// Makes `sandboxd/<instance>/.spare-<this pid>` with the device allow-list and `limits`'
    /// memory, CPU and pids limits (the others are no cgroup's), in an instance's group that
    /// exists (`NotFound` otherwise). On error nothing is left.
    pub fn make(instance: &str, limits: &Limits) -> io::Result<PremadeCgroup> {
        crate::spec::validate_instance(instance)?;
        if cgroup_version()? != CgroupVersion::V1 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cgroup v2 cannot rename a cgroup: a sandbox's group is made when it is created",
            ));
        }
        let name = format!("{PREMADE_PREFIX}{}", std::process::id());
        let rel = Path::new(CGROUP_PARENT).join(instance).join(&name);
        let group = Cgroup {
            instance: instance.to_owned(),
            id: name,
            layout: layout(&rel)?,
        };
        // Ours from here on: dropped on an error below, it removes what was made.
        let made = PremadeCgroup {
            group: Some(group.clone()),
            memory_bytes: limits.memory_bytes,
            cpu_cores: limits.cpu_cores,
            pids_max: limits.pids_max,
            cpu_weight: limits.cpu_weight,
        };
        // The instance's group must exist already (the runtime made it at its start, with its
        // budget, [`configure_budget`]): a spare never makes one, so it neither leaves an
        // instance's group behind nor makes one without its budget.
        for d in group.dirs() {
            // A group left by a killed spare of the same pid: its limits are not known, so it is
            // removed (an empty group only) and made afresh, never reused.
            if fs::create_dir(&d).is_err() {
                let _ = fs::remove_dir(&d);
                fs::create_dir(&d)?;
            }
        }
        group.apply(limits)?;
        Ok(made)
    }

    /// Removes the group now (it is also removed when dropped).
    pub fn discard(mut self) {
        self.remove();
    }

    fn remove(&mut self) {
        if let Some(group) = self.group.take() {
            for d in group.dirs() {
                let _ = fs::remove_dir(d);
            }
        }
    }

    /// Renames the group to sandbox `id`'s, with `limits` (rewriting those that differ from what it
    /// was made with), and returns it. `Err` when it cannot be used as is (another instance, a
    /// limit set on one side only, a rename refused, e.g. `id`'s group exists): then it has been
    /// removed, every rename undone, and the caller makes the group as usual.
    pub(crate) fn adopt(mut self, instance: &str, id: &str, limits: &Limits) -> io::Result<Cgroup> {
        let result = self.adopt_inner(instance, id, limits);
        self.remove();
        result
    }

    fn adopt_inner(&mut self, instance: &str, id: &str, limits: &Limits) -> io::Result<Cgroup> {
        let Some(group) = &self.group else {
            return Err(io::Error::other("no pre-made group"));
        };
        if group.instance != instance
            || self.memory_bytes.is_some() != limits.memory_bytes.is_some()
            || self.cpu_cores.is_some() != limits.cpu_cores.is_some()
            || self.pids_max.is_some() != limits.pids_max.is_some()
        {
            return Err(io::Error::other("the pre-made group does not fit"));
        }
        let differs = |made: Option<u64>, want: Option<u64>| want.filter(|_| made != want);
        group.write_limits(
            differs(self.memory_bytes, limits.memory_bytes),
            limits
                .cpu_cores
                .filter(|_| self.cpu_cores != limits.cpu_cores),
            differs(self.pids_max, limits.pids_max),
        )?;
        // A weight is never a reason not to fit: the group's is rewritten to the request's (the
        // kernel's default when the request has none and the group was made with one).
        if self.cpu_weight != limits.cpu_weight {
            group.set_cpu_weight(limits.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT))?;
        }
        let target = Cgroup {
            instance: instance.to_owned(),
            id: id.to_owned(),
            layout: match &group.layout {
                Layout::V1(v) => {
                    let to = |d: &Option<PathBuf>| d.as_ref().map(|d| d.with_file_name(id));
                    Layout::V1(V1Dirs {
                        memory: to(&v.memory),
                        cpu: to(&v.cpu),
                        cpuacct: to(&v.cpuacct),
                        pids: to(&v.pids),
                        freezer: to(&v.freezer),
                        devices: to(&v.devices),
                    })
                }
                Layout::V2(_) => return Err(io::Error::from(io::ErrorKind::Unsupported)),
            },
        };
        let from = group.dirs();
        let to: Vec<PathBuf> = from.iter().map(|d| d.with_file_name(id)).collect();
        for (i, (f, t)) in from.iter().zip(&to).enumerate() {
            // `rename` refuses (EEXIST) a name in use, so a live sandbox's group is never replaced.
            if let Err(e) = fs::rename(f, t) {
                for (f, t) in from.iter().zip(&to).take(i) {
                    let _ = fs::rename(t, f);
                }
                return Err(e);
            }
        }
        self.group = None; // renamed: the sandbox's now, removed with it
        Ok(target)
    }
}

impl Drop for PremadeCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Ids of the sandbox cgroups of runtime `instance` present on this host (to re-adopt or clean
/// up after a restart).
pub fn list_sandboxes(instance: &str) -> io::Result<Vec<String>> {
    crate::spec::validate_instance(instance)?;
    let parents: Vec<PathBuf> = match cgroup_version()? {
        CgroupVersion::V2 => vec![Path::new(CGROUP_ROOT).join(CGROUP_PARENT).join(instance)],
        CgroupVersion::V1 => v1_mounts()?
            .into_iter()
            .map(|(_, mp)| mp.join(CGROUP_PARENT).join(instance))
            .collect(),
    };
    let mut ids = BTreeSet::new();
    for p in parents {
        let entries = match fs::read_dir(&p) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            // A name starting with '.' is no sandbox id: a pre-made group ([`PremadeCgroup`]).
            if e.file_type()?.is_dir() && !name.starts_with('.') {
                ids.insert(name);
            }
        }
    }
    Ok(ids.into_iter().collect())
}

/// Limits on everything sandboxes use together (see the module docs). `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    /// Memory (and, where swap is accounted, memory+swap) of all sandboxes together, in bytes.
    pub memory_bytes: Option<u64>,
    /// Tasks of all sandboxes together.
    pub pids_max: Option<u64>,
}

/// Creates `sandboxd/` and `sandboxd/<instance>/` and writes the host-wide budget `host` on the
/// first (shared by every runtime of the host) and this runtime's `own` on the second.
pub fn configure_budget(instance: &str, host: &Budget, own: &Budget) -> io::Result<()> {
    crate::spec::validate_instance(instance)?;
    let top = Path::new(CGROUP_PARENT);
    for (rel, budget) in [(top.to_owned(), host), (top.join(instance), own)] {
        let group = Cgroup {
            instance: String::new(),
            id: String::new(),
            layout: layout(&rel)?,
        };
        match &group.layout {
            Layout::V2(V2Dir { dir, .. }) => {
                if let Some(parent) = dir.parent() {
                    enable_controllers(parent)?;
                }
                mkdir_existing_ok(dir)?;
            }
            Layout::V1(_) => {
                for d in group.dirs() {
                    mkdir_existing_ok(&d)?;
                }
            }
        }
        group.write_limits(budget.memory_bytes, None, budget.pids_max)?;
    }
    remove_stale_premade(instance)
}

/// Removes the pre-made groups ([`PremadeCgroup`]) a previous runtime's zygote left in
/// `sandboxd/<instance>/` when it was killed outright (a spare removes its own when it exits).
/// An empty group only: `rmdir` refuses one that holds a process, and a group whose spare still
/// lives only makes that spare's rename fail, which falls back to making the group afresh.
fn remove_stale_premade(instance: &str) -> io::Result<()> {
    remove_empty_children(instance, |name| name.starts_with(PREMADE_PREFIX))
}

/// `rmdir`s each child group of `sandboxd/<instance>/` whose name `which` picks, in every
/// hierarchy: only the empty ones go (the kernel refuses a group that holds a process or a group).
fn remove_empty_children(instance: &str, which: impl Fn(&str) -> bool) -> io::Result<()> {
    let rel = Path::new(CGROUP_PARENT).join(instance);
    let group = Cgroup {
        instance: String::new(),
        id: String::new(),
        layout: layout(&rel)?,
    };
    for d in group.dirs() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && which(&e.file_name().to_string_lossy()) {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
    Ok(())
}

/// Removes what a runtime that is gone (killed outright) left of `sandboxd/<instance>/`: its
/// sandboxes' groups that hold nothing any more, then the group itself (see
/// [`remove_instance_if_empty`]). A sandbox that outlived its runtime keeps its group, and so the
/// instance's.
pub fn remove_left_instance(instance: &str) -> io::Result<()> {
    crate::spec::validate_instance(instance)?;
    remove_empty_children(instance, |_| true)?;
    remove_instance_if_empty(instance)
}

/// Removes `sandboxd/<instance>/` (and `sandboxd/`) if no sandbox is left in them. Best effort:
/// a group that still has children stays. A pre-made group still there (its spare killed with the
/// zygote, or not yet done removing its own) is no sandbox: it is removed first, as at a start
/// ([`configure_budget`]); it holds no process, and a spare that outlives this only fails its
/// rename, which makes the group afresh.
pub fn remove_instance_if_empty(instance: &str) -> io::Result<()> {
    crate::spec::validate_instance(instance)?;
    remove_stale_premade(instance)?;
    let top = Path::new(CGROUP_PARENT);
    for rel in [top.join(instance), top.to_owned()] {
        let group = Cgroup {
            instance: String::new(),
            id: String::new(),
            layout: layout(&rel)?,
        };
        for d in group.dirs() {
            let _ = fs::remove_dir(d);
        }
    }
    Ok(())
}

/// The v1 hierarchies we use: (controllers, mount point), from `/proc/self/mountinfo`.
fn v1_mounts() -> io::Result<Vec<(Vec<String>, PathBuf)>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut out: Vec<(Vec<String>, PathBuf)> = Vec::new();
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> <source> <super options>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        if r.next() != Some("cgroup") {
            continue;
        }
        let super_opts = r.nth(1).unwrap_or("");
        let mut l = left.split(' ');
        let root = l.nth(3).unwrap_or("");
        let mount_point = crate::mounts::unescape_mountinfo(l.next().unwrap_or(""));
        if root != "/" {
            continue;
        }
        let controllers: Vec<String> = super_opts
            .split(',')
            .filter(|o| V1_CONTROLLERS.contains(o))
            .map(str::to_owned)
            .collect();
        if controllers.is_empty() || out.iter().any(|(_, mp)| *mp == mount_point) {
            continue;
        }
        out.push((controllers, mount_point));
    }
    Ok(out)
}

/// v1's `cpu.shares` for a v2 `cpu.weight`: the same share of a default sibling (v1's default is
/// 1024 where v2's is 100), at least v1's least (2). Weight 1 is 10 shares.
fn v1_shares(weight: u64) -> u64 {
    (weight.saturating_mul(1024) / DEFAULT_CPU_WEIGHT).max(2)
}

fn cfs_quota_us(cores: f64) -> u64 {
    ((cores * CFS_PERIOD_US as f64).round() as u64).max(MIN_CFS_QUOTA_US)
}

fn need<'a>(dir: &'a Option<PathBuf>, controller: &str) -> io::Result<&'a PathBuf> {
    dir.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the cgroup v1 '{controller}' controller is not mounted"),
        )
    })
}

/// Writes `value` to the control file `file` of v2 `controller` in `v`'s group. The file missing
/// from a group that exists means the controller is not enabled for it, and since
/// [`Cgroup::create`] enables each of [`V2_CONTROLLERS`] that the root group offers, that the root
/// does not offer it: an `Unsupported` error naming the file and what to enable, as v1's
/// [`need`] is for an unmounted controller. Never skipped: a limit asked for and not enforced
/// would leave hostile code unbounded while the caller believes it is bounded.
fn write_v2(v: &V2Dir, controller: &str, file: &str, value: &str) -> io::Result<()> {
    let path = v.dir.join(file);
    match write_file(&path, value) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && v.dir.is_dir() => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "cannot write {}: the cgroup v2 '{controller}' controller is not enabled there, \
                 because {} does not offer it (its cgroup.controllers). Delegate it: enable it in \
                 the cgroup.subtree_control of every group above it (under systemd: Delegate=yes); \
                 on a hybrid host it is bound to a v1 hierarchy (boot with \
                 systemd.unified_cgroup_hierarchy=1)",
                path.display(),
                v.root.display(),
            ),
        )),
        r => r,
    }
}

fn enable_controllers(dir: &Path) -> io::Result<()> {
    let available = read_file(&dir.join("cgroup.controllers"))?;
    let enabled = read_file(&dir.join("cgroup.subtree_control"))?;
    for c in V2_CONTROLLERS {
        let has = |s: &str| s.split_whitespace().any(|x| x == c);
        if has(&available) && !has(&enabled) {
            write_file(&dir.join("cgroup.subtree_control"), &format!("+{c}")).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "enabling the {c} controller in {}: {e} (a cgroup that holds processes \
                         cannot delegate controllers; run the runtime in a leaf cgroup)",
                        dir.display()
                    ),
                )
            })?;
        }
    }
    Ok(())
}

fn mkdir_existing_ok(d: &Path) -> io::Result<()> {
    match fs::create_dir(d) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// rmdir a cgroup and its children, deepest first (cgroup dirs hold only control files, which
/// the kernel removes with the directory).
fn remove_tree(d: &Path) -> io::Result<()> {
    let entries = match fs::read_dir(d) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if e.file_type()?.is_dir() {
            remove_tree(&e.path())?;
        }
    }
    match fs::remove_dir(d) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Writes a control file in one `write` (the kernel parses each write as one command).
fn write_file(p: &Path, s: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(p)?;
    f.write_all(s.as_bytes())
        .map_err(|e| io::Error::new(e.kind(), format!("writing {s:?} to {}: {e}", p.display())))
}

fn read_file(p: &Path) -> io::Result<String> {
    let mut s = String::new();
    fs::File::open(p)?.read_to_string(&mut s)?;
    Ok(s)
}

fn read_opt(p: &Path) -> io::Result<Option<String>> {
    match read_file(p) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn read_u64_opt(p: &Path) -> io::Result<Option<u64>> {
    Ok(read_opt(p)?.and_then(|s| s.trim().parse().ok()))
}

fn opt_file(dir: &Option<PathBuf>, name: &str) -> io::Result<Option<u64>> {
    match dir {
        Some(d) => read_u64_opt(&d.join(name)),
        None => Ok(None),
    }
}

/// Polls `done` with a growing interval until it says true or `deadline` passes (`TimedOut`).
fn wait_until(deadline: Instant, mut done: impl FnMut() -> io::Result<bool>) -> io::Result<()> {
    let mut interval = POLL_START;
    loop {
        if done()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for the cgroup to change state",
            ));
        }
        thread::sleep(interval);
        interval = (interval * 2).min(POLL_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_quota_is_a_share_of_the_period() {
        assert_eq!(cfs_quota_us(0.5), 50_000);
        assert_eq!(cfs_quota_us(2.0), 200_000);
        assert_eq!(cfs_quota_us(0.0001), MIN_CFS_QUOTA_US);
    }

    #[test]
    fn v1_shares_keep_v2_weights_ratio() {
        assert_eq!(v1_shares(DEFAULT_CPU_WEIGHT), 1024);
        assert_eq!(v1_shares(1), 10);
        assert_eq!(v1_shares(10_000), 102_400);
    }

    // The v2 code on a real cgroup2 hierarchy. A hybrid host (v1 controllers) has one at
    // `/sys/fs/cgroup/unified`, with no controllers (all are bound to v1) but every core file:
    // `cgroup.procs`, `cgroup.freeze`/`cgroup.events`, `cgroup.kill`. Each test makes its groups
    // under a group of its own there ([`TestRoot`]), which stands where `/sys/fs/cgroup` does in
    // production; production's choice of layout is untouched.

    const WAIT: Duration = Duration::from_secs(5);

    /// A cgroup2 mount to run the v2 code on, or `None` (the test skips) when not root or there is
    /// none.
    fn v2_mount(test: &str) -> Option<PathBuf> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("{test}: skipped (needs root)");
            return None;
        }
        let found = ["/sys/fs/cgroup/unified", CGROUP_ROOT]
            .into_iter()
            .find(|m| statfs(*m).is_ok_and(|st| st.filesystem_type() == CGROUP2_SUPER_MAGIC));
        if found.is_none() {
            eprintln!("{test}: skipped (no cgroup2 hierarchy mounted)");
        }
        found.map(PathBuf::from)
    }

    /// A test's own group in a cgroup2 mount, in which its sandbox groups are made
    /// (`<root>/sandboxd/<instance>/<id>`). Dropped, it kills what is left in it and removes it.
    struct TestRoot {
        mount: PathBuf,
        root: PathBuf,
    }

    impl TestRoot {
        fn new(test: &str) -> Option<TestRoot> {
            let mount = v2_mount(test)?;
            let root = mount.join(format!("sandboxd-test-{}-{test}", std::process::id()));
            fs::create_dir(&root).unwrap();
            Some(TestRoot { mount, root })
        }

        fn group(&self, id: &str) -> Cgroup {
            Cgroup {
                instance: "test".into(),
                id: id.into(),
                layout: Layout::V2(V2Dir {
                    mount: self.mount.clone(),
                    root: self.root.clone(),
                    dir: self.root.join(CGROUP_PARENT).join("test").join(id),
                }),
            }
        }

        /// Whether the hierarchy offers `controller` to this root.
        fn offers(&self, controller: &str) -> bool {
            read_file(&self.root.join("cgroup.controllers"))
                .unwrap()
                .split_whitespace()
                .any(|c| c == controller)
        }
    }

    impl Drop for TestRoot {
        fn drop(&mut self) {
            let _ = write_file(&self.root.join("cgroup.kill"), "1");
            let _ = wait_until(
                Instant::now() + WAIT,
                || Ok(remove_tree(&self.root).is_ok()),
            );
        }
    }

    /// `sh` that waits for a line on its stdin, then starts two `sleep`s and spins: three
    /// processes, two of them forked only after the test moved the shell into a group.
    struct Busy(std::process::Child);

    impl Busy {
        fn start() -> Busy {
            Busy(
                std::process::Command::new("sh")
                    .arg("-c")
                    .arg("read go; sleep 1000 & sleep 1000 & while :; do :; done")
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        }

        fn pid(&self) -> i32 {
            self.0.id() as i32
        }

        /// Moves the shell into `group` as the runtime's joins do (its `cgroup.procs`), then lets
        /// it fork, and waits until all three processes are there.
        fn join(&mut self, group: &Cgroup) {
            for f in group.join_files() {
                write_file(&f, &self.pid().to_string()).unwrap();
            }
            self.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
            wait_until(Instant::now() + WAIT, || Ok(group.pids()?.len() == 3)).unwrap();
        }

        /// The shell's CPU time so far, in clock ticks (`utime + stime`).
        fn cpu_ticks(&self) -> u64 {
            let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
            let after = &stat[stat.rfind(')').unwrap() + 2..];
            let f: Vec<&str> = after.split(' ').collect();
            // Fields 14 and 15 of proc(5), counted from the state (field 3) here.
            f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
        }

        /// Reaps the shell, which must have died of SIGKILL.
        fn assert_killed(&mut self) {
            use std::os::unix::process::ExitStatusExt;
            let status = self.0.wait().unwrap();
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        }
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn v2_create_join_freeze_thaw_kill_remove() {
        let Some(t) = TestRoot::new("lifecycle") else {
            return;
        };
        let group = t.group("sb");
        group.create().unwrap();
        let dir = t.root.join("sandboxd/test/sb");
        assert!(dir.is_dir());
        assert_eq!(group.version(), CgroupVersion::V2);
        assert_eq!(group.dirs(), vec![dir.clone()]);
        assert_eq!(group.join_files(), vec![dir.join("cgroup.procs")]);
        // No limits: only the device allow-list, a BPF program attached to the group.
        group.apply(&Limits::default()).unwrap();
        group.ensure_unused().unwrap();

        let mut busy = Busy::start();
        busy.join(&group);
        assert!(group.pids().unwrap().contains(&busy.pid()));
        assert!(group.contains(busy.pid()).unwrap());
        assert!(!group.contains(std::process::id() as i32).unwrap());
        let err = group.ensure_unused().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);

        group.freeze(WAIT).unwrap();
        let events = read_file(&dir.join("cgroup.events")).unwrap();
        assert!(events.lines().any(|l| l == "frozen 1"), "{events}");
        let frozen_at = busy.cpu_ticks();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(busy.cpu_ticks(), frozen_at, "a frozen spinner ran");
        group.thaw(WAIT).unwrap();
        wait_until(Instant::now() + WAIT, || Ok(busy.cpu_ticks() > frozen_at))
            .expect("a thawed spinner never ran");
        // `cpu.stat` is a core file on v2: CPU time is there with or without the cpu controller.
        let stats = group.stats().unwrap();
        assert!(stats.cpu_usage_ns.is_some_and(|ns| ns > 0), "{stats:?}");

        assert!(
            dir.join("cgroup.kill").exists(),
            "cgroup.kill needs Linux 5.14+"
        );
        group.kill_all(WAIT).unwrap();
        assert_eq!(group.pids().unwrap(), Vec::<i32>::new());
        busy.assert_killed();

        // A group the sandbox made under its own (were it allowed to) goes with it.
        fs::create_dir(dir.join("child")).unwrap();
        group.remove(WAIT).unwrap();
        assert!(!dir.exists());
        // Idempotent: killing a group that is gone is no error.
        group.kill_all(WAIT).unwrap();
    }

    #[test]
    fn v2_kill_without_cgroup_kill_sweeps_running_and_frozen_groups() {
        let Some(t) = TestRoot::new("sweep") else {
            return;
        };
        for (id, paused) in [("running", false), ("paused", true)] {
            let group = t.group(id);
            group.create().unwrap();
            let mut busy = Busy::start();
            busy.join(&group);
            if paused {
                group.freeze(WAIT).unwrap();
            }
            // The path of a kernel before 5.14: freeze, SIGKILL each member, thaw.
            group.kill_all_with(None, WAIT).unwrap();
            assert_eq!(group.pids().unwrap(), Vec::<i32>::new(), "{id}");
            busy.assert_killed();
            group.remove(WAIT).unwrap();
        }
    }

    #[test]
    fn v1_kill_whose_freeze_timed_out_leaves_no_member_frozen() {
        // The sweep's freeze given no time: it times out while v1's freezer is still FREEZING
        // (most rounds), and the members it froze meanwhile must be thawed to die of the SIGKILL.
        let freezer = Path::new("/sys/fs/cgroup/freezer");
        if !nix::unistd::geteuid().is_root() || !freezer.join("tasks").is_file() {
            return; // no v1 freezer here (a v2 host) or not root
        }
        let top = freezer.join(format!("sandboxd-test-{}-v1sweep", std::process::id()));
        for round in 0..10 {
            let group = Cgroup {
                instance: "test".into(),
                id: format!("r{round}"),
                layout: Layout::V1(V1Dirs {
                    memory: None,
                    cpu: None,
                    cpuacct: None,
                    pids: None,
                    freezer: Some(top.join("test").join(format!("r{round}"))),
                    devices: None,
                }),
            };
            group.create().unwrap();
            let mut busy = Busy::start();
            busy.join(&group);
            let _ = group.kill_all_with(None, Duration::ZERO);
            let state = group.dirs()[0].join("freezer.state");
            let left = read_file(&state).unwrap();
            if left.trim() != "THAWED" {
                // Thawed here so that the members die and release the test's output pipe
                // (they inherited it), then the failure is reported rather than a hang.
                write_file(&state, "THAWED").unwrap();
                panic!("round {round}: the sweep left the group {}", left.trim());
            }
            wait_until(Instant::now() + WAIT, || Ok(group.pids()?.is_empty())).unwrap();
            busy.assert_killed();
            group.remove(WAIT).unwrap();
        }
        let _ = fs::remove_dir(top.join("test"));
        let _ = fs::remove_dir(&top);
    }

    #[test]
    fn v2_limit_without_its_controller_is_an_error_naming_file_and_fix() {
        let Some(t) = TestRoot::new("nocontroller") else {
            return;
        };
        let group = t.group("sb");
        group.create().unwrap();
        type Write = fn(&Cgroup) -> io::Result<()>;
        let cases: [(&str, &str, Write); 4] = [
            ("memory", "memory.max", |g| {
                g.write_limits(Some(64 << 20), None, None)
            }),
            ("cpu", "cpu.max", |g| g.write_limits(None, Some(0.5), None)),
            ("pids", "pids.max", |g| g.write_limits(None, None, Some(64))),
            ("cpu", "cpu.weight", |g| g.set_cpu_weight(1)),
        ];
        for (controller, file, write) in cases {
            if t.offers(controller) {
                // A host that delegates it: the limit is written.
                write(&group).unwrap();
                continue;
            }
            let err = write(&group).unwrap_err();
            let msg = err.to_string();
            assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{file}: {msg}");
            assert!(msg.contains(&format!("/sandboxd/test/sb/{file}")), "{msg}");
            assert!(msg.contains(&format!("'{controller}' controller")), "{msg}");
            assert!(msg.contains("cgroup.subtree_control"), "{msg}");
            // The same through `apply`, as a sandbox's create reaches it.
            let mut limits = Limits::default();
            match file {
                "memory.max" => limits.memory_bytes = Some(64 << 20),
                "cpu.max" => limits.cpu_cores = Some(0.5),
                "pids.max" => limits.pids_max = Some(64),
                _ => limits.cpu_weight = Some(1),
            }
            let err = group.apply(&limits).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{file}: {err}");
        }
        group.remove(WAIT).unwrap();
    }

    /// What the v2 code writes for a memory limit, on a directory standing in for a group whose
    /// memory controller accounts swap (this host's v2 hierarchy has no memory controller).
    #[test]
    fn v2_memory_limit_allows_no_swap_where_swap_is_accounted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sb");
        fs::create_dir(&dir).unwrap();
        let group = Cgroup {
            instance: "test".into(),
            id: "sb".into(),
            layout: Layout::V2(V2Dir {
                mount: tmp.path().into(),
                root: tmp.path().into(),
                dir: dir.clone(),
            }),
        };
        // Empty: a control file takes each write whole, a plain file would keep a longer tail.
        fs::write(dir.join("memory.max"), "").unwrap();
        group.write_limits(Some(64 << 20), None, None).unwrap();
        assert_eq!(read_file(&dir.join("memory.max")).unwrap(), "67108864");
        assert!(
            !dir.join("memory.swap.max").exists(),
            "made where not accounted"
        );

        fs::write(dir.join("memory.swap.max"), "").unwrap();
        group.write_limits(Some(64 << 20), None, None).unwrap();
        assert_eq!(read_file(&dir.join("memory.swap.max")).unwrap(), "0");
    }
}
