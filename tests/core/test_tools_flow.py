"""The tool flow and its drivers (generate/agenerate/stream/astream) over a scripted backend:
repairs, enforced formats, pass-through, max_tokens, and stream detection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest

from mantis_llm import tools
from mantis_llm.backends.base import Backend
from mantis_llm.errors import BackendError, InvalidRequestError
from mantis_llm.tools import StreamDetector, check_spec, parse_output
from mantis_llm.types import (
    Chunk,
    Conversation,
    GenerationParams,
    Request,
    Response,
    ResponseFormat,
    Tool,
    ToolSpec,
    Usage,
)

MAGIC = Tool(
    "magic_function",
    "Apply a magic function to an input.",
    {"type": "object", "properties": {"input": {"type": "integer"}}, "required": ["input"]},
)
WEATHER = Tool(
    "get_weather",
    "Get the weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
GOOD = '{"name": "magic_function", "arguments": {"input": 3}}'


class Scripted(Backend):
    """Answers with canned texts, in order; records every request. Streams in small pieces."""

    provider = "scripted"
    model = "scripted-model"

    def __init__(self, *texts: str, piece: int = 3, finish_reason: str | None = "stop") -> None:
        self.texts = list(texts)
        self.piece = piece
        self.finish_reason = finish_reason
        self.requests: list[Request] = []
        self.calls: list[str] = []  # which method ran each request
        self.closed_streams = 0

    def _answer(self, request: Request, how: str) -> Response:
        self.requests.append(request)
        self.calls.append(how)
        if not self.texts:
            raise AssertionError("the script ran out of answers")
        text = self.texts.pop(0)
        return Response(
            text=text,
            model=self.model,
            finish_reason=self.finish_reason,
            usage=Usage(100, len(text)),
            request_id=f"req-{len(self.requests)}",
            metrics={"backend": True},
        )

    def _pieces(self, text: str) -> list[str]:
        return [text[i : i + self.piece] for i in range(0, len(text), self.piece)]

    def generate(self, request, *, on_update=None):
        return self._answer(request, "generate")

    async def agenerate(self, request, *, on_update=None):
        return self._answer(request, "agenerate")

    def stream(self, request, *, on_update=None) -> Iterator[Chunk]:
        response = self._answer(request, "stream")
        try:
            for piece in self._pieces(response.text):
                yield Chunk(piece)
            yield Chunk("", response=response)
        finally:
            self.closed_streams += 1

    async def astream(self, request, *, on_update=None) -> AsyncIterator[Chunk]:
        response = self._answer(request, "astream")
        try:
            for piece in self._pieces(response.text):
                yield Chunk(piece)
            yield Chunk("", response=response)
        finally:
            self.closed_streams += 1


class Grammar(Scripted):
    """A backend that says it enforces the format (as the local grammar backend will)."""

    def __init__(self, *texts: str, **kw) -> None:
        super().__init__(*texts, **kw)
        self.asked: list[Request] = []

    def enforces_format(self, request: Request) -> bool:
        self.asked.append(request)
        return True


class SizesItself(Scripted):
    default_max_tokens = 256


def req(prompt: str = "What is magic_function(3)? Use the tool.", choice: str = "auto", **kw) -> Request:
    spec = kw.pop("spec", ToolSpec((MAGIC, WEATHER), choice, kw.pop("parallel", False)))
    return Request(Conversation.from_prompt(prompt), kw.pop("params", GenerationParams()), tools=spec, **kw)


# ------------------------------------------------------------------------------ pass-through


async def test_requests_without_tools_pass_through_untouched():
    plain = Request(Conversation.from_prompt("hi"))
    empty = Request(Conversation.from_prompt("hi"), tools=ToolSpec(()))
    for request in (plain, empty):
        backend = Scripted('{"name": "magic_function", "arguments": {"input": 3}}', "b", "c", "d")
        response = tools.generate(backend, request)
        assert backend.requests[0] is request and response.tool_calls == [] and response.text == GOOD
        assert (await tools.agenerate(backend, request)).text == "b"
        assert "".join(c.text for c in tools.stream(backend, request)) == "c"
        assert [c.text async for c in tools.astream(backend, request)][-1] == ""
        assert all(r is request for r in backend.requests)
        assert backend.calls == ["generate", "agenerate", "stream", "astream"]


def test_tool_flow_passes_the_same_objects_through():
    plain = Request(Conversation.from_prompt("hi"))
    flow = tools.tool_flow(plain)
    assert next(flow) is plain
    response = Response("x", "m")
    with pytest.raises(StopIteration) as done:
        flow.send(response)
    assert done.value.value is response


def test_an_instructed_request_is_never_instructed_twice():
    class Rerouting(Scripted):
        """A backend that (wrongly or not) sends what it gets through tools.generate again."""

        def generate(self, request, *, on_update=None):
            inner = Scripted(*self.texts)
            response = tools.generate(inner, request)
            self.requests.extend(inner.requests)
            return response

    backend = Rerouting(GOOD)
    response = tools.generate(backend, req())
    [sent] = backend.requests
    assert tools.is_instructed(sent) and not tools.is_instructed(req())
    assert sum(t.role == "system" for t in sent.conversation.turns) == 1
    assert response.tool_calls[0].arguments == {"input": 3}


# ------------------------------------------------------------------------------ generate


def test_a_good_call_needs_one_model_call():
    text = 'Sure! Here is the JSON: ```json\n{"name": "magic_function", "arguments": {"input": "3"}}\n```'
    backend = Scripted(text)
    response = tools.generate(backend, req())
    [call] = response.tool_calls
    assert (call.name, call.arguments) == ("magic_function", {"input": 3})
    assert response.text == "Sure! Here is the JSON:"
    assert response.finish_reason == "tool_calls" and response.invalid_tool_calls == []
    assert response.metrics == {"backend": True, "tool_attempts": 1}
    assert response.usage == Usage(100, len(text))
    sent = backend.requests[0]
    assert sent.params.max_tokens == tools.TOOL_MAX_TOKENS
    assert sent.conversation.turns[0].role == "system" and "magic_function" in sent.conversation.turns[0].text


def test_prose_in_auto_mode_is_an_answer_not_an_error():
    backend = Scripted("The answer is 3.")
    response = tools.generate(backend, req())
    assert (response.text, response.tool_calls, response.invalid_tool_calls) == ("The answer is 3.", [], [])
    assert response.finish_reason == "stop" and len(backend.requests) == 1


def test_bad_call_is_repaired_in_a_second_turn():
    backend = Scripted('{"name": "magic_function", "arguments": {"input": "three"}}', GOOD)
    request = req()
    response = tools.generate(backend, request)
    assert [c.arguments for c in response.tool_calls] == [{"input": 3}]
    assert response.invalid_tool_calls == []
    first, repair = backend.requests
    assert repair.conversation.turns[: len(first.conversation.turns)] == first.conversation.turns
    bad, feedback = repair.conversation.turns[-2:]
    assert bad.role == "assistant" and bad.text == '{"name": "magic_function", "arguments": {"input": "three"}}'
    assert feedback.role == "user" and "arguments.input: 'three' is not of type 'integer'" in feedback.text
    assert "Reply again with only the corrected JSON" in feedback.text
    assert repair.params == first.params and repair.tools is request.tools
    assert response.usage == Usage(200, len(bad.text) + len(GOOD))  # both attempts are paid for
    assert response.metrics["tool_attempts"] == 2 and "three" in response.metrics["tool_errors"][0]
    assert response.request_id == "req-2"


def test_repairs_give_up_after_two_and_return_the_invalid_call():
    bad = '{"name": "magic_function", "arguments": {"input": "x"}}'
    backend = Scripted(bad, bad, bad, "never asked")
    response = tools.generate(backend, req())
    assert len(backend.requests) == 1 + tools.MAX_REPAIRS == 3
    assert response.tool_calls == [] and response.text == bad
    [invalid] = response.invalid_tool_calls
    assert invalid.name == "magic_function" and "not of type 'integer'" in invalid.error
    assert response.metrics["tool_attempts"] == 3 and len(response.metrics["tool_errors"]) == 3
    # each repair is built on the first instructed request, not stacked
    assert len(backend.requests[1].conversation.turns) == len(backend.requests[2].conversation.turns)
    assert backend.texts == ["never asked"]


def test_required_choice_repairs_prose_and_names_the_target():
    backend = Scripted("Hello! How can I help you today?", GOOD)
    response = tools.generate(backend, req("Hello!", "required"))
    assert [c.name for c in response.tool_calls] == ["magic_function"]
    feedback = backend.requests[1].conversation.turns[-1].text
    assert "You did not call a tool" in feedback and "magic_function, get_weather" in feedback


def test_required_choice_that_never_calls_ends_with_an_invalid_call():
    backend = Scripted("Hello!", "Hi!", "Hey!")
    response = tools.generate(backend, req("Hello!", "get_weather"))
    assert response.tool_calls == [] and response.text == "Hey!"
    [invalid] = response.invalid_tool_calls
    assert "no tool call" in invalid.error and invalid.arguments == "Hey!" and invalid.id.startswith("call_")


def test_truncated_call_gets_a_cut_off_repair_message():
    backend = Scripted(
        '{"name": "get_weather", "arguments": {"city": "Par', '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    )
    response = tools.generate(backend, req())
    assert response.tool_calls[0].arguments == {"city": "Paris"}
    assert "cut off" in backend.requests[1].conversation.turns[-1].text


def test_a_backend_that_enforces_the_format_gets_no_repairs():
    backend = Grammar('{"name":"magic_function","arguments":{"input":3', "unused")
    request = req()
    response = tools.generate(backend, request)
    assert len(backend.requests) == 1 and backend.asked == [request]
    assert response.tool_calls == [] and "incomplete" in response.invalid_tool_calls[0].error
    ok = Grammar('{"name":"magic_function","arguments":{"input":3}}')  # compact, as a grammar writes
    assert tools.generate(ok, req()).tool_calls[0].arguments == {"input": 3}


def test_enforced_can_be_given_by_the_caller():
    bad = '{"name": "nope", "arguments": {}}'
    assert len(tools.generate(b := Scripted(bad), req(), enforced=True).invalid_tool_calls) == 1
    assert len(b.requests) == 1
    forced_off = Grammar(bad, GOOD)
    assert tools.generate(forced_off, req(), enforced=False).tool_calls[0].name == "magic_function"
    assert forced_off.asked == [] and len(forced_off.requests) == 2


def test_max_tokens_kept_when_set_and_left_to_a_backend_that_sizes_output():
    backend = Scripted(GOOD)
    tools.generate(backend, req(params=GenerationParams(max_tokens=40)))
    assert backend.requests[0].params.max_tokens == 40
    sizes = SizesItself(GOOD)
    tools.generate(sizes, req())
    assert sizes.requests[0].params.max_tokens is None


def test_bad_specs_fail_before_the_backend_is_called():
    backend = Scripted(GOOD)
    with pytest.raises(InvalidRequestError, match="two tools"):
        tools.generate(backend, req(spec=ToolSpec((MAGIC, MAGIC))))
    with pytest.raises(InvalidRequestError):
        list(tools.stream(backend, req(spec=ToolSpec((MAGIC,), "get_weather"))))
    assert backend.requests == []


def test_structured_output_flow_and_repair():
    schema = {
        "type": "object",
        "properties": {"setup": {"type": "string"}, "rating": {"type": "integer"}},
        "required": ["setup"],
    }
    backend = Scripted('Sure! {"rating": "7"}', 'Here: {"setup": "Why?", "rating": "7"}')
    request = Request(Conversation.from_prompt("A joke"), response_format=ResponseFormat(schema, "Joke"))
    response = tools.generate(backend, request)
    assert json.loads(response.text) == {"setup": "Why?", "rating": 7}
    assert "'setup' is a required property" in backend.requests[1].conversation.turns[-1].text
    assert (
        backend.requests[0].params.max_tokens == 512 and backend.requests[0].response_format is request.response_format
    )


def test_choice_none_runs_once_and_returns_text():
    backend = Scripted(GOOD)
    response = tools.generate(backend, req(choice="none"))
    assert response.text == GOOD and response.tool_calls == [] and len(backend.requests) == 1
    assert backend.requests[0].conversation.turns[0].text.startswith("Do not call any tool")


async def test_agenerate_repairs_the_same_way():
    backend = Scripted("Hello!", '{"name": "Get-Weather", "arguments": {"city": "SF"}}')
    response = await tools.agenerate(backend, req("Weather?", "required"))
    assert [(c.name, c.arguments) for c in response.tool_calls] == [("get_weather", {"city": "SF"})]
    assert backend.calls == ["agenerate", "agenerate"]


def test_tool_flow_drives_by_hand():
    flow = tools.tool_flow(req(), max_tokens=None)
    first = next(flow)
    assert first.params.max_tokens is None
    repair = flow.send(Response("{'name': 'nope', 'arguments': {}}", "m"))
    assert repair.conversation.turns[-1].role == "user" and "unknown tool 'nope'" in repair.conversation.turns[-1].text
    with pytest.raises(StopIteration) as done:
        flow.send(Response(GOOD, "m"))
    assert done.value.value.tool_calls[0].arguments == {"input": 3}


# ------------------------------------------------------------------------------ streaming


def collect(chunks: list[Chunk]) -> tuple[list[str], Response]:
    assert all(c.response is None for c in chunks[:-1]) and chunks[-1].response is not None
    return [c.text for c in chunks], chunks[-1].response


def test_stream_text_passes_through_as_it_comes():
    text = "The weather is nice today, with a light breeze."
    backend = Scripted(text, piece=4)
    pieces, response = collect(list(tools.stream(backend, req())))
    assert "".join(pieces) == text == response.text
    assert len([p for p in pieces if p]) >= 10  # streamed, not released at the end
    assert response.tool_calls == [] and backend.calls == ["stream"]


def test_stream_buffers_the_call_and_the_last_chunk_carries_it():
    backend = Scripted(
        'Sure! Here is the JSON: ```json\n{"name": "magic_function", "arguments": {"input": "3"}}\n```', piece=2
    )
    pieces, response = collect(list(tools.stream(backend, req())))
    assert not any(ch in "".join(pieces) for ch in "{}`")
    assert "".join(pieces) == "Sure! Here is the JSON:" == response.text
    assert pieces[-1] == ""  # the prose was out before the call finished
    assert [(c.name, c.arguments) for c in response.tool_calls] == [("magic_function", {"input": 3})]
    assert response.finish_reason == "tool_calls"


def test_stream_releases_braces_in_prose_that_are_not_calls():
    text = 'Use {this} or {"a": 1} in a template, then more words follow here.'
    backend = Scripted(text, piece=3)
    chunks = list(tools.stream(backend, req()))
    pieces, response = collect(chunks)
    assert "".join(pieces) == text == response.text and response.tool_calls == []
    released_before_end = "".join(pieces[:-1])
    assert released_before_end.startswith('Use {this} or {"a": 1} in a template')


def test_stream_releases_braces_with_apostrophes_before_the_end():
    text = "A set {it's fine} and then many more words follow, well before the end of the answer."
    pieces, response = collect(list(tools.stream(Scripted(text, piece=3), req())))
    assert "".join(pieces[:-1]).startswith("A set {it's fine} and then many")
    assert "".join(pieces) == text == response.text


def test_stream_releases_an_unclosed_brace_at_the_end():
    text = "I think { this never closes"
    pieces, response = collect(list(tools.stream(Scripted(text), req())))
    assert "".join(pieces) == text == response.text and pieces[-1] != ""


def test_stream_in_forced_mode_holds_everything():
    backend = Scripted('Sure, calling now. {"name": "magic_function", "arguments": {"input": 3}}', piece=2)
    pieces, response = collect(list(tools.stream(backend, req(choice="required"))))
    assert pieces == ["Sure, calling now."]  # one final chunk, nothing before
    assert response.tool_calls[0].arguments == {"input": 3}


def test_stream_repairs_unstreamed_and_keeps_what_was_shown():
    backend = Scripted(
        'Let me check. {"name": "get_wether", "arguments": {"city": "SF"}}',
        '{"name": "get_weather", "arguments": {"city": "SF"}}',
    )
    pieces, response = collect(list(tools.stream(backend, req())))
    assert backend.calls == ["stream", "generate"]
    assert "".join(pieces) == "Let me check." == response.text  # shown text cannot be taken back
    assert [c.name for c in response.tool_calls] == ["get_weather"] and response.invalid_tool_calls == []


def test_stream_with_an_enforcing_backend_releases_a_broken_call_as_text():
    raw = '{"name":"magic_function","arguments":{"input":3'
    pieces, response = collect(list(tools.stream(Grammar(raw), req())))
    assert "".join(pieces) == raw == response.text and len(response.invalid_tool_calls) == 1


def test_stream_closing_early_closes_the_backend_stream():
    backend = Scripted("a long answer in plain text " * 5, piece=5)
    it = tools.stream(backend, req())
    assert next(it)
    it.close()
    assert backend.closed_streams == 1


def test_stream_without_a_final_response_is_a_backend_error():
    class NoFinal(Scripted):
        def stream(self, request, *, on_update=None):
            yield Chunk("text")

    with pytest.raises(BackendError, match="without a final response"):
        list(tools.stream(NoFinal(), req()))


async def test_astream_detects_and_repairs_like_stream():
    backend = Scripted('Ok. {"name": "magic_function", "arguments": {"input": "x"}}', GOOD, piece=2)
    chunks = [c async for c in tools.astream(backend, req())]
    pieces, response = collect(chunks)
    assert "".join(pieces) == "Ok." == response.text
    assert response.tool_calls[0].arguments == {"input": 3} and backend.calls == ["astream", "agenerate"]
    assert backend.closed_streams == 1
    text = Scripted("Just words, streamed.", piece=2)
    pieces, response = collect([c async for c in tools.astream(text, req())])
    assert "".join(pieces) == response.text == "Just words, streamed." and len(pieces) > 5


async def test_astream_structured_output_holds_and_returns_the_json():
    backend = Scripted('Here you go: {"a": 1}', piece=2)
    request = Request(Conversation.from_prompt("json please"), response_format=ResponseFormat())
    pieces, response = collect([c async for c in tools.astream(backend, request)])
    assert pieces == ['{"a": 1}'] and response.text == '{"a": 1}'


# ------------------------------------------------------------------------------ the detector itself


OUTPUTS = [
    "Plain prose only.",
    'Sure! Here is the JSON: {"name": "magic_function", "arguments": {"input": 3}}',
    'Thinking {aloud} [1]...\n```json\n{"name": "get_weather", "arguments": {"city": "SF"}}\n```',
    'Example: {"a": {"b": [1, 2]}} then <tool_call>{"name": "magic_function", "arguments": {"input": 1}}</tool_call>',
    "Ends with a partial fence ``",
    "Ends with a tag <tool_",
    'Broken: {"name": "get_weather", "arguments": {"city": "S',
    '[{"name": "magic_function", "arguments": {"input": 1}}, {"name": "get_weather", "arguments": {"city": "SF"}}]',
    "Code:\n```python\nprint({'x': 1})\n```\nDone.",
    "  leading space and trailing space  ",
    "A set {it's fine} and more words after it.",
    ' Sure! {"name": "magic_function", "arguments": {"input": 1}}',
    '\n```json\n{"name": "magic_function", "arguments": {"input": 1}}\n```',
]


@pytest.mark.parametrize("text", OUTPUTS)
@pytest.mark.parametrize("piece", [1, 2, 7, 1000])
def test_detector_releases_a_prefix_of_the_final_prose(text, piece):
    catalog = check_spec(ToolSpec((MAGIC, WEATHER), parallel=True))
    det = StreamDetector(catalog)
    shown = "".join(det.feed(text[i : i + piece]) for i in range(0, len(text), piece))
    final = parse_output(text, catalog)
    assert final.text.startswith(shown), (shown, final.text)
    if final.tool_calls or final.invalid_tool_calls:
        assert '"name"' not in shown  # no part of a call leaked out
    chunk = det.finish(Response(final.text, "m"))
    assert shown + chunk.text == final.text == chunk.response.text


def test_detector_holds_whitespace_and_partial_openers_only_until_they_resolve():
    det = StreamDetector(check_spec(ToolSpec((MAGIC,))))
    assert det.feed("Hello ") == "Hello"
    assert det.feed("`") == ""
    assert det.feed("`` no, prose") == " ``` no, prose"
    assert det.feed(" <tool") == ""
    assert det.feed("bar>") == " <toolbar>"
    assert det.feed(' {"na') == ""
    assert det.feed('me": "magic_function", "arguments": {"input": 3}}') == ""
    assert det.feed(" more prose after the call") == ""  # after a call everything is held


def test_detector_modes():
    assert tools.stream_mode(check_spec(ToolSpec((MAGIC,)))) == "detect"
    assert tools.stream_mode(check_spec(ToolSpec((MAGIC,), "none"))) == "pass"
    assert tools.stream_mode(check_spec(ToolSpec((MAGIC,), "required"))) == "hold"
    assert tools.stream_mode(check_spec(ToolSpec((MAGIC,), "magic_function"))) == "hold"
    assert tools.stream_mode(check_spec(None, ResponseFormat())) == "hold"
    passing = StreamDetector(check_spec(ToolSpec((MAGIC,), "none")))
    assert passing.feed('{"name": ') == '{"name": '


def test_stream_pass_through_yields_the_backends_own_chunks_and_on_update_reaches_it():
    seen = []

    class Recording(Scripted):
        def stream(self, request, *, on_update=None):
            seen.append(on_update)
            yield from super().stream(request, on_update=on_update)

        def generate(self, request, *, on_update=None):
            seen.append(on_update)
            return super().generate(request, on_update=on_update)

    def hook(update):
        return None

    plain = Request(Conversation.from_prompt("hi"))
    backend = Recording("hello there")
    chunks = list(tools.stream(backend, plain, on_update=hook))
    assert "".join(c.text for c in chunks) == "hello there" and chunks[-1].response.text == "hello there"
    tools.generate(Recording(GOOD), req(), on_update=hook)
    assert seen == [hook, hook]


def test_stream_with_choice_none_streams_everything():
    backend = Scripted('{"name": "magic_function", "arguments": {"input": 3}} is what I would call.', piece=4)
    pieces, response = collect(list(tools.stream(backend, req(choice="none"))))
    assert pieces[0] == '{"na' and "".join(pieces) == response.text and response.tool_calls == []
