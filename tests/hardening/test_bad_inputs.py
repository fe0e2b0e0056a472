"""The bad-input catalogue: one table, one test. Every case goes through a public entry point
(ChatMantis, Mantis/MantisMultiModal, FalBackend, TransformersBackend, the core types) and
must raise the documented MantisError subclass, with a message naming the offending part, in
under a second, with no dependency exception shown in its traceback (every exception in the
displayed chain is ours).

Decisions recorded here:
- zero images on fal: the client does not refuse it (the local model answers text-only
  prompts). By default the fal backend retries a 422 for the missing image once with a blank
  placeholder; sent as is (``text_only="as_is"``), the endpoint's 422 comes back as
  InvalidRequestError naming ``images``.
- animated GIFs are not an error: the first frame is used (see ``test_animated_gif_...``).
- literal ``<image>``/``</s>`` in user text is not an error: it is escaped (see
  ``test_literal_placeholders_...``).
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.messages import ChatMessage as LCChatMessage
from llama_index.core.base.llms.types import AudioBlock, ChatMessage, DocumentBlock, ImageBlock, TextBlock

from mantis_llm import Conversation, FalBackend, GenerationParams, Image, Request, TransformersBackend, Turn
from mantis_llm.emulator import FORBIDDEN_KEY, FalEmulator, JobError
from mantis_llm.errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    ContextLengthError,
    EndpointNotFoundError,
    ImageError,
    InvalidRequestError,
    MantisError,
)
from mantis_llm.images import ImageOptions
from mantis_llm.langchain import ChatMantis
from mantis_llm.llama_index import Mantis, MantisMultiModal
from mantis_llm.prompt import render

from .conftest import FAL_ENV, png

PER_CASE = 1.0  # seconds; every case must fail faster than this

# ----------------------------------------------------------------------------- bad images


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG header claiming 10 gigapixels, in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def big_bmp(path: Path) -> Path:
    """A real (black) 4096x4096 24-bit BMP: 50,331,702 bytes, written sparsely."""
    w = h = 4096
    pixels = w * 3 * h
    header = b"BM" + struct.pack("<IHHI", 54 + pixels, 0, 0, 54)
    header += struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, pixels, 2835, 2835, 0, 0)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(54 + pixels)
    return path


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>'
PDF = b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
NOT_AN_IMAGE = bytes(range(256)) * 4
TEXT_BYTES = b"just some text that someone uploaded as a picture"
JPEG = png(64, 48, fmt="JPEG")
TRUNCATED_JPEG = JPEG[: len(JPEG) // 2]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----------------------------------------------------------------------------- context


@dataclass
class Ctx:
    fresh_emu: FalEmulator
    chat: ChatMantis
    llm: Mantis
    fal: FalBackend
    local: TransformersBackend
    web: str  # another host
    closed: str  # http://127.0.0.1:<closed port>
    tmp: Path
    monkeypatch: pytest.MonkeyPatch

    def lc(self, *blocks: Any, text: str = "Describe this."):
        """ChatMantis.invoke on one human message of ``blocks`` then ``text``."""
        return self.chat.invoke([HumanMessage(content=[*blocks, {"type": "text", "text": text}])])

    def li(self, *blocks: Any, text: str = "Describe this.", **kw):
        """Mantis.chat on one user message of ``blocks`` then ``text``."""
        return self.llm.chat([ChatMessage(role="user", blocks=[*blocks, TextBlock(text=text)])], **kw)

    def ask(self, backend, *images: Any, prompt: str = "Describe this.", **params):
        """backend.generate on one user turn: the images, then the prompt."""
        return backend.generate(Request(Conversation.from_prompt(prompt, list(images)), GenerationParams(**params)))


@pytest.fixture(scope="module")
def catalogue_emu():
    with FalEmulator(service_time=0.005) as e:
        yield e


@pytest.fixture
def ctx(catalogue_emu, limited_backend, other_host, closed_port, tmp_path, monkeypatch):
    fresh_emu = catalogue_emu
    fresh_emu.reset()
    for name in FAL_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in fresh_emu.env().items():
        monkeypatch.setenv(name, value)
    c = Ctx(fresh_emu, ChatMantis(), Mantis(), FalBackend(), limited_backend, other_host.url,
            f"http://127.0.0.1:{closed_port}", tmp_path, monkeypatch)  # fmt: skip
    yield c
    c.chat.close()
    c.llm.close()
    c.fal.close()


def without_key(c: Ctx) -> ChatMantis:
    for name in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        c.monkeypatch.delenv(name, raising=False)
    return ChatMantis()


def scripted(c: Ctx, entry) -> Ctx:
    c.fresh_emu.script([entry])
    return c


URL = "http://127.0.0.1:9/cat.jpg"  # passed to fal as it is; never fetched
LC_URL = {"type": "image", "url": URL}
HUMAN = [HumanMessage(content=[LC_URL, "What is this?"])]

# (id, what, call, expected error, substring naming the offending part)
CASES: list[tuple[str, str, Callable[[Ctx], Any], type[MantisError], str]] = [
    # --- conversations
    ("empty-conversation", "no messages at all", lambda c: c.chat.invoke([]), InvalidRequestError, "no user message"),
    (
        "no-user-turn",
        "only system and assistant messages",
        lambda c: c.chat.invoke([SystemMessage("Be brief."), AIMessage("Hello!")]),
        InvalidRequestError,
        "no user message",
    ),
    (
        "empty-prompt",
        "a user message of whitespace",
        lambda c: c.chat.invoke([HumanMessage("   \n ")]),
        InvalidRequestError,
        "prompt is empty",
    ),
    (
        "zero-images-fal",
        "fal's endpoint needs an image: sent as is (text_only='as_is'), its 422 comes back typed",
        lambda c: ChatMantis(backend_options={"text_only": "as_is"}).invoke([HumanMessage("What is in the picture?")]),
        InvalidRequestError,
        "images",
    ),
    (
        "unknown-role",
        "a LangChain ChatMessage with a made-up role",
        lambda c: c.chat.invoke([LCChatMessage(role="wizard", content="hi")]),
        InvalidRequestError,
        "'wizard'",
    ),
    (
        "image-in-ai-message",
        "Mantis cannot take images from the assistant",
        lambda c: c.chat.invoke([HumanMessage("hi"), AIMessage(content=[LC_URL]), HumanMessage("and?")]),
        InvalidRequestError,
        "message 2, block 1",
    ),
    (
        "core-turn-role",
        "a Turn with an unknown role",
        lambda c: Turn("wizard", ["hi"]),
        InvalidRequestError,
        "'wizard'",
    ),
    (
        "core-request-type",
        "a Request whose conversation is a str",
        lambda c: c.fal.generate(Request("hello")),
        InvalidRequestError,
        "Request.conversation",
    ),
    ("core-image-type", "an image source that is a float", lambda c: Image(3.14), ImageError, "float"),
    # --- unknown content blocks
    (
        "lc-unknown-block",
        "a LangChain block of a made-up type",
        lambda c: c.lc({"type": "hologram", "data": "x"}),
        InvalidRequestError,
        "message 1, block 1: 'hologram'",
    ),
    (
        "lc-audio-block",
        "a LangChain audio block",
        lambda c: c.lc({"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}),
        InvalidRequestError,
        "message 1, block 1: audio",
    ),
    (
        "lc-image-file-id",
        "an image given by a provider file id",
        lambda c: c.lc({"type": "image", "file_id": "file-abc"}),
        InvalidRequestError,
        "file-abc",
    ),
    (
        "lc-image-without-source",
        "an image block with no url or data",
        lambda c: c.lc({"type": "image"}),
        InvalidRequestError,
        "message 1, block 1",
    ),
    (
        "li-audio-block",
        "a LlamaIndex AudioBlock",
        lambda c: c.li(AudioBlock(audio=b"RIFF0000WAVE", format="wav")),
        InvalidRequestError,
        "message 1, block 1: AudioBlock",
    ),
    (
        "li-document-block",
        "a LlamaIndex DocumentBlock (PDF)",
        lambda c: c.li(DocumentBlock(data=PDF, document_mimetype="application/pdf")),
        InvalidRequestError,
        "DocumentBlock",
    ),
    (
        "li-bad-image-document",
        "a non-image in image_documents",
        lambda c: MantisMultiModal().complete("hi", image_documents=[42]),
        InvalidRequestError,
        "image_documents[0]",
    ),
    # --- image bytes
    (
        "non-image-bytes",
        "random binary bytes as an image",
        lambda c: c.lc({"type": "image", "base64": b64(NOT_AN_IMAGE), "mime_type": "image/png"}),
        ImageError,
        "image 1 of message 1: unsupported image data",
    ),
    (
        "text-bytes",
        "a text file as an image (LlamaIndex bytes)",
        lambda c: c.li(ImageBlock(image=TEXT_BYTES)),
        ImageError,
        "image 1 of message 1: unsupported image data: got text",
    ),
    (
        "truncated-jpeg",
        "half a JPEG",
        lambda c: c.lc({"type": "image", "base64": b64(TRUNCATED_JPEG), "mime_type": "image/jpeg"}),
        ImageError,
        "image 1 of message 1: the JPEG data is corrupt or truncated",
    ),
    (
        "png-bomb",
        "an 8000x8000 PNG (over our 40 MP limit) in a few dozen bytes",
        lambda c: c.lc({"type": "image", "base64": b64(png_bomb(8000, 8000)), "mime_type": "image/png"}),
        ImageError,
        "image 1 of message 1: the image is 8000x8000 = 64,000,000 pixels",
    ),
    (
        "png-bomb-huge-local",
        "a 100000x100000 PNG (PIL's own bomb limit) on the local backend",
        lambda c: c.ask(c.local, png_bomb()),
        ImageError,
        "image 1 of message 1: the image is too large to decode safely",
    ),
    (
        "50mb-image",
        "a real 50 MB BMP file",
        lambda c: c.li(ImageBlock(path=big_bmp(c.tmp / "big.bmp"))),
        ImageError,
        "image 1 of message 1: the image is 50,331,702 bytes",
    ),
    (
        "svg",
        "an SVG file",
        lambda c: c.li(ImageBlock(image=SVG)),
        ImageError,
        "image 1 of message 1: unsupported image data: got an SVG",
    ),
    (
        "pdf",
        "a PDF given as an image",
        lambda c: c.ask(c.fal, PDF),
        ImageError,
        "image 1 of message 1: unsupported image data: got a PDF",
    ),
    (
        "missing-file",
        "an image path that does not exist",
        lambda c: c.ask(c.fal, c.tmp / "nope.png"),
        ImageError,
        "image 1 of message 1: image file not found",
    ),
    # --- data URIs and URLs
    (
        "data-uri-wrong-mime",
        "a data URI holding an HTML page",
        lambda c: c.lc({"type": "image", "url": "data:text/html;base64," + b64(b"<html><body>hi</body></html>")}),
        ImageError,
        "image 1 of message 1: unsupported image data: got an HTML page",
    ),
    (
        "data-uri-bad-base64",
        "a data URI whose payload is not base64",
        lambda c: c.li(ImageBlock(url="data:image/png;base64,@@not*base64@@")),
        ImageError,
        "image 1 of message 1: data URI has invalid base64",
    ),
    (
        "lc-bad-base64",
        "a base64 block that is not base64",
        lambda c: c.lc({"type": "image", "base64": "@@not*base64@@", "mime_type": "image/png"}),
        ImageError,
        "message 1, block 1: invalid base64",
    ),
    (
        "file-url-lc",
        "a file:// URL in a LangChain image block",
        lambda c: c.lc({"type": "image", "url": "file:///etc/passwd"}),
        ImageError,
        "'file:///etc/passwd'",
    ),
    (
        "file-url-li",
        "a file:// URL in a LlamaIndex ImageBlock",
        lambda c: c.li(ImageBlock(url="file:///etc/passwd")),
        ImageError,
        "image 1 of message 1: unsupported image URL scheme",
    ),
    (
        "ftp-url-lc",
        "an ftp:// URL (OpenAI-style block)",
        lambda c: c.lc({"type": "image_url", "image_url": {"url": "ftp://127.0.0.1/a.png"}}),
        ImageError,
        "'ftp://127.0.0.1/a.png'",
    ),
    (
        "ftp-url-core",
        "an ftp:// URL as an Image",
        lambda c: c.ask(c.fal, "ftp://127.0.0.1/a.png"),
        ImageError,
        "ftp://",
    ),
    (
        "unreachable-url-local",
        "the local backend fetching from a closed port",
        lambda c: c.ask(c.local, c.closed + "/a.png"),
        ImageError,
        "image 1 of message 1: could not fetch http://127.0.0.1:",
    ),
    (
        "unreachable-url-fetch-remote",
        "FalBackend(fetch_remote=True) fetching from a closed port",
        lambda c: c.ask(FalBackend(image_options=ImageOptions(fetch_remote=True)), c.closed + "/a.png?token=s3cr3t"),
        ImageError,
        "image 1 of message 1: could not fetch http://127.0.0.1:",
    ),
    (
        "html-url-local",
        "the local backend given a URL that returns a web page",
        lambda c: c.ask(c.local, c.web + "/page.html"),
        ImageError,
        "/page.html: the server sent text/html, not an image",
    ),
    (
        "context-overflow",
        "more images than the tiny model's 512-token context holds",
        lambda c: c.ask(c.local, *[URL] * 40, max_tokens=4),
        ContextLengthError,
        "40 image(s)",
    ),
    # --- parameters: wrong types and out of range (call time and constructors)
    (
        "max_tokens-type",
        "max_tokens as a str",
        lambda c: c.chat.invoke(HUMAN, max_tokens="many"),
        InvalidRequestError,
        "max_tokens='many'",
    ),
    ("max_tokens-zero", "max_tokens=0", lambda c: c.li(max_tokens=0), InvalidRequestError, "max_tokens=0"),
    (
        "max_tokens-float",
        "max_tokens as a float",
        lambda c: c.ask(c.fal, URL, max_tokens=2.5),
        InvalidRequestError,
        "max_tokens=2.5",
    ),
    (
        "temperature-type",
        "temperature as a bool",
        lambda c: c.chat.invoke(HUMAN, temperature=True),
        InvalidRequestError,
        "temperature=True",
    ),
    (
        "temperature-range",
        "temperature above 2",
        lambda c: c.li(temperature=2.5),
        InvalidRequestError,
        "temperature=2.5",
    ),
    (
        "temperature-negative",
        "temperature below 0",
        lambda c: c.chat.invoke(HUMAN, temperature=-0.1),
        InvalidRequestError,
        "temperature=-0.1",
    ),
    ("top_p-zero", "top_p=0", lambda c: c.chat.invoke(HUMAN, top_p=0), InvalidRequestError, "top_p=0"),
    ("top_p-range", "top_p above 1", lambda c: c.ask(c.local, URL, top_p=1.5), InvalidRequestError, "top_p=1.5"),
    ("top_p-type", "top_p as a list", lambda c: c.li(top_p=[0.5]), InvalidRequestError, "top_p=[0.5]"),
    ("stop-type", "a stop list of ints", lambda c: c.chat.invoke(HUMAN, stop=[1]), InvalidRequestError, "stop="),
    ("stop-empty", "an empty stop string", lambda c: c.li(stop=[""]), InvalidRequestError, "stop="),
    ("seed-type", "seed as a float", lambda c: c.chat.invoke(HUMAN, seed=1.5), InvalidRequestError, "seed=1.5"),
    (
        "unknown-kwarg",
        "an unsupported call argument",
        lambda c: c.chat.invoke(HUMAN, beam_width=4),
        InvalidRequestError,
        "beam_width",
    ),
    (
        "mantis-timeout",
        "Mantis(timeout=-1) used",
        lambda c: Mantis(timeout=-1).chat([ChatMessage(role="user", content="hi")]),
        ConfigurationError,
        "timeout",
    ),
    (
        "mantis-backend",
        "Mantis with an unknown backend name",
        lambda c: Mantis(backend="gpu"),
        ConfigurationError,
        "'gpu'",
    ),
    (
        "chat-backend-options",
        "ChatMantis backend_options overriding a field",
        lambda c: ChatMantis(backend_options={"timeout": 3}),
        ConfigurationError,
        "backend_options",
    ),
    (
        "fal-endpoint",
        "an endpoint id without owner",
        lambda c: FalBackend(endpoint="mantis"),
        ConfigurationError,
        "'mantis'",
    ),
    ("fal-mode", "an unknown fal mode", lambda c: FalBackend(mode="turbo"), ConfigurationError, "'turbo'"),
    (
        "fal-max_retries",
        "negative max_retries",
        lambda c: FalBackend(max_retries=-1),
        ConfigurationError,
        "max_retries",
    ),
    (
        "fal-queue_url",
        "a non-http queue URL",
        lambda c: FalBackend(queue_url="ftp://queue"),
        ConfigurationError,
        "queue_url",
    ),
    (
        "image-options",
        "ImageOptions with max_bytes=0",
        lambda c: ImageOptions(max_bytes=0),
        ConfigurationError,
        "max_bytes",
    ),
    (
        "local-max_context",
        "TransformersBackend(max_context='big')",
        lambda c: TransformersBackend(max_context="big"),
        ConfigurationError,
        "max_context",
    ),
    (
        "local-missing-model",
        "a local model path that does not exist",
        lambda c: c.ask(TransformersBackend(model=str(c.tmp / "no-model")), URL),
        ConfigurationError,
        "no-model",
    ),
    # --- fal answers
    ("missing-key", "no FAL_KEY anywhere", lambda c: without_key(c).invoke(HUMAN), ConfigurationError, "FAL_KEY"),
    (
        "invalid-key",
        "a key fal does not know (401)",
        lambda c: ChatMantis(api_key="nobody:nothing").invoke(HUMAN),
        AuthenticationError,
        "rejected the API key",
    ),
    (
        "forbidden-key",
        "a key fal refuses for this app (403)",
        lambda c: Mantis(api_key=FORBIDDEN_KEY).chat(
            [ChatMessage(role="user", blocks=[ImageBlock(url=URL), TextBlock(text="hi")])]
        ),
        AuthenticationError,
        "refused this API key",
    ),
    (
        "unknown-endpoint",
        "an endpoint fal does not have (404)",
        lambda c: ChatMantis(model="fal-ai/retired-model").invoke(HUMAN),
        EndpointNotFoundError,
        "'fal-ai/retired-model'",
    ),
    (
        "fal-422",
        "an input field fal rejects (422)",
        lambda c: FalBackend(extra_input={"max_new_tokens": "lots"}).generate(
            Request(Conversation.from_prompt("hi", [URL]))
        ),
        InvalidRequestError,
        "max_new_tokens",
    ),
    (
        "completed-with-error",
        "a job that ends COMPLETED with an error",
        lambda c: scripted(c, JobError(500, "CUDA out of memory", "runner_server_error")).chat.invoke(HUMAN),
        BackendError,
        "CUDA out of memory",
    ),
]


def shown_chain(exc: BaseException) -> list[BaseException]:
    """The exceptions a printed traceback of ``exc`` would show."""
    out = []
    while exc is not None:
        out.append(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return out


def test_catalogue_is_big_enough():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case_id, what, call, expected, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(ctx, case_id, what, call, expected, needle):
    t0 = time.perf_counter()
    with pytest.raises(MantisError) as ei:
        call(ctx)
    took = time.perf_counter() - t0
    err = ei.value
    assert isinstance(err, expected), f"{what}: got {type(err).__name__}: {err}"
    assert needle in str(err), f"{what}: {needle!r} not in {str(err)!r}"
    assert took < PER_CASE, f"{what}: took {took:.2f} s"
    chain = shown_chain(err)
    assert all(isinstance(e, MantisError) for e in chain), f"{what}: traceback shows {[type(e) for e in chain]}"
    assert "Traceback" not in str(err) and "s3cr3t" not in str(err)


# ----------------------------------------------------------------------------- not errors


def animated_gif() -> bytes:
    from PIL import Image as PILImage

    frames = [PILImage.new("RGB", (40, 30), color) for color in ((220, 20, 20), (20, 20, 220), (20, 220, 20))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_animated_gif_uses_the_first_frame_on_fal_and_locally(fresh_emu, limited_backend):
    """images.py documents GIF animations as "the first frame only": it works, it is not an error."""
    from PIL import Image as PILImage

    gif = animated_gif()
    assert PILImage.open(io.BytesIO(gif)).n_frames == 3
    chat = ChatMantis()
    msg = chat.invoke(
        [HumanMessage(content=[{"type": "image", "base64": b64(gif), "mime_type": "image/gif"}, "Colour?"])]
    )
    assert msg.content.startswith("[mantis-emulator] 1 image")
    sent = fresh_emu.submissions[0].payload["images"][0]["image_url"]
    head, _, data = sent.partition(",")
    assert head in ("data:image/jpeg;base64", "data:image/png;base64")  # re-encoded: fal gets one still image
    still = PILImage.open(io.BytesIO(base64.b64decode(data)))
    assert getattr(still, "n_frames", 1) == 1
    r, g, b = still.convert("RGB").getpixel((20, 15))
    assert r > 180 and g < 60 and b < 60  # the red first frame, not the blue or green ones
    chat.close()
    out = limited_backend.generate(Request(Conversation.from_prompt("Colour?", [gif]), GenerationParams(max_tokens=2)))
    assert out.usage.output_tokens <= 2 and out.metrics["images"] == 1


def test_literal_placeholders_in_text_are_escaped_not_errors(fresh_emu):
    """User text that spells ``<image>`` or ``</s>`` is text: it takes no image slot."""
    text = "What does the tag <image> mean here? And </s> or <s>?"
    chat = ChatMantis()
    msg = chat.invoke([HumanMessage(content=[{"type": "text", "text": text}, LC_URL])])
    chat.close()
    prompt = fresh_emu.submissions[0].payload["prompt"]
    assert prompt == "What does the tag < image> mean here? And < /s> or < s>? <image>"
    assert msg.content.endswith("< image> mean here? And < /s> or < s>? <image>")
    conv = Conversation([Turn("user", [text, Image(URL)])])
    local = render(conv, "local").text
    assert local.count("<image>") == 1 and "(image 1: <Image><image></Image>)" in local
    assert local.count("</s>") == 2 and "And < /s> or < s>?" in local  # only the template's separators


# ----------------------------------------------------------------------------- adapter constructors

WRONG_TYPES = dict(
    model=5, backend=3.5, api_key=5, max_tokens="many", temperature="hot", top_p=[1], stop=5, seed="s",
    timeout="soon", max_retries=1.5, backend_options=[1], on_update=5,
)  # fmt: skip


@pytest.mark.parametrize("cls", [ChatMantis, Mantis, MantisMultiModal], ids=lambda c: c.__name__)
@pytest.mark.parametrize("field", sorted(WRONG_TYPES))
def test_adapter_constructors_reject_every_wrongly_typed_field(cls, field):
    """A wrongly typed adapter constructor field raises ConfigurationError (pydantic still
    validates; its ValidationError is turned into ours) naming the class and the field, at
    construction, fast, with no pydantic traceback under it."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigurationError) as ei:
        cls(**{field: WRONG_TYPES[field]})
    assert time.perf_counter() - t0 < PER_CASE
    assert str(ei.value).startswith(f"{cls.__name__}: {field}: Input should be ")
    assert all(isinstance(e, MantisError) for e in shown_chain(ei.value))
