"""The durable local store: every reading as line protocol in SQLite.

One file, ``outbox.db`` in the state directory. Rows are appended one transaction per cycle and leave only
in three ways: delivered (kept as local history for `retention_days`, then pruned), quarantined (a line the
server refused, kept in its own table) or dropped by the size cap (counted). With no database to deliver to
(`local_only`), every reading is local history: it ages out after `retention_days` (or goes first under the
size cap) without being counted as dropped, since "dropped" means lost before it could be delivered.

Thread-safety: one Outbox per thread. SQLite's WAL lets the measuring thread append while the sender thread
reads and acknowledges, each on its own connection to the same file.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "outbox.db"
_QUEUE_STATS_SQL = (
    "SELECT (SELECT value FROM state WHERE key = 'unsent_count'), "
    "(SELECT value FROM state WHERE key = 'quarantined_count'), "
    "(SELECT value FROM state WHERE key = 'dropped_points'), "
    # The running count (store_schema migration 3); a read-only opener of a store not migrated yet counts.
    "coalesce((SELECT value FROM state WHERE key = 'held_count'), (SELECT count(*) FROM points WHERE held = 1))"
)

_PAGE_BYTES = 4096  # SQLite's default page size, which the store keeps; a WAL frame is a page and 24 bytes


def wal_pages(max_bytes: int, free_bytes: int) -> int:
    """Pages the WAL may hold between checkpoints for a store capped at `max_bytes` on a disk with `free_bytes`
    free: a 256th of the smaller, 32 to 256 (SQLite's 1000, ~4 MB, would eat the space a small card frees for
    held cycles). It is kept at that size, written over from its start: fewer, larger checkpoints copy each
    hot page once, and a commit that grows the file also journals its size."""
    return min(256, max(32, min(max_bytes, free_bytes) // 256 // _PAGE_BYTES))


class StoreError(Exception):
    """The store cannot be opened or written (disk full, read-only, permissions, damage). `corrupt`: the file
    itself is damaged (it is then moved aside and a fresh one started)."""

    def __init__(self, message: str, *, corrupt: bool = False) -> None:
        super().__init__(message)
        self.corrupt = corrupt


def _sqlite_text_error(exc: UnicodeDecodeError) -> sqlite3.DatabaseError:
    """SQLite's error text quoting bytes of a damaged file (a schema entry, say) is not UTF-8, so Python's sqlite3
    raises UnicodeDecodeError instead of an sqlite3.Error: this is the corruption it stands for, bytes escaped."""
    raw = exc.object if isinstance(exc.object, bytes) else bytes(exc.object)
    return sqlite3.DatabaseError(f"database disk image is malformed: {raw.decode('utf-8', 'backslashreplace')}")


def _size_wal(db: sqlite3.Connection, max_bytes: int, directory: Path) -> int:
    """Set the WAL's checkpoint size (wal_pages) for the cap and the free space; returns the bytes it is
    kept at."""
    try:
        pages = wal_pages(max_bytes, shutil.disk_usage(directory).free)
    except OSError:
        pages = wal_pages(max_bytes, max_bytes)
    db.execute(f"PRAGMA wal_autocheckpoint={pages}")
    limit = 32 + (pages + 16) * (_PAGE_BYTES + 24)  # the header, and the frames (a commit may pass the threshold)
    db.execute(f"PRAGMA journal_size_limit={limit}")
    return limit


def _store_errors(method):
    """Report SQLite failures as StoreError naming the file; damage also starts a fresh store."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except UnicodeDecodeError as exc:
            error: sqlite3.Error = _sqlite_text_error(exc)
        except sqlite3.Error as exc:
            error = exc
        raise self._failed(error) from None

    return wrapper


@dataclass(frozen=True)
class Pending:
    """A stored line waiting for delivery."""

    id: int
    time_ms: int
    line: str


@dataclass(frozen=True)
class Batch:
    """Unsent lines read for one request, oldest first: their ids (ascending) and their text as UTF-8,
    joined by newlines (what goes on the wire before compression). Never empty."""

    ids: tuple[int, ...]
    text: bytes

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last_id(self) -> int:
        return self.ids[-1]

    def lines(self) -> list[str]:
        """The lines as text (for a writer that takes lines, and the halving search)."""
        return self.text.decode("utf-8").split("\n")


