"""Tool specs: building and checking them, ``tool_choice`` in every framework's spelling,
name matching, and the JSON schemas of what the model may output (for grammars and for
OpenAI-style ``response_format: json_schema``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError
from ..types import Request, ResponseFormat, Tool, ToolSpec
from ._schema import DefsHoister, Validator, compile_schema

CHOICES = ("auto", "none", "required")
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def name_key(name: str) -> str:
    """The key tool names are matched by: case, ``_``, ``-``, spaces and dots ignored
    (``Get-Weather`` and ``get weather`` find ``get_weather``)."""
    return re.sub(r"[\s_\-.]+", "", name).casefold()


def tool_from_openai(d: Mapping[str, Any] | Tool) -> Tool:
    """A :class:`Tool` from an OpenAI tool ``{"type": "function", "function": {...}}``, a bare
    ``{"name", "description", "parameters"}`` (Anthropic's ``input_schema`` works too) or a
    :class:`Tool` (returned as is). Raises :class:`InvalidRequestError` for anything else."""
    if isinstance(d, Tool):
        return d
    if not isinstance(d, Mapping):
        raise InvalidRequestError(f"a tool must be a mapping like {{'name', 'parameters'}}, not {type(d).__name__}")
    fn = d.get("function") if d.get("type", "function") == "function" else None
    body: Mapping[str, Any] = fn if isinstance(fn, Mapping) else d
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"a tool needs a non-empty string 'name' (got keys {sorted(map(str, body))})")
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequestError(f"tool {name!r}: 'description' must be a string")
    parameters = body.get("parameters", body.get("input_schema"))
    if parameters is None:
        parameters = dict(_EMPTY_PARAMETERS)
    if not isinstance(parameters, Mapping):
        raise InvalidRequestError(f"tool {name!r}: 'parameters' must be a JSON schema object")
    tool = Tool(name=name, description=description, parameters=dict(parameters))
    check_tool(tool)
    return tool


def check_tool(tool: Tool) -> Validator:
    """The validator of ``tool``'s parameters; raises :class:`InvalidRequestError` for a bad tool."""
    if not isinstance(tool, Tool):
        raise InvalidRequestError(f"ToolSpec.tools must hold Tool objects, not {type(tool).__name__}")
    if not isinstance(tool.name, str) or not tool.name.strip():
        raise InvalidRequestError("a tool needs a non-empty name")
    params = tool.parameters
    if not isinstance(params, dict):
        raise InvalidRequestError(f"tool {tool.name!r}: parameters must be a JSON schema object")
    kind = params.get("type")
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidRequestError(
            f"tool {tool.name!r}: parameters must describe an object (the arguments), not type {kind!r}"
        )
    return compile_schema(params, f"tool {tool.name!r} parameters")


def _names(tools: Iterable[Any] | ToolSpec) -> list[str]:
    items = tools.tools if isinstance(tools, ToolSpec) else tools
    names = []
    for t in items:
        if isinstance(t, str):
            names.append(t)
        elif isinstance(t, Tool):
            names.append(t.name)
        else:
            names.append(tool_from_openai(t).name)
    return names


def match_name(name: str, names: Iterable[str]) -> str | None:
    """The tool name ``name`` refers to: exact, else the one name equal up to case, ``_``,
    ``-`` and spaces (None when there is none, or several)."""
    names = list(names)
    if name in names:
        return name
    key = name_key(name)
    hits = [n for n in names if name_key(n) == key]
    return hits[0] if len(hits) == 1 else None


def normalize_tool_choice(value: Any, tools: Iterable[Any] | ToolSpec) -> str:
    """``tool_choice`` in any framework's spelling -> ``"auto"``, ``"none"``, ``"required"``
    or a tool's exact name (a :attr:`ToolSpec.choice`).

    Accepted: ``None``/``"auto"``/``False`` (LlamaIndex ``tool_required=False``) -> auto;
    ``"none"``; ``"any"``/``"required"``/``True`` -> required; a tool name (case, ``_``/``-``
    insensitive; the keywords win over a tool with the same name); ``{"type": "function",
    "function": {"name": ...}}``; ``{"type": "tool", "name": ...}``; ``{"name": ...}``;
    ``{"type": "auto"|"any"|"none"|"required"}``. ``tools`` are :class:`Tool` objects, OpenAI
    dicts or names. Raises :class:`InvalidRequestError` for an unknown name, a forced choice
    with no tools, or a value of another kind.
    """
    names = _names(tools)
    if value is None or value is False:
        return "auto"
    if value is True:
        return _forced("required", names, value)
    if isinstance(value, Mapping):
        kind = value.get("type")
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else value.get("name")
        if isinstance(name, str):
            return _forced(name, names, value)
        if kind in ("auto", "none", "any", "required"):
            value = kind
        else:
            raise InvalidRequestError(f"tool_choice {dict(value)!r} names no tool")
    if not isinstance(value, str):
        raise InvalidRequestError(
            f"tool_choice must be 'auto', 'none', 'required'/'any', a tool name or a tool dict, not {value!r}"
        )
    word = value.strip().lower()
    if word == "auto":
        return "auto"
    if word == "none":
        return "none"
    if word in ("any", "required"):
        return _forced("required", names, value)
    return _forced(value, names, value)


def _forced(choice: str, names: list[str], given: Any) -> str:
    if not names:
        raise InvalidRequestError(f"tool_choice={given!r} forces a tool call, but no tools are bound")
    if choice == "required":
        return choice
    found = match_name(choice.strip(), names)
    if found is None:
        raise InvalidRequestError(f"tool_choice names unknown tool {choice!r}; the bound tools are {names}")
    return found


# ------------------------------------------------------------------------------ checked specs


@dataclass(frozen=True)
class Catalog:
    """A checked :class:`ToolSpec` (or none) plus :class:`ResponseFormat` (or none), with
    their compiled validators: what the prompt, parser and flow work from."""

    spec: ToolSpec | None
    fmt: ResponseFormat | None
    validators: Mapping[str, Validator]
    format_validator: Validator | None

    @property
    def choice(self) -> str:
        return self.spec.choice if self.spec is not None else "none"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.spec.tools] if self.spec is not None else []

    @property
    def callable_names(self) -> list[str]:
        """The tools the model may call now (one for a named choice, none for "none")."""
        if self.choice == "none":
            return []
        return self.names if self.choice in CHOICES else [self.choice]

    @property
    def forced(self) -> bool:
        return self.spec is not None and self.choice not in ("auto", "none")

    @property
    def parallel(self) -> bool:
        return self.spec is not None and self.spec.parallel and self.choice in ("auto", "required")

    def tool(self, name: str) -> Tool:
        assert self.spec is not None
        return next(t for t in self.spec.tools if t.name == name)


