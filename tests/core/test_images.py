"""mantis_llm.images: formats, limits, resizing, labels, fetching from a real local server."""

from __future__ import annotations

import base64
import hashlib
import io
import time

import httpx
import pytest
from PIL import Image as PILImage

from mantis_llm.errors import ConfigurationError, ImageError
from mantis_llm.images import (
    EncodedImage,
    ImageOptions,
    afetch,
    aload_pil,
    encode_for_fal,
    fetch,
    load_pil,
    sniff_mime,
)
from mantis_llm.prompt import labeled_images
from mantis_llm.types import Conversation, Image, Turn

LABEL = "image 2 of message 3"


def encode(img: PILImage.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgba_png(w=40, h=30) -> bytes:
    img = PILImage.new("RGBA", (w, h), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    return encode(img, "PNG")


# --- sniffing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, mime",
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_sniff_mime_from_real_encodings(make_image, fmt, mime):
    assert sniff_mime(make_image(8, 8, fmt=fmt)) == mime


@pytest.mark.parametrize(
    "data, mime",
    [
        (b"%PDF-1.7\n%...", "application/pdf"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"></svg>', "image/svg+xml"),
        (b"<svg width='10'></svg>", "image/svg+xml"),
        (b"\xef\xbb\xbf  <!DOCTYPE html><html></html>", "text/html"),
        (b"<?xml version='1.0'?><root/>", "application/xml"),
        (b"hello, I am not an image", "text/plain"),
        (b"BMW 320i, 1998, 180000 km, good condition", "text/plain"),
        (b"<!-- generated --><html><body></body></html>", "text/html"),
        ("caf\u00e9 na\u00efve \u2603".encode() * 200, "text/plain"),
        (b"\x00\x01\x02\x03garbage\xff\xfe", None),
        (b"", None),
    ],
)
def test_sniff_mime_non_images(data, mime):
    assert sniff_mime(data) == mime


# --- validation errors, each with the label ------------------------------------------


def _bad_inputs(png: bytes, jpeg: bytes) -> dict[str, tuple[bytes, str]]:
    return {
        "empty": (b"", "empty"),
        "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\n", "PDF"),
        "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
        "html": (b"<!doctype html><html>nope</html>", "HTML"),
        "text": (b"just some words", "got text"),
        "unknown": (b"\x00\x13\x37binary junk\x00", "not a recognised image format"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 2], "JPEG data is corrupt or truncated"),
        "truncated-png": (png[:-30], "PNG data is corrupt or truncated"),
        "corrupt-png": (png[:40] + b"\x00" * (len(png) - 40), "PNG data is corrupt or truncated"),
        "magic-only": (b"\x89PNG\r\n\x1a\n", "PNG data is corrupt or truncated"),
        "tiff": (None, "TIFF"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "pdf",
        "svg",
        "html",
        "text",
        "unknown",
        "truncated-jpeg",
        "truncated-png",
        "corrupt-png",
        "magic-only",
        "tiff",
    ],
)
@pytest.mark.parametrize("func", ["load_pil", "encode_for_fal"])
def test_malformed_input_raises_labeled_image_error(make_image, case, func):
    png, jpeg = make_image(64, 48), make_image(300, 200, fmt="JPEG")
    data, needle = _bad_inputs(png, jpeg)[case]
    if data is None:
        data = make_image(8, 8, fmt="TIFF")
    f = load_pil if func == "load_pil" else encode_for_fal
    with pytest.raises(ImageError) as info:
        f(data, label=LABEL)
    msg = str(info.value)
    assert msg.startswith(LABEL + ": "), msg
    assert needle in msg
    assert "Traceback" not in msg


def test_max_bytes_limit(png_bytes):
    opts = ImageOptions(max_bytes=len(png_bytes) - 1)
    with pytest.raises(ImageError, match=rf"^{LABEL}: the image is {len(png_bytes):,} bytes, more than"):
        load_pil(png_bytes, opts, label=LABEL)
    assert load_pil(png_bytes, ImageOptions(max_bytes=len(png_bytes))).size == (64, 48)


def test_max_pixels_checked_from_header_before_decoding(make_image):
    data = make_image(200, 100)
    with pytest.raises(ImageError, match=r"200x100 = 20,000 pixels, more than the limit of 19,999"):
        encode_for_fal(data, ImageOptions(max_pixels=19_999), label=LABEL)
    assert load_pil(data, ImageOptions(max_pixels=20_000)).size == (200, 100)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (a decompression bomb as far as the header says)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("func", [load_pil, encode_for_fal])
def test_decompression_bomb_rejected_from_header(func):
    bomb = png_header_only(10_000, 5_000)  # 50 MP: over our 40 MP default, under PIL's own limit
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"^image 1 of message 1: the image is 10000x5000 = 50,000,000 pixels"):
        func(bomb, label="image 1 of message 1")
    assert time.perf_counter() - start < 0.5  # nothing decoded


