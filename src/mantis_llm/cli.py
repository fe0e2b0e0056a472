"""``mantis-llm ask IMAGE [IMAGE ...] --prompt TEXT``: ask Mantis about images from a shell.
One IMAGE may be ``-`` (the image's bytes on stdin), or the prompt may be ``-p -`` (its text
on stdin), not both. ``--stream`` prints the answer as it is generated.

``mantis-llm prepare-model SRC DST [--template vicuna|llama3] [--bare]``: write a model directory
that vLLM, SGLang and ``transformers serve`` load with images intact (prints DST).

Exit codes: 0 success; 2 usage, configuration or input errors (bad option, missing
FAL_KEY, unreadable or unsupported image, rejected request, bad credentials); 1 backend
failures (fal 5xx or job error, rate limit, timeout); 130 interrupted (Ctrl-C).
Errors are one ``error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import __version__
from .backends import BACKEND_NAMES, DEFAULT_FAL_ENDPOINT, DEFAULT_LOCAL_MODEL, resolve_backend
from .errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    MantisError,
)
from .types import Conversation, GenerationParams, Image, Request, Response, Update

USER_ERRORS = (ConfigurationError, InvalidRequestError, AuthenticationError)
NO_KEY = (
    "error: FAL_KEY is not set; get a key at https://fal.ai/dashboard/keys and run "
    "`export FAL_KEY=...` (or use --backend local or --backend openai)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mantis-llm",
        description="Ask Mantis (multi-image LLaVA) about one or more images.",
        epilog="Exit codes: 0 ok, 1 backend failure, 2 usage/configuration/input error, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = sub.add_parser(
        "ask",
        help="ask a question about images",
        description="Ask a question about images (file paths, http(s) URLs or data URIs), in order.",
    )
    ask.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image file path, http(s) URL, data URI, or - (read from stdin)"
    )
    ask.add_argument(
        "-p",
        "--prompt",
        required=True,
        help="the question (images come first, as image 1, 2, ...), or - (read from stdin)",
    )
    ask.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        default="fal",
        help="fal (hosted, needs FAL_KEY), local (in-process, needs the local extra) or openai "
        "(an OpenAI-compatible server such as vLLM, at --base-url)",
    )
    ask.add_argument(
        "--model",
        metavar="ID_OR_PATH",
        help=f"fal endpoint id (default {DEFAULT_FAL_ENDPOINT}), local model id/path (default "
        f"{DEFAULT_LOCAL_MODEL}) or the openai server's model name (default: its only model)",
    )
    ask.add_argument(
        "--base-url",
        metavar="URL",
        help="the openai backend's server, e.g. http://127.0.0.1:8000 (default: $MANTIS_BASE_URL)",
    )
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {text, model, finish_reason, usage, request_id} instead of the text",
    )
    ask.add_argument("--max-tokens", type=int, metavar="N", help="maximum number of tokens to generate")
    ask.add_argument("--temperature", type=float, metavar="T", help="sampling temperature (0 = greedy)")
    ask.add_argument("-v", "--verbose", action="store_true", help="print fal queue updates to stderr")
    prep = sub.add_parser(
        "prepare-model",
        help="prepare a checkpoint for vLLM, SGLang or transformers serve",
        description=(
            "Write DST: the checkpoint's weights and tokenizer linked (not copied), plus the processor config, "
            "Mantis's chat template and the generation config (EOS ids) that OpenAI-compatible servers need "
            "to keep the images. Prints DST."
        ),
    )
    prep.add_argument(
        "src", metavar="SRC", help="checkpoint directory, or a Hub id already in the local Hugging Face cache"
    )
    prep.add_argument("dst", metavar="DST", help="directory to write (new, empty, or an earlier prepare-model output)")
    prep.add_argument(
        "--template",
        choices=("vicuna", "llama3"),
        help="chat format: vicuna (Mantis-llava-7b, bakllava) or llama3 (Mantis-8B-*); default: from the tokenizer",
    )
    prep.add_argument(
        "--bare",
        action="store_true",
        help="a plain <image> per image, for vLLM <= 0.24 serving MantisForConditionalGeneration (adds the wrapper)",
    )
    return parser


def _has_fal_key() -> bool:
    env = os.environ
    return bool(env.get("FAL_KEY") or (env.get("FAL_KEY_ID") and env.get("FAL_KEY_SECRET")))


class UsageError(ConfigurationError):
    """A command line that cannot run (exit code 2)."""


def _read_stdin(args: argparse.Namespace) -> None:
    """Replace a ``-`` image (bytes) or ``-p -`` (text) by what stdin holds."""
    dashes = args.images.count("-")
    if dashes and args.prompt == "-":
        raise UsageError("the image and the prompt cannot both be read from stdin: pass one of them as an argument")
    if dashes > 1:
        raise UsageError("only one IMAGE can be read from stdin (-)")
    if dashes:
        i = args.images.index("-")
        pipe = "pipe the image in: mantis-llm ask - -p ... < photo.jpg"
        if sys.stdin.isatty():  # would wait for an image typed at the keyboard
            raise UsageError(f"image {i + 1}: stdin is a terminal; {pipe}")
        data = sys.stdin.buffer.read()
        if not data:
            raise UsageError(f"image {i + 1}: stdin is empty ({pipe})")
        args.images[i] = data
    elif args.prompt == "-":
        args.prompt = sys.stdin.read().strip()
        if not args.prompt:
            raise UsageError("the prompt read from stdin is empty")


def _load_images(sources: Sequence[str | bytes]) -> list[Image]:
    images = []
    for i, src in enumerate(sources, 1):
        try:
            img = Image(src)
            if not img.is_remote:
                _ = img.data  # read local files now, so a typo fails before any network call
        except MantisError as exc:
            raise type(exc)(f"image {i}: {exc.message}") from None
        images.append(img)
    return images


class _Progress:
    """Prints each new queue status and log line to stderr."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last: tuple[str, int | None] | None = None
        self.logs: set[tuple[Any, Any]] = set()

    def __call__(self, update: Update) -> None:
        state = (update.status, update.queue_position)
        if state != self.last:
            self.last = state
            where = f" (position {update.queue_position})" if update.queue_position is not None else ""
            print(f"[{update.status.lower()}{where}]", file=self.out, flush=True)
        for entry in update.logs:
            key = (entry.get("timestamp"), entry.get("message"))
            if entry.get("message") and key not in self.logs:
                self.logs.add(key)
                print(f"  {entry['message']}", file=self.out, flush=True)


