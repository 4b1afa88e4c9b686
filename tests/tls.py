"""https for the tests and for bench_wire.py: a test PKI made with openssl, a TLS-terminating proxy in front
of a real server, and a relay that counts every byte on the wire.

    pki = make_pki(tmp_dir)                          # root CA, intermediate, leaf for 127.0.0.1/localhost
    with TLSProxy(vm.url, pki.good) as tls:          # https://127.0.0.1:PORT -> VictoriaMetrics (http)
        ... a client trusting pki.ca_file writes to tls.url ...

    with TLSProxy(vm.url, pki.good, idle_timeout_s=5) as tls, ByteRelay(tls.port) as relay:
        ... the client talks to relay.url; relay.total is TCP payload both ways, TLS records included ...

The proxy is tests/proxy.py's FaultProxy (same counters, log and fault rules) with TLS in front: the server
sends the leaf and the intermediate, as real servers do, and closes a keep-alive connection that stays idle
for `idle_timeout_s` (cloud load balancers close after about 60 s) with a TLS close_notify, as they do.
Bad servers for the refusal tests: `pki.expired`, `pki.mismatch` (the name is not 127.0.0.1/localhost),
`pki.unknown` (a chain from a CA nobody trusts), `versions=LEGACY_TLS` (TLS 1.0/1.1 only) and
`cut_handshake=True` (reads the ClientHello and hangs up).

`in_process(...)` runs either one in its own process (bench_wire.py: the proxy's work must not be timed
with the daemon's, and a byte counter must not share a GIL with what it counts).

Kept here, beside proxy.py and servers.py, and imported by bench_wire.py the way bench.py imports those:
one implementation for the suite and the benchmark. Stdlib and the `openssl` command only; no pytest import.
"""
from __future__ import annotations

import datetime as dt
import multiprocessing
import shutil
import socket
import ssl
import subprocess
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

try:  # imported as `tls` by the tests (tests/ on sys.path) and as `tests.tls` by bench_wire.py
    from proxy import FaultProxy, _Handler, _Server
except ImportError:  # pragma: no cover - the bench's import path
    from tests.proxy import FaultProxy, _Handler, _Server

__all__ = ["Chain", "Pki", "make_pki", "server_context", "TLSProxy", "ByteRelay", "LEGACY_TLS", "in_process",
           "ChildServer", "openssl_available"]

LEGACY_TLS = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
_OPENSSL_TIMEOUT_S = 60.0


def openssl_available() -> str | None:
    """None when the openssl command exists, else a reason to skip."""
    return None if shutil.which("openssl") else "the openssl command is not installed (Debian package openssl)"


