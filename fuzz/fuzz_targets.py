"""
Coverage-guided fuzzing harnesses for securelan (atheris, libFuzzer).

Run one target at a time::

    python fuzz/fuzz_targets.py TARGET [libFuzzer arguments] [CORPUS_DIR ...]

TARGET is one of:

    wire         parse_header, Opener.open / open_counter on any datagram,
                 and on a valid datagram the input modifies
    reassembly   Reassembler.add with any headers and
                 pieces, the clock moving; join_frame
    dataplane    DataPlane.datagrams_received with any batch (bob's real
                 datagrams, modified or not, random headers, random bytes)
                 and frame_from_device with any frame
    config       load_keyserver_config and load_agent_config on any file
    certificate  pki.load_certificate on any file, pki.member_identity on
                 what loads

Each target checks the same properties as C{tests/test_fuzz.py}: only the
documented error comes out, every datagram is delivered or counted, bounds
hold.  A violation raises, and libFuzzer stops and writes the input that
caused it (C{crash-*}).  With C{SECURELAN_FUZZ_KEEP_GOING=1} a violation is
reported once per kind (exception type and place), its input saved under
C{$SECURELAN_FUZZ_FINDINGS} (default C{./fuzz-findings}), and fuzzing goes
on: use that to survey a target with known bugs.

Without a corpus directory, the target starts from a fresh temporary one
seeded with valid inputs (the example configurations, a member
certificate, valid datagrams).  See C{fuzz/README.rst}.
"""

import base64
import os
import sys
import tempfile
import traceback

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

with atheris.instrument_imports(include=["securelan"]):
    from securelan import pki
    from securelan.config import ConfigError, load_agent_config, load_keyserver_config
    from securelan.keys import SecretKey
    from securelan.wire import (
        DROP_REASONS,
        FLAG_OFFLOAD,
        HEADER_LEN,
        MAX_FRAGMENTS,
        OVERHEAD,
        TYPE_GROUP,
        TYPE_PAIR,
        VNET_HDR_LEN,
        Header,
        Opener,
        Reassembler,
        Sealer,
        WireError,
        derive_pair_key,
        join_frame,
        parse_header,
    )
    # The data plane, the key server and their helpers, instrumented too.
    import securelan.agent.dataplane  # noqa: F401
    import securelan.keyserver.server  # noqa: F401
    import securelan.testing  # noqa: F401
    from tests.test_fuzz import (BROADCAST, KNOWN_TYPES, MAC_A, MAC_B, PlaneFixture, pack_header,
                                 plane_cap_violations)

KEEP_GOING = os.environ.get("SECURELAN_FUZZ_KEEP_GOING") == "1"
FINDINGS = os.environ.get("SECURELAN_FUZZ_FINDINGS", "fuzz-findings")
_seen = set()


def report(data: bytes):
    """
    A property failed on C{data} (the exception being handled): raise it
    again, or (keep-going mode) record its kind once and go on.
    """
    if not KEEP_GOING:
        raise
    exc_type, exc, tb = sys.exc_info()
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/securelan/" in f.filename] or frames
    where = f"{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno}"
    kind = (exc_type.__name__, where, str(exc).split(":")[0][:60] if exc_type is AssertionError else "")
    if kind in _seen:
        return
    _seen.add(kind)
    os.makedirs(FINDINGS, exist_ok=True)
    name = os.path.join(FINDINGS, f"{TARGET}-{len(_seen)}.bin")
    with open(name, "wb") as f:
        f.write(data)
    sys.stderr.write(f"\n=== finding {len(_seen)} ({TARGET}): {exc_type.__name__} at {where}: "
                     f"{str(exc)[:300]!r}\n    input saved as {name}\n")
    sys.stderr.flush()


def mutate_with(fdp, original: bytes) -> bytes:
    """
    Modify C{original} as the input says (at least one change).
    """
    out = bytearray(original)
    for _ in range(1 + fdp.ConsumeIntInRange(0, 3)):
        op = fdp.ConsumeIntInRange(0, 3)
        at = fdp.ConsumeIntInRange(0, max(0, len(out) - 1))
        value = fdp.ConsumeIntInRange(1, 255)
        if op == 0 and out:
            out[at] ^= value
        elif op == 1:
            out[at:at] = bytes([value])
        elif op == 2 and out:
            del out[at]
        else:
            del out[at:]
    if bytes(out) == original:
        out.append(0)
    return bytes(out)


