"""The SQLite outbox: one transaction per cycle, oldest first, cap, retention, corruption."""
from __future__ import annotations

import shutil
import sqlite3

import pytest

import store_schema
from outbox import Outbox, StoreError, wal_pages


def lines(n, start=0):
    return [(1000 + i, f"m v={i}i {1000 + i}") for i in range(start, start + n)]


def test_append_and_pending_oldest_first(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(5), {"energy:a": "1"})
    box.append(lines(5, 5))
    batch = box.pending(max_lines=3, max_bytes=10_000)
    assert [p.line for p in batch] == ["m v=0i 1000", "m v=1i 1001", "m v=2i 1002"]
    box.mark_sent(p.id for p in batch)
    assert [p.time_ms for p in box.pending(100, 10_000)] == list(range(1003, 1010))
    assert box.stats().queue_depth == 7
    assert box.state("energy:") == {"energy:a": "1"}


def test_pending_respects_byte_budget_but_always_returns_one(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(10))
    assert len(box.pending(100, 25)) == 2
    assert len(box.pending(100, 1)) == 1


def test_wal_and_full_sync(tmp_path):
    box = Outbox(tmp_path)
    assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_the_wal_is_sized_by_the_cap_and_written_over_from_its_start_after_a_checkpoint(tmp_path):
    mb = 1024 * 1024
    assert [wal_pages(int(cap * mb), 10_000 * mb) for cap in (0.5, 20, 100, 200, 10_000)] == [32, 32, 100, 200, 256]
    assert [wal_pages(200 * mb, int(free * mb)) for free in (0.3, 50, 100)] == [32, 50, 100]  # a nearly full card
    box = Outbox(tmp_path, max_mb=200)
    pages = wal_pages(200 * mb, shutil.disk_usage(tmp_path).free)  # 200 with 200 MB free, fewer on a fuller disk
    assert box._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == pages
    wal = tmp_path / "outbox.db-wal"
    for i in range(30):  # the daemon checkpoints every 30 cycles: about 180 pages of WAL
        box.append(lines(5, 5 * i), {"energy:a": str(i)})
    assert box.checkpoint()
    size = wal.stat().st_size
    assert size > min(60, pages // 2) * 4096  # kept, not cut to 0 (growing it again would journal its size every commit)
    box.append(lines(5, 150))
    assert wal.stat().st_size == size  # the next commit wrote it over from its start
    reader = sqlite3.connect(tmp_path / "outbox.db")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM points").fetchone()  # a snapshot: later frames cannot be copied
    box.append(lines(5, 155))
    assert not box.checkpoint()
    reader.rollback()
    assert box.checkpoint(truncate=True) and wal.stat().st_size == 0  # after a backlog: space back at once
    assert box.stats().stored_total == 160
    reader.close()


def test_data_survives_reopen(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(3))
    box.close()
    assert Outbox(tmp_path).stats().queue_depth == 3


def test_quarantine_moves_lines_out_of_the_queue(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(4))
    bad = box.pending(2, 10_000)
    assert box.quarantine(bad, "HTTP 400: bad line") == 2
    stats = box.stats()
    assert stats.queue_depth == 2 and stats.quarantined == 2
    statuses = [s for _, _, s in box.export()]
    assert statuses.count("quarantined") == 2 and statuses.count("unsent") == 2


def test_quarantine_moves_only_lines_still_waiting(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(4))
    rows = box.pending(4, 10_000)
    box.mark_sent([rows[0].id])  # delivered meanwhile: stays delivered history
    with sqlite3.connect(box.path) as db:  # and one dropped meanwhile (as the size cap would)
        db.execute("DELETE FROM points WHERE id = ?", (rows[1].id,))
    assert box.quarantine(rows, "HTTP 400: bad line") == 2
    assert box.queue_stats().quarantined == 2 and [s for _, _, s in box.export()].count("quarantined") == 2


def test_size_cap_drops_quarantined_lines_before_unsent_readings(tmp_path):
    """Nothing else ever deletes refused lines: without this, a quarantine grown to the cap (a field type
    conflict refusing every line for days) would make the cap drop every unsent reading at each pass."""
    box = Outbox(tmp_path, max_mb=0.25)
    payload = "x" * 200
    box.append([(i, f"m s=\"{payload}\" {i}") for i in range(1500)])
    assert box.quarantine(box.pending(1500, 10**9), "HTTP 422: field type conflict") == 1500
    box.append([(i, f"m s=\"{payload}\" {i}") for i in range(1500, 1600)])  # the readings of an outage
    dropped = box.enforce_limits()
    stats = box.stats()
    assert stats.size_bytes <= 0.25 * 1024 * 1024
    assert stats.queue_depth == 100 and box.pending(1, 10**9)[0].time_ms == 1500  # every unsent reading kept
    assert 0 < dropped == stats.dropped and stats.quarantined == 1500 - dropped  # the oldest refused ones went
    kept = [t for t, _, s in box.export() if s == "quarantined"]
    assert kept == list(range(dropped, 1500))


def test_retention_prunes_only_delivered_history(tmp_path):
    now = [10_000_000_000]
    box = Outbox(tmp_path, retention_days=1, wall_ms=lambda: now[0])
    box.append(lines(4))
    box.mark_sent(p.id for p in box.pending(2, 10_000))
    now[0] += 2 * 86_400_000
    assert box.enforce_limits() == 0
    assert box.stats().stored_total == 2 and box.stats().queue_depth == 2


def test_size_cap_drops_sent_history_first_then_oldest_unsent_and_counts(tmp_path):
    box = Outbox(tmp_path, max_mb=0.25)
    payload = "x" * 200
    box.append([(i, f"m s=\"{payload}\" {i}") for i in range(3000)])
    box.mark_sent(p.id for p in box.pending(500, 10**9))
    dropped = box.enforce_limits()
    stats = box.stats()
    assert stats.size_bytes <= 0.25 * 1024 * 1024
    assert dropped > 0 and stats.dropped == dropped
    oldest_left = box.pending(1, 10**9)[0].time_ms
    assert oldest_left == 500 + dropped  # all sent rows went first, then the oldest unsent
    assert [s for _, _, s in box.export()].count("sent") == 0


def test_a_batch_in_flight_keeps_its_file_when_the_store_is_replaced(tmp_path):
    """The other thread moved a damaged file aside and started a fresh one (ids from 1 again) while the
    sender had a batch of the old file in flight: its read-ahead and its marks stay with the old file, so
    no fresh row is marked sent undelivered; the next flush's first read follows the fresh file."""
    sender = Outbox(tmp_path)
    sender.append(lines(8))
    batch = sender.pending_batch(4, 10**6)
    assert batch.ids == (1, 2, 3, 4)
    (tmp_path / "outbox.db").rename(tmp_path / "outbox.db.corrupt-test")
    for suffix in ("-wal", "-shm"):
        if (tmp_path / f"outbox.db{suffix}").exists():
            (tmp_path / f"outbox.db{suffix}").rename(tmp_path / f"outbox.db.corrupt-test{suffix}")
    fresh = Outbox(tmp_path)
    fresh.append(lines(6))
    ahead = sender.pending_batch(4, 10**6, after_id=batch.last_id)
    assert ahead.ids == (5, 6, 7, 8)  # still the old file's lines
    sender.mark_sent(batch.ids)
    assert fresh.queue_stats().queue_depth == 6 and fresh.pending(6, 10**6)[0].id == 1  # untouched
    assert sender.pending_batch(10, 10**6).ids == (1, 2, 3, 4, 5, 6)  # a new flush: the fresh file


def test_corrupt_file_is_moved_aside_and_a_fresh_one_started(tmp_path, caplog):
    box = Outbox(tmp_path)
    box.append(lines(50))
    box.close()
    db = tmp_path / "outbox.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    db.write_bytes(bytes(data))
    fresh = Outbox(tmp_path)
    assert fresh.stats().stored_total == 0
    moved = list(tmp_path.glob("outbox.db.corrupt-*"))
    assert moved and any(str(m.name) in caplog.text for m in moved)


def test_unwritable_directory_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the store directory"):
        Outbox(blocker / "sub")


def test_failed_commit_leaves_nothing_half_written(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(2))
    with pytest.raises(StoreError):
        box.append([(1, "ok 1"), (None, "time is null")])  # the NOT NULL constraint fails mid-transaction
    assert box.stats().stored_total == 2
    box.append(lines(1, 10))
    assert box.stats().stored_total == 3


def test_export_since(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(10))
    assert [t for t, _, _ in box.export(since_ms=1007)] == [1007, 1008, 1009]
    assert isinstance(box._db, sqlite3.Connection)


def test_running_counters_agree_with_the_rows_through_every_operation(tmp_path):
    now = [10_000_000_000]
    box = Outbox(tmp_path, max_mb=0.25, retention_days=1, wall_ms=lambda: now[0])

    def exact(db=None):
        db = db or box._db
        unsent = db.execute("SELECT count(*) FROM points WHERE sent_ms IS NULL").fetchone()[0]
        quarantined = db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        held = db.execute("SELECT count(*) FROM points WHERE held = 1").fetchone()[0]
        return unsent, quarantined, held

    def counted(box=box):
        stats = box.queue_stats()
        return stats.queue_depth, stats.quarantined, stats.held

    box.append(lines(100))
    box.append(lines(10, 100), boot_id="old", boot_ms=5, held=True)
    box.append(lines(6, 110), boot_id="now", boot_ms=5, held=True)
    box.append(lines(4, 116), boot_id="now", boot_ms=9, held=True)
    assert counted() == exact() and counted()[2] == 20
    box.mark_sent(p.id for p in box.pending(30, 10**6))
    box.mark_sent(p.id for p in box.pending(5, 10**6)[:2])
    box.mark_sent([1, 2, 3])  # already sent: not counted twice
    box.quarantine(box.pending(4, 10**6), "bad")
    box.quarantine_stale_held("now")
    assert counted() == exact() and counted()[2] == 10
    box.release_held("now", 1_000)
    box.append(lines(5, 120), boot_id="now", boot_ms=20, held=True)
    assert counted() == exact() and counted()[2] == 5
    # over the cap, the oldest unsent lines go, held ones among them
    box.append([(i, f"m s=\"{'x' * 300}\" {i}") for i in range(1000)], dropped=7)
    box.append(lines(3, 2000), boot_id="now", boot_ms=30, held=True)
    box.enforce_limits()
    assert counted() == exact()
    stats = box.queue_stats()
    assert stats.dropped == box.stats().dropped >= 7
    box.close()
    reopened = Outbox(tmp_path)  # the counters persist with the rows
    assert counted(reopened) == exact(reopened._db)
    reopened.close()
    # local history ages out by time, held lines with it
    local = Outbox(tmp_path / "local", local_only=True, retention_days=1, wall_ms=lambda: now[0])
    local.append(lines(4), boot_id="b", boot_ms=1, held=True)
    local.append(lines(4, 10**10))
    local.enforce_limits()
    assert counted(local) == exact(local._db) == (4, 0, 0)


def test_lines_held_for_the_clock_are_counted_and_found_without_a_scan_of_them(tmp_path):
    """A Pi offline for days holds hundreds of thousands of lines: the count every cycle reads and the
    ledger's first-held probe must cost the same with 10 or 20,000 of them (SQLite's own instruction
    counter, not a timing)."""
    def steps(box, call):
        counter = [0]
        box._db.set_progress_handler(lambda: counter.__setitem__(0, counter[0] + 1), 1)
        result = call()
        box._db.set_progress_handler(None, 1)
        return counter[0], result

    box = Outbox(tmp_path)
    box.append(lines(10))
    box.append(lines(10, 10), boot_id="b", boot_ms=1, held=True)
    few = steps(box, lambda: box.queue_stats().held), steps(box, box.newest_known_time_ms)
    assert [result for _, result in few] == [10, 1009]
    again = steps(box, box.newest_known_time_ms)
    assert again[1] == 1009 and again[0] < 100
    # stamped later than every known line, as a clock restored by fake-hwclock stamps them
    box.append(lines(20_000, 20), boot_id="b", boot_ms=2, held=True)
    many = steps(box, lambda: box.queue_stats().held), steps(box, box.newest_known_time_ms)
    assert [result for _, result in many] == [20_010, 1009]
    assert many[0][0] == few[0][0] < 100 and many[1][0] == again[0]
    box.release_held("b", 1_000_000)  # released: the next held line starts a new search
    box.append(lines(5, 30_000), boot_id="b", boot_ms=3, held=True)
    assert box.newest_known_time_ms() == 1_000_002


def test_a_rollback_and_a_new_update_leave_the_held_count_exact(tmp_path):
    """A release from before the count (store_schema migration 3) does not keep it: the rollback removes it,
    the next update counts the rows again."""
    box = Outbox(tmp_path)
    box.append(lines(5), boot_id="b", boot_ms=1, held=True)
    box.close()
    db = sqlite3.connect(tmp_path / "outbox.db", isolation_level=None)
    store_schema.migrate(db, store_schema.MIGRATIONS[:1])  # rolled back to the release before the count
    assert db.execute("SELECT value FROM state WHERE key = 'held_count'").fetchone() is None
    db.execute("INSERT INTO points (time_ms, line, boot_id, boot_ms, held) VALUES (1, 'm v=1i 1', 'b', 1, 1)")
    db.close()
    reader = Outbox(tmp_path, readonly=True)  # `status` before the daemon migrated: it counts
    assert reader.queue_stats().held == 6
    reader.close()
    box = Outbox(tmp_path)
    assert box.queue_stats().held == 6
    box.release_held("b", 1_000)
    assert box.queue_stats().held == 0


def test_release_held_restamps_in_sql(tmp_path):
    box = Outbox(tmp_path)
    box.append([(99, "m v=1i 99"), (99, "m,t=a\\ b v=2i 99")], boot_id="b1", boot_ms=1_000, held=True)
    assert box.release_held("b1", 1_700_000_000_000) == 2
    rows = list(box.export())
    assert [(t, line) for t, line, _ in rows] == [
        (1_700_000_001_000, "m v=1i 1700000001000"), (1_700_000_001_000, "m,t=a\\ b v=2i 1700000001000")]


def test_a_locked_store_is_never_moved_aside_and_readers_never_write(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(3))
    other = sqlite3.connect(tmp_path / "outbox.db", timeout=0)
    other.execute("BEGIN EXCLUSIVE")  # somebody holds the lock for a long time
    try:
        import outbox as outbox_mod

        with pytest.raises(StoreError, match="locked"):
            opened = Outbox.__new__(Outbox)
            opened.directory, opened.path, opened.max_bytes = tmp_path, tmp_path / "outbox.db", 1 << 20
            opened._wall_ms = lambda: 0
            original = sqlite3.connect
            outbox_mod.sqlite3.connect = lambda *a, **k: original(*a, **{**k, "timeout": 0.1})
            try:
                opened._db = opened._connect(True)
            finally:
                outbox_mod.sqlite3.connect = original
        assert not list(tmp_path.glob("*.corrupt-*"))
    finally:
        other.rollback()
        other.close()
    reader = Outbox(tmp_path, readonly=True)
    assert reader.stats().stored_total == 3 and len(list(reader.export())) == 3
    with pytest.raises(StoreError):
        reader.append(lines(1))
    with pytest.raises(StoreError, match="no store at"):
        Outbox(tmp_path / "empty", readonly=True)


def test_mark_sent_marks_a_run_of_ids_in_one_range_and_never_a_row_outside_the_batch(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(10))
    ids = [p.id for p in box.pending(10, 10**6)]
    box.mark_sent(ids[2:6])  # an unbroken run: one range
    box.mark_sent([ids[7], ids[9]])  # a gap: row 8 lies between them and is not in the batch
    left = [p.time_ms for p in box.pending(10, 10**6)]
    assert left == [1000, 1001, 1006, 1008]
    assert box.queue_stats().queue_depth == 4  # the running counter agrees
    assert [p.time_ms for p in box.pending(10, 10**6, after_id=ids[1])] == [1006, 1008]  # the batch after


def test_pending_batch_is_pendings_lines_joined_held_and_sent_left_out(tmp_path):
    box = Outbox(tmp_path)
    box.append(lines(3))
    box.append([(2000, "held v=1i 2000")], boot_id="b", boot_ms=5, held=True)  # waits for the clock
    box.append(lines(4, 3) + [(1007, "m,t=é v=7i 1007")])
    box.mark_sent([2])
    batch = box.pending_batch(100, 10**6)
    assert batch.ids == tuple(p.id for p in box.pending(100, 10**6)) == (1, 3, 5, 6, 7, 8, 9)
    assert batch.text.decode() == "\n".join(p.line for p in box.pending(100, 10**6))
    assert batch.lines()[-1] == "m,t=é v=7i 1007" and len(batch) == 7
    assert box.pending_batch(3, 10**6, after_id=5).ids == (6, 7, 8)  # the batch after one not yet marked
    # The byte cap counts UTF-8 bytes and a newline per line; one line always goes, however long.
    assert box.pending_batch(100, 25).ids == (1, 3) and box.pending_batch(100, 1).ids == (1,)
    assert [p.id for p in box.rows(box.pending_batch(100, 10**6))] == [1, 3, 5, 6, 7, 8, 9]
    box.mark_sent(batch.ids)
    assert box.pending_batch(100, 10**6) is None and box.queue_stats().queue_depth == 1  # the held line
