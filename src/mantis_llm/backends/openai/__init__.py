"""The OpenAI-compatible backend: Mantis on vLLM, SGLang or ``transformers serve``.

Where each concern lives: :mod:`._config` (settings, URL and key, shared state),
:mod:`._servers` (the capability table and server detection), :mod:`._payload` (the request
body: ordered text and image parts, parameters, images), :mod:`._errors` (typed errors, what
may be retried), :mod:`._flows` (the probe, a completion, a stream), :mod:`.backend`
(:class:`OpenAIBackend`: settings, pools, drivers).
"""

from .backend import OpenAIBackend

__all__ = ["OpenAIBackend"]
