"""One exception hierarchy for everything mantis-llm raises.

Every error is a :class:`MantisError`; catch that to handle them all. Errors that come
from fal carry the ``request_id`` (when fal assigned one) and the HTTP ``status_code``.
Messages never contain the API key.
"""

from __future__ import annotations

from typing import Any


class MantisError(Exception):
    """Base class of every error raised by mantis-llm."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        status_code: int | None = None,
        detail: Any = None,
    ) -> None:
        self.message = message
        self.request_id = request_id
        self.status_code = status_code
        self.detail = detail
        super().__init__(message)

    def __str__(self) -> str:
        extra = []
        if self.status_code is not None:
            extra.append(f"HTTP {self.status_code}")
        if self.request_id:
            extra.append(f"request_id={self.request_id}")
        return f"{self.message} ({', '.join(extra)})" if extra else self.message

    def __reduce__(self):  # keep keyword fields when pickled (multiprocessing, caches)
        return (
            _rebuild,
            (type(self), self.message, self.request_id, self.status_code, self.detail),
        )


def _rebuild(cls, message, request_id, status_code, detail):
    return cls(message, request_id=request_id, status_code=status_code, detail=detail)


class ConfigurationError(MantisError):
    """The client is misconfigured: missing key, missing optional extra, bad option."""


class InvalidRequestError(MantisError, ValueError):
    """The request itself is wrong (bad message, bad parameter, rejected by fal with 4xx/422)."""


class ImageError(InvalidRequestError):
    """An image cannot be used: unsupported format, corrupt, too large, unreachable."""


class ContextLengthError(InvalidRequestError):
    """Text and images do not fit in the model's context window."""


class AuthenticationError(MantisError):
    """fal rejected the credentials (401/403)."""


class RateLimitError(MantisError):
    """fal kept answering 429 after every retry."""


class BackendError(MantisError):
    """The backend failed: fal 5xx, a job that ended with an error, a local model failure."""


class EndpointNotFoundError(BackendError):
    """fal answered 404 for the endpoint (wrong id, or the endpoint was retired)."""


class RequestTimeoutError(MantisError, TimeoutError):
    """The call did not finish within its timeout (the fal job was cancelled best-effort)."""


class RequestCancelledError(MantisError):
    """The caller cancelled the call (the fal job was cancelled best-effort)."""


__all__ = [
    "MantisError",
    "ConfigurationError",
    "InvalidRequestError",
    "ImageError",
    "ContextLengthError",
    "AuthenticationError",
    "RateLimitError",
    "BackendError",
    "EndpointNotFoundError",
    "RequestTimeoutError",
    "RequestCancelledError",
]
