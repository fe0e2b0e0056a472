"""FalEmulator: a local HTTP server that speaks fal's queue, sync, streaming and storage protocol.

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
    POST {url}/run/{owner}/{app}[/stream]              sync run (JSON or SSE of partial outputs;
                                                       /stream answers 404/405 with stream_endpoint=False/405)
    POST {url}/rest/storage/auth/token?storage_type=fal-cdn-v3     CDN token
    POST {url}/cdn/files/upload   (Bearer token)       -> {"access_url": "{url}/cdn/files/<id>/<name>"}

Two switches stand for what the live endpoint may do (its schema is undocumented):
``require_images`` (a 422 for ``"images": []``, the default) and ``stream_endpoint``.

This module is the HTTP side (routes, authentication, fault injection per request, SSE);
:mod:`._jobs` holds the queue and the fake model, :mod:`._validation` the input checks,
:mod:`._faults` the fault settings, :mod:`._storage` the CDN. Standard library only (plus
Pillow to check images).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...backends import DEFAULT_FAL_ENDPOINT
from ._faults import FaultRoller, Faults
from ._jobs import Job, JobBoard, ScriptEntry, Submission, digest
from ._storage import Storage
from ._validation import check_image, validate

logger = logging.getLogger("mantis_llm.emulator")

DEFAULT_KEY = "emulator-key-id:emulator-key-secret"
FORBIDDEN_KEY = "emulator-forbidden-id:emulator-forbidden-secret"
DEFAULT_APPS = (DEFAULT_FAL_ENDPOINT,)
NGINX_503 = (
    "<html><head><title>503 Service Temporarily Unavailable</title></head><body>"
    "<center><h1>503 Service Temporarily Unavailable</h1></center><hr><center>nginx</center>"
    "</body></html>"
)


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
        with contextlib.suppress(OSError):
            super().finish()

    def _dispatch(self) -> None:
        self.server.emu._handle(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("emulator: " + format, *args)


def _stream_status(value: bool | int) -> int | None:
    """None when the token stream is served, else the status that answers it (404 or 405)."""
    if value is True:
        return None
    if value is False:
        return 404
    if value in (404, 405) and not isinstance(value, bool):
        return int(value)
    raise ValueError(f"stream_endpoint must be True, False, 404 or 405, not {value!r}")


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
        require_images: the endpoint wants at least one image (the live endpoint's rule is
            undocumented): ``"images": []`` is a 422 (``loc ["body", "images"]``, type
            ``too_short``, "at least 1 item"), on the queue at the result as fal does. False
            answers text-only questions (the fake model says "0 images").
        stream_endpoint: True serves ``POST {run_url}/{app}/stream``; False answers it 404
            (an app without a token stream), or pass the status to answer (404 or 405).

    ``key``, ``service_time``, ``concurrency``, ``faults``, ``require_images`` and
    ``stream_endpoint`` may be changed while it runs (they apply to later requests/jobs);
    :meth:`reset` puts the last two back to their constructor values. Records: ``requests``,
    ``submissions``, ``cancelled``, ``uploads``.
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
        require_images: bool = True,
        stream_endpoint: bool | int = True,
    ) -> None:
        if not isinstance(require_images, bool):
            raise TypeError(f"require_images must be True or False, not {require_images!r}")
        _stream_status(stream_endpoint)  # checked now rather than at the first request
        self.port, self.key, self.forbidden_key = port, key, forbidden_key
        self.require_images, self.stream_endpoint = require_images, stream_endpoint
        self._switches = (require_images, stream_endpoint)
        self.ping_interval = ping_interval
        self.apps = None if apps is None else set(apps)
        self._lock = threading.RLock()
        self._faults = FaultRoller(self._lock, Faults())
        self._board = JobBoard(self._lock, self._faults, service_time=service_time, concurrency=concurrency)
        self._storage = Storage(self._lock)
        self.faults = faults if faults is not None else Faults()
        if hang:
            self.faults = replace(self.faults, hang=1.0)
        self._requests: list[RecordedRequest] = []
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -------------------------------------------------------------- public API

    digest = staticmethod(digest)

    @property
    def service_time(self) -> float:
        """Seconds each job spends IN_PROGRESS (changeable while running: later jobs)."""
        return self._board.service_time

    @service_time.setter
    def service_time(self, value: float) -> None:
        self._board.service_time = value

    @property
    def concurrency(self) -> int | None:
        """Jobs in progress at once (others wait IN_QUEUE); None = unlimited."""
        return self._board.concurrency

    @concurrency.setter
    def concurrency(self, value: int | None) -> None:
        with self._lock:
            self._board.concurrency = value
            self._board.wake.notify_all()

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
        return self._faults.faults

    @faults.setter
    def faults(self, value: Faults | dict[str, Any]) -> None:
        self._faults.set(Faults(**value) if isinstance(value, dict) else value)

    def inject(self, kind: str, count: int = 1, route: str | None = None) -> None:
        """Force the next ``count`` requests (on ``route``, or any) to get fault ``kind``
        (one of ``FAULT_KINDS``), before any random fault is rolled."""
        self._faults.inject(kind, count, route)

    def script(self, answers: list[ScriptEntry] | Callable[[Any], ScriptEntry]) -> None:
        """Canned answers for the next jobs, in order (str, :class:`JobError` or ``HANG``), or a
        callable ``(payload) -> entry`` (None = fake model). Invalid inputs consume nothing."""
        with self._lock:
            self._board.script = answers if callable(answers) else collections.deque(answers)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def submissions(self) -> list[Submission]:
        with self._lock:
            return list(self._board.submissions)

    @property
    def cancelled(self) -> list[str]:
        with self._lock:
            return list(self._board.cancelled)

    @property
    def uploads(self) -> list[str]:
        """Access URLs of the files uploaded to the emulated CDN."""
        with self._lock:
            return [f"{self.cdn_url}/files/{fid}" for fid in self._storage.files]

    def job_status(self, request_id: str) -> str | None:
        """IN_QUEUE / IN_PROGRESS / COMPLETED for a request id (queue or sync), None if unknown."""
        with self._lock:
            job = self._board.jobs.get(request_id)
            return job.status if job else None

    def reset(self) -> None:
        """Forget recorded requests, submissions, cancellations, script and faults; put
        ``require_images`` and ``stream_endpoint`` back to their constructor values."""
        with self._lock:
            self.require_images, self.stream_endpoint = self._switches
            self._requests.clear()
            self._board.reset()
            self._faults.clear()

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
            threading.Thread(target=self._board.run, args=(self._stopping,), daemon=True, name="fal-emulator-jobs"),
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
            for job in self._board.jobs.values():
                job.cond.notify_all()
            self._board.wake.notify_all()
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
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

    # -------------------------------------------------------------- HTTP

    def _validate(self, raw: bytes) -> tuple[Any, list[dict[str, Any]]]:
        return validate(
            raw, lambda url: check_image(url, self.cdn_url, self._storage.data), require_images=self.require_images
        )

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
            with contextlib.suppress(ValueError):
                rec.json = json.loads(raw)
        route, args = self._route(h.command, path)
        rec.route = route
        with self._lock:
            self._requests.append(rec)
        try:
            self._serve(h, rec, route, args, raw)
        except _Dropped:
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
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

    def _serve(self, h: _Handler, rec: RecordedRequest, route: str | None, args: dict, raw: bytes) -> None:
        kind, slow = self._faults.roll(route)
        rec.fault = kind or ("slow" if slow else None)
        if slow:
            self._stopping.wait(self._faults.faults.slow_delay)
        if kind == "drop":
            raise _Dropped
        if kind == "503":
            return self._send(h, rec, 503, NGINX_503, content_type="text/html")
        # fal's own errors on a job's routes (status, stream, result, cancel) name that job;
        # elsewhere a 500 carries a fresh id, as from a request fal never turned into a job.
        job_rid = {"x-fal-request-id": args["rid"]} if "rid" in args else {}
        if kind == "429":
            ra = self.faults.retry_after
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
            stored = self._storage.get(args["fid"])
            if stored is None:
                return self._send(h, rec, 404, {"detail": "File not found"})
            return self._send(h, rec, 200, stored[1], content_type=stored[0])
        if route == "upload":
            code, body = self._storage.upload(rec.headers, raw, self.cdn_url)
            return self._send(h, rec, code, body)
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
            return self._send(h, rec, 200, self._storage.new_token(self.cdn_url))
        app = args["app"]
        if self.apps is not None and app not in self.apps:
            return self._send(h, rec, 404, {"detail": f"Application '{app}' not found"})
        if route == "submit":
            payload, errors = self._validate(raw)
            with self._lock:
                job = self._board.accept(app, payload, errors, "queue", rec.headers.get("x-fal-request-timeout"))
                body = self._board.status_body(job, self.url, False)
                body["queue_position"] = self._board.queue.index(job) if job in self._board.queue else 0
                body["status"] = "IN_QUEUE"
                body.pop("logs")
            if kind == "drop_after_accept":
                raise _Dropped
            return self._send(h, rec, 200, body, headers={"x-fal-request-id": job.id})
        if route == "run_stream" and (missing := _stream_status(self.stream_endpoint)):
            # as a FastAPI app answers a route it lacks (404), or one it serves for other methods (405)
            detail, allow = ("Not Found", None) if missing == 404 else ("Method Not Allowed", {"Allow": "GET"})
            return self._send(h, rec, missing, {"detail": detail}, headers=allow)
        if route in ("run", "run_stream"):
            return self._run(h, rec, app, raw, stream=route == "run_stream")
        with_logs = rec.query.get("logs", "").lower() in ("1", "true")
        with self._lock:  # decide under the lock, write to the socket outside it
            known = self._board.jobs.get(args["rid"])
            found = known if known is not None and known.app == app else None
            rid = {"x-fal-request-id": found.id} if found else {}
            answer: tuple[int, dict[str, Any], dict[str, str]]
            if found is None:
                answer = (
                    404,
                    {"status": "NOT_FOUND"} if route == "cancel" else {"detail": f"Request {args['rid']!r} not found"},
                    {},
                )
            elif route == "status":
                code = 200 if found.status == "COMPLETED" else 202
                answer = (code, self._board.status_body(found, self.url, with_logs), rid)
            elif route == "cancel":
                answer = (*self._board.cancel(found), {})
            elif route == "result":
                answer = self._result(found) if found.result else (400, {"detail": "Request is still in progress"}, rid)
        if found is not None and route == "stream":
            return self._status_stream(h, rec, found, with_logs)
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
    def _result(job: Job) -> tuple[int, dict, dict]:
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

    def _status_stream(self, h: _Handler, rec: RecordedRequest, job: Job, with_logs: bool) -> None:
        self._start_sse(h, rec, job.id)
        version, sent = -1, 0
        while True:
            if rec.fault == "cut" and version >= 0:
                raise _Dropped
            with self._lock:

                def changed(seen: int = version) -> bool:
                    return job.version != seen

                self._wait(job, changed, time.monotonic() + self.ping_interval)
                if job.version == version:
                    event = ": ping\n\n"
                else:
                    event = f"data: {json.dumps(self._board.status_body(job, self.url, with_logs, sent))}\n\n"
                    version, sent = job.version, len(job.logs)
                done = job.status == "COMPLETED"
            self._chunk(h, event)
            if done:
                return self._chunk(h, "")

    def _wait(self, job: Job, until: Callable[[], bool], deadline: float | None = None) -> None:
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
        with self._lock:
            job: Job = self._board.accept(
                app, payload, None, "stream" if stream else "sync", rec.headers.get("x-fal-request-timeout")
            )

            def done() -> bool:
                return job.status == "COMPLETED"

            plain = not (stream and isinstance(job.outcome, str))  # plain run, or a failing job
            self._wait(job, done if plain else lambda: job.started is not None)
            code, body, headers = self._result(job) if plain else (200, {}, {})
            text, started = str(job.outcome), job.started or 0.0
            # where each word ends: partial outputs are prefixes of the final one, spacing kept
            words = [m.end() for m in re.finditer(r"\S+", text)]
        if plain:
            return self._send(h, rec, code, body, headers=headers)
        self._start_sse(h, rec, job.id)
        steps = max(1, (len(words) + 2) // 3)  # a few words per event, spread over the service time
        for k in range(1, steps):
            with self._lock:
                self._wait(job, done, started + self.service_time * k / steps)
            self._chunk(h, "data: " + json.dumps({"output": text[: words[3 * k - 1]], "partial": True}) + "\n\n")
            if rec.fault == "cut":
                raise _Dropped
        with self._lock:
            self._wait(job, done)
            code, body = job.result  # type: ignore[misc]
        final = body if code == 200 else {**body, "status_code": code}
        self._chunk(h, f"data: {json.dumps(final)}\n\n")
        self._chunk(h, "")
