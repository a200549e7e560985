# -*- test-case-name: tests.test_carriers,tests.test_agent -*-
"""
Carriers: how encrypted datagrams travel between members.

- C{udp}: each datagram in one UDP datagram to the peer's underlay endpoint
  (which the key server returned with the key, and which then follows the
  peer's authenticated datagrams).  Broadcast frames go to every member on
  the list the key server provides.
- C{ethernet}: each datagram as the payload of one raw Ethernet frame with
  securelan's EtherType on one LAN segment, addressed like the frame it
  carries (as MACsec does): one broadcast reaches every member.  A packet
  socket has no GSO or GRO; the carrier hands runs of same-sized datagrams
  to the data plane as one train, as a GRO read would.

Both keep every datagram within the underlay MTU: nothing relies on IP
fragmentation.
"""

import errno
import fcntl
import ipaddress
import socket
import struct
import termios

import numpy
from twisted.internet import abstract
from zope.interface import implementer

from ..logs import contain, logger
from .._interfaces import ICarrier
from ..addresses import AddressError, parse_host_port
from ..wire import MAX_FRAGMENTS, Train, max_datagram
from . import _mmsg

log = logger("securelan.agent")

#: IEEE 802 "local experimental" EtherType 1: securelan's frames.
ETHERTYPE = 0x88B5

_ETHERNET_HEADER = 14
_MACS_LEN = 12
_ETHERTYPE_BYTES = ETHERTYPE.to_bytes(2, "big")
_ETHERTYPE_ROW = numpy.frombuffer(_ETHERTYPE_BYTES, numpy.uint8)
#: The longest frame read from a packet socket: an MTU of 65,535, the
#: Ethernet header and a VLAN tag, rounded up (a longer one is passed over).
_MAX_FRAME = 65536 + 64
#: Frames per sendmmsg or recvmmsg: the pieces of the largest split frame.
_MMSG_SLOTS = MAX_FRAGMENTS


def _contained(carrier, receiver):
    """
    C{receiver}, such that an exception it raises while handling what
    arrived costs that batch (counted in C{carrier.receive_failures}), not
    the carrier.
    """
    return contain(receiver, carrier, "receive_failures", log,
                   "{carrier} carrier: handling received datagrams failed ({count} so far); they are dropped",
                   carrier=carrier.name)


def _waiting(fd) -> bool:
    """
    Whether a datagram waits on the socket (C{SIOCINQ}: the length of the
    next one).
    """
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0] > 0


def parse_udp_endpoint(text: str, family=None):
    """
    A peer's endpoint as the key server reported it, as a socket address
    C{(host, port)}; None when it has none, or none this socket can reach
    (another address family).
    """
    try:
        address, port = parse_host_port(text)
    except AddressError:
        return None
    if family is not None and (address.version == 6) != (family == socket.AF_INET6):
        return None
    return (str(address), port)


#: Linux socket options for UDP segmentation and receive offload.
UDP_SEGMENT = 103
UDP_GRO = 104
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
_GSO_MAX_SEGMENTS = 64
_GSO_MAX_BYTES = 65507
_U16 = struct.Struct("=H")
_GRO_SPACE = socket.CMSG_SPACE(4)


def _big_buffers(sock, size):
    """
    Ask for C{size}-byte socket buffers (beyond the sysctl limits when
    root): bursts of super-frame pieces must not be dropped by the socket.
    """
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class _SocketReader(abstract.FileDescriptor):
    """
    Calls C{read()} of its owner when the socket is readable.
    """

    def __init__(self, sock, read, reactor):
        super().__init__(reactor)
        self.socket = sock
        self._read = read
        self.connected = 1

    def fileno(self):
        return self.socket.fileno()

    def doRead(self):
        self._read()

    def connectionLost(self, reason=None):
        abstract.FileDescriptor.connectionLost(self, reason)
        self.socket.close()


