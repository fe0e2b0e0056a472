"""The fal protocol without I/O, in the manner of h11.

Everything fal-specific lives here: which HTTP requests to send (as :class:`httpx.Request`
objects), how to read fal's answers, what to retry and how long to wait, which error to
raise. A *flow* is a generator that yields actions and receives their outcome:

=====================  =====================================================================
action                 the driver does, and sends back
=====================  =====================================================================
``Send(req)``          ``client.send(req)`` -> the read :class:`httpx.Response`, or the
                       ``httpx.HTTPError`` it raised (as a value, not thrown)
``Send(req, True)``    the same with ``stream=True`` (body not read yet)
``Read(resp, t)``      the next body chunk (``b""`` at the end), or the ``httpx.HTTPError``
``Close(resp)``        closes a streamed response -> None
``Sleep(s)``           sleeps -> None
``Offload(fn, args)``  ``fn(*args)`` (in a worker thread when async); exceptions are thrown in
``Emit(chunk)``        hands a :class:`~mantis_llm.types.Chunk` to the caller -> None
=====================  =====================================================================

The drivers in :mod:`mantis_llm.backends.fal` are a few lines each (one sync, one async),
so the two paths cannot drift apart. Interruptions (``KeyboardInterrupt``,
``asyncio.CancelledError``) are thrown into the flow, which cancels the fal job
best-effort (one more ``Send``) and re-raises them.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import SecretStr

from ..errors import (
    AuthenticationError,
    BackendError,
    EndpointNotFoundError,
    InvalidRequestError,
    MantisError,
    RateLimitError,
    RequestTimeoutError,
)
from ..types import Chunk, Request, Response, Update

logger = logging.getLogger("mantis_llm.fal")

DEFAULT_QUEUE_URL = "https://queue.fal.run"
DEFAULT_RUN_URL = "https://fal.run"
DEFAULT_REST_URL = "https://rest.fal.ai"
DEFAULT_CDN_URL = "https://v3.fal.media"
USER_AGENT = "mantis-llm (httpx; python)"

BACKOFF_BASE = 0.1  # seconds; full jitter: sleep U(0, min(cap, base * 2**attempt))
BACKOFF_CAP = 10.0
RETRY_AFTER_CAP = 30.0  # a server's Retry-After is honoured up to this many seconds
CONNECT_TIMEOUT = 10.0
STEP_TIMEOUT = 30.0  # status, result, token: one request never waits longer than this
CANCEL_TIMEOUT = 3.0  # the best-effort cancel PUT
STATUS_STREAM_IDLE = 5.0  # reopen a silent status stream after this long (bounds deadline overshoot)
POLL_START, POLL_GROWTH, POLL_MAX = 0.02, 1.3, 1.0  # adaptive polling interval (seconds)
STREAM_REOPENS = 3  # status streams that end without COMPLETED, in a row, before polling instead


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Send:
    request: httpx.Request
    stream: bool = False


@dataclass(frozen=True)
class Read:
    response: httpx.Response
    timeout: float


@dataclass(frozen=True)
class Close:
    response: httpx.Response


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Offload:
    fn: Callable[..., Any]
    args: tuple = ()


@dataclass(frozen=True)
class Emit:
    chunk: Chunk


Flow = Generator[Any, Any, Any]


# --------------------------------------------------------------------------- configuration


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what "the same host" means."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)


@dataclass(frozen=True)
class FalConfig:
    """Everything a flow needs to know about the backend (immutable)."""

    endpoint: str
    key: SecretStr
    queue_url: str
    run_url: str
    rest_url: str
    cdn_url: str
    timeout: float
    max_retries: int
    with_logs: bool = False
    upload_threshold: int = 1_000_000
    extra_input: dict[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def trusted_origins(self) -> frozenset:
        """The hosts that may see ``Authorization: Key``: the configured queue, run and REST hosts."""
        return frozenset(origin(u) for u in (self.queue_url, self.run_url, self.rest_url))

    def build(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        connect: float = CONNECT_TIMEOUT,
        key_auth: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        """An :class:`httpx.Request` with our headers and its own timeout.

        ``Authorization: Key`` is added only when ``key_auth`` and the URL's host is one of
        :attr:`trusted_origins`, so the key can never reach another host.
        """
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        h.update(headers or {})
        req = httpx.Request(method, url, headers=h, **kwargs)
        if key_auth and origin(req.url) in self.trusted_origins:
            req.headers["Authorization"] = "Key " + self.key.get_secret_value()
        t = max(timeout, 0.001)
        req.extensions["timeout"] = httpx.Timeout(t, connect=min(connect, t)).as_dict()
        return req

    def app_base(self) -> str:
        """``owner/app`` of the endpoint (status/result/cancel URLs never carry a subpath)."""
        parts = self.endpoint.strip("/").split("/")
        n = 3 if parts[0] in ("workflows", "comfy") else 2
        return "/".join(parts[:n])


@dataclass
class CdnToken:
    header: SecretStr  # "Bearer <token>"
    expires: float  # time.monotonic() after which a new token is fetched


@dataclass
class SharedState:
    """Mutable state a backend keeps across calls (plain dicts: races only cost a duplicate)."""

    uploads: dict[str, str] = field(default_factory=dict)  # sha256 -> access_url
    token: CdnToken | None = None
    status_stream: bool = True  # False once the server showed it has no status stream


# --------------------------------------------------------------------------- pure helpers


class SSEDecoder:
    """Incremental server-sent-events decoder: ``feed(bytes) -> [data, ...]``."""

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith(":"):
                continue  # comment / keep-alive ping
            else:
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def is_ingress_error(resp: httpx.Response) -> bool:
    """A 502/503/504 from fal's ingress (no ``x-fal-request-id``): the app never saw it."""
    return resp.status_code in (502, 503, 504) and "x-fal-request-id" not in resp.headers


