"""Fault soak: many requests through ChatMantis.abatch and LlamaIndex Mantis.achat against a
FalEmulator that injects faults on about 20% of HTTP requests (run by hand; prints Markdown).

    /work/venv/bin/python benchmarks/soak.py [--requests 1000] [--seed 0] [--submit-policy both]

Half the requests go through ``ChatMantis.abatch`` (LangChain), half through ``Mantis.achat``
(LlamaIndex), concurrently on one event loop. Each request has its own prompt and 1-3 images
(http URLs passed through, and small PNGs sent as data URIs). The emulator rolls one seeded
fault per HTTP request: 500 (with ``x-fal-request-id``), ingress 503 (nginx page, no request
id), 429 with ``Retry-After``, dropped connection, accept-then-drop on submit, and separately a
slow first byte. Every request must end as one of:

* ``ok``: the answer is the fake model's answer for *this* request's prompt and images (its
  digest recomputed here from the request, not read back from the emulator);
* an *ambiguous* failure that the design refuses to retry, checked against the emulator's
  records for that very request: the submit met a 500 or a dropped connection
  (``submit-ambiguous``: fal may or may not have accepted the job, and resending could bill
  it twice);
* ``result-500``: the result fetch of a job whose status said COMPLETED without error kept
  meeting 500s until FalBackend's retries ran out (it retries that idempotent GET, so this
  stays 0 unless the faults outlast ``max_retries``).

It runs in either submit policy of FalBackend (``--submit-policy``, default ``both``, one run
after the other): ``at_most_once`` (the default: an ambiguous submit is never resent, so no job
is ever submitted twice) and ``at_least_once`` (ambiguous submits are resent; a request may
then become two jobs, and every such extra job must be counted in that request's
``metrics["possible_duplicates"]``).

Anything else (a wrong answer, an untyped exception, a failure with no matching fault, a job
submitted twice at most once, an extra job not counted at least once) is a soak failure.
``tests/hardening/test_soak.py`` runs the same code at a reduced size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import date

from mantis_llm import errors
from mantis_llm.emulator import FalEmulator, Faults, expected_digest, expected_output

AMBIGUOUS_SUBMIT_FAULTS = ("500", "drop", "drop_after_accept")
POLICIES = ("at_most_once", "at_least_once")


def soak_faults(seed: int = 0, *, slow_delay: float = 1.0, retry_after: float = 1.0) -> Faults:
    """About 20% of HTTP requests get a fault: 15% errors/drops on every route (plus 1%
    accept-then-drop on submits) and 4% slow first bytes."""
    return Faults(
        error_500=0.03, error_503=0.04, error_429=0.04, drop=0.04, drop_after_accept=0.01,
        slow=0.04, slow_delay=slow_delay, retry_after=retry_after, seed=seed,
    )  # fmt: skip


def _png(seed: int) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    img = Image.new("RGB", (24, 16), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class SoakRequest:
    """One request: its parts (text or ("url"|"b64", value)), and what fal must receive."""

    index: int
    via: str  # "langchain" | "llama_index"
    parts: list
    prompt: str = ""  # the rendered fal prompt
    image_urls: list[str] = field(default_factory=list)  # what fal must receive, in order

    @property
    def payload(self) -> dict:
        return {"prompt": self.prompt, "images": [{"image_url": u} for u in self.image_urls]}


def make_requests(n: int, seed: int, url_host: str = "http://127.0.0.1:9") -> list[SoakRequest]:
    """``n`` distinct requests (unique prompts; 1-3 images each, URLs and data URIs mixed)."""
    from mantis_llm.prompt import render
    from mantis_llm.types import Conversation, Image, Turn

    rng = random.Random(seed)
    pngs = [base64.b64encode(_png(seed * 100 + k)).decode() for k in range(4)]
    out = []
    for i in range(n):
        parts: list = [f"Request {i} (nonce {rng.getrandbits(32):08x}): compare"]
        for j in range(rng.randint(1, 3)):
            if rng.random() < 0.7:
                parts.append(("url", f"{url_host}/img/{rng.randrange(50)}.jpg"))
            else:
                parts.append(("b64", rng.choice(pngs)))
            if j == 0:
                parts.append("with")
        parts.append("<image> is literal text here.")
        req = SoakRequest(i, "langchain" if i % 2 == 0 else "llama_index", parts)
        turn_parts = [
            p if isinstance(p, str) else Image(p[1] if p[0] == "url" else base64.b64decode(p[1])) for p in parts
        ]
        req.prompt = render(Conversation([Turn("user", turn_parts)]), "fal").text
        req.image_urls = [
            p[1] if p[0] == "url" else f"data:image/png;base64,{p[1]}" for p in parts if not isinstance(p, str)
        ]
        out.append(req)
    return out


def to_langchain(req: SoakRequest):
    from langchain_core.messages import HumanMessage

    blocks = []
    for p in req.parts:
        if isinstance(p, str):
            blocks.append({"type": "text", "text": p})
        elif p[0] == "url":
            blocks.append({"type": "image", "url": p[1]})
        else:
            blocks.append({"type": "image", "base64": p[1], "mime_type": "image/png"})
    return [HumanMessage(content=blocks)]


def to_llama_index(req: SoakRequest):
    from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock

    blocks = []
    for p in req.parts:
        if isinstance(p, str):
            blocks.append(TextBlock(text=p))
        elif p[0] == "url":
            blocks.append(ImageBlock(url=p[1]))
        else:
            blocks.append(ImageBlock(image=base64.b64decode(p[1]), image_mimetype="image/png"))
    return [ChatMessage(role="user", blocks=blocks)]


@dataclass
class Outcome:
    req: SoakRequest
    text: str | None = None
    error: BaseException | None = None
    request_id: str | None = None
    metrics: dict = field(default_factory=dict)
    verdict: str = ""  # ok | submit-ambiguous | result-500 | WRONG: ...
    extra_jobs: int = 0  # jobs accepted for this request beyond the one that answered


@dataclass
class SoakResult:
    n: int
    submit_policy: str
    wall: float
    outcomes: list[Outcome]
    verdicts: collections.Counter
    faults: collections.Counter  # injected, by kind
    faults_by_route: collections.Counter  # (route, kind)
    http_requests: int
    submissions: int
    duplicate_submissions: int
    retries: int
    possible_duplicates: int  # counted by FalBackend in the answered calls' metrics
    latencies: list[float]  # backend-measured seconds per successful call

    @property
    def problems(self) -> list[str]:
        """Every way this run broke the soak's rules (empty when it passed)."""
        out = [
            f"request {o.req.index} ({o.req.via}): {o.verdict}" for o in self.outcomes if o.verdict.startswith("WRONG")
        ]
        if self.duplicate_submissions and self.submit_policy == "at_most_once":
            out.append(f"{self.duplicate_submissions} payloads were submitted more than once")
        return out

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _classify(o: Outcome, by_prompt: dict, by_rid: dict, accepted: dict, policy: str) -> str:
    req = o.req
    if o.error is None:
        jobs = accepted.get(req.prompt, [])
        if o.text != expected_output(req.payload):
            return f"WRONG: answer {o.text!r} is not this request's ({expected_digest(req.payload)})"
        if o.request_id not in jobs:
            return f"WRONG: answered by {o.request_id}, which is not one of its jobs {jobs}"
        o.extra_jobs = len(jobs) - 1
        if policy == "at_most_once" and o.extra_jobs:
            return f"WRONG: answered, but accepted as jobs {jobs} (answer from {o.request_id})"
        if o.extra_jobs > o.metrics.get("possible_duplicates", 0):
            return f"WRONG: {o.extra_jobs} extra jobs {jobs}, {o.metrics.get('possible_duplicates')} counted"
        return "ok"
    err = o.error
    if not isinstance(err, errors.MantisError):
        return f"WRONG: untyped {type(err).__name__}: {err}"
    submits = by_prompt.get(req.prompt, [])
    if submits and submits[-1].fault in AMBIGUOUS_SUBMIT_FAULTS and "fal submit failed" in err.message:
        return "submit-ambiguous"
    # the job this request became, if fal accepted it (an error's own request_id may come
    # from a response header rather than from the job)
    jobs = accepted.get(req.prompt, [])
    results = by_rid.get(jobs[-1], []) if jobs else []
    if (
        isinstance(err, errors.BackendError)
        and err.status_code == 500
        and results
        and results[-1].fault == "500"
        and "fal result failed" in err.message
    ):
        return "result-500"
    faults = [r.fault for r in submits] + [r.fault for r in results]
    return f"WRONG: {type(err).__name__}: {err} (faults seen: {faults})"


