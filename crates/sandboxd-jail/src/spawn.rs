//! [`spawn_sandbox`]: start a sandbox from any process, even a multithreaded one (the runtime),
//! and get a [`SandboxHandle`] back.
//!
//! What the kernel does here: `fork` copies only the calling thread. Locks that other threads held
//! at that moment stay locked forever in the child, so between `fork` and `execve` the child may
//! only make async-signal-safe calls. Everything the child needs (paths, mount options, `argv`,
//! `envp`) is therefore built here first, and the child ("A") runs `enter_raw` on those bytes:
//! it joins the cgroup, unshares, forks PID 1, which forks the payload (see `namespaces.rs`).
//! A then writes the init's pid on a pipe, waits until we have opened a pidfd on it (the init is
//! A's child, so its pid cannot be reused before A exits), and exits; we reap A. The init is
//! thereby re-parented away from us and outlives us.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, chdir, fork, pipe2};

use crate::cgroup::Cgroup;
use crate::handle::{KILL_TIMEOUT, SandboxHandle};
use crate::namespaces::{SETUP_TIMEOUT, Stage, enter_raw};
use crate::report::{Record, Step, StepError, read_record, wait_readable, write_record};
use crate::spec::{Prepared, SandboxSpec, cstring, invalid};
use crate::sys::{cloexec_from, execve_prepared, exit_now};

/// Extra time the runtime waits for A's report beyond A's own setup deadline, so that A's own
/// timeout error (which names the stuck step) arrives before ours.
const REPORT_GRACE: Duration = Duration::from_secs(2);

/// Exit status of a payload whose `execve` failed, as shells use.
const EXEC_FAILED: i32 = 127;

/// Exit status of a payload whose [`InitCommand::Fork`] closure panicked (Rust's own code for an
/// uncaught panic).
const CLOSURE_PANICKED: i32 = 101;

/// What the sandbox's payload (the init's only direct child, PID 2) runs.
pub enum InitCommand {
    /// `execve(program, [program, args...], env)` after `chdir(cwd)`. `program` is an absolute
    /// path inside the sandbox (no `PATH` search). `env` is the complete environment (nothing is
    /// inherited). The payload gets the caller's stdin, stdout and stderr; every other descriptor
    /// is closed on exec. Signals start unblocked with default dispositions.
    Exec {
        /// Absolute path of the executable inside the sandbox.
        program: PathBuf,
        /// Arguments after `argv[0]` (which is `program`).
        args: Vec<String>,
        /// The whole environment, as `(name, value)` pairs.
        env: Vec<(String, String)>,
        /// Working directory inside the sandbox; `/` when `None`.
        cwd: Option<PathBuf>,
    },
    /// Run this closure in the payload process (forked from the caller, already inside the
    /// sandbox) and exit with its return value. It runs in a forked copy of the caller: if the
    /// caller was multithreaded, it must only make async-signal-safe calls (no allocation, no
    /// locks, no `println!`) — in practice: use [`crate::enter_sandbox`] from a single-threaded
    /// process instead. Buffered output is not flushed at exit.
    Fork(Box<dyn FnOnce() -> i32 + Send>),
}

impl std::fmt::Debug for InitCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitCommand::Exec {
                program,
                args,
                env,
                cwd,
            } => f
                .debug_struct("Exec")
                .field("program", program)
                .field("args", args)
                .field("env", env)
                .field("cwd", cwd)
                .finish(),
            InitCommand::Fork(_) => f.write_str("Fork(..)"),
        }
    }
}

/// `argv`, `envp` and `cwd` as C arrays, built before `fork`.
struct PreparedExec {
    program: CString,
    cwd: CString,
    // The pointer arrays point into these; they must stay alive (and unmoved) with the arrays.
    _strings: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl PreparedExec {
    fn new(
        program: &std::path::Path,
        args: &[String],
        env: &[(String, String)],
        cwd: Option<&std::path::Path>,
    ) -> io::Result<PreparedExec> {
        if !program.is_absolute() {
            return Err(invalid(
                "InitCommand::Exec program must be an absolute path",
            ));
        }
        let c = |s: String| CString::new(s).map_err(|_| invalid("argument contains NUL"));
        let program_c = cstring(program)?;
        let mut argv_s = vec![program_c.clone()];
        for a in args {
            argv_s.push(c(a.clone())?);
        }
        let mut envp_s = Vec::with_capacity(env.len());
        for (k, v) in env {
            if k.is_empty() || k.contains('=') {
                return Err(invalid(format!("bad environment variable name {k:?}")));
            }
            envp_s.push(c(format!("{k}={v}"))?);
        }
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain([std::ptr::null()])
                .collect::<Vec<_>>()
        };
        let argv = ptrs(&argv_s);
        let envp = ptrs(&envp_s);
        let cwd = match cwd {
            Some(p) => cstring(p)?,
            None => CString::from(c"/"),
        };
        let mut strings = argv_s;
        strings.extend(envp_s);
        Ok(PreparedExec {
            program: program_c,
            cwd,
            _strings: strings,
            argv,
            envp,
        })
    }
}