# Step kinds and what may be retried for them. "post" steps (submit, sync run, token
# stream) create a billable job, so they are retried only when the answer proves the job
# was not created; "read" steps (status, token, upload, the result of a failed job) are
# idempotent; "result" is the result GET of a job whose status said COMPLETED without an
# error, so a 5xx there is fal's trouble fetching a good answer, not the job's.
def should_retry_response(kind: str, resp: httpx.Response) -> bool:
    code = resp.status_code
    if code == 504 and resp.headers.get("x-fal-request-timeout-type"):
        return False  # the caller's own server-side timeout expired: final
    if kind == "post":
        return code in (408, 429) or (code == 503 and is_ingress_error(resp))
    if kind == "status":  # fal's own 5xx on a status read never concern the job
        return code in (408, 409, 429) or code >= 500
    if kind == "result":
        return code in (408, 409, 429, 500, 502, 503, 504)
    if kind == "read":
        return code in (408, 409, 429) or is_ingress_error(resp)
    return False  # "cancel": best effort, one try


def should_retry_exception(kind: str, exc: httpx.HTTPError) -> bool:
    if kind == "cancel":
        return False
    if kind == "post":
        # Only errors raised before a byte of the request left us. A read timeout or a
        # dropped connection after sending may mean fal accepted the job: resending
        # could start (and bill) a second one, so those are not retried.
        return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
    return isinstance(exc, httpx.TransportError)


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff for retry number ``attempt`` (0-based)."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except (ValueError, UnicodeDecodeError):
        return None


def format_detail(detail: Any) -> str:
    """fal's ``detail``: a string, or pydantic-style ``[{loc, msg, type}]`` -> "loc: msg; ..."."""
    if isinstance(detail, list):
        lines = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                msg = str(item.get("msg", item))
                lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
            else:
                lines.append(str(item))
        return "; ".join(lines)
    if detail is None:
        return ""
    return str(detail)


