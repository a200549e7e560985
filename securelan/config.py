# -*- test-case-name: tests.test_config -*-
"""
Configuration files (TOML) for the key server and the agent.

Loading checks every key: a missing, mistyped or unknown key is a
L{ConfigError} that names the file and the key in one line, so an operator
can fix it without reading a traceback.  Relative paths are taken relative to
the configuration file's folder.
"""

import ipaddress
import os
import tomllib

import attrs
from twisted.internet.endpoints import _parseServer

from .addresses import (
    AddressError,
    KeyServerAddress,
    check_member_id,
    is_group_mac,
    parse_host_port,
    parse_mac,
)

_REQUIRED = object()


class ConfigError(Exception):
    """
    A configuration file is unreadable, malformed or has a bad value.
    """

    def __init__(self, path: str, key: str | None, message: str):
        self.path = path
        self.key = key
        # One line, whatever the value or the parser's own message held.
        self.message = message = " ".join(str(message).split())
        shown_path, shown_key = _printable(path), _printable(key) if key else key
        super().__init__(f"{shown_path}: {shown_key}: {message}" if key else f"{shown_path}: {message}")


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)


class _Table:
    """
    One TOML table being read, remembering which keys were used so that
    unknown (usually misspelt) keys are reported.
    """

    def __init__(self, path: str, prefix: str, data: dict):
        self.path = path
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def _name(self, key):
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key, message):
        return ConfigError(self.path, self._name(key), message)

    def _get(self, key, default):
        self.used.add(key)
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self.error(key, "is required")
        return default

    def string(self, key, default=_REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, "must be a non-empty string")
        if "\0" in value:
            raise self.error(key, "must not contain a NUL character")
        return value

    def integer(self, key, default=_REQUIRED, minimum=None, maximum=None) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "must be an integer")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum}")
        return value

    def number(self, key, default=_REQUIRED, minimum=None) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, "must be a number")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}")
        return float(value)

    def path_value(self, key, default=_REQUIRED) -> str:
        value = self.string(key, default)
        if value == ":memory:":
            return value
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), os.path.expanduser(value))

    def choice(self, key, choices, default=_REQUIRED) -> str:
        value = self.string(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}")
        return value

    def endpoint(self, key, default=_REQUIRED) -> str:
        value = self.string(key, default)
        try:
            _parseServer(value, None)
        except Exception as e:
            # The endpoint parser raises many kinds of errors on bad text.
            raise self.error(key, f"not a server endpoint description ({e})") from None
        return value

    def table(self, key) -> "_Table":
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return _Table(self.path, self._name(key), value)

    def done(self):
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _load_toml(path: str) -> _Table:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, f"not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(path, None, "not valid TOML: nested too deeply") from None
    return _Table(path, "", data)


def _store_spec(table: _Table, key: str, default: str) -> str:
    """
    A store is ``sqlite:PATH`` (relative to the config), ``:memory:``, or a
    URL that L{securelan.store.open_store} understands.
    """
    value = table.string(key, default)
    if value.startswith("sqlite:") and not value.startswith("sqlite:///"):
        relative = value[len("sqlite:"):]
        base = os.path.dirname(os.path.abspath(table.path))
        return "sqlite:" + os.path.join(base, relative)
    return value


def _unused(table: _Table, key: str) -> str:
    """
    An optional setting left out (or ""): off.
    """
    table.used.add(key)
    return ""


def _optional_path(table: _Table, key: str, default: str) -> str:
    """
    A path, or "" to turn the feature off.
    """
    if table.data.get(key) == "":
        table.used.add(key)
        return ""
    return table.path_value(key, default)


@attrs.frozen
class Limits:
    """
    What one key server allows, so no peer can exhaust it.
    """

    max_connections: int = 20000
    #: Connections from one address at most (NAT gateways need headroom).
    max_connections_per_source: int = 1000
    #: New connections (TLS handshakes) a second from one address, and the
    #: burst allowed: a handshake costs the key server far more than the
    #: sender, so no address may make it do them without limit.
    connections_per_second_per_source: float = 100.0
    connection_burst_per_source: int = 1000
    max_members: int = 100000
    max_pair_keys: int = 5000000
    max_request_bytes: int = 4096
    requests_per_second: float = 200.0
    request_burst: int = 400
    #: Seconds a connection may take to complete TLS and register.
    register_timeout: float = 15.0
    #: Seconds a registered session may stay silent (agents ping every 30).
    idle_timeout: float = 120.0
    #: MACs of plaintext hosts that gateways front, at most, and for how
    #: many seconds a binding lasts from when it was made.
    max_foreign_macs: int = 100000
    foreign_mac_ttl: float = 3600.0


