"""The fal backend: Mantis hosted at fal (``fal-ai/mantis-llava-7b-v11``).

Where each concern lives: :mod:`._config` (settings, shared state), :mod:`._policy` (what
may be retried), :mod:`._errors` (typed errors), :mod:`._call` (one call: deadline,
progress, the retried step), :mod:`._payload` (prompt, images, uploads), :mod:`._flows`
(queue, sync and stream), :mod:`.backend` (:class:`FalBackend`: settings, pools, drivers).
"""

from .backend import FalBackend

__all__ = ["FalBackend"]
