"""FalBackend against the real FalEmulator over HTTP on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import pickle
import signal
import sys
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import SecretStr

from mantis_llm import Conversation, FalBackend, GenerationParams, Image, Request, Turn, errors
from mantis_llm.emulator import FORBIDDEN_KEY, HANG, FalEmulator, Faults, JobError, expected_output
from mantis_llm.images import ImageOptions


@pytest.fixture
def emu():
    with FalEmulator(service_time=0.02) as e:
        yield e


@pytest.fixture
def make(emu):
    made = []

    def _make(**kw):
        kw.setdefault("api_key", emu.key)
        kw.setdefault("timeout", 20)
        for name in ("queue_url", "run_url", "rest_url", "cdn_url"):
            kw.setdefault(name, getattr(emu, name))
        b = FalBackend(**kw)
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()


def req(prompt="What is in the picture?", images=("https://example.com/cat.jpg",), **params) -> Request:
    return Request(Conversation.from_prompt(prompt, list(images)), GenerationParams(**params))


def expected(emu, i=-1) -> str:
    return expected_output(emu.submissions[i].payload)


def routes(emu) -> list[str]:
    return [r.route for r in emu.requests]


# ------------------------------------------------------------------ happy paths


def test_queue_mode_sync_call(emu, make, png_bytes):
    updates = []
    r = make().generate(req(images=[png_bytes, "https://example.com/b.png"]), on_update=updates.append)
    sub = emu.submissions[0]
    assert r.text == expected(emu) and "2 images" in r.text
    assert r.request_id == sub.request_id and r.model == "fal-ai/mantis-llava-7b-v11"
    assert r.usage is None and r.finish_reason is None
    assert sub.payload["images"][0]["image_url"].startswith("data:image/png;base64,")
    assert sub.payload["images"][1] == {"image_url": "https://example.com/b.png"}
    assert set(sub.payload) == {"prompt", "images"}  # nothing the user did not set
    assert r.metrics["status_transport"] == "sse" and r.metrics["retries"] == 0
    assert routes(emu) == ["submit", "stream", "result"]
    assert updates[0].status == "IN_QUEUE" and updates[-1].status == "COMPLETED"
    assert all(u.request_id == sub.request_id for u in updates)


async def test_queue_mode_async_call(emu, make):
    b = make()
    r = await b.agenerate(req("first"))
    r2 = await b.agenerate(req("second"))
    assert r.text == expected(emu, 0) and r2.text == expected(emu, 1)
    assert r.request_id != r2.request_id
    await b.aclose()


def test_several_asyncio_runs_share_one_backend(emu, make):
    b = make()
    texts = [asyncio.run(b.agenerate(req(f"run {i}"))).text for i in range(3)]
    assert texts == [expected(emu, i) for i in range(3)]


def test_close_after_asyncio_run_leaves_no_socket_to_the_gc(emu, make, monkeypatch):
    """Each loop's pooled clients are closed as asyncio.run() shuts the loop down, so the
    sync close() that follows only forgets them: no ResourceWarning from the GC."""
    gc.collect()  # earlier tests' garbage (fal-client leaves sockets in cycles) is not ours
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # warnings raised in __del__ land here
    b = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for i in range(2):  # the second loop also forgets the first loop's pool
            assert asyncio.run(b.agenerate(req(f"run {i}"))).text == expected(emu, i)
        b.close()
        gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_close_leaves_the_pool_of_a_loop_running_in_another_thread(emu, make, monkeypatch):
    gc.collect()
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    b = make()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            on_loop = lambda coro: asyncio.run_coroutine_threadsafe(coro, loop).result(10)  # noqa: E731
            assert on_loop(b.agenerate(req("one"))).text == expected(emu, 0)
            b.close()  # from this thread: the other loop's calls may be in flight, its pool is kept
            assert on_loop(b.agenerate(req("two"))).text == expected(emu, 1)
            on_loop(b.aclose())  # closes it, inside its loop
            gc.collect()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_params_are_sent_only_when_set_and_max_tokens_truncates(emu, make):
    r = make().generate(req(max_tokens=3, temperature=0.5, top_p=0.9, seed=7))
    payload = emu.submissions[0].payload
    assert {k: payload[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
    }
    assert "max_new_tokens" not in payload
    assert len(r.text.split()) == 3


def test_stop_sequences_trim_client_side(emu, make):
    r = make().generate(req(stop=["digest"]))
    full = expected(emu)
    assert r.text == full[: full.index("digest")] and r.finish_reason == "stop"


def test_sync_mode_posts_once_to_the_run_endpoint(emu, make):
    b = make(mode="sync")
    updates = []
    r = b.generate(req(), on_update=updates.append)
    assert r.text == expected(emu) and r.request_id == emu.submissions[0].request_id
    assert routes(emu) == ["run"] and emu.submissions[0].mode == "sync" and updates == []


def test_stream_mode_yields_deltas(emu, make):
    emu.script(["one two three four five six seven eight nine ten eleven twelve"])
    chunks = list(make(mode="stream").stream(req()))
    text = "".join(c.text for c in chunks)
    assert text == "one two three four five six seven eight nine ten eleven twelve"
    assert len([c for c in chunks if c.text]) >= 3  # really incremental
    assert all(c.response is None for c in chunks[:-1])
    assert chunks[-1].response.text == text and chunks[-1].response.request_id == emu.submissions[0].request_id
    assert routes(emu) == ["run_stream"]


async def test_stream_mode_async_with_stop(emu, make):
    emu.script(["alpha beta gamma delta epsilon zeta eta theta"])
    b = make(mode="stream")
    chunks = [c async for c in b.astream(req(stop=["delta"]))]
    assert "".join(c.text for c in chunks) == "alpha beta gamma "
    assert chunks[-1].response.finish_reason == "stop"
    # generate() in stream mode joins the deltas
    emu.script(["x y z"])
    assert (await b.agenerate(req())).text == "x y z"


def test_queue_mode_stream_is_one_chunk(emu, make):
    chunks = list(make().stream(req()))
    assert len(chunks) == 1 and chunks[0].text == expected(emu) and chunks[0].response.text == expected(emu)


def test_updates_carry_logs_once_each(emu, make):
    emu.service_time = 0.1
    updates = []
    make(with_logs=True).generate(req(), on_update=updates.append)
    messages = [l["message"] for u in updates for l in u.logs]
    n = len(expected(emu).split())
    assert messages == ["Request queued", "Loading 1 image", "Generating", f"Generated {n} tokens"]
    assert [u.status for u in updates][-1] == "COMPLETED"
    assert updates[-1].metrics["inference_time"] > 0


def test_polling_fallback_when_the_stream_fails(emu, make):
    emu.inject("500", route="stream")
    emu.service_time = 0.1
    updates = []
    r = make(with_logs=True).generate(req(), on_update=updates.append)
    assert r.text == expected(emu) and r.metrics["status_transport"] == "poll"
    assert routes(emu).count("status") >= 2
    messages = [l["message"] for u in updates for l in u.logs]
    assert len(messages) == len(set(messages)) and f"Generated {len(r.text.split())} tokens" in messages
    assert r.metrics["status_requests"] <= 12  # adaptive interval, not a busy loop


def test_dropped_status_stream_falls_back_to_polling(emu, make):
    emu.inject("drop", route="stream")
    r = make().generate(req())
    assert r.text == expected(emu) and r.metrics["status_transport"] == "poll"


async def test_queue_positions_reach_on_update(emu, make):
    emu.concurrency, emu.service_time = 1, 0.1
    b = make()
    seen: list[list] = [[], [], []]
    await asyncio.gather(*(b.agenerate(req(f"q{i}"), on_update=lambda u, i=i: seen[i].append(u)) for i in range(3)))
    positions = [[u.queue_position for u in s if u.status == "IN_QUEUE" and u.queue_position is not None] for s in seen]
    assert max(max(p) for p in positions if p) >= 1
    for p in positions:
        assert p == sorted(p, reverse=True)  # only ever moves forward
    assert all(s[-1].status == "COMPLETED" for s in seen)


def test_batches_keep_order(emu, make):
    b = make()
    prompts = [f"question number {i}" for i in range(5)]
    out = b.generate_batch([req(p) for p in prompts])
    assert [r.text.endswith(p) for r, p in zip(out, prompts)] == [True] * 5
    assert len(emu.submissions) == 5


async def test_async_batch_keeps_order(emu, make):
    b = make()
    prompts = [f"async question {i}" for i in range(8)]
    out = await b.agenerate_batch([req(p) for p in prompts])
    assert all(r.text.endswith(p) for r, p in zip(out, prompts))


# ------------------------------------------------------------------ errors


def test_bad_key_is_an_authentication_error_without_the_key(emu, make):
    with pytest.raises(errors.AuthenticationError) as ei:
        make(api_key="wrong-key-value-123").generate(req())
    assert ei.value.status_code == 401 and "FAL_KEY" in str(ei.value)
    assert "wrong-key-value-123" not in str(ei.value) + repr(ei.value)
    with pytest.raises(errors.AuthenticationError) as ei:
        make(api_key=FORBIDDEN_KEY).generate(req())
    assert ei.value.status_code == 403 and FORBIDDEN_KEY not in str(ei.value)


def test_unknown_endpoint(make):
    with pytest.raises(errors.EndpointNotFoundError, match="retired") as ei:
        make(endpoint="fal-ai/no-such-app").generate(req())
    assert ei.value.status_code == 404


@pytest.mark.parametrize("mode", ["queue", "sync"])
def test_validation_error_has_field_detail(emu, make, mode):
    with pytest.raises(errors.InvalidRequestError) as ei:
        make(mode=mode, extra_input={"max_tokens": "many"}).generate(req())
    assert ei.value.status_code == 422 and "max_tokens: Input should be a valid integer" in str(ei.value)
    assert ei.value.detail[0]["loc"] == ["body", "max_tokens"]
    if mode == "queue":
        assert ei.value.request_id == emu.submissions[0].request_id


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
def test_failed_job_is_a_backend_error_with_its_type(emu, make, mode):
    emu.script([JobError(503, "Runner disconnected", "runner_disconnected")])
    with pytest.raises(errors.BackendError) as ei:
        make(mode=mode).generate(req())
    assert "runner_disconnected" in str(ei.value) and "Runner disconnected" in str(ei.value)
    assert ei.value.request_id == emu.submissions[0].request_id
    assert len(emu.submissions) == 1  # a job failure is final: not resubmitted
    assert emu.cancelled == []  # a finished job is not cancelled


def test_result_5xx_is_retried_after_a_clean_completion_only(emu, make):
    # The job completed without error: a 500 or a dropped connection on the (idempotent)
    # result GET is retried, and the job is neither resubmitted nor cancelled.
    b = make()
    emu.inject("500", route="result")
    emu.inject("drop", route="result")
    r = b.generate(req())
    assert r.text == expected(emu) and r.metrics["retries"] == 2
    assert routes(emu).count("result") == 3 and len(emu.submissions) == 1 and emu.cancelled == []
    # The job completed with an error: the result's error body is its failure, read once.
    emu.script([JobError(500, "CUDA out of memory", "runner_server_error")])
    with pytest.raises(errors.BackendError, match="CUDA out of memory") as ei:
        b.generate(req("second"))
    assert ei.value.status_code == 500 and ei.value.request_id == emu.submissions[-1].request_id
    assert routes(emu).count("result") == 4
    # ... and an injected 500 in its place is not retried either.
    emu.script([JobError(500, "CUDA out of memory", "runner_server_error")])
    emu.inject("500", route="result")
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req("third"))
    assert ei.value.status_code == 500 and routes(emu).count("result") == 5
    assert len(emu.submissions) == 3


def test_rate_limit_after_retries(emu, make):
    emu.faults = Faults(error_429=1.0, retry_after=0.01, routes=frozenset({"submit"}))
    with pytest.raises(errors.RateLimitError) as ei:
        make(max_retries=2).generate(req())
    assert ei.value.status_code == 429 and routes(emu).count("submit") == 3 and emu.submissions == []


# ------------------------------------------------------------------ retries


def test_retry_after_is_honoured_and_submit_retried_when_rejected(emu, make):
    emu.faults = Faults(retry_after=0.15)
    emu.inject("429", route="submit")
    emu.inject("503", route="submit")
    t0 = time.perf_counter()
    r = make().generate(req())
    assert time.perf_counter() - t0 >= 0.15
    assert r.text == expected(emu) and r.metrics["retries"] == 2
    assert routes(emu).count("submit") == 3 and len(emu.submissions) == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_stream_post_is_retried_only_when_rejected(emu, make, use_async):
    emu.faults = Faults(retry_after=0.15)
    emu.inject("429", route="run_stream")
    emu.inject("503", route="run_stream")
    emu.script(["a b c d e f"])
    b = make(mode="stream")
    t0 = time.perf_counter()
    chunks = [c async for c in b.astream(req())] if use_async else list(b.stream(req()))
    assert time.perf_counter() - t0 >= 0.15  # Retry-After honoured
    assert "".join(c.text for c in chunks) == "a b c d e f"
    assert chunks[-1].response.metrics["retries"] == 2
    assert routes(emu) == ["run_stream"] * 3 and len(emu.submissions) == 1
    emu.inject("500", route="run_stream")  # fal's own 500 on a POST: the job may exist, not resent
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req())
    assert ei.value.status_code == 500 and "Internal Server Error" in str(ei.value)
    assert routes(emu).count("run_stream") == 4
    with pytest.raises(errors.InvalidRequestError) as ei:  # the 422 body, read from the stream
        make(mode="stream", extra_input={"temperature": 5}).generate(req())
    assert ei.value.status_code == 422 and "temperature" in str(ei.value)


def test_reads_are_retried_through_a_fault_storm_without_duplicate_jobs(emu, make):
    emu.faults = Faults(error_503=0.3, drop=0.2, routes=frozenset({"stream", "status", "result"}), seed=3)
    b = make(max_retries=8)
    out = b.generate_batch([req(f"storm {i}") for i in range(6)])
    assert len(emu.submissions) == 6
    by_id = {s.request_id: s for s in emu.submissions}
    for r in out:
        assert r.text == expected_output(by_id[r.request_id].payload)
    assert any(r.fault for r in emu.requests)  # faults really happened


def test_status_5xx_are_retried_when_polling(emu, make):
    emu.inject("500", route="stream")
    emu.inject("500", count=2, route="status")
    r = make().generate(req())
    assert r.text == expected(emu) and r.metrics["retries"] == 2


@pytest.mark.parametrize("fault, jobs", [("drop", 0), ("drop_after_accept", 1)])
def test_submit_lost_in_flight_is_not_resent(emu, make, fault, jobs):
    emu.inject(fault, route="submit")
    with pytest.raises(errors.BackendError, match="not resent"):
        make().generate(req())
    assert routes(emu).count("submit") == 1 and len(emu.submissions) == jobs


# ------------------------------------------------------------------ timeouts and cancellation


def test_timeout_cancels_the_job(emu, make):
    emu.script([HANG])
    t0 = time.perf_counter()
    with pytest.raises(errors.RequestTimeoutError) as ei:
        make(timeout=0.4).generate(req())
    assert time.perf_counter() - t0 < 1.5
    rid = emu.submissions[0].request_id
    assert ei.value.request_id == rid and rid in str(ei.value)
    assert emu.cancelled == [rid] and emu.job_status(rid) == "COMPLETED"


async def test_async_timeout_while_polling_cancels(emu, make):
    emu.script([HANG])
    emu.inject("500", route="stream")
    with pytest.raises(errors.RequestTimeoutError):
        await make(timeout=0.3).agenerate(req())
    assert emu.cancelled == [emu.submissions[0].request_id]


async def test_asyncio_cancellation_cancels_the_job(emu, make):
    emu.script([HANG])
    task = asyncio.ensure_future(make().agenerate(req()))
    while not emu.submissions:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert emu.cancelled == [emu.submissions[0].request_id]


def test_keyboard_interrupt_cancels_the_job_and_propagates(emu, make):
    emu.script([HANG])
    main = threading.get_ident()

    def interrupt():
        while not emu.submissions:
            time.sleep(0.01)
        time.sleep(0.1)  # the backend now blocks reading the status stream
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        make().generate(req())
    assert emu.cancelled == [emu.submissions[0].request_id]


def test_stream_timeout_drops_the_run(emu, make):
    emu.script([HANG])
    with pytest.raises(errors.RequestTimeoutError):
        list(make(mode="stream", timeout=0.3).stream(req()))


# ------------------------------------------------------------------ uploads


def test_large_images_are_uploaded_once(emu, make, png_bytes):
    b = make(upload_threshold=200)
    conv = Conversation([Turn("user", [Image(png_bytes), "compare with", Image(png_bytes)])])
    r = b.generate(Request(conv))
    urls = [i["image_url"] for i in emu.submissions[0].payload["images"]]
    assert urls[0] == urls[1] and urls[0].startswith(emu.cdn_url + "/files/")
    assert "2 images" in r.text and r.metrics["uploads"] == 1
    b.generate(Request(conv))  # same content again: cached
    assert routes(emu).count("upload") == 1 and routes(emu).count("token") == 1
    upload = next(x for x in emu.requests if x.route == "upload")
    assert upload.headers["authorization"].startswith("Bearer ") and emu.key not in upload.headers["authorization"]
    assert upload.headers["content-type"] == "image/png"
    assert httpx.get(urls[0]).content == png_bytes


async def test_async_upload_and_small_images_inline(emu, make, png_bytes, make_image):
    b = make(upload_threshold=len(png_bytes) * 2)  # png fits inline, the bigger one does not
    large = make_image(400, 300, (10, 120, 200), "PNG")
    await b.agenerate(req(images=[png_bytes, large]))
    urls = [i["image_url"] for i in emu.submissions[0].payload["images"]]
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith(emu.cdn_url)
    assert routes(emu).count("upload") == 1


def test_bad_image_is_an_image_error_before_anything_is_sent(emu, make):
    with pytest.raises(errors.ImageError, match="image 1 of message 1"):
        make().generate(req(images=[b"not an image at all"]))
    assert emu.requests == []


# ------------------------------------------------------------------ the key stays ours


class _Other(BaseHTTPRequestHandler):
    seen: list = []
    body = b""

    def do_GET(self):
        type(self).seen.append(dict(self.headers))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a):
        pass


@pytest.fixture
def other_host(png_bytes):
    _Other.seen, _Other.body = [], png_bytes
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_image_urls_are_passed_not_fetched(emu, make, other_host):
    url = other_host + "/cat.png"
    make().generate(req(images=[url]))
    assert emu.submissions[0].payload["images"] == [{"image_url": url}]
    assert _Other.seen == []


def test_fetch_remote_never_sends_the_key(emu, make, other_host, png_bytes):
    make(image_options=ImageOptions(fetch_remote=True)).generate(req(images=[other_host + "/cat.png"]))
    assert len(_Other.seen) == 1 and not any(k.lower() == "authorization" for k in _Other.seen[0])
    assert emu.submissions[0].payload["images"][0]["image_url"].startswith("data:image/png")


def test_status_urls_on_another_host_are_not_followed(emu, make):
    # The emulator answers with 127.0.0.1 URLs; configured as "localhost", they are another host.
    local = emu.url.replace("127.0.0.1", "localhost")
    r = make(queue_url=local, run_url=local + "/run", rest_url=local + "/rest").generate(req())
    assert r.text == expected(emu)
    assert {x.headers["host"].split(":")[0] for x in emu.requests} == {"localhost"}


def test_key_never_leaks(emu, make, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "mantis_llm", "mantis_llm.fal"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    b = make()
    b.generate(req())
    emu.script([JobError(500, "boom", "runner_server_error")])
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req())
    texts = [repr(b), str(b.__dict__), str(ei.value), repr(ei.value), caplog.text, str(b.api_key)]
    loggers = {r.name.split(".")[0] for r in caplog.records} | {r.name for r in caplog.records}
    assert {"mantis_llm.fal", "httpx", "httpcore"} <= loggers  # DEBUG lines really were written
    assert all(emu.key not in t for t in texts)
    with pytest.raises(TypeError):
        pickle.dumps(b)
    assert copy.deepcopy(b) is b  # frameworks deep-copy models: share the pool, never the key in a pickle
    assert b.api_key.get_secret_value() == emu.key


# ------------------------------------------------------------------ configuration


def test_env_configures_everything(emu, monkeypatch):
    for k, v in emu.env().items():
        monkeypatch.setenv(k, v)
    with FalBackend() as b:
        assert (b.queue_url, b.run_url, b.rest_url, b.cdn_url) == (
            emu.queue_url,
            emu.run_url,
            emu.rest_url,
            emu.cdn_url,
        )
        assert b.generate(req()).text == expected(emu)
    monkeypatch.delenv("FAL_KEY")
    key_id, secret = emu.key.split(":")
    monkeypatch.setenv("FAL_KEY_ID", key_id)
    monkeypatch.setenv("FAL_KEY_SECRET", secret)
    with FalBackend(mode="sync") as b:
        assert b.generate(req()).text == expected(emu)


def test_missing_key_and_bad_options(monkeypatch):
    for k in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(errors.ConfigurationError, match="export FAL_KEY="):
        FalBackend()
    with pytest.raises(errors.ConfigurationError):
        FalBackend(api_key="k", mode="fast")
    with pytest.raises(errors.ConfigurationError):
        FalBackend(api_key="k", queue_url="ftp://x")
    b = FalBackend(api_key="k", image_short_side=336)
    assert b.image_options.short_side == 336 and b.queue_url == "https://queue.fal.run"


@pytest.mark.parametrize(
    "name, value",
    [
        ("api_key", 12345),
        ("api_key", b"key:secret"),
        ("api_key", ""),
        ("api_key", SecretStr("  ")),
        ("queue_url", 8080),
        ("run_url", b"https://fal.run"),
        ("rest_url", ["https://rest.fal.ai"]),
        ("cdn_url", 1.5),
        ("timeout", "30"),
        ("timeout", True),
        ("timeout", 0),
        ("timeout", float("inf")),
        ("timeout", float("nan")),
        ("max_retries", 2.0),
        ("max_retries", True),
        ("extra_input", [("seed", 1)]),
        ("extra_input", {1: "x"}),
        ("upload_threshold", "1MB"),
        ("upload_threshold", 0),
        ("upload_threshold", False),
        ("max_concurrency", 0),
        ("max_concurrency", 4.0),
        ("max_concurrency", True),
        ("image_options", {"short_side": 336}),
        ("client", httpx.AsyncClient),
        ("async_client", "client"),
        ("with_logs", "yes"),
        ("with_logs", 1),
        ("mode", ["queue"]),
    ],
)
def test_wrongly_typed_options_name_the_parameter(name, value):
    kw = {"api_key": "key-value-123", name: value}
    if name == "client":
        kw[name] = value()  # an AsyncClient where a Client belongs
    with pytest.raises(errors.ConfigurationError) as ei:
        FalBackend(**kw)
    assert str(ei.value).startswith(name)
    assert "key-value-123" not in str(ei.value) and "secret" not in str(ei.value)


def test_image_options_fetch_remote_must_be_a_bool():
    with pytest.raises(errors.ConfigurationError, match="ImageOptions.fetch_remote"):
        ImageOptions(fetch_remote="x")
    with pytest.raises(errors.ConfigurationError, match="ImageOptions.fetch_timeout"):
        ImageOptions(fetch_timeout=True)
    assert ImageOptions(fetch_remote=True).fetch_remote is True


@pytest.mark.parametrize("bad", ["What is in the picture?", {"prompt": "hi"}, None])
async def test_anything_but_a_request_is_an_invalid_request_error(emu, make, bad):
    b = make()
    calls = [lambda: b.generate(bad), lambda: list(b.stream(bad)), lambda: b.generate_batch([req(), bad])]
    for call in calls:
        with pytest.raises(errors.InvalidRequestError, match=r"expects a mantis_llm\.types\.Request"):
            call()
    with pytest.raises(errors.InvalidRequestError, match="mantis_llm.types.Request"):
        await b.agenerate(bad)
    with pytest.raises(errors.InvalidRequestError, match="mantis_llm.types.Request"):
        async for _ in b.astream(bad):
            pass
    assert emu.submissions[:1] and all(s.payload["prompt"] for s in emu.submissions)  # good ones ran


def test_caller_clients_are_used_and_left_open(emu, make):
    hits = []
    with httpx.Client(event_hooks={"request": [hits.append]}) as c:
        b = make(client=c)
        b.generate(req())
        b.close()
        assert not c.is_closed and len(hits) == 3


async def test_caller_async_client_is_used_and_left_open(emu, make):
    async with httpx.AsyncClient() as c:
        b = make(async_client=c, mode="sync")
        await b.agenerate(req())
        await b.aclose()
        assert not c.is_closed
