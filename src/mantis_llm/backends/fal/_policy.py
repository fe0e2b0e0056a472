"""Which fal answers may be retried, for each kind of step (pure functions).

A step that creates a billable job is resent only when fal's answer proves the job was not
created: the official client retries any transport error, submits included, which can run
(and bill) a job twice. With ``resend=True`` (``submit_policy="at_least_once"``) it is also
resent after a failure that may have created the job (:func:`may_have_created_job`), as a
read would be.
"""

from __future__ import annotations

from typing import Literal

import httpx

from .._http.retry import sent_nothing

StepKind = Literal["creates_job", "idempotent", "status", "result", "cancel"]
"""``creates_job``: submit, sync run, token stream. ``idempotent``: upload, storage token,
the result of a failed job. ``status``: status reads (fal's own 5xx there never concern the
job). ``result``: the result GET of a job whose status said COMPLETED without an error, so a
5xx there is fal's trouble fetching a good answer, not the job's. ``cancel``: best effort,
one try."""


def is_ingress_error(resp: httpx.Response) -> bool:
    """A 502/503/504 from fal's ingress (no ``x-fal-request-id``): the app never saw it."""
    return resp.status_code in (502, 503, 504) and "x-fal-request-id" not in resp.headers


def should_retry_response(kind: StepKind, resp: httpx.Response, *, resend: bool = False) -> bool:
    code = resp.status_code
    if code == 504 and resp.headers.get("x-fal-request-timeout-type"):
        return False  # the caller's own server-side timeout expired: final
    if kind == "creates_job" and resend:
        return code in (408, 409, 429, 500, 502, 503, 504)
    if kind == "creates_job":
        return code in (408, 429) or (code == 503 and is_ingress_error(resp))
    if kind == "status":
        return code in (408, 409, 429) or code >= 500
    if kind == "result":
        return code in (408, 409, 429, 500, 502, 503, 504)
    if kind == "idempotent":
        return code in (408, 409, 429) or is_ingress_error(resp)
    return False


def should_retry_exception(kind: StepKind, exc: httpx.HTTPError, *, resend: bool = False) -> bool:
    if kind == "cancel":
        return False
    if kind == "creates_job" and not resend:
        return sent_nothing(exc)
    return isinstance(exc, httpx.TransportError)


def may_have_created_job(outcome: httpx.Response | httpx.HTTPError) -> bool:
    """Whether a failed job-creating POST may have created the job anyway: anything but a
    transport error raised before sending, or an answer that proves it was refused."""
    if isinstance(outcome, httpx.HTTPError):
        return not sent_nothing(outcome)
    return not should_retry_response("creates_job", outcome)
