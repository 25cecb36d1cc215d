"""The Convertr API v4 simulator, exercised over real loopback sockets."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from watcher.clock import FakeClock
from watcher.simulator import DEFAULT_PASSWORD, DEFAULT_USERNAME, Simulator, SimulatorServer
from watcher.simulator.access import RollingLimit
from watcher.simulator.admin import handle_admin
from watcher.simulator.api import Request
from watcher.simulator.query import build_query, parse_query

START = datetime(2024, 10, 28, 12, 0, 0, tzinfo=UTC)
ADMIN = {"X-Simulator": "1"}  # what a tool sends on a bodyless admin call; a web page cannot
QUICK_START_LEAD_TEMPLATE = (
    "/api/v4/leads{?id,id[],email,campaign.id,campaign.id[],order[id],createdTs[before],"
    "createdTs[strictly_before],createdTs[after],createdTs[strictly_after],updatedTs[before],"
    "updatedTs[strictly_before],updatedTs[after],updatedTs[strictly_after]}"
)
QUICK_START_CAMPAIGN_TEMPLATE = (
    "/api/v4/campaigns{?id,id[],name,order[id],order[name],createdTs[before],createdTs[strictly_before],"
    "createdTs[after],createdTs[strictly_after],updatedTs[before],updatedTs[strictly_before],updatedTs[after],"
    "updatedTs[strictly_after],startTs[before],startTs[strictly_before],startTs[after],startTs[strictly_after],"
    "endTs[before],endTs[strictly_before],endTs[after],endTs[strictly_after],order[statistics.invalidLeads],"
    "order[statistics.validLeads],order[statistics.cautionLeads],order[statistics.heldLeads],"
    "order[statistics.processingLeads],order[statistics.billableLeads],order[statistics.impressions],"
    "order[statistics.conversions],order[statistics.clicks],status[],order[advertiser.name],order[startTs],"
    "order[endTs],order[country.id],order[country.iso],order[statistics.activePublishers],"
    "order[statistics.totalSales],order[statistics.campaignRevenue.revenue],"
    "order[statistics.campaignRevenue.baseCurrencyRevenue],idName,campaignProcessrJobs.processrJob.id,"
    "campaignProcessrJobs.processrJob.id[],campaignPublishers.publisher.id,campaignPublishers.publisher.id[],"
    "advertiser.id,advertiser.id[],advertiser.name,campaignManager,accountManager,country.id,country.id[],"
    "country.iso,country.iso[]}"
)


@dataclass
class Api:
    sim: Simulator
    clock: FakeClock
    client: httpx.Client
    token: str

    def get(self, path: str, query: str = "", **headers: str) -> httpx.Response:
        url = f"{path}?{query}" if query else path
        return self.client.get(url, headers={"Authorization": f"Bearer {self.token}", **headers})

    def ids(self, query: str = "", path: str = "/api/v4/leads") -> list[int]:
        response = self.get(path, query)
        assert response.status_code == 200, response.text
        return [member["id"] for member in response.json()["hydra:member"]]


def login(client: httpx.Client) -> httpx.Response:
    return client.post("/api/login", data={"username": DEFAULT_USERNAME, "password": DEFAULT_PASSWORD})


@pytest.fixture
def api() -> Iterator[Api]:
    clock = FakeClock(START.timestamp())
    sim = Simulator(seed=7, clock=clock)
    with SimulatorServer(sim) as server, httpx.Client(base_url=server.url, timeout=5) as client:
        yield Api(sim, clock, client, login(client).json()["access_token"])


def london(text: str) -> datetime:
    return datetime.fromisoformat(text)


# -- authentication -------------------------------------------------------------------------


def test_login_returns_the_oauth_body(api: Api) -> None:
    """A good login answers the documented token body with an oauth2-php shaped token."""
    body = login(api.client).json()
    assert re.fullmatch(r"[A-Za-z0-9_-]{86}", body["access_token"])
    assert body["expires_in"] == 3600 and body["token_type"] == "bearer" and body["scope"] is None
    assert body["client_id"].startswith("4_") and body["client_secret"] and body["refresh_token"]
    assert isinstance(body["user_id"], int) and body["password_expired"] is False


def test_bad_login_and_missing_fields_are_400(api: Api) -> None:
    """Wrong credentials give invalid_grant and missing fields invalid_request, both without a challenge."""
    wrong = api.client.post("/api/login", data={"username": DEFAULT_USERNAME, "password": "nope"})
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "invalid_grant", "error_description": "Invalid username and password combination"}
    missing = api.client.post("/api/login", data={"username": DEFAULT_USERNAME})
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    assert "www-authenticate" not in missing.headers


def test_missing_unknown_and_expired_tokens_are_401(api: Api) -> None:
    """Each token failure answers 401 with its oauth2 error, a Bearer challenge and no-store."""
    missing = api.client.get("/api/v4/leads")
    assert missing.status_code == 401
    assert missing.json() == {"error": "access_denied", "error_description": "OAuth2 authentication required"}
    assert missing.headers["www-authenticate"] == (
        'Bearer realm="Service", error="access_denied", error_description="OAuth2 authentication required"'
    )
    assert missing.headers["cache-control"] == "no-store"
    unknown = api.client.get("/api/v4/leads", headers={"Authorization": "Bearer nope"})
    assert unknown.json()["error_description"] == "The access token provided is invalid."
    lowercase = api.client.get("/api/v4/leads", headers={"Authorization": f"bearer {api.token}"})
    assert lowercase.json()["error"] == "access_denied"
    api.clock.advance(3601)
    expired = api.get("/api/v4/leads")
    assert expired.status_code == 401
    assert expired.json() == {"error": "invalid_grant", "error_description": "The access token provided has expired."}
    fresh = login(api.client).json()["access_token"]
    api.sim.expire_tokens()
    assert api.client.get("/api/v4/leads", headers={"Authorization": f"Bearer {fresh}"}).status_code == 401


def test_token_sources_query_body_and_two_at_once(api: Api) -> None:
    """The query token works, a form-body token is read on POST, and two sources are a 400."""
    assert api.client.get(f"/api/v4/leads?access_token={api.token}").status_code == 200
    both = api.get("/api/v4/leads", f"access_token={api.token}")
    assert both.status_code == 400 and both.json()["error"] == "invalid_request"
    assert "www-authenticate" in both.headers
    body_only = api.client.post("/api/v4/leads", data={"access_token": api.token})
    assert body_only.status_code == 405
    header_and_body = api.client.post(
        "/api/v4/leads", data={"access_token": api.token}, headers={"Authorization": f"Bearer {api.token}"}
    )
    assert header_and_body.status_code == 400
    kinds = [r.auth_kind for r in api.sim.requests if r.path == "/api/v4/leads"]
    assert kinds == ["query", "multiple", "body", "multiple"]


def test_password_expired_still_logs_in_but_api_calls_fail(api: Api) -> None:
    """With an expired password login says so and every API call is 401 access_denied."""
    api.sim.password_expired = True
    body = login(api.client).json()
    assert body["password_expired"] is True
    denied = api.client.get("/api/v4/campaigns", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert denied.status_code == 401 and denied.json()["error"] == "access_denied"


def test_refresh_token_rotates(api: Api) -> None:
    """The legacy token route grants on a refresh token once, and the old one then fails."""
    body = login(api.client).json()
    form = {
        "grant_type": "refresh_token",
        "refresh_token": body["refresh_token"],
        "client_id": body["client_id"],
        "client_secret": body["client_secret"],
    }
    first = api.client.post("/oauth/v2/token", data=form)
    assert first.status_code == 200 and set(first.json()) == {
        "access_token", "expires_in", "token_type", "scope", "refresh_token"
    }  # fmt: skip
    again = api.client.post("/oauth/v2/token", data=form)
    assert again.status_code == 400 and again.json()["error_description"] == "Invalid refresh token"


# -- date filters -------------------------------------------------------------------------


def test_each_date_operator_at_the_boundary_second(api: Api) -> None:
    """before/after include the boundary second, strictly_* exclude it, on createdTs and updatedTs."""
    campaign = api.sim.add_campaign()["id"]
    at = datetime(2024, 10, 28, 9, 30, 15, tzinfo=UTC)
    lead = api.sim.add_lead(campaign, created=at)["id"]
    api.clock.advance(60)
    api.sim.update_lead(lead, firstName="Boundary")
    updated = api.sim.lead(lead)["updatedTs"]
    assert updated == "2024-10-28T12:01:00+00:00"
    for prop, stamp in (("createdTs", "2024-10-28T09:30:15"), ("updatedTs", "2024-10-28T12:01:00")):
        assert api.ids(f"{prop}[before]={stamp}") == [lead]
        assert api.ids(f"{prop}[strictly_before]={stamp}") == []
        assert api.ids(f"{prop}[after]={stamp}") == [lead]
        assert api.ids(f"{prop}[strictly_after]={stamp}") == []


def test_date_filters_compare_wall_clock_digits_across_the_end_of_bst(api: Api) -> None:
    """Offsets are dropped: a +01:00 lead can sort after a later +00:00 lead, as in Doctrine."""
    campaign = api.sim.add_campaign()["id"]
    bst = api.sim.add_lead(campaign, created=london("2024-10-27T01:30:00+01:00"))  # 00:30 UTC
    gmt = api.sim.add_lead(campaign, created=london("2024-10-27T01:10:00+00:00"))  # 01:10 UTC, later
    assert (bst["createdTs"], gmt["createdTs"]) == ("2024-10-27T01:30:00+01:00", "2024-10-27T01:10:00+00:00")
    assert api.ids("createdTs%5Bafter%5D=2024-10-27T01:20:00%2B00:00") == [bst["id"]]
    assert api.ids("createdTs[strictly_before]=2024-10-27T01:20:00%2B01:00") == [gmt["id"]]
    assert api.ids("createdTs[after]=2024-10-27T01:20:00Z") == [bst["id"]]
    # @unix values are UTC digits in PHP: 01:20 UTC, so only the 01:30 wall-clock lead.
    unix = int(datetime(2024, 10, 27, 1, 20, tzinfo=UTC).timestamp())
    assert api.ids(f"createdTs[after]=@{unix}") == [bst["id"]]


def test_unparseable_and_malformed_date_filters_are_ignored(api: Api) -> None:
    """Unparseable values, missing brackets and unknown operators leave the list unfiltered."""
    campaign = api.sim.add_campaign()["id"]
    ids = [api.sim.add_lead(campaign, created=START - timedelta(days=d))["id"] for d in (3, 2, 1)]
    for query in (
        "createdTs[after]=not-a-date",
        "createdTs=2030-01-01",
        "createdTs[gt]=2030-01-01",
        "createdTs[after]=2024-13-01",
        # An unencoded + becomes a space: "...T01:20:00 01:00" is a double time for PHP, so ignored.
        "createdTs[after]=2030-01-01T01:20:00+01:00",
        "createdTs%5bafter%5d=2030-01-01",
    ):
        assert api.ids(query) == ids, query
    # ...whereas a date-only value with an unencoded offset parses as a time of day.
    assert api.ids("createdTs[strictly_before]=2024-10-26+12:00") == ids[:1]
    assert api.ids("createdTs[after]=2024-10-26&createdTs[before]=2024-10-27") == ids[1:2]


# -- search, order, paging ------------------------------------------------------------------


def test_search_filters_take_ids_and_iris_and_ignore_non_integers(api: Api) -> None:
    """id[], campaign.id (plain or IRI) and email filter; one non-integer drops that filter only."""
    first, second = api.sim.add_campaign()["id"], api.sim.add_campaign()["id"]
    a = api.sim.add_lead(first)["id"]
    b = api.sim.add_lead(second, email="exact@example.com")["id"]
    c = api.sim.add_lead(second)["id"]
    assert api.ids(f"id[]={a}&id[]=/api/v4/leads/{c}") == [a, c]
    assert api.ids(f"id={b}") == [b]
    assert api.ids(f"campaign.id=/api/v4/campaigns/{second}") == [b, c]
    assert api.ids(f"campaign.id[]={first}&campaign.id[]={second}") == [a, b, c]
    assert api.ids("email=exact@example.com") == [b]
    assert api.ids("email=EXACT@example.com") == []
    assert api.ids(f"id[]={a}&id[]=abc") == [a, b, c]
    assert api.ids(f"campaign.id=abc&id={a}") == [a]
    assert api.ids(f"campaign.id={second}&order[id]=desc") == [c, b]
    assert api.ids("order[id]=sideways") == [a, b, c]


def test_paging_errors_clamps_and_past_the_end(api: Api) -> None:
    """page<1 is a 400 hydra:Error, itemsPerPage is clamped to 100, past the end is an empty 200."""
    api.sim.add_leads(130)
    for page in ("0", "abc", "-1"):
        bad = api.get("/api/v4/leads", f"page={page}")
        assert bad.status_code == 400
        assert bad.json() == {
            "@context": "/api/v4/contexts/Error",
            "@type": "hydra:Error",
            "hydra:title": "An error occurred",
            "hydra:description": "Page should not be less than 1",
        }
    assert api.get("/api/v4/leads", "itemsPerPage=-1").status_code == 400
    big = api.get("/api/v4/leads", "itemsPerPage=500").json()
    assert len(big["hydra:member"]) == 100 and big["hydra:totalItems"] == 130
    assert len(api.get("/api/v4/leads").json()["hydra:member"]) == 30
    past = api.get("/api/v4/leads", "itemsPerPage=100&page=9").json()
    assert past["hydra:member"] == [] and past["hydra:totalItems"] == 130


def test_view_links_for_first_middle_last_and_single_pages(api: Api) -> None:
    """hydra:view keeps the query in order, re-appends page last and encodes keys RFC 3986."""
    api.sim.add_leads(5)
    q = "/api/v4/leads.jsonld?createdTs%5Bafter%5D=2024-01-01&itemsPerPage=2"
    first = api.get("/api/v4/leads.jsonld", "createdTs[after]=2024-01-01&itemsPerPage=2").json()["hydra:view"]
    assert first == {
        "@id": f"{q}&page=1",
        "@type": "hydra:PartialCollectionView",
        "hydra:first": f"{q}&page=1",
        "hydra:last": f"{q}&page=3",
        "hydra:next": f"{q}&page=2",
    }
    middle = api.get("/api/v4/leads.jsonld", "page=2&createdTs[after]=2024-01-01&itemsPerPage=2").json()
    assert middle["hydra:view"]["@id"] == f"{q}&page=2"
    assert middle["hydra:view"]["hydra:previous"] == f"{q}&page=1"
    assert middle["hydra:view"]["hydra:next"] == f"{q}&page=3"
    last = api.get("/api/v4/leads.jsonld", "createdTs[after]=2024-01-01&itemsPerPage=2&page=3").json()
    assert "hydra:next" not in last["hydra:view"] and last["hydra:view"]["hydra:previous"] == f"{q}&page=2"
    with_token = api.client.get(f"/api/v4/leads?itemsPerPage=2&access_token={api.token}&page=2").json()
    assert with_token["hydra:view"]["hydra:next"] == f"/api/v4/leads?itemsPerPage=2&access_token={api.token}&page=3"
    single = api.get("/api/v4/leads", "itemsPerPage=10&page=1").json()
    assert single["hydra:view"] == {"@id": "/api/v4/leads?itemsPerPage=10", "@type": "hydra:PartialCollectionView"}
    assert "hydra:view" not in api.get("/api/v4/leads").json()
    assert "hydra:view" not in api.get("/api/v4/leads", "page=2").json()


def test_next_past_the_last_page_only_with_legacy_next(api: Api) -> None:
    """Pre-2.5.5 API Platform pointed next past the end; the fixed behaviour stops at the last page."""
    api.sim.add_leads(4)
    fixed = api.get("/api/v4/leads", "itemsPerPage=2&page=5").json()["hydra:view"]
    assert "hydra:next" not in fixed
    api.sim.faults.legacy_next = True
    legacy = api.get("/api/v4/leads", "itemsPerPage=2&page=5").json()["hydra:view"]
    assert legacy["hydra:next"] == "/api/v4/leads?itemsPerPage=2&page=6"
    assert "hydra:next" not in api.get("/api/v4/leads", "itemsPerPage=2&page=2").json()["hydra:view"]


def test_search_templates_match_the_quick_start_and_can_drop_updated_ts(api: Api) -> None:
    """hydra:search is Convertr's published template; drop_updated_ts_filter removes and ignores it."""
    leads = api.get("/api/v4/leads").json()["hydra:search"]
    assert leads["hydra:template"] == QUICK_START_LEAD_TEMPLATE
    assert leads["hydra:mapping"][3] == {
        "@type": "IriTemplateMapping", "variable": "campaign.id", "property": "campaign.id", "required": False
    }  # fmt: skip
    campaigns = api.get("/api/v4/campaigns").json()["hydra:search"]
    assert campaigns["hydra:template"] == QUICK_START_CAMPAIGN_TEMPLATE
    impressions = [m for m in campaigns["hydra:mapping"] if m["variable"] == "order[statistics.impressions]"]
    assert impressions[0]["property"] == "query"
    lead = api.sim.add_lead(created=START - timedelta(days=2))["id"]
    assert api.ids("updatedTs[after]=2024-10-28") == []
    api.sim.faults.drop_updated_ts_filter = True
    assert "updatedTs" not in api.get("/api/v4/leads").json()["hydra:search"]["hydra:template"]
    assert api.ids("updatedTs[after]=2024-10-28") == [lead]


