//! The sandbox's root filesystem: overlayfs over the idmapped template layers with the writable
//! layer on the sandbox's disk, host `/usr` idmapped and read-only under an overlay of its own
//! (so nothing inside can `fsync` a file of the host's disk), fresh `/proc` (with the
//! sandbox's own boot id), read-only `/sys`, a minimal `/dev`, then `pivot_root` into it.
//!
//! What the kernel does here: every call below runs in the sandbox's own mount namespace, owned
//! by its user namespace, which starts as a copy of the host's mount table (the copied mounts are
//! locked: they can be covered, never unmounted or made writable from inside). [`make_private`]
//! first turns propagation off on every copied mount (`MS_REC | MS_PRIVATE`), so no mount or
//! unmount done here reaches the host's namespace (on systemd hosts `/` is `shared` and would
//! otherwise propagate back). The detached idmapped layers and the disk are attached with
//! `move_mount`, overlayfs then merges the layers (read-only) with the sandbox's upper dir (where
//! writes land, on its disk) at the merged dir (`userxattr`: overlayfs keeps its metadata in
//! `user.*` xattrs, which the sandbox's root may set); the volumes are attached on top, each onto
//! a directory descriptor found beneath the merged root one component at a time (never a path
//! the kernel would resolve, so a symlink planted in the writable layer cannot redirect it);
//! `proc` mounted by a process of the new pid namespace shows only that namespace's processes;
//! `sysfs` mounted from the new network namespace shows only its devices (`lo`).
//! Parts of `/proc` and `/sys` that are not namespaced (host-wide sysctls, kernel memory, host
//! hardware) are then masked or made read-only, as container runtimes do. `pivot_root(".", ".")`
//! stacks the old root under the new one, and `umount2(".", MNT_DETACH)`
//! drops it, so no path inside leads back to the host's filesystem.
//!
//! `/proc/sys/kernel/random/boot_id` is not namespaced: a file with the sandbox's own id (new at
//! every start of its processes, so a filesystem resume boots anew and a frozen sandbox keeps its
//! id) is bound over it. The sandbox's user namespace limits (`/proc/sys/user/*`: nested user
//! namespaces, inotify instances and watches) are written while PID 1 still holds
//! `CAP_SYS_RESOURCE` over that namespace and before `/proc/sys` becomes read-only.
//!
//! Everything here runs after `fork` in a child of a possibly multithreaded parent: only system
//! calls on C strings prepared beforehand or written as literals, no allocation. Paths are relative
//! to the sandbox's directory, then to the merged root (we `chdir` into it after mounting the
//! overlay), and each mount point is checked to be a real directory, so a symlink in a template
//! cannot redirect a mount elsewhere.

use std::ffi::CStr;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag, open, openat};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, fstat, lstat, mkdirat};
use nix::unistd::{chdir, mkdir, pivot_root, symlinkat, unlink, write};

use std::os::fd::{AsFd, OwnedFd};

use crate::idmap::{attach, attach_at};
use crate::namespaces::SetupFds;
use crate::report::{AtStep, Step, StepError};
use crate::spec::Prepared;

/// Host device nodes bind-mounted into the sandbox's `/dev` (source, target relative to the new
/// root): the ones programs expect to exist. Disks, `kmsg` and `mem` are deliberately absent.
const DEVICES: [(&CStr, &CStr); 6] = [
    (c"/dev/null", c"dev/null"),
    (c"/dev/zero", c"dev/zero"),
    (c"/dev/full", c"dev/full"),
    (c"/dev/random", c"dev/random"),
    (c"/dev/urandom", c"dev/urandom"),
    (c"/dev/tty", c"dev/tty"),
];

/// Symlinks in `/dev` (target, link): the pty multiplexer of our own devpts instance, and the
/// `/proc/self/fd` names that bash process substitution and `/dev/stdin` users need.
const DEV_LINKS: [(&CStr, &CStr); 5] = [
    (c"pts/ptmx", c"dev/ptmx"),
    (c"/proc/self/fd", c"dev/fd"),
    (c"/proc/self/fd/0", c"dev/stdin"),
    (c"/proc/self/fd/1", c"dev/stdout"),
    (c"/proc/self/fd/2", c"dev/stderr"),
];

/// `/dev` is a tmpfs holding only the nodes and links above; 1 MiB is plenty and stops a sandbox
/// from using `/dev` as unbounded scratch space.
const DEV_TMPFS_OPTIONS: &CStr = c"mode=0755,size=1m";

/// A private devpts instance (`newinstance`), so the sandbox sees only its own ptys; `ptmx`
/// usable by every user; new ptys group `tty` (gid 5, as in the built-in `/etc/group`) mode 0620.
const DEVPTS_OPTIONS: &CStr = c"newinstance,ptmxmode=0666,mode=0620,gid=5";

