"""Local backend: Mantis in-process with stock transformers.

Loads a LLaVA-architecture Mantis checkpoint (default ``TIGER-Lab/Mantis-llava-7b``) with
``LlavaForConditionalGeneration`` and a ``LlavaProcessor`` configured from the model's own
config (never ``AutoProcessor``: on the TIGER-Lab repos it silently returns only the
tokenizer; never the ``mantis-vl`` package: it does not import with transformers 5).

One worker thread owns the model. Callers (threads, coroutines, streams) render and
preprocess their request on their own thread, then queue it; the worker groups queued
requests with compatible sampling settings into one left-padded batch (one ``pixel_values``
tensor for all images) and finishes each request as soon as its own row stops, so
concurrent greedy requests give the same answers as one by one, faster.

torch and transformers are imported on first use (``load()`` or the first request).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..errors import (
    BackendError,
    ConfigurationError,
    ContextLengthError,
    MantisError,
    RequestCancelledError,
)
from ..images import ImageOptions, labeled_images, load_pil
from ..prompt import render
from ..types import Chunk, Request, Response, Update, Usage
from . import DEFAULT_LOCAL_MODEL
from .base import Backend, OnUpdate, check_option, is_positive_int, require_request

logger = logging.getLogger("mantis_llm.local")

INSTALL_HINT = 'pip install "mantis-llm[local]"'
DEFAULT_MAX_TOKENS = 512


def _import_deps():
    """Import torch and transformers, or say which extra to install."""
    try:
        import torch
        import transformers
        from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"the local backend needs torch and transformers ({exc}); install them with: {INSTALL_HINT}"
        ) from None
    return torch, transformers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@dataclass
class _Loaded:
    """Everything the worker needs once the model is in memory."""

    torch: Any
    model: Any
    processor: Any
    tokenizer: Any
    device: Any
    pad_id: int
    eos_ids: frozenset[int]
    tokens_per_image: int
    wrapper_tokens: int  # text tokens of "(image j: <Image>...</Image>) " around each image
    context: int
    stopping_list: Any  # transformers.StoppingCriteriaList


@dataclass
class _End:
    """Stream sentinel: the text not yet sent; the job's future holds the Response."""

    tail: str = ""


