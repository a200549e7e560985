# -*- test-case-name: tests.test_device -*-
"""
The TAP device through which the host's protocol stack sends and receives
the frames that securelan encrypts, and the TUN device through which a
border routes IP packets to and from other subnets.

The device is opened with C{IFF_VNET_HDR} and the kernel is allowed to hand
over TCP segmentation and checksum offloads (C{TUNSETOFFLOAD}): a TCP
stream then arrives as super-frames of up to 64 KiB, each with a 10-byte
virtio-net header that says how to cut it into segments.  Carrying
super-frames instead of MTU-sized frames is what lets a Python agent move
gigabits; every piece that leaves is still an MTU-sized, authenticated
datagram (see C{docs/wire-format.rst}).

Reads are batched until the device is empty (bounded per reactor turn).
All system calls go through an injectable I/O system, so tests run the
device with no kernel device.  The device is not persistent: it disappears
when the agent closes it.
"""

import errno
import fcntl
import os
import struct
import subprocess

from twisted.internet import abstract
from zope.interface import implementer

from ..logs import contain, logger
from .._interfaces import IDevice
from ..addresses import format_mac

log = logger("securelan.agent")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

VNET_HDR_LEN = 10
ZERO_VNET_HDR = bytes(VNET_HDR_LEN)

#: The largest read: a 64 KiB super-frame, its Ethernet and virtio-net
#: headers.
READ_SIZE = 65536 + 64


class DeviceError(Exception):
    """
    The TAP device cannot be created or configured; the message says why and
    what to do.
    """


class RealSystem:
    """
    The operating system, as the device uses it.
    """

    def open(self, path, flags):
        return os.open(path, flags)

    def ioctl(self, fd, request, arg):
        return fcntl.ioctl(fd, request, arg)

    def read(self, fd, size):
        return os.read(fd, size)

    def write(self, fd, data):
        return os.write(fd, data)

    def close(self, fd):
        os.close(fd)

    def ip(self, args):
        try:
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)
        except FileNotFoundError:
            raise DeviceError("the 'ip' command (iproute2) is needed to configure the device") from None
        except subprocess.CalledProcessError as e:
            message = e.stderr.decode(errors="replace").strip()
            raise DeviceError(f"ip {' '.join(args)}: {message}") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"ip {' '.join(args)}: no answer in 10 s") from None


class _Reader(abstract.FileDescriptor):
    def __init__(self, device, reactor):
        super().__init__(reactor)
        self.device = device
        self.connected = 1

    def fileno(self):
        return self.device.fd if self.device.fd is not None else -1

    def doRead(self):
        self.device.read_batch()

    def connectionLost(self, reason=None):
        abstract.FileDescriptor.connectionLost(self, reason)