# -- formats and errors ---------------------------------------------------------------------


def test_formats_items_and_not_found(api: Api) -> None:
    """Items carry @context; Accept json gives a plain array; bad formats are 404/406; unknown ids 404."""
    lead = api.sim.add_lead()
    item = api.get(f"/api/v4/leads/{lead['id']}").json()
    assert list(item)[:3] == ["@context", "@id", "@type"] and item["@context"] == "/api/v4/contexts/Lead"
    assert item["leadData"][0]["name"] == "emailDomain" and item["campaign"].startswith("/api/v4/campaigns/")
    assert api.get(f"/api/v4/leads/{lead['id']}.jsonld").json()["id"] == lead["id"]
    plain = api.get("/api/v4/leads", accept="application/json")
    assert plain.headers["content-type"].startswith("application/json")
    assert isinstance(plain.json(), list) and "@id" not in plain.json()[0]
    assert api.get("/api/v4/leads", accept="text/html").status_code == 406
    assert api.get("/api/v4/leads.jsonld", accept="application/json").status_code == 406
    assert api.get("/api/v4/leads.xml").status_code == 404
    missing = api.get("/api/v4/leads/999999")
    assert missing.status_code == 404
    assert missing.json() == {
        "@context": "/api/v4/contexts/Error",
        "@type": "hydra:Error",
        "hydra:title": "An error occurred",
        "hydra:description": "Not Found",
    }
    assert api.get("/api/v4/campaigns/1").status_code == 404


