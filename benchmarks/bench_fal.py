"""FalBackend overhead against the FalEmulator (run by hand; prints a Markdown table).

    /work/venv/bin/python benchmarks/bench_fal.py [--calls 30] [--concurrent 200]

Each emulator runs in its own process (``python -m mantis_llm.emulator``), so the server
does not share the client's interpreter lock. Figures:

(a) added latency per queue call over the 200 ms service time: ours (SSE status stream,
    and polling for reference) vs ``fal_client.subscribe`` (fal-client polls every 100 ms).
    fal-client is pointed at the emulator by overriding its URL constants, here only.
(b) our ``mode="sync"`` call vs a bare ``httpx`` POST to the same sync endpoint.
(c) 200 concurrent ``agenerate`` calls on 100 ms jobs: wall time vs the ideal (100 ms, one
    job's service time) and vs one lone call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import date

import httpx

from mantis_llm import Conversation, FalBackend, Request
from mantis_llm.emulator import DEFAULT_KEY

ENDPOINT = "fal-ai/mantis-llava-7b-v11"
PROMPT = "What is different between <image> and <image>?"
IMAGES = ["https://example.com/a.jpg", "https://example.com/b.jpg"]
PAYLOAD = {"prompt": PROMPT, "images": [{"image_url": u} for u in IMAGES]}


@contextmanager
def emulator(service_time: float):
    """A standalone emulator process; yields its environment (FAL_KEY, FAL_QUEUE_URL, ...)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mantis_llm.emulator", "--service-time", str(service_time)],
        stdout=subprocess.PIPE,
        text=True,
    )
    env = {}
    try:
        for line in proc.stdout:
            if line.startswith("export "):
                k, _, v = line[7:].strip().partition("=")
                env[k] = v
            if line.startswith("#"):
                break
        yield env
    finally:
        proc.terminate()
        proc.wait(10)


def request() -> Request:
    conv = Conversation.from_prompt("What is different between these?", IMAGES)
    return Request(conv)


def timed(fn, n: int) -> list[float]:
    fn()  # warm up: connections, imports
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def backend(env: dict, **kw) -> FalBackend:
    return FalBackend(
        api_key=env["FAL_KEY"],
        queue_url=env["FAL_QUEUE_URL"],
        run_url=env["FAL_RUN_URL"],
        rest_url=env["FAL_REST_URL"],
        cdn_url=env["FAL_CDN_URL"],
        **kw,
    )


def fal_client_subscribe(env: dict):
    os.environ["FAL_KEY"] = env["FAL_KEY"]
    import fal_client
    import fal_client.client as fc

    fc.QUEUE_URL_FORMAT = env["FAL_QUEUE_URL"] + "/"  # the benchmark's own override
    fc.RUN_URL_FORMAT = env["FAL_RUN_URL"] + "/"
    client = fal_client.SyncClient(key=env["FAL_KEY"])
    return lambda: client.subscribe(ENDPOINT, PAYLOAD)


def part_a(n: int) -> dict:
    """Added latency at exactly 200 ms, and averaged over 200-275 ms jobs.

    fal-client polls every 100 ms, so at exactly 200 ms its third poll lands just after the
    job ends (its best case); real jobs do not last a multiple of 100 ms, hence the sweep.
    """
    out = {}
    for label, services in (("200", [0.2]), ("sweep", [0.2, 0.225, 0.25, 0.275])):
        added: dict[str, list[float]] = {"sse": [], "poll": [], "fal": []}
        for service in services:
            k = max(5, n // len(services))
            with emulator(service) as env:
                with backend(env) as ours:
                    added["sse"] += [t - service for t in timed(lambda: ours.generate(request()), k)]
                with backend(env) as polling:
                    polling._state.status_stream = False  # force the polling fallback
                    added["poll"] += [t - service for t in timed(lambda: polling.generate(request()), k)]
                added["fal"] += [t - service for t in timed(fal_client_subscribe(env), k)]
        out[label] = {k: statistics.median(v) if label == "200" else statistics.mean(v) for k, v in added.items()}
    return out


def part_b(n: int) -> dict:
    with emulator(0.2) as env:
        with backend(env, mode="sync") as ours:
            mine = timed(lambda: ours.generate(request()), n)
        with httpx.Client(timeout=30) as c:
            url = f"{env['FAL_RUN_URL']}/{ENDPOINT}"
            headers = {"Authorization": f"Key {env['FAL_KEY']}"}
            bare = timed(lambda: c.post(url, json=PAYLOAD, headers=headers).raise_for_status().json()["output"], n)
    m, b = statistics.median(mine), statistics.median(bare)
    return {"ours": m, "bare": b, "ratio": m / b}


async def _floor_httpx(env: dict, k: int) -> float:
    """The same queue flow (submit, status stream, result) in a few lines of bare httpx."""
    headers = {"Authorization": f"Key {env['FAL_KEY']}"}
    clients = [httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=None)) for _ in range(13)]

    async def one(i: int):
        c = clients[i % len(clients)]
        sub = (await c.post(f"{env['FAL_QUEUE_URL']}/{ENDPOINT}", json=PAYLOAD)).json()
        async with c.stream("GET", sub["status_url"] + "/stream") as r:
            async for chunk in r.aiter_bytes():
                if b"COMPLETED" in chunk:
                    break
        return (await c.get(sub["response_url"])).json()

    await asyncio.gather(*(one(i) for i in range(k)))
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(k)))
    wall = time.perf_counter() - t0
    for c in clients:
        await c.aclose()
    return wall


