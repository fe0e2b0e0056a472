"""Tool calls and structured output on the local backend: the grammar guarantees the format.

The tiny model has random weights, so every valid answer below is the grammar's doing: sampled
at temperature 1 over 20 seeds, each one must parse and match its schema."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

from mantis_llm import Conversation, GenerationParams, Request, tools
from mantis_llm.types import ResponseFormat, Tool, ToolSpec

SEEDS = range(20)


class Verdict(BaseModel):
    label: str = Field(max_length=16)
    kind: Literal["cat", "dog", "other"]
    sure: bool


WEATHER = Tool(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]},
)


def instructed(request: Request) -> Request:
    """The request as the tool flow hands it to the backend (instruction added)."""
    return tools.instruct(request, tools.check_spec(request.tools, request.response_format))


def sampled(prompt: str, seed: int, **kw) -> Request:
    return Request(Conversation.from_prompt(prompt), GenerationParams(max_tokens=300, temperature=1.0, seed=seed), **kw)


@pytest.mark.parametrize("seed", SEEDS)
def test_structured_output_is_valid_for_every_seed(tools_backend, seed):
    schema = Verdict.model_json_schema()
    r = tools.generate(tools_backend, sampled("What is in the picture?", seed, response_format=ResponseFormat(schema)))
    value = json.loads(r.text)
    assert Draft202012Validator(schema).is_valid(value), r.text
    Verdict.model_validate(value)
    assert r.finish_reason == "stop" and r.metrics["tool_attempts"] == 1  # no repair: the grammar held


@pytest.mark.parametrize("seed", SEEDS)
def test_a_forced_tool_call_is_valid_for_every_seed(tools_backend, seed):
    r = tools.generate(tools_backend, sampled("Weather in Paris?", seed, tools=ToolSpec((WEATHER,), "required")))
    assert not r.invalid_tool_calls and len(r.tool_calls) == 1, r
    call = r.tool_calls[0]
    assert call.name == "get_weather" and isinstance(call.arguments["city"], str) and call.id.startswith("call_")
    assert r.finish_reason == "tool_calls"


def test_a_mixed_batch_gives_each_row_what_it_gets_alone(tools_backend):
    # greedy: a constrained row and free rows in one batch, against the same requests one by one
    greedy = GenerationParams(max_tokens=300)  # room for the bounded JSON to close
    free = Request(Conversation.from_prompt("Describe a cat."), greedy)
    call = instructed(Request(Conversation.from_prompt("Weather?"), greedy, tools=ToolSpec((WEATHER,), "required")))
    schema = Verdict.model_json_schema()
    structured = instructed(
        Request(Conversation.from_prompt("Verdict?"), greedy, response_format=ResponseFormat(schema))
    )
    requests = [free, call, structured, Request(Conversation.from_prompt("Name a dog."), greedy)]
    alone = [tools_backend.generate(r) for r in requests]
    together = tools_backend.generate_batch(requests)
    assert max(r.metrics["batch_size"] for r in together) > 1
    assert [r.text for r in together] == [r.text for r in alone]
    assert json.loads(together[2].text) is not None and json.loads(together[1].text)["name"] == "get_weather"


def test_enforces_format_only_when_constrained(tools_backend):
    conv = Conversation.from_prompt("hi")
    assert not tools_backend.enforces_format(Request(conv))
    assert tools_backend.enforces_format(Request(conv, tools=ToolSpec((WEATHER,))))
    assert not tools_backend.enforces_format(Request(conv, tools=ToolSpec((WEATHER,), "none")))


# Through the adapters, as users call them: the same guarantee at temperature 1 over 20 seeds.


@pytest.mark.slow  # 20 generations
def test_chat_mantis_structured_output_is_valid_for_every_seed(tools_backend):
    from mantis_llm.langchain import ChatMantis

    for seed in SEEDS:
        chat = ChatMantis(backend=tools_backend, temperature=1.0, seed=seed, max_tokens=300)
        verdict = chat.with_structured_output(Verdict).invoke("What is in the picture?")
        assert isinstance(verdict, Verdict), (seed, verdict)


@pytest.mark.slow  # 20 generations
def test_chat_mantis_forced_tool_call_is_valid_for_every_seed(tools_backend):
    from langchain_core.tools import tool

    from mantis_llm.langchain import ChatMantis

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    for seed in SEEDS:
        chat = ChatMantis(backend=tools_backend, temperature=1.0, seed=seed, max_tokens=300)
        message = chat.bind_tools([get_weather], tool_choice="any").invoke("Weather in Paris?")
        assert not message.invalid_tool_calls and len(message.tool_calls) == 1, (seed, message)
        call = message.tool_calls[0]
        assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str), (seed, call)
        assert get_weather.invoke(call["args"])  # the arguments validate against the tool's own schema


@pytest.mark.slow  # 20 generations
def test_llama_index_structured_predict_is_valid_for_every_seed(tools_backend):
    from llama_index.core.prompts import PromptTemplate

    from mantis_llm.llama_index import Mantis

    for seed in SEEDS:
        llm = Mantis(backend=tools_backend, temperature=1.0, seed=seed, max_tokens=300)
        verdict = llm.structured_predict(Verdict, PromptTemplate("What is in the picture?"))
        assert isinstance(verdict, Verdict), (seed, verdict)
