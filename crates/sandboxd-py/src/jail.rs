//! Binding of `sandboxd-jail` for the runtime: the built-in template, entering a new sandbox from
//! a forked zygote child, handles to running sandboxes (freeze, thaw, kill, stats, disk usage,
//! connect), the host-wide id-range registry, disk images, and the host-wide cgroup budgets.
//!
//! `enter_sandbox` forks inside; it is called holding the GIL (the forks copy the calling thread,
//! which owns the GIL in every copy). In the payload it runs `PyOS_AfterFork_Child()` before
//! returning to Python, exactly as `os.fork()` does in a child, so the interpreter's threading
//! state and at-fork hooks are right.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sandboxd_jail as jail;

/// Adds the runtime's sandbox functions and classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Entered>()?;
    m.add_class::<SandboxStats>()?;
    m.add_class::<SandboxHandle>()?;
    m.add_class::<IdRegistry>()?;
    m.add_class::<PremadeCgroup>()?;
    m.add_function(wrap_pyfunction!(build_base_template, m)?)?;
    m.add_function(wrap_pyfunction!(enter_sandbox, m)?)?;
    m.add_function(wrap_pyfunction!(kill_sandbox, m)?)?;
    m.add_function(wrap_pyfunction!(list_sandboxes, m)?)?;
    m.add_function(wrap_pyfunction!(become_subreaper, m)?)?;
    m.add_function(wrap_pyfunction!(configure_budget, m)?)?;
    m.add_function(wrap_pyfunction!(remove_instance_if_empty, m)?)?;
    m.add_function(wrap_pyfunction!(remove_left_instance, m)?)?;
    m.add_function(wrap_pyfunction!(format_disk_image, m)?)?;
    m.add_function(wrap_pyfunction!(copy_sparse, m)?)?;
    m.add_function(wrap_pyfunction!(mount_disk, m)?)?;
    m.add_function(wrap_pyfunction!(disk_usage, m)?)?;
    m.add_function(wrap_pyfunction!(check_isolation_support, m)?)?;
    m.add_function(wrap_pyfunction!(validate_volume_target, m)?)?;
    m.add("DEFAULT_ID_REGISTRY", jail::DEFAULT_REGISTRY)?;
    m.add("ID_RANGE_SIZE", jail::RANGE_SIZE)?;
    m.add("MAX_LAYERS", jail::MAX_LAYERS)?;
    m.add("MAX_VOLUMES", jail::MAX_VOLUMES)?;
    Ok(())
}

/// An `io::Error` as the `OSError` subclass for its errno, keeping the jail's message (which
/// names the step that failed).
pub(crate) fn to_pyerr(err: io::Error) -> PyErr {
    match err.raw_os_error() {
        Some(errno) => PyOSError::new_err((errno, err.to_string())),
        None if err.kind() == io::ErrorKind::InvalidInput => PyValueError::new_err(err.to_string()),
        None => PyOSError::new_err(err.to_string()),
    }
}

fn timeout(seconds: f64) -> PyResult<Duration> {
    if seconds.is_finite() && seconds >= 0.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(PyValueError::new_err(
            "timeout must be a non-negative number of seconds",
        ))
    }
}

/// Where `enter_sandbox` returned.
#[pyclass(frozen, module = "sandboxd._core", name = "Entered")]
pub(crate) struct Entered {
    #[pyo3(get)]
    inside: bool,
    #[pyo3(get)]
    init_pid: i32,
}

/// Resource use of one sandbox, from its cgroup.
#[pyclass(frozen, module = "sandboxd._core", name = "SandboxStats")]
pub(crate) struct SandboxStats {
    #[pyo3(get)]
    memory_bytes: Option<u64>,
    #[pyo3(get)]
    cpu_usage_ns: Option<u64>,
    #[pyo3(get)]
    pids_current: Option<u64>,
}

/// A running sandbox: its init and its cgroup.
#[pyclass(frozen, module = "sandboxd._core", name = "SandboxHandle")]
pub(crate) struct SandboxHandle(jail::SandboxHandle);

