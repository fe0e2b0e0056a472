"""LlamaIndex integration: :class:`Mantis` (an ``LLM`` taking ``ImageBlock``s), the legacy
:class:`MantisMultiModal` (``complete(prompt, image_documents)``), and :func:`image_block`."""

from .._adapter import require_extra

require_extra("llama_index.core", "llama-index-core", "llama-index", "mantis_llm.llama_index")

from ._messages import (  # noqa: E402
    image_block,
    image_block_to_image,
    prompt_messages,
    to_conversation,
    to_image_block,
)
from ._prompt_helper import MantisChatPromptHelper  # noqa: E402
from .base import Mantis, MantisMultiModal, MantisUpdateEvent  # noqa: E402

__all__ = [
    "Mantis",
    "MantisMultiModal",
    "MantisUpdateEvent",
    "MantisChatPromptHelper",
    "to_conversation",
    "image_block",
    "image_block_to_image",
    "to_image_block",
    "prompt_messages",
]
