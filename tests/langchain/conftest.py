"""Fixtures for the LangChain adapter tests: offline serving of the images the langchain-tests
suites download. The tiny local model (``local_backend``) and the FalEmulator fixtures
(``emulator``, ``emu``) are in tests/conftest.py."""

from __future__ import annotations

import io

import httpx
import pytest

# The standard integration tests download this picture (test_image_inputs and friends) and,
# with supports_image_urls, pass the URL itself to the model. We serve a local picture for
# it, at the transport level, so the test's own httpx.get and our image fetcher both see it.
OFFLINE_HOSTS = ("raw.githubusercontent.com", "upload.wikimedia.org", "www.w3.org")


def picture_bytes(width: int = 96, height: int = 64) -> bytes:
    """A small decodable PNG with some structure (stands in for the suites' downloads)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (40, 120, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle((10, 10, width // 2, height // 2), fill=(250, 220, 40))
    draw.line((0, height, width, 0), fill=(255, 255, 255), width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


PICTURE = picture_bytes()


@pytest.fixture(scope="session")
def picture() -> bytes:
    """The PNG served for the suites' image downloads."""
    return PICTURE


def _offline_response(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=PICTURE, headers={"content-type": "image/png"}, request=request)


@pytest.fixture(autouse=True)
def offline_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answer GETs to the suites' image hosts with PICTURE; everything else (127.0.0.1) goes
    through the real transport. Any other host fails loudly instead of reaching the network."""
    real_sync = httpx.HTTPTransport.handle_request
    real_async = httpx.AsyncHTTPTransport.handle_async_request

    def guard(request: httpx.Request) -> httpx.Response | None:
        if request.url.host in OFFLINE_HOSTS:
            return _offline_response(request)
        if request.url.host not in ("127.0.0.1", "localhost"):
            raise httpx.ConnectError(f"offline test: refused {request.url.host}", request=request)
        return None

    def handle_request(self, request):
        return guard(request) or real_sync(self, request)

    async def handle_async_request(self, request):
        return guard(request) or await real_async(self, request)

    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", handle_request)
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", handle_async_request)
