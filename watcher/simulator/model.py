"""The simulator's state: campaigns in memory, leads in a `LeadStore`, tokens, limits, faults and
a virtual clock (`clock.now() + offset`). One re-entrant lock guards all of it; the HTTP layer
holds it for the whole of each request.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from watcher.clock import Clock, SystemClock
from watcher.simulator import DEFAULT_PASSWORD, DEFAULT_USERNAME
from watcher.simulator.access import RollingLimit, TokenStore
from watcher.simulator.documents import (
    CAMPAIGN_TIMESTAMPS,
    DERIVED,
    NO_LEADS,
    CampaignRecord,
    LeadCounts,
    apply_lead_fields,
    campaign_document,
    campaign_row,
    campaign_status,
    qa_of,
)
from watcher.simulator.filters import LeadQuery, Page, campaign_predicate, order_keys
from watcher.simulator.generate import campaign_fields, lead_document, person, qa_name
from watcher.simulator.hydra import dumps
from watcher.simulator.leadstore import LeadRow, LeadStore
from watcher.simulator.phptime import iso, to_unix, wall_of
from watcher.simulator.query import Params
from watcher.simulator.seeding import DAY, RECEIVING, bulk_rows, campaign_times, lead_times, plan_for

FIRST_LEAD_ID = 100_001


@dataclass
class Faults:
    """Misbehaviour switches, read on every API request."""

    error_rate: float = 0.0
    latency: float = 0.0
    rate_limit_429: int = 0
    retry_after: float = 1.0
    malformed_rate: float = 0.0
    legacy_next: bool = False
    hang: bool = False
    drop_updated_ts_filter: bool = False
    schema_drift: bool = False  # lead documents lose `score` and `leadFlag` and gain an unknown field
    # A proxy, firewall or maintenance page in front of Convertr, answering HTML instead of the API:
    login_html_403: int = 0  # the next N logins get a 403 page
    proxy_403_rate: float = 0.0  # this share of all API requests gets a 403 page
    html_401: int = 0  # the next N collection or item reads get a 401 page
    # The next N authenticated reads get OAuth's invalid_grant although the token is good (a
    # token store lagging behind the login that minted it).
    token_rejections: int = 0
    # API Platform's `maximum_items_per_page` below what a client asks: a larger itemsPerPage is
    # served at this size, paged at this size (0: Convertr's own maximum of 100).
    max_items_per_page: int = 0

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields by name, checking names and types (for the admin endpoint)."""
        kinds = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        for name, value in changes.items():
            kind = kinds.get(name)
            if kind is None:
                raise ValueError(f"unknown fault: {name}")
            if kind is bool and not isinstance(value, bool):
                raise ValueError(f"{name} must be a boolean")
            if kind is not bool and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"{name} must be a number")
            setattr(self, name, kind(value))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    status: int
    auth_kind: str  # "header", "query", "body", "none" or "multiple"


def _sort_key(prop: str) -> Callable[[tuple[CampaignRecord, dict[str, Any]]], tuple[bool, Any]]:
    def key(pair: tuple[CampaignRecord, dict[str, Any]]) -> tuple[bool, Any]:
        value = pair[1][prop]
        return (value is None, value if value is not None else "")

    return key


