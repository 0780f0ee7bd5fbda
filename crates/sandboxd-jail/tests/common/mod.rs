//! Shared helpers for the root-only sandbox tests: the template, sandboxes that clean up after
//! themselves even when a test fails, and running a shell script inside one.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sandboxd_jail::{
    DEFAULT_REGISTRY, IdRegistry, InitCommand, Limits, SandboxHandle, SandboxSpec,
    build_base_template,
};

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

/// The host-wide id-range registry, as the runtime uses it: tests claim real ranges, so they
/// never collide with a runtime or another test run on the same host.
pub fn registry() -> &'static IdRegistry {
    static R: OnceLock<IdRegistry> = OnceLock::new();
    R.get_or_init(|| IdRegistry::open(Path::new(DEFAULT_REGISTRY)).expect("id registry"))
}

/// A sandbox's directory and id range for one test: released (and removed) when dropped.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    id: String,
    pub base: u32,
}

impl TestDir {
    /// A fresh temp dir under /tmp and a range claimed for sandbox `id`.
    pub fn new(id: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("sandboxd-jail-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let base = registry().claim(dir.path(), id).expect("claim an id range");
        TestDir {
            dir: Some(dir),
            id: id.to_owned(),
            base,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = registry().release(self.base, d.path(), &self.id);
            let _ = d.close();
        }
    }
}

/// A sandbox for one test. Dropping it kills the sandbox, removes its cgroup, its dirs and its
/// id range.
pub struct TestSandbox {
    pub handle: SandboxHandle,
    pub spec: SandboxSpec,
    dir: Option<TestDir>,
}

impl TestSandbox {
    /// Guards a sandbox started by the test itself.
    pub fn from_parts(handle: SandboxHandle, spec: SandboxSpec, dir: TestDir) -> Self {
        TestSandbox {
            handle,
            spec,
            dir: Some(dir),
        }
    }

    /// A file of the sandbox, read from its upper layer on the host (or, for a sandbox with a
    /// disk, through its init's root while it runs).
    pub fn upper_file(&self, path_inside: &str) -> PathBuf {
        let rel = path_inside.trim_start_matches('/');
        match self.spec.upper_dir() {
            Some(upper) => upper.join(rel),
            None => PathBuf::from(format!("/proc/{}/root", self.handle.init_pid())).join(rel),
        }
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

    /// The sandbox's own directory on the host (holds upper/, work/, merged/...).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Reads the uid/gid map of the sandbox from the host: `(inside, host, count)`.
    pub fn uid_map(&self) -> String {
        fs::read_to_string(format!("/proc/{}/uid_map", self.handle.init_pid())).unwrap()
    }
}

impl Drop for TestSandbox {
    fn drop(&mut self) {
        if let Err(e) = self.handle.kill() {
            eprintln!("cleanup of {}: {e}", self.spec.id);
        }
        drop(self.dir.take());
        remove_empty_cgroup_parents();
    }
}

/// Removes the test's instance group and the shared `sandboxd` parent, if no sandbox is left in
/// them (rmdir of a cgroup with children fails with EBUSY, so this never disturbs a live one).
pub fn remove_empty_cgroup_parents() {
    let _ = sandboxd_jail::remove_instance_if_empty(&instance());
}

/// This test process's runtime instance: its sandboxes' cgroups are `sandboxd/<instance>/<id>`.
pub fn instance() -> String {
    format!("test-{}", std::process::id())
}

/// A unique sandbox id for `name` in this test process.
pub fn test_id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// A spec in a fresh temp dir under /tmp, with its own id range, in this process's instance.
pub fn spec(name: &str) -> (SandboxSpec, TestDir) {
    let id = test_id(name);
    let dir = TestDir::new(&id);
    let mut spec = SandboxSpec::new(id, template(), dir.path(), dir.base);
    spec.instance = instance();
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

/// `bash -c script` as a payload.
pub fn bash(script: &str) -> InitCommand {
    InitCommand::Exec {
        program: "/bin/bash".into(),
        args: vec!["-c".into(), script.into()],
        env: env(),
        cwd: None,
    }
}

/// Starts `bash -c script` in a sandbox made from `spec`.
pub fn start_with(spec: SandboxSpec, dir: TestDir, script: &str) -> TestSandbox {
    let handle = sandboxd_jail::spawn_sandbox(&spec, bash(script))
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
