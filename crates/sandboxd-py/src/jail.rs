//! Binding of `sandboxd-jail` for the runtime: the built-in template, entering a new sandbox from
//! a forked zygote child, and handles to running sandboxes (freeze, thaw, kill, stats, connect).
//!
//! `enter_sandbox` forks inside; it is called holding the GIL (the forks copy the calling thread,
//! which owns the GIL in every copy). In the payload it runs `PyOS_AfterFork_Child()` before
//! returning to Python, exactly as `os.fork()` does in a child, so the interpreter's threading
//! state and at-fork hooks are right.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sandboxd_jail as jail;

/// Adds the runtime's sandbox functions and classes to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Entered>()?;
    m.add_class::<SandboxStats>()?;
    m.add_class::<SandboxHandle>()?;
    m.add_function(wrap_pyfunction!(build_base_template, m)?)?;
    m.add_function(wrap_pyfunction!(enter_sandbox, m)?)?;
    m.add_function(wrap_pyfunction!(kill_sandbox, m)?)?;
    m.add_function(wrap_pyfunction!(list_sandboxes, m)?)?;
    m.add_function(wrap_pyfunction!(become_subreaper, m)?)?;
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
    fn adopt(py: Python<'_>, id: &str, init_pid: i32) -> PyResult<SandboxHandle> {
        py.detach(|| jail::SandboxHandle::adopt(id, init_pid))
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

    fn stats(&self, py: Python<'_>) -> PyResult<SandboxStats> {
        let stats = py.detach(|| self.0.stats()).map_err(to_pyerr)?;
        Ok(SandboxStats {
            memory_bytes: stats.memory_bytes,
            cpu_usage_ns: stats.cpu_usage_ns,
            pids_current: stats.pids_current,
        })
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
/// caller (`inside=False`) and in the payload (`inside=True`).
#[pyfunction]
#[pyo3(signature = (id, template_dirs, sandbox_dir, *, host_usr_ro = true, memory_bytes = None, cpu_cores = None, pids_max = None))]
#[allow(clippy::too_many_arguments)]
fn enter_sandbox(
    id: &str,
    template_dirs: Vec<PathBuf>,
    sandbox_dir: PathBuf,
    host_usr_ro: bool,
    memory_bytes: Option<u64>,
    cpu_cores: Option<f64>,
    pids_max: Option<u64>,
) -> PyResult<Entered> {
    let Some(first) = template_dirs.first() else {
        return Err(PyValueError::new_err(
            "template_dirs needs at least one directory",
        ));
    };
    let mut spec = jail::SandboxSpec::new(id, first.clone(), &sandbox_dir);
    spec.lower_dirs = template_dirs;
    spec.host_usr_ro = host_usr_ro;
    spec.limits = jail::Limits {
        memory_bytes,
        cpu_cores,
        pids_max,
    };
    // Holding the GIL on purpose: see the module docs.
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
fn after_fork_child() {
    // SAFETY: called in the freshly forked payload by the only thread, which holds the GIL,
    // before any other Python code runs there: the documented contract of this function.
    unsafe { pyo3::ffi::PyOS_AfterFork_Child() };
}

/// Kills a sandbox by id (everything in its cgroup) and removes its cgroup.
#[pyfunction]
fn kill_sandbox(py: Python<'_>, id: &str) -> PyResult<()> {
    py.detach(|| jail::kill_sandbox(id)).map_err(to_pyerr)
}

/// Ids of sandboxes whose cgroups exist on this host.
#[pyfunction]
fn list_sandboxes(py: Python<'_>) -> PyResult<Vec<String>> {
    py.detach(jail::list_sandboxes).map_err(to_pyerr)
}

/// Makes this process the subreaper of the sandbox inits it starts.
#[pyfunction]
fn become_subreaper() -> PyResult<()> {
    jail::become_subreaper().map_err(to_pyerr)
}
