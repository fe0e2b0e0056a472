"""``ChatMantis``: Mantis as a LangChain chat model (see its docstring)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import secret_from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import AliasChoices, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from .. import tools as mantis_tools
from .._adapter import BackendSlot, check_backend, check_fields, key_for, provider, typed_errors
from ..backends import DEFAULT_FAL_ENDPOINT, Backend, resolve_model
from ..errors import InvalidRequestError
from ..tokens import TokenCounter
from ..types import GenerationParams, Request, Response, Update
from ._callbacks import aupdate_sender, update_sender
from ._messages import to_conversation
from ._tools import invalid_tool_calls, response_format, tool_call_chunks, tool_calls, tool_spec

_CALL_PARAMS = ("max_tokens", "temperature", "top_p", "seed")


class ChatMantis(BaseChatModel):
    """Mantis (TIGER-Lab's interleaved multi-image LLaVA) as a LangChain chat model.

    Several images per turn, anywhere in the text, in any message; on fal (the hosted
    endpoint, default), in-process with transformers, or on a server of your own.

    Setup:
        Install ``mantis-llm`` with the LangChain extra and set your fal key:

        .. code-block:: bash

            pip install -U "mantis-llm[langchain]"
            export FAL_KEY="..."

        (``mantis-llm[local]`` runs the model in this process instead: ``backend="local"``.)

    Key init args — completion params:
        model: str
            fal endpoint id (default ``fal-ai/mantis-llava-7b-v11``), or with
            ``backend="local"`` a Hub id or local path (default ``TIGER-Lab/Mantis-llava-7b``).
        max_tokens: int | None
            Most tokens to generate.
        temperature: float | None
            Sampling temperature in [0, 2]; None or 0 is greedy.
        top_p, stop, seed:
            Nucleus sampling, stop sequences (cut by us on every backend), sampling seed.

    Key init args — client params:
        backend: "fal" | "local" | "openai" | Backend
            Where the model runs: fal, this process, or your own vLLM / SGLang /
            ``transformers serve`` (``base_url``); a :class:`~mantis_llm.backends.Backend`
            instance is shared.
        api_key: SecretStr | None
            The fal key (alias ``fal_key``); default ``FAL_KEY``.
        timeout, max_retries:
            The whole call's limit on fal (default 600 s) and retries per HTTP step (5).
        backend_options: dict
            More backend options (fal: ``mode``, ``queue_url``, ``with_logs``...; local:
            ``device``, ``dtype``...). A misspelt option is an error at construction.

    Instantiate:
        .. code-block:: python

            from mantis_llm.langchain import ChatMantis

            llm = ChatMantis(max_tokens=256, temperature=0)

    Invoke:
        .. code-block:: python

            from langchain_core.messages import HumanMessage

            messages = [HumanMessage(content=[
                {"type": "image", "url": "https://example.com/house_day.jpg"},
                {"type": "image", "url": "https://example.com/house_night.jpg"},
                {"type": "text", "text": "What changed between the two pictures?"},
            ])]
            llm.invoke(messages)

        .. code-block:: python

            AIMessage(content='The first picture shows the house by day; in the second it is
            night and the windows are lit.', response_metadata={'model_name':
            'fal-ai/mantis-llava-7b-v11', 'model_provider': 'fal', 'request_id': 'd90dcb72-...',
            'metrics': {'retries': 0, 'status_transport': 'sse', 'queue_time': 0.0014,
            'inference_time': 0.0104, 'elapsed': 0.1241, ...}}, id='lc_run--...')

    Stream:
        .. code-block:: python

            for chunk in llm.stream(messages):
                print(chunk.content, end="|")

        .. code-block:: none

            The first picture| shows the house| by day; in| the second it| is night and| ...

        (On fal, tokens stream with ``backend_options={"mode": "stream"}``; the queue mode
        gives the whole answer as one chunk.)

    Async:
        .. code-block:: python

            await llm.ainvoke(messages)
            async for chunk in llm.astream(messages): ...
            await llm.abatch([messages, messages])  # concurrent

    Image input:
        Every image block LangChain users send: v1 ``{"type": "image", "url" | "base64"}``,
        the older ``source_type`` blocks, OpenAI ``image_url`` (URL or data URI), Anthropic
        ``source`` blocks. A file, bytes or a PIL image: :func:`mantis_llm.langchain.image_block`.

        .. code-block:: python

            from mantis_llm.langchain import image_block

            llm.invoke([HumanMessage(content=[image_block("day.png"), image_block(pil_image),
                                              "Which one was taken at night?"])])

    Tool calling:
        .. code-block:: python

            from langchain_core.tools import tool

            @tool
            def get_weather(city: str) -> str:
                '''The current weather in a city.'''

            llm.bind_tools([get_weather]).invoke(...).tool_calls

        .. code-block:: python

            [{'name': 'get_weather', 'args': {'city': 'Paris'}, 'id': 'call_32fbff8d...',
              'type': 'tool_call'}]

        Mantis has no native function calling: the tools go in the prompt and the answer is
        parsed and validated (the local backend's grammar guarantees the format; the model's
        judgement of when and which tool to call stays a 7B model's). Works with
        ``create_agent`` and LangGraph's prebuilt agent.

    Structured output:
        .. code-block:: python

            from pydantic import BaseModel

            class Change(BaseModel):
                '''What changed between two pictures.'''
                what: str
                lights_on: bool

            llm.with_structured_output(Change).invoke(messages)

        .. code-block:: python

            Change(what='day became night', lights_on=True)

    Response metadata:
        ``model_name``, ``model_provider`` ("fal" / "transformers"), ``finish_reason`` (fal
        reports none: "stop" when our stop sequence cut the text, "tool_calls" after a call),
        ``request_id``, and the backend's ``metrics`` (retries, queue and inference time).

    Token usage:
        ``usage_metadata`` on the local backend (real token counts); absent on fal, whose
        endpoint reports none (we do not invent them).

    The outputs above come from a run against :class:`mantis_llm.testing.FalEmulator` with
    scripted answers (real HTTP, canned text): what Mantis says differs, the shapes do not.
    The backend is built on first use and reused; :meth:`close` / :meth:`aclose` release it.
    A bad constructor argument raises :class:`~mantis_llm.errors.ConfigurationError` naming
    each field; a bad per-call value, :class:`~mantis_llm.errors.InvalidRequestError`.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt argument is an error, not ignored

    model: str = Field(default=DEFAULT_FAL_ENDPOINT, validation_alias=AliasChoices("model", "model_name"))
    """The fal endpoint id, or with ``backend="local"`` a Hub id or local path (default
    ``TIGER-Lab/Mantis-llava-7b``). Also accepted as ``model_name``."""
    backend: Literal["fal", "local", "openai"] | Backend = "fal"
    """Where the model runs: ``"fal"``, ``"local"`` (transformers, in-process), ``"openai"`` (an
    OpenAI-compatible server serving Mantis: vLLM, SGLang, ``transformers serve``) or a
    :class:`~mantis_llm.backends.Backend` instance (shared, and closed by its owner)."""
    base_url: str | None = None
    """With ``backend="openai"``: the server (``http://host:8000``, ``/v1`` optional); default
    ``MANTIS_BASE_URL``."""
    api_key: SecretStr | None = Field(
        default_factory=secret_from_env("FAL_KEY", default=None),
        validation_alias=AliasChoices("api_key", "fal_key"),
    )
    """The fal key (alias ``fal_key``); default ``FAL_KEY``, else ``FAL_KEY_ID:FAL_KEY_SECRET``.
    With ``backend="openai"``, the server's key, if it needs one (given here, else
    ``OPENAI_API_KEY``; ``FAL_KEY`` is never sent there). Kept as a ``SecretStr``: never in a
    repr, log, error or dump, and sent only to its own host."""
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
        """The LangSmith provider name, ``"fal"``, ``"transformers"`` or ``"openai"`` (no backend built)."""
        return provider(self.backend)

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
            max_input_tokens=self._token_counter().context_length,
            text_inputs=True,
            image_inputs=True,
            image_url_inputs=True,
            pdf_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            text_outputs=True,
            image_outputs=False,
            # tools are described in the prompt and parsed from the answer (a grammar on the
            # local backend); create_agent then sends tool_choice="any" for response_format
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            image_tool_message=True,
            # False on purpose: create_agent(response_format=...) then uses its tool strategy,
            # the path that retries on a validation error (its provider strategy does not)
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
        # LangChain's convention: an empty key is no key (secret_from_env gives "" for an
        # empty FAL_KEY), so FAL_KEY_ID + FAL_KEY_SECRET still apply. LlamaIndex refuses it.
        return self._slot.get(self, key_for(self.backend, self.api_key or None, "api_key" in self.model_fields_set))

    def close(self) -> None:
        """Release the backend this model built (a backend instance you passed is yours)."""
        self._slot.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        await self._slot.aclose()

    # -- token counting -----------------------------------------------------------------

    def _token_counter(self) -> TokenCounter:
        return self._slot.token_counter(self.backend, self.model, self.backend_options)

    def get_num_tokens(self, text: str) -> int:
        """Mantis tokens in ``text``: exact with the model's tokenizer (a loaded local backend,
        a model directory), else a documented estimate. Offline, never GPT-2 from the Hub."""
        if self.custom_get_token_ids is not None:
            return super().get_num_tokens(text)
        return self._token_counter().count_text(text)

    def get_token_ids(self, text: str) -> list[int]:
        """The model's token ids for ``text``; a ConfigurationError where only an estimate exists."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self._token_counter().token_ids(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The prompt tokens of ``messages`` the way Mantis sees them: the template, the text,
        576 tokens per image (the model's own figure once loaded), and the tool instruction
        when ``tools`` are given. What ``trim_messages(token_counter=model)`` calls."""
        spec = tool_spec([convert_to_openai_tool(t) for t in tools], None, None) if tools else None
        return self._token_counter().count_request(Request(to_conversation(messages), tools=spec))

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
        kwargs.pop("ls_structured_output_format", None)  # LangChain's tracing metadata
        bound = kwargs.pop("tools", None)
        tool_choice = kwargs.pop("tool_choice", None)
        parallel = kwargs.pop("parallel_tool_calls", None)
        fmt = kwargs.pop("response_format", None)
        overrides = {k: kwargs.pop(k) for k in _CALL_PARAMS if k in kwargs}
        if kwargs:
            raise InvalidRequestError(f"unsupported call arguments for ChatMantis: {sorted(kwargs)}")
        return Request(
            to_conversation(messages),
            self._params(stop, **overrides),
            tools=tool_spec(bound, tool_choice, parallel) if bound else None,
            response_format=response_format(fmt) if fmt is not None else None,
        )

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
            tool_calls=tool_calls(response),
            invalid_tool_calls=invalid_tool_calls(response),
            response_metadata=self._metadata(response, backend),
            usage_metadata=self._usage(response),
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _chunk(self, text: str, response: Response | None, backend: Backend) -> ChatGenerationChunk:
        if response is None:
            return ChatGenerationChunk(message=AIMessageChunk(content=text))
        # model_name, finish_reason, usage and the calls go on the last chunk only: chunk
        # addition concatenates strings, sums usage and merges tool_call_chunks by index.
        meta = self._metadata(response, backend)
        if response.invalid_tool_calls:
            # a stream aggregate is re-parsed from its chunks, which would make a call whose
            # JSON parses but whose arguments failed validation look valid: the failed calls
            # (with their errors) travel in the metadata instead; invoke() gives them as
            # invalid_tool_calls
            meta["invalid_tool_calls"] = invalid_tool_calls(response)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content=text,
                tool_call_chunks=tool_call_chunks(response),
                chunk_position="last",
                response_metadata=meta,
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
        response = mantis_tools.generate(backend, request, on_update=update_sender(run_manager, self.on_update))
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
            response = await mantis_tools.agenerate(backend, request, on_update=on_update)
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
        for chunk in mantis_tools.stream(backend, request, on_update=update_sender(run_manager, self.on_update)):
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
            async for chunk in mantis_tools.astream(backend, request, on_update=on_update):
                if chunk.text or chunk.response is not None:
                    yield self._chunk(chunk.text, chunk.response, backend)

    # -- tools and structured output ----------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | bool | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (pydantic classes, functions, ``BaseTool``s or OpenAI tool dicts).

        Mantis has no native function calling: the tools are described in the prompt and the
        model answers in plain text or with only a JSON call, which is parsed leniently and
        validated against the tool's schema (``tool_calls``; what cannot be repaired comes back
        in ``invalid_tool_calls``). The local backend constrains decoding with a grammar, so
        its calls always parse; fal and OpenAI-compatible servers get up to two repair turns.

        ``tool_choice``: None/"auto" (text or a call), "none", "any"/"required"/True (a call),
        a tool's name or ``{"type": "function", "function": {"name": ...}}`` (that call); an
        unknown name raises ``ValueError``. One call per answer unless
        ``parallel_tool_calls=True``. ``strict`` is passed to ``convert_to_openai_tool``.
        """
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        try:
            choice = mantis_tools.normalize_tool_choice(
                tool_choice, [mantis_tools.tool_from_openai(t) for t in formatted]
            )
        except InvalidRequestError as exc:
            raise ValueError(exc.message) from None
        return super().bind(tools=formatted, tool_choice=choice, parallel_tool_calls=parallel_tool_calls, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "function_calling", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable returning answers parsed into ``schema`` (a pydantic class, a TypedDict
        or a JSON schema dict): pydantic classes give instances, other schemas dicts.

        ``method="json_schema"`` (default) asks for a JSON value of the schema (a
        ``response_format``); ``"function_calling"`` binds the schema as a tool and forces the
        call; ``"json_mode"`` asks for any JSON object (describe it in your prompt; ``schema``
        then only parses and may be None). All three run through the same tool-calling core:
        the local backend's grammar guarantees the format, other backends get repair turns.
        An answer that still does not parse raises ``OutputParserException``; with
        ``include_raw=True`` the result is ``{"raw": AIMessage, "parsed": ... | None,
        "parsing_error": Exception | None}``. ``strict`` is accepted for compatibility.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments for with_structured_output: {sorted(kwargs)}")
        if method not in ("json_schema", "function_calling", "json_mode"):
            raise ValueError(f"method must be 'json_schema', 'function_calling' or 'json_mode', not {method!r}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema is required with method={method!r}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced: dict[str, Any] = {
            "ls_structured_output_format": {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        }
        parser: Runnable[Any, Any]
        if method == "function_calling":
            tool = convert_to_openai_tool(cast(Any, schema), strict=strict)
            name = tool["function"]["name"]
            llm = self.bind_tools([tool], tool_choice=name, **traced)
            parser = (
                PydanticToolsParser(tools=[cast(Any, schema)], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        else:
            if method == "json_mode":
                fmt: dict[str, Any] = {"type": "json_object"}
            else:
                json_schema = schema if isinstance(schema, dict) else convert_to_json_schema(cast(Any, schema))
                title = json_schema.get("title") if isinstance(json_schema, dict) else None
                fmt = {"type": "json_schema", "json_schema": {"name": title or "response", "schema": json_schema}}
            llm = self.bind(response_format=fmt, **traced)
            parser = PydanticOutputParser(pydantic_object=cast(Any, schema)) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parser_assign = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        parser_none = RunnablePassthrough.assign(parsed=lambda _: None)
        parser_with_fallback = parser_assign.with_fallbacks([parser_none], exception_key="parsing_error")
        return RunnableMap(raw=llm) | parser_with_fallback
