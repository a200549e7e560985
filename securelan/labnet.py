# -*- test-case-name: tests.test_e2e -*-
"""
An encrypted subnet of network namespaces: a key server and member agents,
each a real ``twistd`` process in its own namespace, on one switch.  The
end-to-end tests and the demonstration build theirs with L{EncryptedLAN}.

Addresses: the underlay is 10.231.0.0/24 (key server .10, members .1, .2,
...), the encrypted overlay (the members' TAP devices) 10.231.100.0/24.
Nothing is sent anywhere else.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

import securelan

from . import pki
from .addresses import format_mac
from .netns import Lab, terminate

#: The folder that holds the securelan package in use: the daemons run the
#: same code as whoever builds the lab.
CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(securelan.__file__)))

UNDERLAY = "10.231.0"
OVERLAY = "10.231.100"
KEYSERVER_ADDRESS = f"{UNDERLAY}.10"
KEYSERVER_PORT = 7443
MARKER = b"SECURELAN-MARKER"


def overlay_in_clear(frames, port=4789, overlay=OVERLAY) -> set:
    """
    The overlay addresses found in captured frames outside securelan's
    ciphertext: anywhere in any other frame (an ARP, an IP packet, an ICMP
    error in clear), and in the clear headers of securelan's datagrams.
    The ciphertext itself is not searched: four random bytes match an
    address about once in a thousand megabyte-sized captures, and the
    planted markers already prove no plaintext rides inside it.
    """
    prefix = bytes(int(x) for x in overlay.split("."))
    found = set()
    for frame in frames:
        ethertype = frame[12:14]
        clear = frame
        if ethertype == b"\x88\xb5":
            clear = frame[:14 + 32]
        elif ethertype == b"\x08\x00" and frame[23] == 17:
            start = 14 + (frame[14] & 0x0F) * 4
            ports = (int.from_bytes(frame[start:start + 2], "big"), int.from_bytes(frame[start + 2:start + 4], "big"))
            if port in ports:
                clear = frame[:start + 8 + 32]
        index = clear.find(prefix)
        while index != -1:
            host = clear[index + 3:index + 4]
            if host:
                found.add(f"{overlay}.{host[0]}")
            index = clear.find(prefix, index + 1)
    return found


def poll(probe, timeout, interval=0.1):
    """
    Call C{probe} every C{interval} seconds until it returns something true
    or C{timeout} seconds have passed, and return what it returned last.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(interval)


def member_mac(index: int) -> bytes:
    return bytes([0x02, 0x5E, 0xC0, 0, 0, index])


def python_c(code: str) -> list:
    """
    The argv of a child Python that runs C{code}: with C{-P}, so the working
    directory is not put first on its path and a securelan tree there (a
    checkout the benchmark was started from) cannot shadow the one
    L{child_env} names.
    """
    return [sys.executable, "-P", "-c", code]


#: Runs twistd in a child process (with L{child_env}, the securelan under
#: test and its plugins).
TWISTD = python_c("from twisted.scripts.twistd import run; run()")


def twistd_argv(plugin, config):
    """
    A securelan daemon in the foreground, on C{config}.
    """
    return TWISTD + ["-n", "--pidfile=", plugin, "--config", config]


