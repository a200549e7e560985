# -*- test-case-name: tests.test_doctor -*-
"""
``securelan doctor``: check a key server's or an agent's configuration
before (or while) running it: the file itself, the certificates (chain,
expiry, key), the state it needs, and for an agent its right to create a
TAP device and the reachability of its key servers (a real TLS handshake,
which must be post-quantum; nothing is registered).
"""

import datetime
import os

import attrs
from OpenSSL import SSL
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from . import pki
from .agent.roles import _read_forwarding
from .config import ConfigError, load_agent_config, load_keyserver_config
from .tls import EXPECTED_GROUP, Credentials, TLSConfigError, describe_tls_failure, negotiated_group

#: A certificate that expires sooner than this is a warning.
EXPIRY_WARNING = datetime.timedelta(days=30)


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        mark = "ok" if self.ok and not self.warning else ("warn" if self.ok else "FAIL")
        return f"[{mark:>4}] {self.name}: {self.detail}"


def _certificate_checks(ca_path, cert_path, key_path, now):
    checks = []
    try:
        ca = pki.load_certificate(ca_path)
        cert = pki.load_certificate(cert_path)
    except pki.PKIError as e:
        return [Check("certificates", False, str(e))]
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               *_signature_args(cert))
        checks.append(Check("certificate chain", True, f"{cert_path} is signed by {ca_path}"))
    except Exception:
        checks.append(Check("certificate chain", False, f"{cert_path} is not signed by the CA {ca_path}"))
    for path, c in ((ca_path, ca), (cert_path, cert)):
        left = c.not_valid_after_utc - now
        if left.total_seconds() <= 0:
            checks.append(Check(f"expiry of {os.path.basename(path)}", False, f"expired {c.not_valid_after_utc:%Y-%m-%d}"))
        elif c.not_valid_before_utc > now:
            checks.append(Check(f"expiry of {os.path.basename(path)}", False,
                                f"not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M}"))
        else:
            checks.append(Check(f"expiry of {os.path.basename(path)}", True,
                                f"valid until {c.not_valid_after_utc:%Y-%m-%d} ({left.days} days)",
                                warning=left < EXPIRY_WARNING))
    try:
        Credentials.load(ca_path, cert_path, key_path)
        checks.append(Check("private key", True, f"{key_path} matches the certificate"))
    except TLSConfigError as e:
        checks.append(Check("private key", False, str(e)))
    mode = os.stat(key_path).st_mode & 0o777 if os.path.exists(key_path) else None
    if mode is not None and mode & 0o077:
        checks.append(Check("private key mode", True, f"{key_path} is mode {mode:04o}; 0600 is safer",
                            warning=True))
    return checks


def _signature_args(cert):
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = cert.public_key()
    algorithm = cert.signature_hash_algorithm
    if isinstance(key, ec.EllipticCurvePublicKey):
        return (ec.ECDSA(algorithm),)
    if isinstance(key, rsa.RSAPublicKey):
        return (padding.PKCS1v15(), algorithm)
    return ()


@implementer(IHandshakeListener)
class _Handshake(protocol.Protocol):
    def __init__(self):
        self.done = defer.Deferred()

    def handshakeCompleted(self):
        self.done.callback(negotiated_group(self.transport))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)


@defer.inlineCallbacks
def _reach(reactor, credentials, address, timeout=5):
    proto = _Handshake()
    endpoint = wrapClientTLS(credentials.client_options(address.name),
                             HostnameEndpoint(reactor, address.host, address.port, timeout=timeout))
    try:
        yield connectProtocol(endpoint, proto)
        group = yield proto.done
    except Exception as e:
        reason = describe_tls_failure(e) if isinstance(getattr(e, "value", e), SSL.Error) else str(e)
        return Check(f"key server {address}", False, f"unreachable or refused: {reason}")
    if group != EXPECTED_GROUP:
        return Check(f"key server {address}", False, f"key exchange {group}, not {EXPECTED_GROUP}")
    return Check(f"key server {address}", True, f"TLS 1.3 handshake done, key exchange {group}")


@defer.inlineCallbacks
def check_agent(reactor, path):
    """
    The checks of an agent configuration; fires with a list of L{Check}.
    """
    from .agent.tap import _can_create_tap, choose_mac

    try:
        config = load_agent_config(path)
    except ConfigError as e:
        return [Check("configuration", False, str(e))]
    checks = [Check("configuration", True, f"{path} ({config.role}, {config.carrier.type} carrier)")]
    now = datetime.datetime.now(datetime.timezone.utc)
    checks += _certificate_checks(config.ca, config.certificate, config.private_key, now)
    try:
        identity = pki.member_identity(pki.load_certificate(config.certificate))
        checks.append(Check("member identity", identity.allows_role(config.role),
                            f"{identity.member_id}, roles {', '.join(sorted(identity.roles))}"))
        checks.append(Check("device MAC", True, choose_mac(config, identity).hex(":")))
    except (pki.PKIError, ConfigError) as e:
        checks.append(Check("member identity", False, str(e)))
    problem = _can_create_tap()
    checks.append(Check("TAP device", problem is None, problem or "this process may create TAP devices"))
    if config.role == "border":
        forwarding = _read_forwarding()
        checks.append(Check("IP forwarding", forwarding == "1",
                            "on" if forwarding == "1" else
                            "off: the border cannot route (sysctl -w net.ipv4.ip_forward=1)"))
    if not any(c.name in ("certificates", "private key") and not c.ok for c in checks):
        credentials = Credentials.load(config.ca, config.certificate, config.private_key)
        for address in config.key_servers:
            checks.append((yield _reach(reactor, credentials, address)))
    return checks


def check_keyserver(path):
    """
    The checks of a key server configuration: a list of L{Check}.
    """
    try:
        config = load_keyserver_config(path)
    except ConfigError as e:
        return [Check("configuration", False, str(e))]
    checks = [Check("configuration", True, f"{path} (subnet {config.subnet}, listen {config.listen})")]
    now = datetime.datetime.now(datetime.timezone.utc)
    checks += _certificate_checks(config.ca, config.certificate, config.private_key, now)
    if config.store.startswith("sqlite:") or "://" not in config.store:
        folder = os.path.dirname(config.store.removeprefix("sqlite:").removeprefix("//")) or "."
        checks.append(Check("state folder", os.access(folder, os.W_OK), f"{folder} is "
                            + ("writable" if os.access(folder, os.W_OK) else "not writable")))
    if config.netkey.peers:
        from .keyserver.peering import load_peer_ca

        names = pki.keyserver_names(pki.load_certificate(config.certificate)) \
            if not any(c.name == "certificates" for c in checks) else []
        for peer in config.netkey.peers:
            try:
                load_peer_ca(peer)
                checks.append(Check(f"peer subnet {peer.subnet}", True,
                                    f"CA {peer.ca}; its key server must be {peer.name}; "
                                    + ("this one connects to it" if peer.subnet < config.subnet
                                       else "it connects to this one")))
            except TLSConfigError as e:
                checks.append(Check(f"peer subnet {peer.subnet}", False, str(e)))
        checks.append(Check("key server name", bool(names),
                            f"peers check this key server by its name: {', '.join(names) or 'none in the certificate'}"))
    master = config.master_key
    if os.path.exists(master):
        mode = os.stat(master).st_mode & 0o777
        checks.append(Check("master key", not mode & 0o077, f"{master} mode {mode:04o}"))
    else:
        checks.append(Check("master key", True, f"{master} will be made at first start", warning=True))
    return checks
