"""Text-only questions on fal, against both endpoint behaviours the emulator offers: one that
wants at least one image (a 422 for ``"images": []``) and one that answers text alone.

FalBackend sends ``images: []``; when fal rejects that for the missing image it resends once
with a blank placeholder image (and a note saying so), and remembers that the endpoint needs
one. ``text_only="as_is"`` lets the server's answer stand; ``"placeholder"`` always adds it.
"""

from __future__ import annotations

import pytest

from mantis_llm import Conversation, GenerationParams, Request, errors
from mantis_llm.emulator import expected_output

TEXT = "What is the capital of France?"
POSTS = ("submit", "run", "run_stream")


def text_req(prompt: str = TEXT, **params) -> Request:
    return Request(Conversation.from_prompt(prompt), GenerationParams(**params))


def posts(emu, since: int = 0) -> list[dict]:
    """The JSON bodies of the requests that ask fal for an answer, in order."""
    return [r.json for r in emu.requests[since:] if r.route in POSTS]


def is_placeholder(payload: dict, prompt: str = TEXT) -> bool:
    """A payload carrying the blank placeholder: one data-URI PNG, and the note before the text."""
    (image,) = payload["images"]
    note, _, rest = payload["prompt"].partition("\n\n")
    return (
        image["image_url"].startswith("data:image/png;base64,")
        and note.startswith("<image> ")
        and "blank placeholder" in note
        and "ignore it" in note
        and rest == prompt
    )


@pytest.fixture(params=[True, False], ids=["endpoint-needs-an-image", "endpoint-takes-text"])
def needs_image(request, fresh_emu) -> bool:
    fresh_emu.require_images = request.param
    return request.param


@pytest.mark.parametrize("mode", ["queue", "sync", "stream", "auto"])
async def test_text_only_questions_are_answered(fresh_emu, make, needs_image, mode):
    b = make(mode=mode)
    updates = []
    r = b.generate(text_req(), on_update=updates.append)
    sent = posts(fresh_emu)
    assert sent[0]["images"] == [] and sent[0]["prompt"] == TEXT  # text alone first, whatever the endpoint
    if needs_image:
        assert len(sent) == 2 and is_placeholder(sent[1])  # resent once, with the placeholder
        assert r.text == expected_output(sent[1]) and "1 image;" in r.text
        assert r.metrics["placeholder_image"] is True
    else:
        assert len(sent) == 1 and r.text == expected_output(sent[0]) and "0 images" in r.text
        assert "placeholder_image" not in r.metrics
    assert r.request_id == fresh_emu.submissions[-1].request_id  # the answered job, not the rejected one
    if mode in ("queue", "auto"):
        assert updates[-1].status == "COMPLETED" and updates[-1].request_id == r.request_id

    # The backend remembers: the next text-only call sends the placeholder straight away.
    before = len(fresh_emu.requests)
    r2 = await b.agenerate(text_req("And of Spain?"))
    (again,) = posts(fresh_emu, before)
    assert is_placeholder(again, "And of Spain?") if needs_image else again["images"] == []
    assert r2.text == expected_output(again)

    # A question with an image never gets the placeholder.
    before = len(fresh_emu.requests)
    b.generate(Request(Conversation.from_prompt("Describe it.", ["https://example.com/cat.jpg"])))
    (with_image,) = posts(fresh_emu, before)
    assert with_image == {"prompt": "<image> Describe it.", "images": [{"image_url": "https://example.com/cat.jpg"}]}


@pytest.mark.parametrize("mode", ["stream", "auto"])
async def test_text_only_streams_after_the_retry(fresh_emu, make, needs_image, mode):
    answer = "Paris is the capital and largest city of France, on the Seine."
    fresh_emu.script([answer, answer])  # a rejected input consumes no scripted answer
    b = make(mode=mode)
    chunks = list(b.stream(text_req()))
    assert "".join(c.text for c in chunks) == answer and len([c for c in chunks if c.text]) >= 3
    assert chunks[-1].response.metrics.get("placeholder_image", False) is needs_image
    chunks = [c async for c in b.astream(text_req())]
    assert "".join(c.text for c in chunks) == answer
    assert len(posts(fresh_emu)) == (3 if needs_image else 2)


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
def test_as_is_lets_the_servers_answer_stand(fresh_emu, make, needs_image, mode):
    b = make(mode=mode, text_only="as_is")
    if needs_image:
        with pytest.raises(errors.InvalidRequestError) as ei:
            b.generate(text_req())
        assert ei.value.status_code == 422 and "images: List should have at least 1 item" in str(ei.value)
    else:
        assert "0 images" in b.generate(text_req()).text
    assert [p["images"] for p in posts(fresh_emu)] == [[]]


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
def test_placeholder_is_always_added(fresh_emu, make, needs_image, mode):
    r = make(mode=mode, text_only="placeholder").generate(text_req())
    (sent,) = posts(fresh_emu)
    assert is_placeholder(sent) and r.text == expected_output(sent) and r.metrics["placeholder_image"] is True


def test_other_422s_are_not_retried(fresh_emu, make):
    # The endpoint takes text: a 422 about something else is the answer, sent once.
    fresh_emu.require_images = False
    with pytest.raises(errors.InvalidRequestError, match="max_tokens"):
        make(extra_input={"max_tokens": "many"}).generate(text_req())
    assert len(posts(fresh_emu)) == 1
    # The endpoint wants an image and the input is also wrong: one resend, never a loop.
    fresh_emu.require_images = True
    before = len(fresh_emu.requests)
    b = make(mode="sync", extra_input={"max_tokens": "many"})
    with pytest.raises(errors.InvalidRequestError, match="max_tokens") as ei:
        b.generate(text_req())
    assert "images" not in str(ei.value)  # the second answer's error: the image rule was met
    assert [len(p["images"]) for p in posts(fresh_emu, before)] == [0, 1]


def test_the_option_is_checked():
    with pytest.raises(errors.ConfigurationError, match="text_only"):
        from mantis_llm import FalBackend

        FalBackend(api_key="k", text_only="blank")


def item(loc: list, msg: str, type_: str) -> dict:
    return {"loc": loc, "msg": msg, "type": type_}


@pytest.mark.parametrize(
    "detail, needs",
    [
        ([item(["body", "images"], "List should have at least 1 item after validation, not 0", "too_short")], True),
        ([item(["body", "images"], "ensure this value has at least 1 items", "value_error.list.min_items")], True),
        ([item(["images"], "at least 1 image is required", "value_error")], True),
        ("At least 1 image is required", True),
        ([item(["body", "images", 0, "image_url"], "Field required", "missing")], False),
        ([item(["body", "max_tokens"], "Input should be greater than 0", "greater_than")], False),
        ([item(["body", "prompt"], "String should have at least 1 character", "string_too_short")], False),
        ("Unprocessable Entity", False),
        (None, False),
    ],
)
def test_which_422s_ask_for_an_image(detail, needs):
    from mantis_llm.backends.fal._errors import asks_for_an_image

    assert asks_for_an_image(errors.InvalidRequestError("x", status_code=422, detail=detail)) is needs
    assert asks_for_an_image(errors.InvalidRequestError("x", status_code=400, detail=detail)) is False
