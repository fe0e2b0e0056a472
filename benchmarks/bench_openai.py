"""OpenAIBackend overhead against a real ``transformers serve`` (run by hand; prints a Markdown table).

    .venv/bin/python benchmarks/bench_openai.py [--calls 40] [--concurrent 32] [--rounds 5]

Needs the local stack and the serving extra (``pip install "transformers[serving]"``). The
server runs in its own process on a tiny random-weight Mantis prepared with
``prepare_model`` (nothing downloaded). Each request is one small PNG and a sentence, 4 new
tokens, greedy. Figures:

(a) the route's added cost: ``generate()`` and ``stream()`` against a bare httpx POST of the
    same JSON body to the same server (plain and streamed), taking turns, median of
    ``--calls``; also this process's CPU time per call (the client's own cost, steadier on
    a shared machine than the wall time). On transformers serve ``generate()`` streams (the server only stops a stream
    whose client left), so its like-for-like floor is the bare streamed POST; the plain path
    that vLLM and SGLang get is timed with ``server="openai"`` against the bare plain POST.
(b) ``--concurrent`` concurrent ``agenerate`` calls through one backend, ``--rounds`` rounds:
    all answered; the TCP connections to the server, sampled from /proc/net/tcp (at most
    one per call in flight; uvicorn closes a connection idle for 5 s, so rounds longer than
    that reconnect); wall time against a bare httpx AsyncClient making the same streamed
    POSTs, in turns.
    transformers serve runs one request at a time (and schedules many concurrent ones
    slowly), so the floor, not 1/k of the serial time, is the reference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import httpx

from mantis_llm import Conversation, GenerationParams, Image, OpenAIBackend, Request
from mantis_llm.testing import make_image_bytes

PNG = make_image_bytes(64, 48, (200, 30, 30), "PNG")
TOKENS = 4


def request() -> Request:
    return Request(Conversation.from_prompt("Describe it.", [Image(PNG)]), GenerationParams(max_tokens=TOKENS))


def bare_body(model: str, stream: bool) -> dict:
    """What the backend sends transformers serve, written out by hand (the image pre-encoded)."""
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    body = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Describe it."}],
            }
        ],
        "model": model,
        "max_completion_tokens": TOKENS,
        "temperature": 0.0,
        "chat_template_kwargs": {"write_bos_token": False},
    }
    if stream:
        body["stream"] = True
    return body


@contextmanager
def serve() -> Iterator[tuple[str, str]]:
    """``transformers serve`` on a prepared tiny model; yields (base_url, served model name)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mantis_llm.prepare import prepare_model
    from mantis_llm.testing import build_tiny_mantis

    with tempfile.TemporaryDirectory(prefix="bench-openai-") as tmp:
        root = Path(tmp)
        model_dir = prepare_model(build_tiny_mantis(root / "src", layout="mantis"), root / "served")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1",
                   HF_HOME=str(root / "hf-home"))  # fmt: skip
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--device", "cpu", "--dtype", "float32"]  # fmt: skip
        log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed below, after the server
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"transformers serve exited: {(root / 'serve.log').read_text()[-2000:]}")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("transformers serve did not start within 120 s")
                time.sleep(0.2)
            yield url, str(model_dir)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


def alternate(fns: dict[str, Callable[[], object]], n: int) -> dict[str, tuple[float, float]]:
    """(median wall seconds, median client CPU seconds) of each function, run in turns (in a
    shuffled order each turn) so that load drift on a shared machine hits all of them alike.
    The CPU time is this process's (the server runs in another): the client's own cost,
    steadier than the wall time."""
    for fn in fns.values():
        fn()  # warm up: connections, the probe, imports
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    order, rng = list(fns), random.Random(0)
    for _ in range(n):
        rng.shuffle(order)  # no function always follows the same one (the server tidies up after each)
        for name in order:
            fn = fns[name]
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def part_a(url: str, model: str, n: int) -> dict[str, tuple[float, float]]:
    chat = url + "/v1/chat/completions"
    plain, streamed = bare_body(model, False), bare_body(model, True)
    with (
        httpx.Client(timeout=60) as bare,
        OpenAIBackend(base_url=url) as ours,
        OpenAIBackend(base_url=url, server="openai") as ours_plain,
    ):

        def bare_plain() -> str:
            return bare.post(chat, json=plain).raise_for_status().json()["choices"][0]["message"]["content"]

        def bare_stream() -> str:
            text = ""
            with bare.stream("POST", chat, json=streamed) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        text += choices[0].get("delta", {}).get("content") or ""
            return text

        want = bare_plain()
        assert ours.generate(request()).text == want == bare_stream() == ours_plain.generate(request()).text
        return alternate(
            {
                "bare_plain": bare_plain,
                "bare_stream": bare_stream,
                "generate": lambda: ours.generate(request()),
                "stream": lambda: list(ours.stream(request())),
                "plain": lambda: ours_plain.generate(request()),
            },
            n,
        )


