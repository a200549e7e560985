# -*- test-case-name: tests.test_agent -*-
"""
Agent roles, chosen by the C{role} key of the agent's config.  Each role is
an L{IRole}; L{ROLES} maps role names to them, so a new role (gateway,
border) is a new entry here and touches no other role.
"""

import ipaddress

from twisted.internet.task import LoopingCall
from zope.interface import implementer

from ..logs import logger
from .._interfaces import IKeyListener, IRole
from ..wire import ETHERNET_HEADER_LEN, frame_mtu, largest_split_frame
from .carriers import UDPCarrier
from .dataplane import DataPlane
from .layer3 import Layer3Device
from .device import DeviceError, TapDevice, TunDevice
from .netplane import NetPlane

log = logger("securelan.agent")

#: How often the member list (for broadcast fan-out) is refreshed.
MEMBER_REFRESH_SECONDS = 30.0


class Routes:
    """
    The routes this agent put in the kernel's table through C{device}
    (``(prefix, via)`` pairs, C{via} None for a route straight into the
    device), kept as the key server tells them: new ones are added, gone
    ones taken away (or, with C{unreachable}, replaced by an unreachable
    route, so that the host never forwards that traffic elsewhere in
    clear), nobody else's touched.
    """

    def __init__(self, system, device: str, unreachable: bool = False):
        self.system = system
        self.device = device
        self.unreachable = unreachable
        self.installed: set = set()

    def _ip(self, verb, prefix, via):
        self.system.ip(["route", verb, prefix, *(["via", via] if via else []), "dev", self.device])

    def set(self, routes):
        routes = set(routes)
        if routes == self.installed:
            return
        for prefix, via in sorted(routes - self.installed, key=str):
            try:
                self._ip("replace", prefix, via)
            except DeviceError as e:
                log.error("cannot route {prefix} to {device}: {error}", prefix=prefix, device=self.device,
                          error=e)
        for prefix, via in self.installed - routes:
            try:
                if self.unreachable:
                    self.system.ip(["route", "replace", "unreachable", prefix])
                else:
                    self._ip("del", prefix, via)
            except DeviceError:
                # Gone already (the device went down with it).
                pass
        self.installed = routes

    def add(self, routes):
        """
        Take in C{routes} besides those installed (what a key server said at
        registration: it may not know of every link yet).
        """
        self.set(self.installed | set(routes))


def parse_routes(texts):
    """
    The key server's ``"prefix via address"`` routes as C{(prefix, via)}
    pairs; malformed ones are left out (and logged).
    """
    routes = []
    for text in texts:
        parts = text.split()
        try:
            if len(parts) != 3 or parts[1] != "via":
                raise ValueError(text)
            routes.append((str(ipaddress.ip_network(parts[0])), str(ipaddress.ip_address(parts[2]))))
        except ValueError:
            log.warn("ignored a route from the key server: {route!r}", route=text)
    return routes


def super_frame_limit(carrier):
    """
    The largest TSO super-frame the kernel should hand the agent (the
    device's C{gso_max_size}): one whose datagrams all leave in one send of
    C{carrier}, and so arrive in one UDP GRO read.  None when the carrier
    has no GSO bound (the ethernet carrier: any split frame's frames leave
    in one C{sendmmsg}).
    """
    pieces = carrier.pieces_per_send
    return largest_split_frame(carrier.max_datagram, pieces) if pieces else None


