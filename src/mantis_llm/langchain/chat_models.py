"""``ChatMantis``: Mantis as a LangChain chat model (see its docstring)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from .._adapter import BackendSlot, build_backend, check_backend, check_fields, typed_errors
from ..backends import DEFAULT_FAL_ENDPOINT, Backend, resolve_model
from ..errors import InvalidRequestError
from ..types import Conversation, GenerationParams, Request, Response, Turn, Update
from ._callbacks import aupdate_sender, update_sender
from ._messages import to_conversation

MAX_INPUT_TOKENS = 4096  # Mantis-llava-7b context (576 tokens per image)
_PROVIDERS = {"fal": "fal", "local": "transformers"}
_CALL_PARAMS = ("max_tokens", "temperature", "top_p", "seed")


def _json_instruction(schema: dict[str, Any] | None) -> str:
    if schema is None:
        return "Answer with a single JSON object and nothing else: no prose, no code fences."
    return (
        "Answer with a single JSON object that conforms to this JSON schema, and nothing else "
        f"(no prose, no code fences):\n{json.dumps(schema, ensure_ascii=False)}"
    )


class ChatMantis(BaseChatModel):
    """CLASS_DOCSTRING"""

    model_config = ConfigDict(extra="forbid")  # a misspelt argument is an error, not ignored

    model: str = Field(default=DEFAULT_FAL_ENDPOINT, validation_alias=AliasChoices("model", "model_name"))
    """The fal endpoint id, or with ``backend="local"`` a Hub id or local path (default
    ``TIGER-Lab/Mantis-llava-7b``). Also accepted as ``model_name``."""
    backend: Literal["fal", "local"] | Backend = "fal"
    """Where the model runs: ``"fal"``, ``"local"`` (transformers, in-process) or a
    :class:`~mantis_llm.backends.Backend` instance (shared, and closed by its owner)."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("FAL_KEY", default=None),
        validation_alias=AliasChoices("api_key", "fal_key"),
    )
    """The fal key (alias ``fal_key``); default ``FAL_KEY``, else ``FAL_KEY_ID:FAL_KEY_SECRET``.
    Kept as a ``SecretStr``: never in a repr, log, error or dump."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default: the backend's)."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    """Sampling temperature in [0, 2]; None or 0 is greedy."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling probability in (0, 1]."""
    stop: list[str] | None = Field(default=None, validation_alias=AliasChoices("stop", "stop_sequences"))
    """Stop sequences: the answer is cut before the first one (applied by us on every backend)."""
    seed: int | None = None
    """Sampling seed."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds for a whole call on fal (upload, queue, generation, result); default 600."""
    max_retries: int | None = Field(default=None, ge=0)
    """Retries per HTTP step on fal, for what is safe to retry; default 5."""
    streaming: bool = False
    """Use the streaming path for ``invoke`` too (tokens reach ``on_llm_new_token``)."""
    backend_options: dict[str, Any] = Field(default_factory=dict)
    """More constructor options for the backend (fal: ``mode``, ``queue_url``, ``with_logs`` ...;
    local: ``device``, ``dtype`` ...). See the README's Backends section."""
    on_update: Callable[[Update], None] | None = Field(default=None, exclude=True)
    """Called with every backend progress report (fal queue position, logs), on every path
    (must not block); not serialized."""

    _slot: BackendSlot = PrivateAttr(default_factory=BackendSlot)

    _typed_errors = model_validator(mode="wrap")(classmethod(typed_errors))  # type: ignore[arg-type]

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: Any) -> Any:
        return check_backend(value)

    @model_validator(mode="after")
    def _default_model_for_backend(self) -> ChatMantis:
        if "model" not in self.model_fields_set:
            self.model = resolve_model(self.backend)
        check_fields("ChatMantis", self.backend, self.backend_options, lambda: self._params(None))
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
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "backend": self.provider,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
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
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "FAL_KEY"}

    # -- backend ------------------------------------------------------------------------

    def get_backend(self) -> Backend:
        """The backend this model runs on, built on first use and then reused."""
        if isinstance(self.backend, Backend):
            return self.backend
        return self._slot.get(
            lambda: build_backend(
                self.backend,
                self.model,
                # LangChain's convention: an empty key is no key (secret_from_env gives "" for an
                # empty FAL_KEY), so FAL_KEY_ID + FAL_KEY_SECRET still apply. LlamaIndex refuses it.
                api_key=self.api_key or None,
                timeout=self.timeout,
                max_retries=self.max_retries,
                backend_options=self.backend_options,
            )
        )

    def close(self) -> None:
        """Release the backend this model built (a backend instance you passed is yours)."""
        backend = self._slot.take()
        if backend is not None:
            backend.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        backend = self._slot.take()
        if backend is not None:
            await backend.aclose()

    # -- requests and responses ---------------------------------------------------------

    def _merge_stop(self, stop: Sequence[str] | None) -> list[str] | None:
        if isinstance(stop, str):  # stop="END" is one sequence, not three letters
            stop = [stop]
        merged = list(dict.fromkeys([*(self.stop or ()), *(stop or ())]))
        return merged or None

    def _params(self, stop: Sequence[str] | None, **overrides: Any) -> GenerationParams:
        return GenerationParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self._merge_stop(stop) or ()),
        ).merged(**overrides)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> Request:
        kwargs = dict(kwargs)
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
        conversation = to_conversation(messages)
        if response_format is not None:
            self._add_json_instruction(conversation, response_format)
        return Request(conversation, params)

    @staticmethod
    def _add_json_instruction(conversation: Conversation, response_format: Any) -> None:
        if not isinstance(response_format, dict) or response_format.get("type") not in (
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

    def _metadata(self, response: Response, backend: Backend) -> dict[str, Any]:
        meta: dict[str, Any] = {
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
        u = response.usage
        if u is None:
            return None
        return cast(UsageMetadata, u.as_dict())  # the same three keys

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
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        response = backend.generate(request, on_update=update_sender(run_manager, self.on_update))
        return self._result(response, backend)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        async with aupdate_sender(run_manager, self.on_update) as on_update:
            response = await backend.agenerate(request, on_update=on_update)
        return self._result(response, backend)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # LangChain itself calls run_manager.on_llm_new_token for every chunk we yield.
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        for chunk in backend.stream(request, on_update=update_sender(run_manager, self.on_update)):
            if chunk.text or chunk.response is not None:
                yield self._chunk(chunk.text, chunk.response, backend)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        backend = self.get_backend()
        async with aupdate_sender(run_manager, self.on_update) as on_update:
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
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
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
            json_schema = schema if isinstance(schema, dict) else convert_to_json_schema(schema)
        response_format: dict[str, Any] = (
            {"type": "json_object"} if method == "json_mode" else {"type": "json_schema", "schema": json_schema}
        )
        llm = self.bind(
            response_format=response_format,
            ls_structured_output_format={
                "kwargs": {"method": method, "strict": strict},
                "schema": schema,
            },
        )
        parser = PydanticOutputParser(pydantic_object=cast(Any, schema)) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        parser_with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | parser_with_fallback
