# -*- test-case-name: tests.test_agent -*-
"""
The key cache (the seed's MAC-KEY list) and what the agent knows of each
peer: its pair key's sending and receiving directions, its endpoint, and
counters for C{securelan status}.

Keys are derived here once per key, epoch and incarnation, never per frame.
"""

from collections import OrderedDict

from ..ratelimit import TokenBucket
from ..wire import TYPE_GROUP, TYPE_PAIR, Opener, Sealer, derive_group_key, derive_pair_key


class Stats:
    """
    Frames, bytes and drops of one peer (or of the whole agent).
    """

    __slots__ = ("tx_frames", "tx_bytes", "rx_frames", "rx_bytes", "last_tx", "last_rx", "drops")

    def __init__(self):
        self.tx_frames = self.tx_bytes = self.rx_frames = self.rx_bytes = 0
        self.last_tx = self.last_rx = None
        self.drops: dict[str, int] = {}

    def drop(self, reason: str, n: int = 1):
        self.drops[reason] = self.drops.get(reason, 0) + n

    def as_dict(self):
        return {
            "tx_frames": self.tx_frames, "tx_bytes": self.tx_bytes,
            "rx_frames": self.rx_frames, "rx_bytes": self.rx_bytes,
            "last_tx": self.last_tx, "last_rx": self.last_rx,
            "drops": dict(self.drops),
        }


class Peer:
    """
    One entry of the key cache: the pair key shared with one member, as the
    key server granted it.

    The sending direction is derived from the pair key, the epoch, this
    agent's incarnation and the peer's; the receiving direction from the
    peer's incarnation in each header and this agent's.  The peer's
    incarnation only goes up: learnt from grants and from its authenticated
    datagrams (a peer that restarted).
    """

    __slots__ = ("member_id", "mac", "macs", "role", "endpoint_text", "endpoint", "epoch", "lifetime",
                 "granted_at", "sealer", "stats", "older", "switch_at", "epoch_bytes", "rekey_asked",
                 "overdue_warned",
                 "_key", "_my_id",
                 "_my_incarnation", "_peer_incarnation", "_opener", "_rx_incarnation", "_derivations",
                 "_resume", "_resync_at")

    def __init__(self, grant, my_id: str, my_incarnation: int, endpoint, clock, derivations,
                 resume=None):
        self.member_id = grant.peer_id
        self.mac = grant.peer_mac
        #: Every MAC this key is held against: one for a member host; for a
        #: gateway, also the plaintext hosts it fronts.
        self.macs = {grant.peer_mac}
        self.role = grant.peer_role
        self.endpoint_text = grant.peer_endpoint
        self.endpoint = endpoint
        self.epoch = grant.epoch
        self.lifetime = grant.lifetime
        self.granted_at = clock.seconds()
        self.stats = Stats()
        self._key = grant.key
        self._my_id = my_id
        self._my_incarnation = my_incarnation
        self._peer_incarnation = 0
        self._opener = None
        self._rx_incarnation = 0
        # A forged header naming a new incarnation costs a key derivation;
        # the agent bounds how often anyone can make it pay that.
        self._derivations = derivations
        #: Counters this key reached before (see L{Retired}).
        self._resume = resume or {}
        self.sealer = None
        #: The entries of the epochs before (at most a few, oldest first),
        #: each still accepted for receiving until its time:
        #: C{[(peer, until), ...]} (make-before-break rekey).
        self.older = []
        #: Until when to send under the newest of C{older} (see
        #: DataPlane.SWITCH_DELAY).
        self.switch_at = 0.0
        #: Bytes sent under this epoch, and whether the next was asked for
        #: (the key server's packet and byte limits).
        self.epoch_bytes = 0
        self.rekey_asked = False
        self.overdue_warned = False
        self._resync_at = 0.0
        self._send_to(max(1, grant.peer_incarnation))

    def __repr__(self):
        return f"<Peer {self.member_id} epoch {self.epoch}>"

    def _send_to(self, peer_incarnation: int):
        if peer_incarnation <= self._peer_incarnation:
            return
        if self.sealer is not None:
            self._resume[("tx", self._peer_incarnation)] = self.sealer.counter
        self._peer_incarnation = peer_incarnation
        key = derive_pair_key(self._key, self._my_id, self.member_id, self.epoch,
                              self._my_incarnation, peer_incarnation)
        self.sealer = Sealer(key, TYPE_PAIR, self.epoch, self._my_incarnation,
                             counter=self._resume.get(("tx", peer_incarnation), 0))

    def holds(self, grant) -> bool:
        """
        Whether C{grant} is the key this entry already uses (same peer,
        epoch and key): then its counters must go on, not restart.
        """
        return (grant.peer_id == self.member_id and grant.epoch == self.epoch
                and grant.key == self._key)

    def update(self, grant, endpoint):
        """
        The same key granted again, with the peer's current facts.
        """
        self.mac = grant.peer_mac
        self.role = grant.peer_role
        self.lifetime = grant.lifetime
        if grant.peer_endpoint != self.endpoint_text:
            self.endpoint_text = grant.peer_endpoint
            self.endpoint = endpoint
        self._send_to(grant.peer_incarnation)

    def opener_for(self, incarnation: int):
        """
        The receiving direction for the peer's C{incarnation}: the current
        one; a candidate for a newer one (the peer restarted), which becomes
        current only once a datagram authenticates under it (L{accept});
        None for an older incarnation or when derivations are exhausted.
        """
        if incarnation == self._rx_incarnation:
            return self._opener
        if incarnation < self._rx_incarnation or not self._derivations.take():
            return None
        key = derive_pair_key(self._key, self.member_id, self._my_id, self.epoch, incarnation,
                              self._my_incarnation)
        opener = Opener(key, TYPE_PAIR, self.epoch, incarnation)
        last = self._resume.get(("rx", incarnation))
        if last is not None:
            opener.reject_through(last)
        return opener

    def adopted(self, incarnation: int):
        """
        The receiving direction already adopted for C{incarnation}, or None.
        Two candidates for one incarnation derive the same key but keep two
        replay windows: a frame must be opened under the adopted one when
        there is one, or it could be accepted once in each.
        """
        return self._opener if incarnation == self._rx_incarnation else None

    def accept(self, opener, incarnation: int):
        """
        C{opener} authenticated a datagram: it is now the receiving
        direction, and the peer is known to run as C{incarnation}.
        """
        if incarnation != self._rx_incarnation:
            if self._opener is not None:
                self._resume[("rx", self._rx_incarnation)] = self._opener.last_counter
            self._opener = opener
            self._rx_incarnation = incarnation
            self._send_to(incarnation)

    def retire(self):
        """
        Where this key's counters stand, to go on from if the same key is
        granted again (after a purge, or a MAC change of the peer).
        """
        resume = dict(self._resume)
        if self.sealer is not None:
            resume[("tx", self._peer_incarnation)] = self.sealer.counter
        if self._opener is not None:
            resume[("rx", self._rx_incarnation)] = self._opener.last_counter
        return resume

    def may_resync(self, now: float) -> bool:
        """
        Whether a datagram of another epoch may make us ask the key server
        (the seed's PW_ID recovery) now: at most once a second per peer, so
        forged epochs cannot start a request storm.
        """
        if now < self._resync_at:
            return False
        self._resync_at = now + 1.0
        return True

    @property
    def rx_incarnation(self):
        return self._rx_incarnation

    @property
    def peer_incarnation(self):
        return self._peer_incarnation


