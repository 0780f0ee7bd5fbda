//! Recursive directory watching on Linux inotify, with envd's event semantics.
//!
//! A [`Watcher`] watches one directory, or with `recursive` every directory under it, and returns
//! what happened in batches of [`Item`]s: envd's filesystem events (CREATE, WRITE, REMOVE, RENAME,
//! CHMOD, named by their path relative to the watched directory), an explicit
//! [`Item::Overflow`] when events were lost, and [`Item::Closed`] when the watched directory is
//! gone. It runs no thread: the caller waits on its file descriptor ([`Watcher::as_raw_fd`],
//! e.g. with asyncio's `loop.add_reader`) and calls [`Watcher::read_batch`], or blocks in
//! [`Watcher::wait`] with a timeout. A [`Drainer`] wraps a watcher with a thread that reads the
//! kernel's queue as fast as the kernel fills it into a buffer bounded by bytes, for consumers that
//! cannot always be waiting on the descriptor (see `drain`).
//!
//! ```no_run
//! use std::time::Duration;
//! use sandboxd_watch::{Item, Watcher};
//!
//! let mut watcher = Watcher::new("/home/user".as_ref(), true)?;
//! loop {
//!     for item in watcher.wait(Some(Duration::from_secs(1)))? {
//!         match item {
//!             Item::Event(event) => println!("{:?} {}", event.kind, event.name),
//!             Item::Overflow { .. } => println!("events were lost"),
//!             Item::Closed => return Ok(()),
//!         }
//!     }
//! }
//! # Ok::<(), sandboxd_watch::WatchError>(())
//! ```
//!
//! # Backend: raw inotify through the `inotify` crate, not `notify`
//!
//! The watcher reads the inotify file descriptor itself, through the `inotify` crate (0.11, a
//! thin safe wrapper over `inotify_init1`/`inotify_add_watch`/`read`, the same one `notify` builds
//! on), rather than using `notify`'s inotify backend. The reasons, in order of weight:
//!
//! - **Latency.** `notify` reads inotify on its own event-loop thread (mio) and hands events over
//!   a channel, so every event pays a thread wake-up and a hop on top of the kernel's; its
//!   debouncers add a time window on top of that. Here the caller's own `poll`/`epoll` wakes up
//!   on the inotify descriptor and the same thread reads it: the kernel's write→readable latency
//!   (a few µs) is all there is.
//! - **Exact order, one event per op.** `notify` rewrites raw events into its own model (it pairs
//!   `IN_MOVED_FROM`/`IN_MOVED_TO` into rename modes with a timer, and its debouncers merge ops),
//!   while envd reports one event per inotify op in kernel order. Reading raw events keeps that
//!   order and lets this crate map each op exactly (see `mapping`).
//! - **Control of what the kernel says about the watch**: `IN_Q_OVERFLOW` becomes an explicit
//!   [`Item::Overflow`] followed by a rescan; `IN_IGNORED`, `IN_DELETE_SELF` and `IN_MOVE_SELF`
//!   drive the tree and [`Item::Closed`]; `ENOSPC`/`EMFILE` become distinct errors.
//! - **A file descriptor for asyncio and a bounded, blocking-free API.** The Python binding
//!   needs a descriptor to hand to `loop.add_reader` and a `wait(timeout)` it can call with the GIL
//!   released; `notify` owns its descriptor inside its thread.
//! - **Race-free recursion.** New directories are watched first and scanned second, with the
//!   overlap deduplicated (see `scan` and `tree`); `notify`'s recursive mode does not promise that.
//!
//! The `inotify` crate rather than `rustix` or `nix` directly: it lets us own the read buffer (64
//! KiB, many events per `read(2)`; `nix`'s `read_events` reads 4 KiB and allocates per event) and
//! keeps this crate free of `unsafe`; `rustix`'s reader would do as well but borrows its buffer for
//! its whole life, which does not fit a struct that keeps both.
//!
//! # Semantics
//!
//! - Op mapping, as envd: `IN_CREATE`/`IN_MOVED_TO` → CREATE; `IN_MODIFY` → WRITE;
//!   `IN_DELETE`/`IN_DELETE_SELF` → REMOVE; `IN_MOVED_FROM`/`IN_MOVE_SELF` → RENAME; `IN_ATTRIB` →
//!   CHMOD; several ops of one event come out as CREATE, RENAME, CHMOD, WRITE, REMOVE.
//! - A rename inside the tree is RENAME(old) then CREATE(new). A renamed directory keeps its
//!   watches, and later events under it carry the new path; a directory moved out of the tree
//!   loses its watches; one moved in is watched and its contents reported as CREATE.
//! - A directory that appears inside a recursive watch gets its watch before it is listed; each
//!   entry made inside it before then is reported once as CREATE, parents before children.
//! - Events of a subdirectory about itself (its `IN_ATTRIB`, `IN_DELETE_SELF`, `IN_MOVE_SELF`) are
//!   not reported again: its parent reports them under the child's name. The watched directory's
//!   own events are reported as [`ROOT_NAME`] (`"."`), as envd does; its deletion or move is
//!   followed by [`Item::Closed`].
//! - Children's events after they are unlinked (writes through an open descriptor) are not
//!   reported (`IN_EXCL_UNLINK`).

#![deny(unsafe_code)]

mod drain;
mod error;
mod event;
mod inotify;
mod mapping;
mod pending;
mod scan;
mod state;
mod tree;
mod tripwire;
mod watcher;

pub use drain::{
    DEFAULT_BUFFER_BYTES, Drainer, HANDBACK_ITEMS, ITEM_OVERHEAD_BYTES, TAKEOVER_AFTER,
};
pub use error::WatchError;
pub use event::{Event, EventKind, Item, ROOT_NAME};
pub use pending::DEFAULT_PENDING_CAP;
pub use tripwire::Tripwire;
pub use watcher::Watcher;
