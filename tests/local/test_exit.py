"""Scripts that use the local backend and never close it end cleanly (issue #13).

Each pattern is a small script run 20 times as its own process; every run must exit 0 (the
SIGINT ones 130, or by SIGINT when the KeyboardInterrupt is not caught), never by SIGABRT
(``terminate called without an active exception``, 134 from a shell), and must print what
the pattern expects. The last atexit callback of every script (registered before the backend
loads, so it runs after the backend's own exit hook) reports whether the worker thread was
still alive: it must not be, whatever the timing.

A fresh ``python`` costs ~3 s of CPU in imports alone, so the runs are forked from one
launcher that has imported torch, transformers and the adapters: each child runs the
pattern as the launcher's own ``__main__`` code and then ends like any script (the whole
``Py_FinalizeEx``: threading shutdown, atexit callbacks, finalization), with its own stdout
and stderr. The launcher loads no model and starts no thread before it forks; it freezes its
heap (``gc.freeze``: finalizing takes ~0.1 s instead of ~2 s) and the children use one
intra-op thread. Both make the window in which an unfixed backend aborts narrower than in a
fresh process, which is why the worker check above, not the abort count, is the assertion
that does not depend on luck.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch

from mantis_llm import Conversation, GenerationParams, Request
from mantis_llm.backends.local import TransformersBackend
from mantis_llm.backends.local import backend as backend_module
from mantis_llm.errors import BackendError

RUNS = int(os.environ.get("MANTIS_EXIT_RUNS", "20"))  # runs of each pattern
# children at a time (CI has 2 cores; a child waits part of the time)
JOBS = int(os.environ.get("MANTIS_EXIT_JOBS", "3"))

# Run before every pattern. The atexit callback is registered before any backend loads, so
# it runs after the backend's exit hook (atexit is last in, first out) and still before the
# interpreter finalizes: the worker must be gone by then.
PRELUDE = """
import atexit, sys, threading
from mantis_llm import Conversation, GenerationParams, Request
from mantis_llm.backends.local import TransformersBackend
from mantis_llm.errors import BackendError

sys.stdout.reconfigure(line_buffering=True)
LONG = "Tell me a very long story about the sea."  # 1,500 tokens take seconds

def ask(prompt=LONG, max_tokens=1500, **params):
    return Request(Conversation.from_prompt(prompt), GenerationParams(max_tokens=max_tokens, **params))

def worker_alive():
    return any(t.name == "mantis-local-worker" and t.is_alive() for t in threading.enumerate())

AFTER_HOOK = []  # more checks for the last atexit callback

@atexit.register
def _report():
    alive = worker_alive()
    print("at exit: worker", "alive" if alive else "stopped")
    if not alive:
        for check in AFTER_HOOK:
            check()
