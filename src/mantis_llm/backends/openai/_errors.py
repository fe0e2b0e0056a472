"""The typed error for each way an OpenAI-route call can fail, and what may be retried
(pure functions; never quotes a request's headers, so the key cannot leak into a message)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import httpx

from ...errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    ContextLengthError,
    InvalidRequestError,
    MantisError,
    RateLimitError,
    RequestTimeoutError,
)
from .._http.responses import format_detail, json_body
from .._http.retry import sent_nothing

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_CONTEXT = re.compile(r"context length|context window|maximum context|too many tokens|prompt is too long", re.I)
_MODEL_REFUSED = re.compile(r"pinned to|model .{0,80}(does not exist|not found)|no such model|unknown model", re.I)


def should_retry_response(resp: httpx.Response) -> bool:
    """429, 408 and 5xx: the server did not run the request to completion; asking again is safe."""
    return resp.status_code in RETRY_STATUS


def should_retry_exception(exc: httpx.HTTPError, *, posts: bool) -> bool:
    """A chat POST is resent only when it never left us (a generation is not ours to repeat
    once the server may have started it); GETs are resent after any transport error."""
    return sent_nothing(exc) if posts else isinstance(exc, httpx.TransportError)


def server_message(body: Any, text: str = "") -> str:
    """The server's own words, from any of the three error shapes: vLLM's
    ``{"error": {"message"}}``, SGLang's flat ``{"message"}``, transformers serve's
    ``{"detail"}`` (or a stream's ``{"error": "<str>"}``); else the body text."""
    msg = ""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = str(err.get("message") or err.get("detail") or "")
        elif isinstance(err, str):
            msg = err
        if not msg and isinstance(body.get("message"), str):
            msg = body["message"]
        if not msg and "detail" in body:
            msg = format_detail(body["detail"])
    if not msg and body is None:
        msg = text.strip()[:300]
    return msg if len(msg) <= 1000 else msg[:1000] + "..."


def served_list(served: Sequence[str] | None) -> str:
    if not served:
        return "the server lists no models at /v1/models"
    return "it serves " + ", ".join(repr(m) for m in served)


def model_error(
    base_url: str, model: str | None, served: Sequence[str] | None, said: str, code: int | None = None
) -> ConfigurationError:
    """The server does not serve ``model``: name what it does serve."""
    return ConfigurationError(
        f"the server at {base_url} does not serve model {model!r}; {served_list(served)}. Pass one of them "
        f"as model=, or leave model unset when the server serves one model (the server said: {said})",
        status_code=code,
        detail=list(served or ()),
    )


def refuses_model(resp: httpx.Response) -> bool:
    """The answer is about the model name (vLLM's 404 "The model `x` does not exist.",
    transformers serve's 400 "Server is pinned to ..."), not about the route."""
    body = json_body(resp)
    return resp.status_code in (400, 404) and bool(_MODEL_REFUSED.search(server_message(body, resp.text)))


def error_for_response(
    resp: httpx.Response,
    *,
    what: str,
    url: str,
    base_url: str,
    model: str | None,
    served: Sequence[str] | None,
    request_id: str | None,
) -> MantisError:
    """The typed error for a failed answer (``what``: "chat completion", "model list", ...)."""
    code = resp.status_code
    body = json_body(resp)
    said = server_message(body, resp.text) or f"HTTP {code}"
    rid = resp.headers.get("x-request-id") or request_id
    kw: dict[str, Any] = dict(request_id=rid, status_code=code, detail=body if body is not None else resp.text[:300])
    if code in (401, 403):
        why = "rejected the API key" if code == 401 else "refused this API key access"
        return AuthenticationError(
            f"the server at {base_url} {why}: pass api_key= or `export OPENAI_API_KEY=...` "
            f"(the key the server was started with, e.g. vLLM's --api-key). It said: {said}",
            **kw,
        )
    if refuses_model(resp):
        err = model_error(base_url, model, served, said, code)
        err.request_id = rid
        return err
    if code == 404:
        return ConfigurationError(
            f"the server at {base_url} has no {what} route ({url}, HTTP 404): check base_url "
            f"(http://host:port, with or without /v1). It said: {said}",
            **kw,
        )
    if code == 413:
        return InvalidRequestError(f"the {what} request is too large for the server (smaller images?): {said}", **kw)
    if code in (400, 422):
        cls = ContextLengthError if _CONTEXT.search(said) else InvalidRequestError
        hint = ""
        if "Unexpected fields" in said:  # transformers serve's answer to any key it does not know
            hint = " (transformers serve takes standard fields only: leave server unset or pass server='transformers')"
        return cls(f"the server rejected the {what} request: {said}{hint}", **kw)
    if code == 429:
        return RateLimitError(f"the server kept answering 429 (too many requests) to the {what}: {said}", **kw)
    if 400 <= code < 500:
        return InvalidRequestError(f"the server refused the {what} request: {said}", **kw)
    return BackendError(f"the server failed the {what} (HTTP {code}): {said}", **kw)


def stream_error(event: dict[str, Any], *, request_id: str | None) -> MantisError:
    """A ``data: {"error": ...}`` event in a stream (the status code, if any, decides the type)."""
    err = event.get("error")
    code = err.get("code") if isinstance(err, dict) else None
    said = server_message(event) or "an error event without a message"
    if isinstance(code, int) and 400 <= code < 500:
        cls = ContextLengthError if _CONTEXT.search(said) else InvalidRequestError
        return cls(f"the server rejected the request mid-stream: {said}", request_id=request_id, detail=event)
    return BackendError(f"the server failed mid-stream: {said}", request_id=request_id, detail=event)


def transport_error(
    what: str, base_url: str, exc: httpx.HTTPError, *, posts: bool, request_id: str | None
) -> BackendError:
    """The error for a request that got no answer (connection refused, dropped, timed out)."""
    how = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if posts and not sent_nothing(exc):
        msg = (
            f"the {what} failed after the request was sent to {base_url} ({how}); the server may have "
            "started it, so it was not resent"
        )
    else:
        msg = f"cannot reach the server at {base_url} for the {what} ({how}): is it running? check base_url"
    err = BackendError(msg, request_id=request_id)
    err.__cause__ = exc
    return err


def timeout_error(timeout: float, request_id: str | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        f"the call did not finish within {timeout:g} s; its connection was closed (vLLM and SGLang "
        "then abort the generation)",
        request_id=request_id,
    )