def error_for_response(resp: httpx.Response, *, step: str, endpoint: str, request_id: str | None = None) -> MantisError:
    """The typed error for a failed fal answer (never quotes the request's headers)."""
    code = resp.status_code
    body = _json(resp)
    rid = resp.headers.get("x-fal-request-id") or request_id
    detail = body.get("detail") if isinstance(body, dict) else None
    error_type = (body.get("error_type") if isinstance(body, dict) else None) or resp.headers.get("x-fal-error-type")
    text = format_detail(detail) or (resp.text[:300].strip() if body is None else "")
    if len(text) > 1000:
        text = text[:1000] + "..."
    what = f"fal {step} failed"
    kw = dict(request_id=rid, status_code=code, detail=detail if detail is not None else body)
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


def status_update(data: Any, request_id: str | None) -> Update:
    """Read one status body (polled or streamed) into an :class:`Update`; logs as sent."""
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise BackendError(f"fal sent an unexpected status body: {str(data)[:200]}", request_id=request_id)
    logs = data.get("logs") or []
    metrics = data.get("metrics") or {}
    pos = data.get("queue_position")
    return Update(
        status=data["status"],
        request_id=data.get("request_id") or request_id,
        queue_position=pos if isinstance(pos, int) and not isinstance(pos, bool) else None,
        logs=[entry for entry in logs if isinstance(entry, dict)] if isinstance(logs, list) else [],
        metrics=metrics if isinstance(metrics, dict) else {},
    )


def output_text(data: Any, request_id: str | None) -> str:
    """The ``output`` string of a result body."""
    if isinstance(data, dict) and isinstance(data.get("output"), str):
        return data["output"]
    raise BackendError(f"fal returned a result without an 'output' string: {str(data)[:200]}", request_id=request_id)


