"""The framework-neutral tool-calling core: specs and tool_choice, the lenient-then-strict
parser (the habits of a 7B model), schema coercion, output schemas, the instruction and the
history format. The drivers and streaming are in test_tools_flow.py."""

from __future__ import annotations

import json
import re

import pytest
from jsonschema import Draft202012Validator

from mantis_llm import tools
from mantis_llm.errors import InvalidRequestError
from mantis_llm.prompt import render
from mantis_llm.tools import check_spec, parse_output
from mantis_llm.tools._spec import closed_objects
from mantis_llm.types import (
    Conversation,
    GenerationParams,
    Image,
    Request,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolSpec,
    Turn,
)

# the shapes LangChain's standard tests bind (convert_to_openai_tool keeps pydantic's titles)
MAGIC = Tool(
    "magic_function",
    "Apply a magic function to an input.",
    {
        "type": "object",
        "title": "magic_function",
        "properties": {"input": {"type": "integer", "title": "Input"}},
        "required": ["input"],
    },
)
NO_ARGS = Tool("magic_function_no_args", "Calculate a magic function.", {"type": "object", "properties": {}})
WEATHER = Tool(
    "get_weather",
    "Get the weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer"},
        },
        "required": ["city"],
    },
)
ID = re.compile(r"call_[0-9a-f]{24}")


def cat(*ts: Tool, choice: str = "auto", parallel: bool = False, fmt: ResponseFormat | None = None):
    return check_spec(ToolSpec(ts or (MAGIC, NO_ARGS, WEATHER), choice, parallel), fmt)


def only_call(text: str, catalog=None) -> ToolCall:
    parsed = parse_output(text, catalog or cat())
    assert parsed.error is None, parsed.error
    assert parsed.invalid_tool_calls == []
    assert len(parsed.tool_calls) == 1, parsed
    return parsed.tool_calls[0]


# ------------------------------------------------------------------------------ tool_choice


@pytest.mark.parametrize("value", [None, "auto", "AUTO", False, {"type": "auto"}])
def test_choice_auto(value):
    assert tools.normalize_tool_choice(value, [MAGIC]) == "auto"


@pytest.mark.parametrize("value", ["none", "None", {"type": "none"}])
def test_choice_none(value):
    assert tools.normalize_tool_choice(value, [MAGIC]) == "none"


@pytest.mark.parametrize("value", ["any", "required", "Required", True, {"type": "any"}, {"type": "required"}])
def test_choice_required(value):
    assert tools.normalize_tool_choice(value, [MAGIC, WEATHER]) == "required"


@pytest.mark.parametrize(
    "value",
    [
        "get_weather",
        "Get_Weather",
        "get-weather",
        "GET WEATHER",
        {"type": "function", "function": {"name": "get_weather"}},
        {"type": "tool", "name": "get_weather"},
        {"name": "get_weather"},
        {"function": {"name": "getWeather"}},
    ],
)
def test_choice_names_a_tool(value):
    assert tools.normalize_tool_choice(value, [MAGIC, WEATHER]) == "get_weather"


def test_choice_tools_may_be_openai_dicts_names_or_a_spec():
    openai = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    assert tools.normalize_tool_choice("get_weather", openai) == "get_weather"
    assert tools.normalize_tool_choice("GET_WEATHER", ["get_weather"]) == "get_weather"
    assert tools.normalize_tool_choice("magic_function", ToolSpec((MAGIC,))) == "magic_function"


