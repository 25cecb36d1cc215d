"""The state file's schema: each migration moves it one version forward.

PRAGMA user_version records how far a file has come; `migrate` applies the rest, each in its own
transaction, and refuses a file from a newer release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from watcher.errors import StateTooNew

if TYPE_CHECKING:
    from watcher.state.connection import Connection

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE cursors (
        stream TEXT PRIMARY KEY,
        cursor TEXT,                 -- the newest timestamp exactly as the API wrote it
        cursor_ts REAL,              -- the same instant in Unix seconds (lag metrics)
        walk_from TEXT,              -- filter bound of a walk in progress: a crash resumes from here
        baseline_until REAL,         -- during a first walk: the baseline is leads created up to here (campaigns: ids)
        last_poll_at REAL,
        last_success_at REAL,
        last_error TEXT,
        polls INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE leads (
        id INTEGER PRIMARY KEY,
        created_ts REAL NOT NULL,
        version TEXT,                -- updatedTs of the snapshot
        snapshot TEXT NOT NULL,      -- tracked fields only, compact JSON
        changed_at REAL NOT NULL     -- when the snapshot last changed: pruning age
    );
    CREATE INDEX leads_changed ON leads(changed_at);
    CREATE TABLE campaigns (
        id INTEGER PRIMARY KEY,
        status TEXT NOT NULL,
        transitions INTEGER NOT NULL DEFAULT 0,
        seen_at REAL NOT NULL
    );
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        type TEXT NOT NULL,
        resource TEXT NOT NULL,
        campaign_id INTEGER,
        payload TEXT NOT NULL,       -- {"type", "timestamp", "data"} as detected, before per-sink filtering
        detected_at REAL NOT NULL,
        -- Ids are hashes: indexed alone, every insert would land on a random page. Led by the
        -- resource (lead ids grow with time), a backfill appends instead.
        UNIQUE (resource, id)
    );
    CREATE TABLE deliveries (
        event_seq INTEGER NOT NULL REFERENCES events(seq) ON DELETE CASCADE,
        sink TEXT NOT NULL,
        resource TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        delivered_at REAL,
        PRIMARY KEY (sink, event_seq)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries(sink, status, next_attempt_at);
    CREATE INDEX deliveries_resource ON deliveries(sink, resource, status, event_seq);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        sink TEXT NOT NULL,
        event_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status_code INTEGER,
        duration REAL NOT NULL,
        error TEXT,
        at REAL NOT NULL
    );
    CREATE INDEX attempts_at ON attempts(at);
    CREATE TABLE sinks (
        name TEXT PRIMARY KEY,
        fingerprint TEXT,
        disabled_at REAL,
        disabled_reason TEXT,
        failing_since REAL,
        last_success_at REAL,
        last_failure_at REAL
    );
    """,
    # 2: campaign names, so messages about a lead can name its campaign (a lead carries only its IRI)
    """
    ALTER TABLE campaigns ADD COLUMN name TEXT;
    """,
    # 3: event ids chained on the change before them (not on counters a fresh file restarts), the
    # track list each snapshot was taken under, the created walk's permanent baseline floor, the
    # snapshot baseline's progress, and leads the server cannot serialise.
    """
    ALTER TABLE leads ADD COLUMN track TEXT;
    ALTER TABLE leads ADD COLUMN last_event TEXT;
    ALTER TABLE campaigns ADD COLUMN last_event TEXT;
    ALTER TABLE cursors ADD COLUMN floor REAL;
    ALTER TABLE cursors ADD COLUMN progress INTEGER;
    ALTER TABLE cursors ADD COLUMN resume_after INTEGER; -- a resumable walk's last id: it re-reads until it overlaps
    CREATE TABLE tracks (
        signature TEXT PRIMARY KEY,
        track TEXT NOT NULL          -- the JSON list of tracked fields
    );
    CREATE TABLE unreadable (
        stream TEXT NOT NULL,
        lead_id INTEGER NOT NULL,
        first_seen REAL NOT NULL,
        last_tried REAL NOT NULL,
        next_try REAL NOT NULL,
        tries INTEGER NOT NULL DEFAULT 1,
        error TEXT,
        emit_after REAL,             -- created: announced once readable only if created after this
        PRIMARY KEY (stream, lead_id)
    );
    """,
    # 4: what the receiver answered, kept with each attempt (URL redacted, scrubbed, cut short), so
    # `events --attempts` can show an operator why a delivery failed before a replay.
    """
    ALTER TABLE attempts ADD COLUMN excerpt TEXT;
    """,
    # 5: attempts name their resource, so erasing a lead finds its attempt log after its events are
    # pruned (the attempt log outlives delivered events by default).
    """
    ALTER TABLE attempts ADD COLUMN resource TEXT;
    UPDATE attempts SET resource = (SELECT e.resource FROM events e WHERE e.id = attempts.event_id);
    CREATE INDEX attempts_resource ON attempts(resource);
    """,
    # 6: the dispatcher reads pending deliveries in seq order from where its last read ended; the
    # due index (ordered by time) made every read sort all due rows, a cost growing with the queue.
    """
    CREATE INDEX deliveries_pending ON deliveries(sink, event_seq, next_attempt_at, attempts) WHERE status = 'pending';
    """,
    # 7: whether a delivery's last attempt was answered with a Retry-After, as a column rather than
    # a phrase searched for in the error text: a re-timing on a new retry_schedule never shortens
    # that wait. Deliveries waiting now take it from the error text the attempt left.
    """
    ALTER TABLE deliveries ADD COLUMN asked_to_wait INTEGER NOT NULL DEFAULT 0;
    UPDATE deliveries SET asked_to_wait = 1 WHERE status = 'pending' AND last_error LIKE '%(receiver asked to wait %';
    """,
)


def migrate(state: Connection) -> None:
    """Bring the open file to the schema this release knows (StateTooNew for a newer file)."""
    version = state.conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StateTooNew(
            f"state file {state.path} has schema version {version}, newer than this release knows "
            f"({len(MIGRATIONS)}): upgrade convertr-watcher or restore a matching backup",
            needs=version,
            knows=len(MIGRATIONS),
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        with state.transaction() as c:
            for statement in script.split(";"):
                if statement.strip():
                    c.execute(statement)
            c.execute(f"PRAGMA user_version = {number}")
