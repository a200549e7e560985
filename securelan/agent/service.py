# -*- test-case-name: tests.test_agent -*-
"""
The agent service: its carrier, its role, its key-server connection and its
status socket, started and stopped together.
"""

import hashlib
import ipaddress

from twisted.application import service

from ..logs import logger
from ..client import KeyServerClient
from .carriers import make_carrier
from .._startup import fail_startup
from .device import DeviceError
from .roles import ROLES
from .status import listen_status

log = logger("securelan.agent")


def derived_mac(member_id: str) -> bytes:
    """
    A stable, locally administered unicast MAC for a member that configured
    none and whose certificate pins none.
    """
    digest = bytearray(hashlib.sha256(b"securelan mac\0" + member_id.encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


class AgentService(service.Service):
    """
    One member agent.

    @ivar keys: the L{KeyServerClient}.
    @ivar role: the L{IRole} doing the work.
    """

    def __init__(self, config, credentials, mac: bytes, reactor, carrier=None, role=None,
                 retry_policy=None):
        self.config = config
        self.reactor = reactor
        self.mac = mac
        self.carrier = carrier or make_carrier(config.carrier, reactor)
        self.role = role or ROLES[config.role]()
        self._credentials = credentials
        self._retry_policy = retry_policy
        self.keys = None
        self._status_port = None
        self._metrics_port = None

    def startService(self):
        super().startService()
        try:
            self.carrier.start(self.role.datagrams_received)
        except OSError as e:
            return fail_startup(self.reactor, "securelan-agent",
                                f"{self.carrier.name} carrier: {e.strerror or e}")
        try:
            self.role.start(self)
        except DeviceError as e:
            self.carrier.stop()
            return fail_startup(self.reactor, "securelan-agent", str(e))
        device = self.config.device
        overlay = [str(ipaddress.ip_interface(a).ip) for a in device.addresses] if device.type == "tun" else []
        self.keys = KeyServerClient(self.config.key_servers, self._credentials, mac=self.mac,
                                    role=self.config.role, endpoint=self.carrier.endpoint,
                                    listener=self.role, reactor=self.reactor,
                                    retry_policy=self._retry_policy, overlay_addresses=overlay)
        self.keys.startService()
        if self.config.metrics:
            from ..metrics import AgentCollector, listen_metrics

            listen_metrics(self.reactor, self.config.metrics, AgentCollector(self)).addCallbacks(
                lambda p: setattr(self, "_metrics_port", p),
                lambda f: fail_startup(self.reactor, "securelan-agent",
                                       f"metrics {self.config.metrics}: {f.getErrorMessage()}"))
        if self.config.status_socket:
            try:
                self._status_port = listen_status(self.reactor, self.config.status_socket, self.status)
            except OSError as e:
                return fail_startup(self.reactor, "securelan-agent",
                                    f"status socket {self.config.status_socket}: {e}")

    def stopService(self):
        super().stopService()
        if self._status_port is not None:
            self._status_port.stopListening()
        if self._metrics_port is not None:
            self._metrics_port.stopListening()
        d = self.keys.stopService() if self.keys is not None else None
        self.role.stop()
        self.carrier.stop()
        return d

    def status(self):
        current = self.keys.current_server if self.keys is not None else None
        return {
            "now": self.reactor.seconds(),
            "role_name": self.role.name,
            "carrier": self.carrier.name,
            "carrier_errors": self.carrier.errors,
            "carrier_receive_failures": getattr(self.carrier, "receive_failures", 0),
            "key_servers": [{"address": str(a), "connected": a == current}
                            for a in self.config.key_servers],
            "role": self.role.status(),
        }
