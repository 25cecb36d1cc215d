"""The Slack incoming-webhook sink: Block Kit messages, digests, and Slack's error strings.

Rendering is pure (`render_message`, `render_digest`) and keeps every message inside Slack's
limits: at most 50 blocks, a 150-character header, section text up to 3000 characters, at most
10 fields of up to 2000 characters. `&`, `<` and `>` are escaped in all text, so values from the
API can never form links or mentions. Personal values are hidden unless the sink has
`include_pii`; a Slack channel is a wider audience than a CRM endpoint.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx

from watcher.bodies import Answer
from watcher.clock import Clock
from watcher.config import SinkConfig
from watcher.errors import DeliveryError, SinkGone, Throttled, WatcherError
from watcher.events import (
    CAMPAIGN_CREATED,
    CAMPAIGN_STATUS_CHANGED,
    EVENT_TYPES,
    LEAD_CREATED,
    LEAD_UPDATED,
    WATCHER_TEST,
    Event,
    campaign_id_of,
    dumps,
)
from watcher.pii import is_personal_field, mask_values
from watcher.sinks.base import Attempt, CampaignNames, HttpSink, asked_wait

MAX_BLOCKS = 50
HEADER_LIMIT = 150
SECTION_LIMIT = 3000
FIELD_LIMIT = 2000
MAX_FIELDS = 10
TEXT_LIMIT = 3000  # the notification text; Slack cuts at 40 000 but advises staying near 4 000
VALUE_LIMIT = 200  # one old or new value inside a change field
MAX_BATCH = 20

# Slack's answers that mean the hook will never work again (revoked, archived, or our payload
# can never be accepted): the sink is disabled and the operator alerted, events kept.
GONE_ERRORS: frozenset[str] = frozenset(
    {
        "invalid_payload",
        "user_not_found",
        "action_prohibited",
        "channel_not_found",
        "channel_is_archived",
        "no_service",
        "no_active_hooks",
        "invalid_token",
        "no_team",
        "team_disabled",
    }
)
_ERROR_TOKEN = re.compile(r"[a-z][a-z0-9_]{0,63}")

# --- text helpers ---------------------------------------------------------------------------


def escape(text: str) -> str:
    """Slack's three control characters as HTML entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis, never splitting an `&...;` entity."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    amp = cut.rfind("&", max(0, len(cut) - 5))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "…"


def _value(value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    text = value if isinstance(value, str) else dumps(value)
    return escape(clip(" ".join(text.split()), VALUE_LIMIT))


def _when(timestamp: str) -> str:
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return escape(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": clip(text, HEADER_LIMIT)}}


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_LIMIT)}}


