"""What a fal call needs to know about its backend: settings (immutable) and the state
shared across calls (upload cache, storage token, what the endpoint showed it lacks or needs)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from ..._version import USER_AGENT
from .._http import origin

DEFAULT_QUEUE_URL = "https://queue.fal.run"
DEFAULT_RUN_URL = "https://fal.run"
DEFAULT_REST_URL = "https://rest.fal.ai"
DEFAULT_CDN_URL = "https://v3.fal.media"

CONNECT_TIMEOUT = 10.0
STEP_TIMEOUT = 30.0  # status, result, token: one request never waits longer than this
CANCEL_TIMEOUT = 3.0  # the best-effort cancel PUT
STATUS_STREAM_IDLE = 5.0  # reopen a silent status stream after this long (bounds deadline overshoot)
POLL_START, POLL_GROWTH, POLL_MAX = 0.02, 1.3, 1.0  # adaptive polling interval (seconds)
STREAM_REOPENS = 3  # status streams that end without COMPLETED, in a row, before polling instead
DRAIN_TIMEOUT = 1.0  # reading a stream the server is ending to its end (see _flows.finish)

TextOnly = Literal["retry", "as_is", "placeholder"]
"""What a request without images sends: ``images: []`` then, on fal's 422 for the missing
image, once more with a blank placeholder (``"retry"``); ``images: []`` only (``"as_is"``);
the placeholder from the start (``"placeholder"``)."""
SubmitPolicy = Literal["at_most_once", "at_least_once"]
"""Whether a POST that creates a job is resent after a failure that may have created one."""


@dataclass(frozen=True)
class FalConfig:
    """Everything a flow needs to know about the backend (immutable)."""

    endpoint: str
    key: SecretStr
    queue_url: str
    run_url: str
    rest_url: str
    cdn_url: str
    timeout: float
    max_retries: int
    with_logs: bool = False
    upload_threshold: int = 1_000_000
    extra_input: dict[str, Any] = field(default_factory=dict)
    text_only: TextOnly = "retry"
    submit_policy: SubmitPolicy = "at_most_once"

    @functools.cached_property
    def trusted_origins(self) -> frozenset[tuple[str, str, int | None]]:
        """The hosts that may see ``Authorization: Key``: the configured queue, run and REST hosts."""
        return frozenset(origin(u) for u in (self.queue_url, self.run_url, self.rest_url))

    def build(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        connect: float = CONNECT_TIMEOUT,
        key_auth: bool = True,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        """An :class:`httpx.Request` with our headers and its own timeout.

        ``Authorization: Key`` is added only when ``key_auth`` and the URL's host is one of
        :attr:`trusted_origins`, so the key can never reach another host.
        """
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        h.update(headers or {})
        req = httpx.Request(method, url, headers=h, **kwargs)
        if key_auth and origin(req.url) in self.trusted_origins:
            req.headers["Authorization"] = "Key " + self.key.get_secret_value()
        t = max(timeout, 0.001)
        req.extensions["timeout"] = httpx.Timeout(t, connect=min(connect, t)).as_dict()
        return req

    def app_base(self) -> str:
        """``owner/app`` of the endpoint (status/result/cancel URLs never carry a subpath)."""
        parts = self.endpoint.strip("/").split("/")
        n = 3 if parts[0] in ("workflows", "comfy") else 2
        return "/".join(parts[:n])


@dataclass
class CdnToken:
    header: SecretStr  # "Bearer <token>"
    expires: float  # time.monotonic() after which a new token is fetched


@dataclass
class SharedState:
    """Mutable state a backend keeps across calls (plain dicts: races only cost a duplicate)."""

    uploads: dict[str, str] = field(default_factory=dict)  # sha256 -> access_url
    token: CdnToken | None = None
    status_stream: bool = True  # False once the server showed it has no status stream
    token_stream: bool = True  # False once the endpoint answered 404/405 for {run_url}/{endpoint}/stream
    needs_image: bool = False  # True once the endpoint rejected a request for having no image
