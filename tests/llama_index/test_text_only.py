"""Text-only LlamaIndex use on fal (no image anywhere): ``complete("hi")``, a text
``VectorStoreIndex`` answering through ``Settings.llm = Mantis()``, and a ReActAgent on a text
question, each against both endpoint behaviours the emulator offers (an endpoint that wants
at least one image, answered with a blank placeholder after its 422, and one that takes text)."""

from __future__ import annotations

import pytest
from llama_index.core import Document, Settings, VectorStoreIndex
from llama_index.core.agent.workflow import ReActAgent, ToolCall
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.tools import FunctionTool

from mantis_llm.emulator import expected_output
from mantis_llm.llama_index import Mantis

# The workflows package inspects agents with inspect.getmembers, tripping pydantic's
# deprecated-attribute warnings (upstream noise, nothing of ours).
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),
]


@pytest.fixture(params=[True, False], ids=["endpoint-needs-an-image", "endpoint-takes-text"])
def endpoint(request, emu):
    """The module's emulator, wanting at least one image per request or not."""
    emu.require_images = request.param
    return emu


def answered(emu) -> dict:
    """The payload of the job that gave the answer (the last one), checked against the endpoint's rule."""
    payload = emu.submissions[-1].payload
    if emu.require_images:
        assert len(payload["images"]) == 1 and "blank placeholder" in payload["prompt"].partition("\n\n")[0]
    else:
        assert payload["images"] == []
    return payload


@pytest.fixture
def llm(emu):
    m = Mantis()
    yield m
    m.close()


async def test_complete_hi(endpoint, llm):
    r = llm.complete("hi")
    assert r.text == expected_output(answered(endpoint))
    assert answered(endpoint)["prompt"].endswith("hi")
    r = await llm.acomplete("hello again")
    assert r.text == expected_output(answered(endpoint)) and r.text.endswith("hello again")
    chunks = list(llm.stream_complete("and once more"))
    assert chunks[-1].text == expected_output(answered(endpoint))


def test_text_rag_with_settings_llm(endpoint, llm, monkeypatch):
    # Settings is process-wide: monkeypatch puts the previous LLM and embedding model back.
    monkeypatch.setattr(Settings, "_llm", None)
    monkeypatch.setattr(Settings, "_embed_model", None)
    Settings.llm = llm
    Settings.embed_model = MockEmbedding(embed_dim=8)  # offline: constant vectors, every node scores the same
    docs = [
        Document(text="Paris is the capital of France."),
        Document(text="Madrid is the capital of Spain."),
    ]
    engine = VectorStoreIndex.from_documents(docs).as_query_engine(similarity_top_k=2)
    endpoint.script(["The capital of France is Paris."])
    response = engine.query("What is the capital of France?")
    assert str(response) == "The capital of France is Paris."  # the model's answer, not "Empty Response"
    prompt = answered(endpoint)["prompt"]
    assert "Paris is the capital of France." in prompt and "What is the capital of France?" in prompt
    assert len(response.source_nodes) == 2


@pytest.mark.parametrize("streaming", [True, False])
async def test_react_agent_answers_a_text_question(endpoint, llm, streaming):
    calls = []

    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    endpoint.script(
        [
            'Thought: I need to add the two numbers.\nAction: add\nAction Input: {"a": 19, "b": 23}',
            "Thought: I can answer without using any more tools.\nAnswer: 19 + 23 = 42.",
        ]
    )
    agent = ReActAgent(tools=[FunctionTool.from_defaults(add)], llm=llm, streaming=streaming)
    handler = agent.run(user_msg="What is 19 + 23?")
    events = [ev async for ev in handler.stream_events()]
    result = await handler
    assert calls == [(19, 23)] and [e.tool_name for e in events if isinstance(e, ToolCall)] == ["add"]
    assert str(result.response.content).strip() == "19 + 23 = 42."
    prompt = answered(endpoint)["prompt"]
    assert "What is 19 + 23?" in prompt and "Observation: 42" in prompt
