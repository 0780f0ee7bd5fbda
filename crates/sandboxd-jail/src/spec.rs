//! What a sandbox is made of ([`SandboxSpec`], [`Limits`]), and its translation into the C strings
//! the kernel takes, done before `fork` so the children never allocate.
//!
//! What the kernel does here: nothing yet. overlayfs takes its layers as one option string
//! (`lowerdir=A:B,upperdir=U,workdir=W`) in which `,` and `:` are separators, so paths containing
//! them are refused here rather than mis-parsed by the kernel. The upper and work directories must
//! be on the same filesystem (overlayfs renames between them).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::cgroup::Cgroup;

/// Longest sandbox id: the kernel's hostname limit (`HOST_NAME_MAX`, 64 bytes), since the id is
/// the default hostname.
pub const MAX_ID_LEN: usize = 64;

/// Resource limits, applied to the sandbox's cgroup before any of its processes starts.
/// `None` leaves a resource unlimited.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes (v1 `memory.limit_in_bytes` and, where swap is accounted,
    /// `memory.memsw.limit_in_bytes`; v2 `memory.max`). v1 rounds it down to a page multiple.
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores, e.g. `0.5` or `2.0` (v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`,
    /// v2 `cpu.max`).
    pub cpu_cores: Option<f64>,
    /// Maximum number of tasks (processes and threads) alive at once (`pids.max`).
    pub pids_max: Option<u64>,
}

/// Everything needed to start one sandbox.
///
/// [`SandboxSpec::new`] fills in the usual layout; every field is public so a caller can change
/// any of it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSpec {
    /// Sandbox id: 1 to [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`, not starting with `.`. Names
    /// the cgroup (`sandboxd/<id>`).
    pub id: String,
    /// Hostname inside the sandbox (written to its `/etc/hostname` too). Same rules as `id`.
    pub hostname: String,
    /// Read-only template layers, topmost first (overlayfs `lowerdir`). At least one.
    pub lower_dirs: Vec<PathBuf>,
    /// The sandbox's writable layer (overlayfs `upperdir`). Created if missing. Files the sandbox
    /// writes appear here, on the host, under their path inside the sandbox.
    pub upper_dir: PathBuf,
    /// overlayfs scratch dir (`workdir`): empty, on the same filesystem as `upper_dir`. Created if
    /// missing.
    pub work_dir: PathBuf,
    /// Where the overlay is mounted (in the sandbox's mount namespace only; the host never sees
    /// the mount). Created if missing.
    pub merged_dir: PathBuf,
    /// Bind-mount the host's `/usr` read-only onto the sandbox's `/usr`. The built-in template
    /// ([`crate::build_base_template`]) needs this; a full root filesystem template does not.
    pub host_usr_ro: bool,
    /// cgroup limits.
    pub limits: Limits,
}

impl SandboxSpec {
    /// A spec with the usual layout: one template layer, and `upper/`, `work/` and `merged/` under
    /// `sandbox_dir`; hostname = id; host `/usr` bound read-only; no limits.
    pub fn new(id: impl Into<String>, template: impl Into<PathBuf>, sandbox_dir: &Path) -> Self {
        let id = id.into();
        SandboxSpec {
            hostname: id.clone(),
            id,
            lower_dirs: vec![template.into()],
            upper_dir: sandbox_dir.join("upper"),
            work_dir: sandbox_dir.join("work"),
            merged_dir: sandbox_dir.join("merged"),
            host_usr_ro: true,
            limits: Limits::default(),
        }
    }

    /// Checks the id, hostname and paths without touching anything.
    pub fn validate(&self) -> io::Result<()> {
        validate_name("id", &self.id)?;
        validate_name("hostname", &self.hostname)?;
        if self.lower_dirs.is_empty() {
            return Err(invalid("lower_dirs is empty"));
        }
        for p in self
            .lower_dirs
            .iter()
            .chain([&self.upper_dir, &self.work_dir, &self.merged_dir])
        {
            if !p.is_absolute() {
                return Err(invalid(format!("{} is not an absolute path", p.display())));
            }
            if p.as_os_str()
                .as_bytes()
                .iter()
                .any(|b| matches!(b, b',' | b':' | b'\\' | 0))
            {
                return Err(invalid(format!(
                    "{}: overlayfs paths cannot contain ',', ':', '\\' or NUL",
                    p.display()
                )));
            }
        }
        if let Some(cpu) = self.limits.cpu_cores
            && !(cpu.is_finite() && cpu > 0.0)
        {
            return Err(invalid("cpu_cores must be a positive number"));
        }
        Ok(())
    }
}

/// Checks a sandbox id (the rules of [`SandboxSpec::id`]).
pub(crate) fn validate_id(id: &str) -> io::Result<()> {
    validate_name("id", id)
}

fn validate_name(what: &str, s: &str) -> io::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} {s:?} must be 1-{MAX_ID_LEN} bytes of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

pub(crate) fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("path contains NUL"))
}

/// A spec turned into the exact bytes the setup steps pass to the kernel. Built before `fork`.
pub(crate) struct Prepared {
    pub(crate) hostname: CString,
    pub(crate) merged: CString,
    /// `lowerdir=...,upperdir=...,workdir=...`
    pub(crate) overlay_options: CString,
    pub(crate) host_usr_ro: bool,
    /// The `cgroup.procs` files to write `0` into (one per v1 hierarchy; one on v2).
    pub(crate) cgroup_procs: Vec<CString>,
    /// Contents of the sandbox's `/etc/hostname`.
    pub(crate) etc_hostname: Vec<u8>,
    /// Contents of the sandbox's `/etc/hosts`.
    pub(crate) etc_hosts: Vec<u8>,
}

/// Contents of `/etc/hosts` in a sandbox: loopback names plus the sandbox's own hostname (as
/// Debian does with 127.0.1.1), so tools that resolve the local hostname (sudo, hostname -f) work
/// without DNS.
pub(crate) fn hosts_file(hostname: Option<&str>) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(h) = hostname {
        s.push_str(&format!("127.0.1.1\t{h}\n"));
    }
    s
}

impl Prepared {
    /// Validates `spec`, creates its upper, work and merged dirs, and builds the strings. The
    /// cgroup must already exist (its `cgroup.procs` paths are recorded here).
    pub(crate) fn new(spec: &SandboxSpec, cgroup: &Cgroup) -> io::Result<Prepared> {
        spec.validate()?;
        for d in [&spec.upper_dir, &spec.work_dir, &spec.merged_dir] {
            fs::create_dir_all(d)?;
        }
        let lowers: Vec<String> = spec
            .lower_dirs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            spec.upper_dir.display(),
            spec.work_dir.display()
        );
        Ok(Prepared {
            hostname: CString::new(spec.hostname.as_str()).map_err(|_| invalid("NUL"))?,
            merged: cstring(&spec.merged_dir)?,
            overlay_options: CString::new(options).map_err(|_| invalid("NUL"))?,
            host_usr_ro: spec.host_usr_ro,
            cgroup_procs: cgroup
                .procs_files()
                .iter()
                .map(|p| cstring(p))
                .collect::<io::Result<_>>()?,
            etc_hostname: format!("{}\n", spec.hostname).into_bytes(),
            etc_hosts: hosts_file(Some(&spec.hostname)).into_bytes(),
        })
    }
}
