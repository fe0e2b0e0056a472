"""What an OpenAI-route call needs to know about its backend: the settings (immutable) and
what the backend learnt from the server (detected once, shared by every call)."""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import SecretStr

from ..._version import USER_AGENT
from ...errors import ConfigurationError
from ...images import ImageOptions
from .._http import origin

DEFAULT_TIMEOUT = 600.0  # the whole call, as the openai client's default
DEFAULT_MAX_RETRIES = 2  # as the openai client: a local server that is down should fail fast
CONNECT_TIMEOUT = 10.0
PROBE_TIMEOUT = 10.0  # each GET of the one-time detection (/v1/models, /version, ...)
ENV_BASE_URL = "MANTIS_BASE_URL"
ENV_API_KEY = "OPENAI_API_KEY"


def resolve_base_url(value: str | None) -> str:
    """The server's root URL, from ``value`` or ``MANTIS_BASE_URL``.

    ``http://host:8000`` and ``http://host:8000/v1`` mean the same server: a trailing ``/v1``
    (what the openai client wants) is dropped, so that the root routes vLLM and SGLang have
    outside ``/v1`` (``/version``, ``/get_model_info``) can be probed too.
    """
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"base_url must be a str URL, not {type(value).__name__}")
    url = (value or os.environ.get(ENV_BASE_URL) or "").strip()
    if not url:
        raise ConfigurationError(
            f"no server URL for the openai backend: pass base_url='http://host:8000' (or .../v1), "
            f"or `export {ENV_BASE_URL}=http://host:8000`"
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ConfigurationError(f"base_url {url!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigurationError(f"base_url {url!r} must be an http(s) URL such as http://127.0.0.1:8000")
    if parsed.query or parsed.fragment or parsed.userinfo:
        raise ConfigurationError("base_url must not carry a query, a fragment or credentials (pass api_key=)")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def resolve_key(api_key: str | SecretStr | None) -> SecretStr | None:
    """The bearer key: ``api_key``, else ``OPENAI_API_KEY``, else none (local servers need none).

    An explicitly empty key sends none, even when ``OPENAI_API_KEY`` is set.
    """
    if api_key is not None:
        if isinstance(api_key, SecretStr):
            api_key = api_key.get_secret_value()
        if not isinstance(api_key, str):
            raise ConfigurationError(f"api_key must be a str or SecretStr, not {type(api_key).__name__}")
        return SecretStr(api_key.strip()) if api_key.strip() else None
    env = os.environ.get(ENV_API_KEY, "").strip()
    return SecretStr(env) if env else None


@dataclass(frozen=True)
class OpenAIConfig:
    """Everything a flow needs to know about the backend (immutable)."""

    base_url: str  # the server's root, without /v1
    model: str | None  # the served model name the user asked for (None: the only one)
    key: SecretStr | None
    timeout: float = DEFAULT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    server: str | None = None  # forced server kind; None: detected
    image_options: ImageOptions = field(default_factory=ImageOptions)
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def chat_url(self) -> str:
        return self.api_url + "/chat/completions"

    def build(
        self,
        method: str,
        url: str,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        """An :class:`httpx.Request` with our headers and its own timeout.

        ``Authorization: Bearer`` is added only when the URL is on ``base_url``'s origin, so
        the key can never reach another host (an image download, say).
        """
        h = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        h.update(headers or {})
        req = httpx.Request(method, url, headers=h, **kwargs)
        if self.key is not None and origin(req.url) == origin(self.base_url):
            req.headers["Authorization"] = "Bearer " + self.key.get_secret_value()
        t = max(timeout, 0.001)
        req.extensions["timeout"] = httpx.Timeout(t, connect=min(CONNECT_TIMEOUT, t)).as_dict()
        return req


@dataclass
class ServerFacts:
    """What the backend learnt from the server, once: its kind and the models it serves."""

    server: str  # a key of ``_servers.SERVERS``
    served: tuple[str, ...] | None  # ids from /v1/models (None: the server lists none)
    model: str | None  # the name to send (None: leave ``model`` out of the request)


@dataclass
class SharedState:
    """Mutable state shared by a backend's calls (written under ``lock``, or by one
    event loop's probe; a race only costs a duplicate probe)."""

    facts: ServerFacts | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def new_request_id() -> str:
    """A fresh ``X-Request-Id`` (transformers serve and vLLM echo it; it names the call in errors)."""
    return uuid.uuid4().hex
