"""Mantis inside LlamaIndex pipelines, against the FalEmulator: a multimodal vector index
answering through MantisMultiModal (legacy engine) and Mantis (``multimodal=True``), and a
ReActAgent driven by scripted ReAct answers."""

from __future__ import annotations

import warnings

import pytest
from llama_index.core.agent.workflow import ReActAgent, ToolCall, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.embeddings.mock_embed_model import MockEmbedding, MockMultiModalEmbedding
from llama_index.core.indices.multi_modal import MultiModalVectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageNode, TextNode
from llama_index.core.tools import FunctionTool

from mantis_llm.emulator import expected_output
from mantis_llm.llama_index import Mantis, MantisMultiModal

# The workflows package inspects agents with inspect.getmembers, tripping pydantic's
# deprecated-attribute warnings (upstream noise, nothing of ours).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),
]


@pytest.fixture
def index(images):
    """Three image nodes (as SimpleDirectoryReader makes them) and two text nodes."""
    nodes = [
        ImageNode(image_path=str(images[name]), metadata={"file_path": str(images[name]), "colour": name})
        for name in ("red", "blue", "green")
    ] + [
        TextNode(text="The red square is the company logo."),
        TextNode(text="The blue square marks the exit."),
    ]
    return MultiModalVectorStoreIndex(
        nodes=nodes, embed_model=MockEmbedding(embed_dim=8), image_embed_model=MockMultiModalEmbedding(embed_dim=8)
    )


def test_multimodal_index_query_engine_with_mantis_multimodal(emu, received, index, caplog):
    mm = MantisMultiModal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SimpleMultiModalQueryEngine (0.14.23+)
        engine = index.as_query_engine(llm=mm, similarity_top_k=2, image_similarity_top_k=3)
    assert "does not appear to be a multi-modal LLM" not in caplog.text
    response = engine.query("Which square is the logo?")

    image_nodes = response.metadata["image_nodes"]
    assert len(image_nodes) == 3 and len(response.metadata["text_nodes"]) == 2
    assert str(response) == expected_output(received.payload())
    # the retrieved images reached fal, in the engine's order, before the question
    expected = [received.sizes_by_name[n.node.metadata["colour"]] for n in image_nodes]
    assert received.sizes() == expected
    prompt = received.prompt()
    assert prompt.startswith("<image> <image> <image>") and prompt.count("<image>") == 3
    assert "The red square is the company logo." in prompt and "Which square is the logo?" in prompt
    mm.close()


async def test_multimodal_index_async_query(emu, received, index):
    mm = MantisMultiModal()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        engine = index.as_query_engine(llm=mm, image_similarity_top_k=2)
    response = await engine.aquery("Describe the pictures.")
    assert str(response) == expected_output(received.payload())
    assert len(received.sizes()) == 2
    await mm.aclose()


def test_retriever_query_engine_multimodal_with_mantis(emu, received, index):
    # The current way: a chat LLM with multimodal=True; images arrive as data URLs, interleaved
    # with their metadata text. A wide context window keeps all images in one call.
    llm = Mantis(context_window=32768)
    engine = RetrieverQueryEngine.from_args(
        retriever=index.as_retriever(similarity_top_k=2, image_similarity_top_k=3),
        llm=llm,
        multimodal=True,
        response_mode="compact",
    )
    response = engine.query("Which square is the exit?")
    assert len(emu.submissions) == 1
    assert str(response) == expected_output(received.payload())
    assert sorted(received.sizes()) == sorted(received.sizes_by_name[c] for c in ("red", "blue", "green"))
    prompt = received.prompt()
    assert prompt.count("<image>") == 3 and "Which square is the exit?" in prompt
    assert prompt.index("colour: ") < prompt.index("<image>")  # metadata text precedes its image
    llm.close()


@pytest.mark.parametrize("streaming", [True, False])
async def test_react_agent_uses_a_tool(emu, received, images, streaming):
    calls = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        calls.append((a, b))
        return a * b

    emu.script(
        [
            'Thought: I count 6 rows of 7 squares; I need the product.\nAction: multiply\nAction Input: {"a": 6, "b": 7}',
            "Thought: I can answer without using any more tools.\nAnswer: There are 42 squares.",
        ]
    )
    llm = Mantis()
    agent = ReActAgent(tools=[FunctionTool.from_defaults(multiply)], llm=llm, streaming=streaming)
    question = ChatMessage(
        role="user",
        blocks=[
            ImageBlock(path=images["red"]),
            TextBlock(text="How many squares are in the picture?"),
        ],
    )
    handler = agent.run(user_msg=question)
    events = [ev async for ev in handler.stream_events()]
    result = await handler

    assert calls == [(6, 7)]
    assert str(result.response.content).strip() == "There are 42 squares."
    assert [e.tool_name for e in events if isinstance(e, ToolCall)] == ["multiply"]
    assert [str(e.tool_output.content) for e in events if isinstance(e, ToolCallResult)] == ["42"]

    subs = emu.submissions
    assert len(subs) == 2
    assert {s.mode for s in subs} == {"stream" if streaming else "queue"}  # streaming streams tokens
    first, second = received.prompt(0), received.prompt(1)
    assert "multiply" in first and "How many squares are in the picture?" in first  # tool list + question
    assert "Action: multiply" in second and "Observation: 42" in second
    for i in (0, 1):  # the image rides along with the question on every turn
        assert received.sizes(i) == [(64, 48)]
    await llm.aclose()
