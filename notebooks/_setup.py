"""The setup and teardown shared by the fal notebooks (01-03): the real endpoint, or the emulator.

Each notebook's setup cell is::

    from _setup import emulator_unless_key, stop_emulator

    emu, USE_REAL_FAL = emulator_unless_key(service_time=0.1)

With a fal key in the environment (``FAL_KEY``, or ``FAL_KEY_ID`` + ``FAL_KEY_SECRET``) and not
in CI, nothing is started and the notebook talks to the hosted Mantis. Otherwise, and always
when ``CI`` is ``1``/``true``, a :class:`~mantis_llm.emulator.FalEmulator` starts on 127.0.0.1 and
the ``FAL_*`` variables are pointed at it, and the notebook says loudly that its answers are the
emulator's. The notebooks import this file from their own folder (Jupyter and nbmake run a
notebook with its folder as the working directory). Not part of the package.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from mantis_llm.emulator import FalEmulator

REAL_ENDPOINT = "fal-ai/mantis-llava-7b-v11"


class FalSetup(NamedTuple):
    """What the notebooks need: the running emulator (None with the real endpoint) and the mode."""

    emu: FalEmulator | None
    use_real_fal: bool


def has_fal_key() -> bool:
    """Whether the environment holds fal credentials."""
    env = os.environ
    return bool(env.get("FAL_KEY") or (env.get("FAL_KEY_ID") and env.get("FAL_KEY_SECRET")))


def in_ci() -> bool:
    """Whether this runs in CI (``CI=1`` or ``CI=true``): then the emulator is used even with a key."""
    return os.environ.get("CI", "").lower() in ("1", "true")


def emulator_unless_key(service_time: float, concurrency: int | None = None) -> FalSetup:
    """Use the real fal endpoint when a key is set (and not in CI), else start the emulator.

    ``service_time`` (seconds per job) and ``concurrency`` (jobs in progress at once, None for no
    limit) are the emulator's settings; they are unused with the real endpoint.
    """
    ci = in_ci()
    if has_fal_key() and not ci:
        print(f"Using the REAL fal endpoint {REAL_ENDPOINT} (FAL_KEY is set; calls are billed).")
        return FalSetup(emu=None, use_real_fal=True)

    from mantis_llm.emulator import FalEmulator

    emu = FalEmulator(service_time=service_time, concurrency=concurrency).start()
    os.environ.update(emu.env())  # FAL_KEY, FAL_QUEUE_URL, FAL_RUN_URL, ... now point at the emulator
    why = "CI=true" if ci else "no FAL_KEY"
    print(f"EMULATOR MODE ({why}): every answer below comes from mantis_llm's FalEmulator at {emu.url},")
    print("a fake model on this machine -- not from Mantis.")
    return FalSetup(emu=emu, use_real_fal=False)


def stop_emulator(emu: FalEmulator | None) -> None:
    """Stop the emulator started by :func:`emulator_unless_key`, if any (no server thread outlives the notebook)."""
    if emu is not None:
        emu.stop()
        print("emulator stopped")
