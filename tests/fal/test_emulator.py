"""FalEmulator against plain httpx: every route, status codes, SSE framing, auth, 422 shape,
cancel semantics, seeded faults, the recorder, concurrency and the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time

import httpx
import pytest

from mantis_llm import errors
from mantis_llm.emulator import (
    DEFAULT_APPS,
    FORBIDDEN_KEY,
    HANG,
    FalEmulator,
    Faults,
    JobError,
    expected_digest,
    expected_output,
)

APP = DEFAULT_APPS[0]
URL_NAMES = ("queue_url", "run_url", "rest_url", "cdn_url")


@pytest.fixture
def raw_emu(request):
    """An emulator with no environment pointed at it; ``@pytest.mark.parametrize("raw_emu", [seconds], indirect=True)`` sets the service time."""
    with FalEmulator(service_time=getattr(request, "param", 0.05)) as e:
        yield e


slow_jobs = pytest.mark.parametrize("raw_emu", [0.3], indirect=True)  # room to observe a job mid-way


@pytest.fixture
def client(raw_emu):
    with httpx.Client(headers={"Authorization": f"Key {raw_emu.key}"}, timeout=10) as c:
        yield c


@pytest.fixture
def payload(png_bytes):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes).decode()
    return {
        "prompt": "USER: compare <image> and <image> ASSISTANT:",
        "images": [{"image_url": uri}, {"image_url": "https://example.com/cat.jpg"}],
    }


def sse_events(response: httpx.Response) -> list[dict]:
    """Parse an SSE body strictly: every event is 'data: <json>' followed by a blank line."""
    events = []
    for block in response.text.split("\n\n"):
        if not block or block.startswith(":"):
            continue
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: ") :]))
    assert response.text.endswith("\n\n")
    return events


def wait_done(client, sub) -> dict:
    with client.stream("GET", sub["status_url"] + "/stream") as r:
        r.read()
    return client.get(sub["status_url"]).json()


# ------------------------------------------------------------------ queue


@slow_jobs
def test_submit_status_result(raw_emu, client, payload):
    r = client.post(f"{raw_emu.url}/{APP}", json=payload)
    assert r.status_code == 200
    sub = r.json()
    rid = sub["request_id"]
    base = f"{raw_emu.url}/{APP}/requests/{rid}"
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 0
    assert (sub["response_url"], sub["status_url"], sub["cancel_url"]) == (base, base + "/status", base + "/cancel")
    assert r.headers["x-fal-request-id"] == rid

    early = client.get(sub["status_url"])
    assert early.status_code == 202 and early.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert early.json()["logs"] is None
    not_ready = client.get(sub["response_url"])
    assert not_ready.status_code == 400 and not_ready.json() == {"detail": "Request is still in progress"}

    done = wait_done(client, sub)
    assert done["status"] == "COMPLETED" and done["logs"] is None
    assert 0.3 <= done["metrics"]["inference_time"] < 2 and "error" not in done
    final = client.get(sub["status_url"], params={"logs": "true"})
    assert final.status_code == 200
    assert [log["message"] for log in final.json()["logs"]][:2] == ["Request queued", "Loading 2 images"]
    assert set(final.json()["logs"][0]) == {"message", "level", "source", "timestamp"}

    res = client.get(sub["response_url"])
    assert res.status_code == 200 and res.headers["x-fal-request-id"] == rid
    digest = expected_digest(payload)
    assert res.json() == {"output": expected_output(payload), "partial": False}
    assert res.json()["output"].startswith(f"[mantis-emulator] 2 images; digest={digest}; ")
    assert res.json()["output"].endswith("compare <image> and <image> ASSISTANT:")
    assert client.get(sub["response_url"] + "/").status_code == 200  # trailing slash, as in fal's docs


def test_digest_tells_requests_apart(payload):
    other = {**payload, "images": payload["images"][::-1]}
    assert expected_digest(payload) != expected_digest(other)
    assert expected_digest(payload) == FalEmulator.digest(
        payload["prompt"], [i["image_url"] for i in payload["images"]]
    )
    assert len(expected_digest(payload)) == 8


@slow_jobs
def test_status_stream_sse(raw_emu, client, payload):
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    with client.stream("GET", sub["status_url"] + "/stream", params={"logs": 1}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
    events = sse_events(r)
    assert events[-1]["status"] == "COMPLETED" and "inference_time" in events[-1]["metrics"]
    assert all(e["status"] != "COMPLETED" for e in events[:-1]) and len(events) >= 2
    # logs are incremental per event: concatenated they equal the full polled list
    streamed = [log for e in events for log in e["logs"]]
    assert streamed == client.get(sub["status_url"], params={"logs": 1}).json()["logs"]
    # after completion the stream gives the one final event and closes
    again = client.get(sub["status_url"] + "/stream")
    assert [e["status"] for e in sse_events(again)] == ["COMPLETED"] and again.json is not None


def test_settings_change_while_running(raw_emu, client, payload):
    raw_emu.service_time = 0.2
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    assert raw_emu.job_status(sub["request_id"]) == "IN_PROGRESS" and raw_emu.job_status("nope") is None
    assert wait_done(client, sub)["metrics"]["inference_time"] >= 0.2
    assert raw_emu.job_status(sub["request_id"]) == "COMPLETED"
    raw_emu.key = "new:key"
    assert client.post(f"{raw_emu.run_url}/{APP}", json=payload).status_code == 401


def test_queue_positions_with_concurrency_limit(client, payload):
    with FalEmulator(service_time=0.15, concurrency=1) as raw_emu:
        url = f"{raw_emu.url}/{APP}"
        subs = [
            client.post(url, json=payload, headers={"Authorization": f"Key {raw_emu.key}"}).json() for _ in range(3)
        ]
        assert [s["queue_position"] for s in subs] == [0, 0, 1]
        st = client.get(subs[2]["status_url"], headers={"Authorization": f"Key {raw_emu.key}"})
        assert st.status_code == 202 and st.json()["status"] == "IN_QUEUE" and st.json()["queue_position"] == 1
        with client.stream(
            "GET", subs[2]["status_url"] + "/stream", headers={"Authorization": f"Key {raw_emu.key}"}
        ) as r:
            r.read()
        seen = [(e["status"], e.get("queue_position")) for e in sse_events(r)]
        assert seen[0] == ("IN_QUEUE", 1) and ("IN_QUEUE", 0) in seen and seen[-1][0] == "COMPLETED"
        assert seen.index(("IN_QUEUE", 0)) < [s for s, _ in seen].index("IN_PROGRESS")


def test_validation_error_surfaces_at_result(raw_emu, client, payload):
    bad = {
        **payload,
        "images": [{"image_url": "data:image/png;base64,@@@"}, {"image_url": "ftp://x/y.png"}],
        "max_tokens": 0,
        "temperature": 3,
        "top_p": 0,
        "extra_field": "ignored",
    }
    r = client.post(f"{raw_emu.url}/{APP}", json=bad)
    assert r.status_code == 200  # accepted, like fal
    done = wait_done(client, r.json())
    assert done["status"] == "COMPLETED" and done["error_type"] == "validation_error"
    res = client.get(r.json()["response_url"])
    assert res.status_code == 422
    detail = res.json()["detail"]
    assert all(set(d) >= {"loc", "msg", "type"} for d in detail)
    locs = {tuple(d["loc"]): d["type"] for d in detail}
    assert locs == {
        ("body", "images", 0, "image_url"): "image_load_error",
        ("body", "images", 1, "image_url"): "url_parsing",
        ("body", "max_tokens"): "greater_than",
        ("body", "temperature"): "less_than_equal",
        ("body", "top_p"): "greater_than",
    }


@pytest.mark.parametrize(
    "body, loc, type_",
    [
        ({"images": [{"image_url": "https://a/b.png"}]}, ["body", "prompt"], "missing"),
        ({"prompt": 3, "images": [{"image_url": "https://a/b.png"}]}, ["body", "prompt"], "string_type"),
        ({"prompt": "hi", "images": []}, ["body", "images"], "too_short"),
        ({"prompt": "hi", "images": "https://a/b.png"}, ["body", "images"], "list_type"),
        ({"prompt": "hi", "images": [{"url": "https://a/b.png"}]}, ["body", "images", 0, "image_url"], "missing"),
        (
            {"prompt": "hi", "images": [{"image_url": "data:text/plain;base64,aGk="}]},
            ["body", "images", 0, "image_url"],
            "image_load_error",
        ),
        (
            {"prompt": "hi", "images": [{"image_url": "data:image/png;base64,aGVsbG8="}]},  # valid b64, not a PNG
            ["body", "images", 0, "image_url"],
            "image_load_error",
        ),
        ({"prompt": "hi", "images": [{"image_url": "https://a/b.png"}], "seed": "x"}, ["body", "seed"], "int_type"),
        ([1, 2], ["body"], "dict_type"),
    ],
)
def test_sync_validation_422(raw_emu, client, body, loc, type_):
    r = client.post(f"{raw_emu.run_url}/{APP}", json=body)
    assert r.status_code == 422
    assert [(d["loc"], d["type"]) for d in r.json()["detail"]] == [(loc, type_)]
    assert raw_emu.submissions == []  # a direct 422 creates no job


def test_endpoint_switches_text_only_and_token_stream(raw_emu, client, payload):
    text_only = {"prompt": "hi", "images": []}
    run = f"{raw_emu.run_url}/{APP}"
    assert client.post(run, json=text_only).status_code == 422  # by default the endpoint wants an image
    raw_emu.require_images = False
    r = client.post(run, json=text_only)
    assert (
        r.status_code == 200 and r.json()["output"] == expected_output(text_only) and "0 images" in r.json()["output"]
    )
    sub = client.post(f"{raw_emu.url}/{APP}", json=text_only).json()  # and on the queue
    assert wait_done(client, sub)["status"] == "COMPLETED" and client.get(sub["response_url"]).status_code == 200
    for value, code in ((False, 404), (404, 404), (405, 405)):
        raw_emu.stream_endpoint = value
        r = client.post(run + "/stream", json=payload)
        assert r.status_code == code and r.json()["detail"] in ("Not Found", "Method Not Allowed")
    assert client.post(run, json=payload).status_code == 200  # the plain run is still served
    raw_emu.reset()  # back to the constructor's switches
    assert client.post(run, json=text_only).status_code == 422
    with client.stream("POST", run + "/stream", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
        r.read()
    with FalEmulator(require_images=False, stream_endpoint=405) as other:
        assert (other.require_images, other.stream_endpoint) == (False, 405)
    for bad in ({"require_images": "no"}, {"stream_endpoint": 500}, {"stream_endpoint": 1}):
        with pytest.raises((TypeError, ValueError)):
            FalEmulator(**bad)


def test_partial_outputs_are_prefixes_of_the_answer(raw_emu, client, payload):
    answer = "a  b\tc\n\nd e  f g h i j"  # spacing the fake model keeps
    raw_emu.script([answer])
    with client.stream("POST", f"{raw_emu.run_url}/{APP}/stream", json=payload) as r:
        r.read()
    outputs = [e["output"] for e in sse_events(r)]
    assert outputs[-1] == answer and len(outputs) >= 3
    assert all(answer.startswith(o) for o in outputs)


def test_invalid_json_is_422(raw_emu, client):
    r = client.post(f"{raw_emu.run_url}/{APP}", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_max_tokens_truncates_words(raw_emu, client, payload):
    r = client.post(f"{raw_emu.run_url}/{APP}", json={**payload, "max_tokens": 3})
    assert r.json()["output"] == "[mantis-emulator] 2 images;"
    assert r.json()["output"] == expected_output({**payload, "max_tokens": 3})


# ------------------------------------------------------------------ cancel


def test_cancel_running_then_completed_and_unknown(client, payload):
    with FalEmulator(hang=True) as raw_emu:
        h = {"Authorization": f"Key {raw_emu.key}"}
        sub = client.post(f"{raw_emu.url}/{APP}", json=payload, headers=h).json()
        assert client.get(sub["status_url"], headers=h).json()["status"] == "IN_PROGRESS"
        r = client.put(sub["cancel_url"], headers=h)
        assert r.status_code == 202 and r.json() == {"status": "CANCELLATION_REQUESTED"}
        st = client.get(sub["status_url"], headers=h).json()
        assert st["status"] == "COMPLETED" and st["error_type"] == "client_cancelled"
        res = client.get(sub["response_url"], headers=h)
        assert res.status_code == 499 and res.json()["detail"] == "Request cancelled"
        again = client.put(sub["cancel_url"], headers=h)
        assert again.status_code == 400 and again.json() == {"status": "ALREADY_COMPLETED"}
        missing = client.put(f"{raw_emu.url}/{APP}/requests/nope/cancel", headers=h)
        assert missing.status_code == 404 and missing.json() == {"status": "NOT_FOUND"}
        assert raw_emu.cancelled == [sub["request_id"], sub["request_id"]]


def test_cancel_queued_job_frees_its_place(client, payload):
    with FalEmulator(service_time=5, concurrency=1) as raw_emu:
        h = {"Authorization": f"Key {raw_emu.key}"}
        first, second, third = (client.post(f"{raw_emu.url}/{APP}", json=payload, headers=h).json() for _ in range(3))
        assert client.get(third["status_url"], headers=h).json()["queue_position"] == 1
        assert client.put(second["cancel_url"], headers=h).status_code == 202
        assert client.get(second["response_url"], headers=h).status_code == 499
        assert client.get(third["status_url"], headers=h).json()["queue_position"] == 0
        assert client.put(first["cancel_url"], headers=h).status_code == 202  # frees the slot
        assert client.get(third["status_url"], headers=h).json()["status"] == "IN_PROGRESS"


def test_start_timeout_header(client, payload):
    with FalEmulator(service_time=5, concurrency=1) as raw_emu:
        h = {"Authorization": f"Key {raw_emu.key}"}
        client.post(f"{raw_emu.url}/{APP}", json=payload, headers=h)  # occupies the only slot
        sub = client.post(f"{raw_emu.url}/{APP}", json=payload, headers={**h, "X-Fal-Request-Timeout": "0.1"}).json()
        with client.stream("GET", sub["status_url"] + "/stream", headers=h) as r:
            r.read()
        assert sse_events(r)[-1]["error_type"] == "request_timeout"
        res = client.get(sub["response_url"], headers=h)
        assert res.status_code == 504 and res.headers["x-fal-request-timeout-type"] == "user"


# ------------------------------------------------------------------ sync endpoints


def test_sync_run(raw_emu, client, payload):
    t0 = time.perf_counter()
    r = client.post(f"{raw_emu.run_url}/{APP}", json=payload)
    assert time.perf_counter() - t0 >= 0.05
    assert r.status_code == 200 and r.json() == {"output": expected_output(payload), "partial": False}
    assert [s.mode for s in raw_emu.submissions] == ["sync"]
    assert r.headers["x-fal-request-id"] == raw_emu.submissions[0].request_id


def test_sync_stream_partial_events(raw_emu, client, payload):
    with client.stream("POST", f"{raw_emu.run_url}/{APP}/stream", json=payload) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
    events = sse_events(r)
    full = expected_output(payload)
    assert len(events) >= 3 and events[-1] == {"output": full, "partial": False}
    assert all(e["partial"] for e in events[:-1])
    outputs = [e["output"] for e in events]
    assert all(full.startswith(o) and len(o) < len(n) for o, n in zip(outputs, outputs[1:]))  # cumulative


def test_sync_job_error(raw_emu, client, payload):
    raw_emu.script([JobError(503, "Runner disconnected", "runner_disconnected")])
    r = client.post(f"{raw_emu.run_url}/{APP}", json=payload)
    assert r.status_code == 503 and r.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    assert "x-fal-request-id" in r.headers  # from fal itself, not ingress


# ------------------------------------------------------------------ auth and routing


@pytest.mark.parametrize(
    "header, status",
    [
        (None, 401),
        ("Key wrong", 401),
        ("Bearer emulator-key-id:emulator-key-secret", 401),
        (f"Key {FORBIDDEN_KEY}", 403),
    ],
)
def test_auth(raw_emu, payload, header, status):
    headers = {"Authorization": header} if header else {}
    for method, url in (
        ("POST", f"{raw_emu.url}/{APP}"),
        ("POST", f"{raw_emu.run_url}/{APP}"),
        ("GET", f"{raw_emu.url}/{APP}/requests/x/status"),
    ):
        r = httpx.request(method, url, json=payload, headers=headers)
        assert r.status_code == status and "detail" in r.json()
    assert raw_emu.submissions == []


def test_any_key_mode(payload):
    with FalEmulator(key=None) as raw_emu:
        assert (
            httpx.post(f"{raw_emu.run_url}/{APP}", json=payload, headers={"Authorization": "Key anything"}).status_code
            == 200
        )
        assert httpx.post(f"{raw_emu.run_url}/{APP}", json=payload, headers={"Authorization": "Key"}).status_code == 401
        assert raw_emu.env()["FAL_KEY"]


def test_unknown_app_request_and_route(raw_emu, client, payload):
    r = client.post(f"{raw_emu.url}/fal-ai/nope", json=payload)
    assert r.status_code == 404 and r.json() == {"detail": "Application 'fal-ai/nope' not found"}
    assert client.post(f"{raw_emu.run_url}/fal-ai/nope", json=payload).status_code == 404
    r = client.get(f"{raw_emu.url}/{APP}/requests/does-not-exist/status")
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert client.get(f"{raw_emu.url}/a/b/c/d/e/f").status_code == 404
    with FalEmulator(apps=None) as any_app:
        r = client.post(f"{any_app.run_url}/me/my-app", json=payload, headers={"Authorization": f"Key {any_app.key}"})
        assert r.status_code == 200


# ------------------------------------------------------------------ storage


def test_storage_upload_flow(raw_emu, client, png_bytes):
    assert httpx.post(f"{raw_emu.rest_url}/storage/auth/token", json={}).status_code == 401
    tok = client.post(f"{raw_emu.rest_url}/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={})
    assert tok.status_code == 200
    token = tok.json()
    assert token["token_type"] == "Bearer" and token["base_url"] == raw_emu.cdn_url
    from datetime import datetime, timezone

    assert datetime.fromisoformat(token["expires_at"]) > datetime.now(timezone.utc)  # what fal-client parses
    headers = {
        "Authorization": f"{token['token_type']} {token['token']}",
        "Content-Type": "image/png",
        "X-Fal-File-Name": "red.png",
    }
    r = httpx.post(f"{token['base_url']}/files/upload", content=png_bytes, headers=headers)
    assert r.status_code == 200
    url = r.json()["access_url"]
    assert url.startswith(raw_emu.cdn_url + "/files/") and url.endswith("/red.png") and raw_emu.uploads == [url]
    got = httpx.get(url)  # public, no auth
    assert got.content == png_bytes and got.headers["content-type"] == "image/png"
    bad = httpx.post(f"{raw_emu.cdn_url}/files/upload", content=b"x", headers={"Authorization": f"Key {raw_emu.key}"})
    assert bad.status_code == 401
    assert httpx.get(raw_emu.cdn_url + "/files/nope/x.png").status_code == 404
    # an uploaded URL is a valid image input; a missing or non-image CDN file is not
    ok = client.post(f"{raw_emu.run_url}/{APP}", json={"prompt": "p", "images": [{"image_url": url}]})
    assert ok.status_code == 200 and "digest=" + FalEmulator.digest("p", [url]) in ok.json()["output"]
    junk = httpx.post(f"{raw_emu.cdn_url}/files/upload", content=b"not an image", headers=headers).json()["access_url"]
    for u, t in ((url + "x", "file_download_error"), (junk, "image_load_error")):
        r = client.post(f"{raw_emu.run_url}/{APP}", json={"prompt": "p", "images": [{"image_url": u}]})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == t


# ------------------------------------------------------------------ script


def test_script_answers_in_order_then_fake_model(raw_emu, client, payload):
    raw_emu.script(["first answer", JobError(), "third"])
    outs = []
    for _ in range(4):
        r = client.post(f"{raw_emu.run_url}/{APP}", json=payload)
        outs.append((r.status_code, r.json().get("output")))
    assert outs == [(200, "first answer"), (500, None), (200, "third"), (200, expected_output(payload))]


def test_invalid_input_does_not_consume_script(raw_emu, client, payload):
    raw_emu.script(["only answer"])
    assert client.post(f"{raw_emu.run_url}/{APP}", json={"prompt": "x"}).status_code == 422
    assert client.post(f"{raw_emu.run_url}/{APP}", json=payload).json()["output"] == "only answer"


def test_script_callable_and_hang(raw_emu, client, payload):
    raw_emu.script(
        lambda p: HANG if p["prompt"] == "hang" else (None if p["prompt"] == "model" else p["prompt"].upper())
    )
    assert client.post(f"{raw_emu.run_url}/{APP}", json={**payload, "prompt": "abc"}).json()["output"] == "ABC"
    assert (
        client.post(f"{raw_emu.run_url}/{APP}", json={**payload, "prompt": "model"})
        .json()["output"]
        .startswith("[mantis")
    )
    sub = client.post(f"{raw_emu.url}/{APP}", json={**payload, "prompt": "hang"}).json()
    time.sleep(0.1)  # two service times: a normal job would be done
    assert client.get(sub["status_url"]).json()["status"] == "IN_PROGRESS"


def test_job_error_on_queue_path(raw_emu, client, payload):
    raw_emu.faults = Faults(job_error=1.0)
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    done = wait_done(client, sub)
    assert done["error"] == "Internal Server Error" and done["error_type"] == "runner_server_error"
    res = client.get(sub["response_url"])
    assert res.status_code == 500 and res.headers["x-fal-error-type"] == "runner_server_error"


# ------------------------------------------------------------------ faults


def test_ingress_503_429_500_shapes(raw_emu, client, payload):
    raw_emu.inject("503", route="submit")
    r = client.post(f"{raw_emu.url}/{APP}", json=payload)
    assert r.status_code == 503 and "nginx" in r.text and "x-fal-request-id" not in r.headers
    raw_emu.faults = Faults(retry_after=2)
    raw_emu.inject("429")
    r = client.post(f"{raw_emu.url}/{APP}", json=payload)
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    raw_emu.inject("500", route="status")
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    r = client.get(sub["status_url"])
    assert r.status_code == 500 and "x-fal-request-id" in r.headers
    assert client.get(sub["status_url"]).status_code in (200, 202)  # one-shot: used up
    assert len(raw_emu.submissions) == 1  # faulted submits created no job
    assert [q.fault for q in raw_emu.requests] == ["503", "429", None, "500", None]
    assert [q.status for q in raw_emu.requests][:2] == [503, 429]


@pytest.mark.parametrize("route", ["status", "stream", "result", "cancel"])
@pytest.mark.parametrize("kind", ["500", "429"])
def test_injected_errors_on_a_job_route_carry_that_jobs_id(raw_emu, client, payload, route, kind):
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    url = {
        "status": sub["status_url"],
        "stream": sub["status_url"] + "/stream",
        "result": sub["response_url"],
        "cancel": sub["cancel_url"],
    }[route]
    raw_emu.inject(kind, route=route)
    r = client.request("PUT" if route == "cancel" else "GET", url)
    assert r.status_code == int(kind) and r.headers["x-fal-request-id"] == sub["request_id"]
    raw_emu.inject("503", route=route)  # ingress: never names a job
    assert "x-fal-request-id" not in client.request("PUT" if route == "cancel" else "GET", url).headers


def test_injected_500_reaches_the_caller_with_the_jobs_id(raw_emu):
    from mantis_llm import Conversation, FalBackend, Request

    raw_emu.inject("500", count=10, route="result")
    with FalBackend(api_key=raw_emu.key, max_retries=1, **{n: getattr(raw_emu, n) for n in URL_NAMES}) as b:
        with pytest.raises(errors.BackendError) as ei:
            b.generate(Request(Conversation.from_prompt("hi", ["https://example.com/a.png"])))
    assert ei.value.status_code == 500 and ei.value.request_id == raw_emu.submissions[0].request_id


def test_dropped_connection_and_drop_after_accept(raw_emu, client, payload):
    raw_emu.inject("drop", route="submit")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{raw_emu.url}/{APP}", json=payload)
    assert raw_emu.submissions == [] and raw_emu.requests[-1].status is None
    raw_emu.inject("drop_after_accept")
    with pytest.raises(httpx.RemoteProtocolError):
        client.post(f"{raw_emu.url}/{APP}", json=payload)
    assert len(raw_emu.submissions) == 1  # the job exists although the client never heard of it
    assert client.post(f"{raw_emu.url}/{APP}", json=payload).status_code == 200  # connection pool recovers


def test_cut_sse_streams(raw_emu, client, payload):
    raw_emu.inject("cut", route="stream")
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    with pytest.raises(httpx.RemoteProtocolError), client.stream("GET", sub["status_url"] + "/stream") as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        list(lines)
    assert raw_emu.requests[-1].fault == "cut"
    raw_emu.faults = Faults(cut=1.0)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", f"{raw_emu.run_url}/{APP}/stream", json=payload) as r,
    ):
        lines = r.iter_lines()
        assert json.loads(next(lines)[len("data: ") :])["partial"] is True
        list(lines)
    assert client.get(sub["status_url"]).status_code in (200, 202)  # other routes unaffected


def test_slow_first_byte(raw_emu, client, payload):
    raw_emu.faults = Faults(slow=1.0, slow_delay=0.2, routes=frozenset({"status"}))
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    t0 = time.perf_counter()
    client.get(sub["status_url"])
    assert time.perf_counter() - t0 >= 0.2
    with pytest.raises(httpx.ReadTimeout):
        client.get(sub["status_url"], timeout=0.05)


def _fault_pattern(seed: int) -> list[int]:
    with FalEmulator(faults=Faults(error_500=0.2, error_503=0.2, error_429=0.2, seed=seed, retry_after=0)) as raw_emu:
        with httpx.Client(headers={"Authorization": f"Key {raw_emu.key}"}) as c:
            return [c.get(f"{raw_emu.url}/{APP}/requests/x/status").status_code for _ in range(40)]


def test_faults_reproducible_with_seed():
    a, b, c = _fault_pattern(7), _fault_pattern(7), _fault_pattern(8)
    assert a == b and a != c
    assert {500, 503, 429, 404} <= set(a)  # 404: the unfaulted requests reach the router
    assert 0.35 < sum(s != 404 for s in a) / len(a) < 0.85


def test_faults_limited_to_routes(raw_emu, client, payload):
    raw_emu.faults = {"error_503": 1.0, "routes": frozenset({"result"})}
    sub = client.post(f"{raw_emu.url}/{APP}", json=payload).json()
    wait_done(client, sub)
    assert client.get(sub["response_url"]).status_code == 503
    with pytest.raises(ValueError):
        raw_emu.inject("teapot")


# ------------------------------------------------------------------ recorder, lifecycle, scale


def test_recorder_and_reset(raw_emu, client, payload):
    client.post(
        f"{raw_emu.url}/{APP}", json=payload, params={"fal_webhook": "x"}, headers={"X-Fal-Queue-Priority": "low"}
    )
    rec = raw_emu.requests[0]
    assert (rec.method, rec.path, rec.route, rec.status) == ("POST", f"/{APP}", "submit", 200)
    assert rec.query == {"fal_webhook": "x"} and rec.headers["x-fal-queue-priority"] == "low"
    assert rec.json == payload and rec.time <= time.time()
    sub = raw_emu.submissions[0]
    assert (sub.app, sub.payload, sub.mode) == (APP, payload, "queue")
    raw_emu.script(["x"])
    raw_emu.faults = Faults(error_500=1.0)
    raw_emu.reset()
    assert raw_emu.requests == [] and raw_emu.submissions == [] and raw_emu.faults == Faults()
    assert client.post(f"{raw_emu.run_url}/{APP}", json=payload).json()["output"] == expected_output(payload)


def test_urls_and_env(raw_emu):
    assert raw_emu.url.startswith("http://127.0.0.1:") and raw_emu.queue_url == raw_emu.url
    assert (raw_emu.run_url, raw_emu.rest_url, raw_emu.cdn_url) == (
        raw_emu.url + "/run",
        raw_emu.url + "/rest",
        raw_emu.url + "/cdn",
    )
    assert raw_emu.env() == {
        "FAL_KEY": raw_emu.key,
        "FAL_QUEUE_URL": raw_emu.url,
        "FAL_RUN_URL": raw_emu.run_url,
        "FAL_REST_URL": raw_emu.rest_url,
        "FAL_CDN_URL": raw_emu.cdn_url,
    }
    assert raw_emu.key not in repr(raw_emu)


def test_stop_closes_open_streams_quickly(payload):
    raw_emu = FalEmulator(hang=True).start()
    h = {"Authorization": f"Key {raw_emu.key}"}
    sub = httpx.post(f"{raw_emu.url}/{APP}", json=payload, headers=h).json()
    with httpx.Client(headers=h, timeout=5) as c, c.stream("GET", sub["status_url"] + "/stream") as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t0 = time.perf_counter()
        raw_emu.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            list(lines)
    assert time.perf_counter() - t0 < 1.5
    with pytest.raises(RuntimeError):
        raw_emu.url


async def test_concurrent_async_clients(payload):
    with FalEmulator(service_time=0.1) as raw_emu:
        # several pools: httpcore's pool costs O(requests x connections) CPU, which would dominate
        clients = [httpx.AsyncClient(headers={"Authorization": f"Key {raw_emu.key}"}, timeout=20) for _ in range(5)]
        async with clients[0], clients[1], clients[2], clients[3], clients[4]:

            async def one(i: int) -> None:
                c = clients[i % 5]
                p = {**payload, "prompt": f"question {i}"}
                sub = (await c.post(f"{raw_emu.url}/{APP}", json=p)).json()
                async with c.stream("GET", sub["status_url"] + "/stream") as r:
                    await r.aread()
                res = (await c.get(sub["response_url"])).json()
                assert f"digest={expected_digest(p)}" in res["output"] and res["output"].endswith(f"question {i}")

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(100)))
            wall = time.perf_counter() - t0
        assert len(raw_emu.submissions) == 100 and len({s.request_id for s in raw_emu.submissions}) == 100
        assert wall < 3  # jobs overlap: serially this would take > 10 s


def test_cli_help_and_run():
    out = subprocess.run(
        [sys.executable, "-m", "mantis_llm.emulator", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "--service-time" in out.stdout and "--port" in out.stdout
    proc = subprocess.Popen(
        [sys.executable, "-m", "mantis_llm.emulator", "--key", "k:s"], stdout=subprocess.PIPE, text=True
    )
    try:
        env = dict(proc.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(5))
        assert env["FAL_KEY"] == "k:s"
        r = httpx.post(
            f"{env['FAL_RUN_URL']}/{APP}",
            headers={"Authorization": "Key k:s"},
            json={"prompt": "hi", "images": [{"image_url": "https://a/b.png"}]},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["output"].startswith("[mantis-emulator] 1 image;")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_official_fal_client_speaks_to_it(raw_emu, monkeypatch, png_bytes):
    """fal-client (pointed at the emulator through its URL constants) runs its whole flow."""
    fal_client = pytest.importorskip("fal_client")
    import fal_client.client as fc

    for name, value in (
        ("QUEUE_URL_FORMAT", raw_emu.url + "/"),
        ("RUN_URL_FORMAT", raw_emu.run_url + "/"),
        ("REST_URL", raw_emu.rest_url),
        ("CDN_URL", raw_emu.cdn_url),
    ):
        monkeypatch.setattr(fc, name, value)
    c = fal_client.SyncClient(key=raw_emu.key)
    url = c.upload(png_bytes, "image/png", "red.png")
    assert url in raw_emu.uploads
    p = {"prompt": "describe <image>", "images": [{"image_url": url}]}
    updates: list = []
    assert c.subscribe(APP, p, with_logs=True, on_queue_update=updates.append)["output"] == expected_output(p)
    assert type(updates[-1]).__name__ == "Completed" and updates[-1].metrics["inference_time"] > 0
    assert c.run(APP, p)["output"] == expected_output(p)
    assert list(c.stream(APP, p))[-1] == {"output": expected_output(p), "partial": False}
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        c.submit(APP, {"prompt": "no images"}).get()
    assert err.value.status_code == 422
    # our ingress 503 and 429 are what fal-client recognises as retryable; our 500 is not
    raw_emu.faults = Faults(retry_after=0)
    raw_emu.inject("503", route="submit")
    raw_emu.inject("429", route="status")
    before = len(raw_emu.submissions)
    assert c.subscribe(APP, p)["output"] == expected_output(p)
    assert len(raw_emu.submissions) == before + 1
    raw_emu.inject("500", route="run")
    with pytest.raises(fal_client.FalClientHTTPError) as err:
        c.run(APP, p)
    assert err.value.status_code == 500
