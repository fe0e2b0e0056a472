"""Fixtures shared by every test area: small images made in the test, never downloaded; a
FalEmulator with the environment pointing at it; an event-loop liveness probe."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
