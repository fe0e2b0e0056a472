"""Neutral types shared by the adapters and the backends.

Adapters (LangChain, LlamaIndex, CLI) translate their messages into a :class:`Conversation`;
backends take a :class:`Request` and return a :class:`Response` (or stream :class:`Chunk`s).
Nothing here imports PIL, torch or a framework.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ._mime import sniff_mime
from .errors import ImageError, InvalidRequestError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class Image:
    """One image from any source: an http(s) URL, a ``data:`` URI, raw bytes, a file path
    (``str`` or :class:`~pathlib.Path`), a file-like object or a PIL image.

    Nothing is read until asked: ``data`` loads the bytes (file, data URI), ``mime_type``
    sniffs them (from the bytes, never from the name). Remote URLs are not fetched here
    (see :func:`mantis_llm.images.fetch`). Validation with limits lives in
    :mod:`mantis_llm.images`.
    """

    __slots__ = ("kind", "source", "_data", "_mime")
    kind: str  # "url" | "data_uri" | "bytes" | "path" | "pil"
    source: Any  # the URL, data URI, Path or PIL image (None for bytes)
    _data: bytes | None
    _mime: str | None

    def __init__(self, source: Any, *, mime_type: str | None = None) -> None:
        if isinstance(source, Image):
            self.kind, self.source = source.kind, source.source
            self._data, self._mime = source._data, mime_type or source._mime
            return
        self._data = None
        self._mime = mime_type
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.kind, self.source, self._data = "bytes", None, bytes(source)
        elif isinstance(source, os.PathLike):
            self.kind, self.source = "path", Path(source)
        elif isinstance(source, str):
            s = source.strip()
            lower = s[:16].lower()
            if lower.startswith(("http://", "https://")):
                self.kind, self.source = "url", s
            elif lower.startswith("data:"):
                self.kind, self.source = "data_uri", s
            elif "://" in s[:16]:
                raise ImageError(f"unsupported image URL scheme in {s[:40]!r}: use http(s), a data URI, or a file path")
            elif not s:
                raise ImageError("empty image source")
            else:
                self.kind, self.source = "path", Path(s).expanduser()
        elif _is_pil(source):
            self.kind, self.source = "pil", source
        elif hasattr(source, "read"):
            raw = source.read()
            if not isinstance(raw, (bytes, bytearray)):
                raise ImageError("image file object must be opened in binary mode")
            self.kind, self.source, self._data = "bytes", None, bytes(raw)
        else:
            raise ImageError(
                f"unsupported image source of type {type(source).__name__}: expected a URL, "
                "data URI, bytes, path or PIL image"
            )

    @classmethod
    def from_base64(cls, b64: str, mime_type: str | None = None) -> Image:
        """An image from a base64 string (no ``data:`` prefix)."""
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"invalid base64 image data: {exc}") from None
        return cls(data, mime_type=mime_type)

    @property
    def is_remote(self) -> bool:
        """True for http(s) URLs (which we pass to fal as they are)."""
        return self.kind == "url"

    @property
    def url(self) -> str | None:
        """The http(s) URL or data URI this image came from, if any."""
        return self.source if self.kind in ("url", "data_uri") else None

    @property
    def data(self) -> bytes:
        """The encoded image bytes (loaded on first use). Not available for remote URLs."""
        if self._data is None:
            if self.kind == "path":
                try:
                    self._data = self.source.read_bytes()
                except FileNotFoundError:
                    raise ImageError(f"image file not found: {self.source}") from None
                except IsADirectoryError:
                    raise ImageError(f"image path is a directory: {self.source}") from None
                except OSError as exc:
                    raise ImageError(f"cannot read image file {self.source}: {exc.strerror}") from None
            elif self.kind == "data_uri":
                self._data, declared = _decode_data_uri(self.source)
                self._mime = self._mime or declared
            elif self.kind == "pil":
                buf = io.BytesIO()
                img = self.source
                try:
                    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "CMYK"):
                        img = img.convert("RGB")  # modes PNG cannot hold: F, I, HSV, LAB, YCbCr
                    img.save(buf, format="JPEG" if img.mode == "CMYK" else "PNG")
                except (OSError, ValueError) as exc:  # e.g. a closed or truncated image
                    raise ImageError(f"cannot encode the PIL image ({img.mode}): {exc}") from None
                self._data = buf.getvalue()
            else:
                raise ImageError(f"remote image {self.source!r} has not been fetched")
        return self._data

    @property
    def mime_type(self) -> str | None:
        """The mime type sniffed from the bytes (None when unknown or remote)."""
        if self.kind == "url":
            return self._mime
        return sniff_mime(self.data)

    def __repr__(self) -> str:
        if self.kind in ("url", "path"):
            shown = str(self.source)
        elif self.kind == "data_uri":
            shown = self.source.partition(",")[0][:60] + f",...({len(self.source)} chars)"
        elif self.kind == "pil":
            shown = f"{self.source.mode} {self.source.size[0]}x{self.source.size[1]}"
        else:
            shown = f"{len(self._data or b'')} bytes"
        return f"Image({self.kind}: {shown})"


def _is_pil(obj: Any) -> bool:
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "mode") and hasattr(obj, "size")


def _decode_data_uri(uri: str) -> tuple[bytes, str | None]:
    """Split ``data:[<mime>][;base64],<payload>``; base64 is required for images."""
    head, sep, payload = uri.partition(",")
    if not sep:
        raise ImageError("malformed data URI: no ',' separating header and data")
    params = head[5:].split(";")
    mime = params[0].strip().lower() or None
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise ImageError("data URI images must be base64-encoded (data:<mime>;base64,...)")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URI has invalid base64 data") from None
    return data, mime


Part = str | Image


@dataclass
class Turn:
    """One message: a role and an ordered list of text and image parts."""

    role: Role
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidRequestError(f"unknown role {self.role!r}: expected one of {ROLES}")
        if isinstance(self.parts, (str, Image)):
            self.parts = [self.parts]
        if not isinstance(self.parts, list):
            if not isinstance(self.parts, tuple):
                raise InvalidRequestError(
                    f"message parts must be a list of text and Image, not {type(self.parts).__name__}"
                )
            self.parts = list(self.parts)
        for p in self.parts:
            if not isinstance(p, (str, Image)):
                raise InvalidRequestError(f"message part of type {type(p).__name__} is neither text nor Image")

    @property
    def images(self) -> list[Image]:
        return [p for p in self.parts if isinstance(p, Image)]

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))


@dataclass
class Conversation:
    """An ordered list of turns (system, user, assistant)."""

    turns: list[Turn] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.turns, (list, tuple)):
            raise InvalidRequestError(f"a conversation is a list of Turns, not {type(self.turns).__name__}")
        if isinstance(self.turns, tuple):
            self.turns = list(self.turns)
        for i, turn in enumerate(self.turns, 1):
            if not isinstance(turn, Turn):
                raise InvalidRequestError(f"message {i} is a {type(turn).__name__}, not a Turn")

    @classmethod
    def from_prompt(cls, prompt: str, images: Sequence[Any] = (), system: str | None = None) -> Conversation:
        """One user turn: the images first, then the prompt (Mantis's own example order)."""
        if isinstance(images, (str, bytes, bytearray, os.PathLike, Image)) or _is_pil(images):
            images = [images]  # one image, not a sequence of characters or bytes
        parts: list[Part] = [i if isinstance(i, Image) else Image(i) for i in images]
        if prompt:
            parts.append(prompt)
        turns = [Turn("system", [system])] if system else []
        return cls(turns + [Turn("user", parts)])

    @property
    def images(self) -> list[Image]:
        return [img for t in self.turns for img in t.images]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling options; ``None`` means the backend's default (greedy for Mantis)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name}={getattr(self, name)!r} is invalid: {why}")

        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
                raise bad("max_tokens", "expected a positive integer")
            if self.max_tokens < 1:
                raise bad("max_tokens", "must be at least 1")
        for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise bad(name, "expected a number")
            if not (lo <= v <= hi) or (name == "top_p" and v == 0):
                raise bad(name, f"must be in {'(0, 1]' if name == 'top_p' else '[0, 2]'}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "expected an integer")
        if self.stop is not None:
            stop = (self.stop,) if isinstance(self.stop, str) else self.stop
            try:
                stop = tuple(stop)
            except TypeError:
                raise bad("stop", "expected a string or a list of strings") from None
            if not all(isinstance(s, str) and s for s in stop):
                raise bad("stop", "every stop sequence must be a non-empty string")
            object.__setattr__(self, "stop", stop or None)

    def merged(self, **overrides: Any) -> GenerationParams:
        """A copy with every non-None override applied (call-time kwargs over defaults)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **changes) if changes else self


@dataclass
class Request:
    """What a backend executes: a conversation, its generation parameters, and optionally
    the tools the model may call or the JSON shape its answer must have."""

    conversation: Conversation
    params: GenerationParams = field(default_factory=GenerationParams)
    tools: ToolSpec | None = None
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.conversation, Conversation):
            raise InvalidRequestError(
                f"Request.conversation must be a Conversation, not {type(self.conversation).__name__}"
            )
        if not isinstance(self.params, GenerationParams):
            raise InvalidRequestError(f"Request.params must be GenerationParams, not {type(self.params).__name__}")
        if self.tools is not None and not isinstance(self.tools, ToolSpec):
            raise InvalidRequestError(f"Request.tools must be a ToolSpec, not {type(self.tools).__name__}")
        if self.response_format is not None and not isinstance(self.response_format, ResponseFormat):
            raise InvalidRequestError(
                f"Request.response_format must be a ResponseFormat, not {type(self.response_format).__name__}"
            )


@dataclass(frozen=True)
class Usage:
    """Token counts, where the backend knows them."""

    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, int]:
        """``{"input_tokens", "output_tokens", "total_tokens"}`` (LangChain's usage keys too)."""
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }


# ------------------------------------------------------------------------------ tools


@dataclass(frozen=True)
class Tool:
    """A function the model may call, in OpenAI's function shape (``parameters`` is a JSON schema)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True)
class ToolSpec:
    """The tools of a request and how the model must use them.

    ``choice`` is ``"auto"`` (answer in text or call tools), ``"none"`` (text only),
    ``"required"`` (call at least one tool) or the name of one tool (call exactly that one).
    ``parallel`` allows several calls in one answer.
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = False


@dataclass(frozen=True)
class ResponseFormat:
    """The answer must be one JSON value: of ``schema`` when given, else any JSON object."""

    schema: dict[str, Any] | None = None
    name: str = "response"


@dataclass
class ToolCall:
    """One call the model made: ``arguments`` validated against the tool's schema."""

    name: str
    arguments: dict[str, Any]
    id: str


@dataclass
class InvalidToolCall:
    """A call the model tried to make that could not be parsed or validated."""

    arguments: str  # the raw text
    error: str
    id: str
    name: str | None = None


@dataclass
class Response:
    """A finished generation: ``text`` is the prose, ``tool_calls`` the calls the model made."""

    text: str
    model: str
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | None when unknown
    usage: Usage | None = None
    request_id: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of a streamed answer; the last chunk carries the full :class:`Response`."""

    text: str
    response: Response | None = None


@dataclass
class Update:
    """A progress report from a backend (fal queue status, logs)."""

    status: str  # "IN_QUEUE" | "IN_PROGRESS" | "COMPLETED" | "LOADING" ...
    request_id: str | None = None
    queue_position: int | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