def test_huge_header_hits_pil_limit_as_image_error():
    with pytest.raises(ImageError, match=r"^x: the image is too large to decode safely"):
        load_pil(png_header_only(20_000, 20_000), ImageOptions(max_pixels=10**9), label="x")


def test_pil_global_bomb_error_also_becomes_image_error(monkeypatch, make_image):
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # PIL raises above 2x this
    with pytest.raises(ImageError, match=r"^x: the image is too large to decode safely"):
        load_pil(make_image(64, 48), label="x")


def test_pil_image_over_pixel_limit():
    with pytest.raises(ImageError, match="^lbl: the image is 100x100"):
        encode_for_fal(PILImage.new("RGB", (100, 100)), ImageOptions(max_pixels=9_999), label="lbl")


def test_missing_file_and_bad_data_uri_get_labels(tmp_path):
    with pytest.raises(ImageError, match=rf"^{LABEL}: image file not found: .*nope.png"):
        load_pil(Image(tmp_path / "nope.png"), label=LABEL)
    with pytest.raises(ImageError, match=rf"^{LABEL}: data URI has invalid base64"):
        encode_for_fal("data:image/png;base64,@@@", label=LABEL)
    with pytest.raises(ImageError, match=rf"^{LABEL}: unsupported image URL scheme"):
        encode_for_fal("ftp://example.com/a.png", label=LABEL)


def test_no_label_means_plain_message(png_bytes):
    with pytest.raises(ImageError) as info:
        load_pil(b"%PDF-1.4")
    assert str(info.value).startswith("unsupported image data: got a PDF document")


def test_options_validate():
    for bad in (
        {"max_bytes": 0},
        {"max_pixels": -1},
        {"short_side": 0},
        {"fetch_timeout": 0},
        {"max_redirects": -1},
        {"short_side": True},
    ):
        with pytest.raises(ConfigurationError, match="ImageOptions"):
            ImageOptions(**bad)


@pytest.mark.parametrize("bad, message", [
    ({"max_bytes": 1.0}, "ImageOptions.max_bytes must be a positive integer, not 1.0"),
    ({"max_redirects": False}, "ImageOptions.max_redirects must be a non-negative integer, not False"),
    ({"short_side": "672"}, "ImageOptions.short_side must be a positive integer or None, not '672'"),
    ({"fetch_timeout": float("inf")}, "ImageOptions.fetch_timeout must be a positive number, not inf"),
    ({"fetch_remote": 1}, "ImageOptions.fetch_remote must be True or False, not 1"),
])  # fmt: skip
def test_options_errors_name_the_field_and_value(bad, message):
    with pytest.raises(ConfigurationError) as info:
        ImageOptions(**bad)
    assert str(info.value) == message
    assert ImageOptions(max_redirects=0, short_side=None, fetch_timeout=0.5).max_redirects == 0