@pytest.mark.parametrize(
    "value, message",
    [
        ("get_wether", "unknown tool 'get_wether'"),
        ({"type": "function", "function": {"name": "nope"}}, "unknown tool 'nope'"),
        ({"type": "function"}, "names no tool"),
        (3, "tool_choice must be"),
        (["get_weather"], "tool_choice must be"),
    ],
)
def test_choice_errors_are_clear(value, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        tools.normalize_tool_choice(value, [MAGIC, WEATHER])


@pytest.mark.parametrize("value", ["any", True, "magic_function"])
def test_forcing_a_call_without_tools_is_an_error(value):
    with pytest.raises(InvalidRequestError, match="no tools are bound"):
        tools.normalize_tool_choice(value, [])


def test_ambiguous_spelling_is_not_guessed():
    a, b = Tool("get_data"), Tool("get-data")
    assert tools.normalize_tool_choice("get-data", [a, b]) == "get-data"  # exact wins
    with pytest.raises(InvalidRequestError):
        tools.normalize_tool_choice("GET_DATA", [a, b])


# ------------------------------------------------------------------------------ tools and specs


def test_tool_from_openai_shapes():
    params = {"type": "object", "properties": {"x": {"type": "integer"}}}
    a = tools.tool_from_openai(
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": params}}
    )
    b = tools.tool_from_openai({"name": "f", "description": "d", "parameters": params})
    c = tools.tool_from_openai({"name": "f", "description": "d", "input_schema": params})  # Anthropic
    assert a == b == c == Tool("f", "d", params)
    bare = tools.tool_from_openai({"name": "g"})
    assert bare.parameters == {"type": "object", "properties": {}} and bare.description == ""
    assert tools.tool_from_openai(MAGIC) is MAGIC


@pytest.mark.parametrize(
    "d, message",
    [
        ({"type": "function", "function": {"description": "no name"}}, "non-empty string 'name'"),
        ({"name": "  "}, "non-empty string 'name'"),
        ({"name": "f", "parameters": "nope"}, "JSON schema object"),
        ({"name": "f", "parameters": {"type": "array"}}, "must describe an object"),
        ({"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integr"}}}}, "not a valid"),
        ({"name": "f", "description": 3}, "'description' must be a string"),
        ("f", "must be a mapping"),
    ],
)
def test_bad_tools_are_invalid_requests(d, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        tools.tool_from_openai(d)


@pytest.mark.parametrize(
    "spec, message",
    [
        (ToolSpec((MAGIC, MAGIC)), "two tools are named"),
        (ToolSpec((MAGIC,), "any"), "normalize_tool_choice"),
        (ToolSpec((MAGIC,), "get_weather"), "not 'auto', 'none', 'required' or a bound tool"),
        (ToolSpec((), "required"), "at least one tool"),
        (ToolSpec(("magic_function",)), "must hold Tool objects"),  # type: ignore[arg-type]
    ],
)
def test_check_spec_rejects_bad_specs(spec, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        check_spec(spec)


def test_bad_response_schema_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="response format 'answer'"):
        check_spec(None, ResponseFormat({"type": "objekt"}, "answer"))


# ------------------------------------------------------------------------------ finding calls (7B habits)


def test_bare_call_compact_and_spaced_json_alike():
    for text in (
        '{"name":"magic_function","arguments":{"input":3}}',  # what a grammar writes
        '{"name": "magic_function", "arguments": {"input": 3}}',
        ' \n{\n  "name": "magic_function",\n  "arguments": {\n    "input": 3\n  }\n}\n',
    ):
        call = only_call(text)
        assert (call.name, call.arguments) == ("magic_function", {"input": 3})
        assert ID.fullmatch(call.id)


def test_prose_before_the_json_stays_as_text():
    parsed = parse_output('Sure! Here is the JSON: {"name": "magic_function", "arguments": {"input": 3}}', cat())
    assert parsed.text == "Sure! Here is the JSON:"
    assert parsed.tool_calls[0].arguments == {"input": 3}


@pytest.mark.parametrize(
    "text, prose",
    [
        ('```json\n{"name": "magic_function", "arguments": {"input": 3}}\n```', ""),
        ('```\n{"name": "magic_function", "arguments": {"input": 3}}\n```', ""),
        ('I will call it.\n```JSON\n{"name": "magic_function", "arguments": {"input": 3}}\n```', "I will call it."),
        ('<tool_call>\n{"name": "magic_function", "arguments": {"input": 3}}\n</tool_call>', ""),
        ('Calling: <function_call>{"name": "magic_function", "arguments": {"input": 3}}</function_call>', "Calling:"),
        ('[TOOL_CALLS] [{"name": "magic_function", "arguments": {"input": 3}}]', ""),
    ],
)
def test_fences_and_tags_are_stripped(text, prose):
    parsed = parse_output(text, cat())
    assert parsed.error is None
    assert parsed.text == prose
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("magic_function", {"input": 3})]


def test_text_after_the_call_is_dropped():
    # small models go on to invent the tool's answer
    parsed = parse_output('{"name": "get_weather", "arguments": {"city": "Paris"}}\nObservation: sunny, 21C', cat())
    assert parsed.text == "" and parsed.tool_calls[0].arguments == {"city": "Paris"}


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "magic_function", "arguments": {"input": 3,},}',  # trailing commas
        "{'name': 'magic_function', 'arguments': {'input': 3}}",  # single quotes
        '{name: "magic_function", arguments: {input: 3}}',  # unquoted keys
        '{"name": "magic_function", "arguments": {"input": 3} // the input\n}',  # a comment
        '{"name": "magic_function" "arguments": {"input": 3}}',  # a missing comma
    ],
)
def test_almost_json_is_repaired(text):
    assert only_call(text).arguments == {"input": 3}


@pytest.mark.parametrize(
    "text",
    [
        '{"tool": "magic_function", "tool_input": {"input": 3}}',
        '{"tool_name": "magic_function", "parameters": {"input": 3}}',
        '{"function": "magic_function", "args": {"input": 3}}',
        '{"name": "magic_function", "input": {"input": 3}}',
        '{"action": "magic_function", "action_input": {"input": 3}}',
        '{"function": {"name": "magic_function", "arguments": "{\\"input\\": 3}"}}',  # OpenAI, args as a string
        '{"id": "x", "type": "function", "function": {"name": "magic_function", "arguments": {"input": 3}}}',
        '{"tool_calls": [{"name": "magic_function", "arguments": {"input": 3}}]}',
        '{"name": "magic_function", "arguments": "{\\"input\\": 3}"}',
    ],
)
def test_key_aliases(text):
    call = only_call(text)
    assert (call.name, call.arguments) == ("magic_function", {"input": 3})


