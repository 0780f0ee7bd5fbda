"""Volumes in the jail, through the binding the zygote calls (``_core.enter_sandbox``, as root): a
host directory mounted read-write and idmapped into a real sandbox keeps canonical owners on disk,
is ``nosuid``, and a symlink that the sandbox's writable layer or a template layer plants at its
mount point never redirects it out of the sandbox's root."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandboxd import _core

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, cgroups, idmapped mounts)")

INSTANCE = f"test-volumes-{os.getpid()}"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
AS_USER = "setpriv --reuid=1000 --regid=1000 --clear-groups"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    _core.become_subreaper()  # the inits come back to this process, which reaps them
    root = tmp_path_factory.mktemp("template")
    _core.build_base_template(str(root))
    yield root
    _core.remove_instance_if_empty(INSTANCE)


@pytest.fixture(params=["image", "dir"])
def volume(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A volume's root as the jail gets it, with a file and a dir of uid 1000. ``image``: as the
    runtime keeps one, an ext4 image mounted detached, reached through its descriptor
    (``/proc/self/fd/N``, as the zygote passes it); ``dir``: a plain host directory."""
    store = tmp_path / "volume"
    store.mkdir(mode=0o700)
    fd = None
    if request.param == "image":
        _core.format_disk_image(str(store / "volume.img"), 16)
        fd = _core.mount_disk(str(store / "volume.img"))
        root = Path(f"/proc/self/fd/{fd}")
    else:
        root = store / "data"
        root.mkdir(mode=0o755)
    (root / "from-host").write_text("host\n")
    os.chown(root / "from-host", 1000, 1000)
    (root / "user-dir").mkdir()
    os.chown(root / "user-dir", 1000, 1000)
    yield root
    if fd is not None:
        os.close(fd)


class Sandbox:
    """One sandbox of this test: its dir, id range, and (once started) its init."""

    def __init__(self, tmp: Path, name: str) -> None:
        self.id = f"t{os.getpid()}-{name}"
        self.dir = tmp / f"sandbox-{name}"
        self.dir.mkdir()
        self.ids = _core.IdRegistry(_core.DEFAULT_ID_REGISTRY)
        self.base = self.ids.claim(str(self.dir), self.id)
        self.handle: _core.SandboxHandle | None = None

    def start(self, template_dirs: list[Path], volumes: list[tuple[str, str]], script: str) -> str | None:
        """Enter a sandbox from a forked child as the zygote does; the payload runs ``bash -c
        script``. Returns None once it runs, or the error the child reported."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # "A"
            os.close(r)
            try:
                where = _core.enter_sandbox(
                    self.id,
                    [str(d) for d in template_dirs],
                    str(self.dir),
                    instance=INSTANCE,
                    id_base=self.base,
                    volumes=volumes,
                )
                if where.inside:
                    os.close(w)
                    os.execve("/bin/bash", ["bash", "-c", script], ENV)
                os.write(w, b"P%d" % where.init_pid)
                os._exit(0)
            except BaseException as exc:
                os.write(w, f"E{exc}".encode()[: select.PIPE_BUF])
                os._exit(1)
        os.close(w)
        try:
            # The init holds a copy of the write end, so read A's one atomic report, not to EOF.
            assert select.select([r], [], [], TIMEOUT)[0], "no report from the sandbox's setup"
            said = os.read(r, select.PIPE_BUF).decode()
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        if said.startswith("E"):
            return said[1:]
        self.handle = _core.SandboxHandle.adopt(INSTANCE, self.id, int(said[1:]))
        return None

    def output(self) -> str:
        """Wait for the payload to exit; what it wrote to its ``/tmp/out``."""
        assert self.handle is not None
        assert select.select([self.handle.pidfd()], [], [], TIMEOUT)[0], "the payload did not finish"
        self.handle.is_running()  # reaps the init
        return (self.dir / "upper" / "tmp" / "out").read_text()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.kill()
        _core.kill_sandbox(INSTANCE, self.id)
        self.ids.release(self.base, str(self.dir), self.id)


@pytest.fixture
def sandboxes(tmp_path: Path) -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for sbx in made:
        sbx.close()


def new_sandbox(sandboxes: list[Sandbox], tmp: Path, name: str) -> Sandbox:
    sbx = Sandbox(tmp, name)
    sandboxes.append(sbx)
    return sbx


def test_a_volume_is_writable_by_user_with_canonical_owners_and_is_nosuid(
    template: Path, volume: Path, sandboxes: list[Sandbox], tmp_path: Path
) -> None:
    sbx = new_sandbox(sandboxes, tmp_path, "vol")
    script = f"""exec >/tmp/out 2>&1
