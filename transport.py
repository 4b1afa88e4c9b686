"""The bounded HTTP transport: one keep-alive connection to one server, every phase under a deadline.

Connecting (TLS handshake included), the upload (at a stated minimum rate) and the whole answer each
finish in time however a server trickles or stalls, at most MAX_ANSWER_BYTES of an answer are read, a
closed connection resumes its TLS session, and a network failure becomes UnreachableError with its
reason (a TLS failure says why). Used by influx_http.py's writers and the start-up probe.
"""
from __future__ import annotations

import errno
import http.client
import logging
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from rpi_errors import UnreachableError

log = logging.getLogger(__name__)

_MAX_DETAIL = 200  # characters of a verifier's message quoted

# -- the transport: one POST, every phase under a deadline, every answer bounded --------------------------
MAX_ANSWER_BYTES = 64 * 1024  # a write's answer is empty (204) or a short error: more is not InfluxDB
# The slowest upload still accepted (bytes of request body per second): a 1 MB batch (about 150 KB gzip'd)
# over a poor SIM link still goes through; an upload slower than this is treated as stalled.
MIN_UPLOAD_BYTES_PER_S = 2048
# A small send buffer keeps "handed to the kernel" close to "received by the server", so the answer's
# deadline can start when the upload ends (what is still buffered gets time at the minimum rate).
_SEND_BUFFER_BYTES = 32 * 1024


@dataclass(frozen=True)
class Answer:
    """A server's answer to one request: status, headers (lower-case names) and at most
    MAX_ANSWER_BYTES of body; `truncated` when the body was longer (or endless)."""

    status: int
    reason: str
    headers: dict[str, str]
    body: bytes
    truncated: bool = False


