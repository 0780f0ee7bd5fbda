"""Examples of E2B's documentation (https://e2b.dev/docs) that no other test ran, each as its page shows
it, with the official SDK against the shared runtime. docs/e2b-docs-coverage.md maps every example
of those pages to the test that runs it. The pages use ``e2b_code_interpreter.Sandbox``; where no
``run_code`` is involved these use ``e2b.Sandbox`` (the same class under it, over ``base``), so they
need no interpreter template."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox, SandboxQuery, SandboxState, Template, default_build_logger, wait_for_file
from sandboxd.agent import identity


def test_environment_variables_page(e2b_env: Runtime) -> None:
    """docs/sandbox/environment-variables: "Knowing if you are inside a sandbox", global variables
    given at create, and variables for one command."""
    sandbox = Sandbox.create(envs={"MY_VAR": "my_value"})
    try:
        result = sandbox.commands.run("echo $E2B_SANDBOX_ID")
        assert result.stdout == f"{sandbox.sandbox_id}\n"
        assert sandbox.commands.run("echo $E2B_SANDBOX").stdout == "true\n"
        listing = sandbox.commands.run("ls -a /run/e2b/").stdout.split()
        assert {".E2B_SANDBOX", ".E2B_SANDBOX_ID", ".E2B_TEMPLATE_ID"} <= set(listing), listing
        assert sandbox.files.read("/run/e2b/.E2B_SANDBOX_ID") == sandbox.sandbox_id
        assert sandbox.files.read("/run/e2b/.E2B_SANDBOX") == "true"
        template_id = sandbox.get_info().template_id
        assert sandbox.commands.run("echo $E2B_TEMPLATE_ID").stdout == f"{template_id}\n"
        assert sandbox.files.read("/run/e2b/.E2B_TEMPLATE_ID") == template_id

        assert sandbox.commands.run("echo $MY_VAR").stdout == "my_value\n"
        assert sandbox.commands.run("echo $MY_VAR", envs={"MY_VAR": "123"}).stdout == "123\n"
        assert sandbox.commands.run("echo $MY_VAR").stdout == "my_value\n"  # for that command only
    finally:
        sandbox.kill()


def test_persistence_page(e2b_env: Runtime) -> None:
    """docs/sandbox/persistence: pause with ``beta_pause()``, list paused sandboxes page by page,
    resume with ``connect()``, connect with a new timeout, remove a paused sandbox."""
    sbx = Sandbox.create()
    try:
        sbx.files.write("/home/user/kept.txt", "before the pause")
        sbx.beta_pause()
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED

        paginator = Sandbox.list(SandboxQuery(state=[SandboxState.PAUSED]))
        sandboxes = paginator.next_items()
        while paginator.has_next:
            sandboxes.extend(paginator.next_items())
        assert sbx.sandbox_id in [s.sandbox_id for s in sandboxes]
        assert all(s.state == SandboxState.PAUSED for s in sandboxes)

        same_sbx = sbx.connect()
        assert same_sbx.sandbox_id == sbx.sandbox_id
        assert same_sbx.files.read("/home/user/kept.txt") == "before the pause"

        # "Sandbox's timeout": connecting to a paused sandbox resumes it with that timeout, from now
        # (a running one's is only ever lengthened, as the SDK says).
        sbx.beta_pause()
        connected = Sandbox.connect(sbx.sandbox_id, timeout=60)
        left = (connected.get_info().end_at - datetime.now(UTC)).total_seconds()
        assert 50 <= left <= 61, left

        # "Removing paused sandboxes"
        sbx.beta_pause()
        assert sbx.kill() is True
        assert Sandbox.kill(sbx.sandbox_id) is False
    finally:
        Sandbox.kill(sbx.sandbox_id)


def test_secured_access_page_and_v2_migration(e2b_env: Runtime) -> None:
    """docs/sandbox/secured-access ``secure=False`` (accepted, and every call still works) and
    docs/migration/v2: ``template="base"``, ``files.write``/``write_files`` returning entry infos,
    paging with ``has_next`` and a metadata query."""
    insecure = Sandbox.create(secure=False)
    sandbox = Sandbox.create(template="base", metadata={"key": "value"})
    try:
        assert insecure.commands.run("echo ok").stdout == "ok\n"
        info = sandbox.files.write("/tmp/file.txt", "content")
        assert info.path == "/tmp/file.txt"
        infos = sandbox.files.write_files(
            [{"path": "/tmp/file1.txt", "data": "content1"}, {"path": "/tmp/file2.txt", "data": "content2"}]
        )
        assert [i.path for i in infos] == ["/tmp/file1.txt", "/tmp/file2.txt"]
        assert sandbox.commands.run("cat /tmp/file.txt /tmp/file1.txt /tmp/file2.txt").stdout == (
            "contentcontent1content2"
        )

        seen: list[str] = []
        paginator = Sandbox.list()
        while paginator.has_next:
            seen += [s.sandbox_id for s in paginator.next_items()]
        assert {insecure.sandbox_id, sandbox.sandbox_id} <= set(seen)
        query = Sandbox.list(query=SandboxQuery(metadata={"key": "value"})).next_items()
        assert sandbox.sandbox_id in [s.sandbox_id for s in query]
        assert insecure.sandbox_id not in [s.sandbox_id for s in query]
    finally:
        insecure.kill()
        sandbox.kill()


HOST_ECHO = """
import http.server

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.headers["Host"].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

