"""
Tests for L{securelan.logs}: JSON log lines.
"""

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from securelan.logs import contain, json_observer


class JSONLogTests(SynchronousTestCase):
    def test_refusal_as_json(self):
        """
        A refusal is one JSON object a line, with its reason and peer as
        fields and the formatted text.
        """
        out = io.StringIO()
        log = Logger(namespace="securelan.keyserver", observer=json_observer(out))
        log.info("refused {what} from {member_id} at {peer}: {reason}", what="pair key",
                 member_id="carol", peer="10.0.0.3:4000", reason="no member holds 02:00:00:00:00:09")
        record = json.loads(out.getvalue())
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "securelan.keyserver")
        self.assertEqual(record["member_id"], "carol")
        self.assertEqual(record["reason"], "no member holds 02:00:00:00:00:09")
        self.assertIn("refused pair key from carol", record["text"])
        self.assertEqual(out.getvalue().count("\n"), 1)

    def test_objects_become_text(self):
        """
        Fields that are not JSON types are written as their text.
        """
        out = io.StringIO()
        log = Logger(namespace="x", observer=json_observer(out))
        log.info("at {address}", address=("10.0.0.1", 4789))
        self.assertEqual(json.loads(out.getvalue())["address"], "('10.0.0.1', 4789)")


class LevelTests(SynchronousTestCase):
    def test_debug_dropped_unless_asked(self):
        """
        securelan's loggers let info and above through by default; debug
        events reach observers only after set_level("debug").
        """
        from securelan.logs import logger, set_level
        from securelan.testing import LogCapture

        log = logger("securelan.test")
        self.addCleanup(set_level, "info")
        with LogCapture() as logs:
            log.debug("quiet {n}", n=1)
            log.info("heard {n}", n=2)
            set_level("debug")
            log.debug("loud {n}", n=3)
        formats = [e.get("log_format") for e in logs.events if e.get("log_namespace") == "securelan.test"]
        self.assertEqual(formats, ["heard {n}", "loud {n}"])


class QuietAMPTests(SynchronousTestCase):
    def test_no_line_per_connection(self):
        """
        A key server's session logs no line of its own (AMP's "connection
        established" and "connection lost") for a connection that comes and
        goes; AMP's bookkeeping still works.
        """
        from twisted.internet.testing import StringTransport
        from twisted.python.failure import Failure
        from twisted.internet.error import ConnectionDone

        from securelan.protocol import QuietAMP
        from securelan.testing import LogCapture

        protocol = QuietAMP()
        with LogCapture() as logs:
            protocol.makeConnection(StringTransport())
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e for e in logs.events if "connection" in e.get("log_format", "")], [])
        self.assertIsNone(protocol.transport)


class ContainTests(SynchronousTestCase):
    def test_counted_and_logged_sparingly(self):
        """
        What the call returns passes through; each exception is counted and
        not raised, and logged the first ten times, then every thousandth.
        """
        class Owner:
            failures = 0

        owner = Owner()

        def call(x):
            if x < 0:
                raise ValueError("a bug")
            return x * 2

        contained = contain(call, owner, "failures", Logger(), "failed ({count} so far) on {what}", what="test")
        self.assertEqual(contained(21), 42)
        for _ in range(2000):
            self.assertIsNone(contained(-1))
        self.assertEqual(owner.failures, 2000)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 12)
