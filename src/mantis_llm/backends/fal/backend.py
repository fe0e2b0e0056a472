"""FalBackend: Mantis hosted at fal, over httpx.

The protocol (requests, retries, errors, deadlines) lives in the sibling modules as flows
(:mod:`._flows`); this module holds the settings and the connection pools, and runs the
flows with the shared drivers, once with an :class:`httpx.Client` and once with an
:class:`httpx.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import ssl
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from ..._validate import UNSET, check_option, is_non_negative_int, is_number, is_positive_int
from ...errors import ConfigurationError
from ...images import ImageOptions
from ...types import Chunk, Request, Response
from .. import DEFAULT_FAL_ENDPOINT
from .._http.actions import Flow
from .._http.drivers import adrive, drive
from ..base import Backend, OnUpdate, require_request
from ._call import Call
from ._config import DEFAULT_CDN_URL, DEFAULT_QUEUE_URL, DEFAULT_REST_URL, DEFAULT_RUN_URL, FalConfig, SharedState
from ._flows import FLOWS, Mode, run_flow

logger = logging.getLogger("mantis_llm.fal")

_LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=100)
_SHARD_CALLS = 16  # concurrent calls per pooled AsyncClient (see FalBackend._async_client)


@functools.lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """One TLS context for all our clients: building one costs tens of milliseconds, and an
    async client is made per event loop (e.g. each ``asyncio.run``)."""
    return httpx.create_ssl_context()


def _resolve_key(api_key: str | SecretStr | None) -> SecretStr:
    if api_key is not None:  # given: must be a usable key (never quoted in errors)
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        if not isinstance(api_key, str):
            raise ConfigurationError(f"api_key must be a str or SecretStr, not {type(api_key).__name__}")
        if not api_key.strip():
            raise ConfigurationError("api_key is empty: pass the fal key, or leave api_key unset to use FAL_KEY")
        return SecretStr(api_key.strip())
    api_key = os.environ.get("FAL_KEY", "").strip()
    if not api_key and os.environ.get("FAL_KEY_ID") and os.environ.get("FAL_KEY_SECRET"):
        api_key = f"{os.environ['FAL_KEY_ID']}:{os.environ['FAL_KEY_SECRET']}".strip()
    if not api_key:
        raise ConfigurationError(
            "no fal API key: `export FAL_KEY=...` (or FAL_KEY_ID and FAL_KEY_SECRET), or pass api_key="
        )
    return SecretStr(api_key)


def _url(value: str | None, env: str, default: str) -> str:
    name = env.lower().removeprefix("fal_")
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a str URL, not {type(value).__name__}")
    url = (value or os.environ.get(env) or default).strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigurationError(f"{name} {url!r} must be an http(s) URL")
    return url


async def _close_at_shutdown(shards: dict[httpx.AsyncClient, int]) -> AsyncGenerator[None, None]:
    """Closes one event loop's pooled clients when that loop shuts down.

    Started once per loop and parked at its ``yield``. Before closing a loop,
    ``asyncio.run()`` and ``asyncio.Runner`` close every open async generator
    (``loop.shutdown_asyncgens()``), which runs the ``finally`` below while the loop can still
    close its sockets; httpx cannot close an AsyncClient once its loop is closed.
    """
    try:
        yield
    finally:
        for client in list(shards):
            await client.aclose()


class FalBackend(Backend):
    """Runs Mantis on fal (``fal-ai/mantis-llava-7b-v11`` by default).

    Modes:

    ``"queue"`` (default)
        fal's queue: submit, follow the status stream (SSE; polling from 20 ms up to 1 s
        when the stream is unavailable), fetch the result. ``on_update`` sees the queue
        position and (``with_logs=True``) the app's log lines; a timeout or cancellation
        cancels the job at fal. fal retries the job on its own infrastructure failures.
        ``stream()`` yields the whole answer as one chunk: the queue has no token stream.
    ``"sync"``
        One POST to ``run_url``: the fewest round trips, no updates, no server-side retries.
    ``"stream"``
        fal's direct SSE endpoint (``{run_url}/{endpoint}/stream``): ``stream()`` yields the
        text as it is generated; stopping early (stop sequence, timeout) drops the
        connection, which cancels the run at fal.

    Args:
        endpoint: fal endpoint id.
        api_key: fal key (``str`` or ``SecretStr``, not empty); if None, ``FAL_KEY``, else
            ``FAL_KEY_ID:FAL_KEY_SECRET``. Kept as a ``SecretStr``, sent only to the
            queue/run/REST hosts below.
        queue_url, run_url, rest_url, cdn_url: base URLs; else the env vars
            ``FAL_QUEUE_URL``, ``FAL_RUN_URL``, ``FAL_REST_URL``, ``FAL_CDN_URL``; else fal's.
        timeout: seconds for the whole call (upload, queue, generation, result); default 600.
        max_retries: retries per HTTP step (default 5) for what is safe to retry: 408/409/429
            (honouring ``Retry-After``), fal-ingress 502/503/504, connection errors on reads,
            and 500/502/503/504 on the result of a job whose status said COMPLETED without an
            error. A submit is retried only when fal's answer proves no job was created.
        client, async_client: your own httpx clients (used as they are, never closed here).
        upload_threshold: local images whose data URI is longer than this many bytes are
            uploaded to fal storage (once per content, for the backend's life) and sent by URL.
        image_options: :class:`~mantis_llm.images.ImageOptions` (size limits, downsizing);
            ``image_short_side=`` is a shortcut for its ``short_side``.
        with_logs: ask fal for the app's log lines (reported through ``on_update``).
        extra_input: more fields for the endpoint's input JSON (e.g. ``{"max_new_tokens": 64}``).
        max_concurrency: threads :meth:`generate_batch` uses.

    Responses have ``finish_reason="stop"`` when one of our stop sequences cut the text
    (fal applies none; we trim client-side), else None: fal reports no finish reason and
    no token counts (``usage`` is None). ``metrics`` has the request id, ``elapsed``,
    ``queue_time``, ``inference_time``, ``status_transport`` (sse/poll), ``status_requests``,
    ``retries`` and ``uploads``.

    Async use: pooled httpx async clients are kept per event loop (an httpx client cannot
    cross loops; one client per 16 concurrent calls), so the backend also works from several
    ``asyncio.run()`` calls. A loop's clients are closed when ``asyncio.run()`` (or
    ``asyncio.Runner``) shuts that loop down, or by :meth:`aclose` inside the loop; see
    :meth:`close` for loops ended otherwise. On ``asyncio`` cancellation the
    job is cancelled at fal and ``CancelledError`` propagates. On ``KeyboardInterrupt`` in
    sync code the job is cancelled too and the ``KeyboardInterrupt`` propagates (turning it
    into an ordinary exception would let ``except Exception`` swallow Ctrl-C).
    """

    provider: ClassVar[str] = "fal"

    def __init__(
        self,
        endpoint: str = DEFAULT_FAL_ENDPOINT,
        *,
        api_key: str | SecretStr | None = None,
        queue_url: str | None = None,
        run_url: str | None = None,
        rest_url: str | None = None,
        cdn_url: str | None = None,
        mode: Mode = "queue",
        timeout: float | None = None,
        max_retries: int = 5,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        upload_threshold: int = 1_000_000,
        image_options: ImageOptions | None = None,
        image_short_side: int | None = UNSET,
        with_logs: bool = False,
        extra_input: dict[str, Any] | None = None,
        max_concurrency: int = 16,
    ) -> None:
        check_option(isinstance(mode, str) and mode in FLOWS, "mode", f"one of {tuple(FLOWS)}", mode)
        if not isinstance(endpoint, str) or endpoint.strip("/").count("/") < 1:
            raise ConfigurationError(f"fal endpoint id {endpoint!r} must look like 'owner/app'")
        check_option(
            timeout is None or (is_number(timeout) and 0 < timeout < math.inf),
            "timeout",
            "a positive number of seconds",
            timeout,
        )
        check_option(is_non_negative_int(max_retries), "max_retries", "a non-negative integer", max_retries)
        check_option(
            is_positive_int(upload_threshold), "upload_threshold", "a positive integer (bytes)", upload_threshold
        )
        check_option(is_positive_int(max_concurrency), "max_concurrency", "a positive integer", max_concurrency)
        check_option(isinstance(with_logs, bool), "with_logs", "True or False", with_logs)
        check_option(
            extra_input is None or (isinstance(extra_input, dict) and all(isinstance(k, str) for k in extra_input)),
            "extra_input",
            "a dict with str keys",
            extra_input,
        )
        check_option(
            image_options is None or isinstance(image_options, ImageOptions),
            "image_options",
            "a mantis_llm.images.ImageOptions or None",
            image_options,
        )
        check_option(client is None or isinstance(client, httpx.Client), "client", "an httpx.Client or None", client)
        check_option(
            async_client is None or isinstance(async_client, httpx.AsyncClient),
            "async_client",
            "an httpx.AsyncClient or None",
            async_client,
        )
        options = image_options or ImageOptions()
        if image_short_side is not UNSET:  # None disables downsizing
            options = replace(options, short_side=image_short_side)
        self.model = endpoint.strip("/")
        self.mode: Mode = mode
        self.image_options = options
        self.max_concurrency = max_concurrency
        self._config = FalConfig(
            endpoint=self.model,
            key=_resolve_key(api_key),
            queue_url=_url(queue_url, "FAL_QUEUE_URL", DEFAULT_QUEUE_URL),
            run_url=_url(run_url, "FAL_RUN_URL", DEFAULT_RUN_URL),
            rest_url=_url(rest_url, "FAL_REST_URL", DEFAULT_REST_URL),
            cdn_url=_url(cdn_url, "FAL_CDN_URL", DEFAULT_CDN_URL),
            timeout=float(timeout or 600.0),
            max_retries=max_retries,
            with_logs=with_logs,
            upload_threshold=upload_threshold,
            extra_input=dict(extra_input or {}),
        )
        self._state = SharedState()
        self._user_client, self._user_async_client = client, async_client
        self._client: httpx.Client | None = None
        # per event loop: ({AsyncClient: calls in flight}, the generator that closes them at loop shutdown)
        self._async_clients: dict[asyncio.AbstractEventLoop, tuple[dict[httpx.AsyncClient, int], Any]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ config views

    @property
    def endpoint(self) -> str:
        return self.model

    @property
    def api_key(self) -> SecretStr:
        return self._config.key

    queue_url = property(lambda self: self._config.queue_url)
    run_url = property(lambda self: self._config.run_url)
    rest_url = property(lambda self: self._config.rest_url)
    cdn_url = property(lambda self: self._config.cdn_url)
    timeout = property(lambda self: self._config.timeout)
    max_retries = property(lambda self: self._config.max_retries)

    def __repr__(self) -> str:
        c = self._config
        return (
            f"FalBackend(endpoint={c.endpoint!r}, mode={self.mode!r}, queue_url={c.queue_url!r}, "
            f"run_url={c.run_url!r}, rest_url={c.rest_url!r}, cdn_url={c.cdn_url!r}, "
            f"timeout={c.timeout:g}, api_key=SecretStr('**********'))"
        )

    def __reduce__(self):
        raise TypeError("FalBackend holds an API key and open connections; it cannot be pickled")

    def __deepcopy__(self, memo: dict) -> FalBackend:
        return self  # immutable settings around a connection pool: copies share it

    __copy__ = lambda self: self  # noqa: E731

    # ------------------------------------------------------------------ clients

    def _sync_client(self) -> httpx.Client:
        if self._user_client is not None:
            return self._user_client
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(limits=_LIMITS, verify=_ssl_context(), follow_redirects=False)
            return self._client

    @contextlib.asynccontextmanager
    async def _async_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """A pooled AsyncClient of the running loop for one call.

        httpcore's pool does work quadratic in its number of connections on every request
        (encode/httpx#3215), and each queued call holds a connection for its status stream,
        so calls are spread over clients serving at most ``_SHARD_CALLS`` calls each.
        Sequential use stays on the first, warm client.
        """
        if self._user_async_client is not None:
            yield self._user_async_client
            return
        loop = asyncio.get_running_loop()
        closer = None
        with self._lock:
            pool = self._async_clients.get(loop)
            if pool is None:
                for old in [lp for lp in self._async_clients if lp.is_closed()]:
                    del self._async_clients[old]  # closed at that loop's shutdown (see _close_at_shutdown)
                shards: dict[httpx.AsyncClient, int] = {}
                closer = _close_at_shutdown(shards)
                pool = self._async_clients[loop] = (shards, closer)
            shards = pool[0]
            client = next((c for c, n in shards.items() if n < _SHARD_CALLS), None)
            if client is None:
                client = httpx.AsyncClient(limits=_LIMITS, verify=_ssl_context(), follow_redirects=False)
                shards[client] = 0
                logger.debug("fal: pooled AsyncClient %d for this event loop", len(shards))
            shards[client] += 1
        if closer is not None:
            await closer.asend(None)  # parked until the loop shuts down
        try:
            yield client
        finally:
            with self._lock:
                if client in shards:
                    shards[client] -= 1

    def close(self) -> None:
        """Close the pooled sync client, and forget the async pools of closed event loops.

        Loops run by ``asyncio.run()`` or ``asyncio.Runner`` closed their pool's connections
        as they shut down, so nothing is left for the garbage collector (and no
        ``ResourceWarning``). Pools of loops still open (running in another thread, say) are
        left alone: their calls may be in flight; :meth:`aclose` inside the loop closes them.
        A loop closed by a bare ``loop.close()`` (no ``shutdown_asyncgens()``) cannot close
        its sockets any more: forgetting its pool leaves them to the garbage collector.
        """
        with self._lock:
            client, self._client = self._client, None
            for loop in [lp for lp in self._async_clients if lp.is_closed()]:
                del self._async_clients[loop]
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the pooled clients (the async ones of the running loop included)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            pool = self._async_clients.pop(loop, None)
        if pool is not None:
            await pool[1].aclose()  # runs its finally: closes the loop's clients
        self.close()

    # ------------------------------------------------------------------ drivers

    def _flow(self, request: Request, on_update: OnUpdate | None) -> Flow[None]:
        call = Call(self._config, self._state, require_request(self, request), on_update=on_update)
        call.metrics["mode"] = self.mode
        return run_flow(self.mode, call, self.image_options)

    # ------------------------------------------------------------------ Backend API

    def generate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request to completion (in stream mode the chunks are joined)."""
        response = None
        for chunk in self.stream(request, on_update=on_update):
            response = chunk.response or response
        assert response is not None  # every flow ends by emitting its Response
        return response

    async def agenerate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        response = None
        async for chunk in self.astream(request, on_update=on_update):
            response = chunk.response or response
        assert response is not None  # every flow ends by emitting its Response
        return response

    def stream(self, request: Request, *, on_update: OnUpdate | None = None) -> Iterator[Chunk]:
        """Text chunks as fal produces them (mode "stream"), else the whole answer at once."""
        yield from drive(self._flow(request, on_update), self._sync_client())

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        async with self._async_client() as client:
            agen = adrive(self._flow(request, on_update), client)
            try:
                async for chunk in agen:
                    yield chunk
            finally:
                await agen.aclose()

    def generate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run the requests concurrently on the pooled client (threads); order is kept."""
        if len(requests) <= 1:
            return [self.generate(r) for r in requests]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(requests)))) as pool:
            return list(pool.map(self.generate, requests))

    async def agenerate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Run the requests concurrently on one event loop; order is kept."""
        return list(await asyncio.gather(*(self.agenerate(r) for r in requests)))
