"""The OpenAI route's sans-I/O core on its own: settings, capability detection, request
bodies, errors and stream parsing, with hand-built httpx responses (no server)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import httpx
import pytest
from pydantic import SecretStr

from mantis_llm import Conversation, GenerationParams, Image, Request, errors
from mantis_llm.backends import (
    BACKEND_NAMES,
    DEFAULT_FAL_ENDPOINT,
    DEFAULT_OPENAI_MODEL,
    option_names,
    resolve_backend,
    resolve_model,
)
from mantis_llm.backends._http.actions import Close, Emit, Offload, Read, Send
from mantis_llm.backends.openai import OpenAIBackend, _config, _errors, _flows, _payload, _servers
from mantis_llm.testing import make_image_bytes
from mantis_llm.types import ResponseFormat, Tool, ToolSpec, Turn

KEY = "sk-proto-secret-key"
BASE = "http://127.0.0.1:8000"
RED = Image(make_image_bytes(64, 48, (200, 30, 30), "PNG"))
BLUE = Image(make_image_bytes(40, 56, (30, 30, 200), "PNG"))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MANTIS_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def cfg(**kw) -> _config.OpenAIConfig:
    base = dict(base_url=BASE, model="mantis", key=SecretStr(KEY), timeout=10.0, max_retries=2)
    base.update(kw)
    return _config.OpenAIConfig(**base)


def req(conversation=None, **params) -> Request:
    return Request(conversation or Conversation.from_prompt("Describe it.", [RED]), GenerationParams(**params))


def resp(code: int, body=None, headers=None, text=None, url: str = BASE + "/v1/models") -> httpx.Response:
    request = httpx.Request("GET", url)
    if text is not None:
        return httpx.Response(code, text=text, headers=headers, request=request)
    return httpx.Response(code, json=body, headers=headers, request=request)


def sse(*events, done: bool = True) -> bytes:
    body = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def drive(flow, answer):
    """Run a flow with ``answer(action) -> value``; returns (actions seen, result or exception)."""
    seen, value = [], None
    try:
        while True:
            action = flow.send(value)
            seen.append(action)
            value = answer(action)
    except StopIteration as stop:
        return seen, stop.value
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return seen, exc


def routes(table: dict[str, httpx.Response | bytes | Exception]):
    """An ``answer`` for :func:`drive`: ``Send`` by path (a bytes value: a 200 SSE stream whose
    body the following ``Read`` actions return in one piece, then ``b""``), ``Offload`` runs."""
    bodies: dict[int, list[bytes]] = {}

    def answer(action):
        if isinstance(action, Send):
            value = table.get(action.request.url.path, resp(404, {"detail": "Not Found"}))
            if isinstance(value, bytes):
                r = httpx.Response(200, headers={"content-type": "text/event-stream"}, request=action.request)
                bodies[id(r)] = [value, b""]
                return r
            if action.stream and isinstance(value, httpx.Response):
                bodies[id(value)] = [value.content, b""]  # its body comes through Read actions
            return value
        if isinstance(action, Read):
            return bodies[id(action.response)].pop(0) if bodies[id(action.response)] else b""
        if isinstance(action, Offload):
            return action.fn(*action.args)
        return None

    return answer


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    "given, root",
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
        (" https://gpu.example.org/mantis/v1 ", "https://gpu.example.org/mantis"),
    ],
)
def test_base_url_with_or_without_v1_is_the_same_server(given, root):
    b = OpenAIBackend(base_url=given)
    assert b.base_url == root
    assert b._config.chat_url == root + "/v1/chat/completions"


def test_base_url_from_the_environment_and_its_errors(monkeypatch):
    with pytest.raises(errors.ConfigurationError, match="MANTIS_BASE_URL"):
        OpenAIBackend()
    monkeypatch.setenv("MANTIS_BASE_URL", "http://10.0.0.7:8000/v1")
    assert OpenAIBackend().base_url == "http://10.0.0.7:8000"
    for bad in ("ftp://host", "localhost:8000", "http://user:pw@host:8000", "http://host/?a=1"):
        with pytest.raises(errors.ConfigurationError, match="base_url"):
            OpenAIBackend(base_url=bad)


def test_key_from_argument_or_environment_hidden_everywhere(monkeypatch):
    assert OpenAIBackend(base_url=BASE).api_key is None  # optional: local servers need none
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    b = OpenAIBackend(base_url=BASE)
    assert b.api_key.get_secret_value() == KEY
    assert OpenAIBackend(base_url=BASE, api_key="").api_key is None  # explicitly none
    assert OpenAIBackend(base_url=BASE, api_key=SecretStr(" other ")).api_key.get_secret_value() == "other"
    assert KEY not in repr(b) and "**********" in repr(b)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(b)
    with pytest.raises(errors.ConfigurationError, match="api_key"):
        OpenAIBackend(base_url=BASE, api_key=123)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"server": "llamacpp"}, "server must be one of"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"extra_body": {1: 2}}, "extra_body"),
        ({"client": object()}, "client"),
        ({"image_short_side": 0}, "short_side"),
    ],
)
def test_bad_options_are_configuration_errors(kw, match):
    with pytest.raises(errors.ConfigurationError, match=match):
        OpenAIBackend(base_url=BASE, **kw)


def test_the_key_goes_only_to_the_servers_origin():
    c = cfg()
    assert c.build("POST", BASE + "/v1/chat/completions", timeout=5).headers["authorization"] == f"Bearer {KEY}"
    assert c.build("GET", "http://127.0.0.1:8000/version", timeout=5).headers["authorization"] == f"Bearer {KEY}"
    for other in ("http://127.0.0.1:8001/img.png", "https://127.0.0.1:8000/x", "http://localhost:8000/x"):
        assert "authorization" not in c.build("GET", other, timeout=5).headers
    assert "authorization" not in cfg(key=None).build("GET", BASE + "/v1/models", timeout=5).headers


def test_registered_as_backend_openai():
    assert "openai" in BACKEND_NAMES
    names = option_names("openai")
    for name in ("base_url", "api_key", "server", "timeout", "max_retries", "client", "async_client"):
        assert name in names
    for name in ("image_options", "image_short_side", "extra_body", "max_concurrency"):
        assert name in names
    # the adapters' default model (the fal endpoint) means "not given", as for local
    assert resolve_model("openai") == resolve_model("openai", DEFAULT_FAL_ENDPOINT) == DEFAULT_OPENAI_MODEL == ""
    assert resolve_model("openai", "mantis-7b") == "mantis-7b"
    b = resolve_backend("openai", DEFAULT_FAL_ENDPOINT, base_url=BASE, api_key=KEY, timeout=5, max_retries=0)
    assert isinstance(b, OpenAIBackend)
    assert (b._config.model, b.model, b.timeout, b.max_retries) == (None, "", 5.0, 0)
    assert resolve_model(b) == ""
    b = resolve_backend("openai", "served-name", base_url=BASE, server="vllm")
    assert (b.model, b.server) == ("served-name", "vllm")
    with pytest.raises(errors.ConfigurationError, match="unknown option 'mdoe'"):
        resolve_backend("openai", base_url=BASE, mdoe="x")
    # base_url is an adapter field like api_key: backends that do not take it ignore it
    assert resolve_backend("fal", api_key="k", base_url=BASE).model == DEFAULT_FAL_ENDPOINT


def test_importing_it_pulls_no_torch():
    code = (
        "import sys; import mantis_llm; from mantis_llm import OpenAIBackend; "
        "from mantis_llm.backends import OpenAIBackend as B; assert B is OpenAIBackend; "
        "OpenAIBackend(base_url='http://127.0.0.1:1'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------ detection


def models(*entries) -> dict:
    return {"object": "list", "data": list(entries)}


VLLM = models({"id": "mantis", "object": "model", "owned_by": "vllm", "root": "/m", "max_model_len": 4096})
SGLANG = models({"id": "/m", "object": "model", "owned_by": "sglang", "root": "/m"})
TRANSFORMERS = models({"owned_by": "m", "id": "/m", "object": "model", "created": 0, "status": {"value": "loaded"}})
OTHER = models({"id": "mantis", "object": "model", "owned_by": "llamacpp"})


@pytest.mark.parametrize(
    "body, kind", [(VLLM, "vllm"), (SGLANG, "sglang"), (TRANSFORMERS, "transformers"), (OTHER, None), ({}, None)]
)
def test_kind_from_the_model_list(body, kind):
    assert _servers.kind_from_models(body) == kind


@pytest.mark.parametrize(
    "path, status, body, kind",
    [
        ("/version", 200, {"version": "0.33.0"}, "vllm"),
        ("/get_model_info", 200, {"model_path": "/m", "is_generation": True}, "sglang"),
        ("/model_info", 200, {"model_path": "/m"}, "sglang"),
        ("/version", 404, {"detail": "Not Found"}, None),
        ("/version", 200, {"status": "ok"}, None),
        ("/get_model_info", 200, ["not", "a", "dict"], None),
    ],
)
def test_kind_from_a_probe(path, status, body, kind):
    assert _servers.kind_from_probe(path, status, body) == kind


def probe(table, **kw):
    call = _flows.Call(cfg(**kw), _config.SharedState(), None)
    seen, result = drive(_flows.probe_flow(call), routes(table))
    return [a.request.url.path for a in seen if isinstance(a, Send)], result, call


@pytest.mark.parametrize(
    "table, kind, paths",
    [
        ({"/v1/models": resp(200, VLLM)}, "vllm", ["/v1/models"]),
        ({"/v1/models": resp(200, TRANSFORMERS)}, "transformers", ["/v1/models"]),
        (  # a proxy hiding owned_by: the root routes tell
            {"/v1/models": resp(200, OTHER), "/version": resp(200, {"version": "0.24.0"})},
            "vllm",
            ["/v1/models", "/get_model_info", "/model_info", "/version"],
        ),
        ({"/v1/models": resp(200, OTHER), "/get_model_info": resp(200, {"model_path": "/m"})}, "sglang", None),
        ({"/v1/models": resp(200, OTHER)}, "openai", None),  # nothing tells: the plain profile
        ({"/v1/models": resp(404, {"detail": "Not Found"})}, "openai", None),  # no model list at all
    ],
)
def test_probe_detects_once_from_the_cheapest_answer(table, kind, paths):
    seen, facts, call = probe(table)
    assert facts.server == kind
    assert call.state.facts is facts
    if paths is not None:
        assert seen == paths


def test_probe_finds_the_only_model_and_refuses_to_guess_among_several():
    _, facts, _ = probe({"/v1/models": resp(200, VLLM)}, model=None)
    assert (facts.model, facts.served) == ("mantis", ("mantis",))
    _, facts, _ = probe({"/v1/models": resp(404, {"detail": "Not Found"})}, model=None)
    assert facts.model is None  # no list: the request carries no model field
    two = models({"id": "a", "owned_by": "vllm"}, {"id": "b", "owned_by": "vllm"})
    _, err, _ = probe({"/v1/models": resp(200, two)}, model=None)
    assert isinstance(err, errors.ConfigurationError) and "'a', 'b'" in str(err) and "model=" in str(err)
    _, facts, _ = probe({"/v1/models": resp(200, two)}, model="b")
    assert facts.model == "b"


def test_probe_errors_are_typed():
    _, err, _ = probe({"/v1/models": resp(401, {"error": {"message": "Unauthorized", "code": 401}})})
    assert isinstance(err, errors.AuthenticationError) and "api_key" in str(err) and KEY not in str(err)
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    seen, err, call = probe({"/v1/models": refused})
    assert isinstance(err, errors.BackendError) and "cannot reach the server" in str(err)
    assert seen == ["/v1/models"] * 3  # two retries (they sleep in between)
    assert call.metrics["retries"] == 2


def test_given_server_and_model_need_no_probe():
    assert _flows.known_facts(cfg(server="vllm")).server == "vllm"
    assert _flows.known_facts(cfg(server=None)) is None
    assert _flows.known_facts(cfg(server="vllm", model=None)) is None


# ------------------------------------------------------------------ request bodies


INTERLEAVED = Conversation(
    [
        Turn("system", ["Be terse."]),
        Turn("user", ["Compare", RED, "with", BLUE, ""]),
        Turn("assistant", ["The first is red."]),
        Turn("user", [Image("https://example.org/x.png"), " And this one? "]),
    ]
)


def test_messages_keep_every_part_in_order_over_turns():
    urls = ["data:red", "data:blue", "https://example.org/x.png"]
    assert _payload.build_messages(INTERLEAVED, urls) == [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image_url", "image_url": {"url": "data:red"}},
                {"type": "text", "text": "with"},
                {"type": "image_url", "image_url": {"url": "data:blue"}},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}},
                {"type": "text", "text": " And this one? "},  # as typed: the template joins and strips
            ],
        },
    ]
    prefill = Conversation([Turn("user", ["hi"]), Turn("assistant", [""])])
    assert _payload.build_messages(prefill, [])[-1] == {"role": "assistant", "content": ""}
    sglang = _payload.build_messages(INTERLEAVED, urls, multi_images=True)
    assert all(p.get("modalities") == "multi-images" for p in sglang[1]["content"] if p["type"] == "image_url")


def test_images_are_data_uris_or_urls_as_given():
    seen, urls = drive(
        _payload.encode_images(INTERLEAVED, _config.OpenAIConfig(BASE, None, None).image_options), routes({})
    )
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith("data:image/png;base64,")
    assert urls[2] == "https://example.org/x.png"  # the server fetches it
    assert [type(a) for a in seen] == [Offload, Offload]  # decoding runs off the event loop


def test_a_bad_local_image_is_named():
    conv = Conversation([Turn("user", ["look", Image(b"not an image at all")])])
    _, err = drive(_payload.encode_images(conv, cfg().image_options), routes({}))
    assert isinstance(err, errors.ImageError) and str(err).startswith("image 1 of message 1:")


def body(server: str, request: Request | None = None, stream: bool = False, **kw):
    request = request or req()
    urls = ["data:x"] * len(request.conversation.images)
    return _payload.build_body(request, _servers.SERVERS[server], "mantis", urls, stream=stream, **kw)


def test_vllm_body():
    b = body("vllm", req(max_tokens=16, stop=("\n",), seed=3, top_p=0.9), stream=True)
    assert b == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:x"}},
                    {"type": "text", "text": "Describe it."},
                ],
            }
        ],
        "model": "mantis",
        "max_completion_tokens": 16,
        "temperature": 0.0,  # greedy unless asked: vLLM would sample at 1.0
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "add_special_tokens": True,  # BOS by the tokenizer, as the local backend tokenizes
        "chat_template_kwargs": {"write_bos_token": False},
    }


def test_transformers_body_has_only_what_it_accepts():
    b = body("transformers", req(max_tokens=16, stop=("\n",)), stream=True)
    assert "stop" not in b and "stream_options" not in b and "add_special_tokens" not in b
    assert b["chat_template_kwargs"] == {"write_bos_token": False}
    assert b["max_completion_tokens"] == 16 and b["temperature"] == 0.0 and b["stream"] is True
    sampled = body("transformers", req(temperature=0.7, top_p=0.8, seed=1))
    assert json.loads(sampled["generation_config"]) == {
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "max_new_tokens": 1024,
    }
    assert "generation_config" not in body("vllm", req(temperature=0.7))


def test_sglang_and_plain_servers():
    two = req(Conversation.from_prompt("Compare.", [RED, BLUE]))
    parts = body("sglang", two)["messages"][0]["content"]
    assert [p.get("modalities") for p in parts] == ["multi-images", "multi-images", None]
    assert "modalities" not in json.dumps(body("sglang"))  # one image: the default
    plain = body("openai", req(max_tokens=5, stop=("x",)))
    assert plain["max_tokens"] == plain["max_completion_tokens"] == 5
    assert plain["stop"] == ["x"] and "chat_template_kwargs" not in plain


WEATHER = Tool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.mark.parametrize(
    "tools, fmt, json_only",
    [
        (ToolSpec((WEATHER,), choice="required"), None, True),
        (ToolSpec((WEATHER,), choice="get_weather"), None, True),
        (None, ResponseFormat({"type": "object", "properties": {"c": {"type": "string"}}}, name="colour answer"), True),
        (ToolSpec((WEATHER,), choice="auto"), None, False),  # text allowed instead: nothing to enforce
        (ToolSpec((WEATHER,), choice="none"), None, False),
        (None, None, False),
    ],
)
def test_json_only_answers_get_response_format_where_it_is_enforced(tools, fmt, json_only):
    request = Request(Conversation.from_prompt("hi"), GenerationParams(stop=("\n",)), tools=tools, response_format=fmt)
    vllm = body("vllm", request)
    assert ("response_format" in vllm) is json_only
    assert ("stop" in vllm) is not json_only  # a stop string must not cut the JSON short
    if json_only:
        rf = vllm["response_format"]
        assert rf["type"] == "json_schema" and rf["json_schema"]["strict"] is True
        assert rf["json_schema"]["name"] == ("colour_answer" if fmt else "tool_call")
        assert rf["json_schema"]["schema"] == _payload.json_constraint(request).schema
    assert "response_format" not in body("transformers", request)  # ignored there: validated client-side
    b = OpenAIBackend(base_url=BASE, server="vllm")
    assert b.enforces_format(request) is json_only
    assert OpenAIBackend(base_url=BASE, server="transformers").enforces_format(request) is False


def test_a_wrong_server_kind_gets_a_hint():
    r = resp(422, {"detail": "Unexpected fields in the request: {'add_special_tokens'}"})
    err = _errors.error_for_response(
        r, what="chat completion", url=BASE, base_url=BASE, model=None, served=None, request_id=None
    )
    assert isinstance(err, errors.InvalidRequestError) and "server='transformers'" in str(err)


def test_extra_body_is_merged_last():
    b = body("vllm", extra_body={"stop_token_ids": [128009], "temperature": 0.3})
    assert b["stop_token_ids"] == [128009] and b["temperature"] == 0.3


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "code, body, text, cls, words",
    [
        (400, {"error": {"message": "max_tokens must be at least 1", "type": "Bad Request", "code": 400}}, None,
         errors.InvalidRequestError, "max_tokens must be at least 1"),
        (400, {"object": "error", "message": "bad image", "type": "BadRequestError", "code": 400}, None,
         errors.InvalidRequestError, "bad image"),
        (422, {"detail": "Unexpected fields in the request: {'foo'}"}, None, errors.InvalidRequestError, "{'foo'}"),
        (422, {"detail": [{"loc": ["body", "messages"], "msg": "Field required", "type": "missing"}]}, None,
         errors.InvalidRequestError, "messages: Field required"),
        (400, {"error": {"message": "This model's maximum context length is 4096 tokens.", "code": 400}}, None,
         errors.ContextLengthError, "4096"),
        (401, {"error": {"message": "Unauthorized"}}, None, errors.AuthenticationError, "api_key"),
        (403, {"detail": "Forbidden"}, None, errors.AuthenticationError, "refused"),
        (404, {"error": {"message": "The model `mantis-x` does not exist.", "code": 404}}, None,
         errors.ConfigurationError, "'a', 'b'"),
        (400, {"detail": "Server is pinned to '/m'; requested 'mantis-x'."}, None, errors.ConfigurationError, "'a', 'b'"),
        (404, {"detail": "Not Found"}, None, errors.ConfigurationError, "check base_url"),
        (413, None, "Request Entity Too Large", errors.InvalidRequestError, "too large"),
        (429, {"error": {"message": "slow down"}}, None, errors.RateLimitError, "slow down"),
        (500, None, "Internal Server Error", errors.BackendError, "Internal Server Error"),
        (503, {"error": "CB worker died"}, None, errors.BackendError, "CB worker died"),
    ],
)  # fmt: skip
def test_error_for_response(code, body, text, cls, words):
    r = resp(code, body, text=text)
    err = _errors.error_for_response(
        r, what="chat completion", url=BASE + "/v1/chat/completions", base_url=BASE, model="mantis-x",
        served=("a", "b"), request_id="rid-1",
    )  # fmt: skip
    assert type(err) is cls
    assert words in str(err)
    assert err.status_code == code and err.request_id == "rid-1"


@pytest.mark.parametrize(
    "exc, posts, retry",
    [
        (httpx.ConnectError("refused"), True, True),
        (httpx.ConnectTimeout("slow"), True, True),
        (httpx.ReadError("reset"), True, False),  # the server may have started it
        (httpx.RemoteProtocolError("dropped"), True, False),
        (httpx.ReadTimeout("slow"), True, False),
        (httpx.ReadError("reset"), False, True),  # GETs are safe to resend
    ],
)
def test_what_may_be_resent(exc, posts, retry):
    assert _errors.should_retry_exception(exc, posts=posts) is retry


@pytest.mark.parametrize("code, retry", [(408, True), (429, True), (500, True), (502, True), (503, True),
                                         (504, True), (400, False), (401, False), (404, False), (422, False)])  # fmt: skip
def test_what_answers_are_retried(code, retry):
    assert _errors.should_retry_response(resp(code, {})) is retry


def test_a_post_that_broke_after_sending_is_not_resent():
    err = _errors.transport_error("chat completion", BASE, httpx.ReadError("reset"), posts=True, request_id="r")
    assert "not resent" in str(err) and err.request_id == "r"
    err = _errors.transport_error("chat completion", BASE, httpx.ConnectError("refused"), posts=True, request_id="r")
    assert "cannot reach" in str(err)


# ------------------------------------------------------------------ answers and streams


def test_completion_body():
    data = {
        "id": "x",
        "model": "/m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32},
    }
    assert _flows.parse_completion(data, None) == ("hi", "length")
    assert _flows.parse_usage(data).as_dict() == {"input_tokens": 30, "output_tokens": 2, "total_tokens": 32}
    assert _flows.parse_usage({"usage": {"prompt_tokens": "3"}}) is None
    with pytest.raises(errors.BackendError, match="without a choice"):
        _flows.parse_completion({"choices": []}, None)


def chunk(content=None, finish=None, usage=None, role=None, choices=True) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    out: dict = {"id": "c1", "object": "chat.completion.chunk", "model": "/m"}
    out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []
    if usage:
        out["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return out


VLLM_STREAM = [chunk(role="assistant", content=""), chunk("Hel"), chunk("lo"), chunk(finish="stop"),
               chunk(choices=False, usage=(10, 2))]  # fmt: skip
TRANSFORMERS_STREAM = [chunk(role="assistant"), chunk("Hel"), chunk("lo"), chunk(finish="length", usage=(10, 2))]


@pytest.mark.parametrize(
    "events, done", [(VLLM_STREAM, True), (TRANSFORMERS_STREAM, False)], ids=["vllm", "transformers"]
)
def test_stream_reader_takes_each_servers_shape(events, done):
    reader = _flows.StreamReader("r")
    text = "".join(reader.feed(json.dumps(e)) for e in events)
    if done:
        reader.feed("[DONE]")
    assert text == "Hello"
    assert reader.finished and reader.done is done
    assert reader.usage.as_dict()["total_tokens"] == 12
    assert reader.finish_reason in ("stop", "length") and reader.model == "/m"
    assert reader.feed("not json") == ""


@pytest.mark.parametrize(
    "event, cls, words",
    [
        ({"error": "'LlavaProcessor' object has no attribute 'get_vocab'"}, errors.BackendError, "get_vocab"),
        (
            {"error": {"message": "prompt too long for the context length", "code": 400}},
            errors.ContextLengthError,
            "too long",
        ),
        ({"error": {"object": "error", "message": "engine dead", "code": 500}}, errors.BackendError, "engine dead"),
    ],
)
def test_error_events_in_a_stream_are_typed(event, cls, words):
    with pytest.raises(cls, match=words):
        _flows.StreamReader("r").feed(json.dumps(event))


def chat(table, *, stream, request=None, server="vllm"):
    c = cfg(server=server)
    call = _flows.Call(c, _config.SharedState(), request or req(Conversation.from_prompt("hi")))
    facts = _config.ServerFacts(server, ("mantis",), "mantis")
    return drive(_flows.run(_flows.chat_flow(call, facts, stream=stream), call), routes(table))


def test_stream_flow_emits_deltas_then_the_response():
    seen, _ = chat({"/v1/chat/completions": sse(*VLLM_STREAM)}, stream=True)
    emitted = [a.chunk for a in seen if isinstance(a, Emit)]
    assert [c.text for c in emitted] == ["Hel", "lo", ""]
    final = emitted[-1].response
    assert (final.text, final.finish_reason, final.usage.output_tokens) == ("Hello", "stop", 2)
    assert final.metrics["server"] == "vllm" and final.request_id
    posted = next(a.request for a in seen if isinstance(a, Send))
    assert posted.headers["x-request-id"] == final.request_id
    assert json.loads(posted.content)["stream_options"] == {"include_usage": True}


def test_plain_completion_on_a_server_that_stops_plain_requests():
    answer = resp(
        200,
        {
            "id": "chatcmpl-1",
            "model": "mantis",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "A red square."}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 600, "completion_tokens": 4, "total_tokens": 604},
        },
    )
    request = req(Conversation.from_prompt("hi"), stop=("\n",))
    seen, _ = chat({"/v1/chat/completions": answer}, stream=False, request=request)
    (sent,) = [a for a in seen if isinstance(a, Send)]
    assert sent.stream is False and "stream" not in json.loads(sent.request.content)
    (only,) = [a.chunk for a in seen if isinstance(a, Emit)]
    assert (only.text, only.response.text, only.response.finish_reason) == ("A red square.", "A red square.", "stop")
    assert only.response.usage.input_tokens == 600 and only.response.model == "mantis"
    # transformers serve finishes a plain request after its client left: generate() streams there
    seen, _ = chat({"/v1/chat/completions": sse(*TRANSFORMERS_STREAM, done=False)}, stream=False, server="transformers")
    assert next(a for a in seen if isinstance(a, Send)).stream is True


def test_client_side_stop_closes_the_stream_at_the_stop_string():
    events = [chunk("Hello wor"), chunk("ld. STOP here"), chunk(" and more"), chunk(finish="length", usage=(5, 9))]
    request = req(Conversation.from_prompt("hi"), stop=("STOP",))
    for stream in (True, False):  # generate() streams too, to stop the server early
        seen, _ = chat(
            {"/v1/chat/completions": sse(*events, done=False)}, stream=stream, request=request, server="transformers"
        )
        final = [a.chunk for a in seen if isinstance(a, Emit)][-1].response
        assert (final.text, final.finish_reason) == ("Hello world. ", "stop")
        assert final.metrics["client_stop"] is True and final.usage is None
        assert any(isinstance(a, Close) for a in seen)
        posted = json.loads(next(a.request for a in seen if isinstance(a, Send)).content)
        assert "stop" not in posted and posted["stream"] is True


def test_a_stream_cut_before_the_end_is_an_error():
    seen, err = chat({"/v1/chat/completions": sse(chunk("Hel"), done=False)}, stream=True)
    assert isinstance(err, errors.BackendError) and "before the answer was complete" in str(err)


def test_a_server_that_ignores_stream_answers_whole():
    whole = resp(200, {"choices": [{"index": 0, "message": {"content": "all at once"}, "finish_reason": "stop"}]})
    seen, _ = chat({"/v1/chat/completions": whole}, stream=True)
    assert [a.chunk.text for a in seen if isinstance(a, Emit)] == ["all at once", ""]


def test_model_refusal_names_the_served_models():
    refusal = resp(404, {"error": {"message": "The model `mantis` does not exist.", "code": 404}})
    c = cfg(server="vllm")
    call = _flows.Call(c, _config.SharedState(), req(Conversation.from_prompt("hi")))
    facts = _config.ServerFacts("vllm", None, "mantis")  # given, never probed: the list is fetched
    seen, err = drive(
        _flows.chat_flow(call, facts, stream=False),
        routes({"/v1/chat/completions": refusal, "/v1/models": resp(200, VLLM | {"data": [{"id": "real"}]})}),
    )
    assert isinstance(err, errors.ConfigurationError) and "'real'" in str(err) and "'mantis'" in str(err)


def test_no_user_message_fails_before_sending():
    seen, err = chat({}, stream=False, request=req(Conversation([Turn("system", ["only this"])])))
    assert isinstance(err, errors.InvalidRequestError) and "no user message" in str(err)
    assert not any(isinstance(a, Send) for a in seen)
