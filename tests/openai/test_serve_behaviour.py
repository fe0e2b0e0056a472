"""What ``transformers serve`` (5.24) really does with OpenAI request fields, pinned down on the
tiny model. The OpenAI backend's capability table relies on these; if one fails after a
transformers upgrade, update that table (and this file) rather than the assertion alone.

Each request uses a fresh connection: after a 500 the server drops the keep-alive connection,
and the next request on it fails with a connection reset.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from mantis_llm.testing import make_image_bytes

URI = "data:image/png;base64," + base64.b64encode(make_image_bytes()).decode()
BROKEN = "data:image/png;base64,AAAA"  # not an image
MESSAGES = [
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": URI}}, {"type": "text", "text": "Describe it."}],
    }
]


def post(server, **fields) -> httpx.Response:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, **fields}
    body = {k: v for k, v in body.items() if v is not None}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def greedy(transformers_serve) -> str:
    return content(post(transformers_serve))


@pytest.mark.parametrize(
    "field, value",
    [
        ("foo_bar", 1),
        # vLLM/SGLang extras a client must not send here
        ("stop_token_ids", [2]),
        ("add_special_tokens", True),
        ("continue_final_message", True),
        ("chat_template", "{{ 'x' }}"),
        ("top_k", 1),
        ("repetition_penalty", 1.1),
        ("min_p", 0.1),
    ],
)
def test_unknown_fields_are_rejected_with_422(transformers_serve, field, value):
    r = post(transformers_serve, **{field: value})
    assert r.status_code == 422
    assert r.json() == {"detail": f"Unexpected fields in the request: {{'{field}'}}"}


@pytest.mark.parametrize("stop", ["xyz", ["xyz"]])
def test_stop_crashes_vision_model_requests(transformers_serve, stop):
    # generate() gets the processor as its tokenizer, and StopStringCriteria calls get_vocab() on it
    r = post(transformers_serve, stop=stop)
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "Internal Server Error"


def test_stop_in_a_stream_is_an_error_event(transformers_serve):
    body = {"messages": MESSAGES, "max_tokens": 8, "stop": ["xyz"], "stream": True}
    with httpx.stream("POST", transformers_serve.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant"}
    assert json.loads(events[-1]) == {"error": "'LlavaProcessor' object has no attribute 'get_vocab'"}
    assert len(events) == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
        {"tool_choice": "required"},
        {"logprobs": True, "top_logprobs": 2},
        {"presence_penalty": 0.5, "user": "u", "parallel_tool_calls": False, "metadata": {"a": "b"}},
        {"stream_options": {"include_usage": True}},
        {"seed": 7},
    ],
    ids=["json_object", "json_schema", "tools", "tool_choice", "logprobs", "misc", "stream_options", "seed"],
)
def test_accepted_but_ignored_fields(transformers_serve, greedy, fields):
    r = post(transformers_serve, **fields)
    assert content(r) == greedy  # unconstrained, unchanged greedy text
    (choice,) = r.json()["choices"]
    assert "logprobs" not in choice and "tool_calls" not in choice["message"]


def test_n_is_ignored(transformers_serve, greedy):
    r = post(transformers_serve, n=2)
    assert [c["message"]["content"] for c in r.json()["choices"]] == [greedy]


def test_temperature_alone_does_not_sample(transformers_serve, greedy):
    # do_sample stays as in the model's generation_config (False): temperature is then unused
    assert content(post(transformers_serve, temperature=1.5, seed=1)) == greedy
    assert content(post(transformers_serve, temperature=1.5, seed=2)) == greedy


def test_generation_config_json_string_samples_reproducibly(transformers_serve, greedy):
    config = json.dumps({"do_sample": True, "temperature": 1.5, "max_new_tokens": 8})
    first = content(post(transformers_serve, generation_config=config, seed=1, max_tokens=None, temperature=None))
    again = content(post(transformers_serve, generation_config=config, seed=1, max_tokens=None, temperature=None))
    assert first == again != greedy
    # an object instead of a JSON string is a crash
    assert post(transformers_serve, generation_config={"do_sample": True}).status_code == 500


def test_max_completion_tokens_wins_over_max_tokens(transformers_serve, greedy):
    r = post(transformers_serve, max_tokens=8, max_completion_tokens=3)
    assert r.json()["usage"]["completion_tokens"] == 3
    assert content(r) == greedy[:3]
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_model_field(transformers_serve, greedy):
    assert content(post(transformers_serve, model=transformers_serve.model)) == greedy
    assert content(post(transformers_serve)) == greedy  # no model: the pinned one
    r = post(transformers_serve, model="mantis")
    assert r.status_code == 400
    assert r.json() == {"detail": f"Server is pinned to '{transformers_serve.model}'; requested 'mantis'."}


def test_request_id_and_response_shape(transformers_serve):
    r = httpx.post(
        transformers_serve.base_url + "/v1/chat/completions",
        json={"messages": MESSAGES, "max_tokens": 2, "temperature": 0},
        headers={"X-Request-Id": "req-123"},
        timeout=60,
    )
    body = r.json()
    assert r.headers["x-request-id"] == "req-123" == body["id"]  # the id is the request id, no "chatcmpl-"
    assert set(body) == {"id", "choices", "created", "model", "object", "usage"}
    assert set(body["choices"][0]) == {"finish_reason", "index", "message"}


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": None},  # missing messages
        {"max_tokens": 0},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": BROKEN}}]}]},
        {"messages": [{"role": "system", "content": "no user message"}]},  # the template refuses it
        {"messages": [*MESSAGES, {"role": "tool", "content": "42", "tool_call_id": "c1"}]},  # no tool role
    ],
    ids=["no messages", "max_tokens 0", "undecodable image", "no user message", "tool role"],
)
def test_errors_are_plain_text_500s(transformers_serve, fields):
    r = post(transformers_serve, **fields)
    assert r.status_code == 500
    assert r.text == "Internal Server Error"
    assert "x-request-id" not in r.headers


def test_malformed_json_is_fastapi_422(transformers_serve):
    r = httpx.post(
        transformers_serve.base_url + "/v1/chat/completions",
        content=b"{",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "json_invalid"
