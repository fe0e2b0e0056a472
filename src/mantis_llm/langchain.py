"""LangChain chat model for Mantis: :class:`ChatMantis`.

``ChatMantis`` is a :class:`~langchain_core.language_models.BaseChatModel` that sends a whole
conversation (several images per turn, anywhere in the text) to Mantis through a backend:
``"fal"`` (the hosted endpoint, default) or ``"local"`` (transformers, in-process), or any
:class:`~mantis_llm.backends.Backend` instance.

.. code-block:: python

    from langchain_core.messages import HumanMessage
    from mantis_llm.langchain import ChatMantis

    chat = ChatMantis()  # FAL_KEY from the environment
    chat.invoke([HumanMessage(content=[
        {"type": "text", "text": "What differs between"},
        {"type": "image", "url": "https://example.com/a.jpg"},
        {"type": "text", "text": "and"},
        {"type": "image", "base64": "...", "mime_type": "image/png"},
        {"type": "text", "text": "?"},
    ])])

Messages are read through ``message.content_blocks`` (langchain-core's own translators), so
every image form LangChain users send works: v1 blocks (``url`` / ``base64``), the older
``source_type`` blocks, OpenAI ``image_url`` blocks (URL or data URI, dict or bare string) and
Anthropic ``source`` blocks. Images may only be http(s) URLs, data URIs or base64 data: a
``url`` naming a local file is refused (a chat model must not read files named by message
content). To send a file, bytes or a PIL image, build its block in your code with
:func:`image_block` (``image_block("photos/b.png")``: base64 with the sniffed type; an http(s)
URL stays a URL). Roles:

- ``SystemMessage`` -> system, ``HumanMessage`` -> user, ``AIMessage`` -> assistant (text;
  its tool calls, made by another model earlier in a shared history, are written out as
  ``Tool call: name {args}`` lines and reasoning blocks are dropped).
- ``ToolMessage`` -> a user turn starting ``Tool result: (name)`` (``Tool error`` when its
  status is ``"error"``), followed by its text and images: what a ReAct-style loop shows
  the model as an observation.
- Audio, video, files/PDF, file ids and unknown blocks raise
  :class:`~mantis_llm.errors.InvalidRequestError` naming the message and block (1-based).

Mantis cannot call tools: :meth:`ChatMantis.bind_tools` raises ``NotImplementedError``.
:meth:`ChatMantis.with_structured_output` works by instructing the model with the JSON
schema and parsing its answer (``OutputParserException`` when the answer is not valid).

Progress (fal queue position, status, log lines) is reported as the custom callback event
``"mantis_queue_update"`` (data: ``status``, ``request_id``, ``queue_position``, ``logs``,
``metrics``, seen by any handler's ``on_custom_event``) on the paths where LangChain gives
the model its run manager: ``invoke``/``ainvoke``/``batch``/``abatch`` and
``stream_events(version="v3")``. LangChain 1.x does not pass the run manager to
``_stream``/``_astream`` on the ``stream()``/``astream()`` paths (nor to ``astream_events``
v2, which uses them); there, and everywhere else, the ``on_update`` field (a callable taking
a :class:`~mantis_llm.types.Update`) sees every report.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from operator import itemgetter
from typing import Any, Literal

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        f'mantis_llm.langchain needs langchain-core: pip install "mantis-llm[langchain]" ({exc})'
    ) from exc

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, SecretStr, ValidationError, model_validator

from .backends import DEFAULT_FAL_ENDPOINT, Backend, resolve_backend, resolve_model
from .errors import ConfigurationError, ImageError, InvalidRequestError, from_validation_error
from .types import Conversation, GenerationParams, Image, Request, Response, Turn, Update

QUEUE_UPDATE_EVENT = "mantis_queue_update"
"""Name of the custom callback event carrying a backend progress report."""

MAX_INPUT_TOKENS = 4096  # Mantis-llava-7b context (576 tokens per image)
_PROVIDERS = {"fal": "fal", "local": "transformers"}
_CALL_PARAMS = ("max_tokens", "temperature", "top_p", "seed")
_BUILT_BY_FIELDS = ("api_key", "timeout", "max_retries", "model", "endpoint")
_TOOL_CALL_BLOCKS = ("tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call")


# ----------------------------------------------------------------------------- translation


def messages_to_conversation(messages: Sequence[BaseMessage]) -> Conversation:
    """Translate LangChain messages into a :class:`~mantis_llm.types.Conversation`.

    One turn per message (so "message N" in error labels is the N-th message, from 1),
    text and images kept in their order. Raises :class:`InvalidRequestError` (or
    :class:`ImageError`) naming the message and block for anything Mantis cannot read.
    """
    return Conversation([_to_turn(message, i) for i, message in enumerate(messages, 1)])


def _role(message: BaseMessage, i: int) -> str:
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, HumanMessage):
        return "user"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, (ToolMessage, FunctionMessage)):
        return "tool"
    if isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        if role in ("system", "user", "assistant", "tool"):
            return role
        raise InvalidRequestError(f"message {i}: unknown chat message role {message.role!r}")
    raise InvalidRequestError(f"message {i}: {type(message).__name__} is not supported by Mantis")


def _to_turn(message: BaseMessage, i: int) -> Turn:
    role = _role(message, i)
    parts: list[str | Image] = []
    if role == "tool":
        name = getattr(message, "name", None)
        label = "Tool error" if getattr(message, "status", None) == "error" else "Tool result"
        parts.append(f"{label}: ({name})" if name else f"{label}:")
    for j, block in enumerate(message.content_blocks, 1):
        where = f"message {i}, block {j}"
        kind = block.get("type")
        if kind == "non_standard":  # e.g. {"type": "image_url", "image_url": "https://..."}
            value = block.get("value") or {}
            url = value.get("image_url") if value.get("type") == "image_url" else None
            if isinstance(url, str):
                block, kind = {"type": "image", "url": url}, "image"
            else:
                kind = value.get("type") or "unknown"
                raise InvalidRequestError(f"{where}: {kind!r} blocks are not supported by Mantis")
        if kind == "text" or (kind == "text-plain" and isinstance(block.get("text"), str)):
            if block.get("text"):
                parts.append(block["text"])
        elif role == "assistant" and kind in _TOOL_CALL_BLOCKS:
            args = block.get("args") or {}
            if not isinstance(args, str):  # invalid_tool_call / chunks carry the raw string
                args = json.dumps(args, ensure_ascii=False, default=str)
            parts.append(f"\nTool call: {block.get('name')} {args}\n")
        elif role == "assistant" and kind == "reasoning":
            continue  # another model's hidden reasoning is not part of the dialogue
        elif kind == "image" and role != "assistant":
            parts.append(_image(block, where))
        elif kind == "image":
            raise InvalidRequestError(f"{where}: images in AI messages are not supported by Mantis")
        elif kind in _TOOL_CALL_BLOCKS:
            raise InvalidRequestError(f"{where}: {kind} blocks are only allowed in AI messages")
        elif kind in ("audio", "video", "file", "text-plain"):
            raise InvalidRequestError(
                f"{where}: {kind} blocks are not supported by Mantis (it reads text and images only)"
            )
        else:
            raise InvalidRequestError(f"{where}: {kind!r} blocks are not supported by Mantis")
    return Turn("user" if role == "tool" else role, parts)


def _image(block: dict[str, Any], where: str) -> Image:
    if block.get("file_id"):
        raise InvalidRequestError(
            f"{where}: image file ids ({block['file_id']!r}) are not supported: fal has no file "
            "store for them; pass the image as a URL or base64 data"
        )
    url = block.get("url")
    b64 = block.get("base64") or block.get("data")  # "data": agent-chat-ui's form
    try:
        if isinstance(url, str) and url:
            if not url[:8].lower().startswith(("http://", "https://", "data:")):
                raise ImageError(f"image url must be an http(s) URL or a data URI, not {url[:40]!r}")
            return Image(url)
        if isinstance(b64, str) and b64:
            if b64[:5].lower() == "data:":
                return Image(b64)
            return Image.from_base64(b64, mime_type=block.get("mime_type") or block.get("mimeType"))
    except ImageError as exc:
        raise ImageError(f"{where}: {exc.message}") from None
    raise InvalidRequestError(f"{where}: image block has no url or base64 data (file references are not supported)")


def image_block(source: Any, *, mime_type: str | None = None) -> dict[str, Any]:
    """A LangChain v1 standard image content block from any image source
    :class:`~mantis_llm.types.Image` accepts.

    An http(s) URL stays a URL, ``{"type": "image", "url": url}`` (nothing is downloaded);
    a data URI, a path (``str`` or :class:`~pathlib.Path`), bytes, a PIL image or a binary
    file object is read and inlined as ``{"type": "image", "base64": ..., "mime_type": ...}``
    with the type sniffed from the bytes (``mime_type`` is used only when the bytes do not
    tell; PIL images are encoded as PNG). The block works with any LangChain chat model.
    Raises :class:`~mantis_llm.errors.ImageError` when the source cannot be read or is not an
    image; the image itself is checked (decoded, size limits) when it is sent.
    """
    img = Image(source, mime_type=mime_type)
    if img.is_remote:
        block: dict[str, Any] = {"type": "image", "url": img.url}
        if mime_type:
            block["mime_type"] = mime_type
        return block
    data = img.data
    sniffed = img.mime_type
    if sniffed is not None and not sniffed.startswith("image/"):
        raise ImageError(f"not an image: the data is {sniffed}")
    mime = sniffed or mime_type
    if mime is None:
        raise ImageError("cannot tell the image type from its bytes: pass mime_type=")
    return {"type": "image", "base64": base64.b64encode(data).decode("ascii"), "mime_type": mime}


def _json_instruction(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "Answer with a single JSON object and nothing else: no prose, no code fences."
    return (
        "Answer with a single JSON object that conforms to this JSON schema, and nothing else "
        f"(no prose, no code fences):\n{json.dumps(schema, ensure_ascii=False)}"
    )


# ----------------------------------------------------------------------------- callbacks


def _update_sender(
    run_manager: CallbackManagerForLLMRun | None, user: Callable[[Update], None] | None
) -> Callable[[Update], None] | None:
    """An ``on_update`` that turns backend progress into a custom callback event (and
    calls the user's ``on_update``)."""
    if run_manager is None or not run_manager.handlers:
        return user
    # The run manager's own on_custom_event is the handler-interface no-op; dispatch through
    # a callback manager carrying this run's handlers, tags and metadata instead.
    manager = CallbackManager(
        run_manager.handlers,
        parent_run_id=run_manager.parent_run_id,
        tags=run_manager.tags,
        metadata=run_manager.metadata,
    )

    def send(update: Update) -> None:
        if user is not None:
            user(update)
        manager.on_custom_event(QUEUE_UPDATE_EVENT, asdict(update), run_id=run_manager.run_id)

    return send


@asynccontextmanager
async def _aupdate_sender(
    run_manager: AsyncCallbackManagerForLLMRun | None, user: Callable[[Update], None] | None
):
    """Async twin of :func:`_update_sender`. The backend calls ``on_update`` synchronously
    (from the loop or a worker thread); updates are queued and dispatched in order by a task,
    so neither the backend nor the loop ever waits on a handler."""
    if run_manager is None or not run_manager.handlers:
        yield user
        return
    manager = AsyncCallbackManager(
        run_manager.handlers,
        parent_run_id=run_manager.parent_run_id,
        tags=run_manager.tags,
        metadata=run_manager.metadata,
    )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Update | None] = asyncio.Queue()

    async def pump() -> None:
        while (update := await queue.get()) is not None:
            await manager.on_custom_event(QUEUE_UPDATE_EVENT, asdict(update), run_id=run_manager.run_id)

    def send(update: Update) -> None:
        if user is not None:
            user(update)
        loop.call_soon_threadsafe(queue.put_nowait, update)

    task = loop.create_task(pump())
    try:
        yield send
    except BaseException:
        task.cancel()
        raise
    loop.call_soon_threadsafe(queue.put_nowait, None)  # after every update already sent
    await task


