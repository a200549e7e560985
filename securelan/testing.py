"""
Fakes and fixtures that securelan's tests share.

They ship inside the package (as txtorcon's C{testutil} does) so that tests of
every module, and tests of code built on securelan, use one set of them.
"""

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from . import pki
from ._interfaces import ICarrier, IDevice, IKeyListener

# PKI fixtures


@attrs.define
class TestPKI:
    """
    A small subnet PKI on disk: a CA, one key server and some members.  Every
    path is a file name; C{members} maps a member ID to its certificate and
    key paths.
    """

    # not a test case, whatever test collectors infer from the name
    __test__ = False

    directory: str
    ca_cert: str
    ca_key: str
    keyserver_cert: str
    keyserver_key: str
    members: dict[str, tuple[str, str]] = attrs.Factory(dict)
    days: int = 30

    def add_member(self, member_id: str, macs=(), roles=("client",)) -> tuple[str, str]:
        """
        Issue a certificate to another member and record it in C{members}.

        @param macs: MACs in text form, such as C{"02:00:00:00:00:01"}.
        @return: the paths of the certificate and of the key.
        """
        paths = pki.issue_member(
            self.directory,
            member_id,
            days=self.days,
            macs=macs,
            roles=roles,
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
        )
        self.members[member_id] = paths
        return paths


def make_pki(
    directory: str,
    subnet: str = "test",
    keyserver_name: str = "keyserver.test",
    members=("alice", "bob", "carol"),
    days: int = 30,
) -> TestPKI:
    """
    Make a L{TestPKI} in C{directory}: a CA for C{subnet}, a key server named
    C{keyserver_name}, and a client certificate (any MAC) for each of
    C{members}.
    """
    ca_cert, ca_key = pki.create_ca(directory, subnet, days=days)
    keyserver_cert, keyserver_key = pki.issue_keyserver(
        directory, keyserver_name, days=days, ca_cert=ca_cert, ca_key=ca_key
    )
    result = TestPKI(
        directory=directory,
        ca_cert=ca_cert,
        ca_key=ca_key,
        keyserver_cert=keyserver_cert,
        keyserver_key=keyserver_key,
        days=days,
    )
    for member_id in members:
        result.add_member(member_id)
    return result


# A whole subnet in memory (the analogue of Tahoe-LAFS's no_network): a key
# server on an in-memory store and members connected to it over real TLS
# (TLSMemoryBIOFactory) through iosim's in-memory transports.


@attrs.define
class MemoryConnection:
    """
    One member's control connection inside a L{MemorySubnet}.

    @ivar client: the member's L{securelan.client.AgentProtocol}.
    @ivar session: the key server's L{MemberSession}.
    """

    __test__ = False

    client: object
    session: object
    client_tls: object
    server_tls: object
    pump: object

    def call(self, command, **kw):
        """
        Send C{command} from the member and move bytes until it is answered.
        """
        return self.run(self.client.callRemote(command, **kw))

    def run(self, d):
        """
        Move bytes until there is nothing left to move; return a Deferred
        with C{d}'s outcome.

        AMP treats a failure that reaches the end of a command's Deferred
        when the answer arrives as unhandled and drops the connection, so
        C{d}'s outcome is taken before the answer is let in.
        """
        outcome = []
        d.addBoth(outcome.append)
        self.pump.flush()
        if not outcome:
            return defer.Deferred()
        if isinstance(outcome[0], Failure):
            return defer.fail(outcome[0])
        return defer.succeed(outcome[0])

    @property
    def connected(self):
        return not self.client_tls.disconnected and not self.server_tls.disconnected


@implementer(IKeyListener)
@attrs.define
class RecordingListener:
    """
    An L{IKeyListener} that remembers what it was told.
    """

    __test__ = False

    events: list = attrs.Factory(list)

    def registered(self, admission):
        self.events.append(("registered", admission))

    def pair_key_pushed(self, grant):
        self.events.append(("pair_key", grant))

    def group_key_pushed(self, grant):
        self.events.append(("group_key", grant))

    def purged(self, peer_id, reason):
        self.events.append(("purge", peer_id, reason))

    def net_links_pushed(self, links):
        self.events.append(("net_links", links))

    def routes_pushed(self, routes):
        self.events.append(("routes", routes))


