"""Check webhook bodies against the JSON Schemas the package ships (`watcher/schemas/<type>.json`)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from watcher import schemas


@cache
def validator(event_type: str) -> Draft202012Validator:
    """A validator for one event type; KeyError when the package ships no schema for it."""
    schema = schemas.load(event_type)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def schema_errors(body: Mapping[str, Any]) -> list[str]:
    """Every way `body` breaks its type's schema, as `path: message` lines (empty when it is valid)."""
    event_type = body.get("type")
    if not isinstance(event_type, str):
        return ["type: missing or not a string"]
    try:
        checker = validator(event_type)
    except KeyError:
        return [f"type: no schema for event type {event_type!r}"]
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
        for error in sorted(checker.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))
    ]


def validate_event(body: Mapping[str, Any]) -> None:
    """Raise AssertionError, naming each problem, unless `body` is valid for its type's shipped schema."""
    errors = schema_errors(body)
    if errors:
        raise AssertionError(f"{body.get('type')!r} event breaks its schema: " + "; ".join(errors))
