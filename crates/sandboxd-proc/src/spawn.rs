//! Starting a child. `std::process::Command` does the `fork`/`exec` and reports an `exec` failure
//! (or a failure in our pre-exec steps) synchronously through a close-on-exec pipe: the kernel
//! closes that pipe on a successful exec, so the parent reads either EOF (success) or an errno.
//!
//! Between fork and exec, in the child, we run (in Go's `forkAndExecInChild` order):
//! `setsid()` (new session and process group, so the whole tree can be signalled with `killpg`);
//! for a PTY, `TIOCSCTTY` on fd 0 (std has already `dup2`-ed the slave onto 0/1/2), making the
//! slave the controlling terminal; `setgroups`/`setgid`/`setuid` when switching user; `chdir`;
//! and resetting `SIGPIPE`/`SIGXFSZ` to their defaults (ignored dispositions survive `exec`, and
//! hosts such as CPython ignore both). Only async-signal-safe calls run there, with every input
//! prepared beforehand in the parent.
//!
//! The environment is not inherited (envd behaviour): it is `HOME`, `USER` and `LOGNAME` from the
//! user, `PATH` from the caller, then the caller's variables, later ones winning.
#![allow(unsafe_code)]

use std::error::Error;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

use crate::fanout::DEFAULT_STALL_TIMEOUT;
use crate::fdio::set_nonblocking;
use crate::pty::{self, WinSize};
use crate::ring::{DEFAULT_RING_BYTES, Stream};

/// How the child's standard descriptors are connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    /// stdout and stderr are separate pipes; stdin is a pipe when `stdin` is true, else
    /// `/dev/null` (so a reader of stdin sees EOF at once).
    Pipes {
        /// Whether stdin is a pipe we can write to (envd's `StartRequest.stdin`).
        stdin: bool,
    },
    /// stdin, stdout and stderr are all the slave of a new PTY of this size, which is also the
    /// child's controlling terminal. Output comes back as one [`Stream::Pty`] stream.
    Pty(WinSize),
}

/// The identity a child runs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// User name (becomes `USER` and `LOGNAME`).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (as `initgroups(3)` would set them).
    pub groups: Vec<u32>,
    /// Home directory (becomes `HOME`).
    pub home: PathBuf,
}

impl User {
    /// Looks a user up by name in the password database, with its supplementary groups.
    /// Fails with `ErrorKind::NotFound` for an unknown user.
    pub fn lookup(name: &str) -> io::Result<User> {
        match nix::unistd::User::from_name(name)? {
            Some(user) => User::from_passwd(user),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("user '{name}' does not exist"),
            )),
        }
    }

    /// Looks a user up by uid. Fails with `ErrorKind::NotFound` for an unknown uid.
    pub fn lookup_uid(uid: u32) -> io::Result<User> {
        match nix::unistd::User::from_uid(Uid::from_raw(uid))? {
            Some(user) => User::from_passwd(user),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("uid {uid} does not exist"),
            )),
        }
    }

    /// The user this process runs as (its real uid).
    pub fn current() -> io::Result<User> {
        User::lookup_uid(nix::unistd::getuid().as_raw())
    }

    fn from_passwd(user: nix::unistd::User) -> io::Result<User> {
        let cname = CString::new(user.name.as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)?
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        Ok(User {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
        })
    }
}

/// Everything needed to start a process.
#[derive(Clone, Debug)]
pub struct SpawnOptions {
    /// The program: a path, or a name looked up in `path` (the child's `PATH`).
    pub program: OsString,
    /// Arguments after the program name (`argv[1..]`).
    pub args: Vec<OsString>,
    /// Extra environment variables, applied in order after `HOME`/`USER`/`LOGNAME`/`PATH`
    /// (later entries win).
    pub env: Vec<(OsString, OsString)>,
    /// The child's `PATH`, chosen by the caller (envd passes its own). `None` sets no `PATH`.
    pub path: Option<OsString>,
    /// Working directory. It must exist; `None` keeps ours.
    pub cwd: Option<PathBuf>,
    /// Run as this user. `None` runs as ourselves; `HOME`/`USER`/`LOGNAME` then come from our
    /// own password entry when there is one.
    pub user: Option<User>,
    /// Pipes or PTY.
    pub io: Io,
    /// Output ring budget in bytes ([`DEFAULT_RING_BYTES`] by default).
    pub ring_bytes: usize,
    /// Flow control's bound ([`DEFAULT_STALL_TIMEOUT`] by default): how long the reader thread
    /// waits for a subscriber that leaves output unread before giving up on it as stalled, and how
    /// long in total a slower subscriber may hold back a faster one (see the crate docs).
    /// `Duration::ZERO` turns flow control off: the process is never throttled, and readers that
    /// fall a ring behind get a [`Lag`](crate::Lag).
    pub stall_timeout: Duration,
    /// Written to `/proc/self/oom_score_adj` in the child before exec (-1000..=1000), so that the
    /// kernel's OOM killer picks the user's processes before the agent (envd uses 100). `None`
    /// inherits ours. A failed write is ignored, as envd ignores it.
    pub oom_score_adj: Option<i32>,
    /// Read size; `None` uses [`PIPE_CHUNK_BYTES`](crate::PIPE_CHUNK_BYTES) for pipes and
    /// [`PTY_CHUNK_BYTES`](crate::PTY_CHUNK_BYTES) for a PTY. For experiments.
    pub read_chunk_bytes: Option<usize>,
}

