# -*- test-case-name: tests.test_keyserver -*-
"""
The control protocol between member agents and key servers: AMP commands
over mutually authenticated TLS 1.3 (see C{docs/protocol.rst}).

A member never names itself in a command: the key server takes the member ID
from the TLS client certificate.  Every expected failure is a declared error,
so the member receives the same exception class from L{securelan.errors}.
Keys cross the wire as L{SecretKeyArgument}, which decodes straight into a
L{SecretKey} so no plain key bytes linger in reprs on either side.
"""

import functools
import operator
import struct

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import errors
from .keys import SecretKey

_log = Logger()

#: Every declared error and its wire code.
ERRORS = {
    errors.NotRegistered: b"NOT_REGISTERED",
    errors.UnknownPeer: b"UNKNOWN_PEER",
    errors.MacInUse: b"MAC_IN_USE",
    errors.AddressInUse: b"ADDRESS_IN_USE",
    errors.NotPermitted: b"NOT_PERMITTED",
    errors.RateLimited: b"RATE_LIMITED",
    errors.VersionMismatch: b"VERSION_MISMATCH",
    errors.BadRequest: b"BAD_REQUEST",
    errors.TableFull: b"TABLE_FULL",
    errors.StoreUnavailable: b"STORE_UNAVAILABLE",
}


class QuietAMP(amp.AMP):
    """
    AMP without its own info line for every connection made and for every
    one lost: a key server that 10,000 agents reconnect to would write
    20,000 of them.  securelan logs the connections that matter itself
    (refusals, registrations, closes).
    """

    def makeConnection(self, transport):
        # What AMP.makeConnection keeps, without its log line.
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None

    @amp.StartTLS.responder
    def _refuse_start_tls(self, tls_localCertificate=None, tls_verifyAuthorities=None):
        # AMP answers StartTLS by default (a TLS layer with no certificate
        # inside ours): securelan's connections are mutual TLS from the
        # first byte, so the request is refused and the connection closed.
        raise amp.RemoteAmpError(b"NOT_PERMITTED", "StartTLS: this connection is TLS already", fatal=True)

    #: The most bytes one received box may take, prefixes included (None:
    #: AMP's own limits only); see L{box_too_big}.
    max_box_bytes = None

    def box_too_big(self):
        """
        A box grew past L{max_box_bytes}: close the connection.
        """
        self.transport.loseConnection()

    #: The box being received, as far as it came: (box, bytes so far).
    _box_so_far = None
    #: Set when a key or a box over its limit closes the connection: what
    #: else arrives before it is closed is not read.
    _stopped_reading = False

    def dataReceived(self, data):
        """
        AMP's boxes, parsed a field at a time with the box's fields kept
        between reads, rather than one string at a time through AMP's state
        machine (a pair-key answer is 23 strings): the same boxes, limits,
        pauses and protocol switch.
        """
        if self.innerProtocol is not None:
            return super().dataReceived(data)
        if self._stopped_reading:
            return
        buffer = self._unprocessed + data if self._unprocessed else data
        end, offset, limit = len(buffer), 0, self.max_box_bytes
        unpack, receiver = _U16.unpack_from, self.boxReceiver
        box, size = self._box_so_far or (_new_box(), 0)
        self._box_so_far = None
        while not self.paused and self.transport is not None:
            at, whole = offset, False
            while at + 2 <= end:
                (length,) = unpack(buffer, at)
                if not length:
                    at += 2
                    whole = True
                    break
                if length > self._MAX_KEY_LENGTH:
                    self._unprocessed, self._stopped_reading = b"", True
                    self.lengthLimitExceeded(length)
                    return
                key_end = at + 2 + length
                if key_end + 2 > end:
                    break
                (length,) = unpack(buffer, key_end)
                value_end = key_end + 2 + length
                if value_end > end:
                    break
                box[buffer[at + 2:key_end]] = buffer[key_end + 2:value_end]
                at = value_end
            size += at - offset
            offset = at
            # A box still arriving counts what is buffered of it too.
            if limit is not None and (size if whole else size + end - offset) > limit:
                self._unprocessed, self._stopped_reading = b"", True
                self.box_too_big()
                return
            if not whole:
                break
            # What follows the box, where a protocol switch looks for it.
            self._unprocessed, self._compatibilityOffset = buffer, offset
            receiver.ampBoxReceived(box)
            if self.innerProtocol is not None:
                # Switched (the new protocol was given the rest).
                self._unprocessed, self._compatibilityOffset = b"", 0
                return
            box, size = _new_box(), 0
        self._unprocessed = buffer[offset:] if offset else buffer
        self._compatibilityOffset = 0
        if size:
            self._box_so_far = (box, size)


