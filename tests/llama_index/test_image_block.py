"""``image_block``: any image source the core Image takes (PIL images included, which
``ImageBlock`` itself refuses) becomes an ``ImageBlock`` that reaches fal (the emulator) as the
same picture, in its place; it stays a plain ``ImageBlock`` that LlamaIndex itself can read."""

from __future__ import annotations

import base64
import io

import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from PIL import Image as PILImage

from mantis_llm.errors import ImageError
from mantis_llm.llama_index import image_block
from mantis_llm.types import Image

URL = "https://images.example.com/a.jpg"


def pixels(data: bytes) -> tuple[tuple[int, int], bytes]:
    with PILImage.open(io.BytesIO(data)) as im:
        return im.size, im.convert("RGB").tobytes()


def test_every_source_kind_reaches_fal_as_the_same_image(llm, received, image_bytes, tmp_path):
    files = {name: tmp_path / f"{name}.png" for name in ("red", "blue")}
    for name, path in files.items():
        path.write_bytes(image_bytes(name))
    pil = PILImage.new("RGB", (28, 18), (250, 120, 0))
    green = image_bytes("green", "JPEG")
    blocks = [
        image_block(URL),
        image_block(str(files["red"])),
        image_block(files["blue"]),
        image_block(green),
        image_block(io.BytesIO(image_bytes("yellow"))),
        image_block("data:image/png;base64," + base64.b64encode(image_bytes("red")).decode()),
        image_block(Image(image_bytes("blue"))),
        image_block(pil),
    ]
    assert all(isinstance(b, ImageBlock) for b in blocks)
    assert blocks[0].url is not None and str(blocks[0].url) == URL and blocks[0].image is None
    assert [b.image_mimetype for b in blocks[1:]] == [
        "image/png",
        "image/png",
        "image/jpeg",
        "image/png",
        "image/png",
        "image/png",
        "image/png",
    ]
    pil_bytes = blocks[-1].resolve_image().read()  # LlamaIndex's own reader sees a PNG
    assert pixels(pil_bytes) == ((28, 18), pil.tobytes())
    llm.chat([ChatMessage(role="user", blocks=[TextBlock(text="compare"), *blocks])])
    payload = received.payload()
    assert payload["images"][0]["image_url"] == URL  # passed on, never downloaded
    sizes = [received.image_size(img["image_url"]) for img in payload["images"][1:]]
    assert sizes == [received.sizes_by_name[n] for n in ("red", "blue", "green", "yellow", "red", "blue")] + [(28, 18)]
    sent_pil = base64.b64decode(payload["images"][-1]["image_url"].partition(",")[2])
    assert pixels(sent_pil) == ((28, 18), pil.tobytes())


@pytest.mark.parametrize(
    "source, message",
    [
        ("no/such/picture.png", "image file not found"),
        ("file:///etc/passwd", "unsupported image URL scheme"),
        (3.5, "unsupported image source of type float"),
        ("data:image/png;base64,@@", "data URI has invalid base64"),
    ],
)
def test_unreadable_sources_are_image_errors(source, message):
    with pytest.raises(ImageError, match=message):
        image_block(source)


def test_non_images_are_refused_when_sent_naming_the_image(llm, emu):
    block = image_block(b"just some text, not a picture")
    with pytest.raises(ImageError, match="image 1 of message 1: unsupported image data: got text"):
        llm.chat([ChatMessage(role="user", blocks=[block, TextBlock(text="hi")])])
    assert emu.submissions == []
