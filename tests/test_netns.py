"""
Tests for L{securelan.netns}.

These build real network namespaces and so need root; they fail (they do not
skip) when that is impossible, since CI runs them as root.
"""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

from twisted.trial.unittest import SynchronousTestCase

import securelan
from securelan import netns
from securelan.netns import Capture, Lab, LabError, read_pcap

MARKER = b"SL-MARK-7f3a"


def namespaces():
    """
    @return: the names of all network namespaces (from C{ip netns list}).
    """
    output = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def send_udp(host, address, port, payload):
    """
    Send one UDP datagram from C{host} to C{address} (a lab address).
    """
    family = "AF_INET6" if ":" in address else "AF_INET"
    host.run(
        [
            "python3",
            "-c",
            "import socket, sys; s = socket.socket(socket.%s, socket.SOCK_DGRAM); "
            "s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))" % (family,),
            payload.hex(),
            address,
            str(port),
        ]
    )


def gone(pid, timeout=5.0):
    """
    Wait until process C{pid} has exited (it may stay a zombie until its new
    parent reaps it); return whether it did within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % (pid,)) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


class LabTestCase(SynchronousTestCase):
    """
    Base: checks that namespaces can be built and provides a star LAN.
    """

    def setUp(self):
        """
        Fail loudly if this process cannot build namespaces.
        """
        ok, reason = netns.available()
        if not ok:
            self.fail("securelan.netns cannot build namespaces here: " + reason)

    def lan(self, count=3, **kwargs):
        """
        Build a lab with switch C{lan} and hosts h1..hN at 10.231.1.N/24 and
        fd5e:c1a:0:1::N/64, MAC 02:00:00:00:01:0N; closed after the test.

        @return: C{(lab, switch, hosts)}.
        """
        lab = Lab(**kwargs)
        self.addCleanup(lab.close)
        switch = lab.switch("lan")
        hosts = []
        for i in range(1, count + 1):
            host = lab.host("h%d" % (i,))
            lab.link(
                host,
                switch,
                mac="02:00:00:00:01:%02x" % (i,),
                addresses=["10.231.1.%d/24" % (i,), "fd5e:c1a:0:1::%d/64" % (i,)],
            )
            hosts.append(host)
        return lab, switch, hosts

    def assertNoNamespaces(self, prefix, wait=0.0):
        """
        Assert that no namespace name starts with C{prefix} (within C{wait}
        seconds: another process may be deleting them).
        """
        deadline = time.monotonic() + wait
        while [n for n in namespaces() if n.startswith(prefix)] and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual([n for n in namespaces() if n.startswith(prefix)], [])


class AvailableTests(LabTestCase):
    """
    Tests for L{netns.available}.
    """

    def test_available(self):
        """
        As root with iproute2 installed, C{available} says yes and leaves no
        probe namespace behind.
        """
        calls = []
        real_run = netns._run

        def recording_run(argv, **kwargs):
            calls.append(argv)
            return real_run(argv, **kwargs)

        self.patch(netns, "_run", recording_run)
        self.assertEqual(netns.available(), (True, ""))
        [probe] = [argv[3] for argv in calls if argv[:3] == ["ip", "netns", "add"]]
        self.assertRegex(probe, "^" + netns.PREFIX_PATTERN)
        self.assertNotIn(probe, namespaces())


class TopologyTests(LabTestCase):
    """
    Building hosts, switches and cables.
    """

    def test_ping_over_switch(self):
        """
        Three hosts on one switch reach each other over IPv4 and IPv6, and
        everything the lab made lives in namespaces with its prefix.
        """
        lab, switch, (h1, h2, h3) = self.lan()
        self.assertRegex(lab.prefix, "^" + netns.PREFIX_PATTERN + "$")
        self.assertEqual(switch.netns, lab.prefix + "lan")
        self.assertEqual(
            sorted(n for n in namespaces() if n.startswith(lab.prefix)),
            sorted(lab.prefix + n for n in ["lan", "h1", "h2", "h3"]),
        )
        self.assertEqual(switch.ports, ["h1-eth0", "h2-eth0", "h3-eth0"])
        self.assertTrue(h1.ping("10.231.1.2", count=2))
        self.assertTrue(h2.ping("10.231.1.3", count=2))
        self.assertTrue(h3.ping("fd5e:c1a:0:1::1", count=2))
        self.assertFalse(h1.ping("10.231.1.99", count=1, timeout=1))

    def test_mac_and_addresses(self):
        """
        An interface gets the MAC, addresses and MTU asked for, and no IPv6
        link-local address.
        """
        lab = Lab()
        self.addCleanup(lab.close)
        switch, host = lab.switch("sw"), lab.host("a")
        link = lab.link(
            host,
            switch,
            ifname="lan0",
            mac="02:AA:00:00:00:01",
            addresses=["10.231.2.1/24", "fd5e:c1a:0:2::1/64"],
            mtu=1400,
        )
        self.assertEqual(
            (link.host, link.ifname, link.peer, link.peer_ifname), (host, "lan0", switch, "a-lan0")
        )
        self.assertEqual(host.mac("lan0"), "02:aa:00:00:00:01")
        self.assertEqual(host.addresses("lan0"), ["10.231.2.1/24", "fd5e:c1a:0:2::1/64"])
        self.assertIn("mtu 1400", host.ip("link", "show", "dev", "lan0"))
        host.add_address("lan0", "10.231.2.5/24")
        self.assertIn("10.231.2.5/24", host.addresses("lan0"))

    def test_outside_allowed_networks(self):
        """
        Addresses and routes outside 10.231.0.0/16 and fd5e:c1a::/48 are
        refused unless the lab allows them.
        """
        lab = Lab()
        self.addCleanup(lab.close)
        switch, host = lab.switch("sw"), lab.host("a")
        self.assertRaises(LabError, lab.link, host, switch, addresses=["192.168.1.1/24"])
        self.assertRaises(LabError, host.add_route, "10.0.0.0/8", "10.231.0.1")
        self.assertRaises(LabError, host.add_address, "eth0", "fd5e:c1a:1::1/64")

    def test_bad_names(self):
        """
        Bad or duplicate names are refused before anything is made.
        """
        lab = Lab()
        self.addCleanup(lab.close)
        lab.host("a")
        self.assertRaises(LabError, lab.host, "a")
        self.assertRaises(LabError, lab.switch, "a")
        self.assertRaises(LabError, lab.host, "A/b")
        self.assertRaises(LabError, lab.link, lab.hosts["a"], lab.switch("sw"), ifname="x" * 16)

    def test_routed(self):
        """
        With L{Lab.link_hosts}, C{sysctl} and C{add_route}, a router joins
        two subnets.
        """
        lab = Lab()
        self.addCleanup(lab.close)
        a, r, b = lab.host("a"), lab.host("r"), lab.host("b")
        lab.link_hosts(a, r, "wan0", "left", ["10.231.10.2/24"], ["10.231.10.1/24"])
        lab.link_hosts(
            b, r, "wan0", "right", ["10.231.20.2/24"], ["10.231.20.1/24"], b_mac="02:00:00:00:20:01"
        )
        self.assertEqual(r.mac("right"), "02:00:00:00:20:01")
        a.add_route("10.231.20.0/24", "10.231.10.1")
        b.add_route("default", "10.231.20.1")
        self.assertFalse(a.ping("10.231.20.2", count=1, timeout=1))
        self.assertEqual(r.sysctl("net.ipv4.ip_forward", 1), "1")
        self.assertTrue(a.ping("10.231.20.2", count=2))


class CaptureTests(LabTestCase):
    """
    Tests for L{Capture}.
    """

    def test_marker_on_bridge(self):
        """
        A capture on the bridge sees a marker that a ping carries between two
        ports; a capture of traffic without the marker does not find it.
        """
        lab, switch, (h1, h2, h3) = self.lan()
        with switch.capture() as marked:
            self.assertTrue(h1.ping("10.231.1.2", count=2, pattern=MARKER))
        self.assertTrue(marked.contains(MARKER))

        with switch.capture() as plain:
            self.assertTrue(h1.ping("10.231.1.3", count=2))
        self.assertFalse(plain.contains(MARKER))
        self.assertGreaterEqual(len(plain.packets()), 4)

    def test_started_and_flushed(self):
        """
        A capture records the very first datagram sent after it returns and,
        after C{stop}, the last one sent before: one UDP datagram each, to
        and from lab addresses only.
        """
        lab, switch, (h1, h2, h3) = self.lan()
        capture = h3.capture("eth0")
        send_udp(h1, "10.231.1.3", 4000, b"first " + MARKER)
        send_udp(h2, "fd5e:c1a:0:1::3", 4000, b"last " + MARKER)
        data = capture.stop()
        self.assertEqual(data[:4], b"\xd4\xc3\xb2\xa1")
        self.assertIs(capture.stop(), data)
        datagrams = capture.udp_datagrams(4000)
        self.assertEqual(
            [(d.src, d.dst, d.dport, d.payload) for d in datagrams],
            [
                ("10.231.1.1", "10.231.1.3", 4000, b"first " + MARKER),
                ("fd5e:c1a:0:1::2", "fd5e:c1a:0:1::3", 4000, b"last " + MARKER),
            ],
        )
        self.assertEqual(capture.udp_payloads(4001), [])
        self.assertTrue(set(capture.ethertypes()) <= {0x0800, 0x0806, 0x86DD})

    def test_fragments_and_port(self):
        """
        A capture on one bridge port sees only that port's traffic, and
        fragmented UDP datagrams come back whole.
        """
        lab, switch, (h1, h2, h3) = self.lan()
        on_h2 = switch.capture("h2-eth0")
        big = b"x" * 4000 + MARKER
        send_udp(h1, "10.231.1.2", 5000, big)
        send_udp(h1, "fd5e:c1a:0:1::2", 5000, big)
        send_udp(h1, "10.231.1.3", 5000, b"not for h2")
        self.assertEqual(on_h2.udp_payloads(5000), [big, big])
        self.assertGreater(len(on_h2.packets()), 6)

    def test_afpacket_fallback(self):
        """
        The raw-socket recorder used without tcpdump records like tcpdump.
        """
        lab, switch, (h1, h2, h3) = self.lan()
        path = os.path.join(self.mktemp())
        capture = Capture(switch, "br0", path, backend="afpacket")
        self.addCleanup(capture.stop, settle=0)
        self.assertEqual(capture.backend, "afpacket")
        send_udp(h1, "10.231.1.2", 6000, MARKER)
        self.assertTrue(h2.ping("10.231.1.3", count=1))
        self.assertEqual(capture.udp_payloads(6000), [MARKER])
        self.assertIn(0x0806, capture.ethertypes())
        self.assertIn("packets captured", capture.messages)

    def test_bad_interface(self):
        """
        A capture on a missing interface fails at once with the recorder's
        message.
        """
        lab, switch, hosts = self.lan(count=1)
        error = self.assertRaises(LabError, hosts[0].capture, "nope0")
        self.assertIn("nope0", str(error))


class PcapTests(SynchronousTestCase):
    """
    Tests for L{read_pcap}.
    """

    def test_formats(self):
        """
        Both byte orders and nanosecond files parse; a truncated last record
        is ignored.
        """
        for order, magic, unit in [("<", 0xA1B2C3D4, 1e-6), (">", 0xA1B2C3D4, 1e-6), ("<", 0xA1B23C4D, 1e-9)]:
            data = struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
            data += struct.pack(order + "IIII", 10, 500, 3, 60) + b"abc"
            data += struct.pack(order + "IIII", 11, 0, 5, 5) + b"de"
            linktype, records = read_pcap(data)
            self.assertEqual(linktype, 1)
            self.assertEqual(records, [(10 + 500 * unit, b"abc")])

    def test_not_pcap(self):
        """
        Anything else raises L{ValueError}.
        """
        self.assertRaises(ValueError, read_pcap, b"")
        self.assertRaises(ValueError, read_pcap, b"x" * 40)


CRASHING_LAB = textwrap.dedent(
    """
    import os, subprocess
    from securelan.netns import Lab
    lab = Lab()
    lab.host("a")
    lab.switch("b")
    lab.hosts["a"].popen(["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(lab.prefix, flush=True)
    os._exit(3)
    """
)


class LifetimeTests(LabTestCase):
    """
    Closing labs, killing daemons, and cleaning up after crashed runs.
    """

    def test_close(self):
        """
        C{close} deletes every namespace and the lock file; closing again
        does nothing; a closed lab makes nothing more.
        """
        lab, switch, hosts = self.lan()
        prefix = lab.prefix
        self.assertTrue(os.path.exists(os.path.join(netns.LOCK_DIR, prefix + ".lock")))
        lab.close()
        self.assertNoNamespaces(prefix)
        self.assertFalse(os.path.exists(os.path.join(netns.LOCK_DIR, prefix + ".lock")))
        lab.close()
        self.assertRaises(LabError, lab.host, "late")

    def test_exception(self):
        """
        Leaving the C{with} block by an exception deletes everything too.
        """
        with self.assertRaises(ZeroDivisionError):
            with Lab() as lab:
                lab.link(lab.host("a"), lab.switch("b"), addresses=["10.231.3.1/24"])
                lab.host("c").popen(["sleep", "60"])
                1 / 0
        self.assertNoNamespaces(lab.prefix)

    def test_daemons_killed(self):
        """
        Daemons still running on close get SIGTERM; one that ignores it gets
        SIGKILL after the grace period; their children die with them.
        """
        lab, switch, (h1, h2, h3) = self.lan(grace=0.5)
        polite = h1.popen(["sleep", "60"])
        stubborn = h2.popen(
            ["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"],
            stdout=subprocess.PIPE,
        )
        child = int(stubborn.stdout.readline())
        self.addCleanup(stubborn.stdout.close)
        finished = h3.popen(["true"])
        finished.wait(10)
        started = time.monotonic()
        lab.close()
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(polite.returncode, -signal.SIGTERM)
        self.assertEqual(stubborn.returncode, -signal.SIGKILL)
        self.assertEqual(finished.returncode, 0)
        self.assertTrue(gone(child))

    def test_cleanup_stale(self):
        """
        C{cleanup_stale} deletes the namespaces (and kills the processes) of
        a lab whose process died without closing it, but neither a running
        lab's nor a stale one younger than C{older_than}.
        """
        live = Lab(clean_stale=False)
        self.addCleanup(live.close)
        live.host("alive")

        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(securelan.__file__)))
        crashed = subprocess.run(
            [sys.executable, "-c", CRASHING_LAB], capture_output=True, text=True, timeout=30, env=env
        )
        self.assertEqual(crashed.returncode, 3, crashed.stderr)
        prefix = crashed.stdout.strip()
        self.addCleanup(Lab.cleanup_stale, prefix)
        self.assertEqual(
            sorted(n for n in namespaces() if n.startswith(prefix)), [prefix + "a", prefix + "b"]
        )
        pids = subprocess.run(
            ["ip", "netns", "pids", prefix + "a"], capture_output=True, text=True, timeout=10
        ).stdout.split()
        self.assertEqual(len(pids), 1)

        self.assertEqual(Lab.cleanup_stale(prefix, older_than=time.time() - 3600), [])
        # Another test run's Lab() may clean it up first (or be doing so:
        # its lock makes this call pass the lab over), so <= and not ==.
        deleted = Lab.cleanup_stale(older_than=time.time() + 1)
        self.assertLessEqual({n for n in deleted if n.startswith(prefix)}, {prefix + "a", prefix + "b"})
        self.assertNoNamespaces(prefix, wait=10)
        lock = os.path.join(netns.LOCK_DIR, prefix + ".lock")
        deadline = time.monotonic() + 5
        while os.path.exists(lock) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(os.path.exists(lock))
        self.assertTrue(gone(int(pids[0])))
        self.assertIn(live.prefix + "alive", namespaces())

    def test_cleanup_stale_only_own_names(self):
        """
        Names outside securelan's pattern are never touched, even when the
        given pattern would match them.
        """
        other = "slx-not-ours-%d" % (os.getpid(),)
        subprocess.run(["ip", "netns", "add", other], check=True, timeout=10)
        self.addCleanup(subprocess.run, ["ip", "netns", "delete", other], timeout=10)
        self.assertNotIn(other, Lab.cleanup_stale("sl"))
        self.assertIn(other, namespaces())