async def _run(
    emu: FalEmulator, reqs: list[SoakRequest], concurrency: int, max_retries: int, timeout: float, policy: str
) -> list[Outcome]:
    from mantis_llm.langchain import ChatMantis
    from mantis_llm.llama_index import Mantis

    options = {name: getattr(emu, name) for name in ("queue_url", "run_url", "rest_url", "cdn_url")}
    options["submit_policy"] = policy
    common = dict(api_key=emu.key, max_retries=max_retries, timeout=timeout, backend_options=options)
    chat, llm = ChatMantis(**common), Mantis(**common)
    lc = [r for r in reqs if r.via == "langchain"]
    li = [r for r in reqs if r.via == "llama_index"]
    outcomes: dict[int, Outcome] = {}

    async def langchain_side() -> None:
        answers = await chat.abatch(
            [to_langchain(r) for r in lc], config={"max_concurrency": concurrency}, return_exceptions=True
        )
        for r, a in zip(lc, answers, strict=True):
            if isinstance(a, BaseException):
                outcomes[r.index] = Outcome(r, error=a, request_id=getattr(a, "request_id", None))
            else:
                meta = a.response_metadata
                outcomes[r.index] = Outcome(
                    r, text=a.content, request_id=meta.get("request_id"), metrics=meta.get("metrics", {})
                )

    gate = asyncio.Semaphore(concurrency)

    async def one(r: SoakRequest) -> None:
        async with gate:
            try:
                resp = await llm.achat(to_llama_index(r))
            except Exception as exc:  # noqa: BLE001 - classified below
                outcomes[r.index] = Outcome(r, error=exc, request_id=getattr(exc, "request_id", None))
            else:
                outcomes[r.index] = Outcome(
                    r, text=resp.message.content, request_id=resp.raw["request_id"], metrics=resp.raw["metrics"]
                )

    try:
        await asyncio.gather(langchain_side(), *(one(r) for r in li))
    finally:
        await chat.aclose()
        await llm.aclose()
    return [outcomes[r.index] for r in reqs]


