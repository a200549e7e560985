"""
Tests for L{securelan.agent.status}: the status socket and its formatting.
"""

import json
import os
import shutil
import stat
import tempfile

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securelan.agent.status import ask_status, format_status, listen_status
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet
from securelan.addresses import parse_mac


def sample_status(directory):
    net = MemorySubnet(os.path.abspath(directory))
    lan = MemoryLAN()
    alice = MemoryMember(net, lan, "alice", parse_mac("02:00:00:00:00:01"), "10.0.0.1")
    bob = MemoryMember(net, lan, "bob", parse_mac("02:00:00:00:00:02"), "10.0.0.2")
    alice.send(bob.mac, b"hello")
    for _ in range(3):
        net.flush()
        lan.flush()
    return {
        "now": net.clock.seconds(),
        "role_name": "client",
        "carrier": "udp",
        "key_servers": [{"address": "keyserver.test@127.0.0.1:7443", "connected": True}],
        "role": {"device": "slan0", "not_ready": 0, **alice.dataplane.status()},
    }


class StatusFormatTests(SynchronousTestCase):
    def test_format(self):
        """
        The human form names the peer, its MAC, endpoint, epoch and traffic,
        and shows no key material.
        """
        status = sample_status(self.mktemp())
        text = format_status(status)
        self.assertIn("peer: bob", text)
        self.assertIn("mac: 02:00:00:00:00:02", text)
        self.assertIn("endpoint: 10.0.0.2:4789", text)
        self.assertIn("epoch: 1", text)
        self.assertIn("19 B sent (1 frames)", text)
        self.assertIn("key server: keyserver.test@127.0.0.1:7443  connected", text)
        self.assertIn("group key: epoch 1", text)
        self.assertNotIn("split frames", text)
        self.assertNotIn("receive failures", text)
        json.dumps(status)

    def test_format_receive_failures(self):
        """
        Received datagrams, and frames from the host, whose handling failed
        are shown once there are any, with where to look.
        """
        status = sample_status(self.mktemp())
        status["carrier_receive_failures"] = 3
        status["role"]["device_read_failures"] = 1
        self.assertIn("carrier receive failures: 3  device read failures: 1  (dropped: see the log)",
                      format_status(status))

    def test_format_split_frames(self):
        """
        Once super-frames came in, how their pieces were gathered is shown
        (from whole GRO reads is the fast way).
        """
        status = sample_status(self.mktemp())
        status["role"]["split_frames"] = {"whole_read": 7, "in_order": 2, "reassembled": 1}
        self.assertIn("split frames received: 7 from whole reads, 2 in order, 1 reassembled",
                      format_status(status))


    def test_format_border(self):
        """
        A border's status shows its links: the peer subnet, its border and
        endpoint, its prefixes, the NETKEY epoch and the traffic; never the
        NETKEY.
        """
        from twisted.internet.task import Clock

        from securelan.agent.netplane import NetPlane
        from securelan.keys import SecretKey
        from securelan.protocol import NetLink
        from securelan.testing import MemoryDevice

        clock = Clock()
        lan = MemoryLAN()
        carrier = lan.carrier("192.0.2.1", 4800)
        plane = NetPlane("east", "edge-e", 1, MemoryDevice(mac=None), carrier, clock)
        key = SecretKey.generate()
        plane.install([NetLink(subnet="west", border="edge-w", endpoint="192.0.2.2:4800", incarnation=1,
                               prefixes=("10.2.0.0/24",), local_prefixes=("10.1.0.0/24",), key=key, epoch=3)])
        status = {"now": 0.0, "role_name": "border", "key_servers": [],
                  "role": {"device": "slan0", "tun": "slnet0", "net": plane.status()}}
        text = format_status(status)
        self.assertIn("border of subnet east: TUN device slnet0", text)
        self.assertIn("link: subnet west  border edge-w  endpoint 192.0.2.2:4800", text)
        self.assertIn("prefixes: 10.2.0.0/24  NETKEY epoch: 3", text)
        self.assertNotIn(key.material.hex(), text + json.dumps(status))


    def test_format_layer3(self):
        status = sample_status(self.mktemp())
        status["role"]["layer3"] = {"layer": 3, "addresses_known": 2, "asking": 0, "queued": 1,
                                    "drops": {"spoofed_src_ip": 3}, "queue_drops": {}}
        text = format_status(status)
        self.assertIn("layer 3: 2 peer addresses known, 0 being asked for, 1 packets waiting  "
                      "drops: spoofed_src_ip 3", text)


class StatusSocketTests(TestCase):
    def test_socket_is_private_and_answers(self):
        """
        The socket is mode 0600 and answers C{ask_status}.
        """
        folder = tempfile.mkdtemp(prefix="sl-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "agent.sock")
        port = listen_status(reactor, path, lambda: {"ok": True})
        self.addCleanup(port.stopListening)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        return ask_status(reactor, path).addCallback(self.assertEqual, {"ok": True})