# wire ---------------------------------------------------------------------------

_PAIR_KEY = SecretKey(bytes(range(32)))
_TRAFFIC_KEY = derive_pair_key(_PAIR_KEY, "alice", "bob", 5, 7, 3)


def fuzz_wire(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    try:
        mode = fdp.ConsumeIntInRange(0, 1)
        opener = Opener(_TRAFFIC_KEY, TYPE_PAIR, 5, 7)
        if mode == 0:
            counter = fdp.ConsumeIntInRange(0, 2**64 - 1)
            datagram = fdp.ConsumeBytes(fdp.remaining_bytes())
            try:
                header = parse_header(datagram)
            except WireError as e:
                assert e.reason in DROP_REASONS, e.reason
            else:
                assert header.version == 2 and 0 < header.count <= MAX_FRAGMENTS
                assert header.index < header.count and header.counter >= header.index
                assert header.incarnation and header.type & 0x7F in KNOWN_TYPES
            for attempt in (lambda: opener.open(datagram), lambda: opener.open_counter(datagram, counter)):
                try:
                    attempt()
                except WireError as e:
                    assert e.reason in DROP_REASONS, e.reason
                else:
                    raise AssertionError("a datagram from nowhere opened")
        else:
            sealer = Sealer(_TRAFFIC_KEY, TYPE_PAIR, 5, 7)
            room = fdp.ConsumeIntInRange(8, 200)
            offload = fdp.ConsumeBytes(VNET_HDR_LEN) if fdp.ConsumeBool() else None
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
            datagrams = sealer.seal(b"\2\0\0\0\0\2\2\0\0\0\0\1\x08\x00" + payload, OVERHEAD + room,
                                    offload if offload and len(offload) == VNET_HDR_LEN else None)
            original = datagrams[fdp.ConsumeIntInRange(0, len(datagrams) - 1)]
            modified = mutate_with(fdp, original)
            attempts = [lambda: opener.open(modified),
                        lambda: opener.open_counter(modified, parse_header(original).counter)]
            pieces = [d[HEADER_LEN:] for d in datagrams]
            if len(datagrams) > 1 and modified[HEADER_LEN:] != original[HEADER_LEN:]:
                # The modified piece in place of the original, among the others.
                spoilt = list(pieces)
                spoilt[datagrams.index(original)] = modified[HEADER_LEN:]
                attempts.append(lambda: opener.open_pieces(parse_header(datagrams[0]), spoilt))
            for attempt in attempts:
                try:
                    attempt()
                except WireError as e:
                    assert e.reason in DROP_REASONS, e.reason
                else:
                    raise AssertionError("a modified datagram opened")
            if len(datagrams) == 1:
                opener.open(original)
            else:
                opener.open_pieces(parse_header(datagrams[0]), pieces)
    except Exception:
        report(data)


# reassembly -----------------------------------------------------------------------


class _Clock:
    def __init__(self):
        self.now = 0.0

    def seconds(self):
        return self.now


_MACS = (b"\2\0\0\0\0\1", b"\2\0\0\0\0\2", b"\2\0\0\0\0\3")


def fuzz_reassembly(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    try:
        clock = _Clock()
        max_frames = fdp.ConsumeIntInRange(1, 8)
        max_bytes = fdp.ConsumeIntInRange(1, 4000)
        reassembler = Reassembler(clock, timeout=fdp.ConsumeIntInRange(1, 50) / 10,
                                  max_frames_per_sender=max_frames, max_bytes=max_bytes)
        while fdp.remaining_bytes():
            op = fdp.ConsumeIntInRange(0, 7)
            if op == 6:
                clock.now += fdp.ConsumeIntInRange(0, 30) / 10
                continue
            if op == 7:
                reassembler.expire()
                continue
            count = fdp.ConsumeIntInRange(1, 4 if op < 4 else MAX_FRAGMENTS)
            index = fdp.ConsumeIntInRange(0, count - 1)
            base = fdp.ConsumeIntInRange(0, 8)
            header = Header(2, (TYPE_PAIR, TYPE_GROUP, TYPE_PAIR | FLAG_OFFLOAD)[fdp.ConsumeIntInRange(0, 2)],
                            index, count, fdp.ConsumeIntInRange(0, 1), fdp.ConsumeIntInRange(1, 2), base + index,
                            _MACS[fdp.ConsumeIntInRange(0, 2)], _MACS[fdp.ConsumeIntInRange(0, 2)])
            piece = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
            try:
                pieces = reassembler.add(header, piece)
            except WireError as e:
                assert e.reason in ("reassembly", "limit"), e.reason
            else:
                if pieces is not None:
                    assert len(pieces) == count and None not in pieces, "an incomplete frame came out"
            assert reassembler.bytes_held <= max_bytes, "over the byte budget"
            assert reassembler.bytes_held == sum(f.size for f in reassembler._frames.values())
            assert all(len(m) <= max_frames for m in reassembler._by_source.values()), "over the frame cap"
            if op == 5:
                pieces = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)) for _ in range(count)]
                try:
                    join_frame(header, pieces)
                except WireError as e:
                    assert e.reason == "reassembly", e.reason
    except Exception:
        report(data)


