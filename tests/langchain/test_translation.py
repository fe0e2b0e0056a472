"""LangChain messages -> Conversation: every image block form, order, roles and errors.

These test the translation function itself (no backend); test_chat_mantis.py checks what
actually reaches the fal emulator."""

from __future__ import annotations

import base64

import pytest
from langchain_core.messages import (
    AIMessage,
    ChatMessage,
    HumanMessage,
    RemoveMessage,
    SystemMessage,
    ToolMessage,
)

from mantis_llm.errors import ImageError, InvalidRequestError, MantisError
from mantis_llm.langchain import to_conversation as messages_to_conversation
from mantis_llm.types import Image

URL = "https://example.com/cat.png"


@pytest.fixture
def b64(png_bytes: bytes) -> str:
    return base64.b64encode(png_bytes).decode()


def parts_of(*messages):
    """The parts of the single (last) turn, images shown as (kind, bytes-or-url)."""
    turn = messages_to_conversation(list(messages)).turns[-1]
    return [p if isinstance(p, str) else (p.kind, p.url or p.data) for p in turn.parts]


# ------------------------------------------------------------------ every image form


def test_v1_blocks(b64, png_bytes):
    data_uri = f"data:image/png;base64,{b64}"
    parts = parts_of(
        HumanMessage(
            content=[
                {"type": "image", "url": URL},
                {"type": "image", "base64": b64, "mime_type": "image/png"},
                {"type": "image", "url": data_uri},
            ]
        )
    )
    assert parts == [("url", URL), ("bytes", png_bytes), ("data_uri", data_uri)]


def test_v1_blocks_built_with_content_blocks_argument(b64, png_bytes):
    msg = HumanMessage(
        content_blocks=[{"type": "text", "text": "look"}, {"type": "image", "base64": b64, "mime_type": "image/png"}]
    )
    assert parts_of(msg) == ["look", ("bytes", png_bytes)]


def test_legacy_source_type_blocks(b64, png_bytes):
    parts = parts_of(
        HumanMessage(
            content=[
                {"type": "image", "source_type": "url", "url": URL},
                {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},
            ]
        )
    )
    assert parts == [("url", URL), ("bytes", png_bytes)]


def test_openai_image_url_blocks(b64, png_bytes):
    data_uri = f"data:image/png;base64,{b64}"
    parts = parts_of(
        HumanMessage(
            content=[
                {"type": "image_url", "image_url": {"url": URL, "detail": "high"}},
                {"type": "image_url", "image_url": {"url": data_uri}},
                {"type": "image_url", "image_url": "https://example.com/bare.png"},  # bare-string form
            ]
        )
    )
    assert parts == [("url", URL), ("bytes", png_bytes), ("url", "https://example.com/bare.png")]


def test_anthropic_source_blocks(b64, png_bytes):
    parts = parts_of(
        HumanMessage(
            content=[
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
                {"type": "image", "source": {"type": "url", "url": URL}},
            ]
        )
    )
    assert parts == [("bytes", png_bytes), ("url", URL)]


def test_agent_chat_ui_data_block(b64, png_bytes):
    # agent-chat-ui sends {"type": "image", "mimeType", "data"} (langchain agent-chat-ui#213)
    parts = parts_of(HumanMessage(content=[{"type": "image", "mimeType": "image/png", "data": b64}]))
    assert parts == [("bytes", png_bytes)]


def test_base64_given_as_a_data_uri_is_accepted(b64):
    parts = parts_of(HumanMessage(content=[{"type": "image", "base64": f"data:image/png;base64,{b64}"}]))
    assert parts[0][0] == "data_uri"


def test_plain_strings_and_text_blocks_keep_order_with_images(b64):
    msg = HumanMessage(
        content=[
            "Compare",
            {"type": "image", "url": URL},
            {"type": "text", "text": "with"},
            {"type": "image", "base64": b64, "mime_type": "image/png"},
            "please.",
        ]
    )
    parts = parts_of(msg)
    assert [p if isinstance(p, str) else p[0] for p in parts] == ["Compare", "url", "with", "bytes", "please."]


def test_plain_string_message():
    assert parts_of(HumanMessage("hello")) == ["hello"]


# ------------------------------------------------------------------ roles and turns


def test_roles_and_one_turn_per_message(b64):
    conv = messages_to_conversation(
        [
            SystemMessage("be brief"),
            HumanMessage(content=["first", {"type": "image", "url": URL}]),
            AIMessage("an answer"),
            HumanMessage(content=[{"type": "image", "base64": b64, "mime_type": "image/png"}, "second"]),
            ChatMessage(role="assistant", content="generic role"),
        ]
    )
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user", "assistant"]
    assert conv.turns[2].parts == ["an answer"]
    assert [type(p) for p in conv.turns[3].parts] == [Image, str]
    assert len(conv.images) == 2


