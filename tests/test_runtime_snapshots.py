"""Snapshots and forks through the official SDK (``create_snapshot``, ``Sandbox.create(snapshot_id)``,
``list_snapshots``, ``delete_snapshot``, ``fork``) against the shared runtime: real sandboxes, their
real disks, the layer made from them. What is kept is the file system (see
python/sandboxd/runtime/snapshots.py); the source keeps running through it."""

from __future__ import annotations

import httpx
import pytest
from conftest import Runtime


def test_a_snapshot_keeps_the_file_system_and_the_source_keeps_running(e2b_env: Runtime) -> None:
    from e2b import Sandbox

    source = Sandbox.create()
    made: list[Sandbox] = []
    snapshot_id = None
    try:
        source.files.write("/home/user/notes/kept.txt", "written before the snapshot")
        source.commands.run("sudo rm /etc/issue && chmod 600 /home/user/notes/kept.txt")
        sleeper = source.commands.run("sleep 600", background=True)
        info = source.create_snapshot()
        snapshot_id = info.snapshot_id
        assert info.names == [snapshot_id]
        source.files.write("/home/user/notes/later.txt", "written after the snapshot")
        # The source was frozen for the copy and thawed: its process is still there, and it still works.
        assert str(sleeper.pid) in source.commands.run("pgrep -x sleep").stdout.split()

        copy = Sandbox.create(snapshot_id)
        made.append(copy)
        out = copy.commands.run(
            "cat /home/user/notes/kept.txt; echo; stat -c '%U %a' /home/user/notes/kept.txt; "
            "test -e /etc/issue && echo issue || echo no-issue; "
            "test -e /home/user/notes/later.txt && echo later || echo no-later; "
            "pgrep -x sleep || echo no-sleep; hostname",
            user="user",
        )
        kept, owner, issue, later, sleep, hostname = out.stdout.splitlines()
        assert kept == "written before the snapshot"
        assert owner == "user 600"  # ownership and mode as the sandbox left them
        assert issue == "no-issue"  # a deletion is kept too (an overlay whiteout in the layer)
        assert later == "no-later"  # only what was there at the snapshot
        assert sleep == "no-sleep"  # processes are not: a snapshot boots fresh from its disk
        assert hostname == copy.sandbox_id

        assert snapshot_id in [s.snapshot_id for s in source.list_snapshots().next_items()]
        assert snapshot_id in [s.snapshot_id for s in Sandbox.list_snapshots(name=snapshot_id).next_items()]
        other = Sandbox.create()
        made.append(other)
        assert other.list_snapshots().next_items() == []
    finally:
        for sandbox in made:
            sandbox.kill()
        source.kill()
    assert snapshot_id is not None
    assert Sandbox.delete_snapshot(snapshot_id) is True
    assert Sandbox.delete_snapshot(snapshot_id) is False
    assert snapshot_id not in [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]


def test_a_named_snapshot_replaces_the_one_of_that_name_and_is_kept_while_used(e2b_env: Runtime) -> None:
    from e2b import Sandbox
    from e2b.exceptions import SandboxException

    source = Sandbox.create()
    user = None
    try:
        source.files.write("/home/user/version", "1")
        assert source.create_snapshot(name="snapshot-test-named").snapshot_id == "snapshot-test-named"
        source.files.write("/home/user/version", "2")
        source.create_snapshot(name="snapshot-test-named")
        user = Sandbox.create("snapshot-test-named")
        assert user.files.read("/home/user/version") == "2"
        with pytest.raises(SandboxException, match="used by live sandboxes"):
            Sandbox.delete_snapshot("snapshot-test-named")
    finally:
        if user is not None:
            user.kill()
        source.kill()
    assert Sandbox.delete_snapshot("snapshot-test-named") is True


def test_fork_gives_independent_sandboxes_with_the_sources_files_env_and_metadata(e2b_env: Runtime) -> None:
    from e2b import Sandbox

    source = Sandbox.create(envs={"FORKED_FROM": "source"}, metadata={"role": "source"})
    forks: list[Sandbox] = []
    try:
        source.files.write("/tmp/shared.txt", "before the fork")
        results = source.fork(count=2, timeout=120)
        assert len(results) == 2
        for result in results:
            assert isinstance(result, Sandbox), result
            forks.append(result)
        first, second = forks
        assert len({source.sandbox_id, first.sandbox_id, second.sandbox_id}) == 3
        for fork in forks:
            assert fork.files.read("/tmp/shared.txt") == "before the fork"
            assert fork.commands.run("echo $FORKED_FROM").stdout.strip() == "source"
            assert fork.get_info().metadata == {"role": "source"}
        first.files.write("/tmp/shared.txt", "changed in the first fork")
        assert second.files.read("/tmp/shared.txt") == "before the fork"
        assert source.files.read("/tmp/shared.txt") == "before the fork"
        assert source.is_running()
        (snapshot,) = source.list_snapshots().next_items()  # the one snapshot the forks share
    finally:
        for fork in forks:
            fork.kill()
        source.kill()
    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True


def test_bad_snapshot_and_fork_requests_get_a_4xx(e2b_env: Runtime) -> None:
    from e2b import Sandbox
    from e2b.exceptions import SandboxException, SandboxNotFoundException

    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot("nosuchsandbox0000000")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork("nosuchsandbox0000000")
    source = Sandbox.create()
    try:
        with pytest.raises(SandboxException, match="400"):
            source.create_snapshot(name="../escape")
        api = httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key})
        for body in ({"count": 0}, {"count": 21}, {"count": "two"}, {"timeout": -1}):
            answer = api.post(f"/sandboxes/{source.sandbox_id}/fork", json=body)
            assert answer.status_code == 400, (body, answer.text)
        assert api.post(f"/sandboxes/{source.sandbox_id}/snapshots", json={"name": 5}).status_code == 400
        assert api.get("/snapshots", params={"limit": "0"}).status_code == 400
        assert httpx.get(f"{e2b_env.url}/snapshots").status_code == 401
    finally:
        source.kill()