class SecretKeyArgument(amp.Argument):
    """
    A 32-byte key, decoded into a L{SecretKey}.
    """

    def fromString(self, inString):
        return SecretKey(inString)

    def toString(self, inObject):
        return inObject.material


_U16 = struct.Struct("!H")
#: An empty box without C{AmpBox.__init__}, which only turns the keys it is
#: given into bytes (native strings to ASCII): the boxes parsed here start
#: empty and get slices of bytes for keys.  About 0.1 us instead of 0.6,
#: once or twice per request a key server reads.
_new_box = functools.partial(amp.AmpBox.__new__, amp.AmpBox)
_ANSWER_PREFIX = _U16.pack(len(amp.ANSWER)) + amp.ANSWER
_COMMAND_PREFIX = _U16.pack(len(amp.COMMAND)) + amp.COMMAND
_ASK_PREFIX = _U16.pack(len(amp.ASK)) + amp.ASK


def _plain(arg) -> bool:
    return (type(arg).toBox is amp.Argument.toBox and type(arg).fromBox is amp.Argument.fromBox
            and type(arg).retrieve is amp.Argument.retrieve)


def _direct(arg):
    """
    What AMP's C{arg.toStringProto(value, proto)} and
    C{arg.fromStringProto(string, proto)} come to for the plain argument
    types, as one call each (None: AMP's own calls).
    """
    kind = type(arg)
    if kind is amp.String:
        return bytes, bytes
    if kind is amp.Integer:
        return b"%d".__mod__, int
    if kind is amp.Unicode:
        return str.encode, bytes.decode
    if kind is SecretKeyArgument:
        return operator.attrgetter("material"), SecretKey
    return None, None


def _to_box(layout, objects, box, proto):
    for name, identifier, arg, encode, _ in layout:
        value = objects.get(identifier)
        if value is None:
            if arg.optional:
                continue
            # What AMP does with a missing field: KeyError.
            value = objects[identifier]
        box[name] = arg.toStringProto(value, proto) if encode is None else encode(value)
    return box


def _from_box(layout, box, proto):
    objects = {}
    for name, identifier, arg, _, decode in layout:
        value = box.get(name)
        if value is None:
            if arg.optional:
                objects[identifier] = None
                continue
            value = box[name]
        objects[identifier] = arg.fromStringProto(value, proto) if decode is None else decode(value)
    return objects


