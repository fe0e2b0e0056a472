"""Turn any :class:`~mantis_llm.types.Image` into what a backend needs, within limits.

* fal: :func:`encode_for_fal` returns an http(s) URL unchanged (unless
  ``ImageOptions.fetch_remote``) or an :class:`EncodedImage` (original bytes when they already
  fit, else downsized and re-encoded) for a data URI or an upload.
* local: :func:`load_pil` / :func:`aload_pil` return an RGB PIL image (alpha composited on
  white), downsized so its shorter side is at most ``short_side``.

Supported formats: JPEG, PNG, WEBP, GIF (animated GIFs: the first frame only) and BMP.
Anything else (PDF, SVG, HTML/text, unknown or empty bytes, corrupt or truncated data,
more than ``max_bytes`` or ``max_pixels``) raises :class:`~mantis_llm.errors.ImageError`,
whose message starts with the image's label ("image 2 of message 3: ...") when one is given.

PIL is imported inside the functions, so importing this module stays cheap. The pixel
limit is checked from the image header before anything is decoded. PIL's own global
``Image.MAX_IMAGE_PIXELS`` still applies on top of ``max_pixels`` (its bomb error is also
turned into an :class:`ImageError`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import httpx

from ._mime import SUPPORTED_MIME, describe, sniff_mime
from ._validate import UNSET, check_option, is_positive_int
from ._version import USER_AGENT
from .errors import ImageError
from .types import Image

if TYPE_CHECKING:  # pragma: no cover
    from PIL.Image import Image as PILImage


WEB_MIME = ("image/jpeg", "image/png", "image/webp")  # sent to fal as they are when they fit
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageOptions:
    """Limits and preprocessing applied to every image.

    ``max_bytes`` caps the encoded size (also while downloading), ``max_pixels`` the decoded
    width*height (decompression bombs). ``short_side`` downsizes images whose shorter side
    is larger (aspect ratio kept; ``None`` disables). ``fetch_remote`` makes the fal backend
    download and resize http(s) URLs instead of passing them through. ``fetch_timeout``
    bounds each connect/read and the whole download; at most ``max_redirects`` redirects
    are followed.
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    short_side: int | None = 672
    fetch_remote: bool = False
    fetch_timeout: float = 10.0
    max_redirects: int = 3

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            check_option(ok, f"ImageOptions.{name}", what, getattr(self, name))

        check("max_bytes", is_positive_int(self.max_bytes), "a positive integer")
        check("max_pixels", is_positive_int(self.max_pixels), "a positive integer")
        r = self.max_redirects
        check("max_redirects", isinstance(r, int) and not isinstance(r, bool) and r >= 0, "a non-negative integer")
        check("short_side", self.short_side is None or is_positive_int(self.short_side), "a positive integer or None")
        t = self.fetch_timeout
        check(
            "fetch_timeout",
            not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < float("inf"),
            "a positive number",
        )
        check("fetch_remote", isinstance(self.fetch_remote, bool), "True or False")


DEFAULT_OPTIONS = ImageOptions()


def image_options_arg(image_options: ImageOptions | None, image_short_side: Any = UNSET) -> ImageOptions:
    """The ``image_options`` / ``image_short_side`` pair every backend's constructor takes,
    checked and merged: ``image_short_side`` (``None`` disables downsizing) overrides the
    options' ``short_side`` when given."""
    check_option(
        image_options is None or isinstance(image_options, ImageOptions),
        "image_options",
        "a mantis_llm.images.ImageOptions or None",
        image_options,
    )
    options = image_options or ImageOptions()
    if image_short_side is not UNSET:
        options = replace(options, short_side=image_short_side)  # ImageOptions checks it
    return options


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image bytes ready to send (as a data URI or an upload)."""

    data: bytes = field(repr=False)
    mime_type: str

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of ``data`` (cache key for uploads)."""
        return hashlib.sha256(self.data).hexdigest()

    def data_uri(self) -> str:
        """``data:<mime>;base64,<data>``."""
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"

    def __repr__(self) -> str:
        return f"EncodedImage({self.mime_type}, {len(self.data)} bytes)"


# ---------------------------------------------------------------------------------------
# sniffing and labels


@contextmanager
def _labeled(label: str | None) -> Iterator[None]:
    """Prefix the message of any ImageError raised inside with ``label``."""
    try:
        yield
    except ImageError as exc:
        if not label or exc.message.startswith(label + ":"):
            raise
        raise ImageError(
            f"{label}: {exc.message}", request_id=exc.request_id, status_code=exc.status_code, detail=exc.detail
        ) from None


