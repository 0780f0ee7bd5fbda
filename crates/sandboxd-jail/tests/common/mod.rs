//! Shared helpers for the root-only sandbox tests: the template, sandboxes that clean up after
//! themselves even when a test fails, and running a shell script inside one.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sandboxd_jail::{InitCommand, Limits, SandboxHandle, SandboxSpec, build_base_template};

/// How long a test waits for a sandbox's payload to finish.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// True when the tests can run (root); otherwise prints why the caller is skipped.
pub fn can_run(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("{test}: skipped (needs root)");
        false
    }
}

/// The built-in template, built once per test process under the target dir's temp area.
pub fn template() -> &'static Path {
    static T: OnceLock<PathBuf> = OnceLock::new();
    T.get_or_init(|| {
        // Exited sandbox inits come back to us to be reaped (this VM's PID 1 never reaps).
        sandboxd_jail::become_subreaper().expect("PR_SET_CHILD_SUBREAPER");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sandboxd-jail-template");
        build_base_template(&dir).expect("build template");
        dir
    })
}

/// A sandbox for one test. Dropping it kills the sandbox, removes its cgroup and its dirs.
pub struct TestSandbox {
    pub handle: SandboxHandle,
    pub spec: SandboxSpec,
    dir: Option<tempfile::TempDir>,
}

impl TestSandbox {
    /// Guards a sandbox started by the test itself.
    pub fn from_parts(handle: SandboxHandle, spec: SandboxSpec, dir: tempfile::TempDir) -> Self {
        TestSandbox {
            handle,
            spec,
            dir: Some(dir),
        }
    }

    /// A file of the sandbox, read from its upper layer on the host.
    pub fn upper_file(&self, path_inside: &str) -> PathBuf {
        self.spec
            .upper_dir
            .join(path_inside.trim_start_matches('/'))
    }

    /// Waits for the payload to exit, then returns what it wrote to `/tmp/out`.
    pub fn output(&self) -> String {
        assert!(
            self.handle.wait(RUN_TIMEOUT).unwrap(),
            "sandbox {} did not finish",
            self.spec.id
        );
        fs::read_to_string(self.upper_file("/tmp/out")).unwrap_or_default()
    }

    /// The sandbox's own directory on the host (holds upper/, work/, merged/).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        if let Err(e) = self.handle.kill() {
            eprintln!("cleanup of {}: {e}", self.spec.id);
        }
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
        remove_empty_cgroup_parents();
    }
}

/// Removes the shared `sandboxd` parent cgroups the tests created, if no sandbox is left in them
/// (rmdir of a cgroup with children fails with EBUSY, so this never disturbs a live sandbox).
pub fn remove_empty_cgroup_parents() {
    let parent = sandboxd_jail::CGROUP_PARENT;
    let mut candidates = vec![Path::new("/sys/fs/cgroup").join(parent)];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        candidates.extend(entries.flatten().map(|e| e.path().join(parent)));
    }
    for c in candidates {
        let _ = fs::remove_dir(c);
    }
}

/// A unique sandbox id for `name` in this test process.
pub fn test_id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// A spec in a fresh temp dir under /tmp (same filesystem for upper and work).
pub fn spec(name: &str) -> (SandboxSpec, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("sandboxd-jail-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let spec = SandboxSpec::new(test_id(name), template(), dir.path());
    (spec, dir)
}

/// The environment a payload gets in these tests.
pub fn env() -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

/// Starts a sandbox whose payload is `bash -c script`.
pub fn start(name: &str, script: &str, limits: Limits) -> TestSandbox {
    let (mut spec, dir) = spec(name);
    spec.limits = limits;
    start_with(spec, dir, script)
}

/// Starts `bash -c script` in a sandbox made from `spec`.
pub fn start_with(spec: SandboxSpec, dir: tempfile::TempDir, script: &str) -> TestSandbox {
    let handle = sandboxd_jail::spawn_sandbox(
        &spec,
        InitCommand::Exec {
            program: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            env: env(),
            cwd: None,
        },
    )
    .unwrap_or_else(|e| panic!("spawn_sandbox {}: {e}", spec.id));
    TestSandbox {
        handle,
        spec,
        dir: Some(dir),
    }
}

/// Runs `script` in a new sandbox (its stdout and stderr go to `/tmp/out`) and returns the output.
pub fn run(name: &str, script: &str) -> String {
    let sb = start(
        name,
        &format!("exec >/tmp/out 2>&1\n{script}"),
        Limits::default(),
    );
    sb.output()
}
