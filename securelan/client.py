# -*- test-case-name: tests.test_client -*-
"""
The member side of the control protocol: what an agent uses to talk to its
key servers.

L{KeyServerClient} keeps one mutually authenticated TLS connection to one of
a list of key servers (trying each in turn, reconnecting with backoff),
registers on every connection, and turns requests into L{PairKeyGrant} and
L{GroupKeyGrant} values.  Pushes from the key server reach an
L{IKeyListener}.
"""

from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from .logs import logger
from . import PROTOCOL_VERSION
from ._interfaces import IKeyListener
from .addresses import KeyServerAddress
from .tls import EXPECTED_GROUP, TurnTLSClientEndpoint, negotiated_group
from .protocol import (
    Admission,
    ListPeers,
    PeerInfo,
    Ping,
    GroupKeyGrant,
    PairKeyGrant,
    PushGroupKey,
    PushPairKey,
    NetLink,
    Purge,
    PushNetLinks,
    PushRoutes,
    QuietAMP,
    Register,
    RequestNetLinks,
    RequestPairKeyByAddress,
    RequestRekey,
    RequestGroupKey,
    RequestPairKey,
)

log = logger("securelan.client")

@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    """
    Connects to the first of several endpoints that answers, starting with
    the one that answered last time.
    """

    def __init__(self, endpoints):
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self.endpoints = list(endpoints)
        self._preferred = 0

    @defer.inlineCallbacks
    def connect(self, protocolFactory):
        count = len(self.endpoints)
        last = None
        for step in range(count):
            index = (self._preferred + step) % count
            try:
                protocol = yield self.endpoints[index].connect(protocolFactory)
            except defer.CancelledError:
                raise
            except Exception as e:
                last = e
                log.info("key server {index} unreachable: {reason}", index=index, reason=str(e))
                continue
            self._preferred = index
            return protocol
        raise last


def close_unprepared(protocol):
    """
    Close a connection whose C{prepareConnection} failed.

    ClientService leaves such a connection open, and its state machine has
    no transition for that connection's later loss (NoTransition in state
    Stopped or Waiting).  Close it without telling the state machine, which
    already counts this attempt as failed.
    """
    if hasattr(protocol, "_lostNotification"):
        protocol._lostNotification = lambda reason: None
    protocol.transport.loseConnection()


class AgentProtocol(QuietAMP):
    """
    The member end of a control connection: answers the key server's pushes.
    """

    def __init__(self, listener=None, on_lost=None):
        super().__init__()
        self.listener = listener
        self._on_lost = on_lost

    def connectionLost(self, reason):
        # Forget this connection before its pending requests fail, so that
        # what their errbacks ask goes to the next connection.
        if self._on_lost is not None:
            self._on_lost(self)
        super().connectionLost(reason)

    @PushPairKey.responder
    def pair_key_pushed(self, **fields):
        if self.listener is not None:
            self.listener.pair_key_pushed(PairKeyGrant(**fields))
        return {}

    @PushGroupKey.responder
    def group_key_pushed(self, **fields):
        if self.listener is not None:
            self.listener.group_key_pushed(GroupKeyGrant(**fields))
        return {}

    @Purge.responder
    def purged(self, peer_id, reason):
        if self.listener is not None:
            self.listener.purged(peer_id, reason)
        return {}

    @PushNetLinks.responder
    def net_links_pushed(self, links):
        if self.listener is not None:
            self.listener.net_links_pushed([NetLink(**link) for link in links])
        return {}

    @PushRoutes.responder
    def routes_pushed(self, routes):
        if self.listener is not None:
            self.listener.routes_pushed(list(routes))
        return {}


def register(protocol, mac: bytes, role: str, endpoint: str, incarnation=None, addresses=()):
    """
    Send C{Register} on C{protocol}; fires with an L{Admission}.
    C{incarnation}: the one this agent already uses, when it reconnects;
    C{addresses}: its overlay IP addresses, in layer-3 mode.
    """
    kw = {} if incarnation is None else {"incarnation": incarnation}
    if addresses:
        kw["addresses"] = list(addresses)
    d = protocol.callRemote(Register, version=PROTOCOL_VERSION, mac=mac, role=role, endpoint=endpoint, **kw)
    return d.addCallback(lambda response: Admission(**response))


