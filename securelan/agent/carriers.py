# -*- test-case-name: tests.test_agent -*-
"""
Carriers: how encrypted datagrams travel between members.

- C{udp}: each datagram in one UDP datagram to the peer's underlay endpoint
  (which the key server returned with the key, and which then follows the
  peer's authenticated datagrams).  Broadcast frames go to every member on
  the list the key server provides.
- C{ethernet}: each datagram as the payload of one raw Ethernet frame with
  securelan's EtherType on one LAN segment, addressed like the frame it
  carries (as MACsec does): one broadcast reaches every member.

Both keep every datagram within the underlay MTU: nothing relies on IP
fragmentation.
"""

import errno
import ipaddress
import socket

from twisted.internet import abstract, protocol
from twisted.logger import Logger
from zope.interface import implementer

from .._interfaces import ICarrier
from ..wire import max_datagram

log = Logger(namespace="securelan.agent")

#: IEEE 802 "local experimental" EtherType 1: securelan's frames.
ETHERTYPE = 0x88B5

_ETHERNET_HEADER = 14


def _parse_host_port(text: str):
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (str(address), int(port))


class _UDPProtocol(protocol.DatagramProtocol):
    def __init__(self, receiver):
        self.receiver = receiver

    def datagramReceived(self, datagram, addr):
        self.receiver(datagram, addr[:2])


@implementer(ICarrier)
class UDPCarrier:
    """
    Datagrams over UDP.
    """

    name = "udp"
    can_broadcast = False

    def __init__(self, listen: str, port: int, underlay_mtu: int, advertise: str, reactor):
        self.listen = listen
        self.port = port
        self.reactor = reactor
        ipv6 = ipaddress.ip_address(listen).version == 6
        self.max_datagram = max_datagram(underlay_mtu, ipv6=ipv6)
        self.endpoint = advertise or f":{port}"
        self._port = None
        self.errors = 0

    def start(self, receiver):
        self._port = self.reactor.listenUDP(self.port, _UDPProtocol(receiver), interface=self.listen,
                                            maxPacketSize=65535)
        if not self.port:
            self.port = self._port.getHost().port
            if self.endpoint == ":0":
                self.endpoint = f":{self.port}"

    def stop(self):
        if self._port is not None:
            port, self._port = self._port, None
            return port.stopListening()

    def parse_endpoint(self, text):
        return _parse_host_port(text)

    def send(self, datagram, endpoint):
        try:
            self._port.write(datagram, endpoint)
        except OSError:
            # A full socket buffer or an unreachable peer: count, never raise
            # into the frame path.
            self.errors += 1

    def broadcast(self, datagram, endpoints):
        for endpoint in endpoints:
            self.send(datagram, endpoint)


class _PacketReader(abstract.FileDescriptor):
    """
    Reads frames from a non-blocking AF_PACKET socket.
    """

    def __init__(self, sock, receiver, reactor):
        super().__init__(reactor)
        self.socket = sock
        self.receiver = receiver
        self.connected = 1

    def fileno(self):
        return self.socket.fileno()

    def doRead(self):
        recv = self.socket.recv
        for _ in range(256):
            try:
                frame = recv(65535)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENETDOWN):
                    return
                raise
            if len(frame) > _ETHERNET_HEADER:
                self.receiver(frame[_ETHERNET_HEADER:], "lan")

    def connectionLost(self, reason=None):
        abstract.FileDescriptor.connectionLost(self, reason)
        self.socket.close()


@implementer(ICarrier)
class EthernetCarrier:
    """
    Datagrams as raw Ethernet frames with securelan's EtherType on one LAN
    segment.  The LAN interface is put in promiscuous mode for our EtherType's
    frames, because they are addressed to the members' TAP MACs.
    """

    name = "ethernet"
    can_broadcast = True
    endpoint = ""

    def __init__(self, interface: str, underlay_mtu: int, reactor):
        self.interface = interface
        self.reactor = reactor
        self.max_datagram = underlay_mtu
        self._reader = None
        self._socket = None
        self.errors = 0

    def start(self, receiver):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            sock.bind((self.interface, ETHERTYPE))
            index = socket.if_nametoindex(self.interface)
            # struct packet_mreq: ifindex, PACKET_MR_PROMISC, alen, address
            mreq = index.to_bytes(4, "little") + (1).to_bytes(2, "little") + bytes(10)
            sock.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self._reader = _PacketReader(sock, receiver, self.reactor)
        self._reader.startReading()

    def stop(self):
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.stopReading()
            reader.connectionLost()

    def parse_endpoint(self, text):
        # Frames are addressed by the MACs they carry: every member on the
        # segment is reachable without an endpoint.
        return "lan"

    def send(self, datagram, endpoint):
        # Outer addresses are the carried frame's (header bytes 20..32).
        try:
            self._socket.send(b"".join((datagram[20:26], datagram[26:32], ETHERTYPE.to_bytes(2, "big"), datagram)))
        except OSError:
            self.errors += 1

    def broadcast(self, datagram, endpoints):
        self.send(datagram, None)


def make_carrier(config, reactor):
    """
    The carrier that C{config} (a L{securelan.config.CarrierConfig}) names.
    """
    if config.type == "udp":
        return UDPCarrier(config.listen, config.port, config.underlay_mtu, config.advertise, reactor)
    if config.type == "ethernet":
        return EthernetCarrier(config.interface, config.underlay_mtu, reactor)
    raise ValueError(f"unknown carrier {config.type!r}")
