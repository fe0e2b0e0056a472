"""ChatMantis end to end against the FalEmulator (real HTTP on 127.0.0.1, real FalBackend)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import pickle
import re
import time
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.exceptions import OutputParserException
from langchain_core.load import dumpd, dumps, load
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField
from langchain_core.tools import tool
from langgraph.graph import END, START, MessagesState, StateGraph
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from mantis_llm.backends.fal import FalBackend
from mantis_llm.emulator import FalEmulator, JobError, expected_output
from mantis_llm.errors import (
    AuthenticationError,
    ConfigurationError,
    EndpointNotFoundError,
    ImageError,
    InvalidRequestError,
)
from mantis_llm.langchain import QUEUE_UPDATE_EVENT, ChatMantis

URL_A = "https://images.example.com/a.jpg"
URL_B = "https://images.example.com/b.jpg"


class Recorder(BaseCallbackHandler):
    """Records what LangChain reports to callbacks."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.events: list[tuple[str, Any]] = []
        self.errors: list[BaseException] = []
        self.starts = 0

    def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
        self.starts += 1

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.events.append((name, data))

    def on_llm_error(self, error, **kwargs) -> None:
        self.errors.append(error)


@pytest.fixture
def chat(emu):
    model = ChatMantis()
    yield model
    model.close()


@pytest.fixture
def b64(png_bytes: bytes) -> str:
    return base64.b64encode(png_bytes).decode()


def last_payload(emu: FalEmulator) -> dict:
    return emu.submissions[-1].payload


def looks_at(*content) -> HumanMessage:
    return HumanMessage(content=list(content))


# ------------------------------------------------------------------ what reaches fal


def test_interleaved_text_and_images_reach_fal_in_order(chat, emu, b64):
    msg = looks_at(
        "Compare",
        {"type": "image", "url": URL_A},
        {"type": "text", "text": "with"},
        {"type": "image", "base64": b64, "mime_type": "image/png"},
        "please.",
    )
    result = chat.invoke([msg])
    payload = last_payload(emu)
    assert payload["prompt"] == "Compare <image> with <image> please."
    urls = [i["image_url"] for i in payload["images"]]
    assert urls[0] == URL_A and urls[1].startswith("data:image/png;base64,")
    # the answer is the fake model's for exactly this payload (count + digest of what it got)
    assert result.content == expected_output(payload)
    assert "2 images" in result.content
    assert result.response_metadata["model_name"] == "fal-ai/mantis-llava-7b-v11"
    assert result.response_metadata["model_provider"] == "fal"
    assert result.response_metadata["request_id"] == emu.submissions[-1].request_id
    assert result.response_metadata["metrics"]["mode"] == "queue"
    assert result.usage_metadata is None  # fal reports no token counts; none are invented


