"""One ``model.generate`` call for a batch of jobs, and what happens to each row as it runs.

Rows are left-padded (so greedy output equals the unbatched one) and share one
``pixel_values`` tensor. A stopping criterion follows every row: it ends a row on EOS, on a
stop string, at the row's own ``max_tokens`` or when its caller cancelled, streams the
row's text as it grows, and hands each finished row to its caller at once, so a short
answer never waits for a long neighbour.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..._text import StopTrimmer
from ...types import Response, Usage
from ._loading import Loaded
from ._scheduler import End, Job


def generate(st: Loaded, jobs: list[Job], model_name: str, generate_kwargs: dict[str, Any]) -> None:
    """Run ``jobs`` as one batch; every job's future is resolved when this returns."""
    torch = st.torch
    started = time.monotonic()
    width = max(len(j.input_ids) for j in jobs)
    input_ids = torch.full((len(jobs), width), st.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
    for i, job in enumerate(jobs):  # left padding: greedy output equals the unbatched one
        n = len(job.input_ids)
        input_ids[i, width - n :] = job.input_ids
        attention_mask[i, width - n :] = 1
        job.started = started
    pixels = [j.pixel_values for j in jobs if j.pixel_values is not None]
    inputs = {"input_ids": input_ids.to(st.device), "attention_mask": attention_mask.to(st.device)}
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels).to(st.device, st.model.dtype)

    first = jobs[0]
    grammar = None
    if any(j.grammar is not None for j in jobs):  # one matcher per constrained row, None for free ones
        matchers = [j.grammar.matcher() if j.grammar is not None else None for j in jobs]
        grammar = st.grammar.processor(matchers, budgets=[j.max_new for j in jobs])
    tracker = RowTracker(st, jobs, lambda *row: finish_row(model_name, *row), grammar)
    gen_kwargs: dict[str, Any] = dict(generate_kwargs)
    if grammar is not None:  # ours last: transformers applies temperature and top-p after it anyway
        gen_kwargs["logits_processor"] = st.logits_list([*generate_kwargs.get("logits_processor", ()), grammar])
    gen_kwargs.update(
        max_new_tokens=max(j.max_new for j in jobs),
        pad_token_id=st.pad_id,
        eos_token_id=sorted(st.eos_ids) or None,
        stopping_criteria=st.stopping_list([*generate_kwargs.get("stopping_criteria", ()), tracker]),
    )
    if first.do_sample:
        gen_kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p or 1.0, top_k=0)
    else:
        gen_kwargs.update(do_sample=False)
    with torch.inference_mode(), rng_scope(torch, st.device, first.seed if first.do_sample else None):
        st.model.generate(**inputs, **gen_kwargs)
    for row in tracker.rows:
        if not row.done:
            tracker.finish(row, "length")


def finish_row(model_name: str, job: Job, ids: list[int], reason: str, text: str, batch_size: int) -> None:
    """Resolve ``job`` with its Response (or its cancellation), and end its stream."""
    if job.cancel_error is not None:
        job.fail(job.cancel_error)
        return
    now = time.monotonic()
    response = Response(
        text=text,
        model=model_name,
        finish_reason=reason,
        usage=Usage(input_tokens=len(job.input_ids), output_tokens=len(ids)),
        request_id=job.request_id,
        metrics={
            "queue_seconds": round(job.started - job.submitted, 6),
            "generation_seconds": round(now - job.started, 6),
            "batch_size": batch_size,
            "images": job.n_images,
        },
    )
    tail = text[job.emitted :]
    job.emitted = len(text)
    if not job.future.done():
        job.future.set_result(response)
    if job.sink is not None:
        job.sink(End(tail))


@dataclass(eq=False)
class Row:
    job: Job
    trimmer: StopTrimmer
    ids: list[int] = field(default_factory=list)
    fed: int = 0  # characters of the decoded text given to the trimmer
    done: bool = False


class RowTracker:
    """A transformers stopping criterion that follows every row of a batch.

    After each step it records the new token of each live row and ends the row on EOS, on a
    stop string, at the row's own ``max_new`` or when the caller cancelled. Stop strings
    and streaming go through one :class:`~mantis_llm._text.StopTrimmer` per row (the same
    engine the fal backend uses), fed with the decoded text minus an incomplete UTF-8 tail.
    """

    def __init__(
        self,
        st: Loaded,
        jobs: list[Job],
        on_finish: Callable[[Job, list[int], str, str, int], None],
        grammar: Any = None,
    ) -> None:
        self.st = st
        self.rows = [Row(job, StopTrimmer(job.stops)) for job in jobs]
        self.on_finish = on_finish
        self.grammar = grammar  # the batch's GrammarLogitsProcessor, if any row is constrained

    def _feed(self, row: Row, final: bool = False) -> str:
        """Decode the row, give the trimmer what is new; return the text now safe to stream.
        Until the row ends, an incomplete UTF-8 tail (decoded as U+FFFD) is held back."""
        text = self.st.tokenizer.decode(row.ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")
        out = row.trimmer.feed(text[row.fed :]) if len(text) > row.fed else ""
        row.fed = max(row.fed, len(text))
        return out

    def finish(self, row: Row, reason: str) -> None:
        row.done = True
        if self.grammar is not None:  # stop following the row (it gets pad tokens from now on)
            self.grammar.finish_row(self.rows.index(row), row.ids)
        if not row.trimmer.stopped:
            self._feed(row, final=True)
        if row.trimmer.stopped:
            reason = "stop"
        self.on_finish(row.job, row.ids, reason, row.trimmer.text, len(self.rows))

    def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
        st = self.st
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last, strict=True):
            if row.done:
                continue
            job = row.job
            row.ids.append(token)
            if job.cancel_error is not None:
                self.finish(row, "cancelled")
            elif token in st.eos_ids:
                self.finish(row, "stop")
            elif job.stops or job.sink is not None:
                out = self._feed(row)
                if row.trimmer.stopped:
                    self.finish(row, "stop")
                    continue
                if job.sink is not None and out:
                    job.sink(out)
                    job.emitted += len(out)
            if not row.done and len(row.ids) >= job.max_new:
                self.finish(row, "length")
        return st.torch.tensor([row.done for row in self.rows], dtype=st.torch.bool, device=input_ids.device)


@contextmanager
def rng_scope(torch: Any, device: Any, seed: int | None) -> Iterator[None]:
    """Seed sampling without touching the caller's global RNG state (restored on exit)."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