def test_responses_use_http11_content_length_and_a_virtual_date(api: Api) -> None:
    """Every answer has Content-Length and a Date header following the virtual clock."""
    api.sim.advance(86_400)
    response = api.get("/api/v4/campaigns")
    assert response.http_version == "HTTP/1.1"
    assert int(response.headers["content-length"]) == len(response.content)
    assert parsedate_to_datetime(response.headers["date"]) == START + timedelta(days=1)
    assert api.sim.now() == START + timedelta(days=1)


# -- time-driven state ----------------------------------------------------------------------


def test_campaign_status_follows_the_clock_without_writes(api: Api) -> None:
    """Passing startTs or endTs changes status with no write and no updatedTs change."""
    campaign = api.sim.add_campaign(startTs=START + timedelta(hours=1), endTs=START + timedelta(hours=2))
    cid = campaign["id"]
    statuses = []
    for _ in range(3):
        api.token = login(api.client).json()["access_token"]
        doc = api.get(f"/api/v4/campaigns/{cid}").json()
        statuses.append((doc["status"], doc["updatedTs"]))
        api.clock.advance(3600 + 1)
    assert [s for s, _ in statuses] == ["Inactive", "Active", "Ended"]
    api.token = login(api.client).json()["access_token"]
    assert len({u for _, u in statuses}) == 1
    assert api.ids("status[]=Ended", "/api/v4/campaigns") == [cid]


