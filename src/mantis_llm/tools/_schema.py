"""JSON schema helpers: compiling and validating (``jsonschema``), lossless coercion of what
a 7B model writes, a compact display copy for the prompt, and ``$defs`` hoisting for the
combined schemas that grammars are built from.

Coercion is ours and deliberately small: it walks the common subset (``type``, ``properties``,
``required``, ``items``/``prefixItems``, ``enum``/``const``, ``anyOf``/``oneOf``/``allOf``,
local ``$ref``/``$defs``; OpenAPI's ``nullable`` is turned into a ``null`` type when a schema
is compiled) and only changes a value when nothing is lost
(see :func:`coerce`). Whatever is still wrong afterwards is reported by validation.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from typing import Any
from urllib.parse import unquote

# jsonschema ships no type hints; "unused-ignore" keeps this clean once stubs are installed
from jsonschema import Draft202012Validator, validators  # type: ignore[import-untyped, unused-ignore]
from jsonschema.exceptions import SchemaError, ValidationError, relevance  # type: ignore[import-untyped, unused-ignore]

from ..errors import InvalidRequestError

Validator = Any  # a jsonschema validator instance (jsonschema.protocols.Validator)

_MAX_DEPTH = 32  # recursive schemas ($ref cycles) stop coercing here; validation still runs
_MAX_ERRORS = 3  # validation errors named in one message
_INT = re.compile(r"\s*[+-]?\d+\s*")
_FLOAT = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")


@functools.lru_cache(maxsize=512)
def _compiled(schema_json: str) -> Validator:
    schema = _nullable(json.loads(schema_json), names=False)
    cls = validators.validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


def compile_schema(schema: Any, what: str) -> Validator:
    """A validator for ``schema`` (its ``$schema`` draft, else 2020-12); cached by content.

    Raises :class:`InvalidRequestError` naming ``what`` for a schema that is not JSON or
    not a valid JSON schema.
    """
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"{what} must be a JSON schema object, not {type(schema).__name__}")
    try:
        key = json.dumps(schema, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{what} is not JSON-serialisable: {exc}") from None
    try:
        return _compiled(key)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidRequestError(
            f"{what} is not a valid JSON schema: {_short(exc.message)}" + (f" (at {where})" if where else "")
        ) from None


_NAME_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _nullable(node: Any, names: bool) -> Any:
    """OpenAPI's ``nullable: true`` (which JSON schema does not know) as a ``null`` type,
    so validation and coercion agree with what the tool's author meant."""
    if isinstance(node, list):
        return [_nullable(n, False) for n in node]
    if not isinstance(node, dict):
        return node
    if names:  # a map of names to schemas: the keys are not keywords
        return {k: _nullable(v, False) for k, v in node.items()}
    out = {k: _nullable(v, k in _NAME_MAPS) for k, v in node.items()}
    if out.get("nullable") is True:
        del out["nullable"]
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            out["type"] = [*kind, "null"]
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if kind is None and "enum" not in out:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


def is_valid(validator: Validator, value: Any, schema: Any = None) -> bool:
    """Whether ``value`` validates against ``schema`` (a part of the validator's schema, so
    local ``$ref`` still resolve), or the whole schema. Never raises."""
    try:
        v = validator if schema is None else validator.evolve(schema=schema)
        return bool(v.is_valid(value))
    except Exception:  # unresolvable $ref, a regex the engine rejects, ...
        return False


def validation_errors(validator: Validator, value: Any, label: str) -> list[str]:
    """Up to a few readable messages ("``arguments.city: 3 is not of type 'string'``"); empty
    when ``value`` is valid. Never raises: a schema that cannot be applied is an error too."""
    try:
        errors: list[ValidationError] = sorted(validator.iter_errors(value), key=relevance)
    except Exception as exc:  # e.g. a $ref to a remote document (never fetched)
        return [f"{label}: the schema could not be applied ({type(exc).__name__}: {_short(str(exc))})"]
    out: list[str] = []
    for err in errors:
        path = label + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        msg = f"{path}: {_short(err.message)}"
        if msg not in out:
            out.append(msg)
        if len(out) == _MAX_ERRORS:
            break
    return out


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ coercion


