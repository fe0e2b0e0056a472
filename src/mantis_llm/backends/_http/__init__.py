"""HTTP plumbing shared by the HTTP backends (fal, OpenAI-compatible servers), sans-I/O.

A backend writes its protocol as *flows*: generators that yield :mod:`.actions` and get
their outcome back. :mod:`.drivers` runs a flow once with an :class:`httpx.Client` and once
with an :class:`httpx.AsyncClient`, so sync and async cannot drift apart; :mod:`.retry`
holds the one retry loop (backoff, ``Retry-After``, the whole-call deadline) and :mod:`.sse`
the server-sent-events decoder.
"""

from __future__ import annotations

import functools
import ssl
from typing import Any, TypeVar

import httpx

from ..._validate import check_option

_Client = TypeVar("_Client", httpx.Client, httpx.AsyncClient)

LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=100)
"""Our clients' pool: no cap on connections (a backend caps its own concurrency), many kept alive."""


@functools.lru_cache(maxsize=1)
def ssl_context() -> ssl.SSLContext:
    """One TLS context for all our clients: building one costs tens of milliseconds, and an
    async client is made per event loop (e.g. each ``asyncio.run``)."""
    return httpx.create_ssl_context()


def new_client(cls: type[_Client]) -> _Client:
    """A client of ours (sync or async): shared TLS context, no redirects followed (a redirect
    must not carry a key to another host)."""
    return cls(limits=LIMITS, verify=ssl_context(), follow_redirects=False)


def origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what "the same host" means."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    return u.scheme, u.host, u.port or {"http": 80, "https": 443}.get(u.scheme)


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
