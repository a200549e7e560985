"""
Tests for L{securelan.logs}: JSON log lines.
"""

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from securelan.logs import json_observer


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