# --- decoding, formats, resizing -----------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_every_supported_format_loads_as_rgb(make_image, fmt):
    img = load_pil(make_image(64, 48, fmt=fmt))
    assert img.mode == "RGB" and img.size == (64, 48)


def test_animated_gif_gives_first_frame():
    frames = [PILImage.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    img = load_pil(buf.getvalue())
    r, g, b = img.getpixel((10, 10))
    assert r > 200 and b < 50


def test_alpha_is_composited_on_white():
    img = load_pil(rgba_png())
    assert img.mode == "RGB"
    assert img.getpixel((10, 10)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((2000, 1000), (1344, 672)),
        ((1000, 3000), (672, 2016)),
        ((700, 701), (672, 673)),
        ((672, 5000), (672, 5000)),
        ((3000, 1500), (1344, 672)),
        ((1401, 4203), (672, 2016)),
    ],
)
def test_resize_keeps_aspect_ratio_and_short_side(make_image, size, expected):
    img = load_pil(make_image(*size, fmt="JPEG"))
    assert min(img.size) == min(expected)  # exact short side
    # the long side may differ by one pixel when a big JPEG is decoded at a reduced DCT scale
    assert abs(max(img.size) - max(expected)) <= 1 and (img.size[0] < img.size[1]) == (size[0] < size[1])
    assert abs(img.size[0] / img.size[1] - size[0] / size[1]) < 0.01


def test_short_side_option_and_none_disables(make_image):
    data = make_image(1200, 800, fmt="JPEG")
    assert load_pil(data, ImageOptions(short_side=336)).size == (504, 336)
    assert load_pil(data, ImageOptions(short_side=None)).size == (1200, 800)
    enc = encode_for_fal(data, ImageOptions(short_side=None))
    assert enc.data == data  # untouched


def test_small_images_never_upsized(make_image):
    assert load_pil(make_image(10, 5)).size == (10, 5)


