"""TransformersBackend: Mantis in this process with stock transformers (``backend="local"``).

Where each concern lives: :mod:`._loading` (checkpoint, processor, dtype, device),
:mod:`._scheduler` (the queue and the worker thread that owns the model), :mod:`._generation`
(one batched ``generate`` call and what happens to each row). This module holds the options,
turns a request into a job (prompt, context check, images, processor) and offers the
Backend API.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import os
import queue
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar

from ..._validate import UNSET, check_option, is_number, is_positive_int, is_str_dict
from ...errors import BackendError, ConfigurationError, ContextLengthError
from ...images import ImageOptions, image_options_arg, load_pil
from ...prompt import render
from ...tokens import TokenCounter
from ...tools import output_constraint
from ...types import Chunk, Request, Response, Update
from ..base import DEFAULT_LOCAL_MODEL, Backend, OnUpdate, require_request
from . import _generation
from ._loading import Loaded, LoadSettings, first_line, load
from ._scheduler import End, Job, Scheduler

DEFAULT_MAX_TOKENS = 512

logger = logging.getLogger("mantis_llm.local")


class TransformersBackend(Backend):
    """Mantis running in this process with transformers (``backend="local"``).

    ``model`` is a Hub id or a local directory of a LLaVA-architecture Mantis checkpoint.
    ``device`` (e.g. ``"cuda:0"``) or ``device_map`` (needs accelerate, e.g. ``"auto"``) place
    it; the default is CUDA when available, else CPU. ``dtype`` defaults to bfloat16 on CUDA
    and float32 on CPU. ``image_options`` (or just ``image_short_side``) limit and downsize
    images before the processor. Concurrent requests share batches of up to
    ``max_batch_size``: while other callers are still preparing theirs, the worker holds a
    batch open up to ``batch_wait`` seconds (a lone caller never waits). ``max_context``
    overrides the model's context length; ``default_max_tokens`` applies when a request sets
    no ``max_tokens`` (clamped to the room the context leaves). ``model_kwargs`` go to
    ``from_pretrained`` and ``generate_kwargs`` to every ``model.generate`` call (e.g.
    ``cache_implementation="static"``, ``repetition_penalty``); the request's own settings
    take precedence.

    Decoding is greedy unless a request sets ``temperature > 0`` (then ``top_p`` applies too);
    a request's ``seed`` makes sampling reproducible without touching the global RNG.

    Loading is lazy (first request, or :meth:`load`) and thread-safe; :meth:`close` frees the
    model (a later request loads it again). A backend still loaded when the interpreter exits
    is closed then (an atexit hook): requests still running fail with BackendError.
    """

    provider: ClassVar[str] = "transformers"

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_LOCAL_MODEL,
        *,
        device: str | None = None,
        device_map: str | dict | None = None,
        dtype: Any = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        image_options: ImageOptions | None = None,
        image_short_side: int | None = UNSET,
        max_batch_size: int = 8,
        batch_wait: float = 0.05,
        max_context: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        model_kwargs: dict[str, Any] | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_option(
            isinstance(model, (str, os.PathLike)) and bool(os.fspath(model)), "model", "a hub id or a local path", model
        )
        check_option(
            device is None or isinstance(device, str) or type(device).__name__ == "device",
            "device",
            "a device name such as 'cpu' or 'cuda:0'",
            device,
        )
        check_option(
            device_map is None or isinstance(device_map, (str, dict)), "device_map", "a str or dict", device_map
        )
        if device is not None and device_map is not None:
            raise ConfigurationError("pass either device or device_map, not both")
        check_option(
            attn_implementation is None or isinstance(attn_implementation, str),
            "attn_implementation",
            "a str such as 'sdpa'",
            attn_implementation,
        )
        check_option(isinstance(trust_remote_code, bool), "trust_remote_code", "True or False", trust_remote_code)
        check_option(revision is None or isinstance(revision, str), "revision", "a str", revision)
        check_option(is_positive_int(max_batch_size), "max_batch_size", "a positive integer", max_batch_size)
        check_option(
            is_positive_int(default_max_tokens), "default_max_tokens", "a positive integer", default_max_tokens
        )
        check_option(
            max_context is None or (is_positive_int(max_context) and max_context >= 2),
            "max_context",
            "an integer >= 2",
            max_context,
        )
        check_option(
            is_number(batch_wait) and 0 <= batch_wait < 60,
            "batch_wait",
            "a number of seconds in [0, 60)",
            batch_wait,
        )
        for name, value in (("model_kwargs", model_kwargs), ("generate_kwargs", generate_kwargs)):
            check_option(value is None or is_str_dict(value), name, "a dict with str keys", value)
        options = image_options_arg(image_options, image_short_side)
        self.model = os.fspath(model)
        self.device = device
        self.device_map = device_map
        self.dtype = dtype
        self.attn_implementation = attn_implementation
        self.trust_remote_code = trust_remote_code
        self.revision = revision
        self.image_options = options
        self.max_batch_size = max_batch_size
        self.batch_wait = float(batch_wait)
        self.max_context = max_context
        self.default_max_tokens = default_max_tokens
        self.model_kwargs = dict(model_kwargs or {})
        self.generate_kwargs = dict(generate_kwargs or {})

        self._state: Loaded | None = None
        self._load_lock = threading.Lock()
        self._scheduler = Scheduler(self._run, max_batch_size=max_batch_size, batch_wait=self.batch_wait)

    def __repr__(self) -> str:
        return f"TransformersBackend(model={self.model!r}, loaded={self.loaded})"

    # ------------------------------------------------------------------ loading

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory."""
        return self._state is not None

    def load(self) -> TransformersBackend:
        """Load the model and processor now (otherwise the first request does). Returns self."""
        if self._state is None:
            with self._load_lock:
                if self._state is None:
                    _watch(self)
                    state = load(self._load_settings())
                    _hook_exit()  # now that torch is imported: see _close_at_exit
                    self._state = state
                    self._scheduler.start()
        return self

    def _load_settings(self) -> LoadSettings:
        return LoadSettings(
            model=self.model,
            device=self.device,
            device_map=self.device_map,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            trust_remote_code=self.trust_remote_code,
            revision=self.revision,
            max_context=self.max_context,
            model_kwargs=self.model_kwargs,
        )

    def _loaded(self) -> Loaded:
        """The loaded model (loading it if needed)."""
        self.load()
        state = self._state
        if state is None:  # closed by another thread meanwhile
            raise BackendError("the backend was closed")
        return state

    @property
    def hf_model(self) -> Any:
        """The loaded ``LlavaForConditionalGeneration`` (loads it if needed)."""
        return self._loaded().model

    @property
    def processor(self) -> Any:
        """The ``LlavaProcessor`` used to build inputs (loads it if needed)."""
        return self._loaded().processor

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt, expanded images and answer)."""
        return self._loaded().context

    @property
    def tokens_per_image(self) -> int:
        """Prompt tokens each image expands to (576 for Mantis-llava-7b)."""
        return self._loaded().tokens_per_image

    def loaded_token_counter(self) -> TokenCounter | None:
        """An exact :class:`~mantis_llm.tokens.TokenCounter` of the loaded model (its tokenizer,
        image size and context), or None when the model is not in memory: never loads it."""
        state = self._state
        if state is None:
            return None
        return TokenCounter(
            state.tokenizer,
            model=self.model,
            tokens_per_image=int(state.tokens_per_image),
            context_length=int(state.context),
            source="local backend tokenizer",
        )

    # ------------------------------------------------------------------ preparing requests

    def _prepare(self, request: Request, sink: Callable[[Any], None] | None = None) -> Job:
        """Render, check the context, load images and run the processor (caller's thread)."""
        require_request(self, request)
        st = self._loaded()
        params = request.params
        rendered = render(request.conversation, "local")
        n_images = len(rendered.images)
        text_tokens = len(st.tokenizer(rendered.text)["input_ids"]) - n_images
        needed = text_tokens + n_images * st.tokens_per_image
        room = st.context - needed
        max_new = params.max_tokens if params.max_tokens is not None else min(self.default_max_tokens, room)
        if max_new > room or room < 1:
            asked = f"max_tokens={params.max_tokens}" if params.max_tokens is not None else "at least 1 new token"
            # text without the image wrappers (an index of d digits costs d-1 more than "1")
            base = text_tokens - sum(st.wrapper_tokens + len(str(j)) - 1 for j in range(1, n_images + 1))
            per_image = st.tokens_per_image + st.wrapper_tokens
            fit = max(0, (st.context - base - (params.max_tokens or 1)) // per_image)
            raise ContextLengthError(
                f"the request does not fit the {st.context}-token context of {self.model}: {n_images} image(s) x "
                f"{st.tokens_per_image} tokens + {text_tokens} text tokens = {needed} tokens, plus {asked}; "
                f"with this text and max_tokens at most {fit} image(s) fit"
            )
        pil = [load_pil(img, self.image_options, label=label) for label, img in rendered.labeled_images]
        try:
            enc = st.processor(text=[rendered.text], images=pil or None, return_tensors="pt")
        except Exception as exc:  # images were validated already: this is unexpected
            raise BackendError(f"the processor failed on this request: {first_line(exc)}") from None
        constraint = output_constraint(request)
        grammar = None
        if constraint is not None:  # compiled (and cached) here, so a bad schema fails before queueing
            grammar = st.grammar.compile_schema(constraint.schema, allow_text=constraint.text)
        temperature = params.temperature
        return Job(
            input_ids=enc["input_ids"][0],
            pixel_values=enc.get("pixel_values") if pil else None,
            n_images=n_images,
            max_new=max_new,
            do_sample=bool(temperature),
            temperature=temperature or None,
            top_p=params.top_p,
            seed=params.seed,
            # a stop string must not cut JSON short: JSON-only rows end with their grammar
            stops=tuple(params.stop or ()) if constraint is None or constraint.text else (),
            sink=sink,
            request_id=f"local-{uuid.uuid4().hex[:16]}",
            grammar=grammar,
        )

    def _enqueue(self, jobs: Sequence[Job]) -> None:
        self._scheduler.enqueue(jobs)

    def _submit(self, request: Request, sink: Callable[[Any], None] | None, on_update: OnUpdate | None) -> Job:
        require_request(self, request)
        if on_update is not None and not self.loaded:
            on_update(Update(status="LOADING"))
        self.load()
        with self._scheduler.slot() as made:
            made.append(self._prepare(request, sink))
        return _queued(made[0], on_update)

    async def _asubmit(self, request: Request, sink: Callable[[Any], None] | None, on_update: OnUpdate | None) -> Job:
        require_request(self, request)
        if not self.loaded:
            if on_update is not None:
                on_update(Update(status="LOADING"))
            await asyncio.to_thread(self.load)
        with self._scheduler.slot() as made:
            made.append(await asyncio.to_thread(self._prepare, request, sink))
        return _queued(made[0], on_update)

    # ------------------------------------------------------------------ public API

    def enforces_format(self, request: Request) -> bool:
        """Whether this backend guarantees the format ``request`` asks for (tool calls, a JSON
        schema): it does, with a grammar per batch row, so the tool flow makes no repair retries."""
        return output_constraint(request) is not None

    def generate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Run one request (batched with concurrent callers) and return its response."""
        job = self._submit(request, None, on_update)
        try:
            return job.future.result()
        except BaseException:
            job.cancel()
            raise

    async def agenerate(self, request: Request, *, on_update: OnUpdate | None = None) -> Response:
        """Like :meth:`generate`, without blocking the event loop."""
        job = await self._asubmit(request, None, on_update)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def stream(self, request: Request, *, on_update: OnUpdate | None = None) -> Iterator[Chunk]:
        """Yield text as it is generated; the last chunk carries the :class:`Response`."""
        pieces: queue.SimpleQueue[Any] = queue.SimpleQueue()
        job = self._submit(request, pieces.put, on_update)
        try:
            while True:
                try:
                    item = pieces.get(timeout=1.0)
                except queue.Empty:
                    worker = self._scheduler.worker
                    if worker is None or not worker.is_alive():
                        raise BackendError("the local worker stopped", request_id=job.request_id) from None
                    continue
                if isinstance(item, End):
                    yield Chunk(text=item.tail, response=job.future.result())
                    return
                yield Chunk(text=item)
        finally:
            job.cancel()

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        """Async :meth:`stream`; tokens arrive through the event loop, never blocking it."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[Any] = asyncio.Queue()

        def sink(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                loop.call_soon_threadsafe(pieces.put_nowait, item)

        job = await self._asubmit(request, sink, on_update)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, End):
                    yield Chunk(text=item.tail, response=await asyncio.wrap_future(job.future))
                    return
                yield Chunk(text=item)
        finally:
            job.cancel()

    def generate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Prepare every request first (any bad one raises before anything runs), then run
        them in batches of up to ``max_batch_size``."""
        self.load()
        jobs = [self._prepare(r) for r in requests]
        self._enqueue(jobs)
        try:
            return [job.future.result() for job in jobs]
        except BaseException:
            for job in jobs:
                job.cancel()
            raise

    async def agenerate_batch(self, requests: Sequence[Request]) -> list[Response]:
        """Async :meth:`generate_batch`."""
        if not self.loaded:
            await asyncio.to_thread(self.load)
        jobs = await asyncio.to_thread(lambda: [self._prepare(r) for r in requests])
        self._enqueue(jobs)
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise

    def close(self) -> None:
        """Stop the worker (queued and running requests fail with BackendError) and free
        the model. Safe to call twice; a later request loads the model again."""
        self._close(BackendError("the backend was closed"))

    def _close(self, error: BackendError) -> None:
        with self._load_lock:
            state = self._state
            if state is None:
                return
            self._scheduler.stop(error)
            self._state = None
            cuda = state.device.type == "cuda"
            torch = state.torch
            del state
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the worker's side

    def _run(self, batch: list[Job]) -> None:
        """Run one batch (on the worker thread); a failed batch is retried row by row."""
        jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as exc:
            unfinished = [j for j in jobs if not j.future.done()]
            # one bad row (or memory pressure) must not sink its neighbours: retry alone
            retry = [j for j in unfinished if j.emitted == 0] if len(jobs) > 1 else []
            for job in unfinished:
                if job not in retry:
                    job.fail(BackendError(f"local generation failed: {first_line(exc)}", request_id=job.request_id))
            for job in retry:
                try:
                    self._generate([job])
                except Exception as exc2:
                    job.fail(BackendError(f"local generation failed: {first_line(exc2)}", request_id=job.request_id))

    def _generate(self, jobs: list[Job]) -> None:
        state = self._state
        if state is None:
            raise BackendError("the backend was closed")
        _generation.generate(state, jobs, self.model, self.generate_kwargs)


def _queued(job: Job, on_update: OnUpdate | None) -> Job:
    if on_update is not None:
        on_update(Update(status="IN_QUEUE", request_id=job.request_id))
    return job


# ---------------------------------------------------------------------- closing at interpreter exit
#
# The worker is a daemon thread: the interpreter does not wait for it. A script that ends
# without close() while the worker is in torch (a decoding step, or the end of a generate()
# whose caller already has its answer, or one a Ctrl-C abandoned) reaches Py_FinalizeEx, which
# marks the runtime as finalizing. When the worker then leaves a torch op, pybind11's
# gil_scoped_release destructor takes the GIL back; on CPython < 3.14 a thread taking the GIL
# during finalization is ended with pthread_exit, whose forced unwinding cannot pass that
# noexcept destructor: std::terminate ("terminate called without an active exception"),
# SIGABRT. (3.14 parks such a thread for good instead; stopping it first is still right.)
#
# So every backend still loaded is closed by an atexit hook: atexit callbacks run after
# threading has joined the non-daemon threads (a caller on one gets its whole answer, as
# Python promises) and before the runtime is marked finalizing, so the worker stops at its
# next token, is joined and the model freed while the interpreter is intact. (threading's
# private _register_atexit would run before those joins and fail those callers' requests.)
# The hook is registered once torch is imported, so it runs before torch's own atexit hooks
# (last in, first out); the set holds weak references, never keeping a backend alive.

_live: weakref.WeakSet[TransformersBackend] = weakref.WeakSet()  # backends that loaded (or are loading)
_exit_lock = threading.Lock()
_exit_hooked = False
_exiting = False


def _watch(backend: TransformersBackend) -> None:
    """Count ``backend`` among those the exit hook closes; refuse to load once exiting."""
    with _exit_lock:  # with _close_at_exit's: a backend is either in its list or refused
        if _exiting:
            raise BackendError("the interpreter is exiting: the local backend does not load any more")
        _live.add(backend)


def _hook_exit() -> None:
    global _exit_hooked
    with _exit_lock:
        if not _exit_hooked:
            atexit.register(_close_at_exit)
            if hasattr(os, "register_at_fork"):
                # a forked child has copies of the backends but not their workers (and perhaps
                # their locks, held): its exit must not wait on them
                os.register_at_fork(after_in_child=_live.clear)
            _exit_hooked = True


def _close_at_exit() -> None:
    """atexit: close every backend still loaded (requests still running fail with BackendError)."""
    global _exiting
    with _exit_lock:
        _exiting = True
        backends = list(_live)
    error = BackendError("the local backend was closed: the interpreter is exiting")
    for backend in backends:  # every worker stops at its next token, all at once
        backend._scheduler.stop(error, wait=False)
    for backend in backends:
        try:
            backend._close(error)
        except Exception:
            logger.warning("could not close %r at exit", backend, exc_info=True)


__all__ = ["TransformersBackend", "DEFAULT_MAX_TOKENS"]
