"""OpenAIBackend against a real ``transformers serve`` (tests/openai/conftest.py) on the tiny
model: every entry point, images over several turns, the greedy answer equal to the local
backend's on the same weights, client-side stop strings, typed errors, the key's path, and a
clean exit. Nothing is mocked; each test keeps ``max_tokens`` small (the server runs one
request at a time, ~30 ms a token here)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from mantis_llm import Conversation, GenerationParams, Image, OpenAIBackend, Request, errors, tools
from mantis_llm.images import ImageOptions
from mantis_llm.testing import make_image_bytes
from mantis_llm.types import ResponseFormat, Turn

RED = Image(make_image_bytes(64, 48, (200, 30, 30), "PNG"))
BLUE = Image(make_image_bytes(40, 56, (30, 30, 200), "PNG"))
GREEN = Image(make_image_bytes(50, 50, (30, 200, 30), "JPEG"))
KEY = "sk-route-test-secret"

ONE_IMAGE = Conversation.from_prompt("Describe it.", [RED])
INTERLEAVED = Conversation(
    [
        Turn("user", ["Compare", RED, "with", BLUE, "please."]),
        Turn("assistant", ["The first is red."]),
        Turn("user", [GREEN, " And this one? "]),
    ]
)
PREFILL = Conversation([Turn("user", [RED, "Describe it."]), Turn("assistant", ["The image shows "])])


def req(conversation=ONE_IMAGE, **params) -> Request:
    return Request(conversation, GenerationParams(**{"max_tokens": 8, **params}))


@pytest.fixture(scope="module")
def backend(transformers_serve):
    """One backend for the module, detecting the server and the model itself."""
    b = OpenAIBackend(base_url=transformers_serve.base_url + "/v1")
    yield b
    b.close()


class Recorder:
    """An httpx event hook keeping (method, url, authorization, json body) of every request sent."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, dict | None]] = []

    def __call__(self, request: httpx.Request) -> None:
        body = json.loads(request.content) if request.method == "POST" and request.content else None
        self.seen.append((request.method, str(request.url), request.headers.get("authorization"), body))

    def posts(self) -> list[dict]:
        return [b for m, _, _, b in self.seen if m == "POST" and b is not None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ answers


def test_generate_detects_the_server_and_its_model(backend, transformers_serve):
    r = backend.generate(req())
    assert backend.server == "transformers"
    assert backend.model == r.model == transformers_serve.model  # the only served model, read once
    assert r.text and r.finish_reason in ("stop", "length")
    assert r.usage.input_tokens > 16 and 0 < r.usage.output_tokens <= 8
    assert r.metrics["server"] == "transformers" and r.metrics["retries"] == 0 and r.request_id


@pytest.mark.parametrize("conversation", [ONE_IMAGE, INTERLEAVED, PREFILL], ids=["one image", "interleaved", "prefill"])
def test_greedy_answer_equals_the_local_backend_on_the_same_weights(backend, source_backend, conversation):
    """Same prompt (template == renderer), same BOS handling, same pixels: same tokens."""
    request = req(conversation, max_tokens=10)
    served, local = backend.generate(request), source_backend.generate(request)
    assert served.text == local.text
    assert served.usage == local.usage  # prompt tokens included: images, wrapper text and BOS alike
    assert served.finish_reason == local.finish_reason


def test_stream_yields_tokens_as_they_come(backend):
    chunks = list(backend.stream(req(max_tokens=8)))
    final = chunks[-1].response
    assert final is not None and all(c.response is None for c in chunks[:-1])
    assert len([c for c in chunks if c.text]) >= 3  # token by token, not one piece
    assert "".join(c.text for c in chunks) == final.text == backend.generate(req(max_tokens=8)).text
    assert final.usage.output_tokens == 8 and final.finish_reason == "length"


def test_generate_batch_keeps_order(backend):
    requests = [req(ONE_IMAGE, max_tokens=4), req(INTERLEAVED, max_tokens=4), req(PREFILL, max_tokens=4)]
    assert [r.text for r in backend.generate_batch(requests)] == [backend.generate(r).text for r in requests]


async def test_async_entry_points(backend):
    want = backend.generate(req(INTERLEAVED, max_tokens=6)).text
    assert (await backend.agenerate(req(INTERLEAVED, max_tokens=6))).text == want
    chunks = [c async for c in backend.astream(req(INTERLEAVED, max_tokens=6))]
    assert "".join(c.text for c in chunks) == want == chunks[-1].response.text
    batch = await backend.agenerate_batch([req(INTERLEAVED, max_tokens=6), req(ONE_IMAGE, max_tokens=3)])
    assert batch[0].text == want and batch[1].usage.output_tokens <= 3


async def test_concurrent_async_calls_share_one_pool(transformers_serve):
    """A fresh backend: one probe however many calls start at once, one client, at most one
    connection per call in flight, and calls one after another on one kept-alive connection."""
    recorder = Recorder()
    text = req(Conversation.from_prompt("hi"), max_tokens=1)
    async with httpx.AsyncClient(event_hooks={"request": [_async(recorder)]}) as client:
        b = OpenAIBackend(base_url=transformers_serve.base_url, async_client=client)
        out = await b.agenerate_batch([text] * 8)
        assert len(out) == 8 and len({r.text for r in out}) == 1
        assert [u for m, u, _, _ in recorder.seen if m == "GET"] == [transformers_serve.base_url + "/v1/models"]
        pool = client._transport._pool  # httpcore's pool (private, read here only)
        assert 1 <= len(pool.connections) <= 8
        await client.aclose()  # start over with no connection: sequential calls need only one
    async with httpx.AsyncClient() as client:
        b = OpenAIBackend(base_url=transformers_serve.base_url, async_client=client, server="transformers")
        seen = set()
        for _ in range(3):
            await b.agenerate(text)
            seen |= {id(c) for c in client._transport._pool.connections}
        assert len(seen) == 1


def _async(hook):
    async def call(request: httpx.Request) -> None:
        hook(request)

    return call


def test_sampling_goes_through_generation_config(backend):
    """temperature alone does not sample on transformers serve: the backend sends do_sample in
    its generation_config, and the seed makes the draw reproducible."""
    greedy = backend.generate(req(max_tokens=8)).text
    sampled = [backend.generate(req(max_tokens=8, temperature=1.5, seed=1)).text for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy


# ------------------------------------------------------------------ stop strings, client-side


def first_stop(text: str) -> tuple[str, int]:
    """A stop string from the middle of ``text`` and where it first occurs (> 0)."""
    for i in range(2, len(text) - 2):
        stop = text[i : i + 2]
        if text.find(stop) == i:
            return stop, i
    pytest.skip(f"no usable stop string in {text!r}")


async def test_stop_strings_are_applied_here_and_end_the_stream(backend):
    full = backend.generate(req(max_tokens=12)).text
    stop, at = first_stop(full)
    request = req(max_tokens=12, stop=(stop, "never-there"))
    r = backend.generate(request)
    assert (r.text, r.finish_reason) == (full[:at], "stop")
    assert r.metrics["client_stop"] is True
    chunks = list(backend.stream(request))
    assert "".join(c.text for c in chunks) == full[:at] == chunks[-1].response.text
    assert (await backend.agenerate(request)).text == full[:at]
    # the server got no `stop` (a 500 on vision models) and stopped early: the next call is prompt
    t = time.monotonic()
    backend.generate(req(max_tokens=1))
    assert time.monotonic() - t < 5


# ------------------------------------------------------------------ errors


def test_bad_input_is_a_typed_error_naming_the_problem(backend, transformers_serve, tmp_path):
    with pytest.raises(errors.InvalidRequestError, match="foo_bar") as info:
        OpenAIBackend(base_url=transformers_serve.base_url, extra_body={"foo_bar": 1}).generate(req())
    assert info.value.status_code == 422  # the server's own words: "Unexpected fields in the request"
    missing = Conversation([Turn("user", ["look", Image(tmp_path / "nope.png")])])
    with pytest.raises(errors.ImageError, match="image 1 of message 1: image file not found"):
        backend.generate(req(missing))
    with pytest.raises(errors.InvalidRequestError, match="no user message"):
        backend.generate(req(Conversation([Turn("system", ["only a system message"])])))
    with pytest.raises(errors.InvalidRequestError, match="expects a mantis_llm.types.Request"):
        backend.generate("Describe it.")  # type: ignore[arg-type]
    assert backend.generate(req(max_tokens=1)).text is not None  # the backend is still fine


@pytest.mark.parametrize("server", [None, "transformers"], ids=["detected", "given"])
def test_a_wrong_model_name_names_the_served_models(transformers_serve, server):
    b = OpenAIBackend("mantis", base_url=transformers_serve.base_url, server=server, api_key=KEY)
    with pytest.raises(errors.ConfigurationError) as info:
        b.generate(req())
    msg = str(info.value)
    assert "does not serve model 'mantis'" in msg and repr(transformers_serve.model) in msg
    assert KEY not in msg and KEY not in repr(info.value.detail)


def test_a_stopped_server_fails_fast_after_retries():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    b = OpenAIBackend(base_url=url, max_retries=2)
    t = time.monotonic()
    with pytest.raises(errors.BackendError, match="cannot reach the server") as info:
        b.generate(req())
    assert time.monotonic() - t < 3  # two quick retries (connection refused), then the error
    assert isinstance(info.value.__cause__, httpx.ConnectError)

    async def twice() -> None:
        with pytest.raises(errors.BackendError, match="cannot reach the server"):
            await b.agenerate(req())

    asyncio.run(twice())


def test_a_timeout_closes_the_connection_and_frees_the_server(transformers_serve, backend):
    # 300 greedy tokens take the tiny model 0.2 s in-process on a quiet machine, and about
    # twice that streamed through the server: well over the 0.1 s allowed
    b = OpenAIBackend(base_url=transformers_serve.base_url, timeout=0.1)
    t = time.monotonic()
    with pytest.raises(errors.RequestTimeoutError, match="within 0.1 s"):
        b.generate(req(Conversation.from_prompt("hi"), max_tokens=300))
    assert time.monotonic() - t < 1.5
    t = time.monotonic()
    backend.generate(req(max_tokens=1))  # the server dropped the abandoned generation
    assert time.monotonic() - t < 5


# ------------------------------------------------------------------ the key


def test_the_key_goes_to_the_server_only(transformers_serve, other_host):
    """With fetch_remote the backend downloads an image from another host itself: that request
    carries no key; every request to the server does."""
    recorder = Recorder()
    with httpx.Client(event_hooks={"request": [recorder]}) as client:
        b = OpenAIBackend(
            base_url=transformers_serve.base_url,
            api_key=KEY,
            client=client,
            image_options=ImageOptions(fetch_remote=True),
        )
        r = b.generate(req(Conversation.from_prompt("Describe it.", [other_host.url + "/img.png"])))
    assert r.text
    to_server = [a for _, u, a, _ in recorder.seen if u.startswith(transformers_serve.base_url)]
    elsewhere = [a for _, u, a, _ in recorder.seen if u.startswith(other_host.url)]
    assert to_server and all(a == f"Bearer {KEY}" for a in to_server)
    assert elsewhere == [None]
    assert [s.path for s in other_host.seen] == ["/img.png"]
    assert "authorization" not in other_host.seen[0].headers
    assert recorder.posts()[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert KEY not in repr(b) and "**********" in repr(b)


# ------------------------------------------------------------------ tools, capabilities


def test_the_tool_flow_runs_over_the_route(transformers_serve):
    """transformers serve does not enforce response_format: the flow instructs, parses, and
    repairs (up to MAX_REPAIRS more turns). What the random model writes is not the point."""
    recorder = Recorder()
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    request = Request(ONE_IMAGE, GenerationParams(max_tokens=16), response_format=ResponseFormat(schema, name="answer"))
    with httpx.Client(event_hooks={"request": [recorder]}) as client:
        b = OpenAIBackend(base_url=transformers_serve.base_url, client=client)
        assert b.enforces_format(request) is False  # probes the server: transformers enforces nothing
        r = tools.generate(b, request)
    posts = recorder.posts()
    attempts = r.metrics["tool_attempts"]
    assert 1 <= attempts <= 1 + tools.MAX_REPAIRS and len(posts) == attempts
    assert all("response_format" not in p and "tools" not in p and "stop" not in p for p in posts)
    first = posts[0]["messages"]
    assert first[0]["role"] == "system" and '"colour"' in first[0]["content"][0]["text"]  # the instruction
    if "tool_errors" in r.metrics:  # repairs ran: each attempt after the first answers the previous one
        assert len(r.metrics["tool_errors"]) in (attempts - 1, attempts)
        assert [m["role"] for m in posts[-1]["messages"]][-2:] == ["assistant", "user"]
    else:
        assert json.loads(r.text).keys() >= {"colour"}


def test_request_bodies_follow_the_capability_table(transformers_serve):
    """What transformers serve gets: no key it would 422, no `stop` it would 500 on, BOS left
    to its tokenizer, the model it serves."""
    recorder = Recorder()
    with httpx.Client(event_hooks={"request": [recorder]}) as client:
        b = OpenAIBackend(base_url=transformers_serve.base_url, client=client)
        b.generate(req(INTERLEAVED, max_tokens=3, stop=("zz",), seed=5, top_p=0.9))
    (body,) = recorder.posts()
    assert set(body) == {
        "messages", "model", "max_completion_tokens", "temperature", "top_p", "seed", "stream",
        "chat_template_kwargs",
    }  # fmt: skip
    assert body["model"] == transformers_serve.model and body["chat_template_kwargs"] == {"write_bos_token": False}
    assert [p["type"] for m in body["messages"] for p in m["content"]] == [
        "text", "image_url", "text", "image_url", "text", "text", "image_url", "text",
    ]  # fmt: skip


# ------------------------------------------------------------------ process life


def test_a_process_using_the_backend_exits_cleanly(transformers_serve):
    """Sync, async on two event loops, a stream abandoned half-way, and no close(): exit 0,
    nothing left for the garbage collector to complain about."""
    code = f"""
import asyncio, warnings
warnings.simplefilter("error", ResourceWarning)
from mantis_llm import Conversation, GenerationParams, OpenAIBackend, Request
b = OpenAIBackend(base_url={transformers_serve.base_url!r})
r = Request(Conversation.from_prompt("hi"), GenerationParams(max_tokens=2))
b.generate(r)
asyncio.run(b.agenerate(r))
asyncio.run(b.agenerate(r))
for chunk in b.stream(Request(Conversation.from_prompt("hi"), GenerationParams(max_tokens=6))):
    break
print("ok")
"""
    done = subprocess.run([sys.executable, "-X", "dev", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    for bad in ("Traceback", "Exception ignored", "ResourceWarning", "Task was destroyed", "Unclosed"):
        assert bad not in done.stderr, done.stderr
