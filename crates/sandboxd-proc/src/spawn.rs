//! Starting a child: the options, what the child gets, and what a failure says.
//!
//! The child is started by [`crate::vfork`] (`clone(CLONE_VM | CLONE_VFORK)`, then `execve`),
//! which explains the design and its cost. Here the parent prepares everything it needs, since the
//! child may not allocate: the `argv` and `envp` strings, the paths `execvp(3)` would try
//! ([`crate::lookup`]), the descriptors that become its 0/1/2 (pipes, or a PTY slave), the
//! credentials and the working directory; and turns a failure into a [`SpawnError`] naming the
//! program (and the step, when the child failed before `execve`).
//!
//! What the child does before `execve`: every signal handled or ignored back to its default
//! (ignored dispositions survive `exec`: CPython ignores `SIGPIPE` and `SIGXFSZ`, `nohup` `SIGHUP`);
//! `setsid()` (new session and process group, so the whole tree can be signalled with `killpg`);
//! for a PTY, `TIOCSCTTY` on fd 0, making the slave the controlling terminal; the `oom_score_adj`
//! write; `setgroups`/`setgid`/`setuid` when switching user; and `chdir`.
//!
//! The environment is not inherited (envd behaviour): it is `HOME`, `USER` and `LOGNAME` from the
//! user, `PATH` from the caller, then the caller's variables, later ones winning; the child gets
//! it sorted by name.

use std::collections::BTreeMap;
use std::error::Error;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};

use crate::fanout::DEFAULT_STALL_TIMEOUT;
use crate::fdio::set_nonblocking;
use crate::lookup;
use crate::pty::{self, WinSize};
use crate::ring::{DEFAULT_RING_BYTES, Stream};
use crate::vfork::{self, Creds, Exec, Failure, Setup, Step};

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
    /// The setup step that failed in the child before `execve` (`None`: `execve` itself, or
    /// starting the child at all).
    step: Option<String>,
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

    /// The setup step that failed in the child before `execve` (`chdir to '/home/user'`), or
    /// `None` when `execve` itself failed.
    pub fn step(&self) -> Option<&str> {
        self.step.as_deref()
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let program = self.program.to_string_lossy();
        match &self.step {
            None => write!(f, "cannot start '{program}': {}", self.source),
            Some(step) => write!(f, "cannot start '{program}': {step}: {}", self.source),
        }
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

/// Starts the child described by `opts`.
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
    let fail = |source: io::Error, step: Option<String>| {
        io::Error::new(
            source.kind(),
            SpawnError {
                program: opts.program.clone(),
                step,
                source,
            },
        )
    };

    let identity = match &opts.user {
        Some(user) => Some(user.clone()),
        None => User::current().ok(),
    };
    let exec = exec(opts, identity.as_ref()).map_err(|e| fail(e, None))?;
    let creds = opts.user.as_ref().and_then(creds_to_apply);
    let cwd = match &opts.cwd {
        Some(cwd) => Some(
            CString::new(cwd.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    let ends = match opts.io {
        Io::Pipes { stdin } => Ends::pipes(stdin).map_err(|e| fail(e, None))?,
        Io::Pty(size) => Ends::pty(size)?,
    };

    let setup = Setup {
        stdio: ends.child_stdio(),
        controlling_tty: ends.pty.is_some(),
        oom_score_adj: opts.oom_score_adj,
        creds,
        cwd,
    };
    let pid = vfork::spawn(exec, setup).map_err(|failure| match failure {
        Failure::Clone(source) => fail(source, None),
        Failure::Child { step, errno } => {
            fail(io::Error::from_raw_os_error(errno), describe(step, opts))
        }
    })?;
    // Close our copies of the child's ends now: the PTY master sees EIO, and a pipe's reader EOF,
    // only once every copy of the other end is closed.
    let Ends {
        child,
        stdin,
        outputs,
        pty,
    } = ends;
    drop(child);
    ours(stdin, outputs, pty)
        // The child runs but we cannot follow it: kill its group and reap it, leaving no zombie.
        .inspect_err(|_| abandon(pid))
        .map(|(stdin, outputs, pty)| Spawned {
            pid,
            stdin,
            outputs,
            pty,
        })
}

/// What to execute: `argv`, the environment (see the module docs) and where to look for the
/// program. Fails with `InvalidInput` for a NUL byte in any of them, as `std::process` does.
fn exec(opts: &SpawnOptions, identity: Option<&User>) -> io::Result<Exec> {
    let mut env = BTreeMap::<OsString, OsString>::new();
    if let Some(user) = identity {
        env.insert("HOME".into(), user.home.clone().into_os_string());
        env.insert("USER".into(), user.name.clone().into());
        env.insert("LOGNAME".into(), user.name.clone().into());
    }
    if let Some(path) = &opts.path {
        env.insert("PATH".into(), path.clone());
    }
    for (key, value) in &opts.env {
        env.insert(key.clone(), value.clone());
    }
    let argv = std::iter::once(&opts.program)
        .chain(&opts.args)
        .map(|arg| c_string(arg.as_bytes().to_vec()))
        .collect::<io::Result<Vec<_>>>()?;
    let envp = env
        .iter()
        .map(|(key, value)| c_string([key.as_bytes(), b"=", value.as_bytes()].concat()))
        .collect::<io::Result<Vec<_>>>()?;
    let path = env.get(OsStr::new("PATH")).map(|path| path.as_bytes());
    Ok(Exec {
        candidates: lookup::candidates(opts.program.as_bytes(), path),
        argv,
        envp,
    })
}

/// A C string, or std's error for a NUL byte in a command.
fn c_string(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in provided data",
        )
    })
}

