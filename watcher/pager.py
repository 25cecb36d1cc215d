"""Reading a filtered lead collection page by page so that no row is skipped and no single record
stops the walk.

Offset paging (API Platform's `page` × `itemsPerPage`, ordered by id) shifts under a walk: when
a row on an already-read page leaves the result set (deleted, hidden, moved to another campaign)
every later row moves back one place and the first row of the next page would never be read.
So after each page boundary the walk checks that the last row it read still sits at its place
(a one-row read); when a row behind it moved back, it steps back until a page overlaps what it
has read. Rows read twice are known by then and cost nothing. A row that moved *forward* (one
that joined the result set before it) skips nothing: it was written during the walk, and the
next walk, which starts before this one did, reads it.

A page that keeps failing with a server fault (500) or an unreadable body usually holds one
record the server cannot serialise. The page is narrowed (smaller pages whose offsets still line
up) until that record is alone; its id is found with the walk's own filter plus `id[]` lists,
bisected, between its readable neighbours, and the walk goes on without it. The caller records
it and retries it slowly. When nothing at all can be read, that is an outage, not a record: the
error is raised as it came.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from watcher.convertr import ConvertrClient, Page, is_last, let_requests_start
from watcher.errors import MalformedResponse, ServerFault

log = structlog.get_logger("watcher.pager")

Params = Mapping[str, str | Sequence[str]]

NARROW_ATTEMPTS = 2  # a larger sub-page only needs to fail to be split further
ID_SPAN = 5000  # ids searched for an unreadable record between (or beside) its readable neighbours
ID_BATCH = 100  # ids asked for in one `id[]` probe
MAX_STEP_BACKS = 20  # per walk: a result set that keeps losing rows fails the walk (retried next poll)
UNREADABLE = (ServerFault, MalformedResponse)


@dataclass
class Read:
    """One page as the walk should decide on it."""

    page: Page
    unreadable: list[tuple[int | None, str]] = field(default_factory=list)  # (lead id if found, error)
    last_position: int | None = None  # offset of the last readable row in the result set
    last_id: int | None = None  # the highest id on the page, unreadable ones included


def smallest_factor(n: int) -> int:
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return p
    return n


def _id(doc: Mapping[str, Any]) -> int | None:
    value = doc.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Pager:
    """One walk over `collection` with `params` (which must order by id, ascending).

    `id_filter`: the server offers `id[]`, so an unreadable record's id is searched within the
    walk's own filter (otherwise single items are read, and the caller re-checks its filter).
    `isolate` False: an unreadable page fails the walk as it came, for a caller that cannot skip a
    record (a campaign left out of the first read would be announced as new by the next).
    """

    def __init__(
        self,
        client: ConvertrClient,
        collection: str,
        params: Params,
        size: int,
        *,
        id_filter: bool = True,
        isolate: bool = True,
    ) -> None:
        self.client = client
        self.collection = collection
        self.params = params
        self.size = size
        self.id_filter = id_filter
        self.isolate = isolate
        self.step_backs = 0
        self.identified: set[int] = set()  # unreadable ids found in this walk: never searched for again

    async def pages(self, start_page: int = 1, overlap_id: int | None = None) -> AsyncGenerator[Read, None]:
        """The pages from `start_page`; with `overlap_id` (a resumed walk's last id) it first steps
        back until a page overlaps it, since rows may have left the set while it was stopped."""
        number = max(1, start_page)
        if overlap_id is not None and number > 1:
            number, current = await self._step_back(number, overlap_id, count=False)
        else:
            current = await self._read(number, after_id=None)
            self._learn_size(current)
        # The check of the boundary before `current` runs while the caller handles `current` and
        # the next page is read ahead, so it costs a request, not a round trip.
        check: asyncio.Task[bool] | None = None
        boundary: int | None = None
        position: int | None = None
        while True:
            last = is_last(current.page, current.page.has_view, self.size) and not current.unreadable
            # The next page first: it takes the connection kept from the last read and is on the
            # wire at once, where the check may have to open a connection of its own.
            ahead = None if last else asyncio.create_task(self._read(number + 1, after_id=current.last_id))
            if boundary is not None and position is not None:
                check = asyncio.create_task(self._still_at(position, boundary))
                check.add_done_callback(_consume)
            try:
                if ahead is not None:
                    ahead.add_done_callback(_consume)
                    await let_requests_start()
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
            boundary = _last_readable_id(current.page)
            position = current.last_position
            check = None
            number += 1
            current = following

    def _learn_size(self, read: Read) -> None:
        """A server may serve fewer rows than asked (its own maximum): offsets follow what it serves."""
        served, total = len(read.page.members), read.page.total
        if not read.unreadable and 0 < served < self.size and total is not None and total > served:
            log.warning("walk.page_size_capped", collection=self.collection, asked=self.size, served=served)
            self.size = served
            read.last_position = served - 1

    async def _still_at(self, position: int, last_id: int) -> bool:
        """False when rows behind `last_id` moved back since its page was read (read after the next page)."""
        try:
            probe = await self.client.page(self.collection, self.params, number=position + 1, items_per_page=1)
        except UNREADABLE:
            return False  # an unreadable record sits there now: look again from an earlier page
        if not probe.members:
            return False
        found = _id(probe.members[0])
        # A lower id there means rows joined before it: nothing was skipped.
        return found is not None and found <= last_id

    async def _step_back(self, number: int, last_id: int, *, count: bool = True) -> tuple[int, Read]:
        """Rows moved under the walk after page `number` (whose last row was `last_id`) was read:
        re-read from the latest page that overlaps what was read (its first id at or below
        `last_id`), so nothing between is skipped. Returns that page's number and the page."""
        if count:
            self.step_backs += 1
            if self.step_backs > MAX_STEP_BACKS:
                raise ServerFault(f"Convertr GET /api/v4/{self.collection}: rows kept leaving the set during the walk")
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
        offset = (number - 1) * self.size
        try:
            page = await self.client.page(self.collection, self.params, number=number, items_per_page=self.size)
        except UNREADABLE as exc:
            if not self.isolate:
                raise
            if self.size == 1:
                rows: list[tuple[int, dict[str, Any]]] = []
                holes: list[tuple[int, str]] = [(offset, str(exc))]
                sample: Page | None = None
            else:
                log.warning("walk.page_unreadable", collection=self.collection, page=number, error=str(exc))
                rows, holes, sample = await self._narrow(offset, self.size)
                if sample is None:
                    raise  # nothing on the page could be read: an outage, not one record
        else:
            read = Read(page, last_id=_max_id(page.members))
            if len(page.members) == self.size:
                read.last_position = offset + self.size - 1
            return read
        unreadable = await self._identify(rows, holes, after_id, offset)
        total = sample.total if sample is not None else None
        members = [m for _, m in rows]
        narrowed = Page(
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
        found = [i for i, _ in unreadable if i is not None]
        return Read(
            narrowed,
            unreadable,
            last_position=rows[-1][0] if rows else None,
            last_id=max([*found, *(i for i in (_id(m) for m in members) if i is not None)], default=after_id),
        )

    async def _narrow(
        self, offset: int, size: int
    ) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]], Page | None]:
        """The readable rows of [offset, offset + size) with their offsets, the offsets that failed
        alone, and one page that was read (for the collection's total)."""
        sub = size // smallest_factor(size)
        rows: list[tuple[int, dict[str, Any]]] = []
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
                rows += more
                holes += more_holes
                sample = sample or more_sample
                continue
            sample = sample or page
            rows += [(start + i, m) for i, m in enumerate(page.members)]
            if len(page.members) < sub:
                break  # the end of the result set
        return rows, holes, sample

    async def _identify(
        self,
        rows: list[tuple[int, dict[str, Any]]],
        holes: list[tuple[int, str]],
        after_id: int | None,
        page_offset: int,
    ) -> list[tuple[int | None, str]]:
        """The ids of records that failed alone, searched between their readable neighbours."""
        found: list[tuple[int | None, str]] = []
        known = [(offset, _id(m)) for offset, m in rows]
        for offset, error in sorted(holes):
            low = max((i for o, i in known if o < offset and i is not None), default=after_id)
            high = min((i for o, i in known if o > offset and i is not None), default=None)
            lead_id = await self._search(low, high)
            if lead_id is None:
                log.warning(
                    "walk.unreadable_unidentified",
                    collection=self.collection,
                    position=offset,
                    after_id=low,
                    before_id=high,
                    error=error,
                )
            else:
                self.identified.add(lead_id)
                known.append((offset, lead_id))
            found.append((lead_id, error))
        return found

    async def _search(self, low: int | None, high: int | None) -> int | None:
        """An unreadable id in (low, high), or beside the one that is known, not yet identified."""
        if low is None and high is None:
            return None
        if low is None:
            assert high is not None
            candidates = range(max(0, high - ID_SPAN), high)
        elif high is None:
            candidates = range(low + 1, low + 1 + ID_SPAN)
        else:
            candidates = range(low + 1, min(high, low + 1 + ID_SPAN))
        ids = [i for i in candidates if i not in self.identified]
        if low is None:
            ids.reverse()  # ids run with time: the record is most likely just below its neighbour
        if not self.id_filter:
            return await self._search_items(ids)
        for start in range(0, len(ids), ID_BATCH):
            hit = await self._bisect(ids[start : start + ID_BATCH])
            if hit is not None:
                return hit
        return None

    async def _bisect(self, ids: list[int]) -> int | None:
        """The one id of `ids` whose read within the walk's filter fails, halving the list."""
        if not ids or not await self._fails(ids):
            return None
        while len(ids) > 1:
            half = ids[: len(ids) // 2]
            ids = half if await self._fails(half) else ids[len(ids) // 2 :]
        return ids[0]

    async def _fails(self, ids: list[int]) -> bool:
        params = {**self.params, "id[]": [str(i) for i in ids]}
        try:
            await self.client.page(self.collection, params, number=1, items_per_page=len(ids), attempts=NARROW_ATTEMPTS)
        except UNREADABLE:
            return True
        return False

    async def _search_items(self, ids: list[int]) -> int | None:
        for candidate in ids[:ID_BATCH]:
            try:
                await self.client.item(self.collection, candidate, attempts=1)
            except UNREADABLE:
                return candidate
        return None


def _max_id(members: Sequence[Mapping[str, Any]]) -> int | None:
    return max((i for i in (_id(m) for m in members) if i is not None), default=None)


def _last_readable_id(page: Page) -> int | None:
    return _id(page.members[-1]) if page.members else None


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