class StopTrimmer:
    """Client-side stop sequences over streamed text: holds back any tail that could be the
    start of a stop string, and cuts the text at the first complete one."""

    def __init__(self, stop: tuple[str, ...] | None) -> None:
        self.stop = tuple(stop or ())
        self.text = ""  # everything received
        self.sent = 0  # characters already released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; return the text that is now safe to release."""
        if self.stopped:
            return ""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.text = True, self.text[:cut]
            out, self.sent = self.text[self.sent :], cut
            return out
        hold = 0
        for s in self.stop:  # longest suffix of text that is a proper prefix of s
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end of the stream: release what was held back."""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def apply_stop(text: str, stop: tuple[str, ...] | None) -> tuple[str, bool]:
    """``text`` cut at the first stop sequence, and whether one was found."""
    trimmer = StopTrimmer(stop)
    trimmer.feed(text)
    return trimmer.text, trimmer.stopped


def token_from_response(data: Any, now: float) -> CdnToken:
    """The CDN token from ``/storage/auth/token``, valid until a minute before ``expires_at``."""
    if not isinstance(data, dict) or not data.get("token"):
        raise BackendError("fal storage answered without an upload token")
    ttl = 600.0
    raw = data.get("expires_at")
    if isinstance(raw, str):
        try:
            exp = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if exp.tzinfo is None:
                exp = exp.replace(tzinfo=timezone.utc)
            ttl = exp.timestamp() - time.time()
        except ValueError:
            pass
    header = f"{data.get('token_type') or 'Bearer'} {data['token']}"
    return CdnToken(SecretStr(header), now + max(0.0, ttl - 60.0))


# --------------------------------------------------------------------------- one call


class DeadlineExceeded(Exception):
    """Internal: the whole-call timeout ran out (turned into RequestTimeoutError)."""


@dataclass
class Job:
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    done: bool = False


class Call:
    """One generation: configuration, deadline, progress tracking and metrics."""

    def __init__(
        self,
        cfg: FalConfig,
        state: SharedState,
        request: Request,
        *,
        on_update: Callable[[Update], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg, self.state, self.request, self.on_update = cfg, state, request, on_update
        self.clock, self.rng = clock, rng or random.Random()
        self.started = clock()
        self.deadline = self.started + cfg.timeout
        self.request_id: str | None = None
        self.submitted: float | None = None
        self.metrics: dict[str, Any] = {"retries": 0, "status_requests": 0, "uploads": 0}
        self._last: tuple | None = None
        self._seen_logs: list[dict] = []

    def remaining(self) -> float:
        return self.deadline - self.clock()

    def check_deadline(self) -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded
        return left

    # -- progress -------------------------------------------------------------------

    def observe(self, data: Any) -> Update:
        """Track one status body; report it to ``on_update`` when something changed.

        Polled bodies carry every log line so far, streamed ones only the new lines; both
        are handled by keeping the lines seen and reporting only new ones.
        """
        upd = status_update(data, self.request_id)
        logs, seen = upd.logs, self._seen_logs
        new = logs[len(seen) :] if seen and logs[: len(seen)] == seen else logs
        self._seen_logs = seen + new
        upd.logs = new
        if upd.status != "IN_QUEUE" and "queue_time" not in self.metrics and self.submitted is not None:
            self.metrics["queue_time"] = round(self.clock() - self.submitted, 4)  # upper bound
        key = (upd.status, upd.queue_position)
        if key != self._last or new:
            self._last = key
            logger.debug(
                "fal request %s: %s position=%s logs+%d", self.request_id, upd.status, upd.queue_position, len(new)
            )
            if self.on_update is not None:
                self.on_update(upd)
        return upd

    # -- one HTTP step with retries --------------------------------------------------

    def call(
        self,
        step: str,
        kind: str,
        build: Callable[[float], httpx.Request],
        *,
        cap: float | None = STEP_TIMEOUT,
        stream: bool = False,
    ) -> Flow:
        """Send ``build(timeout)`` until it succeeds, retrying what ``kind`` allows.

        Returns the successful response (with ``stream``: its body not read yet); raises the
        typed error otherwise.
        """
        attempt = 0
        while True:
            left = self.check_deadline()
            req = build(left if cap is None else min(cap, left))
            result = yield Send(req, stream)
            if isinstance(result, httpx.HTTPError):
                logger.debug("fal %s %s %s -> %s", step, req.method, req.url, type(result).__name__)
                if isinstance(result, httpx.TimeoutException) and self.remaining() <= 0.01:
                    raise DeadlineExceeded
                if attempt < self.cfg.max_retries and should_retry_exception(kind, result):
                    delay = backoff_delay(attempt, self.rng)
                    if delay < self.remaining():
                        attempt += 1
                        self.metrics["retries"] += 1
                        yield Sleep(delay)
                        continue
                raise self.transport_error(step, kind, result)
            logger.debug("fal %s %s %s -> %s", step, req.method, req.url, result.status_code)
            if result.is_success:
                return result
            if stream:
                result = yield from self.read_whole(result)
            if attempt < self.cfg.max_retries and should_retry_response(kind, result):
                delay = parse_retry_after(result.headers.get("retry-after"))
                delay = backoff_delay(attempt, self.rng) if delay is None else min(delay, RETRY_AFTER_CAP)
                if delay < self.remaining():
                    attempt += 1
                    self.metrics["retries"] += 1
                    yield Sleep(delay)
                    continue
            raise error_for_response(result, step=step, endpoint=self.cfg.endpoint, request_id=self.request_id)

    def read_whole(self, resp: httpx.Response) -> Flow:
        """A streamed (error) answer read to its end and closed, as a plain response."""
        body = b""
        while True:
            piece = yield Read(resp, max(min(self.remaining(), STEP_TIMEOUT), 0.001))
            if not isinstance(piece, bytes) or not piece:
                break
            body += piece
        yield Close(resp)
        skip = ("content-encoding", "content-length", "transfer-encoding")
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in skip}
        return httpx.Response(resp.status_code, headers=headers, content=body)

    def transport_error(self, step: str, kind: str, exc: httpx.HTTPError) -> MantisError:
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if kind == "post" and not should_retry_exception("post", exc):
            err = BackendError(
                f"fal {step} failed after the request was sent ({what}); fal may or may not have "
                "started the job, so it was not resent (a resend could run and bill it twice)",
                request_id=self.request_id,
            )
        else:
            err = BackendError(f"fal {step} failed: cannot reach fal ({what})", request_id=self.request_id)
        err.__cause__ = exc
        return err

    def timeout_error(self) -> RequestTimeoutError:
        if self.request_id:
            msg = f"fal request {self.request_id} did not finish within {self.cfg.timeout:g} s; it was cancelled"
        else:
            msg = f"the fal call did not finish within {self.cfg.timeout:g} s"
        return RequestTimeoutError(msg, request_id=self.request_id)

    # -- response ---------------------------------------------------------------------

    def response(self, text: str, stopped: bool) -> Response:
        self.metrics["elapsed"] = round(self.clock() - self.started, 4)
        return Response(
            text=text,
            model=self.cfg.endpoint,
            # fal reports no finish reason: "stop" only when our stop sequence ended the text.
            finish_reason="stop" if stopped else None,
            usage=None,
            request_id=self.request_id,
            metrics=dict(self.metrics),
        )


# --------------------------------------------------------------------------- payload


def encode_images(images: list, labels: list[str], options: Any, threshold: int, client: Any = None) -> list:
    """(Runs off the event loop.) Each image as a URL/data URI string, or an EncodedImage
    too large for a data URI (to be uploaded)."""
    from ..images import encode_for_fal

    out: list = []
    for img, label in zip(images, labels):
        enc = encode_for_fal(img, options, label=label, client=client)
        if isinstance(enc, str):
            out.append(enc)
        else:
            uri = enc.data_uri()
            out.append(uri if len(uri) <= threshold else enc)
    return out


def build_payload(call: Call, image_options: Any, client: Any = None) -> Flow:
    """The endpoint's input JSON: prompt, images (uploading large ones), and the params set."""
    from ..images import labeled_images
    from ..prompt import render

    conv, params = call.request.conversation, call.request.params
    rendered = render(conv, "fal")
    labels = [label for label, _ in labeled_images(conv)]
    if len(labels) != len(rendered.images):
        labels = [f"image {i}" for i in range(1, len(rendered.images) + 1)]
    args = (rendered.images, labels, image_options, call.cfg.upload_threshold, client)
    if all(img.is_remote for img in rendered.images) and not image_options.fetch_remote:
        encoded = encode_images(*args)  # URLs pass through: nothing to decode, no thread hop
    else:
        encoded = yield Offload(encode_images, args)
    urls = []
    for item in encoded:
        urls.append(item if isinstance(item, str) else (yield from upload(call, item)))
    payload: dict[str, Any] = {"prompt": rendered.text, "images": [{"image_url": u} for u in urls]}
    # Only what the user set; fal's defaults apply to the rest. The LLaVA endpoints at fal
    # name the length limit "max_tokens" (one older page says "max_new_tokens"; pass that
    # through extra_input if an endpoint needs it).
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        value = getattr(params, name)
        if value is not None:
            payload[name] = value
    payload.update(call.cfg.extra_input)
    return payload


