"""Store schema versions across a self-update and its rollback: real SQLite, the real Outbox."""
from __future__ import annotations

import sqlite3

import pytest

import store_schema
from outbox import Outbox
from store_schema import Migration

# This release's schema version (2: the ledger's daily_totals table; 3: the count of lines held for the clock).
THIS = max(m.version for m in store_schema.MIGRATIONS)
NEXT = THIS + 1
# What a newer release might ship on top of this one's: a column on points and a table of its own.
# `down` keeps every row.
NEWER = (*store_schema.MIGRATIONS,
         Migration(NEXT, "ALTER TABLE points ADD COLUMN site_note TEXT; CREATE TABLE notes (id INTEGER PRIMARY KEY, "
                         "text TEXT)",
                   "DROP TABLE notes; ALTER TABLE points DROP COLUMN site_note"),)


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row[1] for row in db.execute("PRAGMA table_info(points)")}


def test_migrate_then_roll_back_then_store_again(tmp_path):
    # This release creates the store (with its daily_totals table) and stores a cycle.
    box = Outbox(tmp_path)
    box.append([(1000, "electricity,unit=red power_w=1.0 1000")])
    assert store_schema.version(box._db) == THIS
    box.add_daily_totals([("2026-06-21", "s", "red", "solar", 1.0, 0.0, 60.0, 1)], {})
    box.close()

    # The next release opens it and migrates, then stores a cycle using its new column.
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    assert store_schema.migrate(db, NEWER) == NEXT
    db.execute("INSERT INTO points (time_ms, line, site_note) VALUES (2000, 'electricity,unit=red power_w=2.0 2000', "
               "'new')")
    db.execute("INSERT INTO notes (text) VALUES ('x')")
    assert "site_note" in _columns(db) and db.execute("PRAGMA user_version").fetchone()[0] == NEXT
    db.close()

    # Rolled back: this release opens the store. It has never heard of the next version, but the store
    # carries the step that undoes it: the schema is this release's again, and no reading (and no daily
    # total) is lost.
    box = Outbox(tmp_path)
    assert store_schema.version(box._db) == THIS
    assert box.daily_totals(["2026-06-21"]) == [("2026-06-21", "s", "red", "solar", 1.0, 0.0, 60.0, 1)]
    assert "site_note" not in _columns(box._db)
    assert not box._db.execute("SELECT name FROM sqlite_master WHERE name = 'notes'").fetchall()
    box.append([(3000, "electricity,unit=red power_w=3.0 3000")])  # and it stores again
    lines = [p.line for p in box.pending(100, 1_000_000)]
    assert lines == ["electricity,unit=red power_w=1.0 1000", "electricity,unit=red power_w=2.0 2000",
                     "electricity,unit=red power_w=3.0 3000"]
    box.close()

    # The fixed next release migrates again, cleanly.
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    assert store_schema.migrate(db, NEWER) == NEXT
    db.close()


def test_a_failing_migration_changes_nothing(tmp_path):
    Outbox(tmp_path).close()
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    broken = (*store_schema.MIGRATIONS,
              Migration(NEXT, "ALTER TABLE points ADD COLUMN a TEXT; ALTER TABLE nosuch ADD COLUMN b TEXT", "SELECT 1"))
    with pytest.raises(sqlite3.OperationalError, match="nosuch"):
        store_schema.migrate(db, broken)
    assert "a" not in _columns(db) and store_schema.version(db) == THIS
    assert db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [
        (m.version,) for m in store_schema.MIGRATIONS]


def test_a_newer_store_without_a_way_down_is_reported(tmp_path, caplog):
    Outbox(tmp_path).close()
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    db.execute("PRAGMA user_version = 5")  # a release that changed the schema outside the migrations
    db.close()
    with pytest.raises(store_schema.SchemaError, match=f"version 5, newer than this release's {THIS}"):
        store_schema.migrate(sqlite3.connect(tmp_path / "outbox.db", isolation_level=None))
    box = Outbox(tmp_path)  # the Outbox still opens: measuring never stops for this
    assert "newer than this release" in caplog.text
    box.close()


def test_a_release_before_the_ledger_undoes_its_table_and_keeps_every_point(tmp_path):
    """Rolled back to a release without migrations: daily_totals goes, every point stays."""
    box = Outbox(tmp_path)
    box.append([(1000, "electricity,unit=red power_w=1.0 1000")])
    box.close()
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    assert store_schema.migrate(db, ()) == store_schema.BASE_VERSION
    assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'daily_totals'").fetchall()
    assert db.execute("SELECT count(*) FROM points").fetchone()[0] == 1
    db.close()
    assert Outbox(tmp_path).daily_totals(["2026-06-21"]) == []  # and this release makes it again
