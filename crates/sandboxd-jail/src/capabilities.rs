//! Root inside a sandbox is not root over the host: the payload keeps only the capabilities a
//! container runtime grants by default, and the init keeps none.
//!
//! What the kernel does here: sandboxes use no user namespace, so uid 0 inside is uid 0 of the
//! host, and by default holds every capability — enough to mount over anything, load kernel
//! modules, create device nodes for the host's disks, or open host files by handle. Capabilities
//! are per process: `capset` shrinks the effective and permitted sets (for good: a process can
//! never regain a capability it dropped from its permitted set), and `PR_CAPBSET_DROP` removes one
//! from the bounding set, which caps what any later `execve` can grant, even of a setuid-root
//! binary. So after [`restrict_to_payload_set`], the payload and all its descendants, root or
//! not, have at most [`PAYLOAD_CAPABILITIES`].
//!
//! The set is Docker's default minus `CAP_MKNOD` (the sandbox's `/dev` is bind-mounted; creating
//! nodes could expose host disks, as no device cgroup restricts them here). It keeps what an agent
//! and ordinary root tools need: change owners and modes, switch users (`setuid`, `setgid`, for
//! running commands as `user`), kill, bind low ports, raw sockets (ping), chroot.
#![allow(unsafe_code)]

use nix::errno::Errno;

use crate::report::{Step, StepError};

/// Capability numbers (linux/capability.h) the payload keeps.
pub const PAYLOAD_CAPABILITIES: [u32; 13] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Highest capability number the bounding set can hold (capabilities are a 64-bit set); the
/// kernel answers EINVAL past its own last one (`/proc/sys/kernel/cap_last_cap`).
const MAX_CAPABILITY: u32 = 63;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets passed as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const fn mask(caps: &[u32]) -> u64 {
    let mut m = 0u64;
    let mut i = 0;
    while i < caps.len() {
        m |= 1 << caps[i];
        i += 1;
    }
    m
}

/// Drops everything but [`PAYLOAD_CAPABILITIES`] from the calling process's bounding, ambient,
/// inheritable, permitted and effective sets. Async-signal-safe.
pub(crate) fn restrict_to_payload_set() -> Result<(), StepError> {
    restrict(mask(&PAYLOAD_CAPABILITIES))
}

/// Drops every capability of the calling process (the init needs none once the root is built).
/// Async-signal-safe.
pub(crate) fn drop_all() -> Result<(), StepError> {
    restrict(0)
}

fn restrict(keep: u64) -> Result<(), StepError> {
    let fail = |e| StepError::new(Step::Capabilities, e);
    // The bounding set first: dropping from it needs CAP_SETPCAP, which capset may remove.
    for cap in 0..=MAX_CAPABILITY {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // Raw (`raw.rs`): the init drops its capabilities while the payload, sharing its memory,
        // may already run, and this probe fails (EINVAL) on purpose; a libc call would write
        // the payload's `errno`.
        match crate::raw::prctl(libc::PR_CAPBSET_DROP, cap as usize, 0, 0, 0) {
            Ok(_) => {}
            Err(Errno::EINVAL) => break, // past the kernel's last capability
            Err(e) => return Err(fail(e)),
        }
    }
    match crate::raw::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as usize,
        0,
        0,
        0,
    ) {
        Ok(_) | Err(Errno::EINVAL) => {} // EINVAL: kernel without ambient capabilities
        Err(e) => return Err(fail(e)),
    }
    set_only(keep).map_err(fail)
}

/// Sets the calling thread's effective and permitted capabilities to `keep` (a mask; it must be a
/// subset of the permitted set) and clears the inheritable set. The bounding and ambient sets are
/// left alone. Async-signal-safe.
pub(crate) fn set_only(keep: u64) -> Result<(), Errno> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| {
        let bits = (keep >> shift) as u32;
        CapData {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        }
    };
    let data = [half(0), half(32)];
    // Raw, as above.
    // SAFETY: capset reads a v3 header and two CapData structs (the layout of
    // __user_cap_header_struct / __user_cap_data_struct); both live on our stack for the call.
    let r = unsafe {
        crate::raw::call(
            libc::SYS_capset,
            &[
                std::ptr::from_mut(&mut header) as usize,
                data.as_ptr() as usize,
            ],
        )
    };
    r.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_mask_has_the_listed_bits_only() {
        let m = mask(&PAYLOAD_CAPABILITIES);
        assert_eq!(m.count_ones(), PAYLOAD_CAPABILITIES.len() as u32);
        assert_eq!(m & (1 << 21), 0, "no CAP_SYS_ADMIN");
        assert_eq!(m & (1 << 27), 0, "no CAP_MKNOD");
        assert_eq!(
            m & (1 << 2),
            0,
            "no CAP_DAC_READ_SEARCH (open_by_handle_at)"
        );
    }
}
