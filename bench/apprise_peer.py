"""Apprise as a peer: the same backfill sent as N notifications, one by one, through apprise's json:// target.

    python -m bench.apprise_peer API URL N

Reads the leads as the plain baseline does (apprise has no source side), then calls
`Apprise.notify(title="lead.created", body=<JSON of the lead>)` once per lead. Exits 0 when it
read N leads and every notify succeeded. Needs the `bench` extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit

import apprise
import httpx

from bench.plain import walk


async def read_leads(api: str) -> list[dict[str, Any]]:
    """Every lead of the backfill query, through the plain baseline's walk."""
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:
        return await walk(client)


def json_target(url: str) -> str:
    """apprise's spelling of an HTTP JSON endpoint: `http://host:port/path` becomes `json://host:port/path`."""
    parts = urlsplit(url)
    return f"json://{parts.netloc}{parts.path}"


def main(api: str, url: str, n: int) -> int:
    """Read, then notify one lead at a time; 0 when all N leads were read and notified."""
    leads = asyncio.run(read_leads(api))
    if len(leads) != n:
        print(f"read {len(leads)} leads, expected {n}", file=sys.stderr)
        return 1
    notifier = apprise.Apprise()
    if not notifier.add(json_target(url)):
        print(f"apprise refused {json_target(url)}", file=sys.stderr)
        return 1
    failed = sum(not notifier.notify(title="lead.created", body=json.dumps(lead)) for lead in leads)
    if failed:
        print(f"{failed} of {n} notifications failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