#[pymethods]
impl SandboxHandle {
    /// Attaches to the sandbox whose init is `init_pid` (checked to be in the sandbox's cgroup).
    #[staticmethod]
    fn adopt(py: Python<'_>, instance: &str, id: &str, init_pid: i32) -> PyResult<SandboxHandle> {
        py.detach(|| jail::SandboxHandle::adopt(instance, id, init_pid))
            .map(SandboxHandle)
            .map_err(to_pyerr)
    }

    #[getter]
    fn id(&self) -> &str {
        self.0.id()
    }

    #[getter]
    fn init_pid(&self) -> i32 {
        self.0.init_pid()
    }

    /// A pidfd of the init, readable once it has exited.
    fn pidfd(&self) -> i32 {
        self.0.pidfd().as_raw_fd()
    }

    fn is_running(&self) -> PyResult<bool> {
        self.0.is_running().map_err(to_pyerr)
    }

    fn exit_code(&self) -> Option<i32> {
        self.0.exit_code()
    }

    fn freeze(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.0.freeze()).map_err(to_pyerr)
    }

    fn thaw(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.0.thaw()).map_err(to_pyerr)
    }

    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.0.kill()).map_err(to_pyerr)
    }

    /// Sets the sandbox's cgroup CPU weight against the other sandboxes (1 to 10000, the kernel's
    /// default 100; v1 `cpu.shares` in proportion): a claimed warm sandbox goes back to 100.
    fn set_cpu_weight(&self, py: Python<'_>, weight: u64) -> PyResult<()> {
        py.detach(|| self.0.set_cpu_weight(weight))
            .map_err(to_pyerr)
    }

    fn stats(&self, py: Python<'_>) -> PyResult<SandboxStats> {
        let stats = py.detach(|| self.0.stats()).map_err(to_pyerr)?;
        Ok(SandboxStats {
            memory_bytes: stats.memory_bytes,
            cpu_usage_ns: stats.cpu_usage_ns,
            pids_current: stats.pids_current,
        })
    }

    /// `(used, total)` bytes of the sandbox's root filesystem, as `df /` shows them inside.
    fn disk_usage(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        let u = py.detach(|| self.0.disk_usage()).map_err(to_pyerr)?;
        Ok((u.used_bytes, u.total_bytes))
    }

    /// A TCP socket fd in the sandbox's network namespace, non-blocking, not connected; the caller
    /// owns it. ~30-60 µs (a short-lived helper thread enters the namespace and makes it): cheap
    /// enough for an event loop to call directly and then connect the socket itself.
    fn socket(&self, py: Python<'_>) -> PyResult<i32> {
        let fd = py.detach(|| self.0.socket()).map_err(to_pyerr)?;
        Ok(fd.into_raw_fd())
    }

    /// A TCP socket fd connected to `127.0.0.1:port` inside the sandbox; the caller owns it.
    fn connect(&self, py: Python<'_>, port: u16, timeout: f64) -> PyResult<i32> {
        let limit = self::timeout(timeout)?;
        let fd = py
            .detach(|| self.0.connect(port, limit))
            .map_err(to_pyerr)?;
        Ok(fd.into_raw_fd())
    }
}

/// Builds (idempotently) the built-in template root in `dir`.
#[pyfunction]
fn build_base_template(py: Python<'_>, dir: PathBuf) -> PyResult<()> {
    py.detach(|| jail::build_base_template(&dir))
        .map_err(to_pyerr)
}

