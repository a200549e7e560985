# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of a key server and of an agent, computed from their own
counters when scraped (nothing is added to the per-frame path), served on
an endpoint the configuration names (``metrics = "tcp:9108:interface=..."``;
off by default).
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Site


def _now(d):
    """
    The result of a Deferred that has fired (the stores answer counts from
    memory); None otherwise.
    """
    out = []
    d.addBoth(out.append)
    return out[0] if out and not hasattr(out[0], "getErrorMessage") else None


class KeyServerCollector:
    """
    A key server's members, sessions, keys, requests, errors and rekeys.
    """

    def __init__(self, server):
        self.server = server

    def collect(self):
        server = self.server
        counts = _now(server.store.counts()) or {}
        members = GaugeMetricFamily("securelan_keyserver_members", "Members in the registry.")
        members.add_metric([], counts.get("members", 0))
        yield members
        pairs = GaugeMetricFamily("securelan_keyserver_pair_keys", "Pair keys held.")
        pairs.add_metric([], counts.get("pair_keys", 0))
        yield pairs
        sessions = GaugeMetricFamily("securelan_keyserver_sessions", "Registered member sessions open.")
        sessions.add_metric([], sum(len(s) for s in server.sessions.values()))
        yield sessions
        group = GaugeMetricFamily("securelan_keyserver_group_epoch", "The group key's epoch.")
        group.add_metric([], server.group_key().epoch if server._group_key is not None else 0)
        yield group
        for name, label, doc in (
            ("requests", "command", "Requests received, by command."),
            ("errors", "error", "Requests refused, by error."),
            ("keys_issued", "kind", "Keys made."),
            ("rekeys", "kind", "Keys replaced."),
        ):
            family = CounterMetricFamily(f"securelan_keyserver_{name}", doc, labels=[label])
            for (counter, value), count in sorted(server.counters.items()):
                if counter == name:
                    family.add_metric([value], count)
            yield family
        pauses = CounterMetricFamily("securelan_keyserver_rate_limit_pauses",
                                     "Times a member past its rate limit was not read from for a while.")
        pauses.add_metric([], server.counters.get(("rate_limit_pauses", ""), 0))
        yield pauses
        broker = server.broker
        if broker is not None:
            links = GaugeMetricFamily("securelan_keyserver_netkey_epoch",
                                      "The NETKEY epoch of each link to a peer subnet (0: none yet).",
                                      labels=["subnet", "connected"])
            for link in broker.status():
                links.add_metric([link["subnet"], "yes" if link["connected"] else "no"], link["epoch"])
            yield links
            refused = CounterMetricFamily("securelan_keyserver_peers_refused",
                                          "Key servers refused on the peering listener.")
            refused.add_metric([], broker.refused)
            yield refused


class AgentCollector:
    """
    An agent's peers, frames and bytes each way, drops by reason, queues,
    key epochs and errors.
    """

    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        status = self.agent.status()
        role = status.get("role", {})
        peers = role.get("peers", [])
        group = role.get("group") or {}
        gauge = GaugeMetricFamily("securelan_agent_peers", "Peers in the key cache.")
        gauge.add_metric([], len(peers))
        yield gauge
        frames = CounterMetricFamily("securelan_agent_frames", "Frames sent and received.",
                                     labels=["direction", "kind"])
        octets = CounterMetricFamily("securelan_agent_bytes", "Frame bytes sent and received.",
                                     labels=["direction", "kind"])
        for direction in ("tx", "rx"):
            frames.add_metric([direction, "pair"], sum(p[f"{direction}_frames"] for p in peers))
            octets.add_metric([direction, "pair"], sum(p[f"{direction}_bytes"] for p in peers))
            frames.add_metric([direction, "group"], group.get(f"{direction}_frames", 0))
            octets.add_metric([direction, "group"], group.get(f"{direction}_bytes", 0))
        yield frames
        yield octets
        drops = CounterMetricFamily("securelan_agent_drops", "Frames and datagrams dropped, by reason.",
                                    labels=["reason"])
        for reason, count in sorted(role.get("drops", {}).items()):
            drops.add_metric([reason], count)
        for reason, count in sorted(role.get("pending_drops", {}).items()):
            drops.add_metric([reason], count)
        drops.add_metric(["reassembly_gave_up"], role.get("reassembly_drops", 0))
        yield drops
        split = CounterMetricFamily("securelan_agent_split_frames", "Split frames (super-frames) received, by "
                                    "how their pieces were gathered.", labels=["how"])
        for how, count in sorted(role.get("split_frames", {}).items()):
            split.add_metric([how], count)
        yield split
        pending = GaugeMetricFamily("securelan_agent_pending_frames", "Frames waiting for a key.")
        pending.add_metric([], role.get("pending", 0))
        yield pending
        epoch = GaugeMetricFamily("securelan_agent_group_epoch", "The group key's epoch held.")
        epoch.add_metric([], group.get("epoch", 0))
        yield epoch
        errors = CounterMetricFamily("securelan_agent_errors", "Send errors, and input whose handling failed"
                                     " (carrier_receive: batches of datagrams, device_read: frames from the host).",
                                     labels=["where"])
        errors.add_metric(["carrier"], status.get("carrier_errors", 0))
        errors.add_metric(["device"], role.get("device_write_errors", 0))
        errors.add_metric(["carrier_receive"], status.get("carrier_receive_failures", 0))
        errors.add_metric(["device_read"], role.get("device_read_failures", 0))
        yield errors
        keys = CounterMetricFamily("securelan_agent_key_events", "Rekeys asked for, keepalives sent, "
                                   "keys found past their lifetime.", labels=["event"])
        for event in ("rekeys_asked", "keepalives_sent", "overdue_keys"):
            keys.add_metric([event], role.get(event, 0))
        yield keys
        layer3 = role.get("layer3")
        if layer3 is not None:
            l3_drops = CounterMetricFamily("securelan_agent_layer3_drops",
                                           "Layer 3: packets dropped, by reason.", labels=["reason"])
            for reason, count in sorted(layer3["drops"].items()):
                l3_drops.add_metric([reason], count)
            yield l3_drops
        net = role.get("net")
        if net is not None:
            net_packets = CounterMetricFamily("securelan_agent_net_packets",
                                              "Border: packets to and from each peer subnet.",
                                              labels=["subnet", "direction"])
            net_epoch = GaugeMetricFamily("securelan_agent_netkey_epoch",
                                          "Border: the NETKEY epoch of each link.", labels=["subnet"])
            for link in net["links"]:
                for direction in ("tx", "rx"):
                    net_packets.add_metric([link["subnet"], direction], link[f"{direction}_frames"])
                net_epoch.add_metric([link["subnet"]], link["epoch"])
            yield net_packets
            yield net_epoch
            net_drops = CounterMetricFamily("securelan_agent_net_drops",
                                            "Border: datagrams and packets dropped, by reason.", labels=["reason"])
            for reason, count in sorted(net["drops"].items()):
                net_drops.add_metric([reason], count)
            yield net_drops


def metrics_site(collector) -> Site:
    """
    A web site answering C{/metrics} with C{collector}'s metrics.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    return Site(root)


def listen_metrics(reactor, description: str, collector):
    """
    Serve C{collector} on the server endpoint C{description}; fires with
    the listening port.
    """
    return serverFromString(reactor, description).listen(metrics_site(collector))
