"""The read API's errors: each has an HTTP status, a code a client can branch on, and a message.

Every error leaves the API as `{"error": code, "detail": message}`, like ingest's.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import Response

from schemas.errors import error_body


class ApiError(Exception):
    """A refusal with its HTTP status, error code and a detail for the caller."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class NotAuthenticated(ApiError):
    """No session, or one that is forged, expired or closed: always 401, never a fallback user."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(401, code, detail)


class NotFound(ApiError):
    """Absent, or another company's: the two are indistinguishable on purpose."""

    def __init__(self, what: str) -> None:
        super().__init__(404, "not_found", f"no such {what}")


class InvalidCursor(ApiError):
    """A cursor that this API did not issue for this list."""

    def __init__(self, detail: str = "cursor is not valid for this list") -> None:
        super().__init__(400, "invalid_cursor", detail)


class DatabaseUnavailable(ApiError):
    def __init__(self, detail: str = "the database is unavailable; retry shortly") -> None:
        super().__init__(503, "database_unavailable", detail)


def error_response(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None, **extra: object
) -> Response:
    return Response(
        error_body(code, detail, **extra),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )
