//! What a sandbox is made of ([`SandboxSpec`], [`Limits`]), and its translation into the bytes
//! and descriptors the setup steps hand to the kernel, prepared before `fork` so the children
//! never allocate.
//!
//! What the kernel does here: formats the sandbox's disk mount (`disk.rs`) and compiles its
//! seccomp filter (`seccomp.rs`); everything else is strings. The sandbox's directory on the host
//! holds its mount points and writable layer:
//!
//! ```text
//! <dir>/            mode 0711: the sandbox's root (its host uid) can reach the mount points
//!   lower/<n>/      mount points of the idmapped template layers (inside the sandbox only)
//!   disk/           mount point of the sandbox's disk, holding upper/ and work/ (with a disk)
//!   upper/ work/    the writable layer and overlayfs' scratch dir (without a disk)
//!   merged/         where the root is assembled (inside the sandbox only)
//! ```
//!
//! The setup steps reach these by paths relative to `<dir>` (the process that builds the sandbox
//! `chdir`s there while it is still host root), because once inside the sandbox's user namespace
//! it may not traverse the runtime's private data dir above. overlayfs takes its layers as one
//! option string in which `,` and `:` are separators; the relative names here contain neither.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, chown};
use std::path::{Path, PathBuf};

use seccompiler::BpfProgram;

use crate::cgroup::Cgroup;
use crate::disk::{self, Disk};
use crate::idrange::RANGE_SIZE;
use crate::seccomp;

/// Longest sandbox id: the kernel's hostname limit (`HOST_NAME_MAX`, 64 bytes), since the id is
/// the default hostname.
pub const MAX_ID_LEN: usize = 64;

/// Most template layers a sandbox may have (overlayfs allows 500; an OCI image rarely has more
/// than a few dozen). Bounds the descriptor array the setup fills without allocating.
pub const MAX_LAYERS: usize = 128;

/// Most volumes a sandbox may mount (E2B's SDK sends a handful at most). Bounds the descriptor
/// array the setup fills without allocating.
pub const MAX_VOLUMES: usize = 16;

/// Top-level directories a volume may not be mounted at or under: the kernel's views the setup
/// mounts itself (a volume there would be covered, or would hide the sandbox's own `/proc`).
const RESERVED_TARGETS: [&str; 3] = ["proc", "sys", "dev"];

/// Longest volume target, in bytes: the kernel's `PATH_MAX` less room for the setup's relative
/// prefix. A longer path could not be resolved anyway.
const MAX_TARGET_LEN: usize = 4000;

/// Longest component of a volume target: the kernel's `NAME_MAX`.
const MAX_NAME_LEN: usize = 255;

/// The runtime instance that [`SandboxSpec::new`] puts a sandbox in.
pub const DEFAULT_INSTANCE: &str = "default";

/// How many nested user namespaces each uid inside may hold when they are allowed
/// ([`SandboxSpec::nested_userns`]): enough for a browser's or bubblewrap's sandboxes.
const NESTED_USERNS_MAX: u64 = 64;

