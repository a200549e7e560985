"""
All of securelan's zope interfaces, in one place.
"""

from zope.interface import Attribute, Interface


class IStore(Interface):
    """
    The key server's durable state: the member registry, the pair-key table
    and the group key.  Every method returns a Deferred; blocking work happens
    off the reactor thread.  Several key servers of one subnet may share one
    store (a cascade), so "issue if absent" operations must be race-free
    across processes, not only within one.

    Failures: L{securelan.errors.MacInUse}, L{securelan.errors.TableFull},
    L{securelan.errors.StoreUnavailable} (the database failed).
    """

    def open():
        """
        Create or upgrade the database and check that the master key opens
        it.  Fires with None; fails with L{securelan.keys.MasterKeyError} or
        L{securelan.store.StoreOpenError} with a clear message.
        """

    def close():
        """
        Flush and close.  Fires with None.
        """

    def register(member, max_members):
        """
        Insert or update C{member} (a L{securelan.records.Member}), keyed by
        its member ID.  A member re-registering may change MAC and
        addresses: its old ones are released.  Fails with L{MacInUse} when
        another member holds the MAC, L{AddressInUse} when another holds one
        of its addresses, and with L{TableFull} when the member is new and
        the registry already holds C{max_members} members.  Fires with the
        stored record.

        C{member.incarnation} is the incarnation the registering agent
        already uses (0 for a new agent): kept when it is not below the
        stored one, else the stored one plus one is assigned, so an
        incarnation never goes back.
        """

    def member(member_id):
        """
        Fires with the L{Member} of C{member_id}, or None.
        """

    def member_by_mac(mac):
        """
        Fires with the L{Member} that holds C{mac} (6 bytes), or None.
        """

    def member_by_address(address):
        """
        Fires with the L{Member} that holds the overlay IP C{address} (its
        text form, as C{str(ipaddress.ip_address(...))} gives it), or None.
        """

    def members():
        """
        Fires with a list of every L{Member}.
        """

    def pair_key(id_1, id_2):
        """
        Fires with the current L{securelan.records.PairKey} of the unordered
        pair, or None.
        """

    def peek_member(member_id):
        """
        L{member}, at once rather than through a Deferred, when the store
        holds the answer in memory; None when it does not know (without
        memory, always: ask L{member} then).
        """

    def peek_member_by_mac(mac):
        """
        L{member_by_mac}, at once, as L{peek_member}.
        """

    def peek_pair_key(id_1, id_2):
        """
        L{pair_key}, at once, as L{peek_member}.
        """

    def pairs_of(member_id):
        """
        Fires with the list of current L{PairKey}s that C{member_id} holds.
        """

    def pair_keys():
        """
        Fires with the list of every current L{PairKey}, once each, in no
        particular order.
        """

    def issue_pair_key(candidate, max_pair_keys):
        """
        Store C{candidate} (a L{PairKey}) unless the pair already has a key;
        fire with whichever key the store holds afterwards.  Two callers
        racing with different candidates both receive the same key.  Fails
        with L{TableFull} when the table holds C{max_pair_keys} keys.
        """

    def group_key():
        """
        Fires with the current L{securelan.records.GroupKey}, or None.
        """

    def issue_group_key(candidate):
        """
        Store C{candidate} (a L{GroupKey}) unless a group key exists; fire
        with the stored one.
        """

    def foreign_mac(mac, now):
        """
        Fires with the member ID of the gateway that fronts C{mac} (a MAC no
        member holds: a host of a plaintext network), or None if none does
        (or the binding expired).
        """

    def bind_foreign_mac(mac, gateway_id, now, expires_at, max_foreign):
        """
        Record that gateway C{gateway_id} fronts C{mac} until C{expires_at}
        (the seed's ID-IP list), unless a live binding exists: fire with the
        gateway that fronts it afterwards.  Fails with L{TableFull} past
        C{max_foreign} bindings.
        """

    def rekey_pair(candidate):
        """
        Replace the pair's key with C{candidate} (a L{PairKey} of a higher
        epoch) unless the store already holds that epoch or a higher one;
        fire with the stored key (None if the pair has none).
        """

    def rekey_group(candidate):
        """
        Replace the group key with C{candidate} (a L{GroupKey} of a higher
        epoch) unless the store already holds that epoch or a higher one;
        fire with the stored group key.
        """

    def revoke(member_id, reason, now):
        """
        Revoke C{member_id} for good: record it, destroy every pair key it
        holds and release its MAC.  Fires with the destroyed L{PairKey}s
        (their peers must be told).
        """

    def is_revoked(member_id):
        """
        Fires with whether C{member_id} was revoked.
        """

    def counts():
        """
        Fires with a dict of table sizes: ``members``, ``pair_keys``.
        """


class IMemberConnection(Interface):
    """
    The key server's view of one authenticated member session, through which
    it pushes key updates and purges.
    """

    member_id = Attribute("The authenticated member ID (from the certificate).")

    def push_pair_key(grant):
        """
        Push a L{securelan.protocol.PairKeyGrant} to this member.  Fires when
        the member acknowledges.
        """

    def tell_pair_key(grant):
        """
        Push a L{securelan.protocol.PairKeyGrant} to this member without
        asking for an acknowledgement (nothing to wait for); a closed
        session is told nothing.
        """

    def push_group_key(group):
        """
        Push the L{securelan.records.GroupKey} to this member.
        """

    def push_purge(peer_id, reason):
        """
        Tell this member to forget every key it holds with C{peer_id}.
        """


