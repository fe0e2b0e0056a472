"""ChatMantis on the local backend: a tiny random-weight Mantis loaded through the real code
(answers are random bytes, so these tests check structure, counts and concurrency)."""

from __future__ import annotations

import asyncio
import base64

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from mantis_llm.errors import ContextLengthError
from mantis_llm.langchain import ChatMantis
from mantis_llm.testing import tokens_per_image


class Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token, **kwargs) -> None:
        self.tokens.append(token)


@pytest.fixture
def chat(local_backend):
    return ChatMantis(backend=local_backend, max_tokens=8)


@pytest.fixture
def image_block(png_bytes):
    return {"type": "image", "base64": base64.b64encode(png_bytes).decode(), "mime_type": "image/png"}


def test_images_reach_the_model_and_usage_is_counted(chat, image_block):
    text_only = chat.invoke([HumanMessage("What is this?")])
    one = chat.invoke([HumanMessage(content=["What is this?", image_block])])
    two = chat.invoke([HumanMessage(content=["What is this?", image_block, "and", image_block])])
    assert [m.response_metadata["metrics"]["images"] for m in (text_only, one, two)] == [0, 1, 2]
    for m in (text_only, one, two):
        u = m.usage_metadata
        assert u["output_tokens"] <= 8 and u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
        assert m.response_metadata["model_provider"] == "transformers"
        assert m.response_metadata["finish_reason"] in ("stop", "length")
    # each image adds its expanded image tokens plus the "(image j: <Image>...</Image>)" text
    per_image = two.usage_metadata["input_tokens"] - one.usage_metadata["input_tokens"]
    assert per_image > tokens_per_image("clip")


def test_stream_yields_tokens_once_each_with_metadata_last(chat, image_block):
    rec = Tokens()
    chunks = list(chat.stream([HumanMessage(content=[image_block, "describe"])], config={"callbacks": [rec]}))
    assert len([c for c in chunks if c.content]) >= 2  # real token streaming
    assert rec.tokens == [c.content for c in chunks]
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] >= 1
    assert all(c.usage_metadata is None and not c.response_metadata for c in chunks[:-1])


def test_batch_reaches_the_micro_batcher(chat, image_block):
    inputs = [[HumanMessage(content=[f"question {i}", image_block])] for i in range(4)]
    results = chat.batch(inputs)
    assert len(results) == 4 and all(isinstance(r, AIMessage) for r in results)
    assert max(r.response_metadata["metrics"]["batch_size"] for r in results) > 1
    aresults = asyncio.run(chat.abatch(inputs))
    assert max(r.response_metadata["metrics"]["batch_size"] for r in aresults) > 1
    # greedy decoding: batched answers equal one-by-one answers
    assert [r.content for r in aresults] == [r.content for r in results]
    assert results[0].content == chat.invoke(inputs[0]).content


def test_multi_turn_and_system_prompt(chat, image_block):
    result = chat.invoke(
        [
            SystemMessage("be brief"),
            HumanMessage(content=[image_block, "first"]),
            AIMessage("ok"),
            HumanMessage(content=["second", image_block]),
        ]
    )
    assert result.response_metadata["metrics"]["images"] == 2


def test_context_overflow_is_a_typed_error(chat, image_block):
    with pytest.raises(ContextLengthError):
        chat.invoke([HumanMessage(content=["x" * 5000, image_block])])
