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

import httpx
import pytest
from pydantic import SecretStr

from mantis_llm import Conversation, FalBackend, GenerationParams, Image, Request, Turn, errors
from mantis_llm.emulator import FORBIDDEN_KEY, HANG, Faults, JobError, expected_output
from mantis_llm.images import ImageOptions


def req(prompt="What is in the picture?", images=("https://example.com/cat.jpg",), **params) -> Request:
    return Request(Conversation.from_prompt(prompt, list(images)), GenerationParams(**params))


def expected(fresh_emu, i=-1) -> str:
    return expected_output(fresh_emu.submissions[i].payload)


def routes(fresh_emu) -> list[str]:
    return [r.route for r in fresh_emu.requests]


# ------------------------------------------------------------------ happy paths


def test_queue_mode_sync_call(fresh_emu, make, png_bytes):
    updates = []
    r = make().generate(req(images=[png_bytes, "https://example.com/b.png"]), on_update=updates.append)
    sub = fresh_emu.submissions[0]
    assert r.text == expected(fresh_emu) and "2 images" in r.text
    assert r.request_id == sub.request_id and r.model == "fal-ai/mantis-llava-7b-v11"
    assert r.usage is None and r.finish_reason is None
    assert sub.payload["images"][0]["image_url"].startswith("data:image/png;base64,")
    assert sub.payload["images"][1] == {"image_url": "https://example.com/b.png"}
    assert set(sub.payload) == {"prompt", "images"}  # nothing the user did not set
    assert r.metrics["status_transport"] == "sse" and r.metrics["retries"] == 0
    assert routes(fresh_emu) == ["submit", "stream", "result"]
    assert updates[0].status == "IN_QUEUE" and updates[-1].status == "COMPLETED"
    assert all(u.request_id == sub.request_id for u in updates)


async def test_queue_mode_async_call(fresh_emu, make):
    b = make()
    r = await b.agenerate(req("first"))
    r2 = await b.agenerate(req("second"))
    assert r.text == expected(fresh_emu, 0) and r2.text == expected(fresh_emu, 1)
    assert r.request_id != r2.request_id
    await b.aclose()


def test_several_asyncio_runs_share_one_backend(fresh_emu, make):
    b = make()
    texts = [asyncio.run(b.agenerate(req(f"run {i}"))).text for i in range(3)]
    assert texts == [expected(fresh_emu, i) for i in range(3)]


def test_close_after_asyncio_run_leaves_no_socket_to_the_gc(fresh_emu, make, monkeypatch):
    """Each loop's pooled clients are closed as asyncio.run() shuts the loop down, so the
    sync close() that follows only forgets them: no ResourceWarning from the GC."""
    gc.collect()  # earlier tests' garbage (fal-client leaves sockets in cycles) is not ours
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # warnings raised in __del__ land here
    b = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        for i in range(2):  # the second loop also forgets the first loop's pool
            assert asyncio.run(b.agenerate(req(f"run {i}"))).text == expected(fresh_emu, i)
        b.close()
        gc.collect()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_close_leaves_the_pool_of_a_loop_running_in_another_thread(fresh_emu, make, monkeypatch):
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
            assert on_loop(b.agenerate(req("one"))).text == expected(fresh_emu, 0)
            b.close()  # from this thread: the other loop's calls may be in flight, its pool is kept
            assert on_loop(b.agenerate(req("two"))).text == expected(fresh_emu, 1)
            on_loop(b.aclose())  # closes it, inside its loop
            gc.collect()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [repr(u.exc_value) for u in unraisable] == []