def check_spec(spec: ToolSpec | None, fmt: ResponseFormat | None = None) -> Catalog:
    """Check a request's tools and response format; raises :class:`InvalidRequestError` for
    duplicate or empty names, an unknown ``choice``, bad parameter schemas."""
    validators: dict[str, Validator] = {}
    if spec is not None:
        if not isinstance(spec, ToolSpec):
            raise InvalidRequestError(f"tools must be a ToolSpec, not {type(spec).__name__}")
        if isinstance(spec.tools, (str, bytes)) or not isinstance(spec.tools, (tuple, list)):
            raise InvalidRequestError("ToolSpec.tools must be a tuple of Tool objects")
        for tool in spec.tools:
            v = check_tool(tool)
            if tool.name in validators:
                raise InvalidRequestError(f"two tools are named {tool.name!r}")
            validators[tool.name] = v
        if not isinstance(spec.choice, str):
            raise InvalidRequestError(f"ToolSpec.choice must be a string, not {spec.choice!r}")
        if spec.choice not in CHOICES and spec.choice not in validators:
            raise InvalidRequestError(
                f"ToolSpec.choice {spec.choice!r} is not 'auto', 'none', 'required' or a bound tool "
                f"({sorted(validators)}); normalize_tool_choice maps other spellings"
            )
        if spec.choice == "required" and not spec.tools:
            raise InvalidRequestError("ToolSpec.choice 'required' needs at least one tool")
    format_validator = None
    if fmt is not None:
        if not isinstance(fmt, ResponseFormat):
            raise InvalidRequestError(f"response_format must be a ResponseFormat, not {type(fmt).__name__}")
        format_validator = compile_schema(response_schema(fmt), f"response format {fmt.name!r} schema")
    return Catalog(spec, fmt, validators, format_validator)


