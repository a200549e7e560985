"""
Property tests that fuzz securelan's inputs from the network and from disk:
whatever arrives, only the documented error comes out, every datagram is
either delivered or counted as a drop, and what an attacker can make us hold
stays within its bounds.

Most tests are hypothesis properties with a fixed seed
(C{derandomize=True}), sized so the whole file runs in well under a minute
on two cores; a few are deterministic sweeps (every structure byte of a
certificate, every key of the example configurations with a dictionary of
tricky values), which find what the random properties may miss in so few
examples.  Set C{FUZZ_EXAMPLES} in the environment to run every property
with that many examples instead (a longer fuzzing run; see
C{docs/fuzzing.rst}).

The data-plane properties share one in-memory subnet per test method
(building one takes a tenth of a second); each example starts by letting
everything time out (L{PlaneFixture.quiesce}), so a failure replays.

The replay window is fuzzed in C{tests/test_replay.py}; the coverage-guided
harnesses (atheris) are in C{fuzz/fuzz_targets.py}.
"""

import datetime
import os
import re
import struct

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from securelan import PROTOCOL_VERSION, pki
from securelan.addresses import parse_mac
from securelan.agent.dataplane import DataPlane
from securelan.config import ConfigError, Limits, load_agent_config, load_keyserver_config
from securelan.errors import SecurelanError
from securelan.keys import SecretKey
from securelan.protocol import ListPeers, Ping, Register, RequestGroupKey, RequestPairKey
from securelan.records import ROLES
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet, make_pki
from securelan.wire import (
    DROP_REASONS,
    ETHERNET_HEADER_LEN,
    FLAG_OFFLOAD,
    HEADER_LEN,
    MAX_FRAGMENTS,
    OVERHEAD,
    TYPE_CONTROL,
    TYPE_GROUP,
    TYPE_NET,
    TYPE_PAIR,
    VERSION,
    VNET_HDR_LEN,
    Header,
    Opener,
    Reassembler,
    Sealer,
    Train,
    WireError,
    derive_pair_key,
    join_frame,
    parse_header,
    train_ciphertext,
)

_OVERRIDE = int(os.environ.get("FUZZ_EXAMPLES", "0") or 0)


def fuzz(examples: int):
    """
    The hypothesis settings of a property: C{examples} examples, or
    C{$FUZZ_EXAMPLES} when that is set.
    """
    return settings(
        deadline=None,
        derandomize=True,
        database=None,
        max_examples=_OVERRIDE or examples,
        suppress_health_check=list(HealthCheck),
        # Shrink what fails; the (slow) explanation phase is left out.
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    )


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")

MAC_A = parse_mac("02:00:00:00:00:01")
MAC_B = parse_mac("02:00:00:00:00:02")
MAC_C = parse_mac("02:00:00:00:00:03")
BROADCAST = b"\xff" * 6
MULTICAST = parse_mac("01:00:5e:00:00:01")
#: Every frame the tests seal carries it, with a sequence number after it.
MARK = b"FUZZ"

_HEADER = struct.Struct("!BBBBIIQ6s6s")
U8 = st.integers(0, 255)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
MACS = st.one_of(st.sampled_from([MAC_A, MAC_B, MAC_C, BROADCAST, MULTICAST]), st.binary(min_size=6, max_size=6))
#: Every type parse_header takes (the borders' TYPE_NET too).
KNOWN_TYPES = [TYPE_PAIR, TYPE_GROUP, TYPE_CONTROL, TYPE_NET]
TYPE_BYTES = st.one_of(st.sampled_from(KNOWN_TYPES + [t | FLAG_OFFLOAD for t in KNOWN_TYPES]), U8)


def pack_header(fields) -> bytes:
    """
    The 32 header bytes of C{fields} (a L{Header} or a 9-tuple).
    """
    return _HEADER.pack(*fields)


#: A header with any field values (mostly near the valid ones).
ANY_HEADER = st.builds(
    Header,
    version=st.one_of(st.just(VERSION), U8),
    type=TYPE_BYTES,
    index=st.one_of(st.integers(0, 3), U8),
    count=st.one_of(st.integers(1, 4), U8),
    epoch=st.one_of(st.integers(0, 3), U32),
    incarnation=st.one_of(st.integers(0, 3), U32),
    counter=st.one_of(st.integers(0, 100), U64),
    dst=MACS,
    src=MACS,
)

#: Datagrams from nowhere: random bytes, or a random header and body.
ANY_DATAGRAM = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda h, body: pack_header(h) + body, ANY_HEADER, st.binary(max_size=200)),
)


def mutate(data, original: bytes, hot=()) -> bytes:
    """
    Draw a modified copy of C{original}: bits flipped, bytes inserted,
    deleted or overwritten, the end cut off.  Never equal to C{original}.

    @param hot: offsets worth mutating more often than others (the
        headers of a structure).
    """
    out = bytearray(original)
    where = st.one_of(st.integers(0, 15), st.integers(0, 63), st.integers(0, 2**16))
    if hot:
        where = st.one_of(st.sampled_from(sorted(hot)), st.sampled_from(sorted(hot)), where)
    ops = data.draw(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]),
                                       where, st.integers(1, 255)),
                             min_size=1, max_size=4), label="mutations")
    for op, where, value in ops:
        at = where % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= value
        elif op == "insert":
            out[at:at] = bytes([value])
        elif op == "delete" and out:
            del out[at % len(out)]
        elif op == "truncate":
            del out[at % max(1, len(out)):]
        elif op == "set" and out:
            out[at % len(out)] = value
    if bytes(out) == original:
        out.append(0)
    return bytes(out)


def frame_payload(seq: int, extra: bytes) -> bytes:
    return MARK + seq.to_bytes(8, "big") + extra


# Wire -------------------------------------------------------------------------

PAIR_KEY = SecretKey(bytes(range(32)))
EPOCH = 5
INCARNATION = 7


def sealer_and_opener(type=TYPE_PAIR):
    """
    A fresh sending and receiving direction of one traffic key.
    """
    key = derive_pair_key(PAIR_KEY, "alice", "bob", EPOCH, INCARNATION, 3)
    return Sealer(key, type, EPOCH, INCARNATION), Opener(key, type, EPOCH, INCARNATION)


def check_header(case, header):
    """
    What L{parse_header} promises of a header it returns.
    """
    case.assertEqual(header.version, VERSION)
    case.assertIn(header.type & 0x7F, KNOWN_TYPES)
    case.assertEqual(header.type & ~0xFF, 0)
    case.assertTrue(0 < header.count <= MAX_FRAGMENTS)
    case.assertTrue(0 <= header.index < header.count)
    case.assertTrue(header.counter >= header.index)
    case.assertNotEqual(header.incarnation, 0)
    case.assertEqual((len(header.dst), len(header.src)), (6, 6))


