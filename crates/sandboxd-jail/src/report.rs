//! Errors that cross `fork`: how the processes that build a sandbox tell their parent what failed.
//!
//! What the kernel does here: a pipe carries fixed-size records from children to a parent. Writes
//! of at most `PIPE_BUF` bytes are atomic, so a record is never torn, and the reader sees end of
//! file once every copy of the write end is closed — by `close`, by `exit`, or by a successful
//! `execve` when the end is `O_CLOEXEC`. So "end of file and no error record" means "every step
//! succeeded", including the payload's `execve`.
//!
//! Code after `fork` in a multithreaded parent may only make async-signal-safe calls: no heap, no
//! locks. So a step failure is a `Copy` value ([`StepError`]: which step, which errno) written as
//! twelve bytes, and it becomes an [`io::Error`] with a message only in a process where allocating
//! is safe.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Instant;

use nix::errno::Errno;

/// One step of building a sandbox, named in error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    Setsid = 1,
    JoinCgroup,
    Unshare,
    MakePrivate,
    Hostname,
    Loopback,
    Pipe,
    Fork,
    MountOverlay,
    Chdir,
    MountPoint,
    BindUsr,
    MountProc,
    MountSys,
    MountDev,
    BindDevice,
    MountDevpts,
    MountShm,
    DevLinks,
    PivotRoot,
    DetachOldRoot,
    WriteEtc,
    Signals,
    MaskProc,
    Capabilities,
    PayloadCwd,
    Exec,
    ReadReport,
    Timeout,
    ChildDied,
    UserNamespace,
    IdMap,
    EnterUserNamespace,
    IdmapLayer,
    AttachLayer,
    AttachDisk,
    BootId,
    UserLimits,
    Seccomp,
    Rlimits,
    IdmapVolume,
    VolumeTarget,
    AttachVolume,
    OverlayUsr,
}

impl Step {
    /// Every step, to decode a record read from a pipe.
    const ALL: [Step; 44] = [
        Step::Setsid,
        Step::JoinCgroup,
        Step::Unshare,
        Step::MakePrivate,
        Step::Hostname,
        Step::Loopback,
        Step::Pipe,
        Step::Fork,
        Step::MountOverlay,
        Step::Chdir,
        Step::MountPoint,
        Step::BindUsr,
        Step::MountProc,
        Step::MountSys,
        Step::MountDev,
        Step::BindDevice,
        Step::MountDevpts,
        Step::MountShm,
        Step::DevLinks,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::WriteEtc,
        Step::Signals,
        Step::MaskProc,
        Step::Capabilities,
        Step::PayloadCwd,
        Step::Exec,
        Step::ReadReport,
        Step::Timeout,
        Step::ChildDied,
        Step::UserNamespace,
        Step::IdMap,
        Step::EnterUserNamespace,
        Step::IdmapLayer,
        Step::AttachLayer,
        Step::AttachDisk,
        Step::BootId,
        Step::UserLimits,
        Step::Seccomp,
        Step::Rlimits,
        Step::IdmapVolume,
        Step::VolumeTarget,
        Step::AttachVolume,
        Step::OverlayUsr,
    ];

    fn from_u32(v: u32) -> Step {
        Step::ALL
            .iter()
            .copied()
            .find(|s| *s as u32 == v)
            .unwrap_or(Step::ReadReport)
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            Step::Setsid => "setsid",
            Step::JoinCgroup => "joining the sandbox cgroup",
            Step::Unshare => "unshare(mount, uts, ipc, net, cgroup, pid)",
            Step::MakePrivate => "making mount propagation private",
            Step::Hostname => "sethostname",
            Step::Loopback => "bringing up lo",
            Step::Pipe => "pipe2",
            Step::Fork => "fork",
            Step::MountOverlay => "mounting the overlay root (in a user namespace: Linux >= 5.11)",
            Step::Chdir => "chdir into the new root",
            Step::MountPoint => "preparing a mount point (must be a directory, not a symlink)",
            Step::BindUsr => "attaching the idmapped host /usr",
            Step::OverlayUsr => "mounting the read-only overlay over the host /usr",
            Step::MountProc => "mounting /proc",
            Step::MountSys => "mounting /sys",
            Step::MountDev => "mounting the /dev tmpfs",
            Step::BindDevice => "bind-mounting a device node into /dev",
            Step::MountDevpts => "mounting /dev/pts",
            Step::MountShm => "mounting /dev/shm",
            Step::DevLinks => "creating /dev symlinks",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detaching the old root",
            Step::WriteEtc => "writing /etc/hostname or /etc/hosts",
            Step::Signals => "setting up the init's signals",
            Step::MaskProc => "masking or making read-only parts of /proc and /sys",
            Step::Capabilities => "dropping capabilities",
            Step::PayloadCwd => "chdir to the payload's cwd",
            Step::Exec => "execve of the payload",
            Step::ReadReport => "reading the setup report",
            Step::Timeout => "waiting for the sandbox to start",
            Step::ChildDied => "the setup process died without a report",
            Step::UserNamespace => {
                "creating the sandbox's user namespace as its range's base uid \
                 (needs user namespaces: user.max_user_namespaces > 0)"
            }
            Step::IdMap => "writing the user namespace's uid_map or gid_map",
            Step::EnterUserNamespace => "entering the sandbox's user namespace as its root",
            Step::IdmapLayer => {
                "creating an idmapped mount of a template layer or /usr (needs Linux >= 5.12 with \
                 idmapped-mount support in the template's filesystem, e.g. ext4, xfs, btrfs, tmpfs \
                 >= 6.3)"
            }
            Step::AttachLayer => {
                "attaching an idmapped layer in the sandbox (overlayfs over idmapped layers needs \
                 Linux >= 5.19)"
            }
            Step::AttachDisk => "attaching the sandbox's disk",
            Step::BootId => "binding the sandbox's boot_id",
            Step::UserLimits => "writing the user namespace's limits in /proc/sys/user",
            Step::Seccomp => "installing the seccomp filter",
            Step::Rlimits => "setting the payload's resource limits",
            Step::IdmapVolume => {
                "creating an idmapped mount of a volume's host directory (it must exist, on a \
                 filesystem with idmapped-mount support)"
            }
            Step::VolumeTarget => {
                "finding or creating a volume's mount point in the sandbox's root (every component \
                 of the path must be a directory; symlinks are refused, never followed)"
            }
            Step::AttachVolume => "attaching a volume at its mount point",
        }
    }
}