def upload(call: Call, enc: Any) -> Flow:
    """Upload one encoded image to fal storage (v3 CDN flow), cached by content hash."""
    digest = enc.sha256
    cached = call.state.uploads.get(digest)
    if cached:
        logger.debug("fal upload: cache hit for %s", digest[:12])
        return cached
    cfg = call.cfg
    for attempt in range(2):
        token = call.state.token
        if token is None or token.expires <= call.clock():
            resp = yield from call.call(
                "storage token",
                "read",
                lambda t: cfg.build(
                    "POST",
                    f"{cfg.rest_url}/storage/auth/token",
                    params={"storage_type": "fal-cdn-v3"},
                    json={},
                    timeout=t,
                ),
            )
            token = call.state.token = token_from_response(_json(resp), call.clock())
        ext = enc.mime_type.split("/")[-1]
        try:
            resp = yield from call.call(
                "upload",
                "read",
                lambda t: cfg.build(
                    "POST",
                    f"{cfg.cdn_url}/files/upload",
                    key_auth=False,
                    content=enc.data,
                    timeout=t,
                    headers={
                        "Authorization": token.header.get_secret_value(),
                        "Content-Type": enc.mime_type,
                        "X-Fal-File-Name": f"{digest[:16]}.{ext}",
                    },
                ),
                cap=None,
            )
        except AuthenticationError:
            if attempt:
                raise
            call.state.token = None  # the token expired early or was revoked: fetch a new one once
            continue
        data = _json(resp)
        if not isinstance(data, dict) or not isinstance(data.get("access_url"), str):
            raise BackendError("fal storage upload returned no access_url")
        call.metrics["uploads"] += 1
        call.state.uploads[digest] = data["access_url"]
        logger.debug("fal upload: %d bytes -> %s", len(enc.data), data["access_url"])
        return data["access_url"]
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- flows


