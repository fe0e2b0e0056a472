"""The fault soak at CI size (benchmarks/soak.py runs the same code with 1,000 requests).

200 requests, half through ``ChatMantis.abatch`` and half through ``Mantis.achat``, against a
FalEmulator rolling a seeded fault on about 20% of HTTP requests (500, ingress 503, 429 with
Retry-After, dropped connections, accept-then-drop, slow first byte), once per submit policy.
Every request must be answered: with its own answer (digest recomputed from its own prompt and
images), or with the typed error its fault calls for (see benchmarks/soak.py). At most once
(the default), no job may be submitted twice; at least once, ambiguous submits are resent and
every extra job is counted in ``metrics["possible_duplicates"]``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from langchain_core.messages import HumanMessage

from mantis_llm import errors
from mantis_llm.emulator import expected_output
from mantis_llm.langchain import ChatMantis

SOAK_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
N = 200
WALL_BOUND = 30.0  # seconds (about 3 s on an idle 2-core machine)


def load_soak():
    spec = importlib.util.spec_from_file_location("mantis_soak", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["at_most_once", "at_least_once"])
def soak(request):
    module = load_soak()
    return module, module.run_soak(N, seed=1, slow_delay=0.3, retry_after=0.2, submit_policy=request.param)


def test_every_request_is_answered_with_its_own_answer(soak):
    module, res = soak
    assert res.problems == []
    assert len(res.outcomes) == N
    verdicts = res.verdicts
    assert set(verdicts) <= {"ok", "submit-ambiguous", "result-500"}
    assert verdicts["ok"] >= (0.8 if res.submit_policy == "at_most_once" else 0.97) * N
    # both frameworks really ran, and both were answered correctly
    assert {o.req.via for o in res.outcomes if o.verdict == "ok"} == {"langchain", "llama_index"}
    for o in res.outcomes:
        if o.verdict == "ok":
            assert (
                o.text == expected_output(o.req.payload) and f"digest={module.expected_digest(o.req.payload)}" in o.text
            )
        else:
            assert isinstance(o.error, errors.BackendError)


def test_faults_really_happened_and_were_retried(soak):
    _, res = soak
    for kind in ("500", "503", "429", "drop", "slow"):
        assert res.faults[kind] > 0, kind
    share = sum(res.faults.values()) / res.http_requests
    assert 0.12 < share < 0.30
    assert res.retries > 0
    assert max(o.metrics.get("retries", 0) for o in res.outcomes) >= 1


def test_no_job_is_submitted_twice_at_most_once(soak):
    _, res = soak
    if res.submit_policy != "at_most_once":
        pytest.skip("at least once, a resent submit may become a second job")
    assert res.duplicate_submissions == 0
    assert res.possible_duplicates == 0
    accepted_after_failure = sum(1 for o in res.outcomes if o.verdict == "result-500") + res.faults_by_route.get(
        ("submit", "drop_after_accept"), 0
    )
    assert res.submissions == res.verdicts["ok"] + accepted_after_failure


def test_at_least_once_resends_and_counts_every_extra_job(soak):
    _, res = soak
    if res.submit_policy != "at_least_once":
        pytest.skip("at most once, nothing is resent")
    ambiguous = sum(res.faults_by_route.get(("submit", kind), 0) for kind in ("drop", "500", "drop_after_accept"))
    assert ambiguous > 0 and res.possible_duplicates > 0  # ambiguous submits were resent, and counted
    # only an accept-then-drop really makes a second job (the others fail before accepting)
    assert sum(o.extra_jobs for o in res.outcomes) <= res.faults_by_route.get(("submit", "drop_after_accept"), 0)
    assert all(o.extra_jobs <= o.metrics["possible_duplicates"] for o in res.outcomes if o.verdict == "ok")


def test_total_time_is_bounded(soak):
    _, res = soak
    assert res.wall < WALL_BOUND
    assert res.quantile(0.95) < 5.0


def test_result_500_after_a_clean_completion_is_retried(fresh_emu):
    fresh_emu.inject("500", route="result")
    chat = ChatMantis()
    try:
        msg = chat.invoke([HumanMessage(content=[{"type": "image", "url": "http://127.0.0.1:9/a.jpg"}, "hi"])])
    finally:
        chat.close()
    assert msg.content == expected_output(fresh_emu.submissions[0].payload)
