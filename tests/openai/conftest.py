"""Fixtures for the OpenAI-compatible route: tiny Mantis models prepared with ``prepare_model``,
and a real ``transformers serve`` on 127.0.0.1 serving one of them.

The server needs the ``serving`` test group (``pip install "transformers[serving]"``); without
it the tests that use ``transformers_serve`` are skipped. Nothing is downloaded: the model is
a tiny random-weight one built here, and the server runs with the Hub offline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# never reach for the Hub from these tests (set before huggingface_hub reads it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mantis_llm.testing import build_tiny_mantis  # noqa: E402

STARTUP_TIMEOUT = float(os.environ.get("MANTIS_SERVE_STARTUP_TIMEOUT", "120"))


def _need_local_stack() -> None:
    pytest.importorskip("torch", reason="needs the local extra (torch)")
    pytest.importorskip("transformers", reason="needs the local extra (transformers)")


@pytest.fixture(scope="session")
def openai_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openai-route")


@pytest.fixture(scope="session")
def tiny_hf(openai_root) -> Path:
    """Tiny CLIP Mantis saved with save_pretrained (processor config and all)."""
    _need_local_stack()
    return build_tiny_mantis(openai_root / "tiny-hf", layout="hf")


@pytest.fixture(scope="session")
def tiny_mantis(openai_root) -> Path:
    """The same tiny model laid out like the raw TIGER-Lab repos (no processor config)."""
    _need_local_stack()
    return build_tiny_mantis(openai_root / "tiny-mantis", layout="mantis")


@pytest.fixture(scope="session")
def tiny_sources(tiny_hf, tiny_mantis) -> dict[str, Path]:
    return {"hf": tiny_hf, "mantis": tiny_mantis}


@pytest.fixture(scope="session")
def prepared(openai_root, tiny_sources) -> dict[str, Path]:
    """``prepare_model`` output for each layout (Vicuna template, wrapped images)."""
    from mantis_llm.prepare import prepare_model

    return {layout: prepare_model(src, openai_root / f"prepared-{layout}") for layout, src in tiny_sources.items()}


@dataclass
class ServeProcess:
    """A running ``transformers serve``: where it listens, what it serves, how long it took to start."""

    base_url: str
    model: str  # the served model name: transformers serve names a pinned local model by its path
    model_dir: Path  # the prepared directory it serves
    source_dir: Path  # the checkpoint it was prepared from (what the local backend loads)
    startup_seconds: float
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's own process group (uvicorn shuts down cleanly), SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group is the server alone: it was started in a new session
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start_transformers_serve(
    model_dir: Path, workdir: Path, *, source_dir: Path, timeout: float = STARTUP_TIMEOUT, attempts: int = 3
) -> ServeProcess:
    """Start ``transformers serve MODEL_DIR`` on a free 127.0.0.1 port and wait for ``/health``.

    Fails the test (with the server's log tail) if it exits or is not healthy within ``timeout``;
    a port taken between choosing and binding it is retried. The caller stops it with ``_stop``.
    """
    import httpx

    home = workdir / "hf-home"  # the CLI's update-check stamp and any cache stay in the test's tmp
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",  # else the CLI asks PyPI for a newer transformers
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(home),
        PYTHONUNBUFFERED="1",
    )
    for attempt in range(1, attempts + 1):
        port = _free_port()
        log_path = workdir / f"transformers-serve-{attempt}.log"
        cmd = [
            sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        ]  # fmt: skip
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=workdir,
                start_new_session=True,
            )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        deadline = started + timeout
        while True:
            code = proc.poll()
            if code is not None:
                tail = _tail(log_path)
                if "address already in use" in tail.lower() and attempt < attempts:
                    break  # lost the port race: try another
                pytest.fail(f"transformers serve exited with code {code} before it was healthy; log tail:\n{tail}")
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    return ServeProcess(
                        base_url=base_url, model=str(model_dir), model_dir=model_dir, source_dir=source_dir,
                        startup_seconds=time.monotonic() - started, log_path=log_path, process=proc,
                    )  # fmt: skip
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(
                    f"transformers serve was not healthy after {timeout:.0f} s "
                    f"(MANTIS_SERVE_STARTUP_TIMEOUT raises the limit); log tail:\n{_tail(log_path)}"
                )
            time.sleep(0.1)
    raise AssertionError("unreachable")  # pragma: no cover


@pytest.fixture(scope="session")
def transformers_serve(openai_root, tiny_mantis) -> Iterator[ServeProcess]:
    """``transformers serve`` on the tiny model, prepared from the raw-repo layout (the real-world
    path: TIGER-Lab checkpoint -> prepare-model -> server). Started once per session (~5 s)."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip('transformers serve needs the serving test group: pip install "transformers[serving]"')
    from mantis_llm.prepare import prepare_model

    workdir = openai_root / "serve"
    workdir.mkdir(exist_ok=True)
    model_dir = prepare_model(tiny_mantis, openai_root / "served-model")
    server = start_transformers_serve(model_dir, workdir, source_dir=tiny_mantis)
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def source_backend(tiny_mantis):
    """The local backend on the same weights the server serves."""
    from mantis_llm import TransformersBackend

    backend = TransformersBackend(model=tiny_mantis).load()
    yield backend
    backend.close()


def conversation_to_openai(conversation, images: str = "data_uri") -> list[dict]:
    """OpenAI-style messages for a :class:`~mantis_llm.types.Conversation`, one content part per
    turn part, in order. ``images``: ``"data_uri"`` (``image_url`` parts, what a client sends),
    ``"pil"`` (``{"type": "image", "image": PIL}``, what ``apply_chat_template`` loads) or
    ``"bare"`` (``{"type": "image"}``, what vLLM hands an openai-format template)."""
    import base64

    from mantis_llm.images import load_pil
    from mantis_llm.types import Image

    def part(p) -> dict:
        if not isinstance(p, Image):
            return {"type": "text", "text": p}
        if images == "pil":
            return {"type": "image", "image": load_pil(p)}
        if images == "bare":
            return {"type": "image"}
        uri = f"data:{p.mime_type};base64,{base64.b64encode(p.data).decode()}"
        return {"type": "image_url", "image_url": {"url": uri}}

    return [{"role": t.role, "content": [part(p) for p in t.parts]} for t in conversation.turns]


@pytest.fixture(scope="session")
def to_openai():
    """``to_openai(conversation, images="data_uri"|"pil"|"bare")``: see :func:`conversation_to_openai`."""
    return conversation_to_openai