def queue_flow(call: Call, image_options: Any, client: Any = None) -> Flow:
    """Submit to the queue, wait on the status stream (or poll), fetch the result."""
    cfg = call.cfg
    payload = yield from build_payload(call, image_options, client)
    resp = yield from call.call(
        "submit",
        "post",
        lambda t: cfg.build("POST", f"{cfg.queue_url}/{cfg.endpoint}", json=payload, timeout=t),
        cap=None,
    )
    job = parse_submit(call, resp)
    try:
        final = yield from wait_for_completion(call, job)
        job.done = True  # nothing left to cancel
        # After a clean completion the GET is retried through 5xx and dropped connections;
        # after a completion with an error, the result's error body is the job's failure.
        kind = "read" if final.get("error") else "result"
        result = yield from call.call("result", kind, lambda t: cfg.build("GET", job.response_url, timeout=t))
    except GeneratorExit:
        raise
    except BaseException as exc:
        if not job.done:
            yield from cancel(call, job)
        if isinstance(exc, KeyboardInterrupt) and hasattr(exc, "add_note"):
            exc.add_note(f"mantis-llm: fal request {job.request_id} was cancelled")
        raise
    if final.get("error"):  # fal ends a failed job COMPLETED; the result answered 2xx anyway
        raise BackendError(
            f"fal job failed: {final['error']}" + (f" [{final['error_type']}]" if final.get("error_type") else ""),
            request_id=job.request_id,
            detail=final,
        )
    text, stopped = apply_stop(output_text(_json(result), job.request_id), call.request.params.stop)
    metrics = final.get("metrics")
    if isinstance(metrics, dict) and "inference_time" in metrics:
        call.metrics["inference_time"] = metrics["inference_time"]
    yield Emit(Chunk(text=text, response=call.response(text, stopped)))


def parse_submit(call: Call, resp: httpx.Response) -> Job:
    data = _json(resp)
    if not isinstance(data, dict) or not isinstance(data.get("request_id"), str):
        raise BackendError(f"fal submit returned no request_id: {resp.text[:200]}")
    rid = call.request_id = call.metrics["request_id"] = data["request_id"]
    call.submitted = call.clock()
    cfg = call.cfg
    base = f"{cfg.queue_url}/{cfg.app_base()}/requests/{rid}"
    urls = {}
    for name, default in (("status_url", base + "/status"), ("response_url", base), ("cancel_url", base + "/cancel")):
        url = data.get(name)
        if not isinstance(url, str) or not url:
            url = default
        elif origin(url) != origin(cfg.queue_url):
            # Never follow fal's URLs to another host with our key: rebuild them on the
            # configured queue host instead (proxies that pass fal's own URLs through work).
            logger.debug("fal %s points to another host; using %s", name, default)
            url = default
        urls[name] = url.rstrip("/")
    logger.debug("fal submit: request %s accepted", rid)
    job = Job(rid, urls["status_url"], urls["response_url"], urls["cancel_url"])
    call.observe({**data, "status": data.get("status") or "IN_QUEUE"})
    return job


