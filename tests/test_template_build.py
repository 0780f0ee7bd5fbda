"""E2B's template builds through the official SDK's ``Template`` builder, against a real ``sandboxd serve``:
the steps run in a build sandbox, the result is a layer over ``base``'s (shared, not copied), and
sandboxes created from the new template see every step's effect."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import TEMPLATE_STORE, Runtime
from e2b import BuildException, Sandbox, SandboxQuery, Template, wait_for_port
from e2b.template.logger import LogEntry
from sandboxd.runtime.layers import hex_of
from sandboxd.runtime.template_builder import CUT_AFTER_S, MAX_BUILD_LAYERS
from test_escape_drills import cgroup_file
from test_template_base import _wheel


@pytest.fixture
def builds(e2b_env: Runtime, base_template: bool) -> Iterator[Runtime]:
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine (see the session's first lines)")
    yield e2b_env


def _layers(runtime: Runtime) -> dict[str, list[str]]:
    """Each template's layer digests, topmost first, as the runtime recorded them."""
    db = sqlite3.connect(f"file:{runtime.data_dir / 'sandboxd.db'}?mode=ro", uri=True)
    try:
        return {name: json.loads(layers) for name, layers in db.execute("SELECT name, layers FROM templates")}
    finally:
        db.close()


def _name() -> str:
    return f"built-{secrets.token_hex(4)}"


