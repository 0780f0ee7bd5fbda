//! Entering a sandbox: cgroup, user namespace, idmapped layers, new namespaces, then the two
//! forks that make its PID 1 and its payload. [`enter_sandbox`] is the entry point for a forked,
//! single-threaded caller such as a Python zygote's child.
//!
//! What the kernel does here, in order, in the calling process ("A", host root):
//!
//! 1. `setsid`: A leaves the caller's session and process group, so a Ctrl-C or a group signal
//!    aimed at the runtime never reaches a sandbox.
//! 2. A writes `0` to the sandbox cgroup's `tasks` (every v1 hierarchy; A is single-threaded, and
//!    moving one thread skips a host-wide lock, see `Cgroup::join_files`) or `cgroup.procs` (v2):
//!    A and all its future descendants are now charged, limited and freezable there.
//! 3. The sandbox's user namespace is created by a helper running as the range's base uid, and A
//!    writes its id maps (`userns.rs`: why the creator's uid matters).
//! 4. A makes idmapped, read-only, detached copies of the template layers and of the host's
//!    `/usr`, and idmapped, writable, `nosuid` ones of the volumes (`idmap.rs`), which needs host
//!    root, then `chdir`s into the sandbox's directory.
//! 5. A `setns`es into the user namespace and becomes its root, then
//!    `unshare(CLONE_NEWNS | NEWUTS | NEWIPC | NEWNET | NEWCGROUP | NEWPID)`: the new namespaces
//!    are owned by the sandbox's user namespace, so its root may mount in them and nothing else.
//!    The cgroup namespace is rooted at the cgroup A is in *now*, the sandbox's (hence step 2
//!    first), so inside, `/proc/self/cgroup` says `/`. `CLONE_NEWPID` applies only to A's *next
//!    child*, which becomes PID 1 of a new pid namespace.
//! 6. Mount propagation is made private (nothing done from now on reaches the host), the
//!    hostname is set, and `lo` is brought up in the new network namespace.
//! 7. A forks "B", PID 1 inside. B attaches the layers and the disk, mounts the root (see
//!    `mounts.rs`) — only a process inside the new pid namespace can mount its `/proc` — pivots
//!    into it, closes every setup descriptor, then forks "C", the payload (PID 2: resource limits,
//!    seccomp filter, capabilities, see `init.rs`), and becomes the init.
//! 8. A waits on a pipe until B and C report success (end of file) or a failed step.
//!
//! [`enter_sandbox_then`] differs in steps 7 and 8: neither B nor C is a fork, both are
//! `CLONE_VM` clones on stacks of their own, sharing A's memory, so a sandbox costs no copy of A's
//! page tables at all (only the zygote's fork of A); C runs a closure (it cannot return into A's
//! frames) instead of returning, and A, on success, writes its report and exits without returning
//! into its caller (`init.rs`, `clone_payload_and_serve`: why three tasks on one memory are
//! sound). It may also be given the group A made
//! ahead of need ([`crate::PremadeCgroup`], v1 only): before step 2, A renames it to the sandbox's
//! and rewrites the limits that differ, instead of making and limiting the sandbox's group then.
//!
//! A's parent never has B or C as children: when A exits, B is re-parented to the host's init
//! (or nearest subreaper), so the sandbox survives the death of whatever created it. Nothing sets
//! `PR_SET_PDEATHSIG`.
#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, pthread_sigmask};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, chdir, fork, pipe2, sethostname, setsid, write};

use crate::cgroup::{Cgroup, PremadeCgroup};
use crate::idmap::{LAYER_ATTRS, VOLUME_ATTRS, idmapped_tree};
use crate::init::{clone_payload_and_serve, fork_payload_and_serve};
use crate::mounts::{make_private, setup_root};
use crate::netns::loopback_up;
use crate::report::{AtStep, Record, Step, StepError, read_until_eof, write_record};
use crate::spec::{MAX_LAYERS, MAX_VOLUMES, Prepared, SandboxSpec};
use crate::sys::exit_now;
use crate::userns;