class WireFuzzTests(SynchronousTestCase):
    """
    L{securelan.wire} on whatever the network may carry.
    """

    @fuzz(1000)
    @given(datagram=ANY_DATAGRAM, view=st.booleans())
    def test_parse_header(self, datagram, view):
        """
        L{parse_header} of any bytes (or a memoryview of them) either raises
        L{WireError} with a documented reason or returns a header that keeps
        every rule it checks.
        """
        try:
            header = parse_header(memoryview(datagram) if view else datagram)
        except WireError as e:
            self.assertIn(e.reason, DROP_REASONS)
            self.assertIn(e.reason, {"short", "version", "type", "fragment", "incarnation"})
        else:
            self.assertEqual(pack_header(header), bytes(datagram[:HEADER_LEN]))
            check_header(self, header)

    @fuzz(800)
    @given(datagram=ANY_DATAGRAM, counter=U64)
    def test_open_arbitrary(self, datagram, counter):
        """
        L{Opener.open} and L{Opener.open_counter} of any bytes raise only
        L{WireError} (a forgery never opens) and leave the replay window
        where it was.
        """
        _, opener = sealer_and_opener()
        for attempt in (lambda: opener.open(datagram), lambda: opener.open_counter(datagram, counter),
                        lambda: opener.open(memoryview(datagram))):
            e = self.assertRaises(WireError, attempt)
            self.assertIn(e.reason, DROP_REASONS)
        self.assertEqual(opener.last_counter, 0)

    @fuzz(500)
    @given(data=st.data(), payload=st.binary(max_size=400), room=st.integers(8, 200),
           offload=st.one_of(st.none(), st.binary(min_size=VNET_HDR_LEN, max_size=VNET_HDR_LEN)),
           type=st.sampled_from(KNOWN_TYPES), sealed_before=st.integers(0, 3))
    def test_open_mutated(self, data, payload, room, offload, type, sealed_before):
        """
        A valid datagram (a whole frame or one piece of a split frame,
        possibly of an offload frame), modified in any way, never opens:
        only L{WireError}, by L{Opener.open}, by L{Opener.open_counter}
        (with its own counter or the original one), with or without a
        header parsed beforehand, nor in place of the original among its
        frame's pieces (L{Opener.open_pieces}); the original frame still
        opens afterwards, once.
        """
        sealer, opener = sealer_and_opener(type)
        # Frames sealed first, so the datagram's counter is not always 0.
        for _ in range(sealed_before):
            sealer.seal(MAC_B + MAC_A + b"\x08\x00", 1500)
        frame = MAC_B + MAC_A + b"\x08\x00" + payload
        datagrams = sealer.seal(frame, OVERHEAD + room, offload)
        original = data.draw(st.sampled_from(datagrams), label="original")
        modified = mutate(data, original)
        original_counter = parse_header(original).counter
        tries = [lambda: opener.open(modified), lambda: opener.open_counter(modified, original_counter)]
        try:
            header = parse_header(modified)
        except WireError:
            pass
        else:
            tries += [lambda: opener.open(modified, header),
                      lambda: opener.open_counter(modified, header.counter)]
        if len(datagrams) > 1 and modified[HEADER_LEN:] != original[HEADER_LEN:]:
            # (A header alone relabelled to another index of the same frame
            # is not this test's: the reassembler puts a piece where its
            # header says.)
            pieces = [d[HEADER_LEN:] for d in datagrams]
            pieces[datagrams.index(original)] = modified[HEADER_LEN:]
            tries.append(lambda: opener.open_pieces(parse_header(datagrams[0]), pieces))
        for attempt in tries:
            e = self.assertRaises(WireError, attempt)
            self.assertIn(e.reason, DROP_REASONS)
        first = parse_header(datagrams[0])
        if len(datagrams) == 1:
            plaintext = opener.open(original)
            again = lambda: opener.open(original)
        else:
            plaintext = opener.open_pieces(first, [d[HEADER_LEN:] for d in datagrams])
            again = lambda: opener.open_pieces(first, [d[HEADER_LEN:] for d in datagrams])
        self.assertEqual(plaintext, (offload or b"") + frame[12:])
        self.assertEqual(self.assertRaises(WireError, again).reason, "replay")

    @fuzz(400)
    @given(data=st.data(), payload=st.binary(min_size=1, max_size=2000), room=st.integers(40, 400),
           offload=st.one_of(st.none(), st.binary(min_size=VNET_HDR_LEN, max_size=VNET_HDR_LEN)),
           after=st.binary(max_size=100), sealed_before=st.integers(0, 3))
    def test_train_mutated(self, data, payload, room, offload, after, sealed_before):
        """
        A split frame's pieces as one GRO read (a L{Train}), modified in any
        way (headers and all) and followed by anything: L{train_ciphertext}
        gives None or a buffer, L{Opener.open_frame} of it raises only
        L{WireError}; the original (followed by more datagrams, as GRO reads
        them, when its last piece is full-sized) opens, to the frame, once.
        """
        sealer, opener = sealer_and_opener()
        for _ in range(sealed_before):
            sealer.seal(MAC_B + MAC_A + b"\x08\x00", 1500)
        frame = MAC_B + MAC_A + b"\x08\x00" + payload
        datagrams = sealer.seal(frame, HEADER_LEN + room, offload)
        original = b"".join(datagrams)
        hot = {start + offset for start in range(0, len(original), HEADER_LEN + room) for offset in range(HEADER_LEN)}
        modified = mutate(data, original, hot) + after
        try:
            header = parse_header(modified)
        except WireError:
            header = None
        if header is not None:
            ciphertext = train_ciphertext(Train(modified, HEADER_LEN + room), header)
            if ciphertext is not None:
                e = self.assertRaises(WireError, opener.open_frame, header, ciphertext)
                self.assertIn(e.reason, DROP_REASONS)
        first = parse_header(original)
        if len(datagrams) > 1:
            # More datagrams in one GRO read only follow a full-sized one.
            more = after if len(datagrams[-1]) == HEADER_LEN + room else b""
            ciphertext = train_ciphertext(Train(original + more, HEADER_LEN + room), first)
            self.assertEqual(bytes(opener.open_frame(first, ciphertext)), (offload or b"") + frame)
            again = self.assertRaises(WireError, opener.open_frame, first, ciphertext)
            self.assertEqual(again.reason, "replay")

    @fuzz(1000)
    @given(header=st.builds(
        Header, version=st.just(VERSION), type=TYPE_BYTES, index=st.integers(0, MAX_FRAGMENTS - 1),
        count=st.integers(1, MAX_FRAGMENTS), epoch=U32, incarnation=st.integers(1, 2**32 - 1),
        counter=U64, dst=MACS, src=MACS),
           pieces=st.lists(st.binary(max_size=40), min_size=1, max_size=MAX_FRAGMENTS))
    def test_join_frame(self, header, pieces):
        """
        L{join_frame} of any (non-empty) pieces either raises L{WireError}
        C{"reassembly"} or returns the MACs and the pieces, with the
        virtio-net header in front for an offload frame, and never a frame
        shorter than an Ethernet header.
        """
        try:
            frame = join_frame(header, pieces)
        except WireError as e:
            self.assertEqual(e.reason, "reassembly")
            return
        body = b"".join(pieces)
        if header.type & FLAG_OFFLOAD:
            self.assertEqual(frame, body[:VNET_HDR_LEN] + header.dst + header.src + body[VNET_HDR_LEN:])
            self.assertGreaterEqual(len(frame), VNET_HDR_LEN + ETHERNET_HEADER_LEN)
        else:
            self.assertEqual(frame, header.dst + header.src + body)
            self.assertGreaterEqual(len(frame), ETHERNET_HEADER_LEN)


# Reassembly -----------------------------------------------------------------

_SMALL_MACS = st.sampled_from([MAC_A, MAC_B, MAC_C])


@st.composite
def piece_headers(draw):
    """
    A header that passed L{parse_header}, from a small pool of senders,
    keys and counters so that pieces collide.
    """
    count = draw(st.one_of(st.integers(1, 4), st.integers(1, MAX_FRAGMENTS)))
    index = draw(st.integers(0, count - 1))
    base = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1 - index)))
    return Header(1, draw(st.sampled_from(KNOWN_TYPES + [TYPE_PAIR | FLAG_OFFLOAD])), index, count,
                  draw(st.integers(0, 1)), draw(st.integers(1, 2)), base + index,
                  draw(_SMALL_MACS), draw(_SMALL_MACS))


_REASSEMBLY_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("piece"), piece_headers(), st.binary(max_size=300)),
        # All the pieces of one new frame, in some order.
        st.tuples(st.just("frame"), piece_headers(), st.lists(st.binary(max_size=120), min_size=2, max_size=12),
                  st.randoms(use_true_random=False)),
        st.tuples(st.just("advance"), st.floats(0, 3)),
        st.tuples(st.just("expire")),
    ),
    max_size=40,
)