def _as_image(image: Any) -> Image:
    return image if isinstance(image, Image) else Image(image)


def _safe_url(url: Any) -> str:
    """The URL without credentials, query string or fragment (safe to put in messages)."""
    try:
        u = httpx.URL(str(url))
        return str(u.copy_with(query=None, fragment=None, userinfo=b""))
    except Exception:
        return str(url).split("?", 1)[0].split("#", 1)[0][:200]


# ---------------------------------------------------------------------------------------
# validation and decoding (PIL imported lazily)


def _check_bytes(data: bytes, options: ImageOptions) -> str:
    """Check size and format from the bytes alone; return the sniffed mime type."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > options.max_bytes:
        raise ImageError(f"the image is {len(data):,} bytes, more than the limit of {options.max_bytes:,}")
    mime = sniff_mime(data)
    if mime not in SUPPORTED_MIME:
        raise ImageError(f"unsupported image data: got {describe(mime)}; expected JPEG, PNG, WEBP, GIF or BMP")
    return mime


def _check_pixels(width: int, height: int, options: ImageOptions) -> None:
    if width * height > options.max_pixels:
        raise ImageError(
            f"the image is {width}x{height} = {width * height:,} pixels, more than the limit of {options.max_pixels:,}"
        )


def _decode(data: bytes, options: ImageOptions) -> tuple[PILImage, str]:
    """Validate and fully decode ``data`` (first frame); return the PIL image and its mime.

    Large JPEGs are decoded at a reduced DCT scale (``draft``) that still leaves the shorter
    side at least ``short_side``, which is several times faster and loses nothing we keep.
    """
    from PIL import Image as PIL

    mime = _check_bytes(data, options)
    try:
        img = PIL.open(io.BytesIO(data), formats=_PIL_FORMATS)
        w, h = img.size
        _check_pixels(w, h, options)  # header only, nothing decoded yet
        if mime == "image/jpeg" and options.short_side and min(w, h) > 2 * options.short_side:
            scale = options.short_side / min(w, h)
            img.draft(img.mode, (max(1, int(w * scale) + 1), max(1, int(h * scale) + 1)))
        img.load()  # full decode: truncated or corrupt data fails here
    except ImageError:
        raise
    except PIL.DecompressionBombError as exc:
        raise ImageError(f"the image is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, MemoryError) as exc:
        raise ImageError(f"the {mime.split('/')[1].upper()} data is corrupt or truncated ({exc})") from None
    return img, mime


def _has_alpha(img: PILImage) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _normalise_mode(img: PILImage) -> PILImage:
    """RGB, or RGBA when the image has transparency (also lets LANCZOS work on palettes)."""
    want = "RGBA" if _has_alpha(img) else "RGB"
    if img.mode == want:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert(want)


def _resize(img: PILImage, short_side: int | None) -> PILImage:
    """Downsize so the shorter side is ``short_side`` (aspect ratio kept); never upsize."""
    w, h = img.size
    if short_side is None or min(w, h) <= short_side:
        return img
    from PIL import Image as PIL

    if w <= h:
        size = (short_side, max(1, round(h * short_side / w)))
    else:
        size = (max(1, round(w * short_side / h)), short_side)
    return _normalise_mode(img).resize(size, PIL.Resampling.LANCZOS)


def _exif_upright(img: PILImage) -> PILImage:
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:  # a broken EXIF block must not make a good image unusable
        return img


def _to_rgb(img: PILImage) -> PILImage:
    """RGB, with any transparency composited on white."""
    img = _normalise_mode(img)
    if img.mode == "RGBA":
        from PIL import Image as PIL

        bg = PIL.new("RGB", img.size, (255, 255, 255))
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img


def _encode(img: PILImage) -> EncodedImage:
    """JPEG q=90, or PNG when the image has transparency."""
    img = _normalise_mode(img)
    buf = io.BytesIO()
    if img.mode == "RGBA":
        img.save(buf, format="PNG", optimize=False)
        return EncodedImage(buf.getvalue(), "image/png")
    img.save(buf, format="JPEG", quality=90)
    return EncodedImage(buf.getvalue(), "image/jpeg")


def _pil_from_source(img: Image, options: ImageOptions) -> PILImage:
    """Validate a PIL-sourced Image (without touching the caller's object)."""
    pil = img.source
    _check_pixels(pil.width, pil.height, options)
    try:
        pil.load()
    except Exception as exc:
        raise ImageError(f"the PIL image cannot be loaded ({exc})") from None
    return pil


def _load_from_bytes(data: bytes, options: ImageOptions) -> PILImage:
    pil, _ = _decode(data, options)
    return _to_rgb(_resize(_exif_upright(pil), options.short_side))


def _load_local(img: Image, options: ImageOptions) -> PILImage:
    if img.kind == "pil":
        pil = _pil_from_source(img, options)
        out = _to_rgb(_resize(pil, options.short_side))
        return out.copy() if out is pil else out  # never hand back the caller's object
    return _load_from_bytes(img.data, options)


# ---------------------------------------------------------------------------------------
# public entry points


def load_pil(
    image: Any,
    options: ImageOptions = DEFAULT_OPTIONS,
    *,
    label: str | None = None,
    client: httpx.Client | None = None,
) -> PILImage:
    """An RGB PIL image, validated and downsized; http(s) URLs are fetched with limits."""
    with _labeled(label):
        img = _as_image(image)
        if img.is_remote:
            return _load_from_bytes(fetch(img.source, options, client=client), options)
        return _load_local(img, options)


async def aload_pil(
    image: Any,
    options: ImageOptions = DEFAULT_OPTIONS,
    *,
    label: str | None = None,
    client: httpx.AsyncClient | None = None,
) -> PILImage:
    """Async :func:`load_pil`: fetches with httpx's async client, decodes in a thread."""
    with _labeled(label):
        img = _as_image(image)
        if img.is_remote:
            data = await afetch(img.source, options, client=client)
            return await asyncio.to_thread(_load_from_bytes, data, options)
        return await asyncio.to_thread(_load_local, img, options)


def encode_for_fal(
    image: Any,
    options: ImageOptions = DEFAULT_OPTIONS,
    *,
    label: str | None = None,
    client: httpx.Client | None = None,
) -> str | EncodedImage:
    """What fal's ``image_url`` needs: the http(s) URL as given, or encoded bytes.

    Local images whose format is JPEG/PNG/WEBP and whose shorter side already fits are
    returned byte for byte (after a full validation decode); others are downsized
    (LANCZOS, aspect ratio kept) and re-encoded as JPEG q=90, or PNG when they have
    transparency. With ``fetch_remote`` URLs are downloaded and treated the same way.
    """
    with _labeled(label):
        img = _as_image(image)
        if img.is_remote and not options.fetch_remote:
            return str(img.source)
        if img.kind == "pil":
            return _encode(_resize(_pil_from_source(img, options), options.short_side))
        data = fetch(img.source, options, client=client) if img.is_remote else img.data
        return _encode_bytes(data, options)


def encode_bytes(data: bytes, options: ImageOptions = DEFAULT_OPTIONS, *, label: str | None = None) -> EncodedImage:
    """Validate encoded image bytes and return them as they are when they already fit and fal
    takes their format, else downsized and re-encoded (see :func:`encode_for_fal`)."""
    with _labeled(label):
        return _encode_bytes(data, options)


def _encode_bytes(data: bytes, options: ImageOptions) -> EncodedImage:
    pil, mime = _decode(data, options)
    fits = options.short_side is None or min(pil.size) <= options.short_side
    if fits and mime in WEB_MIME:
        return EncodedImage(data, mime)
    return _encode(_resize(_exif_upright(pil), options.short_side))


# ---------------------------------------------------------------------------------------
# fetching: one sans-I/O download state machine, driven by a thin sync and async loop

_REDIRECTS = (301, 302, 303, 307, 308)
_BINARY_TYPES = ("application/octet-stream", "binary/octet-stream", "application/binary")


class Download:
    """The rules of one download, sans-I/O: what to request, and what each response means.

    Driven by :func:`fetch`/:func:`afetch` here and by the fal backend's flows.
    """

    def __init__(self, url: str, options: ImageOptions) -> None:
        self.options = options
        self.url = self._checked(url)
        self.hops = 0
        self.deadline = time.monotonic() + options.fetch_timeout
        self.body = bytearray()

    @staticmethod
    def _checked(url: Any) -> httpx.URL:
        try:
            u = httpx.URL(str(url))
        except (httpx.InvalidURL, TypeError, ValueError):
            raise ImageError(f"invalid image URL {_safe_url(url)!r}") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise ImageError(f"image URLs must be http(s), not {_safe_url(url)!r}")
        return u

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.options.fetch_timeout)

    def request(self) -> httpx.Request:
        """The next GET, built without any client's default headers, cookies or credentials
        (they must never reach an image host; send it with ``auth=httpx.Auth()``)."""
        req = httpx.Request("GET", self.url, headers={"Accept": "image/*", "User-Agent": USER_AGENT})
        req.extensions["timeout"] = self.timeout().as_dict()
        return req

    def error(self, what: str) -> ImageError:
        return ImageError(f"could not fetch {_safe_url(self.url)}: {what}")

    def on_head(self, resp: httpx.Response) -> bool:
        """Check status and headers; return True to follow a redirect (``self.url`` updated)."""
        if time.monotonic() > self.deadline:
            raise self.error(f"timed out after {self.options.fetch_timeout:g} s")
        if resp.status_code in _REDIRECTS and "location" in resp.headers:
            self.hops += 1
            if self.hops > self.options.max_redirects:
                raise self.error(f"more than {self.options.max_redirects} redirects")
            try:
                nxt = resp.url.join(resp.headers["location"])
            except httpx.InvalidURL:
                raise self.error("invalid redirect location") from None
            if nxt.scheme not in ("http", "https"):
                raise self.error(f"redirected to a non-http(s) URL ({nxt.scheme}:)")
            self.url = nxt
            return True
        if not resp.is_success:
            raise self.error(f"HTTP {resp.status_code}")
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype and not ctype.startswith("image/") and ctype not in _BINARY_TYPES:
            raise self.error(f"the server sent {ctype}, not an image")
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.options.max_bytes:
            raise self.error(f"the image is {int(length):,} bytes, more than the limit of {self.options.max_bytes:,}")
        return False

    def on_chunk(self, chunk: bytes) -> None:
        self.body += chunk
        if len(self.body) > self.options.max_bytes:
            raise self.error(f"the image is more than the limit of {self.options.max_bytes:,} bytes")
        if time.monotonic() > self.deadline:
            raise self.error(f"timed out after {self.options.fetch_timeout:g} s")

    def finish(self) -> bytes:
        data = bytes(self.body)
        try:
            _check_bytes(data, self.options)
        except ImageError as exc:
            raise self.error(exc.message) from None
        return data

    @contextmanager
    def translate(self) -> Iterator[None]:
        """Turn every httpx error into an ImageError naming the (query-less) URL."""
        try:
            yield
        except httpx.TimeoutException:
            raise self.error(f"timed out after {self.options.fetch_timeout:g} s") from None
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
            raise self.error(type(exc).__name__) from None


