"""What JSON under a constraint may look like where its schema does not say: the whitespace
between tokens, and a bound on free-form strings and numbers.

Without these, a grammar admits unbounded whitespace and unbounded digits, and small models fill
them: `{"name": "Paris", "population": 1111111…` never finishes. The whitespace layout and the
number bounds (`minimum` / `maximum`) go into the grammar, so that both engines, ours and vLLM's,
constrain the same way. The string bound does not, for the native engine: a bounded string costs
xgrammar ~1.6 s of compile per schema, so it is enforced on the output's text instead
(`string_bound`; constraints/masks.py `StringBound`); vLLM gets it as `maxLength`.
Torch-free: the API imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

Whitespace = Literal["single", "compact", "any"]
# single: one space after `,` and `:` and nowhere else, as Python's json.dumps writes;
# compact: none at all (vLLM's disable_any_whitespace); any: any whitespace, at most
# ANY_WHITESPACE_MAX characters between two tokens (pretty-printing fits in that)
DEFAULT_WHITESPACE: Whitespace = "single"
ANY_WHITESPACE_MAX = 32
# inside tool calls the structural tag takes only a whitespace bound, not separators
TOOL_WHITESPACE_MAX: dict[str, int] = {"single": 1, "compact": 1, "any": ANY_WHITESPACE_MAX}  # 0 is not allowed
DEFAULT_MAX_STRING_LENGTH = 1024  # characters of a string the schema does not bound
DEFAULT_MAX_NUMBER_DIGITS = 15  # digits before the point (doubles hold 15 exactly); 6 after, no exponent
MAX_SCHEMA_DEPTH = 128  # nesting levels of a schema (JSON objects and arrays): deeper is a 400

# keywords whose value is a schema, a list of schemas, or a map of names to schemas
_SCHEMA = ("additionalProperties", "items", "not", "contains", "propertyNames", "if", "then", "else",
           "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _types(node: dict[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    return {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


def _bound(node: dict[str, Any], max_string: int | None, max_digits: int | None) -> None:
    """Add the bounds `node` lacks, in place (its subschemas too)."""
    types = _types(node)
    fixed = "enum" in node or "const" in node
    if max_string is not None and "string" in types and not fixed:
        if not any(k in node for k in ("maxLength", "pattern", "format")):
            node["maxLength"] = max(max_string, int(node.get("minLength", 0) or 0))
    if max_digits is not None and types & {"integer", "number"} and not fixed and "multipleOf" not in node:
        limit = 10**max_digits - 1
        if "minimum" not in node and "exclusiveMinimum" not in node:
            node["minimum"] = -limit
        if "maximum" not in node and "exclusiveMaximum" not in node:
            node["maximum"] = limit
    extra = node.get("additionalProperties")
    if max_string is not None and (extra is True or isinstance(extra, dict)) and "propertyNames" not in node:
        node["propertyNames"] = {"maxLength": max_string}  # free keys are strings too
    for key in _SCHEMA:
        if isinstance(node.get(key), dict):
            _bound(node[key], max_string, max_digits)
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for sub in node[key]:
                if isinstance(sub, dict):
                    _bound(sub, max_string, max_digits)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for sub in node[key].values():
                if isinstance(sub, dict):
                    _bound(sub, max_string, max_digits)


def _nodes(schema: Any, skip: tuple[str, ...] = ()) -> Iterator[tuple[Any, int]]:
    """Every value in `schema` with its nesting depth (the top: 1), without recursion (a hostile
    schema nests thousands deep); the values under the keys in `skip` are not entered."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        yield node, depth
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for k, v in node.items() if k not in skip)
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def external_ref(schema: Any) -> str | None:
    """The first `$ref` in `schema` that does not point inside it ("#..."): the server fetches
    nothing, and a grammar compiler that cannot resolve one would allow anything in its place."""
    for node, _ in _nodes(schema):
        ref = node.get("$ref") if isinstance(node, dict) else None
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
            return str(ref)
    return None


def bounded_schema(schema: dict[str, Any], max_string: int | None, max_digits: int | None) -> dict[str, Any]:
    """`schema` with a length bound on every string and a digit bound on every number that it
    leaves free (None: no bound). A schema's own bounds, patterns, formats, enums and consts stay.

    A string bound in the grammar is costly to compile (about 1.6 s of xgrammar's time per schema
    on 2 cores, for any length over ~200): the native engine bounds strings on the output's text
    instead (`string_bound`), and only vLLM, which takes nothing but a grammar, gets them here."""
    out = copy.deepcopy(schema)
    _bound(out, max_string, max_digits)
    return out


def string_bound(schema: Any, max_string: int | None) -> int:
    """The characters a string may run to under `schema` (0: no bound): `max_string`, or the
    schema's own largest `maxLength` where it allows longer strings than that."""
    if max_string is None:
        return 0
    longest = max_string
    for node, _ in _nodes(schema, skip=("enum", "const", "default", "examples")):  # values, not schemas
        length = node.get("maxLength") if isinstance(node, dict) else None
        if isinstance(length, int) and not isinstance(length, bool):
            longest = max(longest, length)
    return longest


def schema_depth(schema: Any) -> int:
    """How deeply `schema` nests (objects and arrays), counted without recursion."""
    return max((depth for node, depth in _nodes(schema) if isinstance(node, (dict, list))), default=0)


def any_object_schema() -> dict[str, Any]:
    """Any JSON object (`response_format: json_object`), as a schema that the bounds apply to."""
    value = {
        "anyOf": [
            {"type": "string"},
            {"type": "number"},
            {"type": "boolean"},
            {"type": "null"},
            {"type": "array", "items": {"$ref": "#/$defs/value"}},
            {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
        ]
    }
    return {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}, "$defs": {"value": value}}


def json_grammar_options(whitespace: str) -> dict[str, Any]:
    """xgrammar's `from_json_schema` options for a whitespace layout."""
    if whitespace == "compact":
        return {"any_whitespace": False, "separators": (",", ":")}
    if whitespace == "any":
        return {"any_whitespace": True, "max_whitespace_cnt": ANY_WHITESPACE_MAX}
    return {"any_whitespace": False}  # xgrammar's separators without indent: ", " and ": "
