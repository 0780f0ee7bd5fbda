//! Process and PTY spawning for the sandboxd agent, with an output fan-out that paces the process
//! to its fastest reader and never lets a stalled reader hold it (or anyone else) back.
//!
//! What the kernel does here: start a child with `clone(CLONE_VM | CLONE_VFORK)` and `execve`
//! (no copy of our page tables; see `vfork.rs`) in its own session and process group (so a
//! signal to the group reaches its whole tree), connected to us by pipes or by a pseudo-terminal;
//! we drain its output into a bounded ring, and collect its exit status with `waitpid` on its own
//! pid. When we stop reading, the pipe (64 KiB) or the PTY's line discipline fills and the kernel
//! blocks the child's `write(2)` — exactly how a shell pipeline paces a fast writer to a slow
//! reader; flow control below uses that.
//!
//! # Shape
//!
//! * [`Process::spawn`] starts a child from [`SpawnOptions`] (pipes or PTY, user, env, cwd,
//!   `oom_score_adj`); [`Process::spawn_subscribed`] also returns a subscriber that was there
//!   before the first byte, for callers that must see all of the output.
//! * One named thread per process (`proc-<pid>`; a thread whose process ended is kept up to a
//!   quarter of a second for the next one, see `readers.rs`) reads its output with `poll` + `read` in chunks
//!   of [`PIPE_CHUNK_BYTES`] (pipes) or [`PTY_CHUNK_BYTES`] (PTY), appends each read to the
//!   process's ring as a [`Chunk`] tagged [`Stream::Stdout`]/[`Stream::Stderr`]/[`Stream::Pty`],
//!   then waits for the child, reaps it and records its [`End`] (envd's mapping, Go's strings).
//!   A PTY's ~4 KiB reads are gathered into one chunk of up to [`PTY_GATHER_BYTES`] while they
//!   follow each other within [`PTY_GATHER_WAIT`] (a flood), and pushed one by one otherwise.
//! * The ring keeps the newest output up to [`DEFAULT_RING_BYTES`] (1 MiB). Readers hold a
//!   [`Cursor`] (next sequence number wanted, plus the byte offset) and call `next_batch`, which
//!   returns all available chunks up to a byte budget, a [`Lag`] when output at the cursor was
//!   evicted (exact chunks and bytes lost), and the [`End`] once everything has been read (again
//!   on every later call, so the End stays readable after exit).
//! * A [`Subscriber`] owns a cursor and an eventfd ([`Subscriber::wake_fd`]) that is readable
//!   whenever its `next_batch` would return something — for asyncio's `loop.add_reader` — and
//!   offers a blocking, bounded [`Subscriber::wait`] on a condition variable. While it lives
//!   (until dropped or [`Subscriber::close`]d) it takes part in flow control.
//!
//! # Flow control: paced by the fastest reader, bounded by the stall timeout
//!
//! The requirements: a client that keeps reading never loses output (a `cat` of a big file through
//! the SDK reads at 100–300 MB/s, far below what a pipe delivers, so a ring alone would always
//! overflow); a client that cannot keep up is dropped with a clear error and slows neither the
//! process nor the others; and one stalled client never freezes output for everyone (E2B's bug).
//! The policy:
//!
//! * When appending a chunk would evict output that a *protected* subscriber has not read yet,
//!   the reader thread waits (on a condition variable, no polling) until it advances. Only chunks
//!   every protected subscriber has read are evicted. Protected are the live subscribers that
//!   are **the most advanced** — so the process runs at the pace of its fastest attached reader,
//!   like a pipe to that reader — and those **that keep reading**: that have read at least once
//!   and have not left output unread for the stall timeout.
//! * The waits are bounded by [`SpawnOptions::stall_timeout`] ([`DEFAULT_STALL_TIMEOUT`], 2 s). A
//!   subscriber that leaves its output unread that long while the reader thread waits for it is
//!   marked stalled ([`Subscriber::is_stalled`]) and excluded from flow control for good: a
//!   stalled client delays the process at most once, by the stall timeout, and its next batch
//!   reports a [`Lag`] (the service then ends its stream with an error). A subscriber that keeps
//!   reading but more slowly than another, which has read everything and waits for more, is
//!   stalled once it has held that one back for the stall timeout in total: it cannot keep up,
//!   and it no longer slows the process or the others.
//! * A subscriber that has never read is waited for only while it is the most advanced one, so a
//!   forgotten subscription costs a reading client nothing, and a lone one the stall timeout once.
//!   A subscriber that falls behind without being protected gets a [`Lag`], and a faster one
//!   joining — including one that starts at [`StartAt::Now`], which has read everything — takes
//!   the lead.
//! * Why protect the followers that keep reading, not only the most advanced one: a client whose
//!   socket buffers are empty reads a few MiB at once, far ahead of the others, and may then stop
//!   for good (a Connect client that never reads its stream does exactly that). Were only the most
//!   advanced reader protected, the ring would then overwrite what a steady client had not read
//!   yet, and that client, not the stalled one, would be dropped.
//! * With no live, non-stalled subscriber the reader thread never waits: the ring keeps the
//!   newest output for replay ([`StartAt::Oldest`]). That includes the moment between
//!   [`Process::spawn`] and the first [`Process::subscribe`], in which a fast writer can overflow
//!   the ring (1 MiB is half a millisecond of `cat`); [`Process::spawn_subscribed`] closes that
//!   gap. Stateless reads ([`Process::next_batch`] with a cursor) are not flow-controlled.
//!   `stall_timeout` zero turns flow control off.
//! * While the reader thread waits it reads nothing, so the child blocks in `write(2)` once the
//!   pipe is full; it still exits normally (or on a signal: [`Process::signal`] never waits for
//!   the reader thread), and whatever it wrote before exiting stays in the pipe or PTY until read,
//!   so the End comes after all its output, as always. A kill of a process whose only subscriber
//!   stalled can thus see its End delayed by up to the stall timeout.
//!
//! The lock involved is the ring's mutex, which the waiting thread releases while it waits; see
//! the invariants on the fields of `fanout::Output`. Nothing else the reader thread holds is
//! needed by `next_batch`, `signal`, `close_stdin`, writes to stdin or the PTY, or subscribing.
//!
//! # Threads rather than epoll
//!
//! A thread per process is the simplest correct design here: each thread polls at most two
//! descriptors, blocks in the kernel (or, under flow control, on the ring's condition variable),
//! and naturally owns the process's `waitpid` (a shared epoll loop would need a second mechanism —
//! pidfds or `SIGCHLD` — to reap, and a flow-control wait or one stuck callback would delay every
//! process, so it would need per-process timers too). A sandbox runs tens of processes,
//! not thousands; each thread costs one kernel task and a 256 KiB stack reservation of which only
//! a few pages are touched, and 100 concurrent processes are tested. Up to two threads whose
//! processes ended wait 250 ms for the next process rather than exit (`readers.rs`: a command's
//! round trip then pays neither a thread's start nor its exit). If thousands were ever
//! needed, the `pump` loop would move onto one epoll thread without changing the ring or the API.
//!
//! # Throughput and chunk sizes (`examples/throughput.rs`, release build, this 2-core machine)
//!
//! 1 GiB of `head -c … /dev/zero` from [`Process::spawn_subscribed`] to End, one subscriber
//! reading everything, with the default 1 MiB ring unless noted. Six runs each, with the baseline
//! measured in the same runs; the machine was shared with other engineers' benchmarks (load 3–5),
//! so the spread is wide and only comparisons within a run mean much:
//!
//! | path | read size | MB/s | lost |
//! |---|---|---|---|
//! | bare `std::process` pipe, 64 KiB reads (baseline) | 64 KiB | 1040–2260 | — |
//! | pipe, flow control | 16 KiB | 720–3290 | 0 |
//! | pipe, flow control (default) | **32 KiB** | 1190–3250 | 0 |
//! | pipe, flow control | 64 KiB | 1590–3130 | 0 |
//! | pipe, 64 MiB ring (flow control never needed) | 32 KiB | 1190–2480 | 0 |
//! | pipe, flow control off (`stall_timeout` 0) | 32 KiB | 1730–3950 | 8–84 % |
//! | PTY, cooked (as envd runs it; 256 MiB, two runs) | 4 / **16** / 64 KiB | 66–91 / 68–95 / 90–110 | 0 |
//! | PTY, `stty raw` (256 MiB, two runs) | 4 / **16** / 64 KiB | 74–80 / 73–108 / 77–80 | 0 |
//! | Python: `_core` eventfd + `next_batch()` loop, 1 MiB / 64 MiB ring | 32 KiB | 1100–2400 / 1430–1810 | 0 |
//!
//! So flow control costs nothing measurable: a subscriber that keeps reading gets everything at
//! bare-pipe speed — in each run as fast as with a 64 MiB ring that never fills (the reader thread
//! and the subscriber overlap, which can beat the one-thread baseline) — where without it the same
//! subscriber lost 8–84 % of the output. The PTY line discipline hands over ~4 KiB per read
//! whatever the buffer (before flow control, on a quieter machine, it measured 110 / 111 / 119 MB/s
//! cooked and 104 / 104 / 145 MB/s raw for 4 / 16 / 64 KiB reads).
//!
//! With the kernel's 64 KiB pipe, larger pipe reads cannot help (the table above). Through the
//! whole agent they do once the stdout pipe is enlarged to 1 MiB ([`STDOUT_PIPE_BYTES`], within a
//! budget): the child and the reader thread then trade the CPU every MiB instead of every 64 KiB,
//! so pipes read up to [`PIPE_CHUNK_BYTES`] (256 KiB; the buffer grows from 32 KiB only while
//! reads fill it). A reader that empties a flooding pipe waits 50 µs before it polls again, so
//! that its reads stay large instead of following the child 4 KiB at a time (`reader.rs`,
//! `PIPE_FLOOD_NAP`). The PTY stays at envd's 16 KiB: its line discipline hands over ~4 KiB per read
//! whatever the buffer. `SpawnOptions::read_chunk_bytes` overrides them. (The table predates the
//! PTY's gathered reads, `reader::pump_pty`; docs/benchmarks.md, `pty2`, has those figures.)
#![deny(unsafe_code)]

