"""Every HTTP outcome maps to one typed error; Retry-After is read; nothing leaks the token."""
from __future__ import annotations

import email.utils

import pytest

from influx_http import error_for_status, retry_after_s
from rpi_errors import (
    AuthError,
    ConnectionFailedError,
    NotFoundError,
    RefusedError,
    RejectedError,
    SendingError,
    ThrottledError,
    Tier,
    TooLargeError,
    UnreachableError,
)


@pytest.mark.parametrize("status,cls,tier", [
    (400, RefusedError, Tier.SENDING),  # a 400 that names no line problem: kept, not quarantined
    (422, RejectedError, Tier.SENDING),
    (401, AuthError, Tier.SENDING),
    (403, AuthError, Tier.SENDING),
    (404, NotFoundError, Tier.SENDING),
    (413, TooLargeError, Tier.SENDING),
    (429, ThrottledError, Tier.CONNECTION),
    (503, ThrottledError, Tier.CONNECTION),
    (500, UnreachableError, Tier.CONNECTION),
    (502, UnreachableError, Tier.CONNECTION),
    (408, UnreachableError, Tier.CONNECTION),
    (405, RefusedError, Tier.SENDING),
])
def test_status_to_error(status, cls, tier):
    error = error_for_status(status, '{"code":"x","message":"why"}', {}, "http://db:8086", "bucket 'b'")
    assert type(error) is cls
    assert error.tier == tier
    assert error.status == status
    assert str(error).startswith(f"HTTP {status} from http://db:8086: why")


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_connection_problem_naming_where_it_points_never_a_secret(status):
    """A captive portal redirects the request to its login page (http:// on a SIM link); a web server in front
    of InfluxDB sends http:// on to https://. InfluxDB itself never redirects a write: kept, 5 blinks."""
    headers = {"Location": "http://portal.example/login?token=tok-SECRET"}
    error = error_for_status(status, "<html>Sign in</html>", headers, "http://db:8086", "x", ("tok-SECRET",))
    assert type(error) is UnreachableError and error.tier == Tier.CONNECTION and error.status == status
    assert "a redirect to http://portal.example/login" in str(error) and "captive portal" in str(error)
    assert "tok-SECRET" not in str(error)
    assert "a redirect, which" in str(error_for_status(status, "", {}, "u", "x"))  # no Location given


def test_a_throttling_answer_cut_at_64_kb_keeps_its_retry_after():
    """A CDN's long 429 or 503 page still says when to come back: the wait is the server's, not the backoff's."""
    error = error_for_status(429, "x" * 70_000, {"Retry-After": "120"}, "u", "x", truncated=True)
    assert type(error) is ThrottledError and error.retry_after_s == 120


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_an_answer_cut_at_64_kb_is_a_connection_problem_whatever_its_status(status):
    """README: an answer over 64 KB is handled as 5xx (kept, backed off, 5 blinks), not as the database's
    verdict: no lines quarantined for a 422 whose endless body happens to name a line problem."""
    body = "unable to parse line: " + "x" * 70_000
    error = error_for_status(status, body, {}, "u", "x", truncated=True)
    assert type(error) is UnreachableError and error.tier == Tier.CONNECTION
    assert "answer longer than 64 KB" in str(error)


def test_2xx_is_no_error():
    assert error_for_status(204, "", {}, "u", "w") is None


def test_messages_name_what_to_fix():
    assert "bucket 'solar' in org 'coop' not found" in str(
        error_for_status(404, "", {}, "u", "bucket 'solar' in org 'coop'"))
    assert "token or password was refused" in str(error_for_status(401, "", {}, "u", "x"))


def test_token_echoed_by_a_server_is_scrubbed():
    error = error_for_status(401, "bad token tok-SECRET", {}, "u", "x", ("tok-SECRET",))
    assert "tok-SECRET" not in str(error) and "***" in str(error)


