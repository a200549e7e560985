"""
End-to-end: a key server and three members, each a real twistd process in
its own network namespace, on one switch.  Each scenario checks that
traffic flows, that a capture of the wire shows no plaintext, and that what
must fail fails.  These tests need root; they never skip (CI runs as root).
"""

import json
import os
import socket
import sys

from twisted.trial.unittest import SynchronousTestCase

from securelan import netns
from securelan.addresses import format_mac
from securelan.wire import VERSION, parse_header
from securelan.labnet import (
    BORDER_PORT,
    CODE_ROOT,
    KEYSERVER_ADDRESS,
    KEYSERVER_PORT,
    MARKER,
    BorderedSubnets,
    EncryptedLAN,
    child_env,
    overlay_in_clear,
    poll,
    twistd_argv,
)

PING_PATTERN = MARKER[:16]


def gso_segments(payload, size):
    """
    The securelan datagrams in a UDP payload: one, or for a UDP GSO packet
    seen before segmentation, consecutive C{size}-byte datagrams of one
    frame (each a valid header with the next counter).
    """
    if len(payload) <= size:
        return [payload]
    pieces = [payload[i:i + size] for i in range(0, len(payload), size)]
    counters = [parse_header(p).counter for p in pieces]
    assert counters == list(range(counters[0], counters[0] + len(pieces))), counters
    return pieces


def is_ip_fragment(frame):
    """
    Whether an Ethernet frame carries an IPv4 fragment (more-fragments set
    or a fragment offset).
    """
    return frame[12:14] == b"\x08\x00" and int.from_bytes(frame[20:22], "big") & 0x3FFF != 0


class E2ETestCase(SynchronousTestCase):
    def setUp(self):
        ok, reason = netns.available()
        if not ok:
            self.fail(f"end-to-end tests need network namespaces: {reason}")

    def lan(self, **kw):
        lan = EncryptedLAN(**kw)
        self.addCleanup(lan.close)
        return lan

    def assertNoPlaintext(self, capture, lan):
        self.assertTrue(capture.packets(), "the capture is empty")
        self.assertFalse(capture.contains(MARKER), "the marker crossed the wire in clear")
        self.assertFalse(capture.contains(PING_PATTERN))
        self.assertEqual(overlay_in_clear(capture.packets()), set(),
                         "overlay addresses crossed the wire in clear IP or ARP headers")


class CarrierTests(E2ETestCase):
    def check_carrier(self, carrier):
        lan = self.lan()
        lan.start(carrier=carrier)
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        with lan.switch.capture() as capture:
            for a, b in ((alice, bob), (bob, carol), (carol, alice)):
                self.assertTrue(a.ping(b, count=2, pattern=PING_PATTERN), f"{a.name} cannot ping {b.name}")
                self.assertTrue(b.ping(a, count=2, pattern=PING_PATTERN), f"{b.name} cannot ping {a.name}")
            self.assertTrue(lan.tcp_exchange(alice, bob))
            self.assertTrue(lan.tcp_exchange(carol, bob, port=5002))
        capture.stop()
        self.assertNoPlaintext(capture, lan)
        # ARP went through the group key: every member sent and received
        # group frames, and no ARP for the overlay crossed in clear.
        for member in (alice, bob, carol):
            group = member.status()["role"]["group"]
            self.assertGreater(group["tx_frames"], 0)
            self.assertGreater(group["rx_frames"], 0)
            self.assertEqual(len(member.status()["role"]["peers"]), 2)
        return capture, lan

    def test_udp(self):
        """
        Over UDP: every pair pings and talks TCP; the wire carries only
        securelan datagrams (and the underlay's own ARP and TLS).
        """
        capture, lan = self.check_carrier("udp")
        payloads = capture.udp_payloads(4789)
        self.assertTrue(payloads)
        for payload in payloads:
            self.assertEqual(payload[0], VERSION, "not a securelan datagram")
        self.assertNotIn(0x88B5, capture.ethertypes())
        # Every datagram fits the 1500-byte underlay: no IP fragments.  On
        # veth a UDP GSO send crosses as one packet: it must be made of
        # 1472-byte securelan datagrams (what a real NIC sends apart).
        datagrams = [d for payload in payloads for d in gso_segments(payload, 1472)]
        self.assertLessEqual(max(map(len, datagrams)), 1472)
        self.assertEqual(max(map(len, datagrams)), 1472, "the TCP transfer used full-size datagrams")
        self.assertEqual([f for f in capture.packets() if is_ip_fragment(f)], [])
        # The super-frames came in on the fast path: whole from one GRO read.
        taken = sum(lan[name].status()["role"]["split_frames"]["whole_read"] for name in ("alice", "bob", "carol"))
        self.assertGreater(taken, 0)

    def test_ethernet(self):
        """
        Over raw Ethernet (EtherType 0x88B5): the same, with no UDP at all
        on the data path.
        """
        capture, lan = self.check_carrier("ethernet")
        self.assertIn(0x88B5, capture.ethertypes())
        self.assertEqual(capture.udp_payloads(4789), [])
        # The carrier hands a split frame's pieces over as one train, as
        # UDP GRO does: the super-frames were opened whole.
        taken = sum(lan[name].status()["role"]["split_frames"]["whole_read"] for name in ("alice", "bob", "carol"))
        self.assertGreater(taken, 0)


