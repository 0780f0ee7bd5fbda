//! A sandbox's disk quota: its writable layer lives on its own ext4 filesystem, in a sparse image
//! file attached to a loop device, so a write past the quota fails with `ENOSPC` inside, `df`
//! inside shows the quota, and the host's disk only ever gives the sandbox what it wrote.
//!
//! Why this mechanism (measured on the development host): ext4 project quotas need
//! `CONFIG_QFMT_V2` and a filesystem made with the `project` feature, XFS quotas need XFS; a
//! sparse image needs only loop devices and ext4, which every distribution kernel has. Formatting
//! a 10 GiB sparse image takes ~15 ms, copying an empty formatted one ~9 ms, binding a loop
//! device ~0.2-2 ms and mounting 0.5-10 ms (a journal adds 3-10 ms to the mount and ~15 ms to
//! the unmount), so the filesystem has no journal (a sandbox's disk is scratch space whose
//! processes die with the host anyway; a disk paused to the data dir that a host crash left
//! unclean is still mountable, and `e2fsck` can check it), and the runtime keeps a few copies
//! formatted *and mounted* ahead of need ([`mount_disk`], [`Disk::Mounted`]): nothing of the
//! disk remains on the create path but two `chown`s (its layer's directories are in the image).
//!
//! What the kernel does here. `LOOP_CTL_GET_FREE` on `/dev/loop-control` names a free loop
//! device; `LOOP_CONFIGURE` (Linux 5.8+) binds it to the image in one step, with
//! `LO_FLAGS_AUTOCLEAR` (the device unbinds itself when its last user, the filesystem, goes away)
//! and direct I/O (no second copy of every block in the host's page cache, and the writes stay
//! charged to the writer). Two runtimes racing for the same free device get `EBUSY`; the loser
//! asks again. `fsopen("ext4")` + `fsconfig` + `fsmount` mount the device as a *detached* mount:
//! it is never attached in the host's mount table; the sandbox's PID 1 attaches it inside the
//! sandbox's mount namespace, so it lives exactly as long as the sandbox and nothing is left
//! mounted on the host if anything fails or the sandbox ends (then the loop device clears itself).
//! `noinit_itable` stops ext4's background thread from zeroing inode tables of the sparse image
//! (writing ~160 MB per 10 GiB for nothing: unused inodes are known to be unused).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{Gid, Uid, fchownat};

use crate::userns::owned;

/// `LOOP_CTL_GET_FREE` (linux/loop.h).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LOOP_CONFIGURE` (linux/loop.h, Linux 5.8+).
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// `LO_FLAGS_AUTOCLEAR`: unbind when the last opener closes.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// `LO_FLAGS_DIRECT_IO`: bypass the host page cache for the image file.
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// Block size for the loop device: the ext4 block size, so direct I/O stays aligned.
const LOOP_BLOCK_SIZE: u32 = 4096;
/// How long to keep asking for a free loop device while other processes win the race for each one
/// the kernel names (or it is still being torn down after its last sandbox): a burst of creates
/// across several runtimes can take many rounds.
const LOOP_DEADLINE: Duration = Duration::from_secs(10);

/// Pause between rounds, doubling up to [`LOOP_BACKOFF_MAX`]: gives a device being released time
/// to finish, and a concurrent claimer time to configure its own.
const LOOP_BACKOFF_START: Duration = Duration::from_micros(200);

/// See [`LOOP_BACKOFF_START`].
const LOOP_BACKOFF_MAX: Duration = Duration::from_millis(20);

/// Serialises this process's own loop allocations: `LOOP_CTL_GET_FREE` names the same device to
/// every caller until one has configured it, so threads of one runtime would only race each other.
/// (Only ever taken in ordinary threads: never in a process forked from a multithreaded one.)
static LOOP_LOCK: Mutex<()> = Mutex::new(());

/// The writable layer's directories on the disk (overlayfs upper and work dirs).
pub(crate) const UPPER: &CStr = c"upper";
/// See [`UPPER`].
pub(crate) const WORK: &CStr = c"work";

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// The sandbox's disk: its writable layer and quota (see the module docs).
#[derive(Clone, Debug)]
pub enum Disk {
    /// A formatted image ([`format_image`]), mounted while the sandbox is prepared.
    Image(PathBuf),
    /// A disk already mounted by [`mount_disk`] (a detached mount), e.g. one of a pool made off
    /// the request path. The sandbox attaches it; the caller may close its descriptor once the
    /// sandbox has started.
    Mounted(Arc<OwnedFd>),
}

