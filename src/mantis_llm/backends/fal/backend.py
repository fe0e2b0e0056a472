"""FalBackend: Mantis hosted at fal, over httpx.

The protocol (requests, retries, errors, deadlines) lives in the sibling modules as flows
(:mod:`._flows`); this module holds the settings and the connection pools (and their
closing: at loop shutdown, when a backend is collected, at exit), and runs the flows with
the shared drivers, once with an :class:`httpx.Client` and once with an
:class:`httpx.AsyncClient`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import threading
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import httpx
from pydantic import SecretStr

from ..._validate import UNSET, check_option, is_non_negative_int, is_number, is_positive_int, is_str_dict
from ...errors import ConfigurationError
from ...images import ImageOptions, image_options_arg
from ...types import Chunk, Request, Response
from .._http import check_clients, new_client
from .._http.actions import Flow
from .._http.drivers import adrive, drive
from ..base import DEFAULT_FAL_ENDPOINT, Backend, OnUpdate, require_request
from ._call import Call
from ._config import (
    DEFAULT_CDN_URL,
    DEFAULT_QUEUE_URL,
    DEFAULT_REST_URL,
    DEFAULT_RUN_URL,
    FalConfig,
    SharedState,
    SubmitPolicy,
    TextOnly,
)
from ._flows import FLOWS, Mode, run_flow

logger = logging.getLogger("mantis_llm.fal")

_SHARD_CALLS = 16  # concurrent calls per pooled AsyncClient (see FalBackend._async_client)
_EXIT_CLOSE_TIMEOUT = 2.0  # seconds the interpreter's exit waits for one loop's clients to close
_FINALIZER_ROUNDS = 16  # a dropped stream's byte iterators close one after another (httpx nests several)
_FINALIZER_WAIT = 1.0  # seconds one round waits for them
_ACLOSE = "async_generator_athrow"  # the type of agen.aclose(): what asyncio's finalizer tasks run


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


Closer = AsyncGenerator[None, None]


Pools = dict[asyncio.AbstractEventLoop, tuple[dict[httpx.AsyncClient, int], Closer]]
"""One backend's pooled AsyncClients per event loop (with calls in flight), and their closer."""


# The parked closers must outlive their backend: a closer collected while its loop is open
# has its cleanup scheduled as a task by asyncio's async-generator finalizer, and a loop
# stopped and closed right after (``run_until_complete`` + ``close()``) then reports at exit
# "Task was destroyed but it is pending!". A collected backend's closers wait here for that
# loop's next FalBackend call, its shutdown (``asyncio.run``) or the interpreter's exit.
_ORPHANS: dict[asyncio.AbstractEventLoop, list[Closer]] = {}
_LIVE: weakref.WeakSet[FalBackend] = weakref.WeakSet()
# Reentrant, and the dicts emptied with popitem(): a garbage collection inside a locked block
# may collect a backend and run _orphan in the same thread.
_REGISTRY = threading.RLock()


def _orphan(pools: Pools) -> None:
    """A backend was collected: keep its closers of loops still open (see ``_ORPHANS``)."""
    with _REGISTRY:
        while pools:
            loop, (_, closer) = pools.popitem()
            if not loop.is_closed():
                _ORPHANS.setdefault(loop, []).append(closer)


async def _aclose_all(closers: list[Closer]) -> None:
    for closer in closers:
        with contextlib.suppress(Exception):  # a client that fails to close must not stop the others
            await closer.aclose()


async def _close_orphans(loop: asyncio.AbstractEventLoop) -> None:
    """Close, on their own loop, the clients of collected backends that used this loop."""
    with _REGISTRY:
        closers = _ORPHANS.pop(loop, [])
        for old in [lp for lp in _ORPHANS.copy() if lp.is_closed()]:
            _ORPHANS.pop(old, None)  # nothing can close them any more; let the loop go
    await _aclose_all(closers)


