"""Both adapters through ``backend="openai"`` against the real ``transformers serve`` on the
tiny model (tests/openai/conftest.py): invoke, stream, batch, async, images over several
turns, bad input, a stopped server. The greedy answers equal the local backend's on the same
weights. Only the adapters' translation is under test here; the route itself is in
test_openai_backend.py."""

from __future__ import annotations

import base64
import json
import socket

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock

from mantis_llm import Conversation, GenerationParams, Image, Request, Turn, errors
from mantis_llm.langchain import ChatMantis
from mantis_llm.llama_index import Mantis
from mantis_llm.testing import make_image_bytes

RED, BLUE = make_image_bytes(64, 48, (200, 30, 30)), make_image_bytes(40, 56, (30, 30, 200))
B64 = {name: base64.b64encode(data).decode() for name, data in (("red", RED), ("blue", BLUE))}
TOKENS = 6


def lc_image(name: str) -> dict:
    return {"type": "image", "base64": B64[name], "mime_type": "image/png"}


def turns_lc() -> list:
    return [
        HumanMessage(content=["Compare", lc_image("red"), "with", lc_image("blue")]),
        AIMessage("The first is red."),
        HumanMessage(content=[lc_image("blue"), "And this one?"]),
    ]


def turns_neutral() -> Conversation:
    return Conversation(
        [
            Turn("user", ["Compare", Image(RED), "with", Image(BLUE)]),
            Turn("assistant", ["The first is red."]),
            Turn("user", [Image(BLUE), "And this one?"]),
        ]
    )


@pytest.fixture
def chat(transformers_serve, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "fal-secret-that-must-stay-home")  # ChatMantis' api_key default
    model = ChatMantis(backend="openai", base_url=transformers_serve.base_url, max_tokens=TOKENS)
    yield model
    model.close()


def test_langchain_invoke_stream_batch_equal_the_local_backend(chat, source_backend):
    local = source_backend.generate(Request(turns_neutral(), GenerationParams(max_tokens=TOKENS))).text
    answer = chat.invoke(turns_lc())
    assert answer.content == local
    assert answer.response_metadata["model_provider"] == "openai" and answer.usage_metadata["output_tokens"] >= 1
    chunks = list(chat.stream(turns_lc()))
    assert "".join(c.content for c in chunks) == local and chunks[-1].chunk_position == "last"
    assert [m.content for m in chat.batch([turns_lc(), turns_lc()])] == [local, local]
    assert chat.provider == "openai"


async def test_langchain_async(chat, source_backend):
    local = source_backend.generate(Request(turns_neutral(), GenerationParams(max_tokens=TOKENS))).text
    assert (await chat.ainvoke(turns_lc())).content == local
    assert "".join([c.content async for c in chat.astream(turns_lc())]) == local
    assert [m.content for m in await chat.abatch([turns_lc(), turns_lc()])] == [local, local]


def test_the_fal_key_is_not_sent_to_the_server(chat, transformers_serve):
    backend = chat.get_backend()
    assert backend.api_key is None  # FAL_KEY was set, and ChatMantis read it: not passed on
    explicit = ChatMantis(backend="openai", base_url=transformers_serve.base_url, api_key="sk-for-the-server")
    assert explicit.get_backend().api_key.get_secret_value() == "sk-for-the-server"
    explicit.close()


def test_llama_index_chat_complete_stream_equal_the_local_backend(transformers_serve, source_backend):
    local = source_backend.generate(Request(turns_neutral(), GenerationParams(max_tokens=TOKENS))).text
    llm = Mantis(backend="openai", base_url=transformers_serve.base_url, max_tokens=TOKENS)
    try:
        messages = [
            ChatMessage(
                role="user",
                blocks=[
                    TextBlock(text="Compare"),
                    ImageBlock(image=RED),
                    TextBlock(text="with"),
                    ImageBlock(image=BLUE),
                ],
            ),
            ChatMessage(role="assistant", content="The first is red."),
            ChatMessage(role="user", blocks=[ImageBlock(image=BLUE), TextBlock(text="And this one?")]),
        ]
        assert llm.chat(messages).message.content == local
        assert list(llm.stream_chat(messages))[-1].message.content == local
        single = source_backend.generate(
            Request(Conversation.from_prompt("Describe it.", [Image(RED)]), GenerationParams(max_tokens=TOKENS))
        ).text
        assert llm.complete("Describe it.", image_documents=[ImageBlock(image=RED)]).text == single
        assert llm.metadata.model_name == ""  # the server's only model, found when first called
    finally:
        llm.close()


async def test_llama_index_async(transformers_serve, source_backend):
    single = source_backend.generate(
        Request(Conversation.from_prompt("Describe it.", [Image(RED)]), GenerationParams(max_tokens=TOKENS))
    ).text
    llm = Mantis(backend="openai", base_url=transformers_serve.base_url, max_tokens=TOKENS)
    try:
        assert (await llm.acomplete("Describe it.", image_documents=[ImageBlock(image=RED)])).text == single
        stream = await llm.astream_chat(
            [ChatMessage(role="user", blocks=[ImageBlock(image=RED), TextBlock(text="Describe it.")])]
        )
        assert [c async for c in stream][-1].message.content == single
    finally:
        await llm.aclose()


def test_bad_input_is_typed_before_anything_is_sent(chat):
    with pytest.raises(errors.ImageError, match="image 1 of message 1: unsupported image data"):
        chat.invoke(
            [
                HumanMessage(
                    content=[
                        "x",
                        {
                            "type": "image",
                            "base64": base64.b64encode(b"not a picture").decode(),
                            "mime_type": "image/png",
                        },
                    ]
                )
            ]
        )
    with pytest.raises(errors.InvalidRequestError, match="audio"):
        chat.invoke([HumanMessage(content=[{"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])


def test_a_stopped_server_is_a_typed_error(transformers_serve):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gone = ChatMantis(backend="openai", base_url=f"http://127.0.0.1:{port}", max_retries=1, timeout=5)
    with pytest.raises(errors.BackendError):
        gone.invoke([HumanMessage(content=[lc_image("red"), "hi"])])
    gone.close()


def test_the_cli_asks_the_server(transformers_serve, source_backend, image_files, monkeypatch, capsys):
    # `mantis-llm ask --backend openai --base-url URL`: the same answer as the local backend
    from mantis_llm.cli import main

    images = [Image(str(p)) for p in image_files[:2]]
    params = GenerationParams(max_tokens=TOKENS)
    local = source_backend.generate(Request(Conversation.from_prompt("Compare.", images), params)).text
    monkeypatch.delenv("MANTIS_BASE_URL", raising=False)
    argv = ["ask", *map(str, image_files[:2]), "-p", "Compare.", "--max-tokens", str(TOKENS), "--backend", "openai"]
    assert main([*argv, "--base-url", transformers_serve.base_url, "--json"]) == 0
    out, _ = capsys.readouterr()
    reply = json.loads(out)
    assert reply["text"] == local and reply["usage"]["output_tokens"] >= 1
    monkeypatch.setenv("MANTIS_BASE_URL", transformers_serve.base_url + "/v1")  # the env var, with /v1
    assert main(argv) == 0 and capsys.readouterr().out == local + "\n"
    assert main([*argv[:-2], "--base-url", transformers_serve.base_url]) == 2  # fal with --base-url
    assert "--base-url is for --backend openai" in capsys.readouterr().err