impl Disk {
    /// A [`Disk::Mounted`] from a descriptor number that the caller keeps owning: it is
    /// duplicated (close-on-exec). `EBADF` if it is not open.
    pub fn mounted_from_raw_fd(fd: RawFd) -> io::Result<Disk> {
        // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; a closed or invalid number
        // fails with EBADF.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        Ok(Disk::Mounted(Arc::new(owned(libc::c_long::from(dup))?)))
    }
}

impl PartialEq for Disk {
    fn eq(&self, other: &Disk) -> bool {
        match (self, other) {
            (Disk::Image(a), Disk::Image(b)) => a == b,
            (Disk::Mounted(a), Disk::Mounted(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Creates `path` as a sparse image of `size_mb` MiB holding an empty ext4 filesystem (with
/// `mkfs.ext4` from e2fsprogs): no journal, no resize inode, no reserved blocks (the whole quota
/// is the sandbox's), a root directory owned by root, lazily initialised inode tables (nothing is
/// written for them: they are holes, which read as zeros). An empty 10 GiB image holds ~230 KiB.
pub fn format_image(path: &Path, size_mb: u64) -> io::Result<()> {
    format(path, size_mb, false)
}

/// [`format_image`] for the template every sandbox's disk is copied from ([`copy_sparse`]): its
/// metadata packed at the image's start and one backup superblock instead of one in every group
/// (`sparse_super2`, Linux 3.16+), so an empty 10 GiB image is 5 data extents (140 KiB) instead of
/// 16 (236 KiB). Each copy's extents are allocated and written back by the kernel as the copy's
/// loop device is bound (`LOOP_CONFIGURE` flushes the image first), per extent: ~0.3 ms less of
/// the runtime's CPU a disk (`docs/benchmarks.md`, `cold17`). Volumes keep [`format_image`]'s
/// layout: they are formatted once and hold what their users keep.
pub fn format_template_image(path: &Path, size_mb: u64) -> io::Result<()> {
    format(path, size_mb, true)
}

fn format(path: &Path, size_mb: u64, packed: bool) -> io::Result<()> {
    if size_mb < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a sandbox disk needs at least 16 MiB",
        ));
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_len(size_mb << 20)?;
    drop(f);
    let (features, extended) = if packed {
        (
            "^has_journal,^resize_inode,sparse_super2",
            "lazy_itable_init=1,nodiscard,root_owner=0:0,num_backup_sb=1,packed_meta_blocks=1",
        )
    } else {
        (
            "^has_journal,^resize_inode",
            "lazy_itable_init=1,nodiscard,root_owner=0:0",
        )
    };
    let out = Command::new("mkfs.ext4")
        // No journal (see the module docs); no resize inode: a quota never grows online, and its
        // reserved descriptor blocks were 4.1 of the 4.3 MiB an empty 10 GiB image holds (0.2 left).
        .args(["-q", "-F", "-m", "0", "-b", "4096", "-O", features])
        .args(["-E", extended])
        .arg(path)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin",
        )
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running mkfs.ext4 (install e2fsprogs): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "mkfs.ext4 {} failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    make_layer_dirs_offline(path);
    Ok(())
}

/// Makes the writable layer's empty directories ([`UPPER`], [`WORK`]: mode 0755, root's) in the
/// unmounted image, once, with e2fsprogs' `debugfs`, so that every copy of the image has them.
/// Made by [`mount_disk`] on each copy instead, each `mkdir` allocated a directory block on a
/// freshly mounted filesystem: ext4's block allocator reads the group bitmaps of an empty 10 GiB
/// filesystem to find one (~0.4 ms of the runtime's CPU a disk, measured under `perf`, on the
/// create path of every disk made on demand). `debugfs` writes the image directly, nothing
/// of the host's filesystem (its modes, owners, default ACLs) reaches it. Best effort: without
/// `debugfs`, or if it fails, [`mount_disk`] and [`prepare_layer_dirs`] make them as before.
fn make_layer_dirs_offline(path: &Path) {
    let commands = format!(
        "mkdir {}\nmkdir {}\n",
        UPPER.to_string_lossy(),
        WORK.to_string_lossy()
    );
    let Ok(mut child) = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(path)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin",
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return;
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = io::Write::write_all(&mut stdin, commands.as_bytes());
    }
    let _ = child.wait();
}

/// Copies `src` to `dst` keeping holes as holes (`SEEK_DATA`/`SEEK_HOLE`, then
/// `copy_file_range` for each data extent): a copy of an empty formatted image writes only its
/// few MiB of metadata. `dst` is created with mode 0600 (replaced if it exists).
pub fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let from = fs::File::open(src)?;
    let len = from.metadata()?.len();
    let to = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    to.set_len(len)?;
    let (fi, fo) = (from.as_raw_fd(), to.as_raw_fd());
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we own; ENXIO means no data after `pos`.
        let data = unsafe { libc::lseek(fi, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fi, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            // SAFETY: both offsets are valid pointers to i64 we own; the kernel copies between
            // two descriptors we own.
            let n = unsafe {
                libc::copy_file_range(
                    fi,
                    &mut off_in,
                    fo,
                    &mut off_out,
                    (hole - off_in) as usize,
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                break;
            }
        }
        pos = hole;
    }
    // No fsync: an image is scratch space for one sandbox, whose processes die with the host; the
    // kernel writes it back in its own time (measured: the fsync was most of a copy's cost under
    // concurrent creates).
    fs::set_permissions(dst, fs::Permissions::from_mode(0o600))
}

/// Binds `image` to a free loop device (autoclear, direct I/O when the backing filesystem allows
/// it) and returns the device's descriptor and number.
fn attach_loop(image: &Path) -> io::Result<(OwnedFd, u32)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(image)?;
    let ctl = open(
        c"/dev/loop-control",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("opening /dev/loop-control: {e} (the sandbox disk needs loop devices)"),
        )
    })?;
    let deadline = Instant::now() + LOOP_DEADLINE;
    let mut backoff = LOOP_BACKOFF_START;
    let _ours = LOOP_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while Instant::now() < deadline {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
        let n = Errno::result(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
        let dev =
            CString::new(format!("/dev/loop{n}")).map_err(|_| io::Error::other("loop path"))?;
        let lo = match open(
            dev.as_c_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ENXIO) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
        loop {
            let config = loop_config(file.as_raw_fd(), flags);
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` that outlives the call.
            let r = unsafe {
                libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig)
            };
            match Errno::result(r) {
                Ok(_) => return Ok((lo, n as u32)),
                // The backing filesystem cannot do direct I/O at this block size: buffered.
                Err(Errno::EINVAL) if flags & LO_FLAGS_DIRECT_IO != 0 => flags = LO_FLAGS_AUTOCLEAR,
                // Another process bound it first, or it is still being released: ask again.
                Err(Errno::EBUSY) => break,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("LOOP_CONFIGURE /dev/loop{n}: {e}"),
                    ));
                }
            }
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(LOOP_BACKOFF_MAX);
    }
    Err(io::Error::new(
        io::ErrorKind::ResourceBusy,
        format!("no free loop device within {LOOP_DEADLINE:?}"),
    ))
}

fn loop_config(fd: i32, flags: u32) -> LoopConfig {
    LoopConfig {
        fd: fd as u32,
        block_size: LOOP_BLOCK_SIZE,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    }
}

fn fsconfig(
    fs: &OwnedFd,
    cmd: libc::c_uint,
    key: Option<&CStr>,
    value: Option<&CStr>,
) -> io::Result<()> {
    // SAFETY: fsconfig reads the optional C strings; aux is unused for these commands.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            cmd,
            key.map_or(std::ptr::null(), CStr::as_ptr),
            value.map_or(std::ptr::null(), CStr::as_ptr),
            0,
        )
    };
    Errno::result(r).map(drop).map_err(io::Error::from)
}

/// Mounts the ext4 filesystem in `image` as a detached mount (attached nowhere: a sandbox's PID 1
/// attaches it inside the sandbox), makes sure it has the `upper` and `work` directories of a
/// writable layer, and returns its descriptor. Dropping every copy of the
/// descriptor before it is attached unmounts the filesystem and frees the loop device.
///
/// The filesystem keeps write barriers: a `sync` or `fsync` inside reaches the host's disk. For
/// what must outlive a host crash (a volume); a sandbox's own disk is [`mount_scratch_disk`].
pub fn mount_disk(image: &Path) -> io::Result<OwnedFd> {
    mount(image, false)
}

/// [`mount_disk`] for a sandbox's own disk, without write barriers (`nobarrier`): a flush inside
/// (every `fsync`, `sync`, and the unmount when the sandbox ends) stops at the image file instead of
/// going on to the host's disk as a cache flush. The loop device turns each flush into an `fsync`
/// of the whole image, which waits for the host's journal and disk: measured here, an unmount took
/// 21-60 ms with barriers and 7-12 without, and hundreds of ms beside other I/O, on the path of
/// every kill. The data is the same either way once written; only its durability across a host
/// crash differs, and that is what E2B's Firecracker drives give a sandbox by default too (their
/// `Unsafe` cache type ignores flushes). A disk that must survive, one paused to the data dir, is
/// made durable by the runtime with one `fsync` of its image once the sandbox's processes are gone.
pub fn mount_scratch_disk(image: &Path) -> io::Result<OwnedFd> {
    mount(image, true)
}

fn mount(image: &Path, scratch: bool) -> io::Result<OwnedFd> {
    let (lo, n) = attach_loop(image)?;
    let dev = CString::new(format!("/dev/loop{n}")).map_err(|_| io::Error::other("loop path"))?;
    // SAFETY: fsopen reads a C string and returns a new descriptor or -1.
    let fs =
        owned(unsafe { libc::syscall(libc::SYS_fsopen, c"ext4".as_ptr(), libc::FSOPEN_CLOEXEC) })?;
    fsconfig(
        &fs,
        libc::FSCONFIG_SET_STRING,
        Some(c"source"),
        Some(dev.as_c_str()),
    )?;
    fsconfig(&fs, libc::FSCONFIG_SET_FLAG, Some(c"noinit_itable"), None)?;
    if scratch {
        fsconfig(&fs, libc::FSCONFIG_SET_FLAG, Some(c"nobarrier"), None)?;
    }
    fsconfig(&fs, libc::FSCONFIG_CMD_CREATE, None, None).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("mounting the sandbox disk {}: {e}", image.display()),
        )
    })?;
    // SAFETY: fsmount takes integers and returns a new descriptor or -1.
    let mnt = owned(unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            libc::MOUNT_ATTR_NODEV,
        )
    })?;
    // The filesystem now holds the loop device; our descriptor is no longer needed.
    drop(lo);
    // The layer's directories now, while the disk is made (ahead of need, for the runtime's pool):
    // their blocks are then in memory, and the create path only changes their owner.
    for dir in [UPPER, WORK] {
        match mkdirat(&mnt, dir, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(mnt)
}

/// Makes sure the mounted disk `mnt` has its `upper` and `work` directories, owned by `owner`
/// (the sandbox's root on the host).
pub(crate) fn prepare_layer_dirs(mnt: &OwnedFd, owner: u32) -> io::Result<()> {
    for dir in [UPPER, WORK] {
        match mkdirat(mnt, dir, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        fchownat(
            mnt,
            dir,
            Some(Uid::from_raw(owner)),
            Some(Gid::from_raw(owner)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
    }
    Ok(())
}

/// Size and use of a filesystem, in bytes, as `df` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes in use.
    pub used_bytes: u64,
    /// Total size available to files (the quota, less the filesystem's own metadata).
    pub total_bytes: u64,
}

/// `statvfs` of `path`, as `df` reports it.
pub fn disk_usage(path: &Path) -> io::Result<DiskUsage> {
    let st = nix::sys::statvfs::statvfs(path)?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    Ok(DiskUsage {
        used_bytes: total.saturating_sub(free),
        total_bytes: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_matches_the_kernel_layout() {
        // linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let f = fs::File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        drop(f);
        copy_sparse(&a, &b).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            fs::metadata(&b).unwrap().blocks() * 512 < 1 << 20,
            "the copy is sparse"
        );
    }
}