def cancel(call: Call, job: Job) -> Flow:
    """PUT cancel_url once, with a short timeout; every failure is swallowed."""
    req = call.cfg.build("PUT", job.cancel_url, timeout=CANCEL_TIMEOUT, connect=CANCEL_TIMEOUT)
    result = yield Send(req)
    code = getattr(result, "status_code", type(result).__name__)
    logger.debug("fal cancel %s -> %s", job.request_id, code)
    call.metrics["cancelled"] = True


def wait_for_completion(call: Call, job: Job) -> Flow:
    if call.state.status_stream:
        final = yield from wait_stream(call, job)
        if final is not None:
            call.metrics["status_transport"] = "sse"
            return final
    call.metrics["status_transport"] = "poll"
    return (yield from wait_poll(call, job))


def wait_stream(call: Call, job: Job) -> Flow:
    """Follow ``{status_url}/stream``; None means "fall back to polling"."""
    cfg, logs = call.cfg, "1" if call.cfg.with_logs else "0"
    empty_runs = 0
    while True:
        left = call.check_deadline()
        req = cfg.build(
            "GET",
            job.status_url + "/stream",
            params={"logs": logs},
            headers={"Accept": "text/event-stream"},
            timeout=min(left, STATUS_STREAM_IDLE),
        )
        call.metrics["status_requests"] += 1
        resp = yield Send(req, stream=True)
        if isinstance(resp, httpx.HTTPError):
            logger.debug("fal status stream: %s; polling instead", type(resp).__name__)
            return None
        ctype = resp.headers.get("content-type", "")
        if not resp.is_success or "text/event-stream" not in ctype:
            logger.debug("fal status stream: HTTP %s %s; polling instead", resp.status_code, ctype)
            if resp.status_code in (404, 405, 501) or (resp.is_success and "text/event-stream" not in ctype):
                call.state.status_stream = False  # this server has no status stream: stop trying
            yield Close(resp)
            return None
        logger.debug("fal status stream %s -> %s", req.url, resp.status_code)
        decoder, got_event = SSEDecoder(), False
        while True:
            chunk = yield Read(resp, max(call.remaining(), 0.001))
            if isinstance(chunk, httpx.HTTPError):
                yield Close(resp)
                if isinstance(chunk, httpx.TimeoutException):
                    call.check_deadline()
                    break  # idle: reopen
                logger.debug("fal status stream broke (%s); polling instead", type(chunk).__name__)
                return None
            if not chunk:  # the server ended the stream before COMPLETED
                yield Close(resp)
                empty_runs = 0 if got_event else empty_runs + 1
                if empty_runs >= STREAM_REOPENS:
                    return None
                break
            for data in decoder.feed(chunk):
                try:
                    body = json.loads(data)
                except ValueError:
                    logger.debug("fal status stream: skipping a non-JSON event")
                    continue
                got_event = True
                if call.observe(body).status == "COMPLETED":
                    yield Close(resp)
                    return body


