"""Tool calling as one sans-I/O flow, with thin drivers for a :class:`Backend`.

:func:`tool_flow` is a generator: it yields each :class:`Request` to run (the instructed
request, then up to :data:`MAX_REPAIRS` repair requests), is sent each :class:`Response`,
and returns the final, parsed Response. It does no I/O, so one implementation serves the
sync and async drivers (and any other caller, e.g. a batch)::

    flow = tool_flow(request)
    req = next(flow)
    try:
        while True:
            req = flow.send(backend.generate(req))
    except StopIteration as done:
        response = done.value

Backend contract (for backend authors):

* The requests the flow yields keep ``tools`` and ``response_format``; their conversation
  already holds the instruction. Run them as they are (handed to :func:`generate` again,
  :func:`is_instructed` makes them pass through rather than be instructed twice).
* ``enforces_format(request) -> bool`` (optional method): True when the backend constrains
  decoding of this request to :func:`~mantis_llm.tools.output_constraint` (a grammar), so
  the output always has the right shape. Then no repair turns are sent (the output is still
  parsed and validated: a truncated call stays invalid). Called with the caller's request.
* ``default_max_tokens`` (optional attribute, an int): the backend sizes output itself
  (the local backend clamps its default to the context left). Otherwise, when tools or a
  response format are set and the request has no ``max_tokens``, the flow sets
  :data:`TOOL_MAX_TOKENS`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import BackendError
from ..types import Chunk, Request, Response, ToolSpec, Usage
from ._parse import Parsed, parse_output
from ._prompt import instruct, is_instructed, repair_request
from ._spec import check_spec
from ._stream import StreamDetector

if TYPE_CHECKING:  # the backends may import this package: no import cycle at run time
    from ..backends.base import Backend, OnUpdate

# fal's sibling LLaVA apps default to 64 new tokens, which cuts a call off mid-JSON. A call
# with a few arguments is 30-150 Vicuna tokens, prose before it and a parallel list more;
# 512 leaves room for that and a structured answer while keeping a 4096-token context
# (576 tokens per image) usable. It is what the local backend defaults to as well.
TOOL_MAX_TOKENS = 512
MAX_REPAIRS = 2

Flow = Generator[Request, Response, Response]


def passes_through(request: Request) -> bool:
    """True when tools play no part: no response format and no tools (an empty ToolSpec
    with choice "auto"/"none" counts as none), or the request is one this package already
    instructed. Such requests go to the backend untouched."""
    if is_instructed(request):
        return True
    if request.response_format is not None:
        return False
    spec = request.tools
    return spec is None or (isinstance(spec, ToolSpec) and not spec.tools and spec.choice in ("auto", "none"))


def tool_flow(
    request: Request,
    *,
    enforced: bool = False,
    max_tokens: int | None = TOOL_MAX_TOKENS,
    max_repairs: int = MAX_REPAIRS,
) -> Flow:
    """Yield the requests to run for ``request``; return the final :class:`Response`.

    The returned Response has ``tool_calls`` (validated, fresh ids), ``invalid_tool_calls``
    and as ``text`` the prose, or the JSON of a structured answer, or the raw output when
    nothing usable came out after the repairs. Its ``usage`` is summed over the attempts,
    ``finish_reason`` is ``"tool_calls"`` when there are calls, and ``metrics["tool_attempts"]``
    counts the model calls (``metrics["tool_errors"]`` lists what was wrong, if anything).
    ``enforced``: the backend enforces the format, so no repairs. Raises
    :class:`~mantis_llm.errors.InvalidRequestError` for a bad spec before anything is yielded.
    """
    if passes_through(request):
        return (yield request)
    catalog = check_spec(request.tools, request.response_format)
    instructed = instruct(request, catalog, max_tokens)
    current = instructed
    responses: list[Response] = []
    errors: list[str] = []
    while True:
        response = yield current
        responses.append(response)
        parsed = parse_output(response.text, catalog)
        if parsed.error is None:
            break
        errors.append(parsed.error)
        if enforced or len(responses) > max_repairs:
            break
        current = repair_request(instructed, response.text, parsed, catalog)
    return _final(responses, parsed, errors)


def _final(responses: list[Response], parsed: Parsed, errors: list[str]) -> Response:
    last = responses[-1]
    usage = last.usage
    if len(responses) > 1 and all(r.usage is not None for r in responses):
        usage = Usage(
            sum(r.usage.input_tokens for r in responses if r.usage),
            sum(r.usage.output_tokens for r in responses if r.usage),
        )
    metrics: dict[str, Any] = {**last.metrics, "tool_attempts": len(responses)}
    if errors:
        metrics["tool_errors"] = errors
    return replace(
        last,
        text=parsed.text,
        tool_calls=parsed.tool_calls,
        invalid_tool_calls=parsed.invalid_tool_calls,
        finish_reason="tool_calls" if parsed.tool_calls else last.finish_reason,
        usage=usage,
        metrics=metrics,
    )


def _options(backend: Backend, request: Request, enforced: bool | None) -> dict[str, Any]:
    if enforced is None:
        check = getattr(backend, "enforces_format", None)
        enforced = bool(check(request)) if callable(check) else False
    own = getattr(backend, "default_max_tokens", None)
    own_default = isinstance(own, int) and not isinstance(own, bool)
    return {"enforced": enforced, "max_tokens": None if own_default else TOOL_MAX_TOKENS}


# ------------------------------------------------------------------------------ drivers


def generate(
    backend: Backend, request: Request, *, on_update: OnUpdate | None = None, enforced: bool | None = None
) -> Response:
    """Run ``request`` on ``backend`` with tool calling / structured output (repairs included).

    ``enforced`` overrides ``backend.enforces_format(request)``. A request without tools and
    response format goes straight to ``backend.generate``."""
    if passes_through(request):
        return backend.generate(request, on_update=on_update)
    flow = tool_flow(request, **_options(backend, request, enforced))
    req = next(flow)
    try:
        while True:
            req = flow.send(backend.generate(req, on_update=on_update))
    except StopIteration as done:
        return done.value


async def agenerate(
    backend: Backend, request: Request, *, on_update: OnUpdate | None = None, enforced: bool | None = None
) -> Response:
    """Async twin of :func:`generate`."""
    if passes_through(request):
        return await backend.agenerate(request, on_update=on_update)
    flow = tool_flow(request, **_options(backend, request, enforced))
    req = next(flow)
    try:
        while True:
            req = flow.send(await backend.agenerate(req, on_update=on_update))
    except StopIteration as done:
        return done.value


def stream(
    backend: Backend, request: Request, *, on_update: OnUpdate | None = None, enforced: bool | None = None
) -> Iterator[Chunk]:
    """Stream ``request``: prose as it comes, calls held back; the last chunk carries the
    final :class:`Response` (calls, invalid calls; its ``text`` is all the stream showed).
    A repair, if needed, runs unstreamed after the first attempt."""
    if passes_through(request):
        yield from backend.stream(request, on_update=on_update)
        return
    flow = tool_flow(request, **_options(backend, request, enforced))
    detector = StreamDetector(check_spec(request.tools, request.response_format))
    first = next(flow)
    last: Response | None = None
    chunks = backend.stream(first, on_update=on_update)
    try:
        for chunk in chunks:
            out = detector.feed(chunk.text)
            if out:
                yield Chunk(text=out)
            if chunk.response is not None:
                last = chunk.response
    finally:  # a caller that stops early must not leave the backend's stream open
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    try:
        req = flow.send(_ended(last, backend))
        while True:
            req = flow.send(backend.generate(req, on_update=on_update))
    except StopIteration as done:
        final = done.value
    yield detector.finish(final)


async def astream(
    backend: Backend, request: Request, *, on_update: OnUpdate | None = None, enforced: bool | None = None
) -> AsyncIterator[Chunk]:
    """Async twin of :func:`stream`."""
    if passes_through(request):
        agen = backend.astream(request, on_update=on_update)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await _aclose(agen)
        return
    flow = tool_flow(request, **_options(backend, request, enforced))
    detector = StreamDetector(check_spec(request.tools, request.response_format))
    first = next(flow)
    last: Response | None = None
    agen = backend.astream(first, on_update=on_update)
    try:
        async for chunk in agen:
            out = detector.feed(chunk.text)
            if out:
                yield Chunk(text=out)
            if chunk.response is not None:
                last = chunk.response
    finally:
        await _aclose(agen)
    try:
        req = flow.send(_ended(last, backend))
        while True:
            req = flow.send(await backend.agenerate(req, on_update=on_update))
    except StopIteration as done:
        final = done.value
    yield detector.finish(final)


def _ended(last: Response | None, backend: Backend) -> Response:
    if last is None:
        raise BackendError(f"{type(backend).__name__}.stream ended without a final response")
    return last


async def _aclose(agen: Any) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        await close()