def test_pause_resume_setup_and_allocation(api: Api) -> None:
    """Pausing and resuming bump updatedTs; an unsigned contract and a met allocation show too."""
    cid = api.sim.add_campaign(leadsRequired=2)["id"]
    api.clock.advance(5)
    assert api.sim.pause_campaign(cid)["status"] == "Paused"
    assert api.sim.campaign(cid)["updatedTs"] == "2024-10-28T12:00:05+00:00"
    assert api.sim.resume_campaign(cid)["status"] == "Active"
    api.sim.add_lead(cid, qaResult="Valid")
    api.sim.add_lead(cid, qaResult="Invalid")
    assert api.sim.campaign(cid)["status"] == "Active"
    api.sim.add_lead(cid, qaResult="Valid")
    doc = api.get(f"/api/v4/campaigns/{cid}").json()
    assert doc["status"] == "Ended" and doc["statistics"]["validLeads"] == 2
    assert api.sim.add_campaign(signTs=None)["status"] == "Setup Required"


def test_late_lead_is_invisible_until_revealed(api: Api) -> None:
    """A hidden lead is absent everywhere, then appears with its old createdTs and a fresh updatedTs."""
    cid = api.sim.add_campaign()["id"]
    late = api.sim.add_lead(cid, created=START - timedelta(hours=2), visible=False)["id"]
    assert api.ids() == [] and api.get(f"/api/v4/leads/{late}").status_code == 404
    api.clock.advance(30)
    api.sim.reveal_lead(late)
    doc = api.get(f"/api/v4/leads/{late}").json()
    assert doc["createdTs"] == "2024-10-28T10:00:00+00:00" and doc["updatedTs"] == "2024-10-28T12:00:30+00:00"
    assert api.ids("createdTs[after]=2024-10-28T11:00:00") == []
    assert api.ids("updatedTs[after]=2024-10-28T12:00:00") == [late]


