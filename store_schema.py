"""Versioned schema migrations for the store (outbox.db) that a rollback can undo.

Standard library only; no project imports. The store's version is SQLite's `PRAGMA user_version`
(0 or 1: BASE_SCHEMA below, which outbox.py creates). A release that changes the schema adds a Migration
to MIGRATIONS with its `up` SQL and the `down` SQL that undoes it without losing readings (drop an
added column or table, never a row of `points`). Applying a migration stores its `down` SQL in the
database itself (table schema_migrations), in the same transaction: an older release, started
after a self-update was rolled back, finds the store newer than it knows and runs those stored
`down` steps, newest first, so it can read and write the store again. Thread-safety: call while
no other thread uses the connection (outbox.py calls it once, when it opens the file).
"""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

BASE_VERSION = 1

# Version 1, the base schema (outbox.py creates it when it opens a store).
BASE_SCHEMA = """
CREATE TABLE IF NOT EXISTS points (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    line TEXT NOT NULL,
    sent_ms INTEGER,
    boot_id TEXT,
    boot_ms INTEGER,
    held INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS points_ready ON points(id) WHERE sent_ms IS NULL AND held = 0;
CREATE INDEX IF NOT EXISTS points_held ON points(boot_id) WHERE held = 1;
CREATE INDEX IF NOT EXISTS points_time ON points(time_ms);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    line TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def add_clock_columns(db: sqlite3.Connection) -> None:
    """A store from before the clock columns (and before versions): add them (no data changes)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(points)")}
    if columns and "held" not in columns:
        db.executescript(
            "ALTER TABLE points ADD COLUMN boot_id TEXT; ALTER TABLE points ADD COLUMN boot_ms INTEGER; "
            "ALTER TABLE points ADD COLUMN held INTEGER NOT NULL DEFAULT 0; DROP INDEX IF EXISTS points_unsent;"
        )


@dataclass(frozen=True)
class Migration:
    """Schema `version` (2, 3, ...): `up` brings version-1 to version, `down` undoes it."""

    version: int
    up: str
    down: str


# This release's migrations, oldest first.
MIGRATIONS: tuple[Migration, ...] = (
    # 2: the ledger's daily totals per unit and role (ledger.Settler), kept beyond retention_days so a month
    # or a year can be reported after the raw points aged out. Undone by dropping the table (no point lost).
    # WITHOUT ROWID: the rows live in the key's own b-tree, one page instead of a table and its index.
    Migration(2, "CREATE TABLE IF NOT EXISTS daily_totals (day TEXT NOT NULL, site TEXT NOT NULL, "
                 "unit TEXT NOT NULL, role TEXT NOT NULL, in_wh REAL NOT NULL, out_wh REAL NOT NULL, "
                 "measured_s REAL NOT NULL, channels INTEGER NOT NULL, PRIMARY KEY (day, site, unit, role)) "
                 "WITHOUT ROWID",
              "DROP TABLE IF EXISTS daily_totals"),
    # 3: lines held for the clock, found without a scan of them all (a Pi offline for days holds hundreds of
    # thousands): a running count, kept by outbox.py in the transactions that hold, release, quarantine or
    # drop them, for the count every cycle needs; and an index by id, for the first of them (the ledger, every
    # housekeeping pass). Seeded from the rows; undone by removing both, so a release that does not keep the
    # count never leaves a stale one for the next release to trust.
    Migration(3, "CREATE INDEX IF NOT EXISTS points_held_id ON points(id) WHERE held = 1; "
                 "INSERT OR REPLACE INTO state (key, value) SELECT 'held_count', count(*) FROM points WHERE held = 1",
              "DROP INDEX IF EXISTS points_held_id; DELETE FROM state WHERE key = 'held_count'"),
)


class SchemaError(Exception):
    """The store's schema is newer than this release and cannot be undone (no stored down step)."""


def version(db: sqlite3.Connection) -> int:
    """The store's schema version (an unversioned store is the base)."""
    return max(BASE_VERSION, db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the store to the newest version in `migrations`: up, or down through the stored steps.

    Returns the version reached. Raises SchemaError (newer store with no way down), sqlite3.Error.
    `db` must be in autocommit mode (isolation_level=None), as outbox.py opens it.
    """
    target = max([BASE_VERSION, *(m.version for m in migrations)])
    current = version(db)
    while current > target:
        has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
        row = db.execute("SELECT down FROM schema_migrations WHERE version = ?", (current,)).fetchone() \
            if has_table.fetchone() else None
        if row is None:
            raise SchemaError(f"the store is at schema version {current}, newer than this release's {target}, "
                              "and holds no step to undo it")
        _in_transaction(db, row[0] + f"; DELETE FROM schema_migrations WHERE version = {current:d}"
                                     f"; PRAGMA user_version = {current - 1:d}")
        log.warning("store schema: undid version %d (a newer release's migration) for this release", current)
        current -= 1
    for m in sorted(migrations, key=lambda m: m.version):
        if m.version <= current:
            continue
        if m.version != current + 1:
            raise SchemaError(f"store schema migration {m.version} does not follow version {current}")
        down = m.down.replace("'", "''")
        # The table exists only in stores that were ever migrated: a base store stays page for page
        # what outbox.py makes (its size cap counts pages).
        _in_transaction(db, m.up + "; CREATE TABLE IF NOT EXISTS schema_migrations "
                                   "(version INTEGER PRIMARY KEY, down TEXT NOT NULL)"
                                   f"; INSERT OR REPLACE INTO schema_migrations (version, down) "
                                   f"VALUES ({m.version:d}, '{down}'); PRAGMA user_version = {m.version:d}")
        log.info("store schema: migrated to version %d", m.version)
        current = m.version
    return current


def _in_transaction(db: sqlite3.Connection, script: str) -> None:
    # executescript would COMMIT first; an explicit BEGIN..COMMIT makes the step and its
    # bookkeeping one transaction (SQLite DDL and PRAGMA user_version are transactional).
    try:
        db.executescript(f"BEGIN IMMEDIATE; {script}; COMMIT;")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
