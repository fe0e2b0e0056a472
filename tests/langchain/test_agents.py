"""Agents built on ChatMantis: LangChain 1.x ``create_agent`` (tools; ``response_format``),
LangGraph's prebuilt ReAct agent, against the fal emulator with scripted answers (the model's
side of the dialogue), and one run on the tiny local model, where the grammar forces the call.

What is asserted is the loop: the call is parsed into ``tool_calls``, the tool runs, its result
(and the user's image) goes back to the model in the next request, and the agent ends with the
answer or the structured response."""

from __future__ import annotations

import json

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from mantis_llm.langchain import ChatMantis, image_block
from mantis_llm.testing import make_image_bytes

IMAGE = image_block(make_image_bytes(64, 48))


@tool
def count_squares(colour: str) -> int:
    """Count the squares of one colour in the picture the user sent."""
    return {"red": 6}.get(colour, 0)


class Verdict(BaseModel):
    """What the picture shows."""

    subject: str = Field(max_length=20)
    squares: int


def question(text: str) -> list[HumanMessage]:
    return [HumanMessage(content=[IMAGE, {"type": "text", "text": text}])]


@pytest.fixture
def chat(emu):
    model = ChatMantis()
    yield model
    model.close()


def test_create_agent_calls_the_tool_and_answers_with_the_image_still_in_view(chat, emu):
    emu.script(
        [
            'Let me count.\n```json\n{"name": "count_squares", "arguments": {"colour": "red"}}\n```',
            "There are 6 red squares.",
        ]
    )
    agent = create_agent(chat, tools=[count_squares])
    result = agent.invoke({"messages": question("How many red squares are there?")})
    human, call, tool_msg, answer = result["messages"]
    assert isinstance(call, AIMessage) and call.tool_calls[0]["name"] == "count_squares"
    assert call.tool_calls[0]["args"] == {"colour": "red"} and call.content == "Let me count."
    assert isinstance(tool_msg, ToolMessage) and tool_msg.content == "6"
    assert answer.content == "There are 6 red squares." and not answer.tool_calls
    # the second request: the user's image, the call in the JSON the model writes, the result
    second = emu.submissions[1].payload
    assert len(second["images"]) == 1
    assert '{"name":"count_squares","arguments":{"colour":"red"}}' in second["prompt"]
    assert f'Tool result (tool "count_squares", id {call.tool_calls[0]["id"]}):\n6' in second["prompt"]


def test_create_agent_with_response_format_returns_the_structured_response(chat, emu):
    # no tools: create_agent's tool strategy binds the schema as a tool with tool_choice="any"
    emu.script(['{"name": "Verdict", "arguments": {"subject": "a square", "squares": "6"}}'])
    agent = create_agent(chat, tools=[], response_format=Verdict)
    result = agent.invoke({"messages": question("What is it, and how many squares?")})
    assert result["structured_response"] == Verdict(subject="a square", squares=6)  # "6" coerced
    assert "You must call the tool" in emu.submissions[0].payload["prompt"]  # forced: tool_choice any


def test_create_agent_repairs_a_broken_call_inside_the_model_call(chat, emu):
    # an answer that is not a valid call would end the agent (create_agent stops on a message
    # with only invalid_tool_calls): the model call itself asks again, with what was wrong
    emu.script(
        [
            '{"name": "count_squares", "arguments": {"colour": 3',
            '{"name":"count_squares","arguments":{"colour":"red"}}',
            "6.",
        ]
    )
    agent = create_agent(chat, tools=[count_squares])
    result = agent.invoke({"messages": question("Count the red squares, with the tool.")})
    assert [type(m).__name__ for m in result["messages"]] == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert result["messages"][1].response_metadata["metrics"]["tool_attempts"] == 2
    repair = emu.submissions[1].payload["prompt"]  # the bad answer fed back, and what was wrong with it
    assert '{"name": "count_squares", "arguments": {"colour": 3' in repair and "cut off" in repair


# LangGraph 1.x deprecates its prebuilt agent for langchain's create_agent; people still use it
@pytest.mark.filterwarnings("ignore:create_react_agent has been moved")
def test_langgraph_prebuilt_agent_sees_openai_style_tools(chat, emu):
    from langgraph.prebuilt import create_react_agent

    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}', "Six."])
    agent = create_react_agent(chat, [count_squares])  # reads bind_tools' kwargs["tools"]
    result = agent.invoke({"messages": question("How many red squares?")})
    assert result["messages"][2].content == "6" and result["messages"][-1].content == "Six."


def test_streamed_agent_turn_carries_the_call_as_tool_call_chunks(chat, emu):
    emu.script(['{"name": "count_squares", "arguments": {"colour": "red"}}'])
    chunks = list(chat.bind_tools([count_squares]).stream(question("Count the red squares.")))
    assert chunks[-1].chunk_position == "last" and chunks[-1].tool_call_chunks[0]["index"] == 0
    whole = chunks[0]
    for c in chunks[1:]:
        whole = whole + c
    assert whole.tool_calls == [
        {"name": "count_squares", "args": {"colour": "red"}, "id": whole.tool_calls[0]["id"], "type": "tool_call"}
    ]


def test_create_agent_on_the_tiny_local_model(tools_backend):
    # random weights: only the grammar stands between the model and nonsense. The tool
    # strategy forces a call of the schema tool (tool_choice="any"), which must parse.
    chat = ChatMantis(backend=tools_backend, max_tokens=120)
    agent = create_agent(chat, tools=[], response_format=Verdict)
    result = agent.invoke({"messages": question("What is it?")})
    verdict = result["structured_response"]
    assert isinstance(verdict, Verdict) and len(verdict.subject) <= 20
    call = result["messages"][1].tool_calls[0]
    assert call["name"] == "Verdict" and json.loads(json.dumps(call["args"])) == verdict.model_dump()
