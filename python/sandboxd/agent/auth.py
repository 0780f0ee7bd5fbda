"""Who may call, and as whom: the access token, signed URLs, and the Basic-auth user (spec §3.1)."""

from __future__ import annotations

import base64
import binascii
import time

from .errors import Code, RpcError
from .state import AgentState, compare_digest
from .users import User, lookup_or_unauthenticated

TOKEN_ERROR = "unauthorized access, please provide a valid access token or method signing if supported"


def basic_auth_username(authorization: str | None) -> str | None:
    """The username of an ``Authorization: Basic base64("user:")`` header, or None if absent."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise RpcError(Code.UNAUTHENTICATED, "authorization header must use the Basic scheme")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise RpcError(Code.UNAUTHENTICATED, "authorization header is not valid base64 'user:'") from None
    name, _, _ = decoded.partition(":")
    return name or None


def rpc_user(state: AgentState, authorization: str | None) -> User:
    """The user an RPC acts as: the Basic-auth username, else the default user."""
    name = basic_auth_username(authorization)
    return lookup_or_unauthenticated(name or state.default_user)


def signature_for(path: str, operation: str, username: str, token: str, expiration: int | None) -> str:
    """The v1 signed-URL signature the E2B SDK computes (``Sandbox.download_url``/``upload_url``)."""
    raw = f"{path}:{operation}:{username}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    import hashlib  # only signed URLs need it: not loaded in an agent that serves none (its RSS, issue 16)

    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).decode().rstrip("=")


def check_files_access(
    state: AgentState,
    *,
    header_token: str | None,
    path: str,
    operation: str,
    username: str | None,
    signature: str | None,
    expiration: str | None,
) -> None:
    """``/files`` authorisation: the header token, or a valid signature, when a token is set."""
    token = state.access_token
    if token is None:
        return
    if header_token is not None:
        if not state.token_matches(header_token):
            raise RpcError(Code.UNAUTHENTICATED, "access token present in header but does not match")
        return
    if not signature:
        raise RpcError(Code.UNAUTHENTICATED, "missing signature query parameter")
    exp: int | None = None
    if expiration:
        try:
            exp = int(expiration)
        except ValueError:
            raise RpcError(Code.INVALID_ARGUMENT, "signature_expiration must be an integer") from None
    expected = signature_for(path, operation, username or "", token, exp)
    if not compare_digest(expected.encode(), signature.encode()):
        raise RpcError(Code.UNAUTHENTICATED, "invalid signature")
    if exp is not None and exp < int(time.time()):
        raise RpcError(Code.UNAUTHENTICATED, "signature is already expired")