class _QuickBoxes(amp.Command):
    """
    A command whose boxes are serialised and parsed without AMP's
    per-field name conversion (the wire names' Python names are worked out
    once per command): the same boxes, for the commands a key server
    answers or pushes thousands of a second.
    """

    @classmethod
    def layout(cls, which: str) -> tuple:
        """
        (wire name, Python name, argument, direct encoder, direct decoder)
        of each field of C{which} (C{"arguments"} or C{"response"}); empty
        when a field's argument has its own box handling (AMP's own path is
        taken then).
        """
        key = "_layout_" + which
        layout = cls.__dict__.get(key)
        if layout is None:
            fields = getattr(cls, which)
            layout = tuple((name, amp._wireNameToPythonIdentifier(name), arg, *_direct(arg)) for name, arg in fields
                           ) if all(_plain(arg) for _, arg in fields) else ()
            setattr(cls, key, layout)
        return layout

    @classmethod
    def makeArguments(cls, objects, proto):
        layout = cls.layout("arguments")
        if not layout:
            return super().makeArguments(objects, proto)
        cls._check_arguments(objects)
        return _to_box(layout, objects, cls.commandType(), proto)

    @classmethod
    def _check_arguments(cls, objects):
        # What AMP's makeArguments checks: no argument it does not know.
        names = cls.__dict__.get("_argument_names")
        if names is None:
            names = cls._argument_names = frozenset(field[1] for field in cls.layout("arguments"))
        for identifier in objects:
            if identifier not in names:
                raise amp.InvalidSignature(f"{identifier} is not a valid argument")

    @classmethod
    def parseArguments(cls, box, protocol):
        layout = cls.layout("arguments")
        if not layout:
            return super().parseArguments(box, protocol)
        return _from_box(layout, box, protocol)

    @classmethod
    def makeResponse(cls, objects, proto):
        layout = cls.layout("response")
        if not layout:
            return super().makeResponse(objects, proto)
        return _to_box(layout, objects, cls.responseType(), proto)

    @classmethod
    def parseResponse(cls, box, protocol):
        layout = cls.layout("response")
        if not layout:
            return super().parseResponse(box, protocol)
        return _from_box(layout, box, protocol)

    @classmethod
    def _serialize(cls, which: str, objects, tail: tuple, proto) -> bytes:
        """
        The box of C{which} (C{"arguments"} or C{"response"}) for
        C{objects}, serialised, with the already encoded C{tail} (the
        AMP fields that make it a command or an answer) at its end.
        """
        key = "_fields_" + which
        cached = cls.__dict__.get(key)
        if cached is None:
            layout = cls.layout(which)
            if not layout:
                raise TypeError(f"{cls.__name__}'s {which} take AMP's own path")
            fields = tuple((_U16.pack(len(name)) + name, identifier, arg, encode)
                           for name, identifier, arg, encode, _ in layout)
            # Every field of a record in one call, as a tuple (a layout is
            # never empty: a command without fields takes AMP's path).
            getter = operator.attrgetter(*(field[1] for field in fields))
            if len(fields) == 1:
                getter = lambda record, one=getter: (one(record),)  # noqa: E731
            cached = (fields, getter)
            setattr(cls, key, cached)
        fields, getter = cached
        if isinstance(objects, dict):
            values = [objects.get(field[1]) for field in fields]
        else:
            try:
                values = getter(objects)
            except AttributeError:
                # A record without some fields: as a dict without them.
                values = [getattr(objects, field[1], None) for field in fields]
        parts = []
        for (prefix, identifier, arg, encode), value in zip(fields, values):
            if value is None:
                if arg.optional:
                    continue
                # What AMP does with a missing field: KeyError.
                raise KeyError(identifier)
            string = arg.toStringProto(value, proto) if encode is None else encode(value)
            if len(string) > amp.MAX_VALUE_LENGTH:
                raise amp.TooLong(False, True, string, prefix[2:])
            parts += (prefix, _U16.pack(len(string)), string)
        parts += tail
        return b"".join(parts)

    @classmethod
    def serialize_answer(cls, objects, ask: bytes, proto) -> bytes:
        """
        The answer box to the request tagged C{ask}, serialised, as AMP
        would send C{makeResponse(objects)}: the same keys and values, each
        key's length prefix made once per command.  C{objects} is a mapping,
        or an object with the response's fields as attributes (an attrs
        record, without converting it to a dict first).
        """
        return cls._serialize("response", objects, (_ANSWER_PREFIX, _U16.pack(len(ask)), ask, b"\0\0"), proto)

    @classmethod
    def serialize_command(cls, objects, proto) -> bytes:
        """
        This command with C{objects} for its arguments (as for
        L{serialize_answer}), serialised as a box that asks for no answer:
        what C{callRemote} sends for a command whose C{requiresAnswer} is
        false, without its per-call name conversion and Deferred.
        """
        return cls._serialize("arguments", objects, (cls._command_name(), b"\0\0"), proto)

    @classmethod
    def call(cls, proto, **objects):
        """
        C{proto.callRemote(cls, **objects)}, without AMP's command instance,
        argument-name conversion and box for every call: the request is
        serialised with its tag at once (as L{serialize_command}) and
        written, and one Deferred fires with the parsed response or fails
        as C{callRemote}'s would (a declared error as its exception,
        anything else as C{UnknownRemoteError}).  For a command that asks
        for no answer or whose arguments take AMP's own path, and on a
        connection AMP would not send on now (lost, switched to another
        protocol, or sending through another box sender), it is
        C{callRemote} itself.
        """
        if (not cls.requiresAnswer or not cls.layout("arguments") or proto._failAllReason is not None
                or proto.transport is None or proto._locked or proto._startingTLSBuffer is not None
                or proto.boxSender is not proto):
            return proto.callRemote(cls, **objects)
        try:
            cls._check_arguments(objects)
            tag = proto._nextTag()
            try:
                data = cls._serialize("arguments", objects, (cls._command_name(), _ASK_PREFIX,
                                                             _U16.pack(len(tag)), tag, b"\0\0"), proto)
            except KeyError as e:
                raise amp.InvalidSignature(f"forgot {e.args[0]} for {cls.commandName}") from None
        except BaseException:
            return defer.fail()
        # Waiting before it is written: a transport may deliver the answer
        # at once.
        d = proto._outstandingRequests[tag] = defer.Deferred()
        try:
            proto.transport.write(data)
        except BaseException:
            del proto._outstandingRequests[tag]
            raise
        return d.addCallbacks(cls.parseResponse, cls._remote_error, callbackArgs=(proto,))

    @classmethod
    def _command_name(cls) -> bytes:
        """
        The C{_command} field of this command's boxes, encoded.
        """
        field = cls.__dict__.get("_command_field")
        if field is None:
            name = cls.commandName
            field = cls._command_field = _COMMAND_PREFIX + _U16.pack(len(name)) + name
        return field

    @classmethod
    def _remote_error(cls, failure):
        # What callRemote makes of an error answer.
        failure.trap(amp.RemoteAmpError)
        error = failure.value
        return Failure(cls.reverseErrors.get(error.errorCode, amp.UnknownRemoteError)(error.description))

    @classmethod
    def error_box(cls, failure, ask: bytes) -> amp.AmpBox:
        """
        The box AMP answers the request tagged C{ask} with when its
        responder fails with C{failure}: a declared error's code and
        description (in an C{amp.QuitBox}, which closes the connection once
        sent, when the error is fatal); anything else is logged and
        answered as an unknown error, in a QuitBox.
        """
        error = failure.check(*cls.allErrors)
        if error is not None:
            code, description = cls.allErrors[error], str(failure.value).encode("utf-8", "replace")
            box = amp.QuitBox() if error in cls.fatalErrors else amp.AmpBox()
        else:
            _log.failure("while answering {command}", failure, command=cls.__name__)
            code, description = amp.UNKNOWN_ERROR_CODE, b"Unknown Error"
            box = amp.QuitBox()
        box[amp.ERROR] = ask
        box[amp.ERROR_DESCRIPTION] = description
        box[amp.ERROR_CODE] = code
        return box


