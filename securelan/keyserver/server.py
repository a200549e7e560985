# -*- test-case-name: tests.test_keyserver -*-
"""
The key server's logic and its per-member sessions.

L{KeyServer} applies the seed's rules to the store: a request
``(ID_1, MAC_2, ?)`` resolves MAC_2 to ID_2 through the member registry and
answers with the one key of the pair ``(ID_1, ID_2)``, generated on first
use.  ID_1 is always the member ID from the TLS client certificate of the
session that asked; nothing a member writes in a message can change it.

L{MemberSession} is one member's AMP connection: it authenticates the member
at the end of the TLS handshake, applies the member's rate limit and turns
declared failures into logged refusals.  The server pushes key updates and
purges over the same connection.
"""

import bisect
import collections
import ipaddress
import operator

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from ..logs import logger
from .. import PROTOCOL_VERSION
from .._interfaces import IMemberConnection, IStore
from .._validators import provides
from ..addresses import (
    AddressError,
    check_mac,
    format_host_port,
    format_mac,
    is_group_mac,
    pair_of,
    parse_host_port,
)
from ..config import Limits
from ..errors import (
    BadRequest,
    NotPermitted,
    NotRegistered,
    RateLimited,
    SecurelanError,
    UnknownPeer,
    VersionMismatch,
)
from ..keys import SecretKey
from ..pki import CertificateError, member_identity
from ..protocol import (
    ListPeers,
    Ping,
    PairKeyGrant,
    PushGroupKey,
    PushPairKey,
    Purge,
    PushNetLinks,
    PushRoutes,
    QuietAMP,
    Register,
    RequestGroupKey,
    RequestNetLinks,
    RequestPairKey,
    RequestPairKeyByAddress,
    RequestRekey,
)
from ..ratelimit import TokenBucket
from ..records import GROUP_ID, ROLES, GroupKey, Member, PairKey
from ..tls import EXPECTED_GROUP, describe_tls_failure, negotiated_group, peer_certificate

log = logger("securelan.keyserver")


#: Overlay addresses one member may register, at most.
MAX_ADDRESSES = 16


#: The order of pair keys by their pair.
_BY_PAIR = operator.attrgetter("id_a", "id_b")


def _check_addresses(addresses) -> tuple:
    """
    A member's overlay IP addresses (layer 3), in canonical text form:
    unicast, not loopback or unspecified, at most L{MAX_ADDRESSES}.
    """
    if len(addresses) > MAX_ADDRESSES:
        raise BadRequest(f"at most {MAX_ADDRESSES} addresses")
    checked = set()
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise BadRequest(f"{text!r} is not an IP address") from None
        if getattr(address, "scope_id", None):
            # fd00::5%x would be another string for the address fd00::5.
            raise BadRequest(f"{text!r}: an overlay address has no zone")
        if address.is_multicast or address.is_unspecified or address.is_loopback:
            raise BadRequest(f"{address} is not a unicast address a member can hold")
        checked.add(str(address))
    return tuple(sorted(checked))


def _check_endpoint(endpoint: str, seen_host: str | None) -> str:
    """
    Check a member's underlay endpoint ``address:port`` (``[v6]:port`` for
    IPv6).  An empty address means the one the member connected from.
    """
    if endpoint == "":
        return ""
    try:
        return format_host_port(*parse_host_port(endpoint, default_host=seen_host))
    except AddressError as e:
        raise BadRequest(str(e)) from None


