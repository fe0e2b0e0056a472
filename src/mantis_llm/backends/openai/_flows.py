"""One OpenAI-route call as sans-I/O flows (see :mod:`.._http.actions`): the one-time probe
of the server (kind, served models), a plain completion, and a token stream."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..._text import StopTrimmer
from ...errors import BackendError, ConfigurationError
from ...types import Chunk, Request, Response, Usage
from .._http.actions import Flow, close, emit, read, read_whole, send
from .._http.responses import json_body
from .._http.retry import Deadline, DeadlineExceeded, send_with_retries
from .._http.sse import SSEDecoder
from ._config import PROBE_TIMEOUT, OpenAIConfig, ServerFacts, SharedState, new_request_id
from ._errors import (
    error_for_response,
    refuses_model,
    served_list,
    server_message,
    should_retry_exception,
    should_retry_response,
    stream_error,
    timeout_error,
    transport_error,
)
from ._payload import build_body, check_conversation, effective_stop, encode_images
from ._servers import PROBES, SERVERS, kind_from_models, probe_answer, served_models

logger = logging.getLogger("mantis_llm.openai")


class Call:
    """One generation (or the probe made for it): settings, deadline, request id, metrics."""

    def __init__(
        self,
        cfg: OpenAIConfig,
        state: SharedState,
        request: Request | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg, self.state, self.request = cfg, state, request
        self.rng = rng or random.Random()
        self.deadline = Deadline(cfg.timeout, clock)
        self.request_id = new_request_id()
        self.metrics: dict[str, Any] = {"retries": 0}

    def remaining(self) -> float:
        return self.deadline.remaining()

    def step(
        self,
        what: str,
        build: Callable[[float], httpx.Request],
        *,
        posts: bool,
        stream: bool = False,
        cap: float | None = None,
    ) -> Flow[httpx.Response]:
        """Send ``build(timeout)`` with the one retry policy; the last answer, 2xx or not
        (with ``stream`` a 2xx body is not read yet). No answer at all is a typed error."""

        def retried() -> None:
            self.metrics["retries"] += 1

        result = yield from send_with_retries(
            build,
            deadline=self.deadline,
            max_retries=self.cfg.max_retries,
            rng=self.rng,
            retry_exception=lambda exc: should_retry_exception(exc, posts=posts),
            retry_response=should_retry_response,
            cap=cap,
            stream=stream,
            on_retry=retried,
            name=f"openai {what}",
            logger=logger,
        )
        if isinstance(result, httpx.HTTPError):
            rid = self.request_id if posts else None  # only chat requests carry our X-Request-Id
            raise transport_error(what, self.cfg.base_url, result, posts=posts, request_id=rid)
        return result

    def get(self, what: str, url: str) -> Flow[httpx.Response]:
        return (
            yield from self.step(what, lambda t: self.cfg.build("GET", url, timeout=t), posts=False, cap=PROBE_TIMEOUT)
        )


def run(flow: Flow[Any], call: Call) -> Flow[Any]:
    """``flow`` with the whole-call deadline turned into RequestTimeoutError."""
    try:
        return (yield from flow)
    except DeadlineExceeded:
        raise timeout_error(call.cfg.timeout, call.request_id) from None


# ------------------------------------------------------------------------------ probe


def probe_flow(call: Call) -> Flow[ServerFacts]:
    """Learn the server's kind (unless given) and the models it serves, with one GET of
    ``/v1/models`` and, only when that does not tell, single tries of :data:`PROBES`;
    stores and returns the facts. A server none of them identifies is a plain
    OpenAI-compatible one (``"openai"``)."""
    cfg = call.cfg
    url = cfg.api_url + "/models"
    resp = yield from call.get("model list", url)
    kind, served = cfg.server, None
    if resp.is_success:
        data = json_body(resp)
        served = served_models(data)
        kind = kind or kind_from_models(data)
    elif resp.status_code in (401, 403) or resp.status_code >= 500:
        raise error_for_response(
            resp, what="model list", url=url, base_url=cfg.base_url, model=cfg.model, served=None, request_id=None
        )
    # else: a server (or proxy) without a model list; the chat route may still work
    for path in PROBES if kind is None else ():
        answer = yield from send(cfg.build("GET", cfg.base_url + path, timeout=min(PROBE_TIMEOUT, call.remaining())))
        kind = probe_answer(path, answer)
        if kind is not None:
            break
    kind = kind or "openai"
    model = cfg.model
    if model is None and served:
        if len(served) > 1:
            raise ConfigurationError(
                f"the server at {cfg.base_url} serves several models; pass model= to choose one "
                f"({served_list(served)})",
                detail=list(served),
            )
        model = served[0]
    facts = ServerFacts(server=kind, served=served, model=model)
    logger.debug("openai: %s is %s, serving %s", cfg.base_url, kind, served)
    call.state.facts = facts
    return facts


def known_facts(cfg: OpenAIConfig) -> ServerFacts | None:
    """The facts the settings alone give (server and model both given): no probe needed."""
    if cfg.server is not None and cfg.model is not None:
        return ServerFacts(server=cfg.server, served=None, model=cfg.model)
    return None


# ------------------------------------------------------------------------------ answers


def parse_usage(data: Any) -> Usage | None:
    """``usage`` of a body or chunk as :class:`Usage` (None when absent or malformed)."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (prompt, completion)):
        return None
    assert isinstance(prompt, int) and isinstance(completion, int)
    return Usage(input_tokens=prompt, output_tokens=completion)