@implementer(IDevice)
class TapDevice:
    """
    A TAP device named C{name}, with C{mac}, C{mtu} and C{addresses}
    (``address/prefix`` strings) set when it starts, and TCP offloads on.

    @param system: the I/O system (tests pass a fake; see
        L{securelan.testing.FakeTunSystem}).
    """

    #: Frames taken from the device per reactor turn at most, so one busy
    #: device cannot starve the rest of the agent.
    BATCH = 64
    KIND = "TAP"
    _MODE = IFF_TAP

    def __init__(self, name: str, mac: bytes, mtu: int, addresses=(), reactor=None, system=None,
                 gso_max_size=None):
        if reactor is None:
            from twisted.internet import reactor
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.addresses = tuple(addresses)
        #: The largest super-frame the kernel may hand over (None: its own
        #: limit, 64 KiB).
        self.gso_max_size = gso_max_size
        self.system = system or RealSystem()
        self.fd = None
        self._reactor = reactor
        self._reader = None
        self._receiver = None
        self._flush = None
        self.write_errors = 0
        #: Frames from the host whose handling raised (dropped).
        self.read_failures = 0
        self.offload_frames = 0

    def start(self, receiver, flush=None):
        system = self.system
        try:
            fd = system.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise DeviceError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
            raise DeviceError(f"cannot open /dev/net/tun: {e.strerror}") from None
        try:
            system.ioctl(fd, TUNSETIFF, struct.pack("16sH", self.name.encode(), self._MODE | IFF_NO_PI | IFF_VNET_HDR))
            system.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        except OSError as e:
            system.close(fd)
            if e.errno in (errno.EPERM, errno.EACCES):
                raise DeviceError(f"no permission to create {self.KIND} device {self.name}: run the agent as "
                                  "root or with CAP_NET_ADMIN") from None
            if e.errno == errno.EBUSY:
                raise DeviceError(f"{self.KIND} device {self.name} is in use by another process") from None
            raise DeviceError(f"cannot create {self.KIND} device {self.name}: {e.strerror}") from None
        self.fd = fd
        try:
            system.ip(["link", "set", "dev", self.name, *self._link_settings(), "mtu", str(self.mtu)])
            if self.gso_max_size:
                try:
                    system.ip(["link", "set", "dev", self.name, "gso_max_size", str(self.gso_max_size)])
                except DeviceError as e:
                    # An older ip or kernel: super-frames then take two
                    # sends instead of one, which costs speed, not function.
                    log.warn("{kind} device {name}: cannot limit super-frames to {size} bytes: {error}",
                             kind=self.KIND, name=self.name, size=self.gso_max_size, error=e)
            for address in self.addresses:
                system.ip(["addr", "add", address, "dev", self.name])
            system.ip(["link", "set", "dev", self.name, "up"])
        except DeviceError:
            self.stop()
            raise
        # An exception out of a read would close the reader for good.
        self._receiver = contain(receiver, self, "read_failures", log,
                                 "{kind} device {name}: handling a frame from the host failed ({count} so far);"
                                 " it is dropped", kind=self.KIND, name=self.name)
        self._flush = flush
        self._reader = _Reader(self, self._reactor)
        self._reader.startReading()
        log.info("{kind} device {name} up: MAC {mac}, MTU {mtu}, addresses {addresses}", kind=self.KIND,
                 name=self.name, mac=format_mac(self.mac) if self.mac else "none", mtu=self.mtu,
                 addresses=", ".join(self.addresses) or "none")

    def _link_settings(self):
        return ["address", format_mac(self.mac)]

    def read_batch(self):
        try:
            self._read_batch()
        finally:
            if self._flush is not None:
                self._flush()

    def _read_batch(self):
        read, fd, receiver = self.system.read, self.fd, self._receiver
        for _ in range(self.BATCH):
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.error("reading {kind} device {name}: {reason}", kind=self.KIND, name=self.name, reason=e.strerror)
                return
            if len(data) <= VNET_HDR_LEN:
                continue
            header = data[:VNET_HDR_LEN]
            if header == ZERO_VNET_HDR:
                receiver(data[VNET_HDR_LEN:], None)
            else:
                self.offload_frames += 1
                # A view: a super-frame is not copied again to drop a header.
                receiver(memoryview(data)[VNET_HDR_LEN:], header)

    def write(self, frame, offload=False) -> bool:
        """
        Hand a frame to the host.  With C{offload}, C{frame} begins with its
        virtio-net header (as the wire gives it); else a zero header is put
        in front.
        """
        try:
            self.system.write(self.fd, frame if offload else ZERO_VNET_HDR + frame)
        except OSError:
            self.write_errors += 1
            return False
        return True

    def stop(self):
        if self._reader is not None:
            self._reader.stopReading()
            self._reader = None
        if self.fd is not None:
            fd, self.fd = self.fd, None
            self.system.close(fd)


@implementer(IDevice)
class TunDevice(TapDevice):
    """
    A TUN device: IP packets rather than Ethernet frames, with the same
    offloads (TSO super-packets with a virtio-net header).  It has no MAC.
    """

    KIND = "TUN"
    _MODE = IFF_TUN

    def __init__(self, name: str, mtu: int, addresses=(), reactor=None, system=None, gso_max_size=None):
        super().__init__(name, None, mtu, addresses, reactor=reactor, system=system, gso_max_size=gso_max_size)

    def _link_settings(self):
        return []