"""

# name: (expected exit status as os.waitstatus_to_exitcode gives it, stdout lines, script)
PATTERNS: dict[str, tuple[int, list[str], str]] = {
    "generate": (
        0,
        ["length"],
        """
        backend = TransformersBackend(model=MODEL)
        print(backend.generate(ask(max_tokens=24)).finish_reason)
        """,
    ),
    "stream_full": (
        0,
        ["streamed"],
        """
        backend = TransformersBackend(model=MODEL)
        for chunk in backend.stream(ask(max_tokens=24)):
            pass
        print("streamed" if chunk.response is not None else "no response")
        """,
    ),
    "stream_break": (  # the stream's generator is dropped (and cancels its row) before exit
        0,
        ["one chunk"],
        """
        backend = TransformersBackend(model=MODEL)
        for chunk in backend.stream(ask()):
            print("one chunk")
            break
        """,
    ),
    "stream_held": (  # the half-read stream stays referenced until the interpreter clears it
        0,
        ["one chunk"],
        """
        backend = TransformersBackend(model=MODEL)
        chunks = backend.stream(ask())
        next(chunks)
        print("one chunk")
        """,
    ),
    "thread_daemon": (  # a caller blocked in generate() on a daemon thread gets a BackendError
        0,
        ["caller: BackendError"],
        """
        import time
        backend = TransformersBackend(model=MODEL)
        queued, ended, outcome = threading.Event(), threading.Event(), []

        def call():
            try:
                backend.generate(ask(), on_update=lambda u: u.status == "IN_QUEUE" and queued.set())
                outcome.append("finished")
            except BackendError:
                outcome.append("BackendError")
            ended.set()

        threading.Thread(target=call, daemon=True).start()
        queued.wait()
        time.sleep(0.05)  # the worker is generating
        AFTER_HOOK.append(lambda: print("caller:", *outcome if ended.wait(10) else ["still blocked"]))
        """,
    ),
    "thread_nondaemon": (  # the interpreter waits for a non-daemon caller: its answer comes whole
        0,
        ["caller: length"],
        """
        backend = TransformersBackend(model=MODEL).load()  # (torch cannot be imported once exiting)
        queued = threading.Event()

        def call():
            response = backend.generate(ask(max_tokens=200), on_update=lambda u: queued.set())
            print("caller:", response.finish_reason)

        threading.Thread(target=call).start()
        queued.wait()
        """,
    ),
    "astream_abandoned": (
        0,
        ["one chunk"],
        """
        import asyncio
        backend = TransformersBackend(model=MODEL)

        async def main():
            async for chunk in backend.astream(ask()):
                print("one chunk")
                break

        asyncio.run(main())
        """,
    ),
    "langchain": (  # ChatMantis(backend="local") used (invoke, a stream left after one chunk), never closed
        0,
        ["invoked", "one chunk"],
        """
        from mantis_llm.langchain import ChatMantis
        chat = ChatMantis(backend="local", model=MODEL, max_tokens=1500)
        chat.invoke("Hi", max_tokens=8)
        print("invoked")
        for chunk in chat.stream(LONG):
            print("one chunk")
            break
        """,
    ),
    "llama_index": (  # Mantis(backend="local") likewise
        0,
        ["completed", "one chunk"],
        """
        from mantis_llm.llama_index import Mantis
        llm = Mantis(backend="local", model=MODEL, max_tokens=1500)
        llm.complete("Hi", max_tokens=8)
        print("completed")
        for chunk in llm.stream_complete(LONG):
            print("one chunk")
            break
        """,
    ),
    "sigint_stream": (  # Ctrl-C during a stream() loop, handled the usual way
        130,
        ["interrupted"],
        """
        backend = TransformersBackend(model=MODEL)
        try:
            for i, chunk in enumerate(backend.stream(ask())):
                if i == 0:
                    notify()  # the launcher sends SIGINT now
            print("the stream ended before the interrupt")
        except KeyboardInterrupt:
            print("interrupted")
            sys.exit(130)
        """,
    ),
    "sigint_uncaught": (  # the same Ctrl-C not caught: Python ends by SIGINT after finalizing
        -signal.SIGINT,
        [],
        """
        backend = TransformersBackend(model=MODEL)
        for i, chunk in enumerate(backend.stream(ask())):
            if i == 0:
                notify()
        print("the stream ended before the interrupt")
        """,
    ),
}

# Imports everything heavy, then forks the runs (JOBS at a time). A child returns from
# serve() and runs its pattern as this module's own code, so it ends like a script.
LAUNCHER = r"""
import gc, json, os, select, signal, sys, time

# the expensive part, paid once: what a script and the tiny model's loading import
import torch, transformers, PIL.ImageFile  # noqa: F401
from transformers import LlavaForConditionalGeneration, LlavaProcessor  # noqa: F401
import transformers.models.clip.modeling_clip, transformers.models.clip.image_processing_pil_clip  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import mantis_llm.backends.local.grammar, mantis_llm.langchain, mantis_llm.llama_index  # noqa: F401

gc.freeze()  # the children's collections skip these modules (~2 s less finalizing each)

