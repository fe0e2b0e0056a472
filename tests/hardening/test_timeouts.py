"""Timeouts and cancellation through the adapters: a job that never finishes is cancelled at
fal (the emulator sees ``PUT .../cancel``), the caller gets RequestTimeoutError within the
timeout plus a small margin (or its CancelledError), and no thread or socket is left behind.

Each scenario runs in its own ``asyncio.run`` (so the loop and its executor are really gone
afterwards) between two snapshots of this process's threads and socket descriptors. The
emulator is started before the first snapshot: its own listening socket and threads are in
the baseline, its per-connection threads and sockets are not (they must end too)."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import pytest
from langchain_core.messages import HumanMessage
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock

from mantis_llm import errors
from mantis_llm.emulator import HANG
from mantis_llm.langchain import ChatMantis
from mantis_llm.llama_index import Mantis

from .conftest import Snapshot, tcp_sockets

TIMEOUT = 0.6
MARGIN = 1.0  # scheduling noise on a busy 2-core machine, plus the cancel PUT
IMG = "http://127.0.0.1:9/cat.jpg"  # passed to fal as a URL, never fetched


def make(kind: str, **kw):
    if kind == "langchain":
        return ChatMantis(**kw)
    return Mantis(**kw)


async def call(model, kind: str):
    if kind == "langchain":
        return await model.ainvoke([HumanMessage(content=[{"type": "image", "url": IMG}, "What is this?"])])
    return await model.achat([ChatMessage(role="user", blocks=[ImageBlock(url=IMG), TextBlock(text="What is this?")])])


def client_sockets(port: int) -> list:
    return [s for s in tcp_sockets() if s[1] == port]


def assert_nothing_left(before: Snapshot, port: int) -> None:
    threads, extra = before.leftovers()
    assert threads == [], f"threads left running: {threads}"
    assert extra <= 0, f"{extra} socket(s) left open: {tcp_sockets()}"
    assert client_sockets(port) == []


def assert_cancelled_at_fal(fresh_emu) -> str:
    assert len(fresh_emu.submissions) == 1
    rid = fresh_emu.submissions[0].request_id
    assert fresh_emu.cancelled == [rid]
    puts = [r for r in fresh_emu.requests if r.route == "cancel"]
    assert [(r.method, r.path.rsplit("/", 2)[-2]) for r in puts] == [("PUT", rid)]
    assert fresh_emu.job_status(rid) == "COMPLETED"  # cancelled jobs end COMPLETED (499) at the emulator
    return rid


@pytest.mark.parametrize("kind", ["langchain", "llama_index"])
def test_timeout_cancels_the_job_and_leaves_nothing_behind(fresh_emu, kind):
    fresh_emu.script([HANG])
    before = Snapshot.take()

    async def scenario():
        model = make(kind, timeout=TIMEOUT)
        t0 = time.perf_counter()
        try:
            with pytest.raises(errors.RequestTimeoutError) as ei:
                await call(model, kind)
            return time.perf_counter() - t0, ei.value
        finally:
            await model.aclose()

    elapsed, err = asyncio.run(scenario())
    assert TIMEOUT <= elapsed < TIMEOUT + MARGIN
    rid = assert_cancelled_at_fal(fresh_emu)
    assert err.request_id == rid and rid in str(err) and f"{TIMEOUT:g} s" in str(err)
    assert_nothing_left(before, urlsplit(fresh_emu.url).port)


def test_sync_timeout_cancels_the_job_and_leaves_nothing_behind(fresh_emu):
    fresh_emu.script([HANG])
    before = Snapshot.take()
    chat = ChatMantis(timeout=TIMEOUT)
    t0 = time.perf_counter()
    with pytest.raises(errors.RequestTimeoutError):
        chat.invoke([HumanMessage(content=[{"type": "image", "url": IMG}, "What is this?"])])
    assert TIMEOUT <= time.perf_counter() - t0 < TIMEOUT + MARGIN
    assert_cancelled_at_fal(fresh_emu)
    chat.close()
    assert_nothing_left(before, urlsplit(fresh_emu.url).port)


@pytest.mark.parametrize("kind", ["langchain", "llama_index"])
def test_task_cancellation_cancels_the_job_and_leaves_nothing_behind(fresh_emu, kind):
    fresh_emu.script([HANG])
    before = Snapshot.take()

    async def scenario():
        model = make(kind, timeout=30)
        task = asyncio.create_task(call(model, kind))
        deadline = time.monotonic() + 5
        while not fresh_emu.submissions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the job is running and we are waiting on its status stream
        assert fresh_emu.job_status(fresh_emu.submissions[0].request_id) == "IN_PROGRESS"
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.perf_counter() - t0
        await model.aclose()
        return took

    took = asyncio.run(scenario())
    assert took < MARGIN  # the cancel PUT is sent before CancelledError reaches us
    assert_cancelled_at_fal(fresh_emu)
    assert_nothing_left(before, urlsplit(fresh_emu.url).port)


def test_timeout_while_queued_behind_other_jobs(fresh_emu):
    """A job still IN_QUEUE when the deadline passes is cancelled too (and never runs)."""
    fresh_emu.concurrency = 1
    fresh_emu.script([HANG, "second"])

    async def scenario():
        chat = ChatMantis(timeout=30)
        blocker = asyncio.create_task(call(chat, "langchain"))
        while not fresh_emu.submissions:
            await asyncio.sleep(0.01)
        quick = ChatMantis(timeout=TIMEOUT)
        with pytest.raises(errors.RequestTimeoutError):
            await call(quick, "langchain")
        blocker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocker
        await chat.aclose()
        await quick.aclose()

    asyncio.run(scenario())
    first, second = (s.request_id for s in fresh_emu.submissions)
    assert sorted(fresh_emu.cancelled) == sorted([first, second])
    started = [r for r in fresh_emu.requests if r.route == "result"]
    assert started == []  # neither result was ever fetched
