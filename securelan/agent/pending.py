# -*- test-case-name: tests.test_agent -*-
"""
Frames that wait for a key: a bounded queue per peer MAC and in total, each
frame dropped after a timeout.  The seed drops a frame on a key miss; this
queue is what lets the first packets of a conversation through.
"""

from collections import deque


class PendingFrames:
    """
    Frames queued by destination MAC, in arrival order.

    @ivar dropped: a dict of drop reason -> count (C{queue_timeout}; a full
        queue is the caller's to count).
    """

    def __init__(self, per_peer: int, total: int, timeout: float, clock):
        self.per_peer = per_peer
        self.total = total
        self.timeout = timeout
        self._clock = clock
        self._queues: dict[bytes, deque] = {}
        self._count = 0
        self.dropped = {"queue_timeout": 0}

    def __len__(self):
        return self._count

    def depth(self, mac: bytes) -> int:
        queue = self._queues.get(mac)
        return len(queue) if queue else 0

    def add(self, mac: bytes, frame) -> bool:
        """
        Queue C{frame} (whatever the caller needs to send it later) for
        C{mac}; False (and counted) if a bound is reached.
        """
        queue = self._queues.get(mac)
        if self._count >= self.total:
            self.expire()
        if self._count >= self.total or (queue is not None and len(queue) >= self.per_peer):
            return False
        if queue is None:
            queue = self._queues[mac] = deque()
        queue.append((self._clock.seconds(), frame))
        self._count += 1
        return True

    def take(self, mac: bytes) -> list:
        """
        Remove and return C{mac}'s frames that have not timed out, in order.
        """
        queue = self._queues.pop(mac, None)
        if not queue:
            return []
        self._count -= len(queue)
        oldest = self._clock.seconds() - self.timeout
        frames = [frame for stamp, frame in queue if stamp >= oldest]
        self.dropped["queue_timeout"] += len(queue) - len(frames)
        return frames

    def discard(self, mac: bytes, reason_counts: dict, reason: str) -> int:
        """
        Drop every frame queued for C{mac}, counting them under C{reason}.
        """
        queue = self._queues.pop(mac, None)
        if not queue:
            return 0
        self._count -= len(queue)
        reason_counts[reason] = reason_counts.get(reason, 0) + len(queue)
        return len(queue)

    def expire(self):
        """
        Drop every frame older than the timeout.
        """
        oldest = self._clock.seconds() - self.timeout
        for mac in list(self._queues):
            queue = self._queues[mac]
            while queue and queue[0][0] < oldest:
                queue.popleft()
                self._count -= 1
                self.dropped["queue_timeout"] += 1
            if not queue:
                del self._queues[mac]