impl SpawnOptions {
    /// Options to run `program` with no arguments, pipes without stdin, as ourselves, in our cwd.
    pub fn new(program: impl Into<OsString>) -> SpawnOptions {
        SpawnOptions {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            path: None,
            cwd: None,
            user: None,
            io: Io::Pipes { stdin: false },
            ring_bytes: DEFAULT_RING_BYTES,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            oom_score_adj: None,
            read_chunk_bytes: None,
        }
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> SpawnOptions
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Appends one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> SpawnOptions {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets how stdio is connected.
    pub fn io(mut self, io: Io) -> SpawnOptions {
        self.io = io;
        self
    }
}

/// A spawn that failed: names the program and keeps the OS error (`source`, with its errno).
///
/// [`Process::spawn`](crate::Process::spawn) returns it inside an `io::Error` of the same kind,
/// so `err.get_ref()` can be downcast to it.
#[derive(Debug)]
pub struct SpawnError {
    program: OsString,
    source: io::Error,
}

impl SpawnError {
    /// The program that could not be started.
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// The underlying OS error (`raw_os_error()` gives the errno, e.g. `ENOENT`, `EACCES`).
    pub fn os_error(&self) -> &io::Error {
        &self.source
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot start '{}': {}",
            self.program.to_string_lossy(),
            self.source
        )
    }
}

impl Error for SpawnError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.source)
    }
}

/// A started child, before its reader thread exists.
pub(crate) struct Spawned {
    pub(crate) pid: libc::pid_t,
    /// Our (non-blocking) end of the stdin pipe, for `Io::Pipes { stdin: true }`.
    pub(crate) stdin: Option<OwnedFd>,
    /// Non-blocking descriptors to read output from.
    pub(crate) outputs: Vec<(OwnedFd, Stream)>,
    /// The (non-blocking) PTY master, for `Io::Pty`.
    pub(crate) pty: Option<OwnedFd>,
}

/// Credentials to switch to in the child.
struct Creds {
    groups: Vec<Gid>,
    gid: Gid,
    uid: Uid,
}