def test_params_are_sent_only_when_set_and_max_tokens_truncates(fresh_emu, make):
    r = make().generate(req(max_tokens=3, temperature=0.5, top_p=0.9, seed=7))
    payload = fresh_emu.submissions[0].payload
    assert {k: payload[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
    }
    assert "max_new_tokens" not in payload
    assert len(r.text.split()) == 3


def test_stop_sequences_trim_client_side(fresh_emu, make):
    r = make().generate(req(stop=["digest"]))
    full = expected(fresh_emu)
    assert r.text == full[: full.index("digest")] and r.finish_reason == "stop"


def test_sync_mode_posts_once_to_the_run_endpoint(fresh_emu, make):
    b = make(mode="sync")
    updates = []
    r = b.generate(req(), on_update=updates.append)
    assert r.text == expected(fresh_emu) and r.request_id == fresh_emu.submissions[0].request_id
    assert routes(fresh_emu) == ["run"] and fresh_emu.submissions[0].mode == "sync" and updates == []


def test_stream_mode_yields_deltas(fresh_emu, make):
    fresh_emu.script(["one two three four five six seven eight nine ten eleven twelve"])
    chunks = list(make(mode="stream").stream(req()))
    text = "".join(c.text for c in chunks)
    assert text == "one two three four five six seven eight nine ten eleven twelve"
    assert len([c for c in chunks if c.text]) >= 3  # really incremental
    assert all(c.response is None for c in chunks[:-1])
    assert chunks[-1].response.text == text and chunks[-1].response.request_id == fresh_emu.submissions[0].request_id
    assert routes(fresh_emu) == ["run_stream"]


async def test_stream_mode_async_with_stop(fresh_emu, make):
    fresh_emu.script(["alpha beta gamma delta epsilon zeta eta theta"])
    b = make(mode="stream")
    chunks = [c async for c in b.astream(req(stop=["delta"]))]
    assert "".join(c.text for c in chunks) == "alpha beta gamma "
    assert chunks[-1].response.finish_reason == "stop"
    # generate() in stream mode joins the deltas
    fresh_emu.script(["x y z"])
    assert (await b.agenerate(req())).text == "x y z"


def test_queue_mode_stream_is_one_chunk(fresh_emu, make):
    chunks = list(make(mode="queue").stream(req()))
    assert len(chunks) == 1 and chunks[0].text == expected(fresh_emu) and chunks[0].response.text == expected(fresh_emu)


def test_updates_carry_logs_once_each(fresh_emu, make):
    fresh_emu.service_time = 0.1
    updates = []
    make(with_logs=True).generate(req(), on_update=updates.append)
    messages = [l["message"] for u in updates for l in u.logs]
    n = len(expected(fresh_emu).split())
    assert messages == ["Request queued", "Loading 1 image", "Generating", f"Generated {n} tokens"]
    assert [u.status for u in updates][-1] == "COMPLETED"
    assert updates[-1].metrics["inference_time"] > 0


def test_polling_fallback_when_the_stream_fails(fresh_emu, make):
    fresh_emu.inject("500", route="stream")
    fresh_emu.service_time = 0.1
    updates = []
    r = make(with_logs=True).generate(req(), on_update=updates.append)
    assert r.text == expected(fresh_emu) and r.metrics["status_transport"] == "poll"
    assert routes(fresh_emu).count("status") >= 2
    messages = [l["message"] for u in updates for l in u.logs]
    assert len(messages) == len(set(messages)) and f"Generated {len(r.text.split())} tokens" in messages
    assert r.metrics["status_requests"] <= 12  # adaptive interval, not a busy loop


def test_dropped_status_stream_falls_back_to_polling(fresh_emu, make):
    fresh_emu.inject("drop", route="stream")
    r = make().generate(req())
    assert r.text == expected(fresh_emu) and r.metrics["status_transport"] == "poll"


async def test_queue_positions_reach_on_update(fresh_emu, make):
    fresh_emu.concurrency, fresh_emu.service_time = 1, 0.1
    b = make()
    seen: list[list] = [[], [], []]
    await asyncio.gather(*(b.agenerate(req(f"q{i}"), on_update=lambda u, i=i: seen[i].append(u)) for i in range(3)))
    positions = [[u.queue_position for u in s if u.status == "IN_QUEUE" and u.queue_position is not None] for s in seen]
    assert max(max(p) for p in positions if p) >= 1
    for p in positions:
        assert p == sorted(p, reverse=True)  # only ever moves forward
    assert all(s[-1].status == "COMPLETED" for s in seen)


def test_batches_keep_order(fresh_emu, make):
    b = make()
    prompts = [f"question number {i}" for i in range(5)]
    out = b.generate_batch([req(p) for p in prompts])
    assert [r.text.endswith(p) for r, p in zip(out, prompts)] == [True] * 5
    assert len(fresh_emu.submissions) == 5


async def test_async_batch_keeps_order(fresh_emu, make):
    b = make()
    prompts = [f"async question {i}" for i in range(8)]
    out = await b.agenerate_batch([req(p) for p in prompts])
    assert all(r.text.endswith(p) for r, p in zip(out, prompts))


# ------------------------------------------------------------------ errors


def test_bad_key_is_an_authentication_error_without_the_key(fresh_emu, make):
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
def test_validation_error_has_field_detail(fresh_emu, make, mode):
    with pytest.raises(errors.InvalidRequestError) as ei:
        make(mode=mode, extra_input={"max_tokens": "many"}).generate(req())
    assert ei.value.status_code == 422 and "max_tokens: Input should be a valid integer" in str(ei.value)
    assert ei.value.detail[0]["loc"] == ["body", "max_tokens"]
    if mode == "queue":
        assert ei.value.request_id == fresh_emu.submissions[0].request_id


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
def test_failed_job_is_a_backend_error_with_its_type(fresh_emu, make, mode):
    fresh_emu.script([JobError(503, "Runner disconnected", "runner_disconnected")])
    with pytest.raises(errors.BackendError) as ei:
        make(mode=mode).generate(req())
    assert "runner_disconnected" in str(ei.value) and "Runner disconnected" in str(ei.value)
    assert ei.value.request_id == fresh_emu.submissions[0].request_id
    assert len(fresh_emu.submissions) == 1  # a job failure is final: not resubmitted
    assert fresh_emu.cancelled == []  # a finished job is not cancelled


def test_result_5xx_is_retried_after_a_clean_completion_only(fresh_emu, make):
    # The job completed without error: a 500 or a dropped connection on the (idempotent)
    # result GET is retried, and the job is neither resubmitted nor cancelled.
    b = make()
    fresh_emu.inject("500", route="result")
    fresh_emu.inject("drop", route="result")
    r = b.generate(req())
    assert r.text == expected(fresh_emu) and r.metrics["retries"] == 2
    assert routes(fresh_emu).count("result") == 3 and len(fresh_emu.submissions) == 1 and fresh_emu.cancelled == []
    # The job completed with an error: the result's error body is its failure, read once.
    fresh_emu.script([JobError(500, "CUDA out of memory", "runner_server_error")])
    with pytest.raises(errors.BackendError, match="CUDA out of memory") as ei:
        b.generate(req("second"))
    assert ei.value.status_code == 500 and ei.value.request_id == fresh_emu.submissions[-1].request_id
    assert routes(fresh_emu).count("result") == 4
    # ... and an injected 500 in its place is not retried either.
    fresh_emu.script([JobError(500, "CUDA out of memory", "runner_server_error")])
    fresh_emu.inject("500", route="result")
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req("third"))
    assert ei.value.status_code == 500 and routes(fresh_emu).count("result") == 5
    assert len(fresh_emu.submissions) == 3


