"""
Tests for L{securelan.wire}.
"""

import itertools
import struct

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from securelan.keys import SecretKey
from securelan.wire import (
    DROP_REASONS,
    HEADER_LEN,
    MAX_FRAGMENTS,
    OVERHEAD,
    REJECT_AFTER_MESSAGES,
    TAG_LEN,
    TYPE_CONTROL,
    TYPE_GROUP,
    TYPE_PAIR,
    VERSION,
    CounterExhausted,
    Header,
    Opener,
    Reassembler,
    Sealer,
    Train,
    WireError,
    derive_group_key,
    derive_net_key,
    derive_pair_key,
    subnet_tag,
    join_frame,
    max_datagram,
    open_datagram,
    parse_header,
    piece_headers,
    tap_mtu,
    train_ciphertext,
)

HYPOTHESIS = settings(deadline=None, derandomize=True)

PAIR_KEY = SecretKey(bytes(range(32)))
GROUP_KEY = SecretKey(bytes(range(100, 132)))
ALICE, BOB = "alice", "bob"
A_MAC = bytes.fromhex("020000000001")
B_MAC = bytes.fromhex("020000000002")
C_MAC = bytes.fromhex("020000000003")
GROUP_MAC = bytes.fromhex("01005e000001")
EPOCH = 3
MTU_DATAGRAM = max_datagram(1500)  # 1472


def frame(dst=B_MAC, src=A_MAC, ethertype=b"\x08\x00", payload=b"hello, bob"):
    """
    An Ethernet frame.
    """
    return dst + src + ethertype + payload


def big_payload(size):
    """
    C{size} bytes that differ from place to place (so a misplaced piece
    shows).
    """
    return bytes(itertools.islice(itertools.cycle(range(251)), size))


#: The receiving member's incarnation in the pair keys of these tests.
RECEIVER_INCARNATION = 9


def pair(incarnation=7, epoch=EPOCH, receiver=BOB, receiver_incarnation=None):
    """
    A Sealer for alice -> bob and the Opener that bob (or C{receiver}) makes
    for it.
    """
    sealer = Sealer(
        derive_pair_key(PAIR_KEY, ALICE, BOB, epoch, incarnation, RECEIVER_INCARNATION), TYPE_PAIR, epoch, incarnation
    )
    seen = incarnation if receiver_incarnation is None else receiver_incarnation
    opener = Opener(
        derive_pair_key(PAIR_KEY, ALICE, receiver, epoch, seen, RECEIVER_INCARNATION), TYPE_PAIR, epoch, seen
    )
    return sealer, opener


def group(sender_mac=A_MAC, incarnation=7, receiver_mac=None):
    """
    A Sealer for group frames sent by C{sender_mac} and the Opener a
    receiver makes for C{receiver_mac} (default: the same sender).
    """
    sealer = Sealer(
        derive_group_key(GROUP_KEY, sender_mac, EPOCH, incarnation), TYPE_GROUP, EPOCH, incarnation
    )
    opener = Opener(
        derive_group_key(GROUP_KEY, receiver_mac or sender_mac, EPOCH, incarnation),
        TYPE_GROUP,
        EPOCH,
        incarnation,
    )
    return sealer, opener


def receive(opener, reassembler, datagram):
    """
    What an agent does with one datagram.
    """
    return open_datagram(opener, reassembler, datagram)


def hkdf(ikm, info):
    """
    The specification's key derivation, spelled out with the primitives.
    """
    return HKDF(SHA256(), 32, b"securelan v1", info).derive(ikm)


class ConstantsTests(SynchronousTestCase):
    """
    The sizes of the format and the MTU arithmetic.
    """

    def test_sizes(self):
        """
        Version 2 (split frames are one AEAD message), the header is 32
        bytes, the tag 16, 64 pieces at most, and the counter limit is
        WireGuard's.
        """
        self.assertEqual((VERSION, HEADER_LEN, TAG_LEN, OVERHEAD), (2, 32, 16, 48))
        self.assertEqual((TYPE_PAIR, TYPE_GROUP, TYPE_CONTROL), (1, 2, 3))
        self.assertEqual(MAX_FRAGMENTS, 64)
        self.assertEqual(REJECT_AFTER_MESSAGES, 2**64 - 2**13 - 1)

    def test_tapMtu(self):
        """
        1500 over IPv4 leaves 1422 bytes of Ethernet payload (1500 - 20 - 8
        - 32 - 16 - 2); over IPv6, 20 fewer.
        """
        self.assertEqual(tap_mtu(1500), 1422)
        self.assertEqual(tap_mtu(1500, ipv6=True), 1402)
        self.assertEqual(tap_mtu(9000), 8922)
        self.assertEqual(max_datagram(1500), 1472)
        self.assertEqual(max_datagram(1500, ipv6=True), 1452)

    def test_tapMtuTooSmall(self):
        """
        An underlay too small for even one byte of payload is refused.
        """
        self.assertEqual(tap_mtu(79), 1)
        self.assertRaises(ValueError, tap_mtu, 78)

    def test_tapMtuFrameFitsOneDatagram(self):
        """
        A frame of exactly the TAP MTU travels as one datagram that fills
        the UDP payload; one byte more takes two.
        """
        sealer, _ = pair()
        full = frame(payload=bytes(tap_mtu(1500)))
        [datagram] = sealer.seal(full, MTU_DATAGRAM)
        self.assertEqual(len(datagram), MTU_DATAGRAM)
        self.assertEqual(len(sealer.seal(full + b"x", MTU_DATAGRAM)), 2)

    def test_dropReasons(self):
        """
        The documented drop reasons, and no others.
        """
        self.assertEqual(
            DROP_REASONS,
            {
                "short",
                "version",
                "type",
                "fragment",
                "incarnation",
                "epoch",
                "auth",
                "replay",
                "reassembly",
                "limit",
            },
        )


