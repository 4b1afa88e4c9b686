"""Secrets: env or file, refused when readable by others, re-read when changed, never shown."""
from __future__ import annotations

import os

import pytest

from credentials import Secret, SecretError, scrub


def test_env_then_file(tmp_path):
    assert Secret("INFLUXDB_TOKEN", environ={"INFLUXDB_TOKEN": "abc"}).value() == "abc"
    f = tmp_path / "token"
    f.write_text("from-file\n")
    f.chmod(0o600)
    secret = Secret("INFLUXDB_TOKEN", str(f), environ={"INFLUXDB_TOKEN": "abc"})
    assert secret.value() == "from-file"
    assert secret.source == f"file {f}"


def test_world_readable_file_is_refused_naming_the_file_not_the_secret(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret-value")
    f.chmod(0o644)
    with pytest.raises(SecretError) as err:
        Secret("INFLUXDB_TOKEN", str(f), environ={}).value()
    assert str(f) in str(err.value) and "0644" in str(err.value) and "chmod 600" in str(err.value)
    assert "s3cret" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SecretError, match="No such file"):
        Secret("INFLUXDB_TOKEN", str(tmp_path / "nope"), environ={}).value()


def test_a_changed_file_is_re_read(tmp_path):
    f = tmp_path / "token"
    f.write_text("old")
    f.chmod(0o600)
    secret = Secret("INFLUXDB_TOKEN", str(f), environ={})
    assert secret.value() == "old"
    f.write_text("new-token")
    os.utime(f, (1, 1))
    assert secret.value() == "new-token"


def test_systemd_credential_directory(tmp_path, monkeypatch):
    (tmp_path / "influx-token").write_text("cred")
    (tmp_path / "influx-token").chmod(0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    secret = Secret("INFLUXDB_TOKEN", environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert secret.value() == "cred"


def test_the_environment_comes_before_an_empty_systemd_credential(tmp_path):
    """install.sh leaves the credential file empty: $INFLUXDB_TOKEN set in a drop-in is used, as the README
    orders them (token_file, else the variable, else the credential); a token_file comes first of all."""
    (tmp_path / "influx-token").write_text("")
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "INFLUXDB_TOKEN": "from-env"}
    assert Secret("INFLUXDB_TOKEN", environ=environ).value() == "from-env"
    f = tmp_path / "token"
    f.write_text("from-file")
    f.chmod(0o600)
    assert Secret("INFLUXDB_TOKEN", str(f), environ=environ).value() == "from-file"


def test_a_secret_file_that_is_no_regular_file_or_too_big_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # reading it would wait for a writer forever
    with pytest.raises(SecretError, match=f"secret file {fifo} is not a regular file"):
        Secret("INFLUXDB_TOKEN", str(fifo), environ={}).value()
    big = tmp_path / "outbox.db"
    big.write_bytes(b"x" * 70000)
    big.chmod(0o600)
    with pytest.raises(SecretError, match="70000 bytes: too big for a token or password"):
        Secret("INFLUXDB_TOKEN", str(big), environ={}).value()


def test_a_token_pasted_where_its_file_name_belongs_is_not_shown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    secret = Secret("INFLUXDB_TOKEN", "tok-Zx81_9aQ==", environ={})
    with pytest.raises(SecretError) as err:
        secret.value()
    assert "tok-Zx81" not in str(err.value) and "no file name" in str(err.value)
    assert "tok-Zx81" not in secret.source and "tok-Zx81" not in repr(secret)
    with pytest.raises(SecretError, match="/etc/missing/token: No such file"):  # a real path is named
        Secret("INFLUXDB_TOKEN", "/etc/missing/token", environ={}).value()


def test_repr_and_scrub_never_show_it():
    secret = Secret("INFLUXDB_TOKEN", environ={"INFLUXDB_TOKEN": "tok-123"})
    assert "tok-123" not in repr(secret)
    assert scrub("Authorization: Token tok-123", "tok-123", "") == "Authorization: Token ***"


def test_a_secret_with_a_line_break_is_refused_without_showing_it(tmp_path):
    f = tmp_path / "token"
    f.write_text("part-one\npart-two\n")
    f.chmod(0o600)
    with pytest.raises(SecretError) as err:
        Secret("INFLUXDB_TOKEN", str(f), environ={}).value()
    assert "control character" in str(err.value) and "part-one" not in str(err.value)
    with pytest.raises(SecretError):
        Secret("INFLUXDB_TOKEN", environ={"INFLUXDB_TOKEN": "a\rb"}).value()


def test_an_echo_url_encoding_the_basic_credentials_or_html_escaping_the_password_is_scrubbed():
    """A proxy's error page that quotes the request: the base64 of `user:password` URL-encoded (its + / =
    as %2B %2F %3D), or the password HTML-escaped (& < > " ' as entities)."""
    import base64
    import html
    from urllib.parse import quote

    from credentials import basic_auth_pair, scrub

    password = "p>w?&'\"~~~"  # its `user:password` base64 holds + and /
    pair = basic_auth_pair("logger", password)
    encoded = base64.b64encode(pair.encode()).decode()
    assert "+" in encoded or "/" in encoded
    page = f"<p>Authorization: Basic {quote(encoded, safe='')}</p><p>password {html.escape(password)}</p>"
    scrubbed = scrub(page, password, pair)
    assert quote(encoded, safe="") not in scrubbed and html.escape(password) not in scrubbed
    assert scrubbed.count("***") == 2
