//! The sandbox's seccomp filter: system calls that widen the kernel surface a sandbox can reach,
//! or act on the host rather than the sandbox, fail with `EPERM` (`ENOSYS` for `clone3`; `sync`,
//! which would flush every filesystem of the host, succeeds without running).
//!
//! What the kernel does here. A seccomp filter is a classic-BPF program the kernel runs on every
//! system call of the process and all its descendants (it survives `fork` and `execve` and can
//! never be removed); it sees the call number, architecture and raw arguments, and answers allow
//! or an errno. Installing one needs `CAP_SYS_ADMIN` in the caller's user namespace or
//! `no_new_privs`. It is installed while the installer still holds `CAP_SYS_ADMIN` over the
//! sandbox's user namespace (the init, just before it clones the payload, which inherits it; the
//! payload itself where it is forked instead, `init.rs`), so `no_new_privs` stays off and setuid
//! programs (`sudo`) keep working inside, where setuid root is the sandbox's root.
//!
//! The program is built with `seccompiler` (rust-vmm, Firecracker's filter compiler) before the
//! sandbox is forked, and installed with the raw `seccomp(2)` call, because seccompiler's own
//! `apply_filter` always sets `no_new_privs`. seccompiler compares the call number with each
//! rule's in turn; a binary search in front of it ([`search`]) answers the calls without
//! conditions, which makes the program cheaper for the kernel to load (once per sandbox).
//!
//! What is denied follows Docker's default profile for a container without `CAP_SYS_ADMIN`,
//! `CAP_SYS_PTRACE`, `CAP_SYS_NICE` and friends, plus the keyring calls the issue names, and it
//! is written as a deny-list: the kernel's own permission checks already refuse everything that
//! needs a capability the sandbox lacks, the filter removes the code paths most container escapes
//! went through. Unknown architectures are killed (seccompiler's check), and x32 system calls
//! (numbers with bit 30 set, same architecture value) fail with `ENOSYS`, so no call can slip past
//! the list under its x32 number. Rules and the reason for each are in [`denied`].
//!
//! Nested user namespaces are denied by default (as Docker does): creating one hands the caller
//! every capability over the new namespaces, which opens the network, mount and BPF code of the
//! kernel to it (most recent container escapes went through exactly that). Tools that sandbox
//! themselves (bubblewrap, Chrome's sandbox) then need their no-sandbox mode. With
//! [`crate::SandboxSpec::nested_userns`], namespace creation, `setns` and the mount calls are
//! allowed; the kernel's checks (capabilities only over the nested namespaces, inherited mounts
//! locked, host-owned cgroup files unwritable) remain the boundary.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::io;

use nix::errno::Errno;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// `clone` flags that create namespaces: mount, cgroup, UTS, IPC, user, pid, net and time.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWTIME) as u64;

/// `AF_VSOCK`: sockets to the hypervisor and other VMs, which no network namespace isolates.
const AF_VSOCK: u64 = 40;

/// `personality` values Docker allows: `PER_LINUX`, `PER_LINUX32`, `UNAME26`, both, and the
/// query `0xffffffff`. Others (e.g. `READ_IMPLIES_EXEC`, `ADDR_NO_RANDOMIZE`) weaken exploit
/// mitigations.
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

/// `open_tree_attr` (Linux 6.15): `open_tree` plus `mount_setattr` in one call; not yet in libc.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// x32 system calls are x86_64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The kernel's `BPF_MAXINSNS`: the longest classic-BPF program it accepts.
const BPF_MAX_INSNS: usize = 4096;

