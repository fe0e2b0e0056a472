"""``Mantis`` (a LlamaIndex ``LLM``) and the legacy ``MantisMultiModal`` (a ``MultiModalLLM``):
one set of fields and one core, two base classes."""

from __future__ import annotations

import json
import logging
import types
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import asdict
from typing import Any, Literal, TypeVar

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.multi_modal_llms import MultiModalLLM, MultiModalLLMMetadata
from llama_index.core.tools import BaseTool, ToolSelection

from .. import tools as mantis_tools
from .._adapter import BackendSlot, backend_label, check_backend, check_fields, typed_errors
from ..backends import DEFAULT_FAL_ENDPOINT, Backend, resolve_model
from ..tokens import TokenCounter
from ..types import GenerationParams, Request, Response, ToolSpec, Update
from ._messages import ImageInput, prompt_messages, to_conversation
from ._prompt_helper import MantisChatPromptHelper

logger = logging.getLogger("mantis_llm.llama_index")
dispatcher = get_dispatcher("mantis_llm.llama_index")

_PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed")
F = TypeVar("F", bound=Callable[..., Any])


def _response_info(response: Response) -> tuple[dict[str, Any], dict[str, Any]]:
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
    blocks: list[Any] = [TextBlock(text=text)]
    message_extra: dict[str, Any] = {}
    if response is not None and response.tool_calls:
        blocks += [
            ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in response.tool_calls
        ]
        # the older convention (OpenAI-shaped dicts), for code that reads it
        message_extra["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
            for c in response.tool_calls
        ]
    if response is not None and response.invalid_tool_calls:
        raw["invalid_tool_calls"] = [asdict(c) for c in response.invalid_tool_calls]  # type: ignore[index]
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=message_extra),
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
    backend: Literal["fal", "local", "openai"] | Backend = Field(
        default="fal", description="'fal', 'local', 'openai' (an OpenAI-compatible server), or a Backend instance."
    )
    base_url: str | None = Field(
        default=None,
        description="With backend='openai': the server (http://host:8000, /v1 optional); default MANTIS_BASE_URL.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        exclude=True,
        repr=False,
        description=(
            "fal key; defaults to the FAL_KEY (or FAL_KEY_ID + FAL_KEY_SECRET) environment variables. "
            "With backend='openai': the server's key, else OPENAI_API_KEY."
        ),
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
    context_window: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Context window reported to LlamaIndex; None: the model's (4,096 for Mantis-llava-7b, the "
            "loaded local model's own). To pack several images into one call, set "
            "Settings.chat_prompt_helper = llm.chat_prompt_helper() (LlamaIndex prices an image at 2,125)."
        ),
    )
    on_update: Callable[[Update], None] | None = Field(
        default=None, exclude=True, description="Called with each backend progress Update."
    )

    _slot: BackendSlot = PrivateAttr(default_factory=BackendSlot)

    _typed_errors = model_validator(mode="wrap")(classmethod(typed_errors))  # type: ignore[arg-type]

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        return check_backend(value)

    @model_validator(mode="after")
    def _checked(self) -> Any:
        check_fields(type(self).__name__, self.backend, self.backend_options, self._default_params)
        return self

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_serializer("backend")
    def _backend_name(self, backend: str | Backend) -> str:
        return backend_label(backend)

    # -- plumbing

    def get_backend(self) -> Backend:
        """The backend this model runs on, built on first use and then reused."""
        return self._slot.get(self, self.api_key)

    def close(self) -> None:
        """Release the backend this model built (a backend instance you passed is yours)."""
        self._slot.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        await self._slot.aclose()

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
        ``tools`` (OpenAI tool dicts, as ``_prepare_chat_with_tools`` passes them),
        ``tool_choice`` and ``parallel_tool_calls`` make a tool-calling request. Other keyword
        arguments LlamaIndex passes along are ignored."""
        overrides = {k: kwargs[k] for k in _PARAMS if kwargs.get(k) is not None}
        spec = None
        if kwargs.get("tools"):
            bound = tuple(mantis_tools.tool_from_openai(t) for t in kwargs["tools"])
            choice = mantis_tools.normalize_tool_choice(kwargs.get("tool_choice"), bound)
            spec = ToolSpec(bound, choice, parallel=bool(kwargs.get("parallel_tool_calls")))
        return Request(to_conversation(messages), self._default_params().merged(**overrides), tools=spec)

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

    def _token_counter(self) -> TokenCounter:
        return self._slot.token_counter(self.backend, self.model, self.backend_options)

    @property
    def _context_window(self) -> int:
        return self.context_window or self._token_counter().context_length

    def chat_prompt_helper(self) -> MantisChatPromptHelper:
        """A ``ChatPromptHelper`` that counts as Mantis does (576 tokens per image, not
        LlamaIndex's 2,125): ``Settings.chat_prompt_helper = llm.chat_prompt_helper()`` lets a
        multimodal query engine send several images in one call."""
        return MantisChatPromptHelper(
            self._token_counter(), num_output=self._num_output, context_window=self._context_window
        )

    @property
    def _model_name(self) -> str:
        """The model that will answer (without building the backend)."""
        return resolve_model(self.backend, self.model)

    # -- the four ways to run; ``make`` builds a ChatResponse or a CompletionResponse

    def _run(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable) -> Any:
        request = self._request(messages, kwargs)
        response = mantis_tools.generate(self.get_backend(), request, on_update=self._report)
        return make(response.text, None, response)

    async def _arun(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable) -> Any:
        request = self._request(messages, kwargs)  # no I/O: paths and URLs are read by the backend
        response = await mantis_tools.agenerate(self.get_backend(), request, on_update=self._report)
        return make(response.text, None, response)

    def _stream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable
    ) -> Generator[Any, None, None]:
        request = self._request(messages, kwargs)  # bad input fails at the call, not mid-iteration
        backend = self.get_backend()

        def gen() -> Generator[Any, None, None]:
            text = ""
            for chunk in mantis_tools.stream(backend, request, on_update=self._report):
                text += chunk.text
                yield make(text, chunk.text, chunk.response)

        return gen()

    async def _astream(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any], make: Callable
    ) -> AsyncGenerator[Any, None]:
        request = self._request(messages, kwargs)
        backend = self.get_backend()

        async def gen() -> AsyncGenerator[Any, None]:
            text = ""
            async for chunk in mantis_tools.astream(backend, request, on_update=self._report):
                text += chunk.text
                yield make(text, chunk.text, chunk.response)

        return gen()

    # -- the eight public methods, written once; Mantis and MantisMultiModal bind them
    # (Mantis through llama-index's callback decorators; MultiModalLLM decorates its own)

    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._run(messages, kwargs, _chat_response)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream(messages, kwargs, _chat_response)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await self._arun(messages, kwargs, _chat_response)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return await self._astream(messages, kwargs, _chat_response)

    def complete(
        self, prompt: str, image_documents: Sequence[ImageInput] | None = None, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return self._run(_completion_args(prompt, image_documents), kwargs, _completion_response)

    def stream_complete(
        self, prompt: str, image_documents: Sequence[ImageInput] | None = None, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        return self._stream(_completion_args(prompt, image_documents), kwargs, _completion_response)

    async def acomplete(
        self, prompt: str, image_documents: Sequence[ImageInput] | None = None, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        return await self._arun(_completion_args(prompt, image_documents), kwargs, _completion_response)

    async def astream_complete(
        self, prompt: str, image_documents: Sequence[ImageInput] | None = None, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        return await self._astream(_completion_args(prompt, image_documents), kwargs, _completion_response)


def _own(f: F) -> F:
    """A copy of the function ``f`` for one class to decorate.

    llama-index's callback decorators mark the function they wrap (``f.__wrapped__ = True``)
    and decorate an already-marked function with a pass-through only, so two classes that
    decorated the same function object would leave the second one without callbacks.
    """
    copy = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = f.__kwdefaults__, f.__qualname__, f.__doc__
    copy.__annotations__ = dict(f.__annotations__)
    return copy  # type: ignore[return-value]


def _completion_args(prompt: str, image_documents: Any) -> list[ChatMessage]:
    # Core passes ``formatted`` by keyword, old callers pass image_documents positionally;
    # a bool in the image_documents slot is a positional ``formatted``. ``formatted`` itself
    # changes nothing: the prompt always becomes one user message of a chat model.
    if isinstance(image_documents, bool):
        image_documents = None
    return prompt_messages(prompt, image_documents)


class Mantis(_MantisBase, FunctionCallingLLM):
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

    Responses put token usage (when the backend knows it) in ``raw["usage"]`` and
    ``additional_kwargs`` as ``prompt_tokens``/``completion_tokens``/``total_tokens`` (read by
    ``TokenCountingHandler``), plus ``request_id``, ``finish_reason`` and backend ``metrics`` in
    ``raw``. Progress reports (fal queue position, logs) are dispatched as
    :class:`MantisUpdateEvent` instrumentation events and passed to ``on_update``.

    A bad or unknown constructor argument raises :class:`~mantis_llm.errors.ConfigurationError`
    naming each field (``"Mantis: top_p: Input should be greater than 0"``); a bad per-call value,
    :class:`~mantis_llm.errors.InvalidRequestError`.
    """

    @classmethod
    def class_name(cls) -> str:
        # "multi" in the name keeps MultiModalVectorStoreIndex from warning that this LLM
        # "does not appear to be a multi-modal LLM" (llama-index-core indices/multi_modal/base.py)
        return "mantis_multi_modal_llm"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._context_window,
            num_output=self._num_output,
            is_chat_model=True,
            # tools in the prompt, calls parsed from the answer (a grammar on the local
            # backend): FunctionAgent, AgentWorkflow and structured_predict take this path
            is_function_calling_model=True,
            model_name=self._model_name,
        )

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The ``chat`` arguments for a turn with ``tools``: the messages, the tools as OpenAI
        dicts, ``tool_choice`` ("required" when ``tool_required``, else "auto" unless given)."""
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        if tool_choice is None:
            tool_choice = "required" if tool_required else "auto"
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool() for tool in tools],
            "tool_choice": tool_choice,
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        """The calls in ``response`` (its ``ToolCallBlock``s). Called on every streamed chunk
        too, where a call appears only in the last one: never raises there."""
        calls = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected at least one tool call, but got 0 tool calls: {response.message.content!r}")
        selections = []
        for b in calls:  # ours hold dicts; a block another integration made may hold JSON text
            args = b.tool_kwargs if isinstance(b.tool_kwargs, dict) else json.loads(b.tool_kwargs or "{}")
            call_id = b.tool_call_id or mantis_tools.new_call_id()
            selections.append(ToolSelection(tool_id=call_id, tool_name=b.tool_name, tool_kwargs=args))
        return selections

    chat = llm_chat_callback()(_own(_MantisBase.chat))
    stream_chat = llm_chat_callback()(_own(_MantisBase.stream_chat))
    achat = llm_chat_callback()(_own(_MantisBase.achat))
    astream_chat = llm_chat_callback()(_own(_MantisBase.astream_chat))
    complete = llm_completion_callback()(_own(_MantisBase.complete))
    stream_complete = llm_completion_callback()(_own(_MantisBase.stream_complete))
    acomplete = llm_completion_callback()(_own(_MantisBase.acomplete))
    astream_complete = llm_completion_callback()(_own(_MantisBase.astream_complete))


class MantisMultiModal(_MantisBase, MultiModalLLM):
    """The legacy ``MultiModalLLM`` interface (``complete(prompt, image_documents)``) over the same core.

    Prefer :class:`Mantis` for new code: LlamaIndex's agents, chat engines and query engines are
    typed ``LLM``; this class is for code still written against ``MultiModalLLM``.
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
            context_window=self._context_window,
            num_output=self._num_output,
            num_input_files=max(1, (self._context_window - self._num_output) // self._token_counter().tokens_per_image),
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self._model_name,
        )

    # MultiModalLLM decorates the methods found in the subclass's own namespace: bind them here.
    chat = _own(_MantisBase.chat)
    stream_chat = _own(_MantisBase.stream_chat)
    achat = _own(_MantisBase.achat)
    astream_chat = _own(_MantisBase.astream_chat)
    complete = _own(_MantisBase.complete)
    stream_complete = _own(_MantisBase.stream_complete)
    acomplete = _own(_MantisBase.acomplete)
    astream_complete = _own(_MantisBase.astream_complete)
