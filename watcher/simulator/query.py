"""Query strings the way API Platform on PHP reads and rebuilds them.

API Platform protects the base name of each key from PHP's dot mangling, then lets
`parse_str` do the rest: `+` becomes a space, `a[b]=1` nests, `a[]=1` appends, a later
key overwrites an earlier one in place. Links in `hydra:view` are rebuilt with
`http_build_query(..., PHP_QUERY_RFC3986)` and numeric indices collapsed to `[]`.
"""

from __future__ import annotations

import re
from typing import Union
from urllib.parse import quote, unquote_plus

# A PHP array from parse_str: values are strings or nested arrays, keys keep insertion order.
Value = Union[str, "Params"]
Params = dict[str, Value]

_INT_KEY = re.compile(r"^(0|-?[1-9]\d*)$")
_PHP_INT_PREFIX = re.compile(r"^[ \t\n\r\v\f]*([+-]?\d+)")
_VALID_INT = re.compile(r"^[+-]?(0|[1-9]\d*)$")
_COLLAPSE = re.compile(r"%5B\d+%5D")


def _decode(raw: str) -> str:
    return unquote_plus(raw, errors="replace")


def _next_index(array: Params) -> str:
    ints = [int(k) for k in array if _INT_KEY.match(k)]
    return str(max(ints) + 1 if ints and max(ints) >= 0 else 0)


def _split_key(key: str) -> tuple[str, list[str]] | None:
    """The base name and bracket segments of a decoded key, or None for a plain name."""
    start = key.find("[")
    if start <= 0:
        return None
    base, rest = key[:start], key[start:]
    segments: list[str] = []
    while rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            if not segments:
                return None
            break
        segments.append(rest[1:end])
        rest = rest[end + 1 :]
    return base, segments


def parse_query(query: str) -> Params:
    """Decode a raw query string into a PHP-like nested array."""
    # Only the upper-case escape is undone before splitting names, exactly as API Platform does.
    query = query.replace("%5B", "[")
    params: Params = {}
    for pair in query.split("&"):
        if not pair:
            continue
        raw_key, _, raw_value = pair.partition("=")
        bracket = raw_key.find("[")
        key = _decode(raw_key[:bracket]) + _decode(raw_key[bracket:]) if bracket > 0 else _decode(raw_key)
        if not key:
            continue
        value = _decode(raw_value)
        split = _split_key(key) if bracket > 0 else None
        if split is None:
            params[key] = value
            continue
        base, segments = split
        container = params
        name = base
        for segment in segments:
            child = container.get(name)
            if not isinstance(child, dict):
                child = {}
                container[name] = child
            container = child
            name = segment if segment != "" else _next_index(child)
        container[name] = value
    return params


def rawurlencode(text: str) -> str:
    return quote(text, safe="")


def _flatten(prefix: str, value: Value, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}%5B{rawurlencode(k)}%5D", v, out)
    else:
        out.append(f"{prefix}={rawurlencode(value)}")


def build_query(params: Params) -> str:
    """`http_build_query` in RFC 3986 mode, with list indices collapsed to `[]`."""
    out: list[str] = []
    for key, value in params.items():
        _flatten(rawurlencode(key), value, out)
    return _COLLAPSE.sub("%5B%5D", "&".join(out))


def php_int(value: Value | None, default: int) -> int:
    """PHP's `(int)` cast: a leading integer, 0 for text, 1 for a non-empty array."""
    if value is None:
        return default
    if isinstance(value, dict):
        return 1 if value else 0
    match = _PHP_INT_PREFIX.match(value)
    return int(match.group(1)) if match else 0


def valid_int(value: str) -> int | None:
    """`filter_var(FILTER_VALIDATE_INT)`: surrounding whitespace allowed, no leading zeros."""
    text = value.strip(" \t\n\r\v\f")
    if not _VALID_INT.match(text):
        return None
    number = int(text)
    return number if -(2**63) <= number < 2**63 else None
