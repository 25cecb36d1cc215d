"""`forget --lead ID` honours an erasure request: the person's bytes leave the state file, a tombstone stays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from tests.support.backends import Backend
from tests.support.daemon import cli, webhook_sink, write_config
from tests.support.postgres import Database
from tests.support.receiver import Receiver


def _raw(folder: Path) -> bytes:
    """Every byte of the state file and its companions, as a disk image would hold them."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob("state.db*")) if p.is_file())


def _created(receiver: Receiver) -> list[dict[str, object]]:
    posts = [r.json() for r in receiver.requests if r.method == "POST" and r.status == 200]
    return [e["data"]["lead"] for e in posts if e["type"] == "lead.created"]


def test_forget_erases_one_lead_and_keeps_it_from_coming_back(tmp_path: Path, sim, receiver: Receiver) -> None:
    """After forget, the lead's e-mail is nowhere in the raw file bytes, others' are, and it is not announced again."""
    _simulator, server = sim
    config = write_config(
        tmp_path, server.url, [webhook_sink(receiver.url)], leads={"start": "2000-01-01T00:00:00Z", "lookback": "1d"}
    )
    assert cli("once", "-c", str(config)).returncode == 0
    leads = [lead for lead in _created(receiver) if lead.get("email")]
    assert len(leads) >= 2
    target, other = leads[0], leads[1]
    email, kept = str(target["email"]).encode(), str(other["email"]).encode()
    assert email in _raw(tmp_path)

    result = cli("forget", "-c", str(config), "--lead", str(target["id"]))
    assert result.returncode == 0, result.stderr
    assert f"lead {target['id']} forgotten: 1 events" in result.stdout
    raw = _raw(tmp_path)
    assert email not in raw, "the e-mail is still in the state file's bytes"
    assert kept in raw, "another lead's data went too"

    before = len(_created(receiver))
    assert cli("once", "-c", str(config)).returncode == 0  # the 1-day lookback reads the lead again
    assert len(_created(receiver)) == before, "the forgotten lead was announced again"
    assert email not in _raw(tmp_path)


def test_a_forgotten_lead_stays_forgotten_when_it_changes(tmp_path: Path, sim, receiver: Receiver) -> None:  # type: ignore[no-untyped-def]
    """After `forget`, later edits of the lead neither refill its row nor send anything about it."""
    simulator, server = sim
    config = write_config(tmp_path, server.url, [webhook_sink(receiver.url)], leads={"updates": True})
    assert cli("once", "-c", str(config)).returncode == 0
    lead = simulator.lead_ids()[0]
    email = simulator.lead(lead)["email"]
    assert cli("forget", "-c", str(config), "--lead", str(lead)).returncode == 0
    for qa in ("Invalid", "Valid"):
        simulator.advance(5)
        simulator.update_lead(lead, qaResult=qa)
        assert cli("once", "-c", str(config)).returncode == 0
    assert all(r.json()["data"]["lead"]["id"] != lead for r in receiver.requests)
    state = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*") if p.is_file())
    assert email.encode() not in state


def test_forget_erases_attempts_whose_events_were_pruned(backend: Backend) -> None:
    """The attempt log outlives delivered events; erasing a lead still finds its attempts by resource."""
    from watcher.events import Event
    from watcher.records import PageCommit
    from watcher.state.records import Outcome

    store = backend.open()
    event = Event("evt_x", "lead.created", "t", {"lead": {"id": 7}}, "lead:7")
    store.commit_page(PageCommit("leads.created", 1.0, events=[(event, ["crm"])]))
    [due] = store.due("crm", 2.0, 10)
    store.record_outcomes(
        "crm",
        [Outcome(due.seq, due.event_id, "delivered", 1, 2.0, None)],
        now=2.0,
        status_code=200,
        duration=0.1,
        success=True,
    )
    store.prune(10**6, delivered_retention=0, attempt_retention=10**9, snapshot_retention=10**9)
    assert store.events() == [] and len(store.attempts()) == 1
    assert store.forget(7, 3.0)["attempts"] == 1
    assert store.attempts() == []
    store.close()


def _tuples_holding(db: Database, schema: str, needle: bytes) -> dict[str, int]:
    """Per table of `schema`, how many row versions in its heap pages, live or dead, hold `needle`:
    read page by page with pageinspect, as the bytes lie in the table's files, not as a query sees them."""
    found: dict[str, int] = {}
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        tables = [t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))]
        for table in tables:
            name = f"{schema}.{table}"
            pages = conn.execute("SELECT pg_relation_size(%s::regclass) / 8192", (name,)).fetchone()
            assert pages is not None
            for page in range(int(pages[0])):
                rows: list[Any] = conn.execute(
                    "SELECT t_data FROM heap_page_items(get_raw_page(%s, %s))", (name, page)
                ).fetchall()
                hits = sum(1 for (data,) in rows if data is not None and needle in bytes(data))
                if hits:
                    found[table] = found.get(table, 0) + hits
    return found


def test_forget_on_postgresql_leaves_no_row_version_holding_the_lead(postgres_db: Database, tmp_path: Path) -> None:
    """PostgreSQL keeps a deleted or updated row's old version in the page until VACUUM: after `forget`,
    no version of any row in the state's tables, live or dead, holds the lead's e-mail; another lead's stays."""
    from watcher.events import Event
    from watcher.records import LeadState, PageCommit

    backend = Backend("postgresql", tmp_path, postgres_db)
    store = backend.open()
    schema = backend.state().postgres.schema  # type: ignore[union-attr]
    email, kept = b"forget-me-7@example.org", b"keep-me-8@example.org"
    leads = [LeadState(n, 1.0, None, {"email": e.decode()}) for n, e in ((7, email), (8, kept))]
    events = [
        (Event(f"evt_{n}", "lead.created", "t", {"lead": {"id": n, "email": e.decode()}}, f"lead:{n}"), ["crm"])
        for n, e in ((7, email), (8, kept))
    ]
    store.commit_page(PageCommit("leads.created", 1.0, leads=leads, events=events))
    assert _tuples_holding(postgres_db, schema, email) == {"leads": 1, "events": 1}
    assert store.forget(7, 2.0) == {"events": 1, "deliveries": 1, "attempts": 0}
    assert _tuples_holding(postgres_db, schema, email) == {}
    assert _tuples_holding(postgres_db, schema, kept) == {"leads": 1, "events": 1}
    assert store.tombstones() == [(7, 2.0)]
    store.close()
