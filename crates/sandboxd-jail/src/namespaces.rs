//! Entering a sandbox: cgroup, new namespaces, then the two forks that make its PID 1 and its
//! payload. [`enter_sandbox`] is the entry point for a forked, single-threaded caller such as a
//! Python zygote's child.
//!
//! What the kernel does here, in order, in the calling process ("A"):
//!
//! 1. `setsid`: A leaves the caller's session and process group, so a Ctrl-C or a group signal
//!    aimed at the runtime never reaches a sandbox.
//! 2. A writes `0` to the sandbox cgroup's `cgroup.procs` (every v1 hierarchy, or the v2 one):
//!    A and all its future descendants are now charged, limited and freezable there.
//! 3. `unshare(CLONE_NEWNS | NEWUTS | NEWIPC | NEWNET | NEWCGROUP | NEWPID)`. A itself moves into
//!    the new mount, UTS, IPC, network and cgroup namespaces. The cgroup namespace is rooted at
//!    the cgroup A is in *now*, the sandbox's (hence step 2 first), so inside, `/proc/self/cgroup`
//!    says `/`. `CLONE_NEWPID` is different: it applies only to A's *next child*, which becomes
//!    PID 1 of a new pid namespace.
//! 4. Mount propagation is made private (nothing done from now on reaches the host), the
//!    hostname is set, and `lo` is brought up in the new network namespace.
//! 5. A forks "B", PID 1 inside. B mounts the root (see `mounts.rs`) — only a process inside the
//!    new pid namespace can mount its `/proc` — pivots into it, then forks "C", the payload
//!    (PID 2), and becomes the init (see `init.rs`).
//! 6. A waits on a pipe until B and C report success (end of file) or a failed step.
//!
//! A's parent never has B or C as children: when A exits, B is re-parented to the host's init
//! (or nearest subreaper), so the sandbox survives the death of whatever created it. Nothing sets
//! `PR_SET_PDEATHSIG`.
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork, pipe2, sethostname, setsid, write};

use crate::cgroup::Cgroup;
use crate::init::fork_payload_and_serve;
use crate::mounts::{make_private, setup_root};
use crate::netns::loopback_up;
use crate::report::{AtStep, Record, Step, StepError, read_until_eof, write_record};
use crate::spec::{Prepared, SandboxSpec};
use crate::sys::exit_now;

/// How long building a sandbox may take, from the first `unshare` to the payload's `execve` (or
/// its return from [`enter_sandbox`]). Normally a few milliseconds; the bound only catches a stuck
/// mount, and is generous because a loaded 2-core host can stall for seconds.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The namespaces every sandbox gets (user namespaces are not used: the runtime is root).
const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWNS
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWCGROUP)
    .union(CloneFlags::CLONE_NEWPID);

/// Where [`enter_sandbox`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entered {
    /// In the process that called [`enter_sandbox`]. The sandbox is up: its init runs as
    /// `init_pid` (pid in the caller's pid namespace) and its payload has returned `Inside`.
    ///
    /// This process is now in the sandbox's mount, UTS, IPC, network and cgroup namespaces but
    /// not its pid namespace, and still counts in the sandbox's cgroup (so it would be frozen
    /// or killed with it) until it exits; nothing of the sandbox needs it: it should pass
    /// `init_pid` on
    /// (e.g. over a pipe to its parent, which then calls [`crate::SandboxHandle::adopt`]) and
    /// exit at once with `os._exit(0)` / `std::process::exit(0)`. Its parent must reap it.
    Outside {
        /// Host pid of the sandbox's PID 1.
        init_pid: i32,
    },
    /// In the payload: PID 2 of the sandbox, root `/` = the sandbox's root, cwd `/`, hostname
    /// set, inside every namespace and the cgroup. Still uid 0, but with only
    /// [`crate::PAYLOAD_CAPABILITIES`] (enough to `setuid` to `user`). It has every descriptor the
    /// caller had, the caller's signal mask and dispositions, and its parent is the init, which
    /// will exit (killing the sandbox) when this process exits.
    Inside,
}

