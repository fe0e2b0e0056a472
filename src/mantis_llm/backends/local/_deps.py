"""The ``local`` extra's packages, imported on first use (never when ``mantis_llm`` is), each
failing with a ConfigurationError that says how to install them."""

from __future__ import annotations

from typing import Any

from ...errors import ConfigurationError

INSTALL_HINT = 'pip install "mantis-llm[local]"'


def import_deps() -> tuple[Any, Any]:
    """Import torch and transformers, or say which extra to install."""
    try:
        import torch
        import transformers
        from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"the local backend needs torch and transformers ({exc}); install them with: {INSTALL_HINT}"
        ) from None
    return torch, transformers


def import_llguidance() -> Any:
    """Import llguidance (and its transformers tokenizer bridge), or say which extra to install."""
    try:
        import llguidance
        import llguidance.hf  # noqa: F401  (imports transformers, which the local backend has)
    except ImportError as exc:
        raise ConfigurationError(
            f"grammar-constrained generation needs llguidance ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    return llguidance
