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


def from_validation_error(exc: Any, title: str | None = None) -> ConfigurationError:
    """A :class:`ConfigurationError` for a pydantic ``ValidationError`` (e.g. from an adapter
    constructor): the message names every offending field (with list indexes) and pydantic's
    reason, ``"ChatMantis: temperature: Input should be less than or equal to 2"``; input
    values are left out (one may be a key). ``title`` (default ``exc.title``) starts the
    message; pass the class name from a wrap validator, where ``exc.title`` is pydantic's
    internal name. ``detail`` holds the ``loc``/``msg``/``type`` dicts.
    """
    errors = [
        {"loc": e["loc"], "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    reasons = []
    for e in errors:
        loc = e["loc"]  # a field, then list indexes and union-branch tags (left out)
        path = "".join([str(loc[0]), *(f"[{p}]" for p in loc[1:] if isinstance(p, int))]) if loc else ""
        reason = f"{path}: {e['msg']}" if path else e["msg"]
        if reason not in reasons:
            reasons.append(reason)
    return ConfigurationError(f"{title or exc.title}: {'; '.join(reasons)}", detail=errors)


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