/// Forks and execs the child described by `opts`.
pub(crate) fn spawn(opts: &SpawnOptions) -> io::Result<Spawned> {
    if let Some(cwd) = &opts.cwd {
        match std::fs::metadata(cwd) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("cwd '{}' is not a directory", cwd.display()),
                ));
            }
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("cwd '{}' does not exist", cwd.display()),
                ));
            }
        }
    }

    let mut cmd = Command::new(&opts.program);
    cmd.args(&opts.args);
    cmd.env_clear();
    let identity = match &opts.user {
        Some(user) => Some(user.clone()),
        None => User::current().ok(),
    };
    if let Some(user) = &identity {
        cmd.env("HOME", &user.home);
        cmd.env("USER", &user.name);
        cmd.env("LOGNAME", &user.name);
    }
    if let Some(path) = &opts.path {
        cmd.env("PATH", path);
    }
    for (key, value) in &opts.env {
        cmd.env(key, value);
    }

    let creds = opts.user.as_ref().and_then(creds_to_apply);
    let cwd = match &opts.cwd {
        Some(cwd) => Some(
            CString::new(cwd.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };

    let mut pty_master = None;
    match opts.io {
        Io::Pipes { stdin } => {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() });
            cmd.stdout(Stdio::piped());
            cmd.stderr(Stdio::piped());
        }
        Io::Pty(size) => {
            let pair = pty::open_pair(size)?;
            // `try_clone` duplicates with F_DUPFD_CLOEXEC; std dup2()s them onto 0/1/2 in the
            // child (which clears CLOEXEC there) and we close ours when `cmd` is dropped below.
            cmd.stdin(Stdio::from(pair.slave.try_clone()?));
            cmd.stdout(Stdio::from(pair.slave.try_clone()?));
            cmd.stderr(Stdio::from(pair.slave));
            pty_master = Some(pair.master);
        }
    }
    let is_pty = pty_master.is_some();
    // Formatted here: the child may not allocate.
    let oom_score_adj = opts
        .oom_score_adj
        .map(|adj| format!("{adj}\n").into_bytes());

    let child_setup = move || -> io::Result<()> {
        nix::unistd::setsid()?;
        if is_pty {
            pty::make_controlling_tty(0)?;
        }
        // Before switching user: as root any value is allowed, and after `setuid` the file may
        // belong to root (the process is no longer dumpable until exec).
        if let Some(adj) = &oom_score_adj {
            write_oom_score_adj(adj);
        }
        if let Some(creds) = &creds {
            nix::unistd::setgroups(&creds.groups)?;
            nix::unistd::setgid(creds.gid)?;
            nix::unistd::setuid(creds.uid)?;
        }
        if let Some(cwd) = &cwd {
            // SAFETY: `cwd` is a NUL-terminated string built in the parent and alive here.
            if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for signal in [libc::SIGPIPE, libc::SIGXFSZ] {
            // SAFETY: `signal(2)` with SIG_DFL installs no handler and is async-signal-safe.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
        Ok(())
    };
    // SAFETY: `child_setup` runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls setsid, ioctl(TIOCSCTTY), open/write/close, setgroups, setgid,
    // setuid, chdir and signal directly (nix's wrappers used here do not allocate), takes no lock, and allocates
    // nothing: its inputs were all prepared above, and its errors are bare errnos.
    unsafe {
        cmd.pre_exec(child_setup);
    }

    let mut child = cmd.spawn().map_err(|source| {
        io::Error::new(
            source.kind(),
            SpawnError {
                program: opts.program.clone(),
                source,
            },
        )
    })?;
    // Close the parent's copies of the PTY slave now, or the master would never see EIO.
    drop(cmd);
    let pid = child.id() as libc::pid_t;

    let parts = take_parts(&mut child, pty_master);
    // Dropping `Child` neither kills nor reaps; our reader thread reaps it.
    drop(child);
    parts
        // The child runs but we cannot follow it: kill its group and reap it, leaving no zombie.
        .inspect_err(|_| abandon(pid))
        .map(|(stdin, outputs, pty)| Spawned {
            pid,
            stdin,
            outputs,
            pty,
        })
}

/// In the child: writes `value` (an ASCII number and newline) to `/proc/self/oom_score_adj`,
/// ignoring failure (no procfs, or not permitted). Async-signal-safe: open, write, close.
fn write_oom_score_adj(value: &[u8]) {
    const PATH: &std::ffi::CStr = c"/proc/self/oom_score_adj";
    // SAFETY: `PATH` is a NUL-terminated static string; open touches no other memory.
    let fd = unsafe { libc::open(PATH.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is the descriptor just opened; `value` is a live slice of `value.len()` bytes.
    unsafe {
        libc::write(fd, value.as_ptr().cast(), value.len());
        libc::close(fd);
    }
}

/// Our ends of the child's stdio, all made non-blocking.
type Parts = (Option<OwnedFd>, Vec<(OwnedFd, Stream)>, Option<OwnedFd>);

fn take_parts(child: &mut Child, pty_master: Option<OwnedFd>) -> io::Result<Parts> {
    let mut outputs = Vec::with_capacity(2);
    let stdin = child.stdin.take().map(OwnedFd::from);
    if let Some(fd) = child.stdout.take() {
        outputs.push((OwnedFd::from(fd), Stream::Stdout));
    }
    if let Some(fd) = child.stderr.take() {
        outputs.push((OwnedFd::from(fd), Stream::Stderr));
    }
    if let Some(master) = &pty_master {
        // The reader gets its own descriptor for the master; closing it when the PTY ends leaves
        // ours open for input and resizing.
        outputs.push((master.try_clone()?, Stream::Pty));
    }
    for fd in stdin
        .iter()
        .chain(pty_master.iter())
        .chain(outputs.iter().map(|(fd, _)| fd))
    {
        set_nonblocking(fd.as_fd())?;
    }
    Ok((stdin, outputs, pty_master))
}

/// Kills the process group of a child we cannot follow and reaps the child.
pub(crate) fn abandon(pid: libc::pid_t) {
    let _ = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = crate::reap::reap(pid);
}

/// The credentials to switch to, or `None` when the child can simply inherit ours.
///
/// As root we always set all three (uid, gid, groups). Otherwise we only try when the request
/// differs from what we are, which fails with `EPERM` unless we hold the capabilities.
fn creds_to_apply(user: &User) -> Option<Creds> {
    let same =
        nix::unistd::geteuid().as_raw() == user.uid && nix::unistd::getegid().as_raw() == user.gid;
    if !nix::unistd::geteuid().is_root() && same {
        return None;
    }
    Some(Creds {
        groups: user.groups.iter().copied().map(Gid::from_raw).collect(),
        gid: Gid::from_raw(user.gid),
        uid: Uid::from_raw(user.uid),
    })
}
