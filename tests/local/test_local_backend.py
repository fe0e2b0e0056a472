"""TransformersBackend against tiny random-weight Mantis models, through the real code path."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time

import pytest
import torch
from PIL import Image as PILImage

from mantis_llm import Conversation, GenerationParams, Request, Turn, resolve_backend
from mantis_llm.backends.local import TransformersBackend
from mantis_llm.errors import (
    BackendError,
    ConfigurationError,
    ContextLengthError,
    ImageError,
    InvalidRequestError,
    RequestCancelledError,
)
from mantis_llm.types import Image

SYSTEM = (  # Mantis's Vicuna system sentence, written out by hand
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
COLORS = [(200, 30, 30), (30, 30, 200), (30, 160, 40), (220, 200, 20)]


def ask(prompt: str, images=(), **params) -> Request:
    return Request(Conversation.from_prompt(prompt, list(images)), GenerationParams(**params))


def direct_generate(backend, prompt: str, images: list[bytes], max_new_tokens: int):
    """model.generate on a prompt written by hand, with the backend's own processor and model."""
    pil = [PILImage.open(io.BytesIO(b)).convert("RGB") for b in images]
    enc = backend.processor(text=[prompt], images=pil or None, return_tensors="pt")
    with torch.inference_mode():
        out = backend.hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    return enc["input_ids"].shape[1], new, backend.processor.tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture
def mixed_requests(make_image):
    """Requests with 0, 1 or 2 images, different text lengths and max_tokens."""
    imgs = [make_image(48 + 8 * i, 40, COLORS[i]) for i in range(4)]
    layouts = [[], [imgs[0]], [imgs[1], imgs[2]], [imgs[3]], [], [imgs[2], imgs[0]]]
    return [ask("Question " + "x" * (3 * i) + "?", layout, max_tokens=6 + 2 * i) for i, layout in enumerate(layouts)]


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("variant", ["clip", "siglip", "mantis-layout"])
def test_greedy_equals_direct_generate(backends, make_image, variant):
    backend = backends[variant]
    red, blue = make_image(64, 48, COLORS[0]), make_image(80, 60, COLORS[1], "JPEG")
    prompt = (
        f"{SYSTEM}</s>USER: (image 1: <Image><image></Image>) (image 2: <Image><image></Image>) "
        "What differs?</s>ASSISTANT:"
    )
    n_in, new, text = direct_generate(backend, prompt, [red, blue], 12)
    response = backend.generate(ask("What differs?", [red, blue], max_tokens=12))
    assert response.text == text
    assert response.usage.input_tokens == n_in
    assert response.usage.output_tokens == len(new) == 12
    assert response.finish_reason == "length"
    assert response.model == str(backend.model)
    assert response.request_id.startswith("local-")


def test_answers_depend_on_images_and_text(clip_backend, make_image):
    red, blue = make_image(64, 48, COLORS[0]), make_image(64, 48, COLORS[1])
    a = clip_backend.generate(ask("Describe.", [red], max_tokens=10)).text
    b = clip_backend.generate(ask("Describe.", [blue], max_tokens=10)).text
    c = clip_backend.generate(ask("Describe the picture.", [red], max_tokens=10)).text
    assert len({a, b, c}) == 3


def test_multi_turn_and_system_prompt(clip_backend, make_image):
    red = make_image(64, 48, COLORS[0])
    conv = Conversation(
        [
            Turn("system", ["Be brief."]),
            Turn("user", [Image(red), "What is this?"]),
            Turn("assistant", ["A red card."]),
            Turn("user", ["And now?"]),
        ]
    )
    prompt = (
        "Be brief.</s>USER: (image 1: <Image><image></Image>) What is this?</s>ASSISTANT: A red card.</s>"
        "USER: And now?</s>ASSISTANT:"
    )
    _, _, text = direct_generate(clip_backend, prompt, [red], 8)
    assert clip_backend.generate(Request(conv, GenerationParams(max_tokens=8))).text == text