# dataplane ------------------------------------------------------------------------

_plane = None


def _plane_fixture():
    global _plane
    if _plane is None:
        class Case:
            def mktemp(self):
                return tempfile.mkdtemp(prefix="securelan-fuzz-")

        _plane = PlaneFixture(Case(), sync_keys=False)
    return _plane


def _drops(plane):
    drops = plane.stats.drops
    return sum(drops.values()) - drops.get("device_full", 0)


def fuzz_dataplane(data: bytes):
    net = _plane_fixture()
    fdp = atheris.FuzzedDataProvider(data)
    try:
        net.quiesce()
        plane = net.plane
        before = net.snapshot()
        fed = outbound = 0
        while fdp.remaining_bytes():
            step = fdp.ConsumeIntInRange(0, 9)
            if step == 8:
                net.clock.advance(fdp.ConsumeIntInRange(0, 30) / 10)
                plane.tick()
                continue
            if step == 9:
                net.settle()
                continue
            batch = []
            for _ in range(fdp.ConsumeIntInRange(1, 6)):
                kind = fdp.ConsumeIntInRange(0, 5)
                if kind <= 2:
                    which = "group" if kind == 2 else "pair"
                    max_datagram = 1472 if fdp.ConsumeBool() else fdp.ConsumeIntInRange(OVERHEAD + 12, 300)
                    offload = fdp.ConsumeBytes(VNET_HDR_LEN) if fdp.ConsumeBool() else None
                    datagrams = net.seal(which, MAC_A if which == "pair" else BROADCAST,
                                         fdp.ConsumeBytes(2).ljust(2, b"\0"),
                                         fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)), max_datagram,
                                         offload if offload and len(offload) == VNET_HDR_LEN else None)
                    for _ in range(fdp.ConsumeIntInRange(0, len(datagrams) + 1)):
                        datagram = datagrams[fdp.ConsumeIntInRange(0, len(datagrams) - 1)]
                        batch.append(mutate_with(fdp, datagram) if fdp.ConsumeIntInRange(0, 5) == 0 else datagram)
                elif kind == 3:
                    header = Header(1, fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 3),
                                    fdp.ConsumeIntInRange(1, 4), fdp.ConsumeIntInRange(0, 2),
                                    fdp.ConsumeIntInRange(1, 3), fdp.ConsumeIntInRange(0, 2**63),
                                    MAC_A if fdp.ConsumeBool() else fdp.ConsumeBytes(6).ljust(6, b"\2"),
                                    MAC_B if fdp.ConsumeBool() else fdp.ConsumeBytes(6).ljust(6, b"\2"))
                    batch.append(pack_header(header) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(16, 120)))
                elif kind == 4:
                    batch.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)))
                else:
                    # A frame from the host, to bob or to a group (whose
                    # keys alice has: any drop is counted at once).
                    dst = (MAC_B, BROADCAST, bytes([fdp.ConsumeIntInRange(0, 255) | 1]) + fdp.ConsumeBytes(5))
                    frame = dst[fdp.ConsumeIntInRange(0, 2)] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
                    if fdp.ConsumeBool():
                        frame = frame[:6] + MAC_A + frame[6:]
                    drops = _drops(plane)
                    plane.frame_from_device(frame, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
                                            if fdp.ConsumeBool() else None)
                    outbound += _drops(plane) - drops
                    net.lan.queue.clear()
            source = (("10.0.0.2", 4789), ("10.0.0.9", 999), None)[fdp.ConsumeIntInRange(0, 2)]
            fed += len(batch)
            plane.datagrams_received(batch, source)
            problems = plane_cap_violations(plane)
            assert not problems, problems
        net.alice.device.full = False
        net.settle()
        after = net.snapshot()
        delivered = net.take_delivered(before["attempted"])
        accounted = net.accounted(before, after, delivered) - outbound
        assert accounted == fed, f"{fed} datagrams fed, {accounted} accounted for: {before} -> {after}"
    except Exception:
        report(data)