/// `/dev/shm` is world-writable with the sticky bit, like `/tmp`. Its pages are charged to the
/// sandbox's memory cgroup, which bounds it.
const SHM_OPTIONS: &CStr = c"mode=1777";

/// Kernel files that expose host state or control the host, hidden under `/dev/null` (Docker's
/// list): physical memory (`kcore`), the kernel keyring, scheduler and timer internals.
const MASKED_FILES: [&CStr; 6] = [
    c"proc/kcore",
    c"proc/keys",
    c"proc/latency_stats",
    c"proc/timer_list",
    c"proc/timer_stats",
    c"proc/sched_debug",
];

/// Directories about host hardware, hidden under an empty read-only tmpfs (Docker's list).
const MASKED_DIRS: [&CStr; 5] = [
    c"proc/acpi",
    c"proc/asound",
    c"proc/scsi",
    c"sys/firmware",
    c"sys/devices/virtual/powercap",
];

/// Host-global kernel knobs, made read-only: most of `/proc/sys` is not namespaced, and uid 0
/// can write much of it without any capability (e.g. `kernel.core_pattern`, which makes the
/// host run a program).
const READ_ONLY: [&CStr; 5] = [
    c"proc/bus",
    c"proc/fs",
    c"proc/irq",
    c"proc/sys",
    c"proc/sysrq-trigger",
];

/// Makes every mount in the current (new) mount namespace private. Must run right after
/// `unshare(CLONE_NEWNS)` and before any other mount.
pub(crate) fn make_private() -> Result<(), StepError> {
    mount(
        None::<&CStr>,
        c"/",
        None::<&CStr>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&CStr>,
    )
    .at(Step::MakePrivate)
}

/// Where the boot id is written before it is bound, relative to the merged root: on the
/// sandbox's own `/dev` tmpfs, and unlinked once bound.
const BOOT_ID_SOURCE: &CStr = c"dev/.boot_id";

/// Where the kernel shows the boot id, relative to the merged root.
const BOOT_ID_TARGET: &CStr = c"proc/sys/kernel/random/boot_id";

