"""Mantis as a LlamaIndex ``FunctionCallingLLM``, against the fal emulator (scripted answers):
chat_with_tools and its async/streaming twins, get_tool_calls_from_response, predict_and_call,
FunctionAgent and AgentWorkflow with an image in the user message, structured_predict and
as_structured_llm."""

from __future__ import annotations

import pytest
from llama_index.core.agent.workflow import AgentWorkflow, FunctionAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock, ToolCallBlock
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel

from mantis_llm.llama_index import Mantis

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:inspect"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),
]


def count_squares(colour: str) -> int:
    """Count the squares of one colour in the picture."""
    return {"red": 6}.get(colour, 0)


COUNT = FunctionTool.from_defaults(count_squares)


class Verdict(BaseModel):
    """What the picture shows."""

    subject: str
    squares: int


@pytest.fixture
def question(images) -> ChatMessage:
    return ChatMessage(role="user", blocks=[ImageBlock(path=images["red"]), TextBlock(text="How many red squares?")])


def test_chat_with_tools_returns_tool_call_blocks(llm, emu, question):
    emu.script(['I will count them: {"name": "count_squares", "arguments": {"colour": "red"}}'])
    response = llm.chat_with_tools([COUNT], user_msg=question)
    blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert [(b.tool_name, b.tool_kwargs) for b in blocks] == [("count_squares", {"colour": "red"})]
    assert response.message.content == "I will count them:"
    [selection] = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("count_squares", {"colour": "red"})
    assert selection.tool_id == blocks[0].tool_call_id and selection.tool_id.startswith("call_")
    assert response.message.additional_kwargs["tool_calls"][0]["function"]["name"] == "count_squares"
    assert len(emu.submissions[0].payload["images"]) == 1  # the user's image went along


def test_no_call_is_an_error_only_when_asked(llm, emu, question):
    emu.script(["There are six."])
    response = llm.chat_with_tools([COUNT], user_msg=question)
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="0 tool calls"):
        llm.get_tool_calls_from_response(response)


def test_predict_and_call_runs_the_tool(llm, emu, question):
    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}'])
    out = llm.predict_and_call([COUNT], user_msg=question, tool_required=True)
    assert str(out) == "6"
    assert 'You must call the tool "count_squares" now' in emu.submissions[0].payload["prompt"]


async def test_async_and_streamed_chat_with_tools(llm, emu, question):
    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}'] * 2)
    response = await llm.achat_with_tools([COUNT], user_msg=question)
    assert llm.get_tool_calls_from_response(response)[0].tool_kwargs == {"colour": "red"}
    chunks = list(llm.stream_chat_with_tools([COUNT], user_msg=question))
    assert all(llm.get_tool_calls_from_response(c, error_on_no_tool_call=False) == [] for c in chunks[:-1])
    assert llm.get_tool_calls_from_response(chunks[-1])[0].tool_name == "count_squares"


@pytest.mark.parametrize("streaming", [True, False])
async def test_function_agent_uses_the_tool_with_the_image_in_view(emu, question, streaming):
    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}', "There are 6 red squares."])
    llm = Mantis()
    agent = FunctionAgent(tools=[COUNT], llm=llm, streaming=streaming)
    handler = agent.run(user_msg=question)
    events = [ev async for ev in handler.stream_events()]
    result = await handler
    assert str(result.response.content).strip() == "There are 6 red squares."
    assert [str(e.tool_output.content) for e in events if isinstance(e, ToolCallResult)] == ["6"]
    second = emu.submissions[1].payload
    assert len(second["images"]) == 1 and 'Tool result (tool "count_squares"' in second["prompt"]
    assert '{"name":"count_squares","arguments":{"colour":"red"}}' in second["prompt"]
    llm.close()


async def test_agent_workflow_picks_the_function_agent(emu, question):
    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}', "Six."])
    llm = Mantis()
    workflow = AgentWorkflow.from_tools_or_functions([count_squares], llm=llm)
    assert type(workflow.agents[next(iter(workflow.agents))]).__name__ == "FunctionAgent"
    result = await workflow.run(user_msg=question)
    assert str(result.response.content).strip() == "Six."
    llm.close()


def test_as_structured_llm_on_a_question_with_an_image(llm, emu, question):
    emu.script(['{"name": "Verdict", "arguments": {"subject": "a square", "squares": "6"}}'])
    response = llm.as_structured_llm(Verdict).chat([question])
    assert response.raw == Verdict(subject="a square", squares=6)  # "6" coerced to the schema's int
    assert 'You must call the tool "Verdict" now' in emu.submissions[0].payload["prompt"]
