"""Reading a filtered lead collection page by page so that no row is skipped and no single record
stops the walk.

Offset paging (API Platform's `page` × `itemsPerPage`, ordered by id) shifts under a walk: when
a row on an already-read page leaves the result set (deleted, hidden, moved to another campaign)
every later row moves back one place and the first row of the next page would never be read.
So after each page boundary the walk checks that the last row it read still sits at its place
(a one-row read); when it does not, it steps back until a page overlaps what it has read. Rows
read twice are known by then and cost nothing.

A page that keeps failing with a server fault (500) or an unreadable body usually holds one
record the server cannot serialise. The page is narrowed (smaller pages whose offsets still line
up) until that record is alone; its id is found by reading single items between its readable
neighbours, and the walk goes on without it. The caller records it and retries it slowly.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from watcher.convertr import ConvertrClient, Page, is_last
from watcher.errors import MalformedResponse, ServerFault

log = structlog.get_logger("watcher.pager")

Params = Mapping[str, str | Sequence[str]]

NARROW_ATTEMPTS = 2  # a larger sub-page only needs to fail to be split further
ID_PROBES = 50  # single-item reads spent finding an unreadable record's id between its neighbours
MAX_STEP_BACKS = 20  # per walk: a result set that keeps shifting fails the walk (retried next poll)
UNREADABLE = (ServerFault, MalformedResponse)


@dataclass
class Read:
    """One page as the walk should decide on it."""

    page: Page
    unreadable: list[tuple[int | None, str]] = field(default_factory=list)  # (lead id if found, error)


def smallest_factor(n: int) -> int:
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return p
    return n


def _id(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Pager:
    """One walk over `collection` with `params` (which must order by id, ascending)."""

    def __init__(self, client: ConvertrClient, collection: str, params: Params, size: int) -> None:
        self.client = client
        self.collection = collection
        self.params = params
        self.size = size
        self.step_backs = 0

    async def pages(self, start_page: int = 1) -> AsyncGenerator[Read, None]:
        number = max(1, start_page)
        current = await self._read(number, after_id=None)
        # The check of the boundary before `current` runs while the caller handles `current` and
        # the next page is read ahead, so it costs a request, not a round trip.
        check: asyncio.Task[bool] | None = None
        boundary: int | None = None
        while True:
            last = is_last(current.page, current.page.has_view, self.size) and not current.unreadable
            ahead = None if last else asyncio.create_task(self._read(number + 1, after_id=_last_id(current.page)))
            try:
                if ahead is not None:
                    ahead.add_done_callback(_consume)
                yield current
                if check is not None and boundary is not None and not await check:
                    if ahead is not None:
                        ahead.cancel()
                    number, current = await self._step_back(number - 1, boundary)
                    check = boundary = None
                    continue
                if ahead is None:
                    return
                following = await ahead
            finally:
                for task in (ahead, check):
                    if task is not None and not task.done():
                        task.cancel()
            full = len(current.page.members) == self.size
            boundary = _last_id(current.page) if full else None
            check = asyncio.create_task(self._still_at(number, boundary)) if boundary is not None else None
            if check is not None:
                check.add_done_callback(_consume)
            number += 1
            current = following

    async def _still_at(self, number: int, last_id: int) -> bool:
        """Whether the row at the last place of page `number` is still `last_id` (read after the next page)."""
        probe = await self.client.page(self.collection, self.params, number=number * self.size, items_per_page=1)
        return bool(probe.members) and _id(probe.members[0]) == last_id

    async def _step_back(self, number: int, last_id: int) -> tuple[int, Read]:
        """Rows moved under the walk after page `number` (whose last row was `last_id`) was read:
        re-read from the latest page that overlaps what was read (its first id at or below
        `last_id`), so nothing between is skipped. Returns that page's number and the page."""
        self.step_backs += 1
        if self.step_backs > MAX_STEP_BACKS:
            raise ServerFault(f"Convertr GET /api/v4/{self.collection}: the result set kept shifting during the walk")
        log.info("walk.rows_moved", collection=self.collection, page=number + 1, last_id=last_id)
        back = number + 1
        while True:
            back -= 1
            read = await self._read(back, after_id=None)
            first = _id(read.page.members[0]) if read.page.members else None
            if back <= 1 or first is None or first <= last_id:
                return back, read

    # --- one page, narrowed around what cannot be read ------------------------------------------

    async def _read(self, number: int, after_id: int | None) -> Read:
        try:
            return Read(await self.client.page(self.collection, self.params, number=number, items_per_page=self.size))
        except UNREADABLE as exc:
            if self.size == 1:
                holes: list[tuple[int, str]] = [(number - 1, str(exc))]
                members: list[dict[str, Any]] = []
                sample: Page | None = None
            else:
                log.warning("walk.page_unreadable", collection=self.collection, page=number, error=str(exc))
                members, holes, sample = await self._narrow((number - 1) * self.size, self.size)
        unreadable = await self._identify(members, holes, after_id, (number - 1) * self.size)
        total = sample.total if sample is not None else None
        page = Page(
            number=number,
            members=members,
            total=total,
            last_page=None if total is None else max(1, math.ceil(total / self.size)),
            server_date=sample.server_date if sample is not None else None,
            search_variables=sample.search_variables if sample is not None else frozenset(),
            # Rows are missing from this page, so its being short says nothing about the end:
            # only the total (or an empty page after it) does.
            has_view=True,
        )
        return Read(page, unreadable)

    async def _narrow(self, offset: int, size: int) -> tuple[list[dict[str, Any]], list[tuple[int, str]], Page | None]:
        """The readable rows of [offset, offset + size) in order, the offsets that failed alone, and
        one page that was read (for the collection's total)."""
        sub = size // smallest_factor(size)
        members: list[dict[str, Any]] = []
        holes: list[tuple[int, str]] = []
        sample: Page | None = None
        for start in range(offset, offset + size, sub):
            attempts = NARROW_ATTEMPTS if sub > 1 else 5
            try:
                page = await self.client.page(
                    self.collection, self.params, number=start // sub + 1, items_per_page=sub, attempts=attempts
                )
            except UNREADABLE as exc:
                if sub == 1:
                    holes.append((start, str(exc)))
                    continue
                more, more_holes, more_sample = await self._narrow(start, sub)
                members += more
                holes += more_holes
                sample = sample or more_sample
                continue
            sample = sample or page
            members += page.members
            if len(page.members) < sub:
                break  # the end of the result set
        return members, holes, sample

    async def _identify(
        self, members: list[dict[str, Any]], holes: list[tuple[int, str]], after_id: int | None, page_offset: int
    ) -> list[tuple[int | None, str]]:
        """The ids of records that failed alone: read single items between their readable neighbours."""
        found: list[tuple[int | None, str]] = []
        ids = [_id(m) for m in members]
        unidentified = 0
        for offset, error in sorted(holes):
            at = offset - page_offset - unidentified  # readable (or identified) rows before the hole
            low = next((i for i in reversed(ids[:at]) if i is not None), after_id)
            high = next((i for i in ids[at:] if i is not None), None)
            lead_id = await self._probe(low, high)
            if lead_id is None:
                log.warning(
                    "walk.unreadable_unidentified",
                    collection=self.collection,
                    after_id=low,
                    before_id=high,
                    error=error,
                )
            found.append((lead_id, error))
            if lead_id is None:
                unidentified += 1
            else:
                ids.insert(at, lead_id)
        return found

    async def _probe(self, low: int | None, high: int | None) -> int | None:
        if low is None:
            return None
        stop = low + 1 + ID_PROBES if high is None else min(high, low + 1 + ID_PROBES)
        for candidate in range(low + 1, stop):
            try:
                await self.client.item(self.collection, candidate, attempts=1)
            except UNREADABLE:
                return candidate
        return None


def _last_id(page: Page) -> int | None:
    return _id(page.members[-1]) if page.members else None


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
