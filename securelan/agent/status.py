# -*- test-case-name: tests.test_agent_status -*-
"""
The agent's local status socket: a UNIX stream socket (mode 0600) on which
the agent answers one line, ``status``, with one line of JSON.
C{securelan status} is its client.
"""

import json
import os

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver


class StatusProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1024

    def lineReceived(self, line):
        if line.strip() == b"status":
            self.sendLine(json.dumps(self.factory.status(), sort_keys=True).encode())
        else:
            self.sendLine(json.dumps({"error": "unknown request; send 'status'"}).encode())
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.loseConnection()


class StatusFactory(protocol.ServerFactory):
    protocol = StatusProtocol

    def __init__(self, status):
        self.status = status


def listen_status(reactor, path, status):
    """
    Serve C{status()} on a UNIX socket at C{path}, readable by its owner
    only.  A stale socket file from a dead agent is replaced.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, mode=0o755, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, StatusFactory(status), mode=0o600)
    finally:
        os.umask(old)


class _Ask(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self):
        self.answer = defer.Deferred()
        self.lines = []

    def connectionMade(self):
        self.sendLine(b"status")

    def lineReceived(self, line):
        self.lines.append(line)

    def connectionLost(self, reason):
        if self.lines:
            self.answer.callback(json.loads(self.lines[0]))
        else:
            self.answer.errback(reason)


def ask_status(reactor, path):
    """
    Ask the agent listening at C{path}; fires with its status dict.
    """
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    proto = _Ask()
    d = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), proto)
    return d.addCallback(lambda _: proto.answer)


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
    for peer in role.get("peers", []):
        out.append("")
        out.append(f"peer: {peer['member_id']}")
        out.append(f"  mac: {peer['mac']}  role: {peer['role']}  endpoint: {peer['endpoint']}")
        out.append(f"  epoch: {peer['epoch']}  rx incarnation: {peer['rx_incarnation']}  "
                   f"queued: {peer['queued']}")
        out.append(f"  transfer: {peer['rx_bytes']} B received ({peer['rx_frames']} frames), "
                   f"{peer['tx_bytes']} B sent ({peer['tx_frames']} frames)")
        out.append(f"  last send: {_ago(peer['last_tx'], status.get('now'))}  "
                   f"last receive: {_ago(peer['last_rx'], status.get('now'))}")
        if peer["drops"]:
            out.append(f"  drops: {_drops(peer['drops'])}")
    return "\n".join(out)


def _drops(drops):
    return ", ".join(f"{k} {v}" for k, v in sorted(drops.items())) or "none"


def _ago(stamp, now):
    if stamp is None or now is None:
        return "never"
    return f"{max(0.0, now - stamp):.1f} s ago"
