"""LlamaIndex adapters for Mantis: :class:`Mantis` (an ``LLM``) and :class:`MantisMultiModal`.

``Mantis`` is the current LlamaIndex way: a chat ``LLM`` whose messages carry ``TextBlock``
and ``ImageBlock`` content in any order, several images per message, in any message. It
plugs into ``ReActAgent``, ``RetrieverQueryEngine.from_args(..., multimodal=True)``,
``MultiModalVectorStoreIndex.as_query_engine`` and everything else typed ``LLM``.

``MantisMultiModal`` is the older ``MultiModalLLM`` interface (``complete(prompt,
image_documents)``) for code written against it. Both share one translation and one core;
they differ only in the base class and the metadata type.

Translation (:func:`to_conversation`):

- roles: system/developer -> system; user -> user; assistant/chatbot/model -> assistant;
  tool/function -> a user turn starting with ``"Tool result:"`` (ReActAgent itself sends its
  observations as plain user text, so this only matters for hand-built histories);
- ``TextBlock`` -> text; ``ImageBlock`` (:func:`image_block` makes one from any source, PIL
  images included) -> an image at that exact position: http(s) and
  ``data:`` URLs are passed on as they are (fal takes both, nothing is downloaded here), a
  ``path`` stays a path (read by the backend), ``image`` bytes (raw or base64) and file
  objects are read with ``ImageBlock.resolve_image()``;
- ``CitableBlock``/``CitationBlock`` -> their nested text and images; ``CachePoint`` and
  ``ThinkingBlock`` (a caching hint, earlier reasoning) are skipped; anything else (audio,
  video, document, tool-call blocks) raises :class:`~mantis_llm.errors.InvalidRequestError`
  naming the block and the message;
- the legacy ``ChatMessage.additional_kwargs["images"]`` is turned into ``ImageBlock``s by
  LlamaIndex itself when the message is built, so it needs nothing here.

Responses put token usage (when the backend knows it) in ``raw["usage"]`` and
``additional_kwargs`` as ``prompt_tokens``/``completion_tokens``/``total_tokens`` (the
llama-index-llms-openai/ollama convention, read by ``TokenCountingHandler``), plus
``request_id``, ``finish_reason`` and backend ``metrics`` in ``raw``.

Progress reports from the backend (fal queue position, logs) are dispatched as
:class:`MantisUpdateEvent` instrumentation events (attach a handler to
``llama_index.core.instrumentation.get_dispatcher()``), logged at DEBUG level on
``mantis_llm.llama_index``, and passed to the optional ``on_update`` callable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Union

try:
    import llama_index.core  # noqa: F401
except ImportError as exc:  # the optional extra is not installed
    raise ImportError(
        f'mantis_llm.llama_index needs llama-index-core: pip install "mantis-llm[llama-index]" ({exc})'
    ) from exc

from llama_index.core.base.llms.generic_utils import image_node_to_image_block
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CitableBlock,
    CitationBlock,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ThinkingBlock,
)
from llama_index.core.bridge.pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms import LLM
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.multi_modal_llms import MultiModalLLM, MultiModalLLMMetadata
from llama_index.core.schema import ImageDocument, ImageNode

from .backends import BACKEND_NAMES, DEFAULT_FAL_ENDPOINT, Backend, resolve_backend, resolve_model
from .errors import ConfigurationError, ImageError, InvalidRequestError, from_validation_error
from .types import Conversation, GenerationParams, Image, Part, Request, Response, Turn, Update

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

IMAGE_TOKENS = 576  # CLIP ViT-L/14-336 patches per image in Mantis-llava
ImageInput = Union[ImageBlock, ImageNode, ImageDocument]

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "user",
    MessageRole.FUNCTION: "user",
}
TOOL_PREFIX = "Tool result:"
_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")
_build_lock = threading.Lock()


# --------------------------------------------------------------------------- translation


def image_block_to_image(block: ImageBlock, label: str = "image") -> Image:
    """One ``ImageBlock`` as a :class:`~mantis_llm.types.Image` (no download, no decode of URLs).

    Precedence follows ``ImageBlock.resolve_image``: ``image`` bytes, then ``path``, then ``url``.
    """
    mime = block.image_mimetype
    try:
        if block.image is not None:
            # as_base64=False: core's as_base64=True returns file objects un-encoded (#23159).
            return Image(block.resolve_image().read(), mime_type=mime)
        if block.path is not None:
            return Image(block.path, mime_type=mime)
        if block.url is not None:
            return Image(str(block.url), mime_type=mime)  # http(s) / data: only, else ImageError
    except ImageError as exc:
        raise ImageError(f"{label}: {exc.message}") from None
    except (ValueError, OSError) as exc:  # bad base64, empty stream, unreadable file
        raise ImageError(f"{label}: cannot read the ImageBlock: {exc}") from None
    raise ImageError(f"{label}: the ImageBlock has no image, path or url")


def image_block(source: Any, *, mime_type: str | None = None) -> ImageBlock:
    """An ``ImageBlock`` from any image source :class:`~mantis_llm.types.Image` accepts,
    including PIL images (which ``ImageBlock`` itself does not take).

    An http(s) URL stays ``url`` (nothing is downloaded); a data URI, path, bytes, PIL image
    (encoded as PNG) or binary file object is read into ``image`` bytes, with the type sniffed
    from them (``mime_type`` when they do not tell). Raises
    :class:`~mantis_llm.errors.ImageError` when the source cannot be read.
    """
    img = Image(source, mime_type=mime_type)
    if img.is_remote:
        return ImageBlock(url=img.url, image_mimetype=mime_type)
    data, sniffed = img.data, img.mime_type
    if sniffed is None or not sniffed.startswith("image/"):
        sniffed = mime_type  # unknown or not an image: checked (and refused) when sent
    return ImageBlock(image=data, image_mimetype=sniffed)


def to_image_block(item: Any, label: str = "image") -> ImageBlock:
    """An ``ImageBlock`` from an ``ImageBlock``, ``ImageNode`` or ``ImageDocument`` (core's converter)."""
    if isinstance(item, ImageBlock):
        return item
    if isinstance(item, (ImageNode, ImageDocument)):
        try:
            return image_node_to_image_block(item)  # type: ignore[arg-type]  # duck-typed: works for both
        except ValueError as exc:
            raise ImageError(f"{label}: {exc}") from None
    raise InvalidRequestError(f"{label}: expected an ImageBlock, ImageNode or ImageDocument, got {type(item).__name__}")


def _parts(blocks: Sequence[Any], where: str, counter: list[int]) -> Iterator[Part]:
    for b, block in enumerate(blocks, 1):
        if isinstance(block, TextBlock):
            yield block.text
        elif isinstance(block, ImageBlock):
            counter[0] += 1
            yield image_block_to_image(block, f"image {counter[0]} of {where}")
        elif isinstance(block, (CitableBlock, CitationBlock)):
            yield from _parts(block.nested_blocks, where, counter)
        elif isinstance(block, (CachePoint, ThinkingBlock)):
            continue
        else:
            raise InvalidRequestError(
                f"{where}, block {b}: {type(block).__name__} is not supported (Mantis reads text and images only)"
            )


def to_conversation(messages: Sequence[ChatMessage]) -> Conversation:
    """Translate LlamaIndex chat messages into a :class:`~mantis_llm.types.Conversation`.

    One turn per message (so ``message N`` in errors is ``messages[N-1]``), parts in block order.
    """
    if isinstance(messages, ChatMessage):
        messages = [messages]
    turns = []
    for m, message in enumerate(messages, 1):
        where = f"message {m}"
        if not isinstance(message, ChatMessage):
            raise InvalidRequestError(f"{where}: expected a ChatMessage, got {type(message).__name__}")
        role = _ROLES.get(MessageRole(message.role))
        if role is None:  # pragma: no cover - a MessageRole added by a future llama-index
            raise InvalidRequestError(f"{where}: role {message.role!r} is not supported")
        parts = list(_parts(message.blocks, where, [0]))
        if message.role in (MessageRole.TOOL, MessageRole.FUNCTION):
            name = message.additional_kwargs.get("name") or message.additional_kwargs.get("tool_call_id")
            parts.insert(0, f"{TOOL_PREFIX} ({name})" if name else TOOL_PREFIX)
        turns.append(Turn(role, parts))
    return Conversation(turns)


def prompt_messages(prompt: str, image_documents: Sequence[ImageInput] | None = None) -> list[ChatMessage]:
    """The one user message a ``complete(prompt, image_documents)`` call stands for: images, then text."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a str, not {type(prompt).__name__}")
    blocks: list[Any] = [to_image_block(doc, f"image_documents[{i}]") for i, doc in enumerate(image_documents or ())]
    if prompt:
        blocks.append(TextBlock(text=prompt))
    return [ChatMessage(role=MessageRole.USER, blocks=blocks)]


# --------------------------------------------------------------------------- responses


def _response_info(response: Response) -> tuple[dict, dict]:
    """(raw, additional_kwargs) for a finished response."""
    extra: dict[str, Any] = {}
    raw: dict[str, Any] = {
        "model": response.model,
        "request_id": response.request_id,
        "finish_reason": response.finish_reason,
        "metrics": dict(response.metrics),
    }
    if response.usage is not None:
        usage = {
            "prompt_tokens": response.usage.input_tokens,
            "completion_tokens": response.usage.output_tokens,
            "total_tokens": response.usage.total_tokens,
        }
        raw["usage"] = usage
        extra.update(usage)
    extra.update({k: raw[k] for k in ("request_id", "finish_reason") if raw[k] is not None})
    return raw, extra


def _chat_response(text: str, delta: str | None, response: Response | None) -> ChatResponse:
    raw, extra = _response_info(response) if response is not None else (None, {})
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=text),
        delta=delta,
        raw=raw,
        additional_kwargs=extra,
    )


def _completion_response(text: str, delta: str | None, response: Response | None) -> CompletionResponse:
    raw, extra = _response_info(response) if response is not None else (None, {})
    return CompletionResponse(text=text, delta=delta, raw=raw, additional_kwargs=extra)


class MantisUpdateEvent(BaseEvent):
    """A backend progress report (fal queue status/position, logs) during a Mantis call."""

    status: str
    request_id: str | None = None
    queue_position: int | None = None
    logs: list[dict[str, Any]] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def class_name(cls) -> str:
        return "MantisUpdateEvent"


# --------------------------------------------------------------------------- shared core


class _MantisBase(BaseModel):
    """Fields and the undecorated core shared by :class:`Mantis` and :class:`MantisMultiModal`."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")  # misspelt arguments fail

    model: str = Field(
        default=DEFAULT_FAL_ENDPOINT,
        description="fal endpoint id (backend='fal') or a Hugging Face id / local path (backend='local').",
    )
    backend: str | Backend = Field(default="fal", description="'fal', 'local', or a mantis_llm Backend instance.")
    api_key: SecretStr | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description="fal key; defaults to the FAL_KEY (or FAL_KEY_ID + FAL_KEY_SECRET) environment variables.",
    )
    max_tokens: int | None = Field(default=None, ge=1, description="Maximum number of tokens to generate.")
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature (None: greedy).")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling probability.")
    stop: list[str] | None = Field(default=None, description="Stop sequences.")
    seed: int | None = Field(default=None, description="Random seed.")
    timeout: float | None = Field(default=None, gt=0, description="Seconds per call (fal).")
    max_retries: int | None = Field(default=None, ge=0, description="Retries on transient errors (fal).")
    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the backend constructor."
    )
    context_window: int = Field(
        default=4096,
        ge=1,
        description=(
            "Context window reported to LlamaIndex. Mantis uses 576 tokens per image, but LlamaIndex "
            "budgets about 2125 per image, so raise this to pack several images into one call."
        ),
    )
    on_update: Callable[[Update], None] | None = Field(
        default=None, exclude=True, description="Called with each backend progress Update."
    )

    _backend: Backend | None = PrivateAttr(default=None)

    def __init__(self, **data: Any) -> None:
        super().__init__(**data)
        name = type(self).__name__
        if isinstance(self.backend, str) and self.backend not in (*BACKEND_NAMES, "transformers"):
            raise ConfigurationError(
                f"{name}: unknown backend {self.backend!r}: expected one of {BACKEND_NAMES} or a Backend instance"
            )
        try:
            self._default_params()  # e.g. an empty stop string
        except InvalidRequestError as exc:
            raise ConfigurationError(f"{name}: {exc.message}") from None

    @model_validator(mode="wrap")
    @classmethod
    def _typed_errors(cls, data: Any, handler: Any) -> Any:
        # pydantic's ValidationError (a ValueError) becomes our ConfigurationError, which
        # pydantic passes through unwrapped.
        try:
            return handler(data)
        except ValidationError as exc:
            raise from_validation_error(exc, cls.__name__) from None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_serializer("backend")
    def _backend_name(self, backend: str | Backend) -> str:
        if isinstance(backend, Backend):
            return "local" if backend.provider == "transformers" else backend.provider
        return backend

    # -- plumbing

    def _get_backend(self) -> Backend:
        """The backend, built on first use."""
        if self._backend is None:
            with _build_lock:
                if self._backend is None:
                    self._backend = resolve_backend(
                        self.backend,
                        self.model,
                        api_key=self.api_key,  # FalBackend takes the SecretStr as it is
                        timeout=self.timeout,
                        max_retries=self.max_retries,
                        **self.backend_options,
                    )
        return self._backend

    def close(self) -> None:
        """Close the backend this object built (one passed in is left to its owner)."""
        if self._backend is not None and not isinstance(self.backend, Backend):
            self._backend.close()
        self._backend = None

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        if self._backend is not None and not isinstance(self.backend, Backend):
            await self._backend.aclose()
        self._backend = None

    def _default_params(self) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop) if self.stop else None,
            seed=self.seed,
        )

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Request:
        """Translate; call-time ``max_tokens``/``temperature``/``top_p``/``stop``/``seed`` win.
        Other keyword arguments LlamaIndex passes along are ignored."""
        overrides = {k: kwargs[k] for k in _PARAMS if kwargs.get(k) is not None}
        return Request(to_conversation(messages), self._default_params().merged(**overrides))

    def _report(self, update: Update) -> None:
        logger.debug("mantis %s: %s (queue position %s)", update.request_id, update.status, update.queue_position)
        dispatcher.event(
            MantisUpdateEvent(
                status=update.status,
                request_id=update.request_id,
                queue_position=update.queue_position,
                logs=list(update.logs),
                metrics=dict(update.metrics),
            )
        )
        if self.on_update is not None:
            self.on_update(update)

    @property
    def _num_output(self) -> int:
        return self.max_tokens or DEFAULT_NUM_OUTPUTS

    @property
    def _model_name(self) -> str:
        """The model that will answer (without building the backend)."""
        return resolve_model(self.backend, self.model)

    # -- the four ways to run; ``make`` builds a ChatResponse or a CompletionResponse

    def _run(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable) -> Any:
        request = self._request(messages, kwargs)
        response = self._get_backend().generate(request, on_update=self._report)
        return make(response.text, None, response)

    async def _arun(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable) -> Any:
        request = self._request(messages, kwargs)  # no I/O: paths and URLs are read by the backend
        response = await self._get_backend().agenerate(request, on_update=self._report)
        return make(response.text, None, response)

    def _stream(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable) -> Iterator[Any]:
        request = self._request(messages, kwargs)  # bad input fails at the call, not mid-iteration
        backend = self._get_backend()

        def gen() -> Iterator[Any]:
            text = ""
            for chunk in backend.stream(request, on_update=self._report):
                text += chunk.text
                yield make(text, chunk.text, chunk.response)

        return gen()

    async def _astream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable
    ) -> AsyncIterator[Any]:
        request = self._request(messages, kwargs)
        backend = self._get_backend()

        async def gen() -> AsyncIterator[Any]:
            text = ""
            async for chunk in backend.astream(request, on_update=self._report):
                text += chunk.text
                yield make(text, chunk.text, chunk.response)

        return gen()