def test_a_password_echoed_in_go_json_or_past_the_cut_is_scrubbed():
    """Go's JSON (InfluxDB's, most proxies') writes & < > as \\u0026 \\u003c \\u003e; and a secret only
    revealed by decoding the JSON must be scrubbed before the message is cut to its length."""
    password = "p&ss<w0rd>Secret"
    error = error_for_status(401, '["denied: p\\u0026ss\\u003cw0rd\\u003eSecret"]', {}, "u", "x", (password,))
    assert "w0rd" not in str(error) and "***" in str(error)
    body = '{"error": "' + "x" * 190 + ' p\\u0026ss\\u003cw0rd\\u003eSecret"}'
    error = error_for_status(401, body, {}, "u", "x", (password,))
    assert "p&ss" not in str(error) and "w0rd" not in str(error)
    assert "p&ss" not in str(error_for_status(401, '{"error": "p\\u0026ss<w0rd>Secret"}', {}, "u", "x", (password,)))


def test_the_count_influxdb1_dropped_is_kept_even_past_the_messages_cut():
    long = "partial write: field type conflict: input field \\\"current_ma\\\" on measurement " + "x" * 300
    error = error_for_status(400, '{"error":"' + long + ' dropped=5000"}', {}, "u", "x")
    assert isinstance(error, RejectedError) and error.dropped == 5000 and "dropped=5000" not in str(error)
    assert error_for_status(422, '{"code":"invalid","message":"bad line"}', {}, "u", "x").dropped is None


def test_retry_after_forms():
    assert retry_after_s({"Retry-After": "7"}) == 7
    assert retry_after_s({"retry-after": "0"}) == 0
    assert retry_after_s({}) is None and retry_after_s(None) is None
    assert retry_after_s({"Retry-After": "soon"}) is None
    for odd in ("nan", "NaN", "inf", "-inf", "1e999"):  # parse as floats, but no wait can be made of them
        assert retry_after_s({"Retry-After": odd}) is None, odd
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after_s({"Retry-After": date}, now=1_000_000) == pytest.approx(30)
    error = error_for_status(429, "", {"Retry-After": "12"}, "u", "x")
    assert error.retry_after_s == 12


def test_one_exception_tree():
    for cls in (RejectedError, AuthError, NotFoundError, TooLargeError):
        assert issubclass(cls, SendingError) and issubclass(cls, RefusedError)
    assert issubclass(ThrottledError, UnreachableError) and issubclass(UnreachableError, ConnectionFailedError)


@pytest.mark.parametrize("body,cls", [
    ('{"error":"partial write: field type conflict: input field \\"v\\" is type string"}', RejectedError),
    ('{"code":"invalid","message":"unable to parse \'m v=\': missing field value"}', RejectedError),
    ("<html><body>400 The plain HTTP request was sent to HTTPS port</body></html>", RefusedError),
    ("", RefusedError),
])
def test_only_line_errors_send_a_400_batch_to_quarantine(body, cls):
    error = error_for_status(400, body, {}, "u", "x")
    assert type(error) is cls


@pytest.mark.parametrize("status,body", [
    (200, "<html>Your data allowance is used up. Top up now!</html>"),
    (200, ""),          # 204 No Content is InfluxDB's only success answer: an empty 200 is something else
    (201, '{"ok": true}'),
    (204, "<html>login</html>"),  # a 204 cannot carry a body: whoever sends one is not InfluxDB
])
def test_only_204_with_no_body_is_an_acknowledged_write(status, body):
    assert error_for_status(204, "", {}, "u", "x") is None
    error = error_for_status(status, body, {}, "u", "x")
    assert type(error) is UnreachableError and error.tier == Tier.CONNECTION
    assert "captive portal or proxy answered" in str(error)


def test_a_misspelt_retention_policy_is_not_found_not_an_outage():
    error = error_for_status(500, '{"error":"retention policy not found: autogn"}', {}, "u", "database 'solar'")
    assert type(error) is NotFoundError
