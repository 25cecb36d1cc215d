"""Leads in an in-memory SQLite table, with the caches that keep a page over 100 000 leads cheap.

A lead's document is a pure function of its row until someone edits it, so only edited
documents are stored. Three caches sit on top, all kept exact on single-lead writes
(bulk inserts simply drop them): rendered JSON per lead, the sorted id list of each recent
filter, and per-campaign counts by QA result.
"""

from __future__ import annotations

import sqlite3
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from watcher.simulator.documents import LeadCounts
from watcher.simulator.generate import lead_document
from watcher.simulator.hydra import dumps
from watcher.simulator.phptime import iso, wall_of

_DOC_CACHE_SIZE = 20_000
_ID_LISTS = 16
_SCHEMA = """
CREATE TABLE leads (
    id INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL,
    email TEXT NOT NULL,
    qa TEXT NOT NULL,
    visible INTEGER NOT NULL,
    created_unix INTEGER NOT NULL,
    created_wall INTEGER NOT NULL,
    updated_unix INTEGER NOT NULL,
    updated_wall INTEGER NOT NULL,
    doc TEXT
);
CREATE INDEX leads_created ON leads (created_wall);
CREATE INDEX leads_updated ON leads (updated_wall);
CREATE INDEX leads_email ON leads (email);
CREATE INDEX leads_campaign ON leads (campaign_id, qa, visible, created_unix);
"""
_COLUMNS = "id, campaign_id, email, qa, visible, created_unix, created_wall, updated_unix, updated_wall, doc"
_INSERT = f"INSERT INTO leads ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE = (
    "UPDATE leads SET campaign_id = ?, email = ?, qa = ?, visible = ?, created_unix = ?, created_wall = ?,"
    " updated_unix = ?, updated_wall = ?, doc = ? WHERE id = ?"
)
_ROW = "id, campaign_id, email, qa, visible, created_unix, updated_unix, doc"


@dataclass(frozen=True)
class LeadRow:
    id: int
    campaign_id: int
    email: str
    qa: str
    visible: bool
    created: int
    updated: int
    doc: str | None


def _window(ids: list[int], offset: int, limit: int, descending: bool) -> list[int]:
    """One page of an ascending id list, read from either end."""
    if not descending:
        return ids[offset : offset + limit]
    end = len(ids) - offset
    return ids[max(0, end - limit) : end][::-1]


