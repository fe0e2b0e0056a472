"""FalEmulator: a local HTTP server that speaks fal's queue, sync and storage protocol.

It runs a deterministic fake Mantis (or a script of canned answers) so that our tests,
notebooks and benchmarks, and users' own offline tests, exercise the real HTTP code path::

    with FalEmulator(service_time=0.05) as emu:
        backend = FalBackend(api_key=emu.key, queue_url=emu.queue_url, run_url=emu.run_url)
        ...
        assert len(emu.submissions) == 1

URL layout (``emu.url`` is ``http://127.0.0.1:PORT``)::

    POST {url}/{owner}/{app}                           submit -> {"request_id", "status_url", ...}
    GET  {url}/{owner}/{app}/requests/{id}/status      202 while queued/running, 200 when COMPLETED
    GET  {url}/{owner}/{app}/requests/{id}/status/stream   SSE, one status per change
    GET  {url}/{owner}/{app}/requests/{id}             the result (or the job's error)
    PUT  {url}/{owner}/{app}/requests/{id}/cancel      202 / 400 ALREADY_COMPLETED / 404
    POST {url}/run/{owner}/{app}[/stream]              sync run (JSON or SSE of partial outputs)
    POST {url}/rest/storage/auth/token?storage_type=fal-cdn-v3     CDN token
    POST {url}/cdn/files/upload   (Bearer token)       -> {"access_url": "{url}/cdn/files/<id>/<name>"}

Standard library only (plus Pillow to check images). Run it standalone with
``python -m mantis_llm.emulator``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import hashlib
import io
import json
import logging
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union
from urllib.parse import parse_qsl, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_KEY = "emulator-key-id:emulator-key-secret"
FORBIDDEN_KEY = "emulator-forbidden-id:emulator-forbidden-secret"
DEFAULT_APPS = ("fal-ai/mantis-llava-7b-v11",)
IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
NGINX_503 = (
    "<html><head><title>503 Service Temporarily Unavailable</title></head><body>"
    "<center><h1>503 Service Temporarily Unavailable</h1></center><hr><center>nginx</center>"
    "</body></html>"
)
_DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)", re.S)
FAULT_KINDS = ("drop", "503", "500", "429", "slow", "drop_after_accept", "cut")
ROUTES = ("submit", "status", "stream", "result", "cancel", "run", "run_stream", "token", "upload", "file")


# ---------------------------------------------------------------- fake model


def expected_digest(payload: dict) -> str:
    """The 8-hex digest the fake model reports for ``payload`` (prompt + image urls, in order)."""
    urls = [img.get("image_url", "") for img in payload.get("images", []) if isinstance(img, dict)]
    return FalEmulator.digest(payload.get("prompt", ""), urls)


def expected_output(payload: dict, answer: str | None = None) -> str:
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


HANG = _Hang()  # script entry / callable return value: the job never finishes
ScriptEntry = Union[str, JobError, object, None]


# ---------------------------------------------------------------- records and settings


@dataclass
class RecordedRequest:
    """One HTTP request the emulator received (headers with lower-case names)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    time: float
    route: str | None = None
    status: int | None = None  # None: connection dropped without a response
    fault: str | None = None


@dataclass
class Submission:
    """One accepted job (queue submit or sync run)."""

    request_id: str
    app: str
    payload: Any
    mode: str  # "queue" | "sync" | "stream"
    time: float


@dataclass
class Faults:
    """Fault injection. Fractions are per request (one seeded roll per request picks at most
    one of drop/503/500/429/drop_after_accept/cut; ``slow`` is rolled separately);
    ``job_error``/``hang`` per job. ``routes`` limits request faults to those route names
    (see ``ROUTES``); None = all.
    Faults on submit happen before the job is accepted, except ``drop_after_accept``."""

    error_500: float = 0.0
    error_503: float = 0.0  # ingress 503: no x-fal-request-id, nginx HTML body
    # 500 and 429 on a job's routes carry that job's x-fal-request-id (a 500 elsewhere: a new id)
    error_429: float = 0.0
    drop: float = 0.0  # close the connection without a response
    drop_after_accept: float = 0.0  # submit only: accept the job, then drop the connection
    cut: float = 0.0  # SSE routes only: send the first event, then drop the connection
    slow: float = 0.0  # delay the first byte by slow_delay seconds
    slow_delay: float = 1.0
    retry_after: float = 1.0  # Retry-After seconds sent with 429
    job_error: float = 0.0
    hang: float = 0.0  # True/1.0: every job hangs
    routes: frozenset[str] | None = None
    seed: int | None = 0


