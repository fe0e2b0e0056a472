"""Backends: ``fal`` (hosted, over httpx), ``local`` (transformers, in-process) and ``openai``
(any OpenAI-compatible server serving Mantis: vLLM, SGLang, ``transformers serve``).

Importing this package imports neither httpx-heavy code paths nor torch; the concrete
classes load on first use.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import DEFAULT_FAL_ENDPOINT, DEFAULT_LOCAL_MODEL, DEFAULT_OPENAI_MODEL, Backend, OnUpdate

BACKEND_NAMES = ("fal", "local", "openai")


# name -> (module, class); the modules import nothing heavy (torch loads with the model)
_CLASSES = {
    "fal": ("fal", "FalBackend"),
    "local": ("local", "TransformersBackend"),
    "openai": ("openai", "OpenAIBackend"),
}
_ALIASES = {"transformers": "local"}
# the adapters' own fields, which a backend takes only if its constructor names them
_FIELD_OPTIONS = ("api_key", "timeout", "max_retries", "base_url")


def backend_class(name: str) -> type[Backend]:
    """The class ``backend=name`` builds (imported on first use)."""
    import importlib

    name = _ALIASES.get(name, name)
    if name not in _CLASSES:
        raise ConfigurationError(f"unknown backend {name!r}: expected one of {BACKEND_NAMES} or a Backend instance")
    module, cls = _CLASSES[name]
    backend: type[Backend] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return backend


def option_names(name: str) -> tuple[str, ...]:
    """The keyword options the named backend's constructor takes (besides its model)."""
    import inspect

    params = inspect.signature(backend_class(name).__init__).parameters
    return tuple(
        p for p in params if p not in ("self", "model", "endpoint") and params[p].kind == params[p].KEYWORD_ONLY
    )


def check_options(name: str, options: dict[str, Any], *, where: str = "backend_options") -> None:
    """Raise a ConfigurationError naming every option the named backend does not take."""
    valid = option_names(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for the "
            f"{_ALIASES.get(name, name)} backend; valid options: {', '.join(valid)}"
        )


def resolve_backend(
    backend: str | Backend,
    model: str | None = None,
    *,
    api_key: Any = None,
    timeout: float | None = None,
    max_retries: int | None = None,
    base_url: str | None = None,
    **options: Any,
) -> Backend:
    """Return ``backend`` itself if it is a :class:`Backend`, else build the named one.

    ``model`` is the fal endpoint id for ``"fal"``, a hub id or path for ``"local"`` and the
    served model name for ``"openai"`` (the fal default id given with ``"local"`` or
    ``"openai"`` means "not given": the local default, the server's only model). ``api_key``,
    ``timeout``, ``max_retries`` and ``base_url`` (the adapters' fields) go to the backends
    that take them, and None means the backend's own default. ``options`` are passed on as given
    (``image_short_side=None`` disables downsizing); a name the backend does not take is a
    :class:`~mantis_llm.errors.ConfigurationError` listing the valid ones.
    """
    if isinstance(backend, Backend):
        return backend
    cls = backend_class(backend)
    check_options(backend, options, where="backend options")
    fields = {"api_key": api_key, "timeout": timeout, "max_retries": max_retries, "base_url": base_url}
    valid = option_names(backend)
    given = {k: v for k, v in fields.items() if v is not None and k in valid}
    model_arg = "endpoint" if _ALIASES.get(backend, backend) == "fal" else "model"
    return cls(**{model_arg: resolve_model(backend, model)}, **given, **options)


def resolve_model(backend: str | Backend, model: str | None = None) -> str:
    """The model :func:`resolve_backend` runs for these arguments, found without building it."""
    if isinstance(backend, Backend):
        return backend.model
    if backend in ("local", "transformers"):
        return DEFAULT_LOCAL_MODEL if model in (None, DEFAULT_FAL_ENDPOINT) else model
    if backend == "openai":
        return DEFAULT_OPENAI_MODEL if model in (None, DEFAULT_FAL_ENDPOINT) else model
    return model or DEFAULT_FAL_ENDPOINT


def __getattr__(name: str):  # lazy: `from mantis_llm.backends import FalBackend`
    if name == "FalBackend":
        from .fal import FalBackend

        return FalBackend
    if name == "TransformersBackend":
        from .local import TransformersBackend

        return TransformersBackend
    if name == "OpenAIBackend":
        from .openai import OpenAIBackend

        return OpenAIBackend
    raise AttributeError(name)


__all__ = [
    "Backend",
    "OnUpdate",
    "resolve_backend",
    "resolve_model",
    "DEFAULT_FAL_ENDPOINT",
    "DEFAULT_LOCAL_MODEL",
    "DEFAULT_OPENAI_MODEL",
    "FalBackend",
    "OpenAIBackend",
    "TransformersBackend",
]
