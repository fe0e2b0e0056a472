"""Neutral types: Image sources and mime sniffing, turns, GenerationParams validation."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image as PILImage

from mantis_llm.errors import ImageError, InvalidRequestError
from mantis_llm.types import Conversation, GenerationParams, Image, Turn, Usage


def test_url_image(png_bytes):
    img = Image("  https://example.com/a/cat.PNG?x=1 ")
    assert img.kind == "url" and img.is_remote and img.url == "https://example.com/a/cat.PNG?x=1"
    assert img.mime_type is None  # not fetched, and never guessed from the name
    with pytest.raises(ImageError, match="has not been fetched"):
        img.data
    assert Image("http://x.y/z").is_remote


def test_data_uri_image(png_bytes):
    b64 = base64.b64encode(png_bytes).decode()
    img = Image(f"data:image/jpeg;base64,{b64}")  # the declared type is wrong
    assert img.kind == "data_uri" and not img.is_remote and img.url.startswith("data:")
    assert img.data == png_bytes
    assert img.mime_type == "image/png"  # from the bytes
    r = repr(img)
    assert b64[:8] not in r and "chars" in r and len(r) < 100


@pytest.mark.parametrize(
    "uri, match",
    [
        ("data:image/png,rawtext", "must be base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,!!!", "invalid base64"),
    ],
)
def test_bad_data_uris(uri, match):
    with pytest.raises(ImageError, match=match):
        Image(uri).data


def test_bytes_image(jpeg_bytes):
    for src in (jpeg_bytes, bytearray(jpeg_bytes), memoryview(jpeg_bytes)):
        img = Image(src)
        assert img.kind == "bytes" and img.data == jpeg_bytes and img.mime_type == "image/jpeg"
    assert repr(Image(jpeg_bytes)) == f"Image(bytes: {len(jpeg_bytes)} bytes)"


def test_path_images_str_and_path_mime_from_bytes(tmp_path, png_bytes):
    p = tmp_path / "x.jpg"  # a PNG with a .jpg name
    p.write_bytes(png_bytes)
    for src in (p, str(p)):
        img = Image(src)
        assert img.kind == "path" and isinstance(img.source, Path)
        assert img.mime_type == "image/png"
        assert img.data == png_bytes
    assert repr(Image(p)) == f"Image(path: {p})"


def test_path_errors(tmp_path):
    with pytest.raises(ImageError, match="image file not found"):
        Image(tmp_path / "missing.png").data
    with pytest.raises(ImageError, match="is a directory"):
        Image(tmp_path).data


def test_lazy_loading(tmp_path, png_bytes):
    p = tmp_path / "later.png"
    img = Image(p)  # does not exist yet: nothing is read at construction
    p.write_bytes(png_bytes)
    assert img.data == png_bytes


def test_pil_image():
    pil = PILImage.new("RGB", (30, 20), (9, 8, 7))
    img = Image(pil)
    assert img.kind == "pil" and img.source is pil
    assert img.mime_type == "image/png"
    assert PILImage.open(io.BytesIO(img.data)).size == (30, 20)
    assert repr(img) == "Image(pil: RGB 30x20)"


def test_file_objects(png_bytes, tmp_path):
    img = Image(io.BytesIO(png_bytes))
    assert img.kind == "bytes" and img.mime_type == "image/png"
    p = tmp_path / "t.txt"
    p.write_text("hello")
    with open(p) as text_file, pytest.raises(ImageError, match="binary mode"):
        Image(text_file)


def test_image_copy_and_from_base64(png_bytes):
    a = Image(png_bytes)
    b = Image(a)
    assert b.kind == "bytes" and b.data == png_bytes
    assert Image.from_base64(base64.b64encode(png_bytes).decode()).data == png_bytes
    with pytest.raises(ImageError, match="invalid base64"):
        Image.from_base64("not base64!")


@pytest.mark.parametrize(
    "src, match",
    [
        ("", "empty image source"),
        ("ftp://host/x.png", "unsupported image URL scheme"),
        (123, "unsupported image source of type int"),
        (None, "NoneType"),
    ],
)
def test_bad_sources(src, match):
    with pytest.raises(ImageError, match=match):
        Image(src)


def test_turn_and_conversation(png_bytes):
    img = Image(png_bytes)
    t = Turn("user", "hi")
    assert t.parts == ["hi"] and t.text == "hi" and t.images == []
    conv = Conversation.from_prompt("What?", [png_bytes, img], system="Be brief.")
    assert [x.role for x in conv.turns] == ["system", "user"]
    assert conv.turns[1].parts[1] is img and conv.turns[1].parts[2] == "What?"
    assert len(conv.images) == 2 and conv.turns[0].parts == ["Be brief."]
    with pytest.raises(InvalidRequestError, match="unknown role 'bot'"):
        Turn("bot", ["x"])
    with pytest.raises(InvalidRequestError, match="neither text nor Image"):
        Turn("user", [3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens=0 is invalid: must be at least 1"),
        ({"max_tokens": -5}, "at least 1"),
        ({"max_tokens": 1.5}, "positive integer"),
        ({"max_tokens": True}, "positive integer"),
        ({"temperature": -0.1}, r"must be in \[0, 2\]"),
        ({"temperature": 2.01}, r"\[0, 2\]"),
        ({"temperature": "hot"}, "expected a number"),
        ({"top_p": 0}, r"must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"\(0, 1\]"),
        ({"seed": "1"}, "expected an integer"),
        ({"stop": ["ok", ""]}, "non-empty string"),
        ({"stop": 5}, "a string or a list"),
    ],
)
def test_generation_params_rejects(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        GenerationParams(**kwargs)


def test_generation_params_accepts_and_merges():
    p = GenerationParams(max_tokens=10, temperature=0, top_p=1, stop="END", seed=3)
    assert p.stop == ("END",) and p.temperature == 0
    assert GenerationParams(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationParams(stop=[]).stop is None
    m = p.merged(max_tokens=20, temperature=None)
    assert (m.max_tokens, m.temperature, m.seed) == (20, 0, 3)
    assert p.merged() is p and p.max_tokens == 10
    with pytest.raises(InvalidRequestError):
        p.merged(top_p=2)


def test_usage_total():
    assert Usage(3, 4).total_tokens == 7
