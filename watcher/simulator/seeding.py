"""Plans for seeded data: which campaigns exist in which state, and when the leads arrived."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from watcher.simulator.generate import mix, person, qa_name

DAY = 86_400
PLANS = ("active", "active", "ending", "upcoming", "paused", "setup", "ended")
RECEIVING = ("active", "ending", "paused")  # campaigns that took leads in the seeded past


def plan_for(index: int) -> str:
    return PLANS[index % len(PLANS)]


def campaign_times(plan: str, index: int, now: int) -> dict[str, Any]:
    """Timestamps giving a campaign the planned status now; "ending" ends 15 minutes from now."""
    start = now - (20 + index) * DAY - now % 3600
    times: dict[str, Any] = {
        "startTs": start,
        "endTs": start + 120 * DAY - 1,
        "signTs": start - 3600,
        "updatedTs": start - 1800,
        "createdTs": start - 7200,
    }
    if plan == "ending":
        times["endTs"] = now + 900
    elif plan == "upcoming":
        times.update(startTs=now + 3600, endTs=now + 60 * DAY)
    elif plan == "paused":
        times["pauseTs"] = now - 2 * DAY
    elif plan == "setup":
        times["signTs"] = None
    elif plan == "ended":
        times["endTs"] = now - DAY
    return times


def lead_times(rng: random.Random, now: int, count: int) -> list[tuple[int, int]]:
    """(created, updated) pairs over the last three days, oldest first, processed seconds later."""
    created = sorted(now - rng.randrange(60, 3 * DAY) for _ in range(count))
    return [(c, min(now, c + rng.randrange(3, 40))) for c in created]


def bulk_rows(seed: int, ids: Sequence[int], campaigns: Sequence[int], ts: int, wall: int) -> Iterator[tuple[Any, ...]]:
    """Insert parameters for generated leads all created at one time (the LeadStore column order)."""
    count = len(campaigns)
    for i in ids:
        yield (
            i,
            campaigns[mix(seed, i, 30) % count],
            person(seed, i)[2],
            qa_name(seed, i),
            1,
            ts,
            wall,
            ts,
            wall,
            None,
        )