def parse_completion(data: Any, request_id: str | None) -> tuple[str, str | None]:
    """(text, finish_reason) of a non-streamed answer."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        said = server_message(data) if isinstance(data, dict) else ""
        raise BackendError(
            f"the server answered without a choice: {said or str(data)[:200]}", request_id=request_id, detail=data
        )
    choice = choices[0]
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    reason = choice.get("finish_reason")
    return (content if isinstance(content, str) else ""), (reason if isinstance(reason, str) else None)


class StreamReader:
    """Reads the data of each stream event, in any of the servers' shapes: content deltas,
    ``finish_reason`` on the last choice, usage on a chunk with or without choices (vLLM and
    SGLang: an extra ``choices: []`` chunk; transformers serve: the last chunk), ``[DONE]``
    or none (transformers serve just ends the body), and ``{"error": ...}`` events."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model: str | None = None
        self.id: str | None = None
        self.done = False  # [DONE] seen

    def feed(self, data: str) -> str:
        """The content delta of one event ("" if none); raises the typed error of an error event."""
        if data.strip() == "[DONE]":
            self.done = True
            return ""
        try:
            event = json.loads(data)
        except ValueError:
            logger.debug("openai stream: skipping a non-JSON event")
            return ""
        if not isinstance(event, dict):
            return ""
        if "error" in event and not event.get("choices"):
            raise stream_error(event, request_id=self.request_id)
        self.usage = parse_usage(event) or self.usage
        if isinstance(event.get("model"), str):
            self.model = event["model"]
        if isinstance(event.get("id"), str):
            self.id = event["id"]
        out = ""
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                out += content
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
        return out

    @property
    def finished(self) -> bool:
        """The answer is complete (usage may still follow until ``[DONE]`` or the end)."""
        return self.done or self.finish_reason is not None


# ------------------------------------------------------------------------------ the chat flows


def post_chat(call: Call, facts: ServerFacts, body: dict[str, Any], *, stream: bool) -> Flow[httpx.Response]:
    """POST the body (serialized once for every attempt); a 2xx answer or the typed error."""
    cfg = call.cfg
    content = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": call.request_id}
    if stream:
        headers["Accept"] = "text/event-stream"
    resp = yield from call.step(
        "chat completion",
        lambda t: cfg.build("POST", cfg.chat_url, content=content, headers=headers, timeout=t),
        posts=True,
        stream=stream,
    )
    if resp.is_success:
        return resp
    served = facts.served
    if served is None and refuses_model(resp):  # name what the server does serve
        listed = yield from send(
            cfg.build("GET", cfg.api_url + "/models", timeout=min(PROBE_TIMEOUT, call.remaining()))
        )
        if isinstance(listed, httpx.Response) and listed.is_success:
            served = served_models(json_body(listed))
    raise error_for_response(
        resp,
        what="chat completion",
        url=cfg.chat_url,
        base_url=cfg.base_url,
        model=facts.model,
        served=served,
        request_id=call.request_id,
    )