def test_ai_tool_calls_are_written_as_the_json_the_model_writes_and_reasoning_dropped():
    ai = AIMessage(
        content=[{"type": "reasoning", "reasoning": "secret thoughts"}, {"type": "text", "text": "Let me look."}],
        tool_calls=[{"name": "zoom", "args": {"factor": 2}, "id": "c1", "type": "tool_call"}],
    )
    turn = messages_to_conversation([HumanMessage("hi"), ai]).turns[1]
    assert turn.role == "assistant" and turn.text == 'Let me look.\n{"name":"zoom","arguments":{"factor":2}}'
    assert "secret thoughts" not in turn.text
    broken = AIMessage(
        content="", invalid_tool_calls=[{"name": "zoom", "args": "{factor: 2", "id": "c2", "error": "bad"}]
    )
    assert messages_to_conversation([broken]).turns[0].text == '{"name":"zoom","arguments":"{factor: 2"}'
    # Anthropic's tool_use block in the content is the same call: shown once, from tool_calls
    anthropic = AIMessage(
        content=[
            {"type": "text", "text": "On it."},
            {"type": "tool_use", "id": "c3", "name": "zoom", "input": {"factor": 3}},
        ],
        tool_calls=[{"name": "zoom", "args": {"factor": 3}, "id": "c3", "type": "tool_call"}],
    )
    assert messages_to_conversation([anthropic]).turns[0].text == 'On it.\n{"name":"zoom","arguments":{"factor":3}}'


def test_tool_message_becomes_a_user_turn_naming_tool_and_call_with_its_images(b64, png_bytes):
    tool = ToolMessage(
        content=[{"type": "text", "text": "zoomed:"}, {"type": "image", "base64": b64, "mime_type": "image/png"}],
        tool_call_id="c1",
        name="zoom",
    )
    turn = messages_to_conversation([tool]).turns[0]
    assert turn.role == "user"
    assert turn.parts[:2] == ['Tool result (tool "zoom", id c1):\n', "zoomed:"]
    assert turn.parts[2].data == png_bytes
    # no name on the ToolMessage: taken from the AI message that made the call
    call = AIMessage("", tool_calls=[{"name": "zoom", "args": {}, "id": "c2", "type": "tool_call"}])
    failed = messages_to_conversation([call, ToolMessage("boom", tool_call_id="c2", status="error")]).turns[1]
    assert failed.parts == ['Tool result (tool "zoom", id c2, status: error):\n', "boom"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "block, expected",
    [
        ({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}, "audio blocks are not supported"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio blocks are not supported"),
        ({"type": "video", "url": "https://example.com/v.mp4"}, "video blocks are not supported"),
        ({"type": "file", "base64": "AAAA", "mime_type": "application/pdf"}, "file blocks are not supported"),
        (
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "AAAA"}},
            "file blocks are not supported",
        ),
        ({"type": "tool_call", "name": "f", "args": {}, "id": "1"}, "tool_call blocks are only allowed in AI messages"),
        ({"type": "hologram", "x": 1}, "'hologram' blocks are not supported"),
        ({"type": "image", "file_id": "file-123"}, "file ids ('file-123') are not supported"),
        ({"type": "image", "source_type": "id", "id": "file-9"}, "file ids ('file-9') are not supported"),
        ({"type": "image", "source": {"type": "file", "file_id": "f2"}}, "no url or base64 data"),
    ],
)
def test_unsupported_blocks_name_message_and_block(block, expected):
    messages = [SystemMessage("s"), HumanMessage(content=["look", "at", block])]
    with pytest.raises(InvalidRequestError) as info:
        messages_to_conversation(messages)
    assert str(info.value).startswith("message 2, block 3: ")
    assert expected in str(info.value)
    assert isinstance(info.value, MantisError)


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "~/secret.png", "ftp://host/x.png"])
def test_local_paths_and_other_schemes_are_refused(url):
    with pytest.raises(ImageError, match=r"^message 1, block 1: image url must be an http\(s\) URL or a data URI"):
        messages_to_conversation([HumanMessage(content=[{"type": "image", "url": url}])])


def test_bad_base64_is_an_image_error_with_position():
    with pytest.raises(ImageError, match=r"^message 1, block 2: invalid base64 image data"):
        messages_to_conversation(
            [HumanMessage(content=["x", {"type": "image", "base64": "not base64!!", "mime_type": "image/png"}])]
        )


def test_images_in_ai_messages_are_refused():
    with pytest.raises(InvalidRequestError, match="message 1, block 1: images in AI messages"):
        messages_to_conversation([AIMessage(content=[{"type": "image", "url": URL}])])


def test_unknown_roles_and_message_types_are_refused():
    with pytest.raises(InvalidRequestError, match="message 1: unknown chat message role 'critic'"):
        messages_to_conversation([ChatMessage(role="critic", content="hm")])
    with pytest.raises(InvalidRequestError, match="message 1: RemoveMessage is not supported"):
        messages_to_conversation([RemoveMessage(id="m1")])
