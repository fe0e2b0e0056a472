"""The emulated queue: jobs, their lifecycle (IN_QUEUE -> IN_PROGRESS -> COMPLETED), the
fake model's answers and the scripted ones."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ._faults import FaultRoller


def digest(prompt: str, image_urls: list[str]) -> str:
    """sha256 over the prompt and each image url (NUL-separated), first 8 hex digits."""
    h = hashlib.sha256(prompt.encode())
    for url in image_urls:
        h.update(b"\0" + url.encode())
    return h.hexdigest()[:8]


def expected_digest(payload: dict[str, Any]) -> str:
    """The 8-hex digest the fake model reports for ``payload`` (prompt + image urls, in order)."""
    urls = [img.get("image_url", "") for img in payload.get("images", []) if isinstance(img, dict)]
    return digest(payload.get("prompt", ""), urls)


def expected_output(payload: dict[str, Any], answer: str | None = None) -> str:
    """The text the emulator returns for ``payload``: ``answer`` (or the fake model's), truncated
    to ``max_tokens``/``max_new_tokens`` whitespace-separated words when given."""
    if answer is None:
        n = len(payload.get("images", []))
        tail = " ".join(str(payload.get("prompt", "")).split())[-60:]
        answer = f"[mantis-emulator] {n} image{'s' if n != 1 else ''}; digest={expected_digest(payload)}; {tail}"
    limit = payload.get("max_tokens") or payload.get("max_new_tokens")
    if isinstance(limit, int) and limit > 0 and len(answer.split()) > limit:
        answer = " ".join(answer.split()[:limit])
    return answer


@dataclass(frozen=True)
class JobError:
    """A scripted (or injected) job failure: the job ends COMPLETED with ``error`` and the
    result fetch answers ``status_code`` with ``{"detail", "error_type"}``."""

    status_code: int = 500
    detail: str = "Internal Server Error"
    error_type: str = "runner_server_error"


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG: Any = _Hang()  # script entry / callable return value: the job never finishes
ScriptEntry = str | JobError | object | None
Script = collections.deque[ScriptEntry] | Callable[[Any], ScriptEntry]


def parse_script(data: Any) -> list[ScriptEntry]:
    """Script entries from JSON data (``python -m mantis_llm.emulator --script FILE``).

    ``data`` is a list, one entry per job in order: a string is the answer (``"HANG"``: the
    job never finishes), ``null`` lets the fake model answer, ``{"answer": "..."}`` is an
    answer taken literally (even ``"HANG"``), and ``{"error": {"status_code": 503, "detail":
    "Runner disconnected", "error_type": "runner_disconnected"}}`` fails the job
    (:class:`JobError`; each key optional). Raises ValueError naming the bad entry.
    """
    if not isinstance(data, list):
        raise ValueError(f"a script is a JSON list of entries, not {type(data).__name__}")
    out: list[ScriptEntry] = []
    defaults = JobError()
    for i, item in enumerate(data):
        where = f"script entry {i}"
        if item is None or isinstance(item, str):
            out.append(HANG if item == "HANG" else item)
        elif isinstance(item, dict) and set(item) == {"answer"} and isinstance(item["answer"], str):
            out.append(item["answer"])
        elif isinstance(item, dict) and set(item) == {"error"} and isinstance(item["error"], dict):
            err = item["error"]
            unknown = set(err) - {"status_code", "detail", "error_type"}
            code = err.get("status_code", defaults.status_code)
            if unknown:
                raise ValueError(f"{where}: unknown error keys {sorted(unknown)} (status_code, detail, error_type)")
            if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
                raise ValueError(f"{where}: status_code must be an HTTP error status (400-599), not {code!r}")
            if not all(isinstance(err.get(k, ""), str) for k in ("detail", "error_type")):
                raise ValueError(f"{where}: detail and error_type must be strings")
            out.append(JobError(code, err.get("detail", defaults.detail), err.get("error_type", defaults.error_type)))
        else:
            raise ValueError(
                f'{where}: expected a string, null, {{"answer": str}} or {{"error": {{...}}}}, not {json.dumps(item)}'
            )
    return out


@dataclass
class Submission:
    """One accepted job (queue submit or sync run)."""

    request_id: str
    app: str
    payload: Any
    mode: str  # "queue" | "sync" | "stream"
    time: float


class Job:
    def __init__(self, lock: threading.RLock, app: str, payload: Any, mode: str, outcome: Any) -> None:
        self.id = str(uuid.uuid4())
        self.app, self.payload, self.mode, self.outcome = app, payload, mode, outcome
        self.cond = threading.Condition(lock)
        self.status = "IN_QUEUE"
        self.logs: list[dict[str, Any]] = []
        self.version = 0
        self.created = time.monotonic()
        self.started: float | None = None
        self.completed: float | None = None
        self.deadline: float | None = None  # completion time while IN_PROGRESS
        self.start_by: float | None = None  # X-Fal-Request-Timeout: must leave the queue by then
        self.pending_logs: list[tuple[float, str]] = []
        self.result: tuple[int, dict[str, Any]] | None = None
        self.error: tuple[str, str] | None = None  # (error, error_type) on the status

    def bump(self) -> None:
        self.version += 1
        self.cond.notify_all()

    def log(self, message: str, level: str = "INFO") -> None:
        ts = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.logs.append({"message": message, "level": level, "source": "USER", "timestamp": ts})


class JobBoard:
    """Every job, the queue and the running set, advanced by one scheduler thread.

    All state is guarded by the emulator's one lock; ``service_time`` and ``concurrency``
    may change while it runs (they apply to jobs started later).
    """

    def __init__(self, lock: threading.RLock, faults: FaultRoller, *, service_time: float, concurrency: int | None):
        self._lock = lock
        self._faults = faults
        self.wake = threading.Condition(lock)
        self.service_time, self.concurrency = service_time, concurrency
        self.jobs: dict[str, Job] = {}
        self.queue: collections.deque[Job] = collections.deque()
        self.running: set[Job] = set()
        self.submissions: list[Submission] = []
        self.cancelled: list[str] = []
        self.script: Script = collections.deque()

    def run(self, stopping: threading.Event) -> None:
        """The scheduler thread: sleeps until the next due event, then advances."""
        with self._lock:
            while not stopping.is_set():
                nxt = self.advance()
                self.wake.wait(None if nxt is None else max(0.0, nxt - time.monotonic()))

    def advance(self) -> float | None:
        """Start queued jobs, emit due logs, complete due jobs; return the next deadline."""
        now = time.monotonic()
        for job in list(self.running):
            while job.pending_logs and job.pending_logs[0][0] <= now:
                job.log(job.pending_logs.pop(0)[1])
                job.bump()
            if job.deadline is not None and job.deadline <= now:
                self.complete(job)
        for job in [j for j in self.queue if j.start_by is not None and j.start_by <= now]:
            job.outcome = JobError(504, "Request timed out before it started", "request_timeout")
            self.complete(job)
        moved = False
        while self.queue and (self.concurrency is None or len(self.running) < self.concurrency):
            self._begin(self.queue.popleft(), now)
            moved = True
        if moved:
            for job in self.queue:
                job.bump()  # queue positions changed
        times = [j.deadline for j in self.running if j.deadline is not None]
        times += [j.pending_logs[0][0] for j in self.running if j.pending_logs]
        times += [j.start_by for j in self.queue if j.start_by is not None]
        return min(times) if times else None

    def _begin(self, job: Job, now: float) -> None:
        job.status, job.started = "IN_PROGRESS", now
        self.running.add(job)
        outcome = job.outcome
        if isinstance(outcome, list):  # validation errors: fail fast
            job.log("Input validation failed", "ERROR")
            job.deadline = now
        else:
            n = len(job.payload.get("images", []))
            job.log(f"Loading {n} image{'s' if n != 1 else ''}")
            if outcome is not HANG:
                job.deadline = now + self.service_time
                job.pending_logs = [(now + self.service_time / 2, "Generating")]
        job.bump()

    def complete(self, job: Job, cancelled: bool = False) -> None:
        outcome = job.outcome
        if cancelled:
            job.result = (499, {"detail": "Request cancelled", "error_type": "client_cancelled"})
            job.error = ("Request cancelled", "client_cancelled")
        elif isinstance(outcome, list):
            job.result = (422, {"detail": outcome})
            job.error = ("Unprocessable Entity: " + outcome[0]["msg"], "validation_error")
        elif isinstance(outcome, JobError):
            job.result = (outcome.status_code, {"detail": outcome.detail, "error_type": outcome.error_type})
            job.error = (outcome.detail, outcome.error_type)
            job.log(outcome.detail, "ERROR")
        else:
            job.result = (200, {"output": outcome, "partial": False})
            job.log(f"Generated {len(outcome.split())} tokens")
        job.status = "COMPLETED"
        job.completed = time.monotonic()
        job.pending_logs = []
        self.running.discard(job)
        if job in self.queue:
            self.queue.remove(job)
            for other in self.queue:
                other.bump()  # queue positions changed
        job.bump()
        self.wake.notify_all()

    def accept(
        self, app: str, payload: Any, errors: list[dict[str, Any]] | None, mode: str, timeout_header: str | None
    ) -> Job:
        """Create a job (lock held), decide its outcome and start it if a slot is free."""
        outcome: Any
        if errors:
            outcome = errors
        else:
            entry: ScriptEntry = None
            if callable(self.script):
                entry = self.script(payload)
            elif self.script:
                entry = self.script.popleft()
            f = self._faults.faults
            if entry is None and self._faults.roll_job(f.hang):
                entry = HANG
            elif entry is None and self._faults.roll_job(f.job_error):
                entry = JobError()
            if entry is not HANG and not isinstance(entry, JobError):
                entry = expected_output(payload, None if entry is None else str(entry))
            outcome = entry
        job = Job(self._lock, app, payload, mode, outcome)
        with contextlib.suppress(TypeError, ValueError):  # no (or a bad) X-Fal-Request-Timeout
            job.start_by = job.created + float(timeout_header)  # type: ignore[arg-type]
        job.log("Request queued")
        self.jobs[job.id] = job
        self.queue.append(job)
        self.submissions.append(Submission(job.id, app, payload, mode, time.time()))
        self.advance()
        self.wake.notify_all()
        return job

    def cancel(self, job: Job) -> tuple[int, dict[str, Any]]:
        """The cancel route's answer; a job not yet COMPLETED ends cancelled (lock held)."""
        self.cancelled.append(job.id)
        if job.status == "COMPLETED":
            return 400, {"status": "ALREADY_COMPLETED"}
        self.complete(job, cancelled=True)
        self.advance()  # the freed slot goes to the next queued job right away
        return 202, {"status": "CANCELLATION_REQUESTED"}

    def status_body(self, job: Job, base_url: str, with_logs: bool, since: int = 0) -> dict[str, Any]:
        base = f"{base_url}/{job.app}/requests/{job.id}"
        body: dict[str, Any] = {
            "status": job.status,
            "request_id": job.id,
            "response_url": base,
            "status_url": base + "/status",
            "cancel_url": base + "/cancel",
            "logs": job.logs[since:] if with_logs else None,
        }
        if job.status == "IN_QUEUE":
            body["queue_position"] = self.queue.index(job) if job in self.queue else 0
        if job.status == "COMPLETED":
            assert job.completed is not None
            body["metrics"] = {"inference_time": round(job.completed - (job.started or job.completed), 4)}
            if job.error:
                body["error"], body["error_type"] = job.error
        return body

    def reset(self) -> None:
        """Forget submissions, cancellations and the script (lock held)."""
        self.submissions.clear()
        self.cancelled.clear()
        self.script = collections.deque()