NETKEY_LIFETIME = 86400


@attrs.frozen
class NetKeyPeer:
    """
    A peer subnet whose key server this one agrees a NETKEY with.
    """

    #: The peer subnet's name (its key server's C{subnet}).
    subnet: str
    #: The DNS name its key server's certificate must carry.
    name: str
    #: The peer subnet's CA certificate (its key server's must chain to it).
    ca: str
    #: Where its peering listener is, when this key server connects to it
    #: (the follower: the one whose subnet name sorts after the other's).
    host: str = ""
    port: int = 0


@attrs.frozen
class NetKeyConfig:
    """
    Links to other encrypted subnets through this subnet's border (the
    seed's layer-3 port).  Empty when the subnet has none.
    """

    #: Where peer key servers connect (a server endpoint; "" for none).
    listen: str = ""
    #: What sits behind this subnet's border, told to the peers.
    prefixes: tuple = ()
    #: The member ID of this subnet's border (the only member that may
    #: fetch NETKEYs), and its WAN endpoint ``host:port``.
    border: str = ""
    border_endpoint: str = ""
    #: The border's address on the subnet's overlay (its TAP device): when
    #: set, members are told to route the peer subnets' prefixes through
    #: it ("" to leave routes to the operator).
    border_address: str = ""
    #: Seconds a NETKEY lives before the leader replaces it (0: forever).
    lifetime: int = NETKEY_LIFETIME
    peers: tuple = ()


@attrs.frozen
class KeyServerConfig:
    """
    A key server's configuration (see C{etc/keyserver.toml}).
    """

    path: str
    subnet: str
    listen: str
    ca: str
    certificate: str
    private_key: str
    store: str
    master_key: str
    pair_key_lifetime: int
    limits: Limits
    #: Datagrams or bytes a sender may send under one epoch of a pair key
    #: before it asks for the next (0: no limit).
    pair_key_max_packets: int = 0
    pair_key_max_bytes: int = 0
    #: Seconds between group rekeys (0: never, as the seed does; the group
    #: key is replaced on every revocation anyway).
    group_key_lifetime: int = 0
    #: The control socket of `securelan members|keys|revoke` ("" for none).
    admin_socket: str = "/run/securelan/keyserver.sock"
    #: Where Prometheus scrapes /metrics: a server endpoint ("" for none).
    metrics: str = ""
    netkey: NetKeyConfig = NetKeyConfig()


def load_keyserver_config(path: str) -> KeyServerConfig:
    """
    Read and check a key server configuration file.

    @raise ConfigError: naming the file and key at fault.
    """
    top = _load_toml(path)
    ks = top.table("keyserver")
    subnet = ks.string("subnet")
    try:
        check_member_id(subnet)
    except AddressError:
        raise ks.error("subnet", "must be 1-63 letters, digits, '.', '_' or '-'") from None
    state_dir = ks.path_value("state_dir", "/var/lib/securelan")
    config = KeyServerConfig(
        path=path,
        subnet=subnet,
        listen=ks.endpoint("listen", "tcp:7443"),
        ca=ks.path_value("ca"),
        certificate=ks.path_value("certificate"),
        private_key=ks.path_value("private_key"),
        store=_store_spec(ks, "store", "sqlite:" + os.path.join(state_dir, "keyserver.sqlite")),
        master_key=ks.path_value("master_key", os.path.join(state_dir, "master.key")),
        pair_key_lifetime=ks.integer("pair_key_lifetime", 86400, minimum=0),
        pair_key_max_packets=ks.integer("pair_key_max_packets", 0, minimum=0, maximum=2**60),
        pair_key_max_bytes=ks.integer("pair_key_max_bytes", 0, minimum=0, maximum=2**62),
        group_key_lifetime=ks.integer("group_key_lifetime", 0, minimum=0),
        limits=_limits(top.table("limits")),
        admin_socket=_optional_path(ks, "admin_socket", DEFAULT_ADMIN_SOCKET),
        metrics=ks.endpoint("metrics", "") if ks.data.get("metrics") else _unused(ks, "metrics"),
        netkey=_netkey(top.table("netkey"), subnet),
    )
    ks.done()
    top.done()
    return config