def _response(
    call: Call, facts: ServerFacts, text: str, reason: str | None, usage: Usage | None, model: Any
) -> Response:
    call.metrics["elapsed"] = round(call.deadline.elapsed(), 4)
    call.metrics["server"] = facts.server
    return Response(
        text=text,
        model=model if isinstance(model, str) and model else (facts.model or ""),
        finish_reason=reason,
        usage=usage,
        request_id=call.request_id,
        metrics=dict(call.metrics),
    )


def chat_flow(call: Call, facts: ServerFacts, *, stream: bool) -> Flow[None]:
    """Run the call's request: a plain completion, or a stream (asked for; needed to cut the
    answer at a stop string the server cannot apply, closing the connection there; or the
    only kind of request the server stops when its client goes)."""
    request = call.request
    assert request is not None
    check_conversation(request.conversation)
    server = SERVERS[facts.server]
    client_stop = None if server.server_stop else effective_stop(request)
    urls = yield from encode_images(request.conversation, call.cfg.image_options)
    if stream or client_stop or server.stream_always:
        return (yield from _stream(call, facts, urls, client_stop))
    body = build_body(request, server, facts.model, urls, stream=False, extra_body=call.cfg.extra_body)
    resp = yield from post_chat(call, facts, body, stream=False)
    data = json_body(resp)
    text, reason = parse_completion(data, call.request_id)
    model = data.get("model") if isinstance(data, dict) else None
    yield from emit(Chunk(text=text, response=_response(call, facts, text, reason, parse_usage(data), model)))


def _stream(call: Call, facts: ServerFacts, urls: list[str], client_stop: tuple[str, ...] | None) -> Flow[None]:
    request = call.request
    assert request is not None
    body = build_body(request, SERVERS[facts.server], facts.model, urls, stream=True, extra_body=call.cfg.extra_body)
    resp = yield from post_chat(call, facts, body, stream=True)
    if "text/event-stream" not in resp.headers.get("content-type", ""):
        # a server (or proxy) that ignored "stream": its answer is the whole completion
        whole = yield from read_whole(resp, lambda: max(call.remaining(), 0.001))
        data = json_body(whole)
        text, reason = parse_completion(data, call.request_id)
        trimmer = StopTrimmer(client_stop)
        out = trimmer.feed(text) + trimmer.flush()
        if out:
            yield from emit(Chunk(text=out))
        model = data.get("model") if isinstance(data, dict) else None
        final = _response(call, facts, trimmer.text, "stop" if trimmer.stopped else reason, parse_usage(data), model)
        yield from emit(Chunk(text="", response=final))
        return
    trimmer, decoder, reader = StopTrimmer(client_stop), SSEDecoder(), StreamReader(call.request_id)
    ended = False
    while not (reader.done or trimmer.stopped):
        chunk = yield from read(resp, max(call.remaining(), 0.001))
        if isinstance(chunk, httpx.HTTPError):
            yield from close(resp)
            if isinstance(chunk, httpx.TimeoutException) and call.remaining() <= 0.01:
                raise DeadlineExceeded
            raise transport_error("chat stream", call.cfg.base_url, chunk, posts=True, request_id=call.request_id)
        if not chunk:
            ended = True
        events = decoder.feed(chunk) if chunk else decoder.flush()
        for data in events:
            out = trimmer.feed(reader.feed(data))  # an error event raises (the driver closes the stream)
            if out:
                yield from emit(Chunk(text=out))
            if reader.done or trimmer.stopped:
                break
        if ended:
            break
        call.deadline.check()
    yield from close(resp)  # early (a stop string): the server sees the client go and stops
    if not (reader.finished or trimmer.stopped):
        raise BackendError(
            "the server ended the stream before the answer was complete (no finish_reason, no [DONE])",
            request_id=call.request_id,
        )
    rest = trimmer.flush()
    if rest:
        yield from emit(Chunk(text=rest))
    if trimmer.stopped:
        call.metrics["client_stop"] = True
    reason = "stop" if trimmer.stopped else reader.finish_reason
    final = _response(call, facts, trimmer.text, reason, reader.usage, reader.model)
    yield from emit(Chunk(text="", response=final))
