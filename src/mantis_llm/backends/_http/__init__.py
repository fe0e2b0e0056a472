"""HTTP plumbing shared by the HTTP backends (fal, OpenAI-compatible servers), sans-I/O.

A backend writes its protocol as *flows*: generators that yield :mod:`.actions` and get
their outcome back. :mod:`.drivers` runs a flow once with an :class:`httpx.Client` and once
with an :class:`httpx.AsyncClient`, so sync and async cannot drift apart; :mod:`.retry`
holds the one retry loop (backoff, ``Retry-After``, the whole-call deadline) and :mod:`.sse`
the server-sent-events decoder.
"""

from __future__ import annotations

from typing import Any

import httpx

from ..._validate import check_option


def check_clients(client: Any, async_client: Any) -> None:
    """The ``client`` / ``async_client`` constructor arguments of an HTTP backend: your own
    httpx clients or None."""
    check_option(client is None or isinstance(client, httpx.Client), "client", "an httpx.Client or None", client)
    check_option(
        async_client is None or isinstance(async_client, httpx.AsyncClient),
        "async_client",
        "an httpx.AsyncClient or None",
        async_client,
    )
