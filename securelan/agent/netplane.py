# -*- test-case-name: tests.test_netplane -*-
"""
A border's data plane between subnets (the seed's NETID leg): IP packets
that the border's kernel routes into its TUN device leave encrypted under
the NETKEY of the destination's subnet, over UDP to that subnet's border;
packets from peer borders are decrypted into the TUN device, and the kernel
routes them on into the subnet, where the border's member role encrypts
them again under its pair keys (the far leg).

Outbound (L{NetPlane.packet_from_device}): the destination address picks
the link by the prefixes its key server announced (C{no_route} else); the
packet is sealed as a L{TYPE_NET} datagram whose header names both subnets
(L{subnet_tag}) and sent to the peer border's endpoint.

Inbound (L{NetPlane.datagrams_received}): the header must name our subnet
and a linked one; its epoch selects the NETKEY (a newer one than ours
makes us ask our key server, the seed's PW_ID check); the tag is verified,
then the replay window; the packet's source must lie in the peer's
prefixes and its destination in ours (a peer subnet cannot speak for
addresses it does not hold); the peer's endpoint follows its authenticated
datagrams (a NAT that changed its mapping).

Keepalives: each link sends an authenticated empty packet when it has sent
nothing for C{keepalive} seconds, so a NAT in front of either border keeps
its mapping.
"""

import ipaddress


from ..logs import logger
from ..addresses import ETHERTYPE_IPV4, ETHERTYPE_IPV6, format_host_port, ip_packet_addresses
from ..ratelimit import TokenBucket
from ..wire import (
    FLAG_OFFLOAD,
    TYPE_NET,
    VNET_HDR_LEN,
    CounterExhausted,
    Opener,
    Reassembler,
    Sealer,
    WireError,
    derive_net_key,
    open_datagram,
    parse_header,
    subnet_tag,
)
from .carriers import send_sealed
from .peers import Stats

log = logger("securelan.border")

#: A keepalive's EtherType (IEEE local experimental 1) and body.
_KEEPALIVE = b"\x88\xb5securelan keepalive"
_KEEPALIVE_FRAME_LEN = 12 + len(_KEEPALIVE)
_KIND_MASK = ~FLAG_OFFLOAD & 0xFF

#: Seconds a replaced NETKEY epoch is still received (make-before-break).
GRACE_SECONDS = 15.0
#: Seconds a border goes on sending under the previous epoch after it got a
#: new one, unless the peer border shows sooner that it has the new one too
#: (the two borders hear of a rekey from two key servers, not at once).
SWITCH_SECONDS = 1.0
#: Destination addresses remembered with their link.
_ROUTE_CACHE = 4096
#: Links no longer listed whose state is kept, at most.
_GONE_KEPT = 64


def _prefixes(texts):
    """
    Prefixes as C{(address length, network, mask, prefix length)} integers:
    what a packet's packed address is matched against, with no
    C{ipaddress} object per packet.
    """
    out = []
    for text in texts:
        network = ipaddress.ip_network(text)
        size = network.max_prefixlen // 8
        out.append((size, int(network.network_address), int(network.netmask), network.prefixlen))
    return out


def _longest_match(address: bytes, prefixes):
    """
    The longest prefix length of C{prefixes} that holds C{address}, or -1.
    """
    size, value, best = len(address), int.from_bytes(address, "big"), -1
    for length, network, mask, prefixlen in prefixes:
        if length == size and value & mask == network and prefixlen > best:
            best = prefixlen
    return best