/// System calls denied outright, by group (see the module docs).
fn denied(nested_userns: bool) -> Vec<i64> {
    let mut calls = vec![
        // The kernel keyring is keyed by host uid and not namespaced: no sandbox needs it, and it
        // was a cross-sandbox channel before user namespaces.
        libc::SYS_add_key,
        libc::SYS_keyctl,
        libc::SYS_request_key,
        // Kernel programs, profiling and page-fault handling in user space: large attack surface.
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        // The host's kernel, clock, swap, accounting and log.
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_acct,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_clock_settime,
        libc::SYS_settimeofday,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_lookup_dcookie,
        // Opening files by handle bypasses the mount tree (the "shocker" escape).
        libc::SYS_open_by_handle_at,
        // Watching other processes' files and peeking at other processes (ptrace itself is
        // allowed: the kernel limits it to processes the caller owns).
        libc::SYS_fanotify_init,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
        libc::SYS_process_madvise,
        // NUMA placement of the host's memory.
        libc::SYS_mbind,
        libc::SYS_set_mempolicy,
        libc::SYS_set_mempolicy_home_node,
        libc::SYS_get_mempolicy,
        libc::SYS_move_pages,
        libc::SYS_migrate_pages,
        // Host names belong to the runtime.
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        // Port I/O, and old calls only x86_64 still numbers.
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_nfsservctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
    ]);
    if !nested_userns {
        // Mounting and joining namespaces: root inside lacks CAP_SYS_ADMIN anyway; without a
        // nested user namespace there is nothing these could legitimately do.
        calls.extend([
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fspick,
            libc::SYS_open_tree,
            SYS_OPEN_TREE_ATTR,
            libc::SYS_move_mount,
            libc::SYS_mount_setattr,
            libc::SYS_setns,
        ]);
    }
    calls
}

/// A condition on argument `arg`. `int` arguments (`personality`, `socket`'s domain) compare only
/// their low 32 bits, which is all the kernel reads: a caller passing -1 sign-extended must not
/// slip past a rule written for 0xffffffff.
fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> io::Result<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value).map_err(other)
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("building the seccomp filter: {e}"))
}

fn target() -> io::Result<TargetArch> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(TargetArch::x86_64),
        "aarch64" => Ok(TargetArch::aarch64),
        "riscv64" => Ok(TargetArch::riscv64),
        arch => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("no seccomp filter for the {arch} architecture"),
        )),
    }
}

/// Compiles the sandbox's filter. Allocates: call before `fork`.
///
/// Two parts after the architecture check and the splice ([`splice_after_arch_check`]): a search
/// over the call number ([`search`]) that denies the calls [`denied`] lists and allows every call no
/// rule names, each within a few instructions, and seccompiler's chain of the rules with conditions
/// (`clone`, `unshare`, `socket`, `personality`), where the search sends those four. It answers as
/// seccompiler's program of all the rules ([`build_chain`]) does, for every call and argument (a
/// test holds it); that program is what a search whose jumps would not fit falls back to.
pub(crate) fn build(nested_userns: bool) -> io::Result<BpfProgram> {
    let conditional = conditional_rules(nested_userns)?;
    let mut leaves: BTreeMap<u32, Leaf> = BTreeMap::new();
    for nr in denied(nested_userns) {
        leaves.insert(u32::try_from(nr).map_err(other)?, Leaf::Deny);
    }
    for &nr in conditional.keys() {
        leaves.insert(u32::try_from(nr).map_err(other)?, Leaf::Onward);
    }
    let program = match search(&leaves.into_iter().collect::<Vec<_>>()) {
        Some(search) => {
            let mut program = compile(conditional)?;
            let at = ARCH_CHECK_LEN + SPLICE_LEN;
            program.splice(at..at, search);
            program
        }
        None => build_chain(nested_userns)?,
    };
    if program.len() > BPF_MAX_INSNS {
        return Err(other(format!(
            "{} instructions, over the kernel's limit",
            program.len()
        )));
    }
    Ok(program)
}

/// seccompiler's program of every rule, [`denied`] and [`conditional_rules`], each compared with
/// the call number in turn: the reference [`build`]'s program answers as.
fn build_chain(nested_userns: bool) -> io::Result<BpfProgram> {
    let mut rules = conditional_rules(nested_userns)?;
    for nr in denied(nested_userns) {
        rules.entry(nr).or_default();
    }
    compile(rules)
}

