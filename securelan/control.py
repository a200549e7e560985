# -*- test-case-name: tests.test_control -*-
"""
Local control sockets: how the C{securelan} command line talks to a running
agent (C{status}) or key server (C{members}, C{keys}, C{revoke}).

A UNIX stream socket, mode 0600 (only its owner, normally root, may use
it), carrying one JSON request line, ``{"command": NAME, ...arguments}``,
answered by one JSON line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE}``.  Never key material: handlers return
metadata only.
"""

import json
import os

from twisted.internet import defer, protocol
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

from .logs import logger
from .errors import SecurelanError

log = logger("securelan.control")


class ControlError(Exception):
    """
    The daemon refused or failed a control request; the message says why.
    """


class _ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024

    def lineReceived(self, line):
        try:
            request = json.loads(line)
            command = request.pop("command")
            handler = self.factory.handlers[command]
        except (ValueError, KeyError, TypeError, AttributeError):
            return self._answer({"ok": False, "error": "expected {\"command\": one of "
                                 + ", ".join(sorted(self.factory.handlers)) + "}"})
        d = defer.maybeDeferred(handler, **request)
        d.addCallbacks(lambda result: {"ok": True, "result": result}, self._failed)
        d.addCallback(self._answer)

    def _failed(self, failure):
        if failure.check(SecurelanError, ControlError, TypeError, ValueError):
            return {"ok": False, "error": failure.getErrorMessage()}
        log.failure("control request failed", failure)
        return {"ok": False, "error": "internal error (see the daemon's log)"}

    def _answer(self, answer):
        if self.transport is not None:
            self.sendLine(json.dumps(answer, sort_keys=True).encode())
            self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.loseConnection()


class _ControlFactory(protocol.ServerFactory):
    protocol = _ControlProtocol

    def __init__(self, handlers):
        self.handlers = handlers


def listen_control(reactor, path: str, handlers: dict):
    """
    Serve C{handlers} (command name -> callable taking the request's other
    fields as keyword arguments, returning JSON-ready data or a Deferred) on
    a UNIX socket at C{path}, mode 0600.  A stale socket file is replaced;
    a live daemon's is not.
    """
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, mode=0o755, exist_ok=True)
    if os.path.exists(path):
        import socket

        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise OSError(f"another daemon is listening on {path}")
        finally:
            probe.close()
    old = os.umask(0o177)
    try:
        return reactor.listenUNIX(path, _ControlFactory(handlers), mode=0o600)
    finally:
        os.umask(old)


class _Ask(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, request):
        self.request = request
        self.answer = defer.Deferred()
        self.lines = []

    def connectionMade(self):
        self.sendLine(json.dumps(self.request).encode())

    def lineReceived(self, line):
        self.lines.append(line)

    def connectionLost(self, reason):
        if not self.lines:
            self.answer.errback(reason)
            return
        try:
            answer = json.loads(self.lines[0])
        except ValueError:
            self.answer.errback(ControlError("the daemon's answer is not JSON"))
            return
        if answer.get("ok"):
            self.answer.callback(answer.get("result"))
        else:
            self.answer.errback(ControlError(answer.get("error", "refused")))


def ask_control(reactor, path: str, command: str, **arguments):
    """
    Send one request to the daemon listening at C{path}; fires with its
    result, or fails with L{ControlError}.
    """
    proto = _Ask({"command": command, **arguments})
    d = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=5), proto)
    return d.addCallback(lambda _: proto.answer)
