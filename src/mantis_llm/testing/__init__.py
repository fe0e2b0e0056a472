"""Offline stand-ins for tests, notebooks and benchmarks (yours and ours).

- :class:`FalEmulator`: a real HTTP server on 127.0.0.1 speaking fal's protocol, with a
  deterministic fake model, scripted answers, fault injection and a record of every request.
- :func:`build_tiny_mantis`: a tiny random-weight Mantis of the real architecture, for the
  local backend.
- :func:`make_image_bytes`: a small encoded test image.

Importing this package imports neither torch nor transformers.
"""

from ._images import make_image_bytes
from .emulator import HANG, FalEmulator, Faults, JobError, expected_digest, expected_output
from .tiny_mantis import build_tiny_mantis, tokens_per_image

__all__ = [
    "FalEmulator",
    "Faults",
    "JobError",
    "HANG",
    "expected_digest",
    "expected_output",
    "build_tiny_mantis",
    "tokens_per_image",
    "make_image_bytes",
]
