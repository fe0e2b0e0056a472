"""Tool calling and structured output for Mantis, in the prompt, the same on every backend.

Mantis has no native function calling. A request with :attr:`Request.tools` (a
:class:`~mantis_llm.types.ToolSpec`) or :attr:`Request.response_format` is run through
:func:`generate` / :func:`agenerate` / :func:`stream` / :func:`astream` instead of the
backend's own methods. They add an instruction (the tools as compact JSON, the output
format, one example), run the backend, read the answer leniently (prose before the JSON,
fences, almost-JSON, key aliases, name spelling), validate each call's arguments against
its tool's schema with lossless coercion (``"3"`` -> ``3``), and repair a bad answer with
up to two more turns unless the backend enforces the format itself (a grammar). The result
is a :class:`~mantis_llm.types.Response` with ``tool_calls`` / ``invalid_tool_calls``.

The model answers in plain text, or with only ``{"name": "<tool>", "arguments": {...}}``
(a JSON list of those when parallel calls are allowed). History goes back to it in the same
format: :func:`render_tool_calls` for an assistant turn's calls, :func:`tool_result_parts`
for the user turn with a tool's result.

Framework-neutral: the LangChain and LlamaIndex adapters translate to and from these types.
"""

from ._flow import MAX_REPAIRS, TOOL_MAX_TOKENS, agenerate, astream, generate, passes_through, stream, tool_flow
from ._parse import Parsed, new_call_id, parse_output
from ._prompt import (
    JSON_SEPARATORS,
    TOOL_RESULT,
    instruct,
    is_instructed,
    render_tool_calls,
    repair_request,
    system_block,
    tool_calls_turn,
    tool_result_parts,
    tool_result_turn,
)
from ._spec import (
    Catalog,
    OutputConstraint,
    check_spec,
    envelope_schema,
    normalize_tool_choice,
    output_constraint,
    response_schema,
    tool_from_openai,
)
from ._stream import StreamDetector, stream_mode

__all__ = [
    "JSON_SEPARATORS",
    "MAX_REPAIRS",
    "TOOL_MAX_TOKENS",
    "TOOL_RESULT",
    "Catalog",
    "OutputConstraint",
    "Parsed",
    "StreamDetector",
    "agenerate",
    "astream",
    "check_spec",
    "envelope_schema",
    "generate",
    "instruct",
    "is_instructed",
    "new_call_id",
    "normalize_tool_choice",
    "output_constraint",
    "parse_output",
    "passes_through",
    "render_tool_calls",
    "repair_request",
    "response_schema",
    "stream",
    "stream_mode",
    "system_block",
    "tool_calls_turn",
    "tool_flow",
    "tool_from_openai",
    "tool_result_parts",
    "tool_result_turn",
]