def test_update_lead_changes_data_flags_and_updated_ts(api: Api) -> None:
    """Lead data by name, QA and flag names become nested objects, and updatedTs moves."""
    lead = api.sim.add_lead(qaResult="Caution")
    api.clock.advance(90)
    doc = api.sim.update_lead(lead["id"], lead_data={"jobTitle": "CEO", "seniority": "C-level"}, qaResult="Valid")
    assert doc["qaResult"] == {"@id": "/api/v4/lead-qa-results/1", "@type": "LeadQaResult", "name": "Valid"}
    assert doc["advertiserBillable"] is True and doc["updatedTs"] == "2024-10-28T12:01:30+00:00"
    served = api.get(f"/api/v4/leads/{lead['id']}").json()
    data = {d["name"]: d["value"] for d in served["leadData"]}
    assert data["jobTitle"] == "CEO" and data["seniority"] == "C-level"
    flagged = api.sim.update_lead(lead["id"], leadFlag="Test")
    assert flagged["leadFlag"]["name"] == "Test"
    with pytest.raises(ValueError):
        api.sim.update_lead(lead["id"], notAField=1)


# -- admin, limits, faults ------------------------------------------------------------------


def test_admin_endpoints_drive_the_simulator(api: Api) -> None:
    """The /_sim/ API adds, edits and reveals leads, edits campaigns, moves the clock and reports."""
    c = api.client
    campaign = c.post("/_sim/campaigns", json={"leadsRequired": 5}).json()
    lead = c.post("/_sim/leads", json={"campaign_id": campaign["id"], "visible": False}).json()
    assert c.patch(f"/_sim/leads/{lead['id']}", json={"firstName": "Ada"}).json()["firstName"] == "Ada"
    assert c.post(f"/_sim/leads/{lead['id']}/reveal", headers=ADMIN).status_code == 200
    assert api.ids() == [lead["id"]]
    assert c.patch(f"/_sim/campaigns/{campaign['id']}", json={"name": "Renamed"}).json()["name"] == "Renamed"
    assert c.post("/_sim/clock", json={"advance": 60}).json()["now"] == "2024-10-28T12:01:00+00:00"
    assert c.post("/_sim/faults", json={"legacy_next": True}).json()["legacy_next"] is True
    assert c.post("/_sim/faults", json={"bogus": 1}).status_code == 400
    assert c.post("/_sim/expire-tokens", headers=ADMIN).status_code == 200
    assert api.get("/api/v4/leads").status_code == 401
    bulk = c.post("/_sim/leads/bulk", json={"count": 3}).json()
    assert bulk["count"] == 3
    stats = c.get("/_sim/stats").json()
    assert stats["leads"] == 4 and stats["campaigns"] == 1 and stats["logins"] == 1
    assert c.patch("/_sim/leads/1", json={}).status_code == 404
    outside = handle_admin(api.sim, Request("GET", "/_sim/stats", client="10.0.0.8"))
    assert outside.status == 403


