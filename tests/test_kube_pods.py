"""The Pod contract's network annotation (``sandboxd.io/network``), without a cluster: what ``serve``
writes reads back the same, and whatever anyone else writes there is a 400 that says why, never a
crash (the node turns it into a failed Pod or a refused update)."""

from __future__ import annotations

import asyncio
import json
import types
from typing import Any

import pytest
from sandboxd.kube import pods
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.network import NetworkConfig


def _pod(note: str | None) -> dict[str, object]:
    return {"metadata": {"annotations": {} if note is None else {pods.NETWORK_ANNOTATION: note}}}


def test_what_serve_writes_reads_back_the_same() -> None:
    config = NetworkConfig(
        allow_internet_access=False,
        allow_out=("example.com", "1.2.3.4"),
        deny_out=("0.0.0.0/0",),
        dns_servers=("9.9.9.9",),
        rules={"example.com": ({"Authorization": "Bearer x"},)},
        mask_request_host="app.test",
        https_ports=(8443,),
    )
    note = pods.network_annotation(config)
    assert note is not None
    assert pods.network_of(_pod(note)) == (config, pods.network_digest(note))
    # The defaults are no annotation at all, and no annotation reads as the defaults.
    assert pods.network_annotation(NetworkConfig()) is None
    assert pods.network_of(_pod(None)) == (NetworkConfig(), pods.network_digest(None))
    # An empty annotation is refused, not the defaults: the node must not take its answer to one for
    # its answer to the other.
    assert pods.network_digest("") != pods.network_digest(None)
    body = pods.sandbox_pod(
        name="x", template="base", alias=None, env_vars={}, metadata={}, cpu_count=1, memory_mb=64,
        timeout_s=60, on_timeout="kill", pause_mode="full", auto_resume=False, network=config,
    )  # fmt: skip
    assert body["metadata"]["annotations"][pods.NETWORK_ANNOTATION] == note


def test_private_ports_are_a_pods_setting_with_a_token_of_their_own() -> None:
    """``allowPublicTraffic: false`` is accepted (every replica's proxy enforces it), and its
    traffic token derives from the Pod's identity under the cluster's key, apart from its access
    token (a holder of one learns nothing of the other)."""
    config = pods.network_of(_pod('{"network": {"allowPublicTraffic": false}}'))[0]
    assert config.allow_public_traffic is False
    key = b"k" * 32
    traffic = pods.traffic_token(key, "ns", "sbx", "uid-1")
    assert traffic == pods.traffic_token(key, "ns", "sbx", "uid-1")
    assert traffic not in {
        pods.access_token(key, "ns", "sbx", "uid-1"),
        pods.traffic_token(key, "ns", "sbx", "uid-2"),
        pods.traffic_token(b"j" * 32, "ns", "sbx", "uid-1"),
    }


@pytest.mark.parametrize(
    ("note", "words"),
    [
        ("not json", "not JSON"),
        ("", "not JSON"),
        ("[" * 100_000 + "]" * 100_000, "not JSON"),  # nesting past the parser's recursion limit
        ("[]", "must be"),
        ('{"allow_internet_access": false, "extra": 1}', "must be"),
        ('{"allow_internet_access": "no"}', "allow_internet_access"),
        ('{"network": []}', "network"),
        ('{"network": {"denyOut": 5}}', "denyOut"),
        ('{"network": {"denyOut": [5]}}', "denyOut"),
        ('{"network": {"denyOut": ["not an address"]}}', "not an address"),
        ('{"network": {"allowOut": ["example.com"]}}', "ALL_TRAFFIC"),
        ('{"network": {"rules": {"a.test": "x"}}}', "rules"),
        ('{"network": {"httpsPorts": ["443"]}}', "httpsPorts"),
        (json.dumps({"network": {"denyOut": ["10.0.0.1"] * 5000}}), "at most 1000"),
    ],
)
def test_a_hostile_annotation_is_a_400_that_says_why(note: str, words: str) -> None:
    with pytest.raises(ApiError) as caught:
        pods.network_of(_pod(note))
    assert caught.value.status == 400
    assert words in caught.value.message


def test_only_well_formed_secret_entries_are_mirrored() -> None:
    """The cluster's secrets Secret is written by replicas, but anyone RBAC lets write it may: a node
    mirrors only entries that are records the single machine would have stored."""
    import base64

    from sandboxd.kube import e2b_secrets

    def entry(record: object) -> str:
        return base64.b64encode(json.dumps(record).encode()).decode()

    good = {"name": "token", "value": "v1", "version": 2, "metadata": {}, "created_at": 1.0, "updated_at": 2.0}
    secret = {
        "data": {
            "sec_1": entry(good),
            "sec_2": entry({**good, "name": "Bad Name"}),
            "sec_3": entry({**good, "value": "line\nbreak"}),
            "sec_4": entry({**good, "version": "2"}),
            "sec_5": "not base64!",
            "sec_6": entry(["not", "a", "record"]),
            "not-an-id": entry({**good, "name": "other"}),
        }
    }
    records = e2b_secrets.decode(secret)
    assert list(records) == ["sec_1"]
    assert e2b_secrets.as_secret("sec_1", records["sec_1"]).version == 2


