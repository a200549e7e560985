"""
Tests for L{securelan.doctor}: C{securelan doctor}.
"""

import io
import os
import sys

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securelan import cli
from securelan.testing import make_pki


class DoctorTests(SynchronousTestCase):
    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.folder, "state"))
        self.pki = make_pki(os.path.join(self.folder, "pki"))
        self.out = io.StringIO()
        self.patch(sys, "stdout", self.out)

    def keyserver_config(self, cert=None):
        path = os.path.join(self.folder, "keyserver.toml")
        with open(path, "w") as f:
            f.write(f"""
[keyserver]
subnet = "test"
ca = "{self.pki.ca_cert}"
certificate = "{cert or self.pki.keyserver_cert}"
private_key = "{self.pki.keyserver_key}"
state_dir = "{os.path.join(self.folder, 'state')}"
admin_socket = ""
""")
        return path

    def test_good_keyserver(self):
        """
        A good key server configuration passes, saying where things are.
        """
        code = cli.main(["doctor", "--keyserver", self.keyserver_config()])
        self.assertEqual(code, 0, self.out.getvalue())
        self.assertIn("certificate chain: ", self.out.getvalue())
        self.assertIn("valid until", self.out.getvalue())

    def test_netkey_peers(self):
        """
        Each peer subnet's CA is checked, and what it means is said (who
        connects to whom); an unreadable peer CA fails.
        """
        path = self.keyserver_config()
        with open(path, "a") as f:
            f.write(f"""
[netkey]
listen = "tcp:7444"
prefixes = ["10.1.0.0/24"]
border = "edge"
border_endpoint = "192.0.2.1:4800"

[[netkey.peer]]
subnet = "west"
name = "keyserver.west"
ca = "{self.pki.ca_cert}"

[[netkey.peer]]
subnet = "zone"
name = "keyserver.zone"
ca = "{os.path.join(self.folder, 'missing.pem')}"
""")
        code = cli.main(["doctor", "--keyserver", path])
        out = self.out.getvalue()
        self.assertEqual(code, 1, out)
        self.assertIn("[  ok] peer subnet west: CA", out)
        self.assertIn("it connects to this one", out)
        self.assertIn("[FAIL] peer subnet zone", out)
        self.assertIn("missing.pem", out)
        self.assertIn("key server name: peers check this key server by its name: keyserver.test", out)

    def test_wrong_ca(self):
        """
        A certificate another CA signed fails the chain check.
        """
        other = make_pki(os.path.join(self.folder, "other"), subnet="other", members=())
        code = cli.main(["doctor", "--keyserver", self.keyserver_config(cert=other.keyserver_cert)])
        self.assertEqual(code, 1)
        self.assertIn("[FAIL] certificate chain", self.out.getvalue())
        self.assertIn("[FAIL] private key", self.out.getvalue())



class AgentDoctorTests(TestCase):
    @defer.inlineCallbacks
    def test_unreachable_key_server(self):
        """
        An agent whose key server does not answer fails that check and
        names it; its identity is shown.
        """
        from securelan import doctor

        folder = os.path.abspath(self.mktemp())
        pki = make_pki(os.path.join(folder, "pki"))
        cert, key = pki.members["alice"]
        path = os.path.join(folder, "agent.toml")
        with open(path, "w") as f:
            f.write(f"""
[agent]
ca = "{pki.ca_cert}"
certificate = "{cert}"
private_key = "{key}"
key_servers = ["keyserver.test@127.0.0.1:1"]
""")
        checks = yield doctor.check_agent(reactor, path)
        lines = "\n".join(c.line() for c in checks)
        self.assertIn("[FAIL] key server keyserver.test@127.0.0.1:1: unreachable", lines)
        self.assertIn("member identity: alice", lines)
        self.assertTrue(any(not c.ok for c in checks))
