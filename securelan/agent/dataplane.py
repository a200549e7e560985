# -*- test-case-name: tests.test_agent -*-
"""
The agent's data plane: every frame the host sends and every datagram that
arrives passes through here.

Outbound (L{DataPlane.frame_from_device}), stage by stage:

 1. a frame shorter than an Ethernet header is dropped (C{runt});
 2. its source MAC must be the device's own (C{spoofed_src}): a host cannot
    send in another member's name;
 3. a group destination (I/G bit: broadcast, multicast) is sealed once under
    our sending key derived from the group key and sent to every member (or
    broadcast in one send where the carrier can);
 4. a unicast destination is looked up in the key cache (the seed's MAC-KEY
    list): on a hit the frame is sealed under our sending direction of the
    pair key and sent to the peer's endpoint (after a batch's first frame,
    the frames of one batch of device reads that fit one datagram, TCP ACKs
    mostly, are held to leave together);
 5. on a miss one key request per MAC is in flight, and the frame waits in a
    bounded queue (C{on_key_miss = "queue"}) or is dropped as the seed does
    (C{"drop"}); the queue is flushed in order when the key arrives.

Inbound (L{DataPlane.datagram_received}):

 1. the clear header is checked (L{securelan.wire.parse_header});
 2. a pair datagram must be addressed to our MAC (C{not_for_us}); its source
    MAC selects the key (the seed's step 4); on a miss a bounded key request
    is made and the datagram dropped (C{no_key});
 3. the header's epoch must be the key's, its sender incarnation selects the
    receiving direction (a newer one means the peer restarted);
 4. the pieces of a split frame are gathered (in order from one read,
    taken at once from a UDP GRO read that holds them all, or by the
    reassembler);
 5. the tag of the whole frame is verified, then the replay window checked
    and moved;
 6. the peer's endpoint follows its authenticated datagrams (roaming);
 7. the frame is written to the device.

Every drop is counted by reason, for the agent and for the peer; nothing a
peer or an attacker sends can raise out of here.
"""

from collections import OrderedDict

from twisted.python.failure import Failure

from ..logs import logger
from ..addresses import format_mac, is_group_mac
from ..errors import UnknownPeer
from ..ratelimit import TokenBucket
from ..wire import (
    DROP_REASSEMBLY,
    ETHERNET_HEADER_LEN,
    FLAG_OFFLOAD,
    HEADER_LEN,
    TYPE_GROUP,
    TYPE_PAIR,
    VNET_HDR_LEN,
    CounterExhausted,
    Reassembler,
    Train,
    WireError,
    join_frame,
    open_datagram,
    parse_header,
    piece_headers,
    train_ciphertext,
)
from .pending import PendingFrames
from .carriers import send_sealed
from .peers import GroupState, Peer, Retired, Stats

log = logger("securelan.agent")

_KIND_MASK = ~FLAG_OFFLOAD & 0xFF

#: The pending queue's name for frames that wait for the group key.
_GROUP_QUEUE = b"group"

#: A member announces itself to the others with a group frame of this
#: EtherType (IEEE local experimental 1), which receivers consume: they learn
#: its endpoint before it ever needs them to.
ANNOUNCE_ETHERTYPE = b"\x88\xb5"
_ANNOUNCE_BODY = b"securelan announce"
_ANNOUNCE_PAYLOAD = ANNOUNCE_ETHERTYPE + _ANNOUNCE_BODY
_ANNOUNCE_FRAME_LEN = 12 + len(_ANNOUNCE_PAYLOAD)

#: However a key server sets its limits, a sender asks for a new key long
#: before its message counter could run out (L{REJECT_AFTER_MESSAGES}).
REKEY_SAFETY_PACKETS = 2**60

#: How long a MAC the key server does not know is not asked about again.
NEGATIVE_CACHE_SECONDS = 5.0
_NEGATIVE_CACHE_SIZE = 4096