class Simulator:
    """A Convertr API v4 tenant held in memory; see `watcher.simulator` for the HTTP side."""

    def __init__(
        self,
        seed: int = 0,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        timezone: str = "Europe/London",
        token_lifetime: int = 3600,
        rate_limit: bool = False,
        items_per_page_default: int = 30,
        clock: Clock | None = None,
    ) -> None:
        self.seed = seed
        self.username = username
        self.password = password
        self.zone = ZoneInfo(timezone)
        self.token_lifetime = token_lifetime
        self.rate_limit = rate_limit
        self.items_per_page_default = items_per_page_default
        self.clock: Clock = clock or SystemClock()
        self.offset = 0.0
        self.lock = threading.RLock()
        self.faults = Faults()
        self.fault_rng = random.Random(seed ^ 0x5EED)
        self.rng = random.Random(seed)
        self.tokens = TokenStore()
        self.request_limit = RollingLimit(3000, 300)
        self.login_limit = RollingLimit(100, 300)
        self.password_expired = False
        self.poisoned: set[int] = set()  # leads the API fails to serialise (500 on any read of them)
        self.user_id = 1000 + seed % 9000
        self.requests: list[RequestRecord] = []
        self.logins = 0
        self.store = LeadStore(seed, self.zone)
        self._campaigns: dict[int, CampaignRecord] = {}
        self._deleted_campaigns: dict[int, CampaignRecord] = {}  # gone from the API; their leads keep the IRI
        self._next_lead_id = FIRST_LEAD_ID
        self._next_campaign_id = 601
        self._next_data_id = 900_000_000

    # -- time ---------------------------------------------------------------------------------

    def now_ts(self) -> int:
        """Virtual Unix seconds."""
        return int(self.clock.now() + self.offset)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.now_ts(), self.zone)

    def now_wall(self) -> int:
        return wall_of(self.now_ts(), self.zone)

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.offset += seconds

    def _ts(self, value: Any) -> int | None:
        return to_unix(value, self.zone)

    def _iso(self, ts: int) -> str:
        return iso(ts, self.zone)

    # -- bookkeeping --------------------------------------------------------------------------

    def record(self, method: str, path: str, query: str, status: int, auth_kind: str) -> None:
        with self.lock:
            self.requests.append(RequestRecord(method, path, query, status, auth_kind))

    def expire_tokens(self) -> None:
        with self.lock:
            self.tokens.expire_all(self.now_ts())

    # -- campaigns ----------------------------------------------------------------------------

    def _lead_counts(self) -> dict[int, LeadCounts]:
        return self.store.counts()

    def _campaign_doc(self, record: CampaignRecord, now: int) -> dict[str, Any]:
        return campaign_document(record, self._lead_counts().get(record.id, NO_LEADS), now, self.zone)

    def _status(self, record: CampaignRecord, now: int) -> str:
        return campaign_status(record, now, self._lead_counts().get(record.id, NO_LEADS).get("Valid"))

    def _set_campaign_fields(self, record: CampaignRecord, changes: Mapping[str, Any]) -> None:
        for name, value in changes.items():
            if name in CAMPAIGN_TIMESTAMPS:
                record.times[name] = self._ts(value)
            elif name in DERIVED:
                raise ValueError(f"campaign field {name} is derived and cannot be set")
            elif name in record.fields:
                record.fields[name] = value
            else:
                raise ValueError(f"unknown campaign field: {name}")

    def add_campaign(self, **fields: Any) -> dict[str, Any]:
        """Create a campaign (active by default: started yesterday, ends in 90 days, signed)."""
        with self.lock:
            now = self.now_ts()
            campaign_id = self._next_campaign_id
            start = now - DAY - now % 3600
            record = CampaignRecord(
                campaign_id,
                campaign_fields(self.seed, campaign_id, len(self._campaigns)),
                {
                    "startTs": start,
                    "endTs": start + 91 * DAY - 1,
                    "updatedTs": now,
                    "pauseTs": None,
                    "signTs": start - 3600,
                    "createdTs": start - 2 * 3600,
                },
            )
            self._set_campaign_fields(record, fields)
            self._next_campaign_id += 1
            self._campaigns[campaign_id] = record
            return self._campaign_doc(record, now)

    def _record(self, campaign_id: int) -> CampaignRecord:
        record = self._campaigns.get(campaign_id) or self._deleted_campaigns.get(campaign_id)
        if record is None:
            raise KeyError(f"no campaign {campaign_id}")
        return record

    def update_campaign(self, campaign_id: int, **fields: Any) -> dict[str, Any]:
        """Change fields (timestamps as datetime, ISO text or Unix seconds); bumps updatedTs."""
        with self.lock:
            record = self._record(campaign_id)
            now = self.now_ts()
            self._set_campaign_fields(record, fields)
            if "updatedTs" not in fields:
                record.times["updatedTs"] = now
            return self._campaign_doc(record, now)

    def pause_campaign(self, campaign_id: int) -> dict[str, Any]:
        return self.update_campaign(campaign_id, pauseTs=self.now_ts())

    def resume_campaign(self, campaign_id: int) -> dict[str, Any]:
        return self.update_campaign(campaign_id, pauseTs=None)

    def delete_campaign(self, campaign_id: int) -> None:
        """Take a campaign out of every result (deleted); its leads keep pointing at it."""
        with self.lock:
            self._deleted_campaigns[campaign_id] = self._campaigns.pop(campaign_id)

    def campaign(self, campaign_id: int) -> dict[str, Any]:
        with self.lock:
            return self._campaign_doc(self._record(campaign_id), self.now_ts())

    def campaign_ids(self) -> list[int]:
        with self.lock:
            return sorted(self._campaigns)

    def campaign_page(self, params: Params, page: Page, updated_filter: bool) -> tuple[int, list[dict[str, Any]]]:
        """Filtered, ordered campaigns: the total and the requested page's documents."""
        with self.lock:
            now = self.now_ts()
            matches = campaign_predicate(params, wall_of(now, self.zone), updated_filter)
            rows = [
                (record, row)
                for record in self._campaigns.values()
                for row in [campaign_row(record, self._status(record, now), self.zone)]
                if matches(row)
            ]
            for prop, descending in reversed(order_keys(params, ("id", "name"))):
                rows.sort(key=_sort_key(prop), reverse=descending)
            chosen = rows[page.offset : page.offset + page.limit] if page.limit > 0 else []
            return len(rows), [self._campaign_doc(record, now) for record, _ in chosen]

    def campaign_document(self, campaign_id: int) -> dict[str, Any] | None:
        with self.lock:
            record = self._campaigns.get(campaign_id)
            return None if record is None else self._campaign_doc(record, self.now_ts())

    def _campaign_for_lead(self, campaign_id: int | None) -> int:
        if campaign_id is not None:
            self._record(campaign_id)
            return campaign_id
        return self.rng.choice(self._open_campaigns())

    def _open_campaigns(self) -> list[int]:
        if not self._campaigns:
            self.add_campaign()
        now = self.now_ts()
        active = [cid for cid, rec in self._campaigns.items() if self._status(rec, now) == "Active"]
        return active or list(self._campaigns)

    # -- leads --------------------------------------------------------------------------------

    def _row(self, lead_id: int) -> LeadRow:
        row = self.store.get(lead_id)
        if row is None:
            raise KeyError(f"no lead {lead_id}")
        return row

    def _lead_dict(self, row: LeadRow) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.store.render(row))
        return doc

    def _edited(self, row: LeadRow, doc: dict[str, Any], updated: int, visible: bool) -> LeadRow:
        """The row for an edited document, its columns taken from the document."""
        doc["createdTs"], doc["updatedTs"] = self._iso(row.created), self._iso(updated)
        campaign_id = int(str(doc["campaign"]).rsplit("/", 1)[-1])
        self._record(campaign_id)
        return replace(
            row,
            campaign_id=campaign_id,
            email=str(doc["email"]),
            qa=qa_of(doc),
            visible=visible,
            updated=updated,
            doc=dumps(doc),
        )

    def add_lead(
        self,
        campaign_id: int | None = None,
        *,
        created: datetime | None = None,
        visible: bool = True,
        lead_data: Mapping[str, str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Insert one lead (created now unless told); hidden ones wait for `reveal_lead`."""
        with self.lock:
            cid = self._campaign_for_lead(campaign_id)
            lead_id = self._next_lead_id
            ts = self._ts(created) if created is not None else self.now_ts()
            assert ts is not None
            email = person(self.seed, lead_id)[2]
            given_qa = fields.get("qaResult")
            qa = given_qa if isinstance(given_qa, str) else qa_name(self.seed, lead_id)
            row = LeadRow(lead_id, cid, email, qa, visible, ts, ts, None)
            doc = lead_document(self.seed, lead_id, cid, email, qa, self._iso(ts), self._iso(ts))
            if fields or lead_data:
                self._next_data_id += apply_lead_fields(doc, fields, lead_data, self._next_data_id)
                row = self._edited(row, doc, ts, visible)
            self.store.insert(row)
            self._next_lead_id += 1
            return doc

    def add_leads(self, n: int, campaign_id: int | None = None, *, created: datetime | None = None) -> list[int]:
        """Bulk insert of generated leads, all created at one time (now unless told)."""
        with self.lock:
            campaigns = [self._campaign_for_lead(campaign_id)] if campaign_id is not None else self._open_campaigns()
            ts = self._ts(created) if created is not None else self.now_ts()
            assert ts is not None
            first = self._next_lead_id
            ids = list(range(first, first + n))
            self.store.insert_many(bulk_rows(self.seed, ids, campaigns, ts, wall_of(ts, self.zone)))
            self._next_lead_id += n
            return ids

    def reveal_lead(self, lead_id: int) -> None:
        """Make a hidden lead visible now; it keeps its createdTs and its updatedTs becomes now."""
        with self.lock:
            row = self._row(lead_id)
            self.store.update(self._edited(row, self._lead_dict(row), self.now_ts(), True))

    def hide_lead(self, lead_id: int) -> None:
        """Take a lead out of every result (deleted, or moved out of reach), keeping its row."""
        with self.lock:
            row = self._row(lead_id)
            self.store.update(replace(row, visible=False))

    def delete_lead(self, lead_id: int, *, reuse_id: bool = False) -> None:
        """Delete a lead's row for good. `reuse_id`: the id counter then restarts after the highest id
        left, as MySQL's InnoDB did at a server restart before 8.0, so the next lead may take this id."""
        with self.lock:
            self._row(lead_id)
            self.store.delete(lead_id)
            if reuse_id:
                highest = self.store.highest_id()
                self._next_lead_id = FIRST_LEAD_ID if highest is None else highest + 1

    def poison_lead(self, lead_id: int, poisoned: bool = True) -> None:
        """Make every read that would serialise this lead answer 500, as a record the server
        cannot serialise does; `poisoned=False` cures it."""
        with self.lock:
            if poisoned:
                self.poisoned.add(lead_id)
            else:
                self.poisoned.discard(lead_id)

    def update_lead(
        self, lead_id: int, *, lead_data: Mapping[str, str] | None = None, touch: bool = True, **fields: Any
    ) -> dict[str, Any]:
        """Edit a lead as Convertr's processing or a person would; updatedTs becomes now, unless
        `touch` is false (some writes, such as a leadData entry's, leave it alone)."""
        with self.lock:
            row = self._row(lead_id)
            doc = self._lead_dict(row)
            self._next_data_id += apply_lead_fields(doc, fields, lead_data, self._next_data_id)
            self.store.update(self._edited(row, doc, self.now_ts() if touch else row.updated, row.visible))
            return doc

    def add_lead_data(self, lead_id: int, name: str, value: str, *, touch: bool = True) -> int:
        """Append a leadData entry even when one of that name exists (Convertr does not forbid it);
        returns the new entry's id."""
        with self.lock:
            row = self._row(lead_id)
            doc = self._lead_dict(row)
            data_id = self._next_data_id
            self._next_data_id += 1
            entry = {"@id": f"/api/v4/lead-datas/{data_id}", "@type": "LeadData", "name": name, "value": value}
            doc["leadData"].append(entry)
            self.store.update(self._edited(row, doc, self.now_ts() if touch else row.updated, row.visible))
            return data_id

    def set_lead_data(self, lead_id: int, data_id: int, value: str, *, touch: bool = True) -> None:
        """Set the value of one leadData entry, named by its id (names may repeat)."""
        with self.lock:
            row = self._row(lead_id)
            doc = self._lead_dict(row)
            [entry] = [e for e in doc["leadData"] if e.get("@id") == f"/api/v4/lead-datas/{data_id}"]
            entry["value"] = value
            self.store.update(self._edited(row, doc, self.now_ts() if touch else row.updated, row.visible))

    def renumber_lead_data(self, lead_id: int, *, touch: bool = True) -> None:
        """Give every leadData entry of a lead a new id, values unchanged: a save that replaces the
        whole collection (delete and insert), as an ORM may do."""
        with self.lock:
            row = self._row(lead_id)
            doc = self._lead_dict(row)
            for entry in doc["leadData"]:
                entry["@id"] = f"/api/v4/lead-datas/{self._next_data_id}"
                self._next_data_id += 1
            self.store.update(self._edited(row, doc, self.now_ts() if touch else row.updated, row.visible))

    def reverse_lead_data(self, lead_id: int) -> None:
        """Serve a lead's leadData entries in reverse order, nothing else changed (not even updatedTs)."""
        with self.lock:
            row = self._row(lead_id)
            doc = self._lead_dict(row)
            doc["leadData"].reverse()
            self.store.update(self._edited(row, doc, row.updated, row.visible))

    def lead(self, lead_id: int) -> dict[str, Any]:
        """The current document of a lead, hidden or not."""
        with self.lock:
            return self._lead_dict(self._row(lead_id))

    def lead_ids(self) -> list[int]:
        with self.lock:
            return self.store.ids(visible=True)

    def lead_page(self, query: LeadQuery, page: Page) -> tuple[int, list[str]]:
        """The total matching and the page's serialised documents."""
        with self.lock:
            return self.store.page(query.where, query.args, query.order == "DESC", page.offset, page.limit)

    def lead_document(self, lead_id: int) -> str | None:
        """The serialised document of a visible lead, or None."""
        with self.lock:
            row = self.store.get(lead_id)
            return None if row is None or not row.visible else self.store.render(row)

    # -- seeding ------------------------------------------------------------------------------

    def seed_data(self, campaigns: int = 5, leads: int = 50) -> None:
        """Campaigns in assorted states and leads spread over the last three days."""
        with self.lock:
            now = self.now_ts()
            receiving: list[int] = []
            for index in range(campaigns):
                plan = plan_for(index)
                doc = self.add_campaign(**campaign_times(plan, index, now))
                if plan in RECEIVING:
                    receiving.append(int(doc["id"]))
            receiving = receiving or self.campaign_ids() or [int(self.add_campaign()["id"])]
            rows = []
            for created, updated in lead_times(self.rng, now, leads):
                lead_id = self._next_lead_id
                self._next_lead_id += 1
                email, qa = person(self.seed, lead_id)[2], qa_name(self.seed, lead_id)
                row = LeadRow(lead_id, self.rng.choice(receiving), email, qa, True, created, updated, None)
                rows.append(self.store.values(row))
            self.store.insert_many(rows)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "now": self.now().isoformat(),
                "leads": self.store.count(visible=True),
                "hidden_leads": self.store.count(visible=False),
                "campaigns": len(self._campaigns),
                "logins": self.logins,
                "requests": len(self.requests),
                "tokens": len(self.tokens.access),
            }
