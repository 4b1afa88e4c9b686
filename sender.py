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

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from outbox import Outbox, Pending, StoreError
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

    def __init__(self, writer, outbox: Outbox, handler: ErrorHandler, policy: Policy = Policy(), *,
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
        self.total_delivered = 0
        self.total_requests = 0
        self.total_bytes = 0

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
            abort = getattr(self.writer, "abort", None)
            if abort is not None:
                abort()
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
        try:
            while not self._past(deadline):
                batch = self.outbox.pending(self.policy.batch_lines, self.policy.batch_bytes)
                if not batch:
                    break
                self._send(batch, result, deadline)
                self._log_progress(result, started)
                if len(batch) < self.policy.batch_lines and _size(batch) < self.policy.batch_bytes // 2:
                    break  # caught up: the rest waits for the next flush, so requests stay big
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

    def _send(self, batch: list[Pending], result: FlushResult, deadline: float | None) -> None:
        """Write `batch`; on refused lines or 413 split it in two and recurse. Every request, the
        halves' included, waits for the upload budget (raises _OutOfBudget when it cannot)."""
        if self._past(deadline) or not self._rate_wait(deadline):
            raise _OutOfBudget
        result.requests += 1
        try:
            sent = self.writer.write([p.line for p in batch])
        except (RejectedError, TooLargeError) as exc:
            self._account(exc.bytes_sent)  # refused requests cost upload too
            result.bytes_sent += exc.bytes_sent
            if len(batch) == 1:
                reason = str(exc)
                self.outbox.quarantine(batch, reason)
                result.quarantined += 1
                log.warning("quarantined 1 line the server refused: %s | %.200s", reason, batch[0].line)
                self.handler.report(SendingError(
                    f"the server refused {result.quarantined} line(s); they are quarantined in the store "
                    f"(`main.py export`): {reason}", key="quarantine"))
                return
            half = len(batch) // 2
            self._send(batch[:half], result, deadline)
            self._send(batch[half:], result, deadline)
            return
        self._account(sent)
        self.outbox.mark_sent(p.id for p in batch)
        result.delivered += len(batch)
        result.bytes_sent += sent

    def _account(self, sent_bytes: int) -> None:
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

    def _log_progress(self, result: FlushResult, started: float) -> None:
        now = self._clock()
        if now - self._last_progress < self.policy.progress_every_s:
            return
        left = self.outbox.queue_stats().queue_depth
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
        self._save_state({"last_send": _now_iso(), "writer": getattr(self.writer, "label", "")})

    def _on_failure(self, exc: Exception) -> None:
        now = self._clock()
        if isinstance(exc, ThrottledError):
            wait = exc.retry_after_s if exc.retry_after_s is not None else self.policy.throttle_default_s
            wait = min(max(wait, 1.0), self.policy.throttle_max_s)
        elif isinstance(exc, UnreachableError):
            self._failures += 1
            ceiling = min(self.policy.backoff_base_s * 2 ** (self._failures - 1), self.policy.backoff_max_s)
            wait = ceiling * self._rng.uniform(0.5, 1.0)  # jitter: many Pis must not retry in step
        else:
            wait = self.policy.refused_retry_s
        self._next_attempt = now + wait
        exc.key = "send"
        self.handler.report(exc)
        self._save_state({"last_error": f"{_now_iso()} {exc}"})
        log.debug("next delivery attempt in %.1f s", wait)

    def _save_state(self, values: dict[str, str]) -> None:
        try:
            self.outbox.set_state(values)
        except StoreError as exc:
            log.warning("cannot record delivery state: %s", exc)


class _OutOfBudget(Exception):
    """No request may go out now (upload cap, deadline or stopping); not an error."""


def _size(batch: list[Pending]) -> int:
    return sum(len(p.line) + 1 for p in batch)


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
