//! Idmapped mounts: the template's layers (and the host's `/usr`) look owned by root inside a
//! sandbox although they stay owned by the host's real ids on disk.
//!
//! What the kernel does here. `open_tree(path, OPEN_TREE_CLONE)` copies the mount at `path` into
//! a new, detached mount (not attached anywhere; an open descriptor is its only handle).
//! `mount_setattr(MOUNT_ATTR_IDMAP, userns)` gives that detached mount the id mapping of a user
//! namespace (Linux 5.12+): a file owned by uid `k` on disk is seen through this mount as owned by
//! the namespace's `k` (host `base + k`), so inside the sandbox a root-owned template file is
//! owned by root, and files copied up from it into the sandbox's writable layer land owned by the
//! sandbox's range. Nothing is copied or chowned: one template serves every sandbox.
//! `MOUNT_ATTR_RDONLY` makes the layer read-only as well. Volumes (host directories shared
//! between sandboxes) are mounted the same way but writable and `nosuid`: a file a sandbox's
//! `user` (1000) writes lands owned by host uid 1000, the canonical owner, so any sandbox that
//! mounts the volume sees it as its own `user`'s.
//!
//! Creating an idmapped mount needs `CAP_SYS_ADMIN` over the filesystem's owner (the host), so A
//! does it before it enters the sandbox's user namespace; the sandbox's PID 1, which owns the new
//! mount namespace, then attaches each detached mount with `move_mount` where overlayfs expects
//! it. overlayfs accepts idmapped lower layers since Linux 5.19. A filesystem without idmapped
//! mount support (or a kernel without the call) fails here with `EINVAL`/`ENOSYS`, and the step's
//! message says what the host needs.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;

use crate::userns::owned;

/// Attributes of a template layer (and of the host's `/usr`): read-only, no device nodes. Setuid
/// stays, so `sudo` works inside (setuid root there is the sandbox's root).
pub(crate) const LAYER_ATTRS: u64 = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NODEV;

/// Attributes of a volume: writable, but neither setuid bits nor device nodes take effect. A
/// volume is shared with other sandboxes and outlives this one, so nothing planted in it may
/// grant privileges.
pub(crate) const VOLUME_ATTRS: u64 = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;

/// Clones the mount tree at `path` (recursively, when `recursive`: submounts too) into a detached
/// mount idmapped through `userns`, with the mount attributes `attrs` ([`LAYER_ATTRS`],
/// [`VOLUME_ATTRS`]). Async-signal-safe.
pub(crate) fn idmapped_tree(
    path: &CStr,
    userns: BorrowedFd<'_>,
    recursive: bool,
    attrs: u64,
) -> Result<OwnedFd, Errno> {
    let recursive_flag = if recursive {
        libc::AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    // SAFETY: open_tree reads the C string and returns a new descriptor or -1.
    let tree = owned(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | recursive_flag,
        )
    })?;
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_IDMAP | attrs,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let flags = libc::AT_EMPTY_PATH as libc::c_uint | recursive_flag;
    // SAFETY: mount_setattr reads `attr` (of the size passed) and the empty path; both outlive the
    // call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(r)?;
    Ok(tree)
}

/// Attaches the detached mount `tree` at `target` (a directory, relative to the cwd or absolute)
/// in the caller's mount namespace. Async-signal-safe.
pub(crate) fn attach(tree: BorrowedFd<'_>, target: &CStr) -> Result<(), Errno> {
    // SAFETY: move_mount reads two C strings and takes integer flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(r).map(drop)
}

/// Attaches the detached mount `tree` onto the directory open as `target` (an `O_PATH`
/// descriptor), in the caller's mount namespace. No path is resolved, so nothing can redirect it.
/// Async-signal-safe.
pub(crate) fn attach_at(tree: BorrowedFd<'_>, target: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: move_mount reads two (empty) C strings and takes integer flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    Errno::result(r).map(drop)
}

/// Checks, from the runtime at start, that this host can build sandboxes over `template`: user
/// namespaces can be created and the template's filesystem can be idmapped. Fails with the
/// message of the step that failed (what the host needs), so `sandboxd serve` can refuse to start
/// rather than fail every create. The probe's namespace maps a range for a moment and holds no
/// process or file. Blocks for about a millisecond; callable from a multithreaded process.
pub fn check_idmapped_mounts(template: &std::path::Path) -> std::io::Result<()> {
    let path = crate::spec::cstring(template)?;
    let map = format!(
        "0 {} {}\n",
        crate::idrange::FIRST_BASE,
        crate::idrange::RANGE_SIZE
    );
    let userns = crate::userns::create(crate::idrange::FIRST_BASE, map.as_bytes())?;
    idmapped_tree(&path, userns.as_fd(), false, LAYER_ATTRS)
        .map(drop)
        .map_err(|e| crate::report::StepError::new(crate::report::Step::IdmapLayer, e).into())
}
