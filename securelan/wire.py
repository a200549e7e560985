# -*- test-case-name: tests.test_wire -*-
"""
The data-plane wire format, version 2: how one Ethernet frame travels
between two agents as one or more authenticated, encrypted datagrams.
``docs/wire-format.rst`` is the specification; this module is its code.

A datagram is a 32-byte header in clear (the AEAD associated data), then the
AES-256-GCM encryption of the frame's EtherType and payload, then the 16-byte
tag.  The header carries the frame's destination and source MACs, so a
receiver rebuilds the exact Ethernet frame.  A frame too large for one
datagram (a TSO super-frame) is still one AEAD message, cut into pieces that
each carry a header: one tag, and one AES-GCM call, per frame.

The sending side, per frame::

    frame --Sealer.seal--> [datagram, ...]        (one, or up to 64 pieces;
                                                   seal_for_carrier: the
                                                   pieces in one buffer)

The receiving side, per datagram::

    datagram --parse_header--> Header             (pick the Opener by
                                                   type, src, epoch,
                                                   incarnation)
    whole:   --Opener.open--> plaintext           (tag, then replay window)
    piece:   --Reassembler.add--> pieces or None  (None: more pieces due)
             --Opener.open_pieces--> plaintext    (tag, then replay window)
             --join_frame--> frame                (or Opener.open_frame:
                                                   both in one)

L{open_datagram} does all of that for one datagram.

Public API
==========

Constants
    L{VERSION}, L{TYPE_PAIR}, L{TYPE_GROUP}, L{TYPE_CONTROL}, L{HEADER_LEN},
    L{TAG_LEN}, L{OVERHEAD}, L{MAX_FRAGMENTS}, L{REJECT_AFTER_MESSAGES},
    and the drop reasons L{DROP_REASONS}.

C{tap_mtu(underlay_mtu, ipv6=False) -> int}, C{max_datagram(underlay_mtu, ipv6=False) -> int}
    MTU arithmetic for UDP underlays.

C{derive_pair_key(pair_key, sender_id, receiver_id, epoch, incarnation) -> SecretKey}
C{derive_group_key(group_key, sender_mac, epoch, incarnation) -> SecretKey}
    The traffic key of one direction, derived once per (key, epoch, sender
    incarnation), never per frame.

C{Sealer(key, type, epoch, incarnation)}
    C{.seal(frame, max_datagram) -> list[bytes]}; C{.seal_parts(...)}, the
    same as header and body parts; C{.seal_for_carrier(...)}, what a
    carrier sends (a whole frame's two parts, or a split frame's pieces as
    one L{Train}); C{.counter}.

C{Opener(key, type, epoch, incarnation)}
    C{.open(datagram, header=None) -> bytes} (a whole frame);
    C{.open_pieces(header, pieces) -> bytes} (a split frame);
    C{.open_frame(header, ciphertext) -> bytearray} (a split frame's
    ciphertext in one buffer, to the frame itself); C{.last_counter}.

C{parse_header(datagram) -> Header}
    C{Header(version, type, index, count, epoch, incarnation, counter, dst,
    src)}, a namedtuple.

C{Reassembler(clock, timeout=2.0, max_frames_per_sender=8, max_bytes=2 MiB)}
    C{.add(header, piece) -> list | None}; C{.expire() -> int};
    counters C{completed}, C{expired}, C{evicted}, C{dropped}.

C{Train(data, segment)}, C{train_ciphertext(train, header) -> buffer | None}
    Datagrams laid end to end in one buffer (a UDP GRO read, or a split
    frame for one UDP GSO send), and the ciphertext of the split frame that
    begins one, gathered at once when all its pieces are there in order
    with the headers they must have.

Errors
======

Every datagram the receiving side drops raises L{WireError}, whose
C{reason} attribute is one of L{DROP_REASONS}, so the agent can count drops
by reason:

    - C{"short"}: a whole frame's datagram shorter than a header and a
      tag, or a piece with nothing after its header;
    - C{"version"}: not version 2;
    - C{"type"}: an unknown type, or not the type of the Opener;
    - C{"fragment"}: fragment count 0 or above 64, index not below count, or
      a counter below the index (no frame starts before counter 0);
    - C{"incarnation"}: incarnation 0, or not the Opener's;
    - C{"epoch"}: not the Opener's key epoch (the peer may hold another key
      version: the seed's PW_ID check);
    - C{"auth"}: the tag did not verify (forged, corrupt, or another key);
    - C{"replay"}: authentic, but the counter was accepted before, is too
      old for the replay window, or is at or above REJECT_AFTER_MESSAGES;
    - C{"reassembly"}: a piece that does not fit the frame in progress with
      its identity, or an authentic frame shorter than an Ethernet header;
    - C{"limit"}: a piece that does not fit the reassembly memory budget.

The sending side raises C{ValueError} for a frame it cannot send (shorter
than an Ethernet header, or needing more than 64 pieces) and
L{CounterExhausted} when the key has protected all the messages it may: the
agent must get a new key (or a new incarnation) before sending more.

No repr, message or exception here carries key bytes.
"""

import functools
import hashlib
import struct
from collections import OrderedDict, namedtuple

import numpy
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securelan.addresses import check_mac
from securelan.keys import KEY_BYTES, SecretKey
from securelan.replay import REJECT_AFTER_MESSAGES, ReplayWindow

