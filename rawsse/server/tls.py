"""TLS on ``--tls-listen``: the server context, the transport, and the handshake in the loop.

Theory of operation
-------------------
A connection accepted on the TLS listener starts as a ``TlsHandshake`` registered in the
worker's epoll loop for its fd. Its transport is a non-blocking ``ssl.SSLObject`` over two
``ssl.MemoryBIO`` (Python's ssl docs, "Memory BIO support"): ciphertext moves between the socket
and the BIOs with plain ``os.read``/``os.write``, so a handshake is a few steps driven by epoll
events and never blocks the loop. Only a finished handshake becomes a protocol object, which
never sees a partial one:

- ALPN ``h2`` (RFC 7301; RFC 9113 §3.2): HTTP/2 from the first byte. The 24-byte preface is
  awaited here, then an ``H2Connection`` goes on with it; anything else closes.
- ALPN ``http/1.1`` or none: a ``TlsHttp1Connection``, whose preface sniffing makes a client
  that set no ALPN and sends the preface HTTP/2 (aioapns and Pushy set none).

A TLS connection stays on the worker that accepted it: an fd handed to another worker with
``SCM_RIGHTS`` would leave its TLS session behind. Its pushes are routed like any other. A
device stream (``GET /events``) writes its socket directly (``stream.py``), so it cannot keep
a TLS transport: over TLS it is answered ``421`` naming ``--listen``.

Handshake time is bounded by ``--header-timeout`` (the worker's once-a-second sweep); a failed or
timed-out handshake closes quietly (no traceback) and counts as ``disconnects.tls_handshake``.
"""

from __future__ import annotations

import logging
import os
import ssl
from typing import TYPE_CHECKING, Any, cast

from rawsse.apns import answers
from rawsse.config import ConfigError
from rawsse.h2.connection import H2Connection
from rawsse.h2.frames import PREFACE
from rawsse.server.connection import end_connection
from rawsse.server.exchange import Request
from rawsse.server.http1 import Http1Connection
from rawsse.server.loop import EPOLLIN, EPOLLOUT, EPOLLRDHUP
from rawsse.server.transport import SocketTransport

if TYPE_CHECKING:
    from rawsse.server.worker import Worker

log = logging.getLogger(__name__)

