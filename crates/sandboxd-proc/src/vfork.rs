//! Starting a child without copying our address space: `clone(CLONE_VM | CLONE_VFORK | SIGCHLD)`,
//! as glibc's and musl's `posix_spawn` and Go's `syscall.forkExec` do.
//!
//! # Why
//!
//! `std::process::Command` with a `pre_exec` hook (which we needed for `setsid`, `TIOCSCTTY`, the
//! user switch and `oom_score_adj`) starts a child with a full `fork()`: the kernel copies the page
//! tables of the whole agent (a ~40 MB Python process), tears the copy down again at `execve`, and
//! leaves every private page write-protected, so the agent then takes a copy-on-write fault on the
//! first write to each. Those costs grow with the agent's memory; a `CLONE_VM` child has none of
//! them, which is why std itself uses `posix_spawn` whenever it can (no `pre_exec`, no uid/gid).
//! `posix_spawn` cannot make a controlling terminal, switch groups or write `oom_score_adj`, so
//! we do what it does inside, with those steps added.
//!
//! `examples/spawn_cost.rs` (release build, 2-core VM shared with other benchmarks): `/bin/true`
//! started 2000 times per path from a process holding 64 MiB (two runs) or 100 MiB (one run) of
//! written heap, the paths interleaved; p50 in µs of the spawn call, of spawn to exit status
//! (through the reader thread and [`End`](crate::End) for ours), and of rewriting 16 MiB of that
//! heap afterwards (one byte a page):
//!
//! | path | spawn, 64 MiB | to exit, 64 MiB | rewrite 16 MiB | spawn, 100 MiB | to exit, 100 MiB |
//! |---|--:|--:|--:|--:|--:|
//! | `Command`, no `pre_exec` (std's `posix_spawn`: the floor) | 140–170 | 600–690 | 36–40 | 160–210 | 650–790 |
//! | `Command` with an empty `pre_exec` (`fork`) | 2860–4300 | 3290–4730 | 3070–3270 | 5590–6120 | 6070–6650 |
//! | this crate, pipes, before (`Command` + `pre_exec`) | 2920–3840 | 3360–4390 | 3070–3190 | 6120 | 6750 |
//! | this crate, pipes (`clone(CLONE_VM \| CLONE_VFORK)`) | 230–250 | 740–830 | 40 | 245 | 748 |
//! | this crate, PTY | 210–225 | 710–775 | 40 | 206 | 706 |
//!
//! So a start no longer depends on the agent's size, and the copy-on-write faults after it (as
//! much again as the fork itself, when the agent touches its heap) are gone. What remains above
//! the floor, 60–80 µs, is not the clone: the reader thread (~13 µs to start), the password
//! database lookup for `HOME`/`USER` (~16 µs), a third pipe and the stack mapping. p99s follow the
//! floor's in each run (0.35–0.5 ms on a quiet machine, several ms under others' load). From
//! CPython (3.11, ~36 MB heap), `sandboxd._core.Process.spawn` with the agent's arguments went
//! from 2.8 ms to 0.19 ms, and spawn to end from 3.3 ms to 0.73 ms, as fast as `subprocess.run`
//! (which also uses `vfork`).
//!
//! # How
//!
//! `CLONE_VM` makes the child run in our memory, on a stack of its own ([`STACK_BYTES`], with a
//! guard page below it), so the kernel copies no page tables, tears none down at `execve`, and
//! leaves none of our pages write-protected. `CLONE_VFORK` suspends the calling thread until the
//! child has called `execve` (its own, fresh address space from then on) or exited, so while the
//! child runs the memory it reads cannot change under it, and the stack is free again as soon as
//! `clone` returns: it is kept for the next spawn ([`SPARE_STACKS`]) rather than unmapped. Our other threads keep running. Without
//! `CLONE_FILES`, `CLONE_FS` and `CLONE_SIGHAND` the child gets its own copies of the descriptor
//! table, the working directory and the signal dispositions, so changing them changes nothing of
//! ours; and because of `CLONE_VFORK` the kernel keeps the child's `oom_score_adj` to itself
//! (for a `CLONE_VM` child without it, a write would reach every process sharing the memory).
//!
//! The child shares our heap with our other threads, which may hold the allocator's locks or be
//! rewriting anything at any moment. So between `clone` and `execve` it runs only [`Plan::run`]:
//! raw system calls through their thin libc wrappers, on data the parent prepared in a [`Plan`]
//! (`CString`s, NULL-terminated `argv`/`envp` arrays, descriptors, a ready `sigset_t`). It
//! allocates nothing, takes no lock, cannot panic, and writes to our memory only its own stack,
//! the calling thread's `errno` (the child runs with that thread's TLS; nothing in the parent
//! reads `errno` after a successful `clone`) and, on failure, the [`Report`] the parent reads once
//! `clone` has returned, before the child is reaped. `setgroups`/`setgid`/`setuid` are made with
//! `syscall(2)`: glibc's wrappers, in a multi-threaded process, signal every thread of the parent
//! (which the child believes it still is) to change their credentials too.
//!
//! Signals. A handler of ours (CPython installs several) must never run in the child: it would
//! run on our heap. The parent blocks every signal around `clone` (glibc's two internal ones
//! cannot be blocked, but are only ever sent to our own threads' ids), the child inherits that
//! mask, resets every handled signal to `SIG_DFL` first thing (with raw `rt_sigaction`: glibc's
//! `sigaction` cannot reach its own two), and unblocks everything just before
//! `execve`, leaving the child the empty mask it always had. It also resets every ignored signal to
//! its default: ignored dispositions survive `execve`, CPython and Rust ignore `SIGPIPE` (and CPython
//! `SIGXFSZ`), and whatever started the agent may have left others ignored (`nohup`: `SIGHUP`; a
//! shell without job control, for a background job: `SIGINT` and `SIGQUIT`). The agent keeps those
//! (`nohup` is there so that it survives a hang-up); a command starts with every signal at its
//! default, as on a freshly booted machine (envd's, under systemd).
//!
//! Errors come back through shared memory rather than a close-on-exec pipe: the child writes the
//! step and errno into the [`Report`] and exits with status 127; `CLONE_VFORK` guarantees the
//! write is done when `clone` returns, and the parent then reaps the child (glibc's `posix_spawn`
//! does the same). A child that execs never writes it.
//!
//! The order in the child: signal handlers first; `dup2` of the prepared descriptors onto 0, 1
//! and 2 (they are all above 2 and close-on-exec); every other descriptor marked close-on-exec
//! with `close_range(3, ~0, CLOSE_RANGE_CLOEXEC)` (see [`INHERITED`]); `setsid` (new
//! session and process group); for a PTY, `TIOCSCTTY` on fd 0; the `oom_score_adj` write (before
//! switching user: as root any value is allowed, and after `setuid` the file may belong to root);
//! `setgroups`, `setgid`, `setuid`; `chdir`; the signal mask; and `execve` on each candidate path
//! in turn, as `execvp` does it (see [`Plan::exec`]).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_long, c_void};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

