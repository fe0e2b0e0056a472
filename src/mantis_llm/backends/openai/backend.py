"""OpenAIBackend: Mantis on any OpenAI-compatible chat-completions server, over httpx.

The protocol (probe, request body, retries, errors, streams) lives in the sibling modules as
flows; this module holds the settings and the connection pools, and runs the flows with the
shared drivers, once with an :class:`httpx.Client` and once with an :class:`httpx.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from ..._validate import UNSET, check_option, is_non_negative_int, is_number, is_positive_int, is_str_dict
from ...images import ImageOptions, image_options_arg
from ...types import Chunk, Request, Response
from .._http import check_clients, new_client
from .._http.drivers import adrive, drive
from ..base import Backend, OnUpdate, require_request
from ._config import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    OpenAIConfig,
    ServerFacts,
    SharedState,
    resolve_base_url,
    resolve_key,
)
from ._flows import Call, chat_flow, known_facts, probe_flow, run
from ._payload import json_constraint
from ._servers import SERVER_NAMES, SERVERS

logger = logging.getLogger("mantis_llm.openai")


async def _close_at_shutdown(client: httpx.AsyncClient) -> AsyncGenerator[None, None]:
    """Closes one event loop's pooled client when that loop shuts down: parked at its
    ``yield``, it is finalized by ``loop.shutdown_asyncgens()`` (what ``asyncio.run()`` does
    before closing the loop), while the loop can still close the sockets."""
    try:
        yield
    finally:
        await client.aclose()


@dataclass
class _LoopPool:
    """One event loop's share of the backend: its client, the generator that closes that
    client at the loop's shutdown, and the lock that makes its calls probe the server once."""

    client: httpx.AsyncClient
    closer: AsyncGenerator[None, None]
    probe_lock: asyncio.Lock


