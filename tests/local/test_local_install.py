"""The `local` extra is optional: nothing imports torch early, and its absence is a clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK_LAZY = """
import sys
from mantis_llm import TransformersBackend
from mantis_llm.backends.local import TransformersBackend as T2
import mantis_llm.testing
b = TransformersBackend(model="somewhere", batch_wait=0.01)
assert T2 is TransformersBackend and not b.loaded
heavy = sorted(m for m in ("torch", "transformers", "tokenizers") if m in sys.modules)
print("HEAVY", heavy)
"""

MISSING = """
import sys
sys.modules[sys.argv[1]] = None   # makes `import <module>` raise ImportError
from mantis_llm import Conversation, Request, TransformersBackend
from mantis_llm.errors import ConfigurationError
backend = TransformersBackend(model="anything")
try:
    backend.generate(Request(Conversation.from_prompt("hi")))
except ConfigurationError as exc:
    print("ERROR", exc)
"""


def run(code: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_constructing_imports_no_torch():
    assert "HEAVY []" in run(CHECK_LAZY)


@pytest.mark.parametrize("module", ["torch", "transformers"])
def test_missing_extra_is_a_configuration_error(module):
    out = run(MISSING, module)
    assert out.startswith("ERROR the local backend needs torch and transformers")
    assert 'pip install "mantis-llm[local]"' in out