@pytest.mark.parametrize("name", ["Magic_Function", "MAGIC-FUNCTION", "magic function", "magicFunction"])
def test_tool_names_match_ignoring_case_and_separators(name):
    call = only_call(json.dumps({"name": name, "arguments": {"input": 3}}))
    assert call.name == "magic_function"


def test_flat_arguments_next_to_the_name():
    call = only_call('{"name": "get_weather", "city": "Paris", "unit": "celsius"}')
    assert call.arguments == {"city": "Paris", "unit": "celsius"}
    # "input" is an alias of "arguments", but here it is the tool's own parameter
    assert only_call('{"name": "magic_function", "input": 3}').arguments == {"input": 3}


def test_a_bare_value_for_a_one_parameter_tool():
    assert only_call('{"name": "magic_function", "arguments": 3}').arguments == {"input": 3}
    parsed = parse_output('{"name": "get_weather", "arguments": "Paris"}', cat())
    assert parsed.tool_calls == [] and "must be a JSON object" in parsed.invalid_tool_calls[0].error


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "magic_function_no_args", "arguments": {}}',
        '{"name": "magic_function_no_args"}',
        '{"name": "magic_function_no_args", "arguments": null}',
        '{"name": "magic_function_no_args", "arguments": ""}',
    ],
)
def test_no_argument_tool_gets_exactly_an_empty_dict(text):
    assert only_call(text).arguments == {}


def test_unicode_arguments_survive():
    call = only_call('{"name": "get_weather", "arguments": {"city": "東京 – Zürich"}}')
    assert call.arguments == {"city": "東京 – Zürich"}


def test_raw_control_characters_in_strings_are_accepted():
    # xgrammar's maxLength strings can contain a raw tab (research §3.2): parse with strict=False
    assert only_call('{"name": "get_weather", "arguments": {"city": "San\tFrancisco"}}').arguments == {
        "city": "San\tFrancisco"
    }


def test_plain_prose_is_a_text_answer_in_auto_mode():
    for text in (
        "The weather in Paris is sunny.",
        "Use {braces} and [1] freely; {this is not json}.",
        'Here is a person: {"name": "Bob", "age": 3}',  # data with a "name" key, not a tool
        'A list: [1, 2, 3] and {"a": 1}.',
        "",
    ):
        parsed = parse_output(text, cat())
        assert (parsed.text, parsed.tool_calls, parsed.invalid_tool_calls, parsed.error) == (text, [], [], None)


def test_a_call_after_json_that_is_not_one():
    parsed = parse_output('Example {"a": 1}. Now: {"name": "magic_function", "arguments": {"input": 2}}', cat())
    assert parsed.text == 'Example {"a": 1}. Now:'
    assert parsed.tool_calls[0].arguments == {"input": 2}


def test_truncated_json_is_an_invalid_call_not_a_guess():
    text = 'Let me check. {"name": "get_weather", "arguments": {"city": "Par'
    parsed = parse_output(text, cat())
    assert parsed.tool_calls == []
    [bad] = parsed.invalid_tool_calls
    assert bad.name == "get_weather" and "incomplete" in bad.error and ID.fullmatch(bad.id)
    assert bad.arguments.startswith('{"name": "get_weather"')
    assert parsed.problem == "truncated" and parsed.text == text  # the raw output


def test_missing_last_brace_counts_as_truncated():
    parsed = parse_output('{"name": "magic_function", "arguments": {"input": 3}', cat())
    assert parsed.tool_calls == [] and parsed.problem == "truncated"


def test_unparseable_call_is_invalid_with_the_json_error():
    parsed = parse_output('{"name": "magic_function", "arguments": {"input": 3}} }', cat())
    assert parsed.tool_calls[0].arguments == {"input": 3}  # a stray brace after a call is just text
    parsed = parse_output('{"name": "magic_function", "arguments": {"input": @@@}}', cat())
    assert parsed.error is not None


def test_unknown_tool_is_invalid_and_names_the_tools():
    parsed = parse_output('{"name": "get_wether", "arguments": {"city": "Paris"}}', cat())
    [bad] = parsed.invalid_tool_calls
    assert bad.name == "get_wether"
    assert "unknown tool 'get_wether'" in bad.error and "get_weather" in bad.error
    assert parsed.problem == "invalid" and parsed.tool_calls == []


def test_named_choice_rejects_another_tool():
    parsed = parse_output('{"name": "get_weather", "arguments": {"city": "Paris"}}', cat(choice="magic_function"))
    assert parsed.tool_calls == [] and "requires a call to 'magic_function'" in parsed.invalid_tool_calls[0].error


