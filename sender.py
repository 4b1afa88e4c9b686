"""Delivery policy: the one place that decides when and how the outbox is sent.

The writer only writes one batch and raises a typed error; this module turns
each outcome into an action:

- delivered: mark the lines sent (only after the server acknowledged them);
- lines refused (400/422): split the batch to find the bad lines, quarantine
  them, deliver the rest; too large (413): split and resend;
- auth (401/403), not found (404), other refusals: keep everything, retry slowly;
- throttled (429/503): wait at least Retry-After (capped; a default when absent);
- unreachable (5xx, timeout, refused, DNS): exponential backoff with jitter.

Oldest lines go first. Measuring never waits for any of this: the sender runs
in its own thread with its own connection to the store.
"""
from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from clock import now_iso

from outbox import Batch, Outbox, Pending, StoreError
from rpi_errors import (
    ErrorHandler,
    RefusedError,
    RejectedError,
    SendingError,
    ThrottledError,
    TooLargeError,
    UnreachableError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """Delivery timing and sizes; seconds and bytes."""

    flush_interval_s: float = 50.0  # = [influx] flush_interval_s's default (README, Performance: why 50 s)
    batch_lines: int = 5000
    batch_bytes: int = 1_000_000
    max_upload_bytes_per_s: float = 0.0  # 0 = unlimited
    backoff_base_s: float = 2.0
    backoff_max_s: float = 300.0
    refused_retry_s: float = 60.0
    throttle_default_s: float = 30.0
    throttle_max_s: float = 900.0
    progress_every_s: float = 30.0
    final_flush_s: float = 5.0
    size_limit_s: float = 3600.0  # how long a 413's smaller batch size holds before the full size is tried again

    def full(self, lines: int, text_bytes: int, batch_bytes: int | None = None) -> bool:
        """Whether a batch of `lines` lines and `text_bytes` bytes (newlines included) counts as full: a
        backlog is waiting behind it (the next batch is read ahead; the writer may compress it faster).
        `batch_bytes`: the byte cap the batch was read with (default: this policy's)."""
        cap = self.batch_bytes if batch_bytes is None else batch_bytes
        return lines >= self.batch_lines or text_bytes + 1 >= cap // 2


@runtime_checkable
class Writer(Protocol):
    """What the sender delivers through (local_solution.V1Writer, influx_http.V2Writer; a fake in tests).

    `write(lines)` sends one batch, oldest first, and returns the request-body bytes that went out; it
    returns only when the server acknowledged every line, else raises one typed error per outcome:
    RejectedError (lines refused, 400/422), TooLargeError (413), AuthError/NotFoundError/RefusedError
    (kept, retried slowly), ThrottledError (429/503, with retry_after_s), UnreachableError (5xx, timeout,
    network); a refused request carries its `bytes_sent`. `timeout_s`: its per-request deadline, seconds.
    `abort()` cuts a write in flight from another thread; `close()` releases the connection (idempotent).
    `label` names the database for logs and `status` (never a secret). Not thread-safe otherwise.
    Optional: `prepare(text, backlog=False)` builds the request for a batch of newline-joined UTF-8 lines
    ahead of its write (pure and thread-safe: the sender's helper thread calls it while the previous request
    is in flight) and write() then takes what it returned instead of the lines.
    """

    label: str
    timeout_s: float

    def write(self, lines: Sequence[str]) -> int: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


class Action(enum.Enum):
    """What to do after a failed write."""

    WAIT = "wait"  # keep the batch and try again after Decision.wait_s
    SPLIT = "split"  # send the batch again in two halves (find the refused line; fit the size limit)
    QUARANTINE = "quarantine"  # the batch is one line the server refuses: set it aside, deliver the rest


@dataclass(frozen=True)
class Decision:
    """The retry decision: `action`, `wait_s` (for WAIT) and `failures`, the count of consecutive
    unreachable outcomes to carry into the next decision."""

    action: Action
    wait_s: float = 0.0
    failures: int = 0


def retry_decision(outcome: Exception, failures: int, policy: Policy, rng: random.Random,
                   lines: int = 1) -> Decision:
    """What to do after `outcome` (the writer's typed error) on a batch of `lines` lines, after `failures`
    consecutive unreachable outcomes. Pure: nothing but `rng.uniform` (the jitter) is touched.

    Lines refused or too large: split, or quarantine a single line (or every line, when the server says it
    dropped them all). Throttled: wait Retry-After, capped
    (the default when absent); the failure count is kept. Unreachable: exponential backoff with jitter
    (many Pis must not retry in step). Any other refusal (auth, not found): wait refused_retry_s.
    """
    if isinstance(outcome, (RejectedError, TooLargeError)):
        # InfluxDB 1.x may say it dropped every line (a type conflict on all of them, e.g. a field whose type
        # changed): all go at once, not through a halving search's 2N - 1 requests.
        everything = getattr(outcome, "dropped", None) == lines
        return Decision(Action.QUARANTINE if lines <= 1 or everything else Action.SPLIT, failures=failures)
    if isinstance(outcome, ThrottledError):
        wait = outcome.retry_after_s if outcome.retry_after_s is not None else policy.throttle_default_s
        return Decision(Action.WAIT, min(max(wait, 1.0), policy.throttle_max_s), failures)
    if isinstance(outcome, UnreachableError):
        failures += 1
        # The exponent is capped: 2.0 * 2 ** 1024 is an OverflowError (2.6 days of outage at the ceiling).
        ceiling = min(policy.backoff_base_s * 2 ** min(failures - 1, 64), policy.backoff_max_s)
        return Decision(Action.WAIT, ceiling * rng.uniform(0.5, 1.0), failures)
    return Decision(Action.WAIT, policy.refused_retry_s, failures)


@dataclass
class FlushResult:
    """What one flush did."""

    delivered: int = 0
    quarantined: int = 0
    requests: int = 0
    bytes_sent: int = 0
    error: Exception | None = None


class Sender:
    """Sends the outbox through `writer` in a background thread.

    `clock` is monotonic seconds, `sleep(s)` waits (the thread's own waits are
    interruptible by stop()). start/notify/stop are thread-safe; flush() is for
    the sender thread (or a test) only.
    """

    def __init__(self, writer: Writer, outbox: Outbox, handler: ErrorHandler, policy: Policy = Policy(), *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.writer = writer
        self.outbox = outbox
        self.handler = handler
        self.policy = policy
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._sleep = sleep or (lambda s: self._stop.wait(s))
        self._rng = rng or random.Random()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._estimate = 0  # unsent lines added since the last flush (approximate, for waking early)
        self._failures = 0
        self._next_attempt = 0.0
        self._next_send_allowed = 0.0
        self._last_progress = 0.0
        self._stop_deadline: float | None = None  # set by stop(): no request starts after it
        self._mark_failed: StoreError | None = None  # a mark of this flush failed (the helper's)
        # After a 413: (the batch bytes the server took, until when (clock s)). Every batch above it would be
        # refused and split again, its upload paid twice on a metered link.
        self._size_limit: tuple[int, float] | None = None
        self.total_delivered = 0
        self.total_requests = 0
        self.total_bytes = 0

    @property
    def next_attempt_s(self) -> float:
        """When (monotonic s) the next delivery may start after a failure (0: at once)."""
        return self._next_attempt

    @property
    def failures(self) -> int:
        """Consecutive unreachable outcomes so far (the backoff's exponent; 0 after a delivery)."""
        return self._failures

    # -- thread control --------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def notify(self, new_lines: int) -> None:
        """The measuring loop stored `new_lines` more lines; wake early when a batch is full."""
        with self._lock:
            self._estimate += new_lines
            full = self._estimate >= self.policy.batch_lines
        if full:
            self._wake.set()

    def stop(self) -> bool:
        """Stop after one last delivery attempt; returns within `final_flush_s` + 2.5 s whatever the server
        does (a request still in flight then is cut through the writer's abort()). What is not
        acknowledged stays stored. Returns True when the thread ended (its store may be closed)."""
        self._stop_deadline = self._clock() + self.policy.final_flush_s
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(self.policy.final_flush_s + 0.5)
        if self._thread.is_alive():
            self.writer.abort()
            self._thread.join(2.0)
        if self._thread.is_alive():
            log.warning("delivery still busy at shutdown: unsent points stay in the store for the next start")
            return False
        return True

    def _run(self) -> None:
        last_flush = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            due = max(last_flush + self.policy.flush_interval_s, self._next_attempt)
            if self._wake.is_set() and now >= self._next_attempt:
                due = now
            if due > now:
                self._wake.wait(due - now)
            if self._stop.is_set():
                break
            if self._clock() < self._next_attempt:
                self._wake.clear()
                continue
            self._wake.clear()
            last_flush = self._clock()
            self._flush_logged()
        deadline = self._stop_deadline if self._stop_deadline is not None else (
            self._clock() + self.policy.final_flush_s)
        if self._clock() < deadline:
            self._flush_logged(deadline)
        log.info("sender stopped: %d points delivered in %d requests (%d bytes) this run",
                 self.total_delivered, self.total_requests, self.total_bytes)

    def _flush_logged(self, deadline: float | None = None) -> None:
        try:
            self.flush(deadline)
        except Exception:  # noqa: BLE001 - the sender thread must survive anything one flush does
            log.exception("unexpected error while delivering; retrying later")
            self._next_attempt = self._clock() + self.policy.refused_retry_s

    # -- one flush -------------------------------------------------------
    def flush(self, deadline: float | None = None) -> FlushResult:
        """Send batches, oldest first, until the queue is drained, a batch is not full,
        an error stops delivery, or `deadline` (monotonic s) passes."""
        result = FlushResult()
        with self._lock:
            self._estimate = 0
        started = self._clock()
        # A pipeline: while a request is in flight (waiting on the network and the server), one helper
        # thread marks the previous batch delivered, then reads the next one from the store and builds its
        # body (SQLite and zlib both run without the GIL). The helper is the only thread on the store's
        # connection during a drain; this thread touches the store only after waiting for it (`_idle`).
        # A mark that fails stops the drain after at most one more request; what was acknowledged but not
        # marked goes again (InfluxDB overwrites a point with the same series and time).
        # Until a batch comes out full (a backlog), the helper's work runs here, in order: a flush of one
        # batch (every flush but a drain's) has nothing to overlap, and a thread started for it costs more.
        helper: ThreadPoolExecutor | _Inline = _Inline()
        self._mark_failed = None
        marks: list[Future] = []
        failed: Exception | None = None
        try:
            try:
                batch, request = helper.submit(self._read, 0).result()
                while batch is not None and not self._past(deadline):
                    full = self.policy.full(len(batch), len(batch.text), self._batch_bytes())
                    if full and isinstance(helper, _Inline):
                        helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sender-prefetch")
                    # Ids only grow, so the batch after this one's last id is the next oldest. (Readings
                    # released by a clock sync meanwhile have older ids: the next flush takes them first.)
                    ahead = helper.submit(self._read, batch.last_id) if full else None
                    if self._deliver(batch, request, result, deadline, helper):
                        marks.append(helper.submit(self._mark, batch, result))
                    _raise_failed(marks)
                    self._log_progress(result, started, helper)
                    if not full:
                        break  # caught up: the rest waits for the next flush, so requests stay big
                    batch, request = ahead.result()
            except BaseException as exc:
                failed = exc
                raise
            finally:
                helper.shutdown(wait=True)  # the last mark lands before the flush ends
                if failed is None or isinstance(failed, _OutOfBudget):
                    _raise_failed(marks)
                elif any(f.exception() for f in marks) and not any(f.exception() is failed for f in marks):
                    # (A failed mark that stopped the flush is logged once, below, as the pause's reason.)
                    log.error("delivered points could not be marked (they go again): %s",
                              next(f.exception() for f in marks if f.exception()))
        except _OutOfBudget:
            pass  # the upload cap or the deadline: the rest goes at the next flush
        except (RefusedError, UnreachableError) as exc:
            result.error = exc
            self._on_failure(exc)
        except StoreError as exc:
            result.error = exc
            log.error("delivery paused: %s", exc)
            self._next_attempt = self._clock() + self.policy.refused_retry_s
        if result.error is None and result.requests:
            self._on_success(result)
        self.total_delivered += result.delivered
        self.total_requests += result.requests
        self.total_bytes += result.bytes_sent
        return result

    def _past(self, deadline: float | None) -> bool:
        now = self._clock()
        if deadline is not None and now >= deadline:
            return True
        return self._stop_deadline is not None and self._stop.is_set() and now >= self._stop_deadline

    def _read(self, after_id: int) -> tuple[Batch | None, object]:
        """The helper's read (in its thread; in the sender thread until a backlog starts one): the next batch
        after `after_id` and its request, built ahead when the writer offers prepare() (its gzip'd body;
        `backlog` for a full batch), else the lines."""
        cap = self._batch_bytes()
        batch = self.outbox.pending_batch(self.policy.batch_lines, cap, after_id)
        if batch is None:
            return None, None
        prepare = getattr(self.writer, "prepare", None)
        if prepare is None:
            return batch, batch.lines()
        return batch, prepare(batch.text, backlog=self.policy.full(len(batch), len(batch.text), cap))

    def _batch_bytes(self) -> int:
        """The byte cap a batch is read with: the policy's, or less for a while after a 413 (either thread:
        the limit is replaced whole, never changed in place)."""
        limit = self._size_limit
        if limit is None:
            return self.policy.batch_bytes
        if self._clock() >= limit[1]:
            self._size_limit = None  # try the full size again: one refused request an hour at most
            return self.policy.batch_bytes
        return limit[0]

    def _shrink(self, batch: list[Pending]) -> None:
        """A 413 on `batch` (two lines or more): batches stay under half its size for policy.size_limit_s."""
        text_bytes = _text_bytes(batch)
        cap = max(1, text_bytes // 2)
        if cap < self._batch_bytes():
            self._size_limit = (cap, self._clock() + self.policy.size_limit_s)
            log.warning("the server refuses requests this large (413 on %d lines, %d bytes): batches of at most "
                        "%d bytes for the next %.0f min", len(batch), text_bytes, cap, self.policy.size_limit_s / 60)

    def _mark(self, batch: Batch, result: FlushResult) -> None:
        """The helper's mark (in its thread; in the sender thread until a backlog starts one): the server
        acknowledged `batch`. After a mark failed in this flush none is made (the same error again), so the
        unmarked batches go again oldest first."""
        if self._mark_failed is not None:
            raise self._mark_failed
        try:
            self.outbox.mark_sent(batch.ids)
        except StoreError as exc:
            self._mark_failed = exc
            raise
        result.delivered += len(batch)

    def _deliver(self, batch: Batch, request: object, result: FlushResult, deadline: float | None,
                 helper: ThreadPoolExecutor | _Inline) -> bool:
        """Write one batch read by the helper. True when the server acknowledged it all (the caller has it
        marked). Refused lines or 413: the halving search (_send) on the batch's rows, with the store to
        this thread alone. Raises the writer's other errors, _OutOfBudget."""
        if self._past(deadline) or not self._rate_wait(deadline):
            raise _OutOfBudget
        if len(batch) > 1 and len(batch.text) + 1 > self._batch_bytes():
            # Read ahead before a 413 lowered the cap: sent in pieces that fit, not refused once more.
            _idle(helper)
            self._send(self.outbox.rows(batch), result, deadline)
            return False
        result.requests += 1
        try:
            sent = self.writer.write(request)
        except (RejectedError, TooLargeError) as exc:
            _idle(helper)
            rows = self.outbox.rows(batch)
            if len(rows) == len(batch):
                self._refused(exc, rows, result, deadline)  # counts the refused upload itself
                return False
            self._account(exc.bytes_sent, result)  # an upload paid for, whatever is left of the batch
            if rows:  # the size cap dropped part of the batch meanwhile: the refusal may have been theirs
                self._send(rows, result, deadline)
            return False
        self._account(sent, result)
        return True

    def _send(self, batch: list[Pending], result: FlushResult, deadline: float | None) -> None:
        """Write `batch`; on refused lines or 413 split it in two and recurse. Every request, the
        halves' included, waits for the upload budget (raises _OutOfBudget when it cannot)."""
        if self._past(deadline) or not self._rate_wait(deadline):
            raise _OutOfBudget
        if len(batch) > 1 and _text_bytes(batch) > self._batch_bytes():
            half = len(batch) // 2  # larger than a 413 showed the server takes: split without asking
            self._send(batch[:half], result, deadline)
            self._send(batch[half:], result, deadline)
            return
        result.requests += 1
        try:
            sent = self.writer.write([p.line for p in batch])
        except (RejectedError, TooLargeError) as exc:
            self._refused(exc, batch, result, deadline)
            return
        self._account(sent, result)
        self.outbox.mark_sent(p.id for p in batch)
        result.delivered += len(batch)

    def _refused(self, exc: RejectedError | TooLargeError, batch: list[Pending], result: FlushResult,
                 deadline: float | None) -> None:
        """The server refused lines of `batch` (or it was too large): quarantine a single line, else
        send the halves."""
        self._account(exc.bytes_sent, result)  # refused requests cost upload too
        decision = retry_decision(exc, self._failures, self.policy, self._rng, lines=len(batch))
        if decision.action is Action.QUARANTINE:
            reason = str(exc)
            moved = self.outbox.quarantine(batch, reason)
            if not moved:
                return  # dropped by the size cap meanwhile (counted there)
            result.quarantined += moved
            log.warning("quarantined %d line(s) the server refused: %s | %.200s", moved, reason, batch[0].line)
            self.handler.report(SendingError(
                f"the server refused {result.quarantined} line(s); they are quarantined in the store "
                f"(`main.py export`): {reason}", key="quarantine"))
            return
        if isinstance(exc, TooLargeError):
            self._shrink(batch)
        half = len(batch) // 2
        self._send(batch[:half], result, deadline)
        self._send(batch[half:], result, deadline)

    def _account(self, sent_bytes: int, result: FlushResult) -> None:
        """Count a request's upload in the flush's bytes and against the upload budget."""
        result.bytes_sent += sent_bytes
        rate = self.policy.max_upload_bytes_per_s
        if rate > 0:
            self._next_send_allowed = max(self._next_send_allowed, self._clock()) + sent_bytes / rate

    def _rate_wait(self, deadline: float | None) -> bool:
        """Wait for the upload budget. False when the wait would pass `deadline` or we are stopping."""
        delay = self._next_send_allowed - self._clock()
        if delay <= 0:
            return True
        if deadline is not None and self._clock() + delay > deadline:
            return False
        if self._stop.is_set() and deadline is None:
            return False
        self._sleep(delay)
        return self._clock() >= self._next_send_allowed - 1e-6

    def _log_progress(self, result: FlushResult, started: float, helper: ThreadPoolExecutor | _Inline) -> None:
        now = self._clock()
        if now - self._last_progress < self.policy.progress_every_s:
            return
        left = helper.submit(self.outbox.queue_stats).result().queue_depth  # in the store's thread
        if left <= self.policy.batch_lines:
            return
        self._last_progress = now
        rate = result.delivered / max(now - started, 1e-6)
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        log.info("delivering backlog: %d points left, %.0f points/s, ETA %s", left, rate, eta)

    # -- outcomes --------------------------------------------------------
    def _on_success(self, result: FlushResult) -> None:
        self._failures = 0
        self._next_attempt = 0.0
        self.handler.clear("send")
        if not result.quarantined:
            self.handler.clear("quarantine")
        self._save_state({"last_send": now_iso(), "writer": self.writer.label})

    def _on_failure(self, exc: Exception) -> None:
        now = self._clock()
        decision = retry_decision(exc, self._failures, self.policy, self._rng)
        self._failures = decision.failures
        wait = decision.wait_s
        self._next_attempt = now + wait
        exc.key = "send"
        self.handler.report(exc)
        self._save_state({"last_error": f"{now_iso()} {exc}"})
        log.debug("next delivery attempt in %.1f s", wait)

    def _save_state(self, values: dict[str, str]) -> None:
        try:
            self.outbox.set_state(values)
        except StoreError as exc:
            log.warning("cannot record delivery state: %s", exc)


class _OutOfBudget(Exception):
    """No request may go out now (upload cap, deadline or stopping); not an error."""


def _text_bytes(rows: Sequence[Pending]) -> int:
    """The bytes of `rows`' lines as a batch's text counts them (UTF-8, a newline after each)."""
    return sum(len(p.line.encode("utf-8")) + 1 for p in rows)


class _Inline:
    """A flush's helper before it needs a thread: each task runs at once in the calling thread, its outcome
    in a done Future, as ThreadPoolExecutor would give it. Not thread-safe (the sender thread's own)."""

    @staticmethod
    def submit(fn: Callable, *args: object) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed over in the Future, as the pool's worker does
            future.set_exception(exc)
        return future

    @staticmethod
    def shutdown(wait: bool = True) -> None:  # noqa: ARG004 - ThreadPoolExecutor's signature
        """Nothing runs in the background."""


def _idle(helper: ThreadPoolExecutor | _Inline) -> None:
    """Wait until the helper thread has done everything submitted so far (it runs one task at a time, in
    order): the store's connection is then free for this thread."""
    helper.submit(lambda: None).result()


def _raise_failed(marks: list[Future]) -> None:
    """Raise the error of a mark that failed (StoreError): delivery stops there, the batch goes again.
    Marks that are done and fine are dropped from `marks`."""
    for future in marks:
        if future.done() and future.exception() is not None:
            raise future.exception()
    marks[:] = [future for future in marks if not future.done()]

