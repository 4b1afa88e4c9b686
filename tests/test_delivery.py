"""Delivery against real servers: every outcome, through a fault-injecting proxy where a real server
never returns it. The sender is driven directly (flush()) with a fake clock for its waits; HTTP is real."""
from __future__ import annotations

import logging
import os
import random
import time

import pytest

import lp
from config import parse_config
from local_solution import make_writer
from outbox import Outbox
from rpi_errors import AuthError, ErrorHandler, NotFoundError, ThrottledError, Tier, UnreachableError
from sender import Policy, Sender
from servers import free_port

TOKEN = "tok-Very-Secret-123"


def v2_writer(url, *, token=TOKEN, token_file="", timeout_s=5.0):
    cfg = parse_config({"influx": {"kind": "local", "api": "v2", "url": url, "org": "coop", "bucket": "solar",
                                   "timeout_s": timeout_s, "token_file": token_file}})
    return make_writer(cfg.influx, environ={"INFLUXDB_TOKEN": token})


def v1_writer(url, database, *, username="", password="", timeout_s=5.0):
    cfg = parse_config({"influx": {"kind": "local", "api": "v1", "url": url, "database": database,
                                   "username": username, "timeout_s": timeout_s}})
    return make_writer(cfg.influx, environ={"INFLUXDB_PASSWORD": password})


def fill(outbox, n, unit, *, bad_at=(), start_ms=None):
    start_ms = start_ms or (int(time.time() * 1000) - n * 10)
    rows = []
    for i in range(n):
        t = start_ms + i * 10
        value = '"BAD"' if i in bad_at else f"{i}.5"
        rows.append((t, f"electricity,site=test,unit={unit} current_ma={value},samples={i}i {t}"))
    outbox.append(rows)
    return rows


def make_sender(writer, outbox, clock, **policy):
    handler = ErrorHandler(None, clock=clock)
    return Sender(writer, outbox, handler, Policy(**policy), clock=clock, sleep=clock.sleep, rng=random.Random(7))


def vm_samples(victoria, unit):
    rows = victoria.export(match=f'{{unit="{unit}"}}')
    out = {}
    for row in rows:
        labels = row["metric"]
        name = labels.pop("__name__")
        for value, ts in zip(row["values"], row["timestamps"]):
            out[(name, tuple(sorted(labels.items())), ts)] = float(value)
    return out


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "store")
    yield box
    box.close()


