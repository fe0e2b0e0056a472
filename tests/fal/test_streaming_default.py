"""Streaming streams by default (``mode="auto"``): ``stream()``/``astream()`` use fal's token
stream, ``generate()``/``agenerate()`` the queue (retries, queue updates, cancel). An endpoint
without ``/stream`` (404/405) makes a streaming call fall back to the queue once, and the
backend remembers it."""

from __future__ import annotations

import pytest

from mantis_llm import Conversation, FalBackend, Request, errors
from mantis_llm.emulator import expected_output

ANSWER = "one two three four five six seven eight nine ten eleven twelve"


def req(prompt="What is in the picture?") -> Request:
    return Request(Conversation.from_prompt(prompt, ["https://example.com/cat.jpg"]))


def routes(emu, since: int = 0) -> list[str]:
    return [r.route for r in emu.requests[since:]]


def test_the_default_mode_is_auto(fresh_emu):
    assert FalBackend(api_key="k").mode == "auto"


async def test_stream_streams_and_generate_queues(fresh_emu, make):
    fresh_emu.script([ANSWER] * 4)
    b = make()
    updates = []
    chunks = list(b.stream(req(), on_update=updates.append))
    assert len([c for c in chunks if c.text]) >= 3 and "".join(c.text for c in chunks) == ANSWER
    assert chunks[-1].response.text == ANSWER and chunks[-1].response.metrics["mode"] == "stream"
    assert routes(fresh_emu) == ["run_stream"] and updates == []  # the token stream has no queue updates
    achunks = [c async for c in b.astream(req())]
    assert len([c for c in achunks if c.text]) >= 3 and "".join(c.text for c in achunks) == ANSWER

    before = len(fresh_emu.requests)
    r = b.generate(req(), on_update=updates.append)
    assert r.text == ANSWER and r.metrics["mode"] == "queue"
    assert routes(fresh_emu, before) == ["submit", "stream", "result"]
    assert updates[0].status == "IN_QUEUE" and updates[-1].status == "COMPLETED"
    r = await b.agenerate(req())
    assert r.text == ANSWER and r.metrics["mode"] == "queue"
    assert [s.mode for s in fresh_emu.submissions] == ["stream", "stream", "queue", "queue"]


@pytest.mark.parametrize("missing", [404, 405])
async def test_no_token_stream_falls_back_to_the_queue_once(fresh_emu, make, missing):
    fresh_emu.stream_endpoint = missing
    fresh_emu.service_time = 0.05
    b = make()
    updates = []
    chunks = list(b.stream(req("first"), on_update=updates.append))
    assert len(chunks) == 1 and chunks[0].text == expected_output(fresh_emu.submissions[0].payload)
    assert chunks[0].response.metrics["mode"] == "queue"
    assert routes(fresh_emu) == ["run_stream", "submit", "stream", "result"]
    assert updates[0].status == "IN_QUEUE" and updates[-1].status == "COMPLETED"  # queue progress still reported
    assert updates[-1].request_id == chunks[0].response.request_id
    # remembered: later streaming calls go to the queue directly, sync or async
    before = len(fresh_emu.requests)
    achunks = [c async for c in b.astream(req("second"), on_update=updates.append)]
    assert achunks[-1].response.text == expected_output(fresh_emu.submissions[-1].payload)
    assert routes(fresh_emu, before) == ["submit", "stream", "result"]
    # another backend knows nothing of it yet
    before = len(fresh_emu.requests)
    list(make().stream(req("third")))
    assert routes(fresh_emu, before)[:2] == ["run_stream", "submit"]


def test_explicit_modes_keep_their_meaning(fresh_emu, make):
    fresh_emu.script([ANSWER] * 3)
    chunks = list(make(mode="queue").stream(req()))
    assert len(chunks) == 1 and chunks[0].text == ANSWER  # the queue has no token stream
    assert routes(fresh_emu) == ["submit", "stream", "result"]
    before = len(fresh_emu.requests)
    assert make(mode="stream").generate(req()).text == ANSWER  # every call on the token stream
    assert routes(fresh_emu, before) == ["run_stream"]
    fresh_emu.stream_endpoint = 404
    with pytest.raises(errors.EndpointNotFoundError, match="no token stream") as ei:  # no fallback asked for
        list(make(mode="stream").stream(req()))
    assert ei.value.status_code == 404


def test_chat_mantis_stream_streams(emu):
    from langchain_core.messages import HumanMessage

    from mantis_llm.langchain import ChatMantis

    emu.script([ANSWER, ANSWER])
    chat = ChatMantis()
    try:
        chunks = list(chat.stream([HumanMessage(content=[{"type": "image", "url": "https://a/b.png"}, "count"])]))
        result = chat.invoke([HumanMessage(content=[{"type": "image", "url": "https://a/b.png"}, "count"])])
    finally:
        chat.close()
    assert len([c for c in chunks if c.content]) >= 3 and "".join(c.content for c in chunks) == ANSWER
    assert result.content == ANSWER and result.response_metadata["metrics"]["mode"] == "queue"
    assert [s.mode for s in emu.submissions] == ["stream", "queue"]
