"""The chat-completions request body: the conversation as ordered text and ``image_url``
parts, the generation parameters, and what the server's capabilities call for.

The body carries no rendered prompt: the server's chat template (ours, installed by
``mantis-llm prepare-model``) writes Mantis's prompt from the parts, escaping and joining
them exactly as :func:`mantis_llm.prompt.render` does for the local backend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from ...images import ImageOptions
from ...prompt import render
from ...tools import OutputConstraint, output_constraint
from ...types import Conversation, Image, Request
from .._http.actions import Flow
from .._http.download import encode
from ._servers import Server

# transformers serve raises max_new_tokens to at least this when the model's config says
# less; a generation_config we send replaces that config, so it must say it itself
TRANSFORMERS_MAX_NEW_TOKENS = 1024


def json_constraint(request: Request) -> OutputConstraint | None:
    """The schema the answer must be when it may only be JSON (a forced tool choice or a
    response format), else None ("auto" allows text instead, which no schema can express)."""
    if request.tools is None and request.response_format is None:
        return None
    constraint = output_constraint(request)
    return constraint if constraint is not None and not constraint.text else None


def effective_stop(request: Request) -> tuple[str, ...] | None:
    """The stop strings that apply: none for a JSON-only answer, where one could cut the JSON
    short (the local backend ignores them there too)."""
    stop = request.params.stop
    return None if not stop or json_constraint(request) is not None else tuple(stop)


def schema_name(request: Request) -> str:
    """A ``json_schema.name`` OpenAI's pattern accepts (``^[a-zA-Z0-9_-]{1,64}$``)."""
    raw = request.response_format.name if request.response_format is not None else "tool_call"
    return re.sub(r"[^a-zA-Z0-9_-]", "_", raw)[:64] or "response"


def labeled_images(conversation: Conversation) -> list[tuple[str, Image]]:
    """Every image in the order the body carries them, named for error messages like the
    renderer names them (``"image i of message m"``)."""
    out = []
    for m, turn in enumerate(conversation.turns, 1):
        images = [p for p in turn.parts if isinstance(p, Image)]
        out += [(f"image {i} of message {m}", img) for i, img in enumerate(images, 1)]
    return out


def build_messages(conversation: Conversation, urls: Sequence[str], *, multi_images: bool = False) -> list[dict]:
    """One message per turn, its parts in order: ``{"type": "text"}`` and ``{"type": "image_url"}``
    (``urls[k]`` for the k-th image of the conversation). Empty text parts are left out; a turn
    with nothing left is sent as ``""``. ``multi_images`` marks every image part for SGLang."""
    it: Iterator[str] = iter(urls)
    messages = []
    for turn in conversation.turns:
        parts: list[dict[str, Any]] = []
        for part in turn.parts:
            if isinstance(part, Image):
                item: dict[str, Any] = {"type": "image_url", "image_url": {"url": next(it)}}
                if multi_images:
                    item["modalities"] = "multi-images"
                parts.append(item)
            elif part:
                parts.append({"type": "text", "text": part})
        messages.append({"role": turn.role, "content": parts or ""})
    return messages


def build_body(
    request: Request,
    server: Server,
    model: str | None,
    urls: Sequence[str],
    *,
    stream: bool,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body for ``request`` on ``server`` (see :class:`~._servers.Server`).

    ``temperature`` is always sent: vLLM and SGLang sample at 1.0 when it is left out, and
    Mantis's default everywhere else in this project is greedy (0). ``extra_body`` is
    merged last, so it can override anything.
    """
    params = request.params
    n_images = sum(isinstance(p, Image) for t in request.conversation.turns for p in t.parts)
    body: dict[str, Any] = {
        "messages": build_messages(request.conversation, urls, multi_images=server.multi_images and n_images > 1)
    }
    if model:
        body["model"] = model
    if params.max_tokens is not None:
        for name in server.length_fields:
            body[name] = params.max_tokens
    temperature = 0.0 if params.temperature is None else float(params.temperature)
    body["temperature"] = temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.seed is not None:
        body["seed"] = params.seed
    if server.sample_by_config and temperature > 0:
        config: dict[str, Any] = {"do_sample": True, "temperature": temperature}
        if params.top_p is not None:
            config["top_p"] = params.top_p
        config["max_new_tokens"] = params.max_tokens or TRANSFORMERS_MAX_NEW_TOKENS
        body["generation_config"] = json.dumps(config)  # a JSON *string*: an object is a 500
    constraint = json_constraint(request)
    if constraint is not None and server.json_schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": schema_name(request), "schema": constraint.schema, "strict": True},
        }
    stop = effective_stop(request)
    if stop and server.server_stop:
        body["stop"] = list(stop)
    if stream:
        body["stream"] = True
        if server.stream_usage:
            body["stream_options"] = {"include_usage": True}
    for key, value in server.fields.items():
        body[key] = dict(value) if isinstance(value, dict) else value
    body.update(extra_body or {})
    return body


def check_conversation(conversation: Conversation) -> None:
    """Refuse what the chat template would refuse (no user message, an empty prompt) with the
    renderer's own InvalidRequestError, before anything is sent."""
    render(conversation, "local")


# ------------------------------------------------------------------------------ images


def encode_images(conversation: Conversation, options: ImageOptions) -> Flow[list[str]]:
    """Each image as the ``image_url.url`` to send: http(s) URLs as they are (the server
    fetches them), everything else as a data URI of the image downsized as for fal (JPEG/PNG
    kept byte for byte when they already fit). Decoding runs off the event loop."""
    urls = []
    for label, image in labeled_images(conversation):
        enc = yield from encode(image, label, options)
        urls.append(enc if isinstance(enc, str) else enc.data_uri())
    return urls