class Transport:
    """POSTs to one server (http or https) over one keep-alive connection, with deadlines.

    Bytes matter on a SIM: the connection is kept between requests for as long as the server keeps
    it; one the server closed while idle is noticed before a request is sent on it, and the next
    connection offers the saved TLS session (an abbreviated handshake, no certificate chain). https
    verifies against the system's CAs, certifi's and `ca_file` (tls_context()); never unverified.

    Connecting (TCP and the TLS handshake) finishes within `timeout_s`; the upload may take
    `timeout_s` plus its size at `min_upload_bytes_per_s`, and no chunk of it may stall for
    `timeout_s`; the whole answer (status line, headers, body) then arrives within `timeout_s`
    (plus what was still in the send buffer at the minimum rate), however slowly the server
    trickles it. A socket read timeout alone cannot do this (it is per read): a watchdog timer
    cuts the socket when a phase's deadline passes. At most `max_answer_bytes` of a body are read.
    A name lookup finishes within `timeout_s` too (in a thread of its own). post() raises
    UnreachableError for every network failure (a TLS failure says why); requests from several
    threads (the start-up probe and the sender) wait for each other; abort() may be called from any
    thread.
    """

    def __init__(self, url: str, timeout_s: float, *, min_upload_bytes_per_s: float = MIN_UPLOAD_BYTES_PER_S,
                 max_answer_bytes: int = MAX_ANSWER_BYTES, ca_file: str = "") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self.timeout_s = float(timeout_s)
        self.min_upload_bytes_per_s = float(min_upload_bytes_per_s)
        self.max_answer_bytes = int(max_answer_bytes)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.ca_file = ca_file
        self._conn: http.client.HTTPConnection | None = None
        self._context = None  # the ssl.SSLContext, made at the first https connection and kept: a saved
        self._session = None  # TLS session is only valid with the context that made it
        self.connections = 0  # TCP connections opened, of which
        self.resumed = 0  # TLS sessions resumed (an abbreviated handshake, no certificate chain sent)
        self._serial = threading.Lock()  # one request at a time (the start-up probe and the sender share it)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None  # the socket of the request in flight, for the watchdog
        self._cut: str | None = None  # why the watchdog or abort() cut it
        # The watchdog's thread holds the transport only weakly, and ends when it is collected: a transport
        # dropped without close() (a writer replaced, a probe's) does not leave its thread behind.
        self._watchdog = _Watchdog(_weakly(self._expire))
        weakref.finalize(self, self._watchdog.close).atexit = False  # at exit its daemon thread just ends
        self._armed: object | None = None  # the live deadline's identity (one already replaced may still fire)

    @property
    def path_prefix(self) -> str:
        """The URL's own path without its trailing slash ("" for none): put before every target."""
        return self._prefix

    def post(self, target: str, body: bytes, headers: Mapping[str, str]) -> Answer:
        """POST `body` to `target` (path and query, below the URL's own path). Raises UnreachableError."""
        return self.request("POST", target, body, headers)

    def request(self, method: str, target: str, body: bytes = b"", headers: Mapping[str, str] | None = None,
                *, timeout_s: float | None = None) -> Answer:
        """`method` `target` with `body`, under the deadlines above (`timeout_s` overrides the
        transport's for this request). Raises UnreachableError. Requests from several threads wait
        for each other (at most one is on the wire)."""
        with self._serial:
            return self._request(method, target, body, headers or {},
                                 self.timeout_s if timeout_s is None else float(timeout_s))

    def _request(self, method: str, target: str, body: bytes, headers: Mapping[str, str],
                 timeout_s: float) -> Answer:
        phase = "connect"
        sent = 0
        started = time.monotonic()
        try:
            with self._lock:
                if self._cut == "abort":
                    raise _Cut("abort")
            conn = self._connection(timeout_s)
            phase = "upload"
            upload_s = timeout_s + len(body) / self.min_upload_bytes_per_s
            started = time.monotonic()
            self._arm(upload_s)
            # sendall's timeout bounds a whole call, so send in chunks a link at the minimum rate can
            # pass within timeout_s: no chunk may stall for longer than that.
            step = int(min(max(self.min_upload_bytes_per_s * timeout_s / 2, 1024), 64 * 1024))
            conn.hold()
            conn.putrequest(method, self._prefix + target, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            if body or method in ("POST", "PUT"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders()
            conn.release(body[:step])  # the head with the first chunk: one TLS record, not two
            sent = min(step, len(body))
            for at in range(step, len(body), step):
                conn.send(body[at:at + step])
                sent = min(at + step, len(body))
            phase = "answer"
            buffered = min(len(body), self._send_buffer(conn))
            answer_s = timeout_s + buffered / self.min_upload_bytes_per_s
            self._arm(answer_s)
            conn.sock.settimeout(answer_s)
            response = conn.getresponse()
            data = response.read(self.max_answer_bytes + 1)
            truncated = len(data) > self.max_answer_bytes
            reusable = response.isclosed() and not response.will_close and not truncated
            answer = Answer(response.status, str(response.reason)[:100],
                            {k.lower(): v for k, v in response.getheaders()}, data[: self.max_answer_bytes],
                            truncated)
            self._disarm()
            # TLS 1.3 sends its session tickets after the handshake, so they have arrived once an answer
            # was read: keep the session now, for a resumed handshake if this connection is closed.
            self._keep_session(conn)
            if not reusable:
                self._drop()
            with self._lock:
                if self._cut is not None:  # the watchdog fired just as the answer completed
                    raise _Cut(self._cut)
            return answer
        except (_Cut, OSError, http.client.HTTPException, ValueError) as exc:
            self._disarm()
            with self._lock:
                cut = self._cut
            self._drop()
            raise self._error(phase, cut, exc, sent, len(body), time.monotonic() - started, timeout_s) from None
        finally:
            with self._lock:
                self._sock = None
                if self._cut != "abort":
                    self._cut = None

    def abort(self) -> None:
        """Cut the request in flight, if any, and refuse new ones (shutdown). Thread-safe."""
        with self._lock:
            self._cut = "abort"
            _shutdown(self._sock)

    def close(self) -> None:
        """Close the connection (idempotent); the next post() opens a new one. The TLS session is kept,
        so that one resumes. The watchdog's thread ends (the next request starts it again)."""
        self._disarm()
        self._watchdog.close()
        self._drop()

    # -- internals ------------------------------------------------------------------------------------------
    def _connection(self, timeout_s: float) -> http.client.HTTPConnection:
        """The kept connection, or a new one (TCP connect and TLS handshake within `timeout_s`)."""
        conn = self._conn
        if conn is not None and conn.sock is not None and _dropped(conn.sock):
            # The server closed the idle keep-alive connection (a TLS close_notify or FIN is waiting):
            # seen before a request is sent on it, so no request fails for it.
            self._drop()
            conn = None
        if conn is not None and conn.sock is not None:
            conn.sock.settimeout(timeout_s)
            with self._lock:
                self._sock = conn.sock
            return conn
        if self._https:
            if self._context is None:
                self._context = tls_context(self.ca_file)
            conn = _HTTPSConnection(self._host, self._port, timeout=timeout_s, context=self._context,
                                    session=self._session, on_socket=self._watch)
        else:
            conn = _HTTPConnection(self._host, self._port, timeout=timeout_s, on_socket=self._watch)
        self._conn = conn
        # TCP connect has the socket's timeout; the TLS handshake after it is under the watchdog, which a
        # server sending its handshake a byte at a time cannot outlast.
        self._arm(timeout_s)
        conn.connect()
        self._disarm()
        with self._lock:
            if self._cut is not None:
                raise _Cut(self._cut)
            self._sock = conn.sock
        self.connections += 1
        if getattr(conn.sock, "session_reused", False):
            self.resumed += 1
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        except OSError:
            pass
        conn.sock.settimeout(timeout_s)
        return conn

    def _watch(self, sock: socket.socket) -> None:
        """The connecting socket, for the watchdog and abort() (called by the connection once TCP is up). A cut
        already made (abort, or a deadline that passed during the name lookup or TCP connect) ends it at
        once: the TLS handshake would otherwise have only the socket's per-read timeout left."""
        with self._lock:
            self._sock = sock
            if self._cut is not None:
                _shutdown(sock)

    def _keep_session(self, conn: http.client.HTTPConnection) -> None:
        session = getattr(conn.sock, "session", None)
        if session is not None:
            self._session = session

    @staticmethod
    def _send_buffer(conn: http.client.HTTPConnection) -> int:
        try:
            return conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except (OSError, AttributeError):
            return _SEND_BUFFER_BYTES * 2

    def _arm(self, seconds: float) -> None:
        timer_id = object()
        with self._lock:
            self._armed = timer_id
        self._watchdog.arm(seconds, timer_id)

    def _disarm(self) -> None:
        self._watchdog.disarm()
        with self._lock:
            self._armed = None

    def _expire(self, timer_id: object) -> None:
        with self._lock:
            if self._armed is timer_id and self._cut is None:
                self._cut = "deadline"
                _shutdown(self._sock)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _error(self, phase: str, cut: str | None, exc: BaseException, sent: int, size: int,
               elapsed_s: float, timeout_s: float) -> UnreachableError:
        target = self.url
        if cut == "abort":
            return UnreachableError(f"request to {target} cut short: the daemon is stopping")
        timed_out = cut == "deadline" or isinstance(exc, TimeoutError)
        if phase == "upload" and timed_out:
            return UnreachableError(
                f"upload to {target} stalled: {sent} of {size} bytes sent in {elapsed_s:.1f} s "
                f"(slower than {self.min_upload_bytes_per_s:g} bytes/s, or no progress for {timeout_s:g} s)")
        if phase == "answer" and timed_out:
            return UnreachableError(f"no answer within {timeout_s:g} s after the upload from {target} "
                                    f"(the server stalls or trickles its answer)")
        if phase == "connect" and timed_out and not isinstance(exc, LookupTimeout):
            tls = " and TLS handshake" if self._https else ""
            return UnreachableError(f"cannot reach {target}: no connection{tls} within {timeout_s:g} s")
        return error_for_exception(exc, target, timeout_s, phase)


def call_within(fn: Callable[[], object], timeout_s: float, *, name: str,
                on_late: Callable[[object], None] | None = None) -> tuple[bool, object]:
    """fn() in a daemon thread of its own, waited for at most `timeout_s`: for a blocking call that no
    timeout of its own reaches (a name lookup in getaddrinfo, which a stalled resolver holds for as long as
    it likes). (True, its result) when it finished in time, or raises what it raised; (False, None) when
    not: it runs on, and `on_late(result)` gets the result should it finish later (to close a connection
    nobody waits for any more). Thread-safe."""
    outcome: list[tuple[bool, object]] = []  # (raised, result or exception); [] while it runs
    lock = threading.Lock()

    def run() -> None:
        try:
            finished = (False, fn())
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            finished = (True, exc)
        with lock:
            late = bool(outcome)  # the caller gave up and marked it
            if not late:
                outcome.append(finished)
        if late and not finished[0] and on_late is not None:
            on_late(finished[1])

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    with lock:
        if not outcome:
            outcome.append((False, None))  # given up: a later result goes to on_late
            return False, None
    raised, result = outcome[0]
    if raised:
        raise result
    return True, result


def _weakly(method):
    """`method(token)` while its object lives, then nothing: a callback that does not keep the object alive."""
    ref = weakref.WeakMethod(method)

    def call(token: object) -> None:
        live = ref()
        if live is not None:
            live(token)

    return call


class _Watchdog:
    """Calls `expire(token)` once the armed deadline passes, from one thread of its own.

    Arming (or disarming) is a few lock operations: a threading.Timer per phase started a thread per phase,
    two or three per request, which on a drain of many requests was CPU and wall time on the request's
    path. The thread starts at the first arm() and ends at close() (a later arm() starts it again).
    `expire` runs without the watchdog's lock held and must check the token is still the live one.
    Thread-safe.
    """

    def __init__(self, expire) -> None:
        self._expire = expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._token: object | None = None
        self._thread: threading.Thread | None = None
        # Each thread serves one generation; close() starts the next. A thread told to close while it ran
        # `expire` (or close() called from `expire` itself) then ends even when arm() has started its
        # successor, where a shared closing flag, cleared by that arm(), would have kept both running.
        self._generation = 0

    def arm(self, seconds: float, token: object) -> None:
        with self._cond:
            earlier = self._deadline is None or time.monotonic() + seconds < self._deadline
            self._deadline = time.monotonic() + seconds
            self._token = token
            if self._thread is None or not self._thread.is_alive():
                self._generation += 1
                self._thread = threading.Thread(target=self._run, args=(self._generation,),
                                                name="transport-watchdog", daemon=True)
                self._thread.start()
            elif earlier:
                self._cond.notify()  # it sleeps until a later deadline, or without one

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None  # the thread wakes at the old deadline, finds none and sleeps on
            self._token = None

    def close(self) -> None:
        with self._cond:
            self._generation += 1
            self._deadline = None
            self._token = None
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self, generation: int) -> None:
        while True:
            with self._cond:
                while generation == self._generation and (
                        self._deadline is None or time.monotonic() < self._deadline):
                    self._cond.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if generation != self._generation:
                    return
                token, self._deadline, self._token = self._token, None, None
            self._expire(token)


class _Coalescing:
    """Sends a request's head together with the first bytes of its body (hold(), then release(data)):
    one TLS record and one TCP segment instead of two, and no wait for an ACK in between."""

    _held: bytearray | None = None

    def hold(self) -> None:
        self._held = bytearray()

    def send(self, data) -> None:
        if self._held is not None:
            self._held += data
            return
        super().send(data)

    def release(self, data: bytes = b"") -> None:
        held, self._held = self._held or bytearray(), None
        held += data
        if held:
            super().send(bytes(held))


class LookupTimeout(TimeoutError):
    """The name lookup (getaddrinfo) gave no answer in time: a SIM link's stalled resolver."""


def _bounded_connection(address: tuple[str, int], timeout: float, source_address=None) -> socket.socket:
    """socket.create_connection, its name lookup bounded by `timeout` too (the resolver has no timeout of its
    own a caller can set; a stalled one held a flush for as long as it liked). An address is not looked up.
    Raises LookupTimeout, socket.gaierror or the last connect error."""
    import ipaddress  # here, not at import: a daemon connects rarely, and the module costs RSS

    host, port = address
    try:
        ipaddress.ip_address(host)
    except ValueError:
        began = time.monotonic()
        done, infos = call_within(lambda: socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM), timeout,
                                  name="name-lookup")
        if not done:
            raise LookupTimeout(f"the name lookup of {host} gave no answer within {timeout:g} s") from None
        error: OSError | None = None
        for *_, where in infos:  # each address in the resolver's order, as create_connection tries them
            try:
                # An address needs no lookup; the lookup's time counts against the connect's. An address family
                # the kernel lacks (IPv6 disabled on a Pi) fails like a refused connect: the next one is tried.
                return socket.create_connection(where[:2], max(timeout - (time.monotonic() - began), 0.001),
                                                source_address)
            except OSError as exc:
                error = exc
        raise error or OSError(f"no address for {host}")
    return socket.create_connection(address, timeout, source_address)