async def _floor_aiohttp(env: dict, k: int) -> float | None:
    """The same flow with aiohttp (if installed): what the emulator and machine allow."""
    try:
        import aiohttp
    except ImportError:
        return None
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Key {env['FAL_KEY']}"}, connector=aiohttp.TCPConnector(limit=0)
    ) as s:

        async def one():
            async with s.post(f"{env['FAL_QUEUE_URL']}/{ENDPOINT}", json=PAYLOAD) as r:
                sub = await r.json()
            async with s.get(sub["status_url"] + "/stream") as r:
                async for line in r.content:
                    if b"COMPLETED" in line:
                        break
            async with s.get(sub["response_url"]) as r:
                return await r.json()

        await asyncio.gather(*(one() for _ in range(k)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(k)))
        return time.perf_counter() - t0


def part_c(k: int) -> dict:
    service = 0.1
    with emulator(service) as env:

        async def run(mode: str):
            b = backend(env, mode=mode)
            await b.agenerate_batch([request() for _ in range(k)])  # warm up the pools
            t0 = time.perf_counter()
            await b.agenerate(request())
            one = time.perf_counter() - t0
            walls = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = await b.agenerate_batch([request() for _ in range(k)])
                walls.append(time.perf_counter() - t0)
                assert len(out) == k and all(r.text for r in out)
            await b.aclose()
            return one, statistics.median(walls)

        one, wall = asyncio.run(run("queue"))
        _, wall_sync = asyncio.run(run("sync"))
        floor_httpx = asyncio.run(_floor_httpx(env, k))
        floor_aiohttp = asyncio.run(_floor_aiohttp(env, k))
    return {
        "one": one,
        "wall": wall,
        "wall_sync": wall_sync,
        "floor_httpx": floor_httpx,
        "floor_aiohttp": floor_aiohttp,
        "service": service,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--concurrent", type=int, default=200)
    ns = p.parse_args()
    os.environ.setdefault("FAL_KEY", DEFAULT_KEY)
    a, b, c = part_a(ns.calls), part_b(ns.calls), part_c(ns.concurrent)
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    print(
        f"{date.today().isoformat()}, {platform.machine()} {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, httpx {httpx.__version__}; emulator in its own process\n"
    )
    print("| figure | measured | ratio | goal |")
    print("|---|---|---|---|")
    for label, what in (("200", f"200 ms jobs (median of {ns.calls})"), ("sweep", "200-275 ms jobs (mean)")):
        x = a[label]
        print(
            f"| (a) added latency per queue call, {what} | ours (SSE) {ms(x['sse'])}; fal_client.subscribe "
            f"{ms(x['fal'])}; ours polling {ms(x['poll'])} | **{x['sse'] / x['fal']:.2f}x** "
            f"(polling {x['poll'] / x['fal']:.2f}x) | <= 0.3x |"
        )
    print(
        f"| (b) sync-mode call vs bare httpx POST, 200 ms jobs (median of {ns.calls}) | ours {ms(b['ours'])}, "
        f"bare {ms(b['bare'])} | **{b['ratio']:.3f}x** | <= 1.15x |"
    )
    ideal = c["service"]
    floors = f"bare-httpx flow {ms(c['floor_httpx'])} ({c['floor_httpx'] / ideal:.1f}x)"
    if c["floor_aiohttp"] is not None:
        floors += f", aiohttp flow {ms(c['floor_aiohttp'])} ({c['floor_aiohttp'] / ideal:.1f}x)"
    print(
        f"| (c) {ns.concurrent} concurrent agenerate, 100 ms jobs (median of 3) | queue {ms(c['wall'])}, "
        f"sync mode {ms(c['wall_sync'])}; one lone call {ms(c['one'])}; floors: {floors} | "
        f"**{c['wall'] / ideal:.1f}x** ideal (sync mode {c['wall_sync'] / ideal:.1f}x; "
        f"{c['wall'] / c['floor_httpx']:.2f}x the bare-httpx flow) | <= 1.3x |"
    )


if __name__ == "__main__":
    main()