def _completion_args(prompt: str, image_documents: Any) -> list[ChatMessage]:
    # Core passes ``formatted`` by keyword, old callers pass image_documents positionally;
    # a bool in the image_documents slot is a positional ``formatted``. ``formatted`` itself
    # changes nothing: the prompt always becomes one user message of a chat model.
    if isinstance(image_documents, bool):
        image_documents = None
    return prompt_messages(prompt, image_documents)


# --------------------------------------------------------------------------- public classes


class Mantis(_MantisBase, LLM):
    """Mantis (multi-image LLaVA) as a LlamaIndex chat ``LLM``, on fal or a local model.

    Example::

        llm = Mantis()  # fal-ai/mantis-llava-7b-v11, FAL_KEY from the environment
        msg = ChatMessage(role="user", blocks=[ImageBlock(path="a.png"), ImageBlock(url=url),
                                               TextBlock(text="What differs between the images?")])
        print(llm.chat([msg]).message.content)

    :func:`image_block` makes an ``ImageBlock`` from any image source, PIL images included
    (``image_block(pil_image)``).

    ``complete(prompt, image_documents=[...])`` also takes ``ImageBlock``s, ``ImageNode``s and
    ``ImageDocument``s (placed before the prompt). ``backend="local"`` runs the model in-process
    with transformers (``model`` is then a Hugging Face id or a local path).

    A bad or unknown constructor argument raises :class:`~mantis_llm.errors.ConfigurationError`
    naming each field (``"Mantis: top_p: Input should be greater than 0"``); a bad per-call value,
    :class:`~mantis_llm.errors.InvalidRequestError`.
    """

    @classmethod
    def class_name(cls) -> str:
        return "mantis_multi_modal_llm"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self._num_output,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self._model_name,
        )

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._run(messages, kwargs, _chat_response)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream(messages, kwargs, _chat_response)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._arun(messages, kwargs, _chat_response)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._astream(messages, kwargs, _chat_response)

    @llm_completion_callback()
    def complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponse:
        return self._run(_completion_args(prompt, image_documents), kwargs, _completion_response)

    @llm_completion_callback()
    def stream_complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponseGen:
        return self._stream(_completion_args(prompt, image_documents), kwargs, _completion_response)

    @llm_completion_callback()
    async def acomplete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponse:
        return await self._arun(_completion_args(prompt, image_documents), kwargs, _completion_response)

    @llm_completion_callback()
    async def astream_complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponseAsyncGen:
        return await self._astream(_completion_args(prompt, image_documents), kwargs, _completion_response)