# ----------------------------------------------------------------------------- the model


class _BackendSlot:
    """Holds the lazily built backend. Copies and pickles start empty (a backend holds
    connection pools or model weights), so a copied ChatMantis builds its own."""

    __slots__ = ("backend", "lock")

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.lock = threading.Lock()

    def __deepcopy__(self, memo: dict) -> _BackendSlot:
        return _BackendSlot()

    def __reduce__(self):
        return (_BackendSlot, ())


class ChatMantis(BaseChatModel):
    """Mantis (TIGER-Lab's interleaved multi-image LLaVA) as a LangChain chat model.

    Args:
        model: fal endpoint id (default ``fal-ai/mantis-llava-7b-v11``) or, with
            ``backend="local"``, a hub id or local path (default ``TIGER-Lab/Mantis-llava-7b``).
            Also accepted as ``model_name``.
        backend: ``"fal"``, ``"local"`` or a :class:`~mantis_llm.backends.Backend` instance.
        api_key: fal key (alias ``fal_key``); defaults to ``FAL_KEY``. ``FAL_KEY_ID`` +
            ``FAL_KEY_SECRET`` are read by the fal backend itself.
        max_tokens, temperature, top_p, stop, seed: generation defaults (per call too).
        timeout, max_retries: fal request limits (``None``: the backend's defaults).
        backend_options: extra constructor options for the backend (e.g. ``queue_url``,
            ``mode``, ``with_logs`` for fal; ``device``, ``dtype`` for local).
        streaming: make ``invoke`` use the streaming path as well.
        on_update: a callable receiving every backend progress report (fal queue status,
            position, logs), on every path; not serialized.

    Images go in messages as LangChain image blocks; :func:`image_block` makes one from a
    URL, data URI, path, bytes, PIL image or file object::

        chat.invoke([HumanMessage(content=[image_block("a.png"), image_block(pil_image),
                                           "What differs between the two images?"])])

    The backend is built on first use and reused (its connection pool or loaded weights);
    :meth:`close` / :meth:`aclose` release it. A bad or unknown constructor argument raises
    :class:`~mantis_llm.errors.ConfigurationError` naming each field (``"ChatMantis:
    temperature: Input should be less than or equal to 2"``); a bad per-call value,
    :class:`~mantis_llm.errors.InvalidRequestError`.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt argument is an error, not ignored

    model: str = Field(default=DEFAULT_FAL_ENDPOINT, validation_alias=AliasChoices("model", "model_name"))
    backend: Literal["fal", "local"] | Backend = "fal"
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("FAL_KEY", default=None),
        validation_alias=AliasChoices("api_key", "fal_key"),
    )
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: builtins.list[str] | None = Field(default=None, validation_alias=AliasChoices("stop", "stop_sequences"))
    seed: int | None = None
    timeout: float | None = Field(default=None, gt=0)
    max_retries: int | None = Field(default=None, ge=0)
    streaming: bool = False
    """Use the streaming path for ``invoke`` too (tokens reach ``on_llm_new_token``)."""
    backend_options: builtins.dict[str, Any] = Field(default_factory=builtins.dict)
    on_update: Callable[[Update], None] | None = Field(default=None, exclude=True)
    """Called with every backend progress report, on every path (must not block)."""

    _slot: _BackendSlot = PrivateAttr(default_factory=_BackendSlot)

    @model_validator(mode="wrap")
    @classmethod
    def _typed_errors(cls, data: Any, handler: Any) -> ChatMantis:
        # pydantic's ValidationError (a ValueError) becomes our ConfigurationError; it is not
        # a ValueError, so pydantic passes it through (also from the "after" check below).
        try:
            return handler(data)
        except ValidationError as exc:
            raise from_validation_error(exc, cls.__name__) from None

    @model_validator(mode="after")
    def _default_model_for_backend(self) -> ChatMantis:
        if "model" not in self.model_fields_set:
            self.model = resolve_model(self.backend)
        clash = sorted(set(self.backend_options) & set(_BUILT_BY_FIELDS))
        if clash:
            raise ConfigurationError(
                f"ChatMantis: backend_options may not set {clash}: use the ChatMantis fields instead"
            )
        try:
            self._params(None)  # e.g. an empty stop string, caught here rather than per call
        except InvalidRequestError as exc:
            raise ConfigurationError(f"ChatMantis: {exc.message}") from None
        return self

    # -- LangChain metadata -------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "mantis"

    @property
    def provider(self) -> str:
        """The LangSmith provider name, ``"fal"`` or ``"transformers"`` (no backend built)."""
        if isinstance(self.backend, Backend):
            return self.backend.provider
        return _PROVIDERS[self.backend]

    @property
    def _identifying_params(self) -> builtins.dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.provider,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: builtins.list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = self.provider
        merged = self._merge_stop(stop)
        if merged:
            params["ls_stop"] = merged
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        return ModelProfile(
            max_input_tokens=MAX_INPUT_TOKENS,
            text_inputs=True,
            image_inputs=True,
            image_url_inputs=True,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            image_outputs=False,
            tool_calling=False,
            structured_output=False,
            open_weights=True,
        )

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @property
    def lc_secrets(self) -> builtins.dict[str, str]:
        return {"api_key": "FAL_KEY"}

    # -- backend ------------------------------------------------------------------------

    def get_backend(self) -> Backend:
        """The backend this model runs on, built on first use and then reused."""
        if isinstance(self.backend, Backend):
            return self.backend
        slot = self._slot
        if slot.backend is None:
            with slot.lock:
                if slot.backend is None:
                    slot.backend = resolve_backend(
                        self.backend,
                        self.model,
                        api_key=self.api_key or None,  # an empty key means FAL_KEY / FAL_KEY_ID+SECRET
                        timeout=self.timeout,
                        max_retries=self.max_retries,
                        **self.backend_options,
                    )
        return slot.backend

    def close(self) -> None:
        """Release the backend this model built (a backend instance you passed is yours)."""
        backend, self._slot.backend = self._slot.backend, None
        if backend is not None:
            backend.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        backend, self._slot.backend = self._slot.backend, None
        if backend is not None:
            await backend.aclose()

    # -- requests and responses ---------------------------------------------------------

    def _merge_stop(self, stop: Sequence[str] | None) -> builtins.list[str] | None:
        if isinstance(stop, str):  # stop="END" is one sequence, not three letters
            stop = [stop]
        merged = builtins.list(builtins.dict.fromkeys([*(self.stop or ()), *(stop or ())]))
        return merged or None

    def _params(self, stop: Sequence[str] | None, **overrides: Any) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self._merge_stop(stop) or ()),
        ).merged(**overrides)

    def _request(
        self, messages: builtins.list[BaseMessage], stop: builtins.list[str] | None, kwargs: builtins.dict[str, Any]
    ) -> Request:
        kwargs = builtins.dict(kwargs)
        kwargs.pop("stream", None)  # LangChain's own streaming switch
        model = kwargs.pop("model", None)
        if model is not None and model != self.model:
            raise InvalidRequestError(
                f"per-call model override ({model!r}) is not supported: create another ChatMantis"
            )
        response_format = kwargs.pop("response_format", None)
        overrides = {k: kwargs.pop(k) for k in _CALL_PARAMS if k in kwargs}
        if kwargs:
            raise InvalidRequestError(f"unsupported call arguments for ChatMantis: {sorted(kwargs)}")
        params = self._params(stop, **overrides)
        conversation = messages_to_conversation(messages)
        if response_format is not None:
            self._add_json_instruction(conversation, response_format)
        return Request(conversation, params)

    @staticmethod
    def _add_json_instruction(conversation: Conversation, response_format: Any) -> None:
        if not isinstance(response_format, builtins.dict) or response_format.get("type") not in (
            "json_object",
            "json_schema",
        ):
            raise InvalidRequestError(
                'response_format must be {"type": "json_object"} or {"type": "json_schema", "schema": {...}}'
            )
        instruction = _json_instruction(response_format.get("schema"))
        for turn in reversed(conversation.turns):
            if turn.role == "user":
                turn.parts.append("\n\n" + instruction)
                return
        conversation.turns.append(Turn("user", [instruction]))

    def _metadata(self, response: Response, backend: Backend) -> builtins.dict[str, Any]:
        meta: builtins.dict[str, Any] = {
            "model_name": response.model or self.model,
            "model_provider": backend.provider,
        }
        if response.finish_reason:
            meta["finish_reason"] = response.finish_reason
        if response.request_id:
            meta["request_id"] = response.request_id
        if response.metrics:
            meta["metrics"] = response.metrics
        return meta

    @staticmethod
    def _usage(response: Response) -> UsageMetadata | None:
        return None if response.usage is None else UsageMetadata(**response.usage.as_dict())

    def _result(self, response: Response, backend: Backend) -> ChatResult:
        message = AIMessage(
            content=response.text,
            response_metadata=self._metadata(response, backend),
            usage_metadata=self._usage(response),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, text: str, response: Response | None, backend: Backend) -> ChatGenerationChunk:
        if response is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
        # model_name, finish_reason and usage go on the last chunk only: chunk addition
        # concatenates strings and sums usage.
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=text,
                chunk_position="last",
                response_metadata=self._metadata(response, backend),
                usage_metadata=self._usage(response),
            )
        )

    # -- the four entry points ----------------------------------------------------------

    def _generate(
        self,
        messages: builtins.list[BaseMessage],
        stop: builtins.list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        response = backend.generate(request, on_update=_update_sender(run_manager, self.on_update))
        return self._result(response, backend)

    async def _agenerate(
        self,
        messages: builtins.list[BaseMessage],
        stop: builtins.list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        async with _aupdate_sender(run_manager, self.on_update) as on_update:
            response = await backend.agenerate(request, on_update=on_update)
        return self._result(response, backend)

    def _stream(
        self,
        messages: builtins.list[BaseMessage],
        stop: builtins.list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # LangChain itself calls run_manager.on_llm_new_token for every chunk we yield.
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        for chunk in backend.stream(request, on_update=_update_sender(run_manager, self.on_update)):
            if chunk.text or chunk.response is not None:
                yield self._chunk(chunk.text, chunk.response, backend)

    async def _astream(
        self,
        messages: builtins.list[BaseMessage],
        stop: builtins.list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        async with _aupdate_sender(run_manager, self.on_update) as on_update:
            async for chunk in backend.astream(request, on_update=on_update):
                if chunk.text or chunk.response is not None:
                    yield self._chunk(chunk.text, chunk.response, backend)

    # -- tools and structured output ----------------------------------------------------

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Runnable:
        """Not supported: Mantis has no tool calling.

        Use a ReAct-style (text) agent that parses the model's answer, use ChatMantis as
        the vision step of an agent driven by a tool-calling model, or use
        :meth:`with_structured_output` for JSON.
        """
        raise NotImplementedError(
            "ChatMantis does not support tool calling (Mantis has no function-calling "
            "ability). Use a ReAct-style text agent that parses the model's answer, call "
            "ChatMantis as the vision step of an agent run by a tool-calling model, or use "
            "with_structured_output() for JSON answers."
        )

    def with_structured_output(
        self,
        schema: builtins.dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, builtins.dict[str, Any] | Any]:
        """A runnable returning answers parsed into ``schema`` (a pydantic class, TypedDict
        or JSON schema dict), by prompting since Mantis has no native JSON mode or tools.

        ``method="json_schema"`` (default) and ``"function_calling"`` append the JSON schema
        to the last user message and ask for a JSON object only; ``"json_mode"`` asks for a
        JSON object without showing the schema (describe it in your prompt; ``schema`` is
        then used only to parse and may be ``None``). Pydantic classes give instances, other
        schemas give dicts. An answer that does not parse raises
        ``OutputParserException``; with ``include_raw=True`` the result is
        ``{"raw": AIMessage, "parsed": ... | None, "parsing_error": Exception | None}``.
        ``strict`` is accepted for compatibility; Mantis cannot guarantee schema adherence.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments for with_structured_output: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', not {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema is required with method={method!r}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        json_schema = None
        if schema is not None:
            json_schema = schema if isinstance(schema, builtins.dict) else convert_to_json_schema(schema)
        response_format: builtins.dict[str, Any] = (
            {"type": "json_object"} if method == "json_mode" else {"type": "json_schema", "schema": json_schema}
        )
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict},
                "schema": schema,
            },
        )
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        parser_with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | parser_with_fallback


__all__ = ["ChatMantis", "QUEUE_UPDATE_EVENT", "image_block", "messages_to_conversation"]