class AttackerTests(E2ETestCase):
    def test_attacker_on_the_switch(self):
        """
        An attacker on the switch with no certificate sees only ciphertext,
        cannot get keys, and its injected and replayed datagrams are dropped
        (the counters say so).
        """
        lan = self.lan()
        attacker = lan.lab.host("mallory")
        lan.lab.link(attacker, lan.switch, addresses=["10.231.0.66/24"])
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        with lan.switch.capture() as capture:
            self.assertTrue(alice.ping(bob, count=3, pattern=PING_PATTERN))
            self.assertTrue(lan.tcp_exchange(alice, bob))
        capture.stop()
        self.assertNoPlaintext(capture, lan)
        to_bob = [d.payload for d in capture.udp_datagrams(4789)
                  if (d.src, d.dst) == (alice.underlay, bob.underlay) and d.payload[1] == 1]
        self.assertTrue(to_bob)

        replays = to_bob[:20]
        forged = [p[:-1] + bytes([p[-1] ^ 1]) for p in to_bob[:5]]
        garbage = [b"\x01\x01", b"hello", os.urandom(100)]
        before = bob.peer("alice")["drops"]
        code = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "for line in sys.stdin.read().split():\n"
            f"    s.sendto(bytes.fromhex(line), ('{bob.underlay}', 4789))\n"
        )
        attacker.run([sys.executable, "-c", code],
                     input="\n".join(p.hex() for p in replays + forged + garbage))
        self.assertTrue(alice.ping(bob, count=1))
        after = bob.peer("alice")["drops"]
        self.assertEqual(after.get("replay", 0) - before.get("replay", 0), len(replays))
        self.assertEqual(after.get("auth", 0) - before.get("auth", 0), len(forged))
        self.assertGreaterEqual(bob.drops().get("short", 0), 2)
        # The key server refuses the attacker: no certificate, no keys.
        result = attacker.run([sys.executable, "-c",
                               "import ssl,socket\n"
                               f"s=socket.create_connection(('{KEYSERVER_ADDRESS}', {KEYSERVER_PORT}), 5)\n"
                               "c=ssl.create_default_context(); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE\n"
                               "t=c.wrap_socket(s)\n"
                               "t.send(b'x'); print(repr(t.recv(10)))\n"], check=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("refused", open(lan.ks_log, errors="replace").read())

    def test_third_member_cannot_decrypt(self):
        """
        carol, with her own certificate and the keys she may hold (K(alice,
        carol), K(bob, carol)), opens none of what alice and bob exchange.
        """
        lan = self.lan()
        lan.start()
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        with lan.switch.capture() as capture:
            self.assertTrue(alice.ping(bob, count=3))
            self.assertTrue(lan.tcp_exchange(bob, alice))
        capture.stop()
        between = [d.payload for d in capture.udp_datagrams(4789)
                   if {d.src, d.dst} == {alice.underlay, bob.underlay} and d.payload[1] == 1]
        self.assertTrue(between)
        path = os.path.join(lan.workdir, "between.hex")
        with open(path, "w") as f:
            f.write("\n".join(p.hex() for p in between[:200]))
        cert, key = lan.pki_paths("carol")
        result = carol.host.run(
            ["env", f"PYTHONPATH={CODE_ROOT}", sys.executable, "-P", "-m", "securelan._trykeys", lan.ca,
             cert, key, f"keyserver.test@{KEYSERVER_ADDRESS}:{KEYSERVER_PORT}", format_mac(carol.mac),
             path, format_mac(alice.mac), format_mac(bob.mac)], timeout=60)
        outcome = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(outcome["keys"], 2)
        self.assertEqual(outcome["tried"], min(200, len(between)))
        self.assertEqual(outcome["opened"], 0)


class KeyMissTests(E2ETestCase):
    def test_drop_mode_is_the_seed(self):
        """
        With on_key_miss = "drop", the frames that miss a key are dropped
        (counted) and the conversation starts once the keys are in.
        """
        lan = self.lan(names=("alice", "bob"))
        lan.start(on_key_miss="drop")
        alice, bob = lan["alice"], lan["bob"]
        self.assertTrue(alice.ping(bob, count=2, timeout=8))
        drops = alice.drops().get("no_key", 0) + bob.drops().get("no_key", 0)
        self.assertGreaterEqual(drops, 1)

    def test_queue_mode_loses_nothing(self):
        """
        With on_key_miss = "queue" (the default), the first exchange needs
        no retry: nothing is dropped for want of a key on the sending side.
        """
        lan = self.lan(names=("alice", "bob"))
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        self.assertTrue(alice.ping(bob, count=1, timeout=3))
        for member in (alice, bob):
            status = member.status()["role"]
            self.assertEqual(status["pending_drops"], {"queue_timeout": 0})
            self.assertNotIn("queue_full", status["drops"])
            self.assertNotIn("no_key", status["drops"])


class KeyServerLossTests(E2ETestCase):
    def test_members_survive_keyserver_loss(self):
        """
        With the key server killed (SIGKILL), members that hold keys keep
        talking; restarted, it serves the same keys (a restarted bob gets
        K(alice, bob) again, and alice, who kept hers, still talks to him).
        """
        lan = self.lan(names=("alice", "bob"))
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        self.assertTrue(alice.ping(bob, count=2))
        lan.kill_keyserver()
        self.assertTrue(alice.ping(bob, count=3))
        self.assertTrue(lan.tcp_exchange(alice, bob))
        lan.start_keyserver()
        bob.stop()
        # A stopped agent removes its TAP device.
        self.assertNotEqual(bob.host.run(["ip", "link", "show", "slan0"], check=False).returncode, 0)
        bob.start()
        bob.wait_registered()
        self.assertTrue(alice.ping(bob, count=3, timeout=8))
        self.assertGreater(bob.peer("alice")["rx_frames"], 0)


class Layer3Tests(E2ETestCase):
    def test_layer3_on_tun(self):
        """
        Members on TUN devices: IP packets are sent under the pair key of
        the member that holds the destination address (the key server
        looks it up by IP).  Ping and TCP flow; the wire carries only
        ciphertext; carol, claiming alice's address as her source, gets
        nothing through (bob's agent counts it).
        """
        lan = self.lan(layer3=True)
        lan.start()
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        with lan.switch.capture() as capture:
            self.assertTrue(alice.ping(bob, count=3, pattern=PING_PATTERN), "alice cannot ping bob")
            self.assertTrue(carol.ping(alice, count=2, pattern=PING_PATTERN))
            self.assertTrue(lan.tcp_exchange(alice, bob))
            self.assertTrue(lan.tcp_exchange(bob, carol, port=5002))
        capture.stop()
        self.assertNoPlaintext(capture, lan)
        kinds = {d.payload[1] & 0x7F for d in capture.udp_datagrams(4789)}
        self.assertIn(1, kinds)
        status = alice.status()["role"]
        self.assertEqual(status["layer3"]["layer"], 3)
        self.assertEqual({p["member_id"] for p in status["peers"]}, {"bob", "carol"})
        # What must fail: carol sends from alice's address.
        carol.host.ip("addr", "add", f"{alice.overlay}/32", "dev", "slan0")
        self.assertFalse(carol.host.ping(bob.overlay, count=2, timeout=3, source=alice.overlay))
        self.assertGreaterEqual(bob.status()["role"]["layer3"]["drops"].get("spoofed_src_ip", 0), 2)


class CascadeE2ETests(E2ETestCase):
    def test_keyserver_killed_mid_transfer(self):
        """
        Two key servers on one PostgreSQL store, members split across them
        (alice and carol on ks, bob on ks2).  ks is killed with SIGKILL
        while alice pings bob every 20 ms: not one ping is lost, alice and
        carol move to ks2, and ks2 still issues new keys (carol and bob had
        none).  The wire carries no plaintext throughout.
        """
        import subprocess
        import time

        from securelan.testing_postgres import fresh_database

        dsn = fresh_database(self, unix_socket=True)
        lan = self.lan(store=dsn)
        lan.start()
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]

        def server_of(member):
            for server in (member.status() or {}).get("key_servers", []):
                if server["connected"]:
                    return server["address"].rsplit("@", 1)[1].split(":")[0]
            return None

        self.assertEqual(server_of(alice), lan.keyserver_address)
        self.assertEqual(server_of(bob), lan.keyserver2_address)
        self.assertTrue(alice.ping(bob, count=2))
        with lan.switch.capture() as capture:
            flood = alice.host.popen(["ping", "-n", "-q", "-i", "0.02", "-c", "300", "-W", "2", "-p",
                                      PING_PATTERN.hex(), bob.overlay], stdout=subprocess.PIPE, text=True)
            time.sleep(1.5)
            lan.kill_keyserver()
            out = flood.communicate(timeout=30)[0]
            self.assertIn(" 0% packet loss", out, out)
            poll(lambda: server_of(alice) == server_of(carol) == lan.keyserver2_address, 30, 0.2)
            self.assertEqual(server_of(alice), lan.keyserver2_address)
            self.assertEqual(server_of(carol), lan.keyserver2_address)
            self.assertIsNone(carol.peer("bob"))
            self.assertTrue(carol.ping(bob, count=3, timeout=8, pattern=PING_PATTERN), "no new key after the kill")
            self.assertTrue(lan.tcp_exchange(carol, bob))
        capture.stop()
        self.assertNoPlaintext(capture, lan)
        self.assertEqual(carol.peer("bob")["epoch"], 1)