/// Puts the calling (freshly forked, single-threaded) process into a new sandbox; returns in the
/// caller (`inside=False`) and in the payload (`inside=True`). `disk_fd` is a disk mounted with
/// `mount_disk` (borrowed: the caller keeps and closes its descriptor); `disk_image` an image to
/// mount now. At most one of them. `volumes` are `(host_dir, target)` pairs, mounted read-write
/// and idmapped at `target` inside.
#[pyfunction]
#[pyo3(signature = (
    id, template_dirs, sandbox_dir, *, instance, id_base, host_usr_ro = true, disk_image = None,
    disk_fd = None, nested_userns = false, memory_bytes = None, cpu_cores = None, pids_max = None,
    open_files = None, inotify_instances = None, inotify_watches = None, cpu_weight = None,
    volumes = Vec::new(), payload = None, premade_cgroup = None, report_fd = None
))]
#[allow(clippy::too_many_arguments)]
fn enter_sandbox(
    py: Python<'_>,
    id: &str,
    template_dirs: Vec<PathBuf>,
    sandbox_dir: PathBuf,
    instance: String,
    id_base: u32,
    host_usr_ro: bool,
    disk_image: Option<PathBuf>,
    disk_fd: Option<i32>,
    nested_userns: bool,
    memory_bytes: Option<u64>,
    cpu_cores: Option<f64>,
    pids_max: Option<u64>,
    open_files: Option<u64>,
    inotify_instances: Option<u64>,
    inotify_watches: Option<u64>,
    cpu_weight: Option<u64>,
    volumes: Vec<(PathBuf, PathBuf)>,
    payload: Option<Py<PyAny>>,
    premade_cgroup: Option<PyRef<'_, PremadeCgroup>>,
    report_fd: Option<i32>,
) -> PyResult<Entered> {
    let Some(first) = template_dirs.first() else {
        return Err(PyValueError::new_err(
            "template_dirs needs at least one directory",
        ));
    };
    let mut spec = jail::SandboxSpec::new(id, first.clone(), &sandbox_dir, id_base);
    spec.lower_dirs = template_dirs;
    spec.instance = instance;
    spec.host_usr_ro = host_usr_ro;
    spec.nested_userns = nested_userns;
    spec.volumes = volumes
        .into_iter()
        .map(|(host_dir, target)| jail::VolumeMount { host_dir, target })
        .collect();
    spec.disk = match (disk_image, disk_fd) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "pass disk_image or disk_fd, not both",
            ));
        }
        (Some(image), None) => Some(jail::Disk::Image(image)),
        (None, Some(fd)) => Some(jail::Disk::mounted_from_raw_fd(fd).map_err(to_pyerr)?),
        (None, None) => None,
    };
    spec.limits = jail::Limits {
        memory_bytes,
        cpu_cores,
        pids_max,
        open_files,
        inotify_instances,
        inotify_watches,
        cpu_weight,
    };
    // Holding the GIL on purpose: see the module docs.
    if let Some(payload) = payload {
        // The payload runs `payload()` and exits (1 if it raised): this returns only in A. The
        // payload is a copy of this thread, GIL held, as after `os.fork()`.
        let mut run = || -> i32 {
            after_fork_child();
            match payload.call0(py) {
                Ok(_) => 0,
                Err(e) => {
                    e.print(py);
                    1
                }
            }
        };
        let Some(report_fd) = report_fd else {
            return Err(PyValueError::new_err("a payload needs report_fd"));
        };
        let premade = premade_cgroup.and_then(|p| p.take());
        // On success A writes `P<init pid>\n` to `report_fd` and exits: Python never runs in
        // it again (its payload may already run Python on the same memory).
        return Err(to_pyerr(jail::enter_sandbox_then(
            &spec, premade, report_fd, &mut run,
        )));
    }
    if report_fd.is_some() {
        return Err(PyValueError::new_err(
            "report_fd is used with a payload only",
        ));
    }
    if premade_cgroup.is_some() {
        return Err(PyValueError::new_err(
            "premade_cgroup is used with a payload only",
        ));
    }
    match jail::enter_sandbox(&spec).map_err(to_pyerr)? {
        jail::Entered::Outside { init_pid } => Ok(Entered {
            inside: false,
            init_pid,
        }),
        jail::Entered::Inside => {
            after_fork_child();
            Ok(Entered {
                inside: true,
                init_pid: 1,
            })
        }
    }
}

/// What `os.fork()` runs in a child: reinitialise the interpreter's fork-sensitive state.
#[allow(unsafe_code)]
pub(crate) fn after_fork_child() {
    // SAFETY: called in the freshly forked payload by the only thread, which holds the GIL,
    // before any other Python code runs there: the documented contract of this function.
    unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
}