class ReassemblyFuzzTests(SynchronousTestCase):
    """
    L{Reassembler} fed authentic-looking pieces with any header fields.
    """

    def check_bounds(self, reassembler, max_frames, max_bytes):
        self.assertLessEqual(reassembler.bytes_held, max_bytes)
        frames = reassembler._frames
        self.assertEqual(reassembler.bytes_held, sum(f.size for f in frames.values()))
        self.assertEqual(reassembler.in_progress, len(frames))
        self.assertEqual(sum(map(len, reassembler._by_source.values())), len(frames))
        for mine in reassembler._by_source.values():
            self.assertTrue(0 < len(mine) <= max_frames)
        for frame in frames.values():
            self.assertTrue(0 < frame.missing < frame.count)
        for counter in (reassembler.completed, reassembler.expired, reassembler.evicted):
            self.assertGreaterEqual(counter, 0)

    def check_pieces(self, header, pieces):
        if pieces is not None:
            self.assertEqual(len(pieces), header.count)
            self.assertNotIn(None, pieces)

    @fuzz(400)
    @given(ops=_REASSEMBLY_OPS, timeout=st.floats(0.5, 5), max_frames=st.integers(1, 8),
           max_bytes=st.integers(1, 4000))
    def test_add(self, ops, timeout, max_frames, max_bytes):
        """
        L{Reassembler.add} raises only L{WireError} (C{"reassembly"} or
        C{"limit"}), its frames in progress and bytes held stay within its
        bounds whatever the pieces, and all the pieces of a new frame that
        fits the budget, added one after the other, give back exactly those
        pieces in order, on the last piece and not before.
        """
        clock = Clock()
        reassembler = Reassembler(clock, timeout=timeout, max_frames_per_sender=max_frames,
                                  max_bytes=max_bytes)
        next_base = 2**40
        for op in ops:
            if op[0] == "piece":
                _, header, piece = op
                try:
                    self.check_pieces(header, reassembler.add(header, piece))
                except WireError as e:
                    self.assertIn(e.reason, {"reassembly", "limit"})
            elif op[0] == "frame":
                _, template, pieces, rng = op
                pieces = pieces[:MAX_FRAGMENTS]
                count = len(pieces)
                base, next_base = next_base, next_base + count
                headers = [template._replace(index=i, count=count, counter=base + i) for i in range(count)]
                fits = sum(map(len, pieces)) <= max_bytes
                order = list(range(count))
                rng.shuffle(order)
                for n, i in enumerate(order):
                    last = n == count - 1
                    try:
                        frame = reassembler.add(headers[i], pieces[i])
                    except WireError as e:
                        self.assertIn(e.reason, {"reassembly", "limit"})
                        self.assertFalse(fits, e)
                        continue
                    self.check_pieces(headers[i], frame)
                    if not last:
                        self.assertIsNone(frame)
                    elif fits:
                        self.assertEqual(frame, pieces)
            elif op[0] == "advance":
                clock.advance(op[1])
            else:
                self.assertGreaterEqual(reassembler.expire(), 0)
            self.check_bounds(reassembler, max_frames, max_bytes)


# The data plane ---------------------------------------------------------------


class CountingReassembler(Reassembler):
    """
    A L{Reassembler} that counts the pieces it let go of unfinished
    (evicted or expired frames), which the data plane counts per frame.
    """

    lost_pieces = 0

    def _drop(self, key, frame):
        if frame.missing:
            self.lost_pieces += frame.count - frame.missing
        super()._drop(key, frame)

    @property
    def held_pieces(self):
        return sum(f.count - f.missing for f in self._frames.values())


def plane_cap_violations(plane: DataPlane) -> list:
    """
    The bounds of what a data plane holds that it exceeds now (empty when
    all hold).
    """
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    held = plane._held
    check(plane._held_count == sum(map(len, held.values())), "the held count is not the number held")
    check(plane._held_count <= plane.HOLD_TOTAL, "more datagrams held than HOLD_TOTAL")
    check(len(held) <= plane.HOLD_TOTAL, "datagrams held for more senders than HOLD_TOTAL")
    check(all(len(d) <= plane.HOLD_PER_SENDER for d in held.values()), "more held than HOLD_PER_SENDER")
    check(len(plane.pending) <= plane.pending.total, "more frames queued than the queue's total")
    check(len(plane._run) < MAX_FRAGMENTS, "a run longer than a frame")
    reassembler = plane.reassembler
    check(reassembler.bytes_held <= reassembler._max_bytes, "the reassembler holds more than max_bytes")
    check(all(len(mine) <= reassembler._max_frames_per_sender for mine in reassembler._by_source.values()),
          "more frames in progress for a sender than max_frames_per_sender")
    check(len(plane._unknown) <= 4096, "the negative cache is over its size")
    if plane.group is not None:
        check(plane.group.senders <= plane.group.MAX_SENDERS, "more group senders than MAX_SENDERS")
    return problems


class PlaneFixture:
    """
    alice, bob and carol with keys for each other; alice's data plane is
    the one fuzzed, bob's and carol's sending directions make the valid
    datagrams.  Each example starts (L{quiesce}) with alice holding bob's
    key but not carol's, so carol's datagrams wait for a key.  With
    C{sync_keys} false, alice's key requests are answered when L{settle}
    releases them (a later reactor turn, as over a real connection); with
    it true, at once (as L{MemoryKeys} does by default).
    """

    def __init__(self, case, sync_keys=False):
        limits = Limits(idle_timeout=1e12, register_timeout=1e12, requests_per_second=1e9,
                        request_burst=10**9)
        self.subnet = MemorySubnet(case.mktemp(), members=("alice", "bob", "carol"), limits=limits)
        self.lan = MemoryLAN()
        self.alice = MemoryMember(self.subnet, self.lan, "alice", MAC_A, "10.0.0.1")
        self.bob = MemoryMember(self.subnet, self.lan, "bob", MAC_B, "10.0.0.2")
        self.carol = MemoryMember(self.subnet, self.lan, "carol", MAC_C, "10.0.0.3")
        self.alice.send(MAC_B, b"hello")
        self.bob.send(MAC_A, b"hello")
        self.carol.send(MAC_A, b"hello")
        for _ in range(10):
            self.subnet.flush()
            if not self.lan.flush():
                break
        self.plane: DataPlane = self.alice.dataplane
        assert MAC_B in self.plane.peers and MAC_C in self.plane.peers and self.plane.group is not None
        assert MAC_A in self.carol.dataplane.peers
        self.plane.reassembler = CountingReassembler(self.subnet.clock, timeout=2.0, max_frames_per_sender=4,
                                                     max_bytes=6000)
        self.alice.keys.hold = not sync_keys
        self.attempted = []
        device = self.alice.device
        write = device.write

        def recording_write(frame, offload=False):
            self.attempted.append((bytes(frame), bool(offload)))
            return write(frame, offload)

        device.write = recording_write
        #: Frames sealed here (as alice's device gets them) -> datagrams.
        self.count_of = {}
        #: Frames that reached alice's device.
        self.delivered = set()
        #: Frames sealed here -> their identity in the reassembler.
        self.key_of = {}
        #: The reassembler identities of the frames delivered.
        self.delivered_keys = set()
        self.seq = 0

    @property
    def clock(self):
        return self.subnet.clock

    def seal(self, kind, dst, ethertype, extra, max_datagram, offload):
        """
        Seal a new frame with a real sending direction: bob's pair key
        (C{"pair"}) or group key (C{"group"}), or carol's pair key
        (C{"carol"}).
        """
        self.seq += 1
        src = MAC_C if kind == "carol" else MAC_B
        frame = dst + src + ethertype + frame_payload(self.seq, extra)
        if kind == "pair":
            sealer = self.bob.dataplane.peers[MAC_A].sealer
        elif kind == "carol":
            sealer = self.carol.dataplane.peers[MAC_A].sealer
        else:
            sealer = self.bob.dataplane.group.sealer
        datagrams = sealer.seal(frame, max_datagram, offload)
        self.count_of[frame] = len(datagrams)
        first = parse_header(datagrams[0])
        self.key_of[frame] = (first.src, first.type, first.epoch, first.incarnation, first.counter)
        return datagrams

    def settle(self):
        """
        Answer alice's key requests (and what they lead to).
        """
        for _ in range(20):
            if not self.alice.keys.held:
                break
            self.alice.keys.release()
            self.subnet.flush()
        self.lan.queue.clear()

    def quiesce(self):
        """
        Let everything alice holds time out and make sure she has bob's key
        again, so that every example starts from the same state (and a
        failure replays).
        """
        plane = self.plane
        self.alice.device.full = False
        for _ in range(2):
            self.clock.advance(60)
            plane.tick()
            self.settle()
        if MAC_B not in plane.peers:
            plane._request_pair_key(MAC_B)
            self.settle()
        plane.purge("carol")
        assert not plane._run and not plane._held and not plane.reassembler.in_progress
        assert MAC_B in plane.peers and MAC_C not in plane.peers and not plane.pending
        # Nothing sealed before can reach the device any more: forget it
        # all, so that memory stays flat over a long fuzzing run.
        for bookkeeping in (self.count_of, self.key_of, self.delivered, self.delivered_keys):
            bookkeeping.clear()
        del self.attempted[:], self.lan.wire[:], self.alice.device.written[:], self.alice.device.offloads[:]

    def take_delivered(self, start: int) -> int:
        """
        How many datagrams the frames that reached alice's device since
        C{attempted[start]} were made of.

        @raise AssertionError: if one of them is not a frame bob sealed, or
            reached the device before.
        """
        delivered = 0
        for frame, offload in self.attempted[start:]:
            if offload:
                frame = frame[VNET_HDR_LEN:]
            if frame in self.delivered:
                raise AssertionError(f"a frame reached alice's device twice: {frame!r}")
            if frame not in self.count_of:
                raise AssertionError("a frame not sealed in this example (or one delivered before it)"
                                     f" reached alice's device: {frame!r}")
            self.delivered.add(frame)
            self.delivered_keys.add(self.key_of.pop(frame))
            delivered += self.count_of.pop(frame)
        return delivered

    def stale_pieces(self) -> list:
        """
        Frames the reassembler holds pieces of although they were
        delivered already (a piece used twice).
        """
        return [key for key in self.plane.reassembler._frames if key in self.delivered_keys]

    @staticmethod
    def accounted(before, after, delivered) -> int:
        """
        How many datagrams fed between two snapshots are accounted for:
        counted as drops, in delivered frames, or still held somewhere.
        """
        return (after["drops"] - before["drops"] + delivered
                + sum(after[k] - before[k] for k in ("held", "run", "reassembly", "lost")))

    def snapshot(self):
        plane = self.plane
        drops = dict(plane.stats.drops)
        return {
            "drops": sum(drops.values()) - drops.get("device_full", 0),
            "attempted": len(self.attempted),
            "held": plane._held_count,
            "run": len(plane._run),
            "reassembly": plane.reassembler.held_pieces,
            "lost": plane.reassembler.lost_pieces,
        }


