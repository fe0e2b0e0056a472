"""Benchmark of the local backend on CPU with a small random-weight Mantis model.

    python benchmarks/bench_local.py [--overhead-rounds 16] [--rounds 3] [--max-tokens 96]

Builds (in a temp dir) a random-weight LLaVA of the Mantis architecture, larger than the
test model: CLIP 224 px / patch 14 (256 image tokens), Llama hidden 384 x 4 layers. Then:

(a) overhead: ``backend.generate(request)`` (render, image decoding, processor, queue,
    worker, stop/length tracking) against a direct ``processor(...)`` + ``model.generate``
    on the same prompt and images, one request at a time, alternating, same greedy tokens.
    Goal: at most 1.05x.
(b) batching: 8 concurrent callers (threads) against the same 8 requests one by one.
    Goal: at least 2.5x the throughput.

Prints the figures and a Markdown block for benchmarks/RESULTS.md. Random weights do not
change the speed of a forward pass, so the timings are realistic for this model size.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
COLORS = [
    (200, 30, 30),
    (30, 30, 200),
    (30, 160, 40),
    (220, 200, 20),
    (120, 40, 160),
    (20, 180, 180),
    (240, 120, 0),
    (90, 90, 90),
]


def image_bytes(color, size=(320, 240)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, color)
    ImageDraw.Draw(img).ellipse((40, 30, 200, 190), fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def concurrent(backend, requests):
    """Each request from its own thread, all released at once."""
    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(i):
        barrier.wait()
        results[i] = backend.generate(requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        pass
    import torch

    threads, py = torch.get_num_threads(), platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), Python {py}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overhead-rounds", type=int, default=16, help="alternating pairs for (a)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of (b)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    import transformers
    from PIL import Image as PILImage

    from mantis_llm import Conversation, GenerationParams, Request, TransformersBackend
    from mantis_llm.testing import build_tiny_mantis

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = build_tiny_mantis(
            Path(tmp) / "bench-mantis", image_size=224, patch_size=14, hidden_size=args.hidden,
            num_layers=args.layers, num_heads=max(1, args.hidden // 64), vision_hidden_size=256, vision_layers=4,
            max_position_embeddings=2048,
        )  # fmt: skip
        backend = TransformersBackend(model=path).load()
        model, processor = backend.hf_model, backend.processor
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"model: {n_params / 1e6:.1f}M params, {backend.tokens_per_image} tokens/image, "
            f"built+loaded in {time.perf_counter() - t0:.1f}s"
        )
        print(f"machine: {machine()}")

        images = [image_bytes(c) for c in COLORS]
        prompts = [f"Describe picture number {i} in detail." for i in range(8)]
        requests = [
            Request(Conversation.from_prompt(p, [img]), GenerationParams(max_tokens=args.max_tokens))
            for p, img in zip(prompts, images, strict=True)
        ]

        def direct(i: int) -> str:
            # what a user of plain transformers writes for the same request
            pil = [PILImage.open(io.BytesIO(images[i])).convert("RGB")]
            text = f"{SYSTEM}</s>USER: (image 1: <Image><image></Image>) {prompts[i]}</s>ASSISTANT:"
            enc = processor(text=[text], images=pil, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=args.max_tokens, do_sample=False)
            return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

        def timed(fn):
            start = time.perf_counter()
            result = fn()
            return time.perf_counter() - start, result

        # warm up both paths
        assert backend.generate(requests[0]).text == direct(0)

        # (a) overhead, one request at a time, in alternating pairs so machine noise hits
        # both alike; the figure is the median of the per-pair ratios
        ours, theirs = [], []
        for r in range(args.overhead_rounds):
            i = r % len(requests)
            t_b, resp = timed(lambda i=i: backend.generate(requests[i]))
            t_d, text = timed(lambda i=i: direct(i))
            assert resp.text == text, "backend and direct generate disagree"
            ours.append(t_b)
            theirs.append(t_d)
        overhead = statistics.median(b / d for b, d in zip(ours, theirs, strict=True))
        print(
            f"(a) one request ({resp.usage.input_tokens} prompt tokens incl. 1 image, {args.max_tokens} new): "
            f"backend median {statistics.median(ours) * 1000:.0f} ms (min {min(ours) * 1000:.0f}), direct median "
            f"{statistics.median(theirs) * 1000:.0f} ms (min {min(theirs) * 1000:.0f}), {args.overhead_rounds} pairs "
            f"-> {overhead:.3f}x (ratio of minima {min(ours) / min(theirs):.3f}x)"
        )

        backend.close()

        # (b) 8 concurrent callers vs one by one; default dynamic KV cache, then a static one
        speedups = {}
        for label, gen_kwargs in (("dynamic cache", {}), ("static cache", {"cache_implementation": "static"})):
            backend = TransformersBackend(model=path, generate_kwargs=gen_kwargs).load()
            backend.generate(requests[0])  # warm up
            seq_times, conc_times = [], []
            for _ in range(args.rounds):
                t_s, seq = timed(lambda b=backend: [b.generate(r) for r in requests])
                t_c, conc = timed(lambda b=backend: concurrent(b, requests))
                assert [r.text for r in seq] == [r.text for r in conc], "batched answers differ from one by one"
                seq_times.append(t_s)
                conc_times.append(t_c)
            backend.close()
            batch_sizes = sorted({r.metrics["batch_size"] for r in conc})
            tokens = sum(r.usage.output_tokens for r in conc)
            t_s, t_c = statistics.median(seq_times), statistics.median(conc_times)
            speedups[label] = t_s / t_c
            print(
                f"(b) 8 requests, {label}: one by one {t_s:.2f}s ({tokens / t_s:.0f} tok/s), concurrent {t_c:.2f}s "
                f"({tokens / t_c:.0f} tok/s), batch sizes {batch_sizes} -> {t_s / t_c:.2f}x throughput"
            )

    print()
    print(
        f"| {date.today().isoformat()} | {n_params / 1e6:.1f}M params (hidden {args.hidden} x {args.layers}), "
        f"{args.max_tokens} new tokens | {overhead:.3f}x | {speedups['dynamic cache']:.2f}x "
        f"(static cache {speedups['static cache']:.2f}x) |"
    )


if __name__ == "__main__":
    main()