/// Starts a sandbox running `init` and returns its handle once the payload has started (its
/// `execve` succeeded, or the `Fork` closure is about to run).
///
/// Creates the cgroup `sandboxd/<id>` (it must not hold processes already), applies the limits,
/// creates the upper, work and merged dirs if missing, and builds the sandbox as described in the
/// crate docs. Safe to call from a multithreaded process. The sandbox does not die with the
/// caller. On error everything created here (processes, cgroup) is removed again; the dirs stay.
/// Blocks at most [`SETUP_TIMEOUT`] plus a little.
pub fn spawn_sandbox(spec: &SandboxSpec, init: InitCommand) -> io::Result<SandboxHandle> {
    spec.validate()?;
    let cgroup = Cgroup::locate(&spec.instance, &spec.id)?;
    cgroup.ensure_unused()?;
    cgroup.create()?;
    let result = cgroup
        .apply(&spec.limits)
        .and_then(|()| Prepared::new(spec, &cgroup))
        .and_then(|prepared| {
            let exec = match &init {
                InitCommand::Exec {
                    program,
                    args,
                    env,
                    cwd,
                } => Some(PreparedExec::new(program, args, env, cwd.as_deref())?),
                InitCommand::Fork(_) => None,
            };
            fork_setup(spec, &cgroup, &prepared, exec.as_ref(), init)
        });
    if result.is_err() {
        let _ = cgroup.kill_all(KILL_TIMEOUT);
        let _ = cgroup.remove(KILL_TIMEOUT);
    }
    result
}

fn fork_setup(
    spec: &SandboxSpec,
    cgroup: &Cgroup,
    prepared: &Prepared,
    exec: Option<&PreparedExec>,
    init: InitCommand,
) -> io::Result<SandboxHandle> {
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC)?;
    let (ack_r, ack_w) = pipe2(OFlag::O_CLOEXEC)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;

    // SAFETY: the child ("A") only makes async-signal-safe calls on data prepared above, and
    // leaves through exit_now or execve, never by returning.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(report_r);
            drop(ack_w);
            match enter_raw(prepared, deadline) {
                Ok(Stage::Outside { init_pid }) => {
                    write_record(report_w.as_fd(), Record::InitPid(init_pid));
                    // Stay alive (keeping the init our child, so its pid stays valid) until the
                    // runtime has opened its pidfd and says so.
                    let _ = wait_readable(ack_r.as_fd(), deadline);
                    exit_now(0)
                }
                Ok(Stage::Inside { report }) => {
                    drop(report_w);
                    drop(ack_r);
                    run_payload(init, exec, report)
                }
                Err(e) => {
                    write_record(report_w.as_fd(), Record::Failed(e));
                    exit_now(1)
                }
            }
        }
        ForkResult::Parent { child } => {
            drop(report_w);
            drop(ack_r);
            drop(init);
            let outcome = read_record(report_r.as_fd(), deadline + REPORT_GRACE);
            let result = match outcome {
                Ok(Some(Record::InitPid(pid))) => SandboxHandle::attach(
                    &spec.id,
                    pid,
                    cgroup.clone(),
                    Some(spec.dir.join("merged")),
                ),
                Ok(Some(Record::Failed(e))) => Err(e.into()),
                Ok(None) => Err(StepError::new(Step::ChildDied, Errno::ECHILD).into()),
                Err(e) => {
                    let _ = kill(child, Signal::SIGKILL);
                    Err(e.into())
                }
            };
            // Release A (it waits for this before exiting), then reap it.
            let _ = nix::unistd::write(&ack_w, b"k");
            drop(ack_w);
            reap(child);
            result
        }
    }
}

/// Waits for A, which exits right after reporting. ECHILD (the caller ignores SIGCHLD, so the
/// kernel reaped it) is fine.
fn reap(child: Pid) {
    loop {
        match waitpid(child, None) {
            Err(Errno::EINTR) => continue,
            _ => return,
        }
    }
}

/// Highest signal number on Linux (`_NSIG - 1`): the standard signals, then the real-time ones.
const MAX_SIGNAL: i32 = 64;

/// Gives the program to be exec'd a clean signal state, as `posix_spawn` with `SETSIGDEF` and
/// `SETSIGMASK` would: an empty mask and default dispositions. Ignored signals survive `execve`,
/// and runtimes ignore some (Rust and Python both ignore SIGPIPE), which would change how a shell
/// pipeline behaves inside. glibc keeps signals 32 and 33 for itself and refuses to touch them;
/// they stay as inherited. Async-signal-safe.
fn default_signals() -> Result<(), Errno> {
    for sig in 1..=MAX_SIGNAL {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: an all-zero sigaction with SIG_DFL is valid and installs no handler code; the
        // old action is not requested (null). EINVAL for glibc-reserved numbers is ignored.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// In C (the payload, PID 2 inside): exec or run the closure. Never returns.
fn run_payload(init: InitCommand, exec: Option<&PreparedExec>, report: OwnedFd) -> ! {
    match (init, exec) {
        (InitCommand::Exec { .. }, Some(x)) => {
            let fail = |step: Step, e: Errno| -> ! {
                write_record(report.as_fd(), Record::Failed(StepError::new(step, e)));
                exit_now(EXEC_FAILED)
            };
            if let Err(e) = cloexec_from(3) {
                fail(Step::Exec, e);
            }
            if let Err(e) = default_signals() {
                fail(Step::Signals, e);
            }
            if let Err(e) = chdir(x.cwd.as_c_str()) {
                fail(Step::PayloadCwd, e);
            }
            let e = execve_prepared(&x.program, &x.argv, &x.envp);
            fail(Step::Exec, e)
        }
        (InitCommand::Fork(f), _) => {
            drop(report);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or(CLOSURE_PANICKED);
            exit_now(code)
        }
        (InitCommand::Exec { .. }, None) => exit_now(EXEC_FAILED),
    }
}
