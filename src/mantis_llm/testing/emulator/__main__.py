"""``python -m mantis_llm.emulator``: run the fal emulator in the foreground, for any client.

It prints the environment that points a client at it (``export FAL_KEY=...`` and the four
URL variables), then one ``# fal emulator on http://127.0.0.1:PORT ...`` line, and serves
until Ctrl-C. Options beyond the port and timing:

``--script FILE``
    canned answers for the next jobs, in order: a JSON list whose entries are an answer
    string, ``"HANG"`` (the job never finishes), ``null`` (the fake model answers),
    ``{"answer": "HANG"}`` (an answer taken literally) or ``{"error": {"status_code": 503,
    "detail": "Runner disconnected", "error_type": "runner_disconnected"}}`` (the job fails;
    each key optional). After the list, the fake model answers.
``--fault NAME=VALUE`` (repeatable)
    a field of :class:`~mantis_llm.testing.emulator.Faults`: per-request rates ``error_500``,
    ``error_503``, ``error_429``, ``drop``, ``drop_after_accept``, ``cut``, ``slow``; per-job
    rates ``job_error``, ``hang``; seconds ``slow_delay``, ``retry_after``; ``seed`` (an
    integer) and ``routes`` (comma-separated route names that faults are limited to).
    Example: ``--fault error_503=0.1 --fault drop=0.05 --fault routes=submit,status``.
``--no-require-images``
    answer text-only questions (``"images": []``) instead of a 422.
``--stream-endpoint {serve,404,405}``
    ``404``/``405``: the app has no token stream (``POST {run_url}/{app}/stream``).

Exit codes: 0 after Ctrl-C, 2 for usage errors and a port that cannot be listened on (one
``error: ...`` line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import time
from typing import Any

from ._faults import ROUTES, Faults
from ._jobs import parse_script
from ._server import DEFAULT_KEY, FalEmulator

_RATES = ("error_500", "error_503", "error_429", "drop", "drop_after_accept", "cut", "slow", "job_error", "hang")
_SECONDS = ("slow_delay", "retry_after")


def parse_fault(text: str) -> tuple[str, Any]:
    """``NAME=VALUE`` -> (Faults field, value); raises argparse.ArgumentTypeError."""
    name, sep, raw = text.partition("=")
    name, raw = name.strip(), raw.strip()
    fields = {f.name for f in dataclasses.fields(Faults)}
    if not sep or name not in fields:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(fields))}")
    if name == "routes":
        routes = frozenset(r.strip() for r in raw.split(",") if r.strip())
        unknown = sorted(routes - set(ROUTES))
        if not routes or unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: routes are comma-separated names from {', '.join(ROUTES)}")
        return name, routes
    if name == "seed":
        try:
            return name, int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: seed must be an integer") from None
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {name} must be a number") from None
    if not value >= 0 or (name in _RATES and value > 1) or value == float("inf"):
        bound = "a rate from 0 to 1" if name in _RATES else "a non-negative number of seconds"
        raise argparse.ArgumentTypeError(f"{text!r}: {name} must be {bound}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mantis_llm.emulator",
        description="Run the fal emulator in the foreground and print the environment that points clients at it.",
        epilog='Script entries: an answer string, "HANG", null (the fake model), {"answer": str} or '
        '{"error": {"status_code": int, "detail": str, "error_type": str}}.',
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--service-time", type=float, default=0.05, help="seconds per job (default 0.05)")
    p.add_argument("--concurrency", type=int, default=None, help="max jobs in progress (default: unlimited)")
    p.add_argument("--key", default=DEFAULT_KEY, help="accepted FAL_KEY ('' accepts any key)")
    p.add_argument("--script", metavar="FILE", help="JSON list of canned answers for the next jobs, in order")
    p.add_argument(
        "--fault",
        action="append",
        type=parse_fault,
        default=[],
        metavar="NAME=VALUE",
        help="a fault setting, e.g. error_503=0.1, drop=0.05, seed=3, routes=submit,status (repeatable)",
    )
    p.add_argument(
        "--require-images",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer a request without images with a 422 (default) or, with --no-require-images, answer it",
    )
    p.add_argument(
        "--stream-endpoint",
        choices=("serve", "404", "405"),
        default="serve",
        help="serve the token stream POST {run_url}/{app}/stream (default), or answer it 404 or 405",
    )
    return p


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Run the emulator until Ctrl-C; exits with status 2 on a usage error or a busy port."""
    ns = build_parser().parse_args(argv)
    script = None
    if ns.script is not None:
        try:
            with open(ns.script, encoding="utf-8") as f:
                script = parse_script(json.load(f))
        except OSError as exc:
            _fail(f"--script {ns.script}: {exc.strerror or exc}")
        except ValueError as exc:  # bad JSON (json.JSONDecodeError) or a bad entry
            _fail(f"--script {ns.script}: {exc}")
    emu = FalEmulator(
        port=ns.port,
        key=ns.key or None,
        service_time=ns.service_time,
        concurrency=ns.concurrency,
        faults=Faults(**dict(ns.fault)),
        require_images=ns.require_images,
        stream_endpoint=True if ns.stream_endpoint == "serve" else int(ns.stream_endpoint),
    )
    if script is not None:
        emu.script(script)
    try:
        emu.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            _fail(f"port {ns.port} is in use on 127.0.0.1; pick another with --port, or --port 0 for a free one")
        _fail(f"cannot listen on 127.0.0.1:{ns.port}: {exc.strerror or exc}")
    try:
        for k, v in emu.env().items():
            print(f"export {k}={v}")
        extras = [f"{len(script)} scripted answers" if script else "", "" if ns.require_images else "text-only ok"]
        if ns.stream_endpoint != "serve":
            extras.append(f"no token stream ({ns.stream_endpoint})")
        if ns.fault:
            extras.append("faults " + ", ".join(f"{k}={v}" for k, v in ns.fault if k != "routes"))
        note = "; ".join(e for e in extras if e)
        print(f"# fal emulator on {emu.url}{' (' + note + ')' if note else ''}; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