#: A header that passes L{parse_header}, with any fields (for alice or
#: not, from bob or from strangers).
VALID_HEADER = st.integers(1, MAX_FRAGMENTS).flatmap(lambda count: st.builds(
    Header, version=st.just(VERSION), type=st.sampled_from([TYPE_PAIR, TYPE_PAIR, TYPE_GROUP, TYPE_CONTROL,
                                                      TYPE_PAIR | FLAG_OFFLOAD]),
    index=st.integers(0, count - 1), count=st.just(count), epoch=st.one_of(st.integers(0, 2), U32),
    incarnation=st.one_of(st.integers(1, 3), st.integers(1, 2**32 - 1)),
    counter=st.integers(MAX_FRAGMENTS, 2**63), dst=st.one_of(st.just(MAC_A), MACS),
    src=st.one_of(st.just(MAC_B), MACS)))

_STRANGER = st.builds(lambda h, body: pack_header(h) + body, VALID_HEADER, st.binary(min_size=16, max_size=120))
# A frame bob really sealed: some of its pieces, maybe modified, maybe twice.
_VALID = st.tuples(st.just("valid"), st.sampled_from(["pair", "pair", "group", "carol"]),
                   st.binary(min_size=2, max_size=2),
                   st.binary(max_size=300), st.one_of(st.just(1472), st.integers(OVERHEAD + 12, 300)),
                   st.one_of(st.none(), st.binary(min_size=VNET_HDR_LEN, max_size=VNET_HDR_LEN)))
_PLANE_ITEMS = {
    "valid": _VALID,
    "stranger": st.tuples(st.just("random"), _STRANGER),
    "random": st.tuples(st.just("random"), ANY_DATAGRAM),
    # A header naming alice and bob's key, or anything, over a random body.
    "forged": st.tuples(st.just("forged"), ANY_HEADER, st.binary(max_size=120), st.booleans()),
}
#: One item of a batch (valid frames most often).
_PLANE_ITEM = st.sampled_from(["valid"] * 4 + ["stranger"] * 2 + ["random", "forged"]).flatmap(_PLANE_ITEMS.get)

_PLANE_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.lists(_PLANE_ITEM, min_size=1, max_size=10)),
        st.tuples(st.just("batch"), st.lists(_PLANE_ITEM, min_size=1, max_size=10)),
        st.tuples(st.just("tick"), st.floats(0, 3)),
        st.tuples(st.just("device_full"), st.booleans()),
        st.tuples(st.just("settle")),
    ),
    min_size=1,
    max_size=8,
)