ALPN = ["h2", "http/1.1"]  # the server's preference order, as api.push.apple.com
READABLE = EPOLLIN | EPOLLRDHUP
HANDSHAKE_READ = 16 * 1024 + 512  # one TLS record with its header and tag
FAILED = "tls_handshake"  # the disconnect reason of a failed or timed-out handshake
# One ciphertext read buffer per process (the loop is single-threaded): os.read would allocate
# and shrink a 64 KB bytes object on every read.
_CIPHERTEXT_VIEW = memoryview(bytearray(64 * 1024))
STREAM_OVER_TLS = answers.json(421, {
    "reason": "MisdirectedRequest",
    "detail": "device streams (GET /events) are served on --listen (plain TCP), not over TLS"})


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The context every TLS connection uses: TLS 1.2+, ALPN h2 and http/1.1. A file that is
    missing, unreadable, not PEM or a key that does not match is a ``ConfigError`` naming the
    flag, found by the master at start. With ``client_ca`` (``--tls-client-ca``) a client
    certificate is asked for and, when one is sent, verified against those CAs (expiry
    included): a bad one fails the handshake, as Apple's does; none is allowed, so token
    senders share the listener (``--auth any``)."""
    _read_pem(cert, "--tls-cert", "CERTIFICATE")
    _read_pem(key, "--tls-key", "PRIVATE KEY")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    context.options |= ssl.OP_NO_RENEGOTIATION  # a client-started renegotiation costs server CPU
    try:
        # An encrypted key would prompt on the terminal of every worker: refuse it instead.
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError("--tls-key", f"{key} does not match the certificate in {cert}") from None
        raise ConfigError("--tls-key", f"cannot load {key} with {cert} ({exc.reason or exc}); "
                                       f"an unencrypted PEM key is needed") from None
    if client_ca:
        _read_pem(client_ca, "--tls-client-ca", "CERTIFICATE")
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ConfigError("--tls-client-ca", f"cannot load {client_ca}: "
                                                 f"{exc.reason or exc}") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _no_password() -> bytes:
    raise ssl.SSLError("the key is encrypted")


def _read_pem(path: str, flag: str, label: str) -> None:
    try:
        with open(path, "rb") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError(flag, f"cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in text or label.encode() + b"-----" not in text:
        raise ConfigError(flag, f"{path} holds no PEM {label.lower()}")


class TlsTransport(SocketTransport):
    """Decrypted bytes with ``SocketTransport``'s calls and errors.

    Writes follow ``SSL_write``'s rule: bytes encrypted whose ciphertext the socket did not take
    yet are not reported written; the caller, which keeps unwritten bytes at the head of its
    buffer, offers them again and they are then acknowledged without encrypting them twice.
    So the protocol keeps ``EPOLLOUT`` exactly while ciphertext waits, as it does over TCP.

    Reads take at most the read buffer's size of ciphertext from the socket (less what the
    incoming BIO already holds): plaintext is never longer than its ciphertext, so everything
    decrypted fits the one read and nothing is left inside the BIO with no epoll event to
    fetch it (epoll only knows the socket)."""

    __slots__ = ("ssl", "incoming", "outgoing", "pending", "inflight", "eof", "write_closed")

    def __init__(self, fd: int, context: ssl.SSLContext) -> None:
        super().__init__(fd)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.pending = b""  # ciphertext the socket has not taken yet
        self.inflight = 0  # plaintext bytes whose ciphertext is in ``pending``
        self.eof = False
        self.write_closed = False

    # -- handshake ----------------------------------------------------------------------------

    def handshake(self) -> bool:
        """One step; True once complete. Raises ``ssl.SSLError`` (a bad client hello) or
        ``OSError``/``EOFError`` (the client left)."""
        self._pull(HANDSHAKE_READ)
        try:
            self.ssl.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            if self.eof:
                raise EOFError("closed during the handshake") from None
            done = False
        self.flush()
        return done

    def alpn(self) -> str | None:
        return self.ssl.selected_alpn_protocol()

    def buffered(self) -> bool:
        """Bytes received and not yet decrypted (a request sent with the handshake's end)."""
        return self.incoming.pending > 0 or self.ssl.pending() > 0

    def flush(self) -> bool:
        """Send waiting ciphertext; True when none is left."""
        data = self.pending + self.outgoing.read() if self.outgoing.pending else self.pending
        if data:
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            data = data[sent:]
        self.pending = data
        return not data

    # -- SocketTransport's calls --------------------------------------------------------------

    def readv(self, buffers: list[Any]) -> int:
        buffer = buffers[0]
        if self.write_closed:  # lingering after close_notify: what comes is discarded anyway
            return os.readv(self.fd, buffers)
        incoming, tls = self.incoming, self.ssl
        self._pull(len(buffer) - incoming.pending)
        total = 0
        size = len(buffer)
        while total < size:
            try:
                # With a buffer, read() fills it and returns a count (typeshed says bytes).
                n = cast(int, tls.read(size - total, buffer[total:]))
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a bare FIN
                self.eof = True
                break
            if n == 0:
                break
            total += n
            if not incoming.pending and not tls.pending():
                break  # all decrypted: spare the exception a further read would raise
        if self.outgoing.pending:  # an alert or a TLS 1.3 key update answer
            self.flush()
        if total:
            return total
        if self.eof:
            return 0
        raise BlockingIOError

    def write(self, data: Any) -> int:
        if (self.pending or self.outgoing.pending) and not self.flush():
            raise BlockingIOError
        # Out now, whoever sent it (a read that had an alert to send flushes too).
        acked, self.inflight = self.inflight, 0
        rest = memoryview(data)[acked:]
        if not rest:
            return acked
        try:
            encrypted = self.ssl.write(rest)
        except ssl.SSLError as exc:  # the session is over (an alert was received)
            raise BrokenPipeError(str(exc)) from None
        if self.flush():
            return acked + encrypted
        self.inflight = encrypted
        return acked

    def shutdown_write(self) -> None:
        """close_notify (RFC 8446 §6.1), then FIN; the peer's close_notify is not awaited."""
        try:
            self.ssl.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: the peer's close_notify has not come, as expected
        self.flush()
        self.write_closed = True
        super().shutdown_write()

    def detach(self) -> int:
        raise RuntimeError("a TLS connection cannot hand its socket on")  # see TlsHttp1Connection

    # -- the socket side ----------------------------------------------------------------------

    def _pull(self, limit: int) -> None:
        """Move up to ``limit`` bytes of ciphertext from the socket into the incoming BIO."""
        if limit <= 0 or self.eof:
            return
        view = _CIPHERTEXT_VIEW[:limit] if limit < len(_CIPHERTEXT_VIEW) else _CIPHERTEXT_VIEW
        try:
            n = os.readv(self.fd, [view])
        except BlockingIOError:
            return
        if n:
            self.incoming.write(view[:n])
        else:
            self.eof = True
            self.incoming.write_eof()


class TlsHttp1Connection(Http1Connection):
    """HTTP/1.1 over TLS: the same connection, its socket never handed on."""

    __slots__ = ()

    def __init__(self, host: "Worker", transport: TlsTransport) -> None:
        super().__init__(host, transport.fd, False)
        self.transport = transport

    def become_stream(self, request: Request, token: bytes) -> None:
        self.answer(request, STREAM_OVER_TLS)


class TlsHandshake:
    """A TLS connection until its handshake (and, for ALPN h2, the preface) is in."""

    __slots__ = ("host", "fd", "transport", "deadline", "events", "preface")

    def __init__(self, host: "Worker", fd: int, context: ssl.SSLContext) -> None:
        self.host = host
        self.fd = fd
        self.transport = TlsTransport(fd, context)
        self.deadline = host.loop.now + host.config.header_timeout
        self.events = READABLE
        self.preface: bytes | None = None  # set once ALPN h2 was negotiated

    def handle_events(self, events: int) -> None:
        try:
            if self.preface is None:
                self._handshake_step()
            else:
                self._read_preface()
        except (ssl.SSLError, OSError, EOFError) as exc:
            # A bad client hello, an unknown CA at the client, a port scanner: not a traceback.
            log.debug("fd %d: TLS handshake failed: %s", self.fd, exc)
            try:
                self.transport.flush()  # the alert, so the client can say what went wrong
            except OSError:
                pass
            self.close(FAILED)

    def _handshake_step(self) -> None:
        transport = self.transport
        if not transport.handshake():
            self._want(EPOLLOUT if transport.pending else 0)
            return
        if not transport.flush():  # the server's last flight (TLS 1.3 tickets) still going
            self._want(EPOLLOUT)
            return
        if transport.alpn() == "h2":
            self.preface = b""
            if transport.buffered():
                self._read_preface()
            else:
                self._want(0)
            return
        self._hand_over(TlsHttp1Connection(self.host, transport))

    def _read_preface(self) -> None:
        if not self.transport.flush():
            self._want(EPOLLOUT)
            return
        host = self.host
        try:
            n = self.transport.readv(host.read_buffers)
        except BlockingIOError:
            self._want(0)
            return
        if n == 0:
            self.close("client")
            return
        received = (self.preface or b"") + bytes(host.read_view[:n])
        if not received.startswith(PREFACE[:len(received)]):
            host.stats.bad_requests += 1  # ALPN h2 then no HTTP/2 (RFC 9113 §3.4): nothing to answer
            self.close("error")
        elif len(received) < len(PREFACE):
            self.preface = received
            self._want(0)
        else:
            self._hand_h2(received)

    def _hand_h2(self, received: bytes) -> None:
        host = self.host
        host.http_conns.discard(self)
        self._sync_events(READABLE)
        h2 = H2Connection(host, self.transport, False, received)
        if h2.fd >= 0:
            host.loop.replace(h2.fd, h2)
            host.http_conns.add(h2)
        self.fd = -1

    def _hand_over(self, conn: TlsHttp1Connection) -> None:
        host = self.host
        host.http_conns.discard(self)
        self._sync_events(READABLE)
        fd, self.fd = self.fd, -1
        host.loop.replace(fd, conn)
        host.http_conns.add(conn)
        if self.transport.buffered():  # a request sent with the handshake's end: no event comes
            conn.handle_events(EPOLLIN)

    def _want(self, extra: int) -> None:
        self._sync_events(READABLE | extra)

    def _sync_events(self, events: int) -> None:
        if events != self.events:
            self.events = events
            self.host.loop.modify(self.fd, events)

    # -- what the worker asks of every connection ---------------------------------------------

    def timed_out(self) -> None:
        self.close(FAILED)

    def finish_then_close(self) -> None:
        self.close("shutdown")  # nothing asked yet: nothing to finish

    def close(self, reason: str = "client") -> None:
        end_connection(self, reason)


def refuse_tls(fd: int) -> None:
    """A TLS connection the worker will not serve (draining, over capacity): closed at once,
    as a handshake would cost more than the refusal is worth; the client retries."""
    os.close(fd)
