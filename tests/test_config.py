"""
Tests for L{securelan.config}.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from securelan.config import ConfigError, Limits, load_keyserver_config

GOOD = """
[keyserver]
subnet = "lab"
listen = "tcp:7443:interface=127.0.0.1"
ca = "pki/ca.pem"
certificate = "pki/ks.pem"
private_key = "pki/ks.key"
state_dir = "state"

[limits]
requests_per_second = 5
"""


NETKEY = """
[netkey]
listen = "tcp:7444"
prefixes = ["10.1.0.0/24"]
border = "edge"
border_endpoint = "192.0.2.1:4800"

[[netkey.peer]]
subnet = "branch"
name = "keyserver.branch"
ca = "pki/branch-ca.pem"

[[netkey.peer]]
subnet = "west"
name = "keyserver.west"
ca = "pki/west-ca.pem"
address = "192.0.2.9:7444"
"""


class KeyServerConfigTests(SynchronousTestCase):
    def write(self, text):
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "keyserver.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_good(self):
        """
        A good file loads; relative paths are taken from the file's folder;
        unset limits keep their defaults.
        """
        path = self.write(GOOD)
        config = load_keyserver_config(path)
        folder = os.path.dirname(os.path.abspath(path))
        self.assertEqual(config.subnet, "lab")
        self.assertEqual(config.ca, os.path.join(folder, "pki/ca.pem"))
        self.assertEqual(config.store, "sqlite:" + os.path.join(folder, "state", "keyserver.sqlite"))
        self.assertEqual(config.master_key, os.path.join(folder, "state", "master.key"))
        self.assertEqual(config.limits.requests_per_second, 5.0)
        self.assertEqual(config.limits.max_members, Limits().max_members)

    def test_example_config_loads(self):
        """
        The example in etc/ is a valid configuration.
        """
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = load_keyserver_config(os.path.join(here, "etc", "keyserver.toml"))
        self.assertEqual(config.subnet, "lab")

    def assertConfigError(self, text, key, fragment):
        path = self.write(text)
        e = self.assertRaises(ConfigError, load_keyserver_config, path)
        self.assertEqual(e.key, key)
        self.assertIn(path, str(e))
        self.assertIn(fragment, str(e))
        self.assertNotIn("\n", str(e))

    def test_count_limits(self):
        path = self.write(GOOD.replace('state_dir = "state"', 'state_dir = "state"\npair_key_max_packets = 1000000'))
        config = load_keyserver_config(path)
        self.assertEqual((config.pair_key_max_packets, config.pair_key_max_bytes), (1000000, 0))
        self.assertConfigError(GOOD.replace('state_dir = "state"', 'state_dir = "state"\npair_key_max_bytes = -1'),
                               "keyserver.pair_key_max_bytes", "at least")

    def test_netkey(self):
        """
        Peer subnets load: the one that sorts first ("branch" < "lab") needs
        an address (this key server connects to it); the other connects
        here.
        """
        path = self.write(GOOD + NETKEY.replace('ca = "pki/branch-ca.pem"',
                                                'ca = "pki/branch-ca.pem"\naddress = "192.0.2.8:7444"'))
        netkey = load_keyserver_config(path).netkey
        self.assertEqual(netkey.prefixes, ("10.1.0.0/24",))
        self.assertEqual([(p.subnet, p.name, p.host, p.port) for p in netkey.peers],
                         [("branch", "keyserver.branch", "192.0.2.8", 7444), ("west", "keyserver.west", "192.0.2.9", 7444)])
        self.assertEqual(netkey.peers[0].ca, os.path.join(os.path.dirname(os.path.abspath(path)),
                                                           "pki/branch-ca.pem"))
        self.assertEqual(load_keyserver_config(self.write(GOOD)).netkey.peers, ())

    def test_netkey_errors(self):
        """
        Each mistake in [netkey] is named.
        """
        good = GOOD + NETKEY.replace('ca = "pki/branch-ca.pem"',
                                     'ca = "pki/branch-ca.pem"\naddress = "192.0.2.8:7444"')
        self.assertConfigError(GOOD + NETKEY, "netkey.peer[0].address", "is required")
        self.assertConfigError(good.replace('"10.1.0.0/24"', '"10.1.0.1/24"'), "netkey.prefixes",
                               "host bits")
        self.assertConfigError(good.replace('border = "edge"\n', ""), "netkey.border", "required")
        self.assertConfigError(good.replace('"192.0.2.1:4800"', '"nowhere"'), "netkey.border_endpoint",
                               "address:port")
        self.assertConfigError(good.replace('listen = "tcp:7444"\n', ""), "netkey.listen", "required")
        self.assertConfigError(good.replace('border = "edge"', 'border = "edge"\nborder_address = "edge"'),
                               "netkey.border_address", "overlay IP")
        self.assertConfigError(good.replace('subnet = "west"', 'subnet = "lab"'), "netkey.peer[1].subnet",
                               "own subnet")
        self.assertConfigError(good.replace('subnet = "west"', 'subnet = "branch"'), "netkey.peer[1].subnet",
                               "twice")
        self.assertConfigError(good.replace('name = "keyserver.west"', 'name = "keyserver.west"\nnmae = 1'),
                               "netkey.peer[1].nmae", "unknown key")

    def test_missing_key(self):
        """
        A required key that is missing is named.
        """
        self.assertConfigError(GOOD.replace('subnet = "lab"', ""), "keyserver.subnet", "required")

    def test_wrong_type(self):
        """
        A value of the wrong type is named.
        """
        self.assertConfigError(GOOD.replace("requests_per_second = 5", 'requests_per_second = "fast"'),
                               "limits.requests_per_second", "number")

    def test_unknown_key(self):
        """
        A misspelt key is reported rather than ignored.
        """
        self.assertConfigError(GOOD.replace("[limits]", "[limits]\nmax_conections = 5"),
                               "limits.max_conections", "unknown")

    def test_bad_endpoint(self):
        """
        A listen value that is not an endpoint description is named.
        """
        self.assertConfigError(GOOD.replace("tcp:7443:interface=127.0.0.1", "bogus:1"),
                               "keyserver.listen", "endpoint")

    def test_bad_subnet(self):
        """
        A subnet name with spaces is refused.
        """
        self.assertConfigError(GOOD.replace('"lab"', '"my lab"'), "keyserver.subnet", "letters")

    def test_not_toml(self):
        """
        A file that is not TOML gives one line naming the file.
        """
        path = self.write("[keyserver\nsubnet=")
        e = self.assertRaises(ConfigError, load_keyserver_config, path)
        self.assertIn("not valid TOML", str(e))
        self.assertIsNone(e.key)

    def test_missing_file(self):
        """
        A missing file is named.
        """
        e = self.assertRaises(ConfigError, load_keyserver_config, "/nonexistent/keyserver.toml")
        self.assertIn("/nonexistent/keyserver.toml", str(e))

    def test_limits_bounds(self):
        """
        Limits out of range are refused.
        """
        self.assertConfigError(GOOD + "max_request_bytes = 10\n", "limits.max_request_bytes", "at least")


AGENT = """
[agent]
ca = "pki/ca.pem"
certificate = "pki/alice.pem"
private_key = "pki/alice.key"
key_servers = ["keyserver.test@10.231.0.1:7443", "10.231.0.2:7443"]