@implementer(ICarrier)
class UDPCarrier:
    """
    Datagrams over UDP.  The datagrams of one super-frame leave in one
    C{sendmsg} with UDP GSO (the kernel cuts them apart, each its own UDP
    datagram of at most the path MTU), and arrive in one C{recvmsg} with UDP
    GRO; either falls back to one datagram per call where the kernel lacks
    it.
    """

    name = "udp"
    can_broadcast = False

    #: Receive calls per reactor turn at most.
    BATCH = 64
    #: Socket buffer sizes asked for (as root beyond the sysctl limits), so
    #: bursts of super-frames are not dropped by the socket.
    BUFFER = 4 * 1024 * 1024

    def __init__(self, listen: str, port: int, underlay_mtu: int, advertise: str, reactor):
        self.listen = listen
        self.port = port
        self.reactor = reactor
        self.family = socket.AF_INET6 if ipaddress.ip_address(listen).version == 6 else socket.AF_INET
        self.max_datagram = max_datagram(underlay_mtu, ipv6=self.family == socket.AF_INET6)
        #: Datagrams of one frame that one GSO send takes at most.
        self.pieces_per_send = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // self.max_datagram)
        self.endpoint = advertise or f":{port}"
        self.errors = 0
        #: Batches of received datagrams whose handling raised (dropped).
        self.receive_failures = 0
        self.gso = self.gro = False
        self._socket = None
        self._reader = None
        self._receiver = None
        #: Single datagrams sent with C{hold}, as C{(endpoint, parts)}.
        self._held = []

    def start(self, receiver):
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            _big_buffers(sock, self.BUFFER)
            try:
                sock.setsockopt(socket.IPPROTO_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                self.gro = False
            self.gso = True
            sock.bind((self.listen, self.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        if not self.port:
            self.port = sock.getsockname()[1]
            if self.endpoint == ":0":
                self.endpoint = f":{self.port}"
        self._socket = sock
        self._receiver = _contained(self, receiver)
        self._reader = _SocketReader(sock, self._read, self.reactor)
        self._reader.startReading()

    def stop(self):
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.stopReading()
            reader.connectionLost()

    def _read(self):
        recvmsg, receiver = self._socket.recvmsg, self._receiver
        for _ in range(self.BATCH):
            try:
                data, ancillary, _, source = recvmsg(65535, _GRO_SPACE)
            except BlockingIOError:
                return
            except OSError as e:
                # An ICMP error queued for an earlier send: not fatal.
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EINTR):
                    continue
                raise
            segment = 0
            for level, kind, value in ancillary:
                if level == socket.IPPROTO_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(value[:4], "little")
            if segment and len(data) > segment:
                # Not cut into datagrams here: the data plane takes a whole
                # split frame from the buffer at once (train_ciphertext).
                receiver(Train(data, segment), source[:2])
            else:
                receiver((data,), source[:2])

    def parse_endpoint(self, text):
        return parse_udp_endpoint(text, self.family)

    def send(self, datagrams, endpoint):
        if len(datagrams) > 1:
            self.send_train(Train(b"".join(datagrams), len(datagrams[0])), endpoint)
        elif datagrams:
            self.send_parts((datagrams[0], b""), endpoint)

    def send_parts(self, parts, endpoint, hold=False):
        if hold and len(parts) == 2:
            self._held.append((endpoint, parts))
            return
        if self._held:
            # What was held goes first: datagrams to one peer keep their order.
            self.flush()
        self._send_run(parts, len(parts[0]) + len(parts[1]), endpoint)

    def send_train(self, train, endpoint):
        if self._held:
            self.flush()
        self._send_train(train.data, train.segment, endpoint)

    def flush(self):
        """
        Send the datagrams held back, endpoint by endpoint in the order sent
        to each: a run of them to one endpoint, equal in size but the last,
        leaves in one GSO send (the TCP ACKs a batch of TAP reads yields,
        for one, are all alike).
        """
        if not self._held:
            # After most batches of reads (super-frames are never held).
            return
        held, self._held = self._held, []
        by_endpoint = {}
        for endpoint, parts in held:
            by_endpoint.setdefault(endpoint, []).append(parts)
        for endpoint, datagrams in by_endpoint.items():
            run, size, ended = [], 0, False
            for parts in datagrams:
                length = len(parts[0]) + len(parts[1])
                if run and (length > size or ended):
                    self._send_run(run, size, endpoint)
                    run = []
                if not run:
                    size = length
                run += parts
                # A shorter datagram can only be the last of a GSO send.
                ended = length < size
            self._send_run(run, size, endpoint)

    def _send_run(self, parts, size, endpoint):
        """
        Send datagrams given as parts (see L{send_parts}), each C{size}
        bytes but the last.
        """
        if len(parts) > 2:
            return self._send_train(b"".join(parts), size, endpoint)
        try:
            self._socket.sendmsg(parts, (), 0, endpoint)
        except Exception:
            # A full socket buffer, an unreachable peer, an address the
            # socket cannot use: counted, never raised into the frame path.
            self.errors += 1

    def _send_train(self, data, segment, endpoint):
        """
        Send datagrams laid end to end in C{data}, each C{segment} bytes
        but the last: as few GSO sends as the kernel's limits allow, else
        one by one.
        """
        sock = self._socket
        try:
            if self.gso:
                # One GSO send is one UDP datagram to the kernel: at most
                # 64 KiB of payload, so a super-frame may take two.
                step = segment * min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // segment)
                option = [(socket.IPPROTO_UDP, UDP_SEGMENT, _U16.pack(segment))]
                try:
                    for start in range(0, len(data), step):
                        chunk = data[start:start + step]
                        sock.sendmsg((chunk,), option if len(chunk) > segment else (), 0, endpoint)
                    return
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                        raise
                    # No UDP GSO on this path (or device): one by one.
                    self.gso = False
                    data = data[start:]
            for start in range(0, len(data), segment):
                sock.sendmsg((data[start:start + segment],), (), 0, endpoint)
        except Exception:
            # As in _send_run: counted, never raised into the frame path.
            self.errors += 1

    def broadcast(self, datagrams, endpoints):
        if len(datagrams) > 1:
            # Joined once for every endpoint.
            train = Train(b"".join(datagrams), len(datagrams[0]))
            for endpoint in endpoints:
                self.send_train(train, endpoint)
        else:
            for endpoint in endpoints:
                self.send(datagrams, endpoint)


@implementer(ICarrier)
class EthernetCarrier:
    """
    Datagrams as raw Ethernet frames with securelan's EtherType on one LAN
    segment.  The LAN interface is put in promiscuous mode (the socket takes
    only our EtherType's frames), because they are addressed to the members'
    TAP MACs, not to the interface's own.
    """

    name = "ethernet"
    can_broadcast = True
    endpoint = ""
    #: No GSO, so no super-frame limit to match: every frame a split frame
    #: may have (64) leaves in one sendmmsg.
    pieces_per_send = None
    #: Frames taken from the socket per reactor turn at most.
    BATCH = 256

    def __init__(self, interface: str, underlay_mtu: int, reactor):
        self.interface = interface
        self.reactor = reactor
        self.max_datagram = underlay_mtu
        self._reader = None
        self._socket = None
        self._receiver = None
        self.errors = 0
        #: Batches of received datagrams whose handling raised (dropped).
        self.receive_failures = 0
        self._rx = self._tx = None
        self._carried = []

    def start(self, receiver):
        if not _mmsg.available():
            raise OSError(errno.ENOSYS, "the ethernet carrier needs sendmmsg and recvmmsg from the C library")
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            _big_buffers(sock, UDPCarrier.BUFFER)
            sock.bind((self.interface, ETHERTYPE))
            index = socket.if_nametoindex(self.interface)
            # struct packet_mreq: ifindex, PACKET_MR_PROMISC, alen, address
            mreq = index.to_bytes(4, "little") + (1).to_bytes(2, "little") + bytes(10)
            sock.setsockopt(263, 1, mreq)  # SOL_PACKET, PACKET_ADD_MEMBERSHIP
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._use(sock, receiver)
        self._reader = _SocketReader(sock, self._read, self.reactor)
        self._reader.startReading()

    def _use(self, sock, receiver):
        """
        Send and receive with C{sock} (a bound packet socket, or in tests
        any datagram socket), handing what arrives to C{receiver}.
        """
        self._socket = sock
        self._receiver = _contained(self, receiver)
        self._rx = _mmsg.Batch(_MMSG_SLOTS, _MAX_FRAME)
        self._tx = _mmsg.Batch(_MMSG_SLOTS)
        self._carried = []

    def _read(self):
        """
        Take the frames the socket holds, up to 64 per system call and about
        L{BATCH} per turn, and hand each run of consecutive datagrams of one
        size (the last may be shorter) to the receiver as one L{Train}, as
        UDP GRO hands over the pieces of a super-frame (a frame alone, as a
        1-tuple): the data plane then takes a whole split frame at once
        (L{securelan.wire.train_ciphertext}) instead of piece by piece.
        """
        batch = self._rx
        fd, slots = self._socket.fileno(), batch.slots
        # Rows 0 .. len(carried) - 1 hold a run the last receive ended
        # with, which this one may go on with.
        carried, self._carried = self._carried, []
        for _ in range(max(1, self.BATCH // slots)):
            try:
                lengths = carried + batch.receive(fd, len(carried))
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENETDOWN):
                    lengths = carried
                else:
                    raise
            # recvmmsg stops short when nothing more is waiting (or at an
            # error, which the next call reports).
            more = len(lengths) == slots
            carried = self._deliver_runs(batch, lengths, more)
            if self._rx is not batch or not more:
                # Done, or the receiver stopped the carrier (or started it
                # afresh on another socket).
                return
        if carried and _waiting(fd):
            # The socket stays readable: the next turn goes on with it.
            self._carried = carried
        else:
            self._deliver_runs(batch, carried, False)

    def _deliver_runs(self, batch, lengths, more):
        """
        Hand on the frames of one receive (C{lengths} long, in the rows of
        C{batch}) run by run: a run ends at a shorter frame (which it
        takes), before a longer one or a frame that is passed over (no longer
        than an Ethernet header, or longer than a row), and at the end of
        the receive.  With C{more} (more frames are waiting), a run the
        receive ends with that could go on is moved to the first rows
        instead, and its lengths returned: the next receive goes on with it.
        Nothing more is handed on once the receiver has stopped the carrier.
        """
        rows = batch.rows
        start = count = length = 0
        for i, n in enumerate(lengths):
            if count and _ETHERNET_HEADER < n <= length:
                count += 1
                if n < length:
                    # A shorter datagram ends a run, as in a GRO read.
                    self._deliver(rows, start, count, length, n)
                    if self._rx is not batch:
                        return []
                    count = 0
                continue
            if count:
                self._deliver(rows, start, count, length, length)
                if self._rx is not batch:
                    return []
                count = 0
            if _ETHERNET_HEADER < n <= _MAX_FRAME:
                start, count, length = i, 1, n
        if not count:
            return []
        if more and start:
            rows[:count, :length] = rows[start:start + count, :length]
            return [length] * count
        self._deliver(rows, start, count, length, length)
        return []

    def _deliver(self, rows, start, count, length, last):
        """
        Hand the receiver the datagrams of the C{count} frames received into
        rows C{start}, C{start} + 1, ..., each C{length} bytes long but the
        last (C{last} bytes): their Ethernet headers dropped, the datagrams
        copied out of the rows (which the next receive reuses).
        """
        if count == 1:
            return self._receiver((rows[start, _ETHERNET_HEADER:last].tobytes(),), "lan")
        segment = length - _ETHERNET_HEADER
        full = (count - 1) * segment
        end = start + count - 1
        data = numpy.empty(full + last - _ETHERNET_HEADER, numpy.uint8)
        data[:full].reshape(count - 1, segment)[:] = rows[start:end, _ETHERNET_HEADER:length]
        data[full:] = rows[end, _ETHERNET_HEADER:last]
        self._receiver(Train(data.tobytes(), segment), "lan")

    def stop(self):
        # A run carried to the next turn goes with the socket.
        self._rx, self._carried = None, []
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.stopReading()
            reader.connectionLost()

    def parse_endpoint(self, text):
        # Frames are addressed by the MACs they carry: every member on the
        # segment is reachable without an endpoint.
        return "lan"

    def send(self, datagrams, endpoint):
        # Outer addresses are the carried frame's (header bytes 20..32).
        send = self._socket.send
        for datagram in datagrams:
            try:
                send(b"".join((datagram[20:32], _ETHERTYPE_BYTES, datagram)))
            except OSError:
                self.errors += 1

    def send_parts(self, parts, endpoint, hold=False):
        # One frame per send whatever: nothing to gain by holding.  (Three
        # buffers per sendmsg instead of joins measured no faster.)
        self.send(list(map(bytes.__add__, parts[0::2], parts[1::2])), endpoint)

    def send_train(self, train, endpoint):
        """
        The frames of a split frame's datagrams laid out in one buffer (one
        strided copy, the outer headers put in by column), all sent in one
        C{sendmmsg}: a packet socket has no GSO.
        """
        data, segment = train.data, train.segment
        count = len(train)
        full = (count - 1) * segment
        length = _ETHERNET_HEADER + segment
        frames = numpy.empty(count * length, numpy.uint8)
        grid = frames.reshape(count, length)
        datagrams = numpy.frombuffer(data, numpy.uint8)
        grid[:count - 1, _ETHERNET_HEADER:] = datagrams[:full].reshape(count - 1, segment)
        end = len(data) - full + _ETHERNET_HEADER
        grid[count - 1, _ETHERNET_HEADER:end] = datagrams[full:]
        # Outer addresses are the carried frame's (header bytes 20..32;
        # every datagram, the last too, holds a whole header).
        grid[:, :_MACS_LEN] = grid[:, _ETHERNET_HEADER + 20:_ETHERNET_HEADER + 32]
        grid[:, _MACS_LEN:_ETHERNET_HEADER] = _ETHERTYPE_ROW
        self.errors += count - self._tx.send(self._socket.fileno(), frames, length, count, end)

    def flush(self):
        pass

    def broadcast(self, datagrams, endpoints):
        self.send(datagrams, None)


def send_sealed(carrier, sealed, endpoint, hold=False):
    """
    Send what L{securelan.wire.Sealer.seal_for_carrier} made with
    C{carrier}: a split frame's L{Train} in one
    L{ICarrier.send_train<securelan._interfaces.ICarrier.send_train>}, a
    whole frame's parts with C{send_parts} (C{hold} as it takes it).
    """
    if type(sealed) is Train:
        carrier.send_train(sealed, endpoint)
    else:
        carrier.send_parts(sealed, endpoint, hold)


def make_carrier(config, reactor):
    """
    The carrier that C{config} (a L{securelan.config.CarrierConfig}) names.
    """
    if config.type == "udp":
        return UDPCarrier(config.listen, config.port, config.underlay_mtu, config.advertise, reactor)
    if config.type == "ethernet":
        return EthernetCarrier(config.interface, config.underlay_mtu, reactor)
    raise ValueError(f"unknown carrier {config.type!r}")
