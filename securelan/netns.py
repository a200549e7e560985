# -*- test-case-name: tests.test_netns -*-
"""
Network-namespace labs: real LANs on one machine, for end-to-end tests and demos.

A L{Lab} builds hosts (one network namespace each), switches (a Linux bridge in
a namespace of its own) and the veth cables between them, runs commands and
daemons inside the hosts, and records what crosses a wire with L{Capture}.
Nothing is ever created in the machine's root namespace: every interface,
bridge, address and route lives in a namespace the lab made, so a lab cannot
reach or disturb the machine's real network, and deleting the lab's namespaces
deletes everything in them.

    with Lab() as lab:
        switch = lab.switch("lan")
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, switch, addresses=["10.231.1.1/24"])
        lab.link(b, switch, addresses=["10.231.1.2/24"])
        with switch.capture() as capture:
            assert a.ping("10.231.1.2")
        assert capture.contains(b"...")

Names: every namespace of a lab is C{<prefix><name>} where the prefix is
C{sl<4 random hex digits>-}, unique among the namespaces that exist, so labs
of parallel runs never collide.  A running lab holds an advisory lock on
C{/run/securelan-netns/<prefix>.lock}; L{Lab.cleanup_stale} deletes the
namespaces of labs whose lock nobody holds any more (their process died
before L{Lab.close} ran).  Only names of securelan's own pattern are touched.

By default addresses and routes must lie in 10.231.0.0/16 or fd5e:c1a::/48
(see C{allowed_networks}).  Interfaces get no IPv6 link-local address and IPv6
addresses skip duplicate address detection, so a wire carries only what the
test sends (plus ARP, neighbour discovery and MLD reports).

This module is test and demo infrastructure: it uses blocking subprocess
calls (C{ip}, C{tcpdump}), each bounded by a timeout, and needs root.
"""

import atexit
import collections
import errno
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

__all__ = [
    "Capture",
    "CommandFailed",
    "DEFAULT_NETWORKS",
    "Host",
    "Lab",
    "LabError",
    "Link",
    "PREFIX_PATTERN",
    "Switch",
    "UDPDatagram",
    "available",
    "capture_backend",
    "read_pcap",
    "terminate",
]

#: A regular expression matching the prefix of every lab's namespace names.
PREFIX_PATTERN = r"sl[0-9a-f]{4}-"
_PREFIX_RE = re.compile(r"^(" + PREFIX_PATTERN + r")")

#: Networks a lab accepts for addresses and routes unless told otherwise.
DEFAULT_NETWORKS = (
    ipaddress.ip_network("10.231.0.0/16"),
    ipaddress.ip_network("fd5e:c1a::/48"),
)

#: Where running labs keep their lock files.
LOCK_DIR = "/run/securelan-netns"

#: Timeout in seconds of the C{ip} calls that build a lab.
IP_TIMEOUT = 10

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
_VLAN_TYPES = (0x8100, 0x88A8)


class LabError(Exception):
    """
    A lab could not be built or used as asked.
    """


class CommandFailed(subprocess.CalledProcessError):
    """
    A command run in or for a lab exited with a non-zero status.

    Unlike L{subprocess.CalledProcessError}, its message includes what the
    command wrote to stderr.
    """

    def __str__(self):
        text = super().__str__()
        stderr = self.stderr
        if isinstance(stderr, bytes):
            stderr = stderr.decode("utf-8", "replace")
        if stderr:
            text += ": " + stderr.strip()
        return text


