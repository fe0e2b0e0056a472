"""Reading tool calls and structured answers out of what the model wrote: lenient first
(prose before the JSON, fences and tags, almost-JSON, key aliases, name spelling), then
strict (each call's arguments coerced and validated against its tool's schema).

Where a call is in the text
---------------------------
The text is scanned left to right for *JSON starts*: a ``{`` followed by a quote, a letter,
``_`` or ``}``, or a ``[`` followed by ``{`` (whitespace allowed in between; ``[1]`` or
``{this}`` in prose are not starts). At each start the value's extent is found by matching
brackets outside strings. A closed value is decoded (``json``, else ``json-repair``) and is a
call when it is call-shaped (:func:`interpret`); a closed value that is not a call is prose,
and the scan goes on after it. A value that never closes is skipped (a call may still start
inside it); if no complete call is found and one of these unclosed values looks like a call
(its first key is a tool-name key), the output is a *truncated* call: invalid, never
completed by guesswork. Calls that follow the first one, separated only by whitespace,
commas, fences or tags, are collected too; text after the calls is dropped (a 7B model tends
to invent the tool's result there). The prose is the text before the first call, without
trailing whitespace and openers (```` ```json ````, ``<tool_call>``, ``[TOOL_CALLS]``).

:class:`~mantis_llm.tools._stream.StreamDetector` runs the same scan on a growing text, so
what a stream releases as prose is always a prefix of what this module calls prose.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import json_repair

from ..types import InvalidToolCall, ToolCall
from ._schema import coerce, is_valid, validation_errors
from ._spec import Catalog, match_name

NAME_KEYS = ("name", "tool", "tool_name", "function", "function_name", "tool_call", "action")
ARG_KEYS = ("arguments", "parameters", "args", "tool_input", "input", "action_input", "kwargs", "params")
_LIST_KEYS = ("tool_calls", "calls", "function_calls")
_META_KEYS = ("id", "type", "index", "call_id")
# An unparseable or unclosed value whose first key names a tool is a call attempt.
_CALL_LIKE = re.compile(r"[\[\s]*\{\s*[\"']?(?:" + "|".join(NAME_KEYS + _LIST_KEYS) + r")[\"']?\s*:")
_NAME_VALUE = re.compile(r"[\"']?(?:" + "|".join(NAME_KEYS) + r")[\"']?\s*:\s*[\"']([^\"'\n]{1,80})[\"']")
_SEPARATORS = re.compile(r"(?:\s|,|```|</?[A-Za-z_|][\w|-]*>|\[/?TOOL_CALLS\])*")
# What may stand between the prose and the call, and is not prose.
OPENERS = (
    "```",
    "<tool_call>",
    "<tool_calls>",
    "<function_call>",
    "<functioncall>",
    "<tools>",
    "<tool>",
    "<function>",
    "<json>",
    "<|python_tag|>",
    "[TOOL_CALLS]",
)
_FENCE_END = re.compile(r"```[\w-]*[ \t]*$")

Problem = Literal["truncated", "invalid", "no_call", "no_json", "schema"]


def new_call_id() -> str:
    """A fresh tool-call id: ``call_`` and 24 hex digits (unique, never empty)."""
    return f"call_{secrets.token_hex(12)}"


@dataclass
class Parsed:
    """What one output means.

    ``text`` is the prose (the output itself when there was no call, or when no call in it
    was valid); ``value`` the structured answer when a response format was asked for (and
    ``text`` then is its JSON). ``error`` is None when the output is acceptable; otherwise it
    says what was wrong (for a repair turn), and ``problem`` which kind of wrong it was.
    """

    text: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)
    value: Any = None
    error: str | None = None
    problem: Problem | None = None


@dataclass
class RawCall:
    """A call-shaped value before checking: the name as written, the arguments as found."""

    name: str | None
    arguments: Any
    source: str  # the JSON text it came from
    error: str | None = None  # set when it is already known to be unusable


# ------------------------------------------------------------------------------ scanning


def json_start(text: str, i: int, loose: bool = False) -> bool | None:
    """Whether ``text[i]`` starts a JSON value we look at; None when the text ends too soon
    to tell. ``loose`` (structured answers) lets ``[`` start any array."""
    c = text[i]
    if c not in "{[":
        return False
    j = i + 1
    while j < len(text) and text[j].isspace():
        j += 1
    if j == len(text):
        return None
    nxt = text[j]
    if c == "{":
        return nxt in "\"'}_" or nxt.isalpha()
    return nxt == "{" or (loose and (nxt in '["]-' or nxt.isdigit() or nxt in "tfn"))


def value_end(text: str, i: int) -> int | None:
    """The index just past the bracket closing the value at ``i``; None if it never closes.
    Strings are skipped: double-quoted ones, and single-quoted ones (almost-JSON) where a
    string can start (after ``{ [ , :``), so the apostrophe in ``{it's}`` opens nothing."""
    depth = 0
    quote = None
    prev = " "  # the last non-space character outside strings
    j, n = i, len(text)
    while j < n:
        c = text[j]
        if quote:
            if c == "\\":
                j += 1
            elif c == quote:
                quote = None
        elif c == '"' or (c == "'" and prev in "{[,:"):
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        if not quote and not c.isspace():
            prev = c
        j += 1
    return None


def load_json(segment: str) -> tuple[Any, str | None]:
    """``(value, None)`` for JSON or almost-JSON (trailing commas, single quotes, Python
    literals, comments, unquoted keys: json-repair), else ``(None, why)``. Only objects and
    arrays count as repaired values: json-repair turns any prose into *something*."""
    try:
        return json.loads(segment, strict=False), None  # strict=False: raw control chars in strings
    except json.JSONDecodeError as exc:
        why = f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    except RecursionError:
        return None, "the JSON is nested too deeply"
    try:
        value = json_repair.loads(segment)
    except Exception:  # the repairer is best effort; its failures are ours to report
        return None, why
    if isinstance(value, (dict, list)) and value:
        return value, None
    return None, why


def prose_end(text: str, i: int, partial: bool = False) -> int:
    """Where the prose before index ``i`` ends: trailing whitespace and openers (fences,
    tags) do not belong to it. ``partial`` (streaming, ``i`` the end of what has come so
    far) also holds back a tail that may grow into an opener (``"<tool_"``, ``"``"``)."""
    end = _strip_openers(text, i)
    if partial and end == i:  # nothing complete at the end: maybe the start of an opener
        for opener in OPENERS:
            k = next((k for k in range(len(opener) - 1, 0, -1) if text.endswith(opener[:k], 0, i)), 0)
            if k:
                return _strip_openers(text, i - k)
    return end


def _strip_openers(text: str, end: int) -> int:
    while True:
        head = text[:end].rstrip()
        fence = _FENCE_END.search(head)
        if fence:
            end = fence.start()
            continue
        tag = next((o for o in OPENERS[1:] if head.lower().endswith(o.lower())), None)
        if tag is None:
            return len(head)
        end = len(head) - len(tag)


@dataclass
class Scan:
    """Where the calls are: ``calls`` from index ``start`` (None when there is no call),
    ``safe``: the text before it is prose for sure, whatever follows (streaming)."""

    start: int
    calls: list[RawCall] | None
    safe: int
    pending: bool = False  # stopped at a value that has not closed yet (streaming)


def scan(text: str, catalog: Catalog, pos: int = 0, final: bool = True) -> Scan:
    """Find the calls in ``text`` (from ``pos``). With ``final=False`` the text may still
    grow: the scan stops, ``pending``, at the first start whose outcome is not known yet."""
    truncated: int | None = None
    while True:
        i = _next_start(text, pos)
        if i is None:
            break
        start = json_start(text, i)
        if start is None and not final:
            return Scan(i, None, i, pending=True)
        if not start:
            pos = i + 1
            continue
        end = value_end(text, i)
        if end is None:
            if not final:
                return Scan(i, None, i, pending=True)
            if truncated is None and _CALL_LIKE.match(text, i):
                truncated = i
            pos = i + 1  # a complete call may still start inside
            continue
        segment = text[i:end]
        value, why = load_json(segment)
        if why is not None:
            if _CALL_LIKE.match(segment):
                return Scan(i, [RawCall(_guess_name(segment), None, segment, why)], i)
            pos = end
            continue
        calls = interpret(value, catalog, segment)
        if calls is None:
            pos = end
            continue
        return Scan(i, calls + _more_calls(text, end, catalog), i)
    if truncated is not None:
        segment = text[truncated:]
        error = "the JSON is incomplete (the output ended before it was closed)"
        return Scan(truncated, [RawCall(_guess_name(segment), None, segment, error)], truncated)
    return Scan(len(text), None, len(text))


def _next_start(text: str, pos: int) -> int | None:
    a, b = text.find("{", pos), text.find("[", pos)
    hits = [x for x in (a, b) if x >= 0]
    return min(hits) if hits else None


def _more_calls(text: str, pos: int, catalog: Catalog) -> list[RawCall]:
    """Calls right after a call (one per line, in tags, comma-separated): collected too."""
    out: list[RawCall] = []
    while True:
        gap = _SEPARATORS.match(text, pos)
        i = gap.end() if gap else pos
        if i >= len(text) or not json_start(text, i):
            return out
        end = value_end(text, i)
        if end is None:
            if _CALL_LIKE.match(text, i):
                segment = text[i:]
                out.append(RawCall(_guess_name(segment), None, segment, "the JSON is incomplete (cut off)"))
            return out
        segment = text[i:end]
        value, why = load_json(segment)
        calls = interpret(value, catalog, segment) if why is None else None
        if calls is None:
            return out
        out.extend(calls)
        pos = end


def _guess_name(segment: str) -> str | None:
    """The tool name in a broken call, for the error report."""
    m = _NAME_VALUE.search(segment)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------ call shapes


def interpret(value: Any, catalog: Catalog, source: str) -> list[RawCall] | None:
    """The calls ``value`` holds, or None when it is not call-shaped.

    Call-shaped: an object with a tool name under one of :data:`NAME_KEYS` (a string) and
    either arguments under one of :data:`ARG_KEYS` or a name that matches a bound tool (then
    the other keys are the arguments: ``{"name": "f", "city": "SF"}``); OpenAI's
    ``{"function": {"name", "arguments": "<json>"}}``; ``{"tool_calls": [...]}``; or a
    non-empty list whose first item is one of these (other items that are not become
    invalid calls)."""
    if isinstance(value, dict):
        for key in _LIST_KEYS:
            if isinstance(value.get(key), list) and not any(k in value for k in NAME_KEYS):
                return interpret(value[key], catalog, source)
        one = _one_call(value, catalog, source)
        return [one] if one else None
    if isinstance(value, list) and value and isinstance(value[0], dict):
        first = _one_call(value[0], catalog, _dumps(value[0]))
        if first is None:
            return None
        out = [first]
        for item in value[1:]:  # each item's own JSON is its source
            one = _one_call(item, catalog, _dumps(item)) if isinstance(item, dict) else None
            out.append(one or RawCall(None, item, _dumps(item), "this list item is not a tool call object"))
        return out
    return None


def _one_call(d: dict[str, Any], catalog: Catalog, source: str) -> RawCall | None:
    fn = d.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):  # OpenAI's tool_call shape
        args_key = next((k for k in ARG_KEYS if k in fn), None)
        return RawCall(fn["name"], fn.get(args_key) if args_key else {}, source)
    name_key = next((k for k in NAME_KEYS if isinstance(d.get(k), str)), None)
    if name_key is None:
        return None
    name = d[name_key]
    known = match_name(name, catalog.names)
    props = _properties(catalog, known)
    rest = {k: v for k, v in d.items() if k != name_key}
    args_key = next((k for k in ARG_KEYS if k in rest), None)
    if args_key is not None and not (args_key in props and not _object_like(rest[args_key])):
        return RawCall(name, rest[args_key], source)  # (else "input" is the tool's own parameter)
    if known is None and args_key is None:
        return None  # {"name": "Bob", "age": 3} is data, not a call
    # flat arguments: everything but the name (and call metadata that is not a parameter)
    flat = {k: v for k, v in rest.items() if k in props or k not in _META_KEYS}
    return RawCall(name, flat, source)


def _object_like(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, str) and value.strip()[:1] == "{")


def _properties(catalog: Catalog, name: str | None) -> dict[str, Any]:
    if name is None:
        return {}
    props = catalog.tool(name).parameters.get("properties")
    return props if isinstance(props, dict) else {}


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


# ------------------------------------------------------------------------------ checking


def check_call(raw: RawCall, catalog: Catalog) -> ToolCall | InvalidToolCall:
    """A :class:`ToolCall` with schema-coerced arguments, or an :class:`InvalidToolCall`
    saying why not (unknown tool, a tool the choice excludes, bad arguments)."""
    call_id = new_call_id()
    if raw.error is not None:
        return InvalidToolCall(raw.source, raw.error, call_id, raw.name)
    if not raw.name:
        return InvalidToolCall(raw.source, "the call has no tool name", call_id, None)
    name = match_name(raw.name, catalog.names)
    if name is None:
        return InvalidToolCall(
            raw.source, f"unknown tool {raw.name!r}; the tools are: {', '.join(catalog.names)}", call_id, raw.name
        )
    if name not in catalog.callable_names:
        return InvalidToolCall(raw.source, f"tool_choice requires a call to {catalog.choice!r}", call_id, name)
    args, why = _arguments(raw.arguments, catalog, name)
    if why is not None:
        return InvalidToolCall(raw.source, why, call_id, name)
    validator = catalog.validators[name]
    fixed = coerce(validator, args)
    errors = validation_errors(validator, fixed, "arguments")
    if errors:
        return InvalidToolCall(_dumps(args), f"tool {name!r}: " + "; ".join(errors), call_id, name)
    return ToolCall(name, fixed, call_id)


def _arguments(args: Any, catalog: Catalog, name: str) -> tuple[dict[str, Any], str | None]:
    if args is None:
        return {}, None
    if isinstance(args, str):  # OpenAI writes the arguments as a JSON string
        text = args.strip()
        if not text:
            return {}, None
        if text[0] in "{[":
            decoded, why = load_json(text)
            if isinstance(decoded, dict):
                return decoded, None
            return {}, f"the arguments are not a JSON object ({why or 'a JSON array'})"
    if isinstance(args, dict):
        return args, None
    # {"name": "magic_function", "arguments": 3}: unambiguous for a one-parameter tool
    props = _properties(catalog, name)
    if len(props) == 1:
        return {next(iter(props)): args}, None
    return {}, f"the arguments must be a JSON object, not {_dumps(args)[:80]}"


# ------------------------------------------------------------------------------ one output


def parse_output(text: str, catalog: Catalog) -> Parsed:
    """Read ``text`` for ``catalog``: tool calls, a structured answer, or prose.

    Outcomes (``error`` None = acceptable):

    * no tools to call (none / choice "none") and no response format: the text as it is;
    * calls found: valid ones in ``tool_calls`` with fresh ids, the rest in
      ``invalid_tool_calls``; ``text`` the prose (the whole output when none is valid). With
      ``parallel`` off only the first call counts; later ones are reported invalid
      ("not made") but are no reason to repair. Any other invalid call is an ``error``;
    * no call, choice "auto": a structured answer if a response format is set, else prose
      (not an error);
    * no call, a forced choice: an ``error`` (``no_call``), except that a bare arguments
      object that fits the one callable tool is taken as its call.
    """
    callable_names = catalog.callable_names
    if callable_names:
        found = scan(text, catalog)
        if found.calls is not None:
            return _with_calls(text, found, catalog)
        if catalog.forced:
            bare = _bare_arguments(text, catalog)
            if bare is not None:
                return Parsed(text=text[: prose_end(text, bare[0])], tool_calls=[bare[1]])
            error = f"the reply has no tool call; tool_choice requires a call to {_target(catalog)}"
            forced = catalog.choice if catalog.choice != "required" else None
            return Parsed(
                text=text,
                invalid_tool_calls=[InvalidToolCall(text, error, new_call_id(), forced)],
                error=error,
                problem="no_call",
            )
    if catalog.fmt is not None:
        return _structured(text, catalog)
    return Parsed(text=text)


def _target(catalog: Catalog) -> str:
    if catalog.choice == "required":
        return "one of the tools (" + ", ".join(catalog.names) + ")"
    return repr(catalog.choice)


def _with_calls(text: str, found: Scan, catalog: Catalog) -> Parsed:
    assert found.calls is not None
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    errors: list[str] = []
    truncated = False
    for n, raw in enumerate(found.calls):
        if n and not catalog.parallel:
            invalid.append(
                InvalidToolCall(
                    raw.source, "not made: only one tool call is allowed per reply", new_call_id(), raw.name
                )
            )
            continue
        checked = check_call(raw, catalog)
        if isinstance(checked, ToolCall):
            calls.append(checked)
        else:
            invalid.append(checked)
            errors.append(checked.error)
            truncated = truncated or (raw.error is not None and "incomplete" in raw.error)
    prose = text[: prose_end(text, found.start)]  # leading space stays, as in a text answer
    if not errors:
        return Parsed(text=prose, tool_calls=calls, invalid_tool_calls=invalid)
    return Parsed(
        text=prose if calls else text,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        error="; ".join(errors),
        problem="truncated" if truncated and len(errors) == 1 else "invalid",
    )


def _bare_arguments(text: str, catalog: Catalog) -> tuple[int, ToolCall] | None:
    """A forced call written as its arguments alone: ``{"city": "Paris"}``."""
    names = catalog.callable_names
    if len(names) != 1:
        return None
    found = _first_value(text, loose=False)
    if found is None or not isinstance(found[1], dict):
        return None
    validator = catalog.validators[names[0]]
    fixed = coerce(validator, found[1])
    if not is_valid(validator, fixed):
        return None
    return found[0], ToolCall(names[0], fixed, new_call_id())


def _first_value(text: str, loose: bool) -> tuple[int, Any] | None:
    """The first closed JSON object/array in ``text``: (its index, the value)."""
    pos = 0
    while True:
        i = _next_start(text, pos)
        if i is None:
            return None
        if not json_start(text, i, loose):
            pos = i + 1
            continue
        end = value_end(text, i)
        if end is None:
            pos = i + 1
            continue
        value, why = load_json(text[i:end])
        if why is None:
            return i, value
        pos = end


def _structured(text: str, catalog: Catalog) -> Parsed:
    validator = catalog.format_validator
    assert validator is not None
    found = _first_value(text, loose=True)
    if found is None:
        try:  # a scalar answer ("42", "\"yes\"") for a scalar schema
            found = (0, json.loads(text.strip(), strict=False))
        except ValueError:
            starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
            incomplete = bool(starts) and value_end(text, min(starts)) is None
            why = "the JSON is incomplete (the output ended before it was closed)" if incomplete else "no JSON found"
            return Parsed(text=text, error=why, problem="truncated" if incomplete else "no_json")
    value = coerce(validator, found[1])
    errors = validation_errors(validator, value, "answer")
    if errors:
        return Parsed(text=text, error="; ".join(errors), problem="schema")
    return Parsed(text=json.dumps(value, ensure_ascii=False), value=value)
