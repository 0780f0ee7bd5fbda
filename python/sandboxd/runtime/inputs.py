"""Request bodies and query strings as they enter the control plane: bounded, typed, and refused with
a 400 that names the field.

Everything a client sends is hostile until it passes through here. JSON is parsed with a size bound
and its nesting bounded by the C decoder's recursion guard (100,000 ``[`` is a 400, not a
``RecursionError``); numbers are checked against the range the field allows before they are used
(a 5,000-digit ``limit`` is refused before Python tries to convert it); strings must be encodable
(no lone surrogates, which SQLite and UTF-8 reject later); env var names follow POSIX and values carry
no NUL (``execve`` cannot pass one, so every later command would fail).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from sandboxd.agent.asgi import Receive, body_chunks, read_body

from .errors import ApiError

MAX_BODY = 1 << 20
"""Create bodies carry metadata and env vars; 1 MiB is far beyond any real one."""

WRITE_BATCH = 1 << 20
"""Body bytes gathered before each write of :func:`write_body`, which runs in a worker thread."""

MAX_QUERY = 16 << 10
"""A list query (metadata filter, states, token) is a few hundred bytes; 16 KiB leaves room for a
long metadata filter without letting a client make us parse megabytes."""

MAX_QUERY_FIELDS = 64
"""Distinct query parameters read at most (the longest endpoint takes eight)."""

INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
"""E2B's OpenAPI types (``int32``, ``int64``): a value outside them is a 400 there too."""

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
"""POSIX's portable env var names; anything else (``A=B``, ``""``) breaks every later ``execve``."""

MAX_ENV_VARS = 1000
MAX_METADATA_KEYS = 100
MAX_KEY_CHARS = 256
MAX_VALUE_CHARS = 4096
"""Metadata is for labels and env vars are for settings: these bounds are far above real use, and
keep one sandbox's row (read by every list) small. Env values may be longer (certificates, JSON):
their total is bounded by :data:`MAX_BODY`."""

MAX_NAME_CHARS = 256
"""Template names and other identifiers."""