def _run(argv, timeout=IP_TIMEOUT, check=True, input=None, text=True):
    """
    Run C{argv}, capturing its output; raise L{CommandFailed} on failure.

    @return: the L{subprocess.CompletedProcess}.
    """
    result = subprocess.run(
        argv,
        input=input,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=None if input is not None else subprocess.DEVNULL,
        timeout=timeout,
        text=text,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
    return result


def _basic_check():
    """
    The cheap part of L{available}: platform, root and C{ip}.

    @return: L{None} if fine, else the reason why not.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux, not %s" % (sys.platform,)
    if os.geteuid() != 0:
        return "building network namespaces needs root (euid is %d)" % (os.geteuid(),)
    if shutil.which("ip") is None:
        return "the 'ip' command (Debian package iproute2) is not installed"
    return None


def available():
    """
    Tell whether this process can build labs.

    It must be root, find C{ip}, and be allowed to create a network namespace
    (checked by creating and deleting one).  Tests use the answer to fail
    with a clear message, not to skip.

    @return: C{(True, "")} or C{(False, reason)}.
    """
    reason = _basic_check()
    if reason is not None:
        return False, reason
    existing = _netns_list()
    while True:
        prefix = "sl%s-" % (secrets.token_hex(2),)
        if not any(name.startswith(prefix) for name in existing):
            break
    probe = prefix + "probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (OSError, subprocess.SubprocessError) as e:
        return False, "cannot create a network namespace: %s" % (e,)
    try:
        _run(["ip", "netns", "delete", probe], check=False)
    except (OSError, subprocess.SubprocessError):
        pass
    return True, ""


def capture_backend():
    """
    Name the recorder that L{Capture} will use.

    @return: C{"tcpdump"} when tcpdump is installed, else C{"afpacket"} (a
        raw packet socket in a helper Python process).
    """
    return "tcpdump" if shutil.which("tcpdump") else "afpacket"


def terminate(process, grace=3.0):
    """
    Stop a process started by L{Host.popen}: SIGTERM, then SIGKILL after
    C{grace} seconds.

    The signals go to the process group when the process leads its own
    session (the L{Host.popen} default), so its children stop as well.

    @return: the process's exit status.
    """
    if process.poll() is not None:
        return process.returncode
    _signal(process, signal.SIGTERM)
    try:
        return process.wait(grace)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        return process.wait(IP_TIMEOUT)


def _signal(process, signum):
    """
    Send C{signum} to C{process}'s group if it leads one, else to it.
    """
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def _netns_list():
    """
    @return: the names of all named network namespaces.
    """
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def _kill_namespace_processes(netns):
    """
    SIGKILL every process still inside the namespace C{netns}.
    """
    result = _run(["ip", "netns", "pids", netns], check=False)
    for word in result.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


def _delete_namespace(netns):
    """
    Kill what runs in C{netns} and delete it; the interfaces inside go with it.
    """
    _kill_namespace_processes(netns)
    _run(["ip", "netns", "delete", netns], check=False)


class _Namespace:
    """
    What hosts and switches share: a network namespace of a lab.

    @ivar lab: the L{Lab}.
    @ivar name: the short name given to the lab.
    @ivar netns: the namespace's full name (the lab's prefix and C{name}).
    """

    def __init__(self, lab, name, netns):
        self.lab = lab
        self.name = name
        self.netns = netns

    def __repr__(self):
        return "<%s %s>" % (type(self).__name__, self.netns)

    def ip(self, *args, timeout=IP_TIMEOUT, check=True):
        """
        Run C{ip args...} in this namespace (C{ip -n <netns> args...}).

        @return: its standard output.
        """
        return _run(["ip", "-n", self.netns] + list(args), timeout=timeout, check=check).stdout

    def _ip_batch(self, commands):
        """
        Run several C{ip} commands (without the leading C{ip}) in one process.
        """
        _run(["ip", "-n", self.netns, "-batch", "-"], input="\n".join(commands) + "\n")

    def _ip_json(self, *args):
        """
        Run C{ip -j args...} in this namespace; return the decoded JSON.
        """
        return json.loads(_run(["ip", "-j", "-n", self.netns] + list(args)).stdout or "[]")

    def run(self, argv, timeout=30, check=True, input=None, text=True):
        """
        Run C{argv} in this namespace and wait for it (C{ip netns exec}).

        Output is captured.  A command still running after C{timeout} seconds
        is killed and L{subprocess.TimeoutExpired} raised.

        @param check: raise L{CommandFailed} if it exits with non-zero status.
        @param text: decode output (and encode C{input}) as text.
        @return: the L{subprocess.CompletedProcess}.
        """
        return _run(
            ["ip", "netns", "exec", self.netns] + list(argv),
            timeout=timeout,
            check=check,
            input=input,
            text=text,
        )

    def popen(self, argv, **kwargs):
        """
        Start C{argv} in this namespace and return its L{subprocess.Popen}.

        For daemons: the lab terminates whatever is still running when it
        closes (see L{terminate}).  Keyword arguments go to C{Popen}; by
        default stdin is /dev/null and the process leads a new session, so
        stopping it stops its children too.  C{ip netns exec} replaces
        itself with the command, so the C{Popen}'s pid is the command's.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(["ip", "netns", "exec", self.netns] + list(argv), **kwargs)
        self.lab._processes.append(process)
        return process

    def sysctl(self, key, value=None):
        """
        Read or set a sysctl of this namespace, e.g. C{net.ipv4.ip_forward}.

        @param key: dotted (C{net.ipv4.ip_forward}) or a path under
            C{/proc/sys} with slashes.
        @param value: the new value, or L{None} to only read.
        @return: the value (as read back, stripped).
        """
        path = "/proc/sys/" + (key.replace(".", "/") if "/" not in key else key.strip("/"))
        if value is not None:
            self.run(["tee", path], input="%s\n" % (value,))
        return self.run(["cat", path]).stdout.strip()

    def mac(self, ifname):
        """
        @return: the MAC address of interface C{ifname}, lower case.
        """
        return self._ip_json("link", "show", "dev", ifname)[0]["address"]

    def addresses(self, ifname):
        """
        @return: the IP addresses on C{ifname} as C{"address/prefixlen"}
            strings (IPv4 then IPv6, in the kernel's order).
        """
        info = self._ip_json("addr", "show", "dev", ifname)
        return [
            "%s/%d" % (a["local"], a["prefixlen"])
            for entry in info
            for a in entry.get("addr_info", [])
        ]

    def capture(self, ifname, snaplen=262144):
        """
        Start recording the frames that cross C{ifname} in this namespace.

        Returns once the recorder is really listening.

        @rtype: L{Capture}
        """
        return self.lab._capture(self, ifname, snaplen)