class IKeyListener(Interface):
    """
    What a member agent is told by its key-server client: admission, and
    the pushes a key server sends over the control connection.
    """

    def registered(admission):
        """
        The member was admitted (again, after every reconnection), with a
        L{securelan.protocol.Admission}.
        """

    def pair_key_pushed(grant):
        """
        A key server pushed a L{securelan.protocol.PairKeyGrant}.
        """

    def group_key_pushed(grant):
        """
        A key server pushed a new L{securelan.protocol.GroupKeyGrant}.
        """

    def purged(peer_id, reason):
        """
        Forget every key held with C{peer_id}.
        """

    def net_links_pushed(links):
        """
        The subnet's links to peer subnets changed: C{links} is the whole
        new list of L{securelan.protocol.NetLink} (borders only).
        """

    def routes_pushed(routes):
        """
        The routes to other subnets changed: C{routes} is the whole new
        list, each ``"prefix via address"``.
        """


class IDevice(Interface):
    """
    The host side of an agent: a TAP (or, later, TUN) device that the
    protocol stack sends frames into and receives frames from.

    Frames may carry TAP offload metadata: a 10-byte virtio-net header
    (a TSO super-frame's segment size, a checksum left for the kernel).
    """

    name = Attribute("The interface name, e.g. slan0.")
    mac = Attribute("The device's MAC address (6 bytes).")
    mtu = Attribute("The device's MTU.")

    def start(receiver, flush=None):
        """
        Create and configure the device, then call C{receiver(frame,
        offload)} with every frame the host sends, where C{offload} is the
        frame's virtio-net header, or None when it has none (all zero); and,
        if given, C{flush()} after each batch of frames read in one go, so
        that the receiver may hold its sends back until then.
        """

    def write(frame, offload=False):
        """
        Hand C{frame} to the host; with C{offload}, C{frame} begins with its
        virtio-net header.  Return False if the device could not take it
        (it is full): the caller counts the drop.
        """

    def stop():
        """
        Stop reading and remove the device.
        """


class ICarrier(Interface):
    """
    How encrypted datagrams travel between members: C{udp} (to the peer's
    underlay endpoint) or C{ethernet} (raw frames with securelan's EtherType
    on one LAN segment).
    """

    name = Attribute("The carrier's name as written in the config.")
    max_datagram = Attribute(
        "The largest datagram the carrier delivers without IP fragmentation.")
    endpoint = Attribute(
        "What the agent registers as its endpoint ('' when the carrier needs none).")
    can_broadcast = Attribute(
        "True when one send reaches every member (so no per-member fan-out).")
    pieces_per_send = Attribute(
        "How many datagrams of one frame one UDP GSO send takes at most, which"
        " bounds the super-frames worth taking from the device; None when the"
        " carrier has no such bound (no GSO).")

    def start(receiver):
        """
        Start; call C{receiver(datagrams, source)} with the datagrams that
        arrive (a sequence: several when the kernel delivered several at
        once, as UDP GRO does), where C{source} is the sender's endpoint in
        the form L{parse_endpoint} returns.
        """

    def stop():
        """
        Stop; may return a Deferred.
        """

    def parse_endpoint(text):
        """
        The endpoint the key server reported for a peer, parsed; None if the
        peer has none this carrier can use.
        """

    def send(datagrams, endpoint):
        """
        Send the datagrams of one frame (a list, in order) to a parsed
        endpoint; several go out in one system call where the carrier can.
        """

    def send_parts(parts, endpoint, hold=False):
        """
        L{send}, with each datagram given as its two parts, laid flat:
        C{[header 0, rest 0, header 1, rest 1, ...]} (a frame that fits one
        datagram as L{securelan.wire.Sealer.seal_for_carrier} makes it, so
        a carrier that can send scattered buffers joins nothing).

        With C{hold}, a single datagram may be kept back until L{flush} (or
        the next send without C{hold}), so that the datagrams held for one
        endpoint leave together: the caller must call L{flush} soon.
        """

    def send_train(train, endpoint):
        """
        Send the datagrams of one split frame laid end to end in one buffer
        (a L{securelan.wire.Train}, as
        L{securelan.wire.Sealer.seal_for_carrier} makes it), after what
        L{send_parts} held back; a carrier with UDP GSO sends the buffer
        as it is.
        """

    def flush():
        """
        Send every datagram that L{send_parts} held back.
        """

    def broadcast(datagrams, endpoints):
        """
        Send the datagrams of one frame to every member: to each of
        C{endpoints}, or in one send when C{can_broadcast}.
        """


class IRole(Interface):
    """
    What an agent does with frames: C{client} (a member host), and later
    C{gateway} and C{border}.  A role is chosen by config; adding one
    touches no other role.
    """

    name = Attribute("The role's name as written in the config and registered.")

    def start(agent):
        """
        Begin work for C{agent} (its key-server client, carrier, config).
        """

    def stop():
        """
        Stop; may return a Deferred.
        """

    def status():
        """
        A JSON-ready dict describing the role's state for C{securelan status}.
        """