def test_a_hostile_secrets_secret_never_stops_the_nodes_copy_following_it() -> None:
    """Entries a writer of the Secret may add that passed the record checks but broke what reads them:
    a name that is not a string (decode crashed: the API answered 500, the node's watch handler
    failed), one name twice or in two cases (the node's copy, whose names are unique, refused the
    whole mirror and kept the previous values, a deleted secret's included)."""
    import base64
    import sqlite3

    from sandboxd.kube import e2b_secrets
    from sandboxd.runtime.secrets import SecretStore

    def entry(record: object) -> str:
        return base64.b64encode(json.dumps(record).encode()).decode()

    good = {"name": "token", "value": "v1", "version": 1, "metadata": {}, "created_at": 1.0, "updated_at": 2.0}
    store = SecretStore(sqlite3.connect(":memory:", isolation_level=None))
    store.mirror([(e2b_secrets.as_secret("sec_0", {**good, "name": "deleted"}), "old value")])
    secret = {
        "data": {
            "sec_1": entry(good),
            "sec_2": entry({**good, "value": "twin"}),
            "sec_3": entry({**good, "name": "Other"}),
            "sec_4": entry({**good, "name": 5}),
            "sec_5": entry({**good, "name": None}),
            "sec_6": entry({**good, "name": "third", "value": ["not", "text"]}),
        }
    }
    records = e2b_secrets.decode(secret)
    assert list(records) == ["sec_1"]
    store.mirror([(e2b_secrets.as_secret(k, r), r["value"]) for k, r in records.items()])
    assert store.names() == {"token"}
    assert store.db.execute("SELECT value FROM secrets").fetchall() == [("v1",)]


def test_a_nodes_copy_of_the_secrets_never_goes_back_to_an_older_version() -> None:
    """A node's copy is fed by its watch and by a fresh read (before a sandbox whose rules name a
    secret the copy lacks), which race: a watch event the read already passed must not drop the
    secret just created (the sandbox's first requests to its rule's host would be refused), and a
    read that a watch event passed on its way must not bring back a value updated or deleted since."""
    import base64
    import sqlite3

    from sandboxd.kube import e2b_secrets
    from sandboxd.runtime.secrets import SecretStore

    def secret(version: str, **values: str) -> dict[str, object]:
        data = {
            f"sec_{name}": base64.b64encode(
                json.dumps(
                    {"name": name, "value": value, "version": 1, "metadata": {}, "created_at": 1.0, "updated_at": 1.0}
                ).encode()
            ).decode()
            for name, value in values.items()
        }
        return {"metadata": {"name": e2b_secrets.SECRETS_NAME, "resourceVersion": version}, "data": data}

    store = SecretStore(sqlite3.connect(":memory:", isolation_level=None))

    def held() -> dict[str, str]:
        return dict(store.db.execute("SELECT name, value FROM secrets").fetchall())

    copy = e2b_secrets.NodeCopy(store)
    assert copy.apply(secret("11", old="v"))
    # The fresh read finds the secret created at 12; the watch's event of 11 comes after it.
    assert copy.apply(secret("12", old="v", new="n1"))
    assert not copy.apply(secret("11", old="v"))
    assert held() == {"old": "v", "new": "n1"}
    # The watch brings the update at 13 while a read of 12 is on its way; the read lands after it.
    assert copy.apply(secret("13", old="v", new="n2"))
    assert not copy.apply(secret("12", old="v", new="n1"))
    assert held() == {"old": "v", "new": "n2"}
    # Versions are numbers: 100 is newer than 99.
    assert copy.apply(secret("99", new="n3"))
    assert copy.apply(secret("100", new="n4"))
    assert not copy.apply(secret("99", new="n3"))
    assert held() == {"new": "n4"}
    # Deleted (the event carries the deletion's version); a read that found no Secret, on its way
    # meanwhile, has no version to be ordered by and changes nothing; the Secret made again applies.
    assert copy.apply(secret("101", new="n4"), deleted=True)
    assert held() == {}
    assert copy.apply(secret("102", new="n5"))
    assert not copy.apply(None)
    assert held() == {"new": "n5"}
    # A node starting with no Secret in the cluster drops what its last run copied.
    fresh = e2b_secrets.NodeCopy(store)
    assert fresh.apply(None)
    assert held() == {}
    # Versions that are not numbers cannot be compared: each one applies, as it comes.
    assert fresh.apply(secret("b", new="x")) and fresh.apply(secret("a", new="y"))
    assert held() == {"new": "y"}


def test_a_sandbox_that_goes_while_its_pod_is_reconciled_has_its_pod_reconciled_again() -> None:
    """The manager's ``on_gone`` (a kill, a pause, a death) while a reconcile of that Pod is under
    way, after it read the sandbox's row: the Pod is reconciled once more, after it, so its status
    follows the sandbox. Before, the refresh was dropped for a Pod being worked on."""
    from sandboxd.kube.node import SandboxNode

    key, pod = "ns/pod-a", {"metadata": {"name": "pod-a", "namespace": "ns"}}
    node = SandboxNode.__new__(SandboxNode)
    node.local, node.latest, node.working, node.tasks = {key: "sbx-a"}, {}, set(), set()
    node.pods = types.SimpleNamespace(items={key: pod})  # type: ignore[assignment]
    reconciled: list[str] = []

    async def reconcile(k: str, p: dict[str, Any] | None) -> None:
        reconciled.append(k)
        if len(reconciled) == 1:
            await asyncio.sleep(0)
            node._sandbox_gone("sbx-a")  # it went after this reconcile read its row
            node._sandbox_gone("sbx-a")  # once queued, not twice
        await asyncio.sleep(0)

    node._reconcile = reconcile  # type: ignore[method-assign,assignment]

    async def run() -> None:
        node._pod_event("MODIFIED", pod)
        while node.tasks:
            await asyncio.gather(*node.tasks)

    asyncio.run(run())
    assert reconciled == [key, key]
    assert node.working == set() and node.latest == {}