http.server.HTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def test_masking_request_host_headers(e2b_env: Runtime) -> None:
    """docs/sandbox/internet-access, "Masking request host headers": ``mask_request_host`` with
    ``${PORT}`` is the Host a server in the sandbox sees."""
    sandbox = Sandbox.create(network={"mask_request_host": "localhost:${PORT}"})
    try:
        sandbox.files.write("/tmp/host_echo.py", HOST_ECHO)
        sandbox.commands.run("python3 /tmp/host_echo.py", background=True, timeout=0)
        host = sandbox.get_host(8080)
        deadline = time.monotonic() + 10
        with httpx.Client() as client:
            while (answer := client.get(e2b_env.url + "/", headers={"Host": host})).status_code != 200:
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.1)
        assert answer.text == "localhost:8080"
    finally:
        sandbox.kill()


def test_identity_files_only_for_an_agent_told_its_sandbox(tmp_path: Path) -> None:
    """The agent writes ``/run/e2b`` only when ``/init`` names the sandbox (a hand-started agent on a
    host never does), and replaces a link left at one of its paths rather than writing through it."""
    run_dir = tmp_path / "run" / "e2b"
    identity.write({"MY_VAR": "x"}, str(run_dir))
    assert not run_dir.exists()
    run_dir.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.write_text("untouched")
    (run_dir / ".E2B_SANDBOX_ID").symlink_to(outside)
    identity.write({"E2B_SANDBOX_ID": "sbx", "E2B_TEMPLATE_ID": "base"}, str(run_dir))
    assert sorted(p.name for p in run_dir.iterdir()) == [".E2B_SANDBOX", ".E2B_SANDBOX_ID", ".E2B_TEMPLATE_ID"]
    assert (run_dir / ".E2B_SANDBOX_ID").read_text() == "sbx" and not (run_dir / ".E2B_SANDBOX_ID").is_symlink()
    assert (run_dir / ".E2B_SANDBOX").read_text() == "true"
    assert outside.read_text() == "untouched"


def test_template_user_and_workdir_page(e2b_env: Runtime, base_template: bool) -> None:
    """docs/template/user-and-workdir: ``set_user("guest")`` on ``base``, which has no ``guest``: as on
    E2B the build creates the user, and the later steps and the template's sandboxes run as it, at its
    home. Also docs/template/logging's ``default_build_logger()`` and a custom logger."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    template = (
        Template()
        .from_base_image()
        .run_cmd("whoami")  # user
        .run_cmd("pwd")  # /home/user
        .set_user("guest")
        .run_cmd("whoami")  # guest
        .run_cmd("pwd")  # /home/guest
    )
    alias = f"custom-user-template-{secrets.token_hex(3)}"
    lines: list[str] = []
    Template.build(template, alias=alias, on_build_logs=default_build_logger())
    Template.build(template, alias=alias, on_build_logs=lambda entry: lines.append(entry.message))
    assert any("CACHED" in line for line in lines), lines  # the second build is the first's, cached
    sbx = Sandbox.create(alias, timeout=60)
    try:
        assert sbx.commands.run("whoami").stdout == "guest\n"
        assert sbx.commands.run("pwd").stdout == "/home/guest\n"
    finally:
        sbx.kill()
        httpx.delete(f"{e2b_env.url}/templates/{alias}", headers={"X-API-KEY": e2b_env.api_key})


def test_background_command_iterated(e2b_env: Runtime) -> None:
    """docs/commands/background (Python): iterate a background command's output, then kill it (the
    page's ``sleep 10`` shortened to keep the test quick)."""
    sandbox = Sandbox.create()
    try:
        command = sandbox.commands.run("echo hello; sleep 1; echo world", background=True)
        seen: list[str] = []
        for stdout, stderr, _ in command:
            if stdout:
                seen.append(stdout)
            assert not stderr
        assert "".join(seen) == "hello\nworld\n"
        command.kill()
    finally:
        sandbox.kill()