def fetch(url: str, options: ImageOptions = DEFAULT_OPTIONS, *, client: httpx.Client | None = None) -> bytes:
    """Download an http(s) image with limits (timeouts, redirects, size, type)."""
    dl = Download(url, options)
    with httpx.Client(timeout=dl.timeout()) if client is None else nullcontext(client) as client:
        while True:
            with dl.translate():
                resp = client.send(dl.request(), stream=True, follow_redirects=False, auth=httpx.Auth())
                try:
                    if dl.on_head(resp):
                        continue
                    for chunk in resp.iter_bytes():
                        dl.on_chunk(chunk)
                finally:
                    resp.close()
            return dl.finish()


async def afetch(
    url: str, options: ImageOptions = DEFAULT_OPTIONS, *, client: httpx.AsyncClient | None = None
) -> bytes:
    """Async :func:`fetch`."""
    dl = Download(url, options)
    async with httpx.AsyncClient(timeout=dl.timeout()) if client is None else nullcontext(client) as client:
        while True:
            with dl.translate():
                resp = await client.send(dl.request(), stream=True, follow_redirects=False, auth=httpx.Auth())
                try:
                    if dl.on_head(resp):
                        continue
                    async for chunk in resp.aiter_bytes():
                        dl.on_chunk(chunk)
                finally:
                    await resp.aclose()
            return dl.finish()


__all__ = [
    "ImageOptions",
    "EncodedImage",
    "SUPPORTED_MIME",
    "sniff_mime",
    "load_pil",
    "aload_pil",
    "encode_for_fal",
    "encode_bytes",
    "Download",
    "fetch",
    "afetch",
]
