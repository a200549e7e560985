# -*- test-case-name: tests.test_layer3 -*-
"""
The layer-3 level for a member (``[device] type = "tun"``): the host sends
IP packets into a TUN device, keys are looked up by the peer's overlay IP
address (the key server keeps ID <-> IP as it keeps ID <-> MAC), and the
encrypted IP packet travels in the carrier.

L{Layer3Device} sits between the TUN device and the member's L{DataPlane},
which it serves as an Ethernet device: an outgoing packet becomes a frame
from this member's MAC to the MAC of the member that holds the destination
address (learnt from the key server's grant, which also installs the pair
key), so every datagram is the same PAIR datagram as at layer 2, under the
same pair key.  Packets to a multicast or broadcast address go under the
group key.  An incoming frame is accepted only if its source IP address is
one that the key server registered to the sending member: at layer 3, a
member cannot send unicast packets in the name of another member's
address.  Broadcast and multicast packets travel under the group key,
which (as at layer 2) authenticates a member, not which one: their source
MAC, and so the address checked, is the sender's word.
"""

import ipaddress

from zope.interface import implementer

from ..logs import logger
from .._interfaces import IDevice
from ..addresses import ETHERTYPE_IPV4, ETHERTYPE_IPV6, ip_packet_addresses
from ..errors import SecurelanError
from ..wire import VNET_HDR_LEN
from .pending import PendingFrames

log = logger("securelan.agent")

_BROADCAST = b"\xff" * 6
#: How long an address no member holds is not asked about again.
NEGATIVE_SECONDS = 5.0
#: Addresses being asked about at once, at most.
MAX_IN_FLIGHT = 256


def _is_multicast(address: bytes) -> bool:
    """
    Whether a packed address is multicast (224.0.0.0/4, ff00::/8) or the
    IPv4 limited broadcast, from its first bytes: no C{ipaddress} object
    per packet.
    """
    if len(address) == 4:
        return address[0] & 0xF0 == 0xE0 or address == b"\xff\xff\xff\xff"
    return address[0] == 0xFF


@implementer(IDevice)
class Layer3Device:
    """
    A TUN device seen by the data plane as an Ethernet device.

    @param tun: the L{securelan.agent.device.TunDevice} (or a fake).
    @param mac: this member's MAC (its identity on the wire).
    @param resolve: called with an address's text form; returns a Deferred
        that fires with the L{PairKeyGrant} of the member holding it.
    @param on_grant: called with each grant L{resolve} returned (the role
        installs it in the data plane) before queued packets go out.
    """

    def __init__(self, tun, mac, clock, resolve, on_grant=None, per_address=8, total=256, timeout=2.0):
        self.tun = tun
        self.name = tun.name
        self.mac = mac
        self.mtu = tun.mtu
        self.addresses = tuple(getattr(tun, "addresses", ()))
        self.clock = clock
        self._resolve = resolve
        self.on_grant = on_grant or (lambda grant: None)
        self._receiver = None
        self._flush = None
        self._macs: dict[bytes, bytes] = {}
        self._held: dict[bytes, frozenset] = {}
        self._pending = PendingFrames(per_address, total, timeout, clock)
        self._asking: set[bytes] = set()
        self._unknown: dict[bytes, float] = {}
        self._broadcasts = set()
        for text in self.addresses:
            network = ipaddress.ip_interface(text).network
            if network.version == 4 and network.prefixlen < 31:
                self._broadcasts.add(network.broadcast_address.packed)
        self.drops: dict[str, int] = {}

    @property
    def write_errors(self):
        return getattr(self.tun, "write_errors", 0)

    @property
    def read_failures(self):
        return getattr(self.tun, "read_failures", 0)

    @property
    def system(self):
        return self.tun.system

    def _drop(self, reason):
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def start(self, receiver, flush=None):
        self._receiver = receiver
        self._flush = flush
        self.tun.start(self._packet, flush)

    def stop(self):
        self.tun.stop()

    # What the key server says ------------------------------------------------

    def learn(self, grant):
        """
        Take in a peer's addresses (from a grant, asked for or pushed).
        """
        held = frozenset(ipaddress.ip_address(a).packed for a in grant.peer_addresses)
        for old in self._held.get(grant.peer_mac, frozenset()) - held:
            if self._macs.get(old) == grant.peer_mac:
                del self._macs[old]
        self._held[grant.peer_mac] = held
        for address in held:
            self._macs[address] = grant.peer_mac
            self._unknown.pop(address, None)

    # Outbound ---------------------------------------------------------------

    def _packet(self, packet, offload):
        addresses = ip_packet_addresses(packet)
        if addresses is None:
            return self._drop("malformed")
        dst = addresses[1]
        ethertype = ETHERTYPE_IPV4 if len(dst) == 4 else ETHERTYPE_IPV6
        if _is_multicast(dst) or dst in self._broadcasts:
            return self._receiver(_BROADCAST + self.mac + ethertype + packet, offload)
        mac = self._macs.get(dst)
        if mac is not None:
            return self._receiver(mac + self.mac + ethertype + packet, offload)
        if self._unknown.get(dst, 0) > self.clock.seconds():
            return self._drop("no_peer")
        if not self._pending.add(dst, (packet, offload)):
            return self._drop("queue_full")
        self._ask(dst)

    def _ask(self, dst):
        if dst in self._asking:
            return
        if len(self._asking) >= MAX_IN_FLIGHT:
            self._pending.discard(dst, self.drops, "busy")
            return
        self._asking.add(dst)
        text = str(ipaddress.ip_address(dst))

        def granted(grant):
            self._asking.discard(dst)
            self.learn(grant)
            self.on_grant(grant)
            if dst not in self._macs:
                # The key server named a member that does not hold it.
                self._pending.discard(dst, self.drops, "no_peer")
                return
            try:
                for packet, offload in self._pending.take(dst):
                    self._packet(packet, offload)
            finally:
                # The released packets are a batch of their own.
                if self._flush is not None:
                    self._flush()

        def refused(failure):
            self._asking.discard(dst)
            if not failure.check(SecurelanError):
                log.info("asking for {address}: {reason}", address=text, reason=failure.getErrorMessage())
            self._unknown[dst] = self.clock.seconds() + NEGATIVE_SECONDS
            if len(self._unknown) > 4096:
                self._unknown.clear()
            self._pending.discard(dst, self.drops, "no_peer")

        try:
            d = self._resolve(text)
        except Exception as e:
            self._asking.discard(dst)
            self._pending.discard(dst, self.drops, "no_peer")
            log.info("asking for {address}: {reason}", address=text, reason=str(e))
            return
        d.addCallbacks(granted, refused)

    # Inbound ----------------------------------------------------------------

    def write(self, frame, offload=False) -> bool:
        base = VNET_HDR_LEN if offload else 0
        src_mac = bytes(frame[base + 6:base + 12])
        ethertype = frame[base + 12:base + 14]
        packet = frame[base + 14:]
        if ethertype not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
            self._drop("not_ip")
            return True
        addresses = ip_packet_addresses(packet)
        if addresses is None or addresses[0] not in self._held.get(src_mac, ()):
            # Not an address the key server registered to the sender.
            self._drop("spoofed_src_ip")
            return True
        if offload:
            return self.tun.write(bytes(frame[:VNET_HDR_LEN]) + bytes(packet), offload=True)
        return self.tun.write(bytes(packet))

    def status(self):
        return {"layer": 3, "addresses_known": len(self._macs), "asking": len(self._asking),
                "queued": len(self._pending), "drops": dict(self.drops),
                "queue_drops": dict(self._pending.dropped)}
