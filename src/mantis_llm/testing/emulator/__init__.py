"""The fal emulator (see :mod:`._server` for the URL layout); ``python -m mantis_llm.testing.emulator``
(or ``python -m mantis_llm.emulator``) runs it standalone, for clients in any language (see
:mod:`.__main__`: scripted answers from a JSON file, fault rates, the endpoint switches)."""

from ._faults import FAULT_KINDS, ROUTES, Faults
from ._jobs import HANG, JobError, ScriptEntry, Submission, expected_digest, expected_output, parse_script
from ._server import DEFAULT_APPS, DEFAULT_KEY, FORBIDDEN_KEY, FalEmulator, RecordedRequest

__all__ = [
    "FalEmulator",
    "Faults",
    "JobError",
    "HANG",
    "ScriptEntry",
    "parse_script",
    "Submission",
    "RecordedRequest",
    "expected_digest",
    "expected_output",
    "DEFAULT_KEY",
    "FORBIDDEN_KEY",
    "DEFAULT_APPS",
    "FAULT_KINDS",
    "ROUTES",
]
