"""The typed error for each way a fal call can fail (pure functions; never quotes the
request's headers, so the key cannot leak into a message)."""

from __future__ import annotations

from typing import Any

import httpx

from ...errors import (
    AuthenticationError,
    BackendError,
    EndpointNotFoundError,
    InvalidRequestError,
    MantisError,
    RateLimitError,
    RequestTimeoutError,
)
from .._http.responses import format_detail, json_body
from ._policy import StepKind, should_retry_exception


def error_for_response(resp: httpx.Response, *, step: str, endpoint: str, request_id: str | None = None) -> MantisError:
    """The typed error for a failed fal answer."""
    code = resp.status_code
    body = json_body(resp)
    rid = resp.headers.get("x-fal-request-id") or request_id
    detail = body.get("detail") if isinstance(body, dict) else None
    error_type = (body.get("error_type") if isinstance(body, dict) else None) or resp.headers.get("x-fal-error-type")
    text = format_detail(detail) or (resp.text[:300].strip() if body is None else "")
    if len(text) > 1000:
        text = text[:1000] + "..."
    what = f"fal {step} failed"
    kw: dict[str, Any] = dict(request_id=rid, status_code=code, detail=detail if detail is not None else body)
    if code in (401, 403):
        why = "rejected the API key" if code == 401 else "refused this API key access"
        return AuthenticationError(
            f"fal {why} for {endpoint!r}: set a valid key with `export FAL_KEY=...` or pass api_key=", **kw
        )
    if code == 404 and step in ("submit", "run"):
        return EndpointNotFoundError(
            f"fal has no endpoint {endpoint!r} (HTTP 404): the endpoint id may be wrong or the "
            f"endpoint may have been retired; pass another endpoint/model id. fal said: {text}",
            **kw,
        )
    if code in (404, 405) and step == "stream":
        return EndpointNotFoundError(
            f"fal answered HTTP {code} for the token stream of {endpoint!r}: the endpoint has no token stream "
            f"(or the id is wrong); mode='auto' falls back to the queue, mode='queue' never streams. fal said: {text}",
            **kw,
        )
    if code == 422:
        return InvalidRequestError(f"fal rejected the input for {endpoint!r}: {text}", **kw)
    if code == 413:
        return InvalidRequestError(
            f"{what}: the request is too large for fal (lower upload_threshold so large images "
            f"are uploaded instead of inlined): {text}",
            **kw,
        )
    if code == 429:
        return RateLimitError(f"{what}: fal is rate limiting this key (too many concurrent requests): {text}", **kw)
    if error_type:
        text = f"{text} [{error_type}]" if text else f"[{error_type}]"
    if 400 <= code < 500 and code not in (408, 409):
        return InvalidRequestError(f"{what}: {text}", **kw)
    return BackendError(f"{what}: {text or 'HTTP ' + str(code)}", **kw)


def asks_for_an_image(exc: MantisError) -> bool:
    """Whether a 422 rejected the input for having no image (the endpoint wants at least one):
    a pydantic-style error on ``images`` itself (``too_short``/``min_items``, "at least 1"),
    or a plain-string detail saying an image is required."""
    if exc.status_code != 422:
        return False
    for item in exc.detail if isinstance(exc.detail, list) else [exc.detail]:
        if isinstance(item, dict):
            loc = [p for p in item.get("loc") or [] if p != "body"]
            kind, msg = str(item.get("type", "")), str(item.get("msg", "")).lower()
            if loc == ["images"] and (kind in ("too_short", "value_error.list.min_items") or "at least 1" in msg):
                return True
        elif isinstance(item, str):
            text = item.lower()
            if "image" in text and any(w in text for w in ("at least 1", "at least one", "required")):
                return True
    return False


def transport_error(
    step: str, kind: StepKind, exc: httpx.HTTPError, request_id: str | None, *, resend: bool = False
) -> MantisError:
    """The error for a request that got no answer (connection refused, dropped, timed out)."""
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if kind == "creates_job" and not resend and not should_retry_exception(kind, exc):
        err = BackendError(
            f"fal {step} failed after the request was sent ({what}); fal may or may not have "
            "started the job, so it was not resent (a resend could run and bill it twice; "
            "submit_policy='at_least_once' resends it)",
            request_id=request_id,
        )
    else:
        err = BackendError(f"fal {step} failed: cannot reach fal ({what})", request_id=request_id)
    err.__cause__ = exc
    return err


def timeout_error(timeout: float, request_id: str | None) -> RequestTimeoutError:
    if request_id:
        msg = f"fal request {request_id} did not finish within {timeout:g} s; it was cancelled"
    else:
        msg = f"the fal call did not finish within {timeout:g} s"
    return RequestTimeoutError(msg, request_id=request_id)


def job_error(status: dict[str, Any], request_id: str | None) -> BackendError:
    """A job that fal ended COMPLETED with an ``error`` (its result answered 2xx anyway)."""
    kind = f" [{status['error_type']}]" if status.get("error_type") else ""
    return BackendError(f"fal job failed: {status['error']}{kind}", request_id=request_id, detail=status)
