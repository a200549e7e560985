# -*- test-case-name: tests.test_keyserver,tests.test_connections -*-
"""
TLS for every securelan control channel: TLS 1.3 only, mutually
authenticated against the subnet CA.

Twisted's TLS transport holds each connection's small writes until the next
reactor turn with a timed call of its own, and its TCP transport sends only
when the reactor next reports the socket writable: it adds the socket to
epoll for each write and removes it once the write is done.  With thousands
of keys a second over thousands of connections (each new key is written to
two), those per-connection costs were about a fifth of the key server's
reactor thread (``BENCHMARKS.md``).  L{TurnTLSFactory} (the key server's
listener, an agent's connection to its key server) keeps the holding, so
a burst of boxes to one peer is still one TLS record, but flushes every
connection that wrote with one timed call a turn, and hands the TLS records
to the socket at once when nothing is queued before them.  What the kernel
does not take is queued in the TCP transport as before, so the order of
bytes is kept and a slow reader is still buffered, not blocked on.

OpenSSL's default key-exchange groups are left alone on purpose: with the
OpenSSL that ships in C{cryptography}, two endpoints negotiate the hybrid
post-quantum group X25519MLKEM768, so keys handed out today cannot be read
from a recording later.  L{negotiated_group} reports what was used.
"""

import operator
import weakref

import attrs
from OpenSSL import SSL
from twisted.internet import ssl, tcp
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet._sslverify import TLSVersion
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from .logs import logger

log = logger("securelan.tls")

#: What every securelan TLS channel negotiates; tests assert it.
EXPECTED_GROUP = "X25519MLKEM768"


class TLSConfigError(Exception):
    """
    A certificate, key or CA file cannot be used for TLS.
    """


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror}") from None


@attrs.frozen
class Credentials:
    """
    A party's TLS credentials: its certificate and key, and the CA it trusts.
    """

    ca: ssl.Certificate
    own: ssl.PrivateCertificate

    @classmethod
    def load(cls, ca_path: str, cert_path: str, key_path: str) -> "Credentials":
        try:
            ca = ssl.Certificate.loadPEM(_read(ca_path, "CA certificate"))
        except SSL.Error:
            raise TLSConfigError(f"{ca_path}: not a PEM certificate") from None
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "private key")
        try:
            own = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except VerifyError:
            raise TLSConfigError(f"{key_path}: private key does not match {cert_path}") from None
        except (SSL.Error, ValueError):
            raise TLSConfigError(f"{cert_path}, {key_path}: not a PEM certificate and private key") from None
        try:
            ctx = SSL.Context(SSL.TLS_METHOD)
            ctx.use_certificate(own.original)
            ctx.use_privatekey(own.privateKey.original)
            ctx.check_privatekey()
        except (SSL.Error, TypeError):
            raise TLSConfigError(f"{key_path}: private key does not match {cert_path}") from None
        return cls(ca=ca, own=own)

    def server_options(self):
        """
        Options for a server that demands a client certificate from our CA.
        """
        return ssl.CertificateOptions(
            privateKey=self.own.privateKey.original,
            certificate=self.own.original,
            trustRoot=ssl.trustRootFromCertificates([self.ca]),
            raiseMinimumTo=TLSVersion.TLSv1_3,
        )

    def client_options(self, hostname: str):
        """
        Options for a client that presents our certificate and checks that
        the server is C{hostname} (service-identity), signed by our CA.
        """
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=ssl.trustRootFromCertificates([self.ca]),
            clientCertificate=self.own,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
        )


