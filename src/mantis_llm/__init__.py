"""mantis-llm: Mantis (multi-image LLaVA) as a LangChain / LlamaIndex chat model.

Importing this package pulls neither torch, transformers nor a framework.
"""

from __future__ import annotations

from . import errors
from ._version import __version__
from .backends import DEFAULT_FAL_ENDPOINT, DEFAULT_LOCAL_MODEL, Backend, resolve_backend
from .types import (
    Chunk,
    Conversation,
    GenerationParams,
    Image,
    Request,
    Response,
    Turn,
    Update,
    Usage,
)


def __getattr__(name: str):  # FalBackend / TransformersBackend / OpenAIBackend load on first use
    if name in ("FalBackend", "TransformersBackend", "OpenAIBackend"):
        from . import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'mantis_llm' has no attribute {name!r}")


__all__ = [
    "__version__",
    "errors",
    "Backend",
    "resolve_backend",
    "DEFAULT_FAL_ENDPOINT",
    "DEFAULT_LOCAL_MODEL",
    "FalBackend",
    "TransformersBackend",
    "OpenAIBackend",
    "Chunk",
    "Conversation",
    "GenerationParams",
    "Image",
    "Request",
    "Response",
    "Turn",
    "Update",
    "Usage",
]
