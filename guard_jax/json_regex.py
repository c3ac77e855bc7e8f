"""A JSON schema whose language is regular, as one regex in llguidance's JSON rules: what lets the dense
on-device mask route (`guard_jax.decoding.dense_masks`) take a `Grammar.json_schema`.

`schema_regex(schema)` returns None for anything outside its subset (the host's llguidance masks are then the
route): objects with `properties` and `required` and `additionalProperties: false`; arrays of one `items`
schema with `minItems` / `maxItems`; strings with `minLength` / `maxLength` or a `pattern` over printable
ASCII other than `"` and `\\`; integers, unbounded or in a non-negative [minimum, maximum]; numbers without
bounds; booleans; null; `enum` / `const` of such scalars. Annotations (title, description, ...) are ignored;
any other keyword gives None, as does an "x-guidance" other than `{"whitespace_flexible": false}`.

llguidance's rules, as its matcher accepts them (checked by `tests/test_json_regex.py`): properties in the
schema's order, optional ones skipped; whitespace `[ \\t\\n\\r]*` around every `{ } [ ] , :` inside the value
(none before or after it; none at all when `whitespace_flexible` is false); a string character is any
character but `"`, `\\`, U+0000-U+001F and U+007F, or one of the escapes \\" \\\\ \\b \\f \\n \\r \\t and \\u00XX for
U+0000-U+001F and U+007F, each one character for the length bounds; `pattern` is searched (anchor it with ^$);
integers and numbers without leading zeros, -0 allowed where the range holds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

_CHAR = r'([^"\\\x00-\x1f\x7f]|\\["\\bfnrt]|\\u(00[01][0-9a-fA-F]|007[fF]))'
_ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated", "readOnly", "writeOnly"}
_INTEGER = r"-?(0|[1-9][0-9]*)"
_NUMBER = _INTEGER + r"(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_SAFE_PATTERN_CHARS = set(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\"}


def schema_regex(schema: Mapping | str) -> str | None:
    """The regex (Python / interegular syntax, full match) of the JSON texts llguidance accepts for `schema`
    (a dict or its JSON text), or None where the schema is outside this module's subset."""
    data = json.loads(schema) if isinstance(schema, str) else dict(schema)
    options = data.pop("x-guidance", {})
    if set(options) - {"whitespace_flexible"}:
        return None
    ws = r"[ \t\n\r]*" if options.get("whitespace_flexible", True) else ""
    try:
        return _value(data, ws)
    except _Unsupported:
        return None


class _Unsupported(Exception):
    pass


def _value(schema: Mapping, ws: str) -> str:
    if not isinstance(schema, Mapping):
        raise _Unsupported
    keys = set(schema) - _ANNOTATIONS
    if "enum" in keys or "const" in keys:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        if keys - {"enum", "const", "type"} or ("type" in keys and not all(_is_type(v, schema["type"]) for v in values)):
            raise _Unsupported
        return "(" + "|".join(_literal(v) for v in values) + ")"
    kind = schema.get("type")
    allowed, build = _KINDS.get(kind, (None, None))
    if build is None or keys - allowed - {"type"}:
        raise _Unsupported
    return build(schema, ws)


def _is_type(value, kind) -> bool:
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool)}
    return kind in checks and checks[kind](value)


def _literal(value) -> str:
    if isinstance(value, str) and not set(value) <= _SAFE_PATTERN_CHARS:
        raise _Unsupported  # llguidance's encoding of other characters is not pinned down here
    if not (value is None or isinstance(value, (str, bool, int))) or isinstance(value, float):
        raise _Unsupported
    return re.escape(json.dumps(value))


def _object(schema: Mapping, ws: str) -> str:
    if schema.get("additionalProperties", True) is not False:
        raise _Unsupported
    props = schema.get("properties", {})
    required = set(schema.get("required", ()))
    if required - set(props):
        raise _Unsupported
    items = [(f"{_literal(k)}{ws}:{ws}{_value(v, ws)}", k in required) for k, v in props.items()]
    sep = f"{ws},{ws}"

    def after_some(i: int) -> str:  # members i.. after at least one member
        return "".join(f"{sep}{kv}" if req else f"({sep}{kv})?" for kv, req in items[i:])

    def first_from(i: int) -> str:  # members i.. with none before them
        if i == len(items):
            return ""
        kv, req = items[i]
        return kv + after_some(i + 1) if req else f"({kv}{after_some(i + 1)}|{first_from(i + 1)})"

    return rf"\{{{ws}{first_from(0)}{ws}\}}"


