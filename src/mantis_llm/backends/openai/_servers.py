"""The servers this route knows, what each accepts, and how to tell them apart (pure).

Sources: research/openai-route.md (vLLM 0.33, SGLang 0.5.23, transformers 5.24 read in code)
and tests/openai/test_serve_behaviour.py (transformers serve pinned down for real).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .._http.responses import json_body

_NO_BOS = {"chat_template_kwargs": {"write_bos_token": False}}


@dataclass(frozen=True)
class Server:
    """What one kind of server is sent, and what the client does itself.

    ``server_stop``: the server applies ``stop`` (else we cut the text with the project's
    StopTrimmer and close the stream once a stop string is complete). ``stream_usage``:
    ask for usage in streams with ``stream_options``. ``json_schema``: the server enforces
    ``response_format: json_schema`` (else the tool flow validates and repairs).
    ``length_fields``: where ``max_tokens`` goes. ``fields``: sent with every request.
    ``multi_images``: SGLang reads more than one image only when each part says so.
    ``sample_by_config``: temperature alone does not sample (transformers serve keeps the
    model's ``do_sample``); sampling needs its ``generation_config`` JSON string.
    ``stream_always``: the server stops generating when a stream's client goes away but
    finishes a plain request whatever happens, so even ``generate()`` streams: a timeout or a
    cancellation then frees the server (vLLM and SGLang abort either kind).
    """

    name: str
    server_stop: bool
    stream_usage: bool
    json_schema: bool
    length_fields: tuple[str, ...] = ("max_completion_tokens",)
    fields: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    multi_images: bool = False
    sample_by_config: bool = False
    stream_always: bool = False


SERVERS: dict[str, Server] = {
    # vLLM tokenizes chat prompts with add_special_tokens=False unless told, so the template
    # would write BOS as text; a Llama tokenizer (legacy=False) tokenizes "<s>A" unlike
    # BOS + "A". Letting the tokenizer add BOS gives the local backend's very ids.
    "vllm": Server(
        "vllm",
        server_stop=True,
        stream_usage=True,
        json_schema=True,
        fields=MappingProxyType({"add_special_tokens": True, **_NO_BOS}),
    ),
    # SGLang: the template writes BOS (its chat tokenization adds no special tokens) [unverified].
    "sglang": Server("sglang", server_stop=True, stream_usage=True, json_schema=True, multi_images=True),
    # transformers serve 5.24: 422 on any unknown key, 500 on `stop` for vision models,
    # response_format ignored, stream_options ignored (usage always on the last chunk); its
    # processor adds BOS when the rendered prompt does not start with it. A plain request
    # runs to its end after the client left (and the server runs one request at a time).
    "transformers": Server(
        "transformers",
        server_stop=False,
        stream_usage=False,
        json_schema=False,
        fields=MappingProxyType(dict(_NO_BOS)),
        sample_by_config=True,
        stream_always=True,
    ),
    # Any other OpenAI-compatible server: the standard fields only; both length names (older
    # servers know only max_tokens); no structured-output claims.
    "openai": Server(
        "openai",
        server_stop=True,
        stream_usage=True,
        json_schema=False,
        length_fields=("max_completion_tokens", "max_tokens"),
    ),
}
SERVER_NAMES = tuple(SERVERS)

# GETs the detection makes when /v1/models does not tell, in this order (SGLang's before
# vLLM's: only vLLM's /version is known not to exist on the other one)
PROBES = ("/get_model_info", "/model_info", "/version")


def served_models(data: Any) -> tuple[str, ...] | None:
    """The model ids of a ``/v1/models`` body (None when it is not a model list)."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    return tuple(m["id"] for m in data["data"] if isinstance(m, dict) and isinstance(m.get("id"), str))


def kind_from_models(data: Any) -> str | None:
    """The server kind a ``/v1/models`` body shows, or None.

    vLLM and SGLang name themselves in ``owned_by`` (their ModelCard defaults); transformers
    serve adds a ``status: {"value": "loaded" | "unloaded"}`` to every entry, which no
    OpenAI model object has.
    """
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    entries = [m for m in data["data"] if isinstance(m, dict)]
    owners = {m.get("owned_by") for m in entries}
    if "vllm" in owners:
        return "vllm"
    if "sglang" in owners:
        return "sglang"
    if entries and all(isinstance(m.get("status"), dict) and "value" in m["status"] for m in entries):
        return "transformers"
    return None


def kind_from_probe(path: str, status: int, data: Any) -> str | None:
    """The server kind one probe GET's answer shows, or None (any failure means "not this one")."""
    if status != 200 or not isinstance(data, dict):
        return None
    if path in ("/get_model_info", "/model_info") and isinstance(data.get("model_path"), str):
        return "sglang"
    if path == "/version" and isinstance(data.get("version"), str):
        return "vllm"
    return None


def probe_answer(path: str, resp: Any) -> str | None:
    """:func:`kind_from_probe` for an httpx response or a transport error."""
    status = getattr(resp, "status_code", None)
    if not isinstance(status, int):
        return None
    return kind_from_probe(path, status, json_body(resp))