/// A failed step and its errno: small and `Copy`, so it can be made and sent after `fork`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StepError {
    pub(crate) step: Step,
    pub(crate) errno: Errno,
}

impl StepError {
    pub(crate) fn new(step: Step, errno: Errno) -> StepError {
        StepError { step, errno }
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sandbox setup failed while {}: {}",
            self.step.describe(),
            io::Error::from_raw_os_error(self.errno as i32)
        )
    }
}

impl From<StepError> for io::Error {
    fn from(e: StepError) -> io::Error {
        let kind = io::Error::from_raw_os_error(e.errno as i32).kind();
        io::Error::new(kind, e.to_string())
    }
}

/// `nix` results tagged with the step they belong to.
pub(crate) trait AtStep<T> {
    /// Tags an error with `step`.
    fn at(self, step: Step) -> Result<T, StepError>;
}

impl<T> AtStep<T> for nix::Result<T> {
    fn at(self, step: Step) -> Result<T, StepError> {
        self.map_err(|e| StepError::new(step, e))
    }
}

/// What a record on a report pipe says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Record {
    /// The sandbox's init runs; its pid as seen by the reader.
    InitPid(i32),
    /// A step failed.
    Failed(StepError),
}

/// A record's size on the pipe: tag, step, value (three native-endian 32-bit words). Far below
/// `PIPE_BUF` (4096), so each write is atomic.
const RECORD_LEN: usize = 12;
const TAG_INIT_PID: u32 = 1;
const TAG_FAILED: u32 = 2;

/// Writes one record. Async-signal-safe. Errors are ignored: the reader treats a missing record as
/// a failure of its own (end of file with no pid, or a timeout).
pub(crate) fn write_record(fd: BorrowedFd<'_>, record: Record) {
    let (tag, a, b) = match record {
        Record::InitPid(pid) => (TAG_INIT_PID, 0u32, pid),
        Record::Failed(e) => (TAG_FAILED, e.step as u32, e.errno as i32),
    };
    let mut buf = [0u8; RECORD_LEN];
    buf[0..4].copy_from_slice(&tag.to_ne_bytes());
    buf[4..8].copy_from_slice(&a.to_ne_bytes());
    buf[8..12].copy_from_slice(&b.to_ne_bytes());
    // Raw, so that a failure writes no `errno` (which may be the payload's: `raw.rs`).
    let _ = crate::raw::write_all(fd.as_raw_fd(), &buf);
}

/// Reads one record, waiting until `deadline`. `Ok(None)` is end of file. Async-signal-safe.
pub(crate) fn read_record(
    fd: BorrowedFd<'_>,
    deadline: Instant,
) -> Result<Option<Record>, StepError> {
    let mut buf = [0u8; RECORD_LEN];
    let mut got = 0;
    while got < RECORD_LEN {
        wait_readable(fd, deadline)?;
        // Raw, so that nothing here writes `errno` (which may be the payload's: `raw.rs`).
        match crate::raw::read(fd.as_raw_fd(), &mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(StepError::new(Step::ReadReport, Errno::EPIPE)),
            Ok(n) => got += n,
            Err(Errno::EINTR | Errno::EAGAIN) => {}
            Err(e) => return Err(StepError::new(Step::ReadReport, e)),
        }
    }
    let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
    let tag = u32::from_ne_bytes(word(0));
    let a = u32::from_ne_bytes(word(4));
    let b = i32::from_ne_bytes(word(8));
    match tag {
        TAG_INIT_PID => Ok(Some(Record::InitPid(b))),
        TAG_FAILED => Ok(Some(Record::Failed(StepError::new(
            Step::from_u32(a),
            Errno::from_raw(b),
        )))),
        _ => Err(StepError::new(Step::ReadReport, Errno::EPROTO)),
    }
}

/// Reads records until end of file and returns the first failure, if any. Async-signal-safe.
pub(crate) fn read_until_eof(fd: BorrowedFd<'_>, deadline: Instant) -> Result<(), StepError> {
    let mut first: Option<StepError> = None;
    loop {
        match read_record(fd, deadline)? {
            None => return first.map_or(Ok(()), Err),
            Some(Record::Failed(e)) => {
                first.get_or_insert(e);
            }
            Some(Record::InitPid(_)) => {}
        }
    }
}

/// Waits until `fd` is readable (data or end of file) or `deadline` passes. Async-signal-safe.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> Result<(), StepError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StepError::new(Step::Timeout, Errno::ETIMEDOUT));
        }
        // Raw (`raw.rs`), as is `Instant::now` in effect: the vDSO's clock_gettime writes
        // `errno` only on failure, which `Instant` does not survive anyway.
        match crate::raw::poll_in(fd.as_raw_fd(), left) {
            Ok(false) | Err(Errno::EINTR) => {}
            Ok(true) => return Ok(()),
            Err(e) => return Err(StepError::new(Step::ReadReport, e)),
        }
    }
}