class KeyDerivationTests(SynchronousTestCase):
    """
    L{derive_pair_key} and L{derive_group_key}.
    """

    def test_pairKnownAnswer(self):
        """
        The pair traffic key is HKDF-SHA-256 of the pair key, salt
        C{securelan v1}, info C{pair}, length-prefixed sender and receiver
        IDs, epoch, sender incarnation and receiver incarnation.
        """
        info = b"pair\x05alice\x03bob" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x09"
        self.assertEqual(
            derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION),
            SecretKey(hkdf(PAIR_KEY.material, info)),
        )

    def test_groupKnownAnswer(self):
        """
        The group traffic key is HKDF-SHA-256 of the group key, info
        C{group}, sender MAC, epoch and incarnation.
        """
        info = b"group" + A_MAC + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x07"
        self.assertEqual(
            derive_group_key(GROUP_KEY, A_MAC, 3, 7),
            SecretKey(hkdf(GROUP_KEY.material, info)),
        )

    def test_netKnownAnswer(self):
        """
        The NETKEY traffic key is HKDF-SHA-256 of the NETKEY, info C{net},
        length-prefixed sender subnet and border, receiver subnet and
        border, epoch, sender and receiver incarnations; every input
        changes it.
        """
        info = (b"net\x02s1\x02b1\x02s2\x02b2" + b"\x00\x00\x00\x03" + b"\x00\x00\x00\x07"
                + b"\x00\x00\x00\x09")
        args = [PAIR_KEY, "s1", "b1", "s2", "b2", 3, 7, 9]
        key = derive_net_key(*args)
        self.assertEqual(key, SecretKey(hkdf(PAIR_KEY.material, info)))
        variants = [(1, "s2"), (2, "b2"), (3, "s1"), (4, "b1"), (5, 4), (6, 8), (7, 10)]
        for index, value in variants:
            changed = list(args)
            changed[index] = value
            self.assertNotEqual(derive_net_key(*changed), key, (index, value))

    def test_subnetTag(self):
        """
        A subnet's tag is the first 6 bytes of SHA-256 of C{securelan
        subnet\\0} and its name, made a locally administered unicast MAC.
        """
        import hashlib

        digest = bytearray(hashlib.sha256(b"securelan subnet\0lab").digest()[:6])
        digest[0] = (digest[0] & 0xFC) | 0x02
        self.assertEqual(subnet_tag("lab"), bytes(digest))
        self.assertNotEqual(subnet_tag("lab"), subnet_tag("lab2"))

    def test_everyInputMatters(self):
        """
        Each direction, receiver, epoch and incarnation gives its own key;
        so does each sender MAC of the group key.
        """
        keys = [
            derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, BOB, ALICE, 3, 7, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, ALICE, "carol", 3, 7, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, ALICE, BOB, 4, 7, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 8, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION + 1),
            derive_pair_key(GROUP_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION),
            # The length prefixes keep "ab"+"c" apart from "a"+"bc".
            derive_pair_key(PAIR_KEY, "ab", "c", 3, 7, RECEIVER_INCARNATION),
            derive_pair_key(PAIR_KEY, "a", "bc", 3, 7, RECEIVER_INCARNATION),
            derive_group_key(GROUP_KEY, A_MAC, 3, 7),
            derive_group_key(GROUP_KEY, B_MAC, 3, 7),
            derive_group_key(GROUP_KEY, A_MAC, 4, 7),
            derive_group_key(GROUP_KEY, A_MAC, 3, 8),
        ]
        self.assertEqual(len({key.material for key in keys}), len(keys))

    def test_badInputs(self):
        """
        Incarnation 0, numbers outside 32 bits, empty IDs, malformed MACs and
        raw bytes for a key are refused.
        """
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, ALICE, BOB, 3, 0, 1)
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, ALICE, BOB, 3, 1, 0)
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, ALICE, BOB, 2**32, 1, 1)
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, ALICE, BOB, -1, 1, 1)
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, "", BOB, 3, 1, 1)
        self.assertRaises(ValueError, derive_pair_key, PAIR_KEY, "x" * 256, BOB, 3, 1, 1)
        self.assertRaises(TypeError, derive_pair_key, PAIR_KEY.material, ALICE, BOB, 3, 1, 1)
        self.assertRaises(ValueError, derive_group_key, GROUP_KEY, b"\x01" * 5, 3, 1)
        self.assertRaises(ValueError, derive_group_key, GROUP_KEY, A_MAC, 3, 2**32)

    def test_directionsBadInputs(self):
        """
        A Sealer or Opener needs a SecretKey, a known type, a 32-bit epoch
        and a non-zero 32-bit incarnation.
        """
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION)
        for cls in (Sealer, Opener):
            self.assertRaises(TypeError, cls, key.material, TYPE_PAIR, 3, 7)
            self.assertRaises(ValueError, cls, key, 5, 3, 7)
            self.assertRaises(ValueError, cls, key, TYPE_PAIR, 2**32, 7)
            self.assertRaises(ValueError, cls, key, TYPE_PAIR, 3, 0)

    def test_noKeyBytesShown(self):
        """
        Neither a Sealer, an Opener nor a drop shows key bytes.
        """
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, 3, 7, RECEIVER_INCARNATION)
        sealer, opener = Sealer(key, TYPE_PAIR, 3, 7), Opener(key, TYPE_PAIR, 3, 7)
        [datagram] = sealer.seal(frame(), 1500)
        try:
            opener.open(datagram[:-1] + bytes([datagram[-1] ^ 1]))
        except WireError as e:
            error = e
        shown = [repr(sealer), repr(opener), str(error), repr(error)]
        self.assertEqual(shown[0], "<Sealer pair epoch=3 incarnation=7 counter=1>")
        self.assertEqual(shown[1], "<Opener pair epoch=3 incarnation=7 last_counter=0>")
        for text in shown:
            for material in (key.material, PAIR_KEY.material):
                self.assertNotIn(material.hex(), text)
                self.assertNotIn(repr(material), text)