class MemorySubnet:
    """
    A key server and its members in memory, over real TLS 1.3 with the
    certificates of a L{TestPKI}.  Synchronous: everything happens when the
    pump is flushed, and time passes only through C{clock}.
    """

    __test__ = False

    def __init__(self, directory, members=("alice", "bob", "carol"), limits=None,
                 keygen=None, store=None):
        from twisted.internet.task import Clock

        from .config import Limits
        from .keyserver.server import KeyServer, KeyServerFactory
        from .store import SQLiteStore, run_synchronously
        from .tls import Credentials

        self.pki = make_pki(directory, members=members)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        if store is None:
            store = SQLiteStore(":memory:", None, runner=run_synchronously, clock=self.clock)
            store.open()
        self.store = store
        kw = {} if keygen is None else {"keygen": keygen}
        self.server = KeyServer(subnet="test", store=store, clock=self.clock,
                                limits=limits or Limits(), **kw)
        self.server.start()
        self.credentials = Credentials.load(self.pki.ca_cert, self.pki.keyserver_cert,
                                            self.pki.keyserver_key)
        self._listen(KeyServerFactory(self.server))
        self._next_port = 40000
        self.connections = []

    def restart(self, store):
        """
        Replace the key server by a new one on C{store} (already open), as a
        restarted process would be.  Existing connections keep talking to
        the old one.
        """
        from .keyserver.server import KeyServer, KeyServerFactory

        self.store = store
        self.server = KeyServer(subnet="test", store=store, clock=self.clock,
                                limits=self.server.limits, keygen=self.server.keygen)
        self.server.start()
        self._listen(KeyServerFactory(self.server))

    def _listen(self, factory):
        # The key server's own listener stack, as the twistd plugin builds
        # it; one for all connections, so their writes share each turn.
        from .keyserver.connections import MemberTLSFactory, SourceLimits

        self.tls_factory = MemberTLSFactory(self.credentials.server_options(), factory,
                                            SourceLimits(1_000_000), clock=self.clock)

    def member_credentials(self, member_id):
        from .tls import Credentials

        cert, key = self.pki.members[member_id]
        return Credentials.load(self.pki.ca_cert, cert, key)

    def connect(self, member_id=None, listener=None, credentials=None,
                server_name="keyserver.test", client_options=None):
        """
        Open a control connection for C{member_id} (or with C{credentials},
        or raw C{client_options}) and complete the TLS handshake.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test import iosim

        from .client import AgentProtocol

        if client_options is None:
            credentials = credentials or self.member_credentials(member_id)
            client_options = credentials.client_options(server_name)
        client_factory = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(lambda: AgentProtocol(listener)),
            clock=self.clock,
        )
        server_factory = self.tls_factory
        self._next_port += 1
        member_address = IPv4Address("TCP", "127.0.0.1", self._next_port)
        server_address = IPv4Address("TCP", "127.0.0.1", 7443)
        client_tls, server_tls, pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(member_address),
            lambda: client_factory.buildProtocol(server_address),
            clientTransportFactory=lambda p: iosim.FakeTransport(
                p, False, hostAddress=member_address, peerAddress=server_address),
            serverTransportFactory=lambda p: iosim.FakeTransport(
                p, True, hostAddress=server_address, peerAddress=member_address),
            clock=self.clock,
        )
        conn = MemoryConnection(
            client=client_tls.wrappedProtocol,
            session=server_tls.wrappedProtocol,
            client_tls=client_tls,
            server_tls=server_tls,
            pump=pump,
        )
        self.connections.append(conn)
        return conn

    def flush(self):
        """
        Move bytes on every connection until all are quiet (pushes included).
        """
        moved = True
        while moved:
            moved = False
            for conn in self.connections:
                moved = conn.pump.pump() or moved

    def join(self, member_id, mac, role="client", endpoint=":4789", listener=None, addresses=()):
        """
        Connect C{member_id} and register C{mac} (and, at layer 3, its
        overlay C{addresses}); return the connection and the L{Admission}.
        Raises what the key server refused with.
        """
        from .client import register

        conn = self.connect(member_id, listener=listener)
        outcome = []
        conn.run(register(conn.client, mac, role, endpoint, addresses=addresses)).addBoth(outcome.append)
        if not outcome:
            raise AssertionError("register was not answered")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return conn, outcome[0]


class LogCapture:
    """
    Collects every event of the global log publisher while it is installed:
    C{with LogCapture() as logs: ...}, then C{logs.lines()}.
    """

    __test__ = False

    def __init__(self):
        self.events = []

    def __enter__(self):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self.events.append)
        return False

    def lines(self):
        """
        Every event formatted as an operator would read it, with any
        traceback, plus the repr of the event's own fields.
        """
        from twisted.logger import formatEvent

        out = []
        for event in self.events:
            out.append(formatEvent(event))
            if "log_failure" in event:
                out.append(event["log_failure"].getTraceback())
            out.append(repr({k: v for k, v in event.items() if k != "log_logger"}))
        return out


# The data plane in memory: carriers on a shared in-memory LAN, devices that
# record what the host would receive, and a key-server adapter over a
# MemorySubnet connection.


class MemoryLAN:
    """
    A LAN of L{MemoryCarrier}s.  Datagrams wait on the wire until L{flush};
    C{wire} keeps every datagram ever sent, as a capture would.
    """

    __test__ = False

    def __init__(self):
        self.carriers = {}
        self.queue = []
        self.wire = []

    def carrier(self, host, port=4789, max_datagram=1472):
        return MemoryCarrier(self, (host, port), max_datagram)

    def transmit(self, datagram, source, destination):
        self.wire.append((source, destination, bytes(datagram)))
        self.queue.append((source, destination, bytes(datagram)))

    def inject(self, datagram, source, destination):
        """
        Put a datagram on the wire as an attacker would.
        """
        self.transmit(datagram, source, destination)

    def flush(self, limit=100000):
        """
        Deliver datagrams until none are left (including those sent in
        response).  Returns how many were delivered.
        """
        delivered = 0
        while self.queue and delivered < limit:
            source, destination, datagram = self.queue.pop(0)
            carrier = self.carriers.get(destination)
            if carrier is not None and carrier.receiver is not None:
                carrier.receiver((datagram,), source)
            delivered += 1
        return delivered


@implementer(ICarrier)
class MemoryCarrier:
    """
    A UDP-like carrier on a L{MemoryLAN}: endpoints are ``(host, port)``.
    """

    __test__ = False
    name = "memory"
    can_broadcast = False
    pieces_per_send = None

    def __init__(self, lan, address, max_datagram):
        self.lan = lan
        self.address = address
        self.max_datagram = max_datagram
        self.endpoint = f"{address[0]}:{address[1]}"
        self.receiver = None
        #: What C{send_parts} holds back until L{flush}: (datagram, endpoint).
        self.held = []

    def start(self, receiver):
        self.receiver = receiver
        self.lan.carriers[self.address] = self

    def stop(self):
        self.lan.carriers.pop(self.address, None)

    def parse_endpoint(self, text):
        from .agent.carriers import parse_udp_endpoint

        return parse_udp_endpoint(text)

    def send(self, datagrams, endpoint):
        self.flush()
        for datagram in datagrams:
            self.lan.transmit(datagram, self.address, endpoint)

    def send_parts(self, parts, endpoint, hold=False):
        datagrams = list(map(bytes.__add__, parts[0::2], parts[1::2]))
        if hold and len(datagrams) == 1:
            self.held.append((datagrams[0], endpoint))
            return
        self.send(datagrams, endpoint)

    def send_train(self, train, endpoint):
        self.send(list(map(bytes, train)), endpoint)

    def flush(self):
        held, self.held = self.held, []
        for datagram, endpoint in held:
            self.lan.transmit(datagram, self.address, endpoint)

    def broadcast(self, datagrams, endpoints):
        for endpoint in endpoints:
            self.send(datagrams, endpoint)


class FakeDeviceSystem:
    """
    The operating system as L{securelan.agent.device.TapDevice} uses it
    (the C{system} argument), in memory: it records the ioctls, the C{ip}
    commands and the writes, and serves C{to_read} to reads.  An C{ip}
    command with a word in C{refuse} fails as an older iproute2 would.
    """

    __test__ = False

    def __init__(self, refuse=()):
        self.refuse = set(refuse)
        self.ioctls = []
        self.ip_calls = []
        self.written = []
        self.to_read = []
        self.closed = []

    def open(self, path, flags):
        return 7

    def ioctl(self, fd, request, arg):
        self.ioctls.append((request, arg))

    def read(self, fd, size):
        if not self.to_read:
            raise BlockingIOError()
        return self.to_read.pop(0)[:size]

    def write(self, fd, data):
        self.written.append(bytes(data))
        return len(data)

    def close(self, fd):
        self.closed.append(fd)

    def ip(self, args):
        from .agent.device import DeviceError

        self.ip_calls.append(list(args))
        if self.refuse & set(args):
            raise DeviceError(f"ip {' '.join(args)}: Error: either \"dev\" is duplicate, or \"{args[-2]}\" is a garbage.")


@implementer(IDevice)
class MemoryDevice:
    """
    A TAP device in memory: C{written} holds what the host received
    (frames; C{offloads} the virtio-net headers of those that had one);
    L{send} is the host sending a frame.
    """

    __test__ = False

    def __init__(self, name="slan0", mac=b"\x02\0\0\0\0\x01", mtu=1422, addresses=(), reactor=None):
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.addresses = addresses
        self.written = []
        self.offloads = []
        self.receiver = None
        self.flush = None
        self.full = False

    def start(self, receiver, flush=None):
        self.receiver = receiver
        self.flush = flush

    def send(self, frame, offload=None):
        self.send_batch([(frame, offload)])

    def send_batch(self, frames):
        """
        The host sends C{frames} (C{(frame, offload)} pairs), read in one go.
        """
        for frame, offload in frames:
            self.receiver(frame, offload)
        if self.flush is not None:
            self.flush()

    def write(self, frame, offload=False):
        if self.full:
            return False
        if offload:
            self.offloads.append(bytes(frame[:10]))
            frame = frame[10:]
        self.written.append(bytes(frame))
        return True

    def stop(self):
        self.receiver = None


class MemoryKeys:
    """
    What a L{DataPlane} asks the key server, over a L{MemoryConnection}:
    each request is answered synchronously.  Set C{hold} to keep answers
    back (they are then in C{held}, to be released with L{release}).
    """

    __test__ = False

    def __init__(self, conn):
        self.conn = conn
        self.requests = []
        self.hold = False
        self.held = []

    def _answer(self, make):
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, make))
            return d
        return self.conn.run(make(self.conn.client))

    def release(self):
        held, self.held = self.held, []
        for d, make in held:
            self.conn.run(make(self.conn.client)).chainDeferred(d)

    def request_pair_key(self, mac, epoch=None):
        from .client import request_pair_key

        self.requests.append(mac)
        return self._answer(lambda client: request_pair_key(client, mac, epoch))

    def request_pair_key_by_address(self, address, epoch=None):
        from .client import request_pair_key_by_address

        self.requests.append(address)
        return self._answer(lambda client: request_pair_key_by_address(client, address, epoch))

    def request_rekey(self, peer_id, epoch):
        from .client import request_rekey

        self.requests.append(("rekey", peer_id, epoch))
        return self._answer(lambda client: request_rekey(client, peer_id, epoch))

    def request_group_key(self):
        from .client import request_group_key

        return self._answer(request_group_key)

    def list_peers(self):
        from .client import list_peers

        return self._answer(list_peers)


@implementer(IKeyListener)
class MemoryMember:
    """
    One member in a L{MemorySubnet} with a data plane on a L{MemoryLAN}.
    With C{addresses} (``address/prefix`` strings) it is a layer-3 member:
    its device is a L{Layer3Device} over a TUN device in memory (C{tun}),
    and it registers those addresses.
    """

    __test__ = False

    def __init__(self, net, lan, member_id, mac, host, on_key_miss="queue", role="client", addresses=(),
                 **queue):
        from .agent.dataplane import DataPlane
        from .agent.layer3 import Layer3Device

        self.net = net
        self.member_id = member_id
        self.mac = mac
        self.listener = RecordingListener()
        self.dataplane = None
        # Pushes that arrive while joining, before the data plane exists.
        self._early = []
        self.carrier = lan.carrier(host)
        self.layer3 = None
        if addresses:
            self.tun = MemoryDevice(mac=None, addresses=tuple(addresses))
            self.device = self.layer3 = Layer3Device(
                self.tun, mac, net.clock, resolve=lambda address: self.keys.request_pair_key_by_address(address),
                on_grant=lambda grant: self.dataplane.install_pair_key(grant))
        else:
            self.device = MemoryDevice(mac=mac)
        self.role = role
        overlay = [a.split("/")[0] for a in addresses]
        self.conn, self.admission = net.join(member_id, mac, role=role, endpoint=self.carrier.endpoint,
                                             listener=self, addresses=overlay)
        self.keys = MemoryKeys(self.conn)
        self.dataplane = DataPlane(member_id, mac, self.admission.incarnation, self.keys, self.carrier,
                                   self.device, net.clock, on_key_miss=on_key_miss,
                                   gateway=role == "gateway",
                                   rekey_after_packets=self.admission.rekey_after_packets,
                                   rekey_after_bytes=self.admission.rekey_after_bytes,
                                   on_grant=self.layer3.learn if self.layer3 is not None else None, **queue)
        self.carrier.start(self.dataplane.datagrams_received)
        self.device.start(self._frame, self.dataplane.flush)
        self.dataplane.start()
        for install, grant in self._early:
            getattr(self.dataplane, install)(grant)

    def _frame(self, frame, offload):
        # As ClientRole: held until the device's batch ends.
        self.dataplane.frame_from_device(frame, offload, hold=True)

    # Pushes from the key server go to the data plane, as ClientRole does.
    def registered(self, admission):
        pass

    def _install(self, how, grant):
        if self.dataplane is None:
            self._early.append((how, grant))
        else:
            getattr(self.dataplane, how)(grant)

    #: Set to drop every pair-key push (as if the push never arrived).
    deaf = False

    def pair_key_pushed(self, grant):
        if self.deaf:
            return
        self.listener.pair_key_pushed(grant)
        if self.layer3 is not None and self.dataplane is None:
            self.layer3.learn(grant)
        self._install("install_pair_key", grant)

    def group_key_pushed(self, grant):
        self.listener.group_key_pushed(grant)
        self._install("install_group_key", grant)

    def purged(self, peer_id, reason):
        self.listener.purged(peer_id, reason)
        if self.dataplane is not None:
            self.dataplane.purge(peer_id)

    def net_links_pushed(self, links):
        pass

    def routes_pushed(self, routes):
        pass

    def reconnect(self):
        """
        Connect again (a key server restarted), registering with the
        incarnation in use, as the agent's client does.
        """
        from .client import register

        net = self.net
        self.conn = net.connect(self.member_id, listener=self)
        outcome = []
        self.conn.run(register(self.conn.client, self.mac, self.role, self.carrier.endpoint,
                               self.admission.incarnation)).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            raise AssertionError(f"{self.member_id} could not register again: {outcome}")
        self.keys.conn = self.conn
        # As ClientRole does after every re-registration.
        self.dataplane.refresh_members()
        self.dataplane.announce()
        self.dataplane.recheck()

    def frame(self, dst, payload, ethertype=b"\x08\x00"):
        return dst + self.mac + ethertype + payload

    def send(self, dst, payload, ethertype=b"\x08\x00"):
        """
        The host sends a frame to C{dst} through the device.
        """
        self.device.send(self.frame(dst, payload, ethertype))
