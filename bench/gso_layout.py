#!/usr/bin/env python3
"""
A lever for the sending side, measured before it is built: how long it
takes to lay out one super-frame's pieces for a UDP GSO send, as
L{securelan.wire.Sealer.seal_parts} does it now (a header packed per piece
and a memoryview slice of the ciphertext per piece, handed to C{sendmsg}
as two buffers per datagram) against one buffer built with numpy (the
headers from a per-piece-count template in which only the counters change,
the ciphertext copied in by two array assignments, one buffer per
C{sendmsg}).  Both layouts are checked to be the same bytes.

The receiving side likewise: a GRO read of the whole train taken apart by
L{securelan.wire.train_pieces} (every header checked) and the ciphertext
joined, as now, against the headers compared with the expected ones as one
array and the ciphertext gathered by one copy.

    PYTHONPATH=. python bench/gso_layout.py    # needs numpy (not a securelan dependency)

Prints microseconds per super-frame (a 65,238-byte TSO frame into 1,472-byte
datagrams), with AES-GCM of the same frame for scale.  No network.
"""

import os
import struct
import sys
import time

try:
    import numpy as np
except ImportError:
    sys.exit("bench/gso_layout.py needs numpy: pip install numpy")
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

DATAGRAM, HEADER = 1472, 32
ROOM = DATAGRAM - HEADER
HEADER_STRUCT = struct.Struct("!BBBBIIQ12s")  # securelan.wire's header, MACs as one field
HEADER_DTYPE = np.dtype([("version", "u1"), ("type", "u1"), ("index", "u1"), ("count", "u1"),
                         ("epoch", ">u4"), ("incarnation", ">u4"), ("counter", ">u8"), ("macs", "V12")])


def per_piece(sealed, count, macs, counter):
    view = memoryview(sealed)
    parts = [None] * (2 * count)
    parts[0::2] = [HEADER_STRUCT.pack(2, 1, i, count, 1, 1, counter + i, macs) for i in range(count)]
    parts[1::2] = [view[start:start + ROOM] for start in range(0, len(sealed), ROOM)]
    return parts


def template(count, macs):
    headers = np.zeros(count, HEADER_DTYPE)
    headers["version"], headers["type"], headers["count"] = 2, 1, count
    headers["epoch"], headers["incarnation"] = 1, 1
    headers["index"] = np.arange(count)
    headers["macs"] = np.frombuffer(macs, "V12")
    return headers, np.arange(count, dtype=np.uint64)


def one_buffer(sealed, count, headers, indexes, counter):
    out = np.empty((count, DATAGRAM), np.uint8)
    headers["counter"] = indexes + counter
    out[:, :HEADER] = headers.view(np.uint8).reshape(count, HEADER)
    body = np.frombuffer(sealed, np.uint8)
    full = (count - 1) * ROOM
    out[:count - 1, HEADER:] = body[:full].reshape(count - 1, ROOM)
    out[count - 1, HEADER:HEADER + len(sealed) - full] = body[full:]
    return out.reshape(-1)[:count * HEADER + len(sealed)]


def gather_now(train, header):
    from securelan.wire import train_pieces

    return b"".join(train_pieces(train, header))


def gather_one_buffer(data, count, expected):
    train = np.frombuffer(data, np.uint8)
    full = count - 1
    rows, last = train[:full * DATAGRAM].reshape(full, DATAGRAM), train[full * DATAGRAM:]
    if not (np.array_equal(rows[:, :HEADER], expected[:full]) and np.array_equal(last[:HEADER], expected[full])):
        return None
    # One copy, into the buffer that AES-GCM will read.
    out = np.empty(full * ROOM + len(last) - HEADER, np.uint8)
    out[:full * ROOM].reshape(full, ROOM)[:] = rows[:, HEADER:]
    out[full * ROOM:] = last[HEADER:]
    return out


def timed(fn, n=5000):
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main():
    frame = os.urandom(65238)
    plaintext = b"\x01" + bytes(9) + frame[12:]
    encrypt = AESGCM(os.urandom(32)).encrypt
    sealed = encrypt(bytes(12), plaintext, bytes(32))
    count, macs = -(-len(sealed) // ROOM), frame[:12]
    headers, indexes = template(count, macs)
    assert b"".join(map(bytes, per_piece(sealed, count, macs, 1000))) == \
        one_buffer(sealed, count, headers, indexes, 1000).tobytes()
    print(f"{count} pieces of {DATAGRAM} bytes, numpy {np.__version__}")
    print(f"per piece (now): {timed(lambda: per_piece(sealed, count, macs, 1000)):.1f} us")
    print(f"one buffer (numpy): {timed(lambda: one_buffer(sealed, count, headers, indexes, 1000)):.1f} us")
    print(f"AES-GCM of the frame, for scale: {timed(lambda: encrypt(bytes(12), plaintext, bytes(32))):.1f} us")

    from securelan.wire import Train, parse_header

    data = one_buffer(sealed, count, headers, indexes, 1000).tobytes()
    train, header = Train(data, DATAGRAM), parse_header(data)
    expected = headers.view(np.uint8).reshape(count, HEADER).copy()
    assert gather_now(train, header) == gather_one_buffer(data, count, expected).tobytes() == sealed
    print(f"receive, train_pieces and join (now): {timed(lambda: gather_now(train, header)):.1f} us")
    print(f"receive, one array (numpy): {timed(lambda: gather_one_buffer(data, count, expected)):.1f} us")


if __name__ == "__main__":
    main()
