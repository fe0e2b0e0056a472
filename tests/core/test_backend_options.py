"""Backend options are checked when the adapter (or resolve_backend) is built, not on the
first call: a misspelt name is a ConfigurationError naming it and the valid ones, and an
option given as None reaches the backend (None is a value for some of them)."""

from __future__ import annotations

import pytest

from mantis_llm import resolve_backend
from mantis_llm.errors import ConfigurationError


def adapters():
    out = []
    try:
        from mantis_llm.langchain import ChatMantis

        out.append(ChatMantis)
    except ImportError:  # pragma: no cover - the langchain extra is not installed
        pass
    try:
        from mantis_llm.llama_index import Mantis, MantisMultiModal

        out += [Mantis, MantisMultiModal]
    except ImportError:  # pragma: no cover
        pass
    return out


@pytest.mark.parametrize("cls", adapters(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["fal", "local"])
def test_a_misspelt_option_fails_at_construction_naming_it_and_the_valid_ones(cls, backend, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "k")
    with pytest.raises(ConfigurationError) as info:
        cls(backend=backend, backend_options={"mdoe": "sync", "image_short_side": 336})
    msg = str(info.value)
    assert msg.startswith(f"{cls.__name__}: backend_options: unknown option 'mdoe' for the {backend} backend")
    assert "valid options:" in msg and "image_short_side" in msg
    assert (", mode," in msg) is (backend == "fal")  # that backend's option list, not a generic one


def test_resolve_backend_says_the_same_without_a_type_error():
    with pytest.raises(ConfigurationError, match=r"unknown options 'colour', 'mdoe' for the fal backend"):
        resolve_backend("fal", api_key="k", mdoe="sync", colour="red")


@pytest.mark.parametrize("cls", adapters(), ids=lambda c: c.__name__)
def test_none_options_reach_the_backend(cls, monkeypatch):
    monkeypatch.setenv("FAL_KEY", "k")
    fal = cls(backend_options={"image_short_side": None}).get_backend()
    assert fal.image_options.short_side is None  # downsizing disabled, as documented
    local = cls(backend="local", backend_options={"image_short_side": None}).get_backend()
    assert local.image_options.short_side is None and not local.loaded  # nothing loaded to check it
    assert cls(backend="local").get_backend().image_options.short_side == 672  # not given: the default