def test_every_block_form_reaches_fal(chat, emu, b64, png_bytes):
    data_uri = f"data:image/png;base64,{b64}"
    msg = looks_at(
        "all:",
        {"type": "image", "url": URL_A},
        {"type": "image", "base64": b64, "mime_type": "image/png"},
        {"type": "image", "url": data_uri},
        {"type": "image", "source_type": "url", "url": URL_B},
        {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": "https://images.example.com/c.jpg"}},
        {"type": "image_url", "image_url": {"url": data_uri}},
        {"type": "image_url", "image_url": "https://images.example.com/d.jpg"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
        {"type": "image", "source": {"type": "url", "url": "https://images.example.com/e.jpg"}},
    )
    result = chat.invoke([msg])
    urls = [i["image_url"] for i in last_payload(emu)["images"]]
    assert len(urls) == 10 and "10 images" in result.content
    remote = [u for u in urls if u.startswith("https://")]
    assert remote == [
        URL_A,
        URL_B,
        "https://images.example.com/c.jpg",
        "https://images.example.com/d.jpg",
        "https://images.example.com/e.jpg",
    ]
    inline = [u for u in urls if u.startswith("data:")]
    assert len(inline) == 5
    for uri in inline:  # each inline image arrives as a decodable PNG data URI of our picture
        assert base64.b64decode(uri.split(",", 1)[1]) == png_bytes
    assert [u.startswith("https://") for u in urls] == [True, False, False, True, False, True, False, True, False, True]


def test_multi_turn_conversation_keeps_each_image_in_its_turn(chat, emu, b64):
    messages = [
        SystemMessage("Answer in one word."),
        looks_at("first", {"type": "image", "url": URL_A}),
        AIMessage("red"),
        looks_at({"type": "image", "base64": b64, "mime_type": "image/png"}, "and this one?"),
    ]
    chat.invoke(messages)
    payload = last_payload(emu)
    assert payload["prompt"] == "Answer in one word.\n\nfirst <image></s>ASSISTANT: red</s>USER: <image> and this one?"
    assert payload["images"][0]["image_url"] == URL_A
    assert payload["images"][1]["image_url"].startswith("data:image/png")


def test_tool_message_observation_with_image(chat, emu, b64):
    messages = [
        looks_at("zoom in", {"type": "image", "url": URL_A}),
        AIMessage("", tool_calls=[{"name": "zoom", "args": {"x": 1}, "id": "c1", "type": "tool_call"}]),
        ToolMessage(
            content=[{"type": "image", "base64": b64, "mime_type": "image/png"}], tool_call_id="c1", name="zoom"
        ),
    ]
    chat.invoke(messages)
    prompt = last_payload(emu)["prompt"]
    assert (
        'ASSISTANT: {"name":"zoom","arguments":{"x":1}}</s>USER: Tool result (tool "zoom", id c1):\n<image>' in prompt
    )
    assert len(last_payload(emu)["images"]) == 2


def test_generation_parameters_and_merged_stop(emu, b64):
    emu.script(["alpha STOP1 beta STOP2 gamma", "one two three four five"])
    chat = ChatMantis(stop=["STOP2"], temperature=0.2, max_tokens=50)
    msg = looks_at("go", {"type": "image", "url": URL_A})
    result = chat.invoke([msg], stop=["STOP1"], top_p=0.9, seed=7)
    assert result.content == "alpha "  # cut at the earliest of both stop lists
    assert result.response_metadata["finish_reason"] == "stop"
    payload = last_payload(emu)
    assert {k: payload[k] for k in ("temperature", "max_tokens", "top_p", "seed")} == {
        "temperature": 0.2,
        "max_tokens": 50,
        "top_p": 0.9,
        "seed": 7,
    }
    result = chat.invoke([msg], max_tokens=2)  # per-call value wins
    assert last_payload(emu)["max_tokens"] == 2 and result.content == "one two"
    with pytest.raises(InvalidRequestError, match=r"unsupported call arguments for ChatMantis: \['max_new_tokens'\]"):
        chat.invoke([msg], max_new_tokens=3)
    with pytest.raises(InvalidRequestError, match="temperature=5"):
        chat.invoke([msg], temperature=5)
    with pytest.raises(InvalidRequestError, match="per-call model override"):
        chat.invoke([msg], model="fal-ai/other")
    assert len(emu.submissions) == 2  # the bad calls never reached fal


def test_call_time_stop_string_is_one_sequence(emu):
    emu.script(["Done? Now the END, no more"])
    chat = ChatMantis()
    msg = looks_at("go", {"type": "image", "url": URL_A})
    assert chat._get_ls_params(stop="END")["ls_stop"] == ["END"]  # not ["E", "N", "D"]
    assert chat.invoke([msg], stop="END").content == "Done? Now the "
    chat.close()


# ------------------------------------------------------------------ async and streaming


async def test_async_invoke_and_stream(chat, emu):
    msg = looks_at("what?", {"type": "image", "url": URL_A})
    result = await chat.ainvoke([msg])
    assert result.content == expected_output(last_payload(emu))
    chunks = [c async for c in chat.astream([msg])]
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert chunks[-1].chunk_position == "last"
    full = sum(chunks[1:], chunks[0])
    assert full.content == result.content
    assert full.response_metadata["model_name"] == "fal-ai/mantis-llava-7b-v11"


def test_async_paths_do_not_block_the_event_loop(emu, loop_ticker):
    emu.service_time = 0.3
    chat = ChatMantis()
    msg = looks_at("slow", {"type": "image", "url": URL_A})

    async def main() -> int:
        async with loop_ticker(0.01) as ticker:
            await chat.ainvoke([msg])
            async for _ in chat.astream([msg]):
                pass
        return ticker.ticks

    try:
        assert asyncio.run(main()) > 10  # ~0.6 s of generation: ~60 ticks if the loop kept running
    finally:
        emu.service_time = 0.01


def test_token_streaming_fires_each_token_once(emu):
    chat = ChatMantis(backend_options={"mode": "stream"})
    emu.script(["one two three four five six seven eight nine ten"])
    rec = Recorder()
    chunks = list(chat.stream([looks_at("count", {"type": "image", "url": URL_A})], config={"callbacks": [rec]}))
    texts = [c.content for c in chunks]
    assert len([t for t in texts if t]) >= 3  # really streamed, in pieces
    assert "".join(texts) == "one two three four five six seven eight nine ten"
    assert rec.tokens == texts  # one on_llm_new_token per chunk: never doubled
    assert [c.chunk_position for c in chunks].count("last") == 1 and chunks[-1].chunk_position == "last"
    # model_name / finish_reason / request_id only on the last chunk (chunk addition concatenates strings)
    assert all(not c.response_metadata for c in chunks[:-1])
    full = sum(chunks[1:], chunks[0])
    assert full.response_metadata["model_name"] == "fal-ai/mantis-llava-7b-v11"


def test_invoke_with_streaming_true_goes_through_the_stream(emu):
    chat = ChatMantis(streaming=True, backend_options={"mode": "stream"})
    emu.script(["a b c d e f g h i"])
    rec = Recorder()
    result = chat.invoke([looks_at("x", {"type": "image", "url": URL_A})], config={"callbacks": [rec]})
    assert result.content == "a b c d e f g h i"
    assert len(rec.tokens) >= 3 and "".join(rec.tokens) == result.content
    assert emu.submissions[-1].mode == "stream"


def test_queue_updates_reach_callbacks(emu):
    chat = ChatMantis(backend_options={"with_logs": True})
    rec = Recorder()
    result = chat.invoke([looks_at("x", {"type": "image", "url": URL_A})], config={"callbacks": [rec]})
    updates = [data for name, data in rec.events if name == QUEUE_UPDATE_EVENT]
    assert updates, rec.events
    assert {u["request_id"] for u in updates} == {result.response_metadata["request_id"]}
    assert updates[-1]["status"] == "COMPLETED"
    assert set(updates[0]) == {"status", "request_id", "queue_position", "logs", "metrics"}
    assert any(u["logs"] for u in updates)  # fal's log lines (with_logs) are passed on


async def test_queue_updates_async_in_order_with_queue_position(emu):
    """ainvoke: events dispatched in order from the async path, attributed to the model's run;
    astream: LangChain passes _astream no run manager, so the on_update field gets them."""
    from langchain_core.callbacks import AsyncCallbackHandler

    class AsyncRecorder(AsyncCallbackHandler):
        def __init__(self) -> None:
            self.events: list[tuple[str, dict, Any]] = []
            self.run_id = None

        async def on_chat_model_start(self, serialized, messages, *, run_id, **kwargs) -> None:
            self.run_id = run_id

        async def on_custom_event(self, name, data, *, run_id, **kwargs) -> None:
            await asyncio.sleep(0)  # a handler that awaits must not reorder the events
            self.events.append((name, data, run_id))

    emu.concurrency, emu.service_time = 1, 0.15
    chat = ChatMantis()
    msg = looks_at("x", {"type": "image", "url": URL_A})
    rec = AsyncRecorder()
    seen = []
    try:
        blocker = asyncio.create_task(chat.ainvoke([msg]))  # occupies the only worker
        while not emu.submissions:
            await asyncio.sleep(0.005)
        result = await chat.ainvoke([msg], config={"callbacks": [rec]})
        await blocker
        streamer = ChatMantis(on_update=seen.append, backend_options={"mode": "queue"})  # a queue stream
        async for _ in streamer.astream([msg]):
            pass
    finally:
        emu.concurrency, emu.service_time = None, 0.01
    assert {name for name, _, _ in rec.events} == {QUEUE_UPDATE_EVENT}
    assert {run_id for _, _, run_id in rec.events} == {rec.run_id}
    statuses = [data["status"] for _, data, _ in rec.events]
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED"
    assert statuses.index("IN_PROGRESS") > 0
    assert rec.events[0][1]["queue_position"] is not None
    assert {data["request_id"] for _, data, _ in rec.events} == {result.response_metadata["request_id"]}
    assert [u.status for u in seen][-1] == "COMPLETED"


def test_queue_updates_on_the_v3_stream_events_path(emu):
    """stream_events(version="v3") hands _stream its run manager: updates become events."""
    rec = Recorder()
    chat = ChatMantis(backend_options={"mode": "queue"})  # streaming on the queue (the default streams tokens)
    stream = chat.stream_events(
        [looks_at("x", {"type": "image", "url": URL_A})], version="v3", config={"callbacks": [rec]}
    )
    for _ in stream:
        pass
    assert [data["status"] for name, data in rec.events if name == QUEUE_UPDATE_EVENT][-1] == "COMPLETED"
    assert stream.output.text == expected_output(last_payload(emu))


# ------------------------------------------------------------------ batches


def test_batch_and_abatch_run_concurrently(emu):
    emu.service_time = 0.3
    chat = ChatMantis()
    inputs = [[looks_at(f"q{i}", {"type": "image", "url": URL_A})] for i in range(4)]
    try:
        t0 = time.perf_counter()
        results = chat.batch(inputs)
        sync_elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        aresults = asyncio.run(chat.abatch(inputs))
        async_elapsed = time.perf_counter() - t0
    finally:
        emu.service_time = 0.01
    assert [r.content.split("; ")[-1] for r in results] == ["q0 <image>", "q1 <image>", "q2 <image>", "q3 <image>"]
    assert [r.content for r in aresults] == [r.content for r in results]
    assert sync_elapsed < 0.9 and async_elapsed < 0.9  # 4 x 0.3 s would be 1.2 s in series
    assert len(emu.submissions) == 8


# ------------------------------------------------------------------ errors


def test_unsupported_block_fails_before_any_request(chat, emu):
    rec = Recorder()
    with pytest.raises(InvalidRequestError, match="message 1, block 2: audio blocks are not supported by Mantis"):
        chat.invoke(
            [looks_at("listen", {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"})],
            config={"callbacks": [rec]},
        )
    assert emu.requests == []
    assert len(rec.errors) == 1 and isinstance(rec.errors[0], InvalidRequestError)


def test_bad_key_is_an_authentication_error_without_the_key(emu):
    chat = ChatMantis(api_key="wrong-secret-key")
    with pytest.raises(AuthenticationError) as info:
        chat.invoke([looks_at("x", {"type": "image", "url": URL_A})])
    assert info.value.status_code == 401
    assert "wrong-secret-key" not in str(info.value) and "wrong-secret-key" not in repr(info.value)


def test_fal_422_is_an_invalid_request_error(chat, emu):
    # fal's Mantis endpoint (and the emulator, like it) wants at least one image; sent as is
    # (text_only="as_is"), its 422 comes back typed (by default a blank placeholder is added)
    with pytest.raises(InvalidRequestError) as info:
        ChatMantis(backend_options={"text_only": "as_is"}).invoke("Hello")
    assert info.value.status_code == 422 and "images" in str(info.value)
    emu.script([JobError(422, "image could not be decoded", "image_load_error")])
    with pytest.raises(InvalidRequestError, match="image could not be decoded"):
        chat.invoke([looks_at("x", {"type": "image", "url": URL_A})])


async def test_unknown_endpoint_is_endpoint_not_found(emu):
    chat = ChatMantis(model="fal-ai/retired-model")
    with pytest.raises(EndpointNotFoundError):
        await chat.ainvoke([looks_at("x", {"type": "image", "url": URL_A})])


def test_bad_image_data_is_an_image_error_naming_message_and_block(chat, emu):
    not_png = base64.b64encode(b"definitely not an image").decode()
    with pytest.raises(ImageError, match="image 1 of message 2"):
        chat.invoke([SystemMessage("s"), looks_at("x", {"type": "image", "base64": not_png, "mime_type": "image/png"})])
    assert emu.submissions == []


def test_bind_tools_keeps_openai_dicts_and_checks_the_choice():
    @tool
    def zoom(factor: int) -> str:
        """Zoom in."""
        return "ok"

    bound = ChatMantis(api_key="k").bind_tools([zoom], tool_choice="any")
    assert bound.kwargs["tools"][0]["function"]["name"] == "zoom"  # what LangGraph reads
    assert bound.kwargs["tool_choice"] == "required"
    with pytest.raises(ValueError, match="zom"):
        ChatMantis(api_key="k").bind_tools([zoom], tool_choice="zom")


# ------------------------------------------------------------------ LCEL


def test_lcel_chain_with_image_prompt_template(chat, emu):
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You describe pictures."),
            ("human", [{"type": "text", "text": "{question}"}, {"type": "image_url", "image_url": {"url": "{image}"}}]),
        ]
    )
    chain = prompt | chat | StrOutputParser()
    answer = chain.invoke({"question": "What is it?", "image": URL_B})
    payload = last_payload(emu)
    assert answer == expected_output(payload)
    assert payload["prompt"] == "You describe pictures.\n\nWhat is it? <image>"
    assert payload["images"] == [{"image_url": URL_B}]
    streamed = "".join(chain.stream({"question": "What is it?", "image": URL_B}))
    assert streamed == answer


# ------------------------------------------------------------------ structured output


class Caption(BaseModel):
    """A picture's caption."""

    subject: str = Field(description="the main subject")
    colours: list[str] = Field(description="dominant colours")


class CaptionDict(TypedDict):
    subject: str
    colours: list[str]


CAPTION_JSON = '{"subject": "a square", "colours": ["red", "white"]}'


def test_structured_output_pydantic(chat, emu):
    emu.script([CAPTION_JSON, "```json\n" + CAPTION_JSON + "\n```"])
    structured = chat.with_structured_output(Caption)
    msg = looks_at("Caption this.", {"type": "image", "url": URL_A})
    assert structured.invoke([msg]) == Caption(subject="a square", colours=["red", "white"])
    prompt = last_payload(emu)["prompt"]
    # the instruction leads (the system slot), the user turn ends with a reminder
    assert prompt.startswith("Reply with only a JSON value that matches this JSON schema, and nothing else:\n")
    assert prompt.endswith("Caption this. <image>\n\n(Reply with only the JSON.)")
    schema = json.loads(prompt.split("nothing else:\n", 1)[1].split("\n\n", 1)[0])
    assert schema["properties"].keys() == {"subject", "colours"}
    assert structured.invoke([msg]).colours == ["red", "white"]  # code fences are tolerated


def test_structured_output_typeddict_json_mode_and_streaming(chat, emu):
    emu.script([CAPTION_JSON, CAPTION_JSON, CAPTION_JSON])
    msg = looks_at("Caption this.", {"type": "image", "url": URL_A})
    assert chat.with_structured_output(CaptionDict, method="function_calling").invoke([msg]) == json.loads(CAPTION_JSON)
    json_mode = chat.with_structured_output(method="json_mode")
    assert json_mode.invoke([msg]) == json.loads(CAPTION_JSON)
    prompt = last_payload(emu)["prompt"]
    assert prompt.startswith("Reply with only a JSON object, and nothing else.") and "schema" not in prompt
    chunks = list(chat.with_structured_output(Caption).stream([msg]))
    assert chunks and chunks[-1] == Caption(subject="a square", colours=["red", "white"])


def test_structured_output_bad_json(chat, emu):
    # each call gets two repair turns (the bad answer and what was wrong fed back), then gives up
    emu.script(["Sorry, I cannot see a caption.", "still no json", "no"] + ["x", "y", "still no json"])
    msg = looks_at("Caption this.", {"type": "image", "url": URL_A})
    with pytest.raises(OutputParserException):
        chat.with_structured_output(Caption).invoke([msg])
    assert len(emu.submissions) == 3
    assert "still no json" in emu.submissions[2].payload["prompt"]  # the bad answer, fed back
    raw = chat.with_structured_output(Caption, include_raw=True).invoke([msg])
    assert raw["parsed"] is None and isinstance(raw["parsing_error"], OutputParserException)
    assert isinstance(raw["raw"], AIMessage) and raw["raw"].content == "still no json"
    assert raw["raw"].response_metadata["metrics"]["tool_attempts"] == 3


def test_structured_output_argument_errors():
    chat = ChatMantis(api_key="k")
    with pytest.raises(ValueError, match="schema is required"):
        chat.with_structured_output(None)
    with pytest.raises(ValueError, match="method must be"):
        chat.with_structured_output(Caption, method="xml")
    with pytest.raises(InvalidRequestError, match="response_format must be"):
        chat.invoke("x", response_format={"type": "yaml"})


# ------------------------------------------------------------------ configuration, secrets


@pytest.mark.filterwarnings("ignore:The function `load` is in beta")
def test_key_never_in_repr_serialization(emu, monkeypatch):
    chat = ChatMantis(api_key="sk-very-secret")
    texts = [repr(chat), str(chat), dumps(chat), json.dumps(dumpd(chat)), chat.model_dump_json(), str(chat.asdict())]
    for text in texts:
        assert "sk-very-secret" not in text
    assert dumpd(chat)["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["FAL_KEY"]}
    monkeypatch.setenv("FAL_KEY", "from-env")
    # a third-party class must be allowed explicitly (allowed_objects="all" means langchain's own)
    restored = load(dumpd(chat), valid_namespaces=["mantis_llm"], secrets_from_env=True, allowed_objects=[ChatMantis])
    assert isinstance(restored, ChatMantis) and restored.api_key.get_secret_value() == "from-env"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 5}, "temperature: Input should be less than or equal to 2"),
        ({"top_p": 0, "max_tokens": "many"}, "max_tokens: Input should be a valid integer, unable to "
         "parse string as an integer; top_p: Input should be greater than 0"),
        ({"stop": ["ok", 3]}, "stop[1]: Input should be a valid string"),
        ({"backend": "gpu"}, "backend: Input should be 'fal', 'local' or 'openai', or a Backend instance, not 'gpu'"),
        ({"model_name": 7}, "model_name: Input should be a valid string"),
        ({"timeout": 0, "max_retries": -1}, "timeout: Input should be greater than 0; "
         "max_retries: Input should be greater than or equal to 0"),
        ({"stop": [""]}, "stop=('',) is invalid: every stop sequence must be a non-empty string"),
        ({"backend_options": {"api_key": "k"}}, "backend_options may not set ['api_key']"),
        ({"temprature": 0.2}, "temprature: Extra inputs are not permitted"),  # misspelt, not ignored
    ],
)  # fmt: skip
def test_constructor_errors_are_configuration_errors_naming_each_field(kwargs, message):
    with pytest.raises(ConfigurationError) as info:
        ChatMantis(**kwargs)
    assert str(info.value).startswith(f"ChatMantis: {message}")
    err = info.value  # and no pydantic traceback shown under it
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)