def _grant(response) -> PairKeyGrant:
    return PairKeyGrant(**response)


def request_pair_key(protocol, peer_mac: bytes, epoch=None):
    """
    Ask for the pair key with whoever holds C{peer_mac}; fires with a
    L{PairKeyGrant}.
    """
    kw = {} if epoch is None else {"epoch": epoch}
    return RequestPairKey.call(protocol, peer_mac=peer_mac, **kw).addCallback(_grant)


def request_pair_key_by_address(protocol, peer_address: str, epoch=None):
    """
    Layer 3: ask for the pair key with whoever holds the overlay IP
    C{peer_address}; fires with a L{PairKeyGrant}.
    """
    kw = {} if epoch is None else {"epoch": epoch}
    return RequestPairKeyByAddress.call(protocol, peer_address=peer_address, **kw).addCallback(_grant)


def request_rekey(protocol, peer_id: str, epoch: int):
    """
    Ask for the next epoch of the key shared with C{peer_id} (a packet or
    byte limit was reached); fires with the pair's epoch.
    """
    d = protocol.callRemote(RequestRekey, peer_id=peer_id, epoch=epoch)
    return d.addCallback(lambda response: response["epoch"])


def request_group_key(protocol):
    """
    Ask for the group key; fires with a L{GroupKeyGrant}.
    """
    d = protocol.callRemote(RequestGroupKey)
    return d.addCallback(lambda response: GroupKeyGrant(**response))


def request_net_links(protocol):
    """
    Ask for this subnet's links to its peer subnets (a border only); fires
    with a list of L{NetLink}.
    """
    d = protocol.callRemote(RequestNetLinks)
    return d.addCallback(lambda response: [NetLink(**link) for link in response["links"]])


@defer.inlineCallbacks
def list_peers(protocol):
    """
    Every other member of the subnet, fetched page by page; fires with a
    list of L{PeerInfo}.
    """
    peers, after, more = [], "", True
    while more:
        page = yield protocol.callRemote(ListPeers, after=after)
        peers.extend(PeerInfo(**p) for p in page["peers"])
        more = page["more"] and bool(page["peers"])
        if peers:
            after = peers[-1].member_id
    return peers