class DataPlaneFuzzTests(SynchronousTestCase):
    """
    L{DataPlane} receiving any batch of datagrams, and sending any frame.
    """

    def plane(self, sync_keys=False) -> PlaneFixture:
        name = f"_plane_{sync_keys}"
        fixture = getattr(self, name, None)
        if fixture is None:
            fixture = PlaneFixture(self, sync_keys)
            setattr(self, name, fixture)
        return fixture

    def materialize(self, data, net, item, group_dst):
        """
        The datagrams of one batch item.
        """
        kind = item[0]
        if kind == "random":
            return [item[1]]
        if kind == "forged":
            _, header, body, aimed = item
            if aimed:
                # alice's real key with bob, any counter: fails the tag.
                header = header._replace(version=VERSION, type=TYPE_PAIR, dst=MAC_A, src=MAC_B,
                                         epoch=net.bob.dataplane.peers[MAC_A].epoch,
                                         incarnation=net.bob.dataplane.incarnation)
            return [pack_header(header) + body]
        _, which, ethertype, extra, max_datagram, offload = item
        dst = group_dst if which == "group" else MAC_A
        datagrams = net.seal(which, dst, ethertype, extra, max_datagram, offload)
        everything = st.permutations(range(len(datagrams)))
        picks = data.draw(st.one_of(everything, everything, st.lists(st.integers(0, len(datagrams) - 1),
                                                                     min_size=1, max_size=len(datagrams) + 2)),
                          label="pieces")
        out = []
        for i in picks:
            if data.draw(st.integers(0, 5), label="modify?") == 0:
                out.append(mutate(data, datagrams[i]))
            else:
                out.append(datagrams[i])
        return out

    def check_caps(self, plane: DataPlane):
        self.assertEqual(plane_cap_violations(plane), [])

    def run_steps(self, data, steps, sync_keys):
        net = self.plane(sync_keys)
        net.quiesce()
        plane = net.plane
        before = net.snapshot()
        pending_before = len(plane.pending)
        fed = 0
        group_dst = data.draw(st.sampled_from([BROADCAST, MULTICAST]), label="group dst")
        for step in steps:
            if step[0] == "batch":
                batch = []
                for item in step[1]:
                    batch += self.materialize(data, net, item, group_dst)
                if data.draw(st.booleans(), label="interleave?"):
                    data.draw(st.randoms(use_true_random=False), label="order").shuffle(batch)
                source = data.draw(st.sampled_from([("10.0.0.2", 4789), ("10.0.0.9", 999), None]),
                                   label="source")
                fed += len(batch)
                plane.datagrams_received(batch, source)
            elif step[0] == "tick":
                net.clock.advance(step[1])
                plane.tick()
            elif step[0] == "device_full":
                net.alice.device.full = step[1]
            else:
                net.settle()
            self.check_caps(plane)
        net.alice.device.full = False
        net.settle()
        self.check_caps(plane)
        after = net.snapshot()
        delivered = net.take_delivered(before["attempted"])
        accounted = net.accounted(before, after, delivered)
        self.assertEqual(
            accounted, fed,
            f"{fed} datagrams fed, {accounted} accounted for: before {before}, after {after},"
            f" {delivered} in delivered frames, drops {plane.stats.drops}")
        self.assertEqual(net.stale_pieces(), [], "the reassembler holds pieces of frames already delivered")
        # Inbound traffic queues nothing outbound.
        self.assertEqual(len(plane.pending), pending_before)
        self.assertEqual(self.flushLoggedErrors(), [])

    @fuzz(200)
    @given(data=st.data(), steps=_PLANE_STEPS)
    def test_datagrams_received(self, data, steps):
        """
        L{DataPlane.datagrams_received} with any batches (random bytes,
        forged headers, bob's real datagrams in any order, duplicated or
        modified), between ticks of the clock, with key answers arriving
        on a later turn as over a real connection: nothing raises, no
        frame bob did not send and no frame twice reaches the device, every
        datagram is delivered (in a frame), dropped (counted), or still held
        (for a key, in the run being joined, in the reassembler), and all
        those stay within their caps.
        """
        self.run_steps(data, steps, sync_keys=False)

    @fuzz(60)
    @given(data=st.data(), steps=_PLANE_STEPS)
    def test_datagrams_received_synchronous_keys(self, data, steps):
        """
        The same as L{test_datagrams_received}, with a key source that
        answers at once (as L{securelan.testing.MemoryKeys} does, or a
        client whose answer is already there): still every datagram is
        delivered, counted as a drop, or held, and the held count is the
        number of datagrams held.
        """
        self.run_steps(data, steps, sync_keys=True)

    @fuzz(60)
    @given(data=st.data(), first=_PLANE_STEPS, second=_PLANE_STEPS, payload=st.binary(min_size=60, max_size=300),
           max_datagram=st.integers(OVERHEAD + 12, 120), cut=st.integers(0, 63))
    def test_purge_between_batches(self, data, first, second, payload, max_datagram, cut):
        """
        Forgetting bob's key (a purge from the key server) between two
        runs of batches, maybe in the middle of a frame whose first pieces
        came in order, loses no datagram uncounted: one already taken in (a
        piece of a frame being joined, one held) is still delivered,
        counted as a drop, or held.
        """
        net = self.plane(False)
        net.quiesce()
        before = net.snapshot()
        attempted = len(net.attempted)
        fed = self._feed(data, net, first)
        pieces = net.seal("pair", MAC_A, b"\x08\x00", payload, max_datagram, None)
        prefix = pieces[:cut % len(pieces)]
        net.plane.datagrams_received(prefix, ("10.0.0.2", 4789))
        fed += len(prefix)
        net.plane.purge("bob")
        fed += self._feed(data, net, second)
        net.settle()
        after = net.snapshot()
        delivered = net.take_delivered(attempted)
        accounted = net.accounted(before, after, delivered)
        self.assertEqual(accounted, fed, f"before {before}, after {after}, {delivered} delivered")
        self.assertEqual(self.flushLoggedErrors(), [])

    @fuzz(40)
    @given(bob=st.binary(min_size=20, max_size=300), carol=st.binary(min_size=20, max_size=300),
           max_datagram=st.integers(OVERHEAD + 12, 120), merge=st.lists(st.booleans(), max_size=60),
           sync_keys=st.booleans())
    def test_interleaved_senders(self, bob, carol, max_datagram, merge, sync_keys):
        """
        Two frames, one from bob (whose key alice holds) and one from carol
        (whose key alice must ask for), whose pieces all arrive in one read,
        each sender's in order but interleaved: both are delivered, whether
        the key server's answer comes on a later turn or at once, and the
        reassembler keeps no piece of either.
        """
        net = self.plane(sync_keys)
        net.quiesce()
        start = len(net.attempted)
        from_bob = net.seal("pair", MAC_A, b"\x08\x00", bob, max_datagram, None)
        from_carol = net.seal("carol", MAC_A, b"\x08\x00", carol, max_datagram, None)
        batch, queues = [], [list(from_bob), list(from_carol)]
        for pick in merge:
            if queues[pick]:
                batch.append(queues[pick].pop(0))
        batch += queues[0] + queues[1]
        before = net.snapshot()
        net.plane.datagrams_received(batch, ("10.0.0.2", 4789))
        net.settle()
        after = net.snapshot()
        delivered = net.take_delivered(start)
        self.assertEqual(net.accounted(before, after, delivered), len(batch))
        self.assertEqual(delivered, len(batch), f"only {delivered} of {len(batch)} datagrams delivered;"
                         f" before {before}, after {after}")
        self.assertEqual(net.stale_pieces(), [])

    def _feed(self, data, net, steps):
        fed = 0
        for step in steps:
            if step[0] == "batch":
                batch = []
                for item in step[1]:
                    batch += self.materialize(data, net, item, BROADCAST)
                fed += len(batch)
                net.plane.datagrams_received(batch, ("10.0.0.2", 4789))
            elif step[0] == "tick":
                net.clock.advance(step[1])
                net.plane.tick()
            elif step[0] == "settle":
                net.settle()
        return fed

    @fuzz(300)
    @given(frames=st.lists(st.tuples(
        st.one_of(st.sampled_from([MAC_B, MAC_A, MAC_C, BROADCAST, MULTICAST]), st.binary(min_size=6, max_size=6)),
        st.one_of(st.just(MAC_A), st.binary(min_size=6, max_size=6)),
        st.binary(max_size=400),
        st.one_of(st.none(), st.binary(max_size=12)),
        st.sampled_from(["bytes", "bytearray", "memoryview"]),
        st.one_of(st.none(), st.integers(0, 20)),
    ), min_size=1, max_size=8), advance=st.floats(0, 3))
    def test_frame_from_device(self, frames, advance):
        """
        L{DataPlane.frame_from_device} with any frame (runts, other source
        MACs, unknown destinations, group destinations) and any offload
        header never raises; every frame is sent, counted as a drop, or
        waiting for a key within the queue's bounds.
        """
        net = self.plane(True)
        plane = net.plane

        def sent():
            stats = [p.stats for p in plane.peers_by_id.values()] + [plane.group.stats]
            return sum(s.tx_frames for s in stats)

        drops0, sent0, pending0 = sum(plane.stats.drops.values()), sent(), len(plane.pending)
        timeouts0 = plane.pending.dropped["queue_timeout"]
        for dst, src, rest, offload, form, cut in frames:
            frame = (dst + src + rest)[:cut]
            frame = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}[form](frame)
            plane.frame_from_device(frame, offload)
        net.clock.advance(advance)
        plane.tick()
        self.assertLessEqual(len(plane.pending), plane.pending.total)
        for mac in list(plane.pending._queues):
            self.assertLessEqual(plane.pending.depth(mac), plane.pending.per_peer)
        accounted = (sum(plane.stats.drops.values()) - drops0 + sent() - sent0 + len(plane.pending) - pending0
                     + plane.pending.dropped["queue_timeout"] - timeouts0)
        self.assertEqual(accounted, len(frames), dict(plane.stats.drops))
        net.lan.queue.clear()
        self.assertEqual(self.flushLoggedErrors(), [])


# The key server ---------------------------------------------------------------

_TEXT = st.text(max_size=60)
_ENDPOINTS = st.one_of(
    st.sampled_from(["", ":4789", "10.0.0.9:4789", "[::1]:4789", "[::ffff:10.0.0.1]:1", "10.0.0.1:0",
                     "10.0.0.1:65536", "10.0.0.1:99999", "1.2.3.4:5\n", "[fe80::1%eth0]:1", ":", "a:b"]),
    _TEXT)
_MAC_ARGS = st.one_of(st.sampled_from([MAC_A, MAC_B, MAC_C, BROADCAST, b"\0" * 6]), st.binary(max_size=10))
_INTS = st.one_of(st.integers(-3, 3), st.integers(-(2**70), 2**70), st.sampled_from([2**31 - 1, 2**31, 2**63, 2**64]))


def mostly(usual, other):
    """
    C{usual} three times out of four, else C{other}: keeps most requests
    past the first check, so the later ones are reached too.
    """
    return st.integers(0, 3).flatmap(lambda i: usual if i else other)


_UNICAST = st.binary(min_size=6, max_size=6).map(lambda mac: bytes([mac[0] & 0xFE]) + mac[1:])
_COMMANDS = st.one_of(
    st.tuples(st.just(Register), st.fixed_dictionaries(
        {"version": mostly(st.just(PROTOCOL_VERSION), _INTS),
         "mac": mostly(st.one_of(st.just(MAC_A), _UNICAST), _MAC_ARGS),
         "role": mostly(st.just("client"), st.one_of(st.sampled_from(ROLES), _TEXT)),
         "endpoint": mostly(st.sampled_from(["", ":4789", "10.0.0.9:4789", "[::1]:4789"]), _ENDPOINTS)},
        optional={"incarnation": mostly(st.integers(1, 2**31 - 1), _INTS)})),
    st.tuples(st.just(RequestPairKey), st.fixed_dictionaries(
        {"peer_mac": mostly(st.sampled_from([MAC_A, MAC_B, MAC_C]), _MAC_ARGS)},
        optional={"epoch": _INTS})),
    st.tuples(st.just(RequestGroupKey), st.just({})),
    st.tuples(st.just(ListPeers), st.fixed_dictionaries({"after": _TEXT})),
    st.tuples(st.just(Ping), st.just({})),
)

_AMP_KEYS = st.one_of(st.sampled_from([b"_command", b"_ask", b"_answer", b"_error", b"_error_code",
                                       b"_error_description", b"version", b"mac", b"role", b"endpoint",
                                       b"incarnation", b"peer_mac", b"epoch", b"after"]),
                      st.binary(min_size=1, max_size=20))