__all__ = [
    "VERSION",
    "TYPE_PAIR",
    "TYPE_GROUP",
    "TYPE_CONTROL",
    "TYPE_NET",
    "HEADER_LEN",
    "TAG_LEN",
    "OVERHEAD",
    "MAX_FRAGMENTS",
    "REJECT_AFTER_MESSAGES",
    "DROP_REASONS",
    "WireError",
    "CounterExhausted",
    "Header",
    "parse_header",
    "tap_mtu",
    "largest_split_frame",
    "max_datagram",
    "derive_pair_key",
    "derive_group_key",
    "derive_net_key",
    "subnet_tag",
    "Sealer",
    "Opener",
    "Reassembler",
    "join_frame",
    "open_datagram",
    "piece_header",
    "piece_headers",
    "Train",
    "train_ciphertext",
]

VERSION = 2

#: A unicast frame under a pair key.
TYPE_PAIR = 1
#: A broadcast or multicast frame under a sender's key derived from the
#: group key.
TYPE_GROUP = 2
#: Reserved for keepalives and other agent-to-agent messages.
TYPE_CONTROL = 3
#: An IP packet between the borders of two subnets, under a direction key
#: derived from the NETKEY of that pair of subnets.  The header's MAC fields
#: carry the two subnets' tags (L{subnet_tag}).
TYPE_NET = 4

#: Set in the type byte when the plaintext begins with the sender's
#: 10-byte virtio-net header (TAP offloads: a TSO super-frame's segment size,
#: a checksum the kernel has yet to fill in); see "Offload metadata".
FLAG_OFFLOAD = 0x80
_TYPE_MASK = 0x7F
VNET_HDR_LEN = 10

_TYPE_NAMES = {TYPE_PAIR: "pair", TYPE_GROUP: "group", TYPE_CONTROL: "control", TYPE_NET: "net"}

HEADER_LEN = 32
TAG_LEN = 16
#: What the wire adds to a frame's EtherType and payload.
OVERHEAD = HEADER_LEN + TAG_LEN
MAX_FRAGMENTS = 64

#: Destination MAC, source MAC, EtherType.
ETHERNET_HEADER_LEN = 14
#: The two MACs of an Ethernet frame travel in the header, not encrypted.
_MACS_LEN = 12

_IPV4_HEADER_LEN = 20
_IPV6_HEADER_LEN = 40
_UDP_HEADER_LEN = 8

#: The HKDF salt of every traffic key (unchanged since wire version 1).
KDF_SALT = b"securelan v1"

DROP_SHORT = "short"
DROP_VERSION = "version"
DROP_TYPE = "type"
DROP_FRAGMENT = "fragment"
DROP_INCARNATION = "incarnation"
DROP_EPOCH = "epoch"
DROP_AUTH = "auth"
DROP_REPLAY = "replay"
DROP_REASSEMBLY = "reassembly"
DROP_LIMIT = "limit"

DROP_REASONS = frozenset(
    {
        DROP_SHORT,
        DROP_VERSION,
        DROP_TYPE,
        DROP_FRAGMENT,
        DROP_INCARNATION,
        DROP_EPOCH,
        DROP_AUTH,
        DROP_REPLAY,
        DROP_REASSEMBLY,
        DROP_LIMIT,
    }
)

# version, type, fragment index, fragment count, epoch, incarnation,
# counter, destination MAC, source MAC.
_HEADER = struct.Struct("!BBBBIIQ6s6s")
# The same 32 bytes, packed with both MACs as one field (the first 12 bytes
# of an Ethernet frame) so the sender slices the frame once.
_HEADER_OUT = struct.Struct("!BBBBIIQ12s")
# A 96-bit GCM nonce: 4 zero bytes, then the counter.
_NONCE = struct.Struct("!4xQ")
_U32 = struct.Struct("!I")

assert _HEADER.size == _HEADER_OUT.size == HEADER_LEN

_MAX_U32 = 2**32 - 1
_MAX_U64 = 2**64 - 1


class WireError(Exception):
    """
    A datagram or piece was dropped.

    @ivar reason: why, one of L{DROP_REASONS}.
    @ivar datagrams: how many datagrams the drop stands for: 1, or the
        pieces of a split frame that failed as a whole.
    """

    def __init__(self, reason: str, datagrams: int = 1):
        super().__init__(reason)
        self.reason = reason
        self.datagrams = datagrams

    def __str__(self):
        return f"datagram dropped: {self.reason}"


class CounterExhausted(Exception):
    """
    The sending key has protected all the messages it may
    (L{REJECT_AFTER_MESSAGES}); it must not protect another.
    """


Header = namedtuple(
    "Header", "version type index count epoch incarnation counter dst src"
)
Header.__doc__ = """
The clear header of a datagram, as L{parse_header} returns it.

@ivar version: always L{VERSION}.
@ivar type: L{TYPE_PAIR}, L{TYPE_GROUP} or L{TYPE_CONTROL}.
@ivar index: the piece's fragment index, below C{count}.
@ivar count: how many pieces the frame has, 1 to L{MAX_FRAGMENTS}.
@ivar epoch: the key epoch (PW_ID).
@ivar incarnation: the sender's incarnation, never 0.
@ivar counter: the message counter (and nonce).
@ivar dst: the frame's destination MAC, 6 bytes.
@ivar src: the frame's source MAC, 6 bytes.
"""

# Header._make without its length check (unpack_from gives nine fields).
_tuple_new = tuple.__new__
_KNOWN_TYPES = frozenset(_TYPE_NAMES)