def run_soak(
    n: int = 1000,
    *,
    seed: int = 0,
    concurrency: int = 16,
    service_time: float = 0.05,
    slow_delay: float = 1.0,
    retry_after: float = 1.0,
    max_retries: int = 8,
    timeout: float = 120.0,
    submit_policy: str = "at_most_once",
) -> SoakResult:
    """Run the soak with ``n`` requests (half per framework, ``concurrency`` at a time each)
    and FalBackend's ``submit_policy``."""
    if submit_policy not in POLICIES:
        raise ValueError(f"submit_policy must be one of {POLICIES}")
    import logging

    logging.getLogger("mantis_llm.emulator").setLevel(logging.CRITICAL)  # dropped connections are the point
    reqs = make_requests(n, seed)
    with FalEmulator(service_time=service_time) as emu:
        emu.faults = soak_faults(seed, slow_delay=slow_delay, retry_after=retry_after)
        t0 = time.perf_counter()
        outcomes = asyncio.run(_run(emu, reqs, concurrency, max_retries, timeout, submit_policy))
        wall = time.perf_counter() - t0
        records, subs = emu.requests, emu.submissions
    by_prompt: dict[str, list] = collections.defaultdict(list)
    by_rid: dict[str, list] = collections.defaultdict(list)
    for rec in records:
        if rec.route == "submit" and isinstance(rec.json, dict):
            by_prompt[rec.json.get("prompt")].append(rec)
        elif rec.route == "result":
            by_rid[rec.path.rsplit("/", 1)[-1]].append(rec)
    accepted: dict[str, list[str]] = collections.defaultdict(list)  # prompt -> accepted job ids
    for s in subs:
        accepted[s.payload.get("prompt")].append(s.request_id)
    for o in outcomes:
        o.verdict = _classify(o, by_prompt, by_rid, accepted, submit_policy)
    digests = collections.Counter(expected_digest(s.payload) for s in subs)
    return SoakResult(
        n=n,
        submit_policy=submit_policy,
        wall=wall,
        outcomes=outcomes,
        verdicts=collections.Counter(o.verdict.split(":")[0] for o in outcomes),
        faults=collections.Counter(r.fault for r in records if r.fault),
        faults_by_route=collections.Counter((r.route, r.fault) for r in records if r.fault),
        http_requests=len(records),
        submissions=len(subs),
        duplicate_submissions=sum(c - 1 for c in digests.values() if c > 1),
        retries=sum(o.metrics.get("retries", 0) for o in outcomes),
        possible_duplicates=sum(o.metrics.get("possible_duplicates", 0) for o in outcomes),
        latencies=[o.metrics["elapsed"] for o in outcomes if o.error is None and "elapsed" in o.metrics],
    )