class _HTTPConnection(_Coalescing, http.client.HTTPConnection):
    """http.client's connection, telling the Transport its socket as soon as TCP is up."""

    def __init__(self, host, port, *, timeout, on_socket) -> None:
        super().__init__(host, port, timeout=timeout)
        self._create_connection = _bounded_connection
        self._on_socket = on_socket

    def connect(self) -> None:
        super().connect()
        self._on_socket(self.sock)


class _HTTPSConnection(_Coalescing, http.client.HTTPSConnection):
    """http.client's https connection that offers a saved TLS session (`session`) for resumption:
    an abbreviated handshake, without the certificate chain, when the server still knows it."""

    def __init__(self, host, port, *, timeout, context, session, on_socket) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._create_connection = _bounded_connection
        self._tls_session = session
        self._on_socket = on_socket

    def connect(self) -> None:
        import ssl

        http.client.HTTPConnection.connect(self)  # TCP only
        self._on_socket(self.sock)
        try:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host, session=self._tls_session)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError) as exc:
            raise HandshakeCutError("the server hung up during the TLS handshake") from exc
        self._on_socket(self.sock)


class HandshakeCutError(ConnectionError):
    """The peer closed or reset the connection in the middle of the TLS handshake."""


class _Cut(Exception):
    """The request was cut (deadline or abort) between two socket calls."""