def parse_header(datagram) -> Header:
    """
    Read and check the clear header of a datagram.  Nothing here is
    authenticated yet: use the fields only to pick an L{Opener}.

    @param datagram: the datagram, any bytes-like object.
    @raise WireError: with reason C{"short"}, C{"version"}, C{"type"},
        C{"fragment"} or C{"incarnation"} (see the module docstring); never
        anything else.
    """
    if len(datagram) <= HEADER_LEN:
        raise WireError(DROP_SHORT)
    fields = _HEADER.unpack_from(datagram)
    if fields[0] != VERSION:
        raise WireError(DROP_VERSION)
    if fields[1] & _TYPE_MASK not in _KNOWN_TYPES or fields[1] & ~(_TYPE_MASK | FLAG_OFFLOAD):
        raise WireError(DROP_TYPE)
    index = fields[2]
    count = fields[3]
    if not 0 < count <= MAX_FRAGMENTS or index >= count or fields[6] < index:
        raise WireError(DROP_FRAGMENT)
    if count == 1 and len(datagram) < OVERHEAD:
        # A whole frame carries its tag; a piece may carry a part of one.
        raise WireError(DROP_SHORT)
    if not fields[5]:
        raise WireError(DROP_INCARNATION)
    return _tuple_new(Header, fields)


def max_datagram(underlay_mtu: int, ipv6: bool = False) -> int:
    """
    The largest UDP payload that crosses an underlay of this MTU unfragmented.
    """
    return underlay_mtu - (_IPV6_HEADER_LEN if ipv6 else _IPV4_HEADER_LEN) - _UDP_HEADER_LEN


def largest_split_frame(max_datagram: int, pieces: int) -> int:
    """
    The longest Ethernet frame, sent with its virtio-net header, whose
    datagrams of at most C{max_datagram} bytes number C{pieces} at most.
    """
    return pieces * (max_datagram - HEADER_LEN) - TAG_LEN - VNET_HDR_LEN + _MACS_LEN


def frame_mtu(max_datagram: int) -> int:
    """
    The largest device MTU (Ethernet payload) whose frames fit one datagram
    of C{max_datagram} bytes: the header, the tag and the EtherType (which
    travels inside the ciphertext) take the rest.
    """
    return max_datagram - OVERHEAD - (ETHERNET_HEADER_LEN - _MACS_LEN)


def tap_mtu(underlay_mtu: int, ipv6: bool = False) -> int:
    """
    The largest TAP MTU (Ethernet payload) for which every frame travels as
    one UDP datagram over an underlay of MTU C{underlay_mtu}: that MTU less
    the IP header (20 or 40), the UDP header (8), our header (32), the tag
    (16) and the EtherType that travels inside the ciphertext (2).  1500
    over IPv4 gives 1422.

    @raise ValueError: if the underlay MTU leaves no room for a payload.
    """
    mtu = frame_mtu(max_datagram(underlay_mtu, ipv6))
    if mtu < 1:
        raise ValueError(f"an underlay MTU of {underlay_mtu} is too small")
    return mtu


def _check_u32(name, value, minimum=0):
    if not isinstance(value, int) or not minimum <= value <= _MAX_U32:
        raise ValueError(f"{name} must be an integer in [{minimum}, {_MAX_U32}]")
    return value


def _length_prefixed(member_id: str) -> bytes:
    encoded = member_id.encode("utf-8")
    if not 0 < len(encoded) < 256:
        raise ValueError("a member ID is 1 to 255 bytes of UTF-8")
    return bytes((len(encoded),)) + encoded


def _epoch_and_incarnations(epoch, *incarnations) -> bytes:
    """
    The end of every key derivation's info: the epoch and the incarnations,
    each 4 bytes big-endian (an incarnation is never 0).
    """
    return _U32.pack(_check_u32("epoch", epoch)) + b"".join(
        _U32.pack(_check_u32("incarnation", incarnation, 1)) for incarnation in incarnations)


def _hkdf(ikm: SecretKey, info: bytes) -> SecretKey:
    if not isinstance(ikm, SecretKey):
        raise TypeError("the input key must be a SecretKey")
    return SecretKey(HKDF(SHA256(), KEY_BYTES, KDF_SALT, info).derive(ikm.material))


def derive_pair_key(
    pair_key: SecretKey,
    sender_id: str,
    receiver_id: str,
    epoch: int,
    sender_incarnation: int,
    receiver_incarnation: int,
) -> SecretKey:
    """
    The key of the direction C{sender_id} -> C{receiver_id} of a pair key,
    for one incarnation of each end.  The sender's incarnation (in every
    header) keeps a restarted sender from reusing a nonce; the receiver's
    (which the key server hands out with the key, and which a receiver's own
    datagrams carry) keeps datagrams recorded before a receiver restarted
    from being replayed into it.

    HKDF-SHA-256, salt C{b"securelan v1"}, info C{b"pair" + lp(sender_id) +
    lp(receiver_id) + epoch + sender_incarnation + receiver_incarnation}
    (C{lp}: one length byte, then UTF-8; the numbers 4 bytes big-endian).
    """
    info = b"".join(
        (
            b"pair",
            _length_prefixed(sender_id),
            _length_prefixed(receiver_id),
            _epoch_and_incarnations(epoch, sender_incarnation, receiver_incarnation),
        )
    )
    return _hkdf(pair_key, info)


def derive_group_key(
    group_key: SecretKey, sender_mac: bytes, epoch: int, incarnation: int
) -> SecretKey:
    """
    The key under which the member with MAC C{sender_mac}, in one
    incarnation, sends broadcast and multicast frames (the seed's claims 5
    and 10: the multicast key carries the sender's MAC).

    HKDF-SHA-256, salt C{b"securelan v1"}, info C{b"group" + sender_mac +
    epoch + incarnation} (both numbers 4 bytes big-endian).
    """
    info = b"".join(
        (
            b"group",
            check_mac(sender_mac),
            _epoch_and_incarnations(epoch, incarnation),
        )
    )
    return _hkdf(group_key, info)