class Register(amp.Command):
    """
    Admission (seed step 1): record this member's MAC, role and underlay
    endpoint.  C{endpoint} is ``host:port``; a bare ``:port`` means "the
    address you see me connect from".  C{incarnation} is the one the agent
    already uses, when it reconnects.  C{addresses}: the member's overlay
    IP addresses, in layer-3 mode (keys are then looked up by them).
    Answers with the subnet's facts.
    """

    arguments = [
        (b"version", amp.Integer()),
        (b"mac", amp.String()),
        (b"role", amp.Unicode()),
        (b"endpoint", amp.Unicode()),
        (b"incarnation", amp.Integer(optional=True)),
        (b"addresses", amp.ListOf(amp.Unicode(), optional=True)),
    ]
    response = [
        (b"member_id", amp.Unicode()),
        (b"subnet", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"endpoint", amp.Unicode()),
        (b"incarnation", amp.Integer()),
        (b"group_epoch", amp.Integer()),
        (b"pair_key_lifetime", amp.Integer()),
        (b"rekey_after_packets", amp.Integer(optional=True)),
        (b"rekey_after_bytes", amp.Integer(optional=True)),
        (b"routes", amp.ListOf(amp.Unicode(), optional=True)),
    ]
    errors = ERRORS


_PAIR_KEY_FIELDS = [
    (b"peer_id", amp.Unicode()),
    (b"peer_mac", amp.String()),
    (b"peer_role", amp.Unicode()),
    (b"peer_endpoint", amp.Unicode()),
    (b"peer_incarnation", amp.Integer()),
    (b"key", SecretKeyArgument()),
    (b"epoch", amp.Integer()),
    (b"lifetime", amp.Integer()),
    (b"age", amp.Integer()),
    (b"peer_addresses", amp.ListOf(amp.Unicode(), optional=True)),
]

_GROUP_KEY_FIELDS = [
    (b"group_id", amp.Unicode()),
    (b"key", SecretKeyArgument()),
    (b"epoch", amp.Integer()),
    (b"lifetime", amp.Integer()),
]