class LeadStore:
    def __init__(self, seed: int, zone: ZoneInfo) -> None:
        self.seed = seed
        self.zone = zone
        self.db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self.db.executescript(_SCHEMA)
        self._docs: OrderedDict[int, str] = OrderedDict()
        self._id_lists: OrderedDict[tuple[str, tuple[Any, ...]], list[int]] = OrderedDict()
        self._counts: dict[int, LeadCounts] | None = None
        self._dirty_counts: set[int] = set()

    # -- rows -----------------------------------------------------------------------------

    def values(self, row: LeadRow) -> tuple[Any, ...]:
        """The row as the INSERT's parameters, wall-clock columns included."""
        return (
            row.id,
            row.campaign_id,
            row.email,
            row.qa,
            int(row.visible),
            row.created,
            wall_of(row.created, self.zone),
            row.updated,
            wall_of(row.updated, self.zone),
            row.doc,
        )

    def insert_many(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Bulk insert of `values()`-shaped tuples; drops the filter and count caches."""
        self.db.executemany(_INSERT, rows)
        self._id_lists.clear()
        self._counts = None

    def insert(self, row: LeadRow) -> None:
        self.db.execute(_INSERT, self.values(row))
        self._written(row.id, None)

    def update(self, row: LeadRow) -> None:
        before = self.get(row.id)
        values = self.values(row)
        self.db.execute(_UPDATE, (*values[1:], row.id))
        self._written(row.id, before)

    def delete(self, lead_id: int) -> None:
        """Remove a row for good; the filter and count caches are rebuilt on the next read."""
        self.db.execute("DELETE FROM leads WHERE id = ?", (lead_id,))
        self._docs.pop(lead_id, None)
        self._id_lists.clear()
        self._counts = None

    def highest_id(self) -> int | None:
        found = self.db.execute("SELECT MAX(id) FROM leads").fetchone()
        return None if found is None or found[0] is None else int(found[0])

    def get(self, lead_id: int) -> LeadRow | None:
        found = self.db.execute(f"SELECT {_ROW} FROM leads WHERE id = ?", (lead_id,)).fetchone()
        return None if found is None else self._row(found)

    @staticmethod
    def _row(found: tuple[Any, ...]) -> LeadRow:
        lead_id, campaign_id, email, qa, visible, created, updated, doc = found
        return LeadRow(lead_id, campaign_id, email, qa, bool(visible), created, updated, doc)

    def ids(self, visible: bool = True) -> list[int]:
        sql = "SELECT id FROM leads WHERE visible = ? ORDER BY id"
        return [found[0] for found in self.db.execute(sql, (int(visible),))]

    def count(self, visible: bool = True) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM leads WHERE visible = ?", (int(visible),)).fetchone()[0])

    # -- documents --------------------------------------------------------------------------

    def render(self, row: LeadRow) -> str:
        cached = self._docs.get(row.id)
        if cached is None:
            cached = row.doc
            if cached is None:
                created, updated = iso(row.created, self.zone), iso(row.updated, self.zone)
                built = lead_document(self.seed, row.id, row.campaign_id, row.email, row.qa, created, updated)
                cached = dumps(built)
            self._docs[row.id] = cached
            if len(self._docs) > _DOC_CACHE_SIZE:
                self._docs.popitem(last=False)
        return cached

    def page(
        self, where: str, args: tuple[Any, ...], descending: bool, offset: int, limit: int
    ) -> tuple[int, list[str]]:
        """The number of rows matching `where` and the rendered documents of one page of them."""
        key = (where, args)
        ids = self._id_lists.get(key)
        if ids is None:
            ids = [found[0] for found in self.db.execute(f"SELECT id FROM leads WHERE {where} ORDER BY id", args)]
            self._id_lists[key] = ids
            if len(self._id_lists) > _ID_LISTS:
                self._id_lists.popitem(last=False)
        total = len(ids)
        if limit <= 0 or offset >= total:
            return total, []
        chosen = _window(ids, offset, limit, descending)
        missing = [i for i in chosen if i not in self._docs]
        if missing:
            marks = ",".join("?" * len(missing))
            for found in self.db.execute(f"SELECT {_ROW} FROM leads WHERE id IN ({marks})", missing):
                self.render(self._row(found))
        return total, [self._docs[i] for i in chosen]

    # -- campaign counts ------------------------------------------------------------------

    def counts(self) -> dict[int, LeadCounts]:
        """Visible leads per campaign by QA result."""
        if self._counts is None:
            sql = "SELECT campaign_id, qa, COUNT(*), MAX(created_unix) FROM leads WHERE visible = 1 GROUP BY 1, 2"
            self._counts = self._group(self.db.execute(sql).fetchall())
            self._dirty_counts.clear()
        for campaign_id in self._dirty_counts:
            sql = (
                "SELECT campaign_id, qa, COUNT(*), MAX(created_unix) FROM leads"
                " WHERE campaign_id = ? AND visible = 1 GROUP BY 1, 2"
            )
            fresh = self._group(self.db.execute(sql, (campaign_id,)).fetchall())
            self._counts.pop(campaign_id, None)
            self._counts.update(fresh)
        self._dirty_counts.clear()
        return self._counts

    @staticmethod
    def _group(rows: list[tuple[int, str, int, int]]) -> dict[int, LeadCounts]:
        grouped: dict[int, tuple[dict[str, int], list[int]]] = {}
        for campaign_id, qa, count, last in rows:
            by_qa, lasts = grouped.setdefault(campaign_id, ({}, []))
            by_qa[qa] = count
            lasts.append(last)
        return {cid: LeadCounts(by_qa, max(lasts)) for cid, (by_qa, lasts) in grouped.items()}

    # -- keeping caches exact -------------------------------------------------------------

    def _written(self, lead_id: int, before: LeadRow | None) -> None:
        self._docs.pop(lead_id, None)
        after = self.get(lead_id)
        assert after is not None
        for (where, args), ids in self._id_lists.items():
            sql = f"SELECT 1 FROM leads WHERE id = ? AND {where}"
            hit = self.db.execute(sql, (lead_id, *args)).fetchone() is not None
            pos = bisect_left(ids, lead_id)
            present = pos < len(ids) and ids[pos] == lead_id
            if present and not hit:
                del ids[pos]
            elif hit and not present:
                ids.insert(pos, lead_id)
        if self._counts is None:
            return
        identity = (after.campaign_id, after.qa, after.visible, after.created)
        if before is not None and before.visible:
            if (before.campaign_id, before.qa, before.visible, before.created) == identity:
                return
            # Taking a lead away cannot be done from the counts alone (lastConversion): recount that campaign.
            self._dirty_counts.add(before.campaign_id)
        if after.visible and after.campaign_id not in self._dirty_counts:
            old = self._counts.get(after.campaign_id, LeadCounts({}, None))
            by_qa = {**old.by_qa, after.qa: old.get(after.qa) + 1}
            last = after.created if old.last_created is None else max(old.last_created, after.created)
            self._counts[after.campaign_id] = LeadCounts(by_qa, last)
