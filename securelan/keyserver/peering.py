# -*- test-case-name: tests.test_peering -*-
"""
NETKEY agreement between the key servers of two subnets (the seed's
layer-3 port: key servers exchange NETKEY and must verify that the other
really is a legitimate key server).

Each link between two subnets has its own NETKEY, so a compromised subnet
exposes only its own links.  Of the two key servers, the one whose subnet
name sorts first is the link's I{leader}: it makes the NETKEY (and every
later epoch of it) and listens; the other, the I{follower}, connects to it
over mutual TLS 1.3 and keeps the connection open, over which either side
tells the other what changed.  A NETKEY lives in memory only: a restarted
leader makes a new one, above the epoch the follower last held.

Trust is per peer and by configuration only: a peer's key server must
present a certificate that chains to I{that} peer's CA and carries I{that}
peer's DNS name (checked with service-identity), and must then name that
peer's subnet.  Anything else (another CA, a valid certificate with a name
not listed) is refused and logged.

Besides the NETKEY the two key servers exchange their I{sides}: the
prefixes behind their border, the border's member ID, its WAN endpoint and
incarnation.  The border of each subnet fetches the result (L{NetLink}s)
from its own key server and is pushed every change.
"""

import ipaddress

import attrs
import service_identity
from OpenSSL import crypto
from service_identity.cryptography import verify_certificate_hostname
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, serverFromString, wrapClientTLS
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet._sslverify import TLSVersion
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from ..logs import logger
from .. import PROTOCOL_VERSION
from ..client import close_unprepared
from ..addresses import AddressError, check_member_id, parse_host_port
from ..config import NetKeyConfig, NetKeyPeer
from ..errors import BadRequest, NotPermitted, VersionMismatch
from ..keys import SecretKey
from ..protocol import NetLink, PeerHello, PeerNetKey, PeerSide, Ping, QuietAMP
from .connections import ConnectionLimit
from ..tls import EXPECTED_GROUP, TLSConfigError, describe_tls_failure, negotiated_group, peer_certificate

log = logger("securelan.peering")

#: Prefixes one peer may announce, at most; NETKEY epochs stay below this.
MAX_PREFIXES = 256
MAX_EPOCH = 2**32 - 1


def load_peer_ca(peer: NetKeyPeer) -> ssl.Certificate:
    """
    The CA certificate of a peer subnet, from its file.

    @raise TLSConfigError: naming the file.
    """
    try:
        with open(peer.ca, "rb") as f:
            return ssl.Certificate.loadPEM(f.read())
    except OSError as e:
        raise TLSConfigError(f"{peer.ca}: cannot read the CA of subnet {peer.subnet}: {e.strerror}") from None
    except Exception:
        raise TLSConfigError(f"{peer.ca}: not a PEM certificate (CA of subnet {peer.subnet})") from None


@attrs.define(eq=False)
class _Link:
    """
    What this key server knows of one link.
    """

    peer: NetKeyPeer
    ca: ssl.Certificate
    #: The peer's side (a dict of PeerSide's fields), once it told us.
    side: dict | None = None
    key: SecretKey | None = attrs.field(default=None, repr=False)
    epoch: int = 0
    created_at: float = 0.0
    #: The connection to the peer's key server, while there is one.
    protocol: object = None


