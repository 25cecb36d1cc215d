"""JSON Schemas (draft 2020-12) of the webhook bodies, one file per event type: `<type>.json`.

They ship inside the package so receivers can validate what they get:

    from watcher.schemas import load
    jsonschema.validate(body, load(body["type"]))
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

from watcher.events import EVENT_TYPES


def load(event_type: str) -> dict[str, Any]:
    """The schema of one event type; KeyError for a type the watcher does not emit."""
    if event_type not in EVENT_TYPES:
        raise KeyError(event_type)
    text = (files(__name__) / f"{event_type}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