def coerce(validator: Validator, value: Any) -> Any:
    """``value`` with lossless fixes for ``validator``'s schema; ``value`` itself is not changed.

    The fixes (each only where the schema asks for it and the value does not already fit):

    * ``"3"`` -> ``3`` (integer), ``3.0`` -> ``3`` (integer), ``"2.5"`` -> ``2.5`` (number);
      no ``nan``/``inf``, no hex, no ``1_000``;
    * ``"true"``/``"false"`` (any case) -> ``True``/``False`` (boolean); nothing else becomes
      a boolean (not ``1``, not ``"yes"``);
    * a number -> its JSON text (``94107`` -> ``"94107"``) where only a string fits (booleans
      are never turned into strings: ``"True"`` or ``"true"`` would be a guess);
    * a string holding JSON (``"[1, 2]"``) -> the array/object, where one is wanted;
    * an enum/const string that differs only in case -> the member (one match only);
      ``"1"`` -> ``1`` where that is the one member whose text it is;
    * an optional property whose value is ``null`` but the schema does not allow null is
      dropped (the model's way of saying "not given");
    * a required property that is missing but has a ``default`` gets the default. No other
      default is injected: the tool applies its own defaults, and callers compare the
      arguments exactly (LangChain's standard tests expect ``{"input": 3}`` and ``{}``).
    """
    return _Coercer(validator).walk(copy.deepcopy(value), validator.schema, 0)