def test_parallel_list_and_one_object_per_line():
    catalog = cat(parallel=True)
    for text in (
        '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"city": "B"}}]',
        '{"name": "get_weather", "arguments": {"city": "A"}}\n{"name": "get_weather", "arguments": {"city": "B"}}',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>',
    ):
        parsed = parse_output(text, catalog)
        assert [c.arguments["city"] for c in parsed.tool_calls] == ["A", "B"], text
        assert parsed.error is None
        assert len({c.id for c in parsed.tool_calls}) == 2


def test_without_parallel_only_the_first_call_is_made():
    text = (
        '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "magic_function", "arguments": {"input": 1}}]'
    )
    parsed = parse_output(text, cat(parallel=False))
    assert [c.arguments for c in parsed.tool_calls] == [{"city": "A"}]
    [extra] = parsed.invalid_tool_calls
    assert extra.name == "magic_function" and "only one tool call" in extra.error
    assert parsed.error is None  # nothing to repair: the call that counts is fine


def test_parallel_with_one_bad_call_keeps_the_good_one_and_asks_for_repair():
    text = '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"days": 2}}]'
    parsed = parse_output(text, cat(parallel=True))
    assert [c.arguments for c in parsed.tool_calls] == [{"city": "A"}]
    assert "'city' is a required property" in parsed.invalid_tool_calls[0].error
    assert parsed.error is not None and parsed.text == ""


def test_ids_are_unique():
    catalog = cat(parallel=True)
    text = json.dumps([{"name": "magic_function", "arguments": {"input": i}} for i in range(50)])
    ids = [c.id for c in parse_output(text, catalog).tool_calls] + [tools.new_call_id() for _ in range(200)]
    assert len(set(ids)) == len(ids) == 250 and all(ID.fullmatch(i) for i in ids)


def test_choice_none_and_no_tools_read_everything_as_text():
    text = '{"name": "magic_function", "arguments": {"input": 3}}'
    for catalog in (cat(choice="none"), check_spec(None), check_spec(ToolSpec(()))):
        parsed = parse_output(text, catalog)
        assert (parsed.text, parsed.tool_calls, parsed.error) == (text, [], None)


def test_forced_choice_without_a_call_is_a_failure():
    parsed = parse_output("Hello! How can I help?", cat(choice="required"))
    assert parsed.problem == "no_call" and "one of the tools" in (parsed.error or "")
    assert parsed.text == "Hello! How can I help?" and parsed.tool_calls == []


def test_forced_named_choice_accepts_bare_arguments():
    call = only_call('Here: {"city": "Paris", "days": "2"}', cat(choice="get_weather"))
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris", "days": 2})
    parsed = parse_output('{"town": "Paris"}', cat(choice="get_weather"))  # does not fit: no call
    assert parsed.problem == "no_call"


# ------------------------------------------------------------------------------ arguments: coercion, validation


def test_string_numbers_and_booleans_are_coerced_losslessly():
    t = Tool(
        "t",
        parameters={
            "type": "object",
            "properties": {
                "i": {"type": "integer"},
                "f": {"type": "number"},
                "b": {"type": "boolean"},
                "s": {"type": "string"},
                "whole": {"type": "integer"},
            },
        },
    )
    call = only_call(
        '{"name": "t", "arguments": {"i": " 3 ", "f": "2.5", "b": "False", "s": 94107, "whole": 3.0}}', cat(t)
    )
    assert call.arguments == {"i": 3, "f": 2.5, "b": False, "s": "94107", "whole": 3}
    assert type(call.arguments["i"]) is int and type(call.arguments["whole"]) is int


@pytest.mark.parametrize(
    "args",
    [
        {"i": "3.5"},
        {"i": "three"},
        {"i": True},
        {"b": "yes"},
        {"b": 1},
        {"s": True},
        {"f": "nan"},
        {"f": "0x10"},
        {"i": "1_000"},
    ],
)
def test_lossy_coercions_are_not_made(args):
    t = Tool(
        "t",
        parameters={
            "type": "object",
            "properties": {
                "i": {"type": "integer"},
                "f": {"type": "number"},
                "b": {"type": "boolean"},
                "s": {"type": "string"},
            },
        },
    )
    parsed = parse_output(json.dumps({"name": "t", "arguments": args}), cat(t))
    assert parsed.tool_calls == [] and parsed.invalid_tool_calls[0].error.startswith("tool 't': arguments.")


def test_coercion_walks_nested_schemas():
    t = Tool(
        "t",
        parameters={
            "type": "object",
            "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
            "properties": {
                "points": {"type": "array", "items": {"$ref": "#/$defs/Point"}},
                "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "nullable": {"type": "number", "nullable": True},
                "unit": {"enum": ["Celsius", "Fahrenheit"]},
                "level": {"enum": [1, 2, 3]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]},
                "choice": {"oneOf": [{"type": "boolean"}, {"type": "integer"}]},
            },
        },
    )
    text = json.dumps(
        {
            "name": "t",
            "arguments": {
                "points": [{"x": "1"}, {"x": 2}],
                "maybe": "7",
                "nullable": None,
                "unit": "celsius",
                "level": "2",
                "tags": '["a", 1]',
                "pair": ["4", "true"],
                "choice": "5",
            },
        }
    )
    assert only_call(text, cat(t)).arguments == {
        "points": [{"x": 1}, {"x": 2}],
        "maybe": 7,
        "nullable": None,
        "unit": "Celsius",
        "level": 2,
        "tags": ["a", "1"],
        "pair": [4, True],
        "choice": 5,
    }


