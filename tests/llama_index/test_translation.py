"""LlamaIndex messages -> Conversation: roles, block order, every image source, errors.
No backend here: these check the one shared translation both classes use."""

from __future__ import annotations

import base64
import io

import pytest
from llama_index.core.base.llms.types import (
    AudioBlock,
    CacheControl,
    CachePoint,
    ChatMessage,
    CitableBlock,
    CitationBlock,
    DocumentBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
    VideoBlock,
)
from llama_index.core.schema import ImageDocument, ImageNode

from mantis_llm.errors import ImageError, InvalidRequestError
from mantis_llm.llama_index import (
    image_block_to_image,
    prompt_messages,
    to_conversation,
    to_image_block,
)
from mantis_llm.prompt import render
from mantis_llm.types import Image


def kinds(turn):
    return [p.kind if isinstance(p, Image) else "text" for p in turn.parts]


def test_roles_and_interleaved_order(png_bytes, jpeg_bytes):
    msgs = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(
            role="user",
            blocks=[
                TextBlock(text="first"),
                ImageBlock(image=png_bytes),
                TextBlock(text="then"),
                ImageBlock(url="https://example.com/cat.jpg"),
                TextBlock(text="?"),
            ],
        ),
        ChatMessage(role="assistant", content="a cat"),
        ChatMessage(role="user", blocks=[ImageBlock(image=jpeg_bytes), TextBlock(text="and this?")]),
    ]
    conv = to_conversation(msgs)
    assert [t.role for t in conv.turns] == ["system", "user", "assistant", "user"]
    assert kinds(conv.turns[1]) == ["text", "bytes", "text", "url", "text"]
    assert conv.turns[1].parts[1].data == png_bytes
    assert conv.turns[1].parts[3].url == "https://example.com/cat.jpg"
    assert conv.turns[3].parts[0].data == jpeg_bytes
    rendered = render(conv, mode="fal")
    assert rendered.text.index("first") < rendered.text.index("<image>") < rendered.text.index("then")
    assert [i.kind for i in rendered.images] == ["bytes", "url", "bytes"]


@pytest.mark.parametrize(
    "role,expected",
    [
        ("developer", "system"),
        ("chatbot", "assistant"),
        ("model", "assistant"),
    ],
)
def test_role_synonyms(role, expected):
    conv = to_conversation([ChatMessage(role="user", content="q"), ChatMessage(role=role, content="x")])
    assert conv.turns[1].role == expected


@pytest.mark.parametrize("role", [MessageRole.TOOL, MessageRole.FUNCTION])
def test_tool_results_become_user_turns_naming_the_tool_and_call(role):
    call = ChatMessage(
        role="assistant", blocks=[ToolCallBlock(tool_call_id="call_1", tool_name="add", tool_kwargs={"a": 1})]
    )
    msg = ChatMessage(role=role, content="42", additional_kwargs={"tool_call_id": "call_1"})
    conv = to_conversation([ChatMessage(content="q"), call, msg])
    assert conv.turns[1].role == "assistant" and conv.turns[1].text == '{"name":"add","arguments":{"a":1}}'
    turn = conv.turns[2]
    assert turn.role == "user"
    assert turn.parts == ['Tool result (tool "add", id call_1):\n', "42"]
    assert "Tool result (id call_1):\n42" in render(to_conversation([msg]), mode="fal").text  # no call to name it


def test_every_image_block_source(tmp_path, png_bytes):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes)
    b64 = base64.b64encode(png_bytes)
    uri = "data:image/png;base64," + b64.decode()
    cases = {
        "bytes": ImageBlock(image=png_bytes),
        "base64": ImageBlock(image=b64, image_mimetype="image/png"),
        "stream": ImageBlock(image=io.BytesIO(png_bytes)),  # core's as_base64 bug must not bite
        "path": ImageBlock(path=path),
        "data_uri": ImageBlock(url=uri),
        "url": ImageBlock(url="http://127.0.0.1:9/a.png"),
    }
    got = {name: image_block_to_image(block) for name, block in cases.items()}
    assert got["url"].kind == "url" and got["url"].url == "http://127.0.0.1:9/a.png"  # passed through
    assert got["data_uri"].kind == "data_uri"
    assert got["path"].kind == "path"
    for name, img in got.items():
        if name != "url":
            assert img.data == png_bytes, name
            assert img.mime_type == "image/png"


def test_image_sources_follow_core_precedence(tmp_path, png_bytes, jpeg_bytes):
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes)
    # image bytes win over path and url, path wins over url (as ImageBlock.resolve_image does)
    assert image_block_to_image(ImageBlock(image=png_bytes, path=path, url="https://e.com/a.png")).data == png_bytes
    assert image_block_to_image(ImageBlock(path=path, url="https://e.com/a.png")).kind == "path"