def derive_net_key(
    net_key: SecretKey,
    sender_subnet: str,
    sender_border: str,
    receiver_subnet: str,
    receiver_border: str,
    epoch: int,
    sender_incarnation: int,
    receiver_incarnation: int,
) -> SecretKey:
    """
    The key of the direction C{sender_subnet} -> C{receiver_subnet} of the
    NETKEY of that pair of subnets, between the two borders named, for one
    incarnation of each: as L{derive_pair_key} does for members, so a
    restarted border never reuses a nonce and datagrams recorded before the
    receiving border restarted cannot be replayed into it.

    HKDF-SHA-256, salt C{b"securelan v1"}, info C{b"net" +
    lp(sender_subnet) + lp(sender_border) + lp(receiver_subnet) +
    lp(receiver_border) + epoch + sender_incarnation +
    receiver_incarnation}.
    """
    info = b"".join(
        (
            b"net",
            _length_prefixed(sender_subnet),
            _length_prefixed(sender_border),
            _length_prefixed(receiver_subnet),
            _length_prefixed(receiver_border),
            _epoch_and_incarnations(epoch, sender_incarnation, receiver_incarnation),
        )
    )
    return _hkdf(net_key, info)


def subnet_tag(subnet: str) -> bytes:
    """
    The 6 bytes that stand for subnet C{subnet} in the MAC fields of a
    L{TYPE_NET} header (destination: the receiving subnet; source: the
    sending one), so a border picks the NETKEY before decrypting.  Locally
    administered and unicast, like the MACs they stand in for.
    """
    digest = bytearray(hashlib.sha256(b"securelan subnet\0" + subnet.encode("utf-8")).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return bytes(digest)


def _check_direction(key, type, epoch, incarnation):
    if not isinstance(key, SecretKey):
        raise TypeError("the traffic key must be a SecretKey")
    if type not in _KNOWN_TYPES:
        raise ValueError(f"unknown datagram type {type!r}")
    _check_u32("epoch", epoch)
    _check_u32("incarnation", incarnation, 1)


class Sealer:
    """
    The sending direction of one traffic key: it turns Ethernet frames into
    datagrams and owns the message counter, so it never uses a counter (a
    GCM nonce) twice.  Make one per derived key and keep it as long as the
    key.

    @param key: the derived traffic key (L{derive_pair_key} with this
        member as sender, or L{derive_group_key} with this member's MAC).
    @param type: L{TYPE_PAIR}, L{TYPE_GROUP} or L{TYPE_CONTROL}.
    @param epoch: the key epoch, 0 to 2**32 - 1.
    @param incarnation: this member's incarnation, 1 to 2**32 - 1.
    """

    __slots__ = ("_encrypt", "_type", "_epoch", "_incarnation", "_counter")

    def __init__(self, key: SecretKey, type: int, epoch: int, incarnation: int, counter: int = 0):
        _check_direction(key, type, epoch, incarnation)
        self._encrypt = AESGCM(key.material).encrypt
        self._type = type
        self._epoch = epoch
        self._incarnation = incarnation
        # Not 0 when a key is taken up again: its counter goes on.
        self._counter = counter

    def __repr__(self):
        return (
            f"<Sealer {_TYPE_NAMES[self._type]} epoch={self._epoch}"
            f" incarnation={self._incarnation} counter={self._counter}>"
        )

    @property
    def counter(self) -> int:
        """
        The counter of the next datagram: how many this key has sealed.
        """
        return self._counter

    def seal(self, frame, max_datagram: int, offload=None) -> list:
        """
        Encrypt one Ethernet frame into datagrams of at most C{max_datagram}
        bytes: one datagram when it fits, else up to L{MAX_FRAGMENTS} pieces
        with consecutive counters, every piece but the last exactly
        C{max_datagram} bytes long (so the datagrams can leave in one UDP
        GSO send).  The pieces of a split frame are one AEAD message under
        the counter of piece 0, whose header is the associated data: the
        ciphertext and its tag are cut across the pieces.

        @param frame: the whole frame, destination MAC, source MAC,
            EtherType, payload (bytes-like).
        @param offload: the frame's 10-byte virtio-net header, when the TAP
            device gave one that is not all zero: it travels encrypted in
            front of the EtherType and the type byte carries
            L{FLAG_OFFLOAD}.
        @return: the datagrams (C{bytes}), in order.
        @raise ValueError: if the frame is shorter than an Ethernet header,
            or would need more than L{MAX_FRAGMENTS} pieces, or
            C{max_datagram} leaves no room beyond L{OVERHEAD}.
        @raise CounterExhausted: if the key may not protect that many more
            messages; nothing is sealed then.
        """
        sealed = self.seal_for_carrier(frame, max_datagram, offload)
        if type(sealed) is Train:
            return list(map(bytes, sealed))
        return [sealed[0] + sealed[1]]

    def seal_parts(self, frame, max_datagram: int, offload=None) -> list:
        """
        L{seal}, with each datagram as its two parts, laid flat: C{[header
        0, rest of datagram 0, header 1, rest of datagram 1, ...]} (the
        headers C{bytes}, the rests bytes-like).
        """
        sealed = self.seal_for_carrier(frame, max_datagram, offload)
        if type(sealed) is not Train:
            return sealed
        data, segment = sealed.data, sealed.segment
        return [part for start in range(0, len(data), segment)
                for part in (bytes(data[start:start + HEADER_LEN]), data[start + HEADER_LEN:start + segment])]

    def seal_for_carrier(self, frame, max_datagram: int, offload=None):
        """
        L{seal}, as a carrier sends it without joining anything in Python: a
        frame that fits one datagram as its two parts, C{[header, rest]}
        (L{securelan._interfaces.ICarrier.send_parts}); a split frame as a
        L{Train} of its pieces laid end to end in one buffer
        (L{securelan._interfaces.ICarrier.send_train}), what one UDP GSO send
        takes.
        """
        if len(frame) < ETHERNET_HEADER_LEN:
            raise ValueError("an Ethernet frame is at least 14 bytes")
        type = self._type
        if offload:
            if len(offload) != VNET_HDR_LEN:
                raise ValueError(f"a virtio-net header is {VNET_HDR_LEN} bytes")
            # One copy of a super-frame, not a slice and then a join.
            plaintext = b"".join((offload, memoryview(frame)[_MACS_LEN:]))
            type |= FLAG_OFFLOAD
        else:
            plaintext = frame[_MACS_LEN:]
        body = len(plaintext)
        room = max_datagram - OVERHEAD
        counter = self._counter
        macs = bytes(frame[:_MACS_LEN])
        if body <= room:
            if counter >= REJECT_AFTER_MESSAGES:
                raise CounterExhausted()
            self._counter = counter + 1
            header = _HEADER_OUT.pack(
                VERSION, type, 0, 1, self._epoch, self._incarnation, counter, macs
            )
            return [header, self._encrypt(_NONCE.pack(counter), plaintext, header)]
        if room < 1:
            raise ValueError(f"a datagram of {max_datagram} bytes has no room for data")
        # A split frame is one AEAD message: ciphertext and tag, cut into
        # pieces that carry a header each but no tag of their own.
        room = max_datagram - HEADER_LEN
        count = -(-(body + TAG_LEN) // room)
        if count > MAX_FRAGMENTS:
            raise ValueError(
                f"a {len(frame)}-byte frame needs {count} pieces of at most"
                f" {max_datagram} bytes; the limit is {MAX_FRAGMENTS}"
            )
        if counter > REJECT_AFTER_MESSAGES - count:
            raise CounterExhausted()
        self._counter = counter + count
        headers = _headers_of(VERSION, type, count, self._epoch, self._incarnation, macs, counter)
        sealed = self._encrypt(_NONCE.pack(counter), plaintext, headers[:HEADER_LEN])
        # One buffer, laid out as the datagrams leave: a header, then a
        # piece of the ciphertext, each row of the grid.
        size = count * HEADER_LEN + len(sealed)
        out = numpy.empty(count * max_datagram, numpy.uint8)
        grid = out.reshape(count, max_datagram)
        grid[:, :HEADER_LEN] = numpy.frombuffer(headers, numpy.uint8).reshape(count, HEADER_LEN)
        ciphertext = numpy.frombuffer(sealed, numpy.uint8)
        full = (count - 1) * room
        grid[:count - 1, HEADER_LEN:] = ciphertext[:full].reshape(count - 1, room)
        grid[count - 1, HEADER_LEN:HEADER_LEN + len(sealed) - full] = ciphertext[full:]
        return Train(memoryview(out)[:size], max_datagram)


class Opener:
    """
    The receiving direction of one traffic key, for one sender incarnation:
    it authenticates and decrypts datagrams and keeps the replay window.

    @param key: the derived traffic key (L{derive_pair_key} with the peer as
        sender, or L{derive_group_key} with the peer's MAC), for the
        incarnation the header carries.
    @param type: the datagram type this key is for.
    @param epoch: the key epoch.
    @param incarnation: the sender's incarnation.
    """

    __slots__ = ("_decrypt", "_decrypt_into", "_type", "_epoch", "_incarnation", "_window")

    def __init__(self, key: SecretKey, type: int, epoch: int, incarnation: int):
        _check_direction(key, type, epoch, incarnation)
        aead = AESGCM(key.material)
        self._decrypt = aead.decrypt
        self._decrypt_into = aead.decrypt_into
        self._type = type
        self._epoch = epoch
        self._incarnation = incarnation
        self._window = ReplayWindow()

    def __repr__(self):
        return (
            f"<Opener {_TYPE_NAMES[self._type]} epoch={self._epoch}"
            f" incarnation={self._incarnation} last_counter={self._window.last}>"
        )

    @property
    def last_counter(self) -> int:
        """
        The highest counter accepted so far (0 when none was).
        """
        return self._window.last

    def reject_through(self, counter: int):
        """
        Refuse every counter up to C{counter}: this key was in use before.
        """
        self._window.reject_through(counter)

    def seen(self, counter: int) -> bool:
        """
        Whether the replay window would refuse C{counter} (a whole frame's,
        or a split frame's identity), without moving it: a piece of a frame
        already accepted can be dropped before it is held.
        """
        return self._window.seen(counter)

    def open(self, datagram, header: Header = None) -> bytes:
        """
        Authenticate and decrypt a datagram that holds a whole frame: first
        the tag, then the replay window, which moves only for an authentic
        datagram.  A piece of a split frame cannot be opened alone: collect
        the pieces with a L{Reassembler} and give them to L{open_pieces}.

        @param datagram: the whole datagram (bytes-like).
        @param header: C{parse_header(datagram)}, if the caller has it.
        @return: the plaintext: EtherType and payload (after the virtio-net
            header for a frame sent with L{FLAG_OFFLOAD}); see
            L{join_frame}.
        @raise WireError: with reason C{"type"}, C{"epoch"} or
            C{"incarnation"} if the header does not name this key,
            C{"fragment"} for a piece, C{"auth"} if the tag does not verify,
            C{"replay"} if the counter is not fresh, or any reason of
            L{parse_header}.
        """
        if header is None:
            header = parse_header(datagram)
        self._check_names(header)
        if header.count != 1:
            raise WireError(DROP_FRAGMENT)
        return self.open_counter(datagram, header.counter)

    def open_pieces(self, header: Header, pieces) -> bytes:
        """
        Authenticate and decrypt a split frame, as L{open} does a whole one:
        the tag over all its pieces, then the replay window for the frame's
        identity (the counter of its piece 0).  One forged, corrupt or
        misplaced piece fails the whole frame.

        @param header: the header of any of its pieces.
        @param pieces: what follows the header in each piece, in order of
            index (as L{Reassembler.add} returns them).
        @return: the plaintext, as L{open} returns it.
        @raise WireError: as L{open}.
        """
        if len(pieces) != header.count:
            self._check_names(header)
            raise WireError(DROP_FRAGMENT)
        ciphertext = b"".join(pieces)
        plaintext = bytearray(max(len(ciphertext) - TAG_LEN, 0))
        self._open_split(header, ciphertext, plaintext)
        return bytes(plaintext)

    def open_frame(self, header: Header, ciphertext) -> bytearray:
        """
        L{open_pieces} for the ciphertext of all the pieces in one buffer
        (as L{train_ciphertext} gathers it, or the pieces joined), giving
        the frame as L{join_frame} would make it from the plaintext, without
        the copies: the plaintext is decrypted into the frame's buffer, 12
        bytes in, and the MACs (and a virtio-net header) put in front.

        @raise WireError: as L{open}, standing for all the frame's
            datagrams, and C{"reassembly"} (one) as L{join_frame}.
        """
        size = len(ciphertext) - TAG_LEN
        frame = bytearray(_MACS_LEN + max(size, 0))
        view = memoryview(frame)
        self._open_split(header, ciphertext, view[_MACS_LEN:])
        macs = header.dst + header.src
        if header.type & FLAG_OFFLOAD:
            if size < VNET_HDR_LEN + _MIN_BODY:
                raise WireError(DROP_REASSEMBLY)
            view[:VNET_HDR_LEN] = view[_MACS_LEN:_MACS_LEN + VNET_HDR_LEN]
            view[VNET_HDR_LEN:VNET_HDR_LEN + _MACS_LEN] = macs
        else:
            if size < _MIN_BODY:
                raise WireError(DROP_REASSEMBLY)
            view[:_MACS_LEN] = macs
        return frame

    def _open_split(self, header, ciphertext, into):
        """
        Authenticate the ciphertext of a split frame and decrypt it into
        C{into}, then check the replay window: what L{open_pieces} and
        L{open_frame} share.  A failure stands for every datagram of the
        frame (C{header.count}).  After a failure C{into} may hold
        unauthenticated plaintext: the callers' buffers are their own and
        dropped with the exception, never handed on.
        """
        datagrams = header.count
        self._check_names(header, datagrams)
        if len(ciphertext) < TAG_LEN:
            raise WireError(DROP_AUTH, datagrams)
        counter = header.counter - header.index
        try:
            self._decrypt_into(_NONCE.pack(counter), ciphertext, piece_header(header, 0), into)
        except InvalidTag:
            raise WireError(DROP_AUTH, datagrams) from None
        if not self._window.check(counter):
            raise WireError(DROP_REPLAY, datagrams)

    def _check_names(self, header, datagrams=1):
        if header.type & _TYPE_MASK != self._type:
            raise WireError(DROP_TYPE, datagrams)
        if header.epoch != self._epoch:
            raise WireError(DROP_EPOCH, datagrams)
        if header.incarnation != self._incarnation:
            raise WireError(DROP_INCARNATION, datagrams)

    def open_counter(self, datagram, counter: int) -> bytes:
        """
        L{open} for a caller that has already checked that the header names
        this key (type, epoch, incarnation) and a whole frame (count 1): the
        tag, then the replay window.
        A header that names another key fails the tag anyway (the header is
        the associated data and the epoch and incarnation are in the key);
        L{open} only tells that case apart.
        """
        try:
            plaintext = self._decrypt(
                _NONCE.pack(counter), datagram[HEADER_LEN:], datagram[:HEADER_LEN]
            )
        except InvalidTag:
            raise WireError(DROP_AUTH) from None
        if not self._window.check(counter):
            raise WireError(DROP_REPLAY)
        return plaintext


def piece_header(header: Header, index: int) -> bytes:
    """
    The 32 header bytes of piece C{index} of the frame that the piece with
    C{header} belongs to: what that piece's datagram begins with.
    """
    return _HEADER.pack(header.version, header.type, index, header.count, header.epoch,
                        header.incarnation, header.counter - header.index + index, header.dst, header.src)


def piece_headers(header: Header) -> list:
    """
    L{piece_header} of every piece of the frame, in order of index.
    """
    version, type, index, count, epoch, incarnation, counter, dst, src = header
    headers = _headers_of(version, type, count, epoch, incarnation, dst + src, counter - index)
    return [headers[start:start + HEADER_LEN] for start in range(0, len(headers), HEADER_LEN)]


# Where the index and the counter sit in a header read as one big-endian
# number: adding one to either adds these.
_INDEX_UNIT = 1 << 8 * (HEADER_LEN - 1 - struct.calcsize("!BB"))
_COUNTER_UNIT = 1 << 8 * (HEADER_LEN - struct.calcsize("!BBBBIIQ"))


@functools.lru_cache(maxsize=MAX_FRAGMENTS + 1)
def _header_ramp(count: int) -> int:
    """
    For a split frame of C{count} pieces: the number that, added to piece
    0's header repeated C{count} times and read as one big-endian number,
    gives the headers of all its pieces laid end to end.  Piece C{i}'s
    header is piece 0's with C{i} added to the index and to the counter
    (neither can carry: at most 64 pieces, and a frame's counters fit 64
    bits), so a frame's headers cost one addition, not C{count} packs or
    comparisons.  Keyed by the count alone (at most L{MAX_FRAGMENTS}
    entries), so nothing a datagram says can fill or churn the cache.
    """
    # The header k places from the end is piece (count - 1 - k)'s: it adds
    # that many units of each.
    shift = 8 * HEADER_LEN
    return (_INDEX_UNIT + _COUNTER_UNIT) * sum((count - 1 - k) << shift * k for k in range(count))


def _headers_of(version, type, count, epoch, incarnation, macs, counter) -> bytes:
    """
    The headers of every piece of a split frame whose piece 0 has
    C{counter}, laid end to end (C{count} times L{HEADER_LEN} bytes).
    """
    if counter > _MAX_U64 - (count - 1):
        # A carry would run into the next field: no such frame exists.
        raise ValueError("the counters of that frame do not fit 64 bits")
    first = _HEADER_OUT.pack(version, type, 0, count, epoch, incarnation, counter, macs)
    return (int.from_bytes(first * count) + _header_ramp(count)).to_bytes(count * HEADER_LEN)


class Train:
    """
    Datagrams laid end to end in one buffer, as a UDP GRO read hands them
    over and a UDP GSO send takes them: each C{segment} bytes long but the
    last, which may be shorter.  Iterating gives each datagram (a slice of
    C{data}: C{bytes} for C{bytes}); a receiver that knows trains takes a
    split frame's ciphertext from one with L{train_ciphertext} without
    cutting it into datagrams first.
    """

    __slots__ = ("data", "segment")

    def __init__(self, data: bytes, segment: int):
        if segment < 1:
            raise ValueError("a train's segment size is positive")
        self.data = data
        self.segment = segment

    def __repr__(self):
        return f"<Train of {len(self)} datagrams, {len(self.data)} bytes>"

    def __len__(self):
        return -(-len(self.data) // self.segment)

    def __iter__(self):
        data, segment = self.data, self.segment
        return (data[offset:offset + segment] for offset in range(0, len(data), segment))

    def after(self, datagrams: int) -> list:
        """
        The datagrams that follow the first C{datagrams}.
        """
        data, segment = self.data, self.segment
        return [data[offset:offset + segment] for offset in range(datagrams * segment, len(data), segment)]


def train_ciphertext(train: Train, header: Header):
    """
    The ciphertext of the split frame whose piece 0 begins C{train} (with
    C{header}), gathered into one buffer (for L{Opener.open_frame}), when
    the train holds all its pieces, in order, each with the header
    L{piece_header} says it must have; else C{None} (take the datagrams one
    by one then).  What the pieces hold is not checked: only
    L{Opener.open_frame} tells whether the frame is authentic.  A train
    holds more datagrams after a frame only if the frame's last piece is
    a whole segment, as in a GRO read (which ends at a shorter datagram).
    """
    count, segment, data = header.count, train.segment, train.data
    full = count - 1
    last = full * segment
    end = min(len(data), last + segment)
    if (header.index or count == 1 or segment <= HEADER_LEN or end - last <= HEADER_LEN
            or header.counter > _MAX_U64 - full):
        return None
    grid = numpy.frombuffer(data, numpy.uint8, last).reshape(full, segment)
    # Every header at once: one number against the one piece 0's header
    # makes them (its own index is 0, checked above).
    expected = int.from_bytes(bytes(data[:HEADER_LEN]) * count) + _header_ramp(count)
    if int.from_bytes(grid[:, :HEADER_LEN].tobytes() + data[last:last + HEADER_LEN]) != expected:
        return None
    room = segment - HEADER_LEN
    ciphertext = numpy.empty(full * room + end - last - HEADER_LEN, numpy.uint8)
    ciphertext[:full * room].reshape(full, room)[:] = grid[:, HEADER_LEN:]
    ciphertext[full * room:] = numpy.frombuffer(data, numpy.uint8, end - last - HEADER_LEN, last + HEADER_LEN)
    return ciphertext


def join_frame(header: Header, pieces) -> bytes:
    """
    The frame that C{pieces} of plaintext (authentic, all of them, in
    order; usually one, what L{Opener.open} or L{Opener.open_pieces}
    returned) make: with the virtio-net header in front for a frame sent
    with L{FLAG_OFFLOAD}, as a TAP device opened with C{IFF_VNET_HDR} takes
    it.

    @raise WireError: C{"reassembly"} if the frame is shorter than an
        Ethernet header (and, with the flag, a virtio-net header).
    """
    first = pieces[0]
    if header.type & FLAG_OFFLOAD:
        if len(first) < VNET_HDR_LEN or sum(map(len, pieces)) < _MIN_BODY + VNET_HDR_LEN:
            raise WireError(DROP_REASSEMBLY)
        first = memoryview(first)
        return b"".join((first[:VNET_HDR_LEN], header.dst, header.src, first[VNET_HDR_LEN:], *pieces[1:]))
    if len(pieces) == 1:
        if len(first) < _MIN_BODY:
            raise WireError(DROP_REASSEMBLY)
        return header.dst + header.src + first
    if sum(map(len, pieces)) < _MIN_BODY:
        raise WireError(DROP_REASSEMBLY)
    return b"".join((header.dst, header.src, *pieces))


_MIN_BODY = ETHERNET_HEADER_LEN - _MACS_LEN


class _Frame:
    """
    A fragmented frame in progress.
    """

    __slots__ = ("dst", "count", "pieces", "missing", "size", "started")

    def __init__(self, dst, count, started):
        self.dst = dst
        self.count = count
        self.pieces = [None] * count
        self.missing = count
        self.size = 0
        self.started = started


def open_datagram(opener: "Opener", reassembler: "Reassembler", datagram, header: Header = None):
    """
    What a receiver does with one datagram once it has picked the
    L{Opener}: a whole frame is opened at once; a piece waits in the
    reassembler until its frame is complete, and the frame is opened then.

    @return: the frame (see L{join_frame}), or C{None} while pieces are due.
    @raise WireError: for any reason of L{parse_header}, L{Opener.open},
        L{Reassembler.add} or L{join_frame}.
    """
    if header is None:
        header = parse_header(datagram)
    if header.count == 1:
        return join_frame(header, (opener.open(datagram, header),))
    if opener.seen(header.counter - header.index):
        raise WireError(DROP_REPLAY)
    pieces = reassembler.add(header, datagram[HEADER_LEN:])
    if pieces is None:
        return None
    return opener.open_frame(header, b"".join(pieces))


class Reassembler:
    """
    Gathers the pieces of split frames, in any order, within
    bounds: at most C{max_frames_per_sender} frames in progress per source
    MAC (a new one evicts that sender's oldest), at most C{max_bytes} of
    pieces held in all (new pieces evict the oldest frames), and a frame
    not complete C{timeout} seconds after its first piece is dropped.  A
    frame missing a piece is never delivered.  The pieces are not
    authenticated yet (a split frame has one tag, over all of them): only
    L{Opener.open_pieces} of a complete frame tells whether it is authentic.

    Call L{expire} from a timer too, so a frame that lost a piece frees its
    memory even when no more pieces arrive.

    @param clock: gives the time with C{.seconds()} (the reactor, or a
        C{twisted.internet.task.Clock} in tests); it should not go back.

    @ivar completed: frames rebuilt from several pieces.
    @ivar expired: frames dropped because a piece was missing at timeout.
    @ivar evicted: frames dropped to stay within the bounds.
    """

    def __init__(self, clock, timeout=2.0, max_frames_per_sender=8, max_bytes=2 * 1024 * 1024):
        if timeout <= 0 or max_frames_per_sender < 1 or max_bytes < 1:
            raise ValueError("the reassembly bounds must be positive")
        self._clock = clock
        self._timeout = timeout
        self._max_frames_per_sender = max_frames_per_sender
        self._max_bytes = max_bytes
        # Every frame in progress, oldest first, by (sender, frame identity).
        self._frames = OrderedDict()
        # Source MAC -> that sender's frames in progress, oldest first.
        self._by_source = {}
        self._bytes = 0
        self.completed = 0
        self.expired = 0
        self.evicted = 0

    def __repr__(self):
        return f"<Reassembler frames={len(self._frames)} bytes={self._bytes}>"

    @property
    def dropped(self) -> int:
        """
        Frames dropped unfinished, for any reason.
        """
        return self.expired + self.evicted

    @property
    def in_progress(self) -> int:
        """
        How many frames are waiting for pieces.
        """
        return len(self._frames)

    @property
    def bytes_held(self) -> int:
        """
        The size of the pieces held.
        """
        return self._bytes

    def add(self, header: Header, piece) -> list:
        """
        Take one piece: what follows the header in the datagram with this
        header.

        @return: the pieces of the frame, in order of index, when this one
            completes it (at once for a whole frame), else C{None}.  Open
            them with L{Opener.open_pieces}.
        @raise WireError: with reason C{"reassembly"} if the piece does not
            fit the frame in progress with its identity (another piece
            count, another destination, an index already held); C{"limit"}
            if the piece alone exceeds the memory budget.
        """
        count = header.count
        if count == 1:
            return [piece]
        src = header.src
        index = header.index
        # The sender's counter space is its key's, named by these fields;
        # a frame's identity in it is the counter of its piece 0.
        key = (src, header.type, header.epoch, header.incarnation, header.counter - index)
        frame = self._frames.get(key)
        new = frame is None
        if new:
            # Expiry runs as frames start (and from the agent's timer), not
            # for every piece: the frames in progress are few.
            now = self._clock.seconds()
            self._expire(now)
            mine = self._by_source.get(src)
            if mine is not None and len(mine) >= self._max_frames_per_sender:
                self._drop(*next(iter(mine.items())))
                self.evicted += 1
            frame = _Frame(header.dst, count, now)
        elif frame.count != count or frame.dst != header.dst or frame.pieces[index] is not None:
            raise WireError(DROP_REASSEMBLY)
        size = len(piece)
        if size > self._max_bytes:
            raise WireError(DROP_LIMIT)
        while self._bytes + size > self._max_bytes:
            oldest_key, oldest = next(iter(self._frames.items()))
            self._drop(oldest_key, oldest)
            self.evicted += 1
            if oldest is frame:
                raise WireError(DROP_LIMIT)
        # A copy: the piece may be a view of a whole GRO read, which must not
        # stay alive for the sake of a few bytes.
        frame.pieces[index] = bytes(piece)
        frame.missing -= 1
        if frame.missing:
            frame.size += size
            self._bytes += size
            if new:
                self._frames[key] = frame
                self._by_source.setdefault(src, OrderedDict())[key] = frame
            return None
        self._drop(key, frame)
        self.completed += 1
        return frame.pieces

    def holds(self, header: Header) -> bool:
        """
        Whether pieces of the frame that C{header}'s piece belongs to are
        already held.
        """
        return (header.src, header.type, header.epoch, header.incarnation,
                header.counter - header.index) in self._frames

    def expire(self) -> int:
        """
        Drop every frame whose first piece came C{timeout} seconds ago or
        earlier.

        @return: how many were dropped.
        """
        if not self._frames:
            return 0
        return self._expire(self._clock.seconds())

    def _expire(self, now) -> int:
        frames = self._frames
        deadline = now - self._timeout
        dropped = 0
        while frames:
            key, frame = next(iter(frames.items()))
            if frame.started > deadline:
                break
            self._drop(key, frame)
            dropped += 1
        self.expired += dropped
        return dropped

    def _drop(self, key, frame):
        del self._frames[key]
        mine = self._by_source[key[0]]
        del mine[key]
        if not mine:
            del self._by_source[key[0]]
        self._bytes -= frame.size
