"""
Tests for L{securelan.ratelimit}.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from securelan.ratelimit import TokenBucket


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """
        A full bucket allows C{burst} requests at once, then C{rate} per
        second; it never holds more than C{burst}.
        """
        clock = Clock()
        bucket = TokenBucket(rate=2, burst=3, clock=clock)
        self.assertEqual([bucket.take() for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([bucket.take() for _ in range(2)], [True, False])
        clock.advance(100)
        self.assertEqual(sum(bucket.take() for _ in range(10)), 3)