def _prefixes(t: _Table, key: str) -> tuple:
    value = t._get(key, [])
    if not isinstance(value, list):
        raise t.error(key, 'must be a list like ["10.1.0.0/24"]')
    prefixes = []
    for text in value:
        try:
            prefixes.append(str(ipaddress.ip_network(text, strict=True)))
        except (ValueError, TypeError):
            raise t.error(key, f"{text!r} is not a network like 10.1.0.0/24 (host bits clear)") from None
    return tuple(prefixes)


def _netkey(t: _Table, subnet: str) -> NetKeyConfig:
    entries = t._get("peer", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise t.error("peer", "must be an array of tables ([[netkey.peer]])")
    peers, seen = [], set()
    for index, entry in enumerate(entries):
        p = _Table(t.path, f"netkey.peer[{index}]", entry)
        peer_subnet = p.string("subnet")
        try:
            check_member_id(peer_subnet)
        except AddressError:
            raise p.error("subnet", "must be 1-63 letters, digits, '.', '_' or '-'") from None
        if peer_subnet == subnet:
            raise p.error("subnet", "is this key server's own subnet")
        if peer_subnet in seen:
            raise p.error("subnet", f"{peer_subnet!r} is listed twice")
        seen.add(peer_subnet)
        host, port = "", 0
        if "address" in p.data:
            try:
                address = KeyServerAddress.parse(p.string("address"))
            except (ValueError, TypeError):
                raise p.error("address", "must be host:port") from None
            host, port = address.host, address.port
        elif peer_subnet < subnet:
            # The follower connects; the leader only listens.
            raise p.error("address", f"is required: subnet {subnet!r} sorts after {peer_subnet!r}, "
                                     "so this key server connects to that one")
        peers.append(NetKeyPeer(subnet=peer_subnet, name=p.string("name"), ca=p.path_value("ca"),
                                host=host, port=port))
        p.done()
    config = NetKeyConfig(
        listen=t.endpoint("listen", "") if t.data.get("listen") else _unused(t, "listen"),
        prefixes=_prefixes(t, "prefixes"),
        border=t.string("border", "") if "border" in t.data else "",
        border_endpoint=t.string("border_endpoint", "") if "border_endpoint" in t.data else "",
        border_address=t.string("border_address", "") if "border_address" in t.data else "",
        lifetime=t.integer("lifetime", NETKEY_LIFETIME, minimum=0),
        peers=tuple(peers),
    )
    if peers:
        for key in ("prefixes", "border", "border_endpoint"):
            if not getattr(config, key):
                raise t.error(key, "is required when [[netkey.peer]] lists peer subnets")
        try:
            check_member_id(config.border)
        except AddressError:
            raise t.error("border", "must be a member ID") from None
        try:
            parse_host_port(config.border_endpoint)
        except AddressError:
            raise t.error("border_endpoint", "must be address:port (the border's WAN endpoint)") from None
        if config.border_address:
            try:
                ipaddress.ip_address(config.border_address)
            except ValueError:
                raise t.error("border_address", "must be the border's overlay IP address") from None
        if any(p.subnet > subnet for p in peers) and not config.listen:
            raise t.error("listen", "is required: key servers of subnets that sort after this one "
                                    "connect to it")
    t.done()
    return config


def _limits(t: _Table) -> Limits:
    d = Limits()
    limits = Limits(
        max_connections=t.integer("max_connections", d.max_connections, minimum=1),
        max_connections_per_source=t.integer("max_connections_per_source", d.max_connections_per_source,
                                             minimum=1),
        connections_per_second_per_source=t.number("connections_per_second_per_source",
                                                   d.connections_per_second_per_source, minimum=0.01),
        connection_burst_per_source=t.integer("connection_burst_per_source", d.connection_burst_per_source,
                                              minimum=1),
        max_members=t.integer("max_members", d.max_members, minimum=1),
        max_pair_keys=t.integer("max_pair_keys", d.max_pair_keys, minimum=1),
        max_request_bytes=t.integer("max_request_bytes", d.max_request_bytes, minimum=512, maximum=65536),
        requests_per_second=t.number("requests_per_second", d.requests_per_second, minimum=0.001),
        request_burst=t.integer("request_burst", d.request_burst, minimum=1),
        register_timeout=t.number("register_timeout", d.register_timeout, minimum=1),
        idle_timeout=t.number("idle_timeout", d.idle_timeout, minimum=10),
        max_foreign_macs=t.integer("max_foreign_macs", d.max_foreign_macs, minimum=1),
        foreign_mac_ttl=t.number("foreign_mac_ttl", d.foreign_mac_ttl, minimum=10),
    )
    t.done()
    return limits


# The agent ------------------------------------------------------------------

DEFAULT_ADMIN_SOCKET = "/run/securelan/keyserver.sock"

#: The roles an agent can take.
AGENT_ROLES = ("client", "gateway", "border")
CARRIER_NAMES = ("udp", "ethernet")
DEFAULT_STATUS_SOCKET = "/run/securelan/agent.sock"


@attrs.frozen
class DeviceConfig:
    """
    The device the agent creates: a TAP device (layer 2, the default) or a
    TUN device (layer 3: keys are looked up by the peers' overlay IPs).
    """

    name: str = "slan0"
    type: str = "tap"
    #: The device's MAC; None to derive a stable one from the member ID.
    mac: bytes | None = None
    #: 0: the largest MTU whose frames fit one carrier datagram.
    mtu: int = 0
    addresses: tuple = ()


@attrs.frozen
class CarrierConfig:
    """
    How the agent reaches its peers.
    """

    type: str = "udp"
    #: udp: the address and port to listen on.
    listen: str = "0.0.0.0"
    port: int = 51871
    #: udp: the endpoint to register; ":port" lets the key server fill in
    #: the address it sees the agent connect from.
    advertise: str = ""
    #: ethernet: the LAN interface that carries securelan frames.
    interface: str = ""
    #: The underlay's MTU (of the LAN interface or the path to peers).
    underlay_mtu: int = 1500
    #: udp, behind a NAT: seconds without sending to a peer after which a
    #: keepalive goes to it (holds the NAT's mapping); 0 for none.
    keepalive: float = 0.0


@attrs.frozen
class QueueConfig:
    """
    Frames that wait for a key (beyond the seed, which drops them).
    """

    per_peer: int = 64
    total: int = 1024
    timeout: float = 2.0


@attrs.frozen
class GatewayConfig:
    """
    The gateway role: the bridge on the plaintext network that the TAP
    device joins.
    """

    bridge: str = ""


@attrs.frozen
class BorderConfig:
    """
    The border role: the TUN device its kernel routes other subnets' traffic
    into, and the UDP socket (on the WAN) where peer borders reach it.
    """

    tun: str = "slnet0"
    listen: str = "0.0.0.0"
    port: int = 51872
    underlay_mtu: int = 1500
    #: Seconds without sending after which a link sends a keepalive (holds
    #: a NAT's mapping); 0 for none.
    keepalive: float = 25.0


@attrs.frozen
class AgentConfig:
    """
    An agent's configuration (see C{etc/agent.toml}).
    """

    path: str
    role: str
    ca: str
    certificate: str
    private_key: str
    key_servers: tuple
    on_key_miss: str
    status_socket: str
    device: DeviceConfig
    carrier: CarrierConfig
    queue: QueueConfig
    gateway: GatewayConfig = GatewayConfig()
    border: BorderConfig = BorderConfig()
    #: Where Prometheus scrapes /metrics: a server endpoint ("" for none).
    metrics: str = ""


def _mac_value(t: _Table, key: str):
    value = t._get(key, None)
    if value is None:
        return None
    try:
        mac = parse_mac(value)
    except AddressError:
        raise t.error(key, "not a MAC address like 02:00:00:00:00:01") from None
    if is_group_mac(mac):
        raise t.error(key, "must be a unicast MAC (first octet even)")
    return mac


def load_agent_config(path: str) -> AgentConfig:
    """
    Read and check an agent configuration file.

    @raise ConfigError: naming the file and key at fault.
    """
    top = _load_toml(path)
    ag = top.table("agent")
    servers = ag._get("key_servers", [])
    if not isinstance(servers, list) or not servers:
        raise ag.error("key_servers", 'must be a non-empty list like ["name@10.0.0.1:7443"]')
    parsed = []
    for text in servers:
        try:
            parsed.append(KeyServerAddress.parse(text))
        except (ValueError, TypeError):
            raise ag.error("key_servers", f"{text!r} is not host:port or name@host:port") from None

    dev = top.table("device")
    addresses = dev._get("addresses", [])
    if not isinstance(addresses, list):
        raise dev.error("addresses", 'must be a list like ["10.77.0.1/24"]')
    for address in addresses:
        try:
            ipaddress.ip_interface(address)
        except (ValueError, TypeError):
            raise dev.error("addresses", f"{address!r} is not an address/prefix") from None
    d = DeviceConfig()
    name = dev.string("name", d.name)
    if len(name) > 15 or "/" in name or " " in name:
        raise dev.error("name", "must be an interface name of at most 15 characters")
    device = DeviceConfig(
        name=name,
        type=dev.choice("type", ("tap", "tun"), "tap"),
        mac=_mac_value(dev, "mac"),
        mtu=dev.integer("mtu", 0, minimum=0, maximum=65535),
        addresses=tuple(addresses),
    )
    if device.mtu and device.mtu < 576:
        raise dev.error("mtu", "must be 0 (automatic) or at least 576")
    dev.done()

    car = top.table("carrier")
    c = CarrierConfig()
    carrier = CarrierConfig(
        type=car.choice("type", CARRIER_NAMES, c.type),
        listen=car.string("listen", c.listen),
        port=car.integer("port", c.port, minimum=1, maximum=65535),
        advertise=car.string("advertise", "") if "advertise" in car.data else "",
        interface=car.string("interface", "") if "interface" in car.data else "",
        # 1280 (IPv6's minimum) leaves room for a 64 KiB TSO super-frame in
        # the 64 pieces a frame may have.
        underlay_mtu=car.integer("underlay_mtu", c.underlay_mtu, minimum=1280, maximum=65535),
        keepalive=car.number("keepalive", c.keepalive, minimum=0),
    )
    try:
        ipaddress.ip_address(carrier.listen)
    except ValueError:
        raise car.error("listen", "must be an IP address to listen on") from None
    if carrier.type == "ethernet" and not carrier.interface:
        raise car.error("interface", "is required with type = \"ethernet\"")
    car.done()

    q = top.table("queue")
    qd = QueueConfig()
    queue = QueueConfig(
        per_peer=q.integer("per_peer", qd.per_peer, minimum=1),
        total=q.integer("total", qd.total, minimum=1),
        timeout=q.number("timeout", qd.timeout, minimum=0.01),
    )
    q.done()

    gw = top.table("gateway")
    gateway = GatewayConfig(bridge=gw.string("bridge", "") if "bridge" in gw.data else "")
    gw.done()

    bo = top.table("border")
    b = BorderConfig()
    border = BorderConfig(
        tun=bo.string("tun", b.tun),
        listen=bo.string("listen", b.listen),
        port=bo.integer("port", b.port, minimum=1, maximum=65535),
        underlay_mtu=bo.integer("underlay_mtu", b.underlay_mtu, minimum=1280, maximum=65535),
        keepalive=bo.number("keepalive", b.keepalive, minimum=0),
    )
    if len(border.tun) > 15 or "/" in border.tun or " " in border.tun:
        raise bo.error("tun", "must be an interface name of at most 15 characters")
    if border.tun == device.name:
        raise bo.error("tun", f"must differ from the TAP device's name ({device.name})")
    try:
        ipaddress.ip_address(border.listen)
    except ValueError:
        raise bo.error("listen", "must be an IP address to listen on") from None
    bo.done()

    config = AgentConfig(
        path=path,
        role=ag.choice("role", AGENT_ROLES, "client"),
        ca=ag.path_value("ca"),
        certificate=ag.path_value("certificate"),
        private_key=ag.path_value("private_key"),
        key_servers=tuple(parsed),
        on_key_miss=ag.choice("on_key_miss", ("queue", "drop"), "queue"),
        status_socket=ag.path_value("status_socket", DEFAULT_STATUS_SOCKET),
        device=device,
        carrier=carrier,
        queue=queue,
        gateway=gateway,
        border=border,
        metrics=ag.endpoint("metrics", "") if ag.data.get("metrics") else _unused(ag, "metrics"),
    )
    if device.type == "tun" and config.role != "client":
        raise dev.error("type", f'"tun" (layer 3) is for role = "client"; a {config.role} needs "tap"')
    if device.type == "tun" and not device.addresses:
        raise dev.error("addresses", 'is required with type = "tun": the key server looks members up by them')
    if config.role == "gateway" and not gateway.bridge:
        raise gw.error("bridge", "is required with role = \"gateway\": the bridge on the plaintext network")
    ag.done()
    top.done()
    return config