// The raw `setuid`/`setgid`/`setgroups` numbers take 32-bit ids, and `NSIG` is 65, on 64-bit
// Linux; 32-bit targets would need the `*32` system calls.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("vfork.rs supports 64-bit Linux only");

/// The child's stack. It holds [`Plan::run`]'s few small frames and those of the libc wrappers
/// it calls (two kernel `struct sigaction` are the largest locals); 64 KiB leaves ample room, and only
/// the pages touched are ever backed by memory.
const STACK_BYTES: usize = 64 * 1024;

/// Stacks kept mapped for later spawns once their child has exec'd: 4, more than the spawns that
/// ever run at once here (the agent spawns from its event loop). Mapping a stack for each spawn
/// cost an `mmap`, an `mprotect`, page faults on the pages the child touched and an `munmap`, whose
/// TLB shoot-down interrupts the other CPUs (the `munmap` alone: 3 % of the agent's own CPU
/// samples, perf, in a loop of `Start /bin/true`; more than the reader thread's clone). A kept
/// stack is 68 KiB of address space and the few pages the child touched.
const SPARE_STACKS: usize = 4;

/// The stacks kept for reuse (see [`SPARE_STACKS`]); each is used by one child at a time: taken
/// before `clone`, given back after it returned.
static SPARES: Mutex<Vec<Stack>> = Mutex::new(Vec::new());