class NetLinkState:
    """
    One link as the border uses it: the peer border's endpoint, the NETKEY
    epochs it may receive, its sending direction and its receiving ones.
    """

    def __init__(self, link, endpoint, my_subnet, my_border, my_incarnation, clock):
        self.link = link
        self.endpoint = endpoint
        self._take_prefixes(link)
        self.tag = subnet_tag(link.subnet)
        self.stats = Stats()
        #: When this link last sent anything (a keepalive is due
        #: C{keepalive} seconds later).
        self.last_sent = clock.seconds()
        self._my = (my_subnet, my_border, my_incarnation)
        self._clock = clock
        #: epoch -> (NETKEY, received until: None for the current one).
        self.keys = {link.epoch: (link.key, None)}
        self.sealer = None
        #: The epoch sent under now (None: nothing can be sent).
        self.sending_epoch = None
        #: Where each traffic key used so far stopped: (NETKEY fingerprint,
        #: epoch, peer border, its incarnation) -> next counter.
        self._counters = {}
        self._sealer_ids = {}
        #: The sealer of a new epoch not yet used, and when to use it.
        self._next_sealer = None
        self._switch_at = 0.0
        self._openers = {}
        self._rx_incarnation = 0
        self._derivations = TokenBucket(5.0, 10, clock)
        self._make_sealer()

    def _take_prefixes(self, link):
        self.networks = _prefixes(link.prefixes)
        self.local_networks = _prefixes(link.local_prefixes)

    @property
    def epoch(self):
        return self.link.epoch

    @property
    def rx_incarnation(self):
        """
        The newest incarnation of the peer border seen authenticated.
        """
        return self._rx_incarnation

    def _save_counters(self):
        for name, sealer in (("current", self.sealer), ("next", self._next_sealer)):
            if sealer is not None:
                self._counters[self._sealer_ids[name]] = sealer.counter
        while len(self._counters) > 64:
            del self._counters[next(iter(self._counters))]

    def _make_sealer(self, later=False):
        subnet, border, incarnation = self._my
        link = self.link
        # A traffic key taken up again (the peer border's incarnation went
        # away and came back, one key pushed twice) goes on from its
        # counter: a nonce is never used twice under one key.
        self._save_counters()
        self._next_sealer = None
        if not link.incarnation:
            # The peer border has not registered: there is no key to send to.
            self.sealer = self.sending_epoch = None
            return
        key = derive_net_key(link.key, subnet, border, link.subnet, link.border, link.epoch,
                             incarnation, link.incarnation)
        ident = (link.key.fingerprint, link.epoch, link.border, link.incarnation)
        sealer = Sealer(key, TYPE_NET, link.epoch, incarnation, counter=self._counters.get(ident, 0))
        if later and self.sealer is not None:
            self._next_sealer = sealer
            self._sealer_ids["next"] = ident
            self._switch_at = self._clock.seconds() + SWITCH_SECONDS
        else:
            self.sealer, self.sending_epoch = sealer, link.epoch
            self._sealer_ids["current"] = ident

    def sealer_now(self):
        """
        The sealer to send with now: a new epoch's once the peer showed it
        holds it or L{SWITCH_SECONDS} passed.
        """
        if self._next_sealer is not None and self._clock.seconds() >= self._switch_at:
            self._switch()
        return self.sealer

    def _switch(self):
        if self.sealer is not None:
            self._counters[self._sealer_ids["current"]] = self.sealer.counter
        self.sealer, self._next_sealer = self._next_sealer, None
        self._sealer_ids["current"] = self._sealer_ids["next"]
        self.sending_epoch = self.link.epoch

    def update(self, link, endpoint):
        """
        The key server sent the link again: a new epoch (the old one is
        received for L{GRACE_SECONDS} more), or a new peer incarnation or
        endpoint.
        """
        old = self.link
        self.link = link
        self._take_prefixes(link)
        if link.endpoint != old.endpoint:
            self.endpoint = endpoint
        if link.epoch != old.epoch or link.key != old.key:
            now = self._clock.seconds()
            self.keys[old.epoch] = (old.key, now + GRACE_SECONDS)
            self.keys[link.epoch] = (link.key, None)
            self._openers = {k: v for k, v in self._openers.items() if k[0] != link.epoch}
            self._make_sealer(later=link.epoch > old.epoch)
        elif link.incarnation != old.incarnation or link.border != old.border:
            self._make_sealer()
        self.expire()

    def expire(self):
        now = self._clock.seconds()
        for epoch, (_, until) in list(self.keys.items()):
            if until is not None and until <= now:
                del self.keys[epoch]
                self._openers = {k: v for k, v in self._openers.items() if k[0] != epoch}

    def opener_for(self, epoch, incarnation):
        """
        The receiving direction for C{epoch} and the peer border's
        C{incarnation}; None when this epoch is not held, the incarnation is
        older than one already seen, or derivations are exhausted (forged
        headers cost a derivation each).  A new direction is only a
        candidate until a datagram authenticates under it (L{accepted}):
        forged headers can neither fill nor empty the openers in use, whose
        replay windows must live as long as their keys.
        """
        opener = self._openers.get((epoch, incarnation))
        if opener is not None:
            return opener
        held = self.keys.get(epoch)
        if held is None or incarnation < self._rx_incarnation or not self._derivations.take():
            return None
        subnet, border, my_incarnation = self._my
        link = self.link
        key = derive_net_key(held[0], link.subnet, link.border, subnet, border, epoch, incarnation,
                             my_incarnation)
        return Opener(key, TYPE_NET, epoch, incarnation)

    def accepted(self, epoch, incarnation, opener):
        """
        A datagram authenticated under C{epoch} and C{incarnation} with
        C{opener}: it is kept from now on; older incarnations are over, and
        a peer that sends under our newest epoch holds it, so we send under
        it too.
        """
        self._openers.setdefault((epoch, incarnation), opener)
        if self._next_sealer is not None and epoch == self.link.epoch:
            self._switch()
        if incarnation > self._rx_incarnation:
            self._rx_incarnation = incarnation
            self._openers = {k: v for k, v in self._openers.items() if k[1] >= incarnation}

    def status(self):
        link = self.link
        endpoint = self.endpoint
        if isinstance(endpoint, tuple):
            endpoint = format_host_port(ipaddress.ip_address(endpoint[0]), endpoint[1])
        return {"subnet": link.subnet, "border": link.border, "endpoint": endpoint,
                "announced_endpoint": link.endpoint,
                "prefixes": list(link.prefixes), "epoch": link.epoch,
                "epochs_received": sorted(self.keys), "ready": self.sealer is not None,
                "sending_epoch": self.sending_epoch,
                **self.stats.as_dict()}


