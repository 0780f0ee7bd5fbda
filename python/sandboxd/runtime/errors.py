"""Control-plane errors: an HTTP status and a message a person can act on.

The E2B SDK retries 429, 502, 503 and 504 three times, so permanent failures never use them.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error answered as ``{"code": <status>, "message": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(sandbox_id: str) -> ApiError:
    """E2B's own wording, which the SDK shows to users."""
    return ApiError(404, f"Sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it")