/// Resource limits, applied to the sandbox's cgroup (and, for the last three, its processes and
/// user namespace) before any of its processes starts. `None` leaves a resource unlimited.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Limits {
    /// Memory limit in bytes (v1 `memory.limit_in_bytes` and, where swap is accounted,
    /// `memory.memsw.limit_in_bytes`; v2 `memory.max` and, where swap is accounted,
    /// `memory.swap.max` 0: no swap past it on either). v1 rounds it down to a page multiple.
    /// Kernel memory (open files, pipes, sockets, inotify marks...) is charged here too.
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores, e.g. `0.5` or `2.0` (v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`,
    /// v2 `cpu.max`).
    pub cpu_cores: Option<f64>,
    /// Maximum number of tasks (processes and threads) alive at once (`pids.max`).
    pub pids_max: Option<u64>,
    /// `RLIMIT_NOFILE` (soft and hard) of the payload and everything it starts. Raising a hard
    /// limit needs `CAP_SYS_RESOURCE` over the host, which nothing inside has.
    pub open_files: Option<u64>,
    /// `user.max_inotify_instances` of the sandbox's user namespace: inotify instances per uid
    /// inside. The whole sandbox is also charged, as its host uid, against the host's limit.
    pub inotify_instances: Option<u64>,
    /// `user.max_inotify_watches` of the sandbox's user namespace, likewise.
    pub inotify_watches: Option<u64>,
    /// The group's CPU weight against its siblings (the instance's other sandboxes), in cgroup
    /// v2's units: 1 to 10000, the kernel's default [`DEFAULT_CPU_WEIGHT`] (v2 `cpu.weight`; v1
    /// `cpu.shares`, [`crate::cgroup`]'s conversion). Why a group's and not a nice value: CFS
    /// weighs each cgroup against its siblings before the tasks inside it, so a niced process in
    /// a sandbox's own group still takes an equal share against another sandbox booting beside
    /// it. The runtime's warm sandboxes boot at 1 (v2's least, v1 `cpu.shares` 10: ~1 % of a
    /// default sibling's share while both want the CPU) and are put back to the default at their
    /// claim.
    pub cpu_weight: Option<u64>,
}

/// The kernel's default cgroup CPU weight (v2 `cpu.weight`; v1 `cpu.shares` 1024).
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// v2's largest `cpu.weight`.
pub const MAX_CPU_WEIGHT: u64 = 10_000;

/// A host directory (or mount) mounted read-write into a sandbox: an E2B volume.
///
/// It is mounted idmapped through the sandbox's user namespace, like the template layers, so its
/// files keep canonical owners on disk: uid 1000 inside is uid 1000 in the directory, whichever
/// sandbox wrote it. `nosuid` and `nodev`.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeMount {
    /// The directory on the host (absolute), e.g. the root of a detached mount reached through
    /// its descriptor, `/proc/self/fd/<n>` (cloned, not moved: it stays usable by the caller).
    /// Only host root should be able to reach it: files in it carry canonical owners, setuid
    /// bits included.
    pub host_dir: PathBuf,
    /// Where it appears inside the sandbox: absolute, normalised, not `/`, not under `/proc`,
    /// `/sys` or `/dev` ([`validate_volume_target`]). Missing directories are created (owned by
    /// the sandbox's root); symlinks on the way are refused, never followed.
    pub target: PathBuf,
}

/// Everything needed to start one sandbox.
///
/// [`SandboxSpec::new`] fills in the usual settings; every field is public so a caller can change
/// any of it.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxSpec {
    /// Sandbox id: 1 to [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`, not starting with `.`. Names
    /// the cgroup (`sandboxd/<instance>/<id>`).
    pub id: String,
    /// Hostname inside the sandbox (written to its `/etc/hostname` too). Same rules as `id`.
    pub hostname: String,
    /// The runtime instance (one per data dir): the sandbox's cgroup is a child of
    /// `sandboxd/<instance>`. Same rules as `id`.
    pub instance: String,
    /// First host id of the sandbox's uid/gid range (`0-65535` inside are `id_base..id_base +
    /// 65536` on the host), claimed from the host's [`crate::IdRegistry`].
    pub id_base: u32,
    /// Read-only template layers, topmost first (overlayfs `lowerdir`). 1 to [`MAX_LAYERS`].
    /// They are mounted idmapped, so they stay owned by the host's real ids on disk.
    pub lower_dirs: Vec<PathBuf>,
    /// The sandbox's directory on the host (see the module docs). Created if missing.
    pub dir: PathBuf,
    /// The disk holding the writable layer: its size is the sandbox's disk quota. Without one,
    /// the writable layer is `<dir>/upper` on the host's filesystem, unbounded.
    pub disk: Option<Disk>,
    /// Bind the host's `/usr` (idmapped, read-only) onto the sandbox's `/usr`. The built-in
    /// template ([`crate::build_base_template`]) needs this; a full root filesystem does not.
    pub host_usr_ro: bool,
    /// Allow nested user namespaces (and, inside them, mounts): see `seccomp.rs` for the
    /// trade-off. Off by default.
    pub nested_userns: bool,
    /// Resource limits.
    pub limits: Limits,
    /// Volumes, at most [`MAX_VOLUMES`], attached in order; no target may be at or under
    /// another's.
    pub volumes: Vec<VolumeMount>,
}

