"""The queue between callers and the one worker thread that owns the model.

Callers (threads, coroutines, streams) prepare their request on their own thread, then
queue it as a :class:`Job`; the worker takes the oldest job and the compatible ones behind
it as one batch. While other callers are still preparing, a batch is held open up to
``batch_wait`` seconds; a lone caller never waits.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ...errors import BackendError, MantisError, RequestCancelledError
from ._loading import first_line

logger = logging.getLogger("mantis_llm.local")


@dataclass
class End:
    """Stream sentinel: the text not yet sent; the job's future holds the Response."""

    tail: str = ""


@dataclass(eq=False)
class Job:
    """One prepared request waiting for, or running on, the worker."""

    input_ids: Any  # 1-D LongTensor, expanded image tokens included
    pixel_values: Any  # [n_images, 3, H, W] or None
    n_images: int
    max_new: int
    do_sample: bool
    temperature: float | None
    top_p: float | None
    seed: int | None
    stops: tuple[str, ...]
    sink: Callable[[Any], None] | None  # streaming: receives str pieces, then End
    request_id: str
    grammar: Any = None  # a CompiledGrammar the row's output must follow, or None (free)
    future: Future[Any] = field(default_factory=Future)
    submitted: float = 0.0
    started: float = 0.0
    cancel_error: MantisError | None = None
    emitted: int = 0  # characters already streamed

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share a batch (greedy jobs always can)."""
        if not self.do_sample:
            return ("greedy",)
        # a seeded sample must not depend on its batch neighbours: it runs alone
        return ("sample", self.temperature, self.top_p, None if self.seed is None else id(self))

    def cancel(self) -> None:
        """The caller gave up: drop the job if queued, stop its row at the next token if running."""
        if not self.future.done():
            self.cancel_error = RequestCancelledError("the request was cancelled", request_id=self.request_id)
            self.future.cancel()

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(InvalidStateError):  # already finished or cancelled
            self.future.set_exception(exc)
        if self.sink is not None:
            self.sink(End())


class Scheduler:
    """Queues jobs and runs them in batches on one worker thread (``run_batch(jobs)``)."""

    def __init__(self, run_batch: Callable[[list[Job]], None], *, max_batch_size: int, batch_wait: float) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._running: list[Job] = []
        self._preparing = 0
        self._stopping = False
        self._stop_error: BackendError | None = None
        self._worker: threading.Thread | None = None

    @property
    def worker(self) -> threading.Thread | None:
        return self._worker

    def start(self) -> None:
        with self._cond:
            self._stopping = False
        # a daemon, so that an idle worker never keeps the interpreter alive; the backend's exit
        # hook (backend.py) stops it before the interpreter finalizes
        self._worker = threading.Thread(target=self._worker_loop, name="mantis-local-worker", daemon=True)
        self._worker.start()

    def stop(self, error: BackendError, *, wait: bool = True) -> None:
        """Fail queued jobs with ``error``, stop running rows at their next token (they fail
        with it too) and (unless ``wait`` is false) wait for the worker to end."""
        with self._cond:
            self._stopping = True
            self._stop_error = error
            pending, self._jobs = list(self._jobs), deque()
            for job in self._running:
                job.cancel_error = error
            self._cond.notify_all()
        for job in pending:
            job.fail(error)
        if not wait:
            return
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        self._worker = None

    @contextmanager
    def slot(self) -> Iterator[list[Job]]:
        """Count a request as being prepared (the worker holds a batch open for it, up to
        ``batch_wait``); on exit queue whatever job was put in the yielded list."""
        with self._cond:
            self._preparing += 1
            self._cond.notify_all()
        made: list[Job] = []
        try:
            yield made
        finally:
            self.enqueue(made, began=1)

    def enqueue(self, jobs: Sequence[Job], began: int = 0) -> None:
        """Queue prepared jobs (atomically) and end ``began`` preparations."""
        now = time.monotonic()
        with self._cond:
            self._preparing -= began
            if self._stopping or self._worker is None:
                for job in jobs:
                    job.fail(BackendError("the backend was closed", request_id=job.request_id))
            else:
                for job in jobs:
                    job.submitted = now
                    self._jobs.append(job)
            self._cond.notify_all()

    def _worker_loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = self._take_batch()
                # stop() may have come while the batch was held open: it is neither queued nor
                # running, so it fails here (rather than run to the end while stop() waits)
                stale: list[Job] = batch if self._stopping else []
                self._running = [] if stale else batch
            if stale:
                for job in stale:
                    job.fail(self._stop_error or BackendError("the backend was closed", request_id=job.request_id))
                return
            try:
                self.run_batch(batch)
            except BaseException as exc:  # never let the worker die silently
                logger.exception("local worker failed")
                for job in batch:
                    if not job.future.done():
                        job.fail(BackendError(f"local generation failed: {first_line(exc)}"))
            finally:
                with self._cond:
                    self._running = []

    def _take_batch(self) -> list[Job]:
        """Pop the oldest job and the compatible ones queued (or about to be) behind it.

        Called with the condition held. Holds the batch open up to ``batch_wait`` while some
        caller is still preparing a request, and for short gaps while concurrent callers keep
        arriving; a lone caller never waits."""
        first = self._jobs.popleft()
        batch = [first]
        deadline = time.monotonic() + self.batch_wait
        while True:
            skipped: deque[Job] = deque()
            while self._jobs and len(batch) < self.max_batch_size:
                job = self._jobs.popleft()
                if job.future.cancelled():
                    continue
                (batch if job.key == first.key else skipped).append(job)
            skipped.extend(self._jobs)
            self._jobs = skipped
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or self._stopping or remaining <= 0:
                return batch
            if self._preparing:
                self._cond.wait(remaining)
            elif len(batch) == 1 or not self._cond.wait(min(remaining, self.batch_wait / 2)):
                return batch
