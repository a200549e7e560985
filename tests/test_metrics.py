"""
Tests for L{securelan.metrics}: what Prometheus reads.
"""

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securelan.metrics import AgentCollector, KeyServerCollector, listen_metrics
from securelan.testing import MemoryLAN, MemoryMember, MemorySubnet
from securelan.addresses import parse_mac

MAC_1, MAC_2 = parse_mac("02:00:00:00:00:01"), parse_mac("02:00:00:00:00:02")


def scrape(collector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


class _Agent:
    """
    What AgentCollector reads of an agent service.
    """

    def __init__(self, member):
        self.member = member

    def status(self):
        return {"carrier_errors": 0, "carrier_receive_failures": 2,
                "role": {"device_write_errors": 0, "device_read_failures": 3, **self.member.dataplane.status()}}


class MetricsTests(SynchronousTestCase):
    def setUp(self):
        self.net = MemorySubnet(self.mktemp(), members=("alice", "bob"))
        self.lan = MemoryLAN()
        self.alice = MemoryMember(self.net, self.lan, "alice", MAC_1, "10.0.0.1")
        self.bob = MemoryMember(self.net, self.lan, "bob", MAC_2, "10.0.0.2")
        self.alice.send(MAC_2, b"hello")
        for _ in range(3):
            self.net.flush()
            self.lan.flush()
        self.bob.dataplane.datagrams_received((b"garbage",), ("10.0.0.66", 1))

    def test_keyserver(self):
        """
        Members, sessions, keys issued, requests by command and the group
        epoch are exported.
        """
        text = scrape(KeyServerCollector(self.net.server))
        self.assertIn("securelan_keyserver_members 2.0", text)
        self.assertIn("securelan_keyserver_sessions 2.0", text)
        self.assertIn('securelan_keyserver_keys_issued_total{kind="pair"} 1.0', text)
        self.assertIn('securelan_keyserver_requests_total{command="register"} 2.0', text)
        self.assertIn("securelan_keyserver_group_epoch 1.0", text)

    def test_agent(self):
        """
        Frames and bytes each way, drops by reason and peers are exported.
        """
        alice, bob = scrape(AgentCollector(_Agent(self.alice))), scrape(AgentCollector(_Agent(self.bob)))
        self.assertIn('securelan_agent_frames_total{direction="tx",kind="pair"} 1.0', alice)
        self.assertIn('securelan_agent_bytes_total{direction="rx",kind="pair"} 19.0', bob)
        self.assertIn('securelan_agent_drops_total{reason="short"} 1.0', bob)
        self.assertIn("securelan_agent_peers 1.0", alice)
        self.assertIn('securelan_agent_split_frames_total{how="in_order"} 0.0', bob)
        self.assertIn('securelan_agent_errors_total{where="carrier_receive"} 2.0', bob)
        self.assertIn('securelan_agent_errors_total{where="device_read"} 3.0', bob)

    def test_agent_split_frames(self):
        """
        Super-frames received are counted by how their pieces were gathered.
        """
        self.alice.send(MAC_2, b"S" * 5000)
        for _ in range(3):
            self.net.flush()
            self.lan.flush()
        bob = scrape(AgentCollector(_Agent(self.bob)))
        self.assertIn('securelan_agent_split_frames_total{how="in_order"} 1.0', bob)
        self.assertIn('securelan_agent_split_frames_total{how="whole_read"} 0.0', bob)


class BorderAndLayer3MetricsTests(SynchronousTestCase):
    def test_border_links(self):
        """
        A border's links: packets each way and the NETKEY epoch per peer
        subnet, drops by reason; the key server's links and refusals.
        """
        import os

        from twisted.internet.task import Clock

        from securelan.agent.netplane import NetPlane
        from securelan.keys import SecretKey
        from securelan.protocol import NetLink
        from securelan.testing import MemoryDevice

        from .test_peering import Pair

        lan = MemoryLAN()
        plane = NetPlane("east", "edge-e", 1, MemoryDevice(mac=None), lan.carrier("192.0.2.1", 4800), Clock())
        plane.install([NetLink(subnet="west", border="edge-w", endpoint="192.0.2.2:4800", incarnation=1,
                               prefixes=("10.2.0.0/24",), local_prefixes=("10.1.0.0/24",),
                               key=SecretKey.generate(), epoch=4)])
        plane.datagrams_received((b"x",), ("192.0.2.9", 1))

        class Agent:
            def status(self):
                return {"role": {"net": plane.status(), "rekeys_asked": 2}}

        text = scrape(AgentCollector(Agent()))
        self.assertIn('securelan_agent_netkey_epoch{subnet="west"} 4.0', text)
        self.assertIn('securelan_agent_net_packets_total{direction="tx",subnet="west"} 0.0', text)
        self.assertIn('securelan_agent_net_drops_total{reason="short"} 1.0', text)
        self.assertIn('securelan_agent_key_events_total{event="rekeys_asked"} 2.0', text)
        path = self.mktemp()
        os.makedirs(path)
        pair = Pair(path)
        pair.hello()
        net = MemorySubnet(os.path.join(path, "subnet"))
        net.server.broker = pair.alpha
        text = scrape(KeyServerCollector(net.server))
        self.assertIn('securelan_keyserver_netkey_epoch{connected="yes",subnet="beta"} 1.0', text)
        self.assertIn("securelan_keyserver_peers_refused_total 0.0", text)


class EndpointTests(TestCase):
    @defer.inlineCallbacks
    def test_served_over_http(self):
        """
        The metrics are served on /metrics of the configured endpoint.
        """
        from twisted.web.client import Agent, readBody

        net = MemorySubnet(self.mktemp(), members=("alice",))
        port = yield listen_metrics(reactor, "tcp:0:interface=127.0.0.1", KeyServerCollector(net.server))
        self.addCleanup(port.stopListening)
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port.getHost().port}/metrics".encode())
        body = yield readBody(response)
        self.assertIn(b"securelan_keyserver_members", body)