class DatabaseOutageTests(E2ETestCase):
    def test_members_ride_out_a_database_outage(self):
        """
        The cascade's PostgreSQL stops: members keep talking on the keys
        they hold, a pair that has no key yet cannot get one (and nothing
        breaks); when the database is back, new keys are issued again.
        """
        from securelan.testing_postgres import PostgreSQLCluster, fresh_database

        cluster = PostgreSQLCluster().start()
        self.addCleanup(cluster.destroy)
        dsn = fresh_database(self, cluster=cluster, unix_socket=True)
        lan = self.lan(store=dsn)
        lan.start()
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        self.assertTrue(alice.ping(bob, count=2))
        cluster.stop_server()
        self.assertTrue(alice.ping(bob, count=5, pattern=PING_PATTERN), "cached keys stopped working")
        self.assertTrue(lan.tcp_exchange(bob, alice))
        self.assertFalse(carol.ping(bob, count=1, timeout=3), "a key was issued with no database")
        cluster.start_server()
        self.assertTrue(carol.ping(bob, count=3, timeout=20), "no new keys once the database was back")
        for process in (lan.keyserver_process, lan.keyserver2_process):
            self.assertIsNone(process.poll(), "a key server died with its database")


class GatewayTests(E2ETestCase):
    MEMBERS_ONLY = b"MEMBERS-ONLY-MRK"

    def test_gateway_to_plaintext_network(self):
        """
        A plaintext host with no agent and two members talk both ways
        through the gateway; the subnet's wire carries only ciphertext; the
        plaintext side carries the plaintext host's own conversations and
        never the members' traffic with each other; a plaintext host on the
        subnet's LAN (not behind the gateway) reaches no member.
        """
        lan = self.lan(names=("alice", "bob"), gateway=True)
        lan.start()
        alice, bob, printer = lan["alice"], lan["bob"], lan.plain
        with lan.switch.capture() as subnet, lan.plain_switch.capture() as plain:
            self.assertTrue(alice.ping(printer, count=3, pattern=PING_PATTERN), "alice cannot reach the printer")
            self.assertTrue(printer.ping(bob, count=3, pattern=PING_PATTERN), "the printer cannot reach bob")
            self.assertTrue(lan.tcp_exchange(alice, printer))
            self.assertTrue(lan.tcp_exchange(printer, bob, port=5002))
            self.assertTrue(alice.ping(bob, count=3, pattern=self.MEMBERS_ONLY))
            self.assertTrue(lan.tcp_exchange(bob, alice, port=5003, marker=self.MEMBERS_ONLY))
        subnet.stop()
        plain.stop()
        self.assertNoPlaintext(subnet, lan)
        self.assertFalse(subnet.contains(self.MEMBERS_ONLY))
        self.assertTrue(plain.contains(MARKER), "the printer's own traffic is plaintext on its network")
        self.assertFalse(plain.contains(self.MEMBERS_ONLY), "member-to-member traffic leaked to the plaintext side")
        self.assertFalse(plain.contains(socket.inet_aton(bob.underlay)), "the subnet's underlay leaked")
        # What must fail: plaintext frames on the subnet's own LAN reach no member.
        rogue = lan.lab.host("rogue")
        lan.lab.link(rogue, lan.switch, addresses=["10.231.100.201/24"])
        self.assertFalse(rogue.ping(alice.overlay, count=2, timeout=3))


