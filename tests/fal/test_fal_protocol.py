"""The sans-I/O fal core on its own: hand-built httpx responses in, requests/decisions/errors out."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
from pydantic import SecretStr

from mantis_llm import Conversation, GenerationParams, Request, _text, errors
from mantis_llm.backends._http import actions, retry, sse
from mantis_llm.backends.fal import _call, _config, _errors, _flows, _payload, _policy
from mantis_llm.images import ImageOptions

KEY = "proto-key-id:proto-key-secret"


def cfg(**kw) -> _config.FalConfig:
    base = dict(
        endpoint="fal-ai/mantis-llava-7b-v11",
        key=SecretStr(KEY),
        queue_url="https://queue.fal.run",
        run_url="https://fal.run",
        rest_url="https://rest.fal.ai",
        cdn_url="https://v3.fal.media",
        timeout=10.0,
        max_retries=3,
    )
    base.update(kw)
    return _config.FalConfig(**base)


def resp(code: int, body=None, headers=None, text=None) -> httpx.Response:
    if text is not None:
        return httpx.Response(code, text=text, headers=headers)
    return httpx.Response(code, json=body, headers=headers)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_call(clock=None, on_update=None, stop=None, **kw) -> _call.Call:
    req = Request(Conversation.from_prompt("hi", ["https://example.org/a.png"]), GenerationParams(stop=stop))
    return _call.Call(
        cfg(**kw), _config.SharedState(), req, on_update=on_update, clock=clock or FakeClock(), rng=random.Random(0)
    )


def drive(flow, answer):
    """Run a flow with ``answer(action) -> value``; returns (actions seen, flow result or exception)."""
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


# ------------------------------------------------------------------ pure pieces


def test_sse_decoder_handles_split_chunks_comments_and_crlf():
    d = sse.SSEDecoder()
    assert d.feed(b': ping\n\ndata: {"a"') == []
    assert d.feed(b": 1}\r\n\r\ndata: x\ndata: y\n") == ['{"a": 1}']
    assert d.feed(b"\n") == ["x\ny"]
    assert d.feed(b"event: foo\nid: 3\n\n") == []  # no data: no event


def test_retry_after_seconds_and_http_date():
    assert retry.parse_retry_after("2") == 2.0
    assert retry.parse_retry_after("0.5") == 0.5
    assert retry.parse_retry_after(None) is None
    assert retry.parse_retry_after("soon") is None
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 < retry.parse_retry_after(format_datetime(when, usegmt=True)) <= 31


@pytest.mark.parametrize(
    "kind, code, headers, retry",
    [
        ("creates_job", 429, {}, True),
        ("creates_job", 408, {}, True),
        ("creates_job", 503, {}, True),  # ingress: the job was never created
        ("creates_job", 503, {"x-fal-request-id": "r"}, False),  # fal's app answered: maybe created
        ("creates_job", 502, {}, False),  # the gateway may have forwarded it
        ("creates_job", 504, {}, False),
        ("creates_job", 409, {}, False),
        ("creates_job", 500, {}, False),
        ("idempotent", 502, {}, True),
        ("idempotent", 504, {}, True),
        ("idempotent", 504, {"x-fal-request-timeout-type": "user"}, False),
        ("idempotent", 500, {"x-fal-request-id": "r"}, False),  # the job's own failure: final
        ("idempotent", 409, {}, True),
        ("idempotent", 422, {}, False),
        ("status", 500, {"x-fal-request-id": "r"}, True),
        # the result of a job that completed without error: fal's 5xx are retried
        ("result", 500, {"x-fal-request-id": "r"}, True),
        ("result", 502, {"x-fal-request-id": "r"}, True),
        ("result", 503, {"x-fal-request-id": "r"}, True),
        ("result", 504, {}, True),
        ("result", 504, {"x-fal-request-timeout-type": "user"}, False),
        ("result", 501, {}, False),
        ("result", 422, {}, False),
        ("cancel", 429, {}, False),
    ],
)
def test_retry_decisions_for_responses(kind, code, headers, retry):
    assert _policy.should_retry_response(kind, resp(code, {}, headers)) is retry


def test_retry_decisions_for_transport_errors():
    req = httpx.Request("POST", "https://queue.fal.run/x/y")
    assert _policy.should_retry_exception("creates_job", httpx.ConnectError("refused", request=req))
    assert _policy.should_retry_exception("creates_job", httpx.ConnectTimeout("t", request=req))
    # the request may have reached fal: never resend a submit
    assert not _policy.should_retry_exception("creates_job", httpx.ReadTimeout("t", request=req))
    assert not _policy.should_retry_exception("creates_job", httpx.RemoteProtocolError("gone", request=req))
    assert _policy.should_retry_exception("idempotent", httpx.ReadTimeout("t", request=req))
    assert _policy.should_retry_exception("idempotent", httpx.RemoteProtocolError("gone", request=req))
    assert _policy.should_retry_exception("result", httpx.RemoteProtocolError("gone", request=req))
    assert not _policy.should_retry_exception("cancel", httpx.ConnectError("refused", request=req))


def test_backoff_is_full_jitter_and_capped():
    rng = random.Random(1)
    delays = [retry.backoff_delay(a, rng) for a in range(12)]
    assert all(0 <= d <= retry.BACKOFF_CAP for d in delays)
    assert max(retry.backoff_delay(0, rng) for _ in range(200)) <= retry.BACKOFF_BASE


@pytest.mark.parametrize(
    "code, body, headers, step, cls, words",
    [
        (401, {"detail": "Unauthorized"}, {}, "submit", errors.AuthenticationError, ["FAL_KEY"]),
        (403, {"detail": "Forbidden"}, {}, "submit", errors.AuthenticationError, ["FAL_KEY"]),
        (404, {"detail": "Application 'x' not found"}, {}, "submit", errors.EndpointNotFoundError, ["retired"]),
        (404, {"detail": "Request not found"}, {}, "result", errors.InvalidRequestError, ["not found"]),
        (
            422,
            {"detail": [{"loc": ["body", "images", 0, "image_url"], "msg": "bad url", "type": "url"}]},
            {},
            "result",
            errors.InvalidRequestError,
            ["images.0.image_url: bad url"],
        ),
        (400, {"detail": "bad"}, {}, "submit", errors.InvalidRequestError, ["bad"]),
        (413, {"detail": "too big"}, {}, "submit", errors.InvalidRequestError, ["upload_threshold"]),
        (429, {"detail": "slow down"}, {}, "submit", errors.RateLimitError, ["slow down"]),
        (
            503,
            {"detail": "Runner disconnected", "error_type": "runner_disconnected"},
            {"x-fal-request-id": "r-9"},
            "result",
            errors.BackendError,
            ["runner_disconnected", "Runner disconnected"],
        ),
        (500, None, {}, "status", errors.BackendError, ["nginx"]),
    ],
)
def test_error_mapping(code, body, headers, step, cls, words):
    r = resp(code, body, headers) if body is not None else resp(code, headers=headers, text="<html>nginx</html>")
    err = _errors.error_for_response(r, step=step, endpoint="fal-ai/x", request_id="r-1")
    assert type(err) is cls
    assert err.status_code == code
    assert err.request_id == (headers.get("x-fal-request-id") or "r-1")
    for w in words:
        assert w in str(err)
    if code == 422:
        assert err.detail == body["detail"]


def test_status_parsing_is_tolerant_but_rejects_garbage():
    upd = _call.status_update({"status": "IN_QUEUE", "queue_position": 3}, "r")
    assert (upd.status, upd.queue_position, upd.logs, upd.request_id) == ("IN_QUEUE", 3, [], "r")
    upd = _call.status_update({"status": "COMPLETED", "logs": None, "metrics": None}, "r")
    assert upd.metrics == {} and upd.logs == []
    with pytest.raises(errors.BackendError):
        _call.status_update({"nope": 1}, "r")
    with pytest.raises(errors.BackendError):
        _flows.output_text({"images": []}, "r")


@pytest.mark.parametrize(
    "pieces, stop, released, final, stopped",
    [
        (["Hello wor", "ld. END more"], ("END",), "Hello world. ", "Hello world. ", True),
        (["abc E", "N", "D"], ("END",), "abc ", "abc ", True),
        (["abc E", "Nx"], ("END",), "abc ENx", "abc ENx", False),
        (["no stop"], None, "no stop", "no stop", False),
        (["x</s", ">y"], ("</s>", "\n\n"), "x", "x", True),
    ],
)
def test_stop_trimmer(pieces, stop, released, final, stopped):
    t = _text.StopTrimmer(stop)
    out = "".join(t.feed(p) for p in pieces) + t.flush()
    assert out == released and t.text == final and t.stopped is stopped


def test_key_goes_only_to_configured_fal_hosts():
    c = cfg(
        queue_url="http://127.0.0.1:9000", run_url="http://127.0.0.1:9000/run", rest_url="http://127.0.0.1:9000/rest"
    )
    assert c.build("GET", "http://127.0.0.1:9000/a/b", timeout=1).headers["authorization"] == "Key " + KEY
    for url in (
        "http://127.0.0.1:9001/a",
        "http://localhost:9000/a",
        "https://127.0.0.1:9000/a",
        "https://evil.example/a",
    ):
        assert "authorization" not in c.build("GET", url, timeout=1).headers
    assert "authorization" not in c.build("POST", "http://127.0.0.1:9000/cdn", timeout=1, key_auth=False).headers
    # the default ports count as the same host
    assert "authorization" in cfg().build("GET", "https://queue.fal.run:443/x", timeout=1).headers
    # per-request timeouts are on the request itself
    assert c.build("GET", "http://127.0.0.1:9000/a", timeout=2.5).extensions["timeout"]["read"] == 2.5


def test_token_expiry_is_respected():
    exp = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    tok = _payload.token_from_response({"token": "cdn-secret", "token_type": "Bearer", "expires_at": exp}, now=100.0)
    assert tok.header.get_secret_value() == "Bearer cdn-secret" and 100 + 3400 < tok.expires < 100 + 3600
    assert "cdn-secret" not in repr(tok)
    with pytest.raises(errors.BackendError):
        _payload.token_from_response({"detail": "x"}, now=0)


# ------------------------------------------------------------------ flows, fed by hand


SUBMIT = {
    "request_id": "r-1",
    "status_url": "https://queue.fal.run/fal-ai/mantis-llava-7b-v11/requests/r-1/status",
    "response_url": "https://queue.fal.run/fal-ai/mantis-llava-7b-v11/requests/r-1",
    "cancel_url": "https://queue.fal.run/fal-ai/mantis-llava-7b-v11/requests/r-1/cancel",
}


def queue_answers(*, stream_code=200, status_bodies=(), submit=SUBMIT, clock=None):
    """An answer function playing fal for queue_flow."""
    bodies = list(status_bodies)

    def answer(action):
        if isinstance(action, actions.Offload):
            return action.fn(*action.args)
        if isinstance(action, actions.Sleep):
            if clock:
                clock.t += action.seconds
            return None
        if isinstance(action, (actions.Close, actions.Emit)):
            return None
        req = action.request
        path = req.url.path
        if req.method == "POST":
            return resp(200, submit)
        if path.endswith("/status/stream"):
            return resp(stream_code, {"detail": "no"})
        if path.endswith("/status"):
            return resp(200 if bodies[0]["status"] == "COMPLETED" else 202, bodies.pop(0))
        if req.method == "PUT":
            return resp(202, {"status": "CANCELLATION_REQUESTED"})
        return resp(200, {"output": "It is a cat. USER: more", "partial": False})

    return answer


def test_queue_flow_polls_when_the_stream_is_missing_and_remembers_it():
    updates = []
    call = make_call(on_update=updates.append, stop=("USER:",))
    bodies = [
        {"status": "IN_QUEUE", "queue_position": 1},
        {"status": "IN_PROGRESS", "logs": [{"message": "a"}]},
        {"status": "IN_PROGRESS", "logs": [{"message": "a"}, {"message": "b"}]},
        {"status": "COMPLETED", "logs": [{"message": "a"}, {"message": "b"}], "metrics": {"inference_time": 1.5}},
    ]
    seen, result = drive(
        _flows.run_flow("queue", call, ImageOptions()), queue_answers(stream_code=404, status_bodies=bodies)
    )
    assert result is None, result
    emit = [a for a in seen if isinstance(a, actions.Emit)][-1]
    r = emit.chunk.response
    assert (r.text, r.finish_reason, r.request_id) == ("It is a cat. ", "stop", "r-1")
    assert r.metrics["status_transport"] == "poll" and r.metrics["inference_time"] == 1.5
    assert call.state.status_stream is False  # the next call goes straight to polling
    # each log line reported once, positions and statuses in order
    assert [(u.status, u.queue_position, [l["message"] for l in u.logs]) for u in updates] == [
        ("IN_QUEUE", None, []),
        ("IN_QUEUE", 1, []),
        ("IN_PROGRESS", None, ["a"]),
        ("IN_PROGRESS", None, ["b"]),
        ("COMPLETED", None, []),
    ]
    sleeps = [a.seconds for a in seen if isinstance(a, actions.Sleep)]
    assert sleeps and max(sleeps) <= _config.POLL_MAX


def test_queue_flow_rebuilds_urls_that_point_to_another_host():
    evil = {
        k: v.replace("https://queue.fal.run", "https://attacker.example") if isinstance(v, str) else v
        for k, v in SUBMIT.items()
    }
    call = make_call()
    bodies = [{"status": "COMPLETED"}]
    seen, result = drive(
        _flows.run_flow("queue", call, ImageOptions()),
        queue_answers(stream_code=404, status_bodies=bodies, submit=evil),
    )
    assert result is None, result
    hosts = {a.request.url.host for a in seen if isinstance(a, actions.Send)}
    assert hosts == {"queue.fal.run"}


def test_queue_flow_cancels_and_times_out_with_the_request_id():
    clock = FakeClock()
    call = make_call(clock=clock, timeout=1.0)
    bodies = [{"status": "IN_PROGRESS"}] * 1000
    seen, result = drive(
        _flows.run_flow("queue", call, ImageOptions()),
        queue_answers(stream_code=404, status_bodies=bodies, clock=clock),
    )
    assert isinstance(result, errors.RequestTimeoutError) and result.request_id == "r-1"
    assert seen[-1].request.method == "PUT" and seen[-1].request.url.path.endswith("/r-1/cancel")


def test_submit_is_never_resent_after_it_may_have_arrived():
    call = make_call()

    def answer(action):
        if isinstance(action, actions.Offload):
            return action.fn(*action.args)
        return httpx.ReadTimeout("slow", request=action.request) if action.request.method == "POST" else None

    call.deadline.at = float("inf")
    seen, result = drive(_flows.run_flow("queue", call, ImageOptions()), answer)
    assert isinstance(result, errors.BackendError) and "not resent" in str(result)
    assert sum(isinstance(a, actions.Send) for a in seen) == 1


def test_submit_is_retried_when_the_answer_proves_no_job_was_made():
    call = make_call()
    answers = iter([resp(429, {"detail": "busy"}, {"retry-after": "0.25"}), resp(503, text="nginx"), resp(200, SUBMIT)])

    def answer(action):
        if isinstance(action, actions.Offload):
            return action.fn(*action.args)
        if isinstance(action, actions.Sleep):
            return None
        if action.request.method == "POST":
            return next(answers)
        raise StopTest

    class StopTest(Exception):
        pass

    seen, result = drive(_flows.run_flow("queue", call, ImageOptions()), answer)
    sleeps = [a.seconds for a in seen if isinstance(a, actions.Sleep)]
    assert sleeps[0] == 0.25 and len(sleeps) == 2  # Retry-After honoured, then backoff
    assert isinstance(result, StopTest)  # got past the submit
    assert call.request_id == "r-1"


def test_interrupt_after_submit_cancels_then_reraises():
    call = make_call()
    flow = _flows.run_flow("queue", call, ImageOptions())
    answer = queue_answers()
    action = flow.send(None)
    while not (isinstance(action, actions.Send) and action.request.url.path.endswith("/status/stream")):
        action = flow.send(answer(action))
    cancel = flow.throw(KeyboardInterrupt())
    assert cancel.request.method == "PUT" and cancel.request.extensions["timeout"]["read"] == _config.CANCEL_TIMEOUT
    with pytest.raises(KeyboardInterrupt):
        flow.send(resp(202, {"status": "CANCELLATION_REQUESTED"}))


def stream_answers(events: list[bytes], *, stream_code: int = 200):
    """An answer function playing fal: the token stream (its POST, then one chunk per Read;
    ``stream_code`` 404/405: none), and a queue whose status says COMPLETED at once."""
    chunks = list(events)

    def answer(action):
        if isinstance(action, actions.Offload):
            return action.fn(*action.args)
        if isinstance(action, (actions.Close, actions.Emit, actions.Sleep)):
            return None
        if isinstance(action, actions.Read):
            return chunks.pop(0) if chunks else b""
        req = action.request
        path = req.url.path
        if req.method == "POST" and path.endswith("/stream"):
            if stream_code != 200:
                return resp(stream_code, {"detail": "Not Found"})
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"")
        if req.method == "POST":
            return resp(200, SUBMIT)
        if path.endswith("/status/stream"):
            return resp(404, {"detail": "no"})
        if path.endswith("/status"):
            return resp(200, {"status": "COMPLETED"})
        return resp(200, {"output": "queued answer"})

    return answer


@pytest.mark.parametrize("stop", [None, ("cat",)])
def test_an_ended_token_stream_is_read_to_its_end_and_a_stopped_one_dropped(stop):
    events = [
        b'data: {"output": "It is a cat", "partial": true}\n\n',
        b'data: {"output": "It is a cat. USER: more", "partial": false}\n\n',
    ]
    call = make_call(stop=stop)
    seen, result = drive(_flows.run_flow("stream", call, ImageOptions()), stream_answers(events))
    assert result is None, result
    reads = sum(isinstance(a, actions.Read) for a in seen)
    text = "".join(a.chunk.text for a in seen if isinstance(a, actions.Emit))
    if stop:  # cut inside the first event: the connection is dropped, nothing more read
        assert (reads, call.dropped_stream, text) == (1, True, "It is a ")
    else:  # both events, then one read that finds the end of the body
        assert (reads, call.dropped_stream, text) == (3, False, "It is a cat. USER: more")
    kinds = [type(a).__name__ for a in seen]
    assert kinds.count("Close") == 1 and kinds[kinds.index("Close") - 1] == ("Emit" if stop else "Read")


@pytest.mark.parametrize("missing", [404, 405])
def test_auto_falls_back_to_the_queue_when_the_token_stream_is_missing(missing):
    call = make_call()
    answer = stream_answers([], stream_code=missing)
    seen, result = drive(_flows.run_flow("stream", call, ImageOptions(), fallback=True), answer)
    assert result is None, result
    posts = [a.request.url.path for a in seen if isinstance(a, actions.Send) and a.request.method == "POST"]
    assert posts == ["/fal-ai/mantis-llava-7b-v11/stream", "/fal-ai/mantis-llava-7b-v11"]
    final = [a for a in seen if isinstance(a, actions.Emit)][-1].chunk.response
    assert final.text == "queued answer" and final.metrics["mode"] == "queue" and final.request_id == "r-1"
    assert call.state.token_stream is False  # remembered for the backend's later calls
    # without fallback (mode "stream"), the 404/405 is the answer
    seen, result = drive(
        _flows.run_flow("stream", make_call(), ImageOptions()), stream_answers([], stream_code=missing)
    )
    assert isinstance(result, errors.EndpointNotFoundError) and result.status_code == missing


def test_text_only_is_resent_once_with_the_placeholder_after_a_422_for_the_image():
    call = _call.Call(cfg(), _config.SharedState(), Request(Conversation.from_prompt("hi")), rng=random.Random(0))
    no_image = [{"loc": ["body", "images"], "msg": "List should have at least 1 item", "type": "too_short"}]
    bodies = []

    def answer(action):
        if isinstance(action, (actions.Offload, actions.Emit)):
            return None
        bodies.append(__import__("json").loads(action.request.content))
        return resp(422, {"detail": no_image}) if not bodies[-1]["images"] else resp(200, {"output": "hello"})

    seen, result = drive(_flows.run_flow("sync", call, ImageOptions()), answer)
    assert result is None, result
    assert [len(b["images"]) for b in bodies] == [0, 1] and bodies[1]["images"][0]["image_url"] == _payload.BLANK_IMAGE
    assert bodies[1]["prompt"] == f"<image> {_payload.BLANK_NOTE}\n\nhi"
    assert call.state.needs_image is True and call.metrics["placeholder_image"] is True