impl SandboxSpec {
    /// A spec with the usual settings: one template layer, the sandbox's files in `dir`,
    /// hostname = id, the default instance, host `/usr` bound read-only, no disk image, no
    /// nested user namespaces, no limits.
    pub fn new(
        id: impl Into<String>,
        template: impl Into<PathBuf>,
        dir: &Path,
        id_base: u32,
    ) -> Self {
        let id = id.into();
        SandboxSpec {
            hostname: id.clone(),
            id,
            instance: DEFAULT_INSTANCE.to_owned(),
            id_base,
            lower_dirs: vec![template.into()],
            dir: dir.to_owned(),
            disk: None,
            host_usr_ro: true,
            nested_userns: false,
            limits: Limits::default(),
            volumes: Vec::new(),
        }
    }

    /// The writable layer on the host, when the sandbox has no disk image (with one, it is on the
    /// disk, mounted only inside the sandbox).
    pub fn upper_dir(&self) -> Option<PathBuf> {
        self.disk.is_none().then(|| self.dir.join("upper"))
    }

    /// Checks the names, paths and limits without touching anything.
    pub fn validate(&self) -> io::Result<()> {
        validate_name("id", &self.id)?;
        validate_name("hostname", &self.hostname)?;
        validate_instance(&self.instance)?;
        if self.lower_dirs.is_empty() || self.lower_dirs.len() > MAX_LAYERS {
            return Err(invalid(format!(
                "a sandbox needs 1 to {MAX_LAYERS} template layers"
            )));
        }
        // Base 0 would make root inside root on the host; the range must fit below 2^32 - 1.
        if self.id_base < RANGE_SIZE
            || u64::from(self.id_base) + u64::from(RANGE_SIZE) >= u64::from(u32::MAX)
        {
            return Err(invalid(format!(
                "id_base {} is not a usable host id range",
                self.id_base
            )));
        }
        let image = match &self.disk {
            Some(Disk::Image(p)) => Some(p),
            _ => None,
        };
        for p in self.lower_dirs.iter().chain([&self.dir]).chain(image) {
            if !p.is_absolute() {
                return Err(invalid(format!("{} is not an absolute path", p.display())));
            }
            cstring(p)?;
        }
        self.validate_volumes()?;
        if let Some(cpu) = self.limits.cpu_cores
            && !(cpu.is_finite() && cpu > 0.0)
        {
            return Err(invalid("cpu_cores must be a positive number"));
        }
        if let Some(weight) = self.limits.cpu_weight {
            check_cpu_weight(weight)?;
        }
        Ok(())
    }
}