def test_exif_orientation_applied(make_image):
    img = PILImage.new("RGB", (800, 700), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(img, "JPEG", exif=exif)
    assert load_pil(data).size == (672, 768)


def test_pil_source_is_not_mutated_or_returned():
    src = PILImage.new("RGBA", (1000, 800), (0, 0, 0, 0))
    out = load_pil(Image(src))
    assert out.size == (840, 672) and out.mode == "RGB" and out is not src
    assert src.size == (1000, 800) and src.mode == "RGBA"
    small = PILImage.new("RGB", (20, 20))
    assert load_pil(small) is not small


async def test_aload_pil_matches_load_pil(make_image, tmp_path):
    path = tmp_path / "x.webp"
    path.write_bytes(make_image(900, 1200, fmt="WEBP"))
    a, b = await aload_pil(str(path)), load_pil(path)
    assert a.size == b.size == (672, 896)
    with pytest.raises(ImageError, match="^lbl: unsupported"):
        await aload_pil(b"%PDF-1.0", label="lbl")


# --- encode_for_fal ------------------------------------------------------------------


def test_remote_url_passthrough_untouched():
    url = "https://example.com/cat.png?sig=abc"
    assert encode_for_fal(url) == url
    assert encode_for_fal(Image(url), ImageOptions(short_side=10)) == url


@pytest.mark.parametrize("fmt, mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_fitting_web_images_keep_their_bytes(make_image, fmt, mime):
    data = make_image(100, 80, fmt=fmt)
    enc = encode_for_fal(data)
    assert isinstance(enc, EncodedImage)
    assert enc.data == data and enc.mime_type == mime
    assert enc.sha256 == hashlib.sha256(data).hexdigest()
    assert enc.data_uri() == f"data:{mime};base64," + base64.b64encode(data).decode()
    assert "base64" not in repr(enc) and len(repr(enc)) < 60


def test_large_image_downsized_to_jpeg(make_image):
    enc = encode_for_fal(make_image(1600, 1200, fmt="PNG"))
    assert enc.mime_type == "image/jpeg"
    assert PILImage.open(io.BytesIO(enc.data)).size == (896, 672)


def test_large_alpha_image_downsized_to_png():
    enc = encode_for_fal(rgba_png(1400, 700))
    assert enc.mime_type == "image/png"
    out = PILImage.open(io.BytesIO(enc.data))
    assert out.size == (1344, 672) and out.mode == "RGBA"


@pytest.mark.parametrize("fmt", ["GIF", "BMP"])
def test_non_web_formats_reencoded(make_image, fmt):
    enc = encode_for_fal(make_image(50, 40, fmt=fmt))
    assert enc.mime_type in ("image/jpeg", "image/png")
    assert PILImage.open(io.BytesIO(enc.data)).size == (50, 40)


def test_pil_and_data_uri_and_path_sources(png_bytes, tmp_path):
    enc = encode_for_fal(PILImage.new("RGB", (30, 20), (1, 2, 3)))
    assert enc.mime_type == "image/jpeg"
    uri = "data:image/png;base64," + base64.b64encode(png_bytes).decode()
    assert encode_for_fal(uri).data == png_bytes
    p = tmp_path / "actually-png.jpg"
    p.write_bytes(png_bytes)
    assert encode_for_fal(str(p)).mime_type == "image/png"  # from the bytes, not the name


# --- labels --------------------------------------------------------------------------


def test_labeled_images_counts_per_message(png_bytes, jpeg_bytes):
    a, b, c, d = (Image(x) for x in (png_bytes, jpeg_bytes, png_bytes, jpeg_bytes))
    conv = Conversation(
        [
            Turn("system", ["be brief"]),
            Turn("user", [a, "first", b]),
            Turn("assistant", ["ok"]),
            Turn("user", ["and", c, d]),
        ]
    )
    got = labeled_images(conv)
    assert [label for label, _ in got] == [
        "image 1 of message 2",
        "image 2 of message 2",
        "image 1 of message 4",
        "image 2 of message 4",
    ]
    assert [img for _, img in got] == [a, b, c, d] == conv.images


@pytest.mark.filterwarnings("ignore::mantis_llm.prompt.MidConversationSystemWarning")  # the system turn is last
def test_labeled_images_follow_prompt_order_with_system_images(png_bytes):
    from mantis_llm.prompt import render

    s, u = Image(png_bytes), Image(png_bytes)
    conv = Conversation([Turn("user", [u, "hi"]), Turn("system", [s, "sys"])])
    assert [img for _, img in labeled_images(conv)] == render(conv).images == [s, u]
    assert [lbl for lbl, _ in labeled_images(conv)] == ["image 1 of message 2", "image 1 of message 1"]


# --- fetching from a real local server ------------------------------------------------


def test_fetch_image(other_host):
    base = other_host.url
    data = fetch(base + "/img.png")
    assert sniff_mime(data) == "image/png"
    assert fetch(base + "/octet") == data  # octet-stream is accepted, magic bytes decide


def test_fetch_follows_redirect_and_limits_redirects(other_host):
    base = other_host.url
    assert sniff_mime(fetch(base + "/redirect")) == "image/png"
    with pytest.raises(ImageError, match=r"could not fetch http://127\.0\.0\.1:\d+/loop: more than 3 redirects"):
        fetch(base + "/loop")
    with pytest.raises(ImageError, match="more than 0 redirects"):
        fetch(base + "/redirect", ImageOptions(max_redirects=0))
    with pytest.raises(ImageError, match=r"redirected to a non-http\(s\) URL"):
        fetch(base + "/to-file")


def test_fetch_rejects_html_and_fake_images(other_host):
    base = other_host.url
    with pytest.raises(ImageError, match=r"page\.html: the server sent text/html, not an image"):
        fetch(base + "/page.html")
    with pytest.raises(ImageError, match=r"fake\.png: unsupported image data: got an HTML page"):
        fetch(base + "/fake.png")


def test_fetch_status_error_strips_query(other_host):
    base = other_host.url
    with pytest.raises(ImageError) as info:
        fetch(base + "/missing.png?token=SECRET123#frag")
    msg = str(info.value)
    assert msg.endswith("/missing.png: HTTP 404") and "SECRET123" not in msg


def test_fetch_aborts_huge_bodies_early(other_host):
    base, handler = other_host.url, other_host
    opts = ImageOptions(max_bytes=100_000)
    with pytest.raises(ImageError, match=r"/declared-huge: the image is 1,000,000,000 bytes, more than"):
        fetch(base + "/declared-huge", opts)
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"/huge: the image is more than the limit of 100,000 bytes"):
        fetch(base + "/huge", opts)
    assert time.perf_counter() - start < 2.0
    deadline = time.monotonic() + 2
    while "/huge" not in handler.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    # The server offered 200 MiB; we hung up after ~100 KB (plus what socket buffers held).
    assert handler.sent["/huge"] < 40 * 2**20


def test_fetch_timeouts(other_host):
    base = other_host.url
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"/slow: timed out after 0\.3 s"):
        fetch(base + "/slow", ImageOptions(fetch_timeout=0.3))
    assert time.perf_counter() - start < 1.5
    start = time.perf_counter()  # bytes keep trickling in: the overall deadline still applies
    with pytest.raises(ImageError, match=r"/drip: timed out after 0\.5 s"):
        fetch(base + "/drip", ImageOptions(fetch_timeout=0.5))
    assert time.perf_counter() - start < 1.5


