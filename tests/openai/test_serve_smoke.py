"""Smoke test of a real OpenAI-compatible server: ``transformers serve`` on a tiny Mantis prepared
with ``prepare_model``, spoken to with plain httpx. Greedy answers must equal the local backend's
on the same weights and prompt, token for token: the shipped template, the prepared processor
config and the server's image handling together reproduce what the local backend feeds the model."""

from __future__ import annotations

import json

import httpx
import pytest

from mantis_llm.testing import make_image_bytes, tokens_per_image
from mantis_llm.types import Conversation, GenerationParams, Image, Request, Turn

MAX_TOKENS = 12


def chat(server, messages, **fields) -> httpx.Response:
    body = {"model": server.model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)


def stream_events(server, messages, **fields) -> list[str]:
    """The ``data:`` payloads of a streamed chat completion, in order, as sent."""
    body = {"model": server.model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    body.update(fields, stream=True)
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]


def local_answer(backend, conversation: Conversation):
    return backend.generate(Request(conversation, GenerationParams(max_tokens=MAX_TOKENS)))


RED = Image(make_image_bytes(64, 48, (200, 30, 30), "PNG"))
BLUE = Image(make_image_bytes(40, 56, (30, 30, 200), "PNG"))

CONVERSATIONS = {
    "one image": Conversation.from_prompt("Describe the image.", [RED]),
    "interleaved, several turns": Conversation(
        [
            Turn("user", ["Compare", RED, "with", BLUE]),
            Turn("assistant", ["They differ in colour."]),
            Turn("user", [BLUE, "Which one is blue?"]),
        ]
    ),
    "system and text only": Conversation([Turn("system", ["Answer briefly."]), Turn("user", ["Say something."])]),
    "prefill": Conversation([Turn("user", [RED, "What colour?"]), Turn("assistant", ["The colour is"])]),
}


def test_health_and_models(transformers_serve):
    assert httpx.get(transformers_serve.base_url + "/health").json() == {"status": "ok"}
    models = httpx.get(transformers_serve.base_url + "/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [transformers_serve.model]
    assert models["data"][0]["status"] == {"value": "loaded"}


def test_fixture_starts_quickly(transformers_serve):
    # CI budget: measured ~5 s on 2 shared cores; fail loudly well before it becomes a problem
    assert transformers_serve.startup_seconds < 30, transformers_serve.startup_seconds


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_greedy_answer_equals_local_backend(transformers_serve, source_backend, to_openai, name):
    conversation = CONVERSATIONS[name]
    r = chat(transformers_serve, to_openai(conversation))
    assert r.status_code == 200, r.text
    body = r.json()
    local = local_answer(source_backend, conversation)
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": local.text}
    assert choice["finish_reason"] == local.finish_reason
    # same prompt tokens (text + 16 per image) and the same number of answer tokens
    assert body["usage"]["prompt_tokens"] == local.usage.input_tokens
    assert body["usage"]["completion_tokens"] == local.usage.output_tokens
    assert body["usage"]["total_tokens"] == local.usage.input_tokens + local.usage.output_tokens
    assert body["object"] == "chat.completion"
    assert body["model"] == transformers_serve.model


def test_images_reach_the_model(transformers_serve, to_openai):
    """A processor-less server would drop the image silently: count its tokens in the usage."""
    with_image = chat(transformers_serve, to_openai(CONVERSATIONS["one image"])).json()
    text_only = chat(transformers_serve, [{"role": "user", "content": "Describe the image."}]).json()
    wrapper = len("(image 1: <Image><image></Image>) ") - len("<image>")  # byte-level tokenizer: 1 token/byte
    assert with_image["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] == wrapper + tokens_per_image()


def test_streaming_equals_local_backend(transformers_serve, source_backend, to_openai):
    conversation = CONVERSATIONS["interleaved, several turns"]
    events = stream_events(transformers_serve, to_openai(conversation))
    chunks = [json.loads(e) for e in events]
    local = local_answer(source_backend, conversation)

    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == local.text
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == local.finish_reason
    assert last["choices"][0]["delta"] == {}
    assert last["usage"] == {
        "prompt_tokens": local.usage.input_tokens,
        "completion_tokens": local.usage.output_tokens,
        "total_tokens": local.usage.input_tokens + local.usage.output_tokens,
    }
    # transformers serve ends the stream without OpenAI's "data: [DONE]" (clients must accept EOF)
    assert "[DONE]" not in events


def test_bos_from_the_tokenizer_gives_the_same_answer(transformers_serve, source_backend, to_openai):
    """write_bos_token=false: the template leaves BOS to the server's tokenizer, as the local backend
    does (the exact-ids mode for tokenizers where "<s>" text and an added BOS tokenize differently)."""
    conversation = CONVERSATIONS["one image"]
    r = chat(transformers_serve, to_openai(conversation), chat_template_kwargs={"write_bos_token": False})
    assert r.status_code == 200, r.text
    local = local_answer(source_backend, conversation)
    assert r.json()["choices"][0]["message"]["content"] == local.text
    assert r.json()["usage"]["prompt_tokens"] == local.usage.input_tokens