def _array(schema: Mapping, ws: str) -> str:
    item = _value(schema.get("items", {"type": "__missing__"}), ws)
    lo, hi = int(schema.get("minItems", 0)), schema.get("maxItems")
    if hi is not None and int(hi) < max(lo, 1):
        if int(hi) < lo:
            raise _Unsupported
        return rf"\[{ws}\]"
    more = f"({ws},{ws}{item})" + ("{%d,}" % max(lo - 1, 0) if hi is None else "{%d,%d}" % (max(lo - 1, 0), int(hi) - 1))
    body = f"{item}{more}"
    return rf"\[{ws}" + (f"({body})?" if lo == 0 else body) + rf"{ws}\]"


def _string(schema: Mapping, ws: str) -> str:
    if "pattern" in schema:
        if "minLength" in schema or "maxLength" in schema:
            raise _Unsupported
        return '"' + _pattern(schema["pattern"]) + '"'
    lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
    count = "{%d,}" % lo if hi is None else "{%d,%d}" % (lo, int(hi))
    return f'"{_CHAR}{count}"'


def _pattern(pattern: str) -> str:
    """A JSON Schema pattern (searched) as the regex of its string's characters: only patterns whose every
    character is printable ASCII other than `"` and `\\` (these need no escape in JSON), written with literals,
    classes of such characters, escaped punctuation and the usual operators (no `.`, negated classes, other
    escapes, lookaround, or `|` beside an anchor)."""
    start, end = pattern.startswith("^"), pattern.endswith("$") and not pattern.endswith("\\$")
    body = pattern[1 if start else 0: len(pattern) - 1 if end else len(pattern)]
    bare = re.sub(r"\\[!#-/:-@\[\]^-`{-~]", "", body)  # escaped punctuation other than " and \\ is a literal
    if re.search(r"\\|\.|\[\^|\(\?|\^|\$", bare) or ("|" in bare and (start or end)) or not set(body) <= _SAFE_PATTERN_CHARS | {"\\"}:
        raise _Unsupported
    return ("" if start else _CHAR + "*") + f"({body})" + ("" if end else _CHAR + "*")


def _integer(schema: Mapping, ws: str) -> str:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is None and hi is None:
        return _INTEGER
    if lo is None or hi is None or lo != int(lo) or hi != int(hi) or not 0 <= int(lo) <= int(hi):
        raise _Unsupported
    return int_range(int(lo), int(hi))


def int_range(lo: int, hi: int) -> str:
    """The regex of the decimal integers lo..hi (0 <= lo <= hi), no leading zeros."""
    parts = []
    for n in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(hi, 10**n - 1)
        parts.append(_same_length(str(a), str(b)))
    return "(" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> str:
    """The regex of the numbers a..b written with the same number of digits."""
    if not a:
        return ""
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        return f"[{a[0]}-{b[0]}]" + "[0-9]" * n
    parts = [a[0] + _same_length(a[1:], "9" * n)]
    if int(a[0]) + 1 <= int(b[0]) - 1:
        middle = f"{int(a[0]) + 1}-{int(b[0]) - 1}" if int(a[0]) + 2 < int(b[0]) else str(int(a[0]) + 1)
        parts.append(f"[{middle}]" + "[0-9]" * n)
    parts.append(b[0] + _same_length("0" * n, b[1:]))
    return "(" + "|".join(parts) + ")"


_KINDS = {
    "object": ({"properties", "required", "additionalProperties"}, _object),
    "array": ({"items", "minItems", "maxItems"}, _array),
    "string": ({"minLength", "maxLength", "pattern"}, _string),
    "integer": ({"minimum", "maximum"}, _integer),
    "number": (set(), lambda s, ws: _NUMBER),
    "boolean": (set(), lambda s, ws: "(true|false)"),
    "null": (set(), lambda s, ws: "null"),
}
