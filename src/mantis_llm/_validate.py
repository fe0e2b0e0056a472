"""Checks of constructor arguments, shared by every class that takes options.

A bottom-layer module (imports only :mod:`mantis_llm.errors`), so that ``images`` and the
backends can share one wording: ``"max_batch_size must be a positive integer, not 0"``.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""The default of an option where None is a meaningful value (``image_short_side=None``
disables downsizing), so "not given" needs its own marker."""


def check_option(ok: bool, name: str, what: str, value: Any) -> None:
    """Raise a ConfigurationError naming the constructor argument ``name`` unless ``ok``."""
    if not ok:
        raise ConfigurationError(f"{name} must be {what}, not {value!r}")


def is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    """An int or float, not a bool (True is an int to Python, never a timeout to a user)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_str_dict(value: Any) -> bool:
    """A dict whose keys are all str (JSON object fields such as ``extra_body``)."""
    return isinstance(value, dict) and all(isinstance(k, str) for k in value)
