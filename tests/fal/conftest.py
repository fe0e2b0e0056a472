"""Fixtures for the fal tests: ``make(**options)`` builds a FalBackend pointed at ``fresh_emu``
(closed after the test)."""

from __future__ import annotations

import pytest

from mantis_llm import FalBackend


@pytest.fixture
def make(fresh_emu):
    made = []

    def _make(**kw):
        kw.setdefault("api_key", fresh_emu.key)
        kw.setdefault("timeout", 20)
        for name in ("queue_url", "run_url", "rest_url", "cdn_url"):
            kw.setdefault(name, getattr(fresh_emu, name))
        b = FalBackend(**kw)
        made.append(b)
        return b

    yield _make
    for b in made:
        b.close()