/// The first descriptor a command must not inherit. Ours are all close-on-exec, but a process
/// embedding the agent may have been started with descriptors that are not (an orchestrator's
/// socket, a launcher's pipe): the command gets 0, 1 and 2 only, as `subprocess`'s `close_fds`
/// gives. Marked close-on-exec rather than closed, so nothing the child still needs before
/// `execve` goes; on a kernel without `close_range` (before 5.11) they are left as they were.
const INHERITED: c_long = 3;

/// One past the highest signal number: the kernel's `_NSIG` (64 signals) on x86-64 and arm64.
const NSIG: c_int = 65;

/// The shell `execvp` runs a file with when the kernel does not recognise its format (`ENOEXEC`:
/// a script without `#!`).
const SHELL: &CStr = c"/bin/sh";

/// Where the `oom_score_adj` write goes; in the child, `self` is the child.
const OOM_SCORE_ADJ: &CStr = c"/proc/self/oom_score_adj";

/// Exit status of a child that failed before `execve`, as a shell's "command not found".
const FAILED_STATUS: c_int = 127;

/// What to run: built by the caller, turned into a [`Plan`] here.
pub(crate) struct Exec {
    /// The paths to try (from [`crate::lookup::candidates`]), or the errno `execvp` fails with
    /// before trying any.
    pub(crate) candidates: Result<Vec<CString>, c_int>,
    /// `argv`, program name first.
    pub(crate) argv: Vec<CString>,
    /// `envp`, as `KEY=value` strings.
    pub(crate) envp: Vec<CString>,
}

/// Credentials to switch to in the child.
pub(crate) struct Creds {
    /// Supplementary groups.
    pub(crate) groups: Vec<libc::gid_t>,
    /// Group id.
    pub(crate) gid: libc::gid_t,
    /// User id.
    pub(crate) uid: libc::uid_t,
}

/// How to set the child up before `execve`.
pub(crate) struct Setup<'a> {
    /// Descriptors to become the child's 0, 1 and 2. Each must be above 2 (so that no `dup2` can
    /// overwrite another's source) and close-on-exec (so it is not inherited twice).
    pub(crate) stdio: [BorrowedFd<'a>; 3],
    /// Make the terminal on fd 0 the controlling terminal (`TIOCSCTTY`), for a PTY.
    pub(crate) controlling_tty: bool,
    /// Written to `/proc/self/oom_score_adj`; a failed write is ignored.
    pub(crate) oom_score_adj: Option<i32>,
    /// Switch to these credentials.
    pub(crate) creds: Option<Creds>,
    /// Change to this directory.
    pub(crate) cwd: Option<CString>,
}

/// The step of the child's setup that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Unblocking signals.
    SignalMask = 1,
    /// `dup2` onto 0, 1 or 2.
    Stdio,
    /// `setsid`.
    Setsid,
    /// `TIOCSCTTY`.
    ControllingTty,
    /// `setgroups`.
    Setgroups,
    /// `setgid`.
    Setgid,
    /// `setuid`.
    Setuid,
    /// `chdir`.
    Chdir,
    /// `execve` of every candidate.
    Exec,
}

impl Step {
    const ALL: [Step; 9] = [
        Step::SignalMask,
        Step::Stdio,
        Step::Setsid,
        Step::ControllingTty,
        Step::Setgroups,
        Step::Setgid,
        Step::Setuid,
        Step::Chdir,
        Step::Exec,
    ];

    fn from_raw(raw: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|&step| step as u32 == raw)
    }
}

/// Why a spawn failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No child was created (`clone` or mapping its stack failed).
    Clone(io::Error),
    /// The child failed at `step` with `errno`, and has been reaped.
    Child {
        /// What failed.
        step: Step,
        /// Its errno.
        errno: c_int,
    },
}