# config -------------------------------------------------------------------------------

_config_dir = None


def fuzz_config(data: bytes):
    global _config_dir
    if _config_dir is None:
        _config_dir = tempfile.mkdtemp(prefix="securelan-fuzz-config-")
    path = os.path.join(_config_dir, "fuzz.toml")
    with open(path, "wb") as f:
        f.write(data)
    for loader in (load_keyserver_config, load_agent_config):
        try:
            loader(path)
        except ConfigError as e:
            try:
                message = str(e)
                assert message.startswith(path + ": "), f"the message does not name the file: {message!r}"
                assert "\n" not in message and "\r" not in message, f"the message is not one line: {message!r}"
            except AssertionError:
                report(data)
        except Exception:
            report(data)


# certificate ------------------------------------------------------------------------

_cert_dir = None


def fuzz_certificate(data: bytes):
    global _cert_dir
    if _cert_dir is None:
        _cert_dir = tempfile.mkdtemp(prefix="securelan-fuzz-cert-")
    path = os.path.join(_cert_dir, "fuzz.pem")
    # First byte 0: the rest is the file; else the rest is DER, armoured.
    if data[:1] == b"\0":
        content = data[1:]
    else:
        content = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data[1:])
                   + b"-----END CERTIFICATE-----\n")
    with open(path, "wb") as f:
        f.write(content)
    try:
        try:
            cert = pki.load_certificate(path)
        except pki.PKIError:
            return
        try:
            pki.member_identity(cert)
        except pki.CertificateError:
            pass
    except Exception:
        report(data)


# Seeds and main -----------------------------------------------------------------------


def _seeds(target):
    if target == "config":
        for name in ("keyserver.toml", "agent.toml"):
            with open(os.path.join(ROOT, "etc", name), "rb") as f:
                yield f.read()
    elif target == "certificate":
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from securelan.testing import make_pki

        made = make_pki(tempfile.mkdtemp(prefix="securelan-fuzz-pki-"), members=("alice",))
        for member in made.members.values():
            with open(member[0], "rb") as f:
                pem = f.read()
            yield b"\0" + pem
            yield b"\1" + x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    elif target == "wire":
        sealer = Sealer(_TRAFFIC_KEY, TYPE_PAIR, 5, 7)
        for datagram in sealer.seal(b"\2\0\0\0\0\2\2\0\0\0\0\1\x08\x00" + bytes(300), OVERHEAD + 100):
            yield b"\0" * 9 + datagram
        yield b"\1" + bytes(64)
    else:
        yield bytes(64)
        yield bytes(range(256))


TARGETS = {
    "wire": fuzz_wire,
    "reassembly": fuzz_reassembly,
    "dataplane": fuzz_dataplane,
    "config": fuzz_config,
    "certificate": fuzz_certificate,
}
TARGET = None


def main(argv):
    global TARGET
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer arguments] [CORPUS_DIR ...]")
    TARGET = argv[1]
    args = [argv[0]] + argv[2:]
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = tempfile.mkdtemp(prefix=f"securelan-corpus-{TARGET}-")
        for n, seed in enumerate(_seeds(TARGET)):
            with open(os.path.join(corpus, f"seed-{n}"), "wb") as f:
                f.write(seed)
        args.append(corpus)
    if TARGET == "dataplane":
        _plane_fixture()
    atheris.Setup(args, TARGETS[TARGET])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
