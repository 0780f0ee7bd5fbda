//! The sandbox's device allow-list: the null, zero, full, random, urandom, tty and ptmx character
//! devices and the sandbox's own pseudo-terminals, nothing else, whatever nodes appear inside.
//!
//! What the kernel does here. Opening a device node (and `mknod`) is checked against the opener's
//! cgroup: on v1 by the `devices` controller, whose `devices.deny` / `devices.allow` files hold a
//! list (`a` denies everything; `c 1:3 rwm` allows the character device 1:3 to be read, written
//! and created); on v2 by an eBPF program of type `BPF_PROG_TYPE_CGROUP_DEVICE` attached to the
//! cgroup, which the kernel runs with the device's type, major, minor and access and which
//! answers 1 (allow) or 0 (deny). Both sit under the user namespace's own rules (nodes cannot be
//! created in a user namespace, and mounts made inside ignore device nodes) and under the
//! capability set: a second, independent layer, as Docker has.
//!
//! The v2 program is ~40 instructions written out below: no library fits (libbpf and aya load
//! compiled ELF objects; runc and youki generate the same shape of program by hand).
#![allow(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;

use crate::userns::owned;

/// A character device the sandbox may use; `minor: None` allows every minor of the major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CharDevice {
    pub(crate) major: u32,
    pub(crate) minor: Option<u32>,
}

const fn dev(major: u32, minor: u32) -> CharDevice {
    CharDevice {
        major,
        minor: Some(minor),
    }
}

/// The allow-list: `/dev/null` 1:3, `zero` 1:5, `full` 1:7, `random` 1:8, `urandom` 1:9, `tty`
/// 5:0, `ptmx` 5:2, and the pseudo-terminal slaves (major 136, any minor) of the sandbox's own
/// devpts instance.
pub(crate) const ALLOWED: [CharDevice; 8] = [
    dev(1, 3),
    dev(1, 5),
    dev(1, 7),
    dev(1, 8),
    dev(1, 9),
    dev(5, 0),
    dev(5, 2),
    CharDevice {
        major: 136,
        minor: None,
    },
];

/// Writes the allow-list into a v1 `devices` cgroup directory: deny all, then allow each.
pub(crate) fn apply_v1(dir: &Path) -> io::Result<()> {
    write(&dir.join("devices.deny"), "a")?;
    for d in ALLOWED {
        let minor = d.minor.map_or("*".to_owned(), |m| m.to_string());
        write(
            &dir.join("devices.allow"),
            &format!("c {}:{minor} rwm", d.major),
        )?;
    }
    Ok(())
}

fn write(path: &Path, line: &str) -> io::Result<()> {
    fs::write(path, line).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {line:?} to {}: {e}", path.display()),
        )
    })
}

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

// Opcodes (linux/bpf.h, linux/bpf_common.h).
/// `BPF_LDX | BPF_MEM | BPF_W`: dst = *(u32 *)(src + off).
const LDX_W: u8 = 0x61;
/// `BPF_ALU | BPF_AND | BPF_K`: dst &= imm (32-bit).
const AND32_K: u8 = 0x54;
/// `BPF_JMP | BPF_JNE | BPF_K`: if dst != imm, skip `off` instructions.
const JNE_K: u8 = 0x55;
/// `BPF_ALU64 | BPF_MOV | BPF_K`: dst = imm.
const MOV64_K: u8 = 0xb7;
/// `BPF_JMP | BPF_EXIT`: return r0.
const EXIT: u8 = 0x95;

/// `BPF_DEVCG_DEV_CHAR`: the device-type half of `bpf_cgroup_dev_ctx.access_type`.
const DEV_CHAR: i32 = 2;

/// The program: r1 points at `struct bpf_cgroup_dev_ctx { u32 access_type, major, minor }`.
fn program() -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),        // r2 = access_type
        insn(AND32_K, 2, 0, 0, 0xffff), // r2 = device type
        insn(LDX_W, 3, 1, 4, 0),        // r3 = major
        insn(LDX_W, 4, 1, 8, 0),        // r4 = minor
    ];
    for d in ALLOWED {
        // Each block: type, major (and minor) must match, else jump past the block's "return 1".
        let checks: i16 = if d.minor.is_some() { 3 } else { 2 };
        p.push(insn(JNE_K, 2, 0, checks + 1, DEV_CHAR));
        p.push(insn(JNE_K, 3, 0, checks, d.major as i32));
        if let Some(minor) = d.minor {
            p.push(insn(JNE_K, 4, 0, 2, minor as i32));
        }
        p.push(insn(MOV64_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV64_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// `bpf(2)` commands and types used here.
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD` (the kernel accepts a prefix).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The fields of `union bpf_attr` for `BPF_PROG_ATTACH`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &T) -> libc::c_long {
    // SAFETY: `attr` is a properly laid out prefix of `union bpf_attr` that outlives the call;
    // the kernel reads `size_of::<T>()` bytes of it.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    }
}

/// Loads the allow-list program and attaches it to the v2 cgroup directory `dir`. The attachment
/// holds the program for as long as the cgroup exists.
pub(crate) fn apply_v2(dir: &Path) -> io::Result<()> {
    let insns = program();
    let mut name = [0u8; 16];
    name[..14].copy_from_slice(b"sandboxd_devcg");
    let load = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"Apache-2.0".as_ptr() as u64,
        prog_name: name,
        expected_attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    let prog = owned(bpf(BPF_PROG_LOAD, &load)).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "loading the device allow-list BPF program: {e} (cgroup v2 needs CONFIG_CGROUP_BPF)"
            ),
        )
    })?;
    let cgroup = fs::File::open(dir)?;
    let attach = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        ..Default::default()
    };
    Errno::result(bpf(BPF_PROG_ATTACH, &attach)).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("attaching the device allow-list to {}: {e}", dir.display()),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel would, for a device of `major:minor`.
    fn allows(major: u32, minor: u32, dev_type: u32) -> bool {
        let p = program();
        let ctx = [dev_type | (6 << 16), major, minor];
        let mut r = [0i64; 5];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1);
                    r[dst] = i64::from(ctx[(i.off / 4) as usize]);
                }
                AND32_K => r[dst] &= i64::from(i.imm),
                JNE_K => {
                    if r[dst] != i64::from(i.imm) {
                        pc += i.off as usize;
                    }
                }
                MOV64_K => r[dst] = i64::from(i.imm),
                EXIT => return r[0] == 1,
                c => panic!("unknown opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_allows_exactly_the_list() {
        for (major, minor) in [
            (1, 3),
            (1, 5),
            (1, 7),
            (1, 8),
            (1, 9),
            (5, 0),
            (5, 2),
            (136, 0),
            (136, 77),
        ] {
            assert!(allows(major, minor, 2), "{major}:{minor}");
            assert!(!allows(major, minor, 1), "block {major}:{minor}");
        }
        for (major, minor) in [
            (1, 1),
            (1, 2),
            (5, 1),
            (4, 0),
            (10, 200),
            (10, 237),
            (7, 0),
            (8, 0),
            (137, 0),
        ] {
            assert!(!allows(major, minor, 2), "{major}:{minor}");
        }
    }

    #[test]
    fn attr_layouts_match_the_kernel() {
        // linux/bpf.h: up to expected_attach_type is 72 bytes; the attach fields 20.
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::size_of::<ProgAttachAttr>(), 20);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
