"""Mantis and MantisMultiModal against the FalEmulator: every method sync and async, streaming,
every image source, order over several turns, parameters, errors, callbacks, secrets."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import pickle
import time

import pytest
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    TextBlock,
)
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.llms import LLM
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.multi_modal_llms import MultiModalLLM, MultiModalLLMMetadata
from llama_index.core.schema import ImageDocument, ImageNode

from mantis_llm.emulator import JobError, expected_output
from mantis_llm.errors import AuthenticationError, ConfigurationError, ImageError, InvalidRequestError, MantisError
from mantis_llm.llama_index import Mantis, MantisMultiModal, MantisUpdateEvent
from mantis_llm.types import Update

CLASSES = [Mantis, MantisMultiModal]


@pytest.fixture(params=CLASSES, ids=lambda c: c.__name__)
def model(request, emu):
    m = request.param()
    yield m
    m.close()


def user(*blocks) -> ChatMessage:
    return ChatMessage(role="user", blocks=[TextBlock(text=b) if isinstance(b, str) else b for b in blocks])


# ------------------------------------------------------------------ class shape


def test_mro_class_name_and_metadata():
    assert {BaseLLM, LLM, FunctionCallingLLM} <= set(Mantis.__mro__)
    assert MultiModalLLM in MantisMultiModal.__mro__ and LLM not in MantisMultiModal.__mro__
    assert "multi" in Mantis.class_name() and "multi" in MantisMultiModal.class_name()
    assert Mantis.class_name() != MantisMultiModal.class_name()
    meta = Mantis(max_tokens=99).metadata
    assert (meta.model_name, meta.context_window, meta.num_output) == ("fal-ai/mantis-llava-7b-v11", 4096, 99)
    assert meta.is_chat_model and meta.is_function_calling_model  # tools in the prompt
    mmeta = MantisMultiModal(model="me/app", context_window=8192).metadata
    assert isinstance(mmeta, MultiModalLLMMetadata)
    assert (mmeta.model_name, mmeta.context_window, mmeta.num_output) == ("me/app", 8192, 256)
    assert mmeta.num_input_files == (8192 - 256) // 576 and mmeta.is_chat_model


def test_model_name_follows_the_backend(emu):
    from mantis_llm.backends import DEFAULT_LOCAL_MODEL
    from mantis_llm.backends.fal import FalBackend

    assert Mantis(backend="local").metadata.model_name == DEFAULT_LOCAL_MODEL  # nothing loaded
    assert MantisMultiModal(backend="local", model="/models/m").metadata.model_name == "/models/m"
    with FalBackend("me/other-app") as backend:
        assert Mantis(backend=backend).metadata.model_name == "me/other-app"


def test_import_pulls_no_torch():
    import subprocess
    import sys

    code = "import sys, mantis_llm.llama_index; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 5}, "temperature: Input should be less than or equal to 2"),
        ({"top_p": 0, "max_tokens": "many"}, "max_tokens: Input should be a valid integer, unable to "
         "parse string as an integer; top_p: Input should be greater than 0"),
        ({"stop": ["ok", 3]}, "stop[1]: Input should be a valid string"),
        ({"timeout": -1, "context_window": 0}, "timeout: Input should be greater than 0; "
         "context_window: Input should be greater than or equal to 1"),
        ({"stop": [""]}, "stop=('',) is invalid: every stop sequence must be a non-empty string"),
        ({"backend": "gpu"}, "backend: Input should be 'fal', 'local' or 'openai', or a Backend instance, not 'gpu'"),
        ({"temprature": 0.2}, "temprature: Extra inputs are not permitted"),  # misspelt, not ignored
        ({"api_key": ["sk-very-secret"]}, "api_key: Input should be a valid string"),
    ],
)  # fmt: skip
def test_constructor_errors_are_configuration_errors_naming_each_field(cls, kwargs, message):
    with pytest.raises(ConfigurationError) as info:
        cls(**kwargs)
    err = info.value
    assert str(err).startswith(f"{cls.__name__}: {message}")
    assert "sk-very-secret" not in str(err) + repr(err.detail)
    assert err.__cause__ is None and (err.__suppress_context__ or err.__context__ is None)  # no pydantic traceback


def test_dict_round_trip_and_copies_still_validate(emu):
    m = MantisMultiModal(temperature=0.3, stop="END", max_retries=0)
    again = MantisMultiModal.from_dict(m.to_dict())
    assert (again.temperature, again.stop, again.max_retries) == (0.3, ["END"], 0)
    assert m.model_copy(update={"temperature": 0.1}).temperature == 0.1
    with pytest.raises(
        ConfigurationError, match="MantisMultiModal: temperature: Input should be less than or equal to 2"
    ):
        MantisMultiModal.from_dict({**m.to_dict(), "temperature": 3})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_complete_with_a_non_string_prompt_is_an_invalid_request(cls, emu):
    with pytest.raises(InvalidRequestError, match="prompt must be a str, not int"):
        cls().complete(5)
    assert emu.submissions == []


def test_missing_key_is_a_configuration_error(emu, monkeypatch, png_bytes):
    monkeypatch.delenv("FAL_KEY")
    with pytest.raises(ConfigurationError, match="FAL_KEY"):
        Mantis().chat([user(ImageBlock(image=png_bytes), "hi")])


def test_api_key_is_never_serialized(emu, monkeypatch, png_bytes):
    secret = emu.key  # the one key that works: we check it is used, and shown nowhere
    monkeypatch.setenv("FAL_KEY", "wrong-id:wrong-secret")
    for cls in CLASSES:
        m = cls(api_key=secret, temperature=0.2)
        shown = [
            repr(m),
            str(m),
            m.to_json(),
            json.dumps(m.to_dict()),
            m.model_dump_json(),
            str(m.model_dump()),
            json.dumps(m.to_payload()),
        ]
        for text in shown:
            assert secret not in text and "emulator-key" not in text
        assert m.to_dict()["temperature"] == 0.2 and "api_key" not in m.to_dict()
        assert "mantis" in m.to_dict()["class_name"]
        m.chat([user(ImageBlock(image=png_bytes), "hi")])  # the explicit key wins over FAL_KEY
        m.close()
    assert emu.requests[-1].headers["authorization"] == f"Key {secret}"


def test_backend_instance_serializes_as_its_name(emu):
    from mantis_llm.backends.fal import FalBackend

    backend = FalBackend()
    m = Mantis(backend=backend)
    assert m.to_dict()["backend"] == "fal"
    m.close()  # a backend passed in is left open for its owner
    assert m.get_backend() is backend
    backend.close()


# ------------------------------------------------------------------ every method


async def test_chat_and_achat(model, received, images):
    msgs = [user("compare", ImageBlock(path=images["red"]), "with", ImageBlock(path=images["blue"]))]
    for i in range(2):
        r = model.chat(msgs) if i == 0 else await model.achat(msgs)
        assert isinstance(r, ChatResponse)
        assert r.message.role == "assistant"
        assert r.message.content == expected_output(received.payload())
        assert r.message.content.startswith("[mantis-emulator] 2 images")
        sub = received.emu.submissions[-1]
        assert r.raw["request_id"] == r.additional_kwargs["request_id"] == sub.request_id
        assert r.raw["model"] == "fal-ai/mantis-llava-7b-v11"
        assert r.raw["metrics"]["mode"] == "queue"
        assert "usage" not in r.raw  # fal reports no token counts: TokenCountingHandler estimates
    assert len(received.emu.submissions) == 2
    assert received.sizes(0) == received.sizes(1) == [(64, 48), (80, 60)]
    assert received.prompt(0) == received.prompt(1) == "compare <image> with <image>"


async def test_complete_and_acomplete_with_image_documents(model, received, images):
    docs = [
        ImageDocument(image_path=str(images["green"])),
        ImageNode(image_path=str(images["red"])),
        ImageBlock(path=images["blue"]),
    ]
    for i in range(2):
        if i == 0:
            r = model.complete("what changed?", docs)  # positional, the legacy way
        else:
            r = await model.acomplete("what changed?", image_documents=docs, formatted=True)
        assert isinstance(r, CompletionResponse)
        assert r.text == expected_output(received.payload()) and "3 images" in r.text
        assert r.additional_kwargs["request_id"] == r.raw["request_id"]
    for i in (0, 1):
        assert received.sizes(i) == [(50, 70), (64, 48), (80, 60)]
        assert received.prompt(i) == "<image> <image> <image> what changed?"


async def test_text_only_complete_reaches_fal_and_its_422(model, received):
    # sent as is (text_only="as_is"; by default a blank placeholder image is added), the
    # endpoint's 422 comes back typed. A bool in the image_documents slot is a positional
    # ``formatted``, not an image list.
    model = type(model)(backend_options={"text_only": "as_is"})
    with pytest.raises(InvalidRequestError) as exc:
        model.complete("no picture", True)
    assert exc.value.status_code == 422 and "images" in str(exc.value)
    assert received.payload()["images"] == [] and received.prompt() == "no picture"
    with pytest.raises(InvalidRequestError):
        await model.acomplete("no picture")


@pytest.mark.parametrize("mode", ["queue", "stream"])
async def test_streaming_all_four(emu, received, images, mode):
    answer = "one two three four five six seven eight nine ten eleven twelve thirteen"
    emu.script([answer] * 8)
    msgs = [user(ImageBlock(path=images["red"]), "describe")]
    for cls in CLASSES:
        m = cls(backend_options={"mode": mode})
        runs = [
            list(m.stream_chat(msgs)),
            list(m.stream_complete("describe", [ImageBlock(path=images["red"])])),
            [r async for r in await m.astream_chat(msgs)],
            [r async for r in await m.astream_complete("describe", [ImageBlock(path=images["red"])])],
        ]
        for chunks in runs:
            texts = [c.message.content if isinstance(c, ChatResponse) else c.text for c in chunks]
            assert "".join(c.delta for c in chunks) == texts[-1] == answer
            assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative
            assert chunks[-1].raw["request_id"] and chunks[-1].additional_kwargs["request_id"]
            assert all(c.raw is None for c in chunks[:-1])
            if mode == "stream":
                assert len(chunks) > 2  # real deltas from fal's SSE endpoint
            else:
                assert len(chunks) == 1  # the queue has no token stream
        m.close()
    assert len(emu.submissions) == 8
    assert {s.mode for s in emu.submissions} == {mode}


def test_stream_errors_are_raised_at_the_call(model, emu):
    with pytest.raises(InvalidRequestError, match="AudioBlock"):
        model.stream_chat([user("hi", AudioBlock(audio=b"RIFF0000WAVE", format="wav"))])
    assert emu.requests == []


# ------------------------------------------------------------------ image sources and order


def test_every_image_source_reaches_fal(llm, received, images, image_bytes, tmp_path):
    png = image_bytes("yellow")
    b64 = base64.b64encode(png)
    url = received.upload(png, "yellow.png")
    cases = {
        "http url": ImageBlock(url=url),
        "data uri": ImageBlock(url="data:image/png;base64," + b64.decode()),
        "path": ImageBlock(path=images["yellow"]),
        "raw bytes": ImageBlock(image=png),
        "base64 bytes": ImageBlock(image=b64, image_mimetype="image/png"),
        "file object": ImageBlock(image=io.BytesIO(png)),
        "jpeg bytes": ImageBlock(image=image_bytes("yellow", "JPEG")),
        "ImageDocument url": ImageDocument(image_url=url),  # core validates it by downloading
        "ImageDocument path": ImageDocument(image_path=str(images["yellow"])),
        "ImageDocument base64": ImageDocument(image=b64.decode()),
        "ImageNode base64": ImageNode(image=b64.decode()),
    }
    for name, source in cases.items():
        if isinstance(source, ImageBlock):
            r = llm.chat([user(source, "what colour?")])
        else:
            r = llm.complete("what colour?", [source])
        sent = received.payload()["images"]
        assert len(sent) == 1 and "1 image;" in (r.message.content if hasattr(r, "message") else r.text), name
        assert received.sizes() == [(72, 40)], name
        if "url" in name:
            assert sent[0]["image_url"] == url, name  # passed through, not downloaded and re-encoded
        else:
            assert sent[0]["image_url"].startswith("data:image/"), name
    assert len(received.emu.submissions) == len(cases)


async def test_images_in_several_turns_keep_their_order(model, received, images, image_bytes):
    url = received.upload(image_bytes("yellow"), "y.png")
    msgs = [
        ChatMessage(role="system", content="You compare pictures."),
        user("first", ImageBlock(path=images["red"]), "then", ImageBlock(image=image_bytes("blue"))),
        ChatMessage(role="assistant", content="red, then blue"),
        user(ImageBlock(path=images["green"]), "and", ImageBlock(url=url), "now?"),
    ]
    await model.achat(msgs)
    assert received.sizes() == [(64, 48), (80, 60), (50, 70), (72, 40)]
    assert received.payload()["images"][3]["image_url"] == url
    assert received.prompt() == (
        "You compare pictures.\n\nfirst <image> then <image></s>ASSISTANT: red, then blue</s>"
        "USER: <image> and <image> now?"
    )


# ------------------------------------------------------------------ parameters


def test_parameters_reach_fal_and_call_time_overrides_win(emu, received, png_bytes):
    m = Mantis(max_tokens=50, temperature=0.5, top_p=0.9, seed=7)
    msgs = [user(ImageBlock(image=png_bytes), "hi")]
    m.chat(msgs)
    p = received.payload()
    assert (p["max_tokens"], p["temperature"], p["top_p"], p["seed"]) == (50, 0.5, 0.9, 7)
    r = m.chat(msgs, max_tokens=3, temperature=0.0, unrelated_kwarg="ignored")
    p = received.payload()
    assert (p["max_tokens"], p["temperature"], p["top_p"]) == (3, 0.0, 0.9)
    assert len(r.message.content.split()) == 3  # the emulator honours max_tokens
    with pytest.raises(InvalidRequestError, match="top_p"):
        m.chat(msgs, top_p=7)
    assert len(emu.submissions) == 2
    m.close()


async def test_stop_sequences_cut_the_answer(emu, png_bytes):
    emu.script(["alpha beta STOP gamma", "alpha beta STOP gamma"])
    m = MantisMultiModal(stop="STOP")
    r = m.complete("go", [ImageBlock(image=png_bytes)])
    assert r.text.rstrip() == "alpha beta" and r.additional_kwargs["finish_reason"] == "stop"
    r = await Mantis().achat([user(ImageBlock(image=png_bytes), "go")], stop=["gamma"])
    assert r.message.content.rstrip() == "alpha beta STOP"


# ------------------------------------------------------------------ errors


async def test_bad_key_is_an_authentication_error(emu, png_bytes):
    for cls in CLASSES:
        m = cls(api_key="nobody:nothing")
        with pytest.raises(AuthenticationError) as exc:
            m.chat([user(ImageBlock(image=png_bytes), "hi")])
        assert exc.value.status_code == 401 and "nobody" not in str(exc.value)
        with pytest.raises(AuthenticationError):
            await m.acomplete("hi", [ImageBlock(image=png_bytes)])
    assert emu.submissions == []


def test_api_key_reaches_the_backend_and_an_empty_one_is_refused(monkeypatch):
    monkeypatch.setenv("FAL_KEY", "env-key")
    for cls in CLASSES:
        m = cls(api_key="given-key")
        assert m.get_backend().api_key.get_secret_value() == "given-key"
        m.close()
        with pytest.raises(ConfigurationError, match="api_key is empty"):
            cls(api_key="").get_backend()


def test_unsupported_block_fails_before_any_request(model, emu):
    msgs = [ChatMessage(content="hello"), user("listen", AudioBlock(audio=b"RIFF0000WAVE", format="wav"))]
    with pytest.raises(InvalidRequestError) as exc:
        model.chat(msgs)
    assert "message 2, block 2: AudioBlock is not supported" in str(exc.value)
    assert emu.requests == []


async def test_fal_422_on_an_image_is_an_invalid_request(model, emu, received):
    missing = emu.cdn_url + "/files/nope/missing.png"
    with pytest.raises(InvalidRequestError) as exc:
        await model.achat([user(ImageBlock(url=missing), "hi")])
    assert exc.value.status_code == 422 and exc.value.request_id == emu.submissions[-1].request_id
    assert received.payload()["images"] == [{"image_url": missing}]


def test_bad_local_image_is_labelled(model, emu, png_bytes):
    with pytest.raises(ImageError, match=r"^image 2 of message 1: unsupported image data"):
        model.chat([user(ImageBlock(image=png_bytes), ImageBlock(image=b"not an image at all"), "hi")])
    assert emu.submissions == []


def test_job_failure_is_a_mantis_error(model, emu, png_bytes):
    emu.script([JobError(500, "GPU fell over")])
    with pytest.raises(MantisError, match="GPU fell over"):
        model.complete("hi", [ImageBlock(image=png_bytes)])


# ------------------------------------------------------------------ callbacks, events, async


def test_callbacks_fire_once_per_call(emu, png_bytes):
    for cls in CLASSES:
        debug, tokens = LlamaDebugHandler(), TokenCountingHandler()
        m = cls(callback_manager=CallbackManager([debug, tokens]))
        m.chat([user(ImageBlock(image=png_bytes), "one")])
        m.complete("two", [ImageBlock(image=png_bytes)])
        list(m.stream_chat([user(ImageBlock(image=png_bytes), "three")]))
        assert len(debug.get_event_pairs(CBEventType.LLM)) == 3, cls  # not doubled by MultiModalLLM
        assert len(tokens.llm_token_counts) == 3 and tokens.completion_llm_token_count > 0
        m.close()


def test_progress_updates_reach_events_and_callback(emu, png_bytes):
    seen_events: list[MantisUpdateEvent] = []

    class Handler(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, MantisUpdateEvent):
                seen_events.append(event)

    handler = Handler()
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        updates: list[Update] = []
        m = Mantis(on_update=updates.append)
        r = m.chat([user(ImageBlock(image=png_bytes), "hi")])
    finally:
        root.event_handlers.remove(handler)
    assert updates and updates[-1].status == "COMPLETED"
    assert [e.status for e in seen_events] == [u.status for u in updates]
    assert {e.request_id for e in seen_events} == {r.raw["request_id"]}
    assert "on_update" not in m.to_dict()
    m.close()


async def test_async_calls_run_concurrently_without_blocking_the_loop(emu, png_bytes, loop_ticker):
    emu.service_time = 0.3
    try:
        async with loop_ticker(0.01) as ticker:
            m = Mantis()
            start = time.perf_counter()
            results = await asyncio.gather(
                *(m.achat([user(ImageBlock(image=png_bytes), f"question {i}")]) for i in range(4))
            )
            elapsed = time.perf_counter() - start
    finally:
        emu.service_time = 0.01
    assert len({r.raw["request_id"] for r in results}) == 4
    assert elapsed < 1.0  # four 0.3 s jobs, run one after another, would take 1.2 s
    assert ticker.ticks >= elapsed / 0.01 * 0.5  # the loop kept ticking
    await m.aclose()


def test_pickle_keeps_settings_and_rebuilds_the_backend(emu, png_bytes):
    m = Mantis(max_tokens=5, model="fal-ai/mantis-llava-7b-v11")
    m.chat([user(ImageBlock(image=png_bytes), "hi")])
    clone = pickle.loads(pickle.dumps(m))
    assert clone.max_tokens == 5 and clone._slot.backend is None
    assert clone.chat([user(ImageBlock(image=png_bytes), "hi")]).message.content
    m.close()
    clone.close()


def test_legacy_additional_kwargs_images_are_sent_once_per_call(model, received, images):
    # llama-index-core appends the ImageDocuments of additional_kwargs["images"] to the blocks
    # again whenever the message is validated again (every chat call's start event does)
    msg = ChatMessage(
        role="user", content="describe", additional_kwargs={"images": [ImageDocument(image_path=str(images["red"]))]}
    )
    for _ in range(3):
        model.chat([msg])
        assert len(received.payload()["images"]) == 1
        assert received.sizes() == [(64, 48)]
    assert len(msg.blocks) > 2  # llama-index did pile them up: the guard is what kept the count
