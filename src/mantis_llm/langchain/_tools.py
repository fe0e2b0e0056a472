"""LangChain's tool shapes to the neutral ones and back: bound tools and ``tool_choice`` to a
:class:`~mantis_llm.types.ToolSpec`, an OpenAI-shaped ``response_format`` to a
:class:`~mantis_llm.types.ResponseFormat`, a :class:`~mantis_llm.types.Response`'s calls to
``tool_calls`` / ``invalid_tool_calls`` / ``tool_call_chunks``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages.tool import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call as lc_invalid_tool_call
from langchain_core.messages.tool import tool_call as lc_tool_call
from langchain_core.messages.tool import tool_call_chunk as lc_tool_call_chunk

from .. import tools
from ..errors import InvalidRequestError
from ..types import Response, ResponseFormat, ToolSpec


def tool_spec(bound: Sequence[dict[str, Any]], tool_choice: Any, parallel: bool | None) -> ToolSpec:
    """The spec for the OpenAI-style tool dicts ``bind_tools`` stored.

    Mantis makes one call per answer unless ``parallel_tool_calls=True``: a small model asked
    for "one or more" calls invents extra ones, and LangChain's agents loop over single calls
    just as well."""
    spec_tools = tuple(tools.tool_from_openai(t) for t in bound)
    return ToolSpec(spec_tools, tools.normalize_tool_choice(tool_choice, spec_tools), parallel=parallel is True)


def response_format(value: Any) -> ResponseFormat:
    """``{"type": "json_schema", "json_schema": {"name", "schema"}}`` (OpenAI's shape, as
    create_agent's ProviderStrategy sends it), ``{"type": "json_schema", "schema": {...}}``, or
    ``{"type": "json_object"}`` (any JSON object)."""
    if isinstance(value, dict) and value.get("type") == "json_object":
        return ResponseFormat()
    if isinstance(value, dict) and value.get("type") == "json_schema":
        inner = value.get("json_schema")
        if isinstance(inner, dict) and isinstance(inner.get("schema"), dict):
            return ResponseFormat(inner["schema"], str(inner.get("name") or "response"))
        if isinstance(value.get("schema"), dict):
            return ResponseFormat(value["schema"], str(value.get("name") or "response"))
    raise InvalidRequestError(
        'response_format must be {"type": "json_object"} or {"type": "json_schema", '
        '"json_schema": {"name": ..., "schema": {...}}}'
    )


def tool_calls(response: Response) -> list[ToolCall]:
    return [lc_tool_call(name=c.name, args=c.arguments, id=c.id) for c in response.tool_calls]


def invalid_tool_calls(response: Response) -> list[InvalidToolCall]:
    return [
        lc_invalid_tool_call(name=c.name, args=c.arguments, id=c.id, error=c.error) for c in response.invalid_tool_calls
    ]


def tool_call_chunks(response: Response) -> list[ToolCallChunk]:
    """The valid calls as stream chunks, one index each (name and id sent once, the arguments
    whole: LangChain merges chunks by index and parses the joined arguments)."""
    return [
        lc_tool_call_chunk(name=c.name, args=json.dumps(c.arguments, ensure_ascii=False), id=c.id, index=i)
        for i, c in enumerate(response.tool_calls)
    ]
