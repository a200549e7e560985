"""
Tests for L{securelan.cli}.
"""

import io
import json
import os
import sys

from twisted.trial.unittest import SynchronousTestCase

from securelan import cli, pki


class PKICommandTests(SynchronousTestCase):
    """
    Tests for C{securelan pki ...}.
    """

    def setUp(self):
        self.directory = self.mktemp()

    def run_cli(self, *argv):
        """
        Run C{securelan argv...}; return the exit status, stdout and stderr.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", stdout)
        self.patch(sys, "stderr", stderr)
        status = cli.main(list(argv))
        return status, stdout.getvalue(), stderr.getvalue()

    def init_ca(self):
        status, _, _ = self.run_cli("pki", "init-ca", "--dir", self.directory, "--subnet", "lab")
        self.assertEqual(status, 0)

    def path(self, name):
        return os.path.join(self.directory, name)

    def test_init_ca(self):
        """
        C{pki init-ca} writes the CA and prints the paths it wrote.
        """
        status, out, err = self.run_cli(
            "pki", "init-ca", "--dir", self.directory, "--subnet", "lab", "--days", "100"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"wrote {self.path('ca.pem')}\nwrote {self.path('ca.key')}\n")
        cert = pki.load_certificate(self.path("ca.pem"))
        self.assertEqual(pki.ca_subnet(cert), "lab")
        self.assertEqual((cert.not_valid_after_utc - cert.not_valid_before_utc).days, 100)

    def test_keyserver(self):
        """
        C{pki keyserver} writes a key-server pair named after the host.
        """
        self.init_ca()
        status, out, err = self.run_cli(
            "pki", "keyserver", "--dir", self.directory, "--name", "ks.lab"
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"wrote {self.path('ks.lab.pem')}\nwrote {self.path('ks.lab.key')}\n")
        cert = pki.load_certificate(self.path("ks.lab.pem"))
        self.assertEqual(pki.keyserver_names(cert), ["ks.lab"])

    def test_member(self):
        """
        C{pki member} writes a member pair carrying the given MACs and roles.
        """
        self.init_ca()
        status, out, err = self.run_cli(
            "pki", "member", "--dir", self.directory, "--id", "alice",
            "--mac", "02:00:00:00:00:01", "--mac", "02:00:00:00:00:02",
            "--role", "client", "--role", "gateway", "--days", "5",
        )
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(out, f"wrote {self.path('alice.pem')}\nwrote {self.path('alice.key')}\n")
        cert = pki.load_certificate(self.path("alice.pem"))
        identity = pki.member_identity(cert)
        self.assertEqual(identity.member_id, "alice")
        self.assertEqual(
            identity.macs, frozenset({b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"})
        )
        self.assertEqual(identity.roles, frozenset({"client", "gateway"}))
        self.assertEqual((cert.not_valid_after_utc - cert.not_valid_before_utc).days, 5)

    def test_member_defaults(self):
        """
        Without C{--mac} or C{--role}, a member may use any MAC as a client.
        """
        self.init_ca()
        status, _, _ = self.run_cli("pki", "member", "--dir", self.directory, "--id", "bob")
        self.assertEqual(status, 0)
        identity = pki.member_identity(pki.load_certificate(self.path("bob.pem")))
        self.assertEqual(identity.macs, frozenset())
        self.assertEqual(identity.roles, frozenset({"client"}))

    def test_show(self):
        """
        C{pki show} prints the member's identity and the certificate's facts.
        """
        self.init_ca()
        self.run_cli("pki", "member", "--dir", self.directory, "--id", "alice")
        status, out, err = self.run_cli("pki", "show", self.path("alice.pem"))
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("member: alice", lines)
        self.assertIn("macs: any", lines)
        self.assertIn("roles: client", lines)
        self.assertTrue(any(line.startswith("sha256: ") for line in lines))

    def test_show_json(self):
        """
        C{pki show --json} prints valid JSON holding the member ID.
        """
        self.init_ca()
        self.run_cli(
            "pki", "member", "--dir", self.directory, "--id", "alice", "--mac", "02:00:00:00:00:01"
        )
        status, out, err = self.run_cli("pki", "show", "--json", self.path("alice.pem"))
        self.assertEqual((status, err), (0, ""))
        info = json.loads(out)
        self.assertEqual(info["member"]["member_id"], "alice")
        self.assertEqual(info["member"]["macs"], ["02:00:00:00:00:01"])
        cert = pki.load_certificate(self.path("alice.pem"))
        self.assertEqual(info["serial"], f"{cert.serial_number:x}")

    def test_show_ca_json(self):
        """
        C{pki show --json} of the CA names its subnet.
        """
        self.init_ca()
        status, out, _ = self.run_cli("pki", "show", "--json", self.path("ca.pem"))
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["subnet"], "lab")

    def assertOneLineError(self, status, out, err, *fragments):
        self.assertEqual(status, 2)
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("securelan: error: "), err)
        for fragment in fragments:
            self.assertIn(fragment, err)

    def test_overwrite_error(self):
        """
        A second C{init-ca} in the same directory prints one error line
        naming the file and exits with status 2.
        """
        self.init_ca()
        status, out, err = self.run_cli(
            "pki", "init-ca", "--dir", self.directory, "--subnet", "lab"
        )
        self.assertOneLineError(status, out, err, self.path("ca.pem"), "refusing to overwrite")

    def test_bad_mac_error(self):
        """
        A malformed C{--mac} prints one error line and writes nothing.
        """
        self.init_ca()
        status, out, err = self.run_cli(
            "pki", "member", "--dir", self.directory, "--id", "alice", "--mac", "nope"
        )
        self.assertOneLineError(status, out, err, "nope")
        self.assertFalse(os.path.exists(self.path("alice.pem")))

    def test_missing_ca_error(self):
        """
        Issuing without a CA prints one error line naming the missing file.
        """
        status, out, err = self.run_cli("pki", "keyserver", "--dir", self.directory, "--name", "ks")
        self.assertOneLineError(status, out, err, self.path("ca.pem"))

    def test_show_missing_file(self):
        """
        C{pki show} of a missing file prints one error line.
        """
        missing = self.path("nothing.pem")
        status, out, err = self.run_cli("pki", "show", missing)
        self.assertOneLineError(status, out, err, missing)

    def test_bad_days(self):
        """
        C{--days} must be a positive number: a usage error, status 2.
        """
        status, out, err = self.run_cli(
            "pki", "init-ca", "--dir", self.directory, "--subnet", "lab", "--days", "0"
        )
        self.assertEqual(status, 2)
        self.assertIn("--days", err)
        self.assertFalse(os.path.exists(self.directory))

    def test_unknown_role(self):
        """
        C{--role} accepts only the known roles.
        """
        self.init_ca()
        status, _, err = self.run_cli(
            "pki", "member", "--dir", self.directory, "--id", "alice", "--role", "admin"
        )
        self.assertEqual(status, 2)
        self.assertIn("admin", err)

    def test_help(self):
        """
        C{--help} works on every command and exits with status 0.
        """
        for argv in (
            [],
            ["pki"],
            ["pki", "init-ca"],
            ["pki", "keyserver"],
            ["pki", "member"],
            ["pki", "show"],
        ):
            status, out, _ = self.run_cli(*argv, "--help")
            self.assertEqual(status, 0, argv)
            self.assertIn("usage: securelan", out)

    def test_no_command(self):
        """
        Without a command, C{securelan} prints usage and exits with status 2.
        """
        status, _, err = self.run_cli()
        self.assertEqual(status, 2)
        self.assertIn("usage: securelan", err)


class ParserTests(SynchronousTestCase):
    """
    Tests for L{cli.build_parser}.
    """

    def test_every_command_has_func(self):
        """
        Every leaf command sets C{func}, so C{main} can run it.
        """
        parser = cli.build_parser()
        for argv in (
            ["pki", "init-ca", "--dir", "d", "--subnet", "s"],
            ["pki", "keyserver", "--dir", "d", "--name", "n"],
            ["pki", "member", "--dir", "d", "--id", "i"],
            ["pki", "show", "c"],
        ):
            self.assertTrue(callable(parser.parse_args(argv).func), argv)