def test_rate_limit_after_retries(fresh_emu, make):
    fresh_emu.faults = Faults(error_429=1.0, retry_after=0.01, routes=frozenset({"submit"}))
    with pytest.raises(errors.RateLimitError) as ei:
        make(max_retries=2).generate(req())
    assert ei.value.status_code == 429 and routes(fresh_emu).count("submit") == 3 and fresh_emu.submissions == []


# ------------------------------------------------------------------ retries


def test_retry_after_is_honoured_and_submit_retried_when_rejected(fresh_emu, make):
    fresh_emu.faults = Faults(retry_after=0.15)
    fresh_emu.inject("429", route="submit")
    fresh_emu.inject("503", route="submit")
    t0 = time.perf_counter()
    r = make().generate(req())
    assert time.perf_counter() - t0 >= 0.15
    assert r.text == expected(fresh_emu) and r.metrics["retries"] == 2
    assert routes(fresh_emu).count("submit") == 3 and len(fresh_emu.submissions) == 1


@pytest.mark.parametrize("use_async", [False, True])
async def test_stream_post_is_retried_only_when_rejected(fresh_emu, make, use_async):
    fresh_emu.faults = Faults(retry_after=0.15)
    fresh_emu.inject("429", route="run_stream")
    fresh_emu.inject("503", route="run_stream")
    fresh_emu.script(["a b c d e f"])
    b = make(mode="stream")
    t0 = time.perf_counter()
    chunks = [c async for c in b.astream(req())] if use_async else list(b.stream(req()))
    assert time.perf_counter() - t0 >= 0.15  # Retry-After honoured
    assert "".join(c.text for c in chunks) == "a b c d e f"
    assert chunks[-1].response.metrics["retries"] == 2
    assert routes(fresh_emu) == ["run_stream"] * 3 and len(fresh_emu.submissions) == 1
    fresh_emu.inject("500", route="run_stream")  # fal's own 500 on a POST: the job may exist, not resent
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req())
    assert ei.value.status_code == 500 and "Internal Server Error" in str(ei.value)
    assert routes(fresh_emu).count("run_stream") == 4
    with pytest.raises(errors.InvalidRequestError) as ei:  # the 422 body, read from the stream
        make(mode="stream", extra_input={"temperature": 5}).generate(req())
    assert ei.value.status_code == 422 and "temperature" in str(ei.value)