/// How long building a sandbox may take, from the first `unshare` to the payload's `execve` (or
/// its return from [`enter_sandbox`]). Normally a few milliseconds; the bound only catches a stuck
/// mount, and is generous because a loaded 2-core host can stall for seconds.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The namespaces a sandbox gets besides its user namespace (which is made first, see above).
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
    let prepared = prepare_entry(spec, None)?;
    match enter_raw(&prepared, Instant::now() + SETUP_TIMEOUT)? {
        Stage::Outside { init_pid } => Ok(Entered::Outside { init_pid }),
        Stage::Inside { report } => {
            drop(report);
            Ok(Entered::Inside)
        }
    }
}

/// Like [`enter_sandbox`], but the payload runs `payload` and exits with its value, and the
/// caller ("A") never returns on success: it writes `P<init pid>\n` (the init's pid in the
/// caller's pid namespace) to `report` and exits with status 0. Returns only a failure, once
/// nothing of the sandbox runs (its cgroup may remain, as for [`enter_sandbox`]), and only one
/// that came before the payload started `payload`: after that (the init's own set-up refused,
/// or the deadline), the payload was killed in the middle of it, on this memory, so A writes
/// `E<why>\n` to `report` and exits with status 1 without returning.
///
/// The difference is the init and the payload: here neither is a fork, both are `CLONE_VM`
/// clones of A on stacks of their own, sharing A's memory. A sandbox of a large process (the
/// Python zygote, ~70 MiB) thereby costs no copy of its page tables besides the caller's own
/// fork, and the payload does not fault in again the pages the caller already made its own. The
/// payload cannot return into the caller's frames, hence the closure: in a Python caller, it runs
/// with the GIL held (as the caller held it), on the caller's thread state, and the caller itself
/// never runs again (`init.rs`, `clone_payload_and_serve`, says why each part is sound).
///
/// `premade`: a group this process made ahead of need ([`PremadeCgroup`]); it becomes the
/// sandbox's (renamed, its limits made the request's) when it fits, and is removed otherwise.
pub fn enter_sandbox_then(
    spec: &SandboxSpec,
    premade: Option<PremadeCgroup>,
    report: RawFd,
    payload: &mut dyn FnMut() -> i32,
) -> io::Error {
    let prepared = match prepare_entry(spec, premade) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let fds = match join_and_make_userns(&prepared) {
        Ok(fds) => fds,
        Err(e) => return e.into(),
    };
    enter_namespaces_and_clone(&prepared, fds, deadline, report, payload).into()
}

/// What both entries do first, in the caller: checks, then the sandbox's cgroup made (refusing one
/// that holds processes) and limited, or `premade` renamed to it, and the steps' bytes prepared.
fn prepare_entry(spec: &SandboxSpec, premade: Option<PremadeCgroup>) -> io::Result<Prepared> {
    ensure_single_threaded()?;
    spec.validate()?;
    // Checked first, so that a pre-made group that cannot be used is removed on every path.
    if let Some(premade) = premade
        && let Ok(cgroup) = premade.adopt(&spec.instance, &spec.id, &spec.limits)
    {
        return Prepared::new(spec, &cgroup);
    }
    let cgroup = Cgroup::locate(&spec.instance, &spec.id)?;
    cgroup.ensure_unused()?;
    cgroup.create()?;
    cgroup.apply(&spec.limits)?;
    Prepared::new(spec, &cgroup)
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

/// Descriptors A makes for B: the user namespace and the idmapped, detached mounts. B closes its
/// copies once they are attached, before it forks the payload.
pub(crate) struct SetupFds {
    userns: OwnedFd,
    layers: [Option<OwnedFd>; MAX_LAYERS],
    usr: Option<OwnedFd>,
    volumes: [Option<OwnedFd>; MAX_VOLUMES],
}

impl SetupFds {
    /// The idmapped template layers, in order.
    pub(crate) fn layers(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.layers
            .iter()
            .map_while(|l| l.as_ref().map(|fd| fd.as_fd()))
    }

    /// The idmapped host `/usr`, if the sandbox gets one.
    pub(crate) fn usr(&self) -> Option<BorrowedFd<'_>> {
        self.usr.as_ref().map(|fd| fd.as_fd())
    }

    /// Closes this process's copies of the descriptors by number, leaving the struct (which may
    /// be another process's memory: the init's clone shares A's) untouched. Async-signal-safe.
    fn close_copies(&self) {
        let all = std::iter::once(self.userns.as_fd())
            .chain(self.layers())
            .chain(self.usr())
            .chain(self.volumes());
        for fd in all {
            // SAFETY: closes this process's descriptor table entry only; the number is not used
            // again in this process.
            unsafe { libc::close(fd.as_raw_fd()) };
        }
    }

    /// The idmapped volumes, in order.
    pub(crate) fn volumes(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.volumes
            .iter()
            .map_while(|v| v.as_ref().map(|fd| fd.as_fd()))
    }
}

