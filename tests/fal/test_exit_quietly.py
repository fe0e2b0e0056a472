"""Scripts that use FalBackend and exit without tidying up print nothing at exit: a sync call
without ``close()`` (no unclosed-socket ResourceWarning) and async calls on loops that
``asyncio.run`` did not shut down (no "Task was destroyed but it is pending!").

Each case runs in a fresh interpreter (with ResourceWarnings shown) several times, against the
test's emulator."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # Python processes

RUNS = 3
PRELUDE = """
import asyncio, sys, threading
from mantis_llm import Conversation, FalBackend, Request
req = Request(Conversation.from_prompt("hi", ["https://example.com/a.png"]))
make = lambda **kw: FalBackend(timeout=20, **kw)
"""

CASES = {
    # a script: one sync call, no close()
    "sync-generate": "print(make().generate(req).text)",
    "sync-stream": "print(''.join(c.text for c in make().stream(req)))",
    "langchain-invoke": """
        from mantis_llm.langchain import ChatMantis
        print(ChatMantis().invoke(_message()).content)
    """,
    # run_until_complete, then a bare loop.close() (no shutdown_asyncgens)
    "loop-close-queue": """
        loop = asyncio.new_event_loop()
        print(loop.run_until_complete(make().agenerate(req)).text)
        loop.close()
    """,
    "loop-close-stream": """
        async def main():
            return "".join([c.text async for c in make().astream(req)])
        loop = asyncio.new_event_loop()
        print(loop.run_until_complete(main()))
        loop.close()
    """,
    "loop-close-kept-backend": """
        b = make()
        loop = asyncio.new_event_loop()
        print(loop.run_until_complete(b.agenerate(req)).text)
        loop.close()
    """,
    # a stop sequence drops the token stream mid-body
    "loop-close-stop-sequence": """
        from mantis_llm import GenerationParams
        stop = Request(req.conversation, GenerationParams(stop=["digest"]))
        async def main():
            return "".join([c.text async for c in make(mode="stream").astream(stop)])
        loop = asyncio.new_event_loop()
        print(loop.run_until_complete(main()))
        loop.close()
    """,
    "loop-close-langchain": """
        from mantis_llm.langchain import ChatMantis
        chat = ChatMantis()
        loop = asyncio.new_event_loop()
        print(loop.run_until_complete(chat.ainvoke(_message())).content)
        print("".join(c.content for c in loop.run_until_complete(_collect(chat))))
        loop.close()
    """,
    # a notebook kernel's loop: used, then left open (not closed, not shut down) at exit
    "loop-left-open": """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        b = make()
        print(loop.run_until_complete(b.agenerate(req)).text)
        print(len(loop.run_until_complete(_collect_backend(b))))
    """,
    # a long-lived worker: a loop running in a daemon thread when the interpreter exits
    "worker-thread": """
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        b = make()
        print(asyncio.run_coroutine_threadsafe(b.agenerate(req), loop).result(20).text)
        print(len(asyncio.run_coroutine_threadsafe(_collect_backend(b), loop).result(20)))
    """,
    # the tidy way stays tidy
    "asyncio-run": "print(asyncio.run(make().agenerate(req)).text)",
}
HELPERS = """
def _message():
    from langchain_core.messages import HumanMessage
    return [HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}, "hi"])]
async def _collect(chat):
    return [c async for c in chat.astream(_message())]
async def _collect_backend(b):
    return [c async for c in b.astream(req)]
"""
# A bare loop.close() leaves a loop's pooled connections open for the garbage collector: nothing
# can close an asyncio socket once its loop is closed (see FalBackend.close). Only the
# ResourceWarning shown by -W default says so; nothing is printed otherwise.
BARE_CLOSE = {case for case in CASES if case.startswith("loop-close")}


@pytest.mark.parametrize("case", list(CASES))
def test_exits_quietly(fresh_emu, case):
    code = PRELUDE + HELPERS + textwrap.dedent(CASES[case])
    env = {**os.environ, **fresh_emu.env(), "PYTHONWARNINGS": "" if case in BARE_CLOSE else "default"}
    for _ in range(RUNS):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "[mantis-emulator]" in out.stdout or out.stdout.split()[-1].isdigit()
        assert out.stderr == "", out.stderr


def test_a_collected_backend_leaves_its_pool_to_the_loops_next_call(fresh_emu, make):
    """No task is scheduled when a backend is collected: its clients on a loop still open are
    closed by the next FalBackend call on that loop (or its shutdown, or the exit)."""
    import asyncio
    import gc

    from mantis_llm import Conversation, FalBackend, Request

    req = Request(Conversation.from_prompt("hi", ["https://example.com/a.png"]))
    loop = asyncio.new_event_loop()
    try:
        gone = FalBackend(api_key=fresh_emu.key, queue_url=fresh_emu.queue_url, timeout=20)
        loop.run_until_complete(gone.agenerate(req))
        (shards, _closer) = next(iter(gone._async_clients.values()))
        clients = list(shards)
        sync_client = gone._sync_client()
        del gone, _closer
        gc.collect()
        assert sync_client.is_closed  # closed with its backend
        assert not any(c.is_closed for c in clients)
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]  # nothing scheduled on the loop
        loop.run_until_complete(make().agenerate(req))  # another backend's call on the same loop
        assert all(c.is_closed for c in clients)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
