"""What the model is told: the tool/format instruction, repair turns, and the history
(earlier calls and their results) in the very format the model is asked to write.

Where the instruction goes: one system turn, inserted after the conversation's own system
turns (or first when there are none). Mantis's Vicuna template has a single system slot at
the top and :func:`mantis_llm.prompt.render` joins all system turns into it, so the caller's
system text comes first and ours follows. A system turn of ours replaces Vicuna's default
sentence locally, as any system message does. For a forced choice or a response format, a
one-line reminder is also appended to the last user turn: with several images (576 tokens
each) the system slot is far from where a 7B model starts writing.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..errors import InvalidRequestError
from ..types import Conversation, Image, Part, Request, ToolCall, Turn
from ._parse import Parsed
from ._schema import compact_schema
from ._spec import Catalog

TOOL_RESULT = "Tool result"
_MAX_ECHO = 1500  # characters of a bad output echoed back in a repair turn
# The requests instruct() and repair_request() made (by id; weak, so they die with the
# request): such a request is never instructed twice, e.g. by a backend that routes what it
# receives through mantis_llm.tools again.
_MADE: weakref.WeakValueDictionary[int, Request] = weakref.WeakValueDictionary()


def is_instructed(request: Request) -> bool:
    """True for a request this package built (it already carries the instruction)."""
    return _MADE.get(id(request)) is request


def _made(request: Request) -> Request:
    _MADE[id(request)] = request
    return request


#: The separators of every JSON the model is shown (tools, format, example, history): the
#: compact form a grammar-constrained backend lets it write, so prompt and output agree
#: (and it costs fewer tokens of a 4096-token context). The parser reads any spacing.
JSON_SEPARATORS = (",", ":")


def dumps(value: Any) -> str:
    """JSON as the model is shown it: compact (:data:`JSON_SEPARATORS`), unicode kept."""
    return json.dumps(value, ensure_ascii=False, separators=JSON_SEPARATORS)


# ------------------------------------------------------------------------------ instruction


def system_block(catalog: Catalog) -> str:
    """The instruction for ``catalog`` (tools shown, output format, one example)."""
    lines: list[str] = []
    names = catalog.callable_names
    schema_line = _format_schema(catalog)
    if names:
        one = len(names) == 1
        lines.append(
            ("You can use this tool" if one else "You can use these tools")
            + " (JSON: name, description, parameters as a JSON schema):"
        )
        for name in names:
            tool = catalog.tool(name)
            entry: dict[str, Any] = {"name": tool.name}
            if tool.description:
                entry["description"] = tool.description
            entry["parameters"] = compact_schema(tool.parameters)
            lines.append(dumps(entry))
        if catalog.forced:
            what = f'the tool "{names[0]}"' if _named(catalog) or one else "one of these tools"
            lines.append(f"You must call {what} now. Reply with only a JSON object of this form, and nothing else:")
        else:
            lines.append("To call a tool, reply with only a JSON object of this form, and nothing else:")
        lines.append(_shape(catalog))
        params = catalog.tool(names[0]).parameters
        lines.append("For example: " + dumps({"name": names[0], "arguments": _example_arguments(params, params, 0)}))
        if catalog.parallel:
            lines.append("To call several tools at once, reply with only a JSON list of such objects.")
        if not catalog.forced:
            if catalog.fmt is not None:
                lines.append("If you need no tool, give your final answer as " + schema_line)
            else:
                lines.append("If you need no tool, answer normally in plain text, without JSON.")
        lines.append(
            f'Tool results come back in a message starting with "{TOOL_RESULT}". '
            "Do not call a tool again for a result you already have."
        )
        if catalog.forced and catalog.fmt is not None:
            lines.append("Your final answer, after the tools, must be " + schema_line)
    else:
        if catalog.spec is not None and catalog.spec.tools:
            lines.append("Do not call any tool now: answer in plain text, not with a tool call.")
        if catalog.fmt is not None:
            lines.append("Reply with " + schema_line)
    return "\n".join(lines)


def _named(catalog: Catalog) -> bool:
    return catalog.choice not in ("auto", "required", "none")


def _shape(catalog: Catalog) -> str:
    """``{"name":"<tool name>","arguments":{...}}`` (the tool's name when it is forced)."""
    name = dumps(catalog.callable_names[0]) if _named(catalog) else '"<tool name>"'
    return '{"name":' + name + ',"arguments":{...}}'


def _format_schema(catalog: Catalog) -> str:
    fmt = catalog.fmt
    if fmt is None:
        return ""
    if fmt.schema is None:
        return "only a JSON object, and nothing else."
    return "only a JSON value that matches this JSON schema, and nothing else:\n" + dumps(compact_schema(fmt.schema))


def reminder(catalog: Catalog) -> str | None:
    """The line appended to the last user turn (forced calls, response formats), or None."""
    names = catalog.callable_names
    if names and catalog.forced:
        if catalog.choice == "required":
            return "(Reply with only the JSON tool call.)"
        return f'(Reply with only the JSON call of "{names[0]}".)'
    if catalog.fmt is not None and not names:
        return "(Reply with only the JSON.)"
    return None


def _example_arguments(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Sample arguments that show the JSON types (an integer unquoted, and so on): the
    required properties (else the first one), at most four."""
    props = schema.get("properties")
    if not isinstance(props, dict) or not props:
        return {}
    required = [k for k in schema.get("required") or () if k in props]
    keys = (required or list(props)[:1])[:4]
    return {k: _sample(props[k], root, depth + 1) for k in keys}


def _sample(schema: Any, root: Mapping[str, Any], depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 4:
        return "..."
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):  # a local ref: follow it (a cycle ends at depth 4)
        node: Any = root
        for key in ref[2:].split("/"):
            node = node.get(key) if isinstance(node, dict) else None
        return _sample(node, root, depth + 1)
    for key in ("enum", "examples"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema[key][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        branches = [b for b in schema.get(key) or () if isinstance(b, dict) and b.get("type") != "null"]
        if branches:
            return _sample(branches[0], root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object":
        return _example_arguments(schema, root, depth)
    samples = {"integer": 1, "number": 1.5, "boolean": True, "array": [], "null": None}
    return samples.get(kind, "...") if isinstance(kind, str) else "..."


def instruct(request: Request, catalog: Catalog, max_tokens: int | None = None) -> Request:
    """``request`` with the instruction added (and ``max_tokens`` set when the request has
    none and a call or a JSON answer is possible). ``tools`` and ``response_format`` stay on
    the request, for backends that constrain decoding."""
    turns = list(request.conversation.turns)
    block = system_block(catalog)
    if block:
        at = max((i + 1 for i, t in enumerate(turns) if t.role == "system"), default=0)
        turns.insert(at, Turn("system", [block]))
    note = reminder(catalog)
    if note and turns and turns[-1].role == "user":
        turns[-1] = Turn("user", [*turns[-1].parts, "\n\n" + note])
    params = request.params
    if max_tokens is not None and params.max_tokens is None and (catalog.callable_names or catalog.fmt):
        params = replace(params, max_tokens=max_tokens)
    return _made(Request(Conversation(turns), params, request.tools, request.response_format))


def repair_request(instructed: Request, output: str, parsed: Parsed, catalog: Catalog) -> Request:
    """The instructed request plus the bad ``output`` (an assistant turn) and a user turn
    saying what was wrong and what to reply with. Built from the first instructed request
    each time (not stacked), so two repairs cost no more context than one."""
    shown = output if len(output) <= _MAX_ECHO else output[:_MAX_ECHO] + " ..."
    turns = [
        *instructed.conversation.turns,
        Turn("assistant", [shown or "(empty reply)"]),
        Turn("user", [repair_text(parsed, catalog)]),
    ]
    return _made(Request(Conversation(turns), instructed.params, instructed.tools, instructed.response_format))


def repair_text(parsed: Parsed, catalog: Catalog) -> str:
    """What the repair turn says, for ``parsed.problem``."""
    names = catalog.callable_names
    named = _named(catalog)
    shape = _shape(catalog)
    if parsed.problem == "no_call":
        target = f'the tool "{names[0]}"' if named else "one of the tools (" + ", ".join(names) + ")"
        return (
            f"You did not call a tool, but you must call {target} now. "
            f"Reply with only the JSON {shape}, and nothing else."
        )
    if parsed.problem == "truncated":
        return (
            "Your reply was cut off before the JSON was complete. "
            "Reply again with only the complete JSON, as short as possible."
        )
    if parsed.problem == "invalid":
        tools = "" if named else " The tools are: " + ", ".join(names) + "."
        several = " (a JSON list of them for several calls)" if catalog.parallel else ""
        return (
            f"That tool call was not valid: {parsed.error}. Reply again with only the corrected JSON {shape}"
            f"{several}, and nothing else.{tools}"
        )
    if parsed.problem == "schema":
        return (
            f"That answer did not match the JSON schema: {parsed.error}. "
            "Reply with only the corrected JSON, and nothing else."
        )
    return "That reply was not JSON. Reply with " + (_format_schema(catalog) or "only JSON, and nothing else.")


# ------------------------------------------------------------------------------ history


def render_tool_calls(calls: Sequence[ToolCall | Mapping[str, Any]], text: str = "") -> str:
    """An assistant turn's calls as the canonical JSON the model is asked to write
    (``{"name": ..., "arguments": {...}}``, a list for several), after ``text`` (the prose
    that came with them) on its own line. A call is a :class:`ToolCall` or a mapping with
    ``name`` and ``arguments``/``args`` (a dict, or a JSON string as OpenAI keeps it)."""
    objs = [_call_object(c) for c in calls]
    body = "" if not objs else dumps(objs[0] if len(objs) == 1 else objs)
    text = text.strip()
    return f"{text}\n{body}" if text and body else text or body


def _call_object(call: ToolCall | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(call, ToolCall):
        return {"name": call.name, "arguments": call.arguments}
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str):
        raise InvalidRequestError(f"a tool call to render needs a name, got {call!r}"[:200])
    args = call.get("arguments", call.get("args"))
    if isinstance(args, str):
        with contextlib.suppress(ValueError):  # else shown as the string it is
            args = json.loads(args) if args.strip() else {}
    return {"name": call["name"], "arguments": {} if args is None else args}


def tool_calls_turn(calls: Sequence[ToolCall | Mapping[str, Any]], text: str = "") -> Turn:
    """The assistant :class:`Turn` for an answer that made ``calls``."""
    return Turn("assistant", [render_tool_calls(calls, text)])


def tool_result_parts(
    name: str | None,
    call_id: str | None = None,
    is_error: bool = False,
    parts: str | Image | Iterable[Part] = (),
) -> list[Part]:
    """The parts of the user turn that carries one tool result: a header naming the tool,
    the call id and an error status, then the result's text and images (kept as images, in
    order). ``Tool result (tool "get_weather", id call_ab12, status: error):``"""
    items: list[Part] = [parts] if isinstance(parts, (str, Image)) else list(parts)
    for p in items:
        if not isinstance(p, (str, Image)):
            raise InvalidRequestError(f"a tool result part must be text or an Image, not {type(p).__name__}")
    items = [p for p in items if not (isinstance(p, str) and not p.strip())]
    details = [f'tool "{name}"'] if name else []
    if call_id:
        details.append(f"id {call_id}")
    if is_error:
        details.append("status: error")
    header = TOOL_RESULT + (f" ({', '.join(details)})" if details else "") + ":\n"
    # the header stays a part of its own (it ends in a newline, so the prompt reads the same
    # as if it were joined to the text): each of the result's parts keeps its place
    return [header, *items] if items else [header + "(no output)"]


def tool_result_turn(
    name: str | None,
    call_id: str | None = None,
    is_error: bool = False,
    parts: str | Image | Iterable[Part] = (),
) -> Turn:
    """The user :class:`Turn` of one tool result (see :func:`tool_result_parts`)."""
    return Turn("user", tool_result_parts(name, call_id, is_error, parts))
