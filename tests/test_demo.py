"""
Tests for L{securelan.demo}: the README's main command.
"""

import io
import shutil
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from securelan import demo


class DemoTests(TestCase):
    timeout = 60

    def test_demo_passes_its_checks(self):
        """
        The demonstration runs to the end with every check holding, and
        shows fingerprints, never keys.
        """
        out = io.StringIO()
        self.patch(demo, "_say", lambda text="": out.write(text + "\n"))
        # Short: the key server's admin socket lives in it.
        folder = tempfile.mkdtemp(prefix="sl-demo-")
        self.addCleanup(shutil.rmtree, folder, True)
        d = demo.run(reactor, folder)

        def check(code):
            text = out.getvalue()
            self.assertEqual(code, 0, text)
            self.assertIn("every check held", text)
            self.assertNotIn("FAILED", text)
            self.assertIn("X25519MLKEM768", text)

        return d.addCallback(check)


class LanDemoTests(TestCase):
    timeout = 120

    def test_lan_demo_passes_its_checks(self):
        """
        The README's main command, C{securelan demo}: the encrypted LAN in
        namespaces, with every check holding.  (It needs root, as CI has.)
        """
        from securelan import lan_demo

        out = io.StringIO()
        self.patch(lan_demo, "_say", lambda text="": out.write(text + "\n"))
        code = lan_demo.run()
        text = out.getvalue()
        self.assertEqual(code, 0, text)
        self.assertIn("every check held", text)
        self.assertIn("peer: bob", text)