def test_null_for_an_optional_non_nullable_argument_means_not_given():
    call = only_call('{"name": "get_weather", "arguments": {"city": "Paris", "unit": null}}')
    assert call.arguments == {"city": "Paris"}
    parsed = parse_output('{"name": "get_weather", "arguments": {"city": null}}', cat())
    assert "arguments.city: None is not of type 'string'" in parsed.invalid_tool_calls[0].error


def test_defaults_are_not_injected_except_for_required_properties():
    t = Tool(
        "t",
        parameters={
            "type": "object",
            "properties": {"a": {"type": "integer", "default": 1}, "b": {"type": "integer", "default": 2}},
            "required": ["b"],
        },
    )
    assert only_call('{"name": "t", "arguments": {}}', cat(t)).arguments == {"b": 2}
    assert only_call('{"name": "magic_function", "arguments": {"input": 3}}').arguments == {"input": 3}


def test_validation_errors_name_the_argument():
    parsed = parse_output('{"name": "get_weather", "arguments": {"city": ["x"], "unit": "kelvin"}}', cat())
    error = parsed.invalid_tool_calls[0].error
    assert error.startswith("tool 'get_weather': ")
    assert "arguments.city: ['x'] is not of type 'string'" in error
    assert "arguments.unit: 'kelvin' is not one of ['celsius', 'fahrenheit']" in error
    assert json.loads(parsed.invalid_tool_calls[0].arguments) == {"city": ["x"], "unit": "kelvin"}