def _as_json(response: Response) -> str:
    return json.dumps(
        {
            "text": response.text,
            "model": response.model,
            "finish_reason": response.finish_reason,
            "usage": None if response.usage is None else response.usage.as_dict(),
            "request_id": response.request_id,
        },
        ensure_ascii=False,
    )


def _ask(args: argparse.Namespace) -> int:
    if args.base_url is not None and args.backend != "openai":
        print("error: --base-url is for --backend openai", file=sys.stderr)
        return 2
    if args.backend == "fal" and not _has_fal_key():
        print(NO_KEY, file=sys.stderr)
        return 2
    _read_stdin(args)
    params = GenerationParams(max_tokens=args.max_tokens, temperature=args.temperature)
    request = Request(Conversation.from_prompt(args.prompt, _load_images(args.images)), params)
    chatty = args.verbose or sys.stderr.isatty()
    on_update = _Progress(sys.stderr) if chatty else None
    if not chatty:  # keep piped stderr clean: no model-loading progress bars from the local backend
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with resolve_backend(args.backend, args.model, base_url=args.base_url) as backend:
        if args.stream:
            response = None
            for chunk in backend.stream(request, on_update=on_update):
                if not args.json and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                response = chunk.response or response
            if response is None:  # a backend must end with a response; do not print nothing silently
                raise MantisError("the backend ended the stream without a final response")
            print(_as_json(response) if args.json else "")
        else:
            response = backend.generate(request, on_update=on_update)
            print(_as_json(response) if args.json else response.text)
    return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from .prepare import prepare_model  # stdlib only: no torch, no transformers

    print(prepare_model(args.src, args.dst, template=args.template, bare=args.bare))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mantis-llm`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse printed them)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _prepare_model(args) if args.command == "prepare-model" else _ask(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MantisError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, USER_ERRORS) else 1
    except BrokenPipeError:  # e.g. piped into `head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
