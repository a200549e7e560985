# -*- test-case-name: tests.test_addresses -*-
"""
Names on a securelan subnet: MAC addresses and member IDs.

MACs travel and are compared as 6-byte ``bytes`` (cheap on the per-frame
path); they are parsed from and formatted to the usual colon form only at the
edges (configs, logs, the store, the CLI).
"""

import ipaddress
import re

import attrs

_MAC_TEXT = re.compile(r"^[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}$")
_MEMBER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

BROADCAST_MAC = b"\xff" * 6


class AddressError(ValueError):
    """
    A MAC address or member ID is malformed.
    """


def parse_mac(text: str) -> bytes:
    """
    Parse ``aa:bb:cc:dd:ee:ff`` (or with dashes) into 6 bytes.

    @raise AddressError: if C{text} is not a MAC address.
    """
    if not isinstance(text, str) or not _MAC_TEXT.fullmatch(text):
        raise AddressError(f"not a MAC address: {text!r}")
    return bytes.fromhex(text.replace(":", "").replace("-", ""))


def format_mac(mac: bytes) -> str:
    """
    Format 6 bytes as a lower-case, colon-separated MAC address.
    """
    return mac.hex(":")


def check_mac(mac: bytes) -> bytes:
    """
    Return C{mac} if it is 6 bytes, else raise L{AddressError}.
    """
    if not isinstance(mac, bytes) or len(mac) != 6:
        raise AddressError("a MAC address is 6 bytes")
    return mac


def is_group_mac(mac: bytes) -> bool:
    """
    Whether C{mac} is a multicast or broadcast address (the I/G bit is set).
    """
    return bool(mac[0] & 0x01)


def check_member_id(member_id: str) -> str:
    """
    Return C{member_id} if it is a valid member ID, else raise L{AddressError}.

    Member IDs are 1 to 63 characters of letters, digits, ``.``, ``_`` and
    ``-``, starting with a letter or digit.  Names beginning with ``@`` are
    reserved for the key server's own virtual IDs (the group ID).
    """
    if not isinstance(member_id, str) or not _MEMBER_ID.fullmatch(member_id):
        raise AddressError(f"not a valid member ID: {member_id!r}")
    return member_id


def pair_of(id_1: str, id_2: str) -> tuple[str, str]:
    """
    The canonical (sorted) form of an unordered pair of member IDs: the index
    of the pair-key table, so K(1,2) and K(2,1) are one key.
    """
    return (id_1, id_2) if id_1 <= id_2 else (id_2, id_1)


_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]*\]|[0-9.]*):(?P<port>[0-9]{1,5})$")


def parse_host_port(text: str, default_host=None):
    """
    Parse an underlay endpoint ``address:port`` (``[v6]:port`` for IPv6);
    with C{default_host}, a bare ``:port`` takes that host.  An IPv4 address
    mapped into IPv6 comes back as IPv4; scoped IPv6 addresses are refused.

    @return: C{(address, port)} with C{address} an C{ipaddress} object.
    @raise AddressError: if C{text} is not such an endpoint.
    """
    m = _HOST_PORT.fullmatch(text) if isinstance(text, str) else None
    if not m or not 0 < int(m["port"]) < 65536:
        raise AddressError(f"endpoint {text!r} is not address:port")
    host = m["host"].strip("[]")
    if not host:
        if default_host is None:
            raise AddressError(f"endpoint {text!r} has no address")
        host = default_host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise AddressError(f"endpoint host {host!r} is not an IP address") from None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address, int(m["port"])


def format_host_port(address, port: int) -> str:
    """
    The text form of an endpoint: ``a.b.c.d:port`` or ``[v6]:port``.
    """
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


_KEYSERVER_ADDRESS = re.compile(r"^(?:(?P<name>[^@\s]+)@)?(?P<host>\[[0-9a-fA-F:.]+\]|[^:@\s\[\]]+):(?P<port>\d+)$")


@attrs.frozen
class KeyServerAddress:
    """
    Where a key server is (C{host}, C{port}) and the name its certificate
    must carry (C{name}; the host when not given).
    """

    name: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "KeyServerAddress":
        """
        Parse ``host:port`` or ``name@host:port`` (``[v6]`` in brackets).

        @raise ValueError: if C{text} is neither.
        """
        m = _KEYSERVER_ADDRESS.fullmatch(text)
        if not m or not 0 < int(m["port"]) < 65536:
            raise ValueError(f"{text!r} is not host:port or name@host:port")
        host = m["host"].strip("[]")
        return cls(name=m["name"] or host, host=host, port=int(m["port"]))

    def __str__(self):
        return f"{self.name}@{self.host}:{self.port}"


#: The EtherTypes of IPv4 and IPv6 (how an IP packet travels in a frame).
ETHERTYPE_IPV4 = b"\x08\x00"
ETHERTYPE_IPV6 = b"\x86\xdd"


def ip_packet_addresses(packet):
    """
    The source and destination addresses of an IP packet, as packed bytes
    (4 or 16 each), or None when C{packet} does not begin with a whole IPv4
    or IPv6 header.
    """
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return bytes(packet[12:16]), bytes(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return bytes(packet[8:24]), bytes(packet[24:40])
    return None
