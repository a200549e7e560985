"""
Tests for L{securelan.control}: the local control sockets.
"""

import os
import shutil
import stat
import tempfile

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from securelan.control import ControlError, ask_control, listen_control
from securelan.errors import UnknownPeer


class ControlSocketTests(TestCase):
    def setUp(self):
        folder = tempfile.mkdtemp(prefix="sl-")
        self.addCleanup(shutil.rmtree, folder, True)
        self.path = os.path.join(folder, "control.sock")

    def listen(self, handlers):
        port = listen_control(reactor, self.path, handlers)
        self.addCleanup(port.stopListening)
        return port

    @defer.inlineCallbacks
    def test_answers_with_arguments(self):
        """
        A command is called with the request's other fields; its result
        comes back; the socket is mode 0600.
        """
        self.listen({"add": lambda a, b: {"sum": a + b}})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        result = yield ask_control(reactor, self.path, "add", a=2, b=3)
        self.assertEqual(result, {"sum": 5})

    @defer.inlineCallbacks
    def test_errors(self):
        """
        An unknown command, wrong arguments and a declared securelan error
        come back as ControlError with a clear message.
        """
        def fails():
            raise UnknownPeer("no such member: dave")

        self.listen({"fails": fails, "add": lambda a, b: a + b})
        e = yield self.assertFailure(ask_control(reactor, self.path, "nope"), ControlError)
        self.assertIn("add, fails", str(e))
        e = yield self.assertFailure(ask_control(reactor, self.path, "fails"), ControlError)
        self.assertEqual(str(e), "no such member: dave")
        yield self.assertFailure(ask_control(reactor, self.path, "add", a=1), ControlError)

    def test_live_socket_not_replaced(self):
        """
        A second daemon does not steal a live daemon's socket.
        """
        self.listen({})
        self.assertRaises(OSError, listen_control, reactor, self.path, {})