def test_eos_finishes_with_stop(tiny_clip, make_image):
    backend = TransformersBackend(model=tiny_clip).load()
    try:
        eos = backend.processor.tokenizer.eos_token_id
        with torch.no_grad():  # make EOS win as soon as its logit is positive
            backend.hf_model.get_output_embeddings().weight[eos] *= 1000
        response = backend.generate(ask("Hi", [make_image()], max_tokens=20))
        assert response.finish_reason == "stop"
        # EOS is counted, not shown (byte-level ASCII answer: one token per character)
        assert response.usage.output_tokens == len(response.text) + 1 < 20
    finally:
        backend.close()


def test_stop_sequences(clip_backend, make_image):
    request = ask("Tell me a long story.", [make_image()], max_tokens=24)
    full = clip_backend.generate(request)
    assert full.finish_reason == "length" and len(full.text) >= 10
    stop = full.text[6:8]
    cut = full.text.find(stop)
    stopped = clip_backend.generate(ask("Tell me a long story.", [make_image()], max_tokens=24, stop=[stop, "@@@@"]))
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop"
    # generation really stopped at the stop string (byte-level: one token per character)
    assert stopped.usage.output_tokens == cut + len(stop)

    # streaming: nothing past the stop string is ever emitted
    chunks = list(clip_backend.stream(ask("Tell me a long story.", [make_image()], max_tokens=24, stop=[stop])))
    assert "".join(c.text for c in chunks) == full.text[:cut]
    assert chunks[-1].response.finish_reason == "stop"


def test_usage_counts(clip_backend, make_image):
    imgs = [make_image(50, 50, c) for c in COLORS[:3]]
    response = clip_backend.generate(ask("Count.", imgs, max_tokens=7))
    job = clip_backend._prepare(ask("Count.", imgs, max_tokens=7))
    assert response.usage.input_tokens == len(job.input_ids)
    assert response.usage.input_tokens > 3 * 16
    assert response.usage.output_tokens == 7
    assert response.usage.total_tokens == response.usage.input_tokens + 7
    assert response.metrics["images"] == 3


def test_seeded_sampling_is_reproducible_and_local(clip_backend, make_image):
    img = make_image()
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = clip_backend.generate(ask("Sample.", [img], max_tokens=16, temperature=1.5, seed=7))
    b = clip_backend.generate(ask("Sample.", [img], max_tokens=16, temperature=1.5, seed=7))
    c = clip_backend.generate(ask("Sample.", [img], max_tokens=16, temperature=1.5, seed=8))
    greedy = clip_backend.generate(ask("Sample.", [img], max_tokens=16))
    assert a.text == b.text
    assert c.text != a.text and greedy.text not in (a.text, c.text)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG was not touched


def test_top_p_tiny_is_greedy(clip_backend, make_image):
    img = make_image()
    greedy = clip_backend.generate(ask("Sample.", [img], max_tokens=10)).text
    nucleus = clip_backend.generate(ask("Sample.", [img], max_tokens=10, temperature=1.0, top_p=1e-6, seed=3))
    assert nucleus.text == greedy


# ---------------------------------------------------------------------------- batching


def test_batched_equals_sequential(clip_backend, mixed_requests):
    sequential = [clip_backend.generate(r) for r in mixed_requests]
    batched = clip_backend.generate_batch(mixed_requests)
    assert [r.text for r in batched] == [r.text for r in sequential]
    assert [r.usage for r in batched] == [r.usage for r in sequential]
    assert [r.metrics["batch_size"] for r in batched] == [6] * 6
    assert all(r.metrics["batch_size"] == 1 for r in sequential)


