# -*- test-case-name: tests.test_agent_status -*-
"""
The agent's status: served on its control socket (L{securelan.control}) as
the C{status} command, and formatted as C{securelan status} prints it.
"""

from ..control import ask_control, listen_control


def listen_status(reactor, path, status):
    """
    Serve C{status()} as the C{status} command on the control socket at
    C{path}.
    """
    return listen_control(reactor, path, {"status": status})


def ask_status(reactor, path):
    """
    Ask the agent listening at C{path}; fires with its status dict.
    """
    return ask_control(reactor, path, "status")


def format_status(status: dict) -> str:
    """
    The status as a person reads it (in the manner of ``wg show``).
    """
    out = []
    role = status.get("role", {})
    out.append(f"member: {role.get('member_id', '?')}  mac: {role.get('mac', '?')}  "
               f"role: {status.get('role_name', '?')}  device: {role.get('device')}  "
               f"incarnation: {role.get('incarnation', '?')}")
    for server in status.get("key_servers", []):
        state = "connected" if server.get("connected") else "not connected"
        out.append(f"key server: {server['address']}  {state}")
    group = role.get("group")
    if group:
        out.append(f"group key: epoch {group['epoch']}  senders seen {group['senders']}  "
                   f"tx {group['tx_frames']} frames  rx {group['rx_frames']} frames")
    else:
        out.append("group key: none yet")
    out.append(f"pending frames: {role.get('pending', 0)}  drops: {_drops(role.get('drops', {}))}")
    out.append(f"queue drops: {_drops(role.get('pending_drops', {}))}  "
               f"reassembly drops: {role.get('reassembly_drops', 0)}  "
               f"carrier errors: {status.get('carrier_errors', 0)}  "
               f"device write errors: {role.get('device_write_errors', 0)}")
    if status.get("carrier_receive_failures") or role.get("device_read_failures"):
        out.append(f"carrier receive failures: {status.get('carrier_receive_failures', 0)}  "
                   f"device read failures: {role.get('device_read_failures', 0)}  (dropped: see the log)")
    split = role.get("split_frames")
    if split and any(split.values()):
        out.append(f"split frames received: {split['whole_read']} from whole reads, {split['in_order']} in order, "
                   f"{split['reassembled']} reassembled")
    layer3 = role.get("layer3")
    if layer3 is not None:
        out.append(f"layer 3: {layer3['addresses_known']} peer addresses known, {layer3['asking']} being asked "
                   f"for, {layer3['queued']} packets waiting  drops: {_drops(layer3['drops'])}")
    for peer in role.get("peers", []):
        out.append("")
        out.append(f"peer: {peer['member_id']}")
        out.append(f"  mac: {peer['mac']}  role: {peer['role']}  endpoint: {peer['endpoint']}")
        fronted = [mac for mac in peer.get("macs", []) if mac != peer["mac"]]
        if fronted:
            out.append(f"  fronts: {', '.join(fronted)}")
        out.append(f"  epoch: {peer['epoch']}  rx incarnation: {peer['rx_incarnation']}  "
                   f"queued: {peer['queued']}")
        out.append(f"  transfer: {peer['rx_bytes']} B received ({peer['rx_frames']} frames), "
                   f"{peer['tx_bytes']} B sent ({peer['tx_frames']} frames)")
        out.append(f"  last send: {_ago(peer['last_tx'], status.get('now'))}  "
                   f"last receive: {_ago(peer['last_rx'], status.get('now'))}")
        if peer["drops"]:
            out.append(f"  drops: {_drops(peer['drops'])}")
    net = role.get("net")
    if net is not None:
        out.append("")
        out.append(f"border of subnet {net['subnet']}: TUN device {role.get('tun')}  "
                   f"drops: {_drops(net.get('drops', {}))}")
        if not net["links"]:
            out.append("  no links to other subnets yet")
        for link in net["links"]:
            out.append(f"link: subnet {link['subnet']}  border {link['border']}  endpoint {link['endpoint']}"
                       f"{'' if link['ready'] else '  (its border has not registered)'}")
            out.append(f"  prefixes: {', '.join(link['prefixes'])}  NETKEY epoch: {link['epoch']}  "
                       f"received epochs: {', '.join(map(str, link['epochs_received']))}")
            out.append(f"  transfer: {link['rx_bytes']} B received ({link['rx_frames']} packets), "
                       f"{link['tx_bytes']} B sent ({link['tx_frames']} packets)")
            out.append(f"  last send: {_ago(link['last_tx'], status.get('now'))}  "
                       f"last receive: {_ago(link['last_rx'], status.get('now'))}")
            if link["drops"]:
                out.append(f"  drops: {_drops(link['drops'])}")
    return "\n".join(out)


def _drops(drops):
    return ", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"


def _ago(stamp, now):
    if stamp is None or now is None:
        return "never"
    return f"{max(0.0, now - stamp):.1f} s ago"