/// Builds the root at the merged dir and pivots into it. Runs as PID 1 of the new pid namespace,
/// in the new (private) mount namespace, with the sandbox's directory as its cwd. On return the
/// cwd and root are the sandbox's `/`.
pub(crate) fn setup_root(p: &Prepared, fds: &SetupFds) -> Result<(), StepError> {
    for (layer, target) in fds.layers().zip(&p.lower_targets) {
        attach(layer, target).at(Step::AttachLayer)?;
    }
    if let Some(disk) = &p.disk {
        attach(disk.as_fd(), c"disk").at(Step::AttachDisk)?;
    }
    mount(
        Some(c"overlay"),
        c"merged",
        Some(c"overlay"),
        MsFlags::MS_NODEV,
        Some(p.overlay_options.as_c_str()),
    )
    .at(Step::MountOverlay)?;
    chdir(c"merged").at(Step::Chdir)?;

    if let Some(usr) = fds.usr() {
        ensure_dir(c"usr")?;
        attach(usr, c"usr").at(Step::BindUsr)?;
        overlay_usr(p)?;
    }
    for (volume, target) in fds.volumes().zip(&p.volume_targets) {
        let at = open_beneath_root(target)?;
        attach_at(volume, at.as_fd()).at(Step::AttachVolume)?;
    }

    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    ensure_dir(c"proc")?;
    mount(
        Some(c"proc"),
        c"proc",
        Some(c"proc"),
        nosuid_nodev_noexec,
        None::<&CStr>,
    )
    .at(Step::MountProc)?;

    ensure_dir(c"sys")?;
    mount(
        Some(c"sysfs"),
        c"sys",
        Some(c"sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None::<&CStr>,
    )
    .at(Step::MountSys)?;

    setup_dev()?;
    bind_boot_id(&p.boot_id)?;
    for (file, value) in &p.user_limits {
        let f = open(
            file.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .at(Step::UserLimits)?;
        write(&f, value).at(Step::UserLimits)?;
    }
    mask_kernel_files()?;

    pivot_root(c".", c".").at(Step::PivotRoot)?;
    umount2(c".", MntFlags::MNT_DETACH).at(Step::DetachOldRoot)?;
    chdir(c"/").at(Step::Chdir)?;

    write_etc(c"hostname", &p.etc_hostname)?;
    write_etc(c"hosts", &p.etc_hosts)?;
    Ok(())
}

fn setup_dev() -> Result<(), StepError> {
    ensure_dir(c"dev")?;
    mount(
        Some(c"tmpfs"),
        c"dev",
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(DEV_TMPFS_OPTIONS),
    )
    .at(Step::MountDev)?;
    for (source, target) in DEVICES {
        // A bind mount needs an existing file to cover.
        drop(
            open(
                target,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o666),
            )
            .at(Step::BindDevice)?,
        );
        mount(
            Some(source),
            target,
            None::<&CStr>,
            MsFlags::MS_BIND,
            None::<&CStr>,
        )
        .at(Step::BindDevice)?;
    }
    mkdir(c"dev/pts", Mode::from_bits_truncate(0o755)).at(Step::MountDevpts)?;
    mount(
        Some(c"devpts"),
        c"dev/pts",
        Some(c"devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(DEVPTS_OPTIONS),
    )
    .at(Step::MountDevpts)?;
    mkdir(c"dev/shm", Mode::from_bits_truncate(0o1777)).at(Step::MountShm)?;
    mount(
        Some(c"tmpfs"),
        c"dev/shm",
        Some(c"tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(SHM_OPTIONS),
    )
    .at(Step::MountShm)?;
    for (target, link) in DEV_LINKS {
        symlinkat(target, AT_FDCWD, link).at(Step::DevLinks)?;
    }
    Ok(())
}

/// Binds the sandbox's boot id over the host's, read-only.
///
/// The file bound is on the sandbox's own `/dev` tmpfs, never one of the host's filesystems:
/// every user inside can open it, and `fsync` of a file (even clean, even through a read-only
/// mount) makes ext4 flush its disk's cache, and `syncfs` writes back and flushes its whole
/// filesystem. A file in the sandbox's directory on the data dir made those `sync(2)` for the
/// host's disk (the seccomp filter answers `sync` itself without running it). On tmpfs both do
/// nothing. The name is unlinked once bound: the mount keeps the file, and nothing inside can reach
/// it to write.
fn bind_boot_id(boot_id: &[u8]) -> Result<(), StepError> {
    let f = open(
        BOOT_ID_SOURCE,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o444),
    )
    .at(Step::BootId)?;
    if write(&f, boot_id).at(Step::BootId)? != boot_id.len() {
        return Err(StepError::new(Step::BootId, Errno::EIO));
    }
    drop(f);
    mount(
        Some(BOOT_ID_SOURCE),
        BOOT_ID_TARGET,
        None::<&CStr>,
        MsFlags::MS_BIND,
        None::<&CStr>,
    )
    .at(Step::BootId)?;
    mount(
        None::<&CStr>,
        BOOT_ID_TARGET,
        None::<&CStr>,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&CStr>,
    )
    .at(Step::BootId)?;
    unlink(BOOT_ID_SOURCE).at(Step::BootId)
}

/// Covers the host's `/usr`, just attached at `usr`, with a read-only overlay of it (and an empty
/// second lower: overlayfs without an upper layer wants two), so that no file of the host's disk
/// is open inside.
///
/// Why: `fsync` of a file of the host's ext4, even a clean one opened read-only through a
/// read-only mount, makes ext4 flush its disk's cache, and `syncfs` writes back and flushes its
/// whole filesystem; every user inside can open `/usr/bin/ls`, so either was `sync(2)` for the
/// host's disk, against every other tenant's I/O (400 flushes for 200 rounds). Through overlayfs
/// neither reaches it: `ovl_fsync` syncs only an upper file and `ovl_sync_fs` returns at once
/// without an upper layer (the template layers are safe for the same reason). Measured on Linux
/// 6.18: 0 flushes for the same 200 rounds. The host's mount stays beneath, covered: nothing
/// inside can unmount it (no `CAP_SYS_ADMIN`) or open a path through it. Submounts of the host's
/// `/usr` do not show through the overlay (a lower layer is one filesystem).
fn overlay_usr(p: &Prepared) -> Result<(), StepError> {
    mount(
        Some(c"overlay"),
        c"usr",
        Some(c"overlay"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        Some(p.usr_overlay_options.as_c_str()),
    )
    .at(Step::OverlayUsr)
}

/// Hides or freezes the parts of `/proc` and `/sys` that reach past the sandbox. Paths the kernel
/// does not have are skipped. The payload lacks `CAP_SYS_ADMIN`, so it cannot undo any of this.
fn mask_kernel_files() -> Result<(), StepError> {
    let skip_missing = |r: nix::Result<()>| match r {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(StepError::new(Step::MaskProc, e)),
    };
    for path in MASKED_FILES {
        skip_missing(mount(
            Some(c"/dev/null"),
            path,
            None::<&CStr>,
            MsFlags::MS_BIND,
            None::<&CStr>,
        ))?;
    }
    for path in MASKED_DIRS {
        skip_missing(mount(
            Some(c"tmpfs"),
            path,
            Some(c"tmpfs"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(c"size=0"),
        ))?;
    }
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for path in READ_ONLY {
        match mount(
            Some(path),
            path,
            None::<&CStr>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&CStr>,
        ) {
            Ok(()) => {}
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(StepError::new(Step::MaskProc, e)),
        }
        mount(
            None::<&CStr>,
            path,
            None::<&CStr>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | proc_flags,
            None::<&CStr>,
        )
        .at(Step::MaskProc)?;
    }
    Ok(())
}

/// Opens (`O_PATH`) the directory at `components` beneath the new root (the cwd), creating missing
/// ones (0755, owned by the sandbox's root, in its writable layer). The writable layer may come
/// from an earlier life of the sandbox, or a snapshot, so anything on the way is hostile: each
/// component is opened with `O_NOFOLLOW | O_DIRECTORY` relative to the one before, so a symlink
/// or a file anywhere on the path fails (`ELOOP`/`ENOTDIR`) rather than leading out of the root.
/// No process of the sandbox runs yet, so nothing can swap a component between the steps.
fn open_beneath_root(components: &[std::ffi::CString]) -> Result<OwnedFd, StepError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = open(c".", flags, Mode::empty()).at(Step::VolumeTarget)?;
    for name in components {
        match mkdirat(
            dir.as_fd(),
            name.as_c_str(),
            Mode::from_bits_truncate(0o755),
        ) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(StepError::new(Step::VolumeTarget, e)),
        }
        dir = openat(dir.as_fd(), name.as_c_str(), flags, Mode::empty()).at(Step::VolumeTarget)?;
    }
    Ok(dir)
}

/// Makes sure `path` (relative to the new root) is a real directory, creating it if missing.
fn ensure_dir(path: &CStr) -> Result<(), StepError> {
    match lstat(path) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => Ok(()),
        Ok(_) => Err(StepError::new(Step::MountPoint, Errno::ENOTDIR)),
        Err(Errno::ENOENT) => mkdir(path, Mode::from_bits_truncate(0o755)).at(Step::MountPoint),
        Err(e) => Err(StepError::new(Step::MountPoint, e)),
    }
}

/// Replaces a small file of the sandbox's `/etc` (in its upper layer), as the sandbox's root after
/// its `pivot_root`. What the sandbox's root may have left there before a pause is never followed
/// and never waited on: `/etc` and the file are opened without following a link, and the file
/// non-blocking (a FIFO there, which no one reads yet, would have blocked the open for ever and the
/// resume with it). Skipped, leaving it as it is, when the template has no `/etc`, or the sandbox made
/// `/etc` or the file a link, a FIFO, a directory or anything but a regular file: it is the
/// sandbox's own file, and refusing the start would lose the user the sandbox.
fn write_etc(name: &CStr, content: &[u8]) -> Result<(), StepError> {
    let etc = match open(
        c"/etc",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => return Ok(()),
        Err(e) => return Err(StepError::new(Step::WriteEtc, e)),
    };
    let fd = match openat(
        etc.as_fd(),
        name,
        OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_TRUNC
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    ) {
        Ok(fd) => fd,
        // ENXIO: a FIFO or socket with no reader; EISDIR: a directory; EACCES: a device node on
        // the nodev root; EROFS: a read-only root.
        Err(
            Errno::ENOENT
            | Errno::ELOOP
            | Errno::ENOTDIR
            | Errno::EROFS
            | Errno::EISDIR
            | Errno::ENXIO
            | Errno::EACCES,
        ) => return Ok(()),
        Err(e) => return Err(StepError::new(Step::WriteEtc, e)),
    };
    if !fstat(&fd).is_ok_and(|st| {
        SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
    }) {
        return Ok(());
    }
    let mut done = 0;
    while done < content.len() {
        match write(&fd, &content[done..]) {
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(StepError::new(Step::WriteEtc, e)),
        }
    }
    Ok(())
}

/// Whether something is mounted at `path` in the caller's mount namespace.
pub(crate) fn is_mount_point(path: &Path) -> io::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == path)
    }))
}

/// Lazily unmounts whatever is mounted at `path` in the caller's namespace, if anything. A
/// sandbox's overlay lives only in its own namespace, so on the host this normally does nothing.
pub(crate) fn detach_if_mounted(path: &Path) -> io::Result<()> {
    while is_mount_point(path)? {
        umount2(path, MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    Ok(())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1..i + 4)
                .is_some_and(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }
}