def test_reads_are_retried_through_a_fault_storm_without_duplicate_jobs(fresh_emu, make):
    fresh_emu.faults = Faults(error_503=0.3, drop=0.2, routes=frozenset({"stream", "status", "result"}), seed=3)
    b = make(max_retries=8)
    out = b.generate_batch([req(f"storm {i}") for i in range(6)])
    assert len(fresh_emu.submissions) == 6
    by_id = {s.request_id: s for s in fresh_emu.submissions}
    for r in out:
        assert r.text == expected_output(by_id[r.request_id].payload)
    assert any(r.fault for r in fresh_emu.requests)  # faults really happened


def test_status_5xx_are_retried_when_polling(fresh_emu, make):
    fresh_emu.inject("500", route="stream")
    fresh_emu.inject("500", count=2, route="status")
    r = make().generate(req())
    assert r.text == expected(fresh_emu) and r.metrics["retries"] == 2


@pytest.mark.parametrize("fault, jobs", [("drop", 0), ("drop_after_accept", 1)])
def test_submit_lost_in_flight_is_not_resent(fresh_emu, make, fault, jobs):
    fresh_emu.inject(fault, route="submit")
    with pytest.raises(errors.BackendError, match="not resent"):
        make().generate(req())
    assert routes(fresh_emu).count("submit") == 1 and len(fresh_emu.submissions) == jobs


# ------------------------------------------------------------------ timeouts and cancellation


def test_timeout_cancels_the_job(fresh_emu, make):
    fresh_emu.script([HANG])
    t0 = time.perf_counter()
    with pytest.raises(errors.RequestTimeoutError) as ei:
        make(timeout=0.4).generate(req())
    assert time.perf_counter() - t0 < 1.5
    rid = fresh_emu.submissions[0].request_id
    assert ei.value.request_id == rid and rid in str(ei.value)
    assert fresh_emu.cancelled == [rid] and fresh_emu.job_status(rid) == "COMPLETED"


async def test_async_timeout_while_polling_cancels(fresh_emu, make):
    fresh_emu.script([HANG])
    fresh_emu.inject("500", route="stream")
    with pytest.raises(errors.RequestTimeoutError):
        await make(timeout=0.3).agenerate(req())
    assert fresh_emu.cancelled == [fresh_emu.submissions[0].request_id]


async def test_asyncio_cancellation_cancels_the_job(fresh_emu, make):
    fresh_emu.script([HANG])
    task = asyncio.ensure_future(make().agenerate(req()))
    while not fresh_emu.submissions:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fresh_emu.cancelled == [fresh_emu.submissions[0].request_id]


def test_keyboard_interrupt_cancels_the_job_and_propagates(fresh_emu, make):
    fresh_emu.script([HANG])
    main = threading.get_ident()

    def interrupt():
        while not fresh_emu.submissions:
            time.sleep(0.01)
        time.sleep(0.1)  # the backend now blocks reading the status stream
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        make().generate(req())
    assert fresh_emu.cancelled == [fresh_emu.submissions[0].request_id]


def test_stream_timeout_drops_the_run(fresh_emu, make):
    fresh_emu.script([HANG])
    with pytest.raises(errors.RequestTimeoutError):
        list(make(mode="stream", timeout=0.3).stream(req()))


# ------------------------------------------------------------------ uploads


def test_large_images_are_uploaded_once(fresh_emu, make, png_bytes):
    b = make(upload_threshold=200)
    conv = Conversation([Turn("user", [Image(png_bytes), "compare with", Image(png_bytes)])])
    r = b.generate(Request(conv))
    urls = [i["image_url"] for i in fresh_emu.submissions[0].payload["images"]]
    assert urls[0] == urls[1] and urls[0].startswith(fresh_emu.cdn_url + "/files/")
    assert "2 images" in r.text and r.metrics["uploads"] == 1
    b.generate(Request(conv))  # same content again: cached
    assert routes(fresh_emu).count("upload") == 1 and routes(fresh_emu).count("token") == 1
    upload = next(x for x in fresh_emu.requests if x.route == "upload")
    assert (
        upload.headers["authorization"].startswith("Bearer ") and fresh_emu.key not in upload.headers["authorization"]
    )
    assert upload.headers["content-type"] == "image/png"
    assert httpx.get(urls[0]).content == png_bytes


