"""Run a flow: once with blocking I/O (:func:`drive`), once with asyncio (:func:`adrive`).

Each driver is one ``match`` over the action types (``assert_never`` makes a type checker
report an action a driver forgot). Streamed responses opened by the flow are closed when
the flow ends, fails or is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import httpx
from typing_extensions import assert_never

from ...types import Chunk
from .actions import Close, Emit, Flow, Offload, Raised, Read, Send, Sleep

_STREAM_ERRORS = (httpx.HTTPError, httpx.StreamError)  # what reading a streamed body raises


def _read_error(exc: Exception) -> httpx.HTTPError:
    """A failed body read as the value a ``Read`` action answers."""
    return exc if isinstance(exc, httpx.HTTPError) else httpx.ReadError(str(exc))


def drive(flow: Flow[Any], client: httpx.Client) -> Iterator[Chunk]:
    """Run ``flow`` with ``client``, yielding the chunks it emits."""
    streams: dict[int, tuple[httpx.Response, Iterator[bytes]]] = {}
    value: Any = None
    throw: BaseException | None = None
    try:
        while True:
            try:
                action = flow.throw(throw) if throw is not None else flow.send(value)
            except StopIteration:
                return
            value, throw = None, None
            try:
                match action:
                    case Send(request, stream):
                        try:
                            value = client.send(request, stream=stream)
                        except httpx.HTTPError as exc:
                            value = exc
                        else:
                            if stream:
                                streams[id(value)] = (value, value.iter_bytes())
                    case Read(response, _):
                        try:
                            value = next(streams[id(response)][1], b"")
                        except _STREAM_ERRORS as exc:
                            value = _read_error(exc)
                    case Close(response):
                        entry = streams.pop(id(response), None)
                        if entry:
                            entry[0].close()
                    case Sleep(seconds):
                        time.sleep(seconds)
                    case Offload(fn, args):
                        try:
                            value = fn(*args)
                        except Exception as exc:
                            value = Raised(exc)
                    case Emit(chunk):
                        yield chunk
                    case _:
                        assert_never(action)
            except KeyboardInterrupt as exc:
                _close_streams(streams)
                throw = exc  # the flow cancels the server-side job, then re-raises it
            except Exception as exc:  # a bug: let the flow clean up (cancel) before it propagates
                throw = exc
    finally:
        _close_streams(streams)
        flow.close()


def _close_streams(streams: dict[int, tuple[httpx.Response, Iterator[bytes]]]) -> None:
    for resp, _ in streams.values():
        with contextlib.suppress(Exception):  # closing a broken stream must not mask the real error
            resp.close()
    streams.clear()


async def adrive(flow: Flow[Any], client: httpx.AsyncClient) -> AsyncGenerator[Chunk, None]:
    """Run ``flow`` with ``client`` on the running event loop, yielding the chunks it emits.

    On cancellation the flow gets one more round (its cancel request, shielded from a
    second cancellation), then ``CancelledError`` propagates.
    """
    streams: dict[int, tuple[httpx.Response, AsyncIterator[bytes]]] = {}
    value: Any = None
    throw: BaseException | None = None
    cancelling = False
    try:
        while True:
            try:
                action = flow.throw(throw) if throw is not None else flow.send(value)
            except StopIteration:
                return
            value, throw = None, None
            try:
                match action:
                    case Send(request, stream):
                        try:
                            sending = client.send(request, stream=stream)
                            # Once cancelled, the flow's last request (its cancel) must run to
                            # its end even if the task is cancelled again.
                            value = await (asyncio.shield(sending) if cancelling else sending)
                        except httpx.HTTPError as exc:
                            value = exc
                        else:
                            if stream:
                                streams[id(value)] = (value, value.aiter_bytes())
                    case Read(response, timeout):
                        try:
                            chunks = streams[id(response)][1]
                            value = await asyncio.wait_for(chunks.__anext__(), timeout)
                        except StopAsyncIteration:
                            value = b""
                        except asyncio.TimeoutError:
                            value = httpx.ReadTimeout("no data before the deadline")
                        except _STREAM_ERRORS as exc:
                            value = _read_error(exc)
                    case Close(response):
                        entry = streams.pop(id(response), None)
                        if entry:
                            await entry[0].aclose()
                    case Sleep(seconds):
                        await asyncio.sleep(seconds)
                    case Offload(fn, args):
                        try:
                            value = await asyncio.to_thread(fn, *args)
                        except Exception as exc:
                            value = Raised(exc)
                    case Emit(chunk):
                        yield chunk
                    case _:
                        assert_never(action)
            except asyncio.CancelledError as exc:
                if cancelling:
                    raise
                cancelling = True
                await _aclose_streams(streams)
                throw = exc  # the flow cancels the server-side job, then re-raises it
            except Exception as exc:  # a bug: let the flow clean up (cancel) before it propagates
                throw = exc
    finally:
        await _aclose_streams(streams)
        flow.close()


async def _aclose_streams(streams: dict[int, tuple[httpx.Response, AsyncIterator[bytes]]]) -> None:
    for resp, _ in streams.values():
        with contextlib.suppress(BaseException):
            await resp.aclose()
    streams.clear()
