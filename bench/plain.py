"""The plain baseline program: what someone would write by hand instead of running the daemon.

    python -m bench.plain API URL N CONCURRENCY

Logs in, walks every page of the backfill query with a bare httpx client, then POSTs each lead
as a signed Standard Webhooks request, CONCURRENCY at a time over one shared client. Exits 0
when it read N leads and every POST got a 2xx. Imports nothing from watcher: signing is plain
hmac, hashlib and base64.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.procs import PASSWORD, SECRET, USERNAME

BACKFILL_PARAMS = {
    "createdTs[strictly_after]": "1999-12-31T23:59:59+00:00",
    "order[id]": "asc",
    "itemsPerPage": "100",
}


async def walk(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Log in and read every page of the backfill query (as cases.plain_walk does); the leads in order."""
    token = (await client.post("/api/login", data={"username": USERNAME, "password": PASSWORD})).json()
    headers = {"Authorization": f"Bearer {token['access_token']}", "Accept": "application/ld+json"}
    leads: list[dict[str, Any]] = []
    page = 1
    while True:
        doc = (await client.get("/api/v4/leads", params={**BACKFILL_PARAMS, "page": str(page)}, headers=headers)).json()
        members = doc["hydra:member"]
        leads += members
        last = doc.get("hydra:view", {}).get("hydra:last", "")
        last_page = int(last.rsplit("page=", 1)[-1]) if "page=" in last else 1
        if not members or page >= last_page:
            return leads
        page += 1


def signed(lead: dict[str, Any], key: bytes) -> tuple[bytes, dict[str, str]]:
    """The body and Standard Webhooks headers of one `lead.created` event."""
    body = json.dumps(
        {"type": "lead.created", "timestamp": datetime.now(UTC).isoformat(), "data": {"lead": lead}}
    ).encode()
    msg_id = f"msg_plain_{lead['id']}"
    stamp = str(int(time.time()))
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return body, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
    }


async def post_all(client: httpx.AsyncClient, url: str, leads: list[dict[str, Any]], concurrency: int) -> int:
    """POST every lead, at most `concurrency` in flight; the number that did not get a 2xx."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    gate = asyncio.Semaphore(concurrency)

    async def one(lead: dict[str, Any]) -> bool:
        async with gate:
            body, headers = signed(lead, key)
            response = await client.post(url, content=body, headers=headers)
            return response.is_success

    results = await asyncio.gather(*(one(lead) for lead in leads))
    return results.count(False)


async def main(api: str, url: str, n: int, concurrency: int) -> int:
    """Walk, then deliver; 0 when all N leads were read and delivered."""
    # The pool must not be the limit: the semaphore is.
    limits = httpx.Limits(max_connections=max(100, concurrency), max_keepalive_connections=max(20, concurrency))
    async with httpx.AsyncClient(base_url=api, timeout=60, limits=limits) as client:
        leads = await walk(client)
        if len(leads) != n:
            print(f"read {len(leads)} leads, expected {n}", file=sys.stderr)
            return 1
        failed = await post_all(client, url, leads, concurrency)
    if failed:
        print(f"{failed} of {n} POSTs did not get a 2xx", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