def child_env():
    """
    The environment of a child process that must run this securelan.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CODE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def status_of(path, timeout=2.0):
    """
    Ask the agent whose status socket is C{path}; None if it does not answer.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(b'{"command": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        return answer["result"] if answer.get("ok") else None
    except (OSError, ValueError, KeyError):
        return None


class Member:
    """
    One member host of an L{EncryptedLAN}.
    """

    role = "client"

    def __init__(self, lan, name, index):
        self.lan = lan
        self.name = name
        self.index = index
        self.mac = member_mac(index)
        self.underlay = f"{lan.underlay}.{index}"
        self.overlay = f"{lan.overlay}.{index}"
        self.host = lan.lab.host(name)
        lan.lab.link(self.host, lan.switch, addresses=[f"{self.underlay}/24"])
        self.config = os.path.join(lan.workdir, f"{name}.toml")
        self.status_socket = os.path.join(lan.workdir, f"{name}.sock")
        self.log = os.path.join(lan.workdir, f"{name}.log")
        self.process = None

    def write_config(self, carrier="udp", on_key_miss="queue"):
        cert, key = self.lan.pki_paths(self.name)
        carrier_lines = 'type = "udp"\nport = 4789' if carrier == "udp" else \
            'type = "ethernet"\ninterface = "eth0"'
        with open(self.config, "w") as f:
            f.write(f"""
[agent]
role = "{self.role}"
ca = "{self.lan.ca}"
certificate = "{cert}"
private_key = "{key}"
key_servers = [{self.lan.key_server_list(self.index)}]
on_key_miss = "{on_key_miss}"
status_socket = "{self.status_socket}"

[device]
name = "slan0"
type = "{"tun" if self.lan.layer3 else "tap"}"
mac = "{format_mac(self.mac)}"
addresses = [{self.device_addresses()}]

[carrier]
{carrier_lines}
{self.extra_config()}""")

    def device_addresses(self):
        return f'"{self.overlay}/24"'

    def extra_config(self):
        return ""

    def start(self, carrier="udp", on_key_miss="queue"):
        self.write_config(carrier, on_key_miss)
        with open(self.log, "ab") as log:
            self.process = self.host.popen(twistd_argv("securelan-agent", self.config), env=child_env(),
                                           stdout=log, stderr=subprocess_stdout())

    def stop(self):
        if self.process is not None:
            terminate(self.process)
            self.process = None

    def status(self):
        return status_of(self.status_socket)

    def wait_registered(self, timeout=20.0):
        def registered():
            status = self.status()
            role = (status or {}).get("role", {})
            if role.get("incarnation") and role.get("group"):
                return status
            # An agent that exited will not register: stop waiting.
            return self.process is not None and self.process.poll() is not None and {}

        status = poll(registered, timeout)
        if not status:
            raise RuntimeError(f"agent {self.name} did not register: {self.log_text()[-3000:]}")
        return status

    def wait_route(self, prefix, timeout=20.0):
        """
        Wait until this host routes C{prefix} (the key server told the
        agent to).
        """
        if not poll(lambda: prefix in self.host.run(["ip", "route", "show", prefix], check=False).stdout, timeout):
            raise RuntimeError(f"{self.name} does not route {prefix}: {self.log_text()[-3000:]}")

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def peer(self, name):
        for peer in (self.status() or {}).get("role", {}).get("peers", []):
            if peer["member_id"] == name:
                return peer
        return None

    def drops(self):
        return (self.status() or {}).get("role", {}).get("drops", {})

    def ping(self, other, **kw):
        return self.host.ping(other.overlay, **kw)


def subprocess_stdout():
    import subprocess

    return subprocess.STDOUT


class Gateway(Member):
    """
    The gateway host: a member of the subnet on the LAN switch (eth0), and
    a port (eth1) on the plaintext network's switch, bridged (br-plain) with
    the agent's TAP device.
    """

    role = "gateway"

    def __init__(self, lan, name, index, plain_switch):
        super().__init__(lan, name, index)
        lan.lab.link(self.host, plain_switch, ifname="eth1")
        self.host.ip("link", "add", "br-plain", "type", "bridge")
        self.host.ip("link", "set", "eth1", "master", "br-plain")
        self.host.ip("link", "set", "br-plain", "up")

    def device_addresses(self):
        return ""

    def extra_config(self):
        return '[gateway]\nbridge = "br-plain"\n'


#: The UDP port borders listen on, on their WAN side.
BORDER_PORT = 4800


class Border(Member):
    """
    A subnet's border: a member on the subnet's switch (eth0, TAP address
    .254 of the overlay, where members route other subnets), a router
    between subnets with IP forwarding on, and a WAN link (wan0) to the
    WAN router.
    """

    role = "border"

    def __init__(self, lan, name, index):
        super().__init__(lan, name, index)
        self.overlay = f"{lan.overlay}.254"
        self.wan_address = None
        self.host.sysctl("net.ipv4.ip_forward", "1")

    def device_addresses(self):
        return f'"{self.overlay}/24"'

    def extra_config(self):
        return f'[border]\ntun = "slnet0"\nport = {BORDER_PORT}\n'

    def net(self):
        """
        The border's links as its status shows them.
        """
        return (self.status() or {}).get("role", {}).get("net", {})

    def wait_linked(self, subnet, timeout=20.0):
        """
        Wait until the link to C{subnet} is ready to send.
        """
        link = poll(lambda: next((link for link in self.net().get("links", [])
                                  if link["subnet"] == subnet and link["ready"]), None), timeout)
        if link is None:
            raise RuntimeError(f"border {self.name} has no link to {subnet}: {self.log_text()[-3000:]}")
        return link


class PlainHost:
    """
    A host of the plaintext network: no agent, no certificate.
    """

    def __init__(self, lan, name, overlay, switch):
        self.name = name
        self.overlay = overlay
        self.host = lan.lab.host(name)
        lan.lab.link(self.host, switch, addresses=[f"{overlay}/24"])

    def ping(self, other, **kw):
        return self.host.ping(other.overlay, **kw)


class _Scene:
    """
    Something built of namespaces and daemons that must all go away: a
    context manager, closed also when building it fails half way.
    """

    def _build_or_close(self):
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class EncryptedLAN(_Scene):
    """
    A switch, a key server and members C{names}, their certificates in a
    scratch folder.  Use as a context manager; everything is removed after.
    """

    def __init__(self, names=("alice", "bob", "carol"), workdir=None, gateway=False, pair_key_lifetime=86400,
                 lab=None, subnet="test", underlay=UNDERLAY, overlay=OVERLAY, switch="lan", keyserver="ks",
                 layer3=False, store=None):
        self.names = names
        #: A cascade: a second key server (``ks2``, underlay .11) shares this
        #: store (a PostgreSQL URL) with the first; members are split, odd
        #: ones preferring the first, even ones the second.
        self.store = store
        self.keyserver2 = None
        #: Members on TUN devices, keys looked up by overlay IP.
        self.layer3 = layer3
        self.subnet = subnet
        self.underlay = underlay
        self.overlay = overlay
        self.keyserver_address = f"{underlay}.10"
        self._switch_name = switch
        self._keyserver_name = keyserver
        #: More [sections] for the key server's configuration.
        self.keyserver_extra = ""
        self.pair_key_lifetime = pair_key_lifetime
        self.with_gateway = gateway
        self.gateway = None
        self.plain = None
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="sl-lan-")
        self._own_lab = lab is None
        self.lab = lab or Lab()
        self.members = {}
        self.keyserver = None
        self.keyserver_process = None
        self.keyserver2_process = None
        self._build_or_close()

    def __getitem__(self, name):
        return self.members[name]

    def _build(self):
        self.pki_dir = os.path.join(self.workdir, "pki")
        self.ca, _ = pki.create_ca(self.pki_dir, self.subnet, days=2)
        pki.issue_keyserver(self.pki_dir, f"keyserver.{self.subnet}", days=2)
        for name in self.names:
            pki.issue_member(self.pki_dir, name, days=2)
        self.switch = self.lab.switch(self._switch_name)
        self.keyserver = self.lab.host(self._keyserver_name)
        self.lab.link(self.keyserver, self.switch, addresses=[f"{self.keyserver_address}/24"])
        if self.store:
            self.keyserver2 = self.lab.host(self._keyserver_name + "2")
            self.lab.link(self.keyserver2, self.switch, addresses=[f"{self.keyserver2_address}/24"])
        for i, name in enumerate(self.names, start=1):
            self.members[name] = Member(self, name, i)
        if self.with_gateway:
            pki.issue_member(self.pki_dir, "gw", days=2, roles=("gateway",))
            self.plain_switch = self.lab.switch("plain")
            self.gateway = Gateway(self, "gw", 20, self.plain_switch)
            self.members["gw"] = self.gateway
            self.plain = PlainHost(self, "printer", f"{self.overlay}.200", self.plain_switch)
        self.ks_config = os.path.join(self.workdir, "keyserver.toml")
        self.admin_socket = os.path.join(self.workdir, "ks.sock")
        os.makedirs(os.path.join(self.workdir, "state"), exist_ok=True)
        self.ks_log = os.path.join(self.workdir, "keyserver.log")
        self.ks2_config = os.path.join(self.workdir, "keyserver2.toml")
        self.admin_socket2 = os.path.join(self.workdir, "ks2.sock")
        self.ks2_log = os.path.join(self.workdir, "keyserver2.log")

    @property
    def keyserver2_address(self):
        return f"{self.underlay}.11"

    def key_server_list(self, index):
        """
        The key_servers line of member C{index}: in a cascade, odd members
        prefer the first key server and even ones the second.
        """
        servers = [f'"keyserver.{self.subnet}@{self.keyserver_address}:{KEYSERVER_PORT}"']
        if self.store:
            servers.append(f'"keyserver.{self.subnet}@{self.keyserver2_address}:{KEYSERVER_PORT}"')
            if index % 2 == 0:
                servers.reverse()
        return ", ".join(servers)

    def write_keyserver_config(self, second=False):
        state = os.path.join(self.workdir, "state")
        store = (f'store = "{self.store}"\nmaster_key = "{os.path.join(state, "master.key")}"' if self.store
                 else f'state_dir = "{state}"')
        with open(self.ks2_config if second else self.ks_config, "w") as f:
            f.write(f"""
[keyserver]
subnet = "{self.subnet}"
listen = "tcp:{KEYSERVER_PORT}:interface={self.keyserver2_address if second else self.keyserver_address}"
ca = "{self.ca}"
certificate = "{os.path.join(self.pki_dir, f'keyserver.{self.subnet}.pem')}"
private_key = "{os.path.join(self.pki_dir, f'keyserver.{self.subnet}.key')}"
{store}
admin_socket = "{self.admin_socket2 if second else self.admin_socket}"
pair_key_lifetime = {self.pair_key_lifetime}
{self.keyserver_extra}""")

    def pki_paths(self, name):
        return (os.path.join(self.pki_dir, f"{name}.pem"), os.path.join(self.pki_dir, f"{name}.key"))

    def start_keyserver(self, timeout=20.0, second=False):
        self.write_keyserver_config(second)
        log_path = self.ks2_log if second else self.ks_log
        host = self.keyserver2 if second else self.keyserver
        # The log is appended to across restarts: only what this start
        # writes says that this process listens.
        start = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        with open(log_path, "ab") as log:
            process = host.popen(twistd_argv("securelan-keyserver", self.ks2_config if second else self.ks_config),
                                 env=child_env(), stdout=log, stderr=subprocess_stdout())
        if second:
            self.keyserver2_process = process
        else:
            self.keyserver_process = process
        def listening():
            with open(log_path, "rb") as f:
                f.seek(start)
                if b"listening on" in f.read():
                    return "listening"
            # A key server that exited will not listen: stop waiting.
            return process.poll() is not None and "exited"

        if poll(listening, timeout, interval=0.05) != "listening":
            raise RuntimeError(f"key server did not start: {open(log_path, errors='replace').read()[-3000:]}")

    def kill_keyserver(self, second=False):
        """
        SIGKILL: the key server vanishes without a goodbye.
        """
        attribute = "keyserver2_process" if second else "keyserver_process"
        process = getattr(self, attribute)
        if process is not None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            setattr(self, attribute, None)

    def start(self, carrier="udp", on_key_miss="queue"):
        """
        Start the key server and every member; return once all registered.
        """
        self.start_keyserver()
        if self.store:
            self.start_keyserver(second=True)
        for member in self.members.values():
            member.start(carrier, on_key_miss)
        for member in self.members.values():
            member.wait_registered()

    def tcp_exchange(self, client, server, size=200000, port=5001, marker=MARKER):
        """
        Send C{size} bytes (the marker repeated) from C{client} to
        C{server} over TCP on the overlay; return whether the server saw
        exactly them (it answers with their SHA-256).
        """
        payload_repeat = size // len(marker) + 1
        server_code = (
            "import socket,hashlib,sys\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('{server.overlay}', {port})); s.listen(1); print('ready', flush=True)\n"
            "c,_=s.accept(); c.settimeout(20); h=hashlib.sha256(); n=0\n"
            "while True:\n"
            "    d=c.recv(65536)\n"
            "    if not d: break\n"
            "    h.update(d); n+=len(d)\n"
            "c.sendall(h.hexdigest().encode()); c.close()\n"
        )
        import subprocess

        proc = server.host.popen([sys.executable, "-c", server_code], stdout=subprocess.PIPE)
        try:
            proc.stdout.readline()
            client_code = (
                "import socket,sys\n"
                f"data=({marker!r}*{payload_repeat})[:{size}]\n"
                f"c=socket.create_connection(('{server.overlay}', {port}), timeout=20)\n"
                "c.sendall(data); c.shutdown(socket.SHUT_WR)\n"
                "print(c.recv(100).decode())\n"
            )
            result = client.host.run([sys.executable, "-c", client_code], timeout=60, check=False)
            expected = hashlib.sha256((marker * payload_repeat)[:size]).hexdigest()
            return result.stdout.strip() == expected
        finally:
            terminate(proc, grace=1.0)

    def close(self):
        for member in self.members.values():
            member.stop()
        for attribute in ("keyserver_process", "keyserver2_process"):
            process = getattr(self, attribute)
            if process is not None:
                terminate(process)
                setattr(self, attribute, None)
        if self._own_lab:
            self.lab.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class BorderedSubnets(_Scene):
    """
    Two encrypted subnets, C{east} (overlay 10.231.100.0/24: alice, bob)
    and C{west} (10.231.101.0/24: carol, dave), each with its key server and
    a border; the borders' WAN links meet at the router C{wan}
    (10.231.250.0/24 east, 10.231.251.0/24 west); the key servers agree
    their NETKEY over a management switch C{mgmt} (10.231.254.0/24).
    Members route the other subnet through their border's overlay .254.
    """

    MGMT = "10.231.254"
    PEERING_PORT = 7444

    def __init__(self, workdir=None, nat=False):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="sl-borders-")
        #: Put east's border behind a NAT router (``nat-e``: 10.231.249.0/24
        #: inside, masquerading as 10.231.250.1 with random ports).
        self.nat = None
        self._with_nat = nat
        self.lab = Lab()
        self.subnets = []
        self._build_or_close()

    def subnet(self, name, names, index, mgmt_index):
        workdir = os.path.join(self.workdir, name)
        os.makedirs(workdir)
        lan = EncryptedLAN(names, workdir=workdir, lab=self.lab, subnet=name, underlay=f"10.231.{index}",
                           overlay=f"10.231.{100 + index}", switch=f"lan-{name[0]}", keyserver=f"ks-{name[0]}")
        self.subnets.append(lan)
        lan.mgmt_address = f"{self.MGMT}.{mgmt_index}"
        self.lab.link(lan.keyserver, self.mgmt, ifname="eth1", addresses=[f"{lan.mgmt_address}/24"])
        return lan

    def _build(self):
        self.mgmt = self.lab.switch("mgmt")
        self.wan = self.lab.host("wan")
        self.wan.sysctl("net.ipv4.ip_forward", "1")
        self.east = self.subnet("east", ("alice", "bob"), 0, 1)
        self.west = self.subnet("west", ("carol", "dave"), 1, 2)
        for lan, wan_net, other in ((self.east, "10.231.250", "10.231.251"), (self.west, "10.231.251", "10.231.250")):
            name = f"edge-{lan.subnet[0]}"
            pki.issue_member(lan.pki_dir, name, days=2, roles=("border",))
            border = Border(lan, name, 30)
            lan.members[name] = border
            lan.border = border
            border.wan_address = f"{wan_net}.1"
            if self._with_nat and lan is self.east:
                self._nat(border, wan_net, other)
                continue
            self.lab.link_hosts(border.host, self.wan, a_ifname="wan0", b_ifname=f"to-{lan.subnet}",
                                a_addresses=[f"{wan_net}.1/24"], b_addresses=[f"{wan_net}.254/24"])
            border.host.add_route(f"{other}.0/24", via=f"{wan_net}.254")
        for lan, peer in ((self.east, self.west), (self.west, self.east)):
            lan.keyserver_extra = self.netkey_config(lan, [peer])

    def _nat(self, border, wan_net, other):
        """
        Put C{border} behind a NAT router: its WAN side is 10.231.249.1 on
        the NAT's inside; the NAT's outside is C{wan_net}.1, the address
        the border's key server announces (nothing reaches the border there
        until it sent something out: the peer border learns the mapping
        from its authenticated datagrams).
        """
        self.nat = nat = self.lab.host("nat-e")
        nat.sysctl("net.ipv4.ip_forward", "1")
        self.lab.link_hosts(border.host, nat, a_ifname="wan0", b_ifname="inside",
                            a_addresses=["10.231.249.1/24"], b_addresses=["10.231.249.254/24"])
        self.lab.link_hosts(nat, self.wan, a_ifname="outside", b_ifname="to-east",
                            a_addresses=[f"{wan_net}.1/24"], b_addresses=[f"{wan_net}.254/24"])
        border.host.add_route(f"{other}.0/24", via="10.231.249.254")
        nat.add_route(f"{other}.0/24", via=f"{wan_net}.254")
        # Random ports: every new mapping (after a conntrack flush, say)
        # shows the peer a new source port.
        nat.run(["nft", "-f", "-"], input=(
            "table ip nat {\n"
            "  chain post { type nat hook postrouting priority 100; oifname \"outside\" masquerade random; }\n"
            "}\n"))

    def netkey_config(self, lan, peers, listen=True):
        """
        The [netkey] section of C{lan}'s key server, linking it to C{peers}
        (subnets whose CA and key server name it trusts).
        """
        lines = ["[netkey]"]
        if listen:
            lines.append(f'listen = "tcp:{self.PEERING_PORT}:interface={lan.mgmt_address}"')
        border = getattr(lan, "border", None)
        lines += [f'prefixes = ["{lan.overlay}.0/24"]',
                  f'border = "{border.name if border else "edge-" + lan.subnet[0]}"',
                  f'border_endpoint = "{border.wan_address if border else lan.mgmt_address}:{BORDER_PORT}"']
        if border is not None:
            # Members are told to route the other subnets through it.
            lines.append(f'border_address = "{border.overlay}"')
        for peer in peers:
            lines += ["", "[[netkey.peer]]", f'subnet = "{peer.subnet}"', f'name = "keyserver.{peer.subnet}"',
                      f'ca = "{peer.ca}"']
            if peer.subnet < lan.subnet:
                lines.append(f'address = "{peer.mgmt_address}:{self.PEERING_PORT}"')
        return "\n".join(lines) + "\n"

    def start(self):
        """
        Start both subnets; return once both borders can send to each
        other and every member routes the other subnet through its border
        (as its key server told it).
        """
        for lan in (self.east, self.west):
            lan.start_keyserver()
        for lan in (self.east, self.west):
            for member in lan.members.values():
                member.start()
        for lan in (self.east, self.west):
            for member in lan.members.values():
                member.wait_registered()
        self.east.border.wait_linked("west")
        self.west.border.wait_linked("east")
        for lan, other in ((self.east, self.west), (self.west, self.east)):
            for member in lan.members.values():
                if member is not lan.border:
                    member.wait_route(f"{other.overlay}.0/24")

    def member(self, name):
        for lan in self.subnets:
            if name in lan.members:
                return lan.members[name]
        raise KeyError(name)

    def close(self):
        for lan in self.subnets:
            lan.close()
        self.lab.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