mod errno;
mod fanout;
mod fdio;
mod hugepages;
mod library;
mod lookup;
mod malloc;
mod pipesize;
mod process;
mod pty;
pub mod pump;
mod reader;
mod readers;
mod reap;
mod ring;
mod spawn;
mod status;
mod subscriber;
mod vfork;
mod wake;

pub use errno::errno;
pub use fanout::DEFAULT_STALL_TIMEOUT;
pub use hugepages::{HUGE_PAGE_BYTES, collapse_anonymous, split_huge_mappings};
pub use library::Library;
pub use malloc::{hold_free_chunks, trim_malloc, tune_malloc};
pub use nix::sys::signal::Signal;
pub use pipesize::STDOUT_PIPE_BYTES;
pub use process::Process;
pub use pty::WinSize;
pub use reader::{PIPE_CHUNK_BYTES, PTY_CHUNK_BYTES, PTY_GATHER_BYTES, PTY_GATHER_WAIT};
pub use ring::{Batch, CHUNK_OVERHEAD_BYTES, Chunk, Cursor, DEFAULT_RING_BYTES, Lag, Stream};
pub use spawn::{Io, SpawnError, SpawnOptions, User};
pub use status::{End, signal_name};
pub use subscriber::{StartAt, Subscriber};
pub use vfork::default_ignored_glibc_signals;

#[cfg(test)]
mod tests {
    /// The binding crate shares these across threads (and releases the GIL around them).
    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::Process>();
        check::<crate::Subscriber>();
        check::<crate::Batch>();
        check::<crate::End>();
    }
}