def connections_to(port: int) -> set[int]:
    """Local ports of the ESTABLISHED TCP connections whose remote port is ``port``: the
    clients' side of the connections to the server (only this process talks to it)."""
    ours = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                ours.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ours


def part_b(url: str, model: str, k: int, rounds: int) -> dict:
    """``rounds`` rounds of ``k`` concurrent calls through one backend, watching the
    connections to the server (sampled every 50 ms), taking turns with rounds of the same
    streamed POSTs (what our calls do on transformers serve) from a bare httpx AsyncClient,
    the floor. The bare client is closed after each of its rounds, so that every connection
    to the server seen during our rounds is ours."""
    port = httpx.URL(url).port
    assert port is not None
    chat, streamed = url + "/v1/chat/completions", bare_body(model, True)

    async def watch(seen: set[int], peaks: list[int], done: asyncio.Event) -> None:
        while not done.is_set():
            now = connections_to(port)
            seen |= now
            peaks[-1] = max(peaks[-1], len(now))
            await asyncio.sleep(0.05)

    async def bare_round() -> float:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=None)) as bare:

            async def one() -> None:
                async with bare.stream("POST", chat, json=streamed) as r:
                    async for _ in r.aiter_bytes():
                        pass

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(k)))
            return time.perf_counter() - t0

    async def run() -> dict:
        b = OpenAIBackend(base_url=url)
        await b.agenerate(request())  # the probe and one warm connection
        answered, ours, floor, peaks, seen = 0, [], [], [], set(connections_to(port))
        await bare_round()  # warm the server up for both
        for _ in range(rounds):
            peaks.append(0)
            done = asyncio.Event()
            watcher = asyncio.create_task(watch(seen, peaks, done))
            t0 = time.perf_counter()
            out = await b.agenerate_batch([request() for _ in range(k)])
            ours.append(time.perf_counter() - t0)
            done.set()
            await watcher
            answered += sum(1 for r in out if r.text and r.usage is not None)
            floor.append(await bare_round())
        pool = len(b._loops[asyncio.get_running_loop()].client._transport._pool.connections)  # type: ignore[attr-defined]
        await b.aclose()
        return {
            "wall": statistics.median(ours),
            "floor": statistics.median(floor),
            "ratios": [round(o / f, 2) for o, f in zip(ours, floor, strict=True)],
            "answered": answered,
            "calls": k * rounds,
            "peaks": peaks,
            "opened": len(seen),
            "pool": pool,
        }

    return asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    ns = p.parse_args()
    with serve() as (url, model):
        a = part_a(url, model, ns.calls)
        b = part_b(url, model, ns.concurrent, ns.rounds)
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    print(
        f"{date.today().isoformat()}, {platform.machine()} {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f}), Python {platform.python_version()}, httpx {httpx.__version__}; "
        f"transformers serve in its own process, tiny model, one 64x48 PNG + a sentence, {TOKENS} new tokens\n"
    )
    print("| figure | measured (median of wall; client CPU) | ratio | goal |")
    print("|---|---|---|---|")
    rows = (
        ("`generate()` (streams on transformers serve) vs bare streamed POST", "generate", "bare_stream"),
        ("`stream()` vs bare streamed POST", "stream", "bare_stream"),
        ('plain path (`server="openai"`, what vLLM/SGLang get) vs bare plain POST', "plain", "bare_plain"),
    )
    for what, mine, floor in rows:
        (w, c), (bw, bc) = a[mine], a[floor]
        print(
            f"| (a) {what}, {ns.calls} calls each, taking turns | ours {ms(w)} (CPU {ms(c)}), bare {ms(bw)} "
            f"(CPU {ms(bc)}) | **{w / bw:.3f}x** wall; +{ms(c - bc)} CPU per call | <= 1.05x |"
        )
    k = ns.concurrent
    print(
        f"| (b) {k} concurrent `agenerate` through one backend, {ns.rounds} rounds | {b['answered']}/{b['calls']} "
        f"answered; wall {ms(b['wall'])}, bare-httpx floor {ms(b['floor'])}; TCP connections to the server: "
        f"at most {max(b['peaks'])} at once (per round {b['peaks']}), {b['opened']} opened in all, "
        f"{b['pool']} in the pool at the end | "
        f"**{b['wall'] / b['floor']:.2f}x** the floor (per round {b['ratios']}) | all answered, one pool |"
    )


if __name__ == "__main__":
    main()