/// Steps 3 and 4: the user namespace and the idmapped mounts. Async-signal-safe.
fn make_userns_and_layers(p: &Prepared) -> Result<SetupFds, StepError> {
    let userns = userns::create(p.id_base, &p.id_map)?;
    let (layers, usr, volumes) = (|| {
        let mut layers: [Option<OwnedFd>; MAX_LAYERS] = std::array::from_fn(|_| None);
        for (slot, source) in layers.iter_mut().zip(&p.lower_sources) {
            *slot = Some(
                idmapped_tree(source, userns.as_fd(), false, LAYER_ATTRS).at(Step::IdmapLayer)?,
            );
        }
        // Not recursive: the host's /usr is an overlay's lower layer inside (`mounts.rs`,
        // `overlay_usr`), and a lower layer is one filesystem, so submounts would not show.
        let usr = match p.host_usr_ro {
            true => Some(
                idmapped_tree(c"/usr", userns.as_fd(), false, LAYER_ATTRS).at(Step::IdmapLayer)?,
            ),
            false => None,
        };
        let mut volumes: [Option<OwnedFd>; MAX_VOLUMES] = std::array::from_fn(|_| None);
        for (slot, source) in volumes.iter_mut().zip(&p.volume_sources) {
            *slot = Some(
                idmapped_tree(source, userns.as_fd(), false, VOLUME_ATTRS).at(Step::IdmapVolume)?,
            );
        }
        Ok((layers, usr, volumes))
    })()?;
    Ok(SetupFds {
        userns,
        layers,
        usr,
        volumes,
    })
}

/// Waits for a child that is exiting or has exited.
fn reap(pid: Pid) {
    while let Err(Errno::EINTR) = waitpid(pid, None) {}
}

/// Steps 1-8 above, from prepared bytes only. Async-signal-safe. `Err` is only ever returned in
/// A: B and C report their failures on the pipe and exit.
pub(crate) fn enter_raw(p: &Prepared, deadline: Instant) -> Result<Stage, StepError> {
    let fds = join_and_make_userns(p)?;
    enter_namespaces_and_fork(p, fds, deadline)
}

/// Steps 1-4. Async-signal-safe.
fn join_and_make_userns(p: &Prepared) -> Result<SetupFds, StepError> {
    match setsid() {
        Ok(_) | Err(Errno::EPERM) => {} // EPERM: already a process-group leader; keep going.
        Err(e) => return Err(StepError::new(Step::Setsid, e)),
    }
    for join in &p.cgroup_join {
        let f = open(
            join.as_c_str(),
            OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .at(Step::JoinCgroup)?;
        // "0" means "the writing process".
        write(&f, b"0").at(Step::JoinCgroup)?;
    }
    make_userns_and_layers(p)
}

/// Steps 5-6: into the user namespace and new namespaces of the others, the root made private, the
/// hostname and loopback set; returns the report pipe (read end, write end). Async-signal-safe.
fn enter_namespaces(p: &Prepared, fds: &SetupFds) -> Result<(OwnedFd, OwnedFd), StepError> {
    chdir(p.dir.as_c_str()).at(Step::Chdir)?;
    userns::enter(&fds.userns)?;
    unshare(NAMESPACES).at(Step::Unshare)?;
    make_private()?;
    sethostname(OsStr::from_bytes(p.hostname.to_bytes())).at(Step::Hostname)?;
    loopback_up()?;
    pipe2(OFlag::O_CLOEXEC).at(Step::Pipe)
}

fn enter_namespaces_and_fork(
    p: &Prepared,
    fds: SetupFds,
    deadline: Instant,
) -> Result<Stage, StepError> {
    let (report_r, report_w) = enter_namespaces(p, &fds)?;
    // SAFETY: A is single-threaded (a forked child); B only makes async-signal-safe calls.
    match unsafe { fork() }.at(Step::Fork)? {
        ForkResult::Child => {
            // B: PID 1 of the new pid namespace.
            drop(report_r);
            let built = setup_root(p, &fds);
            // The payload must not inherit a way back to the template's or the disk's mounts.
            drop(fds);
            match built.and_then(|()| fork_payload_and_serve(report_w.as_fd(), p, None)) {
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
            drop(fds);
            match read_until_eof(report_r.as_fd(), deadline) {
                Ok(()) => Ok(Stage::Outside {
                    init_pid: child.as_raw(),
                }),
                Err(e) => {
                    // B is our child, so its pid cannot have been reused; killing the init
                    // kills the whole pid namespace. Reap it, or it would be re-parented as a
                    // zombie when we exit.
                    let _ = kill(child, Signal::SIGKILL);
                    reap(child);
                    Err(e)
                }
            }
        }
    }
}

/// Size of the init's stack and of the payload's (each its own): a main thread's usual 8 MiB.
/// Only what is touched costs memory.
const INIT_STACK_SIZE: usize = 8 << 20;

/// A guard page below each stack, so that an overflow faults instead of writing other memory.
const GUARD_SIZE: usize = 4096;

/// A fresh stack (with its guard page) for a `CLONE_VM` clone; returns its top. Never unmapped:
/// the clone that runs on it keeps the memory when A exits.
fn map_stack() -> Result<*mut libc::c_void, StepError> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GUARD_SIZE + INIT_STACK_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return Err(StepError::new(Step::Fork, Errno::last()));
    }
    // SAFETY: the lowest page of the mapping just made.
    Errno::result(unsafe { libc::mprotect(stack, GUARD_SIZE, libc::PROT_NONE) }).at(Step::Fork)?;
    // SAFETY: one past the end of the mapping: the (16-byte aligned, page-aligned) top.
    Ok(unsafe { stack.cast::<u8>().add(GUARD_SIZE + INIT_STACK_SIZE).cast() })
}