def serve(spec):
    pending = [(name, i) for i in range(spec["runs"]) for name in spec["patterns"]]
    running = {}  # pid: [name, run, started, notify read end or None, interrupted]
    results = []
    while pending or running:
        while pending and len(running) < spec["jobs"]:
            name, i = pending.pop(0)
            r, w = os.pipe()
            sys.stdout.flush(); sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the child: its own stdio, the notify pipe, then its pattern
                for entry in running.values():
                    if entry[3] is not None:
                        os.close(entry[3])
                os.close(r)
                base = os.path.join(spec["out"], f"{name}-{i}")
                for fd, suffix in ((1, ".out"), (2, ".err")):
                    f = os.open(base + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(f, fd); os.close(f)
                null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
                # Ctrl-C raises KeyboardInterrupt even where pytest was started with SIGINT
                # ignored (a background job of a non-interactive shell)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                return name, w
            os.close(w)
            running[pid] = [name, i, time.monotonic(), r, False]
        fds = [e[3] for e in running.values() if e[3] is not None]
        ready = select.select(fds, [], [], 0.02)[0] if fds else []
        if not fds:
            time.sleep(0.02)
        for pid, entry in running.items():
            if entry[3] in ready:
                if not os.read(entry[3], 16):  # the child has ended
                    os.close(entry[3]); entry[3] = None
                elif not entry[4]:  # it asked for its Ctrl-C
                    os.kill(pid, signal.SIGINT)
                    entry[4] = True
        while running:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
            if pid == 0:
                break
            name, i, started, r, _ = running.pop(pid)
            if r is not None:
                os.close(r)
            results.append({"pattern": name, "run": i, "rc": os.waitstatus_to_exitcode(status),
                            "seconds": round(time.monotonic() - started, 2),
                            "cpu": round(usage.ru_utime + usage.ru_stime, 2)})
        for pid, entry in running.items():
            if time.monotonic() - entry[2] > spec["timeout"]:
                os.kill(pid, signal.SIGKILL)  # reaped (rc -9) on the next pass
    json.dump(results, sys.stdout)
    return None

spec = json.load(open(sys.argv[1]))
child = serve(spec)
if child is None:
    sys.exit(0)
_name, _notify_fd = child
MODEL = spec["model"]
del child, spec, serve

def notify():
    os.write(_notify_fd, b"!")

exec(compile(open(os.path.join(os.path.dirname(sys.argv[1]), f"pattern_{_name}.py")).read(), f"<{_name}>", "exec"))
"""


def run_patterns(model: Path, workdir: Path, names: list[str], runs: int = RUNS) -> list[dict]:
    """Run each pattern ``runs`` times through the launcher; one dict per run (rc, out, err)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (workdir / f"pattern_{name}.py").write_text(PRELUDE + textwrap.dedent(PATTERNS[name][2]))
    (workdir / "launcher.py").write_text(LAUNCHER)
    spec = {"model": str(model), "out": str(workdir), "patterns": names, "runs": runs, "jobs": JOBS, "timeout": 60}
    (workdir / "spec.json").write_text(json.dumps(spec))
    # one intra-op thread: spinning OpenMP workers of parallel children on 2 busy cores make
    # a 24-token answer take a second instead of 20 ms (they are not Python threads: the exit
    # problem does not involve them)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, str(workdir / "launcher.py"), str(workdir / "spec.json")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: nothing outlives a timeout or a Ctrl-C
    )
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    results = json.loads(out)
    for r in results:
        base = workdir / f"{r['pattern']}-{r['run']}"
        r["out"] = (base.with_suffix(".out")).read_text(errors="replace")
        r["err"] = (base.with_suffix(".err")).read_text(errors="replace")
    return results


def verdict(result: dict) -> str:
    """'ok', or what went wrong with this run."""
    rc, lines, _ = PATTERNS[result["pattern"]]
    if "terminate called" in result["err"] or result["rc"] == -signal.SIGABRT:
        return "abort"
    if result["rc"] == -signal.SIGKILL:
        return "hang"
    if result["rc"] != rc:
        return f"rc {result['rc']}"
    out = result["out"].splitlines()
    missing = [line for line in [*lines, "at exit: worker stopped"] if line not in out]
    return f"missing {missing}" if missing else "ok"


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    """The tiny model with a 2,048-token context: a long answer takes a second or more, so
    the patterns that exit mid-generation really do."""
    from mantis_llm.testing import build_tiny_mantis

    return build_tiny_mantis(tmp_path_factory.mktemp("tiny-mantis-exit") / "clip", max_position_embeddings=2048)