@dataclass(eq=False)
class _Job:
    """One prepared request waiting for, or running on, the worker."""

    input_ids: Any  # 1-D LongTensor, expanded image tokens included
    pixel_values: Any  # [n_images, 3, H, W] or None
    n_images: int
    max_new: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    seed: int | None
    stops: tuple[str, ...]
    sink: Callable[[Any], None] | None  # streaming: receives str pieces, then _End
    request_id: str
    future: Future = field(default_factory=Future)
    submitted: float = 0.0
    started: float = 0.0
    cancel_error: MantisError | None = None
    emitted: int = 0  # characters already streamed

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (greedy jobs always can)."""
        if not self.do_sample:
            return ("greedy",)
        # a seeded sample must not depend on its batch neighbours: it runs alone
        return ("sample", self.temperature, self.top_p, None if self.seed is None else id(self))

    def cancel(self) -> None:
        """The caller gave up: drop the job if queued, stop its row at the next token if running."""
        if not self.future.done():
            self.cancel_error = RequestCancelledError("the request was cancelled", request_id=self.request_id)
            self.future.cancel()

    def fail(self, exc: BaseException) -> None:
        try:
            self.future.set_exception(exc)
        except InvalidStateError:  # already finished or cancelled
            pass
        if self.sink is not None:
            self.sink(_End())


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
    model (a later request loads it again).
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
        image_short_side: int | None = None,
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
            not isinstance(batch_wait, bool) and isinstance(batch_wait, (int, float)) and 0 <= batch_wait < 60,
            "batch_wait",
            "a number of seconds in [0, 60)",
            batch_wait,
        )
        check_option(
            image_options is None or isinstance(image_options, ImageOptions),
            "image_options",
            "a mantis_llm.images.ImageOptions or None",
            image_options,
        )
        for name, value in (("model_kwargs", model_kwargs), ("generate_kwargs", generate_kwargs)):
            check_option(
                value is None or (isinstance(value, dict) and all(isinstance(k, str) for k in value)),
                name,
                "a dict with str keys",
                value,
            )
        options = image_options or ImageOptions()
        if image_short_side is not None:
            options = replace(options, short_side=image_short_side)  # ImageOptions checks it
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

        self._state: _Loaded | None = None
        self._load_lock = threading.Lock()
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._preparing = 0
        self._stopping = False
        self._worker: threading.Thread | None = None

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
                    state = self._load()
                    with self._cond:
                        self._stopping = False
                    self._worker = threading.Thread(target=self._worker_loop, name="mantis-local-worker", daemon=True)
                    self._state = state
                    self._worker.start()
        return self

    @property
    def hf_model(self) -> Any:
        """The loaded ``LlavaForConditionalGeneration`` (loads it if needed)."""
        return self.load()._state.model

    @property
    def processor(self) -> Any:
        """The ``LlavaProcessor`` used to build inputs (loads it if needed)."""
        return self.load()._state.processor

    @property
    def context_length(self) -> int:
        """Tokens the model can attend to (prompt, expanded images and answer)."""
        return self.load()._state.context

    @property
    def tokens_per_image(self) -> int:
        """Prompt tokens each image expands to (576 for Mantis-llava-7b)."""
        return self.load()._state.tokens_per_image

    def _load(self) -> _Loaded:
        torch, tf = _import_deps()
        common = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None:
            common["revision"] = self.revision

        def failed(what: str, exc: BaseException) -> ConfigurationError:
            hint = ""
            if not os.path.isdir(self.model):
                hint = (
                    " (it is not a local directory; as a Hub id its files must be cached or the Hub"
                    " reachable with HF_HUB_OFFLINE unset)"
                )
            return ConfigurationError(
                f"cannot load the {what} of local model {self.model!r}{hint}: {_first_line(exc)}", detail=str(exc)
            )

        looks_local = os.path.isabs(self.model) or self.model.startswith((".", "~"))
        if looks_local and not os.path.isdir(os.path.expanduser(self.model)):
            raise ConfigurationError(f"local model directory {self.model!r} does not exist")
        try:
            config = tf.AutoConfig.from_pretrained(self.model, **common)
        except Exception as exc:  # OSError (not found/offline), ValueError (bad config), ...
            raise failed("config", exc) from None
        if config.model_type != "llava":
            raise ConfigurationError(
                f"{self.model!r} is a {config.model_type!r} model; the local backend runs LLaVA-architecture "
                "Mantis checkpoints such as TIGER-Lab/Mantis-llava-7b or TIGER-Lab/Mantis-8B-siglip-llama3"
            )
        vision = config.vision_config
        try:
            processor = tf.LlavaProcessor.from_pretrained(
                self.model,
                patch_size=vision.patch_size,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                # CLIP has a CLS position (dropped again by the "default" strategy); SigLIP has none
                num_additional_image_tokens=1 if vision.model_type.startswith("clip") else 0,
                **common,
            )
        except Exception as exc:
            raise failed("processor", exc) from None
        tokenizer = processor.tokenizer

        cuda = torch.cuda.is_available()
        device = self.device or ("cuda" if cuda else "cpu")
        dtype = self._torch_dtype(torch, str(device).startswith("cuda") if self.device_map is None else cuda)
        kwargs = dict(self.model_kwargs, dtype=dtype, **common)
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        move_to = None
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        elif device != "cpu":
            if importlib.util.find_spec("accelerate") is not None:
                kwargs["device_map"] = {"": device}
            else:
                move_to = device
        try:
            model = tf.LlavaForConditionalGeneration.from_pretrained(self.model, config=config, **kwargs)
            if move_to is not None:
                model = model.to(move_to)
        except Exception as exc:
            raise failed("weights", exc) from None
        model.eval()

        gen = model.generation_config
        eos = set()
        for value in (gen.eos_token_id, tokenizer.eos_token_id):
            if value is not None:
                eos.update(value if isinstance(value, (list, tuple)) else [value])
        pad_id = next(
            (
                v
                for v in (tokenizer.pad_token_id, gen.pad_token_id, getattr(config, "pad_token_id", None))
                if v is not None
            ),
            min(eos) if eos else 0,
        )
        if isinstance(pad_id, (list, tuple)):
            pad_id = pad_id[0]
        # count how many positions one image really takes, through the real processor
        from PIL import Image as PILImage

        probe = processor(text=[processor.image_token], images=[PILImage.new("RGB", (64, 64))], return_tensors="pt")
        tokens_per_image = int((probe["input_ids"][0] == config.image_token_index).sum())
        wrapper = f"(image 1: <Image>{processor.image_token}</Image>) "
        wrapper_tokens = len(tokenizer(wrapper, add_special_tokens=False)["input_ids"]) - 1
        context = self.max_context or int(getattr(config.text_config, "max_position_embeddings", 4096))
        logger.info(
            "loaded %s on %s (%s, %d tokens per image, context %d)",
            self.model, model.device, model.dtype, tokens_per_image, context,
        )  # fmt: skip
        return _Loaded(
            torch=torch, model=model, processor=processor, tokenizer=tokenizer, device=model.device,
            pad_id=int(pad_id), eos_ids=frozenset(int(e) for e in eos), tokens_per_image=tokens_per_image,
            wrapper_tokens=wrapper_tokens, context=context,
            stopping_list=tf.StoppingCriteriaList,
        )  # fmt: skip

    def _torch_dtype(self, torch, on_cuda: bool):
        if self.dtype is None:
            if on_cuda:
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.float32
        if self.dtype == "auto" or isinstance(self.dtype, torch.dtype):
            return self.dtype
        value = getattr(torch, str(self.dtype).removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise ConfigurationError(f"unknown dtype {self.dtype!r}: use e.g. 'bfloat16', 'float16' or 'float32'")
        return value

    # ------------------------------------------------------------------ preparing requests

    def _prepare(self, request: Request, sink: Callable[[Any], None] | None = None) -> _Job:
        """Render, check the context, load images and run the processor (caller's thread)."""
        require_request(self, request)
        st = self.load()._state
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
        pil = [load_pil(img, self.image_options, label=label) for label, img in labeled_images(request.conversation)]
        try:
            enc = st.processor(text=[rendered.text], images=pil or None, return_tensors="pt")
        except Exception as exc:  # images were validated already: this is unexpected
            raise BackendError(f"the processor failed on this request: {_first_line(exc)}") from None
        temperature = params.temperature
        return _Job(
            input_ids=enc["input_ids"][0],
            pixel_values=enc.get("pixel_values") if pil else None,
            n_images=n_images,
            max_new=max_new,
            do_sample=bool(temperature),
            temperature=temperature or None,
            top_p=params.top_p,
            seed=params.seed,
            stops=tuple(params.stop or ()),
            sink=sink,
            request_id=f"local-{uuid.uuid4().hex[:16]}",
        )

    @contextmanager
    def _slot(self) -> Iterator[list[_Job]]:
        """Count a request as being prepared (the worker holds a batch open for it, up to
        ``batch_wait``); on exit queue whatever job was put in the yielded list."""
        with self._cond:
            self._preparing += 1
            self._cond.notify_all()
        made: list[_Job] = []
        try:
            yield made
        finally:
            self._enqueue(made, began=1)

    def _enqueue(self, jobs: Sequence[_Job], began: int = 0) -> None:
        """Queue prepared jobs (atomically) and end ``began`` preparations."""
        now = time.monotonic()
        with self._cond:
            self._preparing -= began
            if self._stopping or self._worker is None:
                for job in jobs:
                    job.fail(BackendError("the backend was closed", request_id=job.request_id))
            else:
                for job in jobs:
                    job.submitted = now
                    self._jobs.append(job)
            self._cond.notify_all()

    def _submit(self, request: Request, sink, on_update: OnUpdate | None) -> _Job:
        require_request(self, request)
        if on_update is not None and not self.loaded:
            on_update(Update(status="LOADING"))
        self.load()
        with self._slot() as made:
            made.append(self._prepare(request, sink))
        return _queued(made[0], on_update)

    async def _asubmit(self, request: Request, sink, on_update: OnUpdate | None) -> _Job:
        require_request(self, request)
        if not self.loaded:
            if on_update is not None:
                on_update(Update(status="LOADING"))
            await asyncio.to_thread(self.load)
        with self._slot() as made:
            made.append(await asyncio.to_thread(self._prepare, request, sink))
        return _queued(made[0], on_update)

    # ------------------------------------------------------------------ public API

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
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        job = self._submit(request, pieces.put, on_update)
        try:
            while True:
                try:
                    item = pieces.get(timeout=1.0)
                except queue.Empty:
                    if self._worker is None or not self._worker.is_alive():
                        raise BackendError("the local worker stopped", request_id=job.request_id) from None
                    continue
                if isinstance(item, _End):
                    yield Chunk(text=item.tail, response=job.future.result())
                    return
                yield Chunk(text=item)
        finally:
            job.cancel()

    async def astream(self, request: Request, *, on_update: OnUpdate | None = None) -> AsyncIterator[Chunk]:
        """Async :meth:`stream`; tokens arrive through the event loop, never blocking it."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        job = await self._asubmit(request, sink, on_update)
        try:
            while True:
                item = await pieces.get()
                if isinstance(item, _End):
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
        with self._load_lock:
            state, worker = self._state, self._worker
            if state is None:
                return
            closed = BackendError("the backend was closed")
            with self._cond:
                self._stopping = True
                pending, self._jobs = list(self._jobs), deque()
                for job in self._running:  # their rows stop at the next token and fail
                    job.cancel_error = closed
                self._cond.notify_all()
            for job in pending:
                job.fail(closed)
            if worker is not None and worker is not threading.current_thread():
                worker.join()
            self._worker = None
            self._state = None
            cuda = state.device.type == "cuda"
            torch = state.torch
            del state
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the worker

    def _worker_loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                self._running = batch
            try:
                self._run(batch)
            except BaseException as exc:  # never let the worker die silently
                logger.exception("local worker failed")
                for job in batch:
                    if not job.future.done():
                        job.fail(BackendError(f"local generation failed: {_first_line(exc)}"))
            finally:
                with self._cond:
                    self._running = []

    def _take_batch(self) -> list[_Job]:
        """Pop the oldest job and the compatible ones queued (or about to be) behind it.

        Called with the condition held. Holds the batch open up to ``batch_wait`` while some
        caller is still preparing a request, and for short gaps while concurrent callers keep
        arriving; a lone caller never waits."""
        first = self._jobs.popleft()
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while True:
            skipped: deque[_Job] = deque()
            while self._jobs and len(batch) < self.max_batch_size:
                job = self._jobs.popleft()
                if job.future.cancelled():
                    continue
                (batch if job.key == first.key else skipped).append(job)
            skipped.extend(self._jobs)
            self._jobs = skipped
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or self._stopping or remaining <= 0:
                return batch
            if self._preparing:
                self._cond.wait(remaining)
            elif len(batch) == 1 or not self._cond.wait(min(remaining, self.batch_wait / 2)):
                return batch

    def _run(self, batch: list[_Job]) -> None:
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
                    job.fail(BackendError(f"local generation failed: {_first_line(exc)}", request_id=job.request_id))
            for job in retry:
                try:
                    self._generate([job])
                except Exception as exc2:
                    job.fail(BackendError(f"local generation failed: {_first_line(exc2)}", request_id=job.request_id))

    def _generate(self, jobs: list[_Job]) -> None:
        st = self._state
        torch = st.torch
        started = time.monotonic()
        width = max(len(j.input_ids) for j in jobs)
        input_ids = torch.full((len(jobs), width), st.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, job in enumerate(jobs):  # left padding: greedy output equals the unbatched one
            n = len(job.input_ids)
            input_ids[i, width - n :] = job.input_ids
            attention_mask[i, width - n :] = 1
            job.started = started
        pixels = [j.pixel_values for j in jobs if j.pixel_values is not None]
        inputs = {"input_ids": input_ids.to(st.device), "attention_mask": attention_mask.to(st.device)}
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(st.device, st.model.dtype)

        first = jobs[0]
        tracker = _RowTracker(self, jobs)
        gen_kwargs: dict[str, Any] = dict(self.generate_kwargs)
        gen_kwargs.update(
            max_new_tokens=max(j.max_new for j in jobs),
            pad_token_id=st.pad_id,
            eos_token_id=sorted(st.eos_ids) or None,
            stopping_criteria=st.stopping_list([*self.generate_kwargs.get("stopping_criteria", ()), tracker]),
        )
        if first.do_sample:
            gen_kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p or 1.0, top_k=0)
        else:
            gen_kwargs.update(do_sample=False)
        with torch.inference_mode(), _rng_scope(torch, st.device, first.seed if first.do_sample else None):
            st.model.generate(**inputs, **gen_kwargs)
        for row in tracker.rows:
            if not row.done:
                tracker.finish(row, "length")

    # called from the tracker (worker thread) when a row is done
    def _finish_row(self, job: _Job, ids: list[int], reason: str, batch_size: int, text: str | None) -> None:
        st = self._state
        if job.cancel_error is not None:
            job.fail(job.cancel_error)
            return
        if text is None:
            text = st.tokenizer.decode(ids, skip_special_tokens=True)
            cut = _find_stop(text, job.stops)
            if cut is not None:
                text, reason = text[:cut], "stop"
        now = time.monotonic()
        response = Response(
            text=text,
            model=self.model,
            finish_reason=reason,
            usage=Usage(input_tokens=len(job.input_ids), output_tokens=len(ids)),
            request_id=job.request_id,
            metrics={
                "queue_seconds": round(job.started - job.submitted, 6),
                "generation_seconds": round(now - job.started, 6),
                "batch_size": batch_size,
                "images": job.n_images,
            },
        )
        tail = text[job.emitted :]
        job.emitted = len(text)
        if not job.future.done():
            job.future.set_result(response)
        if job.sink is not None:
            job.sink(_End(tail))


@dataclass(eq=False)
class _Row:
    job: _Job
    ids: list[int] = field(default_factory=list)
    done: bool = False


class _RowTracker:
    """A transformers stopping criterion that follows every row of a batch.

    After each step it records the new token of each live row, and ends the row on EOS, on a
    stop string (matched in the decoded text), at the row's own ``max_tokens`` or when the
    caller cancelled; it streams text for streaming rows (holding back a possible partial
    stop string and an incomplete UTF-8 tail) and hands finished rows to the backend at once.
    """

    def __init__(self, backend: TransformersBackend, jobs: list[_Job]) -> None:
        self.backend = backend
        self.state = backend._state
        self.rows = [_Row(job) for job in jobs]

    def finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        row.done = True
        self.backend._finish_row(row.job, row.ids, reason, len(self.rows), text)

    def __call__(self, input_ids, scores=None, **kwargs):
        st = self.state
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.done:
                continue
            job = row.job
            row.ids.append(token)
            if job.cancel_error is not None:
                self.finish(row, "cancelled")
            elif token in st.eos_ids:
                self.finish(row, "stop")
            elif job.stops or job.sink is not None:
                text = st.tokenizer.decode(row.ids, skip_special_tokens=True)
                cut = _find_stop(text, job.stops)
                if cut is not None:
                    self.finish(row, "stop", text[:cut])
                    continue
                if job.sink is not None:
                    hold = max((len(s) for s in job.stops), default=1) - 1
                    safe = text[: len(text) - hold].rstrip("\ufffd")
                    if len(safe) > job.emitted:
                        job.sink(safe[job.emitted :])
                        job.emitted = len(safe)
            if not row.done and len(row.ids) >= job.max_new:
                self.finish(row, "length")
        return st.torch.tensor([row.done for row in self.rows], dtype=st.torch.bool, device=input_ids.device)


def _queued(job: _Job, on_update: OnUpdate | None) -> _Job:
    if on_update is not None:
        on_update(Update(status="IN_QUEUE", request_id=job.request_id))
    return job


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop sequence in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@contextmanager
def _rng_scope(torch, device, seed: int | None) -> Iterator[None]:
    """Seed sampling without touching the caller's global RNG state (restored on exit)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


__all__ = ["TransformersBackend", "INSTALL_HINT"]
