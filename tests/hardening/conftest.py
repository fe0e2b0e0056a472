"""Fixtures for the hardening suite: a closed port, a tiny local Mantis, and helpers that list
this process's threads and TCP sockets (from /proc, no psutil). The emulator (``fresh_emu``)
and the other host (``other_host``) come from tests/conftest.py."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mantis_llm.testing import make_image_bytes  # noqa: E402

FAL_ENV = ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "FAL_QUEUE_URL", "FAL_RUN_URL", "FAL_REST_URL", "FAL_CDN_URL")


def png(width: int = 40, height: int = 30, color=(10, 160, 90), fmt: str = "PNG") -> bytes:
    """``make_image_bytes`` with this suite's defaults (a small green picture)."""
    return make_image_bytes(width, height, color, fmt)


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
def limited_backend(tiny_model):
    """A loaded local backend with tight fetch limits (1 MB, 1 s, 2 redirects) and 4-token answers."""
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