def _fields(items: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A section of `*label*\\nvalue` fields (labels and values already escaped)."""
    return {
        "type": "section",
        "fields": [
            {"type": "mrkdwn", "text": clip(f"*{label}*\n{value}", FIELD_LIMIT)} for label, value in items[:MAX_FIELDS]
        ],
    }


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, SECTION_LIMIT)}]}


# --- what an event is about -----------------------------------------------------------------


def _lead(event: Event) -> Mapping[str, Any]:
    lead = event.data.get("lead")
    return lead if isinstance(lead, Mapping) else {}


def _campaign_doc(event: Event) -> Mapping[str, Any]:
    campaign = event.data.get("campaign")
    if isinstance(campaign, Mapping):
        return campaign
    embedded = _lead(event).get("campaign")
    return embedded if isinstance(embedded, Mapping) else {}


def wants_campaign_name(event: Event) -> bool:
    """Whether a lead's event names its campaign by id only, so the watcher's records can add the name."""
    return event.campaign_id is not None and "lead" in event.data and "campaign_name" not in event.extra


def with_campaign_name(event: Event, names: Mapping[int, str]) -> Event:
    """The event with `extra["campaign_name"]` from `names`, when it wants one and `names` has it."""
    if event.campaign_id is None or not wants_campaign_name(event):
        return event
    name = names.get(event.campaign_id)
    return replace(event, extra={**event.extra, "campaign_name": name}) if name else event


def campaign_label(event: Event) -> str | None:
    """`Name (601)`, `601`, or None; escaped. A lead carries only the campaign IRI: its campaign's
    name comes from the watcher's own campaign records (`event.extra["campaign_name"]`) when known."""
    doc = _campaign_doc(event)
    cid = event.campaign_id
    if cid is None:
        cid = campaign_id_of(doc) if doc else campaign_id_of(_lead(event).get("campaign"))
    name = doc.get("name") or event.extra.get("campaign_name")
    if isinstance(name, str) and name.strip():
        label = clip(" ".join(name.split()), 100)
        return escape(f"{label} ({cid})" if cid is not None else label)
    return None if cid is None else str(cid)


def _lead_id(event: Event) -> str:
    raw = _lead(event).get("id")
    return escape(str(raw)) if raw is not None else escape(event.resource.removeprefix("lead:"))


def _qa_result(lead: Mapping[str, Any]) -> str | None:
    """A readable QA result; the shape of `qaResult` is not documented, so look for a label."""
    qa = lead.get("qaResult")
    if isinstance(qa, str) and qa:
        return escape(clip(qa, 100))
    if isinstance(qa, Mapping):
        for key in ("status", "result", "name", "label", "outcome"):
            value = qa.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return escape(clip(str(value), 100))
    for key in ("qaStatus", "status"):
        value = lead.get(key)
        if isinstance(value, str) and value:
            return escape(clip(value, 100))
    return None


def _score(lead: Mapping[str, Any]) -> str | None:
    score, top = lead.get("score"), lead.get("maxScore")
    if isinstance(score, int | float) and not isinstance(score, bool):
        return f"{score}/{top}" if isinstance(top, int | float) and not isinstance(top, bool) else str(score)
    return None


def _lead_fields(event: Event) -> list[tuple[str, str]]:
    lead = _lead(event)
    items = [("Lead", _lead_id(event))]
    campaign = campaign_label(event)
    if campaign is not None:
        items.append(("Campaign", campaign))
    qa = _qa_result(lead)
    if qa is not None:
        items.append(("QA result", qa))
    score = _score(lead)
    if score is not None:
        items.append(("Score", score))
    return items


def _changes(event: Event) -> Mapping[str, Any]:
    changes = event.data.get("changes")
    return changes if isinstance(changes, Mapping) else {}


def _change_text(field: str, change: Any, include_pii: bool) -> str:
    if not include_pii and is_personal_field(field):
        return "_changed (personal data hidden)_"
    if isinstance(change, Mapping):
        return f"{_value(change.get('from'))} → {_value(change.get('to'))}"
    return _value(change)


def _change_fields(event: Event, include_pii: bool) -> list[tuple[str, str]]:
    changes = list(_changes(event).items())
    items = [(escape(clip(str(k), 100)), _change_text(str(k), v, include_pii)) for k, v in changes]
    if len(items) > MAX_FIELDS:
        shown = MAX_FIELDS - 1
        rest = [escape(clip(str(k), 60)) for k, _ in changes[shown:]]
        items = [*items[:shown], (f"…and {len(rest)} more", clip(", ".join(rest), 1500))]
    return items


def _field_names(event: Event, limit: int = 5) -> str:
    names = [str(k) for k in _changes(event)]
    shown = ", ".join(clip(n, 60) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _status(doc: Mapping[str, Any], key: str = "status") -> str:
    value = doc.get(key)
    return escape(clip(str(value), 60)) if value is not None else "?"


def summary(event: Event) -> str:
    """One escaped line saying what happened, for the notification text and digest lists."""
    if event.type == LEAD_CREATED:
        campaign = campaign_label(event)
        return f"New lead {_lead_id(event)}" + (f" in campaign {campaign}" if campaign else "")
    if event.type == LEAD_UPDATED:
        changed = escape(_field_names(event)) or "no fields"
        return f"Lead {_lead_id(event)} updated: {changed}"
    if event.type == CAMPAIGN_CREATED:
        return f"New campaign {campaign_label(event) or '?'} ({_status(_campaign_doc(event))})"
    if event.type == CAMPAIGN_STATUS_CHANGED:
        frm = escape(clip(str(event.data.get("from")), 60))
        to = escape(clip(str(event.data.get("to")), 60))
        return f"Campaign {campaign_label(event) or '?'}: {frm} → {to}"
    if event.type == WATCHER_TEST:
        return f"Test message for sink {escape(clip(str(event.data.get('sink', '?')), 60))}"
    return f"{escape(clip(event.type, 60))} for {escape(clip(event.resource, 60))}"


# --- messages -------------------------------------------------------------------------------


def _header_text(event: Event) -> str:
    # Slack parses its control characters in every text object, plain_text included, so the
    # header is escaped like the rest.
    if event.type == LEAD_CREATED:
        return f"New lead {_lead_id(event)}"
    if event.type == LEAD_UPDATED:
        n = len(_changes(event))
        return f"Lead {_lead_id(event)} updated: {n} field{'s' if n != 1 else ''} changed"
    if event.type == CAMPAIGN_CREATED:
        return f"New campaign: {campaign_label(event) or '?'}"
    if event.type == CAMPAIGN_STATUS_CHANGED:
        to = escape(clip(str(event.data.get("to")), 60))
        return f"Campaign {campaign_label(event) or '?'} is now {to}"
    if event.type == WATCHER_TEST:
        return "convertr-watcher test message"
    return escape(event.type)


def render_message(event: Event, *, include_pii: bool = False) -> dict[str, Any]:
    """The Block Kit message for one event."""
    blocks: list[dict[str, Any]] = [_header(_header_text(event))]
    if event.type in (LEAD_CREATED, LEAD_UPDATED):
        blocks.append(_fields(_lead_fields(event)))
        if event.type == LEAD_UPDATED and _changes(event):
            blocks.append(_fields(_change_fields(event, include_pii)))
    elif event.type in (CAMPAIGN_CREATED, CAMPAIGN_STATUS_CHANGED):
        doc = _campaign_doc(event)
        items = [("Campaign", campaign_label(event) or "?")]
        if event.type == CAMPAIGN_STATUS_CHANGED:
            frm = _value(event.data.get("from"))
            items.append(("Status", f"{frm} → *{_value(event.data.get('to'))}*"))
        else:
            items.append(("Status", _status(doc)))
            for key, label in (("startTs", "Starts"), ("endTs", "Ends")):
                if doc.get(key):
                    items.append((label, _value(doc.get(key))))
        blocks.append(_fields(items))
    elif event.type == WATCHER_TEST:
        sink = escape(clip(str(event.data.get("sink", "?")), 100))
        blocks.append(_section(f"Test event for sink *{sink}*: if you can read this, delivery works."))
    else:
        blocks.append(_section(summary(event)))
    blocks.append(_context(f"{escape(event.id)} · {_when(event.timestamp)}"))
    text = clip(f"{escape(event.type)}: {summary(event)}", TEXT_LIMIT)
    return {"text": text, "blocks": blocks}


def _type_order(types: Sequence[str]) -> list[str]:
    known = [t for t in EVENT_TYPES if t in types]
    return known + sorted(set(types) - set(known))


def _list_section(title: str, lines: Sequence[str]) -> dict[str, Any]:
    """A section titled `title` listing as many lines as fit, then `…and N more`."""
    text = title
    for i, line in enumerate(lines):
        after = len(lines) - i - 1
        # Keep room for the "more" line that would follow this one, so the cut never needs clip().
        reserve = len(f"\n…and {after} more") if after else 0
        if len(text) + 1 + len(line) + reserve > SECTION_LIMIT:
            text += f"\n…and {len(lines) - i} more"
            break
        text += "\n" + line
    return _section(text)


def render_digest(
    events: Sequence[Event], *, include_pii: bool = False, counts: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """One message counting and listing several events, by type, with their ids.

    With `counts` (every event of a burst, by type), `events` is only a sample: the tally and the
    header count them all, and each type's list ends in "…and N more" for the ones not shown.
    """
    del include_pii  # a digest lists ids and field names only, never values
    counts = Counter(counts) if counts is not None else Counter(e.type for e in events)
    counts.update({e.type: 0 for e in events})
    total = sum(counts.values())
    order = _type_order([t for t in counts if counts[t]])
    plural = "s" if total != 1 else ""
    blocks: list[dict[str, Any]] = [_header(f"{total} Convertr change{plural}")]
    tally = " · ".join(f"*{escape(t)}*: {counts[t]}" for t in order)
    blocks.append(_section(tally))
    # header + tally + context leave MAX_BLOCKS - 3 sections for the types, the last maybe "more".
    room = MAX_BLOCKS - 3
    for n, type_ in enumerate(order):
        if n == room - 1 and len(order) > room:
            left = sum(counts[t] for t in order[n:])
            blocks.append(_section(f"…and {left} more events of {len(order) - n} other types"))
            break
        lines = [f"• {summary(e)} · `{escape(e.id)}`" for e in events if e.type == type_]
        unseen = counts[type_] - len(lines)
        if unseen > 0:
            lines.append(f"…and {unseen} more not listed")
        blocks.append(_list_section(f"*{escape(type_)}* ({counts[type_]})", lines))
    stamps = sorted(e.timestamp for e in events)
    span = _when(stamps[0]) if stamps else ""
    if stamps and stamps[-1] != stamps[0]:
        span = f"{span} – {_when(stamps[-1])}"
    blocks.append(_context(f"{total} event{plural} · {span}" if span else f"{total} events"))
    text = f"{total} Convertr change{plural}: " + ", ".join(f"{counts[t]} {t}" for t in order)
    return {"text": clip(escape(text), TEXT_LIMIT), "blocks": blocks}


# --- delivery -------------------------------------------------------------------------------


def classify(response: Answer, *, now: float) -> DeliveryError | None:
    """None when Slack took the message; otherwise the error for the outbox, by status and error string."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    body = response.text.strip()
    # Only a bare Slack error token is quoted; any other body might echo something private.
    token = body if _ERROR_TOKEN.fullmatch(body) else ""
    what = f"HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip() + (f": {token}" if token else "")
    retry_after = asked_wait(response, now)
    if status == 429:
        return Throttled(f"Slack rate limit, {what}", status=status, retry_after=retry_after)
    if token in GONE_ERRORS or status == 410:
        return SinkGone(f"Slack refused the webhook permanently ({what})", status=status)
    if status == 503 and retry_after is not None:
        return Throttled(what, status=status, retry_after=retry_after)
    return DeliveryError(what, status=status, retry_after=retry_after)


def private(event: Event) -> Event:
    """The event with every e-mail address and phone number in its data (and extras) masked."""
    return replace(event, data=mask_values(event.data), extra=mask_values(event.extra))


class SlackSink(HttpSink):
    """Posts one message per event, or one digest for a batch, to an incoming webhook.

    A lead carries only its campaign's IRI; with `campaign_names` the sink looks the name up itself,
    once per message or digest that needs one, so a rename shows in the next message.
    """

    max_batch = MAX_BATCH
    min_interval = 1.0  # Slack allows about one message per second per hook

    def __init__(
        self,
        config: SinkConfig,
        *,
        clock: Clock,
        version: str,
        campaign_names: CampaignNames | None = None,
    ) -> None:
        super().__init__(config, clock=clock)
        self._user_agent = f"convertr-watcher/{version}"
        self._campaign_names = campaign_names

    def render(self, events: Sequence[Event]) -> dict[str, Any]:
        events = self._shown(events)
        if len(events) == 1:
            return render_message(events[0], include_pii=self.config.include_pii)
        return render_digest(events, include_pii=self.config.include_pii)

    def _shown(self, events: Sequence[Event]) -> Sequence[Event]:
        """The events as this channel sees them: campaigns named, and personal values masked unless
        `include_pii` (by value as well as by name: a field called "Manager" may hold an address)."""
        events = self._named(events)
        return events if self.config.include_pii else [private(e) for e in events]

    def _named(self, events: Sequence[Event]) -> Sequence[Event]:
        if self._campaign_names is None or not any(wants_campaign_name(e) for e in events):
            return events
        try:
            names = self._campaign_names()
        except WatcherError:
            return events  # the state file is unreadable just now: the campaign shows by its id
        return [with_campaign_name(e, names) for e in events]

    async def deliver(self, events: Sequence[Event]) -> Attempt:
        """Send one message (or digest) for `events`."""
        if not events:
            raise ValueError("nothing to deliver")
        return await self._post(self.render(events))

    async def deliver_digest(self, sample: Sequence[Event], counts: Mapping[str, int]) -> Attempt:
        """Send one digest for a whole burst: every event counted by type, `sample` listed."""
        return await self._post(render_digest(self._shown(sample), include_pii=self.config.include_pii, counts=counts))

    async def _post(self, message: dict[str, Any]) -> Attempt:
        body = dumps(message).encode()
        headers = {"content-type": "application/json", "user-agent": self._user_agent}
        return await self._exchange(lambda: (body, headers), classify)
