"""``python -m mantis_llm.emulator``: run the fal emulator in the foreground."""

from __future__ import annotations

import argparse
import time

from ._server import DEFAULT_KEY, FalEmulator


def main(argv: list[str] | None = None) -> None:
    """Run the emulator in the foreground and print the environment to point clients at it."""
    p = argparse.ArgumentParser(prog="python -m mantis_llm.emulator", description=main.__doc__)
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--service-time", type=float, default=0.05, help="seconds per job (default 0.05)")
    p.add_argument("--concurrency", type=int, default=None, help="max jobs in progress (default: unlimited)")
    p.add_argument("--key", default=DEFAULT_KEY, help="accepted FAL_KEY ('' accepts any key)")
    ns = p.parse_args(argv)
    emu = FalEmulator(port=ns.port, key=ns.key or None, service_time=ns.service_time, concurrency=ns.concurrency)
    with emu:
        for k, v in emu.env().items():
            print(f"export {k}={v}")
        print(f"# fal emulator on {emu.url}; Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