/// A sandbox cgroup made ahead of need (`jail::PremadeCgroup`): used once, by the
/// `enter_sandbox` of the process that made it, and removed when discarded or dropped unused.
#[pyclass(frozen, module = "sandboxd._core", name = "PremadeCgroup")]
pub(crate) struct PremadeCgroup {
    inner: std::sync::Mutex<Option<jail::PremadeCgroup>>,
}

impl PremadeCgroup {
    /// The group, once: a second `enter_sandbox` with this object makes its own.
    fn take(&self) -> Option<jail::PremadeCgroup> {
        self.inner.lock().ok().and_then(|mut g| g.take())
    }
}

#[pymethods]
impl PremadeCgroup {
    /// Makes `sandboxd/<instance>/.spare-<this pid>` with the device allow-list and these limits.
    /// `OSError` when it cannot be made (always on cgroup v2, which cannot rename a group);
    /// nothing is left then.
    #[new]
    #[pyo3(signature = (instance, *, memory_bytes = None, cpu_cores = None, pids_max = None))]
    fn new(
        py: Python<'_>,
        instance: &str,
        memory_bytes: Option<u64>,
        cpu_cores: Option<f64>,
        pids_max: Option<u64>,
    ) -> PyResult<Self> {
        let limits = jail::Limits {
            memory_bytes,
            cpu_cores,
            pids_max,
            ..jail::Limits::default()
        };
        let made = py
            .detach(|| jail::PremadeCgroup::make(instance, &limits))
            .map_err(to_pyerr)?;
        Ok(Self {
            inner: std::sync::Mutex::new(Some(made)),
        })
    }

    /// Removes the group now, unless an `enter_sandbox` took it.
    fn discard(&self) {
        if let Some(made) = self.take() {
            made.discard();
        }
    }
}

/// Kills a sandbox of runtime `instance` by id (everything in its cgroup) and removes its cgroup.
#[pyfunction]
fn kill_sandbox(py: Python<'_>, instance: &str, id: &str) -> PyResult<()> {
    py.detach(|| jail::kill_sandbox(instance, id))
        .map_err(to_pyerr)
}

/// Ids of runtime `instance`'s sandboxes whose cgroups exist on this host.
#[pyfunction]
fn list_sandboxes(py: Python<'_>, instance: &str) -> PyResult<Vec<String>> {
    py.detach(|| jail::list_sandboxes(instance))
        .map_err(to_pyerr)
}

/// Makes this process the subreaper of the sandbox inits it starts.
#[pyfunction]
fn become_subreaper() -> PyResult<()> {
    jail::become_subreaper().map_err(to_pyerr)
}

/// Writes the host-wide budget on `sandboxd/` and this runtime's on `sandboxd/<instance>/`.
#[pyfunction]
#[pyo3(signature = (instance, *, host_memory_bytes, host_pids_max, memory_bytes, pids_max))]
fn configure_budget(
    py: Python<'_>,
    instance: &str,
    host_memory_bytes: Option<u64>,
    host_pids_max: Option<u64>,
    memory_bytes: Option<u64>,
    pids_max: Option<u64>,
) -> PyResult<()> {
    let host = jail::Budget {
        memory_bytes: host_memory_bytes,
        pids_max: host_pids_max,
    };
    let own = jail::Budget {
        memory_bytes,
        pids_max,
    };
    py.detach(|| jail::configure_budget(instance, &host, &own))
        .map_err(to_pyerr)
}

/// Removes `sandboxd/<instance>/` (and `sandboxd/`) when no sandbox is left in them.
#[pyfunction]
fn remove_instance_if_empty(py: Python<'_>, instance: &str) -> PyResult<()> {
    py.detach(|| jail::remove_instance_if_empty(instance))
        .map_err(to_pyerr)
}

/// Removes what a gone runtime left of `sandboxd/<instance>/`: its empty sandbox groups, then it.
#[pyfunction]
fn remove_left_instance(py: Python<'_>, instance: &str) -> PyResult<()> {
    py.detach(|| jail::remove_left_instance(instance))
        .map_err(to_pyerr)
}