class SealOpenTests(SynchronousTestCase):
    """
    L{Sealer.seal} and L{Opener.open} of whole frames.
    """

    def test_layout(self):
        """
        A datagram is the 32-byte header of the specification (version,
        type, index, count, epoch, incarnation, counter, dst, src), then the
        AES-256-GCM encryption of EtherType and payload under the nonce 4
        zero bytes + counter, with the header as associated data.
        """
        sealer, _ = pair(incarnation=0x01020304, epoch=0x0A0B0C0D)
        sealer.seal(frame(), 1500)
        [datagram] = sealer.seal(frame(), 1500)
        self.assertEqual(
            datagram[:HEADER_LEN],
            bytes([2, 1, 0, 1, 0x0A, 0x0B, 0x0C, 0x0D, 1, 2, 3, 4])
            + (1).to_bytes(8, "big")
            + B_MAC
            + A_MAC,
        )
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, 0x0A0B0C0D, 0x01020304, RECEIVER_INCARNATION)
        nonce = bytes(4) + (1).to_bytes(8, "big")
        self.assertEqual(
            datagram[HEADER_LEN:],
            AESGCM(key.material).encrypt(nonce, b"\x08\x00hello, bob", datagram[:HEADER_LEN]),
        )
        self.assertEqual(len(datagram), OVERHEAD + 2 + len(b"hello, bob"))

    def test_pairRoundTrip(self):
        """
        Bob rebuilds alice's exact frame, a minimal one and a large one.
        """
        sealer, opener = pair()
        reassembler = Reassembler(Clock())
        for sent in (frame(), frame(payload=b""), frame(payload=big_payload(1422))):
            [datagram] = sealer.seal(sent, MTU_DATAGRAM)
            self.assertEqual(receive(opener, reassembler, datagram), sent)
        self.assertEqual(opener.last_counter, 2)

    def test_groupRoundTrip(self):
        """
        A broadcast or multicast frame under the sender's group key comes
        out whole.
        """
        sealer, opener = group()
        reassembler = Reassembler(Clock())
        for dst in (b"\xff" * 6, GROUP_MAC):
            sent = frame(dst=dst, ethertype=b"\x08\x06", payload=b"who has 10.0.0.2?")
            [datagram] = sealer.seal(sent, MTU_DATAGRAM)
            self.assertEqual(parse_header(datagram).type, TYPE_GROUP)
            self.assertEqual(receive(opener, reassembler, datagram), sent)

    def test_acceptsBytesLike(self):
        """
        Frames and datagrams may be bytearrays or memoryviews.
        """
        sealer, opener = pair()
        sent = frame()
        [datagram] = sealer.seal(bytearray(sent), 1500)
        [second] = sealer.seal(memoryview(sent), 1500)
        reassembler = Reassembler(Clock())
        self.assertEqual(receive(opener, reassembler, bytearray(datagram)), sent)
        self.assertEqual(receive(opener, reassembler, memoryview(second)), sent)

    def test_shortFrame(self):
        """
        A frame shorter than an Ethernet header cannot be sealed, and uses
        no counter.
        """
        sealer, _ = pair()
        self.assertRaises(ValueError, sealer.seal, frame()[:13], 1500)
        self.assertEqual(sealer.counter, 0)

    def test_directionsDiffer(self):
        """
        Alice's and bob's directions of one pair key are different keys:
        what alice seals does not open under the key bob sends with.
        """
        sealer, _ = pair()
        bob_sends = Opener(derive_pair_key(PAIR_KEY, BOB, ALICE, EPOCH, 7, RECEIVER_INCARNATION), TYPE_PAIR, EPOCH, 7)
        [datagram] = sealer.seal(frame(), 1500)
        error = self.assertRaises(WireError, bob_sends.open, datagram)
        self.assertEqual(error.reason, "auth")

    def test_thirdPartyFails(self):
        """
        A key derived for another receiver (or another sender MAC of the
        group key) fails authentication.
        """
        sealer, carol = pair(receiver="carol")
        [datagram] = sealer.seal(frame(), 1500)
        self.assertEqual(self.assertRaises(WireError, carol.open, datagram).reason, "auth")
        sealer, other = group(sender_mac=A_MAC, receiver_mac=C_MAC)
        [datagram] = sealer.seal(frame(dst=GROUP_MAC), 1500)
        self.assertEqual(self.assertRaises(WireError, other.open, datagram).reason, "auth")

    def test_headerMustNameTheKey(self):
        """
        An Opener refuses a datagram of another type, epoch or incarnation
        before any decryption, each with its own reason.
        """
        sealer, _ = pair()
        [datagram] = sealer.seal(frame(), 1500)
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, EPOCH, 7, RECEIVER_INCARNATION)
        for opener, reason in [
            (Opener(key, TYPE_GROUP, EPOCH, 7), "type"),
            (Opener(key, TYPE_PAIR, EPOCH + 1, 7), "epoch"),
            (Opener(key, TYPE_PAIR, EPOCH, 8), "incarnation"),
        ]:
            self.assertEqual(self.assertRaises(WireError, opener.open, datagram).reason, reason)
            self.assertEqual(opener.last_counter, 0)

    @HYPOTHESIS
    @given(st.data())
    def test_tamperingFails(self, data):
        """
        Changing any bit of a datagram (header, ciphertext or tag) makes it
        undeliverable; when the changed header still names a key, the same
        key fails authentication, so every header byte is authenticated.
        """
        sealer, opener = pair()
        sent = frame(payload=data.draw(st.binary(max_size=100)))
        [datagram] = sealer.seal(sent, 1500)
        position = data.draw(st.integers(0, len(datagram) - 1))
        mask = data.draw(st.integers(1, 255))
        tampered = bytearray(datagram)
        tampered[position] ^= mask
        tampered = bytes(tampered)
        self.assertRaises(WireError, opener.open, tampered)
        try:
            header = parse_header(tampered)
        except WireError:
            return
        same_key = Opener(
            derive_pair_key(PAIR_KEY, ALICE, BOB, EPOCH, 7, RECEIVER_INCARNATION),
            header.type,
            header.epoch,
            header.incarnation,
        )
        error = self.assertRaises(WireError, same_key.open, tampered, header)
        # A whole frame relabelled as a piece (a count above 1) is refused
        # as one; it would then fail as part of a split frame.
        self.assertEqual(error.reason, "auth" if header.count == 1 else "fragment")
        # The genuine datagram still opens.
        self.assertEqual(opener.open(datagram), sent[12:])

    def test_replayRejected(self):
        """
        A datagram opens once; again, it is a replay.
        """
        sealer, opener = pair()
        [datagram] = sealer.seal(frame(), 1500)
        opener.open(datagram)
        self.assertEqual(self.assertRaises(WireError, opener.open, datagram).reason, "replay")

    def test_forgeryDoesNotMoveTheWindow(self):
        """
        A forged datagram with a fresh counter and a bad tag fails
        authentication and leaves the window alone: the genuine datagram
        with that counter still opens, and so does an old one after a
        forgery far ahead.
        """
        sealer, opener = pair()
        datagrams = [sealer.seal(frame(), 1500)[0] for _ in range(3)]
        opener.open(datagrams[0])
        forged = datagrams[2][:-1] + bytes([datagrams[2][-1] ^ 0x80])
        self.assertEqual(self.assertRaises(WireError, opener.open, forged).reason, "auth")
        far = bytearray(datagrams[1])
        far[12:20] = (10**9).to_bytes(8, "big")
        self.assertEqual(self.assertRaises(WireError, opener.open, bytes(far)).reason, "auth")
        self.assertEqual(opener.last_counter, 0)
        opener.open(datagrams[2])
        opener.open(datagrams[1])
        self.assertEqual(opener.last_counter, 2)

    def test_countersNeverRepeat(self):
        """
        A Sealer gives every datagram, whole or piece, the next counter.
        """
        sealer, _ = pair()
        counters = []
        for size in (10, 3000, 10, 65000, 1400):
            for datagram in sealer.seal(frame(payload=bytes(size)), MTU_DATAGRAM):
                counters.append(parse_header(datagram).counter)
        self.assertEqual(counters, list(range(len(counters))))
        self.assertEqual(sealer.counter, len(counters))

    def test_incarnationsDoNotShareNonces(self):
        """
        Two incarnations of alice with the same pair key, epoch and counter
        encrypt the same frame differently (their keys differ), and each
        opens only under its own incarnation.
        """
        first, first_opener = pair(incarnation=1)
        second, second_opener = pair(incarnation=2)
        [one] = first.seal(frame(), 1500)
        [two] = second.seal(frame(), 1500)
        self.assertEqual(parse_header(one).counter, parse_header(two).counter)
        self.assertNotEqual(one[HEADER_LEN:], two[HEADER_LEN:])
        self.assertEqual(self.assertRaises(WireError, second_opener.open, one).reason,
                         "incarnation")
        self.assertEqual(first_opener.open(one), second_opener.open(two))

    def test_counterExhausted(self):
        """
        The sender seals the counter REJECT_AFTER_MESSAGES - 1 and refuses
        the next; it refuses a fragmented frame whose pieces would reach the
        limit, sealing none of them.
        """
        sealer, opener = pair()
        sealer._counter = REJECT_AFTER_MESSAGES - 1
        [last] = sealer.seal(frame(), 1500)
        self.assertEqual(parse_header(last).counter, REJECT_AFTER_MESSAGES - 1)
        self.assertEqual(opener.open(last), frame()[12:])
        self.assertRaises(CounterExhausted, sealer.seal, frame(), 1500)
        self.assertEqual(sealer.counter, REJECT_AFTER_MESSAGES)

        sealer, _ = pair()
        sealer._counter = REJECT_AFTER_MESSAGES - 2
        self.assertRaises(CounterExhausted, sealer.seal, frame(payload=bytes(3000)), 1500)
        self.assertEqual(sealer.counter, REJECT_AFTER_MESSAGES - 2)
        self.assertEqual(len(sealer.seal(frame(payload=bytes(2000)), 1500)), 2)

    def test_receiverRejectsExhaustedCounter(self):
        """
        An authentic datagram with a counter at or past the limit (which no
        Sealer makes) is dropped as a replay.
        """
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, EPOCH, 7, RECEIVER_INCARNATION)
        opener = Opener(key, TYPE_PAIR, EPOCH, 7)
        for counter in (REJECT_AFTER_MESSAGES, 2**64 - 1):
            header = struct.pack("!BBBBIIQ", 2, 1, 0, 1, EPOCH, 7, counter) + B_MAC + A_MAC
            nonce = bytes(4) + counter.to_bytes(8, "big")
            datagram = header + AESGCM(key.material).encrypt(nonce, b"\x08\x00", header)
            error = self.assertRaises(WireError, opener.open, datagram)
            self.assertEqual(error.reason, "replay")

    @HYPOTHESIS
    @given(st.binary(max_size=200), st.booleans())
    def test_arbitraryBytes(self, datagram, plausible):
        """
        On arbitrary bytes parse_header and open raise nothing but
        WireError (and nothing random authenticates).
        """
        if plausible and len(datagram) >= 32:
            # A header that parses, so open reaches the tag check.
            datagram = (
                struct.pack("!BBBBIIQ", 1, 1, 0, 1, EPOCH, 7, datagram[0]) + datagram[20:]
            )
        _, opener = pair()
        try:
            parse_header(datagram)
        except WireError as e:
            self.assertIn(e.reason, DROP_REASONS)
        error = self.assertRaises(WireError, opener.open, datagram)
        self.assertIn(error.reason, DROP_REASONS)


