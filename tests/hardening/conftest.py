"""Fixtures for the hardening suite: a FalEmulator with the environment pointing at it, a
second local HTTP server playing "another host" (images, HTML, endless bodies, redirects,
stalls; it records every request's headers), a closed port, a tiny local Mantis, and
helpers that list this process's threads and TCP sockets (from /proc, no psutil)."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mantis_llm.emulator import FalEmulator  # noqa: E402
from mantis_llm.testing import make_image_bytes  # noqa: E402

FAL_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "FAL_QUEUE_URL", "FAL_RUN_URL", "FAL_REST_URL", "FAL_CDN_URL")


def png(width: int = 40, height: int = 30, color=(10, 160, 90), fmt: str = "PNG") -> bytes:
    """``make_image_bytes`` with this suite's defaults (a small green picture)."""
    return make_image_bytes(width, height, color, fmt)


# ----------------------------------------------------------------------------- emulator


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch):
    """A fresh emulator (10 ms jobs) with FAL_* pointing at it for this test."""
    with FalEmulator(service_time=0.01) as e:
        for name in FAL_ENV:
            monkeypatch.delenv(name, raising=False)
        for name, value in e.env().items():
            monkeypatch.setenv(name, value)
        yield e


# ----------------------------------------------------------------------------- another host


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


@dataclass
class OtherHost:
    """A plain HTTP server on 127.0.0.1 that is not fal. ``seen`` records every request."""

    url: str
    seen: list[Seen] = field(default_factory=list)
    endless_sent: list[int] = field(default_factory=list)  # bytes written per /endless request
    image: bytes = b""


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

    def do_GET(self) -> None:  # noqa: N802
        host: OtherHost = self.server.host  # type: ignore[attr-defined]
        host.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = self.path.split("?")[0]
        if path.startswith("/img"):
            return self._send(200, host.image, "image/png")
        if path == "/page.html":
            return self._send(200, b"<!doctype html><html><body>not an image</body></html>", "text/html; charset=utf-8")
        if path == "/fake.png":  # claims to be a PNG, is a web page
            return self._send(200, b"<!doctype html><html><body>gotcha</body></html>", "image/png")
        if path == "/pdf":
            return self._send(200, b"%PDF-1.4\n1 0 obj<<>>endobj\n%%EOF\n", "application/octet-stream")
        if path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
            return
        if path == "/endless":  # a PNG header, then zeros forever (chunked, no length)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent, block = 0, b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 - 8)
            try:
                while sent < 2 * 10**9:
                    self.wfile.write(b"%X\r\n%s\r\n" % (len(block), block))
                    sent += len(block)
            except OSError:
                pass
            finally:
                host.endless_sent.append(sent)
                self.close_connection = True
            return
        if path == "/stall":  # accept, then never answer
            time.sleep(5)
            self.close_connection = True
            return
        if path.startswith("/loop"):
            n = int(path.rsplit("/", 1)[-1] or 0) if path.count("/") > 1 else 0
            return self._send(302, b"", "text/plain", {"Location": f"/loop/{n + 1}"})
        if path == "/to-file":
            return self._send(302, b"", "text/plain", {"Location": "file:///etc/passwd"})
        if path.startswith("/hop/"):  # /hop/N redirects N times, then serves the image
            n = int(path.rsplit("/", 1)[-1])
            if n <= 0:
                return self._send(200, host.image, "image/png")
            return self._send(302, b"", "text/plain", {"Location": f"/hop/{n - 1}"})
        self._send(404, b"not found", "text/plain")


@pytest.fixture
def other_host():
    """Another host on 127.0.0.1 serving /img*.png (a real PNG), /page.html, /fake.png,
    /pdf, /huge-declared, /endless, /stall, /loop, /to-file and /hop/N."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtherHandler)
    server.daemon_threads = True
    host = OtherHost(url=f"http://127.0.0.1:{server.server_address[1]}", image=png())
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
def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- local model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight Mantis (CLIP 32px, 16 tokens per image, context 512)."""
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    from mantis_llm.testing import build_tiny_mantis

    return build_tiny_mantis(tmp_path_factory.mktemp("hardening-tiny") / "clip")


@pytest.fixture(scope="session")
def local_backend(tiny_model):
    """A loaded local backend with tight fetch limits (1 MB, 1 s, 2 redirects)."""
    from mantis_llm.backends.local import TransformersBackend
    from mantis_llm.images import ImageOptions

    options = ImageOptions(max_bytes=2**20, fetch_timeout=1.0, max_redirects=2)
    backend = TransformersBackend(model=tiny_model, image_options=options, default_max_tokens=4).load()
    yield backend
    backend.close()


# ----------------------------------------------------------------------------- leaks


def _addr(hex_addr: str) -> tuple[str, int]:
    ip, port = hex_addr.split(":")
    return ip, int(port, 16)


def tcp_sockets() -> list[tuple[int, int, str]]:
    """(local port, remote port, state) of every TCP socket this process holds open."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                out.append((_addr(f[1])[1], _addr(f[2])[1], f[3]))
    return out


def socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


@dataclass
class Snapshot:
    threads: set[int]
    sockets: int

    @classmethod
    def take(cls) -> Snapshot:
        return cls({t.ident for t in threading.enumerate() if t.is_alive()}, socket_fds())

    def leftovers(self, wait: float = 3.0) -> tuple[list[str], int]:
        """(names of threads started since, extra socket fds), after waiting for them to end."""
        deadline = time.monotonic() + wait
        while True:
            threads = [t.name for t in threading.enumerate() if t.is_alive() and t.ident not in self.threads]
            extra = socket_fds() - self.sockets
            if (not threads and extra <= 0) or time.monotonic() > deadline:
                return threads, extra
            time.sleep(0.05)