@implementer(IRole, IKeyListener)
class ClientRole:
    """
    A member host: its own frames, on its own TAP device, to and from the
    other members (the seed's steps 2 and 4).
    """

    name = "client"

    def __init__(self, device_factory=None, tun_factory=None):
        self._device_factory = device_factory or TapDevice
        self._tun_factory = tun_factory or TunDevice
        self.agent = None
        self.device = None
        #: The L{Layer3Device} in layer-3 mode (``[device] type = "tun"``).
        self.layer3 = None
        self._routes = None
        self.dataplane = None
        self._refresh = None
        self._tick = None
        self.not_ready = 0

    def start(self, agent):
        self.agent = agent
        config = agent.config.device
        gso_max_size = super_frame_limit(agent.carrier)
        if config.type == "tun":
            tun = self._tun_factory(config.name, self.device_mtu(agent), config.addresses, reactor=agent.reactor,
                                    gso_max_size=gso_max_size and gso_max_size - ETHERNET_HEADER_LEN)
            self.device = self.layer3 = Layer3Device(
                tun, agent.mac, agent.reactor, resolve=lambda address: agent.keys.request_pair_key_by_address(address),
                on_grant=self._resolved)
        else:
            self.device = self._device_factory(config.name, agent.mac, self.device_mtu(agent),
                                               config.addresses, reactor=agent.reactor, gso_max_size=gso_max_size)
        self.device.start(self._frame, self._flush)

    def _resolved(self, grant):
        # Layer 3: the key server named the member that holds an address,
        # with our key: the data plane takes it as it takes a pushed one.
        if self.dataplane is not None:
            self.dataplane.install_pair_key(grant)

    def device_mtu(self, agent):
        return agent.config.device.mtu or frame_mtu(agent.carrier.max_datagram)

    def stop(self):
        for loop in (self._refresh, self._tick):
            if loop is not None and loop.running:
                loop.stop()
        if self.device is not None:
            self.device.stop()

    def _frame(self, frame, offload):
        if self.dataplane is None:
            self.not_ready += 1
            return
        # Held (all but the batch's first) until the device's batch ends
        # (_flush): the TCP ACKs one batch of reads yields leave in one
        # system call.
        self.dataplane.frame_from_device(frame, offload, hold=True)

    def _flush(self):
        if self.dataplane is not None:
            self.dataplane.flush()

    def datagrams_received(self, datagrams, source):
        if self.dataplane is None:
            self.not_ready += len(datagrams)
            return
        self.dataplane.datagrams_received(datagrams, source)

    # IKeyListener -------------------------------------------------------------

    def registered(self, admission):
        if admission.routes is not None:
            # Added to, never taken from: a key server that just started
            # may not have linked with its peers yet.
            self.routes_pushed(admission.routes, replace=False)
        if self.dataplane is None:
            agent = self.agent
            q = agent.config.queue
            # The first admission's incarnation is ours for the agent's
            # whole life; later ones (reconnections) are not needed.
            self.dataplane = DataPlane(
                admission.member_id, agent.mac, admission.incarnation, agent.keys, agent.carrier,
                self.device, agent.reactor, on_key_miss=agent.config.on_key_miss,
                queue_per_peer=q.per_peer, queue_total=q.total, queue_timeout=q.timeout,
                gateway=self.name == "gateway", rekey_after_packets=admission.rekey_after_packets,
                rekey_after_bytes=admission.rekey_after_bytes, keepalive=agent.config.carrier.keepalive,
                on_grant=self.layer3.learn if self.layer3 is not None else None)
            self._refresh = LoopingCall(self.dataplane.refresh_members)
            self._refresh.clock = agent.reactor
            self._refresh.start(MEMBER_REFRESH_SECONDS, now=False)
            self._tick = LoopingCall(self.dataplane.tick)
            self._tick.clock = agent.reactor
            self._tick.start(1.0, now=False)
            self.dataplane.start()
        else:
            self.dataplane.refresh_members()
            self.dataplane.announce()
            self.dataplane.recheck()

    def pair_key_pushed(self, grant):
        if self.layer3 is not None and self.dataplane is None:
            # Before admission the data plane, which hands layer 3 every
            # grant it takes, does not exist yet.
            self.layer3.learn(grant)
        if self.dataplane is not None:
            self.dataplane.install_pair_key(grant)

    def group_key_pushed(self, grant):
        if self.dataplane is not None:
            self.dataplane.install_group_key(grant)

    def purged(self, peer_id, reason):
        log.info("purging keys with {peer_id}: {reason}", peer_id=peer_id, reason=reason)
        if self.dataplane is not None:
            self.dataplane.purge(peer_id)

    def net_links_pushed(self, links):
        # Links to other subnets are a border's business.
        pass

    def routes_pushed(self, routes, replace=True):
        """
        Route the other subnets' prefixes through this subnet's border, as
        the key server says (layer 2 only: a TUN device has no next hop).
        A route that would cover one of this member's key servers, or
        overlap its own network, is refused: it would pull the member's own
        traffic to the border.
        """
        if self.layer3 is not None or self.device is None or not hasattr(self.device, "system"):
            return
        if self._routes is None:
            self._routes = Routes(self.device.system, self.device.name)
        own = [ipaddress.ip_interface(a).network for a in self.device.addresses]
        protected = []
        for address in self.agent.config.key_servers:
            try:
                protected.append(ipaddress.ip_address(address.host))
            except ValueError:
                pass
        kept = []
        for prefix, via in parse_routes(routes):
            network = ipaddress.ip_network(prefix)
            if any(ip.version == network.version and ip in network for ip in protected) or any(
                    o.version == network.version and o.overlaps(network) for o in own):
                log.warn("refused the route {prefix} via {via}: it covers this member's own network or a "
                         "key server", prefix=prefix, via=via)
                continue
            kept.append((prefix, via))
        try:
            if replace:
                self._routes.set(kept)
            else:
                self._routes.add(kept)
        except Exception:
            log.failure("setting routes to other subnets")
    def status(self):
        base = {"device": self.device.name if self.device else None, "not_ready": self.not_ready,
                "device_write_errors": getattr(self.device, "write_errors", 0),
                "device_read_failures": getattr(self.device, "read_failures", 0)}
        if self.dataplane is not None:
            base.update(self.dataplane.status())
        if self.layer3 is not None:
            base["layer3"] = self.layer3.status()
        return base


