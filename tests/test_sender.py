"""The delivery policy (sender.py) on its own: the pure retry decision, and the Sender driving a fake
writer that follows the Writer protocol (scripted outcomes, a real SQLite outbox). The writers
themselves are tested against real servers in test_delivery.py and test_network_lies.py."""
from __future__ import annotations

import random
import sqlite3

import pytest

from local_solution import V1Writer
from outbox import Outbox
from rpi_errors import (AuthError, ErrorHandler, NotFoundError, RefusedError, RejectedError, ThrottledError, Tier,
                        TooLargeError, UnreachableError)
from sender import Action, Decision, Policy, Sender, Writer, retry_decision

POLICY = Policy()


class MaxRandom(random.Random):
    """A random source whose uniform(a, b) is always b: the jitter at its ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


# -- the pure decision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [RejectedError("422"), TooLargeError("413")])
def test_refused_lines_split_a_batch_and_quarantine_a_single_line(error):
    assert retry_decision(error, 3, POLICY, random.Random(1), lines=10) == Decision(Action.SPLIT, failures=3)
    assert retry_decision(error, 3, POLICY, random.Random(1), lines=1) == Decision(Action.QUARANTINE, failures=3)
    everything = RejectedError("HTTP 400: partial write: field type conflict dropped=10")
    everything.dropped = 10  # InfluxDB 1.x said so for the whole batch: no halving search
    assert retry_decision(everything, 3, POLICY, random.Random(1), lines=10) == Decision(Action.QUARANTINE, failures=3)
    everything.dropped = 9
    assert retry_decision(everything, 3, POLICY, random.Random(1), lines=10) == Decision(Action.SPLIT, failures=3)


@pytest.mark.parametrize("retry_after_s,wait_s", [(None, 30.0), (120.0, 120.0), (0.0, 1.0), (99999.0, 900.0)])
def test_throttled_waits_retry_after_capped_and_keeps_the_failure_count(retry_after_s, wait_s):
    decision = retry_decision(ThrottledError("429", retry_after_s=retry_after_s), 2, POLICY, random.Random(1))
    assert decision == Decision(Action.WAIT, wait_s, 2)


def test_unreachable_backs_off_exponentially_to_five_minutes_with_jitter():
    failures, ceilings = 0, []
    for _ in range(10):
        decision = retry_decision(UnreachableError("down"), failures, POLICY, MaxRandom())
        assert decision.action is Action.WAIT and decision.failures == failures + 1
        failures = decision.failures
        ceilings.append(decision.wait_s)
    assert ceilings == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    jittered = [retry_decision(UnreachableError("down"), 4, POLICY, random.Random(seed)).wait_s for seed in range(50)]
    assert all(16 <= w <= 32 for w in jittered) and len(set(jittered)) > 40  # never in step, never over the ceiling
    # Days of outage: the 1025th failure in a row and beyond still back off (2.0 * 2 ** 1024 overflows a float).
    for failures in (1024, 5000, 10**6):
        assert retry_decision(UnreachableError("down"), failures, POLICY, MaxRandom()) == Decision(
            Action.WAIT, 300, failures + 1)


@pytest.mark.parametrize("error", [AuthError("401"), NotFoundError("404"), RefusedError("405")])
def test_other_refusals_wait_the_slow_retry_and_do_not_count_as_unreachable(error):
    assert retry_decision(error, 5, POLICY, random.Random(1)) == Decision(Action.WAIT, POLICY.refused_retry_s, 5)


# -- the Sender with a fake writer ------------------------------------------------------------------------------
class FakeWriter:
    """Follows sender.Writer: each write takes the next scripted outcome (an exception to raise, or None for
    "acknowledged"); lines containing `refuse` are refused as a 422 would."""

    label = "fake database"
    timeout_s = 1.0

    def __init__(self, outcomes=(), refuse: str | None = None) -> None:
        self.outcomes = list(outcomes)
        self.refuse = refuse
        self.batches: list[list[str]] = []
        self.delivered: list[str] = []
        self.aborted = self.closed = False

    def write(self, lines) -> int:
        lines = list(lines)
        self.batches.append(lines)
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is None and self.refuse and any(self.refuse in line for line in lines):
            outcome = RejectedError("HTTP 422: bad line")
        if outcome is not None:
            outcome.bytes_sent = 10
            raise outcome
        self.delivered += lines
        return sum(len(line) + 1 for line in lines)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


def test_the_fake_and_the_real_writers_follow_the_protocol():
    assert isinstance(FakeWriter(), Writer)
    assert isinstance(V1Writer("http://127.0.0.1:9", "d", "", "", None, 1.0), Writer)


def filled(tmp_path, clock, n: int) -> Outbox:
    outbox = Outbox(tmp_path / "store", wall_ms=clock.wall_ms)
    outbox.append([(1000 + i, f"m,unit=u{i} v={i}i {1000 + i}") for i in range(n)])
    return outbox


def test_a_refused_line_is_found_by_splitting_and_quarantined_the_rest_delivered(tmp_path, clock):
    outbox = filled(tmp_path, clock, 8)
    writer = FakeWriter(refuse="u5 ")
    handler = ErrorHandler(None, clock=clock)
    result = Sender(writer, outbox, handler, Policy(batch_lines=8), clock=clock, sleep=clock.sleep).flush()
    assert result.delivered == 7 and result.quarantined == 1
    assert [len(b) for b in writer.batches] == [8, 4, 4, 2, 1, 1, 2]  # halves until the bad line is alone
    assert writer.delivered == [f"m,unit=u{i} v={i}i {1000 + i}" for i in range(8) if i != 5]  # oldest first
    assert outbox.queue_stats().quarantined == 1 and handler.top_tier == Tier.SENDING


def test_a_refusal_of_a_batch_the_size_cap_cut_meanwhile_sends_the_survivors_again(tmp_path, clock):
    """The cap (housekeeping, the other thread) drops the oldest unsent lines, which may be the batch in
    flight: a refusal then says nothing about the survivors, so they go again as they are (not halved, not
    quarantined), and a batch the cap took whole ends the matter without an error or a count."""
    outbox = filled(tmp_path, clock, 8)

    class CutMeanwhile(FakeWriter):
        def write(self, lines) -> int:
            if not self.batches:  # while the first request is in flight, the cap drops its 3 oldest lines
                with sqlite3.connect(outbox.path) as db:
                    db.execute("DELETE FROM points WHERE id <= 3")
            return super().write(lines)

    writer = CutMeanwhile([RejectedError("HTTP 422: bad line")])
    result = Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(batch_lines=8), clock=clock,
                    sleep=clock.sleep).flush()
    assert [len(b) for b in writer.batches] == [8, 5] and result.quarantined == 0 and result.error is None
    assert writer.delivered == [f"m,unit=u{i} v={i}i {1000 + i}" for i in range(3, 8)]


def test_unreachable_keeps_everything_and_the_next_attempt_follows_the_decision(tmp_path, clock):
    outbox = filled(tmp_path, clock, 3)
    writer = FakeWriter([UnreachableError("down"), UnreachableError("down"), None])
    handler = ErrorHandler(None, clock=clock)
    sender = Sender(writer, outbox, handler, clock=clock, sleep=clock.sleep, rng=MaxRandom())
    assert isinstance(sender.flush().error, UnreachableError) and outbox.queue_stats().queue_depth == 3
    assert handler.top_tier == Tier.CONNECTION
    assert sender.next_attempt_s == clock() + 2 and sender.failures == 1  # the decision's wait (jitter at max)
    assert isinstance(sender.flush().error, UnreachableError)
    assert sender.next_attempt_s == clock() + 4 and sender.failures == 2
    assert sender.flush().delivered == 3 and sender.failures == 0 and writer.delivered and outbox.queue_stats().queue_depth == 0
    assert handler.top_tier is None and outbox.state()["writer"] == "fake database"


def test_stop_cuts_a_write_in_flight_through_abort(tmp_path, clock):
    import threading

    outbox = filled(tmp_path, clock, 1)
    release = threading.Event()

    class Stuck(FakeWriter):
        def write(self, lines) -> int:
            release.wait(30)
            return super().write(lines)

        def abort(self) -> None:
            super().abort()
            release.set()

    writer = Stuck()
    sender = Sender(writer, outbox, ErrorHandler(None), Policy(flush_interval_s=0.0, final_flush_s=0.1))
    sender.start()
    sender.notify(10_000)
    assert sender.stop() and writer.aborted
    outbox.close()


def test_the_next_batch_is_read_while_a_request_is_in_flight_oldest_first_each_line_once(tmp_path, clock):
    import threading

    outbox = filled(tmp_path, clock, 23)
    seen_threads = set()
    pending = outbox.pending_batch

    def traced(*args, **kwargs):
        seen_threads.add(threading.current_thread().name)
        return pending(*args, **kwargs)

    outbox.pending_batch = traced
    writer = FakeWriter([None, None, UnreachableError("down")])  # the third request fails
    sender = Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(batch_lines=5), clock=clock,
                    sleep=clock.sleep, rng=MaxRandom())
    result = sender.flush()
    assert isinstance(result.error, UnreachableError) and result.delivered == 10
    assert any(name.startswith("sender-prefetch") for name in seen_threads)  # read ahead in its helper thread
    assert outbox.queue_stats().queue_depth == 13  # the failed batch and the one read ahead stay unsent
    assert sender.flush().delivered == 13
    expected = [f"m,unit=u{i} v={i}i {1000 + i}" for i in range(23)]
    assert writer.delivered == expected  # oldest first, every line exactly once
    assert [len(b) for b in writer.batches] == [5, 5, 5, 5, 5, 3]  # the failed one again, then the rest


def test_a_flush_of_one_batch_reads_sends_and_marks_in_its_own_thread(tmp_path, clock):
    import threading

    outbox = filled(tmp_path, clock, 3)  # fewer lines than a batch: every flush but a drain's
    threads = []
    for name in ("pending_batch", "mark_sent"):
        def traced(*args, _original=getattr(outbox, name), **kwargs):
            threads.append(threading.current_thread().name)
            return _original(*args, **kwargs)
        setattr(outbox, name, traced)
    writer = FakeWriter()
    sender = Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(batch_lines=5), clock=clock,
                    sleep=clock.sleep)
    assert sender.flush().delivered == 3
    # No helper thread for a single batch (starting one costs more than the request it would overlap).
    assert threads == [threading.current_thread().name] * 2
    assert not [t.name for t in threading.enumerate() if t.name.startswith("sender-prefetch")]
    assert outbox.queue_stats().queue_depth == 0 and len(writer.batches) == 1


def test_a_failed_mark_of_a_single_batch_is_one_error_and_the_lines_go_again(tmp_path, clock, caplog):
    from outbox import StoreError

    outbox = filled(tmp_path, clock, 3)
    mark_sent = outbox.mark_sent

    def failing_once(ids):
        outbox.mark_sent = mark_sent
        raise StoreError("store: disk I/O error")

    outbox.mark_sent = failing_once
    writer = FakeWriter()
    sender = Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(batch_lines=5), clock=clock,
                    sleep=clock.sleep)
    with caplog.at_level("ERROR", logger="sender"):
        result = sender.flush()
    assert isinstance(result.error, StoreError) and result.delivered == 0
    assert [r.getMessage() for r in caplog.records if r.name == "sender"] == ["delivery paused: store: disk I/O error"]
    assert outbox.queue_stats().queue_depth == 3  # unmarked: they go again
    clock.advance(POLICY.refused_retry_s)
    assert sender.flush().delivered == 3 and len(writer.batches) == 2


def test_a_mark_that_fails_stops_the_drain_and_the_unmarked_lines_go_again_oldest_first(tmp_path, clock):
    from outbox import StoreError

    outbox = filled(tmp_path, clock, 23)
    mark_sent = outbox.mark_sent
    calls = []

    def failing_second(ids):
        calls.append(ids)
        if len(calls) == 2:
            raise StoreError("store: disk I/O error")
        return mark_sent(ids)

    outbox.mark_sent = failing_second
    writer = FakeWriter()
    sender = Sender(writer, outbox, ErrorHandler(None, clock=clock), Policy(batch_lines=5), clock=clock,
                    sleep=clock.sleep)
    result = sender.flush()
    assert isinstance(result.error, StoreError) and result.delivered == 5
    assert len(writer.batches) in (2, 3)  # the failure is seen before the next request, or just after it
    assert outbox.queue_stats().queue_depth == 18  # no batch after the failed mark was marked either
    writer.delivered.clear()
    assert sender.flush().delivered == 18
    assert writer.delivered == [f"m,unit=u{i} v={i}i {1000 + i}" for i in range(5, 23)]  # oldest first, once
