//! Where a program is looked for, exactly as glibc's `execvp(3)` looks for it. A name with a `/`
//! is executed as it is; a bare name is tried in each directory of the child's `PATH` in turn (an
//! empty entry meaning the working directory), and glibc's default `/bin:/usr/bin` when the child
//! has no `PATH`. The kernel, not a `stat` here, decides which candidate runs: the child calls
//! `execve(2)` on each until one succeeds (see `vfork::Plan::exec`), so a file that exists but
//! cannot be executed is skipped and reported the way `execvp` reports it.
//!
//! The candidate paths are built here, in the parent, because the child may not allocate.

use std::ffi::{CString, c_int};

/// glibc's `_CS_PATH`, which `execvp` searches when the environment has no `PATH`.
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// `NAME_MAX`: glibc refuses to search for a longer name (`ENAMETOOLONG`).
const NAME_MAX: usize = 255;

/// `PATH_MAX`: glibc sizes its buffer from at most this many bytes of `PATH` (terminator
/// included), and an entry that does not fit is not tried. (glibc releases differ in what they
/// do next for such a 4 KiB directory name; we go on to the next entry.)
const PATH_MAX: usize = 4096;

/// The paths to `execve` for `program`, in order, given the child's `PATH`; or the errno
/// `execvp` fails with before trying any (`ENOENT` for an empty name, `ENAMETOOLONG`).
///
/// Neither argument contains a NUL byte (the caller has checked).
pub(crate) fn candidates(program: &[u8], path: Option<&[u8]>) -> Result<Vec<CString>, c_int> {
    if program.is_empty() {
        return Err(libc::ENOENT);
    }
    if program.contains(&b'/') {
        return Ok(vec![cstring(program.to_vec())]);
    }
    if program.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    let path = path.unwrap_or(DEFAULT_PATH);
    let buffer = path.len().min(PATH_MAX - 1) + 1;
    Ok(path
        .split(|&b| b == b':')
        .filter(|dir| dir.len() < buffer)
        .map(|dir| {
            let mut full = Vec::with_capacity(dir.len() + 1 + program.len() + 1);
            full.extend_from_slice(dir);
            if !dir.is_empty() {
                full.push(b'/');
            }
            full.extend_from_slice(program);
            cstring(full)
        })
        .collect())
}

/// A `CString` from bytes known to hold no NUL.
fn cstring(bytes: Vec<u8>) -> CString {
    CString::new(bytes).expect("checked for NUL by the caller")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(program: &str, path: Option<&str>) -> Result<Vec<String>, c_int> {
        candidates(program.as_bytes(), path.map(str::as_bytes))
            .map(|all| all.into_iter().map(|c| c.into_string().unwrap()).collect())
    }

    #[test]
    fn a_name_with_a_slash_is_not_searched() {
        assert_eq!(paths("/bin/sh", Some("/x")).unwrap(), ["/bin/sh"]);
        assert_eq!(paths("./run", None).unwrap(), ["./run"]);
    }

    #[test]
    fn a_bare_name_is_tried_in_each_path_entry() {
        assert_eq!(
            paths("ls", Some("/usr/bin::/bin")).unwrap(),
            ["/usr/bin/ls", "ls", "/bin/ls"]
        );
        assert_eq!(paths("ls", None).unwrap(), ["/bin/ls", "/usr/bin/ls"]);
        assert_eq!(paths("ls", Some("")).unwrap(), ["ls"]);
    }

    #[test]
    fn what_execvp_refuses_before_searching() {
        assert_eq!(paths("", Some("/bin")), Err(libc::ENOENT));
        assert_eq!(
            paths(&"x".repeat(NAME_MAX + 1), Some("/bin")),
            Err(libc::ENAMETOOLONG)
        );
        assert_eq!(paths(&"x".repeat(NAME_MAX), Some("/bin")).unwrap().len(), 1);
    }

    #[test]
    fn an_entry_longer_than_glibcs_buffer_is_skipped() {
        let long = format!("/{}", "d".repeat(PATH_MAX));
        let path = format!("{long}:/bin");
        assert_eq!(paths("sh", Some(&path)).unwrap(), ["/bin/sh"]);
    }
}
