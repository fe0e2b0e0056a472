"""LangChain messages in, a neutral :class:`~mantis_llm.types.Conversation` out.

Messages are read through ``message.content_blocks`` (langchain-core's own translators), so
every image form LangChain users send works: v1 blocks (``url`` / ``base64``), the older
``source_type`` blocks, OpenAI ``image_url`` blocks (URL or data URI, dict or bare string) and
Anthropic ``source`` blocks. A ``url`` naming a local file is refused (a chat model must not
read files named by message content): :func:`image_block` builds a block from a file in
your own code.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Literal, cast

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from .. import tools
from ..errors import ImageError, InvalidRequestError
from ..types import Conversation, Image, Turn

_TOOL_CALL_BLOCKS = ("tool_call", "tool_call_chunk", "invalid_tool_call", "server_tool_call")
# Provider forms inside an AI message's content that LangChain keeps as non_standard: a call
# (message.tool_calls holds it too) or hidden reasoning (not part of the dialogue)
_SKIPPED_IN_AI = ("tool_use", "function_call", "server_tool_use", "thinking", "redacted_thinking")


def to_conversation(messages: Sequence[BaseMessage]) -> Conversation:
    """Translate LangChain messages into a :class:`~mantis_llm.types.Conversation`.

    One turn per message (so "message N" in error labels is the N-th message, from 1),
    text and images kept in their order. An ``AIMessage``'s ``tool_calls`` (and
    ``invalid_tool_calls``) are shown to the model in the JSON it is asked to write; a
    ``ToolMessage`` becomes a user turn naming the tool and the call id, its images kept.
    Raises :class:`InvalidRequestError` (or :class:`ImageError`) naming the message and
    block for anything Mantis cannot read.
    """
    names: dict[str, str] = {}  # tool call id -> tool name, for ToolMessages that omit the name
    turns = []
    for i, message in enumerate(messages, 1):
        turns.append(_to_turn(message, i, names))
    return Conversation(turns)


def _role(message: BaseMessage, i: int) -> Literal["system", "user", "assistant", "tool"]:
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
            return cast(Literal["system", "user", "assistant", "tool"], role)
        raise InvalidRequestError(f"message {i}: unknown chat message role {message.role!r}")
    raise InvalidRequestError(f"message {i}: {type(message).__name__} is not supported by Mantis")


def _to_turn(message: BaseMessage, i: int, names: dict[str, str]) -> Turn:
    role = _role(message, i)
    parts: list[str | Image] = []
    for j, standard in enumerate(message.content_blocks, 1):
        where = f"message {i}, block {j}"
        block = cast(dict[str, Any], standard)  # a TypedDict union; read as a plain dict
        kind = block.get("type")
        if kind == "non_standard":  # e.g. {"type": "image_url", "image_url": "https://..."}
            value = block.get("value") or {}
            url = value.get("image_url") if value.get("type") == "image_url" else None
            if isinstance(url, str):
                block, kind = {"type": "image", "url": url}, "image"
            elif role == "assistant" and value.get("type") in _SKIPPED_IN_AI:
                continue
            else:
                kind = value.get("type") or "unknown"
                raise InvalidRequestError(f"{where}: {kind!r} blocks are not supported by Mantis")
        if kind == "text" or (kind == "text-plain" and isinstance(block.get("text"), str)):
            if block.get("text"):
                parts.append(block["text"])
        elif role == "assistant" and kind in (*_TOOL_CALL_BLOCKS, "reasoning"):
            # calls: message.tool_calls is the source of truth (rendered below); reasoning:
            # another model's hidden thoughts are not part of the dialogue
            continue
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
    if isinstance(message, AIMessage) and (message.tool_calls or message.invalid_tool_calls):
        calls = [*message.tool_calls, *message.invalid_tool_calls]
        for call in calls:
            if call.get("id") and call.get("name"):
                names[str(call["id"])] = str(call["name"])
        text = "".join(p for p in parts if isinstance(p, str))
        return tools.tool_calls_turn(cast(list[Any], calls), text)
    if role == "tool":
        call_id = getattr(message, "tool_call_id", None)
        name = getattr(message, "name", None) or (names.get(call_id) if call_id else None)
        return tools.tool_result_turn(name, call_id, getattr(message, "status", None) == "error", parts)
    return Turn(role, parts)


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
