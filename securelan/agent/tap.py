# -*- test-case-name: tests.test_agent_process -*-
"""
``twistd securelan-agent``: options and service assembly.

Configuration, credentials and the device's MAC are checked before the
reactor runs: a failure prints one line naming the file at fault and exits
non-zero.
"""

import os
import sys

from .._startup import DaemonOptions

from ..config import ConfigError, load_agent_config
from ..pki import PKIError, load_certificate, member_identity
from ..tls import Credentials, TLSConfigError
from .service import AgentService, derived_mac


CAP_NET_ADMIN = 12


class Options(DaemonOptions):
    longdesc = "Run a securelan member agent (see etc/agent.toml)."
    what = "agent"


def _fail(message):
    print(f"securelan-agent: {message}", file=sys.stderr)
    raise SystemExit(1)


def choose_mac(config, identity):
    """
    The device's MAC: the configured one, else the one the certificate pins,
    else one derived from the member ID.
    """
    if config.device.mac is not None:
        if not identity.allows_mac(config.device.mac):
            raise ConfigError(config.path, "device.mac",
                              f"the certificate of {identity.member_id} does not allow this MAC")
        return config.device.mac
    if len(identity.macs) == 1:
        return next(iter(identity.macs))
    if identity.macs:
        raise ConfigError(config.path, "device.mac",
                          "the certificate pins several MACs: choose one")
    return derived_mac(identity.member_id)


def _can_create_tap() -> str | None:
    """
    Why this process cannot create a TAP device, or None if it can.
    """
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing: load the tun module (modprobe tun)"
    try:
        with open("/proc/self/status") as f:
            caps = next(line for line in f if line.startswith("CapEff:"))
        if int(caps.split()[1], 16) & (1 << CAP_NET_ADMIN):
            return None
    except (OSError, StopIteration, ValueError):
        if os.geteuid() == 0:
            return None
    return "no permission to create a TAP device: run the agent as root or with CAP_NET_ADMIN"


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_agent_config(options["config"])
        credentials = Credentials.load(config.ca, config.certificate, config.private_key)
        identity = member_identity(load_certificate(config.certificate))
        if not identity.allows_role(config.role):
            raise ConfigError(config.path, "agent.role",
                              f"the certificate of {identity.member_id} does not allow role {config.role}")
        mac = choose_mac(config, identity)
    except (ConfigError, TLSConfigError, PKIError) as e:
        _fail(str(e))
    problem = _can_create_tap()
    if problem:
        _fail(problem)
    return AgentService(config, credentials, mac, reactor)