# -- the test PKI -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chain:
    """What a server presents: `cert_file` holds the leaf then the intermediate (PEM), `key_file` the leaf key."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Pki:
    """`ca_file` is the root a client trusts; each chain is a server certificate to present."""

    ca_file: Path
    good: Chain
    expired: Chain
    mismatch: Chain
    unknown: Chain


# RSA 2048 throughout and the extensions a public CA puts in (AIA, CRL, policies): the byte counts of a
# handshake then come close to a real one (InfluxDB Cloud's chain is a public CA's leaf + intermediate).
_CA_CONFIG = """\
[ca]
default_ca = this
[this]
database = {dir}/index.txt
new_certs_dir = {dir}/issued
default_md = sha256
policy = any
unique_subject = no
rand_serial = yes
copy_extensions = none
[any]
organizationName = optional
commonName = supplied
[intermediate]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,digitalSignature,keyCertSign,cRLSign
extendedKeyUsage = serverAuth,clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
authorityInfoAccess = caIssuers;URI:http://pki.test.invalid/root.crt,OCSP;URI:http://ocsp.test.invalid
crlDistributionPoints = URI:http://pki.test.invalid/root.crl
certificatePolicies = 2.23.140.1.2.1
[leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = DNS:localhost,IP:127.0.0.1
authorityInfoAccess = caIssuers;URI:http://pki.test.invalid/intermediate.crt,OCSP;URI:http://ocsp.test.invalid
crlDistributionPoints = URI:http://pki.test.invalid/intermediate.crl
certificatePolicies = 2.23.140.1.2.1
[leaf_other_name]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = DNS:influx.example.org
"""


def _openssl(*args: str, cwd: Path) -> None:
    try:
        subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, text=True,
                       timeout=_OPENSSL_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"openssl {args[0]} failed: {exc.stderr.strip()[-500:]}") from None


def _stamp(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%SZ")


class _Ca:
    """A CA directory: key, certificate, and the `openssl ca` database that signs with them."""

    def __init__(self, root: Path, name: str) -> None:
        self.dir = root / name
        (self.dir / "issued").mkdir(parents=True)
        (self.dir / "index.txt").touch()
        (self.dir / "ca.cnf").write_text(_CA_CONFIG.format(dir=self.dir))
        self.key = self.dir / "key.pem"
        self.cert = self.dir / "cert.pem"

    def sign(self, csr: Path, out: Path, extensions: str, start: dt.datetime, end: dt.datetime) -> Path:
        _openssl("ca", "-batch", "-notext", "-config", str(self.dir / "ca.cnf"), "-cert", str(self.cert),
                 "-keyfile", str(self.key), "-in", str(csr), "-out", str(out), "-extensions", extensions,
                 "-startdate", _stamp(start), "-enddate", _stamp(end), cwd=self.dir)
        return out


def _key_and_csr(dir_: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, csr = dir_ / f"{name}.key", dir_ / f"{name}.csr"
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", subject, cwd=dir_)
    return key, csr


def _root(base: Path, name: str, subject: str) -> _Ca:
    ca = _Ca(base, name)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert),
             "-subj", subject, "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=ca.dir)
    return ca


def _intermediate(base: Path, name: str, subject: str, root: _Ca, now: dt.datetime) -> _Ca:
    ca = _Ca(base, name)
    _, csr = _key_and_csr(ca.dir, "key-request", subject)
    (ca.dir / "key-request.key").rename(ca.key)
    root.sign(csr, ca.cert, "intermediate", now - dt.timedelta(days=1), now + dt.timedelta(days=3650))
    return ca


def make_pki(base: str | Path) -> Pki:
    """Make a root CA, an intermediate and server chains under `base` (must not exist or be empty).

    About a second (five RSA keys). Raises RuntimeError naming the openssl step that failed.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    root = _root(base, "root", "/O=SolarPowerBrampton Test/CN=SolarPowerBrampton Test Root CA")
    inter = _intermediate(base, "intermediate", "/O=SolarPowerBrampton Test/CN=SolarPowerBrampton Test TLS CA 1",
                          root, now)
    other_root = _root(base, "other-root", "/O=Nobody Trusts This/CN=Unknown Root CA")
    other_inter = _intermediate(base, "other-intermediate", "/O=Nobody Trusts This/CN=Unknown TLS CA", other_root,
                                now)
    leaves = base / "leaves"
    leaves.mkdir()
    key, csr = _key_and_csr(leaves, "leaf", "/CN=localhost")
    valid = (now - dt.timedelta(days=1), now + dt.timedelta(days=90))

    def chain(name: str, ca: _Ca, extensions: str, start: dt.datetime, end: dt.datetime) -> Chain:
        leaf = ca.sign(csr, leaves / f"{name}-leaf.pem", extensions, start, end)
        bundle = leaves / f"{name}-chain.pem"
        bundle.write_text(leaf.read_text() + ca.cert.read_text())
        return Chain(bundle, key)

    return Pki(
        ca_file=root.cert,
        good=chain("good", inter, "leaf", *valid),
        expired=chain("expired", inter, "leaf", now - dt.timedelta(days=400), now - dt.timedelta(days=10)),
        mismatch=chain("mismatch", inter, "leaf_other_name", *valid),
        unknown=chain("unknown", other_inter, "leaf", *valid),
    )


def server_context(chain: Chain, versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None) -> ssl.SSLContext:
    """A server-side context presenting `chain`; `versions` = (minimum, maximum) TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if versions is not None:
        if versions[0] < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS < 1.2 at the default level
        with warnings.catch_warnings():  # deprecated is the point: a server too old to accept
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version, ctx.maximum_version = versions
    ctx.load_cert_chain(chain.cert_file, chain.key_file)
    return ctx


# -- the TLS-terminating proxy ----------------------------------------------------------------------------
class _TLSServer(_Server):
    """Does the TLS handshake in the connection's own thread (never in the accept loop)."""

    proxy: "TLSProxy"

    def finish_request(self, request, client_address) -> None:
        proxy = self.proxy
        request.settimeout(proxy.handshake_timeout_s)
        if proxy.cut_handshake:
            try:
                request.recv(16_384)  # the ClientHello; then hang up, as a broken middlebox does
            except OSError:
                pass
            proxy._count("handshakes_cut")
            return
        try:
            tls = proxy.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            proxy._count("handshake_failures", error=f"{type(exc).__name__}: {exc}")
            return
        proxy._count("handshakes")
        if tls.session_reused:
            proxy._count("resumed")
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            _close_notify(tls)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that went away mid-request is a normal event here, not a traceback on stderr


def _close_notify(tls: ssl.SSLSocket) -> None:
    """Send close_notify and close without waiting for the peer's (what load balancers do)."""
    try:
        tls.setblocking(False)
        tls.unwrap()
    except (OSError, ValueError):
        pass  # SSLWantReadError once our alert is out; or the peer is already gone
    finally:
        tls.close()


class _IdleClosingHandler(_Handler):
    """FaultProxy's handler; a keep-alive connection idle for `timeout` seconds is closed."""

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        if format.startswith("Request timed out"):  # BaseHTTPRequestHandler's idle read timed out
            self.server.proxy._count("idle_closes")


class TLSProxy(FaultProxy):
    """FaultProxy served over https://127.0.0.1:PORT with `chain`; closes connections idle `idle_timeout_s`.

    Counters besides FaultProxy's: `handshakes` (completed), `resumed` (of which TLS session resumptions),
    `handshake_failures` (with `tls_errors`, the server's side of each), `handshakes_cut`, `idle_closes`.
    """

    server_class = _TLSServer

    def __init__(self, upstream: str, chain: Chain, *, idle_timeout_s: float = 60.0,
                 versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None, cut_handshake: bool = False,
                 handshake_timeout_s: float = 10.0, port: int = 0, upstream_timeout: float = 30.0) -> None:
        super().__init__(upstream, port=port, upstream_timeout=upstream_timeout)
        self.context = server_context(chain, versions)
        self.idle_timeout_s = idle_timeout_s
        self.cut_handshake = cut_handshake
        self.handshake_timeout_s = handshake_timeout_s
        self.handler_class = type("IdleClosingHandler", (_IdleClosingHandler,), {"timeout": idle_timeout_s})
        self.handshakes = self.resumed = self.handshake_failures = self.handshakes_cut = self.idle_closes = 0
        self.tls_errors: list[str] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _count(self, name: str, error: str | None = None) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            if error is not None:
                self.tls_errors.append(error)


# -- the byte-counting relay ------------------------------------------------------------------------------
UP, DOWN, CONNECTIONS = 0, 1, 2  # indexes into ByteRelay.counters


class ByteRelay:
    """TCP relay from 127.0.0.1:port to 127.0.0.1:`upstream_port`, counting the payload both ways.

    `counters` (UP = client to server bytes, DOWN = server to client, CONNECTIONS) is a
    multiprocessing.Array('q', 3) or anything with get_lock() and item access; it may be shared with
    another process. Half-closes are passed on, so TLS close_notify and FIN reach the other side as sent.
    """

    def __init__(self, upstream_port: int, *, port: int = 0, counters=None) -> None:
        self.upstream_port = upstream_port
        self.counters = counters if counters is not None else multiprocessing.Array("q", 3)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.closes_passed_on = 0  # servers' closes passed on to the client (counted in this process only)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def up(self) -> int:
        return self.counters[UP]

    @property
    def down(self) -> int:
        return self.counters[DOWN]

    @property
    def total(self) -> int:
        with self.counters.get_lock():
            return self.counters[UP] + self.counters[DOWN]

    def start(self) -> "ByteRelay":
        self._thread = threading.Thread(target=self._accept, name=f"ByteRelay:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "ByteRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.counters.get_lock():
                self.counters[CONNECTIONS] += 1
            with self._lock:
                self._socks.update((client, server))
            done = threading.Barrier(2, action=lambda c=client, s=server: self._forget(c, s))
            threading.Thread(target=self._pump, args=(client, server, UP, done), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, DOWN, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, index: int, done: threading.Barrier) -> None:
        try:
            while True:
                data = src.recv(65_536)
                if not data:
                    break
                with self.counters.get_lock():
                    self.counters[index] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if index == DOWN:
            self.closes_passed_on += 1  # the server's close has reached the client (in-process relays)
        try:
            done.wait(timeout=600)
        except threading.BrokenBarrierError:
            pass

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._socks.discard(s)
                s.close()


# -- either one in its own process ------------------------------------------------------------------------
# Slots of ChildServer.counters for a TLSProxy child (a ByteRelay child uses UP, DOWN, CONNECTIONS).
REQUESTS, WRITES, WRITE_LINES, WRITE_CYCLES, NOT_ACKED, HANDSHAKES, RESUMED, IDLE_CLOSES, FAILURES = range(9)
_WRITE_PATHS = ("/api/v2/write", "/write")


@dataclass
class ChildServer:
    """A TLSProxy or ByteRelay running in a child process; `counters` is shared memory (see the slots)."""

    process: multiprocessing.process.BaseProcess
    port: int
    counters: object

    def snapshot(self) -> list[int]:
        with self.counters.get_lock():
            return list(self.counters)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def in_process(kind: str, *, start_timeout_s: float = 30.0, **kwargs) -> ChildServer:
    """Start `TLSProxy(**kwargs)` (kind "tls") or `ByteRelay(**kwargs)` (kind "relay") in a child process.

    A TLS child counts, in shared memory, requests, writes with their lines and distinct timestamps
    (cycles), writes not answered 2xx, and its handshake counters. Raises RuntimeError if it does not start.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads and locks
    counters = ctx.Array("q", 9)
    port = ctx.Value("i", 0)
    process = ctx.Process(target=_child, args=(kind, kwargs, counters, port), daemon=True,
                          name=f"{kind}-child")
    process.start()
    deadline = time.monotonic() + start_timeout_s
    while port.value == 0:
        if not process.is_alive() or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"the {kind} child process did not start (exit code {process.exitcode})")
        time.sleep(0.01)
    return ChildServer(process, port.value, counters)


def _child(kind: str, kwargs: dict, counters, port) -> None:
    if kind == "relay":
        relay = ByteRelay(counters=counters, **kwargs).start()
        port.value = relay.port
        threading.Event().wait()  # until terminated
    proxy = TLSProxy(**kwargs).start()
    port.value = proxy.port
    stamps: set[int] = set()
    counted: set[int] = set()  # ids of the log entries already counted
    while True:
        proxy.wait_for_requests(proxy.requests + 1, timeout=0.05)
        with proxy._lock:
            entries = list(proxy.log)
        answered = [e for e in entries if e.status is not None]
        for entry in answered:
            if id(entry) in counted or entry.path.split("?")[0] not in _WRITE_PATHS:
                continue
            counted.add(id(entry))
            lines = [line for line in entry.text.splitlines() if line.strip()]
            stamps.update(int(line.rsplit(" ", 1)[1]) for line in lines)
            with counters.get_lock():
                counters[WRITES] += 1
                counters[WRITE_LINES] += len(lines)
                counters[NOT_ACKED] += not 200 <= entry.status < 300
        with counters.get_lock():
            counters[REQUESTS] = len(answered)
            counters[WRITE_CYCLES] = len(stamps)
            counters[WRITE_CYCLES] = len(stamps)
            counters[HANDSHAKES] = proxy.handshakes
            counters[RESUMED] = proxy.resumed
            counters[IDLE_CLOSES] = proxy.idle_closes
            counters[FAILURES] = proxy.handshake_failures + proxy.handshakes_cut
