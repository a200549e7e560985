#!/usr/bin/env python3
"""
How long one super-frame takes to seal and to open, in process, as
L{securelan.wire} does it now against how it did before numpy (7069b62),
kept here as the reference:

- sending: before, a header packed per piece and a memoryview of the
  ciphertext per piece, handed to C{sendmsg} as two buffers per datagram;
  now (L{securelan.wire.Sealer.seal_for_carrier}) the headers made as one
  number and the datagrams laid out in one numpy buffer, one buffer per
  C{sendmsg};
- receiving: before, every header unpacked and compared field by field,
  the pieces copied out, joined, decrypted, and the frame joined again;
  now (L{securelan.wire.train_ciphertext} and
  L{securelan.wire.Opener.open_frame}) the headers compared as one number,
  the ciphertext gathered by one strided copy and decrypted into the
  frame's buffer.

Both ways are checked to give the same bytes.

    PYTHONPATH=. python bench/gso_layout.py

Prints microseconds per super-frame (a 65,238-byte TSO frame with a
virtio-net header, into 1,472-byte datagrams), AES-GCM included.  No
network.
"""

import functools
import os
import struct
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securelan.keys import SecretKey
from securelan.wire import (
    HEADER_LEN,
    TYPE_PAIR,
    Opener,
    Sealer,
    Train,
    join_frame,
    parse_header,
    piece_header,
    train_ciphertext,
)

DATAGRAM = 1472
ROOM = DATAGRAM - HEADER_LEN
_HEADER_OUT = struct.Struct("!BBBBIIQ12s")
_NONCE = struct.Struct("!4xQ")


def seal_before(encrypt, frame, offload, counter):
    """
    7069b62's C{Sealer.seal_parts} for a split frame with offload.
    """
    plaintext = b"".join((offload, memoryview(frame)[12:]))
    count = -(-(len(plaintext) + 16) // ROOM)
    macs = bytes(frame[:12])
    parts = [None] * (2 * count)
    parts[0::2] = headers = [_HEADER_OUT.pack(2, TYPE_PAIR | 0x80, index, count, 1, 1, counter + index, macs)
                             for index in range(count)]
    sealed = memoryview(encrypt(_NONCE.pack(counter), plaintext, headers[0]))
    parts[1::2] = [sealed[start:start + ROOM] for start in range(0, len(sealed), ROOM)]
    return parts


@functools.lru_cache(maxsize=128)
def _train_layout(pieces, segment):
    return struct.Struct("!" + f"2sB9sQ12s{segment - HEADER_LEN}s" * pieces), tuple(range(pieces))


def open_before(decrypt, train, header):
    """
    7069b62's C{train_pieces}, C{Opener.open_pieces} and C{join_frame}
    (without the replay window, which both ways share).
    """
    count, segment, data = header.count, train.segment, train.data
    full = count - 1
    last = full * segment
    layout, indexes = _train_layout(full, segment)
    fields = layout.unpack_from(data)
    first = fields[0:5]
    counter = header.counter
    if (fields[0::6] != (first[0],) * full or fields[2::6] != (first[2],) * full
            or fields[4::6] != (first[4],) * full or fields[1::6] != indexes
            or fields[3::6] != tuple(range(counter, counter + full))
            or data[last:last + HEADER_LEN] != piece_header(header, full)):
        return None
    pieces = list(fields[5::6])
    pieces.append(data[last + HEADER_LEN:last + segment])
    plaintext = decrypt(_NONCE.pack(counter), b"".join(pieces), piece_header(header, 0))
    return join_frame(header, (plaintext,))


def timed(fn, n=3000):
    fn()
    best = None
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        took = (time.perf_counter() - start) / n * 1e6
        best = took if best is None else min(best, took)
    return best


class _Window:
    """
    A replay window that lets everything through: the same frame is opened
    over and over here.
    """

    last = 0

    def check(self, counter):
        return True


def main():
    key = SecretKey(os.urandom(32))
    aead = AESGCM(key.material)
    frame = os.urandom(65238 - 10)
    offload = b"\x01" + bytes(9)
    sealer = Sealer(key, TYPE_PAIR, 1, 1, counter=1000)

    def seal_now():
        sealer._counter = 1000
        return sealer.seal_for_carrier(frame, DATAGRAM, offload)

    train = seal_now()
    before = seal_before(aead.encrypt, frame, offload, 1000)
    assert b"".join(map(bytes, before)) == bytes(train.data)
    print(f"{len(train)} pieces of {DATAGRAM} bytes")
    print(f"seal, a header and a view per piece (before): {timed(lambda: seal_before(aead.encrypt, frame, offload, 1000)):.1f} us")
    print(f"seal, one buffer (now): {timed(seal_now):.1f} us")

    data = bytes(train.data)
    received, header = Train(data, DATAGRAM), parse_header(data)
    opener = Opener(key, TYPE_PAIR, 1, 1)
    opener._window = _Window()

    def open_now():
        return opener.open_frame(header, train_ciphertext(received, header))

    assert open_before(aead.decrypt, received, header) == bytes(open_now()) == offload + frame
    print(f"open, headers unpacked, pieces joined, frame joined (before): "
          f"{timed(lambda: open_before(aead.decrypt, received, header)):.1f} us")
    print(f"open, headers as one number, one gather, decrypt into the frame (now): {timed(open_now):.1f} us")
    plaintext = b"".join((offload, frame[12:]))
    print(f"AES-GCM of the frame alone, for scale: "
          f"{timed(lambda: aead.encrypt(bytes(12), plaintext, bytes(32))):.1f} us")


if __name__ == "__main__":
    main()