SANDBOX_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""What a sandbox id in a path or header can look like (ours are 20 of ``[a-z0-9]``)."""

_DIGITS = re.compile(r"-?[0-9]{1,19}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _quote(value: str, limit: int = 64) -> str:
    """A value for an error message: JSON-quoted and cut, so nothing a client sent is echoed at length."""
    shown = json.dumps(value[:limit])
    return shown + ("…" if len(value) > limit else "")


def text(value: Any, name: str, max_chars: int = MAX_NAME_CHARS, allow_nul: bool = True) -> str:
    """A string field: a str, at most ``max_chars`` long, encodable as UTF-8."""
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a string, got {_kind(value)}")
    if len(value) > max_chars:
        raise ApiError(400, f"'{name}' is longer than {max_chars} characters")
    if _SURROGATE.search(value):
        raise ApiError(400, f"'{name}' is not valid Unicode (it has a lone surrogate)")
    if not allow_nul and "\0" in value:
        raise ApiError(400, f"'{name}' must not contain a NUL character")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def sandbox_id(value: str) -> str:
    """A sandbox id from a path or header; anything else is a 400 naming ``sandboxID``."""
    if not SANDBOX_ID.fullmatch(value):
        raise ApiError(400, f"'sandboxID' {_quote(value)} is not a sandbox id")
    return value


class Body:
    """A JSON object body, read and parsed with bounds; its fields are taken with typed accessors."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    @classmethod
    async def read(cls, receive: Receive) -> Body:
        raw = await read_body(receive, MAX_BODY)
        if raw is None:
            raise ApiError(413, f"request body exceeds {MAX_BODY} bytes")
        return cls.parse(raw)

    @classmethod
    def parse(cls, raw: bytes) -> Body:
        if not raw.strip():
            return cls({})
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        except (ValueError, UnicodeDecodeError) as exc:  # bad UTF-8; an integer past Python's digit limit
            raise ApiError(400, f"request body is not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return cls(body)

    def integer(self, name: str, minimum: int, maximum: int, default: int | None = None) -> int | None:
        value = self.fields.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApiError(400, f"'{name}' must be an integer, got {_kind(value)}")
        if isinstance(value, float):
            if not value.is_integer():
                raise ApiError(400, f"'{name}' must be an integer, got {value!r}")
            value = int(value)
        if not minimum <= value <= maximum:
            raise ApiError(400, f"'{name}' must be from {minimum} to {maximum}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.fields.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ApiError(400, f"'{name}' must be a boolean, got {_kind(value)}")
        return value

    def string(self, name: str, max_chars: int = MAX_NAME_CHARS, required: bool = False) -> str | None:
        value = self.fields.get(name)
        if value is None or value == "":
            if required:
                raise ApiError(400, f"'{name}' is required and must be a non-empty string")
            return None
        return text(value, name, max_chars)

    def object(self, name: str) -> Body:
        value = self.fields.get(name)
        if value is None:
            return Body({})
        if not isinstance(value, dict):
            raise ApiError(400, f"'{name}' must be an object, got {_kind(value)}")
        return Body(value)

    def metadata(self, name: str = "metadata") -> dict[str, str]:
        """String labels: at most :data:`MAX_METADATA_KEYS`, keys and values bounded."""
        return self._string_map(name, MAX_METADATA_KEYS, MAX_VALUE_CHARS, None)

    def env_vars(self, name: str = "envVars") -> dict[str, str]:
        """Env vars: POSIX names, values without NUL."""
        return self._string_map(name, MAX_ENV_VARS, MAX_BODY, ENV_NAME)

    def _string_map(
        self, name: str, max_keys: int, max_value: int, key_pattern: re.Pattern[str] | None
    ) -> dict[str, str]:
        value = self.fields.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ApiError(400, f"'{name}' must be an object of strings, got {_kind(value)}")
        if len(value) > max_keys:
            raise ApiError(400, f"'{name}' has {len(value)} entries; at most {max_keys} are allowed")
        env = key_pattern is not None
        result: dict[str, str] = {}
        for key, item in value.items():
            text(key, f"{name} key {_quote(key)}", MAX_KEY_CHARS)
            if key_pattern is not None and not key_pattern.fullmatch(key):
                raise ApiError(400, f"'{name}' key {_quote(key)} is not a valid name ([A-Za-z_][A-Za-z0-9_]*)")
            if not key:
                raise ApiError(400, f"'{name}' has an empty key")
            result[key] = text(item, f"{name}.{key}", max_value, allow_nul=not env)
        return result


class Query:
    """A query string, parsed with bounds; the last value of a repeated name wins, except in :meth:`all`."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) > MAX_QUERY:
            raise ApiError(400, f"the query string is longer than {MAX_QUERY} bytes")
        try:
            pairs = parse_qsl(
                raw.decode("latin-1"),
                keep_blank_values=True,
                max_num_fields=MAX_QUERY_FIELDS,
                encoding="utf-8",
                errors="strict",
            )
        except UnicodeDecodeError as exc:
            raise ApiError(400, f"the query string is not valid UTF-8 once decoded: {exc.reason}") from None
        except ValueError:
            raise ApiError(400, f"the query string has more than {MAX_QUERY_FIELDS} fields") from None
        self.pairs = pairs
        self.values = dict(pairs)

    def __contains__(self, name: str) -> bool:
        return bool(self.values.get(name))

    def get(self, name: str, max_chars: int = MAX_NAME_CHARS) -> str | None:
        value = self.values.get(name)
        if not value:
            return None
        return text(value, name, max_chars)

    def all(self, name: str, max_chars: int = MAX_NAME_CHARS) -> list[str]:
        """Every non-empty value of a name that may repeat (``types=a&types=b``), in order."""
        return [text(value, name, max_chars) for key, value in self.pairs if key == name and value]

    def integer(self, name: str, minimum: int, maximum: int, default: int | None = None) -> int | None:
        value = self.values.get(name)
        if not value:
            return default
        if not _DIGITS.fullmatch(value) or not minimum <= int(value) <= maximum:
            raise ApiError(400, f"'{name}' must be an integer from {minimum} to {maximum}, got {_quote(value, 24)}")
        return int(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str | None = None) -> str | None:
        value = self.values.get(name)
        if not value:
            return default
        if value.lower() not in choices:
            raise ApiError(400, f"'{name}' must be one of {', '.join(choices)}, got {_quote(value, 24)}")
        return value.lower()


async def write_body(
    receive: Receive, write: Callable[[bytes], object], limit: int | None = None, too_large: str = ""
) -> int:
    """A request body streamed to ``write`` (blocking, so called in a worker thread, never on the
    event loop) in batches of about :data:`WRITE_BATCH`; returns its size. Past ``limit`` bytes, a
    413 (``too_large`` its message) before anything more is written; a client that leaves raises
    ``ClientDisconnected``."""
    size = 0
    pending: list[bytes] = []
    pending_size = 0
    async for chunk in body_chunks(receive):
        size += len(chunk)
        if limit is not None and size > limit:
            raise ApiError(413, too_large or f"the body exceeds {limit} bytes")
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= WRITE_BATCH:
            await asyncio.to_thread(write, b"".join(pending))
            pending, pending_size = [], 0
    if pending:
        await asyncio.to_thread(write, b"".join(pending))
    return size
