"""A real HTTP server on 127.0.0.1 for image-fetch tests (threaded, module-scoped)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mantis_llm.testing import make_image_bytes

PNG = make_image_bytes(64, 48, (10, 200, 10))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []  # request headers, for assertions
    sent: dict[str, int] = {}

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/png", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: C901 - a route table
        type(self).seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        path = self.path.split("?")[0]
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/octet":
            self._send(200, PNG, "application/octet-stream")
        elif path == "/page.html":
            self._send(200, b"<!doctype html><html><body>hi</body></html>", "text/html; charset=utf-8")
        elif path == "/fake.png":
            self._send(200, b"<!doctype html><html><body>not really</body></html>", "image/png")
        elif path == "/redirect":
            self._send(302, b"", "text/plain", Location="/img.png")
        elif path == "/loop":
            self._send(302, b"", "text/plain", Location="/loop")
        elif path == "/to-file":
            self._send(302, b"", "text/plain", Location="file:///etc/passwd")
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self._pump(10**9)
        elif path == "/huge":  # no Content-Length: the size is only known while streaming
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            self._pump(200 * 2**20)
        elif path == "/slow":
            time.sleep(3)
            self._send(200, PNG)
        elif path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                self.wfile.write(PNG[:16])
                for _ in range(40):
                    time.sleep(0.1)
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:
                pass
        else:
            self._send(404, b"not found", "text/plain")

    def _pump(self, total: int) -> None:
        block = PNG[:8] + b"\0" * (2**16 - 8)
        sent = 0
        try:
            while sent < total:
                self.wfile.write(block)
                sent += len(block)
        except OSError:
            pass
        type(self).sent[self.path] = sent


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # clients hanging up early is the point
        pass


@pytest.fixture(scope="module")
def http_server():
    """Base URL of a threaded server with image, HTML, huge, redirecting and slow routes."""
    _Handler.seen = []
    _Handler.sent = {}
    server = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Handler
    finally:
        server.shutdown()
        server.server_close()