def _shutdown(sock) -> None:
    # socket.socket.shutdown, not SSLSocket's (that one unwraps TLS and is not safe from another thread):
    # the blocked reader or writer wakes with EOF or an error at once.
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _dropped(sock) -> bool:
    """True when an idle connection is readable: the server closed it (or sent something unasked)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def tls_context(ca_file: str = ""):
    """The client context for https: the system's CAs (OpenSSL's default paths), certifi's bundle (what
    influxdb-client verified Cloud's certificate with) and, when set, the PEM file `ca_file` (`[influx]
    ca_file`: a private CA). Verification and the host name check are always on; TLS 1.2 at least.
    Raises OSError or ssl.SSLError for an unreadable or unparsable `ca_file` (config checks it first)."""
    import ssl

    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        import certifi

        context.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError, ssl.SSLError):
        pass  # the system's CAs alone
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


# OpenSSL's X509_V_ERR_* codes (ssl.SSLCertVerificationError.verify_code) -> what to tell a technician.
_UNKNOWN_ISSUER = ("the server's certificate is signed by an unknown issuer (a private CA or a company proxy? "
                   "trust its CA with [influx] ca_file)")
_VERIFY_REASONS = {
    2: _UNKNOWN_ISSUER,  # unable to get issuer certificate
    9: "the server's certificate is not valid yet (is this Pi's clock behind?)",
    10: "the server's certificate has expired (or this Pi's clock is ahead)",
    18: "the server's certificate is self-signed and not trusted (trust it with [influx] ca_file)",
    19: _UNKNOWN_ISSUER,  # self-signed certificate in the chain
    20: _UNKNOWN_ISSUER,  # unable to get local issuer certificate
    21: _UNKNOWN_ISSUER,  # unable to verify the first certificate
    23: "the server's certificate has been revoked",
    26: "the server's certificate is not meant for a server (invalid purpose)",
    62: "hostname mismatch: the server's certificate is not for this host name (check the URL)",
    64: "hostname mismatch: the server's certificate is not for this IP address (check the URL)",
}
# OpenSSL reasons (ssl.SSLError.reason) of a TLS version both sides do not share.
_VERSION_REASONS = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE",
                    "WRONG_SSL_VERSION", "UNKNOWN_PROTOCOL", "VERSION_TOO_LOW", "TLSV1_ALERT_INSUFFICIENT_SECURITY",
                    "NO_CIPHERS_AVAILABLE", "NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE"}


def tls_reason(exc: BaseException) -> str:
    """Why a TLS connection failed, in words, from OpenSSL's verify code or reason (never the server's
    bytes): expired certificate, hostname mismatch, unknown issuer, protocol version, handshake cut."""
    import ssl

    if isinstance(exc, HandshakeCutError):
        return ("handshake cut: the server (or something on the way: a firewall, a captive portal) hung up "
                "during the TLS handshake")
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _VERIFY_REASONS:
            return _VERIFY_REASONS[code]
        said = " ".join(str(getattr(exc, "verify_message", "") or "").split())[:_MAX_DETAIL]
        return f"certificate refused: {said or 'verification failed'} (OpenSSL code {code})"
    if isinstance(exc, ssl.CertificateError):
        return "the server's certificate was refused"
    reason = str(getattr(exc, "reason", "") or "")
    if reason in _VERSION_REASONS:
        return ("protocol version: the server offers no TLS version this Pi accepts (TLS 1.2 or newer); "
                "update the server or the proxy in front of it")
    if reason == "WRONG_VERSION_NUMBER":
        return "the server did not answer in TLS (is it plain http? then use an http:// URL)"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "the server closed the TLS connection unexpectedly"
    return f"TLS error ({reason or type(exc).__name__})"


def error_for_exception(exc: BaseException, target: str, timeout_s: float, phase: str = "") -> UnreachableError:
    """A network-level failure (refused, DNS, timeout, reset, TLS) as UnreachableError. The text never
    quotes what the server sent."""
    import ssl

    during = {"upload": " during the upload", "answer": " while reading the answer"}.get(phase, "")
    if isinstance(exc, socket.gaierror):
        text = "DNS lookup failed"
    elif isinstance(exc, LookupTimeout):
        text = f"DNS lookup gave no answer within {timeout_s:g} s"
    elif isinstance(exc, (ConnectionRefusedError,)) or (isinstance(exc, OSError) and exc.errno in
                                                        (errno.EHOSTUNREACH, errno.ENETUNREACH)):
        text = "connection refused or no route"
    elif isinstance(exc, TimeoutError):
        text = f"no answer within {timeout_s:g} s"
    elif isinstance(exc, (ssl.SSLError, ssl.CertificateError, HandshakeCutError)):
        text = "TLS: " + tls_reason(exc)
    elif isinstance(exc, (http.client.LineTooLong, http.client.HTTPException)) and not isinstance(
            exc, (http.client.RemoteDisconnected, http.client.IncompleteRead)):
        text = f"not an HTTP answer ({type(exc).__name__}): a captive portal or proxy in the way?"
    elif isinstance(exc, (ConnectionError, http.client.HTTPException, _Cut)):
        text = "connection broken" + during
    elif isinstance(exc, ValueError):
        text = "a header cannot be sent (control character)"
    else:
        text = type(exc).__name__ + during
    return UnreachableError(f"cannot reach {target}: {text}")