/// Starts a child that sets itself up as `setup` says and executes `exec`. Returns its pid once
/// it has called `execve` successfully; it is then ours to reap.
pub(crate) fn spawn(exec: Exec, setup: Setup<'_>) -> Result<libc::pid_t, Failure> {
    let plan = Plan::new(exec, setup);
    let stack = Stack::take().map_err(Failure::Clone)?;
    let report = Report::default();
    let child = Child {
        plan: &plan,
        report: &report,
    };
    let pid = {
        let _blocked = BlockedSignals::all();
        // SAFETY: `child_main` runs on `stack`, which is mapped, writable and unused by anything
        // else until `clone` returns (taken from the spares, given back only after that); its top is page-aligned, so 16-byte
        // aligned as both ABIs want. `CLONE_VFORK` keeps this thread (and so `plan`, `report` and
        // `stack`, which nothing else references) here until the child has exec'd or exited, so
        // everything `child` points to outlives the child's use of it. The child only does what
        // the module docs allow (see `Plan::run`). Every signal is blocked (`_blocked`), so none
        // of our handlers can run in the child before it resets them.
        let pid = unsafe {
            libc::clone(
                child_main,
                stack.top(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                ptr::from_ref(&child).cast_mut().cast(),
            )
        };
        if pid < 0 {
            return Err(Failure::Clone(io::Error::last_os_error()));
        }
        pid
    };
    stack.give_back();
    match report.failure() {
        None => Ok(pid),
        Some((step, errno)) => {
            // It has exited (status 127); do not leave a zombie.
            let _ = crate::reap::reap(pid);
            Err(Failure::Child { step, errno })
        }
    }
}

/// Where the child says what failed. Written by the child only, before it exits; read by the
/// parent only after `clone` has returned, which `CLONE_VFORK` orders after that write.
#[derive(Default)]
struct Report {
    /// A [`Step`], or 0 when nothing failed (the child exec'd).
    step: AtomicU32,
    /// The errno of that step.
    errno: AtomicI32,
}

impl Report {
    fn fail(&self, step: Step, errno: c_int) {
        self.errno.store(errno, Ordering::Relaxed);
        self.step.store(step as u32, Ordering::Release);
    }

    fn failure(&self) -> Option<(Step, c_int)> {
        let step = Step::from_raw(self.step.load(Ordering::Acquire))?;
        Some((step, self.errno.load(Ordering::Relaxed)))
    }
}

/// What `clone` hands the child.
struct Child<'a> {
    plan: &'a Plan,
    report: &'a Report,
}

/// The child's entry point, on its own stack, in our memory.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&Child` that `spawn` passed to `clone`, alive (its thread is
    // suspended) until this process execs or exits.
    let child = unsafe { &*arg.cast::<Child<'_>>() };
    let (step, errno) = child.plan.run();
    child.report.fail(step, errno);
    // SAFETY: `_exit` is `exit_group(2)`: no atexit handlers, no stdio flushing, nothing that
    // would touch our memory.
    unsafe { libc::_exit(FAILED_STATUS) }
}

/// Everything the child reads, prepared in the parent. Not changed after [`Plan::new`]: the
/// pointer arrays point into the `CString`s it owns (whose heap buffers do not move).
struct Plan {
    /// The paths to `execve`, in order; empty when `lookup_errno` says why.
    candidates: Vec<CString>,
    /// The errno when there is no candidate.
    lookup_errno: c_int,
    /// Owns the strings `argv` points to.
    _args: Vec<CString>,
    /// Owns the strings `envp` points to.
    _env: Vec<CString>,
    /// NULL-terminated `argv`.
    argv: Vec<*const c_char>,
    /// NULL-terminated `envp`.
    envp: Vec<*const c_char>,
    /// For each candidate, the `argv` of running it with [`SHELL`] (`execvp`'s `ENOEXEC` case):
    /// the shell, the candidate, then `argv[1..]`.
    script_argvs: Vec<Vec<*const c_char>>,
    stdio: [RawFd; 3],
    controlling_tty: bool,
    /// `oom_score_adj` as written: an ASCII number and a newline.
    oom_score_adj: Option<Vec<u8>>,
    creds: Option<Creds>,
    cwd: Option<CString>,
    /// The empty signal set, the child's mask at `execve`.
    empty_mask: libc::sigset_t,
}