def test_batches_are_capped_and_grouped(tiny_clip, mixed_requests, make_image):
    with TransformersBackend(model=tiny_clip, max_batch_size=4) as backend:
        sampled = ask("Sample.", [make_image()], max_tokens=5, temperature=1.0, seed=1)
        results = backend.generate_batch(mixed_requests + [sampled])
        sizes = [r.metrics["batch_size"] for r in results]
        assert sizes[:6] == [4, 4, 4, 4, 2, 2]
        assert sizes[6] == 1  # seeded sampling never shares a batch
        assert [r.text for r in results[:6]] == [backend.generate(r).text for r in mixed_requests]


def test_static_cache_option_gives_the_same_answers(tiny_clip, clip_backend, mixed_requests):
    expected = [clip_backend.generate(r).text for r in mixed_requests]
    with TransformersBackend(model=tiny_clip, generate_kwargs={"cache_implementation": "static"}) as backend:
        assert [r.text for r in backend.generate_batch(mixed_requests)] == expected


def test_a_failed_batch_is_retried_row_by_row(tiny_clip, mixed_requests):
    with TransformersBackend(model=tiny_clip) as backend:
        expected = [backend.generate(r).text for r in mixed_requests]
        real = backend._generate

        def out_of_memory_when_batched(jobs):
            if len(jobs) > 1:
                raise RuntimeError("CUDA out of memory (simulated)\nlong details")
            real(jobs)

        backend._generate = out_of_memory_when_batched
        results = backend.generate_batch(mixed_requests)
        assert [r.text for r in results] == expected
        assert all(r.metrics["batch_size"] == 1 for r in results)

        backend._generate = lambda jobs: 1 / 0
        with pytest.raises(BackendError, match="^local generation failed: division by zero") as info:
            backend.generate(mixed_requests[0])
        assert info.value.request_id.startswith("local-")


def test_concurrent_threads_are_batched_and_safe(clip_backend, mixed_requests):
    expected = [clip_backend.generate(r).text for r in mixed_requests]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(mixed_requests))

    def call(i, request):
        barrier.wait()
        results[i] = clip_backend.generate(request)

    threads = [threading.Thread(target=call, args=(i, r)) for i, r in enumerate(mixed_requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i].text for i in range(len(mixed_requests))] == expected
    assert max(r.metrics["batch_size"] for r in results.values()) > 1


def test_long_rows_do_not_hold_back_short_ones(clip_backend, make_image):
    long = clip_backend._prepare(ask("b", [], max_tokens=150))
    short = clip_backend._prepare(ask("a", [make_image()], max_tokens=2))
    clip_backend._enqueue([long, short])
    assert short.future.result(30).metrics["batch_size"] == 2
    assert not long.future.done()  # the short answer was delivered while the long row ran on
    assert long.future.result(30).usage.output_tokens == 150


# ---------------------------------------------------------------------------- streaming


def test_stream_concatenates_to_the_answer(clip_backend, make_image):
    request = ask("Stream please.", [make_image(), make_image(40, 40, COLORS[2])], max_tokens=20)
    full = clip_backend.generate(request)
    chunks = list(clip_backend.stream(request))
    assert len(chunks) > 3
    assert "".join(c.text for c in chunks) == full.text
    assert all(c.response is None for c in chunks[:-1])
    last = chunks[-1].response
    assert (last.text, last.usage, last.finish_reason) == (full.text, full.usage, full.finish_reason)


def test_stream_of_raw_bytes_concatenates_to_the_answer(tiny_clip, make_image):
    """Undo the builder's bias towards ASCII: answers become arbitrary bytes (split UTF-8
    sequences, invalid bytes), which streaming must not garble."""
    with TransformersBackend(model=tiny_clip) as backend:
        tok, head = backend.processor.tokenizer, backend.hf_model.get_output_embeddings().weight
        high_bytes = [i for i in range(len(tok)) if tok.decode([i]) == "\ufffd"]  # bytes >= 0x80
        assert len(high_bytes) == 128
        with torch.no_grad():
            head[high_bytes] *= 8.0
        request = ask("Bytes.", [make_image()], max_tokens=40)
        full = backend.generate(request)
        assert any(ord(ch) > 127 for ch in full.text)
        chunks = list(backend.stream(request))
        assert "".join(c.text for c in chunks) == full.text
        assert len(chunks) > 3


