"""Backend progress reports (fal queue position, logs) as LangChain custom callback events.

The event is ``"mantis_queue_update"`` (data: ``status``, ``request_id``, ``queue_position``,
``logs``, ``metrics``), seen by any handler's ``on_custom_event`` on the paths where LangChain
gives the model its run manager: ``invoke``/``ainvoke``/``batch``/``abatch`` and
``stream_events(version="v3")``. LangChain 1.x does not pass the run manager to
``_stream``/``_astream`` on the ``stream()``/``astream()`` paths (nor to ``astream_events``
v2, which uses them); there, the model's ``on_update`` field still sees every report.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)

from ..types import Update

QUEUE_UPDATE_EVENT = "mantis_queue_update"
"""Name of the custom callback event carrying a backend progress report."""


def update_sender(
    run_manager: CallbackManagerForLLMRun | None, user: Callable[[Update], None] | None
) -> Callable[[Update], None] | None:
    """An ``on_update`` that turns backend progress into a custom callback event (and
    calls the user's ``on_update``)."""
    if run_manager is None or not run_manager.handlers:
        return user
    # The run manager's own on_custom_event is the handler-interface no-op; dispatch through
    # a callback manager carrying this run's handlers, tags and metadata instead.
    manager = CallbackManager(
        run_manager.handlers,
        parent_run_id=run_manager.parent_run_id,
        tags=run_manager.tags,
        metadata=run_manager.metadata,
    )

    def send(update: Update) -> None:
        if user is not None:
            user(update)
        manager.on_custom_event(QUEUE_UPDATE_EVENT, asdict(update), run_id=run_manager.run_id)

    return send


@asynccontextmanager
async def aupdate_sender(
    run_manager: AsyncCallbackManagerForLLMRun | None, user: Callable[[Update], None] | None
) -> AsyncIterator[Callable[[Update], None] | None]:
    """Async twin of :func:`update_sender`. The backend calls ``on_update`` synchronously
    (from the loop or a worker thread); updates are queued and dispatched in order by a task,
    so neither the backend nor the loop ever waits on a handler."""
    if run_manager is None or not run_manager.handlers:
        yield user
        return
    manager = AsyncCallbackManager(
        run_manager.handlers,
        parent_run_id=run_manager.parent_run_id,
        tags=run_manager.tags,
        metadata=run_manager.metadata,
    )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Update | None] = asyncio.Queue()

    async def pump() -> None:
        while (update := await queue.get()) is not None:
            await manager.on_custom_event(QUEUE_UPDATE_EVENT, asdict(update), run_id=run_manager.run_id)

    def send(update: Update) -> None:
        if user is not None:
            user(update)
        loop.call_soon_threadsafe(queue.put_nowait, update)

    task = loop.create_task(pump())
    try:
        yield send
    except BaseException:
        task.cancel()
        raise
    loop.call_soon_threadsafe(queue.put_nowait, None)  # after every update already sent
    await task
