"""One fal generation in progress: its deadline, its progress reports, its metrics, and
the retried HTTP step every flow is built from."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from ...errors import BackendError
from ...types import Request, Response, Update
from .._http.actions import Flow
from .._http.retry import Deadline, send_with_retries
from ._config import STEP_TIMEOUT, FalConfig, SharedState
from ._errors import error_for_response, timeout_error, transport_error
from ._policy import StepKind, may_have_created_job, should_retry_exception, should_retry_response

logger = logging.getLogger("mantis_llm.fal")


def status_update(data: Any, request_id: str | None) -> Update:
    """Read one status body (polled or streamed) into an :class:`Update`; logs as sent."""
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise BackendError(f"fal sent an unexpected status body: {str(data)[:200]}", request_id=request_id)
    logs = data.get("logs") or []
    metrics = data.get("metrics") or {}
    pos = data.get("queue_position")
    return Update(
        status=data["status"],
        request_id=data.get("request_id") or request_id,
        queue_position=pos if isinstance(pos, int) and not isinstance(pos, bool) else None,
        logs=[entry for entry in logs if isinstance(entry, dict)] if isinstance(logs, list) else [],
        metrics=metrics if isinstance(metrics, dict) else {},
    )


@dataclass
class Job:
    """A job fal accepted on its queue, and where to ask about it."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str
    done: bool = False  # nothing left to cancel


class Call:
    """One generation: configuration, deadline, progress tracking and metrics."""

    def __init__(
        self,
        cfg: FalConfig,
        state: SharedState,
        request: Request,
        *,
        on_update: Callable[[Update], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg, self.state, self.request, self.on_update = cfg, state, request, on_update
        self.clock, self.rng = clock, rng or random.Random()
        self.deadline = Deadline(cfg.timeout, clock)
        self.request_id: str | None = None
        self.submitted: float | None = None
        self.metrics: dict[str, Any] = {"retries": 0, "status_requests": 0, "uploads": 0, "possible_duplicates": 0}
        self.changed = False  # whether the last observed status differed from the one before
        self.emitted = False  # whether text reached the caller (a call that did cannot start over)
        self.dropped_stream = False  # whether a stream was closed mid-body on purpose (a stop sequence)
        self._last: tuple[str, int | None] | None = None
        self._seen_logs: list[dict[str, Any]] = []

    def restart(self) -> None:
        """Forget the job of a rejected attempt before the call sends its input again (same
        deadline, same counters); updates then follow the new job from its start."""
        self.request_id = self.submitted = self._last = None
        self._seen_logs = []
        for name in ("request_id", "queue_time", "inference_time", "status_transport"):
            self.metrics.pop(name, None)

    def remaining(self) -> float:
        return self.deadline.remaining()

    def check_deadline(self) -> float:
        return self.deadline.check()

    # -- progress -------------------------------------------------------------------

    def observe(self, data: Any) -> Update:
        """Track one status body; report it to ``on_update`` when something changed.

        Polled bodies carry every log line so far, streamed ones only the new lines; both
        are handled by keeping the lines seen and reporting only new ones.
        """
        upd = status_update(data, self.request_id)
        logs, seen = upd.logs, self._seen_logs
        new = logs[len(seen) :] if seen and logs[: len(seen)] == seen else logs
        self._seen_logs = seen + new
        upd.logs = new
        if upd.status != "IN_QUEUE" and "queue_time" not in self.metrics and self.submitted is not None:
            self.metrics["queue_time"] = round(self.clock() - self.submitted, 4)  # upper bound
        key = (upd.status, upd.queue_position)
        self.changed = key != self._last
        if self.changed or new:
            self._last = key
            logger.debug(
                "fal request %s: %s position=%s logs+%d", self.request_id, upd.status, upd.queue_position, len(new)
            )
            if self.on_update is not None:
                self.on_update(upd)
        return upd

    # -- one HTTP step with retries --------------------------------------------------

    def step(
        self,
        step: str,
        kind: StepKind,
        build: Callable[[float], httpx.Request],
        *,
        cap: float | None = STEP_TIMEOUT,
        stream: bool = False,
    ) -> Flow[httpx.Response]:
        """Send ``build(timeout)`` until it succeeds, retrying what ``kind`` allows.

        Returns the successful response (with ``stream``: its body not read yet); raises the
        typed error otherwise. With ``submit_policy="at_least_once"`` a job-creating step is
        also resent after failures that may have created the job, each such resend counted
        in ``metrics["possible_duplicates"]``.
        """
        resend = kind == "creates_job" and self.cfg.submit_policy == "at_least_once"
        last: list[httpx.Response | httpx.HTTPError] = []  # the failure the next retry follows

        def judged(outcome: httpx.Response | httpx.HTTPError, verdict: bool) -> bool:
            last[:] = [outcome]
            return verdict

        def retried() -> None:
            self.metrics["retries"] += 1
            if resend and may_have_created_job(last[0]):
                self.metrics["possible_duplicates"] += 1

        result = yield from send_with_retries(
            build,
            deadline=self.deadline,
            max_retries=self.cfg.max_retries,
            rng=self.rng,
            retry_exception=lambda exc: judged(exc, should_retry_exception(kind, exc, resend=resend)),
            retry_response=lambda resp: judged(resp, should_retry_response(kind, resp, resend=resend)),
            cap=cap,
            stream=stream,
            on_retry=retried,
            name=f"fal {step}",
            logger=logger,
        )
        if isinstance(result, httpx.HTTPError):
            raise transport_error(step, kind, result, self.request_id, resend=resend)
        if not result.is_success:
            raise error_for_response(result, step=step, endpoint=self.cfg.endpoint, request_id=self.request_id)
        return result

    def timeout_error(self) -> Exception:
        return timeout_error(self.cfg.timeout, self.request_id)

    # -- response ---------------------------------------------------------------------

    def response(self, text: str, stopped: bool) -> Response:
        self.metrics["elapsed"] = round(self.deadline.elapsed(), 4)
        return Response(
            text=text,
            model=self.cfg.endpoint,
            # fal reports no finish reason: "stop" only when our stop sequence ended the text.
            finish_reason="stop" if stopped else None,
            usage=None,
            request_id=self.request_id,
            metrics=dict(self.metrics),
        )