def negotiated_group(transport) -> str | None:
    """
    The key-exchange group a TLS transport negotiated, e.g. C{X25519MLKEM768}.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if isinstance(handle, SSL.Connection):
        return handle.get_group_name()
    return None


def peer_certificate(transport):
    """
    The peer's certificate as a C{cryptography} certificate, or None.
    """
    cert = transport.getPeerCertificate()
    return cert.to_cryptography() if cert is not None else None


def describe_tls_failure(reason) -> str:
    """
    A one-line reason for a failed TLS handshake, from OpenSSL's error list.
    """
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [str(entry[-1]) for entry in value.args[0] if entry]
        if parts:
            return "; ".join(parts)
    return str(value) or value.__class__.__name__


class TurnWrites:
    """
    The connections that wrote during this reactor turn: one timed call
    flushes them all when the turn ends.  L{turn_writes} gives the one of
    a reactor.
    """

    def __init__(self, clock):
        # Not a strong reference: turn_writes keeps one per clock, keyed
        # weakly by it.
        self._clock = weakref.ref(clock)
        self._waiting = []
        self._call = None

    def wait(self, connection):
        """
        Flush C{connection} (its C{flush()}) when this turn ends.
        """
        self._waiting.append(connection)
        # A call cancelled from outside (a test's reactor clean-up) must not
        # leave the reactor's writes waiting for it for ever.
        if self._call is None or not self._call.active():
            self._call = self._clock().callLater(0, self.flush)

    def flush(self):
        """
        Flush every connection waiting, now.
        """
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            try:
                connection.flush()
            except Exception:
                # One connection's failure must not keep the others' bytes.
                log.failure("flushing a connection's writes")


_TURNS = weakref.WeakKeyDictionary()


def turn_writes(clock) -> TurnWrites:
    """
    The L{TurnWrites} of C{clock} (a reactor): every L{TurnTLSFactory} on
    one reactor, the listener's and each client connection's, flushes its
    connections in the same timed call.
    """
    turn = _TURNS.get(clock)
    if turn is None:
        turn = _TURNS[clock] = TurnWrites(clock)
    return turn


class TurnTLSProtocol(TLSMemoryBIOProtocol):
    """
    A TLS connection whose writes wait for the end of the reactor turn (as
    Twisted's C{BufferingTLSTransport} holds them) on its factory's
    L{TurnWrites}, and whose TLS records go to a TCP socket at once when
    nothing is queued before them.
    """

    #: Bytes held at most before they are written at once.
    MAX_HELD = 64_000

    factory: "TurnTLSFactory"

    def __init__(self, factory, wrappedProtocol, _connectWrapped=True):
        super().__init__(factory, wrappedProtocol, _connectWrapped)
        self._held = []
        self._held_bytes = 0
        self._tcp = None

    def makeConnection(self, transport):
        # Only Twisted's own TCP transport is written to directly: the
        # queue it keeps is what must be empty first.
        if isinstance(transport, tcp.Connection):
            self._tcp = transport
        super().makeConnection(transport)

    def write(self, data):
        if not self._held:
            self.factory.turn.wait(self)
        self._held.append(data + b"")
        self._held_bytes += len(data)
        if self._held_bytes > self.MAX_HELD:
            self.flush()

    def writeSequence(self, sequence):
        self.write(b"".join(sequence))

    def flush(self):
        """
        Write what is held through TLS now.
        """
        if self._held:
            data = b"".join(self._held)
            self._held = []
            self._held_bytes = 0
            TLSMemoryBIOProtocol.write(self, data)

    def loseConnection(self):
        self.flush()
        super().loseConnection()

    def unregisterProducer(self):
        # Twisted shuts TLS down here when the connection is being lost:
        # what is held must be in TLS before that.
        self.flush()
        super().unregisterProducer()

    def abortConnection(self):
        # Dropped, as an abort drops what the TCP transport holds: not
        # even the close_notify that Twisted's abort makes goes out.
        self._send_nothing_more()
        super().abortConnection()

    def connectionLost(self, reason):
        self._send_nothing_more()
        try:
            super().connectionLost(reason)
        finally:
            if self.wrappedProtocol is not None:
                # Twisted's connectionLost stopped early (the application
                # raised on the last bytes it read): it still learns of
                # the loss, and the factory still forgets the connection.
                self._lostTLSConnection = True
                ProtocolWrapper.connectionLost(self, reason)

    def _send_nothing_more(self):
        self._held = []
        self._held_bytes = 0
        self._tcp = None

    def _flushSendBIO(self):
        try:
            data = self._tlsConnection.bio_read(2**15)
        except SSL.WantReadError:
            return
        transport = self._tcp
        if transport is not None and _nothing_queued(transport):
            sent = transport.writeSomeData(data)
            # An error (returned, not raised) is left for the transport's
            # own write to find and report as the connection's loss.
            if isinstance(sent, int) and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
        self.transport.write(data)


def _nothing_queued(transport) -> bool:
    """
    Whether Twisted's TCP transport C{transport} is open for writing and
    holds nothing to write (the test its C{doWrite} makes), so bytes may go
    to its socket at once without passing any.
    """
    try:
        return (transport.connected and not transport.disconnecting and not transport._aborting
                and not transport._writeDisconnected and not transport._tempDataLen
                and transport.offset == len(transport.dataBuffer))
    except AttributeError:
        # A Twisted whose transport keeps its queue otherwise: queue.
        return False


class TurnTLSFactory(TLSMemoryBIOFactory):
    """
    TLS over L{TurnTLSProtocol}: the writes of all its connections are
    flushed together when a reactor turn ends.
    """

    protocol = TurnTLSProtocol

    def __init__(self, contextFactory, isClient: bool, wrappedFactory, clock=None):
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        self.turn = turn_writes(self._clock)

    def unregisterProtocol(self, p):
        # Once per connection, however often its connectionLost runs.
        self.protocols.pop(p, None)


@implementer(IStreamClientEndpoint)
class TurnTLSClientEndpoint:
    """
    Twisted's C{wrapClientTLS(options, endpoint)}, with TLS from
    L{TurnTLSFactory}: C{connect} gives the application's protocol.
    """

    def __init__(self, options, endpoint, clock=None):
        self._options = options
        self._endpoint = endpoint
        self._clock = clock

    def connect(self, factory):
        tls = TurnTLSFactory(self._options, True, factory, self._clock)
        return self._endpoint.connect(tls).addCallback(operator.attrgetter("wrappedProtocol"))