def _context(tmp_path: Path) -> Path:
    context = tmp_path / "context"
    (context / "app" / "sub").mkdir(parents=True)
    (context / "app" / "hello.txt").write_text("hello from the build context\n")
    (context / "app" / "sub" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (context / "single.cfg").write_text("key=value\n")
    return context


def _steps(context: Path, marker: str) -> Template:
    return (
        Template(file_context_path=str(context))
        .from_debian_image()
        # A new file, a deletion (a whiteout over base's file) and a replaced directory (opaque).
        .run_cmd(
            f"echo {marker} > /opt/marker && rm /etc/debian_version && rm -rf /usr/share/doc "
            "&& mkdir /usr/share/doc && touch /usr/share/doc/only-this",
            user="root",
        )
        .copy("app", "/home/user/app")
        .copy("single.cfg", "/etc/single/", mode=0o600)
        .set_envs({"GREETING": "hello", "SECOND": "two words"})
        .set_workdir("/home/user/work")
        .set_user("root")
        .run_cmd("id -un > /opt/step-user")
        .set_user("user")
        .run_cmd('echo "$GREETING $SECOND" > note.txt && id -un > who.txt && pwd > where.txt')
    )


def test_build_then_create_sees_every_step(builds: Runtime, tmp_path: Path) -> None:
    name = _name()
    marker = secrets.token_hex(8)
    logs: list[LogEntry] = []
    info = Template.build(_steps(_context(tmp_path), marker), name, on_build_logs=logs.append)
    assert info.template_id == name
    messages = "\n".join(entry.message for entry in logs)
    assert "[builder 1/9] RUN" in messages, messages
    assert Template.exists(name)
    assert not Template.exists(f"{name}-missing")

    sandbox = Sandbox.create(name, timeout=120)
    try:
        run = sandbox.commands.run
        assert run("cat /opt/marker").stdout == f"{marker}\n"
        assert run("test -e /etc/debian_version || echo gone").stdout == "gone\n"
        assert run("ls -A /usr/share/doc").stdout == "only-this\n"
        assert run("cat /home/user/app/hello.txt").stdout == "hello from the build context\n"
        assert run("cat /home/user/app/sub/run.sh").stdout.startswith("#!/bin/sh")
        assert run("stat -c '%U:%G' /home/user/app/hello.txt /home/user/app").stdout == "user:user\nuser:user\n"
        assert run("stat -c '%a %U' /etc/single/single.cfg").stdout == "600 user\n"
        assert run("cat /etc/single/single.cfg").stdout == "key=value\n"
        # set_envs, set_workdir and set_user are the sandbox's defaults as well as the later steps'.
        assert run("echo $GREETING; pwd; id -un").stdout == "hello\n/home/user/work\nuser\n"
        assert run("cat /opt/step-user").stdout == "root\n"
        assert run("cat note.txt who.txt where.txt").stdout == "hello two words\nuser\n/home/user/work\n"
        assert run("stat -c '%U' /home/user/work/note.txt").stdout == "user\n"
        # The runtime's own files in the build sandbox's /etc are not the template's.
        assert "build" not in run("cat /etc/hostname").stdout
    finally:
        sandbox.kill()

    # On disk the new layers are canonically owned (1000 is `user`, not the build sandbox's host range),
    # and they hold only what the steps changed: base's layer is shared, not copied. (A slow machine may
    # cut a layer between the steps: look in each of the template's own layers.)
    own = _layers(builds)[name][: -len(_layers(builds)["base"])]
    paths = [TEMPLATE_STORE / "layers" / hex_of(d) for d in own]
    (layer,) = [p for p in paths if (p / "opt" / "marker").exists()]
    assert (layer / "opt" / "marker").read_text() == f"{marker}\n"
    note = paths[0] / "home" / "user" / "work" / "note.txt"
    assert note.stat().st_uid == 1000 and note.stat().st_gid == 1000
    assert (layer / "opt" / "marker").stat().st_uid == 0
    assert not any((p / "usr" / "bin" / "bash").exists() for p in paths)
    whiteout = os.lstat(layer / "etc" / "debian_version")
    assert whiteout.st_rdev == 0 and (whiteout.st_mode & 0o170000) == 0o020000
    assert os.getxattr(layer / "usr" / "share" / "doc", "user.overlay.opaque") == b"y"
    # The runtime's trust store with its egress CA was a lower layer of the build sandboxes (the
    # runtime's trust layer), not their writes: it is in no layer of the template.
    assert not any((p / "etc/ssl/certs/ca-certificates.crt").exists() for p in paths)
    assert not any((p / "usr/local/share/ca-certificates/sandboxd-egress.crt").exists() for p in paths)


def test_rebuild_hits_the_cache_and_skip_cache_rebuilds(builds: Runtime, tmp_path: Path) -> None:
    context = _context(tmp_path)
    marker = secrets.token_hex(8)
    name = _name()
    Template.build(_steps(context, marker), name)
    again: list[LogEntry] = []
    Template.build(_steps(context, marker), f"{name}-again", on_build_logs=again.append)
    cached = [e.message for e in again if e.message.startswith("CACHED")]
    assert len(cached) == 9, [e.message for e in again]
    forced: list[LogEntry] = []
    Template.build(_steps(context, marker), f"{name}-forced", skip_cache=True, on_build_logs=forced.append)
    assert not [e for e in forced if e.message.startswith("CACHED")]
    sandbox = Sandbox.create(f"{name}-again", timeout=60)
    try:
        assert sandbox.commands.run("cat /opt/marker").stdout == f"{marker}\n"
    finally:
        sandbox.kill()


def test_a_changed_last_step_reruns_only_that_step(builds: Runtime) -> None:
    """E2B's per-step cache: steps whose chained keys (the parent, then each step before) are unchanged
    come from the cache, the build resumes over their layers, and a ``skip_cache`` step reruns."""
    slow = CUT_AFTER_S + 0.2  # step 2 takes long enough that its layer is cut and cached

    def template(last: str, skip: bool = False) -> Template:
        steps = (
            Template()
            .from_template("base")
            .run_cmd(f"date +%s%N > /home/user/one-{marker}")
            .run_cmd(f"sleep {slow} && date +%s%N > /home/user/two")
        )
        return (steps.skip_cache() if skip else steps).run_cmd(f"echo {last} > /home/user/three")

    def build(template: Template, name: str) -> list[str]:
        logs: list[LogEntry] = []
        Template.build(template, name, on_build_logs=logs.append)
        return [e.message for e in logs if "[builder " in e.message]

    def probe(name: str) -> str:
        sandbox = Sandbox.create(name, timeout=60)
        try:
            return sandbox.commands.run(f"cat /home/user/one-{marker} /home/user/two /home/user/three").stdout
        finally:
            sandbox.kill()

    marker = secrets.token_hex(8)
    first, second, third = _name(), _name(), _name()
    ran = build(template("a"), first)
    assert not [m for m in ran if m.startswith("CACHED")], ran
    ran = build(template("b"), second)
    assert [m.split(" ")[0] for m in ran] == ["CACHED", "CACHED", "[builder"], ran
    seen = probe(first)
    assert seen.endswith("\na\n") and probe(second) == seen[: -len("a\n")] + "b\n", (seen, probe(second))
    # The second build's template: its own top layer over the first's cut after step 2, over base's.
    layers = _layers(builds)
    assert layers[second][1:] == layers[first][1:] and layers[second][0] != layers[first][0]
    assert len(layers[first]) == len(layers["base"]) + 2
    ran = build(template("a", skip=True), third)
    assert [m.split(" ")[0] for m in ran] == ["CACHED", "CACHED", "[builder"], ran
    assert probe(third) == probe(first)


def test_no_layer_is_cut_under_a_process_a_step_left_running(builds: Runtime) -> None:
    """A step may start a server that a later one uses: the build keeps its sandbox (no layer cut,
    which would end it) while the process runs, however slow the step was."""
    logs: list[LogEntry] = []
    marker = secrets.token_hex(8)  # not served from an earlier run's cache
    template = (
        Template()
        .from_template("base")
        .run_cmd(f"setsid sleep 600 >/dev/null 2>&1 & echo $! > /tmp/{marker}; sleep {CUT_AFTER_S + 0.2}")
        .run_cmd(f"kill -0 $(cat /tmp/{marker}) && kill $(cat /tmp/{marker}) && echo still-running")
        .run_cmd(f"sleep {CUT_AFTER_S + 0.2} && echo three > /home/user/three")
        .run_cmd("echo four > /home/user/four")
    )
    name = _name()
    Template.build(template, name, on_build_logs=logs.append)
    messages = [e.message for e in logs]
    assert "still-running" in messages, messages
    assert any(m.startswith("No layer cut after step 1") for m in messages), messages
    # Once the process is gone, layers are cut as usual: steps 1-2 (slow) in one, 3 (slow), the last.
    assert [m.split(" ")[-4] for m in messages if m.startswith("Layer ")] == ["2", "3", "4"], messages
    assert len(_layers(builds)[name]) == len(_layers(builds)["base"]) + 3


def test_tags_name_builds_of_a_template(builds: Runtime) -> None:
    """E2B's tags through the SDK: ``name:tag`` builds and creates that build, ``name`` is the
    ``default`` tag, ``assign_tags``/``remove_tags``/``get_tags``, and ``name:<build id>``."""
    name = _name()

    def build(value: str, target: str, tags: list[str] | None = None) -> str:
        template = Template().from_template("base").run_cmd(f"echo {value} > /home/user/which")
        return Template.build(template, target, tags=tags).build_id

    def which(target: str) -> str:
        sandbox = Sandbox.create(target, timeout=60)
        try:
            return sandbox.commands.run("cat /home/user/which").stdout.strip()
        finally:
            sandbox.kill()

    first = build(f"one-{name}", f"{name}:v1")
    assert which(f"{name}:v1") == f"one-{name}"
    assert Template.exists(name)  # a template, though no build has its default tag yet
    with pytest.raises(Exception, match=r"no tag or build 'default'|not found"):
        Sandbox.create(name, timeout=60)
    build(f"two-{name}", name)
    build(f"three-{name}", name, tags=["v3", "V3"])  # tags given: not the default (E2B's rule)
    assert which(name) == which(f"{name}:default") == f"two-{name}"
    assert which(f"{name}:v1") == f"one-{name}" and which(f"{name}:v3") == f"three-{name}"
    assert which(f"{name}:{first}") == f"one-{name}"

    assigned = Template.assign_tags(f"{name}:v1", ["stable", "prod"])
    assert assigned.build_id == first and sorted(assigned.tags) == ["prod", "stable"]
    assert which(f"{name}:stable") == f"one-{name}"
    listed = {tag.tag: tag.build_id for tag in Template.get_tags(name)}
    assert set(listed) == {"default", "v1", "v3", "stable", "prod"} and listed["stable"] == first

    Template.remove_tags(name, ["v1", "prod"])
    assert {tag.tag for tag in Template.get_tags(name)} == {"default", "v3", "stable"}
    with pytest.raises(Exception, match="no tag or build 'v1'"):
        Sandbox.create(f"{name}:v1", timeout=60)
    with pytest.raises(Exception, match="cannot be removed"):
        Template.remove_tags(name, "default")
    with pytest.raises(Exception, match="must be 1-63"):
        Template.assign_tags(name, "Not A Tag!")
    headers = {"X-API-KEY": builds.api_key}
    with httpx.Client(base_url=builds.url, headers=headers) as client:
        listed_names = [t["templateID"] for t in client.get("/templates").json()]
        assert listed_names.count(name) == 1 and not [n for n in listed_names if n.startswith(f"{name}:")]
        assert client.delete(f"/templates/{name}").status_code == 204
    assert not Template.exists(name) and not [n for n in _layers(builds) if n.startswith(name)]


def test_a_build_of_many_slow_steps_stops_cutting_at_its_layer_budget(builds: Runtime) -> None:
    """Every slow step would pay for a cut, but a build puts at most MAX_BUILD_LAYERS layers over its
    parent (the rest of its steps share the last), so templates stay under overlayfs' limit."""
    marker = secrets.token_hex(8)
    template = Template().from_template("base")
    for i in range(MAX_BUILD_LAYERS + 2):
        template = template.run_cmd(f"sleep {CUT_AFTER_S + 0.05} && echo {marker} > /home/user/step-{i}")
    name = _name()
    Template.build(template, name)
    layers = _layers(builds)
    assert len(layers[name]) == len(layers["base"]) + MAX_BUILD_LAYERS
    sandbox = Sandbox.create(name, timeout=60)
    try:
        assert sandbox.commands.run("cat /home/user/step-*").stdout == f"{marker}\n" * (MAX_BUILD_LAYERS + 2)
    finally:
        sandbox.kill()


def test_the_hidden_row_a_resumed_build_runs_over_is_listed_nowhere(builds: Runtime) -> None:
    """After a cut, the build's next sandbox runs over a hidden template row (``.build-<id>``): no
    listing, ``exists`` or tag lookup shows it while it lives, and it goes with the build."""
    gate = f"/tmp/gate-{secrets.token_hex(4)}"
    template = (
        Template()
        .from_template("base")
        .run_cmd(f"sleep {CUT_AFTER_S + 0.2} && echo {gate} > /home/user/slow")
        .run_cmd(f"for i in $(seq 300); do [ -e {gate} ] && exit 0; sleep 0.1; done; exit 1")
    )
    info = Template.build_in_background(template, _name())
    hidden = f".build-{info.build_id}"
    query = SandboxQuery(metadata={"sandboxd.template-build": info.build_id})
    deadline = time.monotonic() + 60
    while hidden not in _layers(builds):  # the second build sandbox is being made over it
        assert time.monotonic() < deadline and Template.get_build_status(info).status.value == "building"
        time.sleep(0.1)
    headers = {"X-API-KEY": builds.api_key}
    with httpx.Client(base_url=builds.url, headers=headers) as client:
        assert not [t for t in client.get("/templates").json() if t["templateID"].startswith(".")]
        assert client.get(f"/templates/{hidden}/tags").status_code == 404
        assert client.delete(f"/templates/{hidden}").status_code == 404
    assert not Template.exists(hidden)
    while not (found := Sandbox.list(query=query).next_items()) or found[0].template_id != hidden:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    Sandbox.connect(found[0].sandbox_id).files.write(gate, "")
    while (status := Template.get_build_status(info)).status.value == "building":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status.status.value == "ready", status
    assert hidden not in _layers(builds)


def test_a_failing_step_fails_the_build_with_its_output(builds: Runtime) -> None:
    logs: list[LogEntry] = []
    template = Template().from_template("base").run_cmd("echo about-to-fail-$((40+2)); exit 3")
    with pytest.raises(BuildException) as raised:
        Template.build(template, _name(), on_build_logs=logs.append)
    assert "about-to-fail-42" in str(raised.value)
    assert any("about-to-fail-42" in entry.message for entry in logs)


def test_bad_requests_are_refused_with_a_reason(builds: Runtime) -> None:
    headers = {"X-API-KEY": builds.api_key}
    with httpx.Client(base_url=builds.url, headers=headers) as client:
        assert client.post("/v3/templates", json={"name": "x"}, headers={"X-API-KEY": "wrong"}).status_code == 401
        bad = client.post("/v3/templates", json={"name": "Bad Name!"})
        assert bad.status_code == 400 and "must match" in bad.json()["message"]
        requested = client.post("/v3/templates", json={"name": _name()}).json()
        trigger = f"/v2/templates/{requested['templateID']}/builds/{requested['buildID']}"
        refused = client.post(trigger, json={"fromImage": "Not An Image!", "steps": []})
        assert refused.status_code == 400 and "fromImage" in refused.json()["message"]
        refused = client.post(trigger, json={"fromTemplate": "base", "steps": [{"type": "FROB", "args": []}]})
        assert refused.status_code == 400 and "steps[0].type" in refused.json()["message"]
        copy = {"type": "COPY", "args": ["../etc", "/x"], "filesHash": "0" * 64}
        refused = client.post(trigger, json={"fromTemplate": "base", "steps": [copy]})
        assert refused.status_code == 400 and "relative path" in refused.json()["message"]
        missing = {"type": "COPY", "args": ["a", "/x"], "filesHash": "1" * 64}
        refused = client.post(trigger, json={"fromTemplate": "base", "steps": [missing]})
        assert refused.status_code == 400 and "not uploaded" in refused.json()["message"]
        link = client.get(f"/templates/{requested['templateID']}/files/{'2' * 64}").json()
        assert link["present"] is False
        forged = link["url"].split("?")[0] + "?token=" + "0" * 64
        assert httpx.put(forged, content=b"x").status_code == 401
        assert client.get(f"/templates/x/builds/{requested['buildID']}/status").status_code == 404


def _cgroup_limits(runtime: Runtime, sandbox_id: str) -> tuple[int, float]:
    """The sandbox's cgroup memory limit (bytes) and CPU quota (cores), read from the host."""
    memory = cgroup_file(runtime, sandbox_id, "memory", "memory.max")
    if memory.exists():  # v2
        quota, period = cgroup_file(runtime, sandbox_id, "cpu", "cpu.max").read_text().split()
        return int(memory.read_text()), int(quota) / int(period)
    memory = cgroup_file(runtime, sandbox_id, "memory", "memory.limit_in_bytes")
    quota = int(cgroup_file(runtime, sandbox_id, "cpu", "cpu.cfs_quota_us").read_text())
    period = int(cgroup_file(runtime, sandbox_id, "cpu", "cpu.cfs_period_us").read_text())
    return int(memory.read_text()), quota / period


def _size(sandbox: Sandbox) -> tuple[int, int]:
    info = sandbox.get_info()
    return info.cpu_count, info.memory_mb


def test_a_templates_cpu_count_and_memory_size_its_sandboxes(builds: Runtime) -> None:
    """E2B's ``Template.build(cpu_count=, memory_mb=)``: every sandbox created from the template gets
    that size (its info, its cgroup, the template list), a snapshot of one keeps it, a template built
    without them gets the runtime's defaults, and a rebuild's sizes apply to the sandboxes after it."""
    name, plain = _name(), _name()
    Template.build(Template().from_template("base").run_cmd("true"), name, cpu_count=2, memory_mb=1536)
    Template.build(Template().from_template("base").run_cmd("true"), plain)
    default = Sandbox.create("base", timeout=60)
    sized = Sandbox.create(name, timeout=60)
    snapshot_id = None
    try:
        defaults = _size(default)
        assert defaults != (2, 1536)  # the runtime's --sandbox-cpus / --sandbox-memory-mb here
        assert _size(sized) == (2, 1536)
        assert _cgroup_limits(builds, sized.sandbox_id) == (1536 << 20, 2.0)
        assert _cgroup_limits(builds, default.sandbox_id) == (defaults[1] << 20, float(defaults[0]))
        headers = {"X-API-KEY": builds.api_key}
        listed = {t["templateID"]: t for t in httpx.get(f"{builds.url}/templates", headers=headers).json()}
        assert (listed[name]["cpuCount"], listed[name]["memoryMB"]) == (2, 1536)
        assert (listed[plain]["cpuCount"], listed[plain]["memoryMB"]) == defaults
        assert (listed["base"]["cpuCount"], listed["base"]["memoryMB"]) == defaults
        plain_sandbox = Sandbox.create(plain, timeout=60)
        try:
            assert _size(plain_sandbox) == defaults
        finally:
            plain_sandbox.kill()

        snapshot_id = sized.create_snapshot().snapshot_id
        restored = Sandbox.create(snapshot_id, timeout=60)
        try:
            assert _size(restored) == (2, 1536)
        finally:
            restored.kill()

        # A rebuild with other sizes: later sandboxes get them, the running one keeps its own.
        Template.build(Template().from_template("base").run_cmd("true"), name, cpu_count=1, memory_mb=768)
        later = Sandbox.create(name, timeout=60)
        try:
            assert _size(later) == (1, 768)
            assert _cgroup_limits(builds, later.sandbox_id) == (768 << 20, 1.0)
        finally:
            later.kill()
        assert _size(sized) == (2, 1536)
    finally:
        sized.kill()
        default.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def test_a_templates_sizes_are_bounded_as_on_e2b_and_by_the_host(builds: Runtime) -> None:
    """E2B's rules for a build's ``cpuCount``/``memoryMB`` (1 or an even count of CPUs, at least 128
    MiB, an even MiB count), with E2B's 8 CPUs (or this host's, if more) and this host's memory as
    the team's maximums."""
    most_cpus = max(len(os.sched_getaffinity(0)), 8)
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    host_mb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:")) >> 10
    cases = [
        ({"cpuCount": 0}, "CPU count must be at least 1"),
        ({"cpuCount": 3}, "CPU count must be 1 or an even number"),
        ({"cpuCount": most_cpus + 2 - most_cpus % 2}, f"CPU count can't be higher than {most_cpus}"),
        ({"memoryMB": 64}, "Memory must be at least 128 MiB"),
        ({"memoryMB": 1025}, "Memory must be divisible by 2"),
        ({"memoryMB": host_mb + 2 - host_mb % 2}, f"Memory can't be higher than {host_mb} MiB"),
        ({"cpuCount": "2"}, "'cpuCount' must be an integer"),
    ]
    with httpx.Client(base_url=builds.url, headers={"X-API-KEY": builds.api_key}) as client:
        for fields, message in cases:
            refused = client.post("/v3/templates", json={"name": _name(), **fields})
            assert refused.status_code == 400 and message in refused.json()["message"], (fields, refused.text)
        assert client.post("/v3/templates", json={"name": _name(), "cpuCount": 1, "memoryMB": 128}).status_code == 202
    # More CPUs than this host has, up to E2B's 8: a quota that is only not reached, not a refusal
    # (E2B's documentation builds with cpu_count=2, which a 1-CPU host must accept).
    more = min(2 * len(os.sched_getaffinity(0)), 8)
    name = _name()
    Template.build(Template().from_template("base").run_cmd("true"), name, cpu_count=more, memory_mb=512)
    sandbox = Sandbox.create(name, timeout=60)
    try:
        assert _size(sandbox) == (more, 512)
        assert _cgroup_limits(builds, sandbox.sandbox_id) == (512 << 20, float(more))
        assert sandbox.commands.run("echo works").stdout == "works\n"
    finally:
        sandbox.kill()


def test_start_cmd_runs_in_each_new_sandbox_once_ready(builds: Runtime) -> None:
    name = _name()
    template = (
        Template()
        .from_template("base")
        .run_cmd("mkdir -p /home/user/site && echo served > /home/user/site/index.html")
        .set_workdir("/home/user/site")
        .set_start_cmd("sleep 1 && python3 -m http.server 8123", wait_for_port(8123))
    )
    Template.build(template, name)
    sandbox = Sandbox.create(name, timeout=60)
    try:
        # The create returned after the ready check passed: the server answers at once.
        assert sandbox.commands.run("curl -sf http://127.0.0.1:8123/index.html").stdout == "served\n"
        assert "http.server" in sandbox.commands.run("ps -eo user,args").stdout
        assert sandbox.commands.run("ps -o user= -C python3").stdout.split() == ["user"]
    finally:
        sandbox.kill()


def test_from_template_layers_on_another_built_template(builds: Runtime) -> None:
    first, second = _name(), _name()
    Template.build(Template().from_template("base").run_cmd("echo one > /home/user/one"), first)
    Template.build(Template().from_template(first).run_cmd("echo two > /home/user/two"), second)
    sandbox = Sandbox.create(second, timeout=60)
    try:
        assert sandbox.commands.run("cat /home/user/one /home/user/two").stdout == "one\ntwo\n"
    finally:
        sandbox.kill()
    # The second template's layers are the first's (shared, not copied) under one layer of its own.
    layers = _layers(builds)
    assert len(layers[second]) == len(layers[first]) + 1
    assert layers[second][1:] == layers[first]


def test_a_template_built_on_a_snapshot_is_no_snapshot(builds: Runtime) -> None:
    """``from_template(snapshot_id)`` builds on the snapshot's files; the result is a template, not
    one more snapshot of the sandbox (the parent's ``snapshot_of`` is not inherited)."""
    source = Sandbox.create("base", timeout=60)
    snapshot_id = None
    name = _name()
    try:
        source.files.write("/home/user/before", "in the snapshot\n")
        snapshot_id = source.create_snapshot().snapshot_id
        Template.build(Template().from_template(snapshot_id).run_cmd("echo after > /home/user/after"), name)
        assert [s.snapshot_id for s in source.list_snapshots().next_items()] == [snapshot_id]
        built = Sandbox.create(name, timeout=60)
        try:
            assert built.commands.run("cat /home/user/before /home/user/after").stdout == "in the snapshot\nafter\n"
        finally:
            built.kill()
    finally:
        source.kill()
        if snapshot_id is not None:
            Sandbox.delete_snapshot(snapshot_id)


def test_list_and_delete(builds: Runtime) -> None:
    name = _name()
    Template.build(Template().from_template("base").run_cmd("true"), name)
    headers = {"X-API-KEY": builds.api_key}
    with httpx.Client(base_url=builds.url, headers=headers) as client:
        listed = {t["templateID"]: t for t in client.get("/templates").json()}
        assert listed[name]["names"] == [name] and listed[name]["buildStatus"] == "ready"
        assert "base" in listed
        sandbox = Sandbox.create(name, timeout=60)
        try:
            busy = client.delete(f"/templates/{name}")
            assert busy.status_code == 409 and sandbox.sandbox_id in busy.json()["message"]
        finally:
            sandbox.kill()
        assert client.delete(f"/templates/{name}").status_code == 204
        assert not Template.exists(name)
        assert client.delete(f"/templates/{name}").status_code == 404
        builtin = client.delete("/templates/base")
        assert builtin.status_code == 400 and "sandboxd template remove" in builtin.json()["message"]


def test_deleting_a_template_frees_its_own_layers_and_keeps_what_it_was_built_on(builds: Runtime) -> None:
    """E2B's ``DELETE /templates/{id}`` takes the template's own steps' cache records and layers
    (before, the records kept them for ever); ``base``, which it was built on, stays, and so does a
    replaced build's layer, which only ``sandboxd template prune`` takes (test_template_gc.py)."""
    name = _name()
    Template.build(Template().from_template("base").run_cmd(f"echo first > /opt/{name}", user="root"), name)
    first = _layers(builds)[name][0]
    Template.build(Template().from_template("base").run_cmd(f"echo second > /opt/{name}", user="root"), name)
    second = _layers(builds)[name][0]
    base = _layers(builds)["base"]
    assert first != second and (TEMPLATE_STORE / "layers" / hex_of(second)).is_dir()

    with httpx.Client(base_url=builds.url, headers={"X-API-KEY": builds.api_key}) as client:
        assert client.delete(f"/templates/{name}").status_code == 204
    # At once, unless another process sharing the store holds it (then once that ends).
    deadline = time.monotonic() + 60
    while (TEMPLATE_STORE / "layers" / hex_of(second)).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (TEMPLATE_STORE / "layers" / hex_of(second)).exists(), "the deleted template's layer was kept"
    assert (TEMPLATE_STORE / "layers" / hex_of(first)).is_dir(), "a replaced build's cache went without a prune"
    assert all((TEMPLATE_STORE / "layers" / hex_of(d)).is_dir() for d in base)
    sandbox = Sandbox.create("base", timeout=60)  # base's cache record is kept: nothing to rebuild
    try:
        assert sandbox.commands.run("true").exit_code == 0
    finally:
        sandbox.kill()


def test_apt_install_and_pip_install(builds: Runtime, tmp_path: Path) -> None:
    """apt_install from Debian's archive (the build sandbox has network egress, as any sandbox), and
    pip_install from a package index that an earlier step serves on the build sandbox's loopback."""
    context = tmp_path / "context"
    filename, wheel = _wheel("sandboxd-probe", "1.0", "sandboxd_probe", "installed by pip_install")
    (context / "index" / "simple" / "sandboxd-probe").mkdir(parents=True)
    (context / "index" / "simple" / "sandboxd-probe" / filename).write_bytes(wheel)
    name = _name()
    template = (
        Template(file_context_path=str(context))
        .from_template("base")
        .apt_install("sl", no_install_recommends=True)
        .copy("index", "/opt/index")
        .run_cmd("setsid python3 -m http.server 8765 --bind 127.0.0.1 --directory /opt/index >/dev/null 2>&1 &")
        .set_envs({"PIP_INDEX_URL": "http://127.0.0.1:8765/simple/"})
        .run_cmd("for i in $(seq 50); do curl -sf http://127.0.0.1:8765/simple/ && exit 0; sleep 0.1; done; exit 1")
        .pip_install("sandboxd-probe")
    )
    Template.build(template, name)
    sandbox = Sandbox.create(name, timeout=60)
    try:
        assert sandbox.commands.run("test -x /usr/games/sl && dpkg -s sl | grep -c installed").stdout == "1\n"
        imported = sandbox.commands.run("python -c 'import sandboxd_probe; print(sandboxd_probe.VALUE)'")
        assert imported.stdout == "installed by pip_install\n"
    finally:
        sandbox.kill()


def test_build_status_streams_logs_while_it_runs(builds: Runtime, tmp_path: Path) -> None:
    gate = f"/tmp/gate-{secrets.token_hex(4)}"
    template = (
        Template()
        .from_template("base")
        .run_cmd(f"echo first-line; for i in $(seq 300); do [ -e {gate} ] && exit 0; sleep 0.1; done; exit 1")
    )
    info = Template.build_in_background(template, _name())
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while not any("first-line" in line for line in seen):
        assert time.monotonic() < deadline, seen
        status = Template.get_build_status(info, logs_offset=len(seen))
        assert status.status.value == "building", (status.status, seen)
        seen += [entry.message for entry in status.log_entries]
        time.sleep(0.1)
    # The step is still running (it waits for the gate): the log came while it ran, not at its end.
    assert Template.get_build_status(info, logs_offset=len(seen)).status.value == "building"
    runtime_sandboxes = Sandbox.list(query=SandboxQuery(metadata={"sandboxd.template-build": info.build_id}))
    (build_sandbox,) = runtime_sandboxes.next_items()
    Sandbox.connect(build_sandbox.sandbox_id).files.write(gate, "")
    deadline = time.monotonic() + 60
    while (status := Template.get_build_status(info, logs_offset=len(seen))).status.value == "building":
        assert time.monotonic() < deadline
        seen += [entry.message for entry in status.log_entries]
        time.sleep(0.2)
    assert status.status.value == "ready", status


def test_from_dockerfile_builds_the_same_result(builds: Runtime, tmp_path: Path) -> None:
    context = _context(tmp_path)
    marker = secrets.token_hex(8)
    dockerfile = f"""FROM debian:stable
RUN echo {marker} > /opt/marker
COPY app /home/user/app
ENV GREETING=hello
WORKDIR /home/user/work
"""
    from_dockerfile, from_code = _name(), _name()
    Template.build(Template(file_context_path=str(context)).from_dockerfile(dockerfile), from_dockerfile)
    Template.build(
        Template(file_context_path=str(context))
        .from_debian_image()
        .set_user("root")
        .set_workdir("/")
        .run_cmd(f"echo {marker} > /opt/marker")
        .copy("app", "/home/user/app")
        .set_envs({"GREETING": "hello"})
        .set_workdir("/home/user/work")
        .set_user("user"),
        from_code,
    )
    probe = "cat /opt/marker; ls -lnR /home/user/app | grep -v total; echo $GREETING; id -un; pwd"
    seen = []
    for name in (from_dockerfile, from_code):
        sandbox = Sandbox.create(name, timeout=60)
        try:
            seen.append(sandbox.commands.run(probe).stdout)
        finally:
            sandbox.kill()
    assert seen[0] == seen[1]
    assert seen[0].startswith(f"{marker}\n") and seen[0].endswith("hello\nuser\n/home/user/work\n"), seen[0]


def test_a_restarted_runtime_ends_the_build_sandboxes_it_inherits(
    start_runtime: Callable[..., Runtime], base_template: bool
) -> None:
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine (see the session's first lines)")
    runtime = start_runtime()
    api = {"api_key": runtime.api_key, "api_url": runtime.url}
    info = Template.build_in_background(Template().from_template("base").run_cmd("sleep 600"), _name(), **api)
    deadline = time.monotonic() + 30
    query = SandboxQuery(metadata={"sandboxd.template-build": info.build_id})
    while not (found := Sandbox.list(query=query, **api).next_items()):
        assert time.monotonic() < deadline, "no build sandbox started"
        time.sleep(0.1)
    # Only that query finds it: a user's listing has no build sandboxes in it.
    assert found[0].sandbox_id not in [s.sandbox_id for s in Sandbox.list(**api).next_items()]
    runtime.process.terminate()
    runtime.process.wait(10)
    runtime.restart()
    with httpx.Client(base_url=runtime.url, headers={"X-API-KEY": runtime.api_key}) as client:
        gone = client.get(f"/sandboxes/{found[0].sandbox_id}")
        assert gone.status_code == 404 and "template build ended" in gone.json()["message"], gone.text
        assert client.get(f"/templates/{info.template_id}/builds/{info.build_id}/status").status_code == 404


def test_the_operator_cli_builds_from_a_dockerfile_and_a_python_file(builds: Runtime, tmp_path: Path) -> None:
    """``sandboxd template build NAME --from FILE`` on the host: the running runtime builds it, with
    the build's log lines on stderr, and refuses a file that is no template."""
    context = _context(tmp_path)
    marker = secrets.token_hex(8)
    (context / "Dockerfile").write_text(
        f"FROM debian:stable\nRUN echo {marker} > /opt/marker\nCOPY app /home/user/app\n"
    )
    (context / "template.py").write_text(
        "from e2b import Template\n\n"
        f"template = Template().from_debian_image().run_cmd('echo py-{marker} > /tmp/from-python')\n"
    )
    (context / "nothing.py").write_text("value = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sandboxd", "template", "build", *args, "--data-dir", str(builds.data_dir),
             "--url", builds.url, "--api-key", builds.api_key],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip

    from_dockerfile, from_python = _name(), _name()
    done = cli(from_dockerfile, "--from", str(context / "Dockerfile"))
    assert done.returncode == 0, done.stderr
    assert "RUN echo" in done.stderr and f"template '{from_dockerfile}'" in done.stdout
    done = cli(from_python, "--from", str(context / "template.py"))
    assert done.returncode == 0, done.stderr

    refused = cli(_name(), "--from", str(context / "nothing.py"))
    assert refused.returncode != 0 and "defines no 'template'" in refused.stderr
    refused = cli("no-recipe")
    assert refused.returncode != 0 and "give --from a Dockerfile or a Python file" in refused.stderr

    for name, probe, expected in (
        (from_dockerfile, "cat /opt/marker; cat /home/user/app/hello.txt", f"{marker}\nhello from the build context\n"),
        (from_python, "cat /tmp/from-python", f"py-{marker}\n"),
    ):
        sandbox = Sandbox.create(name, timeout=60)
        try:
            assert sandbox.commands.run(probe).stdout == expected
        finally:
            sandbox.kill()


def test_a_setuid_root_file_from_a_hostile_build_is_out_of_host_users_reach(builds: Runtime) -> None:
    """Attack: root in a build sandbox plants a setuid-root shell. Layers keep canonical owners, so on
    the host that file really is setuid root; a host user who could reach it would be host root. The
    template store admits only root, so no host user can run it."""
    name = _name()
    Template.build(
        Template().from_debian_image().run_cmd("cp /bin/sh /opt/rootsh && chmod 4755 /opt/rootsh", user="root"),
        name,
    )
    planted = TEMPLATE_STORE / "layers" / hex_of(_layers(builds)[name][0]) / "opt" / "rootsh"
    st = planted.lstat()
    assert st.st_uid == 0 and st.st_mode & 0o4000, "the layer keeps the file setuid root (the threat is real)"
    assert TEMPLATE_STORE.stat().st_mode & 0o777 == 0o700
    escaped = subprocess.run(
        ["runuser", "-u", "nobody", "--", str(planted), "-p", "-c", "id -u"], capture_output=True, text=True
    )
    assert escaped.returncode != 0 and "Permission denied" in escaped.stderr, escaped


def test_a_template_whose_trust_store_is_a_fifo_still_starts_its_sandboxes_saying_why(builds: Runtime) -> None:
    """A built template whose trust store is a FIFO: each create's agent cannot add the egress CA
    there (a read of it would block for ever), and starts anyway, the sandbox's log saying why."""
    name = _name()
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    Template.build(Template().from_template("base").run_cmd(f"rm -f {bundle} && mkfifo {bundle}", user="root"), name)
    headers = {"X-API-KEY": builds.api_key}
    try:
        sandbox = Sandbox.create(name, timeout=60)
        try:
            assert sandbox.commands.run("echo alive").stdout == "alive\n"
            assert sandbox.commands.run(f"test -p {bundle}").exit_code == 0  # left as the template has it
            with httpx.Client(base_url=builds.url, headers=headers) as client:
                logs = client.get(f"/v2/sandboxes/{sandbox.sandbox_id}/logs").json()["logs"]
            said = [e["message"] for e in logs if e["level"] == "warn" and "egress CA was not added" in e["message"]]
            assert said and f"{bundle} is not a regular file" in said[0], logs
            assert str(builds.data_dir) not in said[0], said
        finally:
            sandbox.kill()
    finally:
        with httpx.Client(base_url=builds.url, headers=headers) as client:
            client.delete(f"/templates/{name}")