ls -ln /mnt/data | awk 'NR > 1 {{print "ls", $3, $4, $9}}'
{AS_USER} sh -c 'echo inside >> /mnt/data/from-host' && echo user-appended
{AS_USER} sh -c 'echo new > /mnt/data/user-dir/new' && echo user-created
{AS_USER} touch /mnt/data/by-user-at-top 2>/dev/null && echo user-wrote-root-dir || echo user-denied-root-dir
chown 70000 /mnt/data/user-dir/new 2>/dev/null && echo chown-out-of-range || echo chown-refused
cp /usr/bin/id /mnt/data/suid-id && chmod 4755 /mnt/data/suid-id && echo "setuid-euid $({AS_USER} /mnt/data/suid-id -u)"
grep ' /mnt/data ' /proc/self/mountinfo | grep -q nosuid && echo mount-nosuid
"""
    assert sbx.start([template], [(str(volume), "/mnt/data")], script) is None
    out = sbx.output()
    for line in ("ls 1000 1000 from-host", "ls 1000 1000 user-dir", "user-appended", "user-created"):
        assert line in out, out
    # The volume's top dir is root's (0755): the sandbox's user may not write there, its root may.
    assert "user-denied-root-dir" in out, out
    assert "chown-refused" in out, out
    assert "setuid-euid 1000" in out, out  # a setuid-root file in the volume grants nothing
    assert "mount-nosuid" in out, out
    # On the host: canonical owners, whatever this sandbox's id range.
    assert (volume / "from-host").read_text() == "host\ninside\n"
    made = (volume / "user-dir" / "new").stat()
    assert (made.st_uid, made.st_gid) == (1000, 1000)
    assert (volume / "suid-id").stat().st_uid == 0  # root inside writes as canonical root
    point = (sbx.dir / "upper" / "mnt" / "data").stat()  # made in the writable layer, the sandbox root's
    assert point.st_uid == sbx.base


@pytest.mark.parametrize("where", ["upper-leaf", "upper-parent", "layer-parent", "upper-file"])
def test_a_symlink_planted_at_the_target_does_not_redirect_the_mount(
    template: Path, volume: Path, sandboxes: list[Sandbox], tmp_path: Path, where: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    sbx = new_sandbox(sandboxes, tmp_path, where)
    layers = [template]
    upper = sbx.dir / "upper"  # as an earlier life of the sandbox (a resume, a snapshot) left it
    upper.mkdir()
    if where == "upper-leaf":
        (upper / "mnt").mkdir()
        (upper / "mnt" / "data").symlink_to(victim)
    elif where == "upper-parent":
        (upper / "mnt").symlink_to("../../../../../../../../.." + str(victim))
    elif where == "layer-parent":
        layer = tmp_path / "evil-layer"
        layer.mkdir()
        (layer / "mnt").symlink_to(victim)
        layers = [layer, template]
    else:
        (upper / "mnt").mkdir()
        (upper / "mnt" / "data").write_text("not a directory")
    error = sbx.start(layers, [(str(volume), "/mnt/data")], "exit 0")
    assert error is not None, "the volume was mounted through a planted path"
    assert "volume's mount point" in error and "Not a directory" in error, error
    assert list(victim.iterdir()) == []
    with open("/proc/self/mountinfo") as f:
        assert str(victim) not in f.read()


@pytest.mark.parametrize(
    "target", ["mnt/data", "/", "/mnt/../etc", "/mnt//data", "/mnt/data/", "/proc/x", "/sys", "/dev/shm"]
)
def test_bad_targets_are_refused_before_any_mount(
    template: Path, volume: Path, sandboxes: list[Sandbox], tmp_path: Path, target: str
) -> None:
    with pytest.raises(ValueError, match="volume mount path"):
        _core.validate_volume_target(target)
    sbx = new_sandbox(sandboxes, tmp_path, "bad")
    error = sbx.start([template], [(str(volume), target)], "exit 0")
    assert error is not None and "volume mount path" in error, error


def test_volumes_are_bounded(template: Path, volume: Path, sandboxes: list[Sandbox], tmp_path: Path) -> None:
    _core.validate_volume_target("/mnt/data")
    sbx = new_sandbox(sandboxes, tmp_path, "many")
    many = [(str(volume), f"/mnt/{i}") for i in range(_core.MAX_VOLUMES + 1)]
    error = sbx.start([template], many, "exit 0")
    assert error is not None and f"at most {_core.MAX_VOLUMES} volumes" in error, error
