//! The threads that follow processes (`proc-<pid>`), kept for the next process for a moment
//! after theirs ended instead of exiting at once.
//!
//! Why: a command as short as `/bin/true` made and ended a thread per process, and both ends sat
//! on its round trip. The start (`clone3`, the stack's `mmap` and guard, two `rt_sigprocmask`
//! in the caller, the new thread's own set-up) ran on the event loop's thread while the child
//! exec'd, and the new thread usually took the loop's CPU from it before the start event was
//! written; the exit (the stack given back, thread-local destructors, the kernel's task exit)
//! ran right after the thread had written the subscriber's eventfd, on the CPU where that write
//! had just woken the event loop, which then waited for it. A thread kept here waits on a
//! condition variable instead: handing it the next process is a futex wake, and after its
//! eventfd write it only goes back to waiting. std's threads and a condition variable, not a
//! thread-pool crate: the pool is a list of at most [`KEEP_IDLE`] waiting threads, nothing more.
//!
//! A kept thread that gets no process for [`IDLE_FOR`] exits, so an idle agent holds no more
//! threads (nor their stacks) than before. After a `fork` (a sandbox's agent is forked from a
//! zygote) the parent's kept threads do not exist in the child, so the child must never hand a
//! process to one: a `pthread_atfork` handler marks the child, which then never uses the list (nor
//! its lock, which a parent's thread may have held at the fork: [`run`]); and the list belongs to
//! the process id that filled it (a `clone` that bypasses libc's `fork` runs no handler; such a
//! child has the same lock left held if a thread held it at the clone, which nothing here does).
//! The pid alone would not do: a child in a new pid namespace may get the very number its parent
//! had in its own.
#![allow(unsafe_code)] // `pthread_atfork`, registered once; its handler only stores an atomic

use std::ffi::CString;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use crate::fanout::lock;

/// Threads kept waiting at most: two, enough for commands started one after another (the
/// round trip the pool is for) and for a pair that overlaps; a burst of starts makes new threads
/// as before.
pub(crate) const KEEP_IDLE: usize = 2;

/// How long a kept thread waits for a process before it exits: 250 ms, far longer than the gap
/// between the commands of one client's sequence, and shorter than the agent's idle trim (1 s
/// after its last request, `agent/idle.py`), so that what a thread's exit hands back to the malloc
/// arena (its cache of freed chunks) is there before the trim runs. Idle RSS after 20 commands,
/// pool on and off in the same build: equal (docs/benchmarks.md, `rtt11`).
pub(crate) const IDLE_FOR: Duration = Duration::from_millis(250);

/// Stack size of a reader thread. It holds a few frames and no large locals (the read buffer is
/// on the heap), so 256 KiB is ample and keeps 100s of processes cheap.
const STACK_BYTES: usize = 256 * 1024;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// One kept thread's mailbox: the next job and its thread name, and the variable it waits on.
#[derive(Default)]
struct Slot {
    next: Mutex<Option<(CString, Job)>>,
    given: Condvar,
}

/// The kept threads, newest last, and the process id they belong to.
struct Idle {
    owner: u32,
    slots: Vec<Arc<Slot>>,
}

static IDLE: Mutex<Idle> = Mutex::new(Idle {
    owner: 0,
    slots: Vec::new(),
});

/// Set in a forked child (by [`forked_child`]) of a process that had used the list, and kept set:
/// the list's threads were the parent's, and its lock may be held for good (see [`run`]).
static FORKED: AtomicBool = AtomicBool::new(false);

static AT_FORK: Once = Once::new();

/// `pthread_atfork`'s child handler: one atomic store (async-signal-safe, as a handler run in the
/// child of a multithreaded process must be).
extern "C" fn forked_child() {
    FORKED.store(true, Ordering::SeqCst);
}

/// Runs `job` on a reader thread named `name`: a kept one if one is waiting, else a new one.
pub(crate) fn run(name: String, job: Job) -> io::Result<()> {
    AT_FORK.call_once(|| {
        // SAFETY: registers a handler that only stores to a static atomic; the call has no other
        // precondition. If it fails (ENOMEM) the pid check below still catches a plain fork.
        let _ = unsafe { libc::pthread_atfork(None, None, Some(forked_child)) };
    });
    if FORKED.load(Ordering::SeqCst) {
        // A forked child of a process that had used the list never touches it: a fork while one of
        // the parent's threads held its lock (putting itself on the list or taking itself off)
        // left the child's copy locked by a thread the child does not have, and the child's first
        // start waited for it for ever (review8). Its threads are made and end, as before the
        // list; the runtime's agents are forked from a zygote that never used it, and keep theirs.
        return spawn_thread(name, None, job);
    }
    let me = std::process::id();
    let kept = {
        let mut idle = lock(&IDLE);
        if idle.owner != me {
            // Never filled, or filled before a `clone` that ran no fork handler (see the module's
            // docs): those threads are not ours.
            idle.slots.clear();
            idle.owner = me;
        }
        idle.slots.pop()
    };
    if let Some(slot) = kept {
        let name = CString::new(name).unwrap_or_default();
        *lock(&slot.next) = Some((name, job));
        slot.given.notify_one();
        return Ok(());
    }
    spawn_thread(name, Some(me), job)
}

/// A new reader thread for `job`, kept for the next ones after it when `owner` is the process's id
/// (`None`: it ends with its job).
fn spawn_thread(name: String, owner: Option<u32>, job: Job) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(STACK_BYTES)
        .spawn(move || {
            job();
            if let Some(owner) = owner {
                follow_processes(owner);
            }
        })
        .map(drop)
}