impl Plan {
    fn new(exec: Exec, setup: Setup<'_>) -> Plan {
        debug_assert!(setup.stdio.iter().all(|fd| fd.as_raw_fd() > 2));
        let (candidates, lookup_errno) = match exec.candidates {
            Ok(candidates) => (candidates, 0),
            Err(errno) => (Vec::new(), errno),
        };
        let argv = null_terminated(exec.argv.iter().map(|arg| arg.as_ptr()));
        let envp = null_terminated(exec.envp.iter().map(|var| var.as_ptr()));
        let script_argvs = candidates
            .iter()
            .map(|path| {
                let args = exec.argv.iter().skip(1).map(|arg| arg.as_ptr());
                null_terminated([SHELL.as_ptr(), path.as_ptr()].into_iter().chain(args))
            })
            .collect();
        let mut empty_mask = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given, which is valid for writes.
        let empty_mask = unsafe {
            libc::sigemptyset(empty_mask.as_mut_ptr());
            empty_mask.assume_init()
        };
        Plan {
            candidates,
            lookup_errno,
            _args: exec.argv,
            _env: exec.envp,
            argv,
            envp,
            script_argvs,
            stdio: setup.stdio.map(|fd| fd.as_raw_fd()),
            controlling_tty: setup.controlling_tty,
            oom_score_adj: setup
                .oom_score_adj
                .map(|adj| format!("{adj}\n").into_bytes()),
            creds: setup.creds,
            cwd: setup.cwd,
            empty_mask,
        }
    }

    /// In the child: sets it up and execs. Returns only on failure, with the step and errno.
    ///
    /// Async-signal-safe and allocation-free; it reads only `self` and writes only its stack and
    /// `errno` (see the module docs).
    fn run(&self) -> (Step, c_int) {
        reset_signal_handlers();
        for (target, &fd) in (0..).zip(&self.stdio) {
            // SAFETY: dup2 only changes our (the child's own) descriptor table.
            if unsafe { libc::dup2(fd, target) } < 0 {
                return (Step::Stdio, errno());
            }
        }
        // SAFETY: close_range takes integers and changes only the child's own descriptor table
        // (no CLONE_FILES). Its failure (a kernel before 5.11) is ignored: see INHERITED.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                INHERITED,
                c_long::from(u32::MAX),
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        // SAFETY: setsid takes no arguments and touches no memory.
        if unsafe { libc::setsid() } < 0 {
            return (Step::Setsid, errno());
        }
        // SAFETY: TIOCSCTTY takes an integer (0: do not steal a terminal from another session)
        // and touches no memory of ours.
        if self.controlling_tty && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return (Step::ControllingTty, errno());
        }
        if let Some(adj) = &self.oom_score_adj {
            write_oom_score_adj(adj);
        }
        if let Some(creds) = &self.creds {
            // SAFETY: raw setgroups(2) reads `groups.len()` gids from the live vector; raw
            // setgid(2)/setuid(2) take integers. They change only this (single-threaded) child.
            unsafe {
                let groups = creds.groups.as_ptr();
                let count = creds.groups.len() as c_long;
                if libc::syscall(libc::SYS_setgroups, count, groups) < 0 {
                    return (Step::Setgroups, errno());
                }
                if libc::syscall(libc::SYS_setgid, c_long::from(creds.gid)) < 0 {
                    return (Step::Setgid, errno());
                }
                if libc::syscall(libc::SYS_setuid, c_long::from(creds.uid)) < 0 {
                    return (Step::Setuid, errno());
                }
            }
        }
        if let Some(cwd) = &self.cwd {
            // SAFETY: `cwd` is a NUL-terminated string owned by the plan.
            if unsafe { libc::chdir(cwd.as_ptr()) } < 0 {
                return (Step::Chdir, errno());
            }
        }
        // SAFETY: `empty_mask` is an initialised set; the old mask is not asked for.
        if unsafe { libc::sigprocmask(libc::SIG_SETMASK, &self.empty_mask, ptr::null_mut()) } < 0 {
            return (Step::SignalMask, errno());
        }
        (Step::Exec, self.exec())
    }

    /// In the child: `execve` on each candidate in turn, exactly as glibc's `execvp` does. A file
    /// the kernel cannot run as it is (`ENOEXEC`) is run with [`SHELL`]. `EACCES`, `ENOENT`,
    /// `ESTALE`, `ENOTDIR`, `ENODEV` and `ETIMEDOUT` mean "not here" and move on to the next;
    /// any other error is returned at once. When none ran, the result is `EACCES` if any
    /// candidate gave it, else the last errno. Returns only on failure.
    fn exec(&self) -> c_int {
        let mut last = self.lookup_errno;
        let mut denied = false;
        for (path, script_argv) in self.candidates.iter().zip(&self.script_argvs) {
            // SAFETY: `path` and every pointer in the NULL-terminated `argv`/`envp` arrays point
            // to NUL-terminated strings owned by the plan.
            unsafe { libc::execve(path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
            last = errno();
            if last == libc::ENOEXEC {
                // SAFETY: as above, with the script argv built for this candidate.
                unsafe { libc::execve(SHELL.as_ptr(), script_argv.as_ptr(), self.envp.as_ptr()) };
                last = errno();
            }
            match last {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ESTALE | libc::ENOTDIR | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return last,
            }
        }
        if denied { libc::EACCES } else { last }
    }
}

/// A NULL-terminated array of C string pointers.
fn null_terminated(strings: impl Iterator<Item = *const c_char>) -> Vec<*const c_char> {
    strings.chain([ptr::null()]).collect()
}

/// The calling thread's errno.
fn errno() -> c_int {
    nix::errno::Errno::last_raw()
}

/// The kernel's `struct sigaction` (x86-64 and arm64 alike: handler, flags, restorer, mask), as
/// the raw `rt_sigaction` system call takes it; glibc's own `struct sigaction` is laid out
/// differently (its mask is 128 bytes, and its flags come after it).
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: u64,
    /// Only read with `SA_RESTORER`, which setting `SIG_DFL` does not need.
    restorer: usize,
    mask: u64,
}