class NetKeyBroker:
    """
    This key server's links to its peer subnets.

    @param on_change: called with no argument whenever what the border
        should hold changed (it is pushed the links again).
    """

    def __init__(self, subnet: str, config: NetKeyConfig, credentials, clock,
                 keygen=SecretKey.generate, on_change=None):
        self.subnet = subnet
        self.config = config
        self.credentials = credentials
        self.clock = clock
        self.keygen = keygen
        self.on_change = on_change or (lambda: None)
        self.border_incarnation = 0
        self.links = {p.subnet: _Link(peer=p, ca=load_peer_ca(p)) for p in config.peers}
        #: Counters for status and tests: refused key servers, rekeys.
        self.refused = 0
        self.rekeys = 0

    def leads(self, peer_subnet: str) -> bool:
        """
        Whether this key server makes the NETKEY of the link to C{peer_subnet}.
        """
        return self.subnet < peer_subnet

    # Sides ---------------------------------------------------------------

    def own_side(self) -> dict:
        c = self.config
        return {"subnet": self.subnet, "prefixes": list(c.prefixes), "border": c.border,
                "border_endpoint": c.border_endpoint, "border_incarnation": self.border_incarnation}

    def border_registered(self, incarnation: int):
        """
        This subnet's border registered: when its incarnation is new, every
        peer must know (their borders send to it with that incarnation).
        """
        if incarnation == self.border_incarnation:
            return
        self.border_incarnation = incarnation
        for link in self.links.values():
            if link.protocol is not None:
                link.protocol.callRemote(PeerSide, **self.own_side()).addErrback(
                    lambda f, s=link.peer.subnet: log.info("telling subnet {peer} of our border failed: "
                                                           "{reason}", peer=s, reason=f.getErrorMessage()))

    def _check_side(self, link, side):
        """
        A peer's side, checked field by field: what a peer key server says
        must not break this subnet's other links (its border derives keys
        from these fields).
        """
        if side["subnet"] != link.peer.subnet:
            raise NotPermitted(f"the key server of subnet {link.peer.subnet} speaks for {side['subnet']!r}")
        if len(side["prefixes"]) > MAX_PREFIXES:
            raise BadRequest(f"at most {MAX_PREFIXES} prefixes")
        prefixes = []
        for text in side["prefixes"]:
            try:
                prefixes.append(str(ipaddress.ip_network(text, strict=True)))
            except ValueError:
                raise BadRequest(f"{text!r} is not a network") from None
        try:
            check_member_id(side["border"])
            parse_host_port(side["border_endpoint"])
        except AddressError as e:
            raise BadRequest(str(e)) from None
        if not 0 <= side["border_incarnation"] < 2**31:
            raise BadRequest(f"incarnation {side['border_incarnation']} is out of range")
        return dict(side, prefixes=prefixes)

    def side_received(self, link, side, notify=True):
        """
        Take a peer's side; say whether it changed (and, with C{notify},
        tell the border).
        """
        side = self._check_side(link, side)
        if side == link.side:
            return False
        link.side = side
        log.info("subnet {peer}: border {border} at {endpoint} (incarnation {incarnation}), "
                 "prefixes {prefixes}", peer=link.peer.subnet, border=side["border"],
                 endpoint=side["border_endpoint"], incarnation=side["border_incarnation"],
                 prefixes=", ".join(side["prefixes"]) or "none")
        if notify:
            self.on_change()
        return True

    # The NETKEY ----------------------------------------------------------

    def _new_key(self, link, epoch):
        link.key = self.keygen()
        link.epoch = epoch
        link.created_at = self.clock.seconds()
        log.info("new NETKEY for subnets ({a}, {b}), epoch {epoch}",
                 a=min(self.subnet, link.peer.subnet), b=max(self.subnet, link.peer.subnet), epoch=epoch)

    def hello(self, link, side, known_epoch):
        """
        Leader: the follower said hello; fire with our side and the NETKEY.
        """
        if known_epoch < 0 or known_epoch >= MAX_EPOCH:
            raise BadRequest(f"epoch {known_epoch} is out of range")
        changed = self.side_received(link, side, notify=False)
        if link.key is None or known_epoch != link.epoch:
            # A restarted leader (no key), or a follower that lost what it
            # held: a new epoch above both, so that no epoch ever names two
            # keys and nobody takes up a key it used before from scratch.
            self._new_key(link, max(known_epoch, link.epoch) + 1)
            changed = True
        if changed:
            self.on_change()
        return dict(self.own_side(), key=link.key, epoch=link.epoch)

    def netkey_received(self, link, key, epoch, notify=True):
        """
        Follower: the leader made a new NETKEY.  Epochs only go up; say
        whether it was taken.
        """
        if not 0 < epoch < MAX_EPOCH:
            raise BadRequest(f"epoch {epoch} is out of range")
        if epoch <= link.epoch and link.key is not None:
            if epoch < link.epoch or key != link.key:
                log.warn("subnet {peer} sent NETKEY epoch {epoch}, not above {held}: ignored",
                         peer=link.peer.subnet, epoch=epoch, held=link.epoch)
            return False
        link.key, link.epoch, link.created_at = key, epoch, self.clock.seconds()
        log.info("NETKEY with subnet {peer} is now epoch {epoch}", peer=link.peer.subnet, epoch=epoch)
        if notify:
            self.on_change()
        return True

    def rekey(self, peer_subnet: str):
        """
        Leader: replace the NETKEY of the link with C{peer_subnet} and tell
        the follower and our border.  Fires when the follower has it (or
        at once when it is not connected: it gets it on its next hello).
        """
        link = self.links[peer_subnet]
        if not self.leads(peer_subnet):
            raise NotPermitted(f"the key server of subnet {peer_subnet} makes that NETKEY")
        if link.epoch + 1 >= MAX_EPOCH:
            raise BadRequest("the NETKEY's epochs are used up")
        self._new_key(link, link.epoch + 1)
        self.rekeys += 1
        self.on_change()
        if link.protocol is None:
            return defer.succeed(None)
        return link.protocol.callRemote(PeerNetKey, key=link.key, epoch=link.epoch)

    def rekey_due(self):
        """
        Leader: rekey every link whose NETKEY outlived C{lifetime}.
        """
        lifetime = self.config.lifetime
        now = self.clock.seconds()
        for subnet, link in self.links.items():
            if lifetime and self.leads(subnet) and link.key is not None and link.created_at + lifetime <= now:
                self.rekey(subnet).addErrback(
                    lambda f, s=subnet: log.info("NETKEY rekey with {peer}: {reason}", peer=s,
                                                 reason=f.getErrorMessage()))

    # What the border holds -----------------------------------------------

    def net_links(self) -> list:
        """
        Every link the border can use: the peer's side is known and a
        NETKEY agreed.
        """
        links = []
        for subnet in sorted(self.links):
            link = self.links[subnet]
            if link.side is None or link.key is None:
                continue
            side = link.side
            links.append(NetLink(subnet=subnet, border=side["border"], endpoint=side["border_endpoint"],
                                 incarnation=side["border_incarnation"], prefixes=side["prefixes"],
                                 local_prefixes=self.config.prefixes, key=link.key, epoch=link.epoch))
        return links

    def status(self) -> list:
        now = self.clock.seconds()
        return [{"subnet": s, "role": "leader" if self.leads(s) else "follower",
                 "connected": link.protocol is not None, "epoch": link.epoch,
                 "age": int(now - link.created_at) if link.key is not None else None,
                 "next_rekey": (int(link.created_at + self.config.lifetime - now)
                                if link.key is not None and self.config.lifetime and self.leads(s) else None),
                 "fingerprint": link.key.fingerprint if link.key is not None else None,
                 "border": (link.side or {}).get("border"), "prefixes": (link.side or {}).get("prefixes", [])}
                for s, link in sorted(self.links.items())]

    # Who is calling ------------------------------------------------------

    def identify(self, cert) -> _Link | None:
        """
        The link whose peer key server presented C{cert} (a C{cryptography}
        certificate): it chains to that peer's CA and carries that peer's
        name.  None if no configured peer matches.
        """
        x509 = crypto.X509.from_cryptography(cert)
        for link in self.links.values():
            store = crypto.X509Store()
            store.add_cert(link.ca.original)
            try:
                crypto.X509StoreContext(store, x509).verify_certificate()
                verify_certificate_hostname(cert, link.peer.name)
            except (crypto.X509StoreContextError, service_identity.VerificationError,
                    service_identity.CertificateError, ValueError):
                # ValueError: a SAN that service-identity cannot parse (a
                # member certificate's URIs), so not a key server's.
                continue
            return link
        return None

    def server_options(self):
        """
        TLS for the peering listener: our key server certificate; peers'
        certificates must chain to one of the peer CAs.
        """
        own = self.credentials.own
        return ssl.CertificateOptions(
            privateKey=own.privateKey.original, certificate=own.original,
            trustRoot=ssl.trustRootFromCertificates([link.ca for link in self.links.values()]),
            raiseMinimumTo=TLSVersion.TLSv1_3)

    def client_options(self, link):
        """
        TLS to the leader of C{link}: its certificate must chain to its
        subnet's CA and carry its configured name.
        """
        return ssl.optionsForClientTLS(
            link.peer.name, trustRoot=ssl.trustRootFromCertificates([link.ca]),
            clientCertificate=self.credentials.own,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3})


