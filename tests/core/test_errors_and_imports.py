"""Error messages and pickling; importing the package stays light (no torch/transformers/PIL)."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from mantis_llm import errors
from mantis_llm.errors import (
    AuthenticationError,
    BackendError,
    EndpointNotFoundError,
    ImageError,
    InvalidRequestError,
    MantisError,
    RequestTimeoutError,
)


def test_str_includes_status_and_request_id():
    e = BackendError("the job failed", request_id="req-123", status_code=500)
    assert str(e) == "the job failed (HTTP 500, request_id=req-123)"
    assert str(AuthenticationError("bad key", status_code=401)) == "bad key (HTTP 401)"
    assert str(MantisError("plain")) == "plain"
    assert e.message == "the job failed"


@pytest.mark.parametrize("cls", [getattr(errors, n) for n in errors.__all__])
def test_every_error_pickles_with_its_fields(cls):
    e = cls("boom", request_id="r1", status_code=422, detail=[{"loc": ["body"], "msg": "bad"}])
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and isinstance(back, MantisError)
    assert (back.message, back.request_id, back.status_code, back.detail) == (
        "boom",
        "r1",
        422,
        [{"loc": ["body"], "msg": "bad"}],
    )
    assert str(back) == str(e)


def test_hierarchy():
    assert issubclass(ImageError, InvalidRequestError) and issubclass(ImageError, ValueError)
    assert issubclass(EndpointNotFoundError, BackendError)
    assert issubclass(RequestTimeoutError, TimeoutError)


def test_import_does_not_pull_heavy_modules():
    code = (
        "import mantis_llm, mantis_llm.prompt, mantis_llm.images, mantis_llm.backends, mantis_llm.errors, mantis_llm.cli\n"
        "import sys\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'langchain_core', 'llama_index') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "adapter, framework, extra",
    [("mantis_llm.langchain", "langchain_core", "langchain"), ("mantis_llm.llama_index", "llama_index", "llama-index")],
)
def test_adapter_without_its_extra_says_what_to_install(adapter, framework, extra):
    # A None entry in sys.modules makes `import framework` fail as if it were not installed.
    code = f"import sys; sys.modules[{framework!r}] = None; import {adapter}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and f'pip install "mantis-llm[{extra}]"' in last