class DataPlane:
    """
    The send and receive paths of one member.

    @param keys: what asks the key server (a L{securelan.client.KeyServerClient}
        or anything with C{request_pair_key(mac)} and C{request_group_key()}).
    @param carrier: an L{ICarrier}, already started with
        L{datagram_received} as its receiver.
    @param device: an L{IDevice}, already started with L{frame_from_device}.
    """

    #: Endpoints learnt from group frames beyond the member list, at most.
    MAX_LEARNED = 1024
    #: Seconds past a key's lifetime before its holder warns that it was
    #: not replaced (the key server checks for due keys every minute).
    OVERDUE_GRACE = 120.0

    def __init__(self, my_id: str, my_mac: bytes, incarnation: int, keys, carrier, device, clock,
                 on_key_miss: str = "queue", queue_per_peer: int = 64, queue_total: int = 1024,
                 queue_timeout: float = 2.0, gateway: bool = False, rekey_after_packets: int = 0,
                 rekey_after_bytes: int = 0, keepalive: float = 0.0, on_grant=None):
        self.my_id = my_id
        self.my_mac = my_mac
        self.incarnation = incarnation
        self.keys = keys
        self.carrier = carrier
        self.device = device
        self.clock = clock
        self.queue_on_miss = on_key_miss == "queue"
        #: A frame of the device's current batch of reads was sent already.
        self._batch_sent = False
        #: The gateway role: frames to and from the hosts of a plaintext
        #: network (foreign MACs), never between members.
        self.gateway = gateway
        self.pending = PendingFrames(queue_per_peer, queue_total, queue_timeout, clock)
        self.reassembler = Reassembler(clock)
        self.stats = Stats()
        #: The key cache (the seed's MAC-KEY list), by the peer's MAC...
        self.peers: dict[bytes, Peer] = {}
        #: ... and by its member ID: one entry per peer.
        self.peers_by_id: dict[str, Peer] = {}
        self._retired = Retired()
        # A forged header naming a new incarnation costs a key derivation:
        # bound how often anyone can make us pay it, whatever peer it names.
        self._derivations = TokenBucket(20.0, 40, clock)
        self.group: GroupState | None = None
        #: Other members' endpoints by MAC, for broadcast over carriers that
        #: cannot: from the key server's list, from keys, and from the group
        #: frames members send.
        self.members: dict[bytes, object] = {}
        self._max_datagram = carrier.max_datagram
        self._members_asked = None
        self._members_known = False
        self._members_listed = 0
        # The frame being joined from in-order pieces (datagrams_received).
        self._run = []
        self._run_header = None
        self._run_peer = None
        self._run_opener = None
        self._run_headers = []
        self._run_started = 0.0
        self._receiving = False
        self._backlog = []
        #: How the split pair frames that came in were gathered: taken whole
        #: from one GRO read, joined from pieces that came in order, or
        #: rebuilt by the reassembler (counted before they are authenticated).
        self.split_frames = {"whole_read": 0, "in_order": 0, "reassembled": 0}
        self._announce_due = False
        self._inflight: set[bytes] = set()
        self._group_inflight = False
        self._unknown: OrderedDict[bytes, float] = OrderedDict()
        # Datagrams from senders we hold no key for make us ask the key
        # server; an attacker must not be able to make us ask without limit.
        self._inbound_requests = TokenBucket(20.0, 40, clock)
        self._held: OrderedDict[bytes, list] = OrderedDict()
        self._held_count = 0
        #: Past these (datagrams, bytes) under one epoch a sender asks for
        #: the next key; a counter is never let near exhaustion either way.
        self.rekey_after_packets = min(rekey_after_packets or REKEY_SAFETY_PACKETS, REKEY_SAFETY_PACKETS)
        self.rekey_after_bytes = rekey_after_bytes or 0
        self.rekeys_asked = 0
        #: Called with every grant the data plane takes, however it came
        #: (asked for by MAC, by address, or pushed): layer 3 learns the
        #: peer's addresses from it.
        self.on_grant = on_grant
        #: Behind a NAT: seconds without sending to a peer we talked with
        #: after which a keepalive goes to it (0: none).
        self.keepalive = keepalive
        self.keepalives_sent = 0
        #: Keys in use well past their lifetime (each warned about once).
        self.overdue_keys = 0

    def start(self):
        """
        Fetch the group key and the member list at once: broadcasts (ARP)
        come first.
        """
        self._request_group_key()
        self.refresh_members()
        self.announce()

    def recheck(self):
        """
        After re-registering (we were away from the key server): ask again
        for every key we hold, so what changed meanwhile reaches us: a new
        epoch, a peer revoked (refused: purged).
        """
        for mac in list(self.peers):
            self._request_pair_key(mac, epoch=self.peers[mac].epoch)
        if self.group is not None:
            self._request_group_key()

    def announce(self):
        """
        Tell every member where we are, once the group key and the member
        list are here (after start and after every re-registration).
        """
        self._announce_due = True
        self._maybe_announce()

    def _maybe_announce(self):
        if self._announce_due and self.group is not None and (
                self._members_known or self.carrier.can_broadcast):
            self._announce_due = False
            self._send_group(b"\xff" * 6 + self.my_mac + ANNOUNCE_ETHERTYPE + _ANNOUNCE_BODY)

    def tick(self):
        """
        Housekeeping, once a second: frames that waited or were half
        reassembled for too long are dropped (and counted).
        """
        self.pending.expire()
        now = self.clock.seconds()
        for peer in self.peers_by_id.values():
            while peer.older and now >= peer.older[0][1]:
                self._retired.put(peer.older.pop(0)[0])
            if peer.lifetime and not peer.overdue_warned and now >= (
                    peer.granted_at + peer.lifetime + self.OVERDUE_GRACE):
                # The key server replaces a key when its lifetime is over;
                # one still in use well past it means the replacement did
                # not reach us (or the key server is not rekeying).
                peer.overdue_warned = True
                self.overdue_keys += 1
                log.warn("the key with {peer_id} (epoch {epoch}) is {late:.0f} s past its lifetime and "
                         "was not replaced: is the key server rekeying, and reachable?",
                         peer_id=peer.member_id, epoch=peer.epoch,
                         late=now - peer.granted_at - peer.lifetime)
        oldest = now - self.pending.timeout
        for mac in [mac for mac, held in self._held.items() if held[0][0] < oldest]:
            self._release_held(mac, False)
        if self._run and self.clock.seconds() - self._run_started > 0.5:
            self._flush_run()
        self.reassembler.expire()
        if self.keepalive:
            self._keepalives(now)

    def _keepalives(self, now):
        """
        Behind a NAT its mapping for a peer lapses when nothing goes out to
        it: send an authenticated keepalive (an announce frame, which the
        peer consumes and which moves its idea of our endpoint) to every
        peer we exchanged frames with and sent nothing to for a while.
        """
        for peer in self.peers_by_id.values():
            last_tx, last_rx = peer.stats.last_tx, peer.stats.last_rx
            if last_rx is None or peer.endpoint is None:
                continue
            if now - (last_tx if last_tx is not None else 0.0) >= self.keepalive:
                self._say_hello(peer)

    def _drop(self, reason: str, peer=None, n: int = 1):
        self.stats.drop(reason, n)
        if peer is not None:
            peer.stats.drop(reason, n)

    # Outbound ----------------------------------------------------------------

    def frame_from_device(self, frame, offload=None, hold=False):
        """
        Send a frame the host sent.  With C{hold} (the frame is one of a
        batch of device reads, which ends with L{flush}), the carrier may
        keep the datagram of a frame that fits one back until L{flush}, to
        send it with others to the same peer (see
        L{securelan._interfaces.ICarrier.send_parts}); not the batch's first
        frame, which leaves at once: a lone frame (a ping, a request) waits
        for no end of batch.
        """
        if len(frame) < ETHERNET_HEADER_LEN:
            return self._drop("runt")
        src = frame[6:12]
        if src != self.my_mac and (not self.gateway or src in self.members or src in self.peers):
            # A member host sends as itself only; a gateway sends for the
            # hosts of its plaintext network, never as a member.
            return self._drop("spoofed_src")
        dst = bytes(frame[:6])
        if is_group_mac(dst):
            return self._send_group(frame, offload)
        peer = self.peers.get(dst)
        if peer is not None:
            return self._send_pair(peer, frame, offload, hold)
        if self.queue_on_miss:
            if not self.pending.add(dst, (frame, offload)):
                self._drop("queue_full")
        else:
            self._drop("no_key")
        self._request_pair_key(dst)

    def flush(self):
        """
        Send what L{frame_from_device} held back: the batch of device reads
        ended.
        """
        self._batch_sent = False
        self.carrier.flush()

    def _send_pair(self, peer: Peer, frame, offload=None, hold=False):
        if peer.endpoint is None:
            return self._drop("no_endpoint", peer)
        now = self.clock.seconds()
        sealer = peer.sealer
        if peer.older and now < peer.switch_at:
            # Make before break: keep sending under the old epoch until the
            # peer shows it has the new key, or for a moment at most.
            sealer = peer.older[-1][0].sealer
        try:
            sealed = sealer.seal_for_carrier(frame, self._max_datagram, offload)
        except CounterExhausted:
            return self._drop("counter", peer)
        except ValueError:
            return self._drop("too_big", peer)
        if hold:
            hold, self._batch_sent = self._batch_sent, True
        send_sealed(self.carrier, sealed, peer.endpoint, hold)
        if sealer is peer.sealer and not peer.rekey_asked:
            if self.rekey_after_bytes:
                peer.epoch_bytes += len(frame)
            if sealer.counter >= self.rekey_after_packets or (
                    self.rekey_after_bytes and peer.epoch_bytes >= self.rekey_after_bytes):
                self._ask_rekey(peer)
        stats = peer.stats
        stats.tx_frames += 1
        stats.tx_bytes += len(frame)
        stats.last_tx = now

    def _send_group(self, frame, offload=None):
        group = self.group
        if group is None:
            if self.queue_on_miss:
                if not self.pending.add(_GROUP_QUEUE, (frame, offload)):
                    self._drop("queue_full")
            else:
                self._drop("no_group_key")
            self._request_group_key()
            return
        sealer = group.sealer_for(bytes(frame[6:12]))
        if sealer is None:
            return self._drop("too_many_sources")
        try:
            datagrams = sealer.seal(frame, self._max_datagram, offload)
        except CounterExhausted:
            return self._drop("counter")
        except ValueError:
            return self._drop("too_big")
        if not self.carrier.can_broadcast:
            self._refresh_members_if_stale()
        endpoints = {endpoint for endpoint in self.members.values() if endpoint is not None}
        self.carrier.broadcast(datagrams, endpoints)
        group.stats.tx_frames += 1
        group.stats.tx_bytes += len(frame)
        group.stats.last_tx = self.clock.seconds()

    # Keys ------------------------------------------------------------------------

    def _known_unknown(self, mac: bytes) -> bool:
        until = self._unknown.get(mac)
        if until is None:
            return False
        if until > self.clock.seconds():
            return True
        del self._unknown[mac]
        return False

    def _ask_rekey(self, peer):
        """
        This epoch's key has carried what it may: ask the key server for the
        next (once per epoch; the push of the new key does the rest).
        """
        peer.rekey_asked = True
        self.rekeys_asked += 1
        log.info("asking for a new key with {peer_id}: epoch {epoch} carried {packets} datagrams, "
                 "{bytes} bytes", peer_id=peer.member_id, epoch=peer.epoch, packets=peer.sealer.counter,
                 bytes=peer.epoch_bytes)
        request = getattr(self.keys, "request_rekey", None)
        if request is None:
            return
        d = request(peer.member_id, peer.epoch)
        d.addErrback(lambda f: log.info("rekey request for {peer_id} failed: {reason}",
                                        peer_id=peer.member_id, reason=f.getErrorMessage()))

    def _request_pair_key(self, mac: bytes, epoch=None):
        if mac in self._inflight:
            return
        if self._known_unknown(mac):
            self.pending.discard(mac, self.stats.drops, "unknown_peer")
            return
        self._inflight.add(mac)
        d = self.keys.request_pair_key(mac, epoch)
        d.addCallbacks(self.install_pair_key, self._pair_key_refused, errbackArgs=(mac,))
        d.addBoth(self._request_done, mac)

    def _request_done(self, result, mac):
        self._inflight.discard(mac)
        if isinstance(result, Failure):
            log.failure("installing the key for {mac} failed", result, mac=format_mac(mac))

    def _pair_key_refused(self, failure, mac):
        self.pending.discard(mac, self.stats.drops, "no_key")
        self._release_held(mac, False)
        if failure.check(UnknownPeer):
            cached = self.peers.get(mac)
            if cached is not None:
                # A peer the key server no longer knows (revoked while we
                # were away): forget its key.
                self.purge(cached.member_id)
            self._unknown[mac] = self.clock.seconds() + NEGATIVE_CACHE_SECONDS
            while len(self._unknown) > _NEGATIVE_CACHE_SIZE:
                self._unknown.popitem(last=False)
        log.info("no key for {mac}: {reason}", mac=format_mac(mac), reason=failure.getErrorMessage())

    def install_pair_key(self, grant):
        """
        Put a pair key the key server granted (or pushed) in the key cache
        and send what waited for it.  The cache holds one entry per peer:
        a grant with new facts for a key in use (the peer's MAC, endpoint,
        incarnation) updates it; an older epoch is ignored.
        """
        endpoint = self.carrier.parse_endpoint(grant.peer_endpoint)
        old = self.peers_by_id.get(grant.peer_id)
        if old is not None and grant.epoch < old.epoch:
            log.debug("ignored a grant of epoch {epoch} for {peer_id}: epoch {held} is held",
                      epoch=grant.epoch, peer_id=grant.peer_id, held=old.epoch)
            return old
        if self.on_grant is not None:
            self.on_grant(grant)
        if old is not None and old.holds(grant):
            peer = old
            # The key again: the peer (or the key server for it) wants us
            # on this epoch now.
            peer.switch_at = 0.0
            if grant.peer_role == "gateway":
                # A gateway fronts many MACs under one key.
                peer.macs.add(grant.peer_mac)
            elif peer.mac != grant.peer_mac:
                self._unindex(peer)
                peer.macs = {grant.peer_mac}
            peer.update(grant, endpoint)
        else:
            peer = Peer(grant, self.my_id, self.incarnation, endpoint, self.clock, self._derivations,
                        resume=self._retired.take(grant))
            if old is not None:
                self._unindex(old)
                older, old.older = old.older, []
                if grant.peer_role == "gateway":
                    peer.macs |= old.macs
                if grant.epoch > old.epoch:
                    # Make before break: the old epoch is still accepted
                    # for a while, for datagrams already on their way, and
                    # sent with until the peer has the new key.
                    now = self.clock.seconds()
                    # Rekeys may come faster than datagrams cross: keep a
                    # few epochs back, each for the grace period.
                    kept = [(p, until) for p, until in older if until > now][-(self.OLDER_EPOCHS - 1):]
                    for p, until in older:
                        if (p, until) not in kept:
                            self._retired.put(p)
                    peer.older = kept + [(old, now + self.REKEY_GRACE)]
                    if grant.age < self.SWITCH_DELAY:
                        peer.switch_at = now + self.SWITCH_DELAY - grant.age
                else:
                    for p, _ in older:
                        self._retired.put(p)
                    self._retired.put(old)
                peer.stats = old.stats
                if old.endpoint is not None and old.endpoint_text == grant.peer_endpoint:
                    # Keep an endpoint learnt from authenticated traffic (roaming).
                    peer.endpoint = old.endpoint
        self.peers_by_id[peer.member_id] = peer
        for mac in peer.macs:
            displaced = self.peers.get(mac)
            if displaced is not None and displaced is not peer:
                # The MAC moved to this member: the old holder no longer has it.
                displaced.macs.discard(mac)
            self.peers[mac] = peer
        self.members[peer.mac] = peer.endpoint
        sent_before = peer.stats.tx_frames
        for frame, offload in self.pending.take(grant.peer_mac):
            self._send_pair(peer, frame, offload)
        self._release_held(grant.peer_mac, True)
        if self.keepalive and old is None and peer.stats.tx_frames == sent_before:
            # Behind a NAT: a new key means the peer is about to send to
            # us; say hello first, so that the NAT lets it in and the peer
            # learns where we really are.
            self._say_hello(peer)
        return peer

    def _say_hello(self, peer):
        if peer.endpoint is None:
            return
        self.keepalives_sent += 1
        self._send_pair(peer, peer.mac + self.my_mac + _ANNOUNCE_PAYLOAD)

    def _unindex(self, peer):
        for mac in peer.macs:
            if self.peers.get(mac) is peer:
                del self.peers[mac]
                self.members.pop(mac, None)

    def _request_group_key(self):
        if self._group_inflight:
            return
        self._group_inflight = True
        d = self.keys.request_group_key()

        def done(result):
            self._group_inflight = False
            return result

        def refused(failure):
            self.pending.discard(_GROUP_QUEUE, self.stats.drops, "no_group_key")
            log.info("no group key: {reason}", reason=failure.getErrorMessage())

        d.addBoth(done).addCallbacks(self.install_group_key, refused)

    def install_group_key(self, grant):
        """
        Take the group key the key server granted or pushed.
        """
        old = self.group
        if old is None or not old.holds(grant):
            self.group = GroupState(grant, self.my_mac, self.incarnation, self.clock)
            if old is not None:
                self.group.stats = old.stats
        for frame, offload in self.pending.take(_GROUP_QUEUE):
            self._send_group(frame, offload)
        self._maybe_announce()
        return self.group

    #: A broadcast refreshes the member list when it is older than this.
    MEMBERS_STALE_SECONDS = 5.0

    def _refresh_members_if_stale(self):
        asked = self._members_asked
        if asked is None or self.clock.seconds() - asked > self.MEMBERS_STALE_SECONDS:
            self.refresh_members()

    def refresh_members(self):
        """
        Ask the key server for the member list (for broadcast fan-out).
        """
        if self.carrier.can_broadcast:
            return
        self._members_asked = self.clock.seconds()
        d = self.keys.list_peers()
        d.addCallbacks(self.set_members,
                       lambda f: log.info("member list not refreshed: {reason}", reason=f.getErrorMessage()))

    def set_members(self, peers):
        """
        Replace the list of members (from C{ListPeers}) that group frames go
        to over carriers that cannot broadcast.
        """
        members = {}
        for info in peers:
            if info.mac == self.my_mac:
                continue
            known = self.peers.get(info.mac)
            if known is not None and known.member_id == info.member_id and known.endpoint is not None:
                endpoint = known.endpoint
            else:
                endpoint = self.carrier.parse_endpoint(info.endpoint)
            members[info.mac] = endpoint
        self.members = members
        self._members_listed = len(members)
        self._members_known = True
        self._maybe_announce()

    def purge(self, peer_id: str):
        """
        Forget every key held with C{peer_id} (revocation).
        """
        if self._run and self._run_peer.member_id == peer_id:
            self._drop("purged", n=len(self._run))
            self._run = []
        peer = self.peers_by_id.pop(peer_id, None)
        if peer is not None:
            self._unindex(peer)
            for older, _ in peer.older:
                self._retired.put(older)
            peer.older = []
            self._retired.put(peer)

    # Inbound ---------------------------------------------------------------------

    def datagram_received(self, datagram, source):
        self.datagrams_received((datagram,), source)

    def datagrams_received(self, datagrams, source):
        """
        Take datagrams from the carrier (see L{_receive_batch}).  A batch
        that arrives while one is being taken (a key answered at once
        releases held datagrams) waits for it to end.
        """
        if self._receiving:
            self._backlog.append((datagrams, source))
            return
        self._receiving = True
        try:
            if type(datagrams) is Train and not self._run:
                datagrams = self._receive_train(datagrams, source)
            self._receive_batch(datagrams, source)
            while self._backlog:
                self._receive_batch(*self._backlog.pop(0))
        finally:
            self._receiving = False

    def _receive_train(self, train, source):
        """
        A UDP GRO read that begins with a whole split frame from a peer
        whose key is here (the usual case: one GSO send of a super-frame is
        one read): its pieces are taken from the read at once and the frame
        opened as L{_receive_batch} would open it.  Anything else, and what
        follows that frame, is left to L{_receive_batch}: the datagrams
        returned.
        """
        if train.segment != self._max_datagram:
            # Pieces are cut to the sender's datagram size: a peer with
            # another MTU (or a forger varying it) takes the general path.
            return train
        try:
            header = parse_header(train.data)
        except WireError:
            return train
        if header.index or header.count == 1:
            return train
        peer = self.peers.get(header.src)
        if (peer is None or header.type & _KIND_MASK != TYPE_PAIR or header.epoch != peer.epoch
                or self._not_for_us(header.dst)):
            return train
        # Only under the adopted direction: a candidate (a restarted peer)
        # is the exception, left to the general path.
        opener = peer.adopted(header.incarnation)
        if (opener is None or opener.seen(header.counter) or self.reassembler.holds(header)
                or (ciphertext := train_ciphertext(train, header)) is None):
            return train
        self.split_frames["whole_read"] += 1
        self._open_split(header, ciphertext, opener, peer, source)
        return train.after(header.count)

    def _receive_batch(self, datagrams, source):
        """
        Datagrams that arrived together from C{source} (one UDP GRO read:
        usually the pieces of one super-frame from one peer).  The peer and
        its receiving direction are looked up once per run of datagrams
        that name the same sender, epoch and incarnation; every whole frame
        and every split frame is still authenticated and replay-checked on
        its own.
        """
        my_mac = self.my_mac
        cached = None
        peer = opener = None
        moved = False
        # The pieces of one frame usually arrive in order (though a frame
        # may straddle two reads): they are gathered here; anything else
        # goes through the reassembler.
        run = self._run
        run_header = self._run_header
        # The header the next piece of the run will have, if it comes now.
        headers = self._run_headers
        expected = headers[len(run)] if run else None
        for datagram in datagrams:
            if expected is not None and datagram[:HEADER_LEN] == expected:
                # The next piece of the frame in progress: the same sender,
                # key and frame as its piece 0, checked in full below.
                run.append(datagram[HEADER_LEN:])
                if len(run) < len(headers):
                    expected = headers[len(run)]
                    continue
                pieces = run
                self._run = run = []
                expected = None
                self.split_frames["in_order"] += 1
                self._open_split(run_header, b"".join(pieces), self._run_opener, self._run_peer, source)
                # It may have adopted another receiving direction.
                cached = None
                continue
            try:
                header = parse_header(datagram)
            except WireError as e:
                self._drop(e.reason)
                continue
            kind = header.type & _KIND_MASK
            if kind != TYPE_PAIR:
                if kind == TYPE_GROUP:
                    self._receive_group(datagram, header, source)
                else:
                    self._drop("type")
                continue
            dst = header.dst
            if dst != my_mac and self._not_for_us(dst):
                self._drop("not_for_us")
                continue
            key = (header.src, header.epoch, header.incarnation)
            if key != cached:
                if header.src not in self.peers and self._hold(datagram, header.src, source):
                    cached = None
                    continue
                peer, opener = self._pair_opener(header, datagram, source)
                if opener is None:
                    cached = None
                    continue
                cached = key
                moved = False
            count = header.count
            if count == 1:
                try:
                    piece = opener.open_counter(datagram, header.counter)
                except WireError as e:
                    self._drop(e.reason, peer)
                    continue
                if not moved:
                    # Once per run of whole frames: the first is authentic.
                    moved = True
                    self._authentic(peer, opener, header, source)
                self._deliver(header, piece, peer.stats, peer)
                continue
            index = header.index
            if opener.seen(header.counter - index):
                # A piece of a frame accepted before: not worth holding.
                self._drop("replay", peer)
                continue
            if run and (index != len(run) or header.counter - index != run_header.counter
                        or header.src != run_header.src or count != run_header.count
                        or header.type != run_header.type or header.epoch != run_header.epoch
                        or header.incarnation != run_header.incarnation):
                self._flush_run()
                run = self._run
                expected = None
            if run or (index == 0 and not self.reassembler.holds(header)):
                if index == 0:
                    self._run_header = run_header = header
                    self._run_headers = headers = piece_headers(header)
                    self._run_peer = peer
                    self._run_opener = opener
                    self._run_started = self.clock.seconds()
                run.append(datagram[HEADER_LEN:])
                if len(run) == count:
                    pieces = run
                    self._run = run = []
                    expected = None
                    self.split_frames["in_order"] += 1
                    self._open_split(run_header, b"".join(pieces), opener, peer, source)
                    cached = None
                else:
                    expected = headers[len(run)]
            else:
                self._piece(header, datagram[HEADER_LEN:], opener, peer, source)
                cached = None

    def _not_for_us(self, dst) -> bool:
        """
        Whether a pair datagram to C{dst} must be refused here.  To a
        member host: anything but its own MAC.  To a gateway: another
        member's MAC (member-to-member traffic must not reach the plaintext
        side); the hosts behind it are its to take.
        """
        return dst != self.my_mac and (not self.gateway or dst in self.members or dst in self.peers)

    def _flush_run(self):
        """
        Hand the pieces of an unfinished run (indexes 0, 1, ...) to the
        reassembler, where the rest of their frame will find them.
        """
        header, pieces, peer, opener = self._run_header, self._run, self._run_peer, self._run_opener
        self._run = []
        counter = header.counter
        for index, piece in enumerate(pieces):
            self._piece(header._replace(index=index, counter=counter + index), piece, opener, peer, None)

    def _piece(self, header, piece, opener, peer, source):
        """
        A piece of a split frame that did not arrive in order with the rest.
        """
        try:
            pieces = self.reassembler.add(header, piece)
        except WireError as e:
            return self._drop(e.reason, peer)
        if pieces is not None:
            self.split_frames["reassembled"] += 1
            self._open_split(header, b"".join(pieces), opener, peer, source)

    def _open_split(self, header, ciphertext, opener, peer, source):
        """
        A split frame with all its pieces (their ciphertext in one buffer):
        authenticate it, then deliver.  A frame that fails counts the
        datagrams its error stands for (all of them, but one for an
        authentic frame too short to be one).
        """
        # Its pieces may have come before another frame of the peer made a
        # candidate direction the adopted one: open it under that one.
        opener = peer.adopted(header.incarnation) or opener
        try:
            frame = opener.open_frame(header, ciphertext)
        except WireError as e:
            if e.reason == DROP_REASSEMBLY:
                # Authentic, but no frame.
                self._authentic(peer, opener, header, source)
            return self._drop(e.reason, peer, n=e.datagrams)
        self._authentic(peer, opener, header, source)
        self._write(frame, header.type & FLAG_OFFLOAD, peer.stats, peer)

    def _authentic(self, peer, opener, header, source):
        """
        A frame from C{peer} authenticated: adopt a restarted peer's new
        incarnation, follow a roaming peer; a frame under the new epoch
        shows the peer has the new key.
        """
        peer.accept(opener, header.incarnation)
        if peer.switch_at:
            peer.switch_at = 0.0
        if source != peer.endpoint and source is not None:
            log.info("peer {peer_id} moved to {endpoint}", peer_id=peer.member_id, endpoint=source)
            peer.endpoint = source
            self.members[peer.mac] = source

    #: Seconds the previous epoch of a rekeyed pair key is still accepted.
    REKEY_GRACE = 15.0
    #: Epochs before the current one still accepted (within the grace).
    OLDER_EPOCHS = 3
    #: Seconds at most an agent goes on sending under the previous epoch
    #: after a rekey, unless the peer's datagrams show it has the new key.
    SWITCH_DELAY = 1.0

    #: Datagrams from a sender whose key is on its way, held at most: per
    #: sender and in all (they are not authenticated yet).
    HOLD_PER_SENDER = 16
    HOLD_TOTAL = 256

    def _hold(self, datagram, src, source, epoch=None) -> bool:
        """
        In queue mode, keep a datagram from a sender whose key is not here
        yet (and ask for it), to open it when the key arrives instead of
        dropping it as the seed does.  False when it cannot be held.
        """
        if not self.queue_on_miss or self._known_unknown(src):
            return False
        held = self._held.get(src)
        if held is None:
            if len(self._held) >= self.HOLD_TOTAL or not self._inbound_requests.take():
                return False
            self._held[src] = [(self.clock.seconds(), bytes(datagram), source)]
            self._held_count += 1
            # Last: the answer may come at once and release what is held.
            self._request_pair_key(src, epoch=epoch)
            return True
        if len(held) >= self.HOLD_PER_SENDER or self._held_count >= self.HOLD_TOTAL:
            return False
        held.append((self.clock.seconds(), bytes(datagram), source))
        self._held_count += 1
        return True

    def _release_held(self, mac, deliver: bool):
        held = self._held.pop(mac, None)
        if not held:
            return
        self._held_count -= len(held)
        oldest = self.clock.seconds() - self.pending.timeout
        fresh = [(datagram, source) for stamp, datagram, source in held if stamp >= oldest]
        if len(fresh) < len(held):
            self._drop("held_timeout", n=len(held) - len(fresh))
        if not deliver:
            self._drop("no_key", n=len(fresh))
            return
        for datagram, source in fresh:
            self.datagrams_received((datagram,), source)

    def _pair_opener(self, header, datagram, source):
        """
        The peer entry whose key the header names and the receiving
        direction to try; (peer or None, None) after counting why there is
        none.  Another epoch than the peer's is the seed's PW_ID mismatch:
        the previous epoch is still accepted for a grace period; a newer one
        means a rekey this agent has not heard of (the datagram waits, the
        key is asked for); an older one means the peer has not heard of it
        (asking with our epoch makes the key server push the key to it).
        """
        src = header.src
        peer = self.peers.get(src)
        if peer is None:
            self._drop("no_key")
            if self._inbound_requests.take():
                self._request_pair_key(src)
            return None, None
        if header.epoch != peer.epoch:
            now = self.clock.seconds()
            for previous, until in peer.older:
                if header.epoch == previous.epoch and now < until:
                    opener = previous.opener_for(header.incarnation)
                    if opener is None:
                        self._drop("incarnation", peer)
                    return previous, opener
            if header.epoch > peer.epoch:
                if not self._hold(datagram, src, source, epoch=peer.epoch):
                    self._drop("epoch", peer)
                    if peer.may_resync(now):
                        self._request_pair_key(src, epoch=peer.epoch)
            else:
                self._drop("epoch", peer)
                if peer.may_resync(now):
                    self._request_pair_key(src, epoch=peer.epoch)
            return peer, None
        opener = peer.opener_for(header.incarnation)
        if opener is None:
            self._drop("incarnation", peer)
        return peer, opener

    def _receive_group(self, datagram, header, source):
        group = self.group
        src = header.src
        if src == self.my_mac or not is_group_mac(header.dst):
            return self._drop("bad_group")
        if group is None:
            self._request_group_key()
            return self._drop("no_group_key")
        if header.epoch != group.epoch:
            if header.epoch > group.epoch and group.may_resync(self.clock.seconds()):
                # A group rekey we missed (we were away): ask.
                self._request_group_key()
            return self._drop("epoch")
        opener = group.opener_for(src, header.incarnation)
        if opener is None:
            return self._drop("incarnation")
        try:
            frame = open_datagram(opener, self.reassembler, datagram, header)
        except WireError as e:
            # A split frame that failed counts each of its datagrams.
            return self._drop(e.reason, n=e.datagrams)
        if frame is None:
            return
        group.accept(src, opener, header.incarnation)
        if (source is not None and src not in self.members and src not in self.peers
                and len(self.members) < self._members_listed + self.MAX_LEARNED):
            # A member we did not know of (it joined after our list was
            # fetched), or a host behind a gateway: send our broadcasts there.
            self.members[src] = source
        self._write(frame, header.type & FLAG_OFFLOAD, group.stats, None)

    def _deliver(self, header, plaintext, stats, peer):
        try:
            frame = join_frame(header, (plaintext,))
        except WireError as e:
            return self._drop(e.reason, peer)
        self._write(frame, header.type & FLAG_OFFLOAD, stats, peer)

    def _write(self, frame, offload, stats, peer):
        # Length first: no copy of every frame to spot the rare announce.
        if not offload and len(frame) == _ANNOUNCE_FRAME_LEN and frame[12:] == _ANNOUNCE_PAYLOAD:
            stats.rx_frames += 1
            return
        if not self.device.write(frame, offload):
            return self._drop("device_full", peer)
        stats.rx_frames += 1
        stats.rx_bytes += len(frame) - (VNET_HDR_LEN if offload else 0)
        stats.last_rx = self.clock.seconds()

    # Status ----------------------------------------------------------------------

    def status(self):
        peers = []
        for peer in sorted(self.peers_by_id.values(), key=lambda p: p.member_id):
            peers.append({
                "member_id": peer.member_id,
                "mac": format_mac(peer.mac),
                "macs": sorted(format_mac(mac) for mac in peer.macs),
                "role": peer.role,
                "endpoint": _endpoint_text(peer.endpoint),
                "epoch": peer.epoch,
                "lifetime": peer.lifetime,
                "rx_incarnation": peer.rx_incarnation,
                "queued": self.pending.depth(peer.mac),
                **peer.stats.as_dict(),
            })
        group = self.group
        return {
            "member_id": self.my_id,
            "mac": format_mac(self.my_mac),
            "incarnation": self.incarnation,
            "peers": peers,
            "members_known": len(self.members),
            "group": None if group is None else {
                "epoch": group.epoch, "senders": group.senders, **group.stats.as_dict()},
            "pending": len(self.pending),
            "pending_drops": dict(self.pending.dropped),
            "reassembly_drops": self.reassembler.dropped,
            "split_frames": dict(self.split_frames),
            "rekeys_asked": self.rekeys_asked,
            "keepalives_sent": self.keepalives_sent,
            "overdue_keys": self.overdue_keys,
            "drops": dict(self.stats.drops),
        }


def _endpoint_text(endpoint):
    if endpoint is None:
        return None
    if isinstance(endpoint, tuple):
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(endpoint, bytes):
        return format_mac(endpoint)
    return str(endpoint)