#: Seconds a peer key server has to complete TLS and say hello; seconds a
#: link's connection may stay silent (the follower pings every
#: L{PING_INTERVAL}); and how long a ping may go unanswered.
HELLO_TIMEOUT = 15.0
IDLE_TIMEOUT = 120.0
PING_INTERVAL = 30.0
PING_TIMEOUT = 10.0


@implementer(IHandshakeListener)
class PeerProtocol(TimeoutMixin, QuietAMP):
    """
    One connection between two key servers, either end.  On the leader's
    end nothing is answered before the TLS handshake identified a
    configured peer; on the follower's end TLS itself checked the leader
    (its CA, its name) and L{say_hello} says hello.  A connection that has
    not said hello within L{HELLO_TIMEOUT}, or stays silent for
    L{IDLE_TIMEOUT}, is closed.
    """

    def __init__(self, broker: NetKeyBroker, link=None):
        super().__init__()
        self.broker = broker
        self.callLater = broker.clock.callLater
        #: Known from the start on the follower's end; found from the
        #: certificate on the leader's.
        self.link = link
        self._refused = False
        self._peer = "?"

    def makeConnection(self, transport):
        peer = transport.getPeer()
        self._peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self.setTimeout(HELLO_TIMEOUT)
        super().makeConnection(transport)

    def timeoutConnection(self):
        log.info("closed connection with key server at {peer}: {what}", peer=self._peer,
                 what="silent" if self.link is not None and self.link.protocol is self else "no hello in time")
        self._refused = True
        self.transport.abortConnection()

    def hello_done(self):
        self.setTimeout(IDLE_TIMEOUT)

    def _refuse(self, why):
        self.broker.refused += 1
        log.warn("refused key server at {peer}: {why}", peer=self._peer, why=why)
        self._refused = True
        self.transport.abortConnection()

    def handshakeCompleted(self):
        group = negotiated_group(self.transport)
        if group != EXPECTED_GROUP:
            return self._refuse(f"key exchange {group} is not {EXPECTED_GROUP}")
        if self.link is not None:
            return
        cert = peer_certificate(self.transport)
        link = self.broker.identify(cert) if cert is not None else None
        if link is None:
            names = []
            if cert is not None:
                from ..pki import keyserver_names

                try:
                    names = keyserver_names(cert)
                except Exception:
                    names = []
            return self._refuse(f"its certificate ({', '.join(names) or 'no DNS name'}) is not that of "
                                "a configured peer subnet's key server")
        if not self.broker.leads(link.peer.subnet):
            return self._refuse(f"subnet {link.peer.subnet} sorts first, so its key server leads: "
                                "this one connects to it, not the other way")
        self.link = link

    def connectionLost(self, reason):
        self.setTimeout(None)
        link = self.link
        if link is not None and link.protocol is self:
            link.protocol = None
            log.info("connection with the key server of subnet {peer} closed", peer=link.peer.subnet)
        elif link is None and not self._refused and not reason.check(ConnectionDone):
            self.broker.refused += 1
            log.warn("TLS handshake from key server at {peer} refused: {reason}", peer=self._peer,
                     reason=describe_tls_failure(reason))
        super().connectionLost(reason)

    def _identified(self):
        if self.link is None:
            raise NotPermitted("not an identified peer key server")
        return self.link

    def ampBoxReceived(self, box):
        if self._refused:
            return
        self.resetTimeout()
        try:
            super().ampBoxReceived(box)
        except Exception as e:
            log.info("closed connection with key server at {peer}: malformed message ({error})",
                     peer=self._peer, error=e.__class__.__name__)
            self._refused = True
            self.transport.abortConnection()

    @PeerHello.responder
    def hello(self, version, known_epoch, **side):
        link = self._identified()
        if not self.broker.leads(link.peer.subnet):
            # Only the leader's end answers hellos: a follower that did
            # would make a second NETKEY for the link.
            raise NotPermitted(f"subnet {link.peer.subnet} leads that link; this key server says hello")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(f"this key server speaks protocol version {PROTOCOL_VERSION}")
        answer = self.broker.hello(link, side, known_epoch)
        if link.protocol is not None and link.protocol is not self:
            link.protocol.transport.loseConnection()
        link.protocol = self
        self.hello_done()
        log.info("key server of subnet {peer} connected from {address}", peer=link.peer.subnet,
                 address=self._peer)
        return answer

    @Ping.responder
    def ping(self):
        self._identified()
        return {}

    @PeerSide.responder
    def side(self, **side):
        self.broker.side_received(self._identified(), side)
        return {}

    @PeerNetKey.responder
    def netkey(self, key, epoch):
        link = self._identified()
        if self.broker.leads(link.peer.subnet):
            raise NotPermitted("this key server makes that NETKEY")
        self.broker.netkey_received(link, key, epoch)
        return {}