def test_foreign_host_names_are_refused(api: Api) -> None:
    """Only requests naming a loopback host are served: a rebound name gets 421, on the API and the admin."""
    port = str(httpx.URL(str(api.client.base_url)).port)
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "localhost:99999x", "[::1"):
        assert api.get("/api/v4/leads", Host=host).status_code == 421, host
        assert login_as(api.client, host).status_code == 421, host
        assert api.client.get("/_sim/stats", headers={"Host": host}).status_code == 421, host
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "[::1]"):
        assert api.get("/api/v4/leads", Host=host).status_code == 200, host
    assert api.sim.logins == 1


def login_as(client: httpx.Client, host: str) -> httpx.Response:
    form = {"username": DEFAULT_USERNAME, "password": DEFAULT_PASSWORD}
    return client.post("/api/login", data=form, headers={"Host": host})


def test_admin_changes_refuse_what_a_web_page_can_send(api: Api) -> None:
    """A cross-site form post (text/plain, no body, or a foreign Origin) cannot change the simulator."""
    c = api.client
    text_plain = c.post("/_sim/faults", content=b'{"hang": true}', headers={"Content-Type": "text/plain"})
    assert text_plain.status_code == 403 and "X-Simulator" in text_plain.json()["error"]
    form = c.post("/_sim/faults", data={"hang": "true"})
    assert form.status_code == 403
    assert c.post("/_sim/expire-tokens").status_code == 403
    foreign = c.post("/_sim/faults", json={"hang": True}, headers={"Origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert c.post("/_sim/faults", json={"hang": True}, headers={"Origin": "null"}).status_code == 403
    assert api.sim.faults.hang is False
    assert api.get("/api/v4/leads").status_code == 200
    assert c.post("/_sim/faults", json={"latency": 0.001}).json()["latency"] == 0.001
    assert c.post("/_sim/clock", content=b'{"advance": 1}', headers=ADMIN).status_code == 200
    local = {"Origin": f"http://localhost:{httpx.URL(str(c.base_url)).port}", **ADMIN}
    assert c.post("/_sim/expire-tokens", headers=local).status_code == 200
    assert c.get("/_sim/stats").status_code == 200


def test_rolling_rate_limits_answer_429_with_retry_after() -> None:
    """Logins and requests over the rolling window get 429 until the window frees, by the virtual clock."""
    clock = FakeClock(START.timestamp())
    sim = Simulator(clock=clock, rate_limit=True)
    sim.request_limit = RollingLimit(150, 300)
    with SimulatorServer(sim) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(100):
            assert login(client).status_code == 200
            clock.advance(1)
        refused = login(client)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "200"
        clock.advance(199)
        assert login(client).status_code == 429
        clock.advance(1)
        token = login(client).json()["access_token"]
        clock.advance(300)
        headers = {"Authorization": f"Bearer {token}"}
        served = 0
        while client.get("/api/v4/campaigns", headers=headers).status_code == 200:
            served += 1
        assert served == 150
        assert client.get("/api/v4/campaigns", headers=headers).headers["retry-after"] == "300"
        clock.advance(300)
        assert client.get("/api/v4/campaigns", headers=headers).status_code == 200
    assert sim.logins == 101


def test_injected_faults(api: Api) -> None:
    """Forced 429s, 5xx, truncated bodies and a hang each show up, then clear."""
    faults = api.sim.faults
    faults.rate_limit_429, faults.retry_after = 2, 7
    assert [api.get("/api/v4/leads").status_code for _ in range(3)] == [429, 429, 200]
    assert api.sim.requests[-2].status == 429
    faults.error_rate = 1.0
    assert {api.get("/api/v4/leads").status_code for _ in range(12)} <= {500, 502, 503}
    faults.error_rate, faults.malformed_rate = 0.0, 1.0
    broken = api.get("/api/v4/campaigns")
    assert broken.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken.content)
    faults.malformed_rate, faults.hang = 0.0, True
    with pytest.raises(httpx.ReadTimeout):
        api.client.get("/api/v4/leads", headers={"Authorization": f"Bearer {api.token}"}, timeout=0.2)
    assert api.client.get("/_sim/stats").status_code == 200
    faults.hang, faults.latency = False, 0.05
    slow = api.get("/api/v4/leads")
    assert slow.status_code == 200 and slow.elapsed >= timedelta(seconds=0.05)


# -- data and parsing -------------------------------------------------------------------------


def test_seed_data_is_deterministic_and_varied() -> None:
    """One seed gives the same documents; seeded campaigns cover several statuses."""

    def snapshot(seed: int) -> tuple[list[Any], list[Any]]:
        sim = Simulator(seed=seed, clock=FakeClock(START.timestamp()))
        sim.seed_data(campaigns=7, leads=40)
        return [sim.campaign(c) for c in sim.campaign_ids()], [sim.lead(i) for i in sim.lead_ids()]

    campaigns, leads = snapshot(3)
    assert (campaigns, leads) == snapshot(3)
    assert len(leads) == 40 and leads != snapshot(4)[1]
    assert {c["status"] for c in campaigns} == {"Active", "Inactive", "Paused", "Setup Required", "Ended"}
    assert all(london(lead["createdTs"]) <= START for lead in leads)


def test_query_strings_parse_and_rebuild_like_php() -> None:
    """parse_str nesting, + as space, later keys overwrite in place; rebuilt keys are RFC 3986."""
    params = parse_query("a=1&createdTs%5Bafter%5D=x+y&id[]=1&id[]=2&a=3&campaign.id=4")
    assert params == {"a": "3", "createdTs": {"after": "x y"}, "id": {"0": "1", "1": "2"}, "campaign.id": "4"}
    assert build_query(params) == "a=3&createdTs%5Bafter%5D=x%20y&id%5B%5D=1&id%5B%5D=2&campaign.id=4"