class KeyServerClient(service.Service):
    """
    A member's connection to its subnet's key servers.

    It pings the key server every L{PING_INTERVAL} seconds and drops a
    connection on which a ping or a request is not answered within
    L{REQUEST_TIMEOUT}, so a key server that hangs is failed over from.

    @ivar admission: the last L{Admission}, or None before the first.
    """

    PING_INTERVAL = 30.0
    REQUEST_TIMEOUT = 10.0

    def __init__(self, addresses, credentials, mac: bytes, role: str = "client",
                 endpoint: str = "", listener=None, reactor=None, retry_policy=None, overlay_addresses=()):
        if reactor is None:
            from twisted.internet import reactor
        if listener is not None and not IKeyListener.providedBy(listener):
            raise TypeError("listener must provide IKeyListener")
        self.addresses = [a if isinstance(a, KeyServerAddress) else KeyServerAddress.parse(a)
                          for a in addresses]
        self.mac = mac
        self.role = role
        self.endpoint = endpoint
        #: Layer 3: the member's overlay IP addresses, registered with it.
        self.overlay_addresses = tuple(overlay_addresses)
        self.listener = listener
        self.admission = None
        self._reactor = reactor
        self._protocol = None
        endpoints = [
            TurnTLSClientEndpoint(credentials.client_options(a.name), HostnameEndpoint(reactor, a.host, a.port),
                                  clock=reactor)
            for a in self.addresses
        ]
        self._failover = FailoverEndpoint(endpoints)
        self._client = ClientService(
            self._failover,
            Factory.forProtocol(lambda: AgentProtocol(self.listener, self._lost)),
            retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0),
            clock=reactor,
            prepareConnection=self._register,
        )

    @property
    def current_server(self):
        """
        The L{KeyServerAddress} of the key server this member is registered
        with now, or None.
        """
        if self._protocol is None:
            return None
        return self.addresses[self._failover._preferred]

    def _lost(self, protocol):
        if self._protocol is protocol:
            self._protocol = None

    def _register(self, protocol):
        def admitted(admission):
            # The handshake is over once the key server has answered.
            group = negotiated_group(protocol.transport)
            if group != EXPECTED_GROUP:
                raise ConnectionAborted(f"the key server's key exchange {group} is not {EXPECTED_GROUP}")
            self.admission = admission
            # ClientService hands us a proxy; the connection's own protocol
            # is what reports its loss (_lost).
            self._protocol = getattr(protocol, "_protocol", protocol)
            log.info("registered with subnet {subnet} as {member_id}",
                     subnet=admission.subnet, member_id=admission.member_id)
            if self.listener is not None:
                self.listener.registered(admission)
            return admission

        def refused(failure):
            log.warn("registration refused: {reason}", reason=failure.getErrorMessage())
            close_unprepared(protocol)
            return failure

        # Keep the incarnation of the first admission for the agent's life:
        # its keys are derived with it.
        incarnation = self.admission.incarnation if self.admission is not None else None
        d = register(protocol, self.mac, self.role, self.endpoint, incarnation, self.overlay_addresses)
        self._timeout(d, protocol)
        return d.addCallback(admitted).addErrback(refused)

    def _timeout(self, d, protocol):
        """
        Drop C{protocol}'s connection if C{d} is not answered in time.
        """
        timer = self._reactor.callLater(self.REQUEST_TIMEOUT, self._give_up, protocol)

        def answered(result):
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(answered)

    def _give_up(self, protocol):
        log.warn("key server did not answer in {timeout:g} s: dropping the connection",
                 timeout=self.REQUEST_TIMEOUT)
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def _ping(self):
        protocol = self._protocol
        if protocol is None:
            return
        self._timeout(protocol.callRemote(Ping), protocol).addErrback(
            lambda f: log.info("ping failed: {reason}", reason=f.getErrorMessage()))

    def startService(self):
        super().startService()
        self._client.startService()
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = self._reactor
        self._pinger.start(self.PING_INTERVAL, now=False)

    def stopService(self):
        super().stopService()
        if self._pinger.running:
            self._pinger.stop()
        return self._client.stopService()

    def connected(self, fail_after_failures=None):
        """
        Fires with the registered connection's protocol.
        """
        if self._protocol is not None:
            return defer.succeed(self._protocol)
        # ClientService's state machine may not be re-entered from a callback
        # it is running, so results reach the caller on a later turn.
        d = self._client.whenConnected(failAfterFailures=fail_after_failures)
        later = defer.Deferred()

        def forward(result):
            self._reactor.callLater(0, later.callback, result)

        d.addBoth(forward)
        return later

    def whenRegistered(self):
        """
        Fires with the L{Admission} once registered.
        """
        return self.connected().addCallback(lambda _: self.admission)

    def _ask(self, request, *args):
        def send(protocol):
            return self._timeout(request(protocol, *args), protocol)

        return self.connected(1).addCallback(send)

    def request_pair_key(self, peer_mac: bytes, epoch=None):
        """
        The seed's ``(ID, MAC_2, ?)``; fails at once if no key server can be
        reached now.
        """
        return self._ask(request_pair_key, peer_mac, epoch)

    def request_pair_key_by_address(self, peer_address: str, epoch=None):
        return self._ask(request_pair_key_by_address, peer_address, epoch)

    def request_rekey(self, peer_id: str, epoch: int):
        return self._ask(request_rekey, peer_id, epoch)

    def request_group_key(self):
        return self._ask(request_group_key)

    def list_peers(self):
        return self._ask(list_peers)

    def request_net_links(self):
        return self._ask(request_net_links)