class Host(_Namespace):
    """
    A machine of the lab: a network namespace with loopback up.

    Made by L{Lab.host}; interfaces come from L{Lab.link} and
    L{Lab.link_hosts}.
    """

    def add_address(self, ifname, address):
        """
        Add C{address} (C{"10.231.1.1/24"}) to C{ifname}; IPv6 skips DAD.
        """
        self._ip_batch([_address_command(self.lab._check_interface(address), ifname)])

    def add_route(self, prefix, via, dev=None):
        """
        Route C{prefix} (C{"10.231.2.0/24"} or C{"default"}) through C{via}.

        @param dev: the outgoing interface, if C{via} alone does not say.
        """
        if prefix != "default":
            network = ipaddress.ip_network(prefix, strict=False)
            self.lab._check_allowed(network)
        gateway = ipaddress.ip_address(via)
        self.lab._check_allowed(ipaddress.ip_network(gateway))
        args = ["-%d" % (gateway.version,), "route", "add", prefix, "via", str(gateway)]
        if dev is not None:
            args += ["dev", dev]
        self.ip(*args)

    def ping(self, address, count=3, timeout=5.0, interval=0.2, size=None, pattern=None, source=None):
        """
        Ping C{address} from this host.

        @param source: the source address to send from (C{ping -I}).
        @param count: how many echo requests to send.
        @param timeout: the deadline in seconds for all C{count} replies.
        @param pattern: bytes to fill the payload with (at most 16;
            C{ping -p}), e.g. a marker to find in a capture.
        @return: whether all C{count} replies arrived before the deadline.
        """
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval)]
        argv += ["-w", str(max(1, int(round(timeout))))]
        if size is not None:
            argv += ["-s", str(size)]
        if pattern is not None:
            if not 0 < len(pattern) <= 16:
                raise ValueError("a ping pattern has 1 to 16 bytes")
            argv += ["-p", pattern.hex()]
        if source is not None:
            argv += ["-I", str(source)]
        argv.append(str(address))
        result = self.run(argv, timeout=timeout + 5, check=False)
        return result.returncode == 0


class Switch(_Namespace):
    """
    An Ethernet switch: bridge C{br0} in a namespace of its own.

    Made by L{Lab.switch}.  Multicast snooping is off, so the bridge floods
    multicast to every port like a simple hub would; STP is off.

    @ivar bridge: the bridge's name in the switch namespace (C{"br0"}).
    @ivar ports: the names of the bridge ports, in the order linked.
    """

    bridge = "br0"

    def __init__(self, lab, name, netns):
        super().__init__(lab, name, netns)
        self.ports = []

    def capture(self, ifname=None, snaplen=262144):
        """
        Start recording on the bridge (the default; it sees every frame any
        port sends) or on one port (a name from L{Switch.ports}).

        @rtype: L{Capture}
        """
        return super().capture(self.bridge if ifname is None else ifname, snaplen)


class Link:
    """
    A veth cable made by L{Lab.link} or L{Lab.link_hosts}.

    @ivar host: the host at the first end.
    @ivar ifname: the interface's name in C{host}.
    @ivar peer: the L{Switch} or L{Host} at the other end.
    @ivar peer_ifname: the interface's name in C{peer} (a bridge port for a
        switch).
    """

    def __init__(self, host, ifname, peer, peer_ifname):
        self.host = host
        self.ifname = ifname
        self.peer = peer
        self.peer_ifname = peer_ifname

    def __repr__(self):
        return "<Link %s:%s -- %s:%s>" % (self.host.name, self.ifname, self.peer.name, self.peer_ifname)


def _check_name(name, what):
    """
    Refuse a host or switch name that would make an awkward namespace name.
    """
    if not _NAME_RE.fullmatch(name):
        raise LabError("%s name %r: use 1-20 of a-z, 0-9 and -, starting alphanumeric" % (what, name))


def _check_ifname(ifname):
    """
    Refuse an interface name Linux would refuse.
    """
    if not (0 < len(ifname) <= 15) or re.search(r"[\s/:]", ifname) or ifname in (".", ".."):
        raise LabError("bad interface name %r (1-15 characters, no '/', ':' or spaces)" % (ifname,))


