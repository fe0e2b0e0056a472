"""``image_block``: every image source the core Image takes becomes a LangChain v1 image block
that reaches fal (the emulator, real HTTP) as the same picture, in its place."""

from __future__ import annotations

import base64
import io

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.messages.block_translators.openai import convert_to_openai_image_block
from PIL import Image as PILImage

from mantis_llm.errors import ImageError
from mantis_llm.langchain import ChatMantis, image_block
from mantis_llm.types import Image

URL = "https://images.example.com/a.jpg"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    with PILImage.open(io.BytesIO(data)) as im:
        return im.size, im.convert("RGB").tobytes()


def same_picture(got: bytes, want: bytes) -> bool:
    """Same size and (allowing for fal's re-encoding of GIF/BMP/WEBP) the same pixels."""
    (size_a, a), (size_b, b) = pixels(got), pixels(want)
    return size_a == size_b and sum(abs(x - y) for x, y in zip(a, b)) / len(a) < 8


def test_block_shapes(png_bytes, jpeg_bytes):
    assert image_block(URL) == {"type": "image", "url": URL}
    assert image_block(URL, mime_type="image/jpeg") == {"type": "image", "url": URL, "mime_type": "image/jpeg"}
    assert image_block(png_bytes) == {"type": "image", "base64": b64(png_bytes), "mime_type": "image/png"}
    # the type comes from the bytes, not from a declared type or a file name
    assert image_block(jpeg_bytes, mime_type="image/png")["mime_type"] == "image/jpeg"
    assert image_block(f"data:image/png;base64,{b64(jpeg_bytes)}")["mime_type"] == "image/jpeg"
    # a standard block: langchain-core's own translators (used for other providers) read it
    assert convert_to_openai_image_block(image_block(png_bytes)) == {
        "type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png_bytes)}"}}  # fmt: skip


def test_every_source_kind_reaches_fal_as_the_same_image(emu, make_image, tmp_path):
    sources = {  # distinct sizes, so each received picture tells which input it was
        "data_uri": make_image(20, 10, (200, 30, 30), "PNG"),
        "str_path": make_image(21, 11, (30, 200, 30), "PNG"),
        "path": make_image(22, 12, (30, 30, 200), "JPEG"),
        "bytes": make_image(23, 13, (200, 200, 30), "PNG"),
        "bytearray": make_image(24, 14, (200, 30, 200), "WEBP"),
        "file_object": make_image(25, 15, (30, 200, 200), "PNG"),
        "open_file": make_image(26, 16, (90, 90, 90), "GIF"),
        "core_image": make_image(27, 17, (10, 100, 10), "BMP"),
    }
    for name, data in sources.items():
        (tmp_path / name).write_bytes(data)
    pil = PILImage.new("RGB", (28, 18), (250, 120, 0))
    with open(tmp_path / "open_file", "rb") as handle:
        blocks = [
            image_block(URL),
            image_block(f"data:image/png;base64,{b64(sources['data_uri'])}"),
            image_block(str(tmp_path / "str_path")),
            image_block(tmp_path / "path"),
            image_block(sources["bytes"]),
            image_block(bytearray(sources["bytearray"])),
            image_block(io.BytesIO(sources["file_object"])),
            image_block(handle),
            image_block(Image(sources["core_image"])),
            image_block(pil),
        ]
    content = []
    for i, block in enumerate(blocks):
        content += [f"({i})", block]
    chat = ChatMantis()
    result = chat.invoke([HumanMessage(content=content)])
    chat.close()
    assert "10 images" in result.content
    payload = emu.submissions[-1].payload
    assert payload["prompt"].count("<image>") == 10
    received = [img["image_url"] for img in payload["images"]]
    assert received[0] == URL  # passed on, never downloaded
    sent = [base64.b64decode(uri.partition(",")[2]) for uri in received[1:]]
    expected = [*sources.values()]
    for name, got, want in zip(sources, sent, expected):
        assert same_picture(got, want), name
    assert pixels(sent[-1]) == ((28, 18), pil.tobytes())  # the PIL image, as PNG
    assert [b["mime_type"] for b in blocks[1:]] == [
        "image/png", "image/png", "image/jpeg", "image/png", "image/webp", "image/png", "image/gif",
        "image/bmp", "image/png"]  # fmt: skip


def test_pil_modes_png_cannot_hold_are_converted():
    block = image_block(PILImage.new("F", (4, 3), 0.5))
    assert block["mime_type"] == "image/png" and pixels(base64.b64decode(block["base64"]))[0] == (4, 3)


@pytest.mark.parametrize(
    "source, message",
    [
        ("no/such/picture.png", "image file not found"),
        ("file:///etc/passwd", "unsupported image URL scheme"),
        (b"just some text, not a picture", "not an image: the data is text/plain"),
        (b"%PDF-1.7\n", "not an image: the data is application/pdf"),
        (bytes(range(256)), "cannot tell the image type from its bytes: pass mime_type="),
        ("data:image/png;base64,@@", "data URI has invalid base64"),
        (3.5, "unsupported image source of type float"),
        (io.StringIO("text"), "binary mode"),
    ],
)
def test_bad_sources_are_image_errors(source, message):
    with pytest.raises(ImageError, match=message):
        image_block(source)


def test_unknown_bytes_take_the_declared_type():
    data = bytes(range(256))
    assert image_block(data, mime_type="image/x-custom")["mime_type"] == "image/x-custom"
