"""Fixtures shared by every test area: small images made in the test, never downloaded; a
FalEmulator with the environment pointing at it; an event-loop liveness probe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mantis_llm.testing import make_image_bytes

# Nothing in the tests may reach the Hugging Face Hub (no network here); set before any test
# module imports huggingface_hub, which reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def make_image():
    """Factory: ``make_image(width, height, color, fmt) -> bytes``."""
    return make_image_bytes


@pytest.fixture
def png_bytes() -> bytes:
    return make_image_bytes(64, 48, (200, 30, 30), "PNG")


@pytest.fixture
def jpeg_bytes() -> bytes:
    return make_image_bytes(80, 60, (30, 30, 200), "JPEG")


@pytest.fixture
def image_files(tmp_path: Path) -> list[Path]:
    """Two image files on disk: a red PNG and a blue JPEG."""
    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    red.write_bytes(make_image_bytes(64, 48, (200, 30, 30), "PNG"))
    blue.write_bytes(make_image_bytes(80, 60, (30, 30, 200), "JPEG"))
    return [red, blue]


@pytest.fixture(scope="module")
def emulator():
    """One FalEmulator per test module (10 ms jobs); tests reset it before use (see ``emu``)."""
    from mantis_llm.emulator import FalEmulator

    with FalEmulator(service_time=0.01) as emu:
        yield emu


@pytest.fixture
def emu(emulator, monkeypatch: pytest.MonkeyPatch):
    """The module's emulator, reset, with FAL_* pointing at it for this test (reset again after)."""
    emulator.reset()
    for name in ("FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    yield emulator
    emulator.reset()


class LoopTicker:
    """``async with LoopTicker(interval) as t:`` counts, in ``t.ticks``, how often a task that
    sleeps ``interval`` seconds got to run meanwhile: few ticks mean the event loop was blocked."""

    def __init__(self, interval: float) -> None:
        self.interval, self.ticks = interval, 0

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.ticks += 1

    async def __aenter__(self) -> LoopTicker:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@pytest.fixture
def loop_ticker() -> type[LoopTicker]:
    """The ``LoopTicker`` class: ``async with loop_ticker(0.01) as t: ...; assert t.ticks > n``."""
    return LoopTicker


# ----------------------------------------------------------------------------- markers

# Fixtures that load the tiny local model (torch): a test asking for one is ``local`` and ``slow``.
LOCAL_FIXTURES = {
    "tiny_model",
    "local_backend",
    "limited_backend",
    "tiny_clip",
    "clip_backend",
    "backends",
    "tools_backend",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark what needs a model, a server process or a notebook run, so that
    ``pytest -m "not slow"`` is the inner loop (see CONTRIBUTING.md)."""
    for item in items:
        parts = Path(str(item.path)).parts
        fixtures = set(getattr(item, "fixturenames", ()))
        if str(item.path).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebook)
            item.add_marker(pytest.mark.slow)
        if "local" in parts or fixtures & LOCAL_FIXTURES or item.get_closest_marker("local"):
            item.add_marker(pytest.mark.local)
            item.add_marker(pytest.mark.slow)
        if "openai" in parts or "hardening" in parts:
            item.add_marker(pytest.mark.slow)


# ----------------------------------------------------------------------------- another host


@dataclass
class Seen:
    path: str
    headers: dict[str, str]  # lower-case names


@dataclass
class OtherHost:
    """A plain HTTP server on 127.0.0.1 that is not fal. ``seen`` records every request."""

    url: str
    image: bytes
    seen: list[Seen] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)  # bytes written per pumped path
    endless_sent: list[int] = field(default_factory=list)  # bytes written per /endless request


class _OtherHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", "text/plain", {"Location": location})

    def _pump(self, total: int, block: bytes) -> int:
        sent = 0
        try:
            while sent < total:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass
        return sent

    def do_GET(self) -> None:  # noqa: C901 - a route table
        host: OtherHost = self.server.host  # type: ignore[attr-defined]
        host.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = self.path.split("?")[0]
        png_zeros = host.image[:8] + bytes(2**16 - 8)  # a PNG signature, then zeros
        if path.startswith("/img"):
            return self._send(200, host.image, "image/png")
        if path == "/octet":
            return self._send(200, host.image, "application/octet-stream")
        if path == "/page.html":
            return self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html; charset=utf-8")
        if path == "/fake.png":  # claims to be a PNG, is a web page
            return self._send(200, b"<!doctype html><html><body>gotcha</body></html>", "image/png")
        if path == "/pdf":
            return self._send(200, b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF\n", "application/octet-stream")
        if path == "/redirect":
            return self._redirect("/img.png")
        if path == "/loop":
            return self._redirect("/loop")
        if path.startswith("/loop/"):
            return self._redirect(f"/loop/{int(path.rsplit('/', 1)[-1] or 0) + 1}")
        if path == "/to-file":
            return self._redirect("file:///etc/passwd")
        if path.startswith("/hop/"):  # /hop/N redirects N times, then serves the image
            n = int(path.rsplit("/", 1)[-1])
            return self._send(200, host.image, "image/png") if n <= 0 else self._redirect(f"/hop/{n - 1}")
        if path == "/huge-declared":  # a Content-Length of 1 TB, and no body
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        if path == "/declared-huge":  # a Content-Length of 1 GB, and the body being sent
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            host.sent[path] = self._pump(10**9, png_zeros)
            return
        if path == "/huge":  # no Content-Length: the size is only known while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            host.sent[path] = self._pump(200 * 2**20, png_zeros)
            return
        if path == "/endless":  # a PNG header, then zeros forever (chunked, no length)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            block = b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 - 8)
            sent = self._pump(2 * 10**9, b"%X\r\n%s\r\n" % (len(block), block))
            host.endless_sent.append(sent)
            self.close_connection = True
            return
        if path == "/slow":  # answers after 3 s
            time.sleep(3)
            return self._send(200, host.image, "image/png")
        if path == "/stall":  # accept, then never answer
            time.sleep(5)
            self.close_connection = True
            return
        if path == "/drip":  # a PNG start, then a byte every 0.1 s
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(host.image[:16])
                for _ in range(40):
                    time.sleep(0.1)
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:
                pass
            return
        self._send(404, b"not found", "text/plain")


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients hanging up early is the point
        pass


@pytest.fixture
def other_host():
    """The one test HTTP server: another host on 127.0.0.1 (not fal) serving /img*.png (a real
    PNG, 64x48), /octet, /page.html, /fake.png, /pdf, /redirect, /loop, /loop/N, /to-file,
    /hop/N, /huge-declared, /declared-huge, /huge, /endless, /slow, /stall and /drip, and
    recording every request's path and headers."""
    server = _QuietServer(("127.0.0.1", 0), _OtherHandler)
    host = OtherHost(url=f"http://127.0.0.1:{server.server_address[1]}", image=make_image_bytes(64, 48, (10, 200, 10)))
    server.host = host  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def fresh_emu(monkeypatch: pytest.MonkeyPatch):
    """A new FalEmulator for this test alone (10 ms jobs), with FAL_* pointing at it (the
    shared ``emu`` is one emulator per module, reset around each test)."""
    from mantis_llm.testing import FalEmulator

    with FalEmulator(service_time=0.01) as e:
        for name in ("FAL_KEY_ID", "FAL_KEY_SECRET"):
            monkeypatch.delenv(name, raising=False)
        for name, value in e.env().items():
            monkeypatch.setenv(name, value)
        yield e


# ----------------------------------------------------------------------------- tiny local model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random-weight Mantis every test area shares (CLIP 32px / patch 8: 16 tokens per
    image, context 512, saved with save_pretrained). Built once per session, nothing downloaded."""
    pytest.importorskip("torch", reason='needs the local extra: pip install "mantis-llm[local]"')
    from mantis_llm.testing import build_tiny_mantis

    return build_tiny_mantis(tmp_path_factory.mktemp("tiny-mantis") / "clip", vision="clip")


@pytest.fixture(scope="session")
def local_backend(tiny_model):
    """A loaded TransformersBackend on ``tiny_model``, shared by the tests that neither close
    nor reconfigure it."""
    from mantis_llm import TransformersBackend

    backend = TransformersBackend(model=tiny_model).load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def tools_backend(tmp_path_factory):
    """A loaded TransformersBackend on the tiny model with a 2,048-token context: its tokenizer
    spends one token per byte, so a tool catalog and a conversation need more than 512."""
    pytest.importorskip("torch", reason='needs the local extra: pip install "mantis-llm[local]"')
    from mantis_llm import TransformersBackend
    from mantis_llm.testing import build_tiny_mantis

    path = build_tiny_mantis(tmp_path_factory.mktemp("tiny-mantis-2k") / "clip", max_position_embeddings=2048)
    backend = TransformersBackend(model=path).load()
    yield backend
    backend.close()
