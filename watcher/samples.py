"""Sample events of each detected type, for `send-test --type`: what a receiver will really be sent.

The documents come from the simulator's generator and the events from the detector's own
functions, so a sample has every field a real one has and validates against the same schemas.
Each sample's id is new (it joins the time it was made), so a receiver that deduplicates on
`webhook-id` never takes a later real event for one it has seen; the lead and campaign ids are
the simulator's (lead 100001, campaign 601), made up like the rest of the data.
"""

from __future__ import annotations

from watcher.clock import FakeClock, rfc3339
from watcher.detect import campaign_created, campaign_status_changed, diff, lead_created, lead_updated, snapshot
from watcher.events import (
    CAMPAIGN_CREATED,
    CAMPAIGN_STATUS_CHANGED,
    LEAD_CREATED,
    LEAD_UPDATED,
    Event,
    event_id,
)

# Fixed, so every sample of a type has the same documents: a receiver's test can rely on them.
SAMPLE_SEED = 7
# The fields a sample lead.updated changes, as Convertr's QA does when it reviews a lead.
SAMPLE_TRACK = ("qaResult", "leadFlag", "advertiserBillable", "publisherBillable", "leadData")


def sample_event(type_: str, now: float) -> Event:
    """A `type_` event (any type but `watcher.test`, which `sendtest` makes) detected at `now`."""
    from watcher.simulator import Simulator

    at = rfc3339(now)
    simulator = Simulator(seed=SAMPLE_SEED, clock=FakeClock(now - 3600))
    campaign_id = int(simulator.add_campaign()["id"])
    lead_id = int(simulator.add_lead(campaign_id)["id"])
    if type_ in (LEAD_CREATED, LEAD_UPDATED):
        before = simulator.lead(lead_id)
        if type_ == LEAD_CREATED:
            event = lead_created(before, at)
        else:
            simulator.advance(1800)
            after = simulator.update_lead(lead_id, qaResult="Invalid", lead_data={"jobTitle": "Head of Data"})
            changes = diff(snapshot(before, SAMPLE_TRACK), snapshot(after, SAMPLE_TRACK))
            event = lead_updated(after, changes, at)
    elif type_ == CAMPAIGN_CREATED:
        event = campaign_created(simulator.campaign(campaign_id), at)
    elif type_ == CAMPAIGN_STATUS_CHANGED:
        before_status = str(simulator.campaign(campaign_id)["status"])
        after = simulator.pause_campaign(campaign_id)
        event = campaign_status_changed(after, before_status, str(after["status"]), None, at)
    else:
        raise ValueError(f"no sample for event type {type_!r}")
    # A new id each time: the sample must never share one with a real change of these ids.
    return Event(
        event_id(event.type, event.resource, f"sample:{now!r}"),
        event.type,
        event.timestamp,
        event.data,
        event.resource,
        event.campaign_id,
    )