class _Job:
    def __init__(self, emu: FalEmulator, app: str, payload: Any, mode: str, outcome: Any) -> None:
        self.id = str(uuid.uuid4())
        self.app, self.payload, self.mode, self.outcome = app, payload, mode, outcome
        self.cond = threading.Condition(emu._lock)
        self.status = "IN_QUEUE"
        self.logs: list[dict] = []
        self.version = 0
        self.created = time.monotonic()
        self.started: float | None = None
        self.completed: float | None = None
        self.deadline: float | None = None  # completion time while IN_PROGRESS
        self.start_by: float | None = None  # X-Fal-Request-Timeout: must leave the queue by then
        self.pending_logs: list[tuple[float, str]] = []
        self.result: tuple[int, dict] | None = None
        self.error: tuple[str, str] | None = None  # (error, error_type) on the status

    def bump(self) -> None:
        self.version += 1
        self.cond.notify_all()

    def log(self, message: str, level: str = "INFO") -> None:
        ts = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        self.logs.append({"message": message, "level": level, "source": "USER", "timestamp": ts})


# ---------------------------------------------------------------- validation


def _err(loc: list, msg: str, type_: str, **ctx: Any) -> dict:
    d: dict[str, Any] = {"loc": ["body", *loc], "msg": msg, "type": type_}
    if ctx:
        d["ctx"] = ctx
    return d


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # client went away etc.
        logger.debug("emulator connection error", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mantis-emulator/0.1"
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are closed after this

    def setup(self) -> None:
        super().setup()
        self.server.emu._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        self.server.emu._track(self.connection, False)  # type: ignore[attr-defined]
        try:
            super().finish()
        except OSError:
            pass

    def _dispatch(self) -> None:
        self.server.emu._handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("emulator: " + format, *args)


class _Dropped(Exception):
    """Raised to close the connection without a response."""


class FalEmulator:
    """A fal-protocol HTTP server on 127.0.0.1 with a deterministic fake Mantis.

    Args:
        port: 0 picks a free port.
        key: the accepted ``Authorization: Key`` value; None accepts any non-empty key.
        forbidden_key: a key answered with 403.
        service_time: seconds each job spends IN_PROGRESS.
        concurrency: max jobs in progress at once (others wait IN_QUEUE); None = unlimited.
        apps: known endpoint ids (others get 404); None accepts any ``owner/app``.
        faults: a :class:`Faults`, or keyword fields of one (``faults={"error_503": 0.2}``).
        hang: shortcut for ``Faults(hang=1.0)``: every job runs forever (until cancelled).
        ping_interval: seconds between ``: ping`` comments on an idle SSE status stream.

    ``key``, ``service_time``, ``concurrency`` and ``faults`` may be changed while it runs (they
    apply to later requests/jobs). Records: ``requests``, ``submissions``, ``cancelled``, ``uploads``.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        key: str | None = DEFAULT_KEY,
        forbidden_key: str | None = FORBIDDEN_KEY,
        service_time: float = 0.05,
        concurrency: int | None = None,
        apps: tuple[str, ...] | None = DEFAULT_APPS,
        faults: Faults | dict | None = None,
        hang: bool = False,
        ping_interval: float = 10.0,
    ) -> None:
        self.port, self.key, self.forbidden_key = port, key, forbidden_key
        self.service_time, self.concurrency, self.ping_interval = service_time, concurrency, ping_interval
        self.apps = None if apps is None else set(apps)
        self._lock = threading.RLock()
        self._sched = threading.Condition(self._lock)
        self.faults = faults if faults is not None else Faults()
        if hang:
            self.faults = replace(self.faults, hang=1.0)
        self._jobs: dict[str, _Job] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._running: set[_Job] = set()
        self._requests: list[RecordedRequest] = []
        self._submissions: list[Submission] = []
        self._cancelled: list[str] = []
        self._script: collections.deque | Callable[[Any], ScriptEntry] = collections.deque()
        self._oneshot: list[tuple[str, str | None]] = []
        self._tokens: dict[str, float] = {}
        self._files: dict[str, tuple[str, bytes]] = {}
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -------------------------------------------------------------- public API

    @staticmethod
    def digest(prompt: str, image_urls: list[str]) -> str:
        """sha256 over the prompt and each image url (NUL-separated), first 8 hex digits."""
        h = hashlib.sha256(prompt.encode())
        for url in image_urls:
            h.update(b"\0" + url.encode())
        return h.hexdigest()[:8]

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FalEmulator is not running: call start() or use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    queue_url = url

    @property
    def run_url(self) -> str:
        return self.url + "/run"

    @property
    def rest_url(self) -> str:
        return self.url + "/rest"

    @property
    def cdn_url(self) -> str:
        return self.url + "/cdn"

    def env(self) -> dict[str, str]:
        """Environment variables that point a FalBackend at this emulator."""
        return {
            "FAL_KEY": self.key or "emulator-any-key",
            "FAL_QUEUE_URL": self.queue_url,
            "FAL_RUN_URL": self.run_url,
            "FAL_REST_URL": self.rest_url,
            "FAL_CDN_URL": self.cdn_url,
        }

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, value: Faults | dict) -> None:
        value = Faults(**value) if isinstance(value, dict) else value
        with self._lock:
            self._faults = value
            self._rng = random.Random(value.seed)

    def inject(self, kind: str, count: int = 1, route: str | None = None) -> None:
        """Force the next ``count`` requests (on ``route``, or any) to get fault ``kind``
        (one of ``FAULT_KINDS``), before any random fault is rolled."""
        if kind not in FAULT_KINDS or (route is not None and route not in ROUTES):
            raise ValueError(f"unknown fault {kind!r} or route {route!r}")
        with self._lock:
            self._oneshot.extend([(kind, route)] * count)

    def script(self, answers: list[ScriptEntry] | Callable[[Any], ScriptEntry]) -> None:
        """Canned answers for the next jobs, in order (str, :class:`JobError` or ``HANG``), or a
        callable ``(payload) -> entry`` (None = fake model). Invalid inputs consume nothing."""
        with self._lock:
            self._script = answers if callable(answers) else collections.deque(answers)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def submissions(self) -> list[Submission]:
        with self._lock:
            return list(self._submissions)

    @property
    def cancelled(self) -> list[str]:
        with self._lock:
            return list(self._cancelled)

    @property
    def uploads(self) -> list[str]:
        """Access URLs of the files uploaded to the emulated CDN."""
        with self._lock:
            return [f"{self.cdn_url}/files/{fid}" for fid in self._files]

    def job_status(self, request_id: str) -> str | None:
        """IN_QUEUE / IN_PROGRESS / COMPLETED for a request id (queue or sync), None if unknown."""
        with self._lock:
            job = self._jobs.get(request_id)
            return job.status if job else None

    def reset(self) -> None:
        """Forget recorded requests, submissions, cancellations, script and faults."""
        with self._lock:
            self._requests.clear()
            self._submissions.clear()
            self._cancelled.clear()
            self._script = collections.deque()
            self._oneshot.clear()
            self.faults = Faults()

    def start(self) -> FalEmulator:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.emu = self  # type: ignore[attr-defined]
        self._server = server
        self._threads = [
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fal-emulator-http"
            ),
            threading.Thread(target=self._scheduler, daemon=True, name="fal-emulator-jobs"),
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Shut the server down, closing open connections (SSE streams included)."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            for job in self._jobs.values():
                job.cond.notify_all()
            self._sched.notify_all()
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> FalEmulator:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server else "stopped"
        return f"FalEmulator({where}, service_time={self.service_time})"

    # -------------------------------------------------------------- jobs

    def _scheduler(self) -> None:
        with self._lock:
            while not self._stopping.is_set():
                nxt = self._advance()
                self._sched.wait(None if nxt is None else max(0.0, nxt - time.monotonic()))

    def _advance(self) -> float | None:
        """Start queued jobs, emit due logs, complete due jobs; return the next deadline."""
        now = time.monotonic()
        for job in list(self._running):
            while job.pending_logs and job.pending_logs[0][0] <= now:
                job.log(job.pending_logs.pop(0)[1])
                job.bump()
            if job.deadline is not None and job.deadline <= now:
                self._complete(job)
        for job in [j for j in self._queue if j.start_by is not None and j.start_by <= now]:
            job.outcome = JobError(504, "Request timed out before it started", "request_timeout")
            self._complete(job)
        moved = False
        while self._queue and (self.concurrency is None or len(self._running) < self.concurrency):
            self._begin(self._queue.popleft(), now)
            moved = True
        if moved:
            for job in self._queue:
                job.bump()  # queue positions changed
        times = [j.deadline for j in self._running if j.deadline is not None]
        times += [j.pending_logs[0][0] for j in self._running if j.pending_logs]
        times += [j.start_by for j in self._queue if j.start_by is not None]
        return min(times) if times else None

    def _begin(self, job: _Job, now: float) -> None:
        job.status, job.started = "IN_PROGRESS", now
        self._running.add(job)
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

    def _complete(self, job: _Job, cancelled: bool = False) -> None:
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
        self._running.discard(job)
        if job in self._queue:
            self._queue.remove(job)
            for other in self._queue:
                other.bump()  # queue positions changed
        job.bump()
        self._sched.notify_all()

    def _accept(self, app: str, payload: Any, errors: list | None, mode: str, rec: RecordedRequest) -> _Job:
        """Create a job (under the lock), decide its outcome and start it if a slot is free."""
        if errors:
            outcome: Any = errors
        else:
            entry = None
            if callable(self._script):
                entry = self._script(payload)
            elif self._script:
                entry = self._script.popleft()
            f = self._faults
            if entry is None and f.hang and self._rng.random() < f.hang:
                entry = HANG
            elif entry is None and f.job_error and self._rng.random() < f.job_error:
                entry = JobError()
            if entry is not HANG and not isinstance(entry, JobError):
                entry = expected_output(payload, None if entry is None else str(entry))
            outcome = entry
        job = _Job(self, app, payload, mode, outcome)
        try:
            job.start_by = job.created + float(rec.headers["x-fal-request-timeout"])
        except (KeyError, ValueError):
            pass
        job.log("Request queued")
        self._jobs[job.id] = job
        self._queue.append(job)
        self._submissions.append(Submission(job.id, app, payload, mode, time.time()))
        self._advance()
        self._sched.notify_all()
        return job

    def _status_body(self, job: _Job, with_logs: bool, since: int = 0) -> dict:
        base = f"{self.url}/{job.app}/requests/{job.id}"
        body: dict[str, Any] = {
            "status": job.status,
            "request_id": job.id,
            "response_url": base,
            "status_url": base + "/status",
            "cancel_url": base + "/cancel",
            "logs": job.logs[since:] if with_logs else None,
        }
        if job.status == "IN_QUEUE":
            body["queue_position"] = self._queue.index(job) if job in self._queue else 0
        if job.status == "COMPLETED":
            body["metrics"] = {"inference_time": round(job.completed - (job.started or job.completed), 4)}
            if job.error:
                body["error"], body["error_type"] = job.error
        return body

    # -------------------------------------------------------------- validation

    def _validate(self, raw: bytes) -> tuple[Any, list]:
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return None, [_err([0], f"JSON decode error: {exc}", "json_invalid")]
        if not isinstance(body, dict):
            return body, [_err([], "Input should be a valid dictionary", "dict_type")]
        errors: list[dict] = []
        prompt = body.get("prompt")
        if "prompt" not in body:
            errors.append(_err(["prompt"], "Field required", "missing"))
        elif not isinstance(prompt, str):
            errors.append(_err(["prompt"], "Input should be a valid string", "string_type"))
        elif not prompt.strip():
            errors.append(_err(["prompt"], "String should have at least 1 character", "string_too_short"))
        images = body.get("images")
        if "images" not in body:
            errors.append(_err(["images"], "Field required", "missing"))
        elif not isinstance(images, list):
            errors.append(_err(["images"], "Input should be a valid list", "list_type"))
        elif not images:
            errors.append(
                _err(["images"], "List should have at least 1 item after validation, not 0", "too_short", min_length=1)
            )
        else:
            for i, img in enumerate(images):
                if not isinstance(img, dict):
                    errors.append(_err(["images", i], "Input should be a valid dictionary", "dict_type"))
                elif "image_url" not in img:
                    errors.append(_err(["images", i, "image_url"], "Field required", "missing"))
                elif not isinstance(img["image_url"], str):
                    errors.append(_err(["images", i, "image_url"], "Input should be a valid string", "string_type"))
                else:
                    problem = self._check_image(img["image_url"])
                    if problem:
                        errors.append(_err(["images", i, "image_url"], problem[0], problem[1]))
        for name in ("max_tokens", "max_new_tokens", "seed"):
            v = body.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                errors.append(_err([name], "Input should be a valid integer", "int_type"))
            elif v is not None and name != "seed" and v <= 0:
                errors.append(_err([name], "Input should be greater than 0", "greater_than", gt=0))
        for name, lo, lo_incl, hi in (("temperature", 0, True, 2), ("top_p", 0, False, 1)):
            v = body.get(name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                errors.append(_err([name], "Input should be a valid number", "float_type"))
            elif v < lo or (v == lo and not lo_incl):
                op, word = (
                    ("greater_than_equal", "greater than or equal to") if lo_incl else ("greater_than", "greater than")
                )
                errors.append(_err([name], f"Input should be {word} {lo}", op, **{"ge" if lo_incl else "gt": lo}))
            elif v > hi:
                errors.append(_err([name], f"Input should be less than or equal to {hi}", "less_than_equal", le=hi))
        return body, errors

    def _check_image(self, url: str) -> tuple[str, str] | None:
        """Return (msg, type) when ``url`` is not a usable image reference."""
        data: bytes | None = None
        if url.startswith("data:"):
            m = _DATA_URI.fullmatch(url)
            if not m:
                return "Invalid data URI: expected data:<mime>;base64,<data>", "image_load_error"
            if m.group(1).lower() not in IMAGE_MIMES:
                return f"Unsupported image type {m.group(1)!r}", "image_load_error"
            try:
                data = base64.b64decode(m.group(3), validate=True)
            except (binascii.Error, ValueError):
                return "Invalid base64 data in data URI", "image_load_error"
        elif url.startswith(self.cdn_url + "/files/"):
            fid = url[len(self.cdn_url) + len("/files/") :]
            with self._lock:
                found = self._files.get(fid)
            if found is None:
                return f"Failed to download the file from {url}", "file_download_error"
            data = found[1]
        elif urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            return "Input should be a valid URL (http, https or a base64 data URI)", "url_parsing"
        if data is not None:
            try:
                from PIL import Image as PILImage

                with PILImage.open(io.BytesIO(data)) as im:
                    im.verify()
            except Exception:
                return "Failed to load the image: cannot identify image file", "image_load_error"
        return None

    # -------------------------------------------------------------- HTTP

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def _handle(self, h: _Handler) -> None:
        parts = urlsplit(h.path)
        path = parts.path.rstrip("/") or "/"
        if h.headers.get("transfer-encoding"):  # fal's clients always send Content-Length
            h.close_connection = True
            return h.send_error(411)
        raw = h.rfile.read(int(h.headers.get("content-length") or 0))
        rec = RecordedRequest(
            method=h.command,
            path=path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in h.headers.items()},
            json=None,
            time=time.time(),
        )
        if raw and "json" in rec.headers.get("content-type", "json"):
            try:
                rec.json = json.loads(raw)
            except ValueError:
                pass
        route, args = self._route(h.command, path)
        rec.route = route
        with self._lock:
            self._requests.append(rec)
        try:
            self._serve(h, rec, route, args, raw)
        except _Dropped:
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
        except Exception:  # a bug in the emulator: answer 500 rather than hanging the client
            logger.exception("emulator error on %s %s", h.command, path)
            self._send(h, rec, 500, {"detail": "emulator internal error"})

    _ROUTE_TABLE = (
        ("POST", re.compile(r"/rest/storage/auth/token"), "token"),
        ("POST", re.compile(r"/cdn/files/upload"), "upload"),
        ("GET", re.compile(r"/cdn/files/(?P<fid>[^/]+/[^/]+)"), "file"),
        ("POST", re.compile(r"/run/(?P<app>[^/]+/[^/]+)/stream"), "run_stream"),
        ("POST", re.compile(r"/run/(?P<app>[^/]+/[^/]+)"), "run"),
        ("GET", re.compile(r"/(?P<app>[^/]+/[^/]+)/requests/(?P<rid>[^/]+)/status/stream"), "stream"),
        ("GET", re.compile(r"/(?P<app>[^/]+/[^/]+)/requests/(?P<rid>[^/]+)/status"), "status"),
        ("PUT", re.compile(r"/(?P<app>[^/]+/[^/]+)/requests/(?P<rid>[^/]+)/cancel"), "cancel"),
        ("GET", re.compile(r"/(?P<app>[^/]+/[^/]+)/requests/(?P<rid>[^/]+)"), "result"),
        ("POST", re.compile(r"/(?P<app>[^/]+/[^/]+)"), "submit"),
    )

    def _route(self, method: str, path: str) -> tuple[str | None, dict]:
        for m, pattern, name in self._ROUTE_TABLE:
            match = pattern.fullmatch(path)
            if match and m == method:
                return name, match.groupdict()
        return None, {}

    def _roll_fault(self, route: str | None) -> tuple[str | None, bool]:
        """(fault kind or None, slow?) for this request, from one-shots then the seeded RNG."""
        with self._lock:
            for i, (kind, r) in enumerate(self._oneshot):
                if r is None or r == route:
                    del self._oneshot[i]
                    return (None, True) if kind == "slow" else (kind, False)
            f = self._faults
            if f.routes is not None and route not in f.routes:
                return None, False
            x, kind, acc = self._rng.random(), None, 0.0
            for name, p in (
                ("drop", f.drop),
                ("503", f.error_503),
                ("500", f.error_500),
                ("429", f.error_429),
                ("drop_after_accept", f.drop_after_accept),
                ("cut", f.cut),
            ):
                acc += p
                if x < acc:
                    kind = name
                    break
            if (kind == "drop_after_accept" and route != "submit") or (kind == "cut" and "stream" not in (route or "")):
                kind = None
            slow = bool(f.slow) and self._rng.random() < f.slow
            return kind, slow

    def _serve(self, h: _Handler, rec: RecordedRequest, route: str | None, args: dict, raw: bytes) -> None:
        kind, slow = self._roll_fault(route)
        rec.fault = kind or ("slow" if slow else None)
        if slow:
            self._stopping.wait(self._faults.slow_delay)
        if kind == "drop":
            raise _Dropped
        if kind == "503":
            return self._send(h, rec, 503, NGINX_503, content_type="text/html")
        # fal's own errors on a job's routes (status, stream, result, cancel) name that job;
        # elsewhere a 500 carries a fresh id, as from a request fal never turned into a job.
        job_rid = {"x-fal-request-id": args["rid"]} if "rid" in args else {}
        if kind == "429":
            ra = self._faults.retry_after
            return self._send(
                h,
                rec,
                429,
                {"detail": "Too many requests: concurrency limit exceeded"},
                headers={"Retry-After": f"{ra:g}", **job_rid},
            )
        if kind == "500":
            return self._send(
                h,
                rec,
                500,
                {"detail": "Internal Server Error", "error_type": "internal_error"},
                headers={"x-fal-request-id": str(uuid.uuid4()), "X-Fal-Error-Type": "internal_error", **job_rid},
            )
        if route is None:
            return self._send(h, rec, 404, {"detail": f"Not found: {h.command} {rec.path}"})
        if route == "file":
            return self._serve_file(h, rec, args["fid"])
        if route == "upload":
            return self._upload(h, rec, raw)
        auth = rec.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        given = given.strip()
        if scheme.lower() != "key" or not given:
            return self._send(h, rec, 401, {"detail": "Unauthorized"})
        if self.forbidden_key is not None and given == self.forbidden_key:
            return self._send(h, rec, 403, {"detail": "Forbidden: this key cannot use this app"})
        if self.key is not None and given != self.key:
            return self._send(h, rec, 401, {"detail": "Unauthorized"})
        if route == "token":
            return self._token(h, rec)
        app = args["app"]
        if self.apps is not None and app not in self.apps:
            return self._send(h, rec, 404, {"detail": f"Application '{app}' not found"})
        if route == "submit":
            payload, errors = self._validate(raw)
            with self._lock:
                job = self._accept(app, payload, errors, "queue", rec)
                body = self._status_body(job, False)
                body["queue_position"] = self._queue.index(job) if job in self._queue else 0
                body["status"] = "IN_QUEUE"
                body.pop("logs")
            if kind == "drop_after_accept":
                raise _Dropped
            return self._send(h, rec, 200, body, headers={"x-fal-request-id": job.id})
        if route in ("run", "run_stream"):
            return self._run(h, rec, app, raw, stream=route == "run_stream")
        with_logs = rec.query.get("logs", "").lower() in ("1", "true")
        with self._lock:  # decide under the lock, write to the socket outside it
            job = self._jobs.get(args["rid"])
            job = job if job is not None and job.app == app else None
            rid = {"x-fal-request-id": job.id} if job else {}
            if job is None:
                answer = (
                    404,
                    {"status": "NOT_FOUND"} if route == "cancel" else {"detail": f"Request {args['rid']!r} not found"},
                    {},
                )
            elif route == "status":
                answer = (200 if job.status == "COMPLETED" else 202, self._status_body(job, with_logs), rid)
            elif route == "cancel":
                self._cancelled.append(job.id)
                answer = (
                    (400, {"status": "ALREADY_COMPLETED"}, {})
                    if job.status == "COMPLETED"
                    else (202, {"status": "CANCELLATION_REQUESTED"}, {})
                )
                if job.status != "COMPLETED":
                    self._complete(job, cancelled=True)
                    self._advance()  # the freed slot goes to the next queued job right away
            elif route == "result":
                answer = self._result(job) if job.result else (400, {"detail": "Request is still in progress"}, rid)
        if job is not None and route == "stream":
            return self._status_stream(h, rec, job, with_logs)
        self._send(h, rec, answer[0], answer[1], headers=answer[2])

    def _send(
        self,
        h: _Handler,
        rec: RecordedRequest,
        code: int,
        body: Any,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(body, (bytes, bytearray)):
            data = bytes(body)
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        rec.status = code
        h.send_response(code)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    @staticmethod
    def _result(job: _Job) -> tuple[int, dict, dict]:
        """(status, body, headers) of a finished job's result."""
        code, body = job.result  # type: ignore[misc]
        headers = {"x-fal-request-id": job.id}
        if "error_type" in body:
            headers["X-Fal-Error-Type"] = body["error_type"]
            if body["error_type"] == "request_timeout":
                headers["X-Fal-Request-Timeout-Type"] = "user"
        return code, body, headers

    # -------------------------------------------------------------- streams

    def _start_sse(self, h: _Handler, rec: RecordedRequest, request_id: str) -> None:
        rec.status = 200
        h.send_response(200)
        for k, v in (
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("Transfer-Encoding", "chunked"),
            ("x-fal-request-id", request_id),
        ):
            h.send_header(k, v)
        h.end_headers()

    @staticmethod
    def _chunk(h: _Handler, text: str) -> None:
        data = text.encode()
        h.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n")

    def _status_stream(self, h: _Handler, rec: RecordedRequest, job: _Job, with_logs: bool) -> None:
        self._start_sse(h, rec, job.id)
        version, sent = -1, 0
        while True:
            if rec.fault == "cut" and version >= 0:
                raise _Dropped
            with self._lock:
                self._wait(job, lambda: job.version != version, time.monotonic() + self.ping_interval)
                if job.version == version:
                    event = ": ping\n\n"
                else:
                    event = f"data: {json.dumps(self._status_body(job, with_logs, sent))}\n\n"
                    version, sent = job.version, len(job.logs)
                done = job.status == "COMPLETED"
            self._chunk(h, event)
            if done:
                return self._chunk(h, "")

    def _wait(self, job: _Job, until: Callable[[], bool], deadline: float | None = None) -> None:
        """Wait (lock held) until ``until()``, the deadline or stop; raise _Dropped on stop."""
        while not until() and not self._stopping.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                return
            job.cond.wait(None if deadline is None else deadline - time.monotonic())
        if self._stopping.is_set():
            raise _Dropped

    def _run(self, h: _Handler, rec: RecordedRequest, app: str, raw: bytes, stream: bool) -> None:
        payload, errors = self._validate(raw)
        if errors:
            return self._send(h, rec, 422, {"detail": errors})
        done = lambda: job.status == "COMPLETED"  # noqa: E731
        with self._lock:
            job = self._accept(app, payload, None, "stream" if stream else "sync", rec)
            plain = not (stream and isinstance(job.outcome, str))  # plain run, or a failing job
            self._wait(job, done if plain else lambda: job.started is not None)
            code, body, headers = self._result(job) if plain else (200, {}, {})
            words, started = str(job.outcome).split(), job.started or 0.0
        if plain:
            return self._send(h, rec, code, body, headers=headers)
        self._start_sse(h, rec, job.id)
        steps = max(1, (len(words) + 2) // 3)  # a few words per event, spread over the service time
        for k in range(1, steps):
            with self._lock:
                self._wait(job, done, started + self.service_time * k / steps)
            self._chunk(h, "data: " + json.dumps({"output": " ".join(words[: 3 * k]), "partial": True}) + "\n\n")
            if rec.fault == "cut":
                raise _Dropped
        with self._lock:
            self._wait(job, done)
            code, body = job.result  # type: ignore[misc]
        final = body if code == 200 else {**body, "status_code": code}
        self._chunk(h, f"data: {json.dumps(final)}\n\n")
        self._chunk(h, "")

    # -------------------------------------------------------------- storage

    def _token(self, h: _Handler, rec: RecordedRequest) -> None:
        token = uuid.uuid4().hex
        expires = datetime.now(timezone.utc) + timedelta(hours=1)
        with self._lock:
            self._tokens[token] = time.time() + 3600
        self._send(
            h,
            rec,
            200,
            {"token": token, "token_type": "Bearer", "base_url": self.cdn_url, "expires_at": expires.isoformat()},
        )

    def _upload(self, h: _Handler, rec: RecordedRequest, raw: bytes) -> None:
        scheme, _, token = rec.headers.get("authorization", "").partition(" ")
        with self._lock:
            ok = scheme.lower() == "bearer" and self._tokens.get(token.strip(), 0) > time.time()
        if not ok:
            return self._send(h, rec, 401, {"detail": "Invalid or missing CDN token"})
        name = re.sub(r"[^\w.-]", "_", rec.headers.get("x-fal-file-name", "") or "upload.bin")
        fid = f"{uuid.uuid4().hex[:16]}/{name}"
        with self._lock:
            self._files[fid] = (rec.headers.get("content-type", "application/octet-stream"), raw)
        self._send(h, rec, 200, {"access_url": f"{self.cdn_url}/files/{fid}"})

    def _serve_file(self, h: _Handler, rec: RecordedRequest, fid: str) -> None:
        with self._lock:
            found = self._files.get(fid)
        if found is None:
            return self._send(h, rec, 404, {"detail": "File not found"})
        self._send(h, rec, 200, found[1], content_type=found[0])


def main(argv: list[str] | None = None) -> None:
    """Run the emulator in the foreground and print the environment to point clients at it."""
    p = argparse.ArgumentParser(prog="python -m mantis_llm.emulator", description=main.__doc__)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--service-time", type=float, default=0.05, help="seconds per job (default 0.05)")
    p.add_argument("--concurrency", type=int, default=None, help="max jobs in progress (default: unlimited)")
    p.add_argument("--key", default=DEFAULT_KEY, help="accepted FAL_KEY ('' accepts any key)")
    ns = p.parse_args(argv)
    emu = FalEmulator(port=ns.port, key=ns.key or None, service_time=ns.service_time, concurrency=ns.concurrency)
    with emu:
        for k, v in emu.env().items():
            print(f"export {k}={v}")
        print(f"# fal emulator on {emu.url}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