@dataclass(frozen=True)
class QueueStats:
    """Per-cycle counts: unsent lines (held ones included), quarantined, dropped, held for the clock."""

    queue_depth: int
    quarantined: int
    dropped: int
    held: int


@dataclass(frozen=True)
class OutboxStats:
    """What `status` shows. Times are Unix ms; None when there is none."""

    queue_depth: int
    oldest_unsent_ms: int | None
    newest_ms: int | None
    stored_total: int
    quarantined: int
    dropped: int
    size_bytes: int
    held: int = 0  # waiting for the clock to sync (part of queue_depth)


class Outbox:
    """SQLite outbox in `directory`. Raises StoreError when the directory or file cannot be used. A file that
    fails SQLite's integrity check is moved aside and a fresh one started: measuring never stops for the store.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_mb: float = 200.0,
        retention_days: float = 7.0,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        check_integrity: bool = True,
        readonly: bool = False,
        local_only: bool = False,
        before_prune: Callable[[Outbox], int | None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.local_only = local_only
        self.path = self.directory / DB_NAME
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.retention_ms = int(retention_days * 86_400_000)
        self._wall_ms = wall_ms
        # Called first by enforce_limits (ledger.Settler: settles daily totals); returns the time from which
        # raw points must be kept, so the retention prune never loses what is not settled yet.
        self._before_prune = before_prune
        self._newest_known: tuple[int, int | None] | None = None  # (first held id, newest_known_time_ms)
        if readonly:
            # Readers (`status`, `export`, the live page) never write, never move a file aside and
            # never hold a write lock against the daemon.
            self._readonly = True
            if not self.path.exists():
                raise StoreError(f"no store at {self.path} yet (the daemon has not stored a reading)")
            try:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30,
                                           isolation_level=None, check_same_thread=False)
                self._db.execute("SELECT 1 FROM points LIMIT 1")
                self._db.execute("SELECT 1 FROM state LIMIT 1")
            except (sqlite3.Error, UnicodeDecodeError) as exc:
                error = _sqlite_text_error(exc) if isinstance(exc, UnicodeDecodeError) else exc
                if isinstance(error, sqlite3.DatabaseError) and _is_corruption(error):
                    raise StoreError(f"the store {self.path} is damaged ({error}): the daemon moves it aside "
                                     "and starts a fresh one at its next start", corrupt=True) from None
                raise StoreError(f"cannot read {self.path}: {error}") from None
            return
        self._readonly = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {self.directory}: {exc.strerror}") from None
        self._db = self._connect(check_integrity)

    # -- opening ---------------------------------------------------------
    def _connect(self, check_integrity: bool) -> sqlite3.Connection:
        db = None
        try:
            db = self._open()
            if check_integrity:
                result = db.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(f"database disk image is malformed: {result}")
            self._inode = _inode(self.path)
            return db
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            if db is not None:
                db.close()
            error = _sqlite_text_error(exc) if isinstance(exc, UnicodeDecodeError) else exc
            if not (isinstance(error, sqlite3.DatabaseError) and _is_corruption(error)):
                # Locked, busy, read-only, no space: the file itself is fine. Never move it aside.
                raise StoreError(f"cannot open {self.path}: {error}") from None
            moved = self._move_aside()
            log.error("store %s failed its integrity check (%s): moved to %s, starting a fresh one",
                      self.path, error, moved)
            try:
                db = self._open()
            except (sqlite3.Error, UnicodeDecodeError) as again:
                raise StoreError(f"cannot open {self.path}: {again}") from None
            self._inode = _inode(self.path)
            return db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        _size_wal(db, self.max_bytes, self.directory)
        # FULL, not NORMAL: in WAL mode NORMAL skips the fsync at commit, so a power cut could lose the last
        # cycles even though they were committed (the fsync costs about 0.17 ms of CPU a cycle on the bench VM).
        db.execute("PRAGMA synchronous=FULL")
        from store_schema import BASE_SCHEMA, SchemaError, add_clock_columns, migrate

        add_clock_columns(db)
        # One transaction: a reader (`status`, the live page) opening the store while it is being created
        # sees either no tables or all of them, never `points` without `state`.
        db.executescript("BEGIN IMMEDIATE;" + BASE_SCHEMA + ";COMMIT;")
        try:  # versioned migrations (store_schema.py): up for a newer release, down after a rollback
            migrate(db)
        except SchemaError as exc:
            log.error("%s: %s", DB_NAME, exc)
        # Running counts, kept in the same transactions as the rows they count, so `queue_stats`
        # (every cycle) never has to count a long backlog. Seeded once from the rows themselves.
        db.execute("INSERT OR IGNORE INTO state (key, value) "
                   "SELECT 'unsent_count', count(*) FROM points WHERE sent_ms IS NULL")
        db.execute("INSERT OR IGNORE INTO state (key, value) SELECT 'quarantined_count', count(*) FROM quarantine")
        return db

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}")
        n = 1
        while target.exists():  # a second damage within the same second: never overwrite the first
            n += 1
            target = self.path.with_name(f"{DB_NAME}.corrupt-{stamp}-{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                src.replace(Path(f"{target}{suffix}"))
        return target

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._db.close()

    def _failed(self, error: sqlite3.Error) -> StoreError:
        """The StoreError for `error`; a damaged file is moved aside and a fresh one opened first, so
        the next call works again (the failed call's data was not stored: the caller keeps it)."""
        corrupt = isinstance(error, sqlite3.DatabaseError) and _is_corruption(error)
        if not corrupt or self._readonly:
            return StoreError(f"store {self.path}: {error}", corrupt=corrupt)
        log.error("store %s is damaged (%s)", self.path, error)
        try:
            self._reopen()
        except StoreError as exc:
            return StoreError(f"store {self.path}: {error}; {exc}", corrupt=True)
        return StoreError(f"store {self.path} was damaged ({error}): a fresh store was started", corrupt=True)

    def _reopen(self, check_integrity: bool | None = None) -> None:
        """A new connection; by default the file is checked (and moved aside if damaged) unless
        another connection already replaced it. Raises StoreError."""
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        if check_integrity is None:
            check_integrity = _inode(self.path) == self._inode
        self._newest_known = None  # maybe another file now
        self._db = self._connect(check_integrity)

    def reopen(self) -> None:
        """A fresh connection to the file now at the path (after the store failed: a file system that
        went read-only and was mounted again, a card swapped). Raises StoreError; the store then stays
        closed until a later reopen succeeds (every call raises StoreError meanwhile)."""
        if self._readonly:
            return
        self._reopen(check_integrity=False)

    def _follow_replacement(self) -> None:
        """Reconnect when another connection (the other thread's) moved a damaged file aside."""
        if not self._readonly and _inode(self.path) not in (self._inode, None):
            log.info("store %s was replaced by a fresh one: reconnecting", self.path)
            self._reopen()

    @_store_errors
    def checkpoint(self, truncate: bool = False) -> bool:
        """Copy the WAL into the database (the next commit writes it over from its start); `truncate`: also
        cut it to 0 bytes (frees its space at once, after a backlog). Never waits for a connection
        mid-transaction (`truncate`: 0.1 s at most). Returns True when the whole WAL was copied. The WAL is
        sized again for the free space first, and cut to 0 also when it grew past that size (a large delete)."""
        limit_bytes = _size_wal(self._db, self.max_bytes, self.directory)
        with contextlib.suppress(FileNotFoundError):
            truncate = truncate or os.stat(f"{self.path}-wal").st_size > limit_bytes
        if not truncate:
            busy, logged, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return not busy and logged == copied
        self._db.execute("PRAGMA busy_timeout=100")
        try:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._db.execute("PRAGMA busy_timeout=30000")
        return not busy

    # -- writing ---------------------------------------------------------
    @_store_errors
    def append(self, lines: Sequence[tuple[int, str]], state: Mapping[str, str] | None = None, *,
               boot_id: str | None = None, boot_ms: int | None = None, held: bool = False,
               dropped: int = 0) -> None:
        """Store one cycle: (time_ms, line) pairs and state values, in one transaction.

        `boot_id`/`boot_ms` record when the cycle was measured relative to boot; `held` keeps the lines from
        delivery until `release_held` gives them a trusted timestamp; `dropped` adds lines lost before they
        could be stored to the dropped counter. Raises StoreError if it could not be committed (nothing is
        half-written)."""
        self._follow_replacement()
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO points (time_ms, line, boot_id, boot_ms, held) VALUES (?, ?, ?, ?, ?)",
                ((t, line, boot_id, boot_ms, int(held)) for t, line in lines),
            )
            _count(db, unsent_count=len(lines), held_count=len(lines) if held else 0, dropped_points=dropped)
            if state:
                db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", state.items())

    @_store_errors
    def set_state(self, values: Mapping[str, str]) -> None:
        """Store small key/value facts (counters, last send) durably."""
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", values.items())

    @_store_errors
    def state(self, prefix: str = "") -> dict[str, str]:
        """The stored key/value facts whose key starts with `prefix`."""
        return dict(self._db.execute("SELECT key, value FROM state WHERE substr(key, 1, ?) = ?",
                                     (len(prefix), prefix)).fetchall())

    # -- delivering ------------------------------------------------------
    def pending(self, max_lines: int, max_bytes: int, after_id: int = 0) -> list[Pending]:
        """pending_batch()'s lines as Pending rows, oldest first (for tools and tests: one object a line)."""
        batch = self.pending_batch(max_lines, max_bytes, after_id)
        return self.rows(batch) if batch else []

    @_store_errors
    def pending_batch(self, max_lines: int, max_bytes: int, after_id: int = 0) -> Batch | None:
        """The oldest unsent lines with an id above `after_id` (the batch after one not yet marked), at most
        `max_lines` and about `max_bytes` counting a newline after each, as one Batch; None when there are none.
        The drain's read: the lines come out of SQLite as bytes and are joined in C, with no object per
        line (pending()'s Pending objects cost about as much CPU as the request's gzip). A replaced file is
        followed only by a first read (`after_id` 0): a batch in flight keeps its file, whose ids it names."""
        if not after_id:
            self._follow_replacement()
        cursor = self._db.execute(
            "SELECT id, CAST(line AS BLOB) FROM points WHERE sent_ms IS NULL AND held = 0 AND id > ? "
            "ORDER BY id LIMIT ?",
            (after_id, max_lines),
        )
        ids: list[int] = []
        lines: list[bytes] = []
        size = 0
        try:
            # In chunks, stopping at the byte cap: the rows after it are never read (SQLite steps lazily).
            while chunk := cursor.fetchmany(512):
                for row_id, line in chunk:
                    size += len(line) + 1
                    if ids and size > max_bytes:  # at least one line, however long, so the queue moves
                        return Batch(tuple(ids), b"\n".join(lines))
                    ids.append(row_id)
                    lines.append(line)
        finally:
            cursor.close()
        return Batch(tuple(ids), b"\n".join(lines)) if ids else None

    @_store_errors
    def rows(self, batch: Batch) -> list[Pending]:
        """The batch's lines that are still unsent, as Pending rows, oldest first (for the halving search
        after a refusal)."""
        wanted = set(batch.ids)
        found = self._db.execute(
            "SELECT id, time_ms, line FROM points WHERE id BETWEEN ? AND ? AND sent_ms IS NULL AND held = 0 "
            "ORDER BY id", (batch.ids[0], batch.ids[-1])).fetchall()
        return [Pending(*row) for row in found if row[0] in wanted]

    @_store_errors
    def mark_sent(self, ids: Iterable[int]) -> None:
        """Record that the server acknowledged these lines."""
        now = self._wall_ms()
        ids = sorted(ids)
        with self._transaction() as db:
            if ids and ids[-1] - ids[0] + 1 == len(ids) == len(set(ids)):
                # One unbroken run of ids (a drained batch): one statement marks it, and no row outside
                # the batch can be in the range.
                marked = db.execute("UPDATE points SET sent_ms = ? WHERE id BETWEEN ? AND ? AND sent_ms IS NULL",
                                    (now, ids[0], ids[-1])).rowcount
            else:
                marked = db.executemany("UPDATE points SET sent_ms = ? WHERE id = ? AND sent_ms IS NULL",
                                        ((now, i) for i in ids)).rowcount
            _count(db, unsent_count=-marked)

    @_store_errors
    def quarantine(self, rows: Iterable[Pending], reason: str) -> int:
        """Move lines the server refused out of the queue; they stay exportable. Returns how many: only rows
        still waiting move (the size cap may have dropped some meanwhile, counted there)."""
        now = self._wall_ms()
        rows = list(rows)
        with self._transaction() as db:
            moved = db.executemany("INSERT INTO quarantine (time_ms, line, reason, quarantined_ms) SELECT time_ms, "
                                   "line, ?, ? FROM points WHERE id = ? AND sent_ms IS NULL",
                                   ((reason, now, r.id) for r in rows)).rowcount
            # The same rows (one transaction): the ones copied are the ones deleted.
            db.executemany("DELETE FROM points WHERE id = ? AND sent_ms IS NULL", ((r.id,) for r in rows))
            _count(db, unsent_count=-moved, quarantined_count=moved)
        return moved

    # -- the clock -------------------------------------------------------
    @_store_errors
    def release_held(self, boot_id: str, offset_ms: int) -> int:
        """Re-stamp this boot's held lines as boot_ms + offset_ms and let them go. Returns how many."""
        with self._transaction() as db:
            # In SQL, not in Python: a Pi that was offline for days may hold hundreds of thousands of
            # lines. A line always ends with its time_ms, so that suffix is replaced.
            released = db.execute(
                "UPDATE points SET time_ms = boot_ms + :offset, held = 0, "
                "line = substr(line, 1, length(line) - length(CAST(time_ms AS TEXT))) || CAST(boot_ms + :offset AS TEXT) "
                "WHERE held = 1 AND boot_id = :boot",
                {"offset": offset_ms, "boot": boot_id},
            ).rowcount
            _count(db, held_count=-released)
        return released

    @_store_errors
    def quarantine_stale_held(self, current_boot_id: str) -> int:
        """Quarantine held lines of earlier boots: their clock never synced, so their time is unknown."""
        now = self._wall_ms()
        with self._transaction() as db:
            moved = db.execute(
                "INSERT INTO quarantine (time_ms, line, reason, quarantined_ms) "
                "SELECT time_ms, line, 'the clock never synced during boot ' || coalesce(boot_id, '?') || "
                "': time unknown', ? FROM points WHERE held = 1 AND boot_id IS NOT ? ORDER BY id",
                (now, current_boot_id),
            ).rowcount
            removed = db.execute("DELETE FROM points WHERE held = 1 AND boot_id IS NOT ? AND sent_ms IS NULL",
                                 (current_boot_id,)).rowcount
            _count(db, unsent_count=-removed, held_count=-removed, quarantined_count=moved)
        return moved

    # -- housekeeping ----------------------------------------------------
    @_store_errors
    def enforce_limits(self) -> int:
        """Prune delivered history past retention, then apply the size cap. Over the cap, delivered history
        goes first (it is already safe in InfluxDB), then the oldest quarantined lines (the server refused
        them), then the oldest unsent lines; both counted as dropped. Returns how many lines were dropped now."""
        cutoff = self._wall_ms() - self.retention_ms
        keep_from = self._before_prune(self) if self._before_prune is not None else None
        if keep_from is not None:
            cutoff = min(cutoff, keep_from)
        with self._transaction() as db:
            if self.local_only:
                # Nothing is ever delivered: every reading is history, and ages out as such.
                aged_out = "DELETE FROM points WHERE time_ms < ? AND sent_ms IS NULL"
                held = db.execute(aged_out + " AND held = 1", (cutoff,)).rowcount
                unsent = db.execute(aged_out, (cutoff,)).rowcount
                _count(db, unsent_count=-(held + unsent), held_count=-held)
            # A line is always sent after it was measured, so `time_ms < cutoff` holds for every row
            # to prune and lets the time index narrow the scan to old rows.
            db.execute("DELETE FROM points WHERE time_ms < ? AND sent_ms IS NOT NULL AND sent_ms < ?",
                       (cutoff, cutoff))
        dropped = aged = refused = 0
        while self.used_bytes() > self.max_bytes:
            with self._transaction() as db:
                removed = db.execute("DELETE FROM points WHERE id IN (SELECT id FROM points WHERE sent_ms IS NOT NULL "
                                     "ORDER BY id LIMIT 1000)").rowcount
                if not removed:  # refused lines before any reading still to deliver (nothing else prunes them)
                    removed = db.execute("DELETE FROM quarantine WHERE id IN (SELECT id FROM quarantine ORDER BY id "
                                         "LIMIT 1000)").rowcount
                    _count(db, quarantined_count=-removed, dropped_points=removed)
                    refused += removed
                if not removed:  # the 1000 oldest unsent lines, some maybe held for the clock
                    gone = db.execute("SELECT id, held FROM points WHERE sent_ms IS NULL ORDER BY id LIMIT 1000")
                    gone = gone.fetchall() or [(-1, 0)]
                    removed = db.execute("DELETE FROM points WHERE sent_ms IS NULL AND id <= ?", (gone[-1][0],)).rowcount
                    lost = 0 if self.local_only else removed  # local history ages out; it is not lost
                    _count(db, unsent_count=-removed, held_count=-sum(held for _, held in gone), dropped_points=lost)
                    aged, dropped = aged + removed - lost, dropped + lost
            if not removed:
                break
        if dropped or refused:
            log.warning("store over its cap of %s: dropped the %d oldest quarantined and the %d oldest unsent lines",
                        format_mb(self.max_bytes), refused, dropped)
        if aged:
            log.info("store at its cap of %s: the %d oldest readings of the local history aged out early",
                     format_mb(self.max_bytes), aged)
        return dropped + refused

    @_store_errors
    def used_bytes(self) -> int:
        """Bytes of the database in use (free pages excluded; the WAL is checkpointed back into it)."""
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return (pages - free) * size

    @_store_errors
    def queue_stats(self) -> QueueStats:
        """The counts the `system` point carries every cycle, from the running counters: no table scan."""
        unsent, quarantined, dropped, held = self._db.execute(_QUEUE_STATS_SQL).fetchone()
        return QueueStats(int(unsent or 0), int(quarantined or 0), int(dropped or 0), int(held or 0))

    @_store_errors
    def stats(self) -> OutboxStats:
        """Everything `status` shows: the queue counts plus the whole table's (not for every cycle)."""
        queue = self.queue_stats()
        # ids grow with time, so the first unsent id is the oldest unsent reading: one index probe.
        row = self._db.execute("SELECT time_ms FROM points WHERE sent_ms IS NULL AND held = 0 "
                               "ORDER BY id LIMIT 1").fetchone()
        total, newest = self._db.execute("SELECT count(*), max(time_ms) FROM points").fetchone()
        return OutboxStats(queue.queue_depth, row[0] if row else None, newest, total, queue.quarantined,
                           queue.dropped, self.used_bytes(), queue.held)

    def export(self, since_ms: int | None = None, until_ms: int | None = None) -> Iterator[tuple[int, str, str]]:
        """Every stored line in [since_ms, until_ms), oldest first: (time_ms, line, "sent" | "unsent" | "held"
        | "quarantined").

        Raises StoreError (also part-way through, for a damaged file)."""
        since = since_ms if since_ms is not None else -(2**62)
        until = until_ms if until_ms is not None else 2**62
        return self._rows(
            "SELECT time_ms, line, CASE WHEN held = 1 THEN 'held' WHEN sent_ms IS NULL THEN 'unsent' "
            "ELSE 'sent' END FROM points WHERE time_ms >= ? AND time_ms < ? "
            "UNION ALL SELECT time_ms, line, 'quarantined' FROM quarantine WHERE time_ms >= ? AND time_ms < ? "
            "ORDER BY 1",
            (since, until, since, until))

    def timed_points(self, since_ms: int, until_ms: int) -> Iterator[tuple[int, str, str]]:
        """The points in [since_ms, until_ms) whose time is known, oldest first, as export() gives them
        (time_ms, line, "sent" | "unsent"): held and quarantined lines left out, read along the time index
        (no sort, no quarantine scan; the ledger reads a slice every housekeeping pass). Raises StoreError."""
        return self._rows(
            "SELECT time_ms, line, CASE WHEN sent_ms IS NULL THEN 'unsent' ELSE 'sent' END FROM points "
            "WHERE time_ms >= ? AND time_ms < ? AND held = 0 ORDER BY time_ms",
            (since_ms, until_ms))

    def _rows(self, sql: str, params: tuple) -> Iterator[tuple]:
        try:
            for row in self._db.execute(sql, params):  # noqa: UP028 - `yield from` would close the cursor of an
                yield row  # unfinished iteration (`export | head`) when collected, after the store closed: it raises
        except UnicodeDecodeError as exc:
            raise StoreError(f"store {self.path}: {_sqlite_text_error(exc)}", corrupt=True) from None
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}",
                             corrupt=isinstance(exc, sqlite3.DatabaseError) and _is_corruption(exc)) from None

    # -- the ledger's daily totals (ledger.py; table from store_schema migration 2) ---------------------------
    @_store_errors
    def next_time_ms(self, since_ms: int) -> int | None:
        """The time of the first stored point at or after `since_ms` (one index probe), or None."""
        return self._db.execute("SELECT min(time_ms) FROM points WHERE time_ms >= ?", (since_ms,)).fetchone()[0]

    @_store_errors
    def newest_known_time_ms(self) -> int | None:
        """The newest time of the points not held stored before the first line held for the clock, or None.
        Kept per first held line: new rows come after it, and a row deleted later was still measured then."""
        first = self._db.execute("SELECT min(id) FROM points WHERE held = 1").fetchone()[0]  # migration 3's index
        if first is not None and (self._newest_known or (None,))[0] != first:
            # Held lines stamped after the newest known one (a clock restored by fake-hwclock) sit on this scan
            # of the time index: once per first held line, not every housekeeping pass.
            self._newest_known = (first, self._db.execute(
                "SELECT max(time_ms) FROM points WHERE held = 0 AND id < ?", (first,)).fetchone()[0])
        return None if first is None else self._newest_known[1]

    @_store_errors
    def add_daily_totals(self, rows: Iterable[tuple], state: Mapping[str, str]) -> None:
        """Add (day, site, unit, role, in_wh, out_wh, measured_s, channels) rows to the daily totals and set
        `state` (the settled mark), in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO daily_totals (day, site, unit, role, in_wh, out_wh, measured_s, channels) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, site, unit, role) DO UPDATE SET "
                "in_wh = in_wh + excluded.in_wh, out_wh = out_wh + excluded.out_wh, "
                "measured_s = measured_s + excluded.measured_s, channels = max(channels, excluded.channels)",
                list(rows))
            db.executemany("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", state.items())

    @_store_errors
    def daily_totals(self, days: Sequence[str]) -> list[tuple]:
        """The settled rows of `days` (ISO dates): (day, site, unit, role, in_wh, out_wh, measured_s, channels);
        none from a store older than the table."""
        return self.settled_totals(days)[1]

    @_store_errors
    def settled_totals(self, days: Sequence[str], mark_key: str | None = None) -> tuple[str | None, list[tuple]]:
        """The state value `mark_key` (the ledger's settled mark; None: not read) and daily_totals(days), in
        one snapshot: a settling pass that commits between the two reads cannot make them disagree."""
        self._db.execute("BEGIN")
        try:
            row = mark_key and self._db.execute("SELECT value FROM state WHERE key = ?", (mark_key,)).fetchone()
            rows = self._db.execute(
                f"SELECT day, site, unit, role, in_wh, out_wh, measured_s, channels FROM daily_totals "
                f"WHERE day IN ({','.join('?' * len(days))}) ORDER BY day, site, unit, role", list(days)
            ).fetchall() if self._has_totals() else []
            return (row[0] if row else None), rows
        finally:
            if self._db.in_transaction:  # SQLite may have rolled it back on its own (I/O error, no memory)
                self._db.execute("COMMIT")

    @_store_errors
    def drop_daily_totals_from(self, day: str) -> int:
        """Delete the daily_totals rows of `day` (ISO date) and later, to settle those days again; returns
        how many rows of earlier days remain (0: the ledger never settled anything before `day`)."""
        if not self._has_totals() or not self._db.execute("SELECT 1 FROM daily_totals LIMIT 1").fetchone():
            return 0  # nothing settled ever: no write transaction (a store that never settled asks every pass)
        with self._transaction() as db:
            db.execute("DELETE FROM daily_totals WHERE day >= ?", (day,))
            return db.execute("SELECT count(*) FROM daily_totals").fetchone()[0]

    def _has_totals(self) -> bool:  # a store from before store_schema migration 2 has no such table
        return bool(self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'daily_totals'").fetchone())

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


def format_mb(size_bytes: float) -> str:
    """A size for people, in MB (MiB) with a sensible precision: "200 MB", "12.5 MB", "1.25 MB", "0.05 MB"."""
    mb = size_bytes / 1_048_576
    if mb >= 100:
        return f"{mb:.0f} MB"
    if mb >= 10:
        return f"{mb:.1f} MB".replace(".0 MB", " MB")
    if mb >= 0.01 or mb == 0:
        return f"{mb:.2f}".rstrip("0").rstrip(".") + " MB"
    return f"{mb:.2g} MB"


def _count(db: sqlite3.Connection, **changes: int) -> None:
    """Add to the running counters kept in `state` (a change of 0 writes nothing)."""
    for key, amount in changes.items():
        if amount:
            db.execute("INSERT INTO state (key, value) VALUES (?, ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + ?", (key, str(amount), amount))


def _inode(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`, None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text or "file is encrypted" in text
