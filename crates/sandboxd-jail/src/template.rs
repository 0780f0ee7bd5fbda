//! The built-in template: a minimal root filesystem that runs the host's programs (the host's
//! `/usr`, bind-mounted read-only at start) with a private `/etc`, `/home/user`, `/root`, `/tmp`
//! and `/var`. No download, a few hundred kilobytes on disk.
//!
//! What the kernel does here: only ordinary file operations. The template becomes the read-only
//! lower layer of every sandbox's overlayfs, so it is written once and shared; a sandbox's changes
//! land in its own upper dir. `/bin`, `/sbin`, `/lib` and `/lib64` are symlinks into `/usr`, as on
//! merged-`/usr` distributions, so the dynamic loader and every `#!/bin/sh` resolve through the
//! bound `/usr`. The dynamic loader also reads `/etc/ld.so.cache` and Debian's binaries go
//! through the `/etc/alternatives` symlink farm, so both are copied (links kept as links).
//!
//! The login profile is deliberately tiny: `bash -l -c true` costs about 2 ms with it against
//! 111 ms with a full distribution profile (design doc), and every command the agent runs is a
//! login shell.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::spec::hosts_file;

/// Uid and gid of the unprivileged `user` account, as in E2B's sandboxes.
pub const USER_UID: u32 = 1000;

/// Empty directories of the root, and their modes (sticky world-writable for temp dirs, private
/// for root's home). Mount points (`usr`, `proc`, `sys`, `dev`) stay empty in the template.
const DIRS: [(&str, u32); 13] = [
    ("usr", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("tmp", 0o1777),
    ("run", 0o755),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("home", 0o755),
    ("home/user", 0o755),
    ("root", 0o700),
    ("etc", 0o755),
    ("opt", 0o755),
];

/// Top-level links into `/usr`, created when the host has the target directory.
const USR_LINKS: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// Host `/etc` entries copied as they are (symlinks stay symlinks): what the loader, Python,
/// TLS clients and common tools read. Never `shadow`, `ssh` keys or `ssl/private`.
const HOST_ETC_COPIES: [&str; 22] = [
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates.conf",
    "localtime",
    "timezone",
    "os-release",
    "debian_version",
    "mime.types",
    "protocols",
    "services",
    "networks",
    "inputrc",
    "shells",
    "login.defs",
    "gai.conf",
    "host.conf",
    "magic",
    "skel",
];

/// Host `/etc` entries copied when their name starts with one of these (Debian's Python reads
/// `/etc/python3.X/sitecustomize.py` through a symlink in `/usr`).
const HOST_ETC_PREFIXES: [&str; 1] = ["python3"];

const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
user:x:1000:1000::/home/user:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";

/// Groups: `tty` is Debian's gid 5, which the sandbox's devpts gives to new ptys; 65534 is the
/// conventional `nogroup`.
const GROUP: &str = "root:x:0:\n\
tty:x:5:\n\
user:x:1000:\n\
nogroup:x:65534:\n";

const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n\
networks: files\nprotocols: files\nservices: files\n";

/// The whole login profile: a PATH, and nothing that forks.
const PROFILE: &str = "# sandboxd: minimal login profile (kept cheap: every command runs `bash -l`).\n\
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
export PATH\n";

/// Creates (or refreshes) the built-in template root in `dir`. Idempotent: running it again
/// rewrites the generated files and re-copies the host files, atomically one by one, so it is
/// safe while sandboxes use the template (they see each file whole, old or new).
///
/// Use it with [`crate::SandboxSpec::host_usr_ro`] = `true`.
pub fn build_base_template(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for (d, mode) in DIRS {
        let p = dir.join(d);
        match fs::create_dir(&p) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    }
    chown(dir.join("home/user"), Some(USER_UID), Some(USER_UID))?;

    for name in USR_LINKS {
        if Path::new("/usr").join(name).is_dir() {
            replace_symlink(&PathBuf::from(format!("usr/{name}")), &dir.join(name))?;
        }
    }

    let etc = dir.join("etc");
    for (name, content) in [
        ("passwd", PASSWD.to_owned()),
        ("group", GROUP.to_owned()),
        ("hostname", "sandbox\n".to_owned()),
        ("hosts", hosts_file(None)),
        ("nsswitch.conf", NSSWITCH.to_owned()),
        ("profile", PROFILE.to_owned()),
        ("bash.bashrc", String::new()),
        (
            "resolv.conf",
            fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        ),
    ] {
        replace_file(&etc.join(name), content.as_bytes(), 0o644)?;
    }
    replace_symlink(Path::new("../proc/self/mounts"), &etc.join("mtab"))?;

    let host_etc = Path::new("/etc");
    let mut names: Vec<String> = HOST_ETC_COPIES.iter().map(|s| s.to_string()).collect();
    for e in fs::read_dir(host_etc)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if HOST_ETC_PREFIXES.iter().any(|p| name.starts_with(p)) {
            names.push(name);
        }
    }
    for name in names {
        let src = host_etc.join(&name);
        if fs::symlink_metadata(&src).is_ok() {
            if let Some(parent) = etc.join(&name).parent() {
                fs::create_dir_all(parent)?;
            }
            copy_preserving(&src, &etc.join(&name))?;
        }
    }
    Ok(())
}

/// `cp -a` for one entry: files (with their mode), directories (recursively, merged into an
/// existing one), and symlinks as symlinks. Other kinds (sockets, devices) are skipped.
fn copy_preserving(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        replace_symlink(&fs::read_link(src)?, dst)
    } else if ft.is_dir() {
        if fs::symlink_metadata(dst).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(dst)?;
        }
        match fs::create_dir(dst) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        fs::set_permissions(dst, meta.permissions())?;
        for e in fs::read_dir(src)? {
            let e = e?;
            copy_preserving(&e.path(), &dst.join(e.file_name()))?;
        }
        Ok(())
    } else if ft.is_file() {
        match fs::read(src) {
            Ok(bytes) => replace_file(dst, &bytes, meta.permissions().mode() & 0o7777),
            // Unreadable host files are not for sandboxes anyway.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(()),
            Err(e) => Err(e),
        }
    } else {
        Ok(())
    }
}

/// A temporary sibling of `path`, unique to this process and call, for atomic replacement.
fn temp_sibling(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".sandboxd-tmp-{}-{n}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `path` atomically (temp file + rename) with `mode`.
fn replace_file(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(path)?;
    }
    let tmp = temp_sibling(path);
    fs::write(&tmp, content)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

/// Makes `link` a symlink to `target`, atomically replacing whatever file or link was there.
fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if fs::symlink_metadata(link).is_ok_and(|m| m.is_dir()) {
        fs::remove_dir_all(link)?;
    }
    let tmp = temp_sibling(link);
    let _ = fs::remove_file(&tmp);
    symlink(target, &tmp)?;
    fs::rename(&tmp, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_idempotently() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (chown of home/user)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        build_base_template(t.path()).unwrap();
        build_base_template(t.path()).unwrap();
        let root = t.path();
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains("user:x:1000:1000::/home/user:/bin/bash"));
        let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("var/tmp"), 0o1777);
        assert_eq!(mode("root"), 0o700);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("home/user")).unwrap().uid(),
            USER_UID
        );
        assert!(root.join("etc/ld.so.cache").exists());
        assert!(!root.join("etc/ssl/private").exists());
        assert!(!root.join("etc/shadow").exists());
        // No temporary files left behind.
        let leftovers = fs::read_dir(root.join("etc"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".sandboxd-tmp-")
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
