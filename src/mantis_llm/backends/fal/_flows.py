"""The three ways to run a request on fal, as sans-I/O flows (see :mod:`.._http.actions`):
``queue`` (submit, follow the status, fetch the result), ``sync`` (one POST) and
``stream`` (fal's SSE endpoint); :func:`run_flow` runs one of them for a call, with what
the endpoint may turn out to lack (a token stream) or need (an image) handled around it."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Literal

import httpx

from ..._text import StopTrimmer, apply_stop
from ...errors import BackendError, InvalidRequestError, MantisError
from ...images import ImageOptions
from ...types import Chunk
from .._http import origin
from .._http.actions import Flow, close, emit, read, send, sleep
from .._http.responses import json_body
from .._http.retry import DeadlineExceeded
from .._http.sse import SSEDecoder
from ._call import Call, Job
from ._config import (
    CANCEL_TIMEOUT,
    DRAIN_TIMEOUT,
    POLL_GROWTH,
    POLL_MAX,
    POLL_START,
    STATUS_STREAM_IDLE,
    STREAM_REOPENS,
)
from ._errors import asks_for_an_image, error_for_response, job_error, transport_error
from ._payload import build_payload, with_placeholder

logger = logging.getLogger("mantis_llm.fal")

Mode = Literal["auto", "queue", "sync", "stream"]
Payload = dict[str, Any]


class NoTokenStream(Exception):
    """Internal: the endpoint answered 404/405 for its token stream (mode "auto" falls back)."""


def output_text(data: Any, request_id: str | None) -> str:
    """The ``output`` string of a result body."""
    if isinstance(data, dict) and isinstance(data.get("output"), str):
        return data["output"]
    raise BackendError(f"fal returned a result without an 'output' string: {str(data)[:200]}", request_id=request_id)


def post_payload(call: Call, step: str, url: str, payload: Payload, **kw: Any) -> Flow[httpx.Response]:
    """POST the input: a step that creates a job, so it is retried only when fal's answer
    proves no job was created (unless ``submit_policy="at_least_once"``)."""
    headers = kw.pop("headers", None)
    return (
        yield from call.step(
            step,
            "creates_job",
            lambda t: call.cfg.build("POST", url, json=payload, headers=headers, timeout=t),
            cap=None,
            **kw,
        )
    )


def finish(call: Call, resp: httpx.Response) -> Flow[None]:
    """Read a stream the server is ending (its last event came) to its end, then close it.

    Closing it with the body unread would leave httpx's async byte iterators suspended;
    their finalizers then schedule tasks that a loop closed right after the call (by
    ``run_until_complete`` + ``close()``) reports at exit as "Task was destroyed but it is
    pending!". fal ends these streams right after their last event, so this is one read.
    """
    until = call.clock() + DRAIN_TIMEOUT
    while (left := min(until - call.clock(), call.remaining())) > 0:
        chunk = yield from read(resp, left)
        if not isinstance(chunk, bytes) or not chunk:
            break
    yield from close(resp)


# ------------------------------------------------------------------------------- queue


def queue_flow(call: Call, payload: Payload) -> Flow[None]:
    """Submit to the queue, wait on the status stream (or poll), fetch the result."""
    cfg = call.cfg
    resp = yield from post_payload(call, "submit", f"{cfg.queue_url}/{cfg.endpoint}", payload)
    job = parse_submit(call, resp)
    try:
        final = yield from wait_for_completion(call, job)
        job.done = True
        # After a clean completion the GET is retried through 5xx and dropped connections;
        # after a completion with an error, the result's error body is the job's failure.
        kind: Literal["idempotent", "result"] = "idempotent" if final.get("error") else "result"
        result = yield from call.step("result", kind, lambda t: cfg.build("GET", job.response_url, timeout=t))
    except GeneratorExit:
        raise
    except BaseException as exc:
        if not job.done:
            yield from cancel(call, job)
        if isinstance(exc, KeyboardInterrupt) and hasattr(exc, "add_note"):
            exc.add_note(f"mantis-llm: fal request {job.request_id} was cancelled")
        raise
    if final.get("error"):  # fal ends a failed job COMPLETED; the result answered 2xx anyway
        raise job_error(final, job.request_id)
    text, stopped = apply_stop(output_text(json_body(result), job.request_id), call.request.params.stop)
    metrics = final.get("metrics")
    if isinstance(metrics, dict) and "inference_time" in metrics:
        call.metrics["inference_time"] = metrics["inference_time"]
    yield from emit(Chunk(text=text, response=call.response(text, stopped)))


def parse_submit(call: Call, resp: httpx.Response) -> Job:
    data = json_body(resp)
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


def cancel(call: Call, job: Job) -> Flow[None]:
    """PUT cancel_url once, with a short timeout; every failure is swallowed."""
    req = call.cfg.build("PUT", job.cancel_url, timeout=CANCEL_TIMEOUT, connect=CANCEL_TIMEOUT)
    result = yield from send(req)
    code = getattr(result, "status_code", type(result).__name__)
    logger.debug("fal cancel %s -> %s", job.request_id, code)
    call.metrics["cancelled"] = True


def wait_for_completion(call: Call, job: Job) -> Flow[dict[str, Any]]:
    if call.state.status_stream:
        final = yield from wait_stream(call, job)
        if final is not None:
            call.metrics["status_transport"] = "sse"
            return final
    call.metrics["status_transport"] = "poll"
    return (yield from wait_poll(call, job))


def wait_stream(call: Call, job: Job) -> Flow[dict[str, Any] | None]:
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
        resp = yield from send(req, stream=True)
        if isinstance(resp, httpx.HTTPError):
            logger.debug("fal status stream: %s; polling instead", type(resp).__name__)
            return None
        ctype = resp.headers.get("content-type", "")
        if not resp.is_success or "text/event-stream" not in ctype:
            logger.debug("fal status stream: HTTP %s %s; polling instead", resp.status_code, ctype)
            if resp.status_code in (404, 405, 501) or (resp.is_success and "text/event-stream" not in ctype):
                call.state.status_stream = False  # this server has no status stream: stop trying
            yield from close(resp)
            return None
        logger.debug("fal status stream %s -> %s", req.url, resp.status_code)
        decoder, got_event = SSEDecoder(), False
        while True:
            chunk = yield from read(resp, max(call.remaining(), 0.001))
            if isinstance(chunk, httpx.HTTPError):
                yield from close(resp)
                if isinstance(chunk, httpx.TimeoutException):
                    call.check_deadline()
                    break  # idle: reopen
                logger.debug("fal status stream broke (%s); polling instead", type(chunk).__name__)
                return None
            if not chunk:  # the server ended the stream before COMPLETED
                yield from close(resp)
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
                    yield from finish(call, resp)
                    return body


def wait_poll(call: Call, job: Job) -> Flow[dict[str, Any]]:
    """Poll ``GET status_url`` with an interval growing from 20 ms to 1 s."""
    cfg, logs = call.cfg, "1" if call.cfg.with_logs else "0"
    interval = POLL_START
    while True:
        resp = yield from call.step(
            "status", "status", lambda t: cfg.build("GET", job.status_url, params={"logs": logs}, timeout=t)
        )
        call.metrics["status_requests"] += 1
        body = json_body(resp)
        if call.observe(body).status == "COMPLETED":
            return body
        interval = POLL_START if call.changed else min(interval * POLL_GROWTH, POLL_MAX)
        yield from sleep(min(interval, max(call.remaining(), 0.0)))


# ------------------------------------------------------------------------------- sync and stream


def sync_flow(call: Call, payload: Payload) -> Flow[None]:
    """One POST to the direct endpoint; the answer is the output (no queue, no updates)."""
    cfg = call.cfg
    resp = yield from post_payload(call, "run", f"{cfg.run_url}/{cfg.endpoint}", payload)
    call.request_id = call.metrics["request_id"] = resp.headers.get("x-fal-request-id")
    text, stopped = apply_stop(output_text(json_body(resp), call.request_id), call.request.params.stop)
    yield from emit(Chunk(text=text, response=call.response(text, stopped)))


def stream_flow(call: Call, payload: Payload, *, fallback: bool = False) -> Flow[None]:
    """POST to the direct ``/stream`` endpoint and emit the text as it grows.

    fal's LLaVA apps send ``{"output": <text so far>, "partial": true}`` events; we emit
    the difference. An event whose output does not extend the text so far is taken as a
    delta. Closing the connection (stop sequence, timeout) cancels the run at fal. With
    ``fallback``, a 404/405 for the POST raises :class:`NoTokenStream` (nothing was run).
    """
    cfg = call.cfg
    try:
        resp = yield from post_payload(
            call,
            "stream",
            f"{cfg.run_url}/{cfg.endpoint}/stream",
            payload,
            headers={"Accept": "text/event-stream"},
            stream=True,
        )
    except MantisError as exc:
        if fallback and exc.status_code in (404, 405):
            raise NoTokenStream from exc
        raise
    call.request_id = call.metrics["request_id"] = resp.headers.get("x-fal-request-id")
    trimmer, decoder, text = StopTrimmer(call.request.params.stop), SSEDecoder(), ""
    ended = False  # the server sent its last event, or ended the body
    while not ended and not trimmer.stopped:
        chunk = yield from read(resp, max(call.remaining(), 0.001))
        if isinstance(chunk, httpx.HTTPError):
            yield from close(resp)
            if isinstance(chunk, httpx.TimeoutException):
                call.check_deadline()
            raise transport_error("stream", "idempotent", chunk, call.request_id)
        if not chunk:
            ended = True
            break
        for data in decoder.feed(chunk):
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if "output" not in event and ("detail" in event or "error" in event or "status_code" in event):
                yield from finish(call, resp)
                fake = httpx.Response(int(event.get("status_code") or 500), json=event)
                raise error_for_response(fake, step="stream", endpoint=cfg.endpoint, request_id=call.request_id)
            new = event.get("output")
            if isinstance(new, str):
                delta = new[len(text) :] if new.startswith(text) else new
                text = new if new.startswith(text) else text + new
                out = trimmer.feed(delta)
                if out:
                    call.emitted = True
                    yield from emit(Chunk(text=out))
            ended = event.get("partial") is False
            if ended or trimmer.stopped:
                break
        if not ended and not trimmer.stopped:
            call.check_deadline()
    # A stop sequence drops the connection mid-stream (fal then cancels the run); an
    # ended stream is read to its end.
    call.dropped_stream = not ended
    yield from (finish(call, resp) if ended else close(resp))
    rest = trimmer.flush()
    if rest:
        yield from emit(Chunk(text=rest))
    yield from emit(Chunk(text="", response=call.response(trimmer.text, trimmer.stopped)))


FLOWS: dict[str, Callable[[Call, Payload], Flow[None]]] = {
    "queue": queue_flow,
    "sync": sync_flow,
    "stream": stream_flow,
}


def run_flow(mode: str, call: Call, options: ImageOptions, *, fallback: bool = False) -> Flow[None]:
    """Build the input and run the flow for ``mode`` ("queue", "sync" or "stream"), with the
    whole-call deadline turned into RequestTimeoutError.

    ``fallback`` (mode "auto" asking for a token stream): an endpoint without ``/stream``
    answers on the queue instead, and the backend remembers it. A question without images
    follows the backend's ``text_only`` setting (see :func:`run_text_only`).
    """
    try:
        payload = yield from build_payload(call, options)
        if payload["images"]:
            return (yield from run_mode(mode, call, payload, fallback))
        return (yield from run_text_only(mode, call, payload, fallback))
    except DeadlineExceeded:
        raise call.timeout_error() from None


def run_mode(mode: str, call: Call, payload: Payload, fallback: bool) -> Flow[None]:
    """The flow for ``mode``; with ``fallback``, "stream" becomes "queue" where the endpoint
    has no token stream (found out by its 404/405, then remembered in the shared state)."""
    if mode == "stream" and fallback:
        if call.state.token_stream:
            call.metrics["mode"] = mode
            try:
                return (yield from stream_flow(call, payload, fallback=True))
            except NoTokenStream:
                logger.debug("fal %s has no token stream: streaming calls use the queue", call.cfg.endpoint)
                call.state.token_stream = False
            call.restart()
        mode = "queue"
    call.metrics["mode"] = mode
    return (yield from FLOWS[mode](call, payload))


def run_text_only(mode: str, call: Call, payload: Payload, fallback: bool) -> Flow[None]:
    """A question without images: sent as it is, or with the blank placeholder image.

    ``text_only="retry"``: as it is, then once more with the placeholder when fal's 422 says
    the endpoint needs an image (remembered: later calls add it from the start);
    ``"placeholder"``: with it from the start; ``"as_is"``: as it is, whatever fal says.
    """
    policy = call.cfg.text_only
    if policy == "placeholder" or (policy == "retry" and call.state.needs_image):
        call.metrics["placeholder_image"] = True
        return (yield from run_mode(mode, call, with_placeholder(payload), fallback))
    try:
        return (yield from run_mode(mode, call, payload, fallback))
    except InvalidRequestError as exc:
        if policy != "retry" or call.emitted or not asks_for_an_image(exc):
            raise
        logger.debug("fal %s wants an image: text-only questions carry a blank one", call.cfg.endpoint)
        call.state.needs_image = True
    call.restart()
    call.metrics["placeholder_image"] = True
    return (yield from run_mode(mode, call, with_placeholder(payload), fallback))
