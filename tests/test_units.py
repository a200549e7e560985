"""
The systemd units in ``etc/systemd/``: they start the right twistd plugin
with the example configuration's path, give the agent exactly the two
capabilities it needs and the key server none, and ``systemd-analyze
verify`` accepts them.
"""

import os
import shlex
import shutil
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from securelan.config import DEFAULT_STATUS_SOCKET, load_agent_config, load_keyserver_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "etc", "systemd")
KEYSERVER = "securelan-keyserver.service"
AGENT = "securelan-agent.service"

#: What each unit runs: (twistd plugin, the configuration it is given, the
#: example of that configuration in etc/).
EXPECTED = {
    KEYSERVER: ("securelan-keyserver", "/etc/securelan/keyserver.toml", "keyserver.toml"),
    AGENT: ("securelan-agent", "/etc/securelan/agent.toml", "agent.toml"),
}


def parse_unit(path: str) -> dict:
    """
    A small systemd unit parser: C{{section: {key: [value, ...]}}}, every
    assignment of a key kept in order (systemd accumulates or resets on
    repeated keys, so none may be lost), comment lines skipped, lines ending
    in a backslash joined to the next.
    """
    sections: dict = {}
    current = None
    pending = ""
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = pending + raw.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            if current is None or "=" not in line:
                raise ValueError(f"{path}:{number}: not a section header or an assignment: {line!r}")
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def capability_set(values) -> set:
    """
    The capabilities a list of C{CapabilityBoundingSet=} or
    C{AmbientCapabilities=} assignments leaves, as systemd reads them: an
    empty assignment resets the set, others add to it.  Inverted lists
    (C{~CAP_...}) are refused: the units must name what they allow.
    """
    result: set = set()
    for value in values:
        if value.startswith("~"):
            raise AssertionError(f"an inverted capability list: {value!r}")
        if not value:
            result = set()
        else:
            result |= set(value.split())
    return result


def single(service: dict, key: str) -> str:
    """
    The value of a key assigned exactly once.
    """
    values = service.get(key)
    if values is None or len(values) != 1:
        raise AssertionError(f"{key} must be assigned exactly once, not {values!r}")
    return values[0]


class UnitTestCase(SynchronousTestCase):
    def unit(self, name: str) -> dict:
        return parse_unit(os.path.join(UNITS, name))

    def service(self, name: str) -> dict:
        return self.unit(name)["Service"]


class ExecStartTests(UnitTestCase):
    """
    Each unit runs twistd in the foreground with its plugin and config.
    """

    def check_exec_start(self, name):
        plugin, config, example = EXPECTED[name]
        argv = shlex.split(single(self.service(name), "ExecStart"))
        self.assertTrue(os.path.isabs(argv[0]), argv[0])
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        self.assertEqual(argv[1:], ["-n", "--pidfile=", "--logfile=-", plugin, "--config", config])
        self.assertTrue(os.path.exists(os.path.join(ROOT, "etc", example)))
        # twistd itself reads these arguments as meant: the plugin exists
        # and takes --config.
        from twisted.scripts._twistd_unix import ServerOptions

        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual(options.subCommand, plugin)
        self.assertEqual(options.subOptions["config"], config)
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertEqual(options["logfile"], "-")

    def test_keyserver_exec_start(self):
        """
        The key server unit runs C{twistd -n --pidfile= --logfile=-
        securelan-keyserver --config /etc/securelan/keyserver.toml}, which
        twistd parses into that plugin and config.
        """
        self.check_exec_start(KEYSERVER)

    def test_agent_exec_start(self):
        """
        The agent unit runs C{twistd -n --pidfile= --logfile=-
        securelan-agent --config /etc/securelan/agent.toml}, which twistd
        parses into that plugin and config.
        """
        self.check_exec_start(AGENT)

    def test_restart_on_failure(self):
        """
        Both units restart a daemon that failed, and not one that an
        operator stopped.
        """
        for name in EXPECTED:
            self.assertEqual(single(self.service(name), "Restart"), "on-failure", name)

    def test_sections(self):
        """
        Both units have [Unit], [Service] and [Install] and are wanted by
        multi-user.target.
        """
        for name in EXPECTED:
            unit = self.unit(name)
            self.assertEqual(set(unit), {"Unit", "Service", "Install"}, name)
            self.assertEqual(unit["Install"]["WantedBy"], ["multi-user.target"], name)