class ParseHeaderTests(SynchronousTestCase):
    """
    L{parse_header} reads the clear header and refuses malformed ones.
    """

    def datagram(self, version=2, type=1, index=0, count=1, epoch=3, incarnation=7,
                 counter=9, tail=bytes(18)):
        """
        A datagram with these header fields, from B_MAC to A_MAC.
        """
        return (
            struct.pack("!BBBBIIQ", version, type, index, count, epoch, incarnation, counter)
            + B_MAC + A_MAC + tail
        )

    def assertDropped(self, reason, datagram):
        """
        parse_header drops C{datagram} for C{reason}.
        """
        error = self.assertRaises(WireError, parse_header, datagram)
        self.assertEqual(error.reason, reason)
        self.assertEqual(str(error), f"datagram dropped: {reason}")

    def test_fields(self):
        """
        Every field comes out as the specification places it.
        """
        header = parse_header(self.datagram(type=2, index=3, count=5, counter=2**64 - 1))
        self.assertEqual(
            header,
            Header(2, 2, 3, 5, 3, 7, 2**64 - 1, B_MAC, A_MAC),
        )
        self.assertEqual((header.dst, header.src), (B_MAC, A_MAC))

    def test_shortest(self):
        """
        A header and a tag (an empty ciphertext) is the shortest datagram
        of a whole frame; one byte less is short.  A piece of a split frame
        (which carries a part of the one tag, or none) needs one byte after
        its header.
        """
        self.assertEqual(parse_header(self.datagram(tail=bytes(16))).count, 1)
        self.assertDropped("short", self.datagram(tail=bytes(15)))
        self.assertDropped("short", b"")
        self.assertEqual(parse_header(self.datagram(count=2, tail=b"x")).count, 2)
        self.assertDropped("short", self.datagram(count=2, tail=b""))

    def test_version(self):
        """
        Only version 2 is read: version 1 authenticated every piece of a
        split frame on its own.
        """
        for version in (0, 1, 3, 255):
            self.assertDropped("version", self.datagram(version=version))

    def test_type(self):
        """
        Types 1, 2, 3 and 4 are known; others are refused.
        """
        for type in (1, 2, 3, 4):
            self.assertEqual(parse_header(self.datagram(type=type)).type, type)
        for type in (0, 5, 127, 255):
            self.assertDropped("type", self.datagram(type=type))

    def test_fragmentFields(self):
        """
        A count of 0 or above 64, an index not below the count, and a
        counter below the index (the frame would start before counter 0)
        are refused; 64 pieces are fine.
        """
        self.assertEqual(parse_header(self.datagram(index=63, count=64, counter=63)).index, 63)
        self.assertDropped("fragment", self.datagram(count=0))
        self.assertDropped("fragment", self.datagram(count=65))
        self.assertDropped("fragment", self.datagram(index=1, count=1))
        self.assertDropped("fragment", self.datagram(index=5, count=5))
        self.assertDropped("fragment", self.datagram(index=5, count=6, counter=4))

    def test_incarnationZero(self):
        """
        No sender has incarnation 0.
        """
        self.assertDropped("incarnation", self.datagram(incarnation=0))


