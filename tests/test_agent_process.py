"""
Process-level tests of ``twistd -n securelan-agent``: the errors an operator
sees before anything runs.
"""

import os
import shutil
import sys

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from securelan.testing import make_pki

from .test_keyserver_process import TWISTD, child_env


class AgentStartupTests(TestCase):
    timeout = 60

    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.pki = make_pki(os.path.join(self.folder, "pki"))
        cert, key = self.pki.members["alice"]
        self.config = os.path.join(self.folder, "agent.toml")
        self.text = f"""
[agent]
ca = "{self.pki.ca_cert}"
certificate = "{cert}"
private_key = "{key}"
key_servers = ["keyserver.test@127.0.0.1:1"]
status_socket = "{self.folder}/agent.sock"

[device]
name = "sltest0"
"""
        with open(self.config, "w") as f:
            f.write(self.text)
        os.chmod(self.folder, 0o755)
        for path in (self.folder, os.path.dirname(self.folder)):
            os.chmod(path, os.stat(path).st_mode | 0o055)

    def run_agent(self, prefix=()):
        argv = list(prefix) + [sys.executable] + TWISTD[1:] + [
            "-n", "--pidfile=", "--logfile=-", "securelan-agent", "--config", self.config]
        return getProcessOutputAndValue(argv[0], argv[1:], env=child_env(), path=self.folder)

    @defer.inlineCallbacks
    def test_malformed_config(self):
        """
        A bad value: one line naming the file and key, exit non-zero.
        """
        with open(self.config, "w") as f:
            f.write(self.text.replace('name = "sltest0"', 'name = "sltest0"\nmtu = "big"'))
        out, err, code = yield self.run_agent()
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("device.mtu", lines[0])
        self.assertIn(self.config, lines[0])

    @defer.inlineCallbacks
    def test_no_permission_for_tap(self):
        """
        Without CAP_NET_ADMIN the agent stops at once with one clear line.
        """
        setpriv = shutil.which("setpriv")
        self.assertIsNotNone(setpriv, "setpriv (util-linux) is needed to drop privileges")
        # The unprivileged agent must get as far as the TAP device.
        os.chmod(self.pki.directory, 0o755)
        for path in self.pki.members["alice"] + (self.pki.ca_cert,):
            os.chmod(path, 0o644)
        out, err, code = yield self.run_agent(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
             "--bounding-set=-all"])
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("CAP_NET_ADMIN", lines[0])