class RequestPairKey(_QuickBoxes):
    """
    The seed's ``(ID_1, MAC_2, ?)``: the pair key shared with whoever holds
    C{peer_mac}.  C{epoch} is the epoch the requester holds, if any.
    """

    arguments = [
        (b"peer_mac", amp.String()),
        (b"epoch", amp.Integer(optional=True)),
    ]
    response = _PAIR_KEY_FIELDS
    errors = ERRORS


class RequestPairKeyByAddress(_QuickBoxes):
    """
    Layer 3: the pair key shared with whoever holds the overlay IP
    C{peer_address} (the seed's lookup by IP at the layer-3 level).
    """

    arguments = [
        (b"peer_address", amp.Unicode()),
        (b"epoch", amp.Integer(optional=True)),
    ]
    response = _PAIR_KEY_FIELDS
    errors = ERRORS


class RequestRekey(amp.Command):
    """
    A sender that reached the key server's packet or byte limit under the
    pair key it shares with C{peer_id} at C{epoch} asks for the next one.
    The key server rekeys the pair (and pushes it to both) if C{epoch} is
    still current, and answers with the pair's current epoch.
    """

    arguments = [(b"peer_id", amp.Unicode()), (b"epoch", amp.Integer())]
    response = [(b"epoch", amp.Integer())]
    errors = ERRORS


class RequestGroupKey(amp.Command):
    """
    The group key ``(ID_M, KEY_M)`` for broadcast and multicast frames.
    """

    arguments = []
    response = _GROUP_KEY_FIELDS
    errors = ERRORS


class ListPeers(amp.Command):
    """
    One page of the subnet's other members, ordered by member ID, starting
    after the member ID C{after} ("" for the first page): where a member
    sends broadcast frames when its carrier cannot broadcast.
    """

    arguments = [(b"after", amp.Unicode())]
    response = [
        (b"peers", amp.AmpList([
            (b"member_id", amp.Unicode()),
            (b"mac", amp.String()),
            (b"role", amp.Unicode()),
            (b"endpoint", amp.Unicode()),
        ])),
        (b"more", amp.Boolean()),
    ]
    errors = ERRORS

    #: Members per page: keeps one answer well under AMP's 64 KiB value limit.
    PAGE = 200


_NET_LINK_FIELDS = [
    (b"subnet", amp.Unicode()),
    (b"border", amp.Unicode()),
    (b"endpoint", amp.Unicode()),
    (b"incarnation", amp.Integer()),
    (b"prefixes", amp.ListOf(amp.Unicode())),
    (b"local_prefixes", amp.ListOf(amp.Unicode())),
    (b"key", SecretKeyArgument()),
    (b"epoch", amp.Integer()),
]


class RequestNetLinks(amp.Command):
    """
    Border to key server: the subnet's links to its peer subnets, each
    with its NETKEY (the seed's NETID fetching NETKEY at start).  Only the
    member the key server names as its subnet's border may ask.
    """

    arguments = []
    response = [(b"links", amp.AmpList(_NET_LINK_FIELDS))]
    errors = ERRORS


class PushNetLinks(amp.Command):
    """
    Key server to border: the links changed (a new NETKEY epoch, a peer's
    border restarted or moved); here is the whole list again.
    """

    arguments = [(b"links", amp.AmpList(_NET_LINK_FIELDS))]
    response = []


class PushRoutes(amp.Command):
    """
    Key server to member: the routes to other subnets changed; here is the
    whole list again, each ``"prefix via address"`` (a peer subnet's
    prefix through this subnet's border).
    """

    arguments = [(b"routes", amp.ListOf(amp.Unicode()))]
    response = []


# Between the key servers of two subnets (see securelan.keyserver.peering).

_SIDE_FIELDS = [
    (b"subnet", amp.Unicode()),
    (b"prefixes", amp.ListOf(amp.Unicode())),
    (b"border", amp.Unicode()),
    (b"border_endpoint", amp.Unicode()),
    (b"border_incarnation", amp.Integer()),
]


class PeerHello(amp.Command):
    """
    The follower key server (the one whose subnet name sorts after the
    other's) to the leader, first on every connection: its side of the link,
    and the NETKEY epoch it last held (a restarted leader goes on above it).
    The leader answers with its own side and the current NETKEY.
    """

    arguments = [(b"version", amp.Integer())] + _SIDE_FIELDS + [(b"known_epoch", amp.Integer())]
    response = _SIDE_FIELDS + [(b"key", SecretKeyArgument()), (b"epoch", amp.Integer())]
    errors = ERRORS