def test_fetch_connection_refused_and_bad_scheme():
    with pytest.raises(ImageError, match=r"^could not fetch http://127\.0\.0\.1:9/x\.png: ConnectError"):
        fetch("http://127.0.0.1:9/x.png?k=v", ImageOptions(fetch_timeout=2))
    with pytest.raises(ImageError, match="must be http"):
        fetch("file:///etc/passwd")


def test_caller_client_used_not_closed_and_no_authorization(other_host):
    base, handler = other_host.url, other_host
    with httpx.Client(headers={"Authorization": "Key SECRET"}) as client:
        fetch(base + "/img.png?auth-check", client=client)
        assert not client.is_closed
        fetch(base + "/img.png", client=client)
    seen = [h.headers for h in handler.seen if h.path == "/img.png?auth-check"]
    assert seen and "authorization" not in seen[-1]


def test_load_pil_and_encode_fetch_remote(other_host):
    base = other_host.url
    img = load_pil(base + "/img.png", label=LABEL)
    assert img.size == (64, 48) and img.mode == "RGB"
    enc = encode_for_fal(base + "/img.png", ImageOptions(fetch_remote=True))
    assert isinstance(enc, EncodedImage) and enc.mime_type == "image/png"
    with pytest.raises(ImageError, match=rf"^{LABEL}: could not fetch .*/page\.html: the server sent text/html"):
        encode_for_fal(base + "/page.html", ImageOptions(fetch_remote=True), label=LABEL)


async def test_async_fetch_paths(other_host):
    base = other_host.url
    assert sniff_mime(await afetch(base + "/redirect")) == "image/png"
    img = await aload_pil(base + "/img.png")
    assert img.size == (64, 48)
    async with httpx.AsyncClient() as client:
        await afetch(base + "/img.png", client=client)
        assert not client.is_closed
        with pytest.raises(ImageError, match=rf"^{LABEL}: could not fetch .*/loop: more than 3 redirects"):
            await aload_pil(base + "/loop", label=LABEL, client=client)
    with pytest.raises(ImageError, match=r"/slow: timed out after 0\.3 s"):
        await afetch(base + "/slow", ImageOptions(fetch_timeout=0.3))
    with pytest.raises(ImageError, match=r"/huge: the image is more than the limit"):
        await afetch(base + "/huge", ImageOptions(max_bytes=50_000))
