//! Volumes: host directories mounted read-write, idmapped, into a sandbox, and mount points that
//! the sandbox's own writable layer tries to redirect. They need root and skip cleanly otherwise.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, chown, symlink};
use std::path::Path;

use common::*;
use sandboxd_jail::{VolumeMount, spawn_sandbox};

/// A volume directory on the host for one test, owned by root (0755: the sandbox's root reaches
/// it through the idmapped mount, not through the host path).
fn volume_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("sandboxd-jail-volume-")
        .tempdir_in("/tmp")
        .unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn a_volume_keeps_canonical_owners_and_is_nosuid() {
    if !can_run("volume_owners") {
        return;
    }
    let vol = volume_dir();
    fs::write(vol.path().join("from-host"), "host\n").unwrap();
    chown(vol.path().join("from-host"), Some(1000), Some(1000)).unwrap();
    fs::create_dir(vol.path().join("user-dir")).unwrap();
    chown(vol.path().join("user-dir"), Some(1000), Some(1000)).unwrap();

    let (mut spec, dir) = spec("volowners");
    spec.volumes = vec![VolumeMount {
        host_dir: vol.path().to_owned(),
        target: "/mnt/data".into(),
    }];
    let as_user = "setpriv --reuid=1000 --regid=1000 --clear-groups";
    let sb = start_with(
        spec,
        dir,
        &format!(
            r#"exec >/tmp/out 2>&1
stat -c 'host-file %u:%g' /mnt/data/from-host
{as_user} sh -c 'echo inside >> /mnt/data/from-host && echo appended'
{as_user} sh -c 'echo new > /mnt/data/user-dir/new && echo created'
{as_user} chown 70000 /mnt/data/user-dir/new 2>/dev/null && echo chown-out-of-range || echo chown-refused
chown 70000 /mnt/data/user-dir/new 2>/dev/null && echo root-chown-out-of-range || echo root-chown-refused
grep ' /mnt/data ' /proc/self/mountinfo | grep -q nosuid && echo nosuid
grep ' /mnt/data ' /proc/self/mountinfo | grep -q nodev && echo nodev
"#
        ),
    );
    let out = sb.output();
    for want in [
        "host-file 1000:1000",
        "appended",
        "created",
        "chown-refused",
        "root-chown-refused",
        "nosuid",
        "nodev",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    assert_eq!(
        fs::read_to_string(vol.path().join("from-host")).unwrap(),
        "host\ninside\n"
    );
    let new = fs::metadata(vol.path().join("user-dir/new")).unwrap();
    assert_eq!((new.uid(), new.gid()), (1000, 1000), "canonical on disk");
    // The mount point was made in the sandbox's writable layer, owned by its root.
    let point = fs::metadata(sb.upper_file("/mnt/data")).unwrap();
    assert!(point.is_dir());
    assert_eq!(point.uid(), sb.spec.id_base);
}

/// Starts a sandbox whose writable layer already holds `plant` (made by the closure in its upper
/// dir, as an earlier life of the sandbox could have left it) and a volume at `/mnt/data`;
/// returns the error.
fn spawn_over_planted(name: &str, plant: impl FnOnce(&Path)) -> std::io::Error {
    let vol = volume_dir();
    let (mut spec, dir) = spec(name);
    spec.volumes = vec![VolumeMount {
        host_dir: vol.path().to_owned(),
        target: "/mnt/data".into(),
    }];
    let upper = spec.upper_dir().unwrap();
    fs::create_dir_all(&upper).unwrap();
    plant(&upper);
    let err = match spawn_sandbox(&spec, bash("true")) {
        Ok(handle) => {
            let _ = handle.kill();
            panic!("{name}: the volume was mounted over a planted path");
        }
        Err(e) => e,
    };
    drop(dir);
    remove_empty_cgroup_parents();
    err
}

/// What a test plants in a sandbox's upper dir before it starts.
type Plant<'a> = Box<dyn FnOnce(&Path) + 'a>;

#[test]
fn a_symlink_planted_at_or_above_the_target_is_refused_not_followed() {
    if !can_run("volume_symlink") {
        return;
    }
    let victim = tempfile::Builder::new()
        .prefix("sandboxd-jail-victim-")
        .tempdir_in("/tmp")
        .unwrap();
    let victim_path = victim.path().to_owned();
    let cases: [(&str, Plant); 4] = [
        (
            "symleaf",
            Box::new(|u: &Path| {
                fs::create_dir(u.join("mnt")).unwrap();
                symlink(&victim_path, u.join("mnt/data")).unwrap();
            }),
        ),
        (
            "symparent",
            Box::new(|u: &Path| symlink(&victim_path, u.join("mnt")).unwrap()),
        ),
        (
            "symrel",
            Box::new(|u: &Path| {
                fs::create_dir(u.join("mnt")).unwrap();
                symlink("../../../../../../../tmp", u.join("mnt/data")).unwrap();
            }),
        ),
        (
            "file",
            Box::new(|u: &Path| {
                fs::create_dir(u.join("mnt")).unwrap();
                fs::write(u.join("mnt/data"), "not a dir").unwrap();
            }),
        ),
    ];
    for (name, plant) in cases {
        let err = spawn_over_planted(name, plant);
        let msg = err.to_string();
        assert!(msg.contains("volume's mount point"), "{name}: {msg}");
        assert!(
            msg.contains("symbolic links") || msg.contains("Not a directory"),
            "{name}: {msg}"
        );
    }
    // Nothing was created in, or mounted on, the symlinks' targets on the host.
    assert_eq!(fs::read_dir(&victim_path).unwrap().count(), 0);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains(victim_path.to_str().unwrap()));
}