class MantisMultiModal(_MantisBase, MultiModalLLM):
    """The legacy ``MultiModalLLM`` interface (``complete(prompt, image_documents)``) over the same core.

    Prefer :class:`Mantis` for new code: LlamaIndex's agents, chat engines and query engines are
    typed ``LLM``; this class is for code still written against ``MultiModalLLM``.
    ``MultiModalLLM`` applies the callback decorators to these methods itself.
    """

    # The callback decorators MultiModalLLM applies read ``rate_limiter`` and ``to_payload()``,
    # which only BaseLLM defines (llama-index-core 0.14.25).
    rate_limiter: Any | None = Field(default=None, exclude=True)

    def to_payload(self) -> dict[str, Any]:
        """Non-sensitive description for callback/instrumentation payloads (no api_key)."""
        return {"class_name": self.class_name(), **self.metadata.model_dump()}

    @classmethod
    def class_name(cls) -> str:
        return "mantis_legacy_multi_modal_llm"

    @property
    def metadata(self) -> MultiModalLLMMetadata:
        return MultiModalLLMMetadata(
            context_window=self.context_window,
            num_output=self._num_output,
            num_input_files=max(1, (self.context_window - self._num_output) // IMAGE_TOKENS),
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self._model_name,
        )

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._run(messages, kwargs, _chat_response)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream(messages, kwargs, _chat_response)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._arun(messages, kwargs, _chat_response)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._astream(messages, kwargs, _chat_response)

    def complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponse:
        return self._run(_completion_args(prompt, image_documents), kwargs, _completion_response)

    def stream_complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponseGen:
        return self._stream(_completion_args(prompt, image_documents), kwargs, _completion_response)

    async def acomplete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponse:
        return await self._arun(_completion_args(prompt, image_documents), kwargs, _completion_response)

    async def astream_complete(  # type: ignore[override]
        self,
        prompt: str,
        image_documents: Sequence[ImageInput] | None = None,
        formatted: bool = False,
        **kwargs: Any,
    ) -> CompletionResponseAsyncGen:
        return await self._astream(_completion_args(prompt, image_documents), kwargs, _completion_response)


__all__ = [
    "Mantis",
    "MantisMultiModal",
    "MantisUpdateEvent",
    "to_conversation",
    "image_block",
    "image_block_to_image",
    "to_image_block",
    "prompt_messages",
]
