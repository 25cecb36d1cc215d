"""The walks: read the API page by page, decide with `detect`, commit each page with `store`.

Three streams: `leads.created` (createdTs cursor), `leads.updated` (updatedTs cursor, or a
trailing re-read when the server offers no updatedTs filter) and `campaigns` (a full read each
time, because a status can change with no write at all).

A walk records where it started (`walk_from`) in its first page's transaction and forgets it in
its last: if the daemon dies half-way, the next walk starts from the same bound, so a lead on an
unread page can never fall behind an advanced cursor.

Every time decision about the data (the baseline, the signpost, how far ahead a clock change can
matter, the recheck window) is taken on the server's clock, read from its `Date` header; the
local clock only paces our own work. The two can differ by more than the lookback.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import structlog

from watcher import detect
from watcher.clock import Clock, rfc3339
from watcher.config import Config, SinkConfig
from watcher.convertr import ConvertrClient, Page
from watcher.errors import MalformedResponse
from watcher.events import LEAD_UPDATED, Event
from watcher.pii import is_personal_field
from watcher.store import CampaignState, LeadState, PageCommit, Store

log = structlog.get_logger("watcher.poller")

CREATED, UPDATED, RECHECK, CAMPAIGNS = "leads.created", "leads.updated", "leads.recheck", "campaigns"
UPDATED_FILTER = "updatedTs[strictly_after]"


class Metrics(Protocol):
    def poll_finished(self, stream: str, ok: bool, duration: float, fetched: int, now: float) -> None: ...
    def event_detected(self, event_type: str, count: int = 1) -> None: ...
    def set_cursor(self, stream: str, cursor_ts: float, now: float) -> None: ...


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


class Poller:
    def __init__(
        self,
        config: Config,
        client: ConvertrClient,
        store: Store,
        clock: Clock,
        *,
        on_events: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.store = store
        self.clock = clock
        self.zone = ZoneInfo(config.convertr.timezone)
        self.on_events = on_events
        self.metrics = metrics
        self.should_stop = should_stop
        self.progress = progress
        self.updates_filter: bool | None = None  # learnt from hydra:search on the first leads poll
        self._server_skew: float | None = None  # the server's clock less ours, from the last Date header
        self._lead_search: frozenset[str] | None = None  # the leads collection's hydra:search variables

    # --- public entry points ------------------------------------------------------------------

    async def poll_leads(self) -> list[PollResult]:
        leads = self.config.leads
        results = [await self._timed(CREATED, self._walk_created)]
        if leads.updates:
            if self.updates_filter is None:
                await self._learn_filters()
            if self.updates_filter:
                results.append(await self._timed(UPDATED, self._walk_updated))
            elif self._recheck_due():
                results.append(await self._timed(RECHECK, self._walk_recheck))
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

    async def _learn_filters(self) -> None:
        search = self._lead_search if self._lead_search is not None else (await self._probe()).search_variables
        self.updates_filter = UPDATED_FILTER in search
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

    async def _probe(self) -> Page:
        """A one-lead read: the server's clock (Date) and the filters it offers (hydra:search)."""
        page = await self.client.first_page("leads", {}, items_per_page=1)
        self._observe(page)
        self._lead_search = page.search_variables
        return page

    async def _server_time(self) -> float:
        """A fresh reading of the server's clock, for a baseline, where the exact second matters."""
        page = await self._probe()
        if page.server_date is None:
            raise MalformedResponse("Convertr GET /api/v4/leads: no Date header")
        return page.server_date.timestamp()

    async def _until(self) -> datetime:
        # How far ahead a clock change can matter: to the end of this walk, with an hour to spare.
        return datetime.fromtimestamp(await self._server_now() + 3600, UTC)

    def _lead_params(self, key: str, bound: str) -> dict[str, str | Sequence[str]]:
        params: dict[str, str | Sequence[str]] = {key: bound, "order[id]": "asc"}
        if self.config.leads.campaign_ids:
            params["campaign.id[]"] = [str(c) for c in self.config.leads.campaign_ids]
        return params

    def _sinks_for(self, event: Event) -> list[str]:
        return [s.name for s in self.config.sinks if wants(s, event)]

    def _commit(self, page: PageCommit, result: PollResult) -> None:
        self._after_commit(self.store.commit_page(page), result)

    def _after_commit(self, fresh: Sequence[Event], result: PollResult) -> None:
        result.events += len(fresh)
        if fresh:
            if self.metrics is not None:
                for type_, count in Counter(e.type for e in fresh).items():
                    self.metrics.event_detected(type_, count)
            self.on_events()

    def _signpost(self, page: Page) -> float:
        self._observe(page)
        server_now = page.server_date.timestamp() if page.server_date else self.clock.now() + (self._server_skew or 0.0)
        return server_now - self.config.leads.safety_lag

    def _observe(self, page: Page) -> None:
        if page.server_date is not None:
            self._server_skew = page.server_date.timestamp() - self.clock.now()

    async def _server_now(self) -> float:
        """The server's time: one read per process, then kept up by every page's Date header."""
        if self._server_skew is None:
            await self._probe()
        if self._server_skew is None:  # a server that sends no Date leaves our clock as the only one
            self._server_skew = 0.0
        return self.clock.now() + self._server_skew

    def _now_text(self) -> str:
        return rfc3339(self.clock.now())

    # --- leads.created ------------------------------------------------------------------------

    async def _walk_created(self, result: PollResult) -> None:
        leads = self.config.leads
        state = self.store.cursor(CREATED)
        current = state.cursor if state else None
        result.cursor_before = current
        # A baseline walk that was interrupted keeps its threshold, so leads that existed at the
        # start of the baseline never become events when the walk resumes.
        baseline_until = state.baseline_until if state is not None and state.walk_from else None
        emit_after = baseline_until if baseline_until is not None else float("-inf")
        if current is None:
            if leads.start is None:
                # Baseline: what exists now is recorded as seen, and only leads created after
                # this moment (by the server's clock) become events.
                server_now = await self._server_time()
                emit_after = baseline_until = server_now
                current = detect.format_in_zone(server_now - leads.safety_lag, self.zone)
                bound = detect.bound_for_instant(server_now - leads.lookback, self.zone, await self._until())
            else:
                start = leads.start.timestamp()
                emit_after = start - 1
                current = detect.format_in_zone(start - 1, self.zone)
                bound = detect.bound_for_instant(start - 1, self.zone, await self._until())
        else:
            bound = (state.walk_from if state else None) or detect.filter_bound(
                current, leads.lookback, self.zone, await self._until()
            )
        signpost: float | None = None
        first = True
        async for page in self.client.pages("leads", self._lead_params("createdTs[strictly_after]", bound)):
            if signpost is None:
                signpost = self._signpost(page)
            commit, current = self._created_page(
                page, result, bound, first, baseline_until, emit_after, signpost, current
            )
            first = False
            self._commit(commit, result)
            if self.progress is not None:
                self.progress(result.fetched, page.total)
            if self.should_stop():
                return  # walk_from stays recorded: the next walk resumes from the same bound
        self._finish(CREATED, current, result)

    def _created_page(
        self,
        page: Page,
        result: PollResult,
        bound: str,
        first: bool,
        baseline_until: float | None,
        emit_after: float,
        signpost: float,
        current: str | None,
    ) -> tuple[PageCommit, str | None]:
        """Decide one page of the created walk: new leads, their events, the cursor after it."""
        leads = self.config.leads
        result.pages += 1
        result.fetched += len(page.members)
        members = [m for m in page.members if isinstance(m.get("id"), int)]
        known: dict[int, object] = dict(self.store.leads(m["id"] for m in members))
        now = self.clock.now()
        detected_at = rfc3339(now)
        commit = PageCommit(CREATED, now, walk_from=bound, set_walk_from=first, baseline_until=baseline_until)
        first = False
        newest: str | None = None
        newest_ts = float("-inf")
        for lead in members:
            created_raw = lead.get("createdTs")
            created_ts = _timestamp(created_raw)
            if created_ts is not None and created_ts > newest_ts:
                newest, newest_ts = created_raw, created_ts
            if lead["id"] in known:
                continue
            if created_ts is None:
                created_ts = now
            result.new += 1
            # Snapshots exist for lead.updated; without it a lead is only remembered as seen.
            tracked = detect.snapshot(lead, leads.track) if leads.updates else {}
            state_row = LeadState(lead["id"], created_ts, lead.get("updatedTs"), tracked)
            commit.leads.append(state_row)
            known[lead["id"]] = state_row
            if created_ts > emit_after:
                event = detect.lead_created(lead, detected_at)
                commit.events.append((event, self._sinks_for(event)))
        moved = detect.next_cursor(current, newest, signpost, self.zone)
        if moved is not None:
            commit.cursor, commit.cursor_ts = moved
            current = moved[0]
        return commit, current

    def _finish(self, stream: str, current: str | None, result: PollResult) -> None:
        commit = PageCommit(stream, self.clock.now(), set_walk_from=True, walk_from=None, finished=True)
        if current is not None:
            commit.cursor, commit.cursor_ts = current, detect.parse_ts(current).timestamp()
        self._commit(commit, result)
        result.cursor_after = current

    # --- leads.updated and the re-read fallback -----------------------------------------------

    async def _walk_updated(self, result: PollResult) -> None:
        leads = self.config.leads
        state = self.store.cursor(UPDATED)
        current = state.cursor if state else None
        result.cursor_before = current
        if current is None:
            server_now = await self._server_time()
            current = detect.format_in_zone(server_now - leads.safety_lag, self.zone)
            bound = detect.bound_for_instant(server_now - leads.lookback, self.zone, await self._until())
        else:
            bound = (state.walk_from if state else None) or detect.filter_bound(
                current, leads.lookback, self.zone, await self._until()
            )
        signpost: float | None = None
        first = True
        async for page in self.client.pages("leads", self._lead_params(UPDATED_FILTER, bound)):
            if signpost is None:
                signpost = self._signpost(page)
            commit = PageCommit(UPDATED, self.clock.now(), walk_from=bound, set_walk_from=first)
            first = False
            self._compare_page(page, commit, result)
            newest = detect.newest([m.get("updatedTs") for m in page.members])
            moved = detect.next_cursor(current, newest, signpost, self.zone)
            if moved is not None:
                commit.cursor, commit.cursor_ts = moved
                current = moved[0]
            self._commit(commit, result)
            if self.should_stop():
                return
        self._finish(UPDATED, current, result)

    async def _walk_recheck(self, result: PollResult) -> None:
        window_start = await self._server_now() - self.config.leads.recheck_window
        bound = detect.bound_for_instant(window_start, self.zone, await self._until())
        async for page in self.client.pages("leads", self._lead_params("createdTs[strictly_after]", bound)):
            self._observe(page)
            commit = PageCommit(RECHECK, self.clock.now())
            self._compare_page(page, commit, result)
            self._commit(commit, result)
            if self.should_stop():
                return
        self._commit(PageCommit(RECHECK, self.clock.now(), finished=True), result)

    def _compare_page(self, page: Page, commit: PageCommit, result: PollResult) -> None:
        """Diff each lead of a page against its snapshot; queue `lead.updated` for tracked changes."""
        leads = self.config.leads
        result.pages += 1
        result.fetched += len(page.members)
        members = [m for m in page.members if isinstance(m.get("id"), int)]
        known = self.store.leads(m["id"] for m in members)
        created = self.store.cursor(CREATED)
        # A lead the created stream has not recorded yet, but will still read, is left to it:
        # its lead.created carries the current document, so its first update is no news.
        horizon = (created.cursor_ts or 0.0) - leads.lookback - 3600 if created else float("inf")
        for lead in members:
            snap = detect.snapshot(lead, leads.track)
            before = known.get(lead["id"])
            if before is None:
                created_ts = _instant(lead.get("createdTs"), commit.now)
                if created_ts > horizon:
                    continue
                # First sight of an old lead (before the baseline, or pruned): nothing to compare with.
                commit.leads.append(LeadState(lead["id"], created_ts, lead.get("updatedTs"), snap))
                continue
            changes = detect.diff(before.snapshot, snap)
            if not changes:
                continue
            result.changed += 1
            merged = detect.merge(before.snapshot, snap)
            commit.leads.append(LeadState(lead["id"], before.created_ts, lead.get("updatedTs"), merged))
            known[lead["id"]] = commit.leads[-1]
            event = detect.lead_updated(lead, changes, self._now_text(), before.version)
            commit.events.append((event, self._sinks_for(event)))

    # --- campaigns ----------------------------------------------------------------------------

    async def _walk_campaigns(self, result: PollResult) -> None:
        state = self.store.cursor(CAMPAIGNS)
        baseline = state is None or state.polls == 0
        known = self.store.campaigns()
        async for page in self.client.pages("campaigns", {"order[id]": "asc"}):
            self._observe(page)
            result.pages += 1
            result.fetched += len(page.members)
            commit = PageCommit(CAMPAIGNS, self.clock.now())
            for doc in page.members:
                campaign_id, status = doc.get("id"), doc.get("status")
                if not isinstance(campaign_id, int) or not isinstance(status, str):
                    log.warning("campaign document without id or status skipped", campaign_id=campaign_id)
                    continue
                before = known.get(campaign_id)
                name = doc.get("name") if isinstance(doc.get("name"), str) else None
                if before is None:
                    after = CampaignState(campaign_id, status, 0, name)
                    result.new += 1
                    if not baseline:
                        event = detect.campaign_created(doc, self._now_text())
                        commit.events.append((event, self._sinks_for(event)))
                elif before.status != status:
                    after = CampaignState(campaign_id, status, before.transitions + 1, name)
                    result.changed += 1
                    event = detect.campaign_status_changed(
                        doc, before.status, status, after.transitions, self._now_text()
                    )
                    commit.events.append((event, self._sinks_for(event)))
                elif before.name != name:
                    after = CampaignState(campaign_id, status, before.transitions, name)  # renamed: no event
                else:
                    continue
                known[campaign_id] = after
                commit.campaigns.append(after)
            self._commit(commit, result)
            if self.should_stop():
                return
        self._commit(PageCommit(CAMPAIGNS, self.clock.now(), finished=True), result)


def _instant(raw: object, default: float) -> float:
    """A document's timestamp in Unix seconds; a missing or garbled one counts as `default`."""
    ts = _timestamp(raw)
    return default if ts is None else ts


def _timestamp(raw: object) -> float | None:
    """A document's timestamp in Unix seconds, or None when it is missing or garbled."""
    if not isinstance(raw, str):
        return None
    try:
        return detect.parse_ts(raw).timestamp()
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def wants(sink: SinkConfig, event: Event) -> bool:
    """Whether an event goes to a sink: its type and campaign filters, and for a sink without
    personal data, a lead.updated whose every change is personal (it would arrive empty) does not."""
    if event.type not in sink.events:
        return False
    if sink.campaign_ids and event.campaign_id not in sink.campaign_ids:
        return False
    if event.type == LEAD_UPDATED and not sink.include_pii:
        changes = event.data.get("changes") or {}
        return not changes or not all(is_personal_field(k) for k in changes)
    return True
