"""The one retry loop of the HTTP backends: full-jitter backoff, ``Retry-After``, and a
whole-call deadline that no step, retry or sleep may overrun.

What may be retried is each backend's judgement (passed in as two predicates); the rule
that a request which may have reached the server is never resent when resending could
start a second job lives in :func:`sent_nothing`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Callable
from datetime import timezone

import httpx

from .actions import Flow, read_whole, send, sleep

BACKOFF_BASE = 0.1  # seconds; full jitter: sleep U(0, min(cap, base * 2**attempt))
BACKOFF_CAP = 10.0
RETRY_AFTER_CAP = 30.0  # a server's Retry-After is honoured up to this many seconds
ERROR_BODY_TIMEOUT = 30.0  # reading the body of a streamed error answer


class DeadlineExceeded(Exception):
    """Internal: the whole-call timeout ran out (each backend turns it into RequestTimeoutError)."""


class Deadline:
    """The end of the whole call, on ``clock`` (injectable: tests use a fake one)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.at = self.started + seconds

    def remaining(self) -> float:
        return self.at - self.clock()

    def check(self) -> float:
        """The seconds left; raises :class:`DeadlineExceeded` when there are none."""
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded
        return left

    def elapsed(self) -> float:
        return self.clock() - self.started


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff for retry number ``attempt`` (0-based)."""
    return rng.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


def sent_nothing(exc: httpx.HTTPError) -> bool:
    """The error was raised before a byte of the request left us (so resending is safe even
    for a request that starts a billable job). A read timeout or a dropped connection after
    sending may mean the server accepted it."""
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))


def send_with_retries(
    build: Callable[[float], httpx.Request],
    *,
    deadline: Deadline,
    max_retries: int,
    rng: random.Random,
    retry_exception: Callable[[httpx.HTTPError], bool],
    retry_response: Callable[[httpx.Response], bool],
    cap: float | None,
    stream: bool = False,
    on_retry: Callable[[], None] = lambda: None,
    name: str = "request",
    logger: logging.Logger = logging.getLogger("mantis_llm.http"),  # noqa: B008 - a module-level singleton
) -> Flow[httpx.Response | httpx.HTTPError]:
    """Send ``build(timeout)`` until it succeeds or may not be retried; return the last answer.

    Each attempt gets the time left, capped at ``cap`` seconds. A 2xx comes back as it is
    (with ``stream``: its body not read yet); a failure comes back as the last response
    (a streamed one read whole) or the last transport error, for the caller to turn into a
    typed error. A retry is skipped when its backoff (or ``Retry-After``) would end after
    the deadline. A timeout that used up the deadline raises :class:`DeadlineExceeded`.
    """
    attempt = 0
    while True:
        left = deadline.check()
        req = build(left if cap is None else min(cap, left))
        result = yield from send(req, stream=stream)
        if isinstance(result, httpx.HTTPError):
            logger.debug("%s %s %s -> %s", name, req.method, req.url, type(result).__name__)
            if isinstance(result, httpx.TimeoutException) and deadline.remaining() <= 0.01:
                raise DeadlineExceeded
            if attempt >= max_retries or not retry_exception(result):
                return result
            delay = backoff_delay(attempt, rng)
        else:
            logger.debug("%s %s %s -> %s", name, req.method, req.url, result.status_code)
            if result.is_success:
                return result
            if stream:
                result = yield from read_whole(result, lambda: max(min(deadline.remaining(), ERROR_BODY_TIMEOUT), 1e-3))
            if attempt >= max_retries or not retry_response(result):
                return result
            after = parse_retry_after(result.headers.get("retry-after"))
            delay = backoff_delay(attempt, rng) if after is None else min(after, RETRY_AFTER_CAP)
        if delay >= deadline.remaining():
            return result
        attempt += 1
        on_retry()
        yield from sleep(delay)