def test_constructor_error_never_shows_the_key():
    with pytest.raises(ConfigurationError) as info:
        ChatMantis(api_key=["sk-very-secret"])
    assert str(info.value) == "ChatMantis: api_key: Input should be a valid string"
    assert "sk-very-secret" not in repr(info.value.detail)
    assert info.value.detail == [{"loc": ("api_key",), "msg": "Input should be a valid string", "type": "string_type"}]


def test_copies_bindings_and_configurable_fields_still_work(emu):
    chat = ChatMantis(temperature=0.5)
    msg = [looks_at("x", {"type": "image", "url": URL_A})]
    assert chat.model_copy(update={"temperature": 0.1}).temperature == 0.1
    chat.bind(max_tokens=3).with_config(tags=["t"]).invoke(msg)
    assert (last_payload(emu)["temperature"], last_payload(emu)["max_tokens"]) == (0.5, 3)
    configurable = chat.configurable_fields(temperature=ConfigurableField(id="temp"))
    configurable.with_config(configurable={"temp": 0.2}).invoke(msg)  # builds a new ChatMantis
    assert last_payload(emu)["temperature"] == 0.2
    with pytest.raises(ConfigurationError, match="ChatMantis: temperature: Input should be less than or equal to 2"):
        configurable.with_config(configurable={"temp": 9}).invoke(msg)
    assert len(emu.submissions) == 2
    chat.close()