/// A reader thread's life after its first job: while it can be kept, the next ones.
fn follow_processes(owner: u32) {
    let slot = Arc::new(Slot::default());
    loop {
        {
            let mut idle = lock(&IDLE);
            if idle.owner != owner || idle.slots.len() >= KEEP_IDLE {
                return;
            }
            idle.slots.push(Arc::clone(&slot));
        }
        let Some((name, job)) = wait_for_job(&slot) else {
            return;
        };
        // The thread's name follows its process (`proc-<pid>`), as a new thread's would.
        let _ = nix::sys::prctl::set_name(&name);
        job();
    }
}

/// Waits for a job in `slot` for [`IDLE_FOR`]; `None` when none came and the slot was taken off
/// the list (the thread exits). A slot that was taken off by [`run`] gets its job: wait for it.
fn wait_for_job(slot: &Arc<Slot>) -> Option<(CString, Job)> {
    let deadline = Instant::now() + IDLE_FOR;
    let mut next = lock(&slot.next);
    loop {
        if let Some(found) = next.take() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(next);
            {
                let mut idle = lock(&IDLE);
                if let Some(at) = idle.slots.iter().position(|s| Arc::ptr_eq(s, slot)) {
                    idle.slots.remove(at);
                    return None;
                }
            }
            // `run` popped this slot and is about to fill it.
            next = lock(&slot.next);
            while next.is_none() {
                next = slot.given.wait(next).unwrap_or_else(|e| e.into_inner());
            }
            continue;
        }
        next = slot
            .given
            .wait_timeout(next, left)
            .map(|(guard, _)| guard)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// The only test in this binary that runs jobs (the processes' tests are integration tests,
    /// each its own binary), so the kept threads here are this test's.
    #[test]
    fn a_kept_thread_runs_the_next_job_under_its_name_and_leaves_when_idle() {
        let (tx, rx) = mpsc::channel::<(libc::pid_t, String)>();
        let job = |tx: mpsc::Sender<(libc::pid_t, String)>| -> Job {
            Box::new(move || {
                let name = std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                tx.send((nix::unistd::gettid().as_raw(), name.trim_end().to_owned()))
                    .unwrap();
            })
        };
        run("readers-one".into(), job(tx.clone())).unwrap();
        let (one, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(name, "readers-one");
        // Back to waiting by then; the next job must land on the same thread, renamed.
        std::thread::sleep(Duration::from_millis(100));
        run("readers-two".into(), job(tx.clone())).unwrap();
        let (two, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(two, one, "a new thread was made while one was kept");
        assert_eq!(name, "readers-two");
        // Idle for longer than IDLE_FOR: it has left, and the list is empty.
        std::thread::sleep(IDLE_FOR + Duration::from_millis(500));
        assert!(
            !std::path::Path::new(&format!("/proc/self/task/{two}")).exists(),
            "a kept thread outlived IDLE_FOR"
        );
        assert!(lock(&IDLE).slots.is_empty());
        // And a job after that gets a new thread.
        run("readers-three".into(), job(tx)).unwrap();
        let (three, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_ne!(three, one);
        assert_eq!(name, "readers-three");

        // A kept thread waits now (readers-three's). A forked child has no such thread: a job it
        // runs must get a new one, not be handed to the parent's and never run.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(lock(&IDLE).slots.len(), 1);
        assert_eq!(
            a_forked_child_runs_a_job("readers-child", None::<()>),
            0,
            "a forked child's job went to a thread it does not have"
        );

        // A fork while one of our threads holds the list's lock (a kept thread putting itself on
        // it, or taking itself off): the child's copy of the lock stays held, by a thread the child
        // does not have. Its jobs must still run, not wait for that lock for ever (review8). This
        // thread holding the lock across the fork is that moment, made certain.
        let held = lock(&IDLE);
        assert_eq!(
            a_forked_child_runs_a_job("readers-locked", Some(held)),
            0,
            "a child forked while the list was locked did not run its job"
        );
    }

    /// Forks; the child runs one job through [`run`] (a pipe write) and exits 0 once it has seen it
    /// run within 5 s (its `alarm` ends it if it hangs); the child's exit code. `held`, a guard the
    /// caller holds across the fork, is let go in the parent once the child is forked.
    fn a_forked_child_runs_a_job<T>(name: &str, held: Option<T>) -> i32 {
        let (read, write) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only runs the pool's own code, a pipe write, `alarm` and `_exit`.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // SAFETY: `alarm` has no preconditions; its SIGALRM ends a child that hangs.
                unsafe { libc::alarm(5) };
                let ran = run(
                    name.into(),
                    Box::new(move || {
                        let _ = nix::unistd::write(&write, b"x");
                    }),
                )
                .is_ok();
                let mut fds = [nix::poll::PollFd::new(
                    std::os::fd::AsFd::as_fd(&read),
                    nix::poll::PollFlags::POLLIN,
                )];
                let got = nix::poll::poll(&mut fds, 5000u16).unwrap_or(0) == 1;
                // SAFETY: ends the child without running the test harness's exit path.
                unsafe { libc::_exit(if ran && got { 0 } else { 1 }) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(held);
                match nix::sys::wait::waitpid(child, None).unwrap() {
                    nix::sys::wait::WaitStatus::Exited(_, code) => code,
                    other => panic!("the forked child ended as {other:?}"),
                }
            }
        }
    }
}