def test_abandoned_stream_stops_its_row(clip_backend, make_image):
    stream = clip_backend.stream(ask("Go on and on.", [make_image()], max_tokens=250))
    next(stream)
    stream.close()
    start = time.monotonic()
    response = clip_backend.generate(ask("quick", [], max_tokens=2))
    assert response.metrics["queue_seconds"] < 1.0
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------------------- async


async def test_async_paths(clip_backend, mixed_requests):
    expected = [clip_backend.generate(r).text for r in mixed_requests]
    assert (await clip_backend.agenerate(mixed_requests[2])).text == expected[2]

    chunks = [c async for c in clip_backend.astream(mixed_requests[2])]
    assert "".join(c.text for c in chunks) == expected[2] and chunks[-1].response is not None

    gathered = await asyncio.gather(*(clip_backend.agenerate(r) for r in mixed_requests))
    assert [r.text for r in gathered] == expected
    assert max(r.metrics["batch_size"] for r in gathered) > 1

    batched = await clip_backend.agenerate_batch(mixed_requests)
    assert [r.text for r in batched] == expected


async def test_async_does_not_block_the_loop(clip_backend, make_image, loop_ticker):
    async with loop_ticker(0.005) as ticker:
        start = time.monotonic()
        await clip_backend.agenerate(ask("Long answer.", [make_image()], max_tokens=150))
        async for _ in clip_backend.astream(ask("Long answer.", [make_image()], max_tokens=150)):
            pass
        elapsed = time.monotonic() - start
    assert ticker.ticks >= max(3, elapsed / 0.005 / 10)