/// The rules with conditions on arguments, by call number.
fn conditional_rules(nested_userns: bool) -> io::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions).map_err(other);
    if !nested_userns {
        // `clone` and `unshare` are fine without namespace flags (threads, CLONE_FILES...): one
        // rule per flag, any of which denies.
        for nr in [libc::SYS_clone, libc::SYS_unshare] {
            let any_ns: Vec<SeccompRule> = (0..64)
                .map(|bit| 1u64 << bit)
                .filter(|flag| NAMESPACE_FLAGS & flag != 0)
                .map(|flag| {
                    rule(vec![cond(
                        0,
                        SeccompCmpArgLen::Qword,
                        SeccompCmpOp::MaskedEq(flag),
                        flag,
                    )?])
                })
                .collect::<io::Result<_>>()?;
            rules.insert(nr, any_ns);
        }
    }
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            AF_VSOCK,
        )?])?],
    );
    rules.insert(
        libc::SYS_personality,
        vec![rule(
            PERSONALITIES
                .iter()
                .map(|p| cond(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, *p))
                .collect::<io::Result<_>>()?,
        )?],
    );
    Ok(rules)
}

/// seccompiler's program of `rules` (a rule that matches: `EPERM`; none: allowed), with the splice.
fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> io::Result<BpfProgram> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        target()?,
    )
    .map_err(other)?;
    let mut program: BpfProgram = filter.try_into().map_err(other)?;
    // clone3 passes its flags in memory, which seccomp cannot read: answer ENOSYS so the C
    // library falls back to clone, whose flags the rules above see (Docker does the same). A
    // second action needs a second filter body, so it is spliced in right after the
    // architecture check, with the x32 guard.
    splice_after_arch_check(&mut program);
    Ok(program)
}

/// The seccomp program every sandbox gets, for tools and benchmarks that assemble a sandbox by
/// hand (install it with `seccomp(SECCOMP_SET_MODE_FILTER, 0, ...)`). See the module docs.
pub fn seccomp_filter(nested_userns: bool) -> io::Result<BpfProgram> {
    build(nested_userns)
}

/// Length of seccompiler's architecture check at the start of every program (load arch, compare,
/// kill).
const ARCH_CHECK_LEN: usize = 3;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Length of the block [`splice_after_arch_check`] inserts.
#[cfg(target_arch = "x86_64")]
const SPLICE_LEN: usize = 7;
#[cfg(not(target_arch = "x86_64"))]
const SPLICE_LEN: usize = 5;

/// `BPF_JMP | BPF_JA`.
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
/// `BPF_RET | BPF_K`.
const BPF_RET_K: u16 = 0x06;

/// What [`search`] does with a call number a rule names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    /// `EPERM`, as seccompiler's rule without conditions answers.
    Deny,
    /// On to the instruction after the search: the chain of the rules with conditions.
    Onward,
}

/// A binary search over the call number (in the accumulator, as the splice leaves it), `named`
/// sorted by number: each named number gets its [`Leaf`], every other is allowed. ~8 instructions
/// for any number, where seccompiler's chain compares a number with each rule's in turn (two to
/// five instructions a rule, ~150 to allow a call).
///
/// Why: since Linux 5.11 loading a filter has the kernel run it, emulated, for every call number
/// of every architecture it knows, to cache the numbers it always allows (`seccomp_cache_prepare`,
/// interrupts off), and the kernel translates and compiles every instruction; a load was ~190 µs
/// of CPU with the chain alone, ~78 with this (in a fresh child, `docs/benchmarks.md`), one a
/// sandbox. At run time too, a call the cache does not answer takes the short path.
///
/// Laid out in preorder: a node `jge m` falls through to its lower half and jumps over it to its
/// upper one; a half with one named number is `jeq n` (its leaf, else allow); one with none is
/// `ret ALLOW`. None when a jump over a lower half would not fit in the 8 bits BPF gives it.
fn search(named: &[(u32, Leaf)]) -> Option<Vec<sock_filter>> {
    fn emit(
        named: &[(u32, Leaf)],
        out: &mut Vec<sock_filter>,
        onward: &mut Vec<usize>,
    ) -> Option<()> {
        match named {
            [] => out.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW)),
            [(nr, leaf)] => {
                out.push(jump(BPF_JMP_JEQ_K, *nr, 0, 1));
                match leaf {
                    Leaf::Deny => out.push(stmt(
                        BPF_RET_K,
                        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                    )),
                    Leaf::Onward => {
                        onward.push(out.len());
                        out.push(stmt(BPF_JMP_JA, 0)); // its offset is set once the end is known
                    }
                }
                out.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW));
            }
            _ => {
                let mid = named.len() / 2;
                let node = out.len();
                out.push(jump(BPF_JMP_JGE_K, named[mid].0, 0, 0));
                emit(&named[..mid], out, onward)?;
                out[node].jt = u8::try_from(out.len() - node - 1).ok()?;
                emit(&named[mid..], out, onward)?;
            }
        }
        Some(())
    }
    let mut out = Vec::new();
    let mut onward = Vec::new();
    emit(named, &mut out, &mut onward)?;
    let end = out.len();
    for at in onward {
        out[at].k = u32::try_from(end - at - 1).ok()?;
    }
    Some(out)
}