def test_key_aliases_and_environment(monkeypatch):
    monkeypatch.setenv("FAL_KEY", "env-key")
    assert ChatMantis().api_key.get_secret_value() == "env-key"
    assert ChatMantis(fal_key="alias-key").api_key.get_secret_value() == "alias-key"
    assert ChatMantis(model_name="owner/app").model == "owner/app"
    monkeypatch.delenv("FAL_KEY")
    assert ChatMantis().api_key is None  # FAL_KEY_ID/FAL_KEY_SECRET are left to the backend


def test_empty_key_falls_back_to_the_environment(monkeypatch):
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.setenv("FAL_KEY_ID", "kid")
    monkeypatch.setenv("FAL_KEY_SECRET", "ksecret")
    chat = ChatMantis(api_key="")
    assert chat.get_backend().api_key.get_secret_value() == "kid:ksecret"
    chat.close()


def test_backend_is_built_once_reused_and_not_copied(chat, emu):
    msg = [looks_at("x", {"type": "image", "url": URL_A})]
    assert chat._get_ls_params()["ls_provider"] == "fal" and chat._slot.backend is None  # nothing built yet
    chat.invoke(msg)
    backend = chat.get_backend()
    chat.invoke(msg)
    assert chat.get_backend() is backend and isinstance(backend, FalBackend)
    clone = pickle.loads(pickle.dumps(chat))  # the built backend (connections) is not pickled
    deep = copy.deepcopy(chat)
    assert clone._slot.backend is None and deep._slot.backend is None
    assert clone.invoke(msg).content == chat.invoke(msg).content
    assert clone.get_backend() is not backend
    chat.close()
    assert chat._slot.backend is None
    clone.close()


