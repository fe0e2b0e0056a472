"""LlamaIndex's image budget against Mantis's (issue #13).

llama-index-core 0.14.25 prices every ImageBlock at a flat 2,125 tokens
(``ImageBlock.aestimate_tokens``, base/llms/types.py: "based on a 2048 x 1536 image using
OpenAI"), whatever the LLM. Mantis-llava-7b spends 576 per image in a 4,096-token context, so
four images and a question fit one call (about 2,450 tokens), but a multimodal
``RetrieverQueryEngine`` packs by LlamaIndex's figure (8,500 for four images) and sends one
image per call. No LLM field changes that figure: ``ChatPromptHelper.from_llm_metadata`` takes
only ``context_window`` and ``num_output``. What fixes it is a ChatPromptHelper that counts the
Mantis way (:class:`mantis_llm.llama_index.MantisChatPromptHelper`, from
``Mantis.chat_prompt_helper()``), set as ``Settings.chat_prompt_helper``.

The fake LLM counts calls and the images in each; no network, no model.
"""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core import Settings
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse, ImageBlock, TextBlock
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.llms import CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import ImageNode, NodeWithScore, QueryBundle

from mantis_llm.llama_index import MantisChatPromptHelper
from mantis_llm.tokens import TokenCounter

QUESTION = "What differs between the four pictures?"


class CallCounter(CustomLLM):
    """A chat LLM that records, per call, how many images it was sent."""

    context: int = 4096
    output: int = DEFAULT_NUM_OUTPUTS
    calls: list[int] = []

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context, num_output=self.output, is_chat_model=True)

    @llm_chat_callback()
    def chat(self, messages, **kwargs: Any) -> ChatResponse:
        self.calls.append(sum(isinstance(b, ImageBlock) for m in messages for b in m.blocks))
        return ChatResponse(message=ChatMessage(role="assistant", content="They differ."))

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text="They differ.")

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        raise NotImplementedError


class Fixed(BaseRetriever):
    """Retrieves the same nodes for every query."""

    def __init__(self, nodes: list[ImageNode]) -> None:
        super().__init__()
        self.nodes = nodes

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [NodeWithScore(node=n, score=1.0) for n in self.nodes]


@pytest.fixture
def image_nodes(images) -> list[ImageNode]:
    """Four image nodes as SimpleDirectoryReader makes them (a file path in the metadata)."""
    return [ImageNode(image_path=str(p), metadata={"file_path": str(p)}) for p in images.values()]


@pytest.fixture(autouse=True)
def _no_global_helper(monkeypatch):
    monkeypatch.setattr(Settings, "_chat_prompt_helper", None)


def run(nodes, llm, **kwargs) -> list[int]:
    llm.calls = []
    RetrieverQueryEngine.from_args(retriever=Fixed(nodes), llm=llm, multimodal=True, **kwargs).query(QUESTION)
    return llm.calls


# ---------------------------------------------------------------------------- the problem


def test_llamaindex_prices_every_image_at_2125_tokens(images):
    assert ImageBlock(path=images["red"]).estimate_tokens() == 2125
    assert ImageBlock(path=images["red"]).estimate_tokens(tokenizer=len) == 2125  # no tokenizer changes it


def test_default_settings_send_one_image_per_call(image_nodes):
    # context 4,096, 256 for the answer: an image "costs" 2,125, so two never share a call
    assert run(image_nodes, CallCounter()) == [1, 1, 1, 1]
    assert run(image_nodes, CallCounter(), response_mode="refine") == [1, 1, 1, 1]


def test_a_long_answer_budget_splits_each_node_into_two_calls(image_nodes):
    # num_output 2,048 (e.g. Mantis(max_tokens=2048)): an image no longer fits beside its
    # metadata text, so every node becomes a text-only call and an image-only call
    assert run(image_nodes, CallCounter(output=2048)) == [0, 1, 0, 1, 0, 1, 0, 1]


def test_simple_summarize_silently_drops_images(image_nodes):
    # one call, but truncated to LlamaIndex's budget: three of the four images are gone
    assert run(image_nodes, CallCounter(), response_mode="simple_summarize") == [1]


def test_only_an_inflated_context_window_packs_them_by_default(image_nodes):
    # the current Mantis docstring's advice; it also lets text-only prompts grow past 4,096
    assert run(image_nodes, CallCounter(context=9000)) == [3, 1]
    assert run(image_nodes, CallCounter(context=10000)) == [4]