/// Creates a sparse image of `size_mb` MiB holding an empty ext4 filesystem; `template`: the
/// layout of the image sandbox disks are copied from (`jail::format_template_image`).
#[pyfunction]
#[pyo3(signature = (path, size_mb, template = false))]
fn format_disk_image(py: Python<'_>, path: PathBuf, size_mb: u64, template: bool) -> PyResult<()> {
    py.detach(|| {
        if template {
            jail::format_template_image(&path, size_mb)
        } else {
            jail::format_image(&path, size_mb)
        }
    })
    .map_err(to_pyerr)
}

/// Copies a file keeping its holes.
#[pyfunction]
fn copy_sparse(py: Python<'_>, src: PathBuf, dst: PathBuf) -> PyResult<()> {
    py.detach(|| jail::copy_sparse(&src, &dst))
        .map_err(to_pyerr)
}

/// Mounts a disk image as a detached mount; returns its descriptor (the caller owns it).
/// `scratch`: a sandbox's own disk, mounted without write barriers (see `mount_scratch_disk`).
#[pyfunction]
#[pyo3(signature = (image, scratch = false))]
fn mount_disk(py: Python<'_>, image: PathBuf, scratch: bool) -> PyResult<i32> {
    let fd = py
        .detach(|| {
            if scratch {
                jail::mount_scratch_disk(&image)
            } else {
                jail::mount_disk(&image)
            }
        })
        .map_err(to_pyerr)?;
    Ok(fd.into_raw_fd())
}

/// `(used, total)` bytes of the filesystem holding `path`, as `df` shows them.
#[pyfunction]
fn disk_usage(py: Python<'_>, path: PathBuf) -> PyResult<(u64, u64)> {
    let u = py.detach(|| jail::disk_usage(&path)).map_err(to_pyerr)?;
    Ok((u.used_bytes, u.total_bytes))
}

/// Checks that this host can build sandboxes over `template` (user namespaces, idmapped mounts).
#[pyfunction]
fn check_isolation_support(py: Python<'_>, template: PathBuf) -> PyResult<()> {
    py.detach(|| jail::check_idmapped_mounts(&template))
        .map_err(to_pyerr)
}

/// Checks where a volume may be mounted inside a sandbox (`ValueError` saying why not): the
/// jail's own rules, for the API layer to answer a bad request before any create.
#[pyfunction]
fn validate_volume_target(target: PathBuf) -> PyResult<()> {
    jail::validate_volume_target(&target).map_err(to_pyerr)
}

/// The host-wide registry of sandboxes' id ranges.
#[pyclass(frozen, module = "sandboxd._core", name = "IdRegistry")]
pub(crate) struct IdRegistry(jail::IdRegistry);

#[pymethods]
impl IdRegistry {
    #[new]
    fn new(py: Python<'_>, dir: PathBuf) -> PyResult<IdRegistry> {
        py.detach(|| jail::IdRegistry::open(&dir))
            .map(IdRegistry)
            .map_err(to_pyerr)
    }

    /// Claims a free range for `sandbox_id` of the runtime whose data dir is `data_dir`.
    fn claim(&self, py: Python<'_>, data_dir: PathBuf, sandbox_id: &str) -> PyResult<u32> {
        py.detach(|| self.0.claim(&data_dir, sandbox_id))
            .map_err(to_pyerr)
    }

    /// Releases a range this runtime claimed for `sandbox_id`; idempotent.
    fn release(
        &self,
        py: Python<'_>,
        base: u32,
        data_dir: PathBuf,
        sandbox_id: &str,
    ) -> PyResult<()> {
        py.detach(|| self.0.release(base, &data_dir, sandbox_id))
            .map_err(to_pyerr)
    }

    /// `(base, sandbox_id)` of every claim made by the runtime whose data dir is `data_dir`.
    fn claims_of(&self, py: Python<'_>, data_dir: PathBuf) -> PyResult<Vec<(u32, String)>> {
        let claims = py
            .detach(|| self.0.claims_of(Path::new(&data_dir)))
            .map_err(to_pyerr)?;
        Ok(claims.into_iter().map(|c| (c.base, c.sandbox_id)).collect())
    }

    /// Removes claims whose data dir is gone and whose ids no process uses; returns their bases.
    fn reclaim_stale(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        py.detach(|| self.0.reclaim_stale()).map_err(to_pyerr)
    }
}
