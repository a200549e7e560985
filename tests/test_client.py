"""
Tests for L{securelan.client}: key-server addresses and failover.
"""

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.trial.unittest import SynchronousTestCase

from securelan.addresses import KeyServerAddress
from securelan.client import FailoverEndpoint


class FakeEndpoint:
    def __init__(self, name, works):
        self.name = name
        self.works = works
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        if self.works:
            return defer.succeed(self.name)
        return defer.fail(ConnectionRefusedError(self.name))


class FailoverEndpointTests(SynchronousTestCase):
    def test_tries_each_in_turn(self):
        """
        The first endpoint that answers is used; the next connection starts
        with it.
        """
        a, b, c = FakeEndpoint("a", False), FakeEndpoint("b", False), FakeEndpoint("c", True)
        failover = FailoverEndpoint([a, b, c])
        self.assertEqual(self.successResultOf(failover.connect(None)), "c")
        self.assertEqual(self.successResultOf(failover.connect(None)), "c")
        self.assertEqual((a.attempts, b.attempts, c.attempts), (1, 1, 2))

    def test_all_fail(self):
        """
        When none answers, the connection fails (and ClientService backs
        off and tries again).
        """
        failover = FailoverEndpoint([FakeEndpoint("a", False), FakeEndpoint("b", False)])
        self.failureResultOf(failover.connect(None), ConnectionRefusedError)

    def test_moves_on_when_preferred_fails(self):
        """
        When the key server in use goes away, the next one is tried.
        """
        a, b = FakeEndpoint("a", True), FakeEndpoint("b", True)
        failover = FailoverEndpoint([a, b])
        self.assertEqual(self.successResultOf(failover.connect(None)), "a")
        a.works = False
        self.assertEqual(self.successResultOf(failover.connect(None)), "b")


class KeyServerAddressTests(SynchronousTestCase):
    def test_forms(self):
        """
        host:port, name@host:port and [v6]:port parse; others do not.
        """
        self.assertEqual(KeyServerAddress.parse("10.0.0.1:7443"), KeyServerAddress("10.0.0.1", "10.0.0.1", 7443))
        self.assertEqual(KeyServerAddress.parse("ks.lab@10.0.0.1:7443"), KeyServerAddress("ks.lab", "10.0.0.1", 7443))
        self.assertEqual(KeyServerAddress.parse("ks@[fd00::1]:7443").host, "fd00::1")
        for bad in ("10.0.0.1", "ks@:1", "a:b", "h:0", "h:70000", ""):
            self.assertRaises(ValueError, KeyServerAddress.parse, bad)