class _Coercer:
    def __init__(self, validator: Validator) -> None:
        self.validator = validator
        self.root = validator.schema

    def fits(self, value: Any, schema: Any) -> bool:
        return is_valid(self.validator, value, schema)

    def resolve(self, ref: Any) -> Any:
        """A local ``#/json/pointer`` target, or None (remote refs are not followed)."""
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None
        node: Any = self.root
        for raw in ref[1:].split("/")[1:] if ref[1:] else []:
            key = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and key in node:
                node = node[key]
            elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            else:
                return None
        return node

    def walk(self, value: Any, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH:
            return value
        if "$ref" in schema:
            target = self.resolve(schema["$ref"])
            if target is not None:
                value = self.walk(value, target, depth + 1)
        for sub in schema.get("allOf") or ():
            value = self.walk(value, sub, depth + 1)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches and not any(self.fits(value, b) for b in branches):
                for branch in branches:  # the first branch the value can be made to fit
                    fixed = self.walk(value, branch, depth + 1)
                    if self.fits(fixed, branch):
                        value = fixed
                        break
        types = schema.get("type")
        types = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
        if types:
            value = _coerce_type(value, types)
        if isinstance(schema.get("enum"), list):
            value = _match_member(value, schema["enum"])
        if "const" in schema:
            value = _match_member(value, [schema["const"]])
        if isinstance(value, dict):
            value = self.walk_object(value, schema, depth)
        elif isinstance(value, list):
            value = self.walk_array(value, schema, depth)
        return value

    def walk_object(self, value: dict[str, Any], schema: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = schema["properties"] if isinstance(schema.get("properties"), dict) else {}
        required: list[Any] = schema["required"] if isinstance(schema.get("required"), list) else []
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if item is None and key not in required and sub is not None and not self.fits(None, sub):
                continue  # "unit": null for an optional, non-nullable unit: not given
            out[key] = self.walk(item, sub, depth + 1) if sub is not None else item
        for key in required:
            sub = props.get(key)
            if key not in out and isinstance(sub, dict) and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out

    def walk_array(self, value: list[Any], schema: dict[str, Any], depth: int) -> list[Any]:
        items: Any = schema.get("items")
        prefix: Any = schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems")
        if not isinstance(prefix, list):
            prefix = []
        out = []
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else items
            out.append(self.walk(item, sub, depth + 1) if isinstance(sub, dict) else item)
        return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "unknown"


def _coerce_type(value: Any, types: list[str]) -> Any:
    kind = _json_type(value)
    if kind == "integer" and isinstance(value, float) and "integer" in types and "number" not in types:
        return int(value)  # 3.0 for an integer: the same number, written as JSON ints are
    if kind in types or (kind == "integer" and "number" in types):
        return value
    for t in types:
        fixed = _convert(value, t)
        if fixed is not _NO:
            return fixed
    return value


_NO: Any = object()


def _convert(value: Any, target: str) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if target == "integer":
            if _INT.fullmatch(text):
                return int(text)
            if _FLOAT.fullmatch(text):
                number = float(text)
                if math.isfinite(number) and number.is_integer() and abs(number) < 2**53:
                    return int(number)
        elif target == "number":
            if _INT.fullmatch(text):
                return int(text)
            if _FLOAT.fullmatch(text):
                number = float(text)
                if math.isfinite(number):
                    return number
        elif target == "boolean":
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
        elif target in ("array", "object") and text[:1] in "[{":
            try:
                decoded = json.loads(text, strict=False)
            except ValueError:
                return _NO
            if _json_type(decoded) == target:
                return decoded
    elif target == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return _NO
        return json.dumps(value)
    return _NO


def _match_member(value: Any, members: list[Any]) -> Any:
    if value in members and not any(type(m) is not type(value) and m == value for m in members):
        return value
    if isinstance(value, str):
        folded = [m for m in members if isinstance(m, str) and m.casefold() == value.strip().casefold()]
        if len(folded) == 1:
            return folded[0]
        texts = [m for m in members if not isinstance(m, (str, bool)) and json.dumps(m) == value.strip()]
        if len(texts) == 1:
            return texts[0]
    return value


# ------------------------------------------------------------------------------ display


def compact_schema(schema: Any) -> Any:
    """A copy for the prompt without ``title`` keywords (pydantic writes one per field; they
    cost tokens in a 4096-token context and say nothing the property name does not).
    Property *names* called ``title`` are kept."""
    return _strip_titles(schema, names=False)


def _strip_titles(node: Any, names: bool) -> Any:
    if isinstance(node, list):
        return [_strip_titles(n, False) for n in node]
    if not isinstance(node, dict):
        return node
    if names:  # a map of names to schemas: a property may well be called "title"
        return {k: _strip_titles(v, False) for k, v in node.items()}
    return {k: _strip_titles(v, k in _NAME_MAPS) for k, v in node.items() if not (k == "title" and isinstance(v, str))}


# ------------------------------------------------------------------------------ $defs


class DefsHoister:
    """Builds one schema out of several (tool parameters, a response schema) whose local
    ``$ref`` point into their own root: each part's ``$defs``/``definitions`` move to the
    combined root's ``$defs`` (renamed on a clash) and its refs are rewritten. A part whose
    refs point anywhere else (``#``, ``#/properties/...``) is itself placed in ``$defs``, so
    every pointer still resolves. Every local ref of the result starts with ``#/$defs/``
    (plain ``#/$defs/<name>`` ones unless a tool used other pointers), the form the grammar
    compilers (llguidance, xgrammar) and vLLM accept."""

    def __init__(self) -> None:
        self.defs: dict[str, Any] = {}

    def add(self, schema: Any, label: str) -> Any:
        """``schema`` rewritten to be embedded anywhere in the combined schema."""
        if not isinstance(schema, dict):
            return schema
        schema = copy.deepcopy(schema)
        schema.pop("$schema", None)  # only a root may say its draft; the combined root is 2020-12
        schema.pop("$id", None)  # its refs are local ("#..."), rewritten below
        refs = _local_refs(schema)
        if all(_def_ref(r) for r in refs):
            found = [
                (f"#/{section}/{_escape(name)}", name, sub)
                for section in ("$defs", "definitions")
                for name, sub in (schema.pop(section, None) or {}).items()
            ]
            renames: dict[str, str] = {}
            fill: list[tuple[str, Any]] = []
            for ref, name, sub in found:
                if self.defs.get(name) == sub and not _local_refs(sub):
                    renames[ref] = f"#/$defs/{_escape(name)}"  # the same leaf def: share it
                    continue
                key = self._free(name, label)
                self.defs[key] = sub  # reserved now, rewritten below
                renames[ref] = f"#/$defs/{_escape(key)}"
                fill.append((key, sub))
            for key, sub in fill:
                self.defs[key] = _rewrite(sub, lambda r: renames.get(r, r))
            return _rewrite(schema, lambda r: renames.get(r, r))
        key = self._free(label, label)
        base = f"#/$defs/{_escape(key)}"
        self.defs[key] = _rewrite(schema, lambda r: base + r[1:] if r.startswith("#") else r)
        return {"$ref": base}

    def reserve(self, name: str, schema: Any) -> str:
        """Put an already rewritten ``schema`` in ``$defs`` under a free name; returns the name."""
        key = self._free(name, "_")
        self.defs[key] = schema
        return key

    def _free(self, name: str, label: str) -> str:
        if name not in self.defs:
            return name
        candidate, n = f"{label}__{name}", 2
        while candidate in self.defs:
            candidate, n = f"{label}__{name}_{n}", n + 1
        return candidate

    def wrap(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` with the collected ``$defs`` attached (if any)."""
        return {**schema, "$defs": self.defs} if self.defs else schema


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _def_ref(ref: str) -> str | None:
    for section in ("$defs", "definitions"):
        prefix = f"#/{section}/"
        if ref.startswith(prefix) and "/" not in ref[len(prefix) :]:
            return ref
    return None


def _local_refs(node: Any) -> list[str]:
    found: list[str] = []

    def visit(n: Any) -> None:
        if isinstance(n, dict):
            ref = n.get("$ref")
            if isinstance(ref, str) and ref.startswith("#"):
                found.append(ref)
            for v in n.values():
                visit(v)
        elif isinstance(n, list):
            for v in n:
                visit(v)

    visit(node)
    return found


def _rewrite(node: Any, fn: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, fn) for k, v in node.items()}
        if isinstance(out.get("$ref"), str):
            out["$ref"] = fn(out["$ref"])
        return out
    if isinstance(node, list):
        return [_rewrite(v, fn) for v in node]
    return node
