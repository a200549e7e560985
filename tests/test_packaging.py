"""
Packaging: twistd finds securelan's plugins.
"""

import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutput
from twisted.trial.unittest import TestCase

from .test_keyserver_process import TWISTD, child_env


class PluginTests(TestCase):
    @defer.inlineCallbacks
    def test_twistd_lists_plugins(self):
        """
        C{twistd --help} lists the securelan plugins.
        """
        out = yield getProcessOutput(sys.executable, TWISTD[1:] + ["--help"], env=child_env())
        self.assertIn(b"securelan-keyserver", out)
        self.assertIn(b"securelan-agent", out)