impl SandboxSpec {
    fn validate_volumes(&self) -> io::Result<()> {
        if self.volumes.len() > MAX_VOLUMES {
            return Err(invalid(format!(
                "a sandbox may mount at most {MAX_VOLUMES} volumes"
            )));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.host_dir.is_absolute() {
                return Err(invalid(format!(
                    "volume directory {} is not an absolute path",
                    v.host_dir.display()
                )));
            }
            cstring(&v.host_dir)?;
            validate_volume_target(&v.target)?;
            // One volume at or under another would be attached on top of (or inside) it: refuse
            // rather than depend on the order.
            for other in &self.volumes[..i] {
                if v.target.starts_with(&other.target) || other.target.starts_with(&v.target) {
                    return Err(invalid(format!(
                        "volume targets {} and {} overlap",
                        other.target.display(),
                        v.target.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks where a volume may be mounted inside a sandbox: an absolute, normalised path (no `.`,
/// `..`, empty component or trailing `/`), not `/`, not at or under `/proc`, `/sys` or `/dev`,
/// without NUL, at most 4000 bytes with components of at most 255.
pub fn validate_volume_target(target: &Path) -> io::Result<()> {
    let bytes = target.as_os_str().as_bytes();
    let bad = |why: &str| {
        Err(invalid(format!(
            "volume mount path {:?} {why}",
            target.as_os_str().to_string_lossy()
        )))
    };
    let Some(rest) = bytes.strip_prefix(b"/") else {
        return bad("must be absolute");
    };
    if rest.is_empty() {
        return bad("must not be /");
    }
    if bytes.len() > MAX_TARGET_LEN {
        return bad("is too long");
    }
    if bytes.contains(&0) {
        return bad("contains NUL");
    }
    for name in rest.split(|b| *b == b'/') {
        if name.is_empty() || name == b"." || name == b".." {
            return bad("must be normalised (no empty, '.' or '..' component, no trailing '/')");
        }
        if name.len() > MAX_NAME_LEN {
            return bad("has a component longer than 255 bytes");
        }
    }
    let first = rest.split(|b| *b == b'/').next().unwrap_or_default();
    if RESERVED_TARGETS.iter().any(|r| r.as_bytes() == first) {
        return bad("must not be under /proc, /sys or /dev");
    }
    Ok(())
}

/// A volume target (validated) as the C strings of its components, for the walk beneath the
/// sandbox's root after `fork`.
fn target_components(target: &Path) -> io::Result<Vec<CString>> {
    target
        .as_os_str()
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|n| !n.is_empty())
        .map(|n| CString::new(n).map_err(|_| invalid("path contains NUL")))
        .collect()
}

/// Checks a sandbox id (the rules of [`SandboxSpec::id`]).
pub(crate) fn validate_id(id: &str) -> io::Result<()> {
    validate_name("id", id)
}

/// Checks a runtime instance name (the rules of [`SandboxSpec::instance`]).
pub(crate) fn validate_instance(instance: &str) -> io::Result<()> {
    validate_name("instance", instance)
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

/// A CPU weight in v2's range, 1 to [`MAX_CPU_WEIGHT`] (`InvalidInput` otherwise): a sandbox's at
/// its spawn and a running one's ([`crate::SandboxHandle::set_cpu_weight`]).
pub(crate) fn check_cpu_weight(weight: u64) -> io::Result<()> {
    if (1..=MAX_CPU_WEIGHT).contains(&weight) {
        Ok(())
    } else {
        Err(invalid(format!("cpu_weight must be 1 to {MAX_CPU_WEIGHT}")))
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

pub(crate) fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| invalid("path contains NUL"))
}

fn cstr(s: &str) -> CString {
    // Only called with the fixed strings built here, which contain no NUL.
    CString::new(s).unwrap_or_default()
}

/// A spec turned into the exact bytes the setup steps pass to the kernel. Built before `fork`.
pub(crate) struct Prepared {
    pub(crate) hostname: CString,
    /// The sandbox's directory (absolute), the setup's working directory.
    pub(crate) dir: CString,
    /// First host id of the range, and the `uid_map`/`gid_map` line mapping it.
    pub(crate) id_base: u32,
    pub(crate) id_map: Vec<u8>,
    /// The template layers (absolute), topmost first, and their mount points (relative).
    pub(crate) lower_sources: Vec<CString>,
    pub(crate) lower_targets: Vec<CString>,
    /// The sandbox's disk, mounted but not attached anywhere yet; attached at `disk`.
    pub(crate) disk: Option<OwnedFd>,
    /// `lowerdir=...,upperdir=...,workdir=...,userxattr` (relative paths).
    pub(crate) overlay_options: CString,
    pub(crate) host_usr_ro: bool,
    /// `lowerdir=usr:../lower/<n>` (relative to the merged root) when `host_usr_ro`.
    pub(crate) usr_overlay_options: CString,
    /// The files to write `0` into to join the cgroup (each v1 hierarchy's `tasks`; the v2
    /// `cgroup.procs`; see `Cgroup::join_files`).
    pub(crate) cgroup_join: Vec<CString>,
    /// Contents of the sandbox's `/etc/hostname`.
    pub(crate) etc_hostname: Vec<u8>,
    /// Contents of the sandbox's `/etc/hosts`.
    pub(crate) etc_hosts: Vec<u8>,
    /// Contents of the sandbox's `/proc/sys/kernel/random/boot_id` (new at every start).
    pub(crate) boot_id: Vec<u8>,
    /// `(file under proc/sys/user/, value)` for the sandbox's user namespace limits.
    pub(crate) user_limits: Vec<(CString, Vec<u8>)>,
    /// `RLIMIT_NOFILE` for the payload.
    pub(crate) open_files: Option<u64>,
    /// The compiled seccomp filter.
    pub(crate) seccomp: BpfProgram,
    /// The volumes' host directories (absolute), and their targets as path components beneath
    /// the sandbox's root, in order.
    pub(crate) volume_sources: Vec<CString>,
    pub(crate) volume_targets: Vec<Vec<CString>>,
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

/// A random (version 4) UUID, the format of `/proc/sys/kernel/random/boot_id`, newline-terminated.
pub(crate) fn random_uuid() -> io::Result<String> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}\n",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

fn mkdir_mode(path: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => fs::set_permissions(path, fs::Permissions::from_mode(mode)),
    }
}

impl Prepared {
    /// Validates `spec`, creates its directory and mount points, writes a new boot id, mounts its
    /// disk (detached) and compiles its seccomp filter. The cgroup must already exist (its
    /// files to join it are recorded here).
    pub(crate) fn new(spec: &SandboxSpec, cgroup: &Cgroup) -> io::Result<Prepared> {
        spec.validate()?;
        fs::create_dir_all(&spec.dir)?;
        // 0711: the sandbox's root (an unmapped host uid, "other" here) may pass through to the
        // mount points, not list or read anything else.
        fs::set_permissions(&spec.dir, fs::Permissions::from_mode(0o711))?;
        for d in ["merged", "lower"] {
            mkdir_mode(&spec.dir.join(d), 0o755)?;
        }
        let mut lower_targets = Vec::with_capacity(spec.lower_dirs.len());
        for i in 0..spec.lower_dirs.len() {
            mkdir_mode(&spec.dir.join("lower").join(i.to_string()), 0o755)?;
            lower_targets.push(cstr(&format!("lower/{i}")));
        }
        // The host's /usr is covered by a read-only overlay (see `mounts.rs`, `overlay_usr`), and
        // overlayfs without an upper layer wants two lowers: the second is one more empty
        // `lower/<n>`, nothing attached to it (a killed sandbox's skeleton keeps it, as it keeps
        // the layers' mount points: `sandbox_dirs.py` accepts any empty `lower/<n>`).
        let usr_overlay_options = if spec.host_usr_ro {
            let empty = spec.lower_dirs.len();
            mkdir_mode(&spec.dir.join("lower").join(empty.to_string()), 0o755)?;
            // Relative to the merged root, the cwd when it is mounted; `usr` is then the host's
            // /usr attached there. No `userxattr`: with no upper layer overlayfs writes no xattr,
            // and it reads none of the host's `trusted.*` from a user namespace.
            cstr(&format!("lowerdir=usr:../lower/{empty}"))
        } else {
            CString::default()
        };
        let (disk, upper, work) = match &spec.disk {
            Some(d) => {
                mkdir_mode(&spec.dir.join("disk"), 0o755)?;
                let mounted = match d {
                    Disk::Image(image) => disk::mount_scratch_disk(image)?,
                    Disk::Mounted(fd) => fd.try_clone()?,
                };
                disk::prepare_layer_dirs(&mounted, spec.id_base)?;
                (Some(mounted), "disk/upper", "disk/work")
            }
            None => {
                for d in ["upper", "work"] {
                    let p = spec.dir.join(d);
                    mkdir_mode(&p, 0o755)?;
                    chown(&p, Some(spec.id_base), Some(spec.id_base))?;
                }
                (None, "upper", "work")
            }
        };
        let lowers: Vec<String> = (0..spec.lower_dirs.len())
            .map(|i| format!("lower/{i}"))
            .collect();
        // userxattr: overlayfs keeps its own metadata (whiteout dirs, opaque markers) in
        // `user.overlay.*` xattrs, which the sandbox's root may write; `trusted.*` needs host root.
        let options = format!(
            "lowerdir={},upperdir={upper},workdir={work},userxattr",
            lowers.join(":")
        );

        let userns_max = if spec.nested_userns {
            NESTED_USERNS_MAX
        } else {
            0
        };
        let mut user_limits = vec![(
            cstr("proc/sys/user/max_user_namespaces"),
            userns_max.to_string().into_bytes(),
        )];
        if let Some(n) = spec.limits.inotify_instances {
            user_limits.push((
                cstr("proc/sys/user/max_inotify_instances"),
                n.to_string().into_bytes(),
            ));
        }
        if let Some(n) = spec.limits.inotify_watches {
            user_limits.push((
                cstr("proc/sys/user/max_inotify_watches"),
                n.to_string().into_bytes(),
            ));
        }

        Ok(Prepared {
            hostname: CString::new(spec.hostname.as_str()).map_err(|_| invalid("NUL"))?,
            dir: cstring(&spec.dir)?,
            id_base: spec.id_base,
            id_map: format!("0 {} {RANGE_SIZE}\n", spec.id_base).into_bytes(),
            lower_sources: spec
                .lower_dirs
                .iter()
                .map(|p| cstring(p))
                .collect::<io::Result<_>>()?,
            lower_targets,
            disk,
            overlay_options: CString::new(options).map_err(|_| invalid("NUL"))?,
            host_usr_ro: spec.host_usr_ro,
            usr_overlay_options,
            cgroup_join: cgroup
                .join_files()
                .iter()
                .map(|p| cstring(p))
                .collect::<io::Result<_>>()?,
            etc_hostname: format!("{}\n", spec.hostname).into_bytes(),
            etc_hosts: hosts_file(Some(&spec.hostname)).into_bytes(),
            boot_id: random_uuid()?.into_bytes(),
            user_limits,
            open_files: spec.limits.open_files,
            seccomp: seccomp::build(spec.nested_userns)?,
            volume_sources: spec
                .volumes
                .iter()
                .map(|v| cstring(&v.host_dir))
                .collect::<io::Result<_>>()?,
            volume_targets: spec
                .volumes
                .iter()
                .map(|v| target_components(&v.target))
                .collect::<io::Result<_>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_ids_are_random_version_4_uuids() {
        let a = random_uuid().unwrap();
        assert_ne!(a, random_uuid().unwrap());
        assert_eq!(a.len(), 37);
        assert_eq!(&a[14..15], "4");
        assert!(a.ends_with('\n'));
    }

    #[test]
    fn a_range_at_host_root_is_refused() {
        let mut s = SandboxSpec::new("x", "/t", Path::new("/d"), 0);
        assert!(s.validate().is_err());
        s.id_base = crate::idrange::FIRST_BASE;
        s.validate().unwrap();
        s.instance = "../x".into();
        assert!(s.validate().is_err());
    }

    #[test]
    fn volume_targets_must_be_absolute_normalised_and_outside_the_kernels_views() {
        for ok in [
            "/mnt/data",
            "/home/user/data",
            "/data",
            "/procedures",
            "/mnt/dev",
        ] {
            validate_volume_target(Path::new(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "/",
            "mnt/data",
            "./mnt",
            "/mnt/",
            "/mnt//data",
            "/mnt/./data",
            "/mnt/../etc",
            "/..",
            "/proc",
            "/proc/self",
            "/sys",
            "/sys/fs/cgroup",
            "/dev",
            "/dev/shm",
        ] {
            let e = validate_volume_target(Path::new(bad)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(e.to_string().contains("volume mount path"), "{bad}: {e}");
        }
        let long = format!("/{}", "a".repeat(MAX_NAME_LEN + 1));
        assert!(validate_volume_target(Path::new(&long)).is_err());
        let deep = "/a".repeat(MAX_TARGET_LEN / 2 + 1);
        assert!(validate_volume_target(Path::new(&deep)).is_err());
        assert_eq!(
            target_components(Path::new("/mnt/data")).unwrap(),
            [c"mnt".to_owned(), c"data".to_owned()]
        );
    }

    #[test]
    fn volumes_are_bounded_absolute_and_never_overlap() {
        let mut s = SandboxSpec::new("x", "/t", Path::new("/d"), crate::idrange::FIRST_BASE);
        let vol = |host: &str, target: &str| VolumeMount {
            host_dir: host.into(),
            target: target.into(),
        };
        s.volumes = vec![vol("/v/a", "/mnt/a"), vol("/v/b", "/mnt/ab")];
        s.validate().unwrap();
        s.volumes = vec![vol("v/a", "/mnt/a")];
        assert!(s.validate().is_err());
        s.volumes = vec![vol("/v/a", "/mnt/a"), vol("/v/b", "/mnt/a")];
        assert!(s.validate().unwrap_err().to_string().contains("overlap"));
        s.volumes = vec![vol("/v/a", "/mnt/a/b"), vol("/v/b", "/mnt/a")];
        assert!(s.validate().unwrap_err().to_string().contains("overlap"));
        s.volumes = (0..=MAX_VOLUMES)
            .map(|i| vol("/v", &format!("/mnt/{i}")))
            .collect();
        assert!(s.validate().unwrap_err().to_string().contains("at most"));
        s.volumes.pop();
        s.validate().unwrap();
    }
}
