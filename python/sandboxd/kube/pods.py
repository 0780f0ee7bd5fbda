"""How a sandbox is written as a Kubernetes Pod: the one contract between ``sandboxd serve
--backend kubernetes`` and ``sandboxd node`` (and anyone who writes such Pods by hand).

A sandbox is a Pod with ``restartPolicy: Never`` whose single container's ``image`` names a
sandboxd template (``base``, ``code-interpreter-v1``, or one added with ``sandboxd template add``).
Its ``nodeSelector`` and toleration pick sandboxd nodes, which carry :data:`NODE_LABEL` and the
:data:`NODE_TAINT` that keeps every other Pod away. The container's ``env`` are the sandbox's env
vars and its ``resources.limits`` its CPU and memory.

What E2B's API adds lives in labels (what a list filters on) and annotations (the rest):

* label :data:`STATE_LABEL` — the *desired* state, ``running`` or ``paused``: ``serve`` writes it,
  the node makes it so and reports the result in the Pod's :data:`PAUSED_CONDITION` condition;
* label :data:`TEMPLATE_LABEL`, and one label per metadata pair under :data:`META_PREFIX`
  (the value itself when it is a valid label value, else a hash of it: filters stay exact);
* annotations: the metadata as JSON, the end of the sandbox's life (``end-at``, or the seconds
  left while paused), what happens at the timeout, the pause mode, auto-resume, and the network
  settings (:data:`NETWORK_ANNOTATION`, E2B's create-body shape), which the node applies when it
  starts the sandbox and again whenever they change, reporting the result in the Pod's
  :data:`NETWORK_CONDITION` condition.

The phase says whether a sandbox lives: ``Running`` (running or paused), ``Succeeded``/``Failed``
when it ended, with the reason in ``status.reason``/``status.message``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import string
import time
from datetime import UTC, datetime
from typing import Any

from sandboxd.runtime.api import network_from_create, network_to_wire
from sandboxd.runtime.errors import ApiError
from sandboxd.runtime.network.policy import NetworkConfig, validate

GROUP = "sandboxd.io"
MANAGED_LABEL = f"{GROUP}/sandbox"
"""On every Pod ``serve`` creates (value ``"true"``): the set ``serve`` lists and watches."""
STATE_LABEL = f"{GROUP}/state"
TEMPLATE_LABEL = f"{GROUP}/template"
META_PREFIX = f"meta.{GROUP}/"
NODE_LABEL = f"{GROUP}/node"
"""On every sandboxd Node (value ``"true"``); sandbox Pods select it."""
NODE_TAINT = f"{GROUP}/sandboxes-only"
"""NoSchedule taint on sandboxd Nodes: only Pods that tolerate it (sandboxes) land there."""
TUNNEL_PORT_ANNOTATION = f"{GROUP}/tunnel-port"
"""On a Node: the port of its sandbox tunnel (also its ``daemonEndpoints.kubeletEndpoint``)."""

METADATA_ANNOTATION = f"{GROUP}/metadata"
END_AT_ANNOTATION = f"{GROUP}/end-at"
REMAINING_ANNOTATION = f"{GROUP}/remaining-seconds"
TIMEOUT_ANNOTATION = f"{GROUP}/timeout-seconds"
ON_TIMEOUT_ANNOTATION = f"{GROUP}/on-timeout"
PAUSE_MODE_ANNOTATION = f"{GROUP}/pause-mode"
AUTO_RESUME_ANNOTATION = f"{GROUP}/auto-resume"
ALIAS_ANNOTATION = f"{GROUP}/template-alias"
RECORDED_AT_ANNOTATION = f"{GROUP}/recorded-at"
"""On the Events a node records: when, in unix seconds to the microsecond (an Event's own timestamps
are to the second, which cannot order a create, pause and resume made within one)."""

NETWORK_ANNOTATION = f"{GROUP}/network"
"""The sandbox's network settings as E2B's create body has them, ``{"allow_internet_access": false,
"network": {"allowOut": [...], "denyOut": [...], ...}}`` (absent: the defaults, internet access).
``serve`` writes it at create and rewrites it whole on ``PUT /sandboxes/{id}/network``."""
NETWORK_CONDITION = f"{GROUP}/Network"
"""A Pod condition the node sets after each change of :data:`NETWORK_ANNOTATION`: ``True`` (reason
``Applied``) or ``False`` (reason ``Refused``, the message says why); its message starts with
:func:`network_digest` of the annotation it answers, so a writer knows when its change was handled."""

PAUSED_CONDITION = f"{GROUP}/Paused"
"""A Pod condition the node sets: True once the sandbox is paused, False once it runs again."""
CONTAINER = "sandbox"
TOKEN_SECRET = "sandboxd"
"""The Secret (in serve's namespace) that holds the API key and the key sandbox access tokens are
derived from; ``serve`` creates it once, nodes read it."""

ID_ALPHABET = string.ascii_lowercase + string.digits
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")

REQUESTS = {"cpu": "10m", "memory": "64Mi"}

DEFAULT_CPUS = 2
"""CPU cores of a sandbox whose size nobody gave (E2B's default sandbox has 2 vCPUs): the limit of the
Pods ``serve --backend kubernetes`` creates without ``--sandbox-cpus``, and what a node gives a Pod
without limits. A serve replica cannot size sandboxes from its own host: they run on other machines."""

DEFAULT_MEMORY_MB = 1024
"""Memory in MiB of a sandbox whose size nobody gave (as :data:`DEFAULT_CPUS`)."""
"""What a sandbox Pod asks the scheduler to reserve: an idle sandbox's share (an idle agent uses no
CPU and ~20 MiB). Sandboxes are bursty and capped by their limits, as on one machine, where every
sandbox may use 2 cores of a 2-core host; so a node is filled by its ``pods`` capacity
(``--max-sandboxes``) long before these requests (a 2-core node takes 200 by CPU)."""


ID_STAMP_DIGITS = 9
"""Base-36 digits of an id's time stamp: 36**9 ms reach the year 5188."""


def new_id() -> str:
    """20 characters of ``[a-z0-9]`` like E2B's, starting with the time *left until* 36**9 ms in base
    36: Kubernetes lists in name order, so names whose prefix shrinks as time goes on make its pages
    run newest first, which is E2B's default order for listing sandboxes."""
    millis = 36**ID_STAMP_DIGITS - 1 - int(time.time() * 1000)
    stamp = ""
    while millis:
        millis, digit = divmod(millis, 36)
        stamp = ID_ALPHABET[digit] + stamp
    return stamp.rjust(ID_STAMP_DIGITS, "0") + "".join(secrets.choice(ID_ALPHABET) for _ in range(11))


def sandbox_id_of(pod: dict[str, Any]) -> str | None:
    """The id of the node's sandbox that runs ``pod`` (its container id ``sandboxd://<id>``, which
    the node reports once the sandbox runs; usually the Pod's name), or None before that."""
    for status in pod.get("status", {}).get("containerStatuses") or []:
        cid = str(status.get("containerID") or "")
        if cid.startswith("sandboxd://"):
            return cid.removeprefix("sandboxd://")
    return None


def access_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """A sandbox's agent token: HMAC of the Pod's identity under the cluster's secret key, so the
    API and the node agree on it without storing it anywhere a Pod reader could see."""
    return _derived(key, f"{namespace}/{name}/{uid}")


def traffic_token(key: bytes, namespace: str, name: str, uid: str) -> str:
    """The token a sandbox's URLs need when its network says ``allowPublicTraffic: false``: derived
    as :func:`access_token` is, from another message (a namespace has no ``:``), so every replica's
    proxy knows it from the Pod alone and neither token tells the other."""
    return _derived(key, f"traffic:{namespace}/{name}/{uid}")


def _derived(key: bytes, message: str) -> str:
    """A token derived from ``message`` under the cluster's secret key (HMAC-SHA256, 192 bits in hex)."""
    return hmac.new(key, message.encode(), hashlib.sha256).digest()[:24].hex()


def label_value(value: str) -> str:
    """``value`` if Kubernetes accepts it as a label value, else ``h.<hash>`` (a label never takes
    the dot-prefixed form from a valid value, since hashes are only used for invalid ones, and a
    filter compares the same transform, then checks the exact annotation)."""
    if _LABEL_VALUE.fullmatch(value) and not value.startswith("h."):
        return value
    return "h." + hashlib.sha256(value.encode()).hexdigest()[:40]


def label_key(key: str) -> str:
    if _LABEL_NAME.fullmatch(key) and not key.startswith("h."):
        return META_PREFIX + key
    return META_PREFIX + "h." + hashlib.sha256(key.encode()).hexdigest()[:40]


def metadata_selector(metadata: dict[str, str]) -> list[str]:
    """Label selector terms for an exact metadata filter."""
    return [f"{label_key(k)}={label_value(v)}" for k, v in sorted(metadata.items())]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: Any) -> float:
    """A Kubernetes time (string or datetime) as unix seconds."""
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def quantity_cores(value: str) -> float:
    """A CPU quantity (``2``, ``500m``) in cores."""
    value = str(value)
    return int(value[:-1]) / 1000 if value.endswith("m") else float(value)