class PeeringFactory(Factory):
    """
    The leader's listener: one L{PeerProtocol} per connection, inside TLS.
    """

    def __init__(self, broker):
        self.broker = broker

    def buildProtocol(self, addr):
        protocol = PeerProtocol(self.broker)
        protocol.factory = self
        return protocol


def say_hello(protocol, broker, link):
    """
    Follower: introduce ourselves on a new connection to the leader; fires
    when the leader's side and NETKEY are taken in.
    """
    d = protocol.callRemote(PeerHello, version=PROTOCOL_VERSION, known_epoch=link.epoch,
                            **broker.own_side())

    def answered(answer):
        # The handshake is over once the leader has answered.
        group = negotiated_group(protocol.transport)
        if group != EXPECTED_GROUP:
            raise ConnectionAborted(f"key exchange {group} is not {EXPECTED_GROUP}")
        key, epoch = answer.pop("key"), answer.pop("epoch")
        # ClientService hands over a proxy; the connection's own protocol
        # is what reports its loss.
        link.protocol = getattr(protocol, "_protocol", protocol)
        link.protocol.hello_done()
        # Both first, then the border hears once: a link with a side but
        # not yet a key would be pushed as no link at all.
        changed = broker.side_received(link, answer, notify=False)
        changed = broker.netkey_received(link, key, epoch, notify=False) or changed
        if changed:
            broker.on_change()
        log.info("connected to the key server of subnet {peer}", peer=link.peer.subnet)

    def failed(failure):
        log.warn("the key server of subnet {peer} refused us: {reason}", peer=link.peer.subnet,
                 reason=failure.getErrorMessage())
        close_unprepared(protocol)
        return failure

    return d.addCallback(answered).addErrback(failed)


