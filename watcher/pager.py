"""Reading a filtered lead collection page by page so that no row is skipped and no single record
stops the walk.

Offset paging (API Platform's `page` × `itemsPerPage`, ordered by id) shifts under a walk: when
a row on an already-read page leaves the result set (deleted, hidden, moved to another campaign)
every later row moves back one place and the first row of the next page would never be read.
Every answer carries the set's size (`hydra:totalItems`), and a row can only leave by changing
it: so when the page after a boundary reports the same size as the page before it, nothing moved
and the boundary costs nothing. When the size changed, the walk checks that the last row it read
still sits at its place (a one-row read); when a row behind it moved back, it steps back until a
page overlaps what it has read. Rows read twice are known by then and cost nothing. A row that
moved *forward* (one that joined the result set before it) skips nothing: it was written during
the walk, and the next walk reads it.

A server may serve fewer rows than asked (API Platform's `maximum_items_per_page`): any answer
shorter than asked while the size says more rows follow teaches the walk the served size, and
the walk goes on at that size from a page that overlaps what it has read.

A page that keeps failing with a server fault (500), an unreadable body or an answer larger than
`max_response_bytes` usually holds one record the server cannot serialise (or one too large to
read). The page is narrowed (smaller pages whose offsets still line up) until that record is
alone; its id is found with the walk's own filter plus `id[]` lists, bisected, between its
readable neighbours, and the walk goes on without it. The caller records it and retries it
slowly. When nothing on a page can be read, the rows just after (or before) it tell a run of
unreadable records from an outage: if they cannot be read either, the error is raised as it came.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from watcher.convertr import RETRY_ATTEMPTS, ConvertrClient, Page, is_last, let_requests_start
from watcher.errors import MalformedResponse, ResponseTooLarge, ServerFault

log = structlog.get_logger("watcher.pager")

Params = Mapping[str, str | Sequence[str]]

NARROW_ATTEMPTS = 2  # a larger sub-page only needs to fail to be split further
ID_SPAN = 5000  # ids searched for an unreadable record between (or beside) its readable neighbours
ID_BATCH = 100  # ids asked for in one `id[]` probe
MAX_STEP_BACKS = 20  # per walk: a result set that keeps losing rows fails the walk (retried next poll)
MAX_RESIZES = 4  # per walk: a server whose page size keeps changing fails the walk
UNREADABLE = (ServerFault, MalformedResponse, ResponseTooLarge)


def cause_of(exc: BaseException) -> str:
    """Why a page or a record could not be read, as a metric label."""
    if isinstance(exc, ResponseTooLarge):
        return "too_large"
    if isinstance(exc, MalformedResponse):
        return "malformed"
    return "server_fault"


class _Resized(Exception):
    """The server served fewer rows than asked: the walk goes on at the size it learnt, from the
    page (in that size) that holds `offset`."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _Moved(_Resized):
    """Rows left or joined the set while a page was narrowed, so its sub-pages may not line up:
    the walk reads again from that page."""


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
    `size` is what the walk asks for; `self.size` becomes what the server serves.
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
        on_narrow: Callable[[str], None] | None = None,
        unfindable: set[tuple[int | None, int | None]] | None = None,
    ) -> None:
        self.client = client
        self.collection = collection
        self.params = params
        self.asked = size
        self.size = size
        self.id_filter = id_filter
        self.isolate = isolate
        self.on_narrow = on_narrow
        self.step_backs = 0
        self.checks = 0  # one-row position checks made: only where the set's size moved
        self.identified: set[int] = set()  # unreadable ids found in this walk: never searched for again
        # Neighbours (low, high) between which a search found nothing, kept by the caller across walks:
        # a walk held before such a record meets it again every poll, and the search costs ~500 requests.
        self.unfindable = unfindable if unfindable is not None else set()
        self._last_id: int | None = None  # the last id handed to the caller
        self._trust_served = False
        self._totals: list[int] = []  # the set's sizes seen while narrowing one page, in order

    async def pages(self, start_page: int = 1, overlap_id: int | None = None) -> AsyncGenerator[Read, None]:
        """The pages from `start_page`; with `overlap_id` (a resumed walk's last id) it first steps
        back until a page overlaps it, since rows may have left the set while it was stopped."""
        number, overlap = max(1, start_page), overlap_id
        resizes = 0
        while True:
            try:
                async for read in self._pages(number, overlap):
                    if read.last_id is not None:
                        self._last_id = read.last_id
                    yield read
                return
            except _Resized as resized:
                # Each learnt size is smaller than the last, so this ends; a server whose answers
                # keep contradicting each other fails the walk (retried at the next poll).
                if isinstance(resized, _Moved):
                    self.step_backs += 1
                    if self.step_backs > MAX_STEP_BACKS:
                        raise ServerFault(
                            f"Convertr GET /api/v4/{self.collection}: rows kept leaving the set during the walk"
                        ) from None
                else:
                    resizes += 1
                if resizes > MAX_RESIZES:
                    raise ServerFault(
                        f"Convertr GET /api/v4/{self.collection}: page sizes kept changing during the walk"
                    ) from None
                number = resized.offset // self.size + 1
                overlap = self._last_id if self._last_id is not None else overlap

    async def _pages(self, start_page: int, overlap_id: int | None) -> AsyncGenerator[Read, None]:
        number = start_page
        if overlap_id is not None and number > 1:
            number, current = await self._step_back(number, overlap_id, count=False)
        else:
            current = await self._read(number, after_id=None)
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
                self.checks += 1
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
            check = None
            # A row leaving the set changes its size: the same size on both sides of the boundary
            # means nothing before it moved (a row joining at the same time is the stated limit).
            before, after = current.page.total, following.page.total
            if before is not None and after is not None and before == after:
                boundary = position = None
            else:
                boundary, position = _last_readable_id(current.page), current.last_position
            number += 1
            current = following

    def _check_size(self, page: Page, number: int, size: int) -> None:
        """Raise _Resized when the answer shows the server serving fewer rows than `size`: a short
        page the set's size says is not its end, or a last page that does not fit `size`."""
        served, total = len(page.members), page.total
        if total is None or served >= size or size <= 1 or self._trust_served:
            return
        offset = (number - 1) * size
        expected = max(0, min(size, total - offset))
        last = page.last_page
        if served >= expected and (last is None or last == max(1, math.ceil(total / size))):
            return  # the end of the set (a row more: one that arrived between the count and the rows)
        # A capped server serves its own size from its own offset ((page - 1) × its size), and its
        # last page follows that size: a short page that is not the end shows the cap, and the
        # last page confirms it; a page past its end shows it through the last page alone.
        if served:
            learnt = served
            if last is not None and last != max(1, math.ceil(total / served)):
                return  # not a cap: rows came or went between the count and the rows of one answer
        elif last:
            learnt = max(1, math.ceil(total / last))
        else:
            learnt = size // 2
        if learnt >= self.size:
            self._trust_served = True  # the answers disagree with themselves: trust what is served
            return
        log.warning("walk.page_size_capped", collection=self.collection, asked=size, served=served, learnt=learnt)
        self.size = learnt
        raise _Resized(offset)

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
            if not read.page.members and back > 1:
                # Past the set's end now: rows left it (or the page size grew since a stopped walk
                # was resumed), and rows not read yet may sit on the pages before this one.
                continue
            first = _id(read.page.members[0]) if read.page.members else None
            if back <= 1 or first is None or first <= last_id:
                return back, read

    # --- one page, narrowed around what cannot be read ------------------------------------------

    async def _get(self, params: Params, number: int, size: int, attempts: int = RETRY_ATTEMPTS) -> Page:
        page = await self.client.page(self.collection, params, number=number, items_per_page=size, attempts=attempts)
        self._check_size(page, number, size)
        return page

    async def _read(self, number: int, after_id: int | None) -> Read:
        size = self.size
        offset = (number - 1) * size
        try:
            page = await self._get(self.params, number, size)
        except UNREADABLE as exc:
            if not self.isolate:
                raise
            if self.on_narrow is not None:
                self.on_narrow(cause_of(exc))
            if size == 1:
                rows: list[tuple[int, dict[str, Any]]] = []
                holes: list[tuple[int, str]] = [(offset, str(exc))]
                sample: Page | None = None
            else:
                log.warning("walk.page_unreadable", collection=self.collection, page=number, error=str(exc))
                self._totals = []
                rows, holes, sample = await self._narrow(offset, size)
                # A smaller size after a larger one: a row left and later sub-pages moved back. (A
                # larger one is rows arriving, at the end or before: moved forward, nothing skipped.)
                if any(later < earlier for earlier, later in zip(self._totals, self._totals[1:], strict=False)):
                    log.info("walk.rows_moved", collection=self.collection, page=number, while_narrowing=True)
                    raise _Moved(offset) from None
            beside: tuple[int, dict[str, Any]] | None = None
            if sample is None:
                # Nothing on the page could be read: a run of unreadable records if the rows
                # beside it read, an outage if they do not.
                beside, sample = await self._beside(offset, size)
                if sample is None:
                    raise exc from None
        else:
            read = Read(page, last_id=_max_id(page.members))
            if len(page.members) == size:
                read.last_position = offset + size - 1
            return read
        unreadable = await self._identify(rows, holes, after_id, offset, beside)
        total = sample.total
        members = [m for _, m in rows]
        narrowed = Page(
            number=number,
            members=members,
            total=total,
            last_page=None if total is None else max(1, math.ceil(total / size)),
            server_date=sample.server_date,
            search_variables=sample.search_variables,
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

    async def _beside(self, offset: int, size: int) -> tuple[tuple[int, dict[str, Any]] | None, Page | None]:
        """A readable row just after the page, or just before it: (its offset and document, the answer);
        or, with no row, the set's count when the server can still give it."""
        for position in (offset + size, offset - 1):
            if position < 0:
                continue
            try:
                page = await self.client.page(self.collection, self.params, number=position + 1, items_per_page=1)
            except UNREADABLE:
                continue
            if page.members:
                return (position, page.members[0]), page
        # Nothing beside it reads either (the set's newest rows, a run longer than a page): when the
        # server still counts the set, these rows are records it cannot serialise, not an outage.
        # Each is then isolated and retried, or the cursor held before it: none is passed by.
        try:
            count = await self.client.page(self.collection, self.params, items_per_page=0)
        except UNREADABLE:
            return None, None
        return (None, count) if count.total else (None, None)

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
                page = await self._get(self.params, start // sub + 1, sub, attempts)
            except _Resized:
                raise _Resized(offset) from None
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
            if page.total is not None:
                self._totals.append(page.total)
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
        beside: tuple[int, dict[str, Any]] | None = None,
    ) -> list[tuple[int | None, str]]:
        """The ids of records that failed alone, searched between their readable neighbours."""
        found: list[tuple[int | None, str]] = []
        known = [(offset, _id(m)) for offset, m in [*rows, *([beside] if beside else [])]]
        for offset, error in sorted(holes):
            low = max((i for o, i in known if o < offset and i is not None), default=after_id)
            high = min((i for o, i in known if o > offset and i is not None), default=None)
            lead_id = None if (low, high) in self.unfindable else await self._search(low, high)
            if lead_id is None:
                self.unfindable.add((low, high))
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
        # A capped server serves no more than its own page size of an `id[]` list either.
        batch = max(1, min(ID_BATCH, self.size))
        for start in range(0, len(ids), batch):
            hit = await self._bisect(ids[start : start + batch])
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
