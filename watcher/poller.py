"""The walks: read the API page by page, decide with `detect`, commit each page with `store`.

Four lead walks share one loop: `leads.created` (createdTs cursor), `leads.updated` (updatedTs
cursor), `leads.baseline` (a snapshot of recent leads when tracking starts or changes, so their
first change is reported) and `leads.recheck` (a trailing re-read when the server offers no
updatedTs filter, or with `quiet_edits` for edits that leave updatedTs unmoved). `campaigns` is
a full read each time, because a status can change with no write at all.

A walk records where it started (`walk_from`) in its first page's transaction and forgets it in
its last: if the daemon dies half-way, the next walk starts from the same bound, so a lead on an
unread page can never fall behind an advanced cursor.

Every time decision about the data is taken on the server's clock and zone (`ServerClock`),
learnt from its answers and checked against its own filters once per process (`calibrate`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from watcher import detect
from watcher.calibration import Calibration, calibrate
from watcher.clock import Clock, rfc3339
from watcher.config import Config
from watcher.convertr import ConvertrClient, Page
from watcher.errors import WatcherError
from watcher.events import Event, campaign_id_of
from watcher.pager import UNREADABLE, Pager, Read
from watcher.records import NOTHING_UNANNOUNCED, CampaignState, PageCommit, Place, Unannounced
from watcher.routing import router
from watcher.servertime import ServerClock, write_at
from watcher.state.store import Store

if TYPE_CHECKING:
    from watcher.metrics import PollMetrics

log = structlog.get_logger("watcher.poller")

CREATED, UPDATED, RECHECK, CAMPAIGNS = "leads.created", "leads.updated", "leads.recheck", "campaigns"
# Where a walk's last re-read of the whole lookback started (its cursor then) and when it ran.
SWEEPS = {CREATED: "leads.created.sweep", UPDATED: "leads.updated.sweep"}
# How far behind its cursor a poll that does not re-read the lookback starts: rows of the
# cursor's own second that the last walk may not have seen yet.
TIE_OVERLAP = 1.0
# How often a poll that does not re-read the lookback counts it instead (one request, no rows).
COUNT_EVERY = 10.0
# Ids remembered per stream since its last re-read of the lookback, at most (a day at 1 lead/s).
MAX_SEEN = 100_000
# Unreadable leads of unknown time a count asks about in one `id[]` list, at most.
UNKNOWN_COUNTED = 100
BASELINE = "leads.baseline"
# Between a baseline's track signature and the campaigns it covered, in its cursor.
BASELINE_SCOPE = " campaigns "
CHANGE_STREAMS = (UPDATED, BASELINE, RECHECK)  # walks that compare leads with snapshots
UPDATED_FILTER = "updatedTs[strictly_after]"
CREATED_FILTER = "createdTs[strictly_after]"
LEAD_TIMES = ("createdTs", "updatedTs")
CAMPAIGN_TIMES = ("updatedTs", "startTs", "endTs", "pauseTs", "signTs")
# How long an unreadable lead waits before its next read: slow, it may stay broken for days.
UNREADABLE_RETRY = (300.0, 1800.0, 7200.0, 21600.0)
UTC_OFFSET = timedelta()  # cursors we make up ourselves are written in UTC


@dataclass
class PollResult:
    """What one walk did: the canonical summary line of a poll."""

    stream: str
    fetched: int = 0
    new: int = 0
    changed: int = 0
    events: int = 0
    pages: int = 0
    cursor_before: str | None = None
    cursor_after: str | None = None
    duration: float = 0.0
    skipped: bool = False


@dataclass
class _Window:
    """What the walks of one stream read since its lookback was last re-read or counted, in this
    process: the bound of that read, and every id read on or after it with its time, so that one
    count (`hydra:totalItems`, no rows) tells whether a row appeared behind the cursor."""

    bound: str
    since: float  # the instant `bound` was written for
    seen: dict[int, float]  # lead id -> the walk's field (createdTs, updatedTs) as read
    counted_at: float  # monotonic time of the last re-read or count
    read_to: float  # the latest field value read
    stale: bool = False  # a count found a row no walk read: the next poll re-reads the lookback
    # Unreadable leads identified in the window: the server counts them, but their time is unknown
    # (a guess would move `read_to`, or hide a late row from the count); the count asks for them.
    unknown: set[int] = field(default_factory=set)


@dataclass
class _Plan:
    """Where a lead walk starts and what it may announce."""

    stream: str
    filter: str
    bound: str
    cursor: str | None
    cursor_field: str | None  # None: the walk keeps no cursor
    emit_after: float = float("-inf")
    baseline_until: float | None = None
    floor: float | None = None  # written on the first page when set
    start_page: int = 1
    resume_after: int | None = None  # a resumed walk's last id: it steps back until a page overlaps it
    label: str | None = None  # a walk that keeps no cursor: what it is taken under, written as its cursor
    sweep_mark: str | None = None  # a lookback re-read: the cursor it started from, recorded when it ends
    sweep_since: float = float("-inf")  # ... and the instant its bound was written for
    count_upto: float | None = None  # after the walk, count the lookback up to this instant


class Poller:
    def __init__(
        self,
        config: Config,
        client: ConvertrClient,
        store: Store,
        clock: Clock,
        *,
        on_events: Callable[[], None] = lambda: None,
        metrics: PollMetrics | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.store = store
        self.clock = clock
        self.server = ServerClock(clock, config.convertr.timezone)
        self.route = router(config.sinks)
        self.on_events = on_events
        self.metrics = metrics
        self.should_stop = should_stop
        self.progress = progress
        self.updates_filter: bool | None = None  # learnt from hydra:search on the first leads poll
        self.calibration: Calibration | None = None
        self._lead_search: frozenset[str] | None = None
        self._warned_disagreement = False
        self._warned_no_date = False
        self._served_size: int | None = None  # the page size the server was seen to serve
        self._windows: dict[str, _Window] = {}  # stream -> what its walks read since its last sweep
        # stream -> neighbours between which an unreadable lead's id was searched for in vain
        self._unfindable: dict[str, set[tuple[int | None, int | None]]] = {}

    def reconfigure(self, config: Config, client: ConvertrClient) -> None:
        """Take a reloaded configuration between polls (never during one): new routes at once.

        What the poller learnt about the server (its clock, zone calibration, filter support) is
        kept unless `[convertr]` changed, because then it may be another server or account.
        """
        if config.convertr != self.config.convertr:
            self.server = ServerClock(self.clock, config.convertr.timezone)
            self.calibration = None
            self.updates_filter = None
            self._lead_search = None
            self._warned_disagreement = False
            self._served_size = None
        if config.leads != self.config.leads:
            self._windows.clear()  # another lookback or campaign filter: re-read before trusting a count
            self._unfindable.clear()
        self.config = config
        self.client = client
        self.route = router(config.sinks)

    # --- public entry points ------------------------------------------------------------------

    async def poll_leads(self) -> list[PollResult]:
        leads = self.config.leads
        results = [await self._timed(CREATED, self._walk_created)]
        if leads.updates:
            if self.updates_filter is None:
                self._learn_filters()
            if self._baseline_due():
                results.append(await self._timed(BASELINE, self._walk_baseline))
            if self.updates_filter:
                results.append(await self._timed(UPDATED, self._walk_updated))
            if (not self.updates_filter or leads.quiet_edits) and self._recheck_due():
                results.append(await self._timed(RECHECK, self._walk_recheck))
        elif self.store.cursor(BASELINE) is not None:
            # Snapshots stop being kept: switching updates on again must take a new baseline.
            self.store.reset_stream(BASELINE)
        return results

    async def poll_campaigns(self) -> list[PollResult]:
        return [await self._timed(CAMPAIGNS, self._walk_campaigns)]

    # --- plumbing -----------------------------------------------------------------------------

    async def _timed(self, stream: str, walk: Callable[[PollResult], Any]) -> PollResult:
        result = PollResult(stream)
        started = self.clock.monotonic()
        ok = False
        try:
            await walk(result)
            ok = True
        except Exception as exc:
            self.store.poll_failed(stream, self.clock.now(), _describe(exc))
            raise
        finally:
            result.duration = round(self.clock.monotonic() - started, 3)
            if self.metrics is not None:
                self.metrics.poll_finished(stream, ok, result.duration, result.fetched, self.clock.now())
                cursor = self.store.cursor(stream)
                if ok and cursor is not None and cursor.cursor_ts is not None:
                    self.metrics.set_cursor(stream, cursor.cursor_ts, self.clock.now())
        log.info(
            "poll",
            stream=stream,
            fetched=result.fetched,
            new=result.new,
            changed=result.changed,
            events=result.events,
            pages=result.pages,
            cursor_before=result.cursor_before,
            cursor_after=result.cursor_after,
            duration=result.duration,
        )
        return result

    def _learn_filters(self) -> None:
        self.updates_filter = UPDATED_FILTER in (self._lead_search or frozenset())
        if not self.updates_filter:
            log.warning(
                "updatedTs filtering is not offered by this Convertr; re-reading the last "
                "recheck_window of leads every recheck_interval instead",
                recheck_window=self.config.leads.recheck_window,
                recheck_interval=self.config.leads.recheck_interval,
            )

    def _recheck_due(self) -> bool:
        state = self.store.cursor(RECHECK)
        if state is None or state.last_success_at is None:
            return True
        return self.clock.now() >= state.last_success_at + self.config.leads.recheck_interval

    def _baseline_due(self) -> bool:
        state = self.store.cursor(BASELINE)
        if state is None or state.walk_from is not None:
            return True
        return not self._baseline_covers(state.cursor)

    def _signature(self) -> str:
        return detect.track_signature(self.config.leads.track)

    def _baseline_mark(self) -> str:
        """What a baseline covers, kept as its cursor: the track signature and, when `campaign_ids`
        limits the walks, those campaigns (leads of a campaign added later have no snapshots)."""
        wanted = self.config.leads.campaign_ids
        scope = f"{BASELINE_SCOPE}{','.join(str(c) for c in sorted(wanted))}" if wanted else ""
        return self._signature() + scope

    def _baseline_covers(self, mark: str | None) -> bool:
        """Whether the baseline recorded as `mark` holds snapshots of every lead the walks now read
        under `track`: the same fields, and the same campaigns or more."""
        signature, _, scope = (mark or "").partition(BASELINE_SCOPE)
        # A baseline finished before snapshots kept every repeated leadData entry still counts.
        if signature not in (self._signature(), detect.legacy_signature(self.config.leads.track)):
            return False
        wanted = self.config.leads.campaign_ids
        return not scope or (bool(wanted) and {str(c) for c in wanted} <= set(scope.split(",")))

    async def _fresh_now(self) -> float:
        """A fresh reading of the server's clock, for a baseline, where the exact second matters."""
        # No lead is serialised (itemsPerPage=0): an unreadable one cannot stand in the way.
        page = await self.client.page("leads", {}, items_per_page=0)
        self._observe(page)
        if page.server_date is None:
            if not self._warned_no_date:
                self._warned_no_date = True
                log.warning(
                    "Convertr sends no Date header: the host's clock stands in for the server's, so keep it "
                    "synchronised (NTP) and lookback above any difference between the two"
                )
            return self.server.now()
        return page.server_date.timestamp()

    def _lead_params(self, key: str | None, bound: str | None, order: str = "asc") -> dict[str, str | Sequence[str]]:
        params: dict[str, str | Sequence[str]] = {key: bound} if key and bound else {}
        params["order[id]"] = order
        if self.config.leads.campaign_ids:
            params["campaign.id[]"] = [str(c) for c in self.config.leads.campaign_ids]
        return params

    def _observe(self, page: Page) -> None:
        self.server.observe_date(page.server_date)
        self.server.observe_documents(page.members, LEAD_TIMES)
        if self.server.disagreement and not self._warned_disagreement and self.calibration is not None:
            self._warned_disagreement = True
            log.warning(f"[convertr] timezone: {self.server.disagreement}")

    def _commit(self, page: PageCommit, result: PollResult) -> None:
        fresh: Sequence[Event] = self.store.commit_page(page)
        result.events += len(fresh)
        if fresh:
            if self.metrics is not None:
                for type_, count in Counter(e.type for e in fresh).items():
                    self.metrics.event_detected(type_, count)
            self.on_events()

    def _walk_state(
        self, stream: str, signpost: float, tracks: dict[str, tuple[str, ...]], **kwargs: Any
    ) -> detect.LeadWalk:
        now = self.clock.now()
        leads = self.config.leads
        return detect.LeadWalk(stream, now, rfc3339(now), signpost, leads.track, leads.updates, tracks=tracks, **kwargs)

    def _tracks(self) -> dict[str, tuple[str, ...]]:
        """Every track list a stored snapshot may have been taken under; called once per walk."""
        if self.config.leads.updates:
            self.store.remember_track(self._signature(), self.config.leads.track)
        return self.store.tracks()

    def _horizon(self) -> float:
        """Unknown leads created after this are left to the created walk, which is sure to read them
        (and announce them). One created before it is past that walk's reach: it existed at the
        baseline, or became visible late, and is recorded as it is."""
        created = self.store.cursor(CREATED)
        if created is None or created.cursor_ts is None:
            return float("-inf")  # no created walk has run yet: every lead is still its to read
        return created.cursor_ts - self.config.leads.lookback

    # --- lead walks ---------------------------------------------------------------------------

    async def _walk_created(self, result: PollResult) -> None:
        leads = self.config.leads
        # Here, so a failure is the created poll's recorded error; again on every poll until a lead
        # has shown how the server's filter compares (an empty tenant at start-up).
        if self.calibration is None or not self.calibration.verified:
            self.calibration = await calibrate(self.client, self.server, self.config.leads.campaign_ids)
            self._lead_search = self.calibration.search
            self._warned_disagreement = self.server.disagreement is not None  # calibrate said so
        state = self.store.cursor(CREATED)
        cursor = state.cursor if state else None
        floor = state.floor if state else None
        result.cursor_before = cursor
        new_floor: float | None = None
        if state is not None and state.walk_from:
            # A walk that was interrupted keeps its bound and, during a baseline, its threshold, so
            # leads that existed at the start of the baseline never become events when it resumes.
            plan = _Plan(CREATED, CREATED_FILTER, state.walk_from, cursor, "createdTs")
            plan.baseline_until = state.baseline_until
            plan.emit_after = max(state.baseline_until or float("-inf"), floor or float("-inf"))
        elif cursor is None:
            if leads.start is None:
                # Baseline: what exists now is recorded as seen, and only leads created after this
                # moment (by the server's clock) become events. The bound is the one any later walk
                # could reach from this cursor, so no later walk finds an unrecorded older lead.
                server_now = await self._fresh_now()
                # Timestamps have whole seconds: a lead created later in the baseline's own second
                # would read as part of the baseline. Starting the walk once that second is over
                # makes "created at or before the baseline" mean "there when the walk began".
                await self.clock.sleep(1.0)
                start = server_now - leads.safety_lag
                new_floor = start - leads.lookback
                plan = _Plan(
                    CREATED, CREATED_FILTER, self.server.bound(new_floor), write_at(start, UTC_OFFSET), "createdTs"
                )
                plan.emit_after = plan.baseline_until = server_now
            else:
                start = leads.start.timestamp() - 1
                new_floor = start
                plan = _Plan(
                    CREATED, CREATED_FILTER, self.server.bound(start), write_at(start, UTC_OFFSET), "createdTs"
                )
                plan.emit_after = start
            plan.floor = new_floor
        else:
            plan = await self._steady_plan(CREATED, CREATED_FILTER, cursor, "createdTs")
            plan.emit_after = floor or float("-inf")
        await self._retry_unreadable((CREATED,), plan, result, created=True)
        await self._walk(plan, result, created=True)

    async def _walk_updated(self, result: PollResult) -> None:
        leads = self.config.leads
        state = self.store.cursor(UPDATED)
        cursor = state.cursor if state else None
        result.cursor_before = cursor
        if state is not None and state.walk_from:
            plan = _Plan(UPDATED, UPDATED_FILTER, state.walk_from, cursor, "updatedTs")
        elif cursor is None:
            # Changes before now are not news: the baseline walk records what leads look like.
            start = await self._fresh_now() - leads.safety_lag
            plan = _Plan(
                UPDATED,
                UPDATED_FILTER,
                self.server.bound(start - leads.lookback),
                write_at(start, UTC_OFFSET),
                "updatedTs",
            )
        else:
            plan = await self._steady_plan(UPDATED, UPDATED_FILTER, cursor, "updatedTs")
        await self._retry_unreadable(CHANGE_STREAMS, plan, result, created=False)
        await self._walk(plan, result, created=False)

    async def _walk_baseline(self, result: PollResult) -> None:
        """Snapshots of the leads created within `baseline_window`, resumable page by page."""
        leads = self.config.leads
        state = self.store.cursor(BASELINE)
        signature = self._baseline_mark()
        if state is not None and state.walk_from and state.cursor != signature:
            # Stopped under another `track` (or `campaign_ids`): the pages read before the stop hold
            # snapshots without the fields (or campaigns) added since, whose first changes would then
            # pass silently. Taken again whole.
            log.info("snapshot baseline restarted: track or campaign_ids changed while it was under way")
            state = None
        if state is not None and state.walk_from:
            plan = _Plan(BASELINE, CREATED_FILTER, state.walk_from, None, None, start_page=max(1, state.progress or 1))
            plan.resume_after = state.resume_after
        elif leads.baseline_window <= 0:
            self._commit(PageCommit(BASELINE, self.clock.now(), cursor=signature, finished=True), result)
            return
        else:
            server_now = await self._fresh_now()
            window_start = server_now - leads.baseline_window
            plan = _Plan(BASELINE, CREATED_FILTER, self.server.bound(window_start), None, None)
            updated = self.store.cursor(UPDATED)
            if self.updates_filter and (updated is None or updated.cursor is None):
                # The updated walk's first run must see changes made while the baseline is taken:
                # it starts from here, not from whenever the baseline ends.
                start = server_now - leads.safety_lag
                self._commit(
                    PageCommit(UPDATED, self.clock.now(), cursor=write_at(start, UTC_OFFSET), cursor_ts=start), result
                )
            log.info("snapshot baseline started", window=leads.baseline_window)
        plan.label = signature
        await self._walk(plan, result, created=False, finish_cursor=signature)

    async def _walk_recheck(self, result: PollResult) -> None:
        window_start = self.server.now() - self.config.leads.recheck_window
        plan = _Plan(RECHECK, CREATED_FILTER, self.server.bound(window_start), None, None)
        await self._retry_unreadable(CHANGE_STREAMS, plan, result, created=False)
        await self._walk(plan, result, created=False)

    async def _steady_plan(self, stream: str, key: str, cursor: str, field: str) -> _Plan:
        """A walk from its cursor: just behind what the walks have read (what arrived since the last
        poll), or `lookback` behind where the lookback was last known complete (a sweep, for rows
        that became visible late) when a count shows a row there that no walk has read, when
        nothing is known yet, or every `lookback` on a server that cannot count up to a bound."""
        leads = self.config.leads
        at = detect.parse_ts(cursor).timestamp()
        mark = self.store.cursor(SWEEPS[stream])
        window = self._windows.get(stream)
        before = key.replace("[strictly_after]", "[before]")
        fresh = window is not None and not window.stale and mark is not None and mark.cursor_ts is not None
        if fresh and window is not None and mark is not None and mark.last_success_at:
            # The cursor stops `safety_lag` short of the server's time; the walks read up to its
            # time. One second before that: rows of that second the last walk may not have met.
            start = max(at, window.read_to) - min(leads.lookback, TIE_OVERLAP)
            plan = _Plan(stream, key, self.server.bound(start), cursor, field)
            if before in (self._lead_search or frozenset()):
                if self.clock.monotonic() >= window.counted_at + COUNT_EVERY:
                    # After the walk: a lead changed again since it was read is read again by
                    # then, and counted where the walk saw it.
                    plan.count_upto = start
                return plan
            if self.clock.now() < mark.last_success_at + leads.lookback:
                return plan
        # From where the lookback was last known complete: every row that became visible since,
        # within `lookback` of its timestamp, is on or after this bound, however long ago that was.
        since = at if mark is None or mark.cursor_ts is None else min(at, mark.cursor_ts)
        plan = _Plan(stream, key, self.server.bound(since - leads.lookback), cursor, field)
        plan.sweep_mark, plan.sweep_since = cursor, since - leads.lookback
        return plan

    async def _lookback_complete(self, stream: str, key: str, window: _Window, cursor: str, upto: float) -> bool:
        """Count the rows from the window's bound up to `upto` (one request, no rows): as many as the
        walks read there means none appeared behind them, and the window moves up to `lookback`
        behind the cursor."""
        window.counted_at = self.clock.monotonic()
        before = key.replace("[strictly_after]", "[before]")
        params = {**self._lead_params(key, window.bound), before: self.server.bound(upto)}
        page = await self.client.page("leads", params, items_per_page=0)
        self._observe(page)
        read = sum(1 for t in window.seen.values() if t <= upto)
        if window.unknown and page.total != read:
            # Counted like the rest, with no row served: how many of them fall in the counted span.
            if "id[]" not in (self._lead_search or frozenset()) or len(window.unknown) > UNKNOWN_COUNTED:
                return False
            ids = {**params, "id[]": [str(i) for i in sorted(window.unknown)]}
            read += (await self.client.page("leads", ids, items_per_page=0)).total or 0
        if page.total != read:
            log.info("walk.lookback_changed", stream=stream, counted=page.total, read=read)
            return False
        at = detect.parse_ts(cursor).timestamp()
        since = at - self.config.leads.lookback
        if since > window.since:
            window.since, window.bound = since, self.server.bound(since)
            window.seen = {i: t for i, t in window.seen.items() if t > since}
            mark = PageCommit(SWEEPS[stream], self.clock.now(), finished=True)
            mark.cursor, mark.cursor_ts = cursor, at
            self.store.commit_page(mark)
        return True

    async def _walk(self, plan: _Plan, result: PollResult, *, created: bool, finish_cursor: str | None = None) -> None:
        """The one page loop of every lead walk: read, decide, commit, page after page."""
        params = self._lead_params(plan.filter, plan.bound)
        pager = Pager(
            self.client,
            "leads",
            params,
            min(self.config.convertr.items_per_page, self._served_size or self.config.convertr.items_per_page),
            id_filter="id[]" in (self._lead_search or frozenset()),
            on_narrow=self.metrics.page_narrowed if self.metrics is not None else None,
            unfindable=self._unfindable.setdefault(plan.stream, set()),
        )
        signpost = float("-inf")
        served_until = float("-inf")  # the server's latest time on the walk's pages
        cursor = plan.cursor
        first = True
        tracks = self._tracks()
        held: str | None = None  # why the cursor stays where it is: a position this walk could not account for
        seen: dict[int, float] = {}
        unknown: set[int] = set()
        # What a walk read only matters to a window: one this walk starts (a sweep) or one it extends.
        # Any other walk (a backfill, a first or resumed walk) would hold every id it read to the end
        # and then drop them: 100 000 ids, 14 MB of a backfill's peak RSS (58 -> 72 MB, measured).
        remember = plan.cursor_field is not None and (plan.sweep_mark is not None or plan.stream in self._windows)
        # aclosing: a failed commit must stop the page read ahead at once, not whenever the
        # abandoned generator is collected.
        async with aclosing(pager.pages(plan.start_page, overlap_id=plan.resume_after)) as reads:
            async for read in reads:
                page = read.page
                self._observe(page)
                # Each page's own Date: a walk that chases the tail moves its cursor along with it.
                server_now = page.server_date.timestamp() if page.server_date else self.server.now()
                signpost = max(signpost, server_now - self.config.leads.safety_lag)
                served_until = max(served_until, server_now)
                self._served_size = pager.size
                if remember and plan.cursor_field is not None:
                    _remember(seen, unknown, read, plan.cursor_field, signpost)
                resumable = plan.cursor_field is None  # a resume starts from the last page committed
                place = Place(
                    set_walk_from=first,
                    walk_from=plan.bound if first else None,
                    baseline_until=plan.baseline_until if first else None,
                    floor=plan.floor if first else None,
                    label=plan.label if first else None,
                    progress=page.number if resumable else None,
                    resume_after=read.last_id if resumable else None,
                )
                first = False
                commit = self._decide(plan, read, signpost, cursor, created, result, tracks, place)
                if held is None and any(lead_id is None for lead_id, _ in read.unreadable):
                    held = (
                        f"cursor held: an unreadable lead after id {_or_dash(_before_hole(read))} on page "
                        f"{page.number} could not be identified; the rows from there are read again "
                        "(at least every 10 s)"
                    )
                    log.warning("walk.cursor_held", stream=plan.stream, page=page.number)
                if held is not None and plan.cursor_field is not None:
                    commit.cursor = commit.cursor_ts = None  # never past a position it could not account for
                if plan.cursor_field is not None:
                    cursor = commit.cursor or cursor
                self._commit(commit, result)
                if self.progress is not None:
                    self.progress(result.fetched, page.total)
                if self.should_stop():
                    return  # walk_from stays recorded: the next walk resumes from the same bound
        now = self.clock.now()
        final: tuple[str | None, float | None] = (None, None)
        if finish_cursor is not None:
            final = (finish_cursor, None)
        elif cursor is not None:
            final = (cursor, detect.parse_ts(cursor).timestamp())
        done = PageCommit(
            plan.stream,
            now,
            cursor=final[0],
            cursor_ts=final[1],
            set_walk_from=True,
            walk_from=None,
            progress=0,
            finished=True,
            note=held or self.client.throttled_note(),
        )
        self._commit(done, result)
        if held is not None and plan.cursor_field is not None:
            # A position it could not account for: the lookback is not known complete. No window and
            # no new sweep mark, so the next poll re-reads from before it (the cursor is held too),
            # not from what this walk read after it, which would leave it behind for good.
            self._windows.pop(plan.stream, None)
        elif plan.sweep_mark is not None:
            mark = PageCommit(SWEEPS[plan.stream], now, finished=True)
            mark.cursor, mark.cursor_ts = plan.sweep_mark, detect.parse_ts(plan.sweep_mark).timestamp()
            self._commit(mark, result)
            read_to = max(plan.sweep_since, _read_to(seen, served_until))
            self._windows[plan.stream] = _Window(
                plan.bound, plan.sweep_since, seen, self.clock.monotonic(), read_to, unknown=unknown
            )
        elif plan.stream in self._windows and not remember:
            # A window made while this walk ran without remembering: it lacks what this walk read.
            del self._windows[plan.stream]  # the next poll re-reads the lookback and starts afresh
        elif plan.stream in self._windows:
            window = self._windows[plan.stream]
            window.seen.update(seen)
            window.unknown = (window.unknown - seen.keys()) | (unknown - window.seen.keys())
            window.read_to = max(window.read_to, _read_to(seen, served_until))
            if len(window.seen) > MAX_SEEN:
                del self._windows[plan.stream]  # the next poll re-reads the lookback and starts afresh
            elif plan.count_upto is not None and plan.cursor is not None:
                complete = await self._lookback_complete(plan.stream, plan.filter, window, plan.cursor, plan.count_upto)
                window.stale = not complete
        result.cursor_after = done.cursor
        if plan.stream == BASELINE:
            log.info("snapshot baseline finished", leads=result.fetched, pages=result.pages)

    def _decide(
        self,
        plan: _Plan,
        read: Read,
        signpost: float,
        cursor: str | None,
        created: bool,
        result: PollResult,
        tracks: dict[str, tuple[str, ...]],
        place: Place,
    ) -> PageCommit:
        page = read.page
        result.pages += 1
        result.fetched += len(page.members)
        ids = [m["id"] for m in page.members if isinstance(m.get("id"), int)]
        known = self.store.leads(ids)
        unannounced = self._unannounced(ids)
        if read.unreadable:
            place = replace(place, unreadable=(*place.unreadable, *self._skipped(plan, read)))
        if created:
            walk = self._walk_state(plan.stream, signpost, tracks, emit_after=plan.emit_after)
            commit = detect.decide_created(
                page.members, known, walk, cursor, self.route, unannounced, place, cursor_field=plan.cursor_field
            )
            result.new += len(commit.leads)
        else:
            walk = self._walk_state(plan.stream, signpost, tracks, horizon=self._horizon())
            commit = detect.decide_updated(
                page.members, known, walk, cursor, self.route, unannounced, place, cursor_field=plan.cursor_field
            )
            result.changed += len(commit.events)
        return commit

    # --- records the server cannot serialise -----------------------------------------------------

    def _skipped(self, plan: _Plan, read: Read) -> list[tuple[int, float, str, float | None]]:
        """Entries to record for the page's unreadable leads not recorded before (logged here)."""
        stream = plan.stream
        now = self.clock.now()
        recorded = {u.lead_id for u in self.store.unreadable(stream)}
        entries: list[tuple[int, float, str, float | None]] = []
        for lead_id, error in read.unreadable:
            if lead_id is None:
                continue  # logged by the pager; a later walk over the same rows tries again
            if lead_id in recorded:
                continue  # its own slow schedule decides when it is read next
            # The walk's threshold goes with it: a lead that existed at the baseline stays unannounced.
            entries.append((lead_id, now + UNREADABLE_RETRY[0], error[:200], plan.emit_after))
            log.warning("lead unreadable: skipped, retried later", stream=stream, lead_id=lead_id, error=error)
        self._count_unreadable(len(entries))
        return entries

    def _unannounced(self, ids: Sequence[int]) -> Unannounced:
        """The created walk's unreadable entries among `ids`, each with the rule it was met under."""
        wanted = set(ids)
        entries = [u for u in self.store.unreadable(CREATED) if u.lead_id in wanted]
        if not entries:
            return NOTHING_UNANNOUNCED
        state = self.store.cursor(CREATED)
        floor = state.floor if state is not None and state.floor is not None else float("-inf")
        return Unannounced(CREATED, {u.lead_id: floor if u.emit_after is None else u.emit_after for u in entries})

    def _count_unreadable(self, extra: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.set_unreadable(len({u.lead_id for u in self.store.unreadable()}) + extra)

    async def _retry_unreadable(
        self, streams: tuple[str, ...], plan: _Plan, result: PollResult, *, created: bool
    ) -> None:
        """Read each unreadable lead whose time has come; one that reads now is decided like a page."""
        now = self.clock.now()
        tracks: dict[str, tuple[str, ...]] | None = None
        for entry in self.store.unreadable():
            if entry.stream not in streams or entry.next_try > now:
                continue
            stream = entry.stream
            try:
                doc = await self.client.item("leads", entry.lead_id, attempts=1)
            except UNREADABLE as exc:
                due = now + UNREADABLE_RETRY[min(entry.tries, len(UNREADABLE_RETRY) - 1)]
                again = (entry.lead_id, due, str(exc)[:200], entry.emit_after)
                self._commit(PageCommit(stream, now, unreadable=[again]), result)
                continue
            answered = Place(readable=(entry.lead_id,))
            if doc is not None and self._in_scope(doc):
                read = Read(Page(0, [doc], None, None, None, frozenset()))
                signpost = self.server.now() - self.config.leads.safety_lag
                emit_after = entry.emit_after if entry.emit_after is not None else plan.emit_after
                # No cursor field: one old lead never moves a cursor.
                retry = _Plan(stream, "", "", None, None, emit_after=emit_after)
                tracks = self._tracks() if tracks is None else tracks
                commit = self._decide(retry, read, signpost, None, created, result, tracks, answered)
                log.info("unreadable lead read at last", stream=stream, lead_id=entry.lead_id)
            else:
                commit = PageCommit.at(stream, now, answered)
            self._commit(commit, result)
        self._count_unreadable()

    def _in_scope(self, doc: dict[str, Any]) -> bool:
        """Whether a lead read on its own belongs to the walks at all (`campaign_ids`)."""
        wanted = self.config.leads.campaign_ids
        return not wanted or campaign_id_of(doc.get("campaign")) in wanted

    # --- campaigns ----------------------------------------------------------------------------

    async def _walk_campaigns(self, result: PollResult) -> None:
        state = self.store.cursor(CAMPAIGNS)
        baseline = state is None or state.polls == 0
        existed_until: float | None = None
        if baseline:
            # The first read may stop half-way (a failed page, SIGTERM) and be taken up again much
            # later: the campaigns that existed when it began are those up to the highest id then,
            # so one created meanwhile is still announced rather than taken for part of the baseline.
            existed_until = state.baseline_until if state is not None and state.walk_from else None
            if existed_until is None:
                existed_until = await self._highest_campaign_id()
                begun = PageCommit(
                    CAMPAIGNS, self.clock.now(), walk_from="baseline", set_walk_from=True, baseline_until=existed_until
                )
                self._commit(begun, result)
        known = self.store.campaigns()
        # Paged like the leads, so that a campaign deleted during the first read cannot shift another
        # off the pages: one left out would be announced as campaign.created by the next poll.
        pager = Pager(
            self.client, "campaigns", {"order[id]": "asc"}, self.config.convertr.items_per_page, isolate=False
        )
        async with aclosing(pager.pages()) as reads:
            async for read in reads:
                self._campaign_page(read.page, known, baseline, existed_until, result)
                if self.should_stop():
                    return
        self._commit(PageCommit(CAMPAIGNS, self.clock.now(), set_walk_from=True, finished=True), result)

    async def _highest_campaign_id(self) -> float:
        """The highest campaign id there is now (0 with none): one request, once per state file."""
        page = await self.client.page("campaigns", {"order[id]": "desc"}, items_per_page=1)
        ids = [m["id"] for m in page.members if isinstance(m.get("id"), int) and not isinstance(m["id"], bool)]
        return float(max(ids, default=0))

    def _campaign_page(
        self,
        page: Page,
        known: dict[int, CampaignState],
        baseline: bool,
        existed_until: float | None,
        result: PollResult,
    ) -> None:
        self.server.observe_date(page.server_date)
        self.server.observe_documents(page.members, CAMPAIGN_TIMES)
        result.pages += 1
        result.fetched += len(page.members)
        now = self.clock.now()
        commit, warnings = detect.decide_campaigns(
            page.members,
            known,
            baseline=baseline,
            now=now,
            detected_at=rfc3339(now),
            route=self.route,
            existed_until=existed_until,
        )
        for warning in warnings:
            log.warning(warning)
        for after in commit.campaigns:
            before = known.get(after.id)
            if before is None:
                result.new += 1
            elif before.status != after.status:
                result.changed += 1
            known[after.id] = after
        self._commit(commit, result)


def _remember(seen: dict[int, float], unknown: set[int], read: Read, field: str, fallback: float) -> None:
    """The ids a page accounts for, with the walk's field as read. An unreadable one identified
    counts too (the server counts it, and it is retried on its own), but its time is unknown: the
    page's time would move the window's `read_to` past rows not read yet and make the next count
    miss it, a whole re-read of the lookback for nothing."""
    for member in read.page.members:
        lead_id = member.get("id")
        if isinstance(lead_id, int) and not isinstance(lead_id, bool):
            seen[lead_id] = detect.timestamp(member.get(field)) or fallback
            unknown.discard(lead_id)
    for lead_id, _ in read.unreadable:
        if lead_id is not None and lead_id not in seen:
            unknown.add(lead_id)


def _read_to(seen: dict[int, float], served_until: float) -> float:
    """How far a walk read its field: the latest value seen, but never past the server's own time.
    A lead stamped in the future (an import's own dates) is no sign that the rows before it were
    read, and would make the next poll start after rows that arrive before that time."""
    return min(max(seen.values(), default=float("-inf")), served_until)


def _before_hole(read: Read) -> int | None:
    ids = [m["id"] for m in read.page.members if isinstance(m.get("id"), int)]
    return max(ids, default=None)


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _describe(exc: BaseException) -> str:
    """A failed poll as `status` and /healthz show it: our own errors already say what went wrong
    (an operator has no use for the class name); anything else is a bug, named by its class."""
    return str(exc) if isinstance(exc, WatcherError) else f"{type(exc).__name__}: {exc}"