class Retired:
    """
    Where the counters of keys no longer in the cache stand, by peer, epoch
    and key fingerprint (never the key itself), so that the same key granted
    again goes on from there: a sending counter never restarts under a key
    (no nonce is used twice) and a receiving window never forgets what it
    accepted (no replay).  Bounded: the oldest entries go first; a key
    granted again after its entry went is a key server bug, not an attack.
    """

    MAX = 16384

    def __init__(self):
        self._entries = OrderedDict()

    def put(self, peer: Peer):
        key = (peer.member_id, peer.epoch, peer._key.fingerprint)
        self._entries[key] = peer.retire()
        self._entries.move_to_end(key)
        while len(self._entries) > self.MAX:
            self._entries.popitem(last=False)

    def take(self, grant):
        return self._entries.pop((grant.peer_id, grant.epoch, grant.key.fingerprint), None)


class GroupState:
    """
    The group key (the seed's KEY_M) as this agent uses it: one sending
    direction under our own MAC, and a receiving direction per sender MAC
    (the seed's claims 5 and 10), each with its own replay window.
    """

    #: Senders whose receiving state is kept at most (oldest dropped first).
    MAX_SENDERS = 4096

    def __init__(self, grant, my_mac: bytes, my_incarnation: int, clock):
        self.epoch = grant.epoch
        self.granted_at = clock.seconds()
        self._key = grant.key
        self.sealer = Sealer(derive_group_key(grant.key, my_mac, grant.epoch, my_incarnation),
                             TYPE_GROUP, grant.epoch, my_incarnation)
        self._senders: dict[bytes, tuple] = {}
        self._sources: dict[bytes, Sealer] = {}
        self._my_mac = my_mac
        self._incarnation = my_incarnation
        self._derivations = TokenBucket(50.0, 100, clock)
        self._resync_at = 0.0
        self.stats = Stats()

    def may_resync(self, now: float) -> bool:
        """
        Whether a group datagram of a newer epoch may make us ask for the
        group key now (at most once a second).
        """
        if now < self._resync_at:
            return False
        self._resync_at = now + 1.0
        return True

    def __repr__(self):
        return f"<GroupState epoch {self.epoch}>"

    def holds(self, grant) -> bool:
        """
        Whether C{grant} is the group key already in use.
        """
        return grant.epoch == self.epoch and grant.key == self._key

    #: Sources (plaintext hosts behind a gateway) this agent seals group
    #: frames for, at most.  Never forgotten while the group key lasts: a
    #: new sealer for a source would restart its counter.
    MAX_SOURCES = 4096

    def sealer_for(self, src_mac: bytes):
        """
        The sending direction for group frames from C{src_mac}: our own
        MAC's, or, for a gateway, one per plaintext host; None past
        L{MAX_SOURCES}.
        """
        if src_mac == self._my_mac:
            return self.sealer
        sealer = self._sources.get(src_mac)
        if sealer is None:
            if len(self._sources) >= self.MAX_SOURCES:
                return None
            sealer = self._sources[src_mac] = Sealer(
                derive_group_key(self._key, src_mac, self.epoch, self._incarnation), TYPE_GROUP,
                self.epoch, self._incarnation)
        return sealer

    def opener_for(self, src_mac: bytes, incarnation: int):
        held = self._senders.get(src_mac)
        if held is not None:
            if incarnation == held[0]:
                return held[1]
            if incarnation < held[0]:
                return None
        if not self._derivations.take():
            return None
        key = derive_group_key(self._key, src_mac, self.epoch, incarnation)
        return Opener(key, TYPE_GROUP, self.epoch, incarnation)

    def accept(self, src_mac: bytes, opener, incarnation: int):
        held = self._senders.get(src_mac)
        if held is None or held[0] != incarnation:
            if held is None and len(self._senders) >= self.MAX_SENDERS:
                del self._senders[next(iter(self._senders))]
            self._senders[src_mac] = (incarnation, opener)

    @property
    def senders(self):
        return len(self._senders)
