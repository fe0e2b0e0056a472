"""Tiny random-weight Mantis models, built once per test session (CPU, a few seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# never reach for the Hub from these tests (set before huggingface_hub reads it)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mantis_llm.testing import build_tiny_mantis  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _hub_offline():
    """Belt and braces: even if huggingface_hub was imported before this file set the env."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-mantis")


@pytest.fixture(scope="session")
def tiny_clip(tiny_model) -> Path:
    """CLIP 32px / patch 8 (16 tokens per image), saved with save_pretrained: the shared tiny model."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_siglip(tiny_root) -> Path:
    """SigLIP 32px / patch 8 (15 tokens per image)."""
    return build_tiny_mantis(tiny_root / "siglip", vision="siglip")


@pytest.fixture(scope="session")
def tiny_mantis_layout(tiny_root) -> Path:
    """Same weights as ``tiny_clip``, laid out like the real TIGER-Lab repo."""
    return build_tiny_mantis(tiny_root / "mantis-layout", vision="clip", layout="mantis")


@pytest.fixture(scope="session")
def clip_backend(local_backend):
    """The shared loaded backend on the CLIP model (tests/conftest.py ``local_backend``)."""
    return local_backend


@pytest.fixture(scope="session")
def backends(tiny_clip, tiny_siglip, tiny_mantis_layout, clip_backend):
    """One loaded backend per tiny model variant."""
    from mantis_llm.backends.local import TransformersBackend

    made = {
        "siglip": TransformersBackend(model=tiny_siglip).load(),
        "mantis-layout": TransformersBackend(model=tiny_mantis_layout).load(),
    }
    yield {"clip": clip_backend, **made}
    for backend in made.values():
        backend.close()