/// The address of this thread's tid in glibc's `struct pthread`, which the payload's clone shares
/// and the kernel must write the payload's own tid into (`init.rs`): glibc's `fork` gave it to
/// the kernel as `clear_child_tid`, which `PR_GET_TID_ADDRESS` returns. Null when the kernel
/// lacks that call (no `CONFIG_CHECKPOINT_RESTORE`) or the word there is not our tid (a caller
/// not forked by glibc): the payload then keeps A's tid in it, a host pid no thread of the
/// sandbox's pid namespace is likely to have.
fn own_tid_address() -> *mut libc::pid_t {
    let mut addr: *mut libc::pid_t = std::ptr::null_mut();
    // SAFETY: the kernel writes one pointer into `addr`.
    let r = unsafe {
        libc::prctl(
            libc::PR_GET_TID_ADDRESS,
            std::ptr::from_mut(&mut addr) as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 || addr.is_null() {
        return std::ptr::null_mut();
    }
    // SAFETY: glibc's struct pthread of this thread, mapped for the process's life; read only.
    let here = unsafe { addr.read_volatile() };
    // SAFETY: gettid takes no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    if here == tid {
        addr
    } else {
        std::ptr::null_mut()
    }
}

/// `set_tid_address`, raw (`raw.rs`): what the kernel zeroes (and wakes) when this thread exits.
fn set_tid_address(addr: *mut libc::pid_t) -> libc::pid_t {
    // SAFETY: the kernel only stores the pointer; it always succeeds and returns our tid.
    let tid =
        unsafe { crate::raw::syscall6(libc::SYS_set_tid_address, [addr as usize, 0, 0, 0, 0, 0]) };
    tid as libc::pid_t
}

/// A's robust-futex list (glibc registers the `struct pthread`'s list head with the kernel, which
/// walks it when the thread exits): `(head, len)`, from `get_robust_list`, raw.
fn robust_list() -> (usize, usize) {
    let (mut head, mut len) = (0usize, 0usize);
    // SAFETY: the kernel writes one pointer and one size_t, both on our stack.
    let r = unsafe {
        crate::raw::syscall6(
            libc::SYS_get_robust_list,
            [
                0,
                std::ptr::from_mut(&mut head) as usize,
                std::ptr::from_mut(&mut len) as usize,
                0,
                0,
                0,
            ],
        )
    };
    if r < 0 { (0, 0) } else { (head, len) }
}

/// `set_robust_list(head, len)`, raw; a null head unregisters (with the kernel's size as `len`).
fn set_robust_list(head: usize, len: usize) {
    // SAFETY: the kernel only stores the pointer, which is glibc's list head or null.
    unsafe { crate::raw::syscall6(libc::SYS_set_robust_list, [head, len, 0, 0, 0, 0]) };
}

/// What the init ("B") gets from A, in A's frame, which A keeps until it exits (the payload
/// reads it too, and runs `payload`, which lives in A's frames).
struct InitArgs<'a> {
    p: &'a Prepared,
    fds: &'a SetupFds,
    /// The report pipe's read end (A's) and write end (B's and the payload's).
    report: [RawFd; 2],
    /// A's signal mask, for the payload (B is born with every signal blocked).
    payload_mask: SigSet,
    /// The top of the payload's own stack.
    payload_stack: *mut libc::c_void,
    /// See [`own_tid_address`].
    tid: *mut libc::pid_t,
    payload: *mut (dyn FnMut() -> i32 + 'a),
}

/// Steps 5-8 for [`enter_sandbox_then`]: as [`enter_namespaces_and_fork`], with B and C cloned
/// (`CLONE_VM`): A, B and C share one memory. Returns only on failure, once B and C are gone (B
/// reaped: an init's exit waits for every other process of its pid namespace) and if C never
/// started `payload`; on success writes `P<init pid>\n` to `report` and exits (`E<why>\n` and
/// exit 1 on a failure after C started).
///
/// B shares A's memory: while B builds the root and clones the payload, A only waits on the
/// report pipe (so B may read `Prepared` and write `errno`, which is in A's thread-local storage,
/// until then). From the clone of B on, A makes raw system calls only, with every signal blocked,
/// and never returns into its caller unless C is dead or was never made: C runs Python on this
/// memory (`init.rs`, `clone_payload_and_serve`: the reasoning for all three).
fn enter_namespaces_and_clone(
    p: &Prepared,
    fds: SetupFds,
    deadline: Instant,
    report: RawFd,
    payload: &mut dyn FnMut() -> i32,
) -> StepError {
    let (report_r, report_w) = match enter_namespaces(p, &fds) {
        Ok(pipe) => pipe,
        Err(e) => return e,
    };
    let stacks = map_stack().and_then(|b| Ok((b, map_stack()?)));
    let (init_stack, payload_stack) = match stacks {
        Ok(stacks) => stacks,
        Err(e) => return e,
    };
    let tid = own_tid_address();
    // Set by C as it starts the caller's closure. From then on this memory's heap, locks and (in
    // the zygote) interpreter may be half-changed by a C that is killed on a failure after it
    // started (B's capabilities refused, the setup deadline while B finishes):
    // A must then not return into its caller, failure or not.
    let started = AtomicBool::new(false);
    let mut marked = || -> i32 {
        started.store(true, Ordering::SeqCst);
        payload()
    };
    let mut caller_mask = SigSet::empty();
    if let Err(e) = pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut caller_mask),
    ) {
        return StepError::new(Step::Signals, e);
    }
    let args = InitArgs {
        p,
        fds: &fds,
        report: [report_r.as_raw_fd(), report_w.as_raw_fd()],
        payload_mask: caller_mask,
        payload_stack,
        tid,
        payload: std::ptr::from_mut(&mut marked),
    };
    // A's exit must not zero the tid word C will use (the kernel does so for a clear_child_tid
    // while other tasks share the memory), whenever A exits: even killed.
    let own_tid = set_tid_address(std::ptr::null_mut());
    // Likewise A's robust-futex list, which is the struct pthread's and so C's from now on: A's
    // exit must not walk it (it would only touch futexes whose owner is A's tid, and wake one
    // waiter of a pending one, but C's locks are none of A's business).
    let robust = robust_list();
    set_robust_list(0, robust.1.max(std::mem::size_of::<[usize; 3]>()));
    // SAFETY: the stack is B's alone, its top 16-byte aligned (a page-aligned mapping); B runs
    // init_main, which never returns; `args` stays in this frame, unchanged, until A exits or
    // returns with B and C gone.
    let cloned = unsafe {
        libc::clone(
            init_main,
            init_stack,
            libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::from_ref(&args).cast_mut().cast(),
        )
    };
    let result = if cloned < 0 {
        Err(StepError::new(Step::Fork, Errno::last()))
    } else {
        // From here until B is reaped: raw system calls only, every signal blocked (C may run
        // Python on this memory at any time).
        let _ = crate::raw::close(report_w.as_raw_fd());
        std::mem::forget(report_w);
        let result = read_until_eof(report_r.as_fd(), deadline);
        if result.is_ok() {
            // Success: the report, and exit here, never back into the caller (Python).
            let mut line = [0u8; 16];
            let n = format_report(cloned, &mut line);
            let _ = crate::raw::write_all(report, &line[..n]);
            crate::raw::exit_group(0);
        }
        // B is our child, so its pid cannot have been reused; killing the init kills the whole
        // pid namespace, and B is reaped only once every other process of it has exited.
        let _ = crate::raw::kill(cloned, libc::SIGKILL);
        while let Err(Errno::EINTR) = crate::raw::wait4(cloned, 0) {}
        if started.load(Ordering::SeqCst)
            && let Err(e) = &result
        {
            // C ran the closure and was killed in it: report, raw, and exit here.
            let mut line = [0u8; 160];
            let n = format_failure(e, &mut line);
            let _ = crate::raw::write_all(report, &line[..n]);
            crate::raw::exit_group(1);
        }
        result
    };
    // B and C are gone (or never were): A is alone with its memory again. Its tid where C's
    // was, its clear_child_tid and signal mask back, as before the clone.
    if !tid.is_null() {
        // SAFETY: the struct pthread's tid word (own_tid_address), which no one else uses now.
        unsafe { tid.write_volatile(own_tid) };
    }
    set_tid_address(tid);
    if robust.0 != 0 {
        set_robust_list(robust.0, robust.1);
    }
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&caller_mask), None);
    std::hint::black_box(&args);
    drop(fds);
    match result {
        Err(e) => e,
        // Not reached: success exits above.
        Ok(()) => StepError::new(Step::Fork, Errno::EINVAL),
    }
}