def wait_poll(call: Call, job: Job) -> Flow:
    """Poll ``GET status_url`` with an interval growing from 20 ms to 1 s."""
    cfg, logs = call.cfg, "1" if call.cfg.with_logs else "0"
    interval = POLL_START
    while True:
        resp = yield from call.call(
            "status", "status", lambda t: cfg.build("GET", job.status_url, params={"logs": logs}, timeout=t)
        )
        call.metrics["status_requests"] += 1
        body = _json(resp)
        before = call._last
        if call.observe(body).status == "COMPLETED":
            return body
        interval = POLL_START if call._last != before else min(interval * POLL_GROWTH, POLL_MAX)
        yield Sleep(min(interval, max(call.remaining(), 0.0)))


def sync_flow(call: Call, image_options: Any, client: Any = None) -> Flow:
    """One POST to the direct endpoint; the answer is the output (no queue, no updates)."""
    cfg = call.cfg
    payload = yield from build_payload(call, image_options, client)
    resp = yield from call.call(
        "run",
        "post",
        lambda t: cfg.build("POST", f"{cfg.run_url}/{cfg.endpoint}", json=payload, timeout=t),
        cap=None,
    )
    call.request_id = call.metrics["request_id"] = resp.headers.get("x-fal-request-id")
    text, stopped = apply_stop(output_text(_json(resp), call.request_id), call.request.params.stop)
    yield Emit(Chunk(text=text, response=call.response(text, stopped)))


def stream_flow(call: Call, image_options: Any, client: Any = None) -> Flow:
    """POST to the direct ``/stream`` endpoint and emit the text as it grows.

    fal's LLaVA apps send ``{"output": <text so far>, "partial": true}`` events; we emit
    the difference. An event whose output does not extend the text so far is taken as a
    delta. Closing the connection (stop sequence, timeout) cancels the run at fal.
    """
    cfg = call.cfg
    payload = yield from build_payload(call, image_options, client)
    # Retried only when the answer proves no job started (a "post" step).
    resp = yield from call.call(
        "stream",
        "post",
        lambda t: cfg.build(
            "POST",
            f"{cfg.run_url}/{cfg.endpoint}/stream",
            json=payload,
            headers={"Accept": "text/event-stream"},
            timeout=t,
        ),
        cap=None,
        stream=True,
    )
    call.request_id = call.metrics["request_id"] = resp.headers.get("x-fal-request-id")
    trimmer, decoder, text = StopTrimmer(call.request.params.stop), SSEDecoder(), ""
    finished = False
    while not finished and not trimmer.stopped:
        chunk = yield Read(resp, max(call.remaining(), 0.001))
        if isinstance(chunk, httpx.HTTPError):
            yield Close(resp)
            if isinstance(chunk, httpx.TimeoutException):
                call.check_deadline()
            raise call.transport_error("stream", "read", chunk)
        if not chunk:
            break
        for data in decoder.feed(chunk):
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if "output" not in event and ("detail" in event or "error" in event or "status_code" in event):
                yield Close(resp)
                fake = httpx.Response(int(event.get("status_code") or 500), json=event)
                raise error_for_response(fake, step="stream", endpoint=cfg.endpoint, request_id=call.request_id)
            new = event.get("output")
            if isinstance(new, str):
                delta = new[len(text) :] if new.startswith(text) else new
                text = new if new.startswith(text) else text + new
                out = trimmer.feed(delta)
                if out:
                    yield Emit(Chunk(text=out))
            if event.get("partial") is False or trimmer.stopped:
                finished = True
                break
        if not finished and not trimmer.stopped:
            call.check_deadline()
    yield Close(resp)
    rest = trimmer.flush()
    if rest:
        yield Emit(Chunk(text=rest))
    yield Emit(Chunk(text="", response=call.response(trimmer.text, trimmer.stopped)))


FLOWS = {"queue": queue_flow, "sync": sync_flow, "stream": stream_flow}


def run_flow(mode: str, call: Call, image_options: Any, client: Any = None) -> Flow:
    """The flow for ``mode``, with the whole-call deadline turned into RequestTimeoutError."""
    try:
        return (yield from FLOWS[mode](call, image_options, client))
    except DeadlineExceeded:
        raise call.timeout_error() from None