_AMP_VALUES = st.one_of(st.sampled_from([b"Register", b"RequestPairKey", b"RequestGroupKey", b"ListPeers",
                                         b"Ping", b"PushPairKey", b"StartTLS", b"1", b"0", b"-1", b""]),
                        st.binary(max_size=100), st.binary(max_size=600))
_GARBAGE = st.lists(st.one_of(
    # Raw bytes inside the TLS stream.
    st.tuples(st.just("raw"), st.binary(max_size=300)),
    # Well-framed AMP boxes with any keys and values.
    st.tuples(st.just("box"), st.dictionaries(_AMP_KEYS, _AMP_VALUES, max_size=6)),
    # callRemoteString: a command (known or not) with any string arguments.
    st.tuples(st.just("string"), _AMP_VALUES,
              st.dictionaries(st.sampled_from(["version", "mac", "role", "endpoint", "incarnation", "peer_mac",
                                               "epoch", "after", "x", "_ask", "_command"]),
                              _AMP_VALUES, max_size=5)),
), min_size=1, max_size=4)


class KeyServerFuzzTests(SynchronousTestCase):
    """
    The key server's command handlers over real TLS in memory.
    """

    def setUp(self):
        self.net = MemorySubnet(self.mktemp(), members=("alice", "bob", "carol", "dave"),
                                limits=Limits(idle_timeout=1e12, register_timeout=1e12))
        self.alice, _ = self.net.join("alice", MAC_A)
        self.bob, _ = self.net.join("bob", MAC_B)
        self.dave = None
        self.victim = None
        self.escaped = 0

    def pump(self, conn):
        """
        Move bytes on C{conn} until it is quiet.  An exception out of a
        protocol's C{dataReceived} closes that connection, as the reactor
        does.
        """
        for _ in range(1000):
            try:
                if not conn.pump.pump():
                    return
            except Exception:
                self.escaped += 1
                for side in (conn.server_tls, conn.client_tls):
                    side.transport.abortConnection()

    def call(self, conn, command, **kw):
        outcome = []
        conn.client.callRemote(command, **kw).addBoth(outcome.append)
        self.pump(conn)
        self.assertEqual(len(outcome), 1, f"{command.__name__} was not answered")
        return outcome[0]

    def assertServed(self, conn, who):
        outcome = self.call(conn, Ping)
        self.assertEqual(outcome, {}, f"{who} is no longer served: {outcome}")

    @fuzz(300)
    @given(command=_COMMANDS, registered=st.booleans())
    def test_well_typed_requests(self, command, registered):
        """
        Every command with any values of its declared AMP types, from a
        registered member or from one that has not registered, gets an
        answer or one of the errors of L{securelan.errors}; the connection
        stays open and others are still served.
        """
        self.net.clock.advance(1)  # the rate limit refills
        if registered:
            conn = self.alice
        else:
            if self.dave is None or not self.dave.connected:
                self.dave = self.net.connect("dave")
            conn = self.dave
        self.assertTrue(conn.connected)
        cls, kw = command
        outcome = self.call(conn, cls, **kw)
        if not isinstance(outcome, dict):
            self.assertTrue(outcome.check(SecurelanError),
                            f"{cls.__name__}({kw!r}) failed with an undeclared error: {outcome!r}")
        self.assertTrue(conn.connected, f"{cls.__name__}({kw!r}) closed the connection")
        self.assertServed(self.bob, "bob")
        self.assertEqual(self.escaped, 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    @fuzz(200)
    @given(garbage=_GARBAGE)
    def test_garbage_boxes(self, garbage):
        """
        Raw bytes, boxes with any keys and values and commands with any
        string arguments close at most the connection that sent them: the
        key server goes on serving the other members.
        """
        self.net.clock.advance(2)  # the rate limits refill
        if self.victim is None or not self.victim.connected:
            self.victim, _ = self.net.join("carol", MAC_C)
        victim = self.victim
        for kind, *args in garbage:
            if not victim.connected:
                break
            if kind == "raw":
                victim.client.transport.write(args[0])
            elif kind == "box":
                victim.client.transport.write(amp.AmpBox(args[0]).serialize())
            else:
                command, kw = args
                d = victim.client.callRemoteString(command, True, **kw)
                d.addErrback(lambda f: None)
            self.pump(victim)
        self.assertServed(self.bob, "bob")
        self.assertServed(self.alice, "alice")
        if victim.connected:
            # Whatever state its parser is in now, let the next example
            # start on a fresh connection.
            victim.client_tls.transport.abortConnection()
            self.pump(victim)
        self.flushLoggedErrors()

    def test_still_serving_after_garbage(self):
        """
        After garbage, a new connection registers and is served.
        """
        victim, _ = self.net.join("carol", MAC_C)
        victim.client.transport.write(b"\x00\x05hello\x00\x01x\x00\x00" + b"\xff" * 40)
        self.pump(victim)
        conn, admission = self.net.join("dave", parse_mac("02:00:00:00:00:04"))
        self.assertEqual(admission.member_id, "dave")
        self.assertServed(conn, "dave")
        self.flushLoggedErrors()


# Configuration ------------------------------------------------------------------

_KEYS = {
    "keyserver": ["subnet", "listen", "ca", "certificate", "private_key", "state_dir", "store", "master_key",
                  "pair_key_lifetime"],
    "limits": ["max_connections", "max_members", "max_pair_keys", "max_request_bytes", "requests_per_second",
               "request_burst", "register_timeout", "idle_timeout"],
    "agent": ["role", "ca", "certificate", "private_key", "key_servers", "on_key_miss", "status_socket"],
    "device": ["name", "mac", "mtu", "addresses"],
    "carrier": ["type", "listen", "port", "advertise", "interface", "underlay_mtu"],
    "queue": ["per_peer", "total", "timeout"],
}

#: Strings worth trying in any field (a fuzzing dictionary).
_INTERESTING = [
    "", " ", "~", "~root/x", "~\x00/x", "a\x00b", "\n", "lab", "lab\n", "a\nb", "tcp:7443", "tcp:0", "tcp:abc",
    "ssl:443", "tcp:7443:interface=\\", "unix:/tmp/x", "unix:", "systemd:domain=INET:index=0", "sqlite:",
    "sqlite:///tmp/x", ":memory:", "02:00:00:00:00:01", "03:00:00:00:00:01", "02:00:00:00:00:01\n",
    "0.0.0.0", "::", "fe80::1%eth0", "10.77.0.1/24", "10.77.0.1/33", "name@192.0.2.1:7443", "[::1]:7443",
    "a@b:0", "a@b:99999", "client", "gateway", "queue", "drop", "udp", "ethernet", "slan0", "x" * 20,
]
_SCALARS = st.one_of(
    st.sampled_from(_INTERESTING), st.text(max_size=30), st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 575, 576, 65535, 65536, 2**63 - 1]), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=6)


def _toml_string(text: str) -> str:
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(tables: dict) -> str:
    """
    TOML text for C{tables} (table name -> key -> value; the name ""
    for top-level keys).
    """
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in tables.get("", {}).items()]
    for name, body in tables.items():
        if name == "":
            continue
        lines.append(f"[{_toml_key(name)}]")
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


def _table(name):
    return st.dictionaries(st.one_of(st.sampled_from(_KEYS[name]), st.text(max_size=8)), _VALUES, max_size=8)


_DOCUMENTS = st.fixed_dictionaries({}, optional={
    **{name: _table(name) for name in _KEYS},
    "": st.dictionaries(st.text(max_size=8), _SCALARS, max_size=2),
}).map(toml_document)


_ASSIGNMENT = re.compile(r"^\s*#?\s*[A-Za-z_]+\s*=")
_NEW_KEYS = st.one_of(st.sampled_from(sorted({k for keys in _KEYS.values() for k in keys})),
                      st.sampled_from(["", " ", "a\nb", "a\rb", "x.y", "\x00"]), st.text(max_size=8))
_SOME_VALUE = st.one_of(st.sampled_from(_INTERESTING), _VALUES)


