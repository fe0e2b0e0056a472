"""LangChain integration: :class:`ChatMantis`, a chat model for Mantis (several images per
turn, on fal, locally or on an OpenAI-compatible server), and :func:`image_block`."""

from .._adapter import require_extra

require_extra("langchain_core", "langchain-core", "langchain", "mantis_llm.langchain")

from ._callbacks import QUEUE_UPDATE_EVENT  # noqa: E402
from ._messages import image_block, to_conversation  # noqa: E402
from .chat_models import ChatMantis  # noqa: E402

__all__ = ["ChatMantis", "QUEUE_UPDATE_EVENT", "image_block", "to_conversation"]