class OpenAIBackend(Backend):
    """Runs Mantis on an OpenAI-compatible chat-completions server (``backend="openai"``):
    vLLM above all, SGLang, ``transformers serve``.

    The server must serve a model directory made by ``mantis-llm prepare-model`` (its chat
    template writes Mantis's prompt from the message parts). The conversation goes as ordered
    text and ``image_url`` parts: http(s) URLs as they are (the server fetches them), local
    images as data URIs, downsized as for fal. A trailing assistant turn is a prefill: the
    template continues it.

    What each server gets (detected once, see :mod:`._servers`): vLLM and SGLang get ``stop``,
    ``stream_options.include_usage`` and, for answers that may only be JSON (a forced tool
    choice or a response format), ``response_format: json_schema`` (so :meth:`enforces_format`
    is True for those and the tool flow makes no repair turns). transformers serve answers 422
    to unknown keys and 500 to ``stop``: it gets the standard fields only, stop strings are
    applied here (the stream is closed at the first one), sampling (``temperature > 0``)
    goes through its ``generation_config`` field, and :meth:`generate` streams too (it stops
    generating when a stream's client goes, not when a plain request's does, so a timeout
    frees it). Any other server gets the standard fields.
    Tools are never sent as server tools: the tool flow (:mod:`mantis_llm.tools`) writes them
    into the conversation and parses the answer. Stop strings do not apply to JSON-only
    answers (they could cut the JSON), as on the local backend. ``temperature`` is sent as 0
    (greedy) when the request sets none: the project's default, where vLLM and SGLang would
    sample at 1.0. Greedy answers equal the local backend's on the same weights.

    Args:
        model: the served model name; None (or ``""``): the server's only model, read once
            from ``/v1/models`` (a server listing none gets no ``model`` field).
        base_url: the server, ``http://host:8000`` or ``http://host:8000/v1`` alike; else the
            env var ``MANTIS_BASE_URL``.
        api_key: bearer key (``str`` or ``SecretStr``); else ``OPENAI_API_KEY``; else none.
            Kept as a ``SecretStr``, sent only to ``base_url``'s origin; ``""`` sends none.
        server: ``"vllm"``, ``"sglang"``, ``"transformers"``, ``"openai"`` (any other
            OpenAI-compatible server), or None: detected once from ``/v1/models``
            (``owned_by``, transformers serve's ``status``), else ``/get_model_info`` /
            ``/model_info`` (SGLang) and ``/version`` (vLLM), else ``"openai"``.
        timeout: seconds for the whole call (default 600); when it runs out the connection is
            closed (vLLM and SGLang then abort the generation) and RequestTimeoutError raised.
        max_retries: retries (default 2) of 408/429/5xx answers (honouring ``Retry-After``)
            and of connection failures before the request was sent. A chat request that may
            have reached the server is not resent after a dropped connection.
        client, async_client: your own httpx clients (used as they are, never closed here).
        image_options: :class:`~mantis_llm.images.ImageOptions` (size limits, downsizing,
            ``fetch_remote`` to download URLs here and send data URIs); ``image_short_side=``
            is a shortcut for its ``short_side`` (None: no downsizing).
        extra_body: more request fields, merged last (e.g. vLLM's ``{"top_k": 20}``, or
            ``{"add_special_tokens": False}`` for a vLLM model whose template is not ours).
        max_concurrency: threads :meth:`generate_batch` uses.

    Responses carry the server's ``finish_reason`` ("stop", "length", ...; "stop" as well
    when a client-side stop string cut the text) and usage (None when a client-side stop
    closed the stream before the server reported it). ``metrics`` has ``server``,
    ``elapsed``, ``retries`` and ``client_stop``; ``request_id`` is the ``X-Request-Id`` sent.

    One connection pool serves every sync call (threads included); async calls use one
    client per event loop, closed when ``asyncio.run()`` shuts that loop down (or by
    :meth:`aclose` inside it).
    """

    provider: ClassVar[str] = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | SecretStr | None = None,
        server: str | None = None,
        timeout: float | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        image_options: ImageOptions | None = None,
        image_short_side: int | None = UNSET,
        extra_body: dict[str, Any] | None = None,
        max_concurrency: int = 16,
    ) -> None:
        check_option(model is None or isinstance(model, str), "model", "a served model name (str) or None", model)
        check_option(
            server is None or (isinstance(server, str) and server in SERVERS),
            "server",
            f"one of {SERVER_NAMES} or None (detect it)",
            server,
        )
        check_option(
            timeout is None or (is_number(timeout) and 0 < timeout < math.inf),
            "timeout",
            "a positive number of seconds",
            timeout,
        )
        check_option(is_non_negative_int(max_retries), "max_retries", "a non-negative integer", max_retries)
        check_option(is_positive_int(max_concurrency), "max_concurrency", "a positive integer", max_concurrency)
        check_option(extra_body is None or is_str_dict(extra_body), "extra_body", "a dict with str keys", extra_body)
        check_clients(client, async_client)
        options = image_options_arg(image_options, image_short_side)
        name = model.strip() if isinstance(model, str) else None
        self._config = OpenAIConfig(
            base_url=resolve_base_url(base_url),
            model=name or None,
            key=resolve_key(api_key),
            timeout=float(timeout or DEFAULT_TIMEOUT),
            max_retries=max_retries,
            server=server,
            image_options=options,
            extra_body=dict(extra_body or {}),
        )
        self.model = name or ""  # the served name once known (see _learn)
        self.image_options = options
        self.max_concurrency = max_concurrency
        self._state = SharedState()
        self._user_client, self._user_async_client = client, async_client
        self._client: httpx.Client | None = None
        self._loops: dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ config views

    base_url = property(lambda self: self._config.base_url, doc="The server's root URL (without /v1).")
    timeout = property(lambda self: self._config.timeout)
    max_retries = property(lambda self: self._config.max_retries)

    @property
    def api_key(self) -> SecretStr | None:
        return self._config.key

    @property
    def server(self) -> str | None:
        """The server kind: as given, or as detected (None until the first call or :meth:`detect`)."""
        facts = self._state.facts
        return facts.server if facts is not None else self._config.server

    def __repr__(self) -> str:
        c = self._config
        key = "SecretStr('**********')" if c.key is not None else "None"
        return (
            f"OpenAIBackend(model={self.model or None!r}, base_url={c.base_url!r}, server={self.server!r}, "
            f"timeout={c.timeout:g}, api_key={key})"
        )

    def __reduce__(self):
        raise TypeError("OpenAIBackend holds an API key and open connections; it cannot be pickled")

    def __deepcopy__(self, memo: dict) -> OpenAIBackend:
        return self  # immutable settings around a connection pool: copies share it

    __copy__ = lambda self: self  # noqa: E731

    # ------------------------------------------------------------------ clients

    def _sync_client(self) -> httpx.Client:
        if self._user_client is not None:
            return self._user_client
        with self._lock:
            if self._client is None:
                self._client = new_client(httpx.Client)
            return self._client

    async def _loop_pool(self) -> _LoopPool:
        loop = asyncio.get_running_loop()
        with self._lock:
            pool = self._loops.get(loop)
            fresh = pool is None
            if pool is None:
                for old in [lp for lp in self._loops if lp.is_closed()]:
                    del self._loops[old]  # closed at that loop's shutdown (see _close_at_shutdown)
                client = self._user_async_client or new_client(httpx.AsyncClient)
                # a user's client is theirs to close: park a no-op closer instead
                closer = _close_at_shutdown(client) if self._user_async_client is None else _noop()
                pool = self._loops[loop] = _LoopPool(client, closer, asyncio.Lock())
        if fresh:
            await pool.closer.asend(None)  # parked until the loop shuts down
        return pool

    def close(self) -> None:
        """Close the pooled sync client, and forget the async pools of closed event loops
        (those loops closed their clients as they shut down). Safe to call twice."""
        with self._lock:
            client, self._client = self._client, None
            for loop in [lp for lp in self._loops if lp.is_closed()]:
                del self._loops[loop]
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the pooled clients, the running loop's async one included."""
        loop = asyncio.get_running_loop()
        with self._lock:
            pool = self._loops.pop(loop, None)
        if pool is not None:
            await pool.closer.aclose()  # runs its finally: closes the loop's client
        self.close()

    # ------------------------------------------------------------------ the server

    def _call(self, request: Request | None) -> Call:
        return Call(self._config, self._state, request)

    def _learn(self, facts: ServerFacts) -> ServerFacts:
        if facts.model and not self.model:
            self.model = facts.model
        return facts

    def _facts(self, call: Call, client: httpx.Client) -> ServerFacts:
        facts = self._state.facts or known_facts(self._config)
        if facts is None:
            with self._state.lock:  # one probe, however many threads start at once
                if self._state.facts is None:
                    for _ in drive(run(probe_flow(call), call), client):
                        pass
                facts = self._state.facts
            assert facts is not None  # the probe stores its facts or raises
        return self._learn(facts)

    async def _afacts(self, call: Call, pool: _LoopPool) -> ServerFacts:
        facts = self._state.facts or known_facts(self._config)
        if facts is None:
            async with pool.probe_lock:  # one probe per event loop, however many tasks start at once
                if self._state.facts is None:
                    async for _ in adrive(run(probe_flow(call), call), pool.client):
                        pass
                facts = self._state.facts
            assert facts is not None
        return self._learn(facts)

    def detect(self) -> str:
        """Probe the server now (once; later calls answer from memory) and return its kind."""
        return self._facts(self._call(None), self._sync_client()).server

    async def adetect(self) -> str:
        """Async twin of :meth:`detect`."""
        return (await self._afacts(self._call(None), await self._loop_pool())).server

    def enforces_format(self, request: Request) -> bool:
        """Whether the server enforces the JSON ``request`` must answer with: True for a forced
        tool choice or a response format on vLLM and SGLang (sent as ``response_format:
        json_schema``), so the tool flow makes no repair turns. Probes the server once if its
        kind is not known yet, except inside a running event loop (no blocking there): then
        False until the first call (or ``await adetect()``) has found it out."""
        if json_constraint(request) is None:
            return False
        kind = self.server
        if kind is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                kind = self.detect()
            else:
                return False
        return SERVERS[kind].json_schema

    # ------------------------------------------------------------------ Backend API

    def generate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request to completion (``on_update`` is unused: servers report no progress)."""
        return _last(self._run(request, stream=False))

    async def agenerate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        response = None
        async for chunk in self._arun(request, stream=False):
            response = chunk.response or response
        assert response is not None  # every flow ends by emitting its Response
        return response

    def stream(self, request: Request, *, on_update: OnUpdate | None = None) -> Iterator[Chunk]:
        """Text chunks as the server generates them; the last chunk carries the Response."""
        yield from self._run(request, stream=True)

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        agen = self._arun(request, stream=True)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()

    def _run(self, request: Request, *, stream: bool) -> Iterator[Chunk]:
        call = self._call(require_request(self, request))
        client = self._sync_client()
        facts = self._facts(call, client)
        yield from drive(run(chat_flow(call, facts, stream=stream), call), client)

    async def _arun(self, request: Request, *, stream: bool) -> AsyncGenerator[Chunk, None]:
        call = self._call(require_request(self, request))
        pool = await self._loop_pool()
        facts = await self._afacts(call, pool)
        agen = adrive(run(chat_flow(call, facts, stream=stream), call), pool.client)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()

    def generate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run the requests concurrently on the pooled client (``max_concurrency`` threads);
        order is kept. The server batches them (vLLM, SGLang) or queues them."""
        if len(requests) <= 1:
            return [self.generate(r) for r in requests]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(requests)))) as pool:
            return list(pool.map(self.generate, requests))

    async def agenerate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run the requests concurrently on one event loop; order is kept."""
        return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))


def _last(chunks: Iterator[Chunk]) -> Response:
    response = None
    for chunk in chunks:
        response = chunk.response or response
    assert response is not None  # every flow ends by emitting its Response
    return response


async def _noop() -> AsyncGenerator[None, None]:
    yield