_MEMORY_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "K": 10**3, "M": 10**6, "G": 10**9}


def quantity_bytes(value: str) -> int:
    """A memory quantity (``512Mi``, ``1G``, ``1073741824``) in bytes."""
    value = str(value)
    for suffix, factor in _MEMORY_UNITS.items():
        if value.endswith(suffix):
            return int(float(value[: -len(suffix)]) * factor)
    return int(float(value))


def network_annotation(config: NetworkConfig) -> str | None:
    """:data:`NETWORK_ANNOTATION` for ``config`` (None for the defaults: no annotation)."""
    body: dict[str, Any] = {}
    if config.allow_internet_access is not None:
        body["allow_internet_access"] = config.allow_internet_access
    network = network_to_wire(config)
    if network is not None:
        body["network"] = network
    return json.dumps(body, separators=(",", ":"), sort_keys=True) if body else None


def network_of(pod: dict[str, Any]) -> tuple[NetworkConfig, str]:
    """The network settings a Pod asks for and the digest of its annotation (see
    :func:`parse_network`)."""
    text = (pod["metadata"].get("annotations") or {}).get(NETWORK_ANNOTATION)
    return parse_network(text), network_digest(text)


def parse_network(text: str | None) -> NetworkConfig:
    """A :data:`NETWORK_ANNOTATION` value (None: the defaults). A Pod may come from anyone who can
    write Pods, so it is parsed as the API parses a create body (types, shapes, E2B's messages) and
    checked with E2B's rules; ``ApiError(400)`` says what is wrong."""
    if text is None:
        return NetworkConfig()
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(400, f"annotation {NETWORK_ANNOTATION} is not JSON") from None
    if not isinstance(body, dict) or set(body) - {"allow_internet_access", "network"}:
        raise ApiError(
            400, f'annotation {NETWORK_ANNOTATION} must be {{"allow_internet_access": bool, "network": {{...}}}}'
        )
    config = network_from_create(body)
    check_network(config)
    return config