# ---------------------------------------------------------------------------- the fix


@pytest.mark.parametrize("mode", ["compact", "simple_summarize", "tree_summarize"])
def test_counting_the_mantis_way_sends_the_four_images_in_one_call(image_nodes, monkeypatch, mode):
    monkeypatch.setattr(Settings, "_chat_prompt_helper", MantisChatPromptHelper(TokenCounter()))
    assert run(image_nodes, CallCounter(), response_mode=mode) == [4]


def test_refine_mode_is_one_call_per_node_by_design(image_nodes, monkeypatch):
    # "refine" never combines nodes (each one refines the answer): no helper changes that
    monkeypatch.setattr(Settings, "_chat_prompt_helper", MantisChatPromptHelper(TokenCounter()))
    assert run(image_nodes, CallCounter(), response_mode="refine") == [1, 1, 1, 1]


def measured_run(nodes, output: int = DEFAULT_NUM_OUTPUTS) -> tuple[list[int], list[int]]:
    """Images per call, and each call's prompt tokens as Mantis would receive it."""
    from mantis_llm.llama_index._messages import to_conversation

    counter = TokenCounter()
    prompts: list[int] = []

    class Measured(CallCounter):
        @llm_chat_callback()
        def chat(self, messages, **kwargs: Any) -> ChatResponse:
            prompts.append(counter.count(to_conversation(messages)))
            return super().chat(messages, **kwargs)

    Settings._chat_prompt_helper = MantisChatPromptHelper(counter, num_output=output)
    return run(nodes, Measured(output=output)), prompts


def test_counting_the_mantis_way_still_splits_what_does_not_fit(image_nodes, tmp_path, make_image):
    more = []
    for i in range(4):
        path = tmp_path / f"more{i}.png"
        path.write_bytes(make_image(30 + i, 20, (40 * i, 10, 10)))
        more.append(ImageNode(image_path=str(path), metadata={"file_path": str(path)}))
    # 4,096 tokens hold five or six images of 576 with their metadata and the question, not eight
    calls, prompts = measured_run(image_nodes + more)
    assert len(calls) == 2 and sum(calls) == 8 and min(calls) >= 2
    assert all(n <= 4096 - DEFAULT_NUM_OUTPUTS for n in prompts)
    # a long answer budget leaves room for fewer, and every call still fits
    calls, prompts = measured_run(image_nodes, output=2048)
    assert len(calls) == 2 and sum(calls) == 4
    assert all(n <= 4096 - 2048 for n in prompts)


def test_a_long_text_is_split_by_mantis_tokens(monkeypatch):
    from llama_index.core.schema import TextNode

    counter = TokenCounter()
    text = "The harbour at sunrise, with fishing boats tied up along the pier. " * 150  # about 2,700 tokens
    nodes = [TextNode(text=text), TextNode(text=text)]
    monkeypatch.setattr(Settings, "_chat_prompt_helper", MantisChatPromptHelper(counter))
    sent: list[int] = []

    class Recorder(CallCounter):
        @llm_chat_callback()
        def chat(self, messages, **kwargs: Any) -> ChatResponse:
            sent.append(sum(counter.count_text(b.text) for m in messages for b in m.blocks if isinstance(b, TextBlock)))
            return ChatResponse(message=ChatMessage(role="assistant", content="ok"))

    RetrieverQueryEngine.from_args(retriever=Fixed(nodes), llm=Recorder(), multimodal=True).query(QUESTION)
    assert len(sent) == 2 and all(n <= 4096 - 256 for n in sent)


# ---------------------------------------------------------------------------- Mantis itself


def test_four_images_make_one_mantis_call(fresh_emu, image_nodes, monkeypatch):
    from mantis_llm.llama_index import Mantis

    llm = Mantis()
    try:
        monkeypatch.setattr(Settings, "_chat_prompt_helper", llm.chat_prompt_helper())
        RetrieverQueryEngine.from_args(retriever=Fixed(image_nodes), llm=llm, multimodal=True).query(QUESTION)
    finally:
        llm.close()
    assert len(fresh_emu.submissions) == 1
    assert len(fresh_emu.submissions[0].payload["images"]) == 4