class BorderTests(E2ETestCase):
    """
    Two subnets, each with a key server, two members and a border, joined
    by a routed WAN; their key servers agree a NETKEY over a management
    network.
    """

    @staticmethod
    def _border_epochs(east_border, west_border, epoch, timeout):
        """
        The NETKEY epochs of both borders' links once both reach C{epoch},
        or as they are after C{timeout} seconds.
        """
        def epochs():
            return [b.net()["links"][0]["epoch"] for b in (east_border, west_border)]

        poll(lambda: epochs() == [epoch, epoch], timeout)
        return epochs()

    def _rogue_keyserver(self, nets, name, ca_dir, subnet, mgmt_index):
        """
        Start a key server that presents a certificate for C{name} from the
        CA in C{ca_dir}, claims subnet C{subnet} and tries to peer with
        east; return its log's path.
        """
        from securelan import pki

        lab = nets.lab
        workdir = os.path.join(nets.workdir, f"rogue-{mgmt_index}")
        os.makedirs(os.path.join(workdir, "state"))
        if ca_dir is None:
            ca_dir = os.path.join(workdir, "pki")
            pki.create_ca(ca_dir, subnet, days=2)
        cert, key = pki.issue_keyserver(ca_dir, name, days=2)
        host = lab.host(f"rogue{mgmt_index}")
        address = f"{nets.MGMT}.{mgmt_index}"
        lab.link(host, nets.mgmt, addresses=[f"{address}/24"])
        config = os.path.join(workdir, "keyserver.toml")
        with open(config, "w") as f:
            f.write(f"""
[keyserver]
subnet = "{subnet}"
listen = "tcp:7443:interface={address}"
ca = "{os.path.join(ca_dir, 'ca.pem')}"
certificate = "{cert}"
private_key = "{key}"
state_dir = "{os.path.join(workdir, 'state')}"
admin_socket = ""

[netkey]
prefixes = ["10.231.102.0/24"]
border = "edge-r"
border_endpoint = "{address}:{BORDER_PORT}"

[[netkey.peer]]
subnet = "east"
name = "keyserver.east"
ca = "{nets.east.ca}"
address = "{nets.east.mgmt_address}:{nets.PEERING_PORT}"
""")
        log_path = os.path.join(workdir, "keyserver.log")
        with open(log_path, "ab") as log:
            host.popen(twistd_argv("securelan-keyserver", config), env=child_env(), stdout=log, stderr=log)
        return log_path

    def test_two_subnets_through_their_borders(self):
        """
        alice (east) and carol (west) ping and talk TCP both ways through
        the two borders.  The WAN carries only NETKEY datagrams; each
        subnet's wire only pair-key and group datagrams; no marker and no
        overlay address crosses either in clear.  A third subnet's key
        server (another CA), and a key server with a certificate of west's
        CA but another name, are refused and get no NETKEY; a replayed WAN
        datagram is dropped.
        """
        import time

        nets = BorderedSubnets()
        self.addCleanup(nets.close)
        nets.start()
        alice, bob = nets.member("alice"), nets.member("bob")
        carol, dave = nets.member("carol"), nets.member("dave")
        east_border, west_border = nets.east.border, nets.west.border
        with nets.wan.capture("to-east") as wan, nets.east.switch.capture() as east, \
                nets.west.switch.capture() as west:
            self.assertTrue(alice.ping(carol, count=3, timeout=8, pattern=PING_PATTERN), "alice cannot reach carol")
            self.assertTrue(dave.ping(bob, count=3, pattern=PING_PATTERN), "dave cannot reach bob")
            self.assertTrue(nets.east.tcp_exchange(alice, dave))
            self.assertTrue(nets.east.tcp_exchange(carol, bob, port=5002))
        for capture in (wan, east, west):
            capture.stop()
        # The WAN: only NETKEY datagrams between the borders.
        wan_datagrams = wan.udp_datagrams(BORDER_PORT)
        self.assertTrue(wan_datagrams)
        self.assertEqual({(d.payload[0], d.payload[1] & 0x7F) for d in wan_datagrams}, {(VERSION, 4)})
        self.assertEqual({d.src for d in wan_datagrams} | {d.dst for d in wan_datagrams},
                         {east_border.wan_address, west_border.wan_address})
        for capture, port in ((wan, BORDER_PORT), (east, 4789), (west, 4789)):
            self.assertTrue(capture.packets())
            self.assertFalse(capture.contains(MARKER), "the marker crossed in clear")
            self.assertFalse(capture.contains(PING_PATTERN))
            for overlay in (nets.east.overlay, nets.west.overlay):
                self.assertEqual(overlay_in_clear(capture.packets(), port=port, overlay=overlay), set())
        # The subnets: pair and group datagrams only, never NETKEY ones.
        for capture in (east, west):
            kinds = {d.payload[1] & 0x7F for d in capture.udp_datagrams(4789)}
            self.assertTrue(kinds)
            self.assertLessEqual(kinds, {1, 2})
        # The borders' status: the link, its prefixes, traffic both ways.
        [link] = east_border.net()["links"]
        self.assertEqual((link["subnet"], link["prefixes"], link["epoch"]), ("west", ["10.231.101.0/24"], 1))
        self.assertGreater(link["tx_frames"], 0)
        self.assertGreater(link["rx_frames"], 0)

        # What must fail: replayed WAN datagrams (whole frames, and every
        # piece of a split frame).
        to_west = [segment for d in wan_datagrams if d.dst == west_border.wan_address
                   for segment in gso_segments(d.payload, 1472)]
        replayed = [d for d in to_west if parse_header(d).count == 1][:10]
        self.assertEqual(len(replayed), 10)
        frames = {}
        for d in to_west:
            header = parse_header(d)
            if header.count > 1:
                frames.setdefault(header.counter - header.index, {})[header.index] = (header.count, d)
        whole = [pieces for pieces in frames.values() if len(pieces) == next(iter(pieces.values()))[0]]
        if whole:
            replayed += [d for _, (_, d) in sorted(whole[0].items())]
        before = west_border.net()["links"][0]["drops"].get("replay", 0)
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for line in sys.stdin.read().split():\n"
                f"    s.sendto(bytes.fromhex(line), ('{west_border.wan_address}', {BORDER_PORT}))\n")
        nets.wan.run([sys.executable, "-c", code], input="\n".join(p.hex() for p in replayed))
        time.sleep(0.5)
        after = west_border.net()["links"][0]["drops"].get("replay", 0)
        self.assertEqual(after - before, len(replayed))
        # A third subnet (its own CA) and an impostor of west (west's CA,
        # another name) ask east for a NETKEY and are refused.
        north = self._rogue_keyserver(nets, "keyserver.north", None, "north", 3)
        impostor = self._rogue_keyserver(nets, "laptop.west", nets.west.pki_dir, "west", 4)
        def east_log():
            with open(nets.east.ks_log, errors="replace") as f:
                return f.read()

        poll(lambda: f"{nets.MGMT}.3" in east_log() and "laptop.west" in east_log(), 20, 0.2)
        east_log = east_log()
        self.assertIn(f"TLS handshake from key server at {nets.MGMT}.3", east_log)
        self.assertIn("laptop.west", east_log)
        self.assertIn("not that of a configured peer", east_log)
        for log_path in (north, impostor):
            text = open(log_path, errors="replace").read()
            self.assertNotIn("connected to the key server of subnet east", text)
            self.assertNotIn("new NETKEY", text)
        # ... and the real link is untouched.
        self.assertTrue(alice.ping(carol, count=2))

    def test_netkey_rekey_under_traffic(self):
        """
        The operator replaces the NETKEY on the key server that leads the
        link (east) while alice pings carol: both borders move to epoch 2
        and not one ping is lost.  The operator's views show the link.
        """
        import subprocess
        import time

        nets = BorderedSubnets()
        self.addCleanup(nets.close)
        nets.start()
        alice, carol = nets.member("alice"), nets.member("carol")
        east_border, west_border = nets.east.border, nets.west.border
        self.assertTrue(alice.ping(carol, count=2, timeout=8))
        flood = alice.host.popen(["ping", "-n", "-q", "-i", "0.02", "-c", "150", "-W", "2", carol.overlay],
                                 stdout=subprocess.PIPE, text=True)
        time.sleep(1)

        def cli(lan, *args, host=None):
            return (host or lan.keyserver).run(
                ["env", f"PYTHONPATH={CODE_ROOT}", sys.executable, "-m", "securelan.cli", *args],
                timeout=30, check=False)

        result = cli(nets.east, "rekey", "--netkey", "west", "--socket", nets.east.admin_socket)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("epoch 2", result.stdout)
        refused = cli(nets.west, "rekey", "--netkey", "east", "--socket", nets.west.admin_socket)
        self.assertNotEqual(refused.returncode, 0, "the follower made a NETKEY")
        out = flood.communicate(timeout=30)[0]
        self.assertIn(" 0% packet loss", out, out)
        self.assertEqual(self._border_epochs(east_border, west_border, 2, 10), [2, 2])
        self.assertTrue(alice.ping(carol, count=2))
        keys = cli(nets.east, "keys", "--socket", nets.east.admin_socket)
        self.assertIn("NETKEY with subnet west (leader, connected): epoch 2", keys.stdout)
        status = cli(nets.east, "status", "--socket", east_border.status_socket, host=east_border.host)
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("link: subnet west  border edge-w", status.stdout)
        self.assertIn("prefixes: 10.231.101.0/24  NETKEY epoch: 2", status.stdout)

        # The management link between the key servers cut: the borders keep
        # their NETKEY and the subnets keep talking; once it is back, the
        # key servers agree the next NETKEY again.
        nets.east.keyserver.ip("link", "set", "eth1", "down")
        self.assertTrue(alice.ping(carol, count=5, pattern=PING_PATTERN), "NETKEY holders stopped working")
        self.assertTrue(nets.east.tcp_exchange(carol, alice, port=5003))
        nets.east.keyserver.ip("link", "set", "eth1", "up")
        result = cli(nets.east, "rekey", "--netkey", "west", "--socket", nets.east.admin_socket)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self._border_epochs(east_border, west_border, 3, 30), [3, 3])
        self.assertTrue(alice.ping(carol, count=2))