@atexit.register
def _close_at_exit() -> None:
    """Close the pooled async clients still open on loops that can still run: one running in
    a daemon thread (a worker's), or one stopped but not closed (a notebook kernel's), so the
    interpreter's teardown finds no open socket. A closed loop's sockets cannot be closed."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Closer]] = {}
    with _REGISTRY:
        for backend in list(_LIVE):
            _orphan(backend._async_clients)
        while _ORPHANS:
            loop, closers = _ORPHANS.popitem()
            by_loop.setdefault(loop, []).extend(closers)
    for loop, closers in by_loop.items():
        if loop.is_closed():
            continue
        try:
            if loop.is_running():  # in another thread: atexit runs once the main thread is done
                asyncio.run_coroutine_threadsafe(_aclose_all(closers), loop).result(_EXIT_CLOSE_TIMEOUT)
            else:
                loop.run_until_complete(asyncio.wait_for(_aclose_all(closers), _EXIT_CLOSE_TIMEOUT))
        except Exception:  # noqa: BLE001 - best effort at exit: never fail the interpreter's shutdown
            logger.debug("fal: could not close pooled clients at exit", exc_info=True)


async def _let_finalizers_run() -> None:
    """Let asyncio finish closing the byte iterators of a stream the call dropped mid-body
    (a stop sequence): httpx leaves a chain of them suspended, and asyncio closes each in a
    task of its own, which a loop closed right after the call (``run_until_complete`` +
    ``close()``) would report at exit as "Task was destroyed but it is pending!"."""
    me = asyncio.current_task()
    for _ in range(_FINALIZER_ROUNDS):
        await asyncio.sleep(0)  # the loop turns the scheduled finalizers into tasks
        closing = [t for t in asyncio.all_tasks() if t is not me and type(t.get_coro()).__name__ == _ACLOSE]
        if not closing:
            return
        await asyncio.wait(closing, timeout=_FINALIZER_WAIT)


class FalBackend(Backend):
    """Runs Mantis on fal (``fal-ai/mantis-llava-7b-v11`` by default).

    Modes:

    ``"auto"`` (default)
        :meth:`generate`, :meth:`agenerate` and the batches use the queue (below: its
        retries, queue updates and cancel-on-timeout); :meth:`stream` and :meth:`astream`
        use the token stream (below), so ``ChatMantis().stream()``, LlamaIndex's
        ``stream_chat`` and ``mantis-llm ask --stream`` show the text as it is generated.
        When the endpoint answers 404 or 405 for its token stream, that streaming call runs
        on the queue instead (one chunk, queue updates reach ``on_update``) and the backend
        remembers it: its later streaming calls go to the queue directly.
    ``"queue"``
        fal's queue: submit, follow the status stream (SSE; polling from 20 ms up to 1 s
        when the stream is unavailable), fetch the result. ``on_update`` sees the queue
        position and (``with_logs=True``) the app's log lines; a timeout or cancellation
        cancels the job at fal. fal retries the job on its own infrastructure failures.
        ``stream()`` yields the whole answer as one chunk: the queue has no token stream.
    ``"sync"``
        One POST to ``run_url``: the fewest round trips, no updates, no server-side retries.
    ``"stream"``
        Every call on fal's direct SSE endpoint (``{run_url}/{endpoint}/stream``): ``stream()``
        yields the text as it is generated (``generate()`` joins it); no queue updates, no
        fallback (an endpoint without it is an EndpointNotFoundError); stopping early (stop
        sequence, timeout) drops the connection, which cancels the run at fal.

    Text-only questions (no image in the conversation): whether the endpoint takes them is
    undocumented. ``text_only="retry"`` (default) sends ``images: []``; if fal rejects that
    for the missing image (a 422 on ``images``: ``too_short``, "at least 1"), the call is sent
    once more with a blank 64x64 white PNG placeholder and a note before the text saying
    it is blank and to be ignored, and the backend remembers that the endpoint needs an
    image (its later text-only calls carry the placeholder from the start). ``"as_is"``
    sends ``images: []`` only (fal's answer, a 422 included, stands); ``"placeholder"``
    always adds the placeholder. ``metrics["placeholder_image"]`` is True when it was sent.

    Args:
        endpoint: fal endpoint id.
        api_key: fal key (``str`` or ``SecretStr``, not empty); if None, ``FAL_KEY``, else
            ``FAL_KEY_ID:FAL_KEY_SECRET``. Kept as a ``SecretStr``, sent only to the
            queue/run/REST hosts below.
        queue_url, run_url, rest_url, cdn_url: base URLs; else the env vars
            ``FAL_QUEUE_URL``, ``FAL_RUN_URL``, ``FAL_REST_URL``, ``FAL_CDN_URL``; else fal's.
        mode: ``"auto"``, ``"queue"``, ``"sync"`` or ``"stream"`` (above).
        timeout: seconds for the whole call (upload, queue, generation, result); default 600.
        max_retries: retries per HTTP step (default 5) for what is safe to retry: 408/409/429
            (honouring ``Retry-After``), fal-ingress 502/503/504, connection errors on reads,
            and 500/502/503/504 on the result of a job whose status said COMPLETED without an
            error. A submit is retried only when fal's answer proves no job was created.
        submit_policy: ``"at_most_once"`` (default): a POST that creates a job (submit, sync
            run, token stream) is never resent after a failure that may have created the job
            (a dropped connection after sending, a 500): the call fails with a BackendError
            saying so, as a resend could run and bill the job twice. ``"at_least_once"``
            resends it like a read (transport errors, 408/409/429, 5xx), within
            ``max_retries``; each resend that may duplicate a job is counted in
            ``metrics["possible_duplicates"]``.
        text_only: ``"retry"`` (default), ``"as_is"`` or ``"placeholder"`` (above).
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
    no token counts (``usage`` is None). ``metrics`` has the request id, ``mode`` (the flow
    that answered: queue, sync or stream), ``elapsed``, ``queue_time``, ``inference_time``,
    ``status_transport`` (sse/poll), ``status_requests``, ``retries``,
    ``possible_duplicates``, ``uploads`` and, when sent, ``placeholder_image``.

    Async use: pooled httpx async clients are kept per event loop (an httpx client cannot
    cross loops; one client per 16 concurrent calls), so the backend also works from several
    ``asyncio.run()`` calls. A loop's clients are closed when ``asyncio.run()`` (or
    ``asyncio.Runner``) shuts that loop down, or by :meth:`aclose` inside the loop; see
    :meth:`close` for loops ended otherwise. On ``asyncio`` cancellation the
    job is cancelled at fal and ``CancelledError`` propagates. On ``KeyboardInterrupt`` in
    sync code the job is cancelled too and the ``KeyboardInterrupt`` propagates (turning it
    into an ordinary exception would let ``except Exception`` swallow Ctrl-C). A script that
    never calls :meth:`close` exits quietly: the pooled sync client is closed when the
    backend is garbage collected or the interpreter exits.
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
        mode: Mode = "auto",
        timeout: float | None = None,
        max_retries: int = 5,
        submit_policy: SubmitPolicy = "at_most_once",
        text_only: TextOnly = "retry",
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        upload_threshold: int = 1_000_000,
        image_options: ImageOptions | None = None,
        image_short_side: int | None = UNSET,
        with_logs: bool = False,
        extra_input: dict[str, Any] | None = None,
        max_concurrency: int = 16,
    ) -> None:
        modes = ("auto", *FLOWS)
        check_option(isinstance(mode, str) and mode in modes, "mode", f"one of {modes}", mode)
        policies = ("at_most_once", "at_least_once")
        check_option(submit_policy in policies, "submit_policy", f"one of {policies}", submit_policy)
        text_modes = ("retry", "as_is", "placeholder")
        check_option(text_only in text_modes, "text_only", f"one of {text_modes}", text_only)
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
        extra_ok = extra_input is None or is_str_dict(extra_input)
        check_option(extra_ok, "extra_input", "a dict with str keys", extra_input)
        check_clients(client, async_client)
        options = image_options_arg(image_options, image_short_side)
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
            text_only=text_only,
            submit_policy=submit_policy,
        )
        self._state = SharedState()
        self._user_client, self._user_async_client = client, async_client
        self._client: httpx.Client | None = None
        self._client_closer: weakref.finalize | None = None  # closes _client at GC or exit
        # per event loop: ({AsyncClient: calls in flight}, the generator that closes them at loop shutdown)
        self._async_clients: Pools = {}
        _LIVE.add(self)
        weakref.finalize(self, _orphan, self._async_clients).atexit = False  # at exit: _close_at_exit
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
                self._client = new_client(httpx.Client)
                # A script that never calls close() would leave the pooled socket to the
                # interpreter's teardown ("ResourceWarning: unclosed <socket ...>"): close the
                # client when the backend is collected, or at exit (finalize runs at exit too).
                self._client_closer = weakref.finalize(self, self._client.close)
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
        if _ORPHANS:  # unlocked peek: a miss only delays this to the next call
            await _close_orphans(loop)
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
                client = new_client(httpx.AsyncClient)
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
        left alone: their calls may be in flight; :meth:`aclose` inside the loop closes them,
        and so does the interpreter's exit. A loop closed by a bare ``loop.close()`` (no
        ``shutdown_asyncgens()``) cannot close its sockets any more: forgetting its pool
        leaves them to the garbage collector (a ``ResourceWarning`` where those are shown;
        nothing is printed otherwise). A backend collected without ``close()`` leaves its
        pools to the loop's next FalBackend call, the loop's shutdown or the exit.
        """
        with self._lock:
            closer, self._client, self._client_closer = self._client_closer, None, None
            for loop in [lp for lp in self._async_clients if lp.is_closed()]:
                del self._async_clients[loop]
        if closer is not None:
            closer()  # closes the client, once

    async def aclose(self) -> None:
        """Close the pooled clients (the async ones of the running loop included)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            pool = self._async_clients.pop(loop, None)
        if pool is not None:
            await pool[1].aclose()  # runs its finally: closes the loop's clients
        self.close()

    # ------------------------------------------------------------------ drivers

    def _flow(self, call: Call, *, streaming: bool) -> Flow[None]:
        """The flow for one call: in mode "auto", the token stream for a streaming call
        (falling back to the queue), the queue otherwise."""
        mode = ("stream" if streaming else "queue") if self.mode == "auto" else self.mode
        return run_flow(mode, call, self.image_options, fallback=self.mode == "auto")

    def _call(self, request: Request, on_update: OnUpdate | None) -> Call:
        return Call(self._config, self._state, require_request(self, request), on_update=on_update)

    def _drive(self, request: Request, on_update: OnUpdate | None, *, streaming: bool) -> Iterator[Chunk]:
        call = self._call(request, on_update)
        yield from drive(self._flow(call, streaming=streaming), self._sync_client())

    async def _adrive(
        self, request: Request, on_update: OnUpdate | None, *, streaming: bool
    ) -> AsyncGenerator[Chunk, None]:
        call = self._call(request, on_update)
        async with self._async_client() as client:
            agen = adrive(self._flow(call, streaming=streaming), client)
            try:
                async for chunk in agen:
                    yield chunk
            finally:
                await agen.aclose()
        if call.dropped_stream:
            await _let_finalizers_run()

    # ------------------------------------------------------------------ Backend API

    def generate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request to completion (on the queue in mode "auto"; in mode "stream"
        the chunks are joined)."""
        response = None
        for chunk in self._drive(request, on_update, streaming=False):
            response = chunk.response or response
        assert response is not None  # every flow ends by emitting its Response
        return response

    async def agenerate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        response = None
        agen = self._adrive(request, on_update, streaming=False)
        try:
            async for chunk in agen:
                response = chunk.response or response
        finally:
            await agen.aclose()
        assert response is not None  # every flow ends by emitting its Response
        return response

    def stream(self, request: Request, *, on_update: OnUpdate | None = None) -> Iterator[Chunk]:
        """Text chunks as fal produces them (modes "auto" and "stream"), else the whole answer at once."""
        yield from self._drive(request, on_update, streaming=True)

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        agen = self._adrive(request, on_update, streaming=True)
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