/// Inserts, after the architecture check: load the call number; x32 number → `ENOSYS`;
/// `clone3` → `ENOSYS`; `sync` → 0, not run. Jumps in the rest of the program are relative, so they stay valid.
fn splice_after_arch_check(program: &mut BpfProgram) {
    /// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
    const BPF_LD_W_ABS: u16 = 0x20;
    #[cfg(target_arch = "x86_64")]
    const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
    /// `offsetof(struct seccomp_data, nr)`.
    const NR_OFFSET: u32 = 0;
    let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    let mut block = vec![stmt(BPF_LD_W_ABS, NR_OFFSET)];
    #[cfg(target_arch = "x86_64")]
    {
        // if (nr & X32_SYSCALL_BIT) return ENOSYS;
        block.push(jump(BPF_JMP_JSET_K, X32_SYSCALL_BIT, 0, 1));
        block.push(stmt(BPF_RET_K, enosys));
    }
    // if (nr == clone3) return ENOSYS;
    block.push(jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1));
    block.push(stmt(BPF_RET_K, enosys));
    // if (nr == sync) return 0, without running it. sync(2) is not namespaced: it writes back and
    // flushes every filesystem on the host, so a loop of `sync` in one sandbox made the host's
    // disk flush its cache ~14-28 times a call (measured: 5,626 flushes for 200 calls), against
    // everyone's I/O. The sandbox's own data needs no such call: its disk has no write barriers
    // (disk.rs) and reaches its image by writeback, at `syncfs`/`fsync` (still allowed: they act
    // on one filesystem) or at the end; the runtime syncs what it keeps. sync(2) cannot fail, so
    // success is the only answer a program can expect.
    block.push(jump(BPF_JMP_JEQ_K, libc::SYS_sync as u32, 0, 1));
    block.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO));
    debug_assert_eq!(block.len(), SPLICE_LEN);
    let at = ARCH_CHECK_LEN.min(program.len());
    program.splice(at..at, block);
}

