"""Mantis and MantisMultiModal on the local backend, with a tiny random-weight Mantis built and
loaded through the real code path. The answers are random bytes, so these check structure:
text, streaming deltas, usage counts, image order effects and determinism."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, ImageBlock, TextBlock  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402
from llama_index.core.schema import ImageDocument  # noqa: E402

from mantis_llm.llama_index import Mantis, MantisMultiModal  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tiny_model) -> str:
    """The shared tiny model's directory, as the str a user would pass."""
    return str(tiny_model)


@pytest.fixture(scope="module")
def local_llm(tiny):
    m = Mantis(backend="local", model=tiny, max_tokens=6)
    yield m
    m.close()


def ask(*blocks) -> list[ChatMessage]:
    return [ChatMessage(role="user", blocks=[TextBlock(text=b) if isinstance(b, str) else b for b in blocks])]


def check_usage(r, max_tokens: int = 6) -> dict:
    usage = r.raw["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= max_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert {k: r.additional_kwargs[k] for k in usage} == usage
    assert r.raw["finish_reason"] in ("stop", "length") and r.raw["model"]
    return usage


async def test_chat_complete_sync_and_async(local_llm, images):
    msgs = ask("compare", ImageBlock(path=images["red"]), "and", ImageBlock(path=images["blue"]))
    r1 = local_llm.chat(msgs)
    r2 = await local_llm.achat(msgs)
    assert isinstance(r1, ChatResponse) and isinstance(r1.message.content, str)
    assert r1.message.content == r2.message.content  # greedy: deterministic
    assert check_usage(r1) == check_usage(r2)
    c = await local_llm.acomplete(
        "compare", [ImageDocument(image_path=str(images["red"])), ImageBlock(path=images["blue"])]
    )
    assert isinstance(c, CompletionResponse)
    check_usage(c)


async def test_streaming_deltas_build_the_final_text(local_llm, images):
    msgs = ask(ImageBlock(path=images["green"]), "describe")
    chunks = list(local_llm.stream_chat(msgs))
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content
    assert chunks[-1].message.content == local_llm.chat(msgs).message.content
    check_usage(chunks[-1])
    achunks = [c async for c in await local_llm.astream_complete("describe", [ImageBlock(path=images["green"])])]
    assert "".join(c.delta for c in achunks) == achunks[-1].text == chunks[-1].message.content


def test_each_image_costs_image_tokens(local_llm, images):
    from mantis_llm.testing import tokens_per_image

    one = local_llm.chat(ask(ImageBlock(path=images["red"]), "what?")).raw["usage"]["prompt_tokens"]
    two = local_llm.chat(ask(ImageBlock(path=images["red"]), ImageBlock(path=images["blue"]), "what?"))
    assert two.raw["usage"]["prompt_tokens"] - one >= tokens_per_image("clip")
    # several turns, each with images: all of them reach the model
    multi = [
        *ask("first", ImageBlock(path=images["red"])),
        ChatMessage(role="assistant", content="ok"),
        *ask(ImageBlock(path=images["blue"]), ImageBlock(path=images["green"]), "then?"),
    ]
    assert local_llm.chat(multi).raw["usage"]["prompt_tokens"] - one >= 2 * tokens_per_image("clip")


def test_token_counting_handler_reads_local_usage(tiny, images):
    counter = TokenCountingHandler()
    m = MantisMultiModal(backend="local", model=tiny, max_tokens=4, callback_manager=CallbackManager([counter]))
    r = m.complete("hi", [ImageBlock(path=images["red"])])
    usage = check_usage(r, 4)
    assert counter.prompt_llm_token_count == usage["prompt_tokens"]
    assert counter.completion_llm_token_count == usage["completion_tokens"]
    m.close()