class PeerSide(amp.Command):
    """
    Either key server to the other: its side of the link changed (its
    border restarted, so the border's incarnation is new).
    """

    arguments = _SIDE_FIELDS
    response = []
    errors = ERRORS


class PeerNetKey(amp.Command):
    """
    Leader to follower: the NETKEY of the link was replaced (a rekey).
    """

    arguments = [(b"key", SecretKeyArgument()), (b"epoch", amp.Integer())]
    response = []
    errors = ERRORS


class Ping(amp.Command):
    """
    Member to key server: nothing but proof that the connection is alive,
    which keeps the key server from closing an idle session and lets the
    member notice a key server that no longer answers.
    """

    arguments = []
    response = []
    errors = ERRORS


class PushPairKey(_QuickBoxes):
    """
    Key server to member: a pair key was issued or replaced (rekey).
    """

    arguments = _PAIR_KEY_FIELDS
    response = []


class PushGroupKey(amp.Command):
    """
    Key server to member: the group key was replaced.
    """

    arguments = _GROUP_KEY_FIELDS
    response = []


class Purge(amp.Command):
    """
    Key server to member: forget every key held with C{peer_id}.
    """

    arguments = [(b"peer_id", amp.Unicode()), (b"reason", amp.Unicode())]
    response = []


@attrs.frozen
class Admission:
    """
    What a key server told a member on registering.
    """

    member_id: str
    subnet: str
    version: int
    endpoint: str
    #: This registration's incarnation: the agent that made it uses it in
    #: every key it sends with (see docs/wire-format.rst).
    incarnation: int
    group_epoch: int
    pair_key_lifetime: int
    #: A sender asks for a new key (L{RequestRekey}) once it has sent this
    #: many datagrams, or this many bytes, under one epoch (0: no limit).
    rekey_after_packets: int = 0
    rekey_after_bytes: int = 0
    #: Routes to other subnets, ``"prefix via address"`` (see
    #: L{PushRoutes}); None when this key server does not say (it does not
    #: peer with other subnets).
    routes: tuple | None = attrs.field(default=None, converter=attrs.converters.optional(tuple))


@attrs.frozen
class PairKeyGrant:
    """
    A pair key as a member holds it: the seed's MAC-KEY entry, plus the
    peer's ID, role and underlay endpoint and the key's epoch and lifetime.
    """

    peer_id: str
    peer_mac: bytes
    peer_role: str
    peer_endpoint: str
    #: The peer's incarnation as the key server knows it: part of the key
    #: this member sends to it with.
    peer_incarnation: int
    key: SecretKey
    epoch: int
    lifetime: int
    #: Seconds since this epoch's key was made: a holder told of a new epoch
    #: long after it began switches to it at once (its peer has had time).
    age: int = 0
    #: The peer's overlay IP addresses (layer 3): what it may send from.
    #: Optional on the wire: an answer without them means none.
    peer_addresses: tuple = attrs.field(default=(), converter=lambda a: () if a is None else tuple(a))


@attrs.frozen
class GroupKeyGrant:
    """
    The group key as a member holds it.
    """

    group_id: str
    key: SecretKey
    epoch: int
    lifetime: int


@attrs.frozen
class NetLink:
    """
    One link of this subnet to a peer subnet as its border holds it: the
    peer's border and where it listens, which prefixes sit behind it, and
    the link's NETKEY.
    """

    #: The peer subnet's name (its NETID).
    subnet: str
    #: The member ID of the peer subnet's border.
    border: str
    #: ``host:port`` of the peer border's WAN endpoint.
    endpoint: str
    #: The peer border's incarnation (0: it has not registered yet, so
    #: nothing can be sent to it).
    incarnation: int
    #: The prefixes behind the peer border, e.g. ``10.2.0.0/24``.
    prefixes: tuple = attrs.field(converter=tuple)
    #: This subnet's own prefixes: what the peer may send to.
    local_prefixes: tuple = attrs.field(converter=tuple)
    key: SecretKey = attrs.field(repr=False)
    epoch: int = 0


@attrs.frozen
class PeerInfo:
    """
    Another member as C{ListPeers} describes it.
    """

    member_id: str
    mac: bytes
    role: str
    endpoint: str
