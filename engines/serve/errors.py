"""What a client is told when a request fails: a status code and one message, never a stack trace.

``ApiError`` is a bad request found by a protocol module (status 400 and the field it names, 404 for an
unknown model). planforge's own errors map by kind: ``Overloaded`` 429 with ``Retry-After``,
``DeadlineExceeded`` 504, a bad input (``RuntimeInputError``, ``UsageError``) 400; anything else is logged
here with its traceback and answered 500 "internal error"."""

from __future__ import annotations

import logging

from foundation.errors import DeadlineExceeded, Overloaded, RuntimeInputError, UsageError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def classify(exc: BaseException) -> ApiError:
    """The status and message of any failure (module docstring)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc))
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, str(exc))
    if isinstance(exc, (RuntimeInputError, UsageError)):
        return ApiError(400, str(exc))
    logger.error("request failed", exc_info=exc)
    return ApiError(500, "internal error (the server's log has the details)")


def headers(error: ApiError) -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)} if error.status == 429 else {}