/// The size of the kernel's signal set, `rt_sigaction`'s last argument: 64 signals, 8 bytes.
const KERNEL_SIGSET_BYTES: c_long = 8;

/// Sets `signal` to `SIG_DFL` when it has a handler or is ignored (`all`) or only when it is
/// ignored (`!all`); the kernel refuses `SIGKILL` and `SIGSTOP` and this skips them.
/// Async-signal-safe: two raw `rt_sigaction` calls on the stack's memory.
///
/// Made with `syscall(2)` rather than glibc's `sigaction`, which refuses (`EINVAL`) glibc's own
/// two signals, 32 and 33 (`SIGCANCEL` and `SIGSETXID`): glibc's `posix_spawn` sets them to
/// `SIG_IGN` in its child when the parent had handlers for them, and an ignored disposition
/// survives `execve`, so everything a posix_spawn parent starts (GNU make 4.3's recipes, and so
/// a runtime or agent started from a Makefile) ignores them, and would pass that on to every
/// command. glibc in the command installs its handlers for them when it needs them; anything
/// else (a static or Go binary) would see them ignored.
fn default_if_set(signal: c_int, all: bool) {
    let mut current = MaybeUninit::<KernelSigaction>::uninit();
    // SAFETY: rt_sigaction with a NULL `act` changes nothing and writes the current disposition
    // into `current`, valid for writes of a kernel `struct sigaction`.
    let read = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            c_long::from(signal),
            ptr::null::<KernelSigaction>(),
            current.as_mut_ptr(),
            KERNEL_SIGSET_BYTES,
        )
    };
    if read != 0 {
        return;
    }
    // SAFETY: rt_sigaction succeeded, so it initialised `current`.
    let handler = unsafe { current.assume_init_ref() }.handler;
    if handler == libc::SIG_IGN || (all && handler != libc::SIG_DFL) {
        let default = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        // SAFETY: `default` is a valid kernel disposition that outlives the call; the old one is
        // not asked for. It changes only the calling process's table (see the callers).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                c_long::from(signal),
                &default,
                ptr::null_mut::<KernelSigaction>(),
                KERNEL_SIGSET_BYTES,
            )
        };
    }
}

/// In the child: sets every signal that has a handler or is ignored to `SIG_DFL`, glibc's
/// internal two included (see [`default_if_set`]). The child's table is its own copy (no
/// `CLONE_SIGHAND`), so ours is unchanged.
fn reset_signal_handlers() {
    for signal in 1..NSIG {
        default_if_set(signal, true);
    }
}

/// glibc's internal signals (32: `SIGCANCEL`, 33: `SIGSETXID`), which its `sigaction` (and so
/// Python's `signal` module) cannot reach.
const GLIBC_INTERNAL_SIGNALS: [c_int; 2] = [32, 33];

/// Sets glibc's two internal signals back to `SIG_DFL` in the calling process when they are
/// ignored (inherited from a `posix_spawn` parent; see [`default_if_set`]); a handler glibc
/// installed for them is left alone. For a process whose children are not started through this
/// module (the runtime's zygote forks each sandbox's agent, and the agent's own `subprocess`
/// children would inherit them).
pub fn default_ignored_glibc_signals() {
    for signal in GLIBC_INTERNAL_SIGNALS {
        default_if_set(signal, false);
    }
}

/// In the child: writes `value` to `/proc/self/oom_score_adj`, ignoring failure (no procfs, or
/// not permitted), as envd does.
fn write_oom_score_adj(value: &[u8]) {
    // SAFETY: `OOM_SCORE_ADJ` is a NUL-terminated static string.
    let fd = unsafe { libc::open(OOM_SCORE_ADJ.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` was just opened by us; `value` is a live slice of `value.len()` bytes.
    unsafe {
        libc::write(fd, value.as_ptr().cast(), value.len());
        libc::close(fd);
    }
}

/// Every signal blocked in the calling thread until dropped, which restores the previous mask.
struct BlockedSignals {
    previous: libc::sigset_t,
}

impl BlockedSignals {
    fn all() -> BlockedSignals {
        let mut all = MaybeUninit::<libc::sigset_t>::uninit();
        let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigfillset initialises `all`; pthread_sigmask reads it and writes the previous
        // mask into `previous`. Neither can fail with valid arguments, so both are initialised.
        unsafe {
            libc::sigfillset(all.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), previous.as_mut_ptr());
            BlockedSignals {
                previous: previous.assume_init(),
            }
        }
    }
}

impl Drop for BlockedSignals {
    fn drop(&mut self) {
        // SAFETY: `previous` is the initialised mask saved by `all`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, ptr::null_mut()) };
    }
}

/// A private anonymous mapping for the child's stack, with an inaccessible guard page below it so
/// that an overflow faults instead of writing over whatever lies beneath. Unmapped on drop.
struct Stack {
    base: *mut c_void,
    len: usize,
}

// SAFETY: a `Stack` owns its mapping alone (nothing else holds `base`); moving that ownership to
// another thread is sound, and it is only ever used by one child at a time (see `SPARES`).
unsafe impl Send for Stack {}

impl Stack {
    /// A spare stack, or a new mapping when none is left.
    fn take() -> io::Result<Stack> {
        let spare = crate::fanout::lock(&SPARES).pop();
        spare.map_or_else(Stack::map, Ok)
    }

    /// Keeps this stack for a later spawn (its child has exec'd or exited: `clone` returned), or
    /// unmaps it when [`SPARE_STACKS`] are kept already.
    fn give_back(self) {
        let mut spares = crate::fanout::lock(&SPARES);
        if spares.len() < SPARE_STACKS {
            spares.push(self);
        }
    }

    fn map() -> io::Result<Stack> {
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .map_or(4096, |page| page as usize);
        let len = STACK_BYTES + page;
        // SAFETY: a new private anonymous mapping, at an address of the kernel's choosing,
        // overlaps nothing of ours.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the first page of the mapping just made, which nothing uses.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer: the end of the mapping (stacks grow down).
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(self.len)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping made in `map`, which no one uses any more
        // (the child has exec'd or exited before `clone` returned).
        unsafe { libc::munmap(self.base, self.len) };
    }
}