def _check_mac(mac):
    """
    @return: C{mac} in lower case, if it is a MAC address.
    """
    mac = mac.lower()
    if not _MAC_RE.fullmatch(mac):
        raise LabError("bad MAC address %r" % (mac,))
    return mac


def _address_command(interface, ifname):
    """
    The C{ip} batch line that adds C{interface} to C{ifname}.
    """
    line = "addr add %s dev %s" % (interface.with_prefixlen, ifname)
    if interface.version == 6:
        line += " nodad"
    return line


def _interface_commands(lab, ifname, addresses):
    """
    The C{ip} batch lines that make C{ifname} quiet and up with C{addresses}.
    """
    commands = ["link set dev %s addrgenmode none" % (ifname,)]
    commands += [_address_command(lab._check_interface(a), ifname) for a in addresses]
    commands.append("link set dev %s up" % (ifname,))
    return commands


_open_labs = set()


@atexit.register
def _close_open_labs():
    """
    Close the labs a program forgot to close (or could not, on SystemExit).
    """
    for lab in list(_open_labs):
        lab.close()


class Lab:
    """
    A set of namespaces, cables, daemons and captures, deleted as one.

    Use as a context manager (C{with Lab() as lab:}) or call L{close}; either
    way everything goes, also when the block raises.  A lab that a program
    forgets to close is closed at exit; a process killed outright leaves
    namespaces that the next lab's L{cleanup_stale} removes.

    @ivar prefix: the prefix of this lab's namespace names (C{"sl1a2b-"}).
    @ivar created: when the lab was made (seconds since the epoch).
    @ivar hosts: the L{Host}s by name.
    @ivar switches: the L{Switch}es by name.
    """

    def __init__(self, clean_stale=True, allowed_networks=DEFAULT_NETWORKS, grace=3.0, workdir=None):
        """
        @param clean_stale: first remove leftovers of crashed labs
            (L{cleanup_stale} for labs older than this one).
        @param allowed_networks: networks that addresses and routes must lie
            in; L{None} allows anything.
        @param grace: seconds that L{close} gives daemons between SIGTERM and
            SIGKILL.
        @param workdir: where captures write their pcap files, which are then
            kept; by default a temporary directory deleted on close.
        """
        reason = _basic_check()
        if reason is not None:
            raise LabError(reason)
        self.created = time.time()
        self.allowed_networks = (
            None if allowed_networks is None else tuple(ipaddress.ip_network(n) for n in allowed_networks)
        )
        self.grace = grace
        self.hosts = {}
        self.switches = {}
        self._namespaces = []
        self._processes = []
        self._captures = []
        self._closed = False
        if clean_stale:
            self.cleanup_stale(older_than=self.created)
        self.prefix, self._lock_file, self._lock_path = self._claim_prefix()
        _open_labs.add(self)
        if workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="securelan-%s" % (self.prefix,))
            self._own_workdir = True
        else:
            os.makedirs(workdir, exist_ok=True)
            self._workdir = workdir
            self._own_workdir = False

    def __repr__(self):
        return "<Lab %s hosts=%s switches=%s>" % (self.prefix, sorted(self.hosts), sorted(self.switches))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    # -- naming and locking --------------------------------------------------

    @staticmethod
    def _claim_prefix():
        """
        Pick an unused prefix and take its lock, atomically.

        The lock file is made and locked under a temporary name, then
        hard-linked to its final name (which fails if it exists), so nobody
        ever sees the final name unlocked while its lab runs.

        @return: the prefix, the open (locked) lock file and its path.
        """
        os.makedirs(LOCK_DIR, exist_ok=True)
        for _ in range(100):
            prefix = "sl%s-" % (secrets.token_hex(2),)
            if any(name.startswith(prefix) for name in _netns_list()):
                continue
            path = os.path.join(LOCK_DIR, prefix + ".lock")
            temporary = tempfile.NamedTemporaryFile(dir=LOCK_DIR, prefix=".claim-", delete=False)
            try:
                fcntl.flock(temporary.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                temporary.write(b"%d\n" % (os.getpid(),))
                temporary.flush()
                try:
                    os.link(temporary.name, path)
                except FileExistsError:
                    temporary.close()
                    continue
            finally:
                os.unlink(temporary.name)
            return prefix, temporary, path
        raise LabError("no free namespace prefix found")

    @classmethod
    def cleanup_stale(cls, prefix_pattern=PREFIX_PATTERN, older_than=None):
        """
        Delete the leftovers of labs whose process died before closing them.

        A lab is stale when no process holds its lock.  Only namespace names
        that match both C{prefix_pattern} and securelan's own L{PREFIX_PATTERN}
        are considered; processes still inside a stale namespace are killed.

        @param prefix_pattern: a regular expression for the prefixes to
            consider (matched at the start of the namespace name).
        @param older_than: if given (seconds since the epoch), only labs made
            before then are deleted.
        @return: the names of the namespaces deleted.
        """
        wanted = re.compile(prefix_pattern)
        groups = collections.defaultdict(list)
        for name in _netns_list():
            match = _PREFIX_RE.match(name)
            if match and wanted.match(name):
                groups[match.group(1)].append(name)
        try:
            lock_names = os.listdir(LOCK_DIR)
        except FileNotFoundError:
            lock_names = []
        for lock_name in lock_names:
            prefix = lock_name[: -len(".lock")]
            if lock_name.endswith(".lock") and _PREFIX_RE.match(prefix) and wanted.match(prefix):
                groups.setdefault(prefix, [])
        deleted = []
        for prefix, names in sorted(groups.items()):
            lock_path = os.path.join(LOCK_DIR, prefix + ".lock")
            lock = _try_lock(lock_path)
            if lock is _HELD:
                continue
            try:
                if older_than is not None and _lab_birth(lock_path, names) >= older_than:
                    continue
                for name in names:
                    _delete_namespace(name)
                    deleted.append(name)
                if lock is not None:
                    os.unlink(lock_path)
            finally:
                if lock is not None and lock is not _HELD:
                    lock.close()
        return deleted

    def _check_allowed(self, network):
        """
        Refuse C{network} unless it lies inside one of the allowed networks.
        """
        if self.allowed_networks is None:
            return
        for allowed in self.allowed_networks:
            if network.version == allowed.version and network.subnet_of(allowed):
                return
        raise LabError(
            "%s is outside the lab's allowed networks (%s)"
            % (network, ", ".join(str(n) for n in self.allowed_networks))
        )

    def _check_interface(self, address):
        """
        Parse C{address} (C{"10.231.1.1/24"}) and check it is allowed.

        @rtype: L{ipaddress.IPv4Interface} or L{ipaddress.IPv6Interface}
        """
        interface = ipaddress.ip_interface(address)
        self._check_allowed(ipaddress.ip_network(interface.ip))
        return interface

    # -- building ------------------------------------------------------------

    def _new_namespace(self, cls, name):
        """
        Check C{name} and make a namespace for a C{cls} (L{Host} or L{Switch}).
        """
        if self._closed:
            raise LabError("the lab is closed")
        _check_name(name, cls.__name__.lower())
        if name in self.hosts or name in self.switches:
            raise LabError("the lab already has a namespace named %r" % (name,))
        netns = self.prefix + name
        _run(["ip", "netns", "add", netns])
        self._namespaces.append(netns)
        node = cls(self, name, netns)
        return node

    def host(self, name):
        """
        Make a host: a new namespace with loopback up.

        @rtype: L{Host}
        """
        host = self._new_namespace(Host, name)
        self.hosts[name] = host
        host.ip("link", "set", "lo", "up")
        return host

    def switch(self, name):
        """
        Make a switch: a namespace holding bridge C{br0}, up.

        The bridge has no address and sends nothing of its own.

        @rtype: L{Switch}
        """
        switch = self._new_namespace(Switch, name)
        self.switches[name] = switch
        switch._ip_batch(
            [
                "link set lo up",
                "link add %s type bridge stp_state 0 mcast_snooping 0" % (switch.bridge,),
                "link set dev %s addrgenmode none" % (switch.bridge,),
                "link set dev %s up" % (switch.bridge,),
            ]
        )
        return switch

    def link(self, host, switch, ifname="eth0", mac=None, addresses=(), mtu=1500):
        """
        Cable C{host} to C{switch} with a veth pair.

        The host's end is named C{ifname}, gets C{mac} (random if L{None}),
        the C{addresses} (C{"10.231.1.1/24"}, C{"fd5e:c1a:1::1/64"}) and
        C{mtu}, and is up.  The other end becomes a port of the switch's
        bridge, named C{<host>-<ifname>} if that fits in 15 characters.

        @rtype: L{Link}
        """
        _check_ifname(ifname)
        port = "%s-%s" % (host.name, ifname)
        if len(port) > 15 or port in switch.ports or port == switch.bridge:
            port = "p%d" % (len(switch.ports),)
        self._veth(host, ifname, mac, switch, port, None, mtu)
        switch.ports.append(port)
        switch._ip_batch(
            [
                "link set dev %s addrgenmode none" % (port,),
                "link set dev %s master %s" % (port, switch.bridge),
                "link set dev %s up" % (port,),
            ]
        )
        host._ip_batch(_interface_commands(self, ifname, addresses))
        return Link(host, ifname, switch, port)

    def link_hosts(
        self,
        a,
        b,
        a_ifname="eth0",
        b_ifname="eth0",
        a_addresses=(),
        b_addresses=(),
        a_mac=None,
        b_mac=None,
        mtu=1500,
    ):
        """
        Cable two hosts directly with a veth pair (for routed or WAN links).

        Each end is named, addressed and given a MAC as L{link} does.

        @rtype: L{Link}
        """
        _check_ifname(a_ifname)
        _check_ifname(b_ifname)
        self._veth(a, a_ifname, a_mac, b, b_ifname, b_mac, mtu)
        a._ip_batch(_interface_commands(self, a_ifname, a_addresses))
        b._ip_batch(_interface_commands(self, b_ifname, b_addresses))
        return Link(a, a_ifname, b, b_ifname)

    def _veth(self, a, a_ifname, a_mac, b, b_ifname, b_mac, mtu):
        """
        Create a veth pair directly in namespaces C{a} and C{b}.
        """
        args = ["link", "add", a_ifname]
        if a_mac is not None:
            args += ["address", _check_mac(a_mac)]
        args += ["mtu", str(int(mtu)), "type", "veth", "peer", "name", b_ifname, "netns", b.netns]
        if b_mac is not None:
            args += ["address", _check_mac(b_mac)]
        args += ["mtu", str(int(mtu))]
        a.ip(*args)

    # -- captures ------------------------------------------------------------

    def _capture(self, node, ifname, snaplen):
        """
        Start a L{Capture} of C{node}'s C{ifname}; L{close} stops it.
        """
        if self._closed:
            raise LabError("the lab is closed")
        path = os.path.join(
            self._workdir, "%s-%s-%d.pcap" % (node.name, ifname, len(self._captures))
        )
        capture = Capture(node, ifname, path, snaplen=snaplen, keep=not self._own_workdir)
        self._captures.append(capture)
        return capture

    # -- closing -------------------------------------------------------------

    def close(self):
        """
        Delete everything the lab made; safe to call more than once.

        Captures stop, daemons get SIGTERM and, after the grace period,
        SIGKILL; anything else left in the namespaces is killed; the
        namespaces (and so every interface in them) are deleted.
        """
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        errors = []
        for capture in self._captures:
            try:
                capture.stop(settle=0)
            except Exception as e:
                errors.append(e)
        running = [p for p in self._processes if p.poll() is None]
        for process in running:
            _signal(process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in running:
            try:
                process.wait(max(0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, signal.SIGKILL)
        for process in running:
            try:
                process.wait(IP_TIMEOUT)
            except subprocess.TimeoutExpired as e:
                errors.append(e)
        for netns in self._namespaces:
            try:
                _delete_namespace(netns)
            except Exception as e:
                errors.append(e)
        if self._own_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        try:
            os.unlink(self._lock_path)
        except FileNotFoundError:
            pass
        self._lock_file.close()
        if errors:
            raise LabError("closing %s: %s" % (self.prefix, "; ".join(str(e) for e in errors)))


_HELD = object()


def _try_lock(path):
    """
    Try to take the lock at C{path}.

    @return: the open, locked file; C{_HELD} if a live lab holds it; L{None}
        if there is no lock file.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return _HELD
        raise
    return f


def _lab_birth(lock_path, names):
    """
    When a lab was made: its lock file's time, else its oldest namespace's.
    """
    times = []
    for path in [lock_path] + [os.path.join("/run/netns", n) for n in names]:
        try:
            times.append(os.stat(path).st_mtime)
        except OSError:
            pass
    return min(times) if times else 0.0


# -- captures ------------------------------------------------------------------

UDPDatagram = collections.namedtuple("UDPDatagram", "src sport dst dport payload")
UDPDatagram.__doc__ = """
A UDP datagram seen in a capture (reassembled if it was fragmented).

Addresses are strings; ports are integers; C{payload} is bytes.
"""

_PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}


def read_pcap(data):
    """
    Parse a classic pcap file.

    A record cut short at the end (a file still being written) is ignored.

    @param data: the file's bytes.
    @return: C{(linktype, records)} where records is a list of
        C{(timestamp, frame)}, timestamp in seconds and frame the captured
        bytes.
    @raise ValueError: if C{data} is not a pcap file.
    """
    if len(data) < 24 or data[:4] not in _PCAP_MAGIC:
        raise ValueError("not a pcap file")
    order, unit = _PCAP_MAGIC[data[:4]]
    (linktype,) = struct.unpack(order + "I", data[20:24])
    linktype &= 0x0FFFFFFF
    records = []
    offset = 24
    header = struct.Struct(order + "IIII")
    while offset + 16 <= len(data):
        seconds, fraction, included, _ = header.unpack_from(data, offset)
        offset += 16
        if offset + included > len(data):
            break
        records.append((seconds + fraction * unit, data[offset : offset + included]))
        offset += included
    return linktype, records


def _ethernet_payload(frame):
    """
    @return: C{(ethertype, payload)} of an Ethernet frame, after any VLAN
        tags, or L{None} if it is too short.
    """
    if len(frame) < 14:
        return None
    offset = 12
    (ethertype,) = struct.unpack_from("!H", frame, offset)
    while ethertype in _VLAN_TYPES and len(frame) >= offset + 6:
        offset += 4
        (ethertype,) = struct.unpack_from("!H", frame, offset)
    return ethertype, frame[offset + 2 :]


_IPV6_EXTENSIONS = (0, 43, 60)


def _ip_datagrams(frames):
    """
    Yield C{(src, dst, protocol, payload)} for the IP datagrams in C{frames},
    reassembling fragments (IPv4 and IPv6) when all of them were captured.
    """
    pending = {}
    for frame in frames:
        parsed = _ethernet_payload(frame)
        if parsed is None:
            continue
        ethertype, packet = parsed
        if ethertype == ETH_P_IP and len(packet) >= 20 and packet[0] >> 4 == 4:
            header_length = (packet[0] & 0x0F) * 4
            total, ident, fragment, protocol = struct.unpack_from("!HHH xB", packet, 2)
            src = str(ipaddress.IPv4Address(packet[12:16]))
            dst = str(ipaddress.IPv4Address(packet[16:20]))
            body = packet[header_length:total]
            more, offset = fragment & 0x2000, (fragment & 0x1FFF) * 8
            if not more and not offset:
                yield src, dst, protocol, body
                continue
            key = (4, src, dst, protocol, ident)
        elif ethertype == ETH_P_IPV6 and len(packet) >= 40 and packet[0] >> 4 == 6:
            (length,) = struct.unpack_from("!H", packet, 4)
            protocol = packet[6]
            src = str(ipaddress.IPv6Address(packet[8:24]))
            dst = str(ipaddress.IPv6Address(packet[24:40]))
            body = packet[40 : 40 + length]
            protocol, body = _skip_ipv6_extensions(protocol, body)
            if protocol != 44:
                if protocol is not None:
                    yield src, dst, protocol, body
                continue
            if len(body) < 8:
                continue
            protocol = body[0]
            fragment, ident = struct.unpack_from("!HI", body, 2)
            more, offset = fragment & 1, fragment & 0xFFF8
            body = body[8:]
            key = (6, src, dst, None, ident)
        else:
            continue
        parts = pending.setdefault(key, {"parts": {}, "total": None, "protocol": protocol})
        parts["parts"][offset] = body
        if offset == 0:
            parts["protocol"] = protocol
        if not more:
            parts["total"] = offset + len(body)
        whole = _reassemble(parts)
        if whole is not None:
            del pending[key]
            protocol = parts["protocol"]
            if key[0] == 6:
                protocol, whole = _skip_ipv6_extensions(protocol, whole)
                if protocol is None:
                    continue
            yield src, dst, protocol, whole


def _skip_ipv6_extensions(protocol, body):
    """
    Skip hop-by-hop, routing and destination-options headers.

    @return: C{(protocol, rest)}; protocol is L{None} if a header is cut.
    """
    while protocol in _IPV6_EXTENSIONS:
        if len(body) < 8:
            return None, b""
        protocol, length = body[0], (body[1] + 1) * 8
        body = body[length:]
    return protocol, body


def _reassemble(parts):
    """
    @return: the reassembled payload once every fragment is in, else L{None}.
    """
    if parts["total"] is None:
        return None
    data = b""
    for offset in sorted(parts["parts"]):
        if offset > len(data):
            return None
        data = data[:offset] + parts["parts"][offset]
    return data if len(data) >= parts["total"] else None


_AFPACKET_RECORDER = r"""
import os, select, signal, socket, struct, sys, time
ifname, path, snaplen = sys.argv[1], sys.argv[2], int(sys.argv[3])
ETH_P_ALL, SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 3, 263, 1, 1
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind((ifname, ETH_P_ALL))
mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
out = open(path, "wb")
out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
out.flush()
stopping = []
signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
signal.signal(signal.SIGINT, lambda *a: stopping.append(1))
sys.stderr.write("listening on %s, link-type EN10MB (Ethernet)\n" % ifname)
sys.stderr.flush()
count = 0
def record(frame):
    now = time.time()
    kept = frame[:snaplen]
    out.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(kept), len(frame)))
    out.write(kept)
    out.flush()
while True:
    if stopping:
        s.setblocking(False)
        while True:
            try:
                record(s.recv(262144))
                count += 1
            except (BlockingIOError, InterruptedError):
                break
        break
    try:
        ready, _, _ = select.select([s], [], [], 0.05)
    except InterruptedError:
        continue
    if ready:
        record(s.recv(262144))
        count += 1
out.close()
sys.stderr.write("%d packets captured\n" % count)
"""


class Capture:
    """
    A recording of the frames crossing one interface of a lab namespace.

    Made by L{Host.capture} and L{Switch.capture}: it runs C{tcpdump -w}
    (or, without tcpdump, a raw packet socket in a helper Python process)
    inside the namespace, in promiscuous mode, and returns once the recorder
    is listening.  L{stop} ends it; the analysis methods stop it first if
    needed.  Also a context manager that stops on exit.

    @ivar node: the L{Host} or L{Switch}.
    @ivar ifname: the interface recorded.
    @ivar path: the pcap file (deleted when the lab closes unless the lab
        was given a C{workdir}).
    @ivar backend: C{"tcpdump"} or C{"afpacket"}.
    """

    def __init__(self, node, ifname, path, snaplen=262144, keep=False, backend=None, timeout=10.0):
        """
        Start recording C{ifname} of C{node} into C{path}.

        @param keep: keep the pcap file after L{stop}.
        @param backend: C{"tcpdump"} or C{"afpacket"}; by default
            L{capture_backend}.
        @param timeout: seconds to wait for the recorder to listen.
        @raise LabError: if it does not.
        """
        self.node = node
        self.ifname = ifname
        self.path = path
        self.backend = backend or capture_backend()
        self._keep = keep
        self._data = None
        self._stderr = []
        self._listening = threading.Event()
        if self.backend == "tcpdump":
            argv = [
                "tcpdump", "-Z", "root", "-n", "-U", "--immediate-mode",
                "-s", str(snaplen), "-i", ifname, "-w", path,
            ]
        else:
            argv = [sys.executable, "-c", _AFPACKET_RECORDER, ifname, path, str(snaplen)]
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", node.netns] + argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.02):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self._reader.join(1)
                terminate(self._process, grace=1)
                raise LabError(
                    "capture on %s:%s did not start: %s"
                    % (node.netns, ifname, "".join(self._stderr).strip() or "no message")
                )

    def __repr__(self):
        state = "stopped" if self._data is not None else "running"
        return "<Capture %s:%s %s>" % (self.node.netns, self.ifname, state)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    def _read_stderr(self):
        """
        Collect the recorder's messages; notice when it starts listening.
        """
        for raw in iter(self._process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            self._stderr.append(line)
            if "listening on" in line:
                self._listening.set()
        self._process.stderr.close()

    def _file_size(self):
        """
        @return: the pcap file's current size in bytes.
        """
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def stop(self, settle=0.1, timeout=10.0):
        """
        Stop recording and return the pcap file's contents.

        Waits first until the file has stopped growing for C{settle} seconds
        (at most 2 seconds), so frames still on their way get written; the
        recorder then writes out what it holds and exits.  Calling again
        returns the same bytes.

        @rtype: L{bytes}
        """
        if self._data is not None:
            return self._data
        if settle:
            size, stable_since, give_up = self._file_size(), time.monotonic(), time.monotonic() + 2
            while time.monotonic() - stable_since < settle and time.monotonic() < give_up:
                time.sleep(settle / 4)
                new = self._file_size()
                if new != size:
                    size, stable_since = new, time.monotonic()
        if self._process.poll() is None:
            _signal(self._process, signal.SIGINT)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                terminate(self._process, grace=1)
        self._reader.join(timeout)
        try:
            with open(self.path, "rb") as f:
                self._data = f.read()
        except FileNotFoundError:
            self._data = b""
        if not self._keep:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        return self._data

    @property
    def messages(self):
        """
        What the recorder wrote to stderr (e.g. tcpdump's packet counts).
        """
        return "".join(self._stderr)

    def records(self):
        """
        @return: C{[(timestamp, frame), ...]} in capture order (stops first).
        """
        data = self.stop()
        if not data:
            return []
        return read_pcap(data)[1]

    def packets(self):
        """
        @return: the raw frames captured, as a list of bytes (stops first).
        """
        return [frame for _, frame in self.records()]

    def contains(self, marker):
        """
        @return: whether any captured frame contains the bytes C{marker}.
        """
        return any(marker in frame for frame in self.packets())

    def ethertypes(self):
        """
        @return: each frame's outermost EtherType (an int; a VLAN tag shows as
            0x8100), in capture order.
        """
        return [struct.unpack_from("!H", frame, 12)[0] for frame in self.packets() if len(frame) >= 14]

    def udp_datagrams(self, port=None):
        """
        The UDP datagrams captured, over IPv4 or IPv6, reassembled from
        fragments when every fragment was captured.

        @param port: if given, only datagrams from or to this port.
        @return: a list of L{UDPDatagram}.
        """
        datagrams = []
        for src, dst, protocol, body in _ip_datagrams(self.packets()):
            if protocol != 17 or len(body) < 8:
                continue
            sport, dport, length = struct.unpack_from("!HHH", body)
            payload = body[8:length] if length >= 8 else body[8:]
            if port is None or port in (sport, dport):
                datagrams.append(UDPDatagram(src, sport, dst, dport, payload))
        return datagrams

    def udp_payloads(self, port=None):
        """
        @return: the payloads of L{udp_datagrams}C{(port)}, as bytes.
        """
        return [d.payload for d in self.udp_datagrams(port)]
