"""Fixtures shared by every test area: small images made in the test, never downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest


def make_image_bytes(width: int = 64, height: int = 48, color=(200, 30, 30), fmt: str = "PNG") -> bytes:
    """Encode a solid-colour image with a diagonal stripe (so it is not uniform)."""
    from PIL import Image as PILImage, ImageDraw

    img = PILImage.new("RGB", (width, height), color)
    ImageDraw.Draw(img).line((0, 0, width, height), fill=(255, 255, 255), width=3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


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


# Nothing in the tests may reach the Hugging Face Hub (no network here).
import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
