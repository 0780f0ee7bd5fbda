//! Starting programs through `clone(CLONE_VM | CLONE_VFORK)`: how a program is found (as
//! `execvp` finds it), what the child inherits (signal mask and dispositions, descriptors), what a
//! failed setup step says, and spawning from many threads at once.
//!
//! One test closes our fd 0, so these run in their own test binary.

mod common;

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{PATH, collect, run};
use sandboxd_proc::{Io, Process, SpawnError, SpawnOptions, User};

/// Writes an executable script. A `sh` of its own writes it, not this process: a file this process
/// held open for writing would be inherited, until its `execve`, by every child another test thread
/// starts meanwhile, and running the script would then fail with ETXTBSY ("Text file busy"; seen
/// twice in ~45 runs of this binary under load).
fn executable(path: &Path, text: &str) {
    let status = std::process::Command::new("/bin/sh")
        .args([
            "-c",
            "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
            "sh",
            text,
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "writing {} failed", path.display());
}

/// A line of `/proc/self/status` (for the thread: `/proc/thread-self/status`).
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_owned()
}

#[test]
fn a_script_without_shebang_runs_with_sh() {
    let dir = tempfile::tempdir().unwrap();
    executable(&dir.path().join("plain"), "echo \"ran $0 $1\"\n");
    let mut opts = SpawnOptions::new("plain").args(["arg"]);
    opts.path = Some(format!("{}:{PATH}", dir.path().display()).into());
    let out = run(&opts);
    assert!(out.end().success(), "{:?}", out.end());
    assert_eq!(
        out.stdout_str(),
        format!("ran {}/plain arg\n", dir.path().display())
    );
}

#[test]
fn path_search_skips_what_it_cannot_run_and_reports_eacces() {
    let denied = tempfile::tempdir().unwrap();
    let allowed = tempfile::tempdir().unwrap();
    std::fs::write(denied.path().join("tool"), "#!/bin/sh\necho denied\n").unwrap();
    executable(&allowed.path().join("tool"), "#!/bin/sh\necho allowed\n");

    let mut opts = SpawnOptions::new("tool");
    opts.path = Some(format!("/nonexistent:{}", denied.path().display()).into());
    let err = Process::spawn(&opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let inner = err.get_ref().unwrap().downcast_ref::<SpawnError>().unwrap();
    assert_eq!(inner.os_error().raw_os_error(), Some(libc::EACCES));
    assert_eq!(
        err.to_string(),
        format!("cannot start 'tool': {}", inner.os_error())
    );

    let path = format!(
        "{}:/nonexistent:{}",
        denied.path().display(),
        allowed.path().display()
    );
    opts.path = Some(path.into());
    let out = run(&opts);
    assert_eq!(out.stdout_str(), "allowed\n");
}

#[test]
fn without_path_the_default_is_searched() {
    // glibc's execvp searches /bin:/usr/bin when the environment has no PATH.
    let out = run(&SpawnOptions::new("true"));
    assert!(out.end().success(), "{:?}", out.end());
}

#[test]
fn nul_bytes_are_refused() {
    let err = Process::spawn(&SpawnOptions::new("/bin/echo").args(["a\0b"])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("nul byte"), "{err}");
    let err = Process::spawn(&SpawnOptions::new("/bin/true").env("K", "v\0")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

#[test]
fn child_has_no_blocked_signals_and_default_sigpipe_and_our_mask_is_kept() {
    // The test harness ignores SIGPIPE (Rust's runtime does); the child must not. Nor glibc's 32
    // and 33, which a posix_spawn parent (GNU make, so CI) leaves ignored in the harness.
    let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let mut opts = SpawnOptions::new("cat").args(["/proc/self/status"]);
    opts.path = Some(PATH.into());
    let out = run(&opts);
    let status = out.stdout_str();
    assert_eq!(status_field(&status, "SigBlk:"), "0000000000000000");
    let ignored = u64::from_str_radix(&status_field(&status, "SigIgn:"), 16).unwrap();
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE ignored");
    assert_eq!(ignored & (1 << (libc::SIGXFSZ - 1)), 0, "SIGXFSZ ignored");
    assert_eq!(ignored, 0, "{ignored:x} ignored");
    let after = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert_eq!(
        status_field(&after, "SigBlk:"),
        status_field(&ours, "SigBlk:")
    );
}

#[test]
fn a_failed_setup_step_is_named() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The cwd exists (the parent's check passes) but `nobody` may not enter it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut opts = SpawnOptions::new("/bin/true");
    opts.user = Some(User::lookup("nobody").unwrap());
    opts.cwd = Some(dir.path().to_owned());
    let err = Process::spawn(&opts).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    let inner = err.get_ref().unwrap().downcast_ref::<SpawnError>().unwrap();
    assert_eq!(inner.program(), "/bin/true");
    assert_eq!(inner.os_error().raw_os_error(), Some(libc::EACCES));
    let text = err.to_string();
    assert!(
        text.starts_with("cannot start '/bin/true': chdir to '")
            && text.contains(&*dir.path().to_string_lossy()),
        "{text}"
    );
}

#[test]
fn spawning_from_many_threads_at_once() {
    let threads: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..40 {
                    let io = if i % 4 == 0 {
                        Io::Pty(sandboxd_proc::WinSize::default())
                    } else {
                        Io::Pipes { stdin: false }
                    };
                    let opts = common::sh(&format!("echo {t}-{i}")).io(io);
                    let out = run(&opts);
                    assert!(out.end().success());
                    let text = format!("{}{}", out.stdout_str(), out.pty_str());
                    assert_eq!(text.trim_end(), format!("{t}-{i}"));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

// Closing fd 0 is what this test is about; nothing else in this binary reads stdin.
#[allow(unsafe_code)]
#[test]
fn works_with_our_stdin_closed() {
    // SAFETY: fd 0 is not owned by any Rust object in this test binary.
    unsafe { libc::close(0) };
    // New descriptors now start at 0: the child's ends must still land on the right numbers.
    let mut opts = SpawnOptions::new("cat").io(Io::Pipes { stdin: true });
    opts.path = Some(PATH.into());
    let process = Process::spawn(&opts).unwrap();
    process.write_stdin(b"in", Duration::from_secs(5)).unwrap();
    process.close_stdin().unwrap();
    let out = collect(&process);
    assert!(out.end().success(), "{:?}", out.end());
    assert_eq!(out.stdout, b"in");
    let out = run(&common::sh("echo out; echo err >&2"));
    assert_eq!(
        (out.stdout_str().as_str(), &out.stderr[..]),
        ("out\n", &b"err\n"[..])
    );
}