@implementer(IRole, IKeyListener)
class GatewayRole(ClientRole):
    """
    The seed's full-decryption port (virtual client ID_X86): the TAP device
    is a port of a bridge on the plaintext network; frames from members to
    the hosts of that network are decrypted onto it, and their answers
    encrypted back, each under the key of the gateway and that member.  The
    key server sends members to the gateway for every MAC no member holds.
    Traffic between members never passes here.
    """

    name = "gateway"

    #: The MTU of the gateway's TAP device when none is configured: that of
    #: the plaintext network, so the bridge forwards its full-size frames
    #: (the larger ones cross the subnet in two pieces).
    PLAINTEXT_MTU = 1500

    def device_mtu(self, agent):
        return agent.config.device.mtu or max(frame_mtu(agent.carrier.max_datagram), self.PLAINTEXT_MTU)

    def routes_pushed(self, routes, replace=True):
        # A bridge port: the gateway routes nothing.
        pass

    def start(self, agent):
        bridge = agent.config.gateway.bridge
        super().start(agent)
        try:
            self.device.system.ip(["link", "set", "dev", self.device.name, "master", bridge])
        except Exception:
            self.device.stop()
            raise
        log.info("gateway: {device} is a port of bridge {bridge}", device=self.device.name, bridge=bridge)


@implementer(IRole, IKeyListener)
class BorderRole(ClientRole):
    """
    The seed's layer-3 port (ID_X86 plus NETID): a member of its subnet on
    its TAP device, like a client, and a router between subnets.  The
    kernel routes packets for other subnets into the TUN device; the
    L{NetPlane} sends them under the link's NETKEY to that subnet's border,
    and writes what peer borders send into the TUN device, from where the
    kernel routes it to the TAP device and so, under pair keys, to the
    member it is for.  The host must forward IP (net.ipv4.ip_forward=1).
    """

    name = "border"

    def __init__(self, device_factory=None, tun_factory=None, wan=None):
        super().__init__(device_factory, tun_factory)
        self.wan = wan
        self.tun = None
        self.netplane = None
        self._tun_routes = None
        self._net_tick = None
        self.wan_not_ready = 0

    def start(self, agent):
        config = agent.config.border
        if self.wan is None:
            self.wan = UDPCarrier(config.listen, config.port, config.underlay_mtu, "", agent.reactor)
        super().start(agent)
        try:
            self.tun = self._tun_factory(config.tun, frame_mtu(self.wan.max_datagram), reactor=agent.reactor,
                                         gso_max_size=super_frame_limit(self.wan) - ETHERNET_HEADER_LEN)
            self.tun.start(self._packet)
            self.wan.start(self._wan_datagrams)
        except Exception:
            self.stop()
            raise
        if _read_forwarding() == "0":
            log.warn("IP forwarding is off on this host (net.ipv4.ip_forward=0): the border cannot "
                     "route between its subnet and the others")

    def stop(self):
        if self._net_tick is not None and self._net_tick.running:
            self._net_tick.stop()
        if self.tun is not None:
            self.tun.stop()
        if self.wan is not None:
            self.wan.stop()
        super().stop()

    def _packet(self, packet, offload):
        if self.netplane is None:
            self.not_ready += 1
            return
        self.netplane.packet_from_device(packet, offload)

    def _wan_datagrams(self, datagrams, source):
        if self.netplane is None:
            self.wan_not_ready += len(datagrams)
            return
        self.netplane.datagrams_received(datagrams, source)

    def registered(self, admission):
        super().registered(admission)
        if self.netplane is None:
            self.netplane = NetPlane(admission.subnet, admission.member_id, admission.incarnation,
                                     self.tun, self.wan, self.agent.reactor, ask=self.fetch_links,
                                     routes=self._set_routes, keepalive=self.agent.config.border.keepalive)
            self._net_tick = LoopingCall(self.netplane.tick)
            self._net_tick.clock = self.agent.reactor
            self._net_tick.start(1.0, now=False)
        self.fetch_links()

    def fetch_links(self):
        """
        Ask the key server for the links (at start, on every reconnection,
        and when a peer border uses a NETKEY epoch we do not hold).
        """
        d = self.agent.keys.request_net_links()
        d.addCallback(self.net_links_pushed)
        d.addErrback(lambda f: log.warn("fetching links to other subnets failed: {reason}",
                                        reason=f.getErrorMessage()))
        return d

    def net_links_pushed(self, links):
        if self.netplane is not None:
            self.netplane.install(links)

    def routes_pushed(self, routes, replace=True):
        # The border is where those routes lead; its own go into its TUN
        # device (_set_routes).
        pass

    def _set_routes(self, prefixes):
        """
        Point the kernel's routes for the peer subnets' prefixes at the TUN
        device, and take away those no longer linked.
        """
        if self._tun_routes is None:
            # A link that goes away leaves an unreachable route: this host
            # forwards, and must not send that traffic on in clear.
            self._tun_routes = Routes(self.tun.system, self.tun.name, unreachable=True)
        self._tun_routes.set((prefix, None) for prefix in prefixes)

    def status(self):
        base = super().status()
        base["tun"] = self.tun.name if self.tun is not None else None
        base["wan_not_ready"] = self.wan_not_ready
        if self.netplane is not None:
            base["net"] = self.netplane.status()
        return base


def _read_forwarding():
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip()
    except OSError:
        return None


ROLES = {"client": ClientRole, "gateway": GatewayRole, "border": BorderRole}
