"""Fixtures for the LlamaIndex adapter tests: a ``Mantis`` pointed at the FalEmulator (the
``emulator``/``emu`` fixtures are in tests/conftest.py), test images, and helpers that read
back what the emulator received (prompt and images, in order)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest

from mantis_llm.emulator import FalEmulator

# Distinct sizes, so an image found in a payload tells which input it was.
SIZES = {"red": (64, 48), "blue": (80, 60), "green": (50, 70), "yellow": (72, 40)}
COLORS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30), "yellow": (220, 200, 20)}


@pytest.fixture
def llm(emu):
    from mantis_llm.llama_index import Mantis

    m = Mantis()
    yield m
    m.close()


@pytest.fixture
def image_bytes(make_image):
    """``image_bytes(name, fmt="PNG")``: the encoded red/blue/green/yellow test image."""

    def make(name: str, fmt: str = "PNG") -> bytes:
        return make_image(*SIZES[name], COLORS[name], fmt)

    return make


@pytest.fixture
def images(tmp_path, image_bytes) -> dict[str, Path]:
    """Four PNG files with distinct sizes: red, blue, green, yellow."""
    out = {}
    for name in SIZES:
        out[name] = tmp_path / f"{name}.png"
        out[name].write_bytes(image_bytes(name))
    return out


class Received:
    """What the emulator received: payloads, prompts and image sizes, in order; plus a CDN upload."""

    sizes_by_name = SIZES

    def __init__(self, emu: FalEmulator) -> None:
        self.emu = emu

    def payload(self, index: int = -1) -> dict:
        subs = self.emu.submissions
        assert subs, "the emulator received no job"
        return subs[index].payload

    def prompt(self, index: int = -1) -> str:
        return self.payload(index)["prompt"]

    def image_size(self, ref: str) -> tuple[int, int]:
        """(width, height) of an image reference: a data URI or an emulator CDN URL."""
        from PIL import Image as PILImage

        if ref.startswith("data:"):
            data = base64.b64decode(ref.partition(",")[2])
        else:
            assert ref.startswith(self.emu.url), f"unexpected remote image URL {ref!r}"
            data = httpx.get(ref, timeout=10).content
        with PILImage.open(io.BytesIO(data)) as im:
            return im.size

    def sizes(self, index: int = -1) -> list[tuple[int, int]]:
        """Sizes of a job's images, in payload order."""
        return [self.image_size(img["image_url"]) for img in self.payload(index)["images"]]

    def upload(self, data: bytes, name: str = "image.png", mime: str = "image/png") -> str:
        """Put ``data`` on the emulator's CDN (as fal storage would) and return its http URL."""
        emu = self.emu
        with httpx.Client(timeout=10) as c:
            token = c.post(
                emu.rest_url + "/storage/auth/token",
                params={"storage_type": "fal-cdn-v3"},
                headers={"Authorization": f"Key {emu.key}"},
                json={},
            ).json()["token"]
            r = c.post(
                emu.cdn_url + "/files/upload",
                content=data,
                headers={"Authorization": f"Bearer {token}", "Content-Type": mime, "X-Fal-File-Name": name},
            )
            r.raise_for_status()
            return r.json()["access_url"]


@pytest.fixture
def received(emu) -> Received:
    return Received(emu)
