"""A LlamaIndex ``ChatPromptHelper`` that counts the way Mantis does (see :class:`MantisChatPromptHelper`)."""

from __future__ import annotations

from typing import Any, ClassVar

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.indices.prompt_helper import DEFAULT_PADDING, ChatPromptHelper
from llama_index.core.prompts.prompt_utils import get_empty_prompt_messages

from ..tokens import TokenCounter


class MantisChatPromptHelper(ChatPromptHelper):
    """A ChatPromptHelper that packs and truncates chat messages by Mantis's own count: text
    through a :class:`~mantis_llm.tokens.TokenCounter` (the model's tokenizer or the estimate),
    each image at ``tokens_per_image`` plus its wrapper, instead of 2,125 per image and tiktoken.

    LlamaIndex prices every ``ImageBlock`` at a flat 2,125 tokens (``ImageBlock.aestimate_tokens``
    in llama-index-core's ``base/llms/types.py``, "based on a 2048 x 1536 image using OpenAI"),
    whatever the LLM, and ``ChatPromptHelper.from_llm_metadata`` reads only the context window
    and ``num_output``: a multimodal query engine then sends Mantis one image per call (or two
    calls per image with a long answer budget). Set this helper (``Mantis.chat_prompt_helper()``)
    as ``Settings.chat_prompt_helper`` and four images and a question go in one call.
    """

    _counter: TokenCounter = PrivateAttr()

    # "(image j: <Image><image></Image>) " besides the image tokens; "USER: ... </s>" per message;
    # BOS, the system prompt and "ASSISTANT:" once per call
    WRAPPER: ClassVar[int] = 12
    PER_MESSAGE: ClassVar[int] = 4
    PER_CALL: ClassVar[int] = 40

    def __init__(self, counter: TokenCounter, *, num_output: int = DEFAULT_NUM_OUTPUTS, **kwargs: Any) -> None:
        kwargs.setdefault("context_window", counter.context_length)
        # LlamaIndex measures strings by len(tokenizer(text)): our count, as a list of that length
        super().__init__(num_output=num_output, tokenizer=lambda text: [0] * counter.count_text(text), **kwargs)
        self._counter = counter

    def block_tokens(self, block: Any) -> int:
        if isinstance(block, ImageBlock):
            return self._counter.tokens_per_image + self.WRAPPER
        if isinstance(block, TextBlock):
            return self._counter.count_text(block.text)
        return block.estimate_tokens()  # audio, documents...: LlamaIndex's own figure

    def message_tokens(self, message: ChatMessage) -> int:
        return self.PER_MESSAGE + sum(self.block_tokens(b) for b in message.blocks)

    async def _aget_available_chunk_size(
        self, prompt, num_chunks: int = 1, padding: int = 5, llm=None, tools=None
    ) -> int:
        messages = get_empty_prompt_messages(prompt)
        used = self.PER_CALL + sum(self.message_tokens(m) for m in messages)
        if llm is not None and getattr(llm, "system_prompt", None):
            used += self._counter.count_text(llm.system_prompt)
        available = self._get_available_context_size(used) // num_chunks - padding
        return min(available, self.chunk_size_limit) if self.chunk_size_limit is not None else available

    def _tokenize(self, text: str) -> list[int]:
        return [0] * self._counter.count_text(text)

    async def arepack(
        self, prompt, messages, padding: int = DEFAULT_PADDING, llm=None, tools=None
    ) -> list[ChatMessage]:
        """Fill each call up to the context, in order; a text too long alone is split."""
        budget = await self._aget_available_chunk_size(prompt, 1, padding, llm, tools)
        packed: list[ChatMessage] = []
        used = 0
        for message in messages:
            for block in message.blocks:
                pieces = [block]
                if isinstance(block, TextBlock) and self.block_tokens(block) > budget - self.PER_MESSAGE:
                    pieces = await block.asplit(max_tokens=budget - self.PER_MESSAGE, tokenizer=self._tokenize)
                for piece in pieces:
                    cost = self.block_tokens(piece)
                    if packed and packed[-1].role == message.role and used + cost <= budget:
                        packed[-1].blocks.append(piece)
                        used += cost
                    else:
                        packed.append(message.model_copy(update={"blocks": [piece]}, deep=False))
                        used = self.PER_MESSAGE + cost
        return packed

    async def atruncate(self, prompt, messages, padding: int = DEFAULT_PADDING, llm=None, tools=None):
        """Keep what fits, in order: a text is cut at the limit, an image that does not fit is left out."""
        if not messages:
            return []
        budget = await self._aget_available_chunk_size(prompt, len(messages), padding, llm, tools)
        out = []
        for message in messages:
            kept, used = [], self.PER_MESSAGE
            for block in message.blocks:
                cost = self.block_tokens(block)
                if used + cost <= budget:
                    kept.append(block)
                    used += cost
                elif isinstance(block, TextBlock) and budget - used > 0:
                    kept.append(await block.atruncate(max_tokens=budget - used, tokenizer=self._tokenize))
                    used = budget
            if kept:
                out.append(message.model_copy(update={"blocks": kept}, deep=False))
        return out