def _mutate_lines(data, text: str) -> str:
    """
    Draw an edited copy of a configuration file: values replaced, keys
    added, commented-out keys enabled, lines deleted, duplicated, swapped
    or garbled.
    """
    lines = text.split("\n")
    for op, where, other in data.draw(st.lists(st.tuples(
            st.sampled_from(["value", "value", "value", "insert", "delete", "duplicate", "swap", "chars"]),
            st.integers(0, 200), st.integers(0, 200)), min_size=1, max_size=4), label="line mutations"):
        assignments = [i for i, line in enumerate(lines) if _ASSIGNMENT.match(line)]
        i, j = where % len(lines), other % len(lines)
        if op == "value" and assignments:
            i = assignments[where % len(assignments)]
            key = lines[i].split("=", 1)[0].lstrip("# ")
            lines[i] = key + "= " + _toml_value(data.draw(_SOME_VALUE, label="value"))
        elif op == "insert":
            key, value = data.draw(_NEW_KEYS, label="key"), data.draw(_SOME_VALUE, label="value")
            lines.insert(i, f"{_toml_key(key)} = {_toml_value(value)}")
        elif op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "chars":
            lines[i] = mutate(data, lines[i].encode()).decode("utf-8", "replace")
    return "\n".join(lines)


def _edit_example(data, which: str) -> str:
    """
    Draw a TOML document made from an example configuration with values
    replaced, keys removed and keys (and tables) added.
    """
    import tomllib

    with open(os.path.join(ETC, f"{which}.toml"), "rb") as f:
        tables = {"": {}, **tomllib.load(f)}
    names = sorted(set(_KEYS) | set(tables))
    for table, key, value, remove in data.draw(st.lists(st.tuples(
            st.one_of(st.sampled_from(names), st.text(max_size=6)), _NEW_KEYS, _SOME_VALUE,
            st.integers(0, 4)), min_size=1, max_size=4), label="edits"):
        body = tables.setdefault(table, {})
        if not isinstance(body, dict):
            continue
        if remove == 0 and body:
            body.pop(sorted(body)[where_index(key, len(body))], None)
            continue
        if key in _KEYS.get(table, ()) or remove > 1 or not body:
            body[key] = value
        else:
            body[sorted(body)[where_index(key, len(body))]] = value
    return toml_document(tables)


def where_index(key: str, n: int) -> int:
    return sum(map(ord, key)) % n


class ConfigFuzzTests(SynchronousTestCase):
    """
    The configuration loaders on any text.
    """

    def load(self, loader, text):
        """
        Load C{text} (str or bytes) as a configuration file; the outcome
        must be a configuration or one C{ConfigError} line naming the file.
        """
        problem = self.problem(loader, text)
        if problem is not None:
            self.fail(problem)

    def problem(self, loader, text):
        """
        What is wrong with loading C{text}, or None.  An undocumented
        exception propagates.
        """
        path = os.path.join(self.directory, "fuzz.toml")
        with open(path, "wb") as f:
            f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        try:
            loader(path)
        except ConfigError as e:
            message = str(e)
            if not message.startswith(path + ": "):
                return f"the message does not start with the file name: {message!r}"
            if "\n" in message or "\r" in message:
                return f"the message is not one line: {message!r}"
        return None

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    @fuzz(300)
    @given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)),
           loader=st.sampled_from([load_keyserver_config, load_agent_config]))
    def test_any_text(self, text, loader):
        """
        Any text (or bytes) raises only L{ConfigError}, in one line that
        names the file.
        """
        self.load(loader, text)

    @fuzz(300)
    @given(text=_DOCUMENTS, loader=st.sampled_from([load_keyserver_config, load_agent_config]))
    def test_any_document(self, text, loader):
        """
        Any valid TOML document (the tables and keys of both configurations,
        and others, with values of every type and a dictionary of tricky
        strings) loads or raises only L{ConfigError}, in one line that names
        the file.
        """
        self.load(loader, text)

    @fuzz(300)
    @given(data=st.data(), which=st.sampled_from(["keyserver", "agent"]))
    def test_edited_examples(self, data, which):
        """
        The example configurations of C{etc/} as TOML data, with values of
        any type (and tricky strings) put in known and unknown keys and
        tables, and keys removed, load or raise only L{ConfigError}, in one
        line that names the file.
        """
        loader = load_keyserver_config if which == "keyserver" else load_agent_config
        self.load(loader, _edit_example(data, which))

    @fuzz(300)
    @given(data=st.data(), which=st.sampled_from(["keyserver", "agent"]))
    def test_mutated_examples(self, data, which):
        """
        The example configurations of C{etc/}, with lines deleted,
        duplicated, swapped, given other values or garbled, load or raise
        only L{ConfigError}, in one line that names the file.
        """
        with open(os.path.join(ETC, f"{which}.toml"), encoding="utf-8") as f:
            text = f.read()
        loader = load_keyserver_config if which == "keyserver" else load_agent_config
        self.load(loader, _mutate_lines(data, text))

    def test_value_sweep(self):
        """
        Every key of both example configurations (and an unknown key in
        every table, with a tricky name), given each value of a dictionary
        of tricky strings and of values of every TOML type, one at a time:
        the file loads or raises only L{ConfigError}, in one line that
        names the file.  (A deterministic sweep, next to the random
        properties above.)
        """
        import tomllib

        values = _INTERESTING + [0, -1, 1, 2**63 - 1, -(2**63), 1.5, float("nan"), float("inf"), True,
                                 [], [""], ["x"], [1], [[]], {}, {"a": 1}]
        found = {}
        for which, loader in (("keyserver", load_keyserver_config), ("agent", load_agent_config)):
            with open(os.path.join(ETC, f"{which}.toml"), "rb") as f:
                base = tomllib.load(f)
            for table in sorted(base):
                for key in _KEYS[table] + ["a\nb", "x"]:
                    for value in values:
                        tables = {name: dict(body) for name, body in base.items()}
                        tables[table][key] = value
                        try:
                            problem = self.problem(loader, toml_document(tables))
                        except Exception as e:
                            problem = f"{type(e).__module__}.{type(e).__qualname__}: {e}"
                        if problem is not None:
                            found.setdefault(problem.split(":")[0], []).append(
                                f"{which}: [{table}] {key!r} = {value!r} -> {problem[:150]}")
        if found:
            self.fail("\n".join(f"{len(cases)} x {kind}, such as:\n    " + "\n    ".join(cases[:3])
                                for kind, cases in sorted(found.items())))

    def test_deep_nesting(self):
        """
        Deeply nested arrays or inline tables (in a file that is otherwise
        a valid configuration) raise only L{ConfigError}.  (Not a
        hypothesis property: where the recursion limit strikes depends on
        the stack depth of the caller.)
        """
        for which, loader in (("keyserver", load_keyserver_config), ("agent", load_agent_config)):
            with open(os.path.join(ETC, f"{which}.toml"), encoding="utf-8") as f:
                text = f.read()
            for depth in (10, 100, 1000, 10000):
                for value in ("[" * depth + "]" * depth, "{a = " * depth + "1" + "}" * depth):
                    self.load(loader, "x = " + value + "\n" + text)


# Certificates -------------------------------------------------------------------

_MEMBER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ASCII = st.text(st.characters(max_codepoint=127), max_size=70)
_SUFFIXES = st.sampled_from(["", "", "", "\n", "\r\n", " ", "\x00", "/", ":", "%0a"])
_MEMBER_URIS = st.builds(lambda v, s: pki.URN_MEMBER + v + s,
                         st.one_of(st.sampled_from(["alice", "bob", "a" * 63, "a" * 64, "-x", ".x", "@group", ""]),
                                   st.from_regex(_MEMBER_ID, fullmatch=True), _ASCII), _SUFFIXES)
_URIS = st.one_of(
    _MEMBER_URIS,
    st.builds(lambda v, s: pki.URN_MAC + v + s,
              st.one_of(st.sampled_from(["02:00:00:00:00:01", "02-00-00-00-00-01", "ff:ff:ff:ff:ff:ff",
                                         "02:00:00:00:00", "02:00:00:00:00:01:02", "zz:00:00:00:00:01"]),
                        _ASCII), _SUFFIXES),
    st.builds(lambda v, s: pki.URN_ROLE + v + s, st.one_of(st.sampled_from(list(ROLES)), _ASCII), _SUFFIXES),
    st.sampled_from([pki.URN_SUBNET + "test", "https://example.org/", "urn:securelan:", "urn:securelan:member",
                     "URN:SECURELAN:MEMBER:alice"]),
    _ASCII,
)