[device]
addresses = ["10.77.0.1/24"]

[carrier]
port = 4790
"""


class AgentConfigTests(SynchronousTestCase):
    def write(self, text):
        return KeyServerConfigTests.write(self, text)

    def test_good(self):
        """
        A minimal agent config loads with its defaults.
        """
        from securelan.addresses import KeyServerAddress
        from securelan.config import load_agent_config

        config = load_agent_config(self.write(AGENT))
        self.assertEqual(config.role, "client")
        self.assertEqual(config.on_key_miss, "queue")
        self.assertEqual(config.key_servers[0], KeyServerAddress("keyserver.test", "10.231.0.1", 7443))
        self.assertEqual(config.key_servers[1].name, "10.231.0.2")
        self.assertEqual(config.carrier.port, 4790)
        self.assertEqual(config.device.mac, None)
        self.assertEqual(config.device.addresses, ("10.77.0.1/24",))

    def test_example_loads(self):
        """
        etc/agent.toml is a valid configuration.
        """
        from securelan.config import load_agent_config

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.assertEqual(load_agent_config(os.path.join(here, "etc", "agent.toml")).device.name, "slan0")

    def assertAgentError(self, text, key, fragment):
        from securelan.config import load_agent_config

        path = self.write(text)
        e = self.assertRaises(ConfigError, load_agent_config, path)
        self.assertEqual(e.key, key)
        self.assertIn(fragment, str(e))

    def test_bad_values(self):
        """
        Each bad value is named with its key.
        """
        self.assertAgentError(AGENT.replace('"10.231.0.2:7443"', '"nowhere"'), "agent.key_servers", "nowhere")
        self.assertAgentError(AGENT.replace("port = 4790", "port = 0"), "carrier.port", "at least")
        self.assertAgentError(AGENT.replace("[device]", '[device]\nmac = "01:00:5e:00:00:01"'),
                              "device.mac", "unicast")
        self.assertAgentError(AGENT.replace('["10.77.0.1/24"]', '["10.77.0.300/24"]'),
                              "device.addresses", "10.77.0.300")
        self.assertAgentError(AGENT.replace("[carrier]", '[carrier]\ntype = "ethernet"'),
                              "carrier.interface", "required")
        self.assertAgentError(AGENT + '\n[queue]\nper_peer = "many"\n', "queue.per_peer", "integer")
        self.assertAgentError(AGENT.replace("[agent]", '[agent]\nrole = "king"'), "agent.role", "one of")
        self.assertAgentError(AGENT.replace("[agent]", '[agent]\non_key_miss = "wait"'),
                              "agent.on_key_miss", "one of")


class GatewayConfigTests(SynchronousTestCase):
    def test_example_loads(self):
        """
        etc/gateway.toml is a valid gateway configuration.
        """
        from securelan.config import load_agent_config

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = load_agent_config(os.path.join(here, "etc", "gateway.toml"))
        self.assertEqual((config.role, config.gateway.bridge), ("gateway", "br-plain"))

    def test_bridge_required(self):
        """
        A gateway without a bridge is refused, naming the key.
        """
        from securelan.config import load_agent_config

        path = KeyServerConfigTests.write(self, AGENT.replace("[agent]", '[agent]\nrole = "gateway"'))
        e = self.assertRaises(ConfigError, load_agent_config, path)
        self.assertEqual(e.key, "gateway.bridge")


class BorderConfigTests(SynchronousTestCase):
    def test_example_loads(self):
        """
        etc/border.toml is a valid border configuration; the [netkey]
        example in etc/keyserver.toml, uncommented, is a valid one.
        """
        from securelan.config import load_agent_config

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        config = load_agent_config(os.path.join(here, "etc", "border.toml"))
        self.assertEqual((config.role, config.border.tun, config.border.port), ("border", "slnet0", 51872))
        with open(os.path.join(here, "etc", "keyserver.toml")) as f:
            text = f.read()
        example = text[text.index("# [netkey]"):]
        uncommented = "\n".join(line[2:] if line.startswith("# ") else "" for line in example.splitlines())
        path = KeyServerConfigTests.write(self, text[:text.index("# [netkey]")] + uncommented)
        netkey = load_keyserver_config(path).netkey
        self.assertEqual((netkey.border, [p.subnet for p in netkey.peers]), ("edge1", ["branch"]))

    def test_bad_values(self):
        from securelan.config import load_agent_config

        for extra, key, fragment in (
            ('[border]\ntun = "slan0"\n', "border.tun", "must differ"),
            ('[border]\ntun = "a-name-far-too-long"\n', "border.tun", "15 characters"),
            ('[border]\nlisten = "anywhere"\n', "border.listen", "IP address"),
            ('[border]\nkeepalive = -1\n', "border.keepalive", "at least"),
        ):
            path = KeyServerConfigTests.write(self, AGENT + extra)
            e = self.assertRaises(ConfigError, load_agent_config, path)
            self.assertEqual(e.key, key)
            self.assertIn(fragment, str(e))


class Layer3ConfigTests(SynchronousTestCase):
    def test_tun(self):
        from securelan.config import load_agent_config

        path = KeyServerConfigTests.write(self, AGENT.replace("[device]", '[device]\ntype = "tun"'))
        self.assertEqual(load_agent_config(path).device.type, "tun")

    def test_tun_needs_addresses_and_client(self):
        from securelan.config import load_agent_config

        for text, key in (
            (AGENT.replace("[device]", '[device]\ntype = "tun"').replace('addresses = ["10.77.0.1/24"]', ""),
             "device.addresses"),
            (AGENT.replace("[device]", '[device]\ntype = "tun"').replace("[agent]", '[agent]\nrole = "border"'),
             "device.type"),
            (AGENT.replace("[device]", '[device]\ntype = "tunnel"'), "device.type"),
        ):
            e = self.assertRaises(ConfigError, load_agent_config, KeyServerConfigTests.write(self, text))
            self.assertEqual(e.key, key)
