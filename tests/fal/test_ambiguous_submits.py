"""A POST that creates a job and fails after it was sent (a dropped connection, fal's own
500) is ambiguous: the job may exist. By default it is never resent (at most once: no
duplicate billing); ``submit_policy="at_least_once"`` resends it and counts each resend that
may have duplicated a job in ``metrics["possible_duplicates"]``."""

from __future__ import annotations

import httpx
import pytest

from mantis_llm import Conversation, Request, errors
from mantis_llm.backends.fal import _policy
from mantis_llm.emulator import expected_output

POST_ROUTE = {"queue": "submit", "sync": "run", "stream": "run_stream"}


def req(prompt="What is in the picture?") -> Request:
    return Request(Conversation.from_prompt(prompt, ["https://example.com/cat.jpg"]))


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
@pytest.mark.parametrize("fault", ["drop", "500"])
def test_by_default_an_ambiguous_post_is_not_resent(fresh_emu, make, mode, fault):
    fresh_emu.inject(fault, route=POST_ROUTE[mode])
    with pytest.raises(errors.BackendError) as ei:
        make(mode=mode).generate(req())
    route = POST_ROUTE[mode]
    assert [r.route for r in fresh_emu.requests].count(route) == 1
    if fault == "drop":
        assert "not resent" in str(ei.value) and "submit_policy='at_least_once'" in str(ei.value)
    else:
        assert ei.value.status_code == 500


@pytest.mark.parametrize("mode", ["queue", "sync", "stream"])
@pytest.mark.parametrize("fault", ["drop", "500", "drop_after_accept"])
async def test_at_least_once_resends_and_counts_possible_duplicates(fresh_emu, make, mode, fault):
    if fault == "drop_after_accept" and mode != "queue":
        pytest.skip("accept-then-drop is a queue submit fault")
    route = POST_ROUTE[mode]
    b = make(mode=mode, submit_policy="at_least_once")
    fresh_emu.inject(fault, route=route)
    r = b.generate(req("first"))
    assert r.text == expected_output(fresh_emu.submissions[-1].payload)
    assert r.metrics["retries"] == 1 and r.metrics["possible_duplicates"] == 1
    assert [x.route for x in fresh_emu.requests].count(route) == 2
    # accept-then-drop really made a second job: the duplicate the metric warns of
    assert len(fresh_emu.submissions) == (2 if fault == "drop_after_accept" else 1)
    fresh_emu.inject(fault, route=route)
    r = await b.agenerate(req("second"))
    assert r.metrics["possible_duplicates"] == 1 and r.text == expected_output(fresh_emu.submissions[-1].payload)


def test_at_least_once_does_not_count_what_proves_no_job(fresh_emu, make):
    fresh_emu.faults = {"retry_after": 0.01}
    fresh_emu.inject("429", route="submit")
    fresh_emu.inject("503", route="submit")  # ingress 503: the app never saw it
    r = make(submit_policy="at_least_once").generate(req())
    assert r.metrics["retries"] == 2 and r.metrics["possible_duplicates"] == 0


def test_at_least_once_gives_up_after_max_retries_and_never_resends_a_422(fresh_emu, make):
    fresh_emu.faults = {"drop": 1.0, "routes": frozenset({"submit"})}
    with pytest.raises(errors.BackendError, match="cannot reach fal") as ei:
        make(submit_policy="at_least_once", max_retries=2).generate(req())
    assert "not resent" not in str(ei.value)
    assert [r.route for r in fresh_emu.requests].count("submit") == 3
    fresh_emu.reset()
    with pytest.raises(errors.InvalidRequestError):
        make(mode="sync", submit_policy="at_least_once", extra_input={"max_tokens": 0}).generate(req())
    assert [r.route for r in fresh_emu.requests] == ["run"]


def test_default_metrics_report_no_possible_duplicates(fresh_emu, make):
    assert make().generate(req()).metrics["possible_duplicates"] == 0


def test_the_option_is_checked():
    from mantis_llm import FalBackend

    with pytest.raises(errors.ConfigurationError, match="submit_policy"):
        FalBackend(api_key="k", submit_policy="exactly_once")


def test_the_policy_functions():
    sent = httpx.Request("POST", "https://queue.fal.run/x/y")
    dropped = httpx.RemoteProtocolError("closed", request=sent)
    refused = httpx.ConnectError("refused", request=sent)
    ingress = httpx.Response(503, text="nginx")
    own_500 = httpx.Response(500, json={"detail": "boom"}, headers={"x-fal-request-id": "r"})
    user_timeout = httpx.Response(504, headers={"x-fal-request-timeout-type": "user"})
    assert not _policy.should_retry_exception("creates_job", dropped)
    assert _policy.should_retry_exception("creates_job", dropped, resend=True)
    assert _policy.should_retry_exception("creates_job", refused)
    assert not _policy.should_retry_response("creates_job", own_500)
    assert _policy.should_retry_response("creates_job", own_500, resend=True)
    assert not _policy.should_retry_response("creates_job", user_timeout, resend=True)
    assert not _policy.should_retry_response("creates_job", httpx.Response(422), resend=True)
    assert [_policy.may_have_created_job(x) for x in (dropped, refused, ingress, own_500)] == [True, False, False, True]