def der_elements(der: bytes, start=0, end=None, out=None) -> list:
    """
    Every element of a DER structure as C{(offset, tag, content offset,
    content length)}, nested ones included (and the DER inside OCTET
    STRINGs, as extension values hold).

    @raise ValueError: if C{der[start:end]} is not DER.
    """
    out = [] if out is None else out
    end = len(der) if end is None else end
    i = start
    while i + 1 < end:
        tag, length, header = der[i], der[i + 1], 2
        if length & 0x80:
            n = length & 0x7F
            length, header = int.from_bytes(der[i + 2:i + 2 + n], "big"), 2 + n
        content = i + header
        if content + length > end:
            raise ValueError("not DER")
        out.append((i, tag, content, length))
        if tag & 0x20:
            der_elements(der, content, content + length, out)
        elif tag == 0x04 and length:
            try:
                inner = der_elements(der, content, content + length, [])
            except ValueError:
                pass
            else:
                out += inner
        i = content + length
    if i != end:
        raise ValueError("not DER")
    return out


def der_offsets(der: bytes) -> set:
    """
    The offsets of the tag and length bytes of every element of a DER
    structure, and of the first content byte of every primitive one: where
    a mutation reaches the parser's decisions.
    """
    out = set()
    for offset, tag, content, length in der_elements(der):
        out.update((offset, offset + 1))
        if not tag & 0x20 and length:
            out.add(content)
    return out


class CertificateFuzzTests(SynchronousTestCase):
    """
    Reading certificates: L{pki.member_identity}, L{pki.load_certificate}.
    """

    _key = None

    @classmethod
    def signing_key(cls):
        if cls._key is None:
            cls._key = ec.generate_private_key(ec.SECP256R1())
        return cls._key

    def member_certificate(self):
        if getattr(self, "_member_der", None) is None:
            members = make_pki(os.path.abspath(self.mktemp()), members=("alice",))
            with open(members.members["alice"][0], "rb") as f:
                pem = f.read()
            self._member_der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        return self._member_der

    def build(self, uris, eku, serial):
        key = self.signing_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(serial).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        cert = builder.sign(key, hashes.SHA256())
        # As the TLS layer hands it over: parsed from DER.
        return x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER))

    @fuzz(300)
    @given(uris=st.tuples(_MEMBER_URIS, st.lists(_URIS, max_size=5), st.randoms(use_true_random=False)).map(
               lambda t: t[2].sample([t[0], *t[1]], len(t[1]) + 1)),
           eku=st.one_of(st.just([ExtendedKeyUsageOID.CLIENT_AUTH]), st.none(),
                         st.just([ExtendedKeyUsageOID.SERVER_AUTH]),
                         st.just([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])),
           serial=st.integers(1, 2**159 - 1))
    def test_member_identity(self, uris, eku, serial):
        """
        L{pki.member_identity} of a certificate with any URI names (valid
        and invalid member, MAC and role URNs, others) raises only
        L{pki.CertificateError}, in one line; an identity it returns keeps
        the documented rules (one member ID of the documented form, 6-byte
        MACs, known roles), taken from the certificate's URNs.
        """
        cert = self.build(uris, eku, serial)
        try:
            identity = pki.member_identity(cert)
        except pki.CertificateError as e:
            self.assertNotIn("\n", str(e))
            return
        members = [u[len(pki.URN_MEMBER):] for u in uris if u.startswith(pki.URN_MEMBER)]
        self.assertEqual(members, [identity.member_id])
        self.assertTrue(_MEMBER_ID.fullmatch(identity.member_id),
                        f"member ID {identity.member_id!r} is not of the documented form")
        for mac in identity.macs:
            self.assertEqual(len(mac), 6)
        self.assertTrue(identity.roles)
        self.assertLessEqual(identity.roles, set(ROLES))
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, eku)

    def test_member_id_sweep(self):
        """
        A member URN whose ID is valid but for one character (every ASCII
        character, in front, inside, at the end) gives either
        L{pki.CertificateError} or an identity whose member ID has the
        documented form.  (A deterministic sweep, next to the random
        property above.)
        """
        wrong = []
        for ch in map(chr, range(128)):
            for member_id in ("alice" + ch, ch + "alice", "al" + ch + "ice"):
                cert = self.build([pki.URN_MEMBER + member_id], [ExtendedKeyUsageOID.CLIENT_AUTH], 1)
                try:
                    identity = pki.member_identity(cert)
                except pki.CertificateError:
                    continue
                if not _MEMBER_ID.fullmatch(identity.member_id):
                    wrong.append(identity.member_id)
        self.assertEqual(wrong, [], "member IDs not of the documented form were accepted")

    @fuzz(300)
    @given(data=st.one_of(
        st.binary(max_size=400),
        st.builds(lambda body: b"-----BEGIN CERTIFICATE-----\n" + body + b"\n-----END CERTIFICATE-----\n",
                  st.binary(max_size=300)),
    ))
    def test_load_certificate_random(self, data):
        """
        L{pki.load_certificate} of any bytes raises only L{pki.PKIError}
        (a certificate made of random bytes being out of reach).
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(data)
        self.assertRaises(pki.PKIError, pki.load_certificate, path)

    def mutated_pem(self, data):
        import base64

        der = self.member_certificate()
        mutated = mutate(data, der, der_offsets(der))
        body = base64.encodebytes(mutated)
        return b"-----BEGIN CERTIFICATE-----\n" + body + b"-----END CERTIFICATE-----\n"

    @fuzz(400)
    @given(data=st.data())
    def test_load_certificate_mutated(self, data):
        """
        L{pki.load_certificate} of a member certificate with bytes flipped,
        inserted, deleted or cut off returns a certificate or raises only
        L{pki.PKIError}.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(self.mutated_pem(data))
        try:
            pki.load_certificate(path)
        except pki.PKIError as e:
            self.assertNotIn("\n", str(e))

    @fuzz(400)
    @given(data=st.data())
    def test_member_identity_mutated(self, data):
        """
        L{pki.member_identity} of a mutated member certificate that still
        loads raises only L{pki.CertificateError}.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(self.mutated_pem(data))
        try:
            cert = pki.load_certificate(path)
        except Exception:
            return  # test_load_certificate_mutated's business
        try:
            pki.member_identity(cert)
        except pki.CertificateError:
            pass

    def test_certificate_byte_sweep(self):
        """
        One byte of a member certificate changed at a time, over its whole
        structure (and the DER inside its extensions): every tag, length
        and first content byte flipped, cleared or set, every tag made
        each common universal tag, and the last byte of every OID made the
        last byte of each other OID in it (duplicate and swapped
        extensions and name attributes).  L{pki.load_certificate} returns a
        certificate or raises only L{pki.PKIError}, and
        L{pki.member_identity} of what loads raises only
        L{pki.CertificateError}.  (A deterministic sweep, next to the
        random mutations above.)
        """
        import base64

        der = self.member_certificate()
        elements = der_elements(der)
        changes = set()
        for offset in der_offsets(der):
            byte = der[offset]
            changes.update((offset, new) for new in (byte ^ 0x01, byte ^ 0x80, 0x00, 0xFF))
        for offset, tag, content, length in elements:
            changes.update((offset, new) for new in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x17,
                                                     0x30, 0x31, 0xA0, 0xA3))
        oid_ends = [content + length - 1 for offset, tag, content, length in elements if tag == 0x06 and length]
        for end in oid_ends:
            changes.update((end, der[other]) for other in oid_ends)
        path = os.path.abspath(self.mktemp())
        escaped = {}
        for offset, new in sorted(changes):
            if der[offset] == new:
                continue
            mutated = bytearray(der)
            mutated[offset] = new
            with open(path, "wb") as f:
                f.write(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(mutated))
                        + b"-----END CERTIFICATE-----\n")
            stage = "load_certificate"
            try:
                cert = pki.load_certificate(path)
                stage = "member_identity"
                pki.member_identity(cert)
            except pki.PKIError as e:
                if stage == "member_identity":
                    self.assertIsInstance(e, pki.CertificateError)
            except Exception as e:
                escaped.setdefault(f"{stage}: {type(e).__module__}.{type(e).__qualname__}", []).append(
                    (offset, der[offset], new, str(e)[:100]))
        if escaped:
            self.fail("undocumented exceptions, by type: how many, then (offset, byte, changed to, message)"
                      " of the first three:\n" + "\n".join(
                          f"{name}: {len(cases)}: {cases[:3]}" for name, cases in sorted(escaped.items())))
