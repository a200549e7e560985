# -*- test-case-name: tests.test_carriers -*-
"""
C{sendmmsg(2)} and C{recvmmsg(2)}: many datagrams in one system call, for
the ethernet carrier's packet socket, which has no GSO or GRO to batch
with.  Python's C{socket} module has neither call; this module calls the C
library through C{ctypes}, with the tables of messages and buffers made
once per socket and filled by numpy per call, so a batch costs no Python
per datagram.

L{available} says whether the C library has both calls; L{Batch} holds the
tables of one socket.
"""

import ctypes
import errno
import os

import numpy


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IOVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_MSG_TRUNC = 0x20
_MSG_DONTWAIT = 0x40
_MMSG_SIZE = ctypes.sizeof(_MMsgHdr)

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sendmmsg = _libc.sendmmsg
    _recvmmsg = _libc.recvmmsg
except (OSError, AttributeError):
    _sendmmsg = _recvmmsg = None
else:
    _sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    _sendmmsg.restype = ctypes.c_int
    _recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    _recvmmsg.restype = ctypes.c_int


def available() -> bool:
    """
    Whether the C library has C{sendmmsg} and C{recvmmsg} (glibc since 2.14,
    musl: yes), on a 64-bit platform (the tables are filled as 64-bit
    words).
    """
    return _sendmmsg is not None and ctypes.sizeof(ctypes.c_void_p) == 8


class Batch:
    """
    The message tables of one socket, C{slots} messages of one buffer each,
    for receiving (with C{stride}: message C{i} lands in row C{i} of
    L{rows}, C{slots} rows of C{stride} bytes made once) or for sending
    (without: the messages point into the caller's buffer).
    """

    def __init__(self, slots: int, stride: int = None):
        self.slots = slots
        self._iovecs = (_IOVec * slots)()
        self._messages = (_MMsgHdr * slots)()
        self._address = ctypes.addressof(self._messages)
        size = ctypes.sizeof(_IOVec)
        base = ctypes.addressof(self._iovecs)
        for i, message in enumerate(self._messages):
            message.msg_hdr.msg_iov = ctypes.cast(base + i * size, ctypes.POINTER(_IOVec))
            message.msg_hdr.msg_iovlen = 1
        # The tables as numpy columns: (base, length) per buffer, and the
        # length the kernel reports per message.
        self._iov = numpy.frombuffer(self._iovecs, numpy.uint64).reshape(slots, 2)
        words = ctypes.sizeof(_MMsgHdr) // 4
        self._lengths = numpy.frombuffer(self._messages, numpy.uint32).reshape(slots, words)[
            :, _MMsgHdr.msg_len.offset // 4]
        #: Where datagrams are received: row i holds message i.
        self.rows = None
        if stride:
            self.rows = numpy.empty((slots, stride), numpy.uint8)
            self._iov[:, 0] = self.rows.ctypes.data + numpy.arange(slots, dtype=numpy.uint64) * stride
            self._iov[:, 1] = stride

    def receive(self, fd: int, first: int = 0) -> list:
        """
        Receive datagrams without waiting into rows C{first}, C{first} + 1,
        ... of L{rows} (as many as there are rows left): their lengths (an
        empty list when none was waiting).  A length above the stride is a
        datagram cut to its row.

        @raise OSError: as C{recvmmsg} fails, but for C{EAGAIN}.
        """
        if not 0 <= first < self.slots:
            raise ValueError(f"no row {first} of {self.slots}")
        # With MSG_TRUNC a datagram longer than its row reports its whole
        # length, so the caller can tell it was cut.
        n = _recvmmsg(fd, self._address + first * _MMSG_SIZE, self.slots - first, _MSG_DONTWAIT | _MSG_TRUNC, None)
        if n < 0:
            code = ctypes.get_errno()
            if code in (errno.EAGAIN, errno.EWOULDBLOCK):
                return []
            raise OSError(code, os.strerror(code))
        return self._lengths[first:first + n].tolist()

    def send(self, fd: int, data: numpy.ndarray, length: int, count: int, last: int) -> int:
        """
        Send C{count} datagrams laid end to end in C{data} (a contiguous
        numpy buffer), each C{length} bytes but the last (C{last} bytes, no
        more than C{length}), without waiting: how many were sent (the rest
        were refused: a full socket buffer, a device that is down).
        """
        if not 0 < count <= self.slots:
            raise ValueError(f"1 to {self.slots} datagrams in one batch")
        # The kernel reads what the table says: it must lie in data.
        if not (data.flags.c_contiguous and 0 < last <= length
                and data.nbytes >= (count - 1) * length + last):
            raise ValueError("the datagrams do not fit the buffer")
        iov = self._iov[:count]
        iov[:, 0] = data.ctypes.data + numpy.arange(count, dtype=numpy.uint64) * length
        iov[:, 1] = length
        iov[count - 1, 1] = last
        # Stopping short means the next datagram met an error (the call
        # reports it only when none left): the rest are not tried again.
        return max(_sendmmsg(fd, self._address, count, _MSG_DONTWAIT), 0)
