# -*- test-case-name: tests.test_agent -*-
"""
The TAP device through which the host's protocol stack sends and receives
the frames that securelan encrypts.

Reading goes through L{twisted.pair.tuntap.TuntapPort} (so tests run it on
L{twisted.pair.testing.MemoryIOSystem} with no device); the device's MAC,
MTU and addresses are set with iproute2 once it exists.  The device is not
persistent: it disappears when the agent closes it.
"""

import errno
import subprocess

from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.pair.ethernet import IEthernetProtocol
from twisted.pair.tuntap import TuntapPort
from twisted.internet.protocol import AbstractDatagramProtocol
from zope.interface import implementer

from .._interfaces import IDevice
from ..addresses import format_mac

log = Logger(namespace="securelan.agent")


class DeviceError(Exception):
    """
    The TAP device cannot be created or configured; the message says why and
    what to do.
    """


@implementer(IEthernetProtocol)
class _Frames(AbstractDatagramProtocol):
    def __init__(self, receiver):
        self.receiver = receiver

    def datagramReceived(self, datagram, partial=0):
        self.receiver(datagram)

    def addProto(self, num, proto):
        raise NotImplementedError("frames go to one receiver")


def _run_ip(args):
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)
    except FileNotFoundError:
        raise DeviceError("the 'ip' command (iproute2) is needed to configure the TAP device") from None
    except subprocess.CalledProcessError as e:
        message = e.stderr.decode(errors="replace").strip()
        raise DeviceError(f"ip {' '.join(args)}: {message}") from None


@implementer(IDevice)
class TapDevice:
    """
    A TAP device named C{name}, with C{mac}, C{mtu} and C{addresses}
    (``address/prefix`` strings) set when it starts.

    @param system: the I/O system of C{TuntapPort} (tests pass a
        C{MemoryIOSystem}); with one, the device is not configured with ip.
    """

    def __init__(self, name: str, mac: bytes, mtu: int, addresses=(), reactor=None, system=None,
                 configure=None):
        self.name = name
        self.mac = mac
        self.mtu = mtu
        self.addresses = tuple(addresses)
        self._reactor = reactor
        self._system = system
        self._configure = configure if configure is not None else system is None
        self._port = None
        self.write_errors = 0

    def start(self, receiver):
        port = TuntapPort(self.name.encode(), _Frames(receiver), maxPacketSize=65536 + 64,
                          reactor=self._reactor, system=self._system)
        try:
            port.startListening()
        except CannotListenError as e:
            cause = e.socketError
            if isinstance(cause, OSError) and cause.errno in (errno.EPERM, errno.EACCES):
                raise DeviceError(
                    f"no permission to create TAP device {self.name}: run the agent as root "
                    "or with CAP_NET_ADMIN") from None
            if isinstance(cause, OSError) and cause.errno == errno.ENOENT:
                raise DeviceError("/dev/net/tun is missing: load the tun module (modprobe tun)") from None
            raise DeviceError(f"cannot create TAP device {self.name}: {cause}") from None
        self._port = port
        if self._configure:
            try:
                _run_ip(["link", "set", "dev", self.name, "address", format_mac(self.mac),
                         "mtu", str(self.mtu)])
                for address in self.addresses:
                    _run_ip(["addr", "add", address, "dev", self.name])
                _run_ip(["link", "set", "dev", self.name, "up"])
            except DeviceError:
                self.stop()
                raise
        log.info("TAP device {name} up: MAC {mac}, MTU {mtu}, addresses {addresses}",
                 name=self.name, mac=format_mac(self.mac), mtu=self.mtu,
                 addresses=", ".join(self.addresses) or "none")

    def write(self, frame) -> bool:
        try:
            self._port.write(frame)
        except OSError:
            self.write_errors += 1
            return False
        return True

    def stop(self):
        if self._port is not None:
            port, self._port = self._port, None
            port.stopListening()