def test_backend_instance_is_used_as_given(emu):
    backend = FalBackend(endpoint="fal-ai/mantis-llava-7b-v11", mode="sync")
    chat = ChatMantis(backend=backend)
    assert chat.model == backend.model and chat.get_backend() is backend
    result = chat.invoke([looks_at("x", {"type": "image", "url": URL_A})])
    assert emu.submissions[-1].mode == "sync" and result.content
    chat.close()  # not ours to close
    assert chat.get_backend() is backend
    backend.close()


def test_local_backend_configuration_builds_nothing():
    chat = ChatMantis(backend="local")
    assert chat.model == "TIGER-Lab/Mantis-llava-7b"
    assert chat._get_ls_params(stop=["x"]) == {
        "ls_provider": "transformers",
        "ls_model_type": "chat",
        "ls_model_name": "TIGER-Lab/Mantis-llava-7b",
        "ls_stop": ["x"],
    }
    assert chat._slot.backend is None
    assert chat.profile["image_inputs"] and chat.profile["max_input_tokens"] == 4096
    with pytest.raises(ConfigurationError, match=r"backend_options may not set \['timeout'\]"):
        ChatMantis(backend_options={"timeout": 3})


# ------------------------------------------------------------------ agent-style use


def test_react_style_agent_loop_with_mantis_as_the_vision_step(emu, png_bytes):
    """A LangGraph loop: Mantis looks at the picture, asks for a crop (ReAct text), the crop
    tool answers with an image, Mantis gives the final answer."""
    emu.script(
        [
            "Thought: the corner is too small.\nAction: crop\nAction Input: top-left",
            "Thought: I can see it now.\nFinal Answer: a white diagonal line",
        ]
    )
    chat = ChatMantis()
    crop_b64 = base64.b64encode(png_bytes).decode()
    action = re.compile(r"Action:\s*(\w+)\s*\nAction Input:\s*(.+)")

    def vision(state: MessagesState) -> dict:
        return {"messages": [chat.invoke(state["messages"])]}

    def tool(state: MessagesState) -> dict:
        name, arg = action.search(state["messages"][-1].content).groups()
        assert (name, arg) == ("crop", "top-left")
        return {
            "messages": [
                HumanMessage(
                    content=[
                        f"Observation: the {arg} crop:",
                        {"type": "image", "base64": crop_b64, "mime_type": "image/png"},
                    ]
                )
            ]
        }

    def route(state: MessagesState) -> str:
        return "tool" if action.search(state["messages"][-1].content) else END

    graph = StateGraph(MessagesState)
    graph.add_node("vision", vision)
    graph.add_node("tool", tool)
    graph.add_edge(START, "vision")
    graph.add_conditional_edges("vision", route, ["tool", END])
    graph.add_edge("tool", "vision")
    app = graph.compile()

    question = looks_at(
        "Answer with Thought/Action/Action Input lines, or Final Answer. Tools: crop(region).\n"
        "What is in the top-left corner?",
        {"type": "image", "url": URL_A},
    )
    out = app.invoke({"messages": [SystemMessage("You are a careful visual agent."), question]})
    assert out["messages"][-1].content.endswith("Final Answer: a white diagonal line")
    assert len(emu.submissions) == 2
    second = emu.submissions[1].payload
    assert "ASSISTANT: Thought: the corner is too small." in second["prompt"]
    assert second["prompt"].endswith("USER: Observation: the top-left crop: <image>")
    assert second["images"][0]["image_url"] == URL_A and second["images"][1]["image_url"].startswith("data:image/png")