/// What [`enter_raw`] returns, and in which process.
pub(crate) enum Stage {
    /// In A, after B and C reported success.
    Outside { init_pid: i32 },
    /// In C, with the write end of the setup report pipe still open (close-on-exec): close it
    /// (or exec) to tell A that setup succeeded, or write a failure record to it.
    Inside { report: OwnedFd },
}

/// Builds the sandbox from the calling process, which must be single-threaded (a freshly forked
/// child). Returns **twice**, in two processes: [`Entered::Outside`] in the caller and
/// [`Entered::Inside`] in the payload. See the crate docs for the zygote recipe.
///
/// Creates the cgroup if needed (refusing, with `AlreadyExists`, an id whose cgroup holds
/// processes) and applies `spec.limits`. On error (returned in the caller only, after any
/// half-built init was killed and reaped) the cgroup may still exist and hold the caller: exit,
/// and have the parent call [`crate::kill_sandbox`] with the id. Blocks at most
/// [`SETUP_TIMEOUT`].
pub fn enter_sandbox(spec: &SandboxSpec) -> io::Result<Entered> {
    ensure_single_threaded()?;
    spec.validate()?;
    let cgroup = Cgroup::locate(&spec.id)?;
    cgroup.ensure_unused()?;
    cgroup.create()?;
    cgroup.apply(&spec.limits)?;
    let prepared = Prepared::new(spec, &cgroup)?;
    match enter_raw(&prepared, Instant::now() + SETUP_TIMEOUT)? {
        Stage::Outside { init_pid } => Ok(Entered::Outside { init_pid }),
        Stage::Inside { report } => {
            drop(report);
            Ok(Entered::Inside)
        }
    }
}

/// `unshare` and friends refuse to work (EINVAL) in a process with several threads; say why.
fn ensure_single_threaded() -> io::Result<()> {
    let threads = fs::read_dir("/proc/self/task")?.count();
    if threads > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "enter_sandbox must run in a single-threaded process (this one has {threads} \
                 threads): fork first and call it in the child"
            ),
        ));
    }
    Ok(())
}

/// Steps 1-6 above, from prepared strings only. Async-signal-safe. `Err` is only ever returned in
/// A: B and C report their failures on the pipe and exit.
pub(crate) fn enter_raw(p: &Prepared, deadline: Instant) -> Result<Stage, StepError> {
    match setsid() {
        Ok(_) | Err(Errno::EPERM) => {} // EPERM: already a process-group leader; keep going.
        Err(e) => return Err(StepError::new(Step::Setsid, e)),
    }
    for procs in &p.cgroup_procs {
        let f = open(
            procs.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .at(Step::JoinCgroup)?;
        // "0" means "the writing process".
        write(&f, b"0").at(Step::JoinCgroup)?;
    }
    unshare(NAMESPACES).at(Step::Unshare)?;
    make_private()?;
    sethostname(OsStr::from_bytes(p.hostname.to_bytes())).at(Step::Hostname)?;
    loopback_up()?;

    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)?;
    // SAFETY: A is single-threaded (a forked child); B only makes async-signal-safe calls.
    match unsafe { fork() }.at(Step::Fork)? {
        ForkResult::Child => {
            // B: PID 1 of the new pid namespace.
            drop(report_r);
            match setup_root(p).and_then(|()| fork_payload_and_serve(report_w.as_fd())) {
                // Only the payload gets here; the init never returns.
                Ok(()) => Ok(Stage::Inside { report: report_w }),
                Err(e) => {
                    write_record(report_w.as_fd(), Record::Failed(e));
                    exit_now(1)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            match read_until_eof(report_r.as_fd(), deadline) {
                Ok(()) => Ok(Stage::Outside {
                    init_pid: child.as_raw(),
                }),
                Err(e) => {
                    // B is our child, so its pid cannot have been reused; killing the init
                    // kills the whole pid namespace. Reap it, or it would be re-parented as a
                    // zombie when we exit.
                    let _ = kill(child, Signal::SIGKILL);
                    while let Err(Errno::EINTR) = waitpid(child, None) {}
                    Err(e)
                }
            }
        }
    }
}