async def test_cancelled_agenerate_stops_quickly(clip_backend, make_image):
    task = asyncio.create_task(clip_backend.agenerate(ask("Forever.", [make_image()], max_tokens=250)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    response = await clip_backend.agenerate(ask("next", [], max_tokens=2))
    assert response.metrics["queue_seconds"] < 1.0


# ---------------------------------------------------------------------------- errors and lifecycle


def test_too_many_images_is_a_context_error(clip_backend, make_image):
    img = make_image()
    with pytest.raises(ContextLengthError) as info:
        clip_backend.generate(ask("Compare all.", [img] * 40, max_tokens=10))
    message = str(info.value)
    assert "40 image(s)" in message and "512-token" in message and "16 tokens" in message
    fit = int(re.search(r"at most (\d+) image\(s\) fit", message).group(1))
    assert clip_backend.generate(ask("Compare all.", [img] * fit, max_tokens=10)).usage.output_tokens == 10
    with pytest.raises(ContextLengthError):
        clip_backend.generate(ask("Compare all.", [img] * (fit + 1), max_tokens=10))

    # explicit max_tokens that does not fit: error; no max_tokens: clamped to the room left
    with pytest.raises(ContextLengthError, match="max_tokens=250"):
        clip_backend.generate(ask("Compare all.", [img] * 6, max_tokens=250))
    job = clip_backend._prepare(ask("Compare all.", [img] * 6))
    assert job.max_new == 512 - len(job.input_ids)


def test_context_is_checked_before_images_are_decoded(tiny_clip):
    backend = TransformersBackend(model=tiny_clip, max_context=100)
    with pytest.raises(ContextLengthError, match="100-token"):
        backend.generate(ask("x", [b"not even an image"] * 8, max_tokens=5))
    backend.close()


def test_bad_image_names_the_image(clip_backend, make_image):
    with pytest.raises(ImageError, match="^image 2 of message 1: "):
        clip_backend.generate(ask("What?", [make_image(), b"this is not an image"], max_tokens=3))


def test_missing_model_is_a_configuration_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for model in (str(tmp_path / "nowhere"), "TIGER-Lab/no-such-mantis-model"):
        with pytest.raises(ConfigurationError) as info:
            TransformersBackend(model=model).load()
        message = str(info.value)
        assert model in message and "\n" not in message and len(message) < 600
        assert ("does not exist" if model.startswith("/") else "not a local directory") in message
        # one line, no chained transformers/huggingface_hub traceback
        assert info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__


def test_non_llava_checkpoint_is_rejected(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path
    )
    with pytest.raises(ConfigurationError, match="'llama' model.*LLaVA-architecture"):
        TransformersBackend(model=tmp_path).load()


@pytest.mark.parametrize(
    "options",
    [
        {"device": "cpu", "device_map": "auto"},
        {"max_batch_size": 0},
        {"batch_wait": -1},
        {"max_context": 1},
        {"default_max_tokens": 0},
        {"image_short_side": 0},
        {"model": 5},
        {"model": ""},
        {"device": 5},
        {"device_map": 1.5},
        {"attn_implementation": 3},
        {"trust_remote_code": "yes"},
        {"revision": 2},
        {"batch_wait": True},
        {"image_options": "x"},
        {"model_kwargs": 5},
        {"generate_kwargs": ["a"]},
    ],
)
def test_bad_options(options):
    """Every wrongly typed or out-of-range option is a ConfigurationError naming it, at construction."""
    with pytest.raises(ConfigurationError) as info:
        TransformersBackend(**options)
    name = "device" if "device_map" in options and "device" in options else next(iter(options))
    assert name.replace("image_short_side", "short_side") in str(info.value)


@pytest.mark.parametrize("bad", ["describe this", None, {"prompt": "x"}])
def test_anything_but_a_request_is_rejected_before_loading(bad):
    backend = TransformersBackend(model="/nonexistent/model")  # would fail to load: the check comes first
    with pytest.raises(InvalidRequestError, match="expects a mantis_llm.types.Request"):
        backend.generate(bad)
    with pytest.raises(InvalidRequestError, match="expects a mantis_llm.types.Request"):
        list(backend.stream(bad))
    with pytest.raises(InvalidRequestError, match="expects a mantis_llm.types.Request"):
        asyncio.run(backend.agenerate(bad))
    assert not backend.loaded


def test_bad_dtype(tiny_clip):
    with pytest.raises(ConfigurationError, match="unknown dtype"):
        TransformersBackend(model=tiny_clip, dtype="float7").load()


def test_options_reach_the_model(tiny_clip, make_image):
    backend = resolve_backend("local", str(tiny_clip), dtype="bfloat16", image_short_side=20, api_key="ignored")
    assert isinstance(backend, TransformersBackend) and backend.image_options.short_side == 20
    with backend:
        assert backend.hf_model.dtype == torch.bfloat16
        assert backend.generate(ask("Hi", [make_image()], max_tokens=3)).usage.output_tokens == 3
    assert not backend.loaded


def test_close_fails_running_requests_and_reloads(tiny_clip, make_image):
    backend = TransformersBackend(model=tiny_clip)
    assert not backend.loaded and "loaded=False" in repr(backend)
    stream = backend.stream(ask("Long.", [make_image()], max_tokens=250))
    next(stream)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        for _ in stream:
            pass
    assert not backend.loaded
    backend.close()  # twice is fine
    # a later call loads the model again
    assert backend.generate(ask("again", [], max_tokens=2)).usage.output_tokens == 2
    backend.close()


def test_cancel_error_type(clip_backend, make_image):
    job = clip_backend._prepare(ask("x", [make_image()], max_tokens=3))
    job.cancel()
    assert job.future.cancelled()
    assert isinstance(job.cancel_error, RequestCancelledError)


def test_on_update_reports_loading_and_queue(tiny_clip):
    updates = []
    with TransformersBackend(model=tiny_clip) as backend:
        backend.generate(ask("hi", [], max_tokens=2), on_update=updates.append)
    assert [u.status for u in updates] == ["LOADING", "IN_QUEUE"]
    assert updates[1].request_id.startswith("local-")
