"""Backends: ``fal`` (hosted, over httpx) and ``local`` (transformers, in-process).

Importing this package imports neither httpx-heavy code paths nor torch; the concrete
classes load on first use.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import Backend, OnUpdate

DEFAULT_FAL_ENDPOINT = "fal-ai/mantis-llava-7b-v11"
DEFAULT_LOCAL_MODEL = "TIGER-Lab/Mantis-llava-7b"
BACKEND_NAMES = ("fal", "local")


def resolve_backend(backend: str | Backend, model: str | None = None, **options: Any) -> Backend:
    """Return ``backend`` itself if it is a :class:`Backend`, else build the named one.

    ``model`` is the fal endpoint id for ``"fal"`` and a hub id or path for ``"local"``
    (the fal default id given with ``"local"`` means the local default). Options that
    are ``None`` are dropped so each backend's own defaults apply.
    """
    if isinstance(backend, Backend):
        return backend
    options = {k: v for k, v in options.items() if v is not None}
    if backend == "fal":
        from .fal import FalBackend

        return FalBackend(endpoint=resolve_model(backend, model), **options)
    if backend in ("local", "transformers"):
        from .local import TransformersBackend

        for fal_only in ("api_key", "max_retries", "timeout"):
            options.pop(fal_only, None)
        return TransformersBackend(model=resolve_model(backend, model), **options)
    raise ConfigurationError(f"unknown backend {backend!r}: expected one of {BACKEND_NAMES} or a Backend instance")


def resolve_model(backend: str | Backend, model: str | None = None) -> str:
    """The model :func:`resolve_backend` runs for these arguments, found without building it."""
    if isinstance(backend, Backend):
        return backend.model
    if backend in ("local", "transformers"):
        return DEFAULT_LOCAL_MODEL if model in (None, DEFAULT_FAL_ENDPOINT) else model
    return model or DEFAULT_FAL_ENDPOINT


def __getattr__(name: str):  # lazy: `from mantis_llm.backends import FalBackend`
    if name == "FalBackend":
        from .fal import FalBackend

        return FalBackend
    if name == "TransformersBackend":
        from .local import TransformersBackend

        return TransformersBackend
    raise AttributeError(name)


__all__ = [
    "Backend",
    "OnUpdate",
    "resolve_backend",
    "resolve_model",
    "DEFAULT_FAL_ENDPOINT",
    "DEFAULT_LOCAL_MODEL",
    "FalBackend",
    "TransformersBackend",
]