def test_extra_arguments_are_kept_unless_the_schema_forbids_them():
    strict = Tool(
        "s", parameters={"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False}
    )
    assert only_call('{"name": "get_weather", "arguments": {"city": "P", "x": 1}}').arguments == {"city": "P", "x": 1}
    parsed = parse_output('{"name": "s", "arguments": {"a": 1, "x": 1}}', cat(strict))
    assert "Additional properties are not allowed" in parsed.invalid_tool_calls[0].error


def test_a_schema_that_cannot_be_applied_is_an_invalid_call_not_a_crash():
    remote = Tool("r", parameters={"type": "object", "properties": {"a": {"$ref": "https://example.invalid/a.json"}}})
    parsed = parse_output('{"name": "r", "arguments": {"a": 1}}', cat(remote))
    assert parsed.tool_calls == [] and "could not be applied" in parsed.invalid_tool_calls[0].error


def test_deeply_nested_json_does_not_crash():
    text = '{"name": "get_weather", "arguments": {"city": ' + "[" * 5000 + "]" * 5000 + "}}"
    parsed = parse_output(text, cat())
    assert parsed.tool_calls == [] and parsed.error is not None


# ------------------------------------------------------------------------------ structured output


def test_structured_answer_after_prose():
    schema = {"type": "object", "properties": {"setup": {"type": "string"}, "rating": {"type": "integer"}}}
    catalog = check_spec(None, ResponseFormat(schema, "Joke"))
    parsed = parse_output('Sure! Here is the JSON:\n```json\n{"setup": "Why?", "rating": "7",}\n```', catalog)
    assert parsed.error is None and parsed.value == {"setup": "Why?", "rating": 7}
    assert json.loads(parsed.text) == {"setup": "Why?", "rating": 7}


def test_structured_answer_any_object_and_failures():
    catalog = check_spec(None, ResponseFormat())
    assert parse_output('{"a": [1, 2]}', catalog).value == {"a": [1, 2]}
    assert parse_output("[1, 2]", catalog).problem == "schema"  # an object is wanted
    assert parse_output("I don't know.", catalog).problem == "no_json"
    assert parse_output('{"a": [1, 2', catalog).problem == "truncated"
    strict = check_spec(None, ResponseFormat({"type": "object", "required": ["x"]}))
    parsed = parse_output('{"y": 1}', strict)
    assert parsed.problem == "schema" and "'x' is a required property" in (parsed.error or "")
    assert parsed.text == '{"y": 1}'


def test_structured_scalar_and_array_answers():
    assert parse_output("[1, 2]", check_spec(None, ResponseFormat({"type": "array"}))).value == [1, 2]
    assert parse_output(" 42 ", check_spec(None, ResponseFormat({"type": "integer"}))).value == 42


def test_tools_and_a_response_format_together():
    catalog = cat(MAGIC, fmt=ResponseFormat({"type": "object", "properties": {"answer": {"type": "integer"}}}))
    call = parse_output('{"name": "magic_function", "arguments": {"input": 3}}', catalog)
    assert call.tool_calls[0].arguments == {"input": 3} and call.value is None
    answer = parse_output('The result: {"answer": "5"}', catalog)
    assert answer.tool_calls == [] and answer.value == {"answer": 5} and answer.text == '{"answer": 5}'


# ------------------------------------------------------------------------------ output schemas


def test_envelope_schema_single_tool_accepts_exactly_calls():
    schema = tools.envelope_schema(ToolSpec((MAGIC,)))
    v = Draft202012Validator(schema)
    assert v.is_valid({"name": "magic_function", "arguments": {"input": 3}})
    assert not v.is_valid({"name": "magic_function", "arguments": {"input": "3"}})
    assert not v.is_valid({"name": "other", "arguments": {"input": 3}})
    assert not v.is_valid({"name": "magic_function"})
    assert not v.is_valid([{"name": "magic_function", "arguments": {"input": 3}}])


def test_envelope_schema_any_of_tools_named_and_parallel():
    spec = ToolSpec((MAGIC, WEATHER, NO_ARGS))
    v = Draft202012Validator(tools.envelope_schema(spec))
    assert v.is_valid({"name": "get_weather", "arguments": {"city": "P"}})
    assert v.is_valid({"name": "magic_function_no_args", "arguments": {}})
    assert not v.is_valid({"name": "get_weather", "arguments": {"input": 3}})
    named = Draft202012Validator(tools.envelope_schema(ToolSpec((MAGIC, WEATHER), "get_weather", parallel=True)))
    assert named.is_valid({"name": "get_weather", "arguments": {"city": "P"}})
    assert not named.is_valid({"name": "magic_function", "arguments": {"input": 3}})
    assert not named.is_valid([{"name": "get_weather", "arguments": {"city": "P"}}])  # a name means one call
    par = Draft202012Validator(tools.envelope_schema(ToolSpec((MAGIC, WEATHER), parallel=True)))
    assert par.is_valid(
        [{"name": "get_weather", "arguments": {"city": "P"}}, {"name": "magic_function", "arguments": {"input": 1}}]
    )
    assert par.is_valid({"name": "get_weather", "arguments": {"city": "P"}})  # a lone call stays an object
    assert not par.is_valid([])


def test_envelope_schema_hoists_defs_and_renames_clashes():
    a = Tool(
        "a",
        parameters={"type": "object", "properties": {"x": {"$ref": "#/$defs/P"}}, "$defs": {"P": {"type": "integer"}}},
    )
    b = Tool(
        "b",
        parameters={
            "type": "object",
            "properties": {"y": {"$ref": "#/definitions/P"}},
            "definitions": {"P": {"type": "string"}},
        },
    )
    c = Tool(
        "c", parameters={"type": "object", "properties": {"w": {"type": "boolean"}, "z": {"$ref": "#/properties/w"}}}
    )
    schema = tools.envelope_schema(ToolSpec((a, b, c), parallel=True))
    Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref": "([^"]+)"', json.dumps(schema))
    assert refs and all(r.startswith("#/$defs/") for r in refs)
    v = Draft202012Validator(schema)
    assert v.is_valid([{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "s"}}])
    assert not v.is_valid({"name": "a", "arguments": {"x": "s"}})
    assert not v.is_valid({"name": "b", "arguments": {"y": 1}})
    assert v.is_valid({"name": "c", "arguments": {"w": True, "z": False}})
    assert not v.is_valid({"name": "c", "arguments": {"z": 1}})


def test_response_schema_and_output_constraint():
    assert tools.response_schema(ResponseFormat()) == {"type": "object"}
    joke = {"type": "object", "properties": {"setup": {"type": "string"}}, "required": ["setup"]}
    assert tools.response_schema(ResponseFormat(joke)) == joke

    conv = Conversation.from_prompt("hi")
    assert tools.output_constraint(Request(conv)) is None
    assert tools.output_constraint(Request(conv, tools=ToolSpec((MAGIC,), "none"))) is None
    auto = tools.output_constraint(Request(conv, tools=ToolSpec((MAGIC,))))
    # the grammar's schema closes every object that lists its properties (a model must not add keys)
    assert auto is not None and auto.text is True
    assert auto.schema == closed_objects(tools.envelope_schema(ToolSpec((MAGIC,))))
    assert auto.schema["properties"]["arguments"]["additionalProperties"] is False
    forced = tools.output_constraint(Request(conv, tools=ToolSpec((MAGIC,), "required")))
    assert forced is not None and forced.text is False
    fmt = tools.output_constraint(Request(conv, response_format=ResponseFormat(joke)))
    assert fmt is not None and fmt.text is False and fmt.schema == {**joke, "additionalProperties": False}
    assert tools.output_constraint(Request(conv, response_format=ResponseFormat())).schema == {"type": "object"}
    both = tools.output_constraint(Request(conv, tools=ToolSpec((MAGIC,)), response_format=ResponseFormat(joke)))
    assert both is not None and both.text is False
    v = Draft202012Validator(both.schema)
    assert v.is_valid({"setup": "x"}) and v.is_valid({"name": "magic_function", "arguments": {"input": 1}})
    assert not v.is_valid({"other": 1})


# ------------------------------------------------------------------------------ the instruction


def instructed(
    conv: Conversation, spec: ToolSpec | None = None, fmt: ResponseFormat | None = None, **params
) -> Request:
    req = Request(conv, GenerationParams(**params), tools=spec, response_format=fmt)
    return tools.instruct(req, check_spec(spec, fmt), tools.TOOL_MAX_TOKENS)


def test_instruction_is_a_system_turn_after_the_callers_system_text():
    conv = Conversation([Turn("system", ["You are terse."]), Turn("user", ["What is magic_function(3)?"])])
    req = instructed(conv, ToolSpec((MAGIC, WEATHER)))
    assert [t.role for t in req.conversation.turns] == ["system", "system", "user"]
    assert req.conversation.turns[0].text == "You are terse."
    block = req.conversation.turns[1].text
    assert block == tools.system_block(check_spec(ToolSpec((MAGIC, WEATHER))))
    local = render(req.conversation, "local").text
    assert local.startswith("You are terse.\nYou can use these tools")
    assert local.endswith("</s>USER: What is magic_function(3)?</s>ASSISTANT:")  # auto: the user turn is untouched
    fal = render(req.conversation, "fal").text
    assert fal.startswith("You are terse.\nYou can use these tools") and fal.endswith("What is magic_function(3)?")
    assert conv.turns[1].parts == ["What is magic_function(3)?"]  # the caller's conversation is not changed


def test_instruction_shows_tools_compactly_with_one_example():
    block = tools.system_block(check_spec(ToolSpec((MAGIC, WEATHER))))
    lines = block.splitlines()
    shown = [json.loads(line) for line in lines if '"parameters"' in line]
    assert [t["name"] for t in shown] == ["magic_function", "get_weather"]
    assert shown[0]["parameters"] == {
        "type": "object",
        "properties": {"input": {"type": "integer"}},
        "required": ["input"],
    }
    assert '{"name":"<tool name>","arguments":{...}}' in lines
    assert 'For example: {"name":"magic_function","arguments":{"input":1}}' in lines  # an int, unquoted
    # every JSON shown is compact, as a grammar-constrained backend writes it
    shown_json = [line.removeprefix("For example: ") for line in lines if line.startswith(("{", "For example"))]
    assert len(shown_json) == 4 and not any(", " in j or ": " in j for j in shown_json)
    assert "answer normally in plain text" in block
    assert "list" not in block  # no parallel calls offered
    assert "JSON list" in tools.system_block(check_spec(ToolSpec((MAGIC,), parallel=True)))


def test_a_title_property_is_kept_when_titles_are_dropped():
    t = Tool(
        "t", parameters={"type": "object", "title": "T", "properties": {"title": {"type": "string", "title": "Title"}}}
    )
    block = tools.system_block(check_spec(ToolSpec((t,))))
    assert '"parameters":{"type":"object","properties":{"title":{"type":"string"}}}' in block


def test_forced_choices_change_the_instruction_and_remind_at_the_end():
    conv = Conversation.from_prompt("Hello!")
    named = instructed(conv, ToolSpec((MAGIC, WEATHER), "get_weather"))
    block = named.conversation.turns[0].text
    assert 'You must call the tool "get_weather" now' in block and "magic_function" not in block
    assert named.conversation.turns[-1].parts == ["Hello!", '\n\n(Reply with only the JSON call of "get_weather".)']
    required = instructed(conv, ToolSpec((MAGIC, WEATHER), "required"))
    assert "You must call one of these tools now" in required.conversation.turns[0].text
    assert required.conversation.turns[-1].text.endswith("(Reply with only the JSON tool call.)")
    assert "plain text" not in required.conversation.turns[0].text


def test_choice_none_says_not_to_call_and_shows_no_tools():
    req = instructed(Conversation.from_prompt("Thanks!"), ToolSpec((MAGIC,), "none"))
    block = req.conversation.turns[0].text
    assert block.startswith("Do not call any tool now") and "magic_function" not in block
    assert req.params.max_tokens is None  # no call can come: the backend's default applies


def test_structured_output_instruction():
    joke = {"type": "object", "title": "Joke", "properties": {"setup": {"type": "string"}}}
    req = instructed(Conversation.from_prompt("A joke"), fmt=ResponseFormat(joke, "Joke"))
    block = req.conversation.turns[0].text
    assert block == (
        "Reply with only a JSON value that matches this JSON schema, and nothing else:\n"
        '{"type":"object","properties":{"setup":{"type":"string"}}}'
    )
    assert req.conversation.turns[-1].text.endswith("(Reply with only the JSON.)")
    assert "only a JSON object" in tools.system_block(check_spec(None, ResponseFormat()))


def test_max_tokens_is_set_only_when_missing():
    conv = Conversation.from_prompt("hi")
    assert instructed(conv, ToolSpec((MAGIC,))).params.max_tokens == tools.TOOL_MAX_TOKENS == 512
    assert instructed(conv, ToolSpec((MAGIC,)), max_tokens=50, temperature=0.2).params == GenerationParams(
        max_tokens=50, temperature=0.2
    )
    assert instructed(conv, fmt=ResponseFormat()).params.max_tokens == 512


def test_instructed_request_keeps_tools_for_grammar_backends():
    spec = ToolSpec((MAGIC,))
    req = instructed(Conversation.from_prompt("hi"), spec)
    assert req.tools is spec and req.response_format is None


# ------------------------------------------------------------------------------ history


def test_render_tool_calls_is_the_requested_format():
    one = [ToolCall("get_weather", {"city": "東京"}, "call_1")]
    assert tools.render_tool_calls(one) == '{"name":"get_weather","arguments":{"city":"東京"}}'
    two = [*one, {"name": "magic_function", "args": '{"input": 3}', "id": "x"}]
    assert tools.render_tool_calls(two) == (
        '[{"name":"get_weather","arguments":{"city":"東京"}},{"name":"magic_function","arguments":{"input":3}}]'
    )
    assert (
        tools.render_tool_calls(one, "Let me look.  ")
        == 'Let me look.\n{"name":"get_weather","arguments":{"city":"東京"}}'
    )
    assert tools.render_tool_calls([], "just text") == "just text"
    assert (
        tools.render_tool_calls([{"name": "magic_function_no_args"}])
        == '{"name":"magic_function_no_args","arguments":{}}'
    )
    turn = tools.tool_calls_turn(one)
    assert turn.role == "assistant" and turn.parts == [tools.render_tool_calls(one)]
    with pytest.raises(InvalidRequestError):
        tools.render_tool_calls([{"arguments": {}}])


def test_history_round_trips_through_the_parser():
    calls = [ToolCall("get_weather", {"city": "Paris", "days": 2}, "a"), ToolCall("magic_function", {"input": 3}, "b")]
    parsed = parse_output(tools.render_tool_calls(calls, "Checking."), cat(parallel=True))
    assert parsed.text == "Checking."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(c.name, c.arguments) for c in calls]


def test_tool_result_parts_header_text_and_images():
    img = Image("https://example.com/chart.png")
    parts = tools.tool_result_parts("get_chart", "call_abc", False, ["Here it is:", img, "done"])
    assert parts == ['Tool result (tool "get_chart", id call_abc):\n', "Here it is:", img, "done"]
    err = tools.tool_result_parts("get_weather", "call_x", True, "boom")
    assert err == ['Tool result (tool "get_weather", id call_x, status: error):\n', "boom"]
    # the header ends with a newline, so the prompt reads as if it were joined to the text
    assert render(Conversation([Turn("user", err)])).text.endswith("status: error):\nboom</s>ASSISTANT:")
    assert tools.tool_result_parts(None, None, False, img) == ["Tool result:\n", img]
    assert tools.tool_result_parts("f", "1", False, ["", "  "]) == ['Tool result (tool "f", id 1):\n(no output)']
    turn = tools.tool_result_turn("get_chart", "call_abc", False, [img])
    assert turn.role == "user" and turn.images == [img]
    with pytest.raises(InvalidRequestError):
        tools.tool_result_parts("f", "1", False, [3])  # type: ignore[list-item]


def test_a_whole_agent_history_renders_with_images_in_place():
    img = Image("https://example.com/chart.png")
    call = ToolCall("get_chart", {}, "call_abc")
    conv = Conversation(
        [
            Turn("user", ["Show me the chart."]),
            tools.tool_calls_turn([call]),
            tools.tool_result_turn("get_chart", "call_abc", False, [img]),
        ]
    )
    req = instructed(conv, ToolSpec((Tool("get_chart"),)))
    rendered = render(req.conversation, "local")
    assert rendered.images == [img]
    assert (
        'USER: Show me the chart.</s>ASSISTANT: {"name":"get_chart","arguments":{}}</s>'
        'USER: Tool result (tool "get_chart", id call_abc):\n(image 1: <Image><image></Image>)</s>ASSISTANT:'
    ) in rendered.text


def test_list_items_that_are_not_calls_are_invalid():
    parsed = parse_output('[{"name": "magic_function", "arguments": {"input": 1}}, 42]', cat(parallel=True))
    assert [c.arguments for c in parsed.tool_calls] == [{"input": 1}]
    assert (
        parsed.invalid_tool_calls[0].arguments == "42"
        and "not a tool call object" in parsed.invalid_tool_calls[0].error
    )


def test_a_null_name_is_not_a_call():
    text = '{"name": null, "arguments": {"input": 1}}'
    assert parse_output(text, cat()).text == text and parse_output(text, cat()).tool_calls == []