class FragmentTests(SynchronousTestCase):
    """
    Frames too large for one datagram travel in pieces and are rebuilt by
    L{Reassembler}.
    """

    def setUp(self):
        self.clock = Clock()
        self.sealer, self.opener = pair()
        self.big = frame(payload=big_payload(65536 - 14))

    def test_split(self):
        """
        A 64 KiB frame becomes 46 datagrams of at most the MTU, with indexes
        0 to 45, consecutive counters, the frame's MACs on each; every
        datagram but the last is exactly the maximum size (one UDP GSO send
        takes them).
        """
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        self.assertEqual(len(datagrams), 46)
        headers = [parse_header(d) for d in datagrams]
        self.assertEqual([h.index for h in headers], list(range(46)))
        self.assertEqual({h.count for h in headers}, {46})
        self.assertEqual([h.counter for h in headers], list(range(46)))
        self.assertEqual({(h.dst, h.src) for h in headers}, {(B_MAC, A_MAC)})
        self.assertEqual({len(d) for d in datagrams[:-1]}, {MTU_DATAGRAM})
        self.assertEqual(len(datagrams[-1]), HEADER_LEN + len(self.big) - 12 + TAG_LEN - 45 * 1440)

    def test_splitLayout(self):
        """
        A split frame is one AES-256-GCM message: what follows the headers,
        joined in order, is the encryption of EtherType and payload under
        the nonce of piece 0's counter, with piece 0's header as associated
        data; each later header is piece 0's with its own index and counter.
        """
        self.sealer.seal(frame(), MTU_DATAGRAM)
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        first = datagrams[0][:HEADER_LEN]
        self.assertEqual(parse_header(datagrams[0]).counter, 1)
        for index, datagram in enumerate(datagrams):
            expected = bytearray(first)
            expected[2] = index
            expected[12:20] = (1 + index).to_bytes(8, "big")
            self.assertEqual(datagram[:HEADER_LEN], bytes(expected))
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, EPOCH, 7, RECEIVER_INCARNATION)
        self.assertEqual(
            b"".join(d[HEADER_LEN:] for d in datagrams),
            AESGCM(key.material).encrypt(bytes(4) + (1).to_bytes(8, "big"), self.big[12:], first),
        )

    @HYPOTHESIS
    @given(st.permutations(range(46)))
    def test_anyOrder(self, order):
        """
        The pieces rebuild the exact frame in any order; nothing comes out
        before the last piece.
        """
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        reassembler = Reassembler(self.clock)
        results = [receive(self.opener, reassembler, datagrams[i]) for i in order]
        self.assertEqual(results[:-1], [None] * 45)
        self.assertEqual(results[-1], self.big)
        self.assertEqual((reassembler.completed, reassembler.dropped), (1, 0))
        self.assertEqual((reassembler.in_progress, reassembler.bytes_held), (0, 0))

    def test_smallestPieces(self):
        """
        The smallest datagrams that carry frames (one byte beyond the
        overhead) work: the pieces carry 17 bytes of ciphertext and tag, the
        last one 4.
        """
        sent = frame(payload=b"abc")
        datagrams = self.sealer.seal(sent, OVERHEAD + 1)
        self.assertEqual([len(d) for d in datagrams], [OVERHEAD + 1, HEADER_LEN + 4])
        reassembler = Reassembler(self.clock)
        results = [receive(self.opener, reassembler, d) for d in reversed(datagrams)]
        self.assertEqual(results[-1], sent)

    def test_tooManyPieces(self):
        """
        A frame needing more than 64 pieces, or any piece when the datagram
        has no room beyond the overhead, is refused without using a counter.
        """
        # 64 pieces of 148 bytes carry 64 * 116 bytes: EtherType, payload, tag.
        self.assertEqual(len(self.sealer.seal(frame(payload=bytes(64 * 116 - 18)), 148)), 64)
        before = self.sealer.counter
        self.assertRaises(ValueError, self.sealer.seal, frame(payload=bytes(64 * 116 - 17)), 148)
        self.assertRaises(ValueError, self.sealer.seal, frame(), OVERHEAD)
        self.assertEqual(self.sealer.counter, before)

    def test_lostPiece(self):
        """
        A frame that lost a piece never comes out; at the timeout it is
        dropped and counted, and a late piece does not revive it.
        """
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        reassembler = Reassembler(self.clock, timeout=2.0)
        for datagram in datagrams[:10] + datagrams[11:]:
            self.assertIsNone(receive(self.opener, reassembler, datagram))
        self.assertEqual(reassembler.in_progress, 1)
        self.clock.advance(1.9)
        self.assertEqual(reassembler.expire(), 0)
        self.clock.advance(0.1)
        self.assertEqual(reassembler.expire(), 1)
        self.assertEqual((reassembler.expired, reassembler.dropped), (1, 1))
        self.assertEqual((reassembler.in_progress, reassembler.bytes_held), (0, 0))
        self.assertIsNone(receive(self.opener, reassembler, datagrams[10]))
        self.assertEqual(reassembler.completed, 0)

    def test_expiryOnAdd(self):
        """
        Adding a piece also drops the frames that timed out.
        """
        reassembler = Reassembler(self.clock, timeout=1.0)
        first = self.sealer.seal(self.big, MTU_DATAGRAM)
        receive(self.opener, reassembler, first[0])
        self.clock.advance(1.0)
        second = self.sealer.seal(self.big, MTU_DATAGRAM)
        receive(self.opener, reassembler, second[0])
        self.assertEqual((reassembler.expired, reassembler.in_progress), (1, 1))

    def test_duplicatePieceAndReplayedFrame(self):
        """
        A piece received twice while its frame is in progress is dropped
        ("reassembly") and the frame still comes out once; every piece of
        the frame sent again is a replay, and so is an old one beyond the
        window.
        """
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        reassembler = Reassembler(self.clock)
        receive(self.opener, reassembler, datagrams[3])
        error = self.assertRaises(WireError, receive, self.opener, reassembler, datagrams[3])
        self.assertEqual(error.reason, "reassembly")
        results = [receive(self.opener, reassembler, d) for d in datagrams[:3] + datagrams[4:]]
        self.assertEqual(results[-1], self.big)
        # Pieces of a frame accepted before are refused as they come, by a
        # look at the replay window that does not move it.
        for datagram in datagrams:
            error = self.assertRaises(WireError, receive, self.opener, reassembler, datagram)
            self.assertEqual(error.reason, "replay")
        self.assertEqual(reassembler.in_progress, 0)
        for _ in range(8128 // 46 + 1):
            for datagram in self.sealer.seal(self.big, MTU_DATAGRAM):
                receive(self.opener, reassembler, datagram)
        error = self.assertRaises(WireError, receive, self.opener, reassembler, datagrams[5])
        self.assertEqual(error.reason, "replay")
        # Whole, the old frame is refused after its tag verifies too.
        error = self.assertRaises(WireError, self.opener.open_pieces, parse_header(datagrams[0]),
                                  [d[HEADER_LEN:] for d in datagrams])
        self.assertEqual(error.reason, "replay")

    def test_forgedPieceSpoilsOnlyItsFrame(self):
        """
        One changed byte in any piece fails the whole frame ("auth") when it
        is complete; nothing of it comes out, the replay window does not
        move, and the next frame opens.
        """
        reassembler = Reassembler(self.clock)
        for position in (HEADER_LEN, 700, MTU_DATAGRAM - 1):
            for target in (0, 17, -1):
                datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
                forged = bytearray(datagrams[target])
                forged[min(position, len(forged) - 1)] ^= 1
                datagrams[target] = bytes(forged)
                before = self.opener.last_counter
                for datagram in datagrams[:-1]:
                    self.assertIsNone(receive(self.opener, reassembler, datagram))
                error = self.assertRaises(WireError, receive, self.opener, reassembler, datagrams[-1])
                self.assertEqual((error.reason, error.datagrams), ("auth", len(datagrams)))
                self.assertEqual(self.opener.last_counter, before)
                self.assertEqual(reassembler.in_progress, 0)
        results = [receive(self.opener, reassembler, d) for d in self.sealer.seal(self.big, MTU_DATAGRAM)]
        self.assertEqual(results[-1], self.big)

    def test_piecesMovedOrMixed(self):
        """
        Pieces in the wrong place, or taken from another frame under that
        frame's headers, fail authentication: the headers of a split frame
        cannot be moved to other ciphertext.
        """
        one = self.sealer.seal(self.big, MTU_DATAGRAM)
        two = self.sealer.seal(frame(payload=big_payload(65536 - 14)[::-1]), MTU_DATAGRAM)
        swapped = list(one)
        swapped[4] = one[4][:HEADER_LEN] + one[5][HEADER_LEN:]
        swapped[5] = one[5][:HEADER_LEN] + one[4][HEADER_LEN:]
        mixed = list(one)
        mixed[9] = one[9][:HEADER_LEN] + two[9][HEADER_LEN:]
        for datagrams in (swapped, mixed):
            reassembler = Reassembler(self.clock)
            for datagram in datagrams[:-1]:
                receive(self.opener, reassembler, datagram)
            error = self.assertRaises(WireError, receive, self.opener, reassembler, datagrams[-1])
            self.assertEqual(error.reason, "auth")

    def test_pieceAloneDoesNotOpen(self):
        """
        A piece is not a datagram that opens on its own: L{Opener.open}
        refuses it, and L{Opener.open_pieces} wants all of them.
        """
        datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        header = parse_header(datagrams[0])
        self.assertEqual(self.assertRaises(WireError, self.opener.open, datagrams[0]).reason, "fragment")
        error = self.assertRaises(WireError, self.opener.open_pieces, header,
                                  [d[HEADER_LEN:] for d in datagrams[:-1]])
        self.assertEqual(error.reason, "fragment")
        self.assertEqual(self.opener.open_pieces(parse_header(datagrams[7]), [d[HEADER_LEN:] for d in datagrams]),
                         self.big[12:])

    def test_framesInProgressPerSender(self):
        """
        A sender has at most max_frames_per_sender frames in progress: one
        more evicts its oldest (counted, never delivered), and another
        sender's frames are not touched.
        """
        reassembler = Reassembler(self.clock, max_frames_per_sender=3)
        other_sealer, other_opener = group(sender_mac=C_MAC)
        other = other_sealer.seal(frame(dst=GROUP_MAC, src=C_MAC, payload=bytes(5000)), 1500)
        receive(other_opener, reassembler, other[0])
        frames = [self.sealer.seal(self.big, MTU_DATAGRAM) for _ in range(4)]
        for pieces in frames:
            receive(self.opener, reassembler, pieces[0])
        self.assertEqual((reassembler.in_progress, reassembler.evicted), (4, 1))
        for pieces in frames[1:] + frames[:1]:
            for datagram in pieces[1:]:
                result = receive(self.opener, reassembler, datagram)
            self.assertEqual(result, None if pieces is frames[0] else self.big)
        self.assertEqual(reassembler.completed, 3)
        for datagram in other[1:]:
            result = receive(other_opener, reassembler, datagram)
        self.assertEqual(result, frame(dst=GROUP_MAC, src=C_MAC, payload=bytes(5000)))

    def test_bytesBudget(self):
        """
        Pieces beyond the memory budget evict the oldest frames; a piece
        larger than the whole budget is dropped with reason "limit".
        """
        reassembler = Reassembler(self.clock, max_bytes=5000)
        first = self.sealer.seal(self.big, MTU_DATAGRAM)
        second = self.sealer.seal(self.big, MTU_DATAGRAM)
        for datagram in first[:3]:
            receive(self.opener, reassembler, datagram)
        receive(self.opener, reassembler, second[0])
        self.assertEqual((reassembler.evicted, reassembler.in_progress), (1, 1))
        self.assertLessEqual(reassembler.bytes_held, 5000)
        small = Reassembler(self.clock, max_bytes=100)
        error = self.assertRaises(WireError, receive, self.opener, small, second[1])
        self.assertEqual(error.reason, "limit")

    def test_budgetEvictsTheFrameItself(self):
        """
        When the frame a piece belongs to is the oldest and must go to make
        room, the piece is dropped with it.
        """
        reassembler = Reassembler(self.clock, max_bytes=3000)
        pieces = self.sealer.seal(self.big, MTU_DATAGRAM)
        receive(self.opener, reassembler, pieces[0])
        receive(self.opener, reassembler, pieces[1])
        error = self.assertRaises(WireError, receive, self.opener, reassembler, pieces[2])
        self.assertEqual(error.reason, "limit")
        self.assertEqual((reassembler.evicted, reassembler.in_progress), (1, 0))
        self.assertEqual(reassembler.bytes_held, 0)

    def test_inconsistentPieces(self):
        """
        A piece whose count or destination differs from the frame in
        progress with its identity, or whose index that frame already holds,
        is dropped with reason "reassembly"; the frame is not harmed.
        """
        reassembler = Reassembler(self.clock)
        first = Header(2, TYPE_PAIR, 0, 3, EPOCH, 7, 100, B_MAC, A_MAC)
        self.assertIsNone(reassembler.add(first, b"\x08\x00ab"))
        for bad in (
            first._replace(index=1, counter=101, count=4),
            first._replace(index=1, counter=101, dst=C_MAC),
            first,
        ):
            error = self.assertRaises(WireError, reassembler.add, bad, b"zz")
            self.assertEqual(error.reason, "reassembly")
        self.assertIsNone(reassembler.add(first._replace(index=2, counter=102), b"ef"))
        self.assertEqual(
            reassembler.add(first._replace(index=1, counter=101), b"cd"),
            [b"\x08\x00ab", b"cd", b"ef"],
        )

    def test_framesShorterThanAnEthernetHeader(self):
        """
        An authentic frame without a whole EtherType is dropped with reason
        "reassembly", and so is an authentic datagram of no plaintext.
        """
        whole = Header(2, TYPE_PAIR, 0, 1, EPOCH, 7, 5, B_MAC, A_MAC)
        for plaintext in (b"", b"\x08"):
            error = self.assertRaises(WireError, join_frame, whole, (plaintext,))
            self.assertEqual(error.reason, "reassembly")
        key = derive_pair_key(PAIR_KEY, ALICE, BOB, EPOCH, 7, RECEIVER_INCARNATION)
        header = struct.pack("!BBBBIIQ", 2, 1, 0, 1, EPOCH, 7, 1) + B_MAC + A_MAC
        empty = header + AESGCM(key.material).encrypt(bytes(4) + (1).to_bytes(8, "big"), b"", header)
        error = self.assertRaises(WireError, receive, self.opener, Reassembler(self.clock), empty)
        self.assertEqual(error.reason, "reassembly")

    def test_badBounds(self):
        """
        The bounds must be positive.
        """
        self.assertRaises(ValueError, Reassembler, self.clock, timeout=0)
        self.assertRaises(ValueError, Reassembler, self.clock, max_frames_per_sender=0)
        self.assertRaises(ValueError, Reassembler, self.clock, max_bytes=0)


class TrainTests(SynchronousTestCase):
    """
    A UDP GRO read (L{Train}) that holds a whole split frame gives up its
    ciphertext at once (L{train_ciphertext}), exactly what the reassembler's
    pieces make; anything out of the ordinary gives None, for the
    one-by-one path.
    """

    def setUp(self):
        self.sealer, self.opener = pair()
        self.big = frame(payload=big_payload(60000))
        self.datagrams = self.sealer.seal(self.big, MTU_DATAGRAM)
        self.header = parse_header(self.datagrams[0])

    def train(self, datagrams):
        return Train(b"".join(datagrams), MTU_DATAGRAM)

    def test_iterate(self):
        """
        A train is the datagrams it was made of, however long the last.
        """
        train = self.train(self.datagrams)
        self.assertEqual(len(train), len(self.datagrams))
        self.assertEqual(list(train), self.datagrams)
        self.assertEqual(train.after(40), self.datagrams[40:])
        self.assertEqual(train.after(len(self.datagrams)), [])
        self.assertIn(f"{len(self.datagrams)} datagrams", repr(train))
        self.assertRaises(ValueError, Train, b"x", 0)

    def gathered(self, train, header):
        ciphertext = train_ciphertext(train, header)
        return None if ciphertext is None else bytes(ciphertext)

    def test_whole_frame(self):
        """
        The ciphertext of a train that is one split frame is the
        reassembler's pieces joined, and opens to the frame.
        """
        reassembler = Reassembler(Clock())
        for datagram in self.datagrams:
            expected = reassembler.add(parse_header(datagram), datagram[HEADER_LEN:])
        ciphertext = train_ciphertext(self.train(self.datagrams), self.header)
        self.assertEqual(bytes(ciphertext), b"".join(expected))
        self.assertEqual(bytes(self.opener.open_frame(self.header, ciphertext)), self.big)

    def test_frame_then_more(self):
        """
        A frame whose last piece is a full datagram, followed in the same
        train by more datagrams: its pieces are the first ones.
        """
        datagrams = self.sealer.seal(frame(payload=big_payload(2 * (MTU_DATAGRAM - HEADER_LEN) - TAG_LEN - 2)),
                                     MTU_DATAGRAM)
        self.assertEqual([len(d) for d in datagrams], [MTU_DATAGRAM] * 2)
        more = self.sealer.seal(self.big, MTU_DATAGRAM)
        header = parse_header(datagrams[0])
        train = self.train(datagrams + more)
        self.assertEqual(self.gathered(train, header), b"".join(d[HEADER_LEN:] for d in datagrams))
        self.assertEqual(train.after(header.count), more)

    def test_not_all_there(self):
        """
        A train that lacks the frame's last piece, or begins with another
        piece than piece 0, or a whole frame, gives None.
        """
        self.assertIsNone(self.gathered(self.train(self.datagrams[:-1]), self.header))
        self.assertIsNone(self.gathered(self.train(self.datagrams[:3]), self.header))
        second = parse_header(self.datagrams[1])
        self.assertIsNone(self.gathered(self.train(self.datagrams[1:]), second))
        whole = self.sealer.seal(frame(), MTU_DATAGRAM)
        self.assertIsNone(self.gathered(self.train(whole + self.datagrams), parse_header(whole[0])))
        self.assertIsNone(self.gathered(Train(b"".join(self.datagrams), HEADER_LEN), self.header))
        # Forged pieces whose counters run up to the last one 64 bits hold:
        # the frame's last piece would need one more.
        full = len(self.datagrams) - 1
        base = 2**64 - full
        forged = [d[:12] + (base + index).to_bytes(8, "big") + d[20:] for index, d in enumerate(self.datagrams[:-1])]
        forged.append(self.datagrams[-1])
        self.assertIsNone(self.gathered(self.train(forged), parse_header(forged[0])))

    def test_headers_must_match(self):
        """
        A piece whose header is not the one its place gives it (another
        index, counter, epoch, incarnation, count, MAC, type or version),
        or a piece from another frame in its place, gives None.
        """
        for offset in range(HEADER_LEN):
            for index in (1, len(self.datagrams) // 2, len(self.datagrams) - 1):
                datagrams = list(self.datagrams)
                changed = bytearray(datagrams[index])
                changed[offset] ^= 0x40
                datagrams[index] = bytes(changed)
                self.assertIsNone(self.gathered(self.train(datagrams), self.header), (offset, index))
        other = self.sealer.seal(self.big, MTU_DATAGRAM)
        mixed = self.datagrams[:5] + other[5:]
        self.assertIsNone(self.gathered(self.train(mixed), self.header))

    def test_contents_not_checked(self):
        """
        What follows the headers is not looked at: a changed byte there is
        found by the tag, when the frame is opened.
        """
        datagrams = list(self.datagrams)
        changed = bytearray(datagrams[7])
        changed[-1] ^= 1
        datagrams[7] = bytes(changed)
        ciphertext = train_ciphertext(self.train(datagrams), self.header)
        self.assertEqual(len(ciphertext), sum(len(d) - HEADER_LEN for d in datagrams))
        with self.assertRaises(WireError) as caught:
            self.opener.open_frame(self.header, ciphertext)
        self.assertEqual(caught.exception.reason, "auth")


class SealForCarrierTests(SynchronousTestCase):
    """
    What a carrier sends (L{Sealer.seal_for_carrier}): a split frame's
    pieces laid out in one buffer exactly as L{Sealer.seal} makes them, and
    opened from one buffer by L{Opener.open_frame}.
    """

    def twins(self, counter=0):
        """
        Two sealers of one key and counter, and the opener for them.
        """
        sealer, opener = pair()
        twin, _ = pair()
        sealer._counter = twin._counter = counter
        return sealer, twin, opener

    def test_split_frame_is_one_train(self):
        """
        A super-frame comes as one L{Train} of the datagrams L{Sealer.seal}
        makes, cut at the datagram size; the counter moves on as far.
        """
        sealer, twin, _ = self.twins()
        big = frame(payload=big_payload(60000))
        train = sealer.seal_for_carrier(big, MTU_DATAGRAM)
        self.assertIsInstance(train, Train)
        self.assertEqual(train.segment, MTU_DATAGRAM)
        expected = twin.seal(big, MTU_DATAGRAM)
        self.assertEqual([bytes(d) for d in train], expected)
        self.assertEqual(sealer.counter, twin.counter)
        self.assertEqual(sealer.counter, len(expected))

    def test_whole_frame_is_two_parts(self):
        """
        A frame that fits one datagram comes as its header and the rest.
        """
        sealer, twin, _ = self.twins()
        parts = sealer.seal_for_carrier(frame(), MTU_DATAGRAM)
        self.assertEqual(len(parts), 2)
        self.assertEqual(len(parts[0]), HEADER_LEN)
        self.assertEqual(parts[0] + parts[1], twin.seal(frame(), MTU_DATAGRAM)[0])

    def test_counters_carry(self):
        """
        Every piece's header is the one L{piece_header} gives it, wherever
        the counters run across a byte (or 32-bit) boundary, up to the last
        counter a key may use; the frame opens.
        """
        big = frame(payload=big_payload(65000))
        count = len(pair()[0].seal(big, MTU_DATAGRAM))
        for counter in (0, 250, 2**16 - 7, 2**32 - 3, 2**40 - 1, 2**56 - 20, REJECT_AFTER_MESSAGES - count):
            sealer, twin, opener = self.twins(counter)
            train = sealer.seal_for_carrier(big, MTU_DATAGRAM)
            datagrams = [bytes(d) for d in train]
            self.assertEqual(len(datagrams), count)
            first = parse_header(datagrams[0])
            self.assertEqual(first.counter, counter)
            for index, datagram in enumerate(datagrams):
                self.assertEqual(parse_header(datagram), first._replace(index=index, counter=counter + index))
            self.assertEqual([d[:HEADER_LEN] for d in datagrams], piece_headers(first))
            self.assertEqual(datagrams, twin.seal(big, MTU_DATAGRAM))
            self.assertEqual(bytes(opener.open_frame(first, train_ciphertext(Train(b"".join(datagrams), MTU_DATAGRAM),
                                                                             first))), big)

    def test_header_cache_by_count_only(self):
        """
        What is cached to make and check a split frame's headers depends on
        its piece count alone: trains whose headers name any number of
        other MACs, epochs and incarnations (forged, say) add nothing.
        """
        from securelan.wire import _header_ramp

        sealer, _, _ = self.twins()
        datagrams = sealer.seal(frame(payload=big_payload(20000)), MTU_DATAGRAM)
        header = parse_header(datagrams[0])
        _header_ramp.cache_clear()
        for n in range(300):
            forged = [d[:4] + n.to_bytes(4, "big") + (n + 1).to_bytes(4, "big") + d[12:20] + n.to_bytes(12, "big")
                      + d[32:] for d in datagrams]
            self.assertIsNotNone(train_ciphertext(Train(b"".join(forged), MTU_DATAGRAM), parse_header(forged[0])))
        self.assertEqual(_header_ramp.cache_info().currsize, 1)
        self.assertIsNotNone(train_ciphertext(Train(b"".join(datagrams), MTU_DATAGRAM), header))

    def test_counters_past_64_bits(self):
        """
        The headers of a frame whose counters would not fit 64 bits are not
        made up (a forged piece 0 can name one).
        """
        sealer, _, _ = self.twins()
        header = parse_header(sealer.seal(frame(payload=big_payload(3000)), MTU_DATAGRAM)[0])
        self.assertRaises(ValueError, piece_headers, header._replace(counter=2**64 - 2))
        self.assertEqual(len(piece_headers(header._replace(counter=2**64 - header.count))), header.count)

    def test_open_frame(self):
        """
        L{Opener.open_frame} gives the frame L{join_frame} makes of what
        L{Opener.open_pieces} gives, with and without a virtio-net header,
        and from the pieces joined as from a train.
        """
        vnet = bytes([1, 3, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        for offload in (None, vnet):
            sealer, twin, opener = self.twins()
            _, _, other = self.twins()
            big = frame(payload=big_payload(30000))
            datagrams = sealer.seal(big, MTU_DATAGRAM, offload)
            header = parse_header(datagrams[0])
            pieces = [d[HEADER_LEN:] for d in datagrams]
            opened = opener.open_frame(header, b"".join(pieces))
            self.assertEqual(bytes(opened), (offload or b"") + big)
            self.assertEqual(bytes(opened), join_frame(header, (other.open_pieces(header, pieces),)))

    def test_open_frame_refuses(self):
        """
        A forged frame is refused before the replay window moves, so the
        real one still opens, once; a ciphertext shorter than a tag is not
        authentic; a frame under another key's names is refused.
        """
        sealer, _, opener = self.twins()
        big = frame(payload=big_payload(5000))
        datagrams = sealer.seal(big, MTU_DATAGRAM)
        header = parse_header(datagrams[0])
        ciphertext = b"".join(d[HEADER_LEN:] for d in datagrams)
        forged = bytearray(ciphertext)
        forged[100] ^= 1
        for bad, reason in ((bytes(forged), "auth"), (ciphertext[:TAG_LEN - 1], "auth")):
            with self.assertRaises(WireError) as caught:
                opener.open_frame(header, bad)
            self.assertEqual(caught.exception.reason, reason)
        with self.assertRaises(WireError) as caught:
            opener.open_frame(header._replace(epoch=EPOCH + 1), ciphertext)
        self.assertEqual(caught.exception.reason, "epoch")
        self.assertEqual(bytes(opener.open_frame(header, ciphertext)), big)
        with self.assertRaises(WireError) as caught:
            opener.open_frame(header, ciphertext)
        self.assertEqual(caught.exception.reason, "replay")


class OffloadTests(SynchronousTestCase):
    """
    Frames with TAP offload metadata (a virtio-net header) carry it
    encrypted, flagged in the type byte, and come back with it in front.
    """

    def test_round_trip_whole_and_split(self):
        """
        A small frame and a 64 KiB super-frame with a virtio-net header come
        back as header + frame; the flag is set; the header is not in clear.
        """
        from securelan.wire import FLAG_OFFLOAD

        sealer, opener = pair()
        vnet = bytes([1, 3, 66, 0, 0xA8, 5, 34, 0, 16, 0])
        for payload in (b"small" * 10, big_payload(65536 - 14)):
            f = frame(payload=payload)
            datagrams = sealer.seal(f, MTU_DATAGRAM, offload=vnet)
            reassembler = Reassembler(Clock())
            out = None
            for d in datagrams:
                h = parse_header(d)
                self.assertEqual(h.type, TYPE_PAIR | FLAG_OFFLOAD)
                self.assertNotIn(vnet, d)
                out = open_datagram(opener, reassembler, d, h) or out
            self.assertEqual(out, vnet + f)

    def test_unknown_flags_refused(self):
        """
        Type bytes with flags other than the offload flag are refused.
        """
        sealer, _ = pair()
        d = bytearray(sealer.seal(frame(), MTU_DATAGRAM)[0])
        d[1] |= 0x40
        e = self.assertRaises(WireError, parse_header, bytes(d))
        self.assertEqual(e.reason, "type")

    def test_short_offload_piece_refused(self):
        """
        A flagged frame too short to hold the virtio-net header and an
        EtherType is dropped.
        """
        from securelan.wire import FLAG_OFFLOAD

        sealer, _ = pair()
        h = parse_header(sealer.seal(frame(payload=b""), MTU_DATAGRAM)[0])
        e = self.assertRaises(WireError, join_frame, h._replace(type=TYPE_PAIR | FLAG_OFFLOAD), (b"\x08\x00",))
        self.assertEqual(e.reason, "reassembly")
