"""Fault injection: seeded random faults per request, and one-shot faults forced by a test."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

FAULT_KINDS = ("drop", "503", "500", "429", "slow", "drop_after_accept", "cut")
ROUTES = ("submit", "status", "stream", "result", "cancel", "run", "run_stream", "token", "upload", "file")


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


class FaultRoller:
    """Decides each request's fault: forced one-shots first, then one seeded roll."""

    def __init__(self, lock: threading.RLock, faults: Faults) -> None:
        self._lock = lock
        self._oneshot: list[tuple[str, str | None]] = []
        self.set(faults)

    def set(self, faults: Faults) -> None:
        with self._lock:
            self.faults = faults
            self.rng = random.Random(faults.seed)

    def inject(self, kind: str, count: int = 1, route: str | None = None) -> None:
        if kind not in FAULT_KINDS or (route is not None and route not in ROUTES):
            raise ValueError(f"unknown fault {kind!r} or route {route!r}")
        with self._lock:
            self._oneshot.extend([(kind, route)] * count)

    def clear(self) -> None:
        with self._lock:
            self._oneshot.clear()
        self.set(Faults())

    def roll_job(self, rate: float) -> bool:
        """One seeded roll for a per-job fault of probability ``rate``."""
        with self._lock:
            return bool(rate) and self.rng.random() < rate

    def roll(self, route: str | None) -> tuple[str | None, bool]:
        """(fault kind or None, slow?) for this request, from one-shots then the seeded RNG."""
        with self._lock:
            for i, (forced, r) in enumerate(self._oneshot):
                if r is None or r == route:
                    del self._oneshot[i]
                    return (None, True) if forced == "slow" else (forced, False)
            f = self.faults
            if f.routes is not None and route not in f.routes:
                return None, False
            x, acc = self.rng.random(), 0.0
            kind: str | None = None
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
            slow = bool(f.slow) and self.rng.random() < f.slow
            return kind, slow