def test_template_file_operations_copying_and_ready_command(
    e2b_env: Runtime, base_template: bool, tmp_path: Path
) -> None:
    """docs/template/defining-template ("Copying files", "File operations", "Running commands") and
    docs/template/start-ready-command (``set_start_cmd`` with ``wait_for_file``) in one build."""
    if not base_template:
        pytest.skip("the Debian base cannot be built on this machine")
    files = {"file1": "one", "file2": "two", "package.json": "{}", "src/app.py": "print(1)", "config.json": "[]"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    template = (
        Template(file_context_path=str(tmp_path), file_ignore_patterns=[".git", "node_modules"])
        .from_base_image()
        .copy(["file1", "file2"], "/app/file/", user="root")
        .copy_items([{"src": "src/", "dest": "/app/src/"}, {"src": "package.json", "dest": "/app/package.json"}])
        .run_cmd(["mkdir -p /tmp/old-dir/sub", "touch /tmp/old-file /old-path"], user="root")
        .remove("/tmp/old-file", user="root")
        .remove("/tmp/old-dir", recursive=True, user="root")
        .remove("/tmp/file", force=True, user="root")
        .rename("/old-path", "/new-path", user="root")
        .make_dir("/app/data", mode=0o755, user="root")
        .make_symlink("/app/package.json", "/app/link.json", user="root")
        .copy("config.json", "/app/config.json", force_upload=True)  # docs/template/caching, "Files Caching"
        .set_start_cmd("sleep 1 && echo started > /tmp/ready && sleep infinity", wait_for_file("/tmp/ready"))
    )
    alias = f"file-ops-{secrets.token_hex(3)}"
    # docs/template/build, "Build and wait for completion" (but for the API key and domain).
    info = Template.build(
        template, alias=alias, cpu_count=2, memory_mb=2048, skip_cache=False, on_build_logs=default_build_logger()
    )
    assert (info.alias, info.template_id) == (alias, alias) and info.build_id
    sbx = Sandbox.create(alias, timeout=60)
    try:
        run = sbx.commands.run
        assert sbx.files.read("/app/config.json") == "[]"
        assert sbx.files.read("/tmp/ready") == "started\n"  # create returned once the ready check passed
        sized = sbx.get_info()
        assert (sized.cpu_count, sized.memory_mb) == (2, 2048)  # the build's sizes are the sandbox's
        assert run("cat /app/file/file1 /app/file/file2 /app/src/app.py /app/package.json").stdout == "onetwoprint(1){}"
        assert run("ls -A /tmp | grep old || echo none; test -e /new-path && echo renamed").stdout == "none\nrenamed\n"
        assert run("stat -c %a /app/data; readlink /app/link.json").stdout == "755\n/app/package.json\n"
    finally:
        sbx.kill()
        httpx.delete(f"{e2b_env.url}/templates/{alias}", headers={"X-API-KEY": e2b_env.api_key})


def test_the_first_init_writes_the_identity_files_without_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first ``/init`` that sets env vars (the runtime's, as a sandbox boots) writes ``/run/e2b``
    inline: no worker thread is started for it (one was ~1.2 ms of CPU and ~100 page faults of every
    create). A later one writes in a thread, as before, and both leave the files."""
    import asyncio
    import json

    from sandboxd.agent import rest
    from sandboxd.agent.state import AgentState

    run_dir = tmp_path / "run" / "e2b"
    monkeypatch.setattr(identity, "RUN_DIR", str(run_dir))

    async def init(state: AgentState, env_vars: dict[str, str]) -> tuple[int, bool]:
        sent: list[dict[str, object]] = []
        body = json.dumps({"envVars": env_vars}).encode()

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        await rest.init(state, {}, receive, send)
        executor = asyncio.get_running_loop()._default_executor  # type: ignore[attr-defined]
        return int(sent[0]["status"]), executor is not None  # type: ignore[call-overload]

    async def boot_then_again() -> list[tuple[int, bool]]:
        state = AgentState(default_user="root")
        first = await init(state, {"E2B_SANDBOX_ID": "sbx", "E2B_TEMPLATE_ID": "base"})
        assert (run_dir / ".E2B_SANDBOX_ID").read_text() == "sbx"
        again = await init(state, {"E2B_SANDBOX_ID": "sbx2", "E2B_TEMPLATE_ID": "base"})
        return [first, again]

    assert asyncio.run(boot_then_again()) == [(204, False), (204, True)]
    assert (run_dir / ".E2B_SANDBOX_ID").read_text() == "sbx2"
    assert (run_dir / ".E2B_SANDBOX").read_text() == "true"