class BorderNATTests(E2ETestCase):
    def test_border_behind_nat_survives_conntrack_flush(self):
        """
        East's border sits behind a NAT router (nftables masquerade, random
        ports); its key server announces only the NAT's outside address.
        West's border learns the mapping from east's authenticated
        datagrams; when the NAT's connection tracking is flushed in the
        middle of a transfer the mapping changes, west follows it, and the
        transfer survives.  The NAT's outside carries only NETKEY
        ciphertext.
        """
        import subprocess
        import time

        nets = BorderedSubnets(nat=True)
        self.addCleanup(nets.close)
        nets.start()
        alice, dave = nets.member("alice"), nets.member("dave")
        west_border = nets.west.border
        self.assertTrue(alice.ping(dave, count=2, timeout=8))
        before = west_border.net()["links"][0]["endpoint"]
        self.assertTrue(before.startswith("10.231.250.1:"), before)
        with nets.wan.capture("to-east") as wan:
            server = dave.host.popen(["iperf3", "-s", "-1", "-B", dave.overlay], stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            client = alice.host.popen(["iperf3", "-c", dave.overlay, "-t", "8", "-J"], stdout=subprocess.PIPE)
            time.sleep(3)
            flushed = nets.nat.run(["conntrack", "-F"], check=False)
            report = json.loads(client.communicate(timeout=60)[0])
            server.wait(timeout=10)
            self.assertTrue(alice.ping(dave, count=2, pattern=PING_PATTERN))
        wan.stop()
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        self.assertNotIn("error", report)
        intervals = [i["sum"]["bytes"] for i in report["intervals"]]
        self.assertGreaterEqual(len(intervals), 8)
        self.assertGreater(intervals[-1], 0, f"the transfer did not survive: {intervals}")
        after = west_border.net()["links"][0]["endpoint"]
        self.assertTrue(after.startswith("10.231.250.1:"), after)
        self.assertNotEqual(after, before, "the NAT mapping did not change")
        self.assertIn("border of subnet east now at", west_border.log_text())
        self.assertFalse(wan.contains(MARKER))
        self.assertFalse(wan.contains(PING_PATTERN))
        kinds = {d.payload[1] & 0x7F for d in wan.udp_datagrams(BORDER_PORT)}
        self.assertEqual(kinds, {4})


class LifecycleE2ETests(E2ETestCase):
    def admin(self, lan, *args):
        return lan.keyserver.run(
            ["env", f"PYTHONPATH={CODE_ROOT}", sys.executable, "-m", "securelan.cli", *args,
             "--socket", lan.admin_socket], timeout=30, check=False)

    def test_rekey_every_second_under_load(self):
        """
        With a pair-key lifetime of one second, the key server replaces the
        key of alice and bob every second for 30 s while iperf3 runs and a
        ping flood goes on: not one ping is lost and the transfer never
        stalls.
        """
        import subprocess
        import time

        lan = self.lan(names=("alice", "bob"), pair_key_lifetime=1)
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        self.assertTrue(alice.ping(bob, count=2))
        server = bob.host.popen(["iperf3", "-s", "-1", "-B", bob.overlay], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        client = alice.host.popen(["iperf3", "-c", bob.overlay, "-t", "30", "-J"], stdout=subprocess.PIPE)
        flood = alice.host.popen(["ping", "-n", "-q", "-i", "0.01", "-c", "2800", bob.overlay],
                                 stdout=subprocess.PIPE, text=True)
        first = alice.peer("bob")["epoch"]
        report = json.loads(client.communicate(timeout=60)[0])
        ping_out = flood.communicate(timeout=60)[0]
        server.wait(timeout=10)
        self.assertIn(" 0% packet loss", ping_out, ping_out)
        intervals = [i["sum"]["bytes"] for i in report["intervals"]]
        self.assertTrue(all(b > 0 for b in intervals), f"the transfer stalled: {intervals}")
        epoch = alice.peer("bob")["epoch"]
        self.assertGreaterEqual(epoch - first, 25, "fewer rekeys than one a second")
        self.assertEqual(bob.peer("alice")["epoch"], epoch)

    def test_sigkill_during_rekeys_converges(self):
        """
        With a pair-key lifetime of one second the key server is rekeying
        all the time; it is killed with SIGKILL at arbitrary moments (so at
        any step of a rekey: before, between or after the store write and
        the pushes) and restarted, five times.  Afterwards, with no manual
        repair, both members hold the same epoch and talk.
        """
        import random
        import time

        lan = self.lan(names=("alice", "bob"), pair_key_lifetime=1)
        lan.start()
        alice, bob = lan["alice"], lan["bob"]
        self.assertTrue(alice.ping(bob, count=2))
        rng = random.Random(11)
        for _ in range(5):
            time.sleep(rng.uniform(0.3, 1.7))
            lan.kill_keyserver()
            time.sleep(rng.uniform(0.0, 1.0))
            lan.start_keyserver()
        def converged():
            ok = alice.ping(bob, count=1, timeout=2)
            a, b = alice.peer("bob"), bob.peer("alice")
            return ok and a and b and a["epoch"] == b["epoch"]

        self.assertTrue(poll(converged, 20, 0), "alice and bob did not converge after the key server's crashes")
        self.assertEqual(alice.peer("bob")["epoch"], bob.peer("alice")["epoch"])
        self.assertGreater(alice.peer("bob")["epoch"], 3, "the key server was not rekeying")
        self.assertTrue(bob.ping(alice, count=5))

    def test_revocation_under_traffic(self):
        """
        carol is revoked while she pings alice and alice pings bob: within a
        second carol gets nothing through, and alice and bob carry on.
        """
        import re
        import subprocess
        import time

        lan = self.lan()
        lan.start()
        alice, bob, carol = lan["alice"], lan["bob"], lan["carol"]
        self.assertTrue(carol.ping(alice, count=2))
        self.assertTrue(alice.ping(bob, count=2))
        carol_ping = carol.host.popen(["ping", "-n", "-D", "-i", "0.05", "-w", "6", alice.overlay],
                                      stdout=subprocess.PIPE, text=True)
        # A count, not a deadline: the last echo of a deadline may not be
        # answered before it.
        alice_ping = alice.host.popen(["ping", "-n", "-q", "-i", "0.05", "-c", "110", "-W", "2", bob.overlay],
                                      stdout=subprocess.PIPE, text=True)
        time.sleep(2)
        revoked_at = time.time()
        result = self.admin(lan, "revoke", "carol", "--reason", "test")
        self.assertEqual(result.returncode, 0, result.stderr)
        carol_out = carol_ping.communicate(timeout=30)[0]
        alice_out = alice_ping.communicate(timeout=30)[0]
        replies = [float(t) for t in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", carol_out, re.M)]
        self.assertTrue(any(t < revoked_at for t in replies), carol_out)
        late = [t for t in replies if t > revoked_at + 1.0]
        self.assertEqual(late, [], "carol still got replies more than a second after her revocation")
        self.assertIn(" 0% packet loss", alice_out, alice_out)
        # Nothing she sends reaches alice any more.
        self.assertFalse(carol.ping(alice, count=2, timeout=3))