def test_delivers_oldest_first_in_full_batches_and_marks_sent(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    rows = fill(outbox, 12_000, "oldest-first")
    sender = make_sender(v2_writer(proxy.url), outbox, clock)
    result = sender.flush()
    assert result.error is None and result.delivered == 12_000
    assert proxy.requests == 3  # 5000 + 5000 + 2000
    firsts = [lp.parse(body.splitlines()[0])[3] for body in proxy.decoded_bodies()]
    assert firsts == sorted(firsts) and firsts[0] == rows[0][0]
    assert all(r.header("Content-Encoding") == "gzip" for r in proxy.log)
    assert outbox.stats().queue_depth == 0
    assert vm_samples(victoria, "oldest-first") == lp.samples(line for _, line in rows)


@pytest.mark.parametrize("api", ["v1", "v2"])
def test_a_url_with_a_path_is_written_below_that_path_once(victoria, make_proxy, outbox, clock, api):
    """`url = "http://host:8428/influx"` (VictoriaMetrics' InfluxDB prefix, or a reverse proxy's path): the
    requests go to /influx/write and /influx/api/v2/write, the path once (influxdb-client composes the v2 URL
    from the configured one and the transport adds the path too; it used to be /influx/influx/...)."""
    proxy = make_proxy(victoria.url)
    unit = f"url-path-{api}"
    rows = fill(outbox, 20, unit)
    writer = v2_writer(proxy.url + "/influx/") if api == "v2" else v1_writer(proxy.url + "/influx/", "solar")
    result = make_sender(writer, outbox, clock).flush()
    assert result.error is None and result.delivered == 20
    (path,) = {r.path.split("?")[0] for r in proxy.log}
    assert path == ("/influx/api/v2/write" if api == "v2" else "/influx/write")
    stored = {(name, tuple(kv for kv in labels if kv[0] != "db"), ts): value  # v1's db=solar becomes a label
              for (name, labels, ts), value in vm_samples(victoria, unit).items()}
    assert stored == lp.samples(line for _, line in rows)


def test_a_partial_batch_waits_for_the_next_flush(victoria, outbox, clock):
    fill(outbox, 10, "small")
    sender = make_sender(v2_writer(victoria.url), outbox, clock)
    assert sender.flush().delivered == 10
    assert sender.flush().requests == 0


@pytest.mark.parametrize("status", [400, 422])
def test_bad_lines_are_quarantined_and_the_rest_delivered(victoria, make_proxy, outbox, clock, status):
    unit = f"bad-{status}"
    proxy = make_proxy(victoria.url)
    proxy.fail_when(lambda text: "BAD" in text, status,
                    body={"error": "partial write: unable to parse 'current_ma=\"BAD\"': invalid field"})
    rows = fill(outbox, 1000, unit, bad_at={3, 700})
    sender = make_sender(v2_writer(proxy.url), outbox, clock)
    result = sender.flush()
    assert result.error is None
    assert result.quarantined == 2 and result.delivered == 998
    assert result.requests < 60  # a binary search, not one request per line
    stats = outbox.stats()
    assert stats.queue_depth == 0 and stats.quarantined == 2
    quarantined = [line for _, line, s in outbox.export() if s == "quarantined"]
    assert quarantined == [rows[3][1], rows[700][1]]
    good = [line for i, (_, line) in enumerate(rows) if i not in (3, 700)]
    assert vm_samples(victoria, unit) == lp.samples(good)
    assert sender.handler.top_tier == Tier.SENDING  # shown until a flush without new refusals


def test_real_influxdb_type_conflict_is_quarantined(influxdb1, outbox, clock):
    influxdb1.create_database("conflict")
    writer = v1_writer(influxdb1.url, "conflict")
    fill(outbox, 200, "conflict", bad_at={150})  # current_ma is a float everywhere else
    result = make_sender(writer, outbox, clock).flush()
    assert result.error is None and result.quarantined == 1 and result.delivered == 199
    series = influxdb1.query("conflict", "SELECT count(current_ma) FROM electricity")
    assert series[0]["values"][0][1] == 199


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failure_keeps_everything_and_a_fixed_token_resumes_without_restart(
        victoria, make_proxy, outbox, clock, tmp_path, status, caplog):
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token")
    token_file.chmod(0o600)
    proxy = make_proxy(victoria.url)
    proxy.fail_when_request(lambda r: r.header("Authorization") != f"Token {TOKEN}", status,
                            body={"code": "unauthorized", "message": "token wrong-token refused"})
    fill(outbox, 50, f"auth-{status}")
    sender = make_sender(v2_writer(proxy.url, token_file=str(token_file)), outbox, clock)
    result = sender.flush()
    assert isinstance(result.error, AuthError)
    assert outbox.stats().queue_depth == 50
    assert sender.handler.top_tier == Tier.SENDING
    assert sender.next_attempt_s == pytest.approx(clock() + 60)
    token_file.write_text(TOKEN)
    os.utime(token_file, (1, 1))
    result = sender.flush()
    assert result.error is None and result.delivered == 50
    assert sender.handler.top_tier is None
    assert "wrong-token" not in caplog.text and TOKEN not in caplog.text
    assert TOKEN not in outbox.state().get("last_error", "")


def test_not_found_names_the_bucket(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    proxy.fail_always(404, body={"code": "not found", "message": 'bucket "solar" not found'})
    fill(outbox, 5, "nf")
    result = make_sender(v2_writer(proxy.url), outbox, clock).flush()
    assert isinstance(result.error, NotFoundError)
    assert "bucket 'solar' in org 'coop'" in str(result.error)
    assert outbox.stats().queue_depth == 5


def test_real_influxdb_unknown_database_is_not_found(influxdb1, outbox, clock):
    fill(outbox, 5, "nodb")
    result = make_sender(v1_writer(influxdb1.url, "no_such_db"), outbox, clock).flush()
    assert isinstance(result.error, NotFoundError) and "database 'no_such_db'" in str(result.error)
    assert outbox.stats().queue_depth == 5


def test_too_large_splits_and_resends_everything(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    proxy.fail_when(lambda text: text.count("\n") >= 300, 413, body={"error": "request too large"})
    rows = fill(outbox, 1000, "too-large")
    result = make_sender(v2_writer(proxy.url), outbox, clock).flush()
    assert result.error is None and result.delivered == 1000 and result.quarantined == 0
    assert vm_samples(victoria, "too-large") == lp.samples(line for _, line in rows)



def test_a_413_is_remembered_so_a_backlog_is_not_refused_and_uploaded_twice_batch_after_batch(
        victoria, make_proxy, outbox, clock):
    """A proxy in front of the database takes bodies of at most ~300 lines. The first full batch is refused
    and halved until it fits; the batches after it are read at the size that went through, so a metered link
    pays for the refusals once, not for every batch of the backlog. After Policy.size_limit_s the full size
    is tried again (one refusal an hour at most)."""
    proxy = make_proxy(victoria.url)
    rows = fill(outbox, 4000, "remember-413")
    limit = sum(len(line) + 1 for _, line in rows[:300])
    proxy.fail_when(lambda text: len(text.encode()) > limit, 413, body={"error": "request too large"})
    sender = make_sender(v2_writer(proxy.url), outbox, clock, batch_lines=1000)
    result = sender.flush()
    assert result.error is None and result.delivered == 4000 and result.quarantined == 0
    refused = [entry for entry in proxy.log if entry.status == 413]
    # The 1000 lines, then their first half: 250 lines fit. The second half and every later batch (the one read
    # ahead before the first refusal too) are split to that size before they are sent.
    assert len(refused) == 2
    assert vm_samples(victoria, "remember-413") == lp.samples(line for _, line in rows)
    more = fill(outbox, 1000, "remember-413b")
    clock.advance(Policy().size_limit_s)
    assert sender.flush().delivered == 1000
    assert proxy.log[result.requests].status == 413  # the full size is tried again, once
    assert vm_samples(victoria, "remember-413b") == lp.samples(line for _, line in more)

@pytest.mark.parametrize("status,headers,wait_s", [
    (429, {"Retry-After": "7"}, 7),
    (503, {"Retry-After": "120"}, 120),
    (429, {}, 30),            # no Retry-After: a sane default
    (503, {"Retry-After": "86400"}, 900),  # capped
])
def test_throttling_waits_at_least_retry_after(victoria, make_proxy, outbox, clock, status, headers, wait_s):
    proxy = make_proxy(victoria.url)
    proxy.fail_next(status, headers=headers)
    fill(outbox, 5, f"throttle-{status}")
    sender = make_sender(v2_writer(proxy.url), outbox, clock)
    result = sender.flush()
    assert isinstance(result.error, ThrottledError)
    assert sender.next_attempt_s - clock() == pytest.approx(wait_s)
    assert sender.handler.top_tier == Tier.CONNECTION
    assert outbox.stats().queue_depth == 5
    assert sender.flush().delivered == 5


def test_server_errors_back_off_exponentially_with_jitter_up_to_5_minutes(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    proxy.fail_always(500, body="internal error")
    fill(outbox, 5, "backoff")
    sender = make_sender(v2_writer(proxy.url), outbox, clock)
    waits = []
    for _ in range(12):
        assert isinstance(sender.flush().error, UnreachableError)
        waits.append(sender.next_attempt_s - clock())
    ceilings = [min(2 * 2 ** k, 300) for k in range(12)]
    assert all(c / 2 <= w <= c for w, c in zip(waits, ceilings)), waits
    assert len(set(waits)) > 1 and max(waits) <= 300
    proxy.clear()
    assert sender.flush().delivered == 5
    assert sender.failures == 0


def test_slow_server_times_out_and_nothing_is_lost(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    proxy.delay(3)
    fill(outbox, 5, "slow")
    result = make_sender(v2_writer(proxy.url, timeout_s=0.5), outbox, clock).flush()
    assert isinstance(result.error, UnreachableError) and "no answer within 0.5 s" in str(result.error)
    assert outbox.stats().queue_depth == 5


@pytest.mark.parametrize("url,words", [
    (f"http://127.0.0.1:{free_port()}", "connection refused"),
    ("http://influx.invalid:8086", "DNS lookup failed"),
])
def test_unreachable_server_is_a_connection_error(outbox, clock, url, words):
    fill(outbox, 5, "down")
    sender = make_sender(v2_writer(url, timeout_s=2), outbox, clock)
    result = sender.flush()
    assert isinstance(result.error, UnreachableError) and words in str(result.error)
    assert sender.handler.top_tier == Tier.CONNECTION
    assert outbox.stats().queue_depth == 5


def test_upload_rate_limit_spaces_requests(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    fill(outbox, 2000, "rate")
    sender = make_sender(v2_writer(proxy.url), outbox, clock, batch_lines=200, max_upload_bytes_per_s=2000)
    start = clock()
    result = sender.flush()
    assert result.delivered == 2000 and proxy.requests == 10
    body_bytes = sum(len(r.body) for r in proxy.log)
    assert result.bytes_sent == body_bytes
    # all but the last request's bytes had to be paid for in waiting time before the next request
    last = len(proxy.log[-1].body)
    assert clock() - start == pytest.approx((body_bytes - last) / 2000, rel=0.01)


def test_v1_basic_auth_is_sent_and_the_password_never_logged(influxdb1, make_proxy, outbox, clock, caplog):
    caplog.set_level(logging.DEBUG)
    influxdb1.create_database("auth_v1")
    proxy = make_proxy(influxdb1.url)
    fill(outbox, 3, "v1auth")
    writer = v1_writer(proxy.url, "auth_v1", username="logger", password="pa55-Secret")
    assert make_sender(writer, outbox, clock).flush().delivered == 3
    assert proxy.log[0].header("Authorization", "").startswith("Basic ")
    assert "db=auth_v1" in proxy.log[0].path and "precision=ms" in proxy.log[0].path
    assert "pa55-Secret" not in caplog.text


def test_draining_a_backlog_logs_progress_with_eta(victoria, outbox, clock, caplog):
    caplog.set_level(logging.INFO, logger="sender")
    fill(outbox, 6000, "backlog")
    sender = make_sender(v2_writer(victoria.url), outbox, clock, batch_lines=500, max_upload_bytes_per_s=300,
                         progress_every_s=10)
    assert sender.flush().delivered == 6000
    progress = [r.getMessage() for r in caplog.records if "delivering backlog" in r.getMessage()]
    assert progress and "points left" in progress[0] and "ETA" in progress[0]


# -- draining a backlog: the pipeline (mark, read and gzip the next batch while a request is in flight) ---------
def delivered_lines(proxy) -> list[str]:
    """The lines of every request the server acknowledged (204), in the order they went out."""
    return [line for r in proxy.log if r.status == 204 for line in r.text.splitlines()]


def test_a_backlog_drained_while_new_readings_arrive_goes_oldest_first_each_point_once(
        victoria, make_proxy, outbox, clock, tmp_path):
    proxy = make_proxy(victoria.url)
    old = fill(outbox, 12_000, "drain-order", start_ms=int(time.time() * 1000) - 600_000)
    measuring = Outbox(tmp_path / "store")  # the measuring thread's own connection, as in the daemon
    new = []
    writer = v2_writer(proxy.url)
    write = writer.write

    def write_while_measuring(request):
        # A cycle is stored while each of the first requests is in flight (ids after the backlog's).
        if len(new) < 3 * 5:
            t = old[-1][0] + 1000 * (len(new) + 1)
            rows = [(t + k, f"electricity,site=test,unit=drain-order current_ma={k}.25,samples=1i {t + k}")
                    for k in range(5)]
            measuring.append(rows)
            new.extend(rows)
        return write(request)

    writer.write = write_while_measuring
    sender = make_sender(writer, outbox, clock)
    while sender.flush().delivered:
        pass
    measuring.close()
    sent = delivered_lines(proxy)
    assert sent == [line for _, line in old + new]  # old before new, each line once, nothing left out
    assert outbox.stats().queue_depth == 0 and len(new) == 15
    assert vm_samples(victoria, "drain-order") == lp.samples(sent)


def test_a_request_failing_mid_drain_loses_and_duplicates_nothing(victoria, make_proxy, outbox, clock):
    proxy = make_proxy(victoria.url)
    rows = fill(outbox, 23_000, "drain-fail")
    proxy.fail_when_request(lambda request: len(proxy.log) == 3, 500)  # the third request of the drain fails
    sender = make_sender(v2_writer(proxy.url), outbox, clock)
    first = sender.flush()
    assert isinstance(first.error, UnreachableError) and first.delivered == 10_000  # the two before it, marked
    assert outbox.stats().queue_depth == 13_000  # the failed batch and the one read ahead stay unsent
    proxy.clear()
    assert sender.flush().delivered == 13_000
    assert [r.status for r in proxy.log] == [204, 204, 500, 204, 204, 204]
    assert delivered_lines(proxy) == [line for _, line in rows]  # each line acknowledged exactly once, in order
    assert outbox.stats().queue_depth == 0


def test_a_batch_influxdb_drops_whole_is_quarantined_at_once_without_a_halving_search(
        influxdb1, make_proxy, outbox, clock):
    """A field whose type changed makes InfluxDB 1.6.7 drop every line of a batch ("partial write: field type
    conflict ... dropped=N" with N the whole batch): one request, not the 2N - 1 of a halving search on a SIM
    plan; all N quarantined together, each counted."""
    influxdb1.create_database("conflict")
    proxy = make_proxy(influxdb1.url)
    t0 = int(time.time() * 1000) - 100_000
    outbox.append([(t0, f"electricity,site=test,unit=c current_ma=1.5 {t0}")])  # the field is a float
    sender = make_sender(v1_writer(proxy.url, "conflict"), outbox, clock)
    assert sender.flush().delivered == 1
    rows = [(t0 + 10 * i, f"electricity,site=test,unit=c current_ma={i}i {t0 + 10 * i}") for i in range(1, 501)]
    outbox.append(rows)
    result = sender.flush()
    assert result.error is None and result.quarantined == 500 and result.delivered == 0
    assert [r.status for r in proxy.log] == [204, 400]  # the refused batch once, no halves
    assert outbox.stats().queue_depth == 0 and outbox.stats().quarantined == 500
    assert [line for _, line, s in outbox.export() if s == "quarantined"] == [line for _, line in rows]


def test_influxdb_keeps_the_good_lines_of_a_partly_refused_batch_and_stores_each_point_once(
        influxdb1, make_proxy, outbox, clock):
    # InfluxDB 1.6.7 answers a batch with a bad line 400 "partial write" and stores the good lines; the
    # halving search sends them again (the same points: overwritten, not added) and quarantines the bad one.
    influxdb1.create_database("partial")
    proxy = make_proxy(influxdb1.url)
    rows = fill(outbox, 12_000, "partial", bad_at={7_321})
    result = make_sender(v1_writer(proxy.url, "partial"), outbox, clock).flush()
    assert result.error is None and result.quarantined == 1 and result.delivered == 11_999
    assert [r.status for r in proxy.log[:2]] == [204, 400]  # the second batch holds the bad line
    assert [line for _, line, s in outbox.export() if s == "quarantined"] == [rows[7_321][1]]
    series = influxdb1.query("partial", "SELECT count(current_ma) FROM electricity")
    assert series[0]["values"][0][1] == 11_999
    assert outbox.stats().queue_depth == 0
    firsts = [int(r.text.splitlines()[0].rsplit(" ", 1)[1]) for r in proxy.log if r.status == 204]
    assert firsts == sorted(firsts)  # still oldest first around the refused batch
