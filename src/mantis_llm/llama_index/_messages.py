"""LlamaIndex chat messages in, a neutral :class:`~mantis_llm.types.Conversation` out.

- roles: system/developer -> system; user -> user; assistant/chatbot/model -> assistant;
  tool/function -> a user turn starting with ``"Tool result:"``;
- ``TextBlock`` -> text; ``ImageBlock`` -> an image at that exact position: http(s) and
  ``data:`` URLs are passed on as they are, a ``path`` stays a path (read by the backend),
  ``image`` bytes (raw or base64) and file objects are read with ``ImageBlock.resolve_image()``;
- ``CitableBlock``/``CitationBlock`` -> their nested text and images; ``CachePoint`` and
  ``ThinkingBlock`` are skipped; anything else raises
  :class:`~mantis_llm.errors.InvalidRequestError` naming the block and the message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.generic_utils import image_node_to_image_block
from llama_index.core.base.llms.types import (
    CachePoint,
    ChatMessage,
    CitableBlock,
    CitationBlock,
    ImageBlock,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.schema import BaseNode, ImageDocument, ImageNode

from .. import tools
from ..errors import ImageError, InvalidRequestError
from ..types import Conversation, Image, Part, Role, Turn

ImageInput = ImageBlock | ImageNode | ImageDocument

_ROLES: dict[MessageRole, Role] = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "user",
    MessageRole.FUNCTION: "user",
}


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
    if isinstance(item, BaseNode) and (source := _image_file_of(item)):
        raise InvalidRequestError(
            f"{label}: a text {type(item).__name__} read from the image file {source}: SimpleDirectoryReader "
            "reads image files as ImageDocuments only with llama-index-readers-file installed "
            "(pip install llama-index-readers-file); without it, it reads their bytes as text"
        )
    raise InvalidRequestError(f"{label}: expected an ImageBlock, ImageNode or ImageDocument, got {type(item).__name__}")


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")


def _image_file_of(node: BaseNode) -> str | None:
    """The image file a text node was read from, per the metadata SimpleDirectoryReader writes."""
    meta = node.metadata or {}
    source = str(meta.get("file_path") or meta.get("file_name") or "")
    is_image = str(meta.get("file_type") or "").startswith("image/") or source.lower().endswith(_IMAGE_SUFFIXES)
    return (source or "(unnamed)") if is_image else None


def _parts(blocks: Sequence[Any], where: str, counter: list[int], calls: list[ToolCallBlock] | None) -> Iterator[Part]:
    """The text and images of ``blocks``; an assistant message's ToolCallBlocks go to
    ``calls`` (rendered after its text, as the JSON the model writes); elsewhere (``calls``
    None) they are an error like any block Mantis cannot read."""
    for b, block in enumerate(blocks, 1):
        if isinstance(block, ToolCallBlock) and calls is not None:
            calls.append(block)
        elif isinstance(block, TextBlock):
            yield block.text
        elif isinstance(block, ImageBlock):
            counter[0] += 1
            yield image_block_to_image(block, f"image {counter[0]} of {where}")
        elif isinstance(block, (CitableBlock, CitationBlock)):
            yield from _parts(block.nested_blocks, where, counter, calls)
        elif isinstance(block, (CachePoint, ThinkingBlock)):
            continue
        else:
            raise InvalidRequestError(
                f"{where}, block {b}: {type(block).__name__} is not supported (Mantis reads text and images only)"
            )


def _blocks(message: ChatMessage) -> list[Any]:
    """The message's blocks, each legacy ``additional_kwargs["images"]`` image once.

    llama-index-core turns those ImageDocuments into ImageBlocks appended to ``blocks`` in a
    model validator, and re-runs it on the same message whenever the message is validated
    again (each ``LLMChatStartEvent`` of a chat call does): the images pile up at the end,
    one more copy per call. Copies after the first are dropped here."""
    blocks = list(message.blocks)
    n = len(message.additional_kwargs.get("images") or ())
    if n:
        while len(blocks) >= 2 * n and all(
            isinstance(a, ImageBlock) and isinstance(b, ImageBlock) and a.image == b.image
            for a, b in zip(blocks[-n:], blocks[-2 * n : -n], strict=True)
        ):
            del blocks[-n:]
    return blocks


def to_conversation(messages: Sequence[ChatMessage]) -> Conversation:
    """Translate LlamaIndex chat messages into a :class:`~mantis_llm.types.Conversation`.

    One turn per message (so ``message N`` in errors is ``messages[N-1]``), parts in block order.
    An assistant message's ``ToolCallBlock``s (or the older ``additional_kwargs["tool_calls"]``)
    are shown to the model in the JSON it is asked to write; a ``role="tool"`` message becomes
    a user turn naming the tool and its ``tool_call_id``, its images kept.
    """
    if isinstance(messages, ChatMessage):
        messages = [messages]
    names: dict[str, str] = {}  # tool call id -> tool name, for tool messages that omit the name
    turns = []
    for m, message in enumerate(messages, 1):
        where = f"message {m}"
        if not isinstance(message, ChatMessage):
            raise InvalidRequestError(f"{where}: expected a ChatMessage, got {type(message).__name__}")
        role = _ROLES.get(MessageRole(message.role))
        if role is None:  # pragma: no cover - a MessageRole added by a future llama-index
            raise InvalidRequestError(f"{where}: role {message.role!r} is not supported")
        blocks: list[ToolCallBlock] = []
        parts = list(_parts(_blocks(message), where, [0], blocks if role == "assistant" else None))
        if message.role in (MessageRole.TOOL, MessageRole.FUNCTION):
            extra = message.additional_kwargs
            call_id = extra.get("tool_call_id")
            name = extra.get("name") or extra.get("tool_name") or (names.get(call_id) if call_id else None)
            is_error = bool(extra.get("is_error")) or extra.get("status") == "error"
            turns.append(tools.tool_result_turn(name, call_id, is_error, parts))
            continue
        calls = [{"name": b.tool_name, "arguments": b.tool_kwargs, "id": b.tool_call_id} for b in blocks]
        calls += _legacy_calls(message.additional_kwargs.get("tool_calls"))
        if role == "assistant" and calls:
            names.update({str(c["id"]): str(c["name"]) for c in calls if c.get("id") and c.get("name")})
            turns.append(tools.tool_calls_turn(calls, "".join(p for p in parts if isinstance(p, str))))
            continue
        turns.append(Turn(role, parts))
    return Conversation(turns)


def _legacy_calls(value: Any) -> list[dict[str, Any]]:
    """Calls in the older ``additional_kwargs["tool_calls"]`` (OpenAI dicts or objects)."""
    out = []
    for call in value or ():
        fn = call.get("function") if isinstance(call, dict) else getattr(call, "function", None)
        get = (lambda o, k: o.get(k)) if isinstance(fn, dict) else getattr
        if fn is not None and get(fn, "name"):
            cid = call.get("id") if isinstance(call, dict) else getattr(call, "id", None)
            out.append({"name": get(fn, "name"), "arguments": get(fn, "arguments") or {}, "id": cid})
    return out


def prompt_messages(prompt: str, image_documents: Sequence[ImageInput] | None = None) -> list[ChatMessage]:
    """The one user message a ``complete(prompt, image_documents)`` call stands for: images, then text."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a str, not {type(prompt).__name__}")
    blocks: list[Any] = [to_image_block(doc, f"image_documents[{i}]") for i, doc in enumerate(image_documents or ())]
    if prompt:
        blocks.append(TextBlock(text=prompt))
    return [ChatMessage(role=MessageRole.USER, blocks=blocks)]
