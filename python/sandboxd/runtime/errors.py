"""Control-plane errors: an HTTP status and a message a person can act on.

The E2B SDK retries 429, 502, 503 and 504 three times, so permanent failures never use them, and a
503 that a retry within the SDK's request timeout cannot cure says ``Should-Retry: false``.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error answered as ``{"code": <status>, "message": ...}``."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []
        """Extra response headers, e.g. ``Should-Retry: false`` on a 503 the SDK must not retry."""

    def body(self) -> dict[str, object]:
        """E2B's error body (the ``Error`` model)."""
        return {"code": self.status, "message": self.message}


def not_found(sandbox_id: str) -> ApiError:
    """E2B's own wording, which the SDK shows to users."""
    return ApiError(404, f"Sandbox \"{sandbox_id}\" doesn't exist or you don't have access to it")
