"""What the LangChain and LlamaIndex adapters share: one rule for building their backend
(once, on first use), and the checks on their fields. Framework-neutral."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from typing import Any

from .backends import BACKEND_NAMES, Backend, backend_class, check_options, resolve_backend, resolve_model
from .errors import ConfigurationError, InvalidRequestError, from_validation_error
from .tokens import TokenCounter
from .types import GenerationParams


def require_extra(module: str, package: str, extra: str, needed_by: str) -> None:
    """Import ``module`` or raise ImportError saying which extra of mantis-llm installs it."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f'{needed_by} needs {package}: pip install "mantis-llm[{extra}]" ({exc})') from exc


# Settings the adapters' own fields make; backend_options may not set them a second time.
BUILT_BY_FIELDS = ("api_key", "timeout", "max_retries", "base_url", "model", "endpoint")


class BackendSlot:
    """Holds the backend an adapter builds on first use. Copies and pickles start empty (a
    backend holds connection pools or model weights), so a copied adapter builds its own."""

    __slots__ = ("backend", "lock", "_counter")

    def __init__(self) -> None:
        self.backend: Backend | None = None
        self.lock = threading.Lock()
        self._counter: tuple[Any, TokenCounter] | None = None

    def get(self, adapter: Any, api_key: Any) -> Backend:
        """The backend ``adapter``'s fields describe (``backend``, ``model``, ``timeout``,
        ``max_retries``, ``base_url``, ``backend_options``; both adapters name them alike): the
        instance it was given, else the one built on first use and then reused.
        ``api_key=None``: the backend reads the environment."""
        if isinstance(adapter.backend, Backend):
            return adapter.backend
        if self.backend is None:
            with self.lock:
                if self.backend is None:
                    self.backend = resolve_backend(
                        adapter.backend,
                        adapter.model,
                        api_key=api_key,
                        timeout=adapter.timeout,
                        max_retries=adapter.max_retries,
                        base_url=adapter.base_url,
                        **adapter.backend_options,
                    )
        return self.backend

    def token_counter(self, backend: str | Backend, model: str | None, backend_options: dict[str, Any]) -> TokenCounter:
        """How the adapter counts tokens (cached until the backend is built, loaded or closed):
        the backend's own tokenizer once there is one, else the model directory's tokenizer
        files, else the documented estimate. Never loads a model, never downloads."""
        target = backend if isinstance(backend, Backend) else self.backend
        key = (id(target), getattr(target, "loaded", None), backend, model)
        cached = self._counter
        if cached is not None and cached[0] == key:
            return cached[1]
        if target is not None:
            counter = TokenCounter.from_backend(target)
        else:
            name = resolve_model(backend, model)
            counter = TokenCounter(model=name)
            if backend == "local":  # a model directory (or a cached snapshot) has the real tokenizer
                with contextlib.suppress(ConfigurationError):
                    counter = TokenCounter.from_pretrained(name, context_length=backend_options.get("max_context"))
        self._counter = (key, counter)
        return counter

    def take(self) -> Backend | None:
        """Empty the slot; the backend it held (if any) is the caller's to close."""
        backend, self.backend = self.backend, None
        return backend

    def close(self) -> None:
        """Empty the slot and close the backend it built (the adapters' ``close``)."""
        backend = self.take()
        if backend is not None:
            backend.close()

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        backend = self.take()
        if backend is not None:
            await backend.aclose()

    def __deepcopy__(self, memo: dict[int, Any]) -> BackendSlot:
        return BackendSlot()

    def __reduce__(self) -> tuple[type[BackendSlot], tuple[()]]:
        return (BackendSlot, ())


def check_fields(
    owner: str, backend: str | Backend, backend_options: dict[str, Any], default_params: Callable[[], GenerationParams]
) -> None:
    """Refuse, at construction, what would otherwise fail at the first call: options the
    backend does not take (a misspelt ``mdoe``), options that duplicate a field, bad defaults."""
    clash = sorted(set(backend_options) & set(BUILT_BY_FIELDS))
    if clash:
        raise ConfigurationError(f"{owner}: backend_options may not set {clash}: use the {owner} fields instead")
    if isinstance(backend, str):
        try:
            check_options(backend, backend_options)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{owner}: {exc.message}") from None
    try:
        default_params()  # e.g. an empty stop string
    except InvalidRequestError as exc:
        raise ConfigurationError(f"{owner}: {exc.message}") from None


def typed_errors(cls: type, data: Any, handler: Any) -> Any:
    """A pydantic wrap validator: pydantic's ValidationError (a ValueError) becomes our
    ConfigurationError naming each field; that is not a ValueError, so pydantic passes it
    through unwrapped (also from the adapters' "after" validators)."""
    from pydantic import ValidationError

    try:
        return handler(data)
    except ValidationError as exc:
        raise from_validation_error(exc, cls.__name__) from None


def provider(backend: str | Backend) -> str:
    """The LangSmith provider name ("fal", "transformers", "openai"), found without building it."""
    if isinstance(backend, Backend):
        return backend.provider
    return backend_class(backend).provider


def key_for(backend: str | Backend, api_key: Any, explicitly_given: bool) -> Any:
    """The key an adapter passes on. Its ``api_key`` defaults to ``FAL_KEY``, which must never
    reach an OpenAI-compatible server: there only a key given explicitly is passed (else the
    backend reads ``OPENAI_API_KEY``)."""
    if backend == "openai" and not explicitly_given:
        return None
    return api_key


def backend_label(backend: str | Backend) -> str:
    """The name a serialized adapter stores for its backend (``"local"`` for transformers)."""
    if isinstance(backend, Backend):
        return "local" if backend.provider == "transformers" else backend.provider
    return backend


def check_backend(value: Any) -> Any:
    """A pydantic "before" validator for the adapters' ``backend`` field: one message, naming
    the value, for anything that is neither a backend name nor a Backend instance."""
    if isinstance(value, Backend) or (isinstance(value, str) and value in BACKEND_NAMES):
        return value
    from pydantic_core import PydanticCustomError

    *first, last = (repr(n) for n in BACKEND_NAMES)
    names = f"{', '.join(first)} or {last}"
    raise PydanticCustomError(
        "backend",
        "Input should be {names}, or a Backend instance, not {value}",
        {"value": repr(value)[:60], "names": names},
    )