def check_network(config: NetworkConfig) -> None:
    """E2B's checks of network settings, as on one machine. ``allowPublicTraffic: false`` is the
    replicas' proxies' to enforce (:func:`traffic_token`): the node has nothing to apply for it."""
    validate(config)


def network_digest(text: str | None) -> str:
    """A short digest of a :data:`NETWORK_ANNOTATION` value, or of its absence for None (which no
    value has: an empty annotation is not the defaults, it is refused)."""
    return hashlib.sha256(b"\0" if text is None else text.encode()).hexdigest()[:16]


def sandbox_pod(
    *,
    name: str,
    template: str,
    alias: str | None,
    env_vars: dict[str, str],
    metadata: dict[str, str],
    cpu_count: int,
    memory_mb: int,
    timeout_s: int,
    on_timeout: str,
    pause_mode: str,
    auto_resume: bool,
    network: NetworkConfig | None = None,
) -> dict[str, Any]:
    """The Pod ``serve`` creates for a new sandbox."""
    labels = {MANAGED_LABEL: "true", STATE_LABEL: "running", TEMPLATE_LABEL: label_value(template)}
    labels.update({label_key(k): label_value(v) for k, v in metadata.items()})
    annotations = {
        METADATA_ANNOTATION: json.dumps(metadata, separators=(",", ":")),
        END_AT_ANNOTATION: iso(time.time() + timeout_s),
        TIMEOUT_ANNOTATION: str(timeout_s),
        ON_TIMEOUT_ANNOTATION: on_timeout,
        PAUSE_MODE_ANNOTATION: pause_mode,
        AUTO_RESUME_ANNOTATION: "true" if auto_resume else "false",
    }
    if alias:
        annotations[ALIAS_ANNOTATION] = alias
    network_note = network_annotation(network) if network is not None else None
    if network_note is not None:
        annotations[NETWORK_ANNOTATION] = network_note
    limits = {"cpu": str(cpu_count), "memory": f"{memory_mb}Mi"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {NODE_LABEL: "true"},
            "tolerations": [{"key": NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"}],
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": CONTAINER,
                    "image": template,
                    "env": [{"name": k, "value": v} for k, v in env_vars.items()],
                    "resources": {"requests": dict(REQUESTS), "limits": limits},
                }
            ],
        },
    }
