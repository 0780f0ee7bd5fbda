"""``sandboxd status``: one screen about a running runtime, for a person at a terminal.

It asks the runtime (``GET /status``, with the API key) rather than reading its files, so what it
shows is what the runtime knows now: version, uptime, readiness, sandboxes by state, the host budget
used, the zygote, and the last errors. The runtime's URL and key come from the flags, else
``$E2B_API_KEY``, else the data dir, where ``sandboxd serve`` records both (root can read it).
Exits 0 when the runtime is ready, 1 when it answers but is not ready, 2 when it cannot be asked.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:3000"
REQUEST_TIMEOUT_S = 5.0
"""A runtime that cannot answer its status in this long is reported as not answering."""
SHOWN_ERRORS = 5


def main(url: str | None, data_dir: Path, api_key: str | None, as_json: bool) -> int:
    recorded = _recorded(data_dir)
    url = (url or recorded.get("url") or DEFAULT_URL).rstrip("/")
    key = api_key or os.environ.get("E2B_API_KEY") or recorded.get("api_key") or ""
    request = urllib.request.Request(f"{url}/status", headers={"X-API-KEY": key})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            status = json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode(errors="replace")
        hint = " (pass --api-key, or run as root to read it from --data-dir)" if exc.code == 401 else ""
        print(f"sandboxd status: {url} answered {exc.code}: {detail}{hint}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"sandboxd status: no runtime answers at {url}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=2) if as_json else render(status, url))
    return 0 if status.get("ready") else 1


def _recorded(data_dir: Path) -> dict[str, str]:
    """The URL and API key `sandboxd serve` recorded in the data dir (read-only; {} if unreadable)."""
    path = data_dir / "sandboxd.db"
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {
                str(k): str(v) for k, v in db.execute("SELECT key, value FROM settings WHERE key IN ('url', 'api_key')")
            }
        finally:
            db.close()
    except sqlite3.Error:
        return {}


def render(status: dict[str, Any], url: str) -> str:
    """The screen: a few labelled lines, widest first-column label ``last errors``."""
    states = status.get("sandboxes", {})
    budget = status.get("budget", {})
    zygote = status.get("zygote", {})
    checks = status.get("checks", {})
    ready = "ready" if status.get("ready") else "NOT READY"
    slots, slots_max = budget.get("slotsUsed", 0), budget.get("slotsMax", 0)
    memory, host_memory = budget.get("memoryCommittedBytes", 0), budget.get("memoryHostBytes", 0)
    host_used = budget.get("memoryHostUsedBytes", 0)
    zygote_state = "up" if zygote.get("up") else f"DOWN: {zygote.get('reason')}"
    lines = [
        f"sandboxd {status.get('version')} (envd {status.get('envdVersion')}) at {url}, pid {status.get('pid')}",
        f"{'state':<12} {ready}, up {_duration(status.get('uptimeSeconds', 0))} (since {status.get('startedAt')})",
        f"{'sandboxes':<12} {states.get('running', 0)} running, {states.get('paused', 0)} paused, "
        f"{states.get('starting', 0)} starting",
        f"{'budget':<12} slots {slots}/{slots_max} ({_pct(slots, slots_max)}), "
        f"cpus {budget.get('cpusCommitted', 0)} committed of {budget.get('cpusHost', 0)}",
        f"{'':<12} memory {_size(memory)} committed of {_size(host_memory)} ({_pct(memory, host_memory)}), "
        f"host {_pct(host_used, host_memory)} used",
        f"{'':<12} data dir {_size(budget.get('dataDirFreeBytes', 0))} free of {_size(budget.get('dataDirBytes', 0))}",
        f"{'zygote':<12} {zygote_state}, {zygote.get('restarts', 0)} restarts",
    ]
    failed = [f"{name}: {problem}" for name, problem in checks.items() if problem]
    if failed:
        lines.append(f"{'checks':<12} " + f"\n{'':<12} ".join(failed))
    errors = status.get("recentErrors", [])[-SHOWN_ERRORS:]
    if not errors:
        lines.append(f"{'last errors':<12} none")
    for i, error in enumerate(errors):
        where = f" [{error['sandbox_id']}]" if error.get("sandbox_id") else ""
        label = "last errors" if i == 0 else ""
        message = str(error.get("message", ""))[:120]
        lines.append(f"{label:<12} {error.get('time')} {error.get('level')} {error.get('event')}{where} {message}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"