#: Connections the peering listener holds at most, in all and from one
#: address (a peer needs one).
MAX_PEER_CONNECTIONS = 64
MAX_PEER_CONNECTIONS_PER_SOURCE = 4


class PeeringService(service.MultiService):
    """
    The key server's peering: the listener (for links it leads) and one
    reconnecting connection per link it follows.
    """

    def __init__(self, broker: NetKeyBroker, reactor):
        super().__init__()
        self.broker = broker
        self.reactor = reactor
        self.port = None
        self._pinger = None
        self._connectors = []
        for subnet, link in sorted(broker.links.items()):
            if broker.leads(subnet):
                continue
            endpoint = wrapClientTLS(broker.client_options(link),
                                     HostnameEndpoint(reactor, link.peer.host, link.peer.port))
            client = ClientService(
                endpoint, Factory.forProtocol(lambda link=link: PeerProtocol(broker, link)),
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0), clock=reactor,
                prepareConnection=lambda p, link=link: say_hello(p, broker, link))
            client.setServiceParent(self)
            self._connectors.append(client)

    def ping(self):
        """
        Follower: ping the leader of every link; a connection whose ping is
        not answered in L{PING_TIMEOUT} is dropped (and made again).
        """
        for subnet, link in self.broker.links.items():
            protocol = link.protocol
            if protocol is None or self.broker.leads(subnet):
                continue
            timer = self.reactor.callLater(PING_TIMEOUT, protocol.transport.abortConnection)
            d = protocol.callRemote(Ping)
            d.addBoth(lambda result, timer=timer: timer.cancel() if timer.active() else None)

    def startService(self):
        super().startService()
        if any(not self.broker.leads(s) for s in self.broker.links):
            self._pinger = LoopingCall(self.ping)
            self._pinger.clock = self.reactor
            self._pinger.start(PING_INTERVAL, now=False)
        if self.broker.config.listen:
            # A few connections per address: peers need one each.
            tls = ConnectionLimit(
                TLSMemoryBIOFactory(self.broker.server_options(), False, PeeringFactory(self.broker)),
                MAX_PEER_CONNECTIONS, MAX_PEER_CONNECTIONS_PER_SOURCE, rate=1.0, burst=10, clock=self.reactor)
            d = serverFromString(self.reactor, self.broker.config.listen).listen(tls)

            def listening(port):
                self.port = port
                log.info("NETKEY peering listening on {address}", address=port.getHost())
                return port

            return d.addCallback(listening)

    def stopService(self):
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        d = super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.gatherResults([defer.maybeDeferred(port.stopListening), d or defer.succeed(None)])
        return d