# ------------------------------------------------------------------------------ output schemas


def envelope_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema of a call the model may write for ``spec``:
    ``{"name": <const>, "arguments": <that tool's parameters>}``, an ``anyOf`` over the tools
    (only the named tool for a named choice). With ``parallel`` (and a choice that is not one
    tool's name) it is ``anyOf`` [that object, an array of them with ``minItems`` 1]: the
    prompt lets a lone call stay a lone object. Tools' ``$defs`` are hoisted to the root.
    Whether to constrain at all (choice "auto"/"none") is :func:`output_constraint`'s call."""
    catalog = check_spec(spec)
    hoister = DefsHoister()
    return hoister.wrap(_envelope(catalog, hoister))


def _envelope(catalog: Catalog, hoister: DefsHoister) -> dict[str, Any]:
    assert catalog.spec is not None
    names = catalog.names if catalog.choice in CHOICES else [catalog.choice]
    if not names:
        raise InvalidRequestError("a ToolSpec without tools allows no call")
    calls = []
    for name in names:
        params = hoister.add(catalog.tool(name).parameters, name)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if catalog.parallel:  # the call schema once, in $defs, for both the lone call and the list
        key = hoister.reserve("tool_call", call)
        ref = {"$ref": f"#/$defs/{key}"}
        return {"anyOf": [ref, {"type": "array", "items": ref, "minItems": 1}]}
    return call


def response_schema(fmt: ResponseFormat) -> dict[str, Any]:
    """The JSON schema of a structured answer: ``fmt.schema``, or any JSON object."""
    if fmt.schema is None:
        return {"type": "object"}
    if not isinstance(fmt.schema, dict):
        kind = type(fmt.schema).__name__
        raise InvalidRequestError(f"ResponseFormat.schema must be a JSON schema object, not {kind}")
    return fmt.schema


@dataclass(frozen=True)
class OutputConstraint:
    """What a backend that enforces the format (a grammar) must let the model write.

    ``schema`` is the JSON the output must be (a call envelope, a response schema, or an
    ``anyOf`` of both); ``text`` is whether plain text is allowed *instead* (tool choice
    "auto" without a response format). An optional leading space is the grammar's business
    (sentencepiece's first token is ``▁{``)."""

    schema: dict[str, Any]
    text: bool


def output_constraint(request: Request) -> OutputConstraint | None:
    """How to constrain ``request``'s output, or None for free text: no tools (or choice
    "none") and no response format. Forced choices and response formats allow JSON only."""
    catalog = check_spec(request.tools, request.response_format)
    calls = catalog.spec is not None and catalog.choice != "none" and bool(catalog.names)
    if not calls and catalog.fmt is None:
        return None
    hoister = DefsHoister()
    parts = []
    if calls:
        parts.append(_envelope(catalog, hoister))
    if catalog.fmt is not None and not catalog.forced:
        parts.append(hoister.add(response_schema(catalog.fmt), f"{catalog.fmt.name}__response"))
    schema = parts[0] if len(parts) == 1 else {"anyOf": parts}
    text = calls and catalog.choice == "auto" and catalog.fmt is None
    return OutputConstraint(closed_objects(hoister.wrap(schema)), text)


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists its
    properties and says nothing about others. A grammar built from an open object lets a
    model (a random one above all) add keys until ``max_tokens`` runs out; pydantic and
    LangChain leave the keyword out. Validation still uses the tools' own schemas."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out