class PrivilegeTests(UnitTestCase):
    """
    Capabilities and privileges: the agent holds CAP_NET_ADMIN and
    CAP_NET_RAW and nothing else, the key server nothing at all.
    """

    def test_agent_capabilities_exact(self):
        """
        The agent's bounding set and its ambient set (which C{ip}, run by
        the agent, inherits) are exactly CAP_NET_ADMIN and CAP_NET_RAW.
        """
        service = self.service(AGENT)
        wanted = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
        self.assertEqual(capability_set(service["CapabilityBoundingSet"]), wanted)
        self.assertEqual(capability_set(service["AmbientCapabilities"]), wanted)

    def test_keyserver_has_no_capabilities(self):
        """
        The key server's bounding set is empty (assigned, not left at the
        default of every capability), and it has no ambient capability.
        """
        service = self.service(KEYSERVER)
        self.assertIn("CapabilityBoundingSet", service)
        self.assertEqual(capability_set(service["CapabilityBoundingSet"]), set())
        self.assertEqual(capability_set(service.get("AmbientCapabilities", [])), set())

    def test_no_new_privileges(self):
        """
        NoNewPrivileges=yes on both units: no setuid binary and no file
        capability can raise what a daemon or its children hold.
        """
        for name in EXPECTED:
            self.assertEqual(single(self.service(name), "NoNewPrivileges"), "yes", name)

    def test_dedicated_users(self):
        """
        Each daemon runs as a dedicated user, never root, and the two users
        differ (the agent must not reach the key server's master key).
        """
        users = {}
        for name in EXPECTED:
            service = self.service(name)
            user = single(service, "User")
            self.assertNotIn(user, ("root", "0", ""), name)
            users[name] = user
        self.assertNotEqual(users[KEYSERVER], users[AGENT])

    def test_address_families(self):
        """
        The key server may open only IP and UNIX sockets; the agent also
        netlink (C{ip}) and packet sockets (the ethernet carrier).
        """
        base = {"AF_INET", "AF_INET6", "AF_UNIX"}
        self.assertEqual(set(single(self.service(KEYSERVER), "RestrictAddressFamilies").split()), base)
        self.assertEqual(set(single(self.service(AGENT), "RestrictAddressFamilies").split()),
                         base | {"AF_NETLINK", "AF_PACKET"})

    def test_agent_devices(self):
        """
        The agent may open /dev/net/tun read-write and no other device
        beyond systemd's standard pseudo-devices; the key server no device.
        """
        agent = self.service(AGENT)
        self.assertEqual(agent["DeviceAllow"], ["/dev/net/tun rw"])
        self.assertEqual(single(agent, "DevicePolicy"), "closed")
        self.assertEqual(single(self.service(KEYSERVER), "PrivateDevices"), "yes")


class SandboxTests(UnitTestCase):
    """
    File-system and system-call confinement, and the directories the
    daemons write to.
    """

    def test_sandboxing(self):
        """
        Both units: read-only system, no home directories, private /tmp,
        the @system-service system calls without the privileged ones.
        """
        for name in EXPECTED:
            service = self.service(name)
            self.assertEqual(single(service, "ProtectSystem"), "strict", name)
            self.assertEqual(single(service, "ProtectHome"), "yes", name)
            self.assertEqual(single(service, "PrivateTmp"), "yes", name)
            self.assertEqual(service["SystemCallFilter"][0], "@system-service", name)
            self.assertIn("~@privileged @resources", service["SystemCallFilter"], name)

    def test_keyserver_state_directory(self):
        """
        The key server's state directory (store and master key) is
        /var/lib/securelan, mode 0700, where the example configuration puts
        them.
        """
        service = self.service(KEYSERVER)
        self.assertEqual(single(service, "StateDirectory"), "securelan")
        self.assertEqual(single(service, "StateDirectoryMode"), "0700")
        config = load_keyserver_config(os.path.join(ROOT, "etc", "keyserver.toml"))
        self.assertEqual(os.path.dirname(config.master_key), "/var/lib/securelan")
        self.assertEqual(config.store, "sqlite:/var/lib/securelan/keyserver.sqlite")

    def test_keyserver_runtime_directory_holds_admin_socket(self):
        """
        The key server's runtime directory is the folder of its admin
        socket (C{securelan members|keys|revoke}), in the example
        configuration and by default.
        """
        from securelan.config import DEFAULT_ADMIN_SOCKET

        service = self.service(KEYSERVER)
        folder = "/run/" + single(service, "RuntimeDirectory")
        config = load_keyserver_config(os.path.join(ROOT, "etc", "keyserver.toml"))
        self.assertEqual(os.path.dirname(config.admin_socket), folder)
        self.assertEqual(os.path.dirname(DEFAULT_ADMIN_SOCKET), folder)

    def test_agent_runtime_directory_holds_status_socket(self):
        """
        The agent's runtime directory is the folder of its status socket,
        in the example configuration and by default.
        """
        service = self.service(AGENT)
        folder = "/run/" + single(service, "RuntimeDirectory")
        config = load_agent_config(os.path.join(ROOT, "etc", "agent.toml"))
        self.assertEqual(os.path.dirname(config.status_socket), folder)
        self.assertEqual(os.path.dirname(DEFAULT_STATUS_SOCKET), folder)


def _existing_twistd() -> str:
    """
    A twistd executable that exists here, to stand in for the units' path
    while systemd-analyze checks them (it refuses a missing executable).
    """
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("twistd") or sys.executable


class VerifyTests(UnitTestCase):
    """
    systemd's own checker accepts both units.
    """

    def test_systemd_analyze_verify(self):
        """
        C{systemd-analyze verify} reports nothing about either unit (it
        exits 0 even for unknown keys and bad values, so its output is
        checked too).  The units' twistd path is replaced by one that exists
        on this machine, as verify insists on it.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.fail("systemd-analyze is not installed (apt-get install systemd)")
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        twistd = _existing_twistd()
        paths = []
        for name in EXPECTED:
            with open(os.path.join(UNITS, name), encoding="utf-8") as f:
                text = f.read()
            argv0 = shlex.split(single(parse_unit(os.path.join(UNITS, name))["Service"], "ExecStart"))[0]
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text.replace("ExecStart=" + argv0, "ExecStart=" + twistd))
            paths.append(path)
        result = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                                text=True, timeout=120)
        output = result.stdout + result.stderr
        about_units = [line for line in output.splitlines()
                       if any(name in line for name in EXPECTED) or folder in line]
        self.assertEqual((result.returncode, about_units), (0, []), output)
