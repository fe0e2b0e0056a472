"""Token counting: what it costs next to a call (run by hand; prints a Markdown table).

    .venv/bin/python benchmarks/bench_tokens.py [--repeat 2000]

Figures, all measured in this run: the time to count a four-image conversation (a system
line, three turns, about 80 words) with ``TokenCounter`` estimating, and exact with a tokenizer
(the tiny test model's byte-level ``tokenizer.json``, a stand-in for the real one), against
rendering the same prompt (``prompt.render``), the step every call already pays. Also
``ChatMantis.get_num_tokens_from_messages`` on the same turns as LangChain messages
(translation included), and each as a share of one emulator round trip (``invoke`` against
``FalEmulator`` with no service time), the cheapest call there is.

What the count changes for LlamaIndex (four images and a question: four calls with LlamaIndex's
2,125 tokens per image, one with ``Mantis.chat_prompt_helper()``) is a count of calls, not a
speed: tests/llama_index/test_image_budget.py asserts it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from mantis_llm import Conversation, Image, Turn
from mantis_llm.prompt import render
from mantis_llm.testing import make_image_bytes
from mantis_llm.tokens import TokenCounter

WORDS = (
    "Compare the kitchen in the first picture with the one in the second: which appliances moved, "
    "what changed on the counter, and is the window the same? Answer in two sentences."
)
IMAGES = [make_image_bytes(64 + 8 * i, 48, (40 * i, 90, 200 - 30 * i), "PNG") for i in range(4)]


def conversation() -> Conversation:
    return Conversation(
        [
            Turn("system", ["You are a careful home inspector."]),
            Turn("user", [Image(IMAGES[0]), Image(IMAGES[1]), WORDS]),
            Turn("assistant", ["The fridge moved left; the counter is clear now."]),
            Turn("user", [Image(IMAGES[2]), Image(IMAGES[3]), "And these two? " + WORDS]),
        ]
    )


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call over 5 batches of ``repeat // 5`` calls."""
    n = max(1, repeat // 5)
    fn()  # warm
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2000)
    args = ap.parse_args()

    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    from mantis_llm.emulator import FalEmulator
    from mantis_llm.langchain import ChatMantis, image_block
    from mantis_llm.testing import build_tiny_mantis

    conv = conversation()
    estimate = TokenCounter()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_mantis(Path(tmp) / "tiny")
        exact = TokenCounter.from_pretrained(tiny)
    lc = [
        SystemMessage("You are a careful home inspector."),
        HumanMessage([image_block(IMAGES[0]), image_block(IMAGES[1]), WORDS]),
        AIMessage("The fridge moved left; the counter is clear now."),
        HumanMessage([image_block(IMAGES[2]), image_block(IMAGES[3]), "And these two? " + WORDS]),
    ]
    rows: list[tuple[str, float]] = []
    t_render = per_call(lambda: render(conv, "local"), args.repeat)
    rows.append(("render the prompt (every call does)", t_render))
    rows.append(("TokenCounter.count, estimate", per_call(lambda: estimate.count(conv), args.repeat)))
    rows.append(("TokenCounter.count, exact (tiny tokenizer)", per_call(lambda: exact.count(conv), args.repeat)))
    with FalEmulator(service_time=0.0) as emu:
        os.environ.update(emu.env())
        chat = ChatMantis(backend_options={"mode": "sync"})
        t_lc = per_call(lambda: chat.get_num_tokens_from_messages(lc), args.repeat)
        rows.append(("ChatMantis.get_num_tokens_from_messages", t_lc))
        t_call = per_call(lambda: chat.invoke(lc), max(5, args.repeat // 40))
        rows.append(("ChatMantis.invoke on the emulator (no service time)", t_call))
        chat.close()

    machine = f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()}"
    print(f"Token counting, {date.today()}, {machine}")
    print(f"four-image conversation: {estimate.count(conv)} tokens estimated, {exact.count(conv)} (tiny tokenizer)")
    print()
    print("| step | per call | x render | share of an emulator call |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e6:,.0f} µs | {t / t_render:.2f} | {t / t_call:.1%} |")


if __name__ == "__main__":
    main()