/// Installs `program` on the calling thread (and, through inheritance, every process it starts).
/// Needs `CAP_SYS_ADMIN` in the caller's user namespace (or `no_new_privs`, which this never
/// sets). Async-signal-safe: the program was built before the fork.
pub(crate) fn install(program: &[sock_filter]) -> Result<(), Errno> {
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // Raw (`raw.rs`): the init installs it too, while the payload, sharing its memory, runs.
    // SAFETY: the kernel copies the program (`len` instructions at `filter`, which outlive the
    // call); seccompiler's sock_filter has the kernel's layout (repr(C) u16, u8, u8, u32).
    let r = unsafe {
        crate::raw::call(
            libc::SYS_seccomp,
            &[
                libc::SECCOMP_SET_MODE_FILTER as usize,
                0,
                std::ptr::from_ref(&fprog) as usize,
            ],
        )
    };
    r.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic-BPF seccomp program on `seccomp_data` {nr, arch, ip = 0, args}: its answer,
    /// and how many instructions it ran. Knows the instructions these programs hold; any other
    /// fails the test.
    fn run(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> (u32, usize) {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for a in args {
            data.extend_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = &program[pc];
            steps += 1;
            pc += 1;
            let taken = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
            match i.code {
                0x20 => {
                    let at = i.k as usize;
                    a = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
                }
                0x54 => a &= i.k,
                0x05 => pc += i.k as usize,
                0x15 => pc += taken(a == i.k),
                0x25 => pc += taken(a > i.k),
                0x35 => pc += taken(a >= i.k),
                0x45 => pc += taken(a & i.k != 0),
                0x06 => return (i.k, steps),
                code => panic!("instruction {code:#x} at {}", pc - 1),
            }
        }
    }

    /// Every call number the test tries: all the low ones, their x32 twins, and the extremes.
    fn numbers() -> Vec<u32> {
        let mut nrs: Vec<u32> = (0..=600).collect();
        nrs.extend((0..=600).map(|nr| nr | 0x4000_0000));
        nrs.extend([0x3fff_ffff, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 20]);
        nrs
    }

    /// First arguments that reach every rule's condition: each bit alone, the namespace flags
    /// together and with thread flags, socket families (`AF_VSOCK` with high bits set too), and
    /// allowed and refused personalities.
    fn first_arguments() -> Vec<u64> {
        let mut args: Vec<u64> = (0..64).map(|bit| 1u64 << bit).collect();
        args.extend([
            0,
            u64::MAX,
            NAMESPACE_FLAGS,
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_THREAD) as u64,
            (libc::CLONE_VM | libc::CLONE_NEWNET) as u64,
            AF_VSOCK,
            AF_VSOCK | 1 << 32,
            2,
            10,
            0x0400_0000,
            0xffff_ffff,
            0x1_0000_0008,
        ]);
        args.extend(PERSONALITIES);
        args
    }

    #[test]
    fn the_search_answers_as_the_chain_for_every_call_and_argument() {
        let arches = [0xc000_003e, 0x4000_0003, 0xc000_00b7, 0];
        for nested in [false, true] {
            let chain = build_chain(nested).unwrap();
            let full = build(nested).unwrap();
            assert!(full.len() < chain.len(), "the search was not spliced in");
            for nr in numbers() {
                for arch in arches {
                    for first in first_arguments() {
                        let args = [first, 0, 0, 0, 0, 0];
                        assert_eq!(
                            run(&full, nr, arch, args).0,
                            run(&chain, nr, arch, args).0,
                            "nested {nested}, nr {nr:#x}, arch {arch:#x}, arg0 {first:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_call_without_conditions_is_answered_within_a_few_instructions() {
        // What the kernel's cache of always-allowed calls emulates, once per number and load:
        // every call but the four with conditions, allowed or denied.
        for nested in [false, true] {
            let chain = build_chain(nested).unwrap();
            let full = build(nested).unwrap();
            let named: Vec<u32> = conditional_rules(nested)
                .unwrap()
                .keys()
                .map(|&nr| nr as u32)
                .collect();
            let arch = if cfg!(target_arch = "x86_64") {
                0xc000_003e
            } else {
                0xc000_00b7
            };
            let (mut before, mut after) = (0, 0);
            for nr in (0..=600u32).filter(|nr| !named.contains(nr)) {
                let (_, steps) = run(&full, nr, arch, [0; 6]);
                assert!(steps <= 24, "nr {nr}: {steps} instructions");
                after += steps;
                before += run(&chain, nr, arch, [0; 6]).1;
            }
            assert!(after * 5 < before, "{after} vs {before} instructions");
        }
    }

    #[test]
    fn filters_compile_within_the_kernel_limit() {
        for nested in [false, true] {
            let p = build(nested).unwrap();
            assert!(p.len() < BPF_MAX_INSNS, "{}", p.len());
            // The splice sits right after the architecture check.
            assert_eq!(p[ARCH_CHECK_LEN].code, 0x20);
        }
        assert!(build(true).unwrap().len() < build(false).unwrap().len());
    }

    #[test]
    fn sock_filter_has_the_kernel_layout() {
        assert_eq!(
            std::mem::size_of::<sock_filter>(),
            std::mem::size_of::<libc::sock_filter>()
        );
    }
}