def test_scripts_that_never_close_end_cleanly(long_model, tmp_path):
    started = time.monotonic()
    results = run_patterns(long_model, tmp_path, list(PATTERNS))
    seconds = time.monotonic() - started
    table = {name: Counter(verdict(r) for r in results if r["pattern"] == name) for name in PATTERNS}
    bad = {name: dict(c) for name, c in table.items() if set(c) != {"ok"} or c["ok"] != RUNS}
    sample = next((r for r in results if verdict(r) != "ok"), None)
    detail = (
        ""
        if sample is None
        else f"\n{sample['pattern']} run {sample['run']}:\n{sample['out']}\n{sample['err'][-2000:]}"
    )
    assert not bad, f"{len(results)} runs in {seconds:.0f} s, not clean: {bad}{detail}"


# ----------------------------------------------------------------------------- in this process


def ask(prompt: str = "Tell me a long story.", **params) -> Request:
    return Request(Conversation.from_prompt(prompt), GenerationParams(**params))


class Slow:
    """A stopping criterion that makes every decoding step take 10 ms more and counts them."""

    steps = 0

    def __call__(self, input_ids, scores=None, **kwargs):
        self.steps += 1
        time.sleep(0.01)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def call_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():  # outcome: [result or exception, when]
        try:
            outcome.append(fn(*args, **kwargs))
        except BaseException as exc:
            outcome.append(exc)
        outcome.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def exit_hook(monkeypatch):
    """The exit hook on a registry of its own: the test's backends only, and ``_exiting``
    back to False afterwards (so this process's own exit hook still works)."""
    monkeypatch.setattr(backend_module, "_live", weakref.WeakSet())
    monkeypatch.setattr(backend_module, "_exiting", False)
    return backend_module._close_at_exit


def test_exit_hook_stops_running_requests_and_refuses_to_reload(tiny_model, exit_hook):
    slow = Slow()
    backend = TransformersBackend(model=tiny_model, generate_kwargs={"stopping_criteria": [slow]}).load()
    idle = TransformersBackend(model=tiny_model).load()
    worker = backend._scheduler.worker
    thread, outcome = call_in_thread(backend.generate, ask(max_tokens=300))  # 3 s at least
    wait_until(lambda: slow.steps > 0)
    steps = slow.steps
    exit_hook()
    thread.join(30)
    assert isinstance(outcome[0], BackendError) and "exiting" in str(outcome[0])
    assert slow.steps - steps <= 2  # the row ended at its next token (not after 300)
    assert not backend.loaded and not idle.loaded
    assert worker is not None and not worker.is_alive()
    with pytest.raises(BackendError, match="exiting"):  # nothing loads again once exiting
        backend.generate(ask(max_tokens=2))


def test_exit_hook_keeps_no_backend_alive(tiny_model, exit_hook):
    backend = TransformersBackend(model=tiny_model).load()
    assert backend in backend_module._live
    ref = weakref.ref(backend)
    backend.close()
    del backend
    gc.collect()
    assert ref() is None and not backend_module._live
    exit_hook()  # nothing left to close: fine


def test_close_fails_a_batch_held_open(tiny_model):
    """close() while the worker holds a batch open (another caller still preparing) fails
    that batch at once; it used to run to the end first."""
    backend = TransformersBackend(model=tiny_model, batch_wait=30).load()
    scheduler = backend._scheduler
    try:
        with scheduler.slot():  # a caller "still preparing": the worker waits up to 30 s for it
            queued = threading.Event()
            thread, outcome = call_in_thread(
                backend.generate, ask(max_tokens=8), on_update=lambda u: u.status == "IN_QUEUE" and queued.set()
            )
            assert queued.wait(30)
            wait_until(lambda: not scheduler._jobs)  # taken into a batch, which is held open
            time.sleep(0.05)
            backend.close()
        thread.join(5)
        assert isinstance(outcome[0], BackendError) and "closed" in str(outcome[0])
    finally:
        backend.close()
