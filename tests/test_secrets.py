"""E2B's secrets API through the official SDK's ``Secret``, against a real ``sandboxd serve``: create,
look up by id and by name, list page by page, update (a new version), exists, destroy; values are
never answered; bad input is a 4xx that says what to fix. What the egress proxy does with a secret
is in test_network_sdk.py (it needs the network lab)."""

from __future__ import annotations

import json
import secrets

import httpx
import pytest
from conftest import Runtime
from e2b import Sandbox, Secret, SecretNotFoundException


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_create_read_list_update_destroy(e2b_env: Runtime) -> None:
    name = _name("OpenAI-Key")  # kept lowercased, as on E2B
    created = Secret.create(name, "sk-first", metadata={"env": "test"})
    assert created.secret_id.startswith("sec_") and created.name == name.lower()
    assert created.version == 1 and created.metadata == {"env": "test"}
    assert Secret.get_info(created.secret_id).name == name.lower()
    assert Secret.get_info(name).secret_id == created.secret_id  # by name, in any case
    assert Secret.exists(name.lower()) and not Secret.exists(_name("absent"))

    updated = Secret.update(created.secret_id, "sk-second")
    assert updated.version == 2 and updated.metadata == {"env": "test"}, "metadata is kept when not given"
    replaced = Secret.update(name, "sk-third", metadata={"env": "prod"})
    assert replaced.version == 3 and replaced.metadata == {"env": "prod"}
    assert replaced.updated_at >= created.updated_at and replaced.created_at == created.created_at

    more = [Secret.create(_name("page"), "v").secret_id for _ in range(3)]
    seen: list[str] = []
    paginator = Secret.list(limit=2)
    while paginator.has_next:
        page = paginator.next_items()
        assert len(page) <= 2
        seen += [s.secret_id for s in page]
    assert len(seen) == len(set(seen)) and {created.secret_id, *more} <= set(seen)

    with httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key}) as client:
        for answer in (client.get("/secrets").json(), client.get(f"/secrets/{created.secret_id}").json()):
            assert "sk-" not in str(answer), "a secret's value was answered"

    assert Secret.destroy(created.secret_id) and not Secret.destroy(created.secret_id)
    with pytest.raises(SecretNotFoundException):
        Secret.get_info(name)
    for secret_id in more:
        assert Secret.destroy(secret_id)


def test_bad_requests_are_refused_with_a_reason(e2b_env: Runtime) -> None:
    name = _name("taken")
    Secret.create(name, "value")
    with httpx.Client(base_url=e2b_env.url, headers={"X-API-KEY": e2b_env.api_key}) as client:

        def refused(method: str, path: str, status: int, says: str, **kwargs: object) -> None:
            answer = client.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert answer.status_code == status, answer.text
            assert says in answer.json()["message"], answer.json()

        refused("POST", "/secrets", 409, "exists already", json={"name": name.upper(), "value": "v"})
        refused("POST", "/secrets", 400, "not usable", json={"name": "a{b}", "value": "v"})
        refused("POST", "/secrets", 400, "not usable", json={"name": "with space", "value": "v"})
        refused("POST", "/secrets", 400, "not usable", json={"name": "x" * 129, "value": "v"})
        refused("POST", "/secrets", 400, "'value' is required", json={"name": _name("n")})
        refused("POST", "/secrets", 400, "line breaks", json={"name": _name("n"), "value": "a\r\nX-Evil: 1"})
        refused("POST", "/secrets", 400, "longer than 2048", json={"name": _name("n"), "value": "v" * 5000})
        # A lone surrogate is valid JSON (escaped) but no UTF-8: httpx would not send it, so by hand.
        refused("POST", "/secrets", 400, "lone surrogate", content=json.dumps({"name": "s\ud800", "value": "v"}))
        refused("POST", "/secrets", 400, "lone surrogate", content=json.dumps({"name": _name("n"), "value": "v\ud800"}))
        refused("POST", f"/secrets/{name}", 400, "lone surrogate", content=json.dumps({"value": "v\udfff"}))
        refused("POST", "/secrets", 400, "starts secret ids", json={"name": "SEC_mine", "value": "v"})
        refused("POST", "/secrets", 400, "not usable", json={"name": "\u0130" * 128, "value": "v"})  # 256 lowercased
        many = {f"k{i}": "v" for i in range(33)}
        refused("POST", "/secrets", 400, "at most 32", json={"name": _name("n"), "value": "v", "metadata": many})
        wide = {"k": "v" * 1025}
        refused("POST", f"/secrets/{name}", 400, "at most 1024", json={"value": "v", "metadata": wide})
        refused("POST", "/secrets", 400, "must be an object", json={"name": _name("n"), "value": "v", "metadata": 1})
        refused("POST", f"/secrets/{name}", 400, "line breaks", json={"value": "a\nb"})
        refused("GET", "/secrets/sec_nothing", 404, "not found")
        refused("POST", "/secrets/sec_nothing", 404, "not found", json={"value": "v"})
        refused("GET", "/secrets?nextToken=garbage!", 400, "nextToken")
        refused("GET", "/secrets?limit=0", 400, "limit")
        refused("PUT", "/secrets", 405, "not allowed")
        assert client.get("/secrets", headers={"X-API-KEY": "wrong"}).status_code == 401
    Secret.destroy(name)


def test_a_rule_naming_a_secret_that_does_not_exist_is_refused(e2b_env: Runtime) -> None:
    missing = _name("never-created")
    rules = {"api.example.com": [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill(missing)}"}}}]}
    with pytest.raises(Exception, match=f"no secret named '{missing}'"):
        Sandbox.create(network={"rules": rules}, timeout=60)


def test_workload_identity_tokens_are_refused_with_the_way_that_works(e2b_env: Runtime) -> None:
    """E2B's ``iam`` tokens (minted by its egress proxy) are not issued here: refused, naming
    Secret.create and Secret.fill, rather than sending a rule's placeholder as it is."""
    token = Secret.iam_token(audience="sts.amazonaws.com", token_type="JWT-SVID")
    with pytest.raises(Exception, match=r"Secret\.fill"):
        Sandbox.create(iam={"tokens": {"aws": token}}, timeout=60)
    rules = {"sts.amazonaws.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.identity.tokens.aws}"}}}]}
    with pytest.raises(Exception, match="workload identity"):
        Sandbox.create(network={"rules": rules}, timeout=60)
