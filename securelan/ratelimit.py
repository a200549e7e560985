# -*- test-case-name: tests.test_ratelimit -*-
"""
Token buckets: how fast one member may ask the key server for anything.
"""


class TokenBucket:
    """
    Holds up to C{burst} tokens, refilled at C{rate} per second of C{clock}
    time; each request takes one.
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: int, clock):
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock.seconds()

    def take(self) -> bool:
        """
        Take a token if one is there; say whether it was.
        """
        now = self._clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