/// What a failed step of the child's setup is called in the error message; `None` for `execve`,
/// whose error is the program's.
fn describe(step: Step, opts: &SpawnOptions) -> Option<String> {
    let user = opts.user.as_ref();
    let user_name = user.map_or("", |user| user.name.as_str());
    Some(match step {
        Step::Exec => return None,
        Step::SignalMask => "resetting the signal mask".to_owned(),
        Step::Stdio => "dup2 onto stdin/stdout/stderr".to_owned(),
        Step::Setsid => "setsid".to_owned(),
        Step::ControllingTty => "making the PTY the controlling terminal".to_owned(),
        Step::Setgroups => format!("setgroups for user '{user_name}'"),
        Step::Setgid => format!("setgid({})", user.map_or(0, |user| user.gid)),
        Step::Setuid => format!("setuid({})", user.map_or(0, |user| user.uid)),
        Step::Chdir => format!(
            "chdir to '{}'",
            opts.cwd
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        ),
    })
}

/// The descriptors of a child's stdio while it is being started.
struct Ends {
    /// The child's ends: its stdin, stdout, stderr (pipes), or the PTY slave, all above 2 and
    /// close-on-exec. Ours to close once it has them.
    child: Vec<OwnedFd>,
    /// Our end of the stdin pipe, for `Io::Pipes { stdin: true }`.
    stdin: Option<OwnedFd>,
    /// Our ends of the stdout and stderr pipes.
    outputs: Vec<(OwnedFd, Stream)>,
    /// The PTY master, for `Io::Pty`.
    pty: Option<OwnedFd>,
}

impl Ends {
    /// Pipes for stdout and stderr, and for stdin a pipe or `/dev/null` (so a reader of stdin sees
    /// EOF at once).
    fn pipes(stdin: bool) -> io::Result<Ends> {
        let (child_stdin, our_stdin) = if stdin {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            (read, Some(write))
        } else {
            // std's `File::open` opens O_RDONLY | O_CLOEXEC.
            (OwnedFd::from(File::open("/dev/null")?), None)
        };
        let (stdout, child_stdout) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (stderr, child_stderr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        Ok(Ends {
            child: vec![
                above_stdio(child_stdin)?,
                above_stdio(child_stdout)?,
                above_stdio(child_stderr)?,
            ],
            stdin: our_stdin,
            outputs: vec![(stdout, Stream::Stdout), (stderr, Stream::Stderr)],
            pty: None,
        })
    }

    /// A new PTY pair of `size`: the slave for the child's 0/1/2, the master for us.
    fn pty(size: WinSize) -> io::Result<Ends> {
        let pair = pty::open_pair(size)?;
        Ok(Ends {
            child: vec![above_stdio(pair.slave)?],
            stdin: None,
            outputs: Vec::new(),
            pty: Some(pair.master),
        })
    }

    /// The descriptors to become the child's 0, 1 and 2.
    fn child_stdio(&self) -> [std::os::fd::BorrowedFd<'_>; 3] {
        match &self.child[..] {
            [slave] => [slave.as_fd(); 3],
            [stdin, stdout, stderr] => [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()],
            _ => unreachable!("one PTY slave or three pipe ends"),
        }
    }
}

/// `fd` itself, or a close-on-exec duplicate of it above 2 when it is 0, 1 or 2 (possible only
/// when we run with a standard descriptor closed): the child `dup2`s its descriptors onto 0, 1
/// and 2 in turn, which must not overwrite one it has yet to use.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // `try_clone` duplicates with `F_DUPFD_CLOEXEC` at 3 or above.
    fd.try_clone()
}

/// Our ends of the child's stdio, all made non-blocking.
type Parts = (Option<OwnedFd>, Vec<(OwnedFd, Stream)>, Option<OwnedFd>);

fn ours(
    stdin: Option<OwnedFd>,
    mut outputs: Vec<(OwnedFd, Stream)>,
    pty_master: Option<OwnedFd>,
) -> io::Result<Parts> {
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
        groups: user.groups.clone(),
        gid: user.gid,
        uid: user.uid,
    })
}