/// `P<pid>\n`, A's report to the zygote (`zygote.py`), into `buf`; returns its length.
fn format_report(pid: i32, buf: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 10];
    let mut n = 0;
    let mut v = pid.unsigned_abs();
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf[0] = b'P';
    for i in 0..n {
        buf[1 + i] = digits[n - 1 - i];
    }
    buf[1 + n] = b'\n';
    n + 2
}

/// `E<why>\n`, A's report of a failure once C had started its closure (so A cannot return into
/// its caller to report it), into `buf` without allocating (`raw.rs`: the heap may be C's,
/// half-changed); returns its length.
fn format_failure(e: &StepError, buf: &mut [u8; 160]) -> usize {
    struct Buf<'a>(&'a mut [u8], usize);
    impl std::fmt::Write for Buf<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            // Cut to what fits, one newline kept free.
            let room = self.0.len() - 1 - self.1;
            let n = s.len().min(room);
            self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
            self.1 += n;
            Ok(())
        }
    }
    let mut out = Buf(buf, 0);
    let _ = std::fmt::Write::write_fmt(
        &mut out,
        format_args!(
            "Esandbox setup failed while {} (errno {}), after the agent had started",
            e.step.describe(),
            e.errno as i32
        ),
    );
    let n = out.1;
    buf[n] = b'\n';
    n + 1
}

/// B: build the root, clone the payload and become the init (never returns).
extern "C" fn init_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is enter_namespaces_and_clone's `args`, alive and unchanged while B lives.
    let args = unsafe { &*arg.cast::<InitArgs<'_>>() };
    let [report_r, report_w] = args.report;
    // B has copies of A's descriptors, not A's table: A's end goes.
    // SAFETY: B's own copy, closed once.
    unsafe { libc::close(report_r) };
    // SAFETY: B's copy of the write end, open until B's `close_from` (and the payload's `close`).
    let report = unsafe { BorrowedFd::borrow_raw(report_w) };
    let built = setup_root(args.p, args.fds);
    // The payload must not inherit a way back to the template's or the disk's mounts.
    args.fds.close_copies();
    let failed = match built {
        Ok(()) => match clone_payload_and_serve(
            report,
            args.p,
            &args.payload_mask,
            args.payload_stack,
            args.tid,
            args.payload,
        ) {
            Ok(never) => match never {},
            Err(e) => e,
        },
        Err(e) => e,
    };
    // C was never made: libc is still B's to use.
    write_record(report, Record::Failed(failed));
    exit_now(1)
}
