"""What a flow yields, and what the driver sends back for it.

=====================  =====================================================================
action                 the driver does, and sends back
=====================  =====================================================================
``Send(req)``          ``client.send(req)`` -> the read :class:`httpx.Response`, or the
                       ``httpx.HTTPError`` it raised (as a value, not thrown)
``Send(req, True)``    the same with ``stream=True`` (body not read yet)
``Read(resp, t)``      the next body chunk (``b""`` at the end), or the ``httpx.HTTPError``
``Close(resp)``        closes a streamed response -> None
``Sleep(s)``           sleeps -> None
``Offload(fn, args)``  ``fn(*args)`` (in a worker thread when async) -> its value, or
                       :class:`Raised` holding the exception it raised
``Emit(chunk)``        hands a :class:`~mantis_llm.types.Chunk` to the caller -> None
=====================  =====================================================================

Expected failures always come back as values. Interruptions (``KeyboardInterrupt``,
``asyncio.CancelledError``) and bugs are thrown into the flow, so that it can cancel a
server-side job best-effort (one more ``Send``) before they propagate.

Flows never yield actions directly: they call the typed helpers below
(``resp = yield from send(req)``), so a type checker knows what each step returns.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from ...types import Chunk

T = TypeVar("T")


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
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Emit:
    chunk: Chunk


@dataclass(frozen=True)
class Raised:
    """What an ``Offload`` answers when its function raised."""

    exc: Exception


Action = Send | Read | Close | Sleep | Offload | Emit
Flow = Generator[Action, Any, T]
"""A flow that returns ``T``: ``Flow[httpx.Response]``, ``Flow[None]``."""


def send(request: httpx.Request, *, stream: bool = False) -> Flow[httpx.Response | httpx.HTTPError]:
    """Send ``request``; the response, or the transport error as a value."""
    return (yield Send(request, stream))


def read(response: httpx.Response, timeout: float) -> Flow[bytes | httpx.HTTPError]:
    """The next chunk of a streamed body (``b""`` at its end), or the error as a value."""
    return (yield Read(response, timeout))


def close(response: httpx.Response) -> Flow[None]:
    yield Close(response)


def sleep(seconds: float) -> Flow[None]:
    yield Sleep(seconds)


def offload(fn: Callable[..., T], *args: Any) -> Flow[T]:
    """``fn(*args)`` off the event loop (CPU work: decoding and encoding images); its
    exception is raised here, inside the flow."""
    outcome = yield Offload(fn, args)
    if isinstance(outcome, Raised):
        raise outcome.exc
    return outcome


def emit(chunk: Chunk) -> Flow[None]:
    yield Emit(chunk)


def read_whole(response: httpx.Response, timeout: Callable[[], float]) -> Flow[httpx.Response]:
    """A streamed (error) answer read to its end and closed, as a plain response.

    ``timeout()`` bounds each read; a failed read ends the body where it broke.
    """
    body = b""
    while True:
        piece = yield from read(response, timeout())
        if not isinstance(piece, bytes) or not piece:
            break
        body += piece
    yield from close(response)
    skip = ("content-encoding", "content-length", "transfer-encoding")
    headers = {k: v for k, v in response.headers.items() if k.lower() not in skip}
    return httpx.Response(response.status_code, headers=headers, content=body)