def report(res: SoakResult, seed: int) -> str:
    """The figures as a Markdown block for benchmarks/RESULTS.md."""
    v = res.verdicts
    faults = ", ".join(f"{k} {c}" for k, c in sorted(res.faults.items(), key=lambda kv: -kv[1]))
    n_faults = sum(res.faults.values())
    extra = sum(o.extra_jobs for o in res.outcomes)
    why = "not resent by design" if res.submit_policy == "at_most_once" else "resent until max_retries ran out"
    lines = [
        f"`submit_policy={res.submit_policy!r}`: {date.today().isoformat()}, {platform.machine()} {os.cpu_count()} "
        f"cores, Python {platform.python_version()}; emulator in-process, 50 ms jobs, seed {seed}, 16 concurrent "
        "per framework, max_retries=8, Retry-After 1 s, slow first byte 1 s.",
        "",
        "| figure | measured |",
        "|---|---|",
        f"| requests (LangChain abatch / LlamaIndex achat) | {res.n} ({res.n - res.n // 2} / {res.n // 2}) |",
        f"| total wall time | {res.wall:.1f} s ({res.n / res.wall:.0f} requests/s) |",
        f"| HTTP requests seen by the emulator | {res.http_requests} |",
        f"| faults injected | {n_faults} ({n_faults / res.http_requests:.1%} of HTTP requests): {faults} |",
        f"| retries made by FalBackend (in the answered calls) | {res.retries} |",
        f"| answered correctly (own digest) | {v['ok']} |",
        f"| typed BackendError, submit hit by 500/drop ({why}) | {v['submit-ambiguous']} |",
        f"| typed BackendError, result fetch still failing after every retry | {v['result-500']} |",
        f"| wrong answers / untyped or unexplained errors | {sum(c for k, c in v.items() if k == 'WRONG')} |",
        f"| jobs accepted / payloads submitted twice | {res.submissions} / {res.duplicate_submissions} |",
        f"| answered requests that became 2+ jobs: extra jobs / counted in metrics['possible_duplicates'] | "
        f"{extra} / {res.possible_duplicates} |",
        f"| latency per answered call, p50 / p95 / max | {res.quantile(0.5) * 1000:.0f} / "
        f"{res.quantile(0.95) * 1000:.0f} / {max(res.latencies) * 1000:.0f} ms |",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--submit-policy", choices=(*POLICIES, "both"), default="both", help="FalBackend's submit_policy (default both)"
    )
    ns = p.parse_args()
    failed = False
    for policy in POLICIES if ns.submit_policy == "both" else (ns.submit_policy,):
        res = run_soak(ns.requests, seed=ns.seed, submit_policy=policy)
        print(report(res, ns.seed), end="\n\n", flush=True)
        for problem in res.problems:
            print(f"PROBLEM ({policy}):", problem, file=sys.stderr)
        failed = failed or bool(res.problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