@pytest.mark.parametrize(
    "block,match",
    [
        (ImageBlock(), "has no image, path or url"),
        (ImageBlock(url="ftp://example.com/a.png"), "unsupported image URL scheme"),
        (ImageBlock(image=io.BytesIO(b"")), "zero bytes"),
    ],
)
def test_bad_image_blocks_name_the_image(block, match):
    msgs = [ChatMessage(role="user", blocks=[TextBlock(text="a"), ImageBlock(url="https://e.com/a.png"), block])]
    with pytest.raises(ImageError, match=match) as exc:
        to_conversation([ChatMessage(role="system", content="s"), *msgs])
    assert str(exc.value).startswith("image 2 of message 2:")


def test_data_uris_are_decoded_lazily_by_the_core():
    img = image_block_to_image(ImageBlock(url="data:image/png,notbase64"))
    assert img.kind == "data_uri"  # passed on as is; our Image decodes (and rejects) it on use
    with pytest.raises(ImageError, match="base64"):
        img.data


@pytest.mark.parametrize(
    "block",
    [
        AudioBlock(audio=b"RIFF....WAVEfmt ", format="wav"),
        VideoBlock(url="https://example.com/v.mp4"),
        DocumentBlock(data=b"%PDF-1.4 hello", document_mimetype="application/pdf"),
        ToolCallBlock(tool_name="search", tool_kwargs={"q": "x"}),  # a call in a user message
    ],
)
def test_unsupported_blocks_name_block_and_message(block):
    msgs = [ChatMessage(content="hi"), ChatMessage(role="user", blocks=[TextBlock(text="look"), block])]
    with pytest.raises(InvalidRequestError) as exc:
        to_conversation(msgs)
    assert f"message 2, block 2: {type(block).__name__} is not supported" in str(exc.value)


def test_hints_and_reasoning_are_skipped_citations_flattened(png_bytes):
    msg = ChatMessage(
        role="user",
        blocks=[
            ThinkingBlock(content="secret reasoning"),
            CitableBlock(title="doc", source="s", content=[TextBlock(text="cited"), ImageBlock(image=png_bytes)]),
            CachePoint(cache_control=CacheControl(type="ephemeral")),
            CitationBlock(cited_content="quoted", source="s", title="t", additional_location_info={}),
        ],
    )
    turn = to_conversation([msg]).turns[0]
    assert kinds(turn) == ["text", "bytes", "text"]
    assert turn.parts[0] == "cited" and turn.parts[2] == "quoted"


def test_not_a_chat_message():
    with pytest.raises(InvalidRequestError, match="message 1: expected a ChatMessage, got dict"):
        to_conversation([{"role": "user", "content": "hi"}])


def test_legacy_additional_kwargs_images_become_blocks(tmp_path, png_bytes):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes)
    msg = ChatMessage(
        role="user", content="describe", additional_kwargs={"images": [ImageDocument(image_path=str(path))]}
    )
    turn = to_conversation([msg]).turns[0]
    assert kinds(turn) == ["text", "bytes"]
    assert turn.parts[1].data == png_bytes


def test_image_documents_and_nodes(tmp_path, png_bytes):
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes)
    b64 = base64.b64encode(png_bytes).decode()
    items = [
        ImageDocument(image_path=str(path)),
        ImageDocument(image=b64),
        ImageNode(image_url="https://example.com/a.png"),
        ImageNode(image=b64),
        ImageNode(metadata={"file_path": str(path)}),  # SimpleDirectoryReader's shape
        ImageBlock(url="https://example.com/b.png"),
    ]
    [msg] = prompt_messages("what is shown?", items)
    turn = to_conversation([msg]).turns[0]
    assert kinds(turn) == ["path", "bytes", "url", "bytes", "path", "url", "text"]
    assert turn.parts[-1] == "what is shown?"
    assert all(p.data == png_bytes for p in turn.parts if isinstance(p, Image) and p.kind != "url")


def test_bad_image_documents():
    with pytest.raises(ImageError, match=r"image_documents\[0\]: .*not base64"):
        to_image_block(ImageNode(image="not base64!"), "image_documents[0]")
    with pytest.raises(InvalidRequestError, match=r"image_documents\[1\]: expected an ImageBlock.*got str"):
        prompt_messages("q", [ImageBlock(url="https://e.com/a.png"), "a.png"])


def test_a_text_document_read_from_an_image_file_says_which_package_reads_images():
    # what SimpleDirectoryReader makes of a PNG without llama-index-readers-file
    from llama_index.core.schema import Document

    from mantis_llm.llama_index._messages import prompt_messages

    doc = Document(text="\ufffdPNG\r\n", metadata={"file_path": "/data/house.png", "file_type": "image/png"})
    with pytest.raises(InvalidRequestError) as info:
        prompt_messages("describe", [doc])
    message = str(info.value)
    assert message.startswith("image_documents[0]: a text Document read from the image file /data/house.png")
    assert "pip install llama-index-readers-file" in message
    with pytest.raises(InvalidRequestError, match="expected an ImageBlock, ImageNode or ImageDocument, got Document"):
        prompt_messages("describe", [Document(text="plain", metadata={"file_path": "/data/notes.txt"})])
