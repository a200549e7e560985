"""
Tests for L{securelan.labnet.overlay_in_clear}: what the end-to-end tests
and the demonstration count as an overlay address on the wire.
"""

from twisted.trial.unittest import SynchronousTestCase

from securelan.labnet import overlay_in_clear

ADDRESS = bytes([10, 231, 100, 1])


def udp_frame(payload, port=4789):
    ip = bytes([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes([10, 231, 0, 1, 10, 231, 0, 2])
    udp = port.to_bytes(2, "big") + port.to_bytes(2, "big") + bytes(4)
    return bytes(12) + b"\x08\x00" + ip + udp + payload


class OverlayInClearTests(SynchronousTestCase):
    def test_clear_arp_is_found(self):
        """
        An ARP for an overlay address in clear is found.
        """
        arp = bytes(12) + b"\x08\x06" + bytes(14) + ADDRESS + bytes(10)
        self.assertEqual(overlay_in_clear([arp]), {"10.231.100.1"})

    def test_plain_frame_inside_other_udp_is_found(self):
        """
        An overlay address anywhere in a datagram that is not securelan's
        is found.
        """
        self.assertEqual(overlay_in_clear([udp_frame(bytes(50) + ADDRESS, port=5000)]), {"10.231.100.1"})

    def test_ciphertext_is_not_searched(self):
        """
        The same four bytes inside a securelan datagram's ciphertext are not
        an address in clear; in its clear header they would be.
        """
        self.assertEqual(overlay_in_clear([udp_frame(bytes(40) + ADDRESS)]), set())
        self.assertEqual(overlay_in_clear([udp_frame(bytes(20) + ADDRESS + bytes(20))]), {"10.231.100.1"})


class ChildCodeTests(SynchronousTestCase):
    """
    Children started to run securelan (daemons, benchmark peers) run the
    tree L{securelan.labnet.child_env} names, wherever they are started.
    """

    def test_working_directory_does_not_shadow(self):
        """
        A C{securelan} package in the working directory (a checkout a
        benchmark of another snapshot was started from) is not the one a
        child imports.
        """
        import os
        import subprocess

        import securelan
        from securelan.labnet import child_env, python_c

        decoy = self.mktemp()
        os.makedirs(os.path.join(decoy, "securelan"))
        with open(os.path.join(decoy, "securelan", "__init__.py"), "w") as f:
            f.write("raise SystemExit('the decoy was imported')\n")
        result = subprocess.run(python_c("import securelan; print(securelan.__file__)"), env=child_env(),
                                cwd=decoy, capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(os.path.realpath(result.stdout.strip()), os.path.realpath(securelan.__file__))