@attrs.define(eq=False)
class KeyServer:
    """
    The seed's key server over an L{IStore}.
    """

    subnet: str
    store: IStore = attrs.field(validator=provides(IStore))
    clock: object
    limits: Limits = attrs.Factory(Limits)
    pair_key_lifetime: int = 86400
    #: Datagrams or bytes a sender may send under one epoch of a pair key
    #: before it asks for the next (0: no limit).
    pair_key_max_packets: int = 0
    pair_key_max_bytes: int = 0
    group_key_lifetime: int = 0
    #: Makes new keys; tests replace it to plant a known key.
    keygen: object = SecretKey.generate
    sessions: dict = attrs.Factory(dict)
    _buckets: dict = attrs.Factory(dict)
    #: Counters for the metrics endpoint: (name, label) -> count.
    counters: collections.Counter = attrs.Factory(collections.Counter)
    #: (holder, member) -> the facts last pushed to holder about member.
    _pushed: dict = attrs.Factory(dict)
    _cancel_changes: object = None
    #: (id_a, id_b) -> {holder: the highest epoch it acknowledged}.
    acknowledged: dict = attrs.Factory(dict)
    #: Member IDs in order, for paging ListPeers (rebuilt when members join).
    _sorted_ids: list | None = None
    #: The reactor turn's number, for the sessions' fair share of a turn.
    _turn: int = attrs.field(default=0, init=False)
    _turn_ending: bool = attrs.field(default=False, init=False)
    _group_key: GroupKey | None = None
    #: (id_a, id_b) -> when a count-based rekey of the pair was last done.
    _count_rekeys: dict = attrs.Factory(dict)
    #: The routes members were last told.
    _routes_told: list = attrs.Factory(list)
    #: The L{securelan.keyserver.peering.NetKeyBroker} when this subnet has
    #: links to other subnets (through its border), else None.
    broker: object = None

    @defer.inlineCallbacks
    def start(self):
        """
        Make sure the group key exists (generated at first start, kept in
        the store apart from pair keys).
        """
        group = yield self.store.group_key()
        if group is None:
            candidate = GroupKey(epoch=1, key=self.keygen(), created_at=self.clock.seconds())
            group = yield self.store.issue_group_key(candidate)
            log.info("generated the group key of subnet {subnet}", subnet=self.subnet)
        self._group_key = group
        if self.broker is not None:
            border = yield self.store.member(self.broker.config.border)
            if border is not None and border.role == "border":
                self.broker.border_registered(border.incarnation)
        on_change = getattr(self.store, "on_change", None)
        if on_change is not None:
            # A cascade: other key servers share the store.  What they change
            # reaches the members connected here from here.
            self._cancel_changes = on_change(self._changed_elsewhere)

    @defer.inlineCallbacks
    def _changed_elsewhere(self, kind, ids):
        """
        Another key server of the cascade changed the store: tell the
        members connected to this one what concerns them.
        """
        try:
            if kind == "group":
                group = yield self.store.group_key()
                if group is not None and (self._group_key is None or group.epoch > self._group_key.epoch):
                    self._group_key = group
                    self._push_group(group)
            elif kind == "member":
                self._sorted_ids = None
                member = yield self.store.member(ids[0])
                if member is not None:
                    for pair_key in (yield self.store.pairs_of(member.member_id)):
                        self._push_to(pair_key.peer_of(member.member_id), self._grant(pair_key, member))
            elif kind == "pair":
                id_a, id_b = ids
                pair_key = yield self.store.pair_key(id_a, id_b)
                if pair_key is None:
                    # Destroyed (a revocation elsewhere): both ends forget it.
                    self.purge(id_a, id_b, f"{id_b} was revoked")
                    self.purge(id_b, id_a, f"{id_a} was revoked")
                else:
                    self.push_pair_key(pair_key)
            elif kind == "revoked":
                self._sorted_ids = None
                for session in list(self.sessions.pop(ids[0], ())):
                    session.close("revoked")
        except Exception:
            log.failure("passing on a change made by another key server ({kind})", kind=kind)

    # Sessions ------------------------------------------------------------

    def session_registered(self, session):
        self.sessions.setdefault(session.member_id, set()).add(session)

    def session_closed(self, session):
        held = self.sessions.get(session.member_id)
        if held is not None:
            held.discard(session)
            if not held:
                del self.sessions[session.member_id]

    def admit_request(self, member_id: str):
        """
        Charge one request to C{member_id}'s token bucket.

        @raise RateLimited: if the member has none left.
        """
        bucket = self._buckets.get(member_id)
        if bucket is None:
            bucket = self._buckets[member_id] = TokenBucket(
                self.limits.requests_per_second, self.limits.request_burst, self.clock
            )
        if not bucket.take():
            raise RateLimited(
                f"more than {self.limits.requests_per_second:g} requests/s "
                f"(burst {self.limits.request_burst}); slow down"
            )

    # The seed's steps ----------------------------------------------------

    @defer.inlineCallbacks
    def register(self, identity, seen_host, version, mac, role, endpoint, incarnation=None, addresses=()):
        """
        Step 1, admission: record (ID, MAC) for the authenticated member.
        Fires with the stored L{Member}.  When its MAC, endpoint or
        incarnation changed, every connected member that holds a pair key
        with it is sent the key again with the new facts.
        """
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"this key server speaks protocol version {PROTOCOL_VERSION}, "
                f"the member speaks {version}"
            )
        try:
            check_mac(mac)
        except AddressError as e:
            raise BadRequest(str(e)) from None
        if is_group_mac(mac) or mac == b"\0" * 6:
            raise BadRequest(f"{format_mac(mac)} is not a unicast MAC")
        if role not in ROLES:
            raise BadRequest(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
        if not identity.allows_role(role):
            raise NotPermitted(f"the certificate of {identity.member_id} does not allow role {role}")
        if not identity.allows_mac(mac):
            raise NotPermitted(
                f"the certificate of {identity.member_id} pins its MAC; {format_mac(mac)} is not it"
            )
        if incarnation is not None and not 0 < incarnation < 2**31:
            raise BadRequest(f"incarnation {incarnation} is out of range")
        addresses = _check_addresses(addresses or ())
        member = Member(
            member_id=identity.member_id,
            role=role,
            mac=mac,
            endpoint=_check_endpoint(endpoint, seen_host),
            registered_at=self.clock.seconds(),
            incarnation=incarnation or 0,
            addresses=addresses,
        )
        if (yield self.store.is_revoked(member.member_id)):
            raise NotPermitted(f"member {member.member_id} is revoked")
        previous = yield self.store.member(member.member_id)
        member = yield self.store.register(member, self.limits.max_members)
        if previous is None:
            self._sorted_ids = None
        if self.broker is not None and member.role == "border" and member.member_id == self.broker.config.border:
            self.broker.border_registered(member.incarnation)
        changed = previous is not None and (
            previous.mac, previous.endpoint, previous.incarnation, previous.addresses) != (
            member.mac, member.endpoint, member.incarnation, member.addresses)
        if changed:
            pairs = yield self.store.pairs_of(member.member_id)
            for pair_key in pairs:
                self._push_to(pair_key.peer_of(member.member_id), self._grant(pair_key, member))
        return member

    @defer.inlineCallbacks
    def sync(self, member_id: str):
        """
        Push to C{member_id} every pair key it holds, with each peer's
        current facts: a member that was away (or a key server that was)
        learns what changed meanwhile.
        """
        pairs = yield self.store.pairs_of(member_id)
        for pair_key in pairs:
            peer = yield self.store.member(pair_key.peer_of(member_id))
            if peer is not None:
                self._push_to(member_id, self._grant(pair_key, peer))

    def pair_key_for(self, member: Member, peer_mac: bytes, epoch):
        """
        Step 3: the pair key of C{member} and whoever holds C{peer_mac}.
        Fires with a L{PairKeyGrant} as C{member} should hold it.
        """
        try:
            check_mac(peer_mac)
        except AddressError as e:
            return defer.fail(BadRequest(str(e)))
        if is_group_mac(peer_mac):
            return defer.fail(BadRequest(f"{format_mac(peer_mac)} is a group address: use the group key"))
        # The usual request, between two members the store holds in
        # memory: a key already issued is answered at once.
        known = self.known_pair(member, peer_mac)
        if known is not None:
            return self.pair_key_with(member, known[1], epoch)
        return self._pair_key_for(member, peer_mac, epoch)

    def known_pair(self, member: Member, peer_mac: bytes):
        """
        C{(pair key or None, peer)} when C{member} and the member that holds
        C{peer_mac} are two members the store holds in memory, with their
        pair key if one is issued; else None (L{pair_key_for} finds out).
        Changes nothing.
        """
        store = self.store
        peer = store.peek_member_by_mac(peer_mac)
        if peer is None or peer.member_id == member.member_id or store.peek_member(member.member_id) is None:
            return None
        return store.peek_pair_key(member.member_id, peer.member_id), peer

    @defer.inlineCallbacks
    def _pair_key_for(self, member: Member, peer_mac: bytes, epoch):
        peer = yield self.store.member_by_mac(peer_mac)
        foreign = peer is None
        if foreign:
            peer = yield self._gateway_for(member, peer_mac)
        grant = yield self.pair_key_with(member, peer, epoch)
        if foreign:
            # The seed's K(ID_1, ID_X86), held against the plaintext host's
            # MAC: the member reaches that MAC through the gateway.
            grant = attrs.evolve(grant, peer_mac=peer_mac)
        return grant

    @defer.inlineCallbacks
    def pair_key_by_address(self, member: Member, address: str, epoch):
        """
        Layer 3: the pair key of C{member} and whoever holds the overlay IP
        C{address}.
        """
        [text] = _check_addresses([address])
        peer = yield self.store.member_by_address(text)
        if peer is None:
            raise UnknownPeer(f"no member of subnet {self.subnet} holds {text}")
        return (yield self.pair_key_with(member, peer, epoch))

    def pair_key_with(self, member: Member, peer: Member, epoch):
        """
        The pair key of C{member} and C{peer}, issued now if it is not yet
        (a store write): fires with the L{PairKeyGrant} C{member} should
        hold, once the peer was told (L{_tell_peer}).
        """
        if peer.member_id == member.member_id:
            return defer.fail(NotPermitted("a member needs no key with itself"))
        held = self.store.peek_pair_key(member.member_id, peer.member_id)
        try:
            if held is None:
                return self._issue(member.member_id, peer, epoch)
            return defer.succeed(self.granted(held, member.member_id, peer, epoch))
        except Exception:
            # As a responder's failure: the caller answers it (AMP's way).
            return defer.fail()

    def granted(self, pair_key: PairKey, member_id: str, peer: Member, epoch) -> PairKeyGrant:
        """
        The grant of C{pair_key} as C{member_id} should hold it, its peer
        being C{peer}; the peer is told first (L{_tell_peer}) with the
        requester's current facts, from the store (not a session's older
        copy: a write may have come between).
        """
        me = self.store.peek_member(member_id)
        if me is not None:
            self._tell_peer(pair_key, me, peer, epoch)
        return self._grant(pair_key, peer)

    def _tell_peer(self, pair_key: PairKey, me: Member, peer: Member, epoch):
        """
        C{me} asked for its pair key with C{peer}, which will hear from it
        at once: push the key to C{peer}, with C{me}'s current facts, unless
        it was pushed exactly these already (so the seed's receive-side
        miss is rare).  A requester that names the current epoch is the
        seed's second recovery case (the peer is behind): push again
        regardless.
        """
        facts = (pair_key.epoch, pair_key.key.fingerprint, me.mac, me.endpoint, me.incarnation, me.addresses)
        pushed = (peer.member_id, me.member_id)
        if epoch == pair_key.epoch or self._pushed.get(pushed) != facts:
            if len(self._pushed) >= self.limits.max_pair_keys * 2:
                self._pushed.clear()
            self._pushed[pushed] = facts
            self._push_to(peer.member_id, self._grant(pair_key, me))

    @defer.inlineCallbacks
    def _gateway_for(self, member: Member, mac: bytes):
        """
        The gateway (the seed's ID_X86) that fronts C{mac}, a MAC no member
        holds: the one it is bound to, else the connected gateway with the
        lowest member ID (then any registered one), bound from now on.
        """
        unknown = UnknownPeer(f"no member of subnet {self.subnet} holds {format_mac(mac)}"
                              + ("" if member.role != "gateway" else " (a gateway reaches members only)"))
        if member.role == "gateway":
            raise unknown
        now = self.clock.seconds()
        bound = yield self.store.foreign_mac(mac, now)
        if bound is not None:
            gateway = yield self.store.member(bound)
            if gateway is not None and gateway.role == "gateway":
                return gateway
        gateways = [m for m in (yield self.store.members()) if m.role == "gateway"]
        if not gateways:
            raise UnknownPeer(f"no member of subnet {self.subnet} holds {format_mac(mac)}, "
                              "and the subnet has no gateway")
        gateways.sort(key=lambda m: (not self.sessions.get(m.member_id), m.member_id))
        gateway_id = yield self.store.bind_foreign_mac(
            mac, gateways[0].member_id, now, now + self.limits.foreign_mac_ttl, self.limits.max_foreign_macs)
        if gateway_id != gateways[0].member_id:
            gateway = yield self.store.member(gateway_id)
            return gateway if gateway is not None else gateways[0]
        log.info("{mac} is behind gateway {gateway}", mac=format_mac(mac), gateway=gateway_id)
        return gateways[0]

    def _issue(self, member_id: str, peer: Member, epoch):
        id_a, id_b = pair_of(member_id, peer.member_id)
        now = self.clock.seconds()
        lifetime = self.pair_key_lifetime
        candidate = PairKey(
            id_a=id_a,
            id_b=id_b,
            epoch=1,
            key=self.keygen(),
            created_at=now,
            expires_at=now + lifetime if lifetime else 0.0,
        )
        d = self.store.issue_pair_key(candidate, self.limits.max_pair_keys)
        return d.addCallback(self._issued, candidate.key, member_id, peer, epoch)

    def _issued(self, pair_key: PairKey, key: SecretKey, member_id: str, peer: Member, epoch) -> PairKeyGrant:
        if pair_key.key == key:
            # Counted, not logged: at thousands of new keys a second a log
            # line (even at debug level, filtered) costs more than the key.
            self.counters[("keys_issued", "pair")] += 1
        return self.granted(pair_key, member_id, peer, epoch)

    def _grant(self, pair_key: PairKey, peer: Member) -> PairKeyGrant:
        if pair_key.expires_at:
            lifetime = max(0, int(pair_key.expires_at - self.clock.seconds()))
        else:
            lifetime = 0
        return PairKeyGrant(
            peer_id=peer.member_id,
            peer_mac=peer.mac,
            peer_role=peer.role,
            peer_endpoint=peer.endpoint,
            peer_incarnation=peer.incarnation,
            key=pair_key.key,
            epoch=pair_key.epoch,
            lifetime=lifetime,
            age=max(0, int(self.clock.seconds() - pair_key.created_at)),
            peer_addresses=peer.addresses,
        )

    def current_turn(self) -> int:
        """
        The number of this reactor turn: it goes up by one at the end of
        every turn in which a session asked (one call for all of them, not
        one per session per turn).
        """
        if not self._turn_ending:
            self._turn_ending = True
            self.clock.callLater(0, self._end_turn)
        return self._turn

    def _end_turn(self):
        self._turn_ending = False
        self._turn += 1

    def list_peers(self, member: Member, after: str):
        """
        One page of the other members, by member ID, after C{after}.
        """

        def page(members):
            if self._sorted_ids is None or len(self._sorted_ids) != len(members):
                self._sorted_ids = sorted(m.member_id for m in members)
            ids = self._sorted_ids
            start = bisect.bisect_right(ids, after)
            chosen, index = [], start
            while index < len(ids) and len(chosen) < ListPeers.PAGE:
                if ids[index] != member.member_id:
                    chosen.append(ids[index])
                index += 1
            by_id = {m.member_id: m for m in members} if chosen else {}
            return {
                "peers": [{"member_id": m.member_id, "mac": m.mac, "role": m.role, "endpoint": m.endpoint}
                          for m in (by_id[i] for i in chosen)],
                "more": index < len(ids),
            }

        return self.store.members().addCallback(page)

    def net_links_for(self, member: Member):
        """
        The subnet's links to its peer subnets, for its border only.
        """
        broker = self.broker
        if broker is None:
            raise NotPermitted(f"subnet {self.subnet} has no links to other subnets")
        if member.role != "border" or member.member_id != broker.config.border:
            raise NotPermitted(f"{member.member_id} is not the border of subnet {self.subnet} "
                               f"(that is {broker.config.border})")
        return broker.net_links()

    #: Routes members are told at most (one AMP value holds about 1,500).
    MAX_ROUTES = 512

    def member_routes(self) -> list | None:
        """
        What members route through the border: every peer subnet's prefix
        via the border's overlay address (of the prefix's family), when the
        configuration names it; None when this key server does not know
        (it does not peer).  A peer's default route, or a prefix that
        overlaps this subnet's own, is never passed on: it would pull the
        members' own traffic (their key server's too) to the border.
        """
        broker = self.broker
        if broker is None or not broker.config.border_address:
            return None
        via = ipaddress.ip_address(broker.config.border_address)
        own = [ipaddress.ip_network(p) for p in broker.config.prefixes]
        routes = set()
        for link in broker.net_links():
            for text in link.prefixes:
                prefix = ipaddress.ip_network(text)
                if (prefix.version != via.version or prefix.prefixlen == 0
                        or any(prefix.version == o.version and prefix.overlaps(o) for o in own)):
                    log.warn("not telling members to route {prefix} (from subnet {subnet}) through the border",
                             prefix=text, subnet=link.subnet)
                    continue
                routes.add(f"{prefix} via {via}")
        if len(routes) > self.MAX_ROUTES:
            log.warn("{count} routes to other subnets; members are told the first {limit}",
                     count=len(routes), limit=self.MAX_ROUTES)
        return sorted(routes)[:self.MAX_ROUTES]

    def routes_for_members(self) -> list | None:
        """
        The routes members were last told (worked out when the links
        change, not at every registration), or None when this key server
        does not say.
        """
        if self.broker is None or not self.broker.config.border_address:
            return None
        return self._routes_told

    def links_changed(self):
        """
        The broker's links changed: the border gets them, members their
        routes (when those changed).
        """
        self.push_net_links()
        routes = self.member_routes()
        if routes is None or routes == self._routes_told:
            return
        for member_id, sessions in list(self.sessions.items()):
            for session in list(sessions):
                if session.member is not None and session.member.role == "client":
                    try:
                        d = session.push_routes(routes)
                    except Exception:
                        log.failure("pushing routes to {session}", session=session)
                        continue
                    d.addErrback(lambda f, s=session: log.info("pushing routes to {session} failed: {reason}",
                                                               session=s, reason=f.getErrorMessage()))
        self._routes_told = routes

    def push_net_links(self):
        """
        Push the links to every session of the border (they changed).
        """
        if self.broker is None:
            return
        links = self.broker.net_links()
        for session in list(self.sessions.get(self.broker.config.border, ())):
            if session.member is not None and session.member.role == "border":
                session.push_net_links(links).addErrback(
                    lambda f, s=session: log.info("pushing links to {session} failed: {reason}",
                                                  session=s, reason=f.getErrorMessage()))

    def group_key(self) -> GroupKey:
        if self._group_key is None:
            raise NotRegistered("the key server is still starting")
        return self._group_key

    # Revocation and group rekey -------------------------------------------

    @defer.inlineCallbacks
    def revoke(self, member_id: str, reason: str = ""):
        """
        Revoke C{member_id}: its sessions are closed and refused from now on,
        its pair keys destroyed and its peers told to purge them, and the
        group key replaced (pushed to everyone else), so it can neither send
        to nor read anything new from the others.  Fires with a summary.
        """
        destroyed = yield self.store.revoke(member_id, reason, self.clock.seconds())
        self._sorted_ids = None
        for session in list(self.sessions.pop(member_id, ())):
            session.close("revoked")
        peers = sorted({pair_key.peer_of(member_id) for pair_key in destroyed})
        for peer_id in peers:
            self.purge(peer_id, member_id, f"{member_id} was revoked")
        group = yield self.rekey_group()
        log.warn("revoked member {member_id} ({reason}): {keys} pair keys destroyed, "
                 "group key now epoch {epoch}", member_id=member_id, reason=reason or "no reason given",
                 keys=len(destroyed), epoch=group.epoch)
        return {"member_id": member_id, "pair_keys_destroyed": len(destroyed), "peers_told": peers,
                "group_epoch": group.epoch}

    @defer.inlineCallbacks
    def rekey_group(self):
        """
        Replace the group key (the next epoch) and push it to every session.
        """
        current = self.group_key()
        candidate = GroupKey(epoch=current.epoch + 1, key=self.keygen(), created_at=self.clock.seconds())
        group = yield self.store.rekey_group(candidate)
        self._group_key = group
        self.counters[("rekeys", "group")] += 1
        self._push_group(group)
        return group

    def _push_group(self, group):
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                session.push_group_key(group).addErrback(
                    lambda f, s=session: log.debug("group key push to {session} failed: {reason}",
                                                   session=s, reason=f.getErrorMessage()))

    # Pushes --------------------------------------------------------------

    @defer.inlineCallbacks
    def push_pair_key(self, pair_key: PairKey):
        """
        Push C{pair_key} to every connected session of both holders and
        record which holders acknowledged its epoch (L{acknowledged}).
        Fires with the number of sessions that acknowledged.
        """
        members = {}
        for member_id in (pair_key.id_a, pair_key.id_b):
            members[member_id] = yield self.store.member(member_id)
        pushes = []
        for holder, peer_id in ((pair_key.id_a, pair_key.id_b), (pair_key.id_b, pair_key.id_a)):
            peer = members[peer_id]
            if peer is None:
                continue
            for session in list(self.sessions.get(holder, ())):
                d = session.push_pair_key(self._grant(pair_key, peer))
                d.addCallback(self._acknowledged, pair_key, holder)
                pushes.append(d)
        results = yield defer.DeferredList(pushes, consumeErrors=True)
        return sum(1 for ok, _ in results if ok)

    def _acknowledged(self, result, pair_key, holder):
        acks = self.acknowledged.setdefault((pair_key.id_a, pair_key.id_b), {})
        acks[holder] = max(acks.get(holder, 0), pair_key.epoch)
        return result

    # Rekey ---------------------------------------------------------------

    @defer.inlineCallbacks
    def rekey_pair(self, id_1: str, id_2: str):
        """
        Replace the key of the pair with a new one of the next epoch (the
        seed's key update) and push it to both holders.  Fires with the new
        L{PairKey}.
        """
        current = yield self.store.pair_key(id_1, id_2)
        if current is None:
            raise UnknownPeer(f"{id_1} and {id_2} share no key")
        now = self.clock.seconds()
        lifetime = self.pair_key_lifetime
        candidate = PairKey(id_a=current.id_a, id_b=current.id_b, epoch=current.epoch + 1,
                            key=self.keygen(), created_at=now,
                            expires_at=now + lifetime if lifetime else 0.0)
        pair_key = yield self.store.rekey_pair(candidate)
        self.counters[("rekeys", "pair")] += 1
        log.info("rekeyed ({id_a}, {id_b}) to epoch {epoch}", id_a=pair_key.id_a, id_b=pair_key.id_b,
                 epoch=pair_key.epoch)
        # Acknowledgements are recorded as they come (acknowledged); a
        # holder that misses the push recovers the seed's way.
        self.push_pair_key(pair_key)
        return pair_key

    #: Seconds between two count-based rekeys of one pair, at least: a sender
    #: that asks too often (or lies about its counts) cannot start a storm.
    COUNT_REKEY_INTERVAL = 1.0

    @defer.inlineCallbacks
    def rekey_on_count(self, member: Member, peer_id: str, epoch: int):
        """
        C{member} sent as much as it may under C{epoch} of its key with
        C{peer_id}: rekey the pair unless that epoch is over already (the
        other end asked first) or the pair was rekeyed less than
        L{COUNT_REKEY_INTERVAL} ago.  Fires with the pair's epoch.
        """
        pair_key = yield self.store.pair_key(member.member_id, peer_id)
        if pair_key is None:
            raise UnknownPeer(f"{member.member_id} and {peer_id} share no key")
        if epoch > pair_key.epoch:
            raise BadRequest(f"epoch {epoch} is ahead of the pair's ({pair_key.epoch})")
        pair = (pair_key.id_a, pair_key.id_b)
        now = self.clock.seconds()
        if epoch < pair_key.epoch or now - self._count_rekeys.get(pair, -1e18) < self.COUNT_REKEY_INTERVAL:
            return pair_key.epoch
        if len(self._count_rekeys) >= 65536:
            self._count_rekeys.clear()
        self._count_rekeys[pair] = now
        self.counters[("rekeys", "count")] += 1
        new = yield self.rekey_pair(member.member_id, peer_id)
        return new.epoch

    def all_pairs(self):
        """
        Every pair key in the store, once each, in order of the pair.
        """
        return self.store.pair_keys().addCallback(sorted, key=_BY_PAIR)

    @defer.inlineCallbacks
    def rekey_due(self):
        """
        Rekey every pair whose lifetime is over (run from a timer).  Fires
        with how many were rekeyed.
        """
        now = self.clock.seconds()
        group = self.group_key()
        if self.group_key_lifetime and group.created_at + self.group_key_lifetime <= now:
            yield self.rekey_group()
        # One pass over the store's mirror: at 10,000 members and 60,000
        # keys, asking member by member held the reactor for 0.2 s.
        due = sorted((p for p in (yield self.store.pair_keys()) if p.expires_at and p.expires_at <= now),
                     key=_BY_PAIR)
        for pair_key in due:
            try:
                yield self.rekey_pair(pair_key.id_a, pair_key.id_b)
            except Exception:
                log.failure("rekeying ({id_a}, {id_b}) failed", id_a=pair_key.id_a, id_b=pair_key.id_b)
        return len(due)

    def _push_to(self, holder_id: str, grant: PairKeyGrant):
        # Told, not asked: nothing here waits for an acknowledgement, and
        # one box less each way is a quarter of a new key's boxes.
        for session in list(self.sessions.get(holder_id, ())):
            session.tell_pair_key(grant)

    def purge(self, holder_id: str, peer_id: str, reason: str):
        """
        Tell every session of C{holder_id} to forget its keys with C{peer_id}.
        """
        pushes = [s.push_purge(peer_id, reason) for s in list(self.sessions.get(holder_id, ()))]
        return defer.DeferredList(pushes, consumeErrors=True)


@implementer(IHandshakeListener, IMemberConnection)
class MemberSession(QuietAMP):
    """
    One member's control connection.  Nothing member-specific exists until
    the TLS handshake has authenticated a member certificate.  A connection
    that has not registered within C{limits.register_timeout}, or a session
    silent for C{limits.idle_timeout}, is closed: neither a stalled client nor
    a vanished one holds a connection slot for long.
    """

    identity = None
    member = None

    def __init__(self, server: KeyServer):
        super().__init__()
        self.server = server
        self.callLater = server.clock.callLater
        self._rejected = False
        self._closed = False
        self._paused = False
        self._yielding = False
        self._turn_boxes = 0
        self._turn = -1
        self._deadline = None
        self._deadline_call = None
        self._active_at = 0.0
        self._checking = False
        self._peer = "?"
        self._peer_host = None

    @property
    def member_id(self):
        return self.identity.member_id if self.identity else None

    def __repr__(self):
        return f"<MemberSession {self.member_id or 'unauthenticated'} from {self._peer}>"

    def makeConnection(self, transport):
        peer = transport.getPeer()
        self._peer_host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        self._peer = f"{self._peer_host}:{port}" if self._peer_host is not None else str(peer)
        self.setTimeout(self.server.limits.register_timeout)
        super().makeConnection(transport)

    def close(self, why: str):
        """
        Close this session at once (revocation).
        """
        log.info("closing the session of {member_id} from {peer}: {why}",
                 member_id=self.member_id, peer=self._peer, why=why)
        self._rejected = True
        self.member = None
        self.transport.abortConnection()

    def setTimeout(self, seconds):
        """
        Close the connection once it has been silent for C{seconds} (None:
        never).  Each request only notes the time (L{resetTimeout}); the
        one timer looks at it when it fires and waits for the rest, so a
        busy session does not move a timer per request.
        """
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None
        self._deadline = seconds
        self._active_at = self.server.clock.seconds()
        if seconds is not None:
            self._deadline_call = self.callLater(seconds, self._check_deadline)

    def resetTimeout(self):
        self._active_at = self.server.clock.seconds()

    def _check_deadline(self):
        silent = self.server.clock.seconds() - self._active_at
        if silent < self._deadline:
            self._deadline_call = self.callLater(self._deadline - silent, self._check_deadline)
            return
        self._deadline_call = None
        self.timeoutConnection()

    def timeoutConnection(self):
        log.info("closed connection from {peer} ({member_id}): {what}", peer=self._peer,
                 member_id=self.member_id or "unauthenticated",
                 what="idle" if self.member is not None else "did not register in time")
        self._rejected = True
        self.transport.abortConnection()

    def handshakeCompleted(self):
        cert = peer_certificate(self.transport)
        try:
            if cert is None:
                raise CertificateError("no client certificate")
            identity = member_identity(cert)
            group = negotiated_group(self.transport)
            if group != EXPECTED_GROUP:
                # Keys recorded today must not be readable with a quantum
                # computer tomorrow: no classical-only key exchange.
                raise CertificateError(f"key exchange {group} is not {EXPECTED_GROUP}")
        except CertificateError as e:
            log.warn("refused connection from {peer}: {reason}", peer=self._peer, reason=str(e))
            self._rejected = True
            self.transport.abortConnection()
            return
        self._checking = True

        def checked(revoked):
            self._checking = False
            if revoked:
                log.warn("refused connection from {peer}: member {member_id} is revoked",
                         peer=self._peer, member_id=identity.member_id)
                self._rejected = True
                self.transport.abortConnection()
            else:
                self.identity = identity
                log.debug("member {member_id} connected from {peer}", member_id=identity.member_id,
                          peer=self._peer)

        self.server.store.is_revoked(identity.member_id).addCallback(checked)

    def connectionLost(self, reason):
        self._closed = True
        self.setTimeout(None)
        if self.identity is None and not self._rejected:
            if reason.check(ConnectionDone):
                # A probe (a health check, a port scan) that sent nothing.
                log.debug("connection from {peer} closed before TLS", peer=self._peer)
            else:
                log.warn("TLS handshake from {peer} refused: {reason}",
                         peer=self._peer, reason=describe_tls_failure(reason))
        elif self.identity is not None:
            self.server.session_closed(self)
        super().connectionLost(reason)

    # Bounding what one peer can make us hold -----------------------------

    #: Requests of one session handled per reactor turn (one more, and the
    #: rest waits): a member that sends many at once (within its rate)
    #: takes turns with the others instead of making them wait for all of
    #: its requests.  An agent has at most a few in flight.
    BOXES_PER_TURN = 4

    @property
    def max_box_bytes(self):
        return self.server.limits.max_request_bytes

    def box_too_big(self):
        self._rejected = True
        log.warn("closed connection from {peer} ({member_id}): request over {limit} bytes",
                 peer=self._peer, member_id=self.member_id, limit=self.max_box_bytes)
        self.transport.abortConnection()

    def dataReceived(self, data):
        if not self._rejected:
            super().dataReceived(data)

    def ampBoxReceived(self, box):
        if self._rejected:
            # The rest of a read after a refusal.
            return
        self.resetTimeout()
        turn = self.server.current_turn()
        if turn != self._turn:
            # Each request arrives in a TLS record of its own: count them
            # per reactor turn, not per read.
            self._turn = turn
            self._turn_boxes = 0
        self._turn_boxes += 1
        if self._turn_boxes > self.BOXES_PER_TURN and not self._yielding:
            # What else it sent waits for the next turn.
            self._yielding = True
            self.pauseProducing()
            self.server.clock.callLater(0, self._next_turn)
        if self.identity is None:
            # Data before an accepted certificate cannot happen over TLS;
            # refuse rather than trust that.
            self._rejected = True
            self.transport.abortConnection()
            return
        if (box.get(b"_command") == b"RequestPairKey" and b"_answer" not in box and b"_error" not in box
                and self._answered_at_once(box)):
            return
        try:
            super().ampBoxReceived(box)
        except Exception as e:
            # A box AMP cannot make sense of (no command, an unknown answer,
            # a name that is not ASCII): close this connection, in one log
            # line rather than a traceback a member could repeat at will.
            log.info("closed connection from {peer} ({member_id}): malformed request ({error})",
                     peer=self._peer, member_id=self.member_id, error=e.__class__.__name__)
            self._rejected = True
            self.transport.abortConnection()

    def _answered_at_once(self, box) -> bool:
        """
        The usual request, for the pair key of two members the store holds
        in memory, taken without AMP's dispatch: the same checks, counts
        and answer box.  A key already issued is answered at once; one to
        issue is answered when the store has written it.  False, having
        changed nothing, for what the general path must take: a request
        refused before the key (the rate limit included: its bucket took
        nothing), a peer that is not a member (a gateway's MAC), a
        malformed request.  What the store refuses (a full table) is
        answered here, with AMP's error box.
        """
        ask = box.get(b"_ask")
        member = self.member
        if ask is None or member is None:
            return False
        try:
            arguments = RequestPairKey.parseArguments(box, self)
        except Exception:
            return False
        server = self.server
        known = server.known_pair(member, arguments["peer_mac"])
        if known is None:
            return False
        try:
            server.admit_request(member.member_id)
        except RateLimited:
            # Refused on the general path, which finds the bucket as empty.
            return False
        server.counters[("requests", "pair key")] += 1
        pair_key, peer = known
        if pair_key is None:
            d = server.pair_key_with(member, peer, arguments["epoch"])
            d.addCallbacks(self._answer, self._refuse, (ask,), None, (ask,))
            d.addErrback(self.unhandledError)
            return True
        try:
            grant = server.granted(pair_key, member.member_id, peer, arguments["epoch"])
        except Exception:
            self._refuse(Failure(), ask)
        else:
            self._answer(grant, ask)
        return True

    def _answer(self, grant, ask):
        """
        Answer the pair-key request tagged C{ask} with C{grant}, unless
        the connection is gone meanwhile.
        """
        try:
            answer = RequestPairKey.serialize_answer(grant, ask, self)
        except Exception:
            # A bug: answered as AMP answers a responder's failure.
            self._refuse(Failure(), ask)
        else:
            if not self._closed:
                self.transport.write(answer)

    def _refuse(self, failure, ask):
        """
        Answer the pair-key request tagged C{ask} as AMP answers its
        responder's C{failure} (counted and logged as any refusal; a
        QuitBox closes the connection), unless the connection is gone.
        """
        self._refused(failure, "pair key")
        # Made (an unexpected failure is logged there) even when no one is
        # left to send it to.
        box = RequestPairKey.error_box(failure, ask)
        if not self._closed:
            self._safeEmit(box)

    def _refusals(self, d, what):
        self.server.counters[("requests", what)] += 1
        return d.addErrback(self._refused, what)

    def _refused(self, failure, what):
        if failure.check(SecurelanError):
            self.server.counters[("errors", failure.value.__class__.__name__)] += 1
            # A flood of refused requests must not flood the log as well.
            emit = log.debug if failure.check(RateLimited) else log.info
            emit("refused {what} from {member_id} at {peer}: {reason}",
                 what=what, member_id=self.member_id, peer=self._peer,
                 reason=failure.getErrorMessage())
        return failure

    #: Seconds the key server stops reading from a member that went past its
    #: rate limit: refusing each request of a flood would still cost a
    #: parse and an answer apiece, at the other members' expense.
    RATE_LIMIT_PAUSE = 1.0

    def _charged(self, what, f, *args):
        try:
            self.server.admit_request(self.member_id)
            d = defer.maybeDeferred(f, *args)
        except RateLimited:
            d = defer.fail()
            self._pause_reading()
        except SecurelanError:
            d = defer.fail()
        return self._refusals(d, what)

    def _pause_reading(self):
        if self._paused or self._closed:
            return
        self._paused = True
        self.server.counters[("rate_limit_pauses", "")] += 1
        self.pauseProducing()

        def resume():
            self._paused = False
            self._resume()

        self.server.clock.callLater(self.RATE_LIMIT_PAUSE, resume)

    def _next_turn(self):
        self._yielding = False
        self._resume()

    def _resume(self):
        if not (self._closed or self._paused or self._yielding) and self.paused:
            self.resumeProducing()

    # Responders ----------------------------------------------------------

    @Register.responder
    def register(self, version, mac, role, endpoint, incarnation=None, addresses=()):
        d = self._charged("register", self.server.register,
                          self.identity, self._peer_host, version, mac, role, endpoint, incarnation, addresses)

        def registered(member):
            self.member = member
            if self._closed:
                # The connection went away while the store was writing: no
                # session to keep, no one to answer.
                raise NotRegistered("the connection closed while registering")
            self.setTimeout(self.server.limits.idle_timeout)
            self.server.session_registered(self)
            # After the answer: the member must know it is registered before
            # the pushes arrive.
            self.server.clock.callLater(0, self.server.sync, member.member_id)
            log.info("member {member_id} registered {mac} as {role} (endpoint {endpoint!r}) from {peer}",
                     member_id=member.member_id, mac=format_mac(member.mac), role=member.role,
                     endpoint=member.endpoint, peer=self._peer)
            group = self.server.group_key()
            answer = {
                "member_id": member.member_id,
                "subnet": self.server.subnet,
                "version": PROTOCOL_VERSION,
                "endpoint": member.endpoint,
                "incarnation": member.incarnation,
                "group_epoch": group.epoch,
                "pair_key_lifetime": self.server.pair_key_lifetime,
                "rekey_after_packets": self.server.pair_key_max_packets,
                "rekey_after_bytes": self.server.pair_key_max_bytes,
            }
            routes = self.server.routes_for_members() if member.role == "client" else None
            if routes is not None:
                answer["routes"] = routes
            return answer

        return d.addCallback(registered)

    def _registered_member(self):
        if self.member is None:
            raise NotRegistered("register before asking for keys")
        return self.member

    @RequestPairKey.responder
    def request_pair_key(self, peer_mac, epoch=None):
        def ask():
            return self.server.pair_key_for(self._registered_member(), peer_mac, epoch)

        return self._charged("pair key", ask).addCallback(attrs.asdict, recurse=False)

    @RequestPairKeyByAddress.responder
    def request_pair_key_by_address(self, peer_address, epoch=None):
        def ask():
            return self.server.pair_key_by_address(self._registered_member(), peer_address, epoch)

        return self._charged("pair key", ask).addCallback(attrs.asdict, recurse=False)

    @RequestRekey.responder
    def request_rekey(self, peer_id, epoch):
        def ask():
            return self.server.rekey_on_count(self._registered_member(), peer_id, epoch)

        return self._charged("rekey", ask).addCallback(lambda epoch: {"epoch": epoch})

    @ListPeers.responder
    def list_peers(self, after):
        return self._charged("peer list", lambda: self.server.list_peers(self._registered_member(), after))

    @RequestNetLinks.responder
    def request_net_links(self):
        def ask():
            links = self.server.net_links_for(self._registered_member())
            return {"links": [attrs.asdict(link, recurse=False) for link in links]}

        return self._charged("net links", ask)

    @Ping.responder
    def ping(self):
        return self._charged("ping", lambda: {})

    @RequestGroupKey.responder
    def request_group_key(self):
        def ask():
            self._registered_member()
            group = self.server.group_key()
            return {"group_id": GROUP_ID, "key": group.key, "epoch": group.epoch, "lifetime": 0}

        return self._charged("group key", ask)

    # Pushes (IMemberConnection) --------------------------------------------

    def push_pair_key(self, grant: PairKeyGrant):
        return self.callRemote(PushPairKey, **attrs.asdict(grant, recurse=False))

    def tell_pair_key(self, grant: PairKeyGrant):
        if not self._closed:
            self.transport.write(PushPairKey.serialize_command(grant, self))

    def push_group_key(self, group: GroupKey):
        return self.callRemote(PushGroupKey, group_id=GROUP_ID, key=group.key,
                               epoch=group.epoch, lifetime=0)

    def push_purge(self, peer_id, reason):
        return self.callRemote(Purge, peer_id=peer_id, reason=reason)

    def push_net_links(self, links):
        return self.callRemote(PushNetLinks, links=[attrs.asdict(link, recurse=False) for link in links])

    def push_routes(self, routes):
        return self.callRemote(PushRoutes, routes=list(routes))


class KeyServerFactory(Factory):
    """
    Builds a L{MemberSession} per connection (inside TLS).
    """

    def __init__(self, server: KeyServer):
        self.server = server

    def buildProtocol(self, addr):
        session = MemberSession(self.server)
        session.factory = self
        return session
