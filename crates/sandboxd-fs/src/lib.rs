//! The file core of sandboxd: what the agent asks the kernel to do with files.
//!
//! Plain Rust, no Python: the `sandboxd-py` crate binds it. Every function here mirrors one envd
//! filesystem behaviour (spec §3.4, §3.5, §4.1):
//!
//! * [`entry_info`] — `lstat` a path and describe it as envd's `EntryInfo` ([`entry`]);
//! * [`list_dir`] — envd's `ListDir` walk ([`walk`]);
//! * [`make_dir`], [`rename`], [`remove_all`] — `MakeDir`, `Move`, `Remove` ([`ops`]);
//! * [`FileReader`] — chunked, range-capable reads for `GET /files` ([`chunks`]);
//! * [`AtomicWriter`] — uploads that never leave a torn file for `POST /files` ([`atomic`]);
//! * [`AtomicWriter::receive_from`] — a raw upload's body moved socket → file with `splice(2)` ([`splice`]);
//! * [`read_metadata`], [`set_metadata`] — the `user.e2b.*` extended attributes ([`metadata`]).
//!
//! Errors are [`Error`]: the OS error (errno) plus the path(s) it happened on.

#![deny(unsafe_code)]

pub mod atomic;
pub mod chunks;
pub mod entry;
pub mod error;
pub mod metadata;
pub mod multipart;
pub mod ops;
pub mod splice;
pub mod users;
pub mod walk;

pub use atomic::AtomicWriter;
pub use chunks::{FileReader, READ_CHUNK};
pub use entry::{EntryInfo, FileType, entry_info, permissions_string};
pub use error::{Error, Result};
pub use metadata::{METADATA_PREFIX, Metadata, read_metadata, set_metadata};
pub use ops::{make_dir, remove_all, rename};
pub use walk::list_dir;

#[cfg(test)]
mod test_util {
    /// The process's umask, read without changing it (`umask(2)` can only be read by setting it).
    pub(crate) fn current_umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }
}
