"""``mantis_llm.emulator``: the fal emulator's old import path (it lives in
:mod:`mantis_llm.testing.emulator` now); kept for one release. ``python -m mantis_llm.emulator``
runs it standalone."""

from .testing.emulator import *  # noqa: F403
from .testing.emulator import __all__  # noqa: F401
from .testing.emulator.__main__ import main

if __name__ == "__main__":
    main()
