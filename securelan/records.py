"""
The key server's records: members, pair keys and the group key.

These are the seed's three lists, in our words: the member registry (ID-MAC
list), the pair-key table (ID-ID-KEY list) and the group key (ID_M, KEY_M).
"""

from attrs import field, frozen

from .addresses import format_mac
from .keys import SecretKey

#: Roles a member may register with; its certificate must allow the role.
ROLES = ("client", "gateway", "border")

#: The reserved ID of the subnet's group (the seed's ID_M).
GROUP_ID = "@group"


@frozen
class Member:
    """
    One entry of the member registry: who (from the certificate), with which
    MAC, in which role, reachable at which underlay endpoint.
    """

    member_id: str
    role: str
    mac: bytes = field(repr=format_mac)
    #: ``host:port`` of the member's underlay (UDP) endpoint, or ``""``.
    endpoint: str
    registered_at: float
    #: Raised by the store at every registration (never 0 once stored): the
    #: member's agent mixes it into its sending keys, so an agent restarted
    #: with the same pair key never reuses a nonce.
    incarnation: int = 0
    #: The member's overlay IP addresses, in layer-3 (TUN) mode: keys are
    #: looked up by them, and no other member may hold them.  Sorted text
    #: forms; empty for a layer-2 member.
    addresses: tuple = field(default=(), converter=lambda a: tuple(sorted(a)))


@frozen
class PairKey:
    """
    One entry of the pair-key table: the key of the unordered pair
    ``(id_a, id_b)`` (``id_a <= id_b``) at key epoch C{epoch} (the seed's
    PW_ID).
    """

    id_a: str
    id_b: str
    epoch: int
    key: SecretKey
    created_at: float
    #: When the key should be replaced (seconds since the epoch); 0 for never.
    expires_at: float

    def peer_of(self, member_id: str) -> str:
        return self.id_b if member_id == self.id_a else self.id_a


@frozen
class GroupKey:
    """
    The subnet's group key (the seed's KEY_M), at key epoch C{epoch}.
    """

    epoch: int
    key: SecretKey
    created_at: float