async def test_async_upload_and_small_images_inline(fresh_emu, make, png_bytes, make_image):
    b = make(upload_threshold=len(png_bytes) * 2)  # png fits inline, the bigger one does not
    large = make_image(400, 300, (10, 120, 200), "PNG")
    await b.agenerate(req(images=[png_bytes, large]))
    urls = [i["image_url"] for i in fresh_emu.submissions[0].payload["images"]]
    assert urls[0].startswith("data:image/png;base64,") and urls[1].startswith(fresh_emu.cdn_url)
    assert routes(fresh_emu).count("upload") == 1


def test_bad_image_is_an_image_error_before_anything_is_sent(fresh_emu, make):
    with pytest.raises(errors.ImageError, match="image 1 of message 1"):
        make().generate(req(images=[b"not an image at all"]))
    assert fresh_emu.requests == []


# ------------------------------------------------------------------ the key stays ours


def test_image_urls_are_passed_not_fetched(fresh_emu, make, other_host):
    url = other_host.url + "/img/cat.png"
    make().generate(req(images=[url]))
    assert fresh_emu.submissions[0].payload["images"] == [{"image_url": url}]
    assert other_host.seen == []


def test_fetch_remote_never_sends_the_key(fresh_emu, make, other_host, png_bytes):
    make(image_options=ImageOptions(fetch_remote=True)).generate(req(images=[other_host.url + "/img/cat.png"]))
    assert len(other_host.seen) == 1 and not any(k.lower() == "authorization" for k in other_host.seen[0].headers)
    assert fresh_emu.submissions[0].payload["images"][0]["image_url"].startswith("data:image/png")


def test_status_urls_on_another_host_are_not_followed(fresh_emu, make):
    # The emulator answers with 127.0.0.1 URLs; configured as "localhost", they are another host.
    local = fresh_emu.url.replace("127.0.0.1", "localhost")
    r = make(queue_url=local, run_url=local + "/run", rest_url=local + "/rest").generate(req())
    assert r.text == expected(fresh_emu)
    assert {x.headers["host"].split(":")[0] for x in fresh_emu.requests} == {"localhost"}


def test_key_never_leaks(fresh_emu, make, caplog):
    caplog.set_level(logging.DEBUG)
    for name in ("httpx", "httpcore", "mantis_llm", "mantis_llm.fal"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    b = make()
    b.generate(req())
    fresh_emu.script([JobError(500, "boom", "runner_server_error")])
    with pytest.raises(errors.BackendError) as ei:
        b.generate(req())
    texts = [repr(b), str(b.__dict__), str(ei.value), repr(ei.value), caplog.text, str(b.api_key)]
    loggers = {r.name.split(".")[0] for r in caplog.records} | {r.name for r in caplog.records}
    assert {"mantis_llm.fal", "httpx", "httpcore"} <= loggers  # DEBUG lines really were written
    assert all(fresh_emu.key not in t for t in texts)
    with pytest.raises(TypeError):
        pickle.dumps(b)
    assert copy.deepcopy(b) is b  # frameworks deep-copy models: share the pool, never the key in a pickle
    assert b.api_key.get_secret_value() == fresh_emu.key


# ------------------------------------------------------------------ configuration


def test_env_configures_everything(fresh_emu, monkeypatch):
    for k, v in fresh_emu.env().items():
        monkeypatch.setenv(k, v)
    with FalBackend() as b:
        assert (b.queue_url, b.run_url, b.rest_url, b.cdn_url) == (
            fresh_emu.queue_url,
            fresh_emu.run_url,
            fresh_emu.rest_url,
            fresh_emu.cdn_url,
        )
        assert b.generate(req()).text == expected(fresh_emu)
    monkeypatch.delenv("FAL_KEY")
    key_id, secret = fresh_emu.key.split(":")
    monkeypatch.setenv("FAL_KEY_ID", key_id)
    monkeypatch.setenv("FAL_KEY_SECRET", secret)
    with FalBackend(mode="sync") as b:
        assert b.generate(req()).text == expected(fresh_emu)


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
async def test_anything_but_a_request_is_an_invalid_request_error(fresh_emu, make, bad):
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
    assert fresh_emu.submissions[:1] and all(s.payload["prompt"] for s in fresh_emu.submissions)  # good ones ran


def test_caller_clients_are_used_and_left_open(fresh_emu, make):
    hits = []
    with httpx.Client(event_hooks={"request": [hits.append]}) as c:
        b = make(client=c)
        b.generate(req())
        b.close()
        assert not c.is_closed and len(hits) == 3


async def test_caller_async_client_is_used_and_left_open(fresh_emu, make):
    async with httpx.AsyncClient() as c:
        b = make(async_client=c, mode="sync")
        await b.agenerate(req())
        await b.aclose()
        assert not c.is_closed