class NetPlane:
    """
    The border's links to the borders of its peer subnets.

    @param device: the TUN L{IDevice} (started with L{packet_from_device}).
    @param carrier: the WAN L{ICarrier} (started with L{datagrams_received}).
    @param ask: called with no argument to fetch the links again from the
        key server (rate-limited here).
    @param routes: called with the list of remote prefixes whenever they
        change, to point the kernel's routes at the TUN device.
    """

    def __init__(self, my_subnet, my_border, incarnation, device, carrier, clock, ask=None,
                 routes=None, keepalive=25.0):
        self.my_subnet = my_subnet
        self.my_border = my_border
        self.incarnation = incarnation
        self.my_tag = subnet_tag(my_subnet)
        self.device = device
        self.carrier = carrier
        self.clock = clock
        self.keepalive = keepalive
        self._ask = ask or (lambda: None)
        self._routes = routes or (lambda prefixes: None)
        self._asks = TokenBucket(1.0, 1, clock)
        self.links: dict[str, NetLinkState] = {}
        #: Links the key server no longer lists, kept (bounded) in case they
        #: come back: a key taken up again goes on from its counter.
        self._gone: dict[str, NetLinkState] = {}
        self._by_tag: dict[bytes, NetLinkState] = {}
        self._route_cache: dict[bytes, NetLinkState | None] = {}
        self.reassembler = Reassembler(clock)
        self.stats = Stats()
        self.asked = 0

    def install(self, links):
        """
        Take the key server's list of links (the whole list each time).
        A link that becomes ready (new, or its peer border registered at
        last) sends a keepalive at once: a NAT in front of this border opens
        its mapping, and the peer border learns where it is.
        """
        fresh, hello = {}, []
        for link in links:
            try:
                endpoint = self.carrier.parse_endpoint(link.endpoint)
                # A link that comes back (the key server restarted and
                # forgot it a moment) takes up its old state: its sending
                # counters and replay windows go on.
                state = self.links.get(link.subnet) or self._gone.pop(link.subnet, None)
                if state is None:
                    state = NetLinkState(link, endpoint, self.my_subnet, self.my_border, self.incarnation,
                                         self.clock)
                    hello.append(state)
                    log.info("link to subnet {subnet}: border {border} at {endpoint}, prefixes {prefixes}, "
                             "NETKEY epoch {epoch}", subnet=link.subnet, border=link.border,
                             endpoint=link.endpoint, prefixes=", ".join(link.prefixes), epoch=link.epoch)
                else:
                    was_ready = state.sealer is not None
                    state.update(link, endpoint)
                    if not was_ready:
                        hello.append(state)
            except (ValueError, TypeError) as e:
                # One peer subnet's bad facts must not take the others down.
                log.error("link to subnet {subnet} refused: {error}", subnet=link.subnet, error=e)
                continue
            fresh[link.subnet] = state
        for gone in set(self.links) - set(fresh):
            log.info("link to subnet {subnet} removed", subnet=gone)
            self._gone[gone] = self.links[gone]
            while len(self._gone) > _GONE_KEPT:
                del self._gone[next(iter(self._gone))]
        self.links = fresh
        self._by_tag = {state.tag: state for state in fresh.values()}
        self._route_cache = {}
        self._routes(sorted({p for s in fresh.values() for p in s.link.prefixes}))
        for state in hello:
            if state.sealer is not None:
                self._keepalive(state)

    def _keepalive(self, state):
        self._send(state, b"".join((state.tag, self.my_tag, _KEEPALIVE)))

    def _link_to(self, dst: bytes):
        cache = self._route_cache
        state = cache.get(dst, False)
        if state is False:
            best, best_len = None, -1
            for candidate in self.links.values():
                length = _longest_match(dst, candidate.networks)
                if length > best_len:
                    best, best_len = candidate, length
            if len(cache) >= _ROUTE_CACHE:
                cache.clear()
            state = cache[dst] = best
        return state

    # Outbound ------------------------------------------------------------

    def packet_from_device(self, packet, offload=None):
        addresses = ip_packet_addresses(packet)
        if addresses is None:
            self.stats.drop("malformed")
            return
        state = self._link_to(addresses[1])
        if state is None:
            self.stats.drop("no_route")
            return
        ethertype = ETHERTYPE_IPV4 if packet[0] >> 4 == 4 else ETHERTYPE_IPV6
        self._send(state, b"".join((state.tag, self.my_tag, ethertype, packet)), offload, count=True)

    def _send(self, state, frame, offload=None, count=False):
        sealer = state.sealer_now()
        if sealer is None or state.endpoint is None:
            state.stats.drop("peer_not_ready")
            self.stats.drop("peer_not_ready")
            return
        try:
            sealed = sealer.seal_for_carrier(frame, self.carrier.max_datagram, offload)
        except (ValueError, CounterExhausted) as e:
            state.stats.drop("seal")
            log.info("cannot send to subnet {subnet}: {error}", subnet=state.link.subnet,
                     error=e.__class__.__name__)
            if isinstance(e, CounterExhausted):
                self.ask()
            return
        send_sealed(self.carrier, sealed, state.endpoint)
        state.last_sent = self.clock.seconds()
        if count:
            stats = state.stats
            stats.tx_frames += 1
            stats.tx_bytes += len(frame)
            stats.last_tx = state.last_sent

    def tick(self):
        """
        Once a second: keepalives, expired epochs and pieces.
        """
        now = self.clock.seconds()
        self.reassembler.expire()
        for state in self.links.values():
            state.expire()
            if self.keepalive and now - state.last_sent >= self.keepalive:
                self._keepalive(state)

    def ask(self):
        """
        Fetch the links again from the key server, at most once a second.
        """
        if self._asks.take():
            self.asked += 1
            self._ask()

    # Inbound -------------------------------------------------------------

    def datagrams_received(self, datagrams, source):
        for datagram in datagrams:
            try:
                self._datagram(datagram, source)
            except WireError as e:
                self.stats.drop(e.reason)
            except Exception:
                # Nothing a peer or an attacker sends may stop the border.
                self.stats.drop("error")
                log.failure("datagram from {source}", source=source)

    def _drop(self, state, reason, n=1):
        self.stats.drop(reason, n)
        if state is not None:
            state.stats.drop(reason, n)

    def _datagram(self, datagram, source):
        header = parse_header(datagram)
        if header.type & _KIND_MASK != TYPE_NET:
            return self._drop(None, "type")
        if header.dst != self.my_tag:
            return self._drop(None, "not_for_us")
        state = self._by_tag.get(header.src)
        if state is None:
            return self._drop(None, "unknown_subnet")
        opener = state.opener_for(header.epoch, header.incarnation)
        if opener is None:
            if header.epoch > state.epoch:
                # The seed's PW_ID check: the peer has a newer NETKEY.
                self.ask()
            return self._drop(state, "epoch" if header.epoch not in state.keys else "incarnation")
        try:
            frame = open_datagram(opener, self.reassembler, datagram, header)
        except WireError as e:
            # A split frame that failed counts each of its datagrams.
            return self._drop(state, e.reason, e.datagrams)
        if frame is None:
            return
        state.accepted(header.epoch, header.incarnation, opener)
        if header.incarnation == state.rx_incarnation and source != state.endpoint and source is not None:
            log.info("border of subnet {subnet} now at {source}", subnet=state.link.subnet, source=source)
            state.endpoint = source
        # frame: [virtio-net header] + the two subnet tags + EtherType + packet.
        base = VNET_HDR_LEN if header.type & FLAG_OFFLOAD else 0
        stats = state.stats
        stats.last_rx = self.clock.seconds()
        if len(frame) == base + _KEEPALIVE_FRAME_LEN and frame[base + 12:] == _KEEPALIVE:
            return
        ethertype = frame[base + 12:base + 14]
        packet = frame[base + 14:]
        addresses = ip_packet_addresses(packet)
        if addresses is None or ethertype not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
            return self._drop(state, "malformed")
        if _longest_match(addresses[0], state.networks) < 0:
            return self._drop(state, "source_not_in_prefixes")
        if _longest_match(addresses[1], state.local_networks) < 0:
            return self._drop(state, "destination_not_local")
        vnet = frame[:VNET_HDR_LEN] if base else None
        stats.rx_frames += 1
        stats.rx_bytes += len(packet)
        if vnet is not None:
            written = self.device.write(vnet + packet, offload=True)
        else:
            written = self.device.write(packet)
        if not written:
            self._drop(state, "device_full")

    def status(self):
        return {"subnet": self.my_subnet, "incarnation": self.incarnation, "asked": self.asked,
                "drops": dict(self.stats.drops),
                "links": [self.links[s].status() for s in sorted(self.links)]}

