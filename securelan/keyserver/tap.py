# -*- test-case-name: tests.test_keyserver_process -*-
"""
``twistd securelan-keyserver``: options and service assembly.

Everything that can be checked before the reactor runs is checked in
L{makeService}: the configuration, the TLS credentials, and that the store
opens under the master key.  A failure there prints one line naming the file
and exits non-zero, rather than starting a key server that cannot serve.
"""

import gc
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure

from ..logs import logger
from .._startup import DaemonOptions, fail_startup
from ..config import ConfigError, load_keyserver_config
from ..keys import MasterKeyError
from ..pki import PKIError
from ..store import StoreOpenError, open_store, run_synchronously
from ..tls import Credentials, TLSConfigError
from ..control import listen_control
from .admin import admin_handlers
from .peering import NetKeyBroker, PeeringService
from .connections import MemberTLSFactory, SourceLimits
from .server import KeyServer, KeyServerFactory

log = logger("securelan.keyserver")


class Options(DaemonOptions):
    longdesc = "Run a securelan key server (see etc/keyserver.toml)."
    what = "key server"


class KeyServerService(service.Service):
    """
    Opens the store, makes sure the group key exists, then listens.
    Nothing is served before the store is open.
    """

    def __init__(self, config, credentials, store, reactor):
        self.config = config
        self.reactor = reactor
        self.store = store
        self.server = KeyServer(
            subnet=config.subnet,
            store=store,
            clock=reactor,
            limits=config.limits,
            pair_key_lifetime=config.pair_key_lifetime,
            pair_key_max_packets=config.pair_key_max_packets,
            pair_key_max_bytes=config.pair_key_max_bytes,
            group_key_lifetime=config.group_key_lifetime,
        )
        self.peering = None
        if config.netkey.peers:
            self.server.broker = NetKeyBroker(config.subnet, config.netkey, credentials, reactor,
                                              on_change=self.server.links_changed)
            self.peering = PeeringService(self.server.broker, reactor)
        limits = config.limits
        self.factory = MemberTLSFactory(
            credentials.server_options(), KeyServerFactory(self.server),
            SourceLimits(limits.max_connections, limits.max_connections_per_source,
                         rate=limits.connections_per_second_per_source,
                         burst=limits.connection_burst_per_source, clock=reactor),
            clock=reactor)
        self.port = None
        self.admin_port = None
        self.metrics_port = None
        self.rekey_loop = None
        self.netkey_loop = None
        self.ready = None

    def startService(self):
        super().startService()
        self.ready = self.store.open()
        self.ready.addCallback(lambda _: self.server.start())
        if self.peering is not None:
            self.ready.addCallback(lambda _: self.peering.startService())
        self.ready.addCallback(lambda _: serverFromString(self.reactor, self.config.listen).listen(self.factory))
        self.ready.addCallbacks(self._listening, self._failed)

    def _listening(self, port):
        self.port = port
        if self.config.metrics:
            from ..metrics import KeyServerCollector, listen_metrics

            listen_metrics(self.reactor, self.config.metrics, KeyServerCollector(self.server)).addCallbacks(
                lambda p: setattr(self, "metrics_port", p),
                lambda f: fail_startup(self.reactor, "securelan-keyserver",
                                       f"metrics {self.config.metrics}: {f.getErrorMessage()}"))
        lifetimes = [t for t in (self.config.pair_key_lifetime, self.config.group_key_lifetime) if t]
        if lifetimes:
            lifetime = min(lifetimes)
            # Keys due for replacement are rekeyed within a tenth of their
            # lifetime (at most a minute) of falling due.
            self.rekey_loop = LoopingCall(self._rekey_due)
            self.rekey_loop.clock = self.reactor
            self.rekey_loop.start(min(60.0, lifetime / 10), now=False)
        if self.peering is not None and self.config.netkey.lifetime:
            self.netkey_loop = LoopingCall(self.server.broker.rekey_due)
            self.netkey_loop.clock = self.reactor
            self.netkey_loop.start(min(60.0, self.config.netkey.lifetime / 10), now=False)
        if self.config.admin_socket:
            try:
                self.admin_port = listen_control(self.reactor, self.config.admin_socket,
                                                 admin_handlers(self.server))
            except OSError as e:
                fail_startup(self.reactor, "securelan-keyserver",
                             f"admin socket {self.config.admin_socket}: {e}")
                return port
        log.info("key server for subnet {subnet} listening on {address}",
                 subnet=self.config.subnet, address=port.getHost())
        return port

    def _rekey_due(self):
        return self.server.rekey_due().addErrback(lambda f: log.failure("rekey check failed", f))

    def _failed(self, failure):
        log.failure("key server failed to start", failure)
        fail_startup(self.reactor, "securelan-keyserver", failure.getErrorMessage())

    def stopService(self):
        super().stopService()
        d = self.ready
        for loop in (self.rekey_loop, self.netkey_loop):
            if loop is not None and loop.running:
                loop.stop()
        if self.peering is not None and self.peering.running:
            stopping = defer.maybeDeferred(self.peering.stopService)
            d.addBoth(lambda _: stopping)
        for attribute in ("admin_port", "metrics_port"):
            port = getattr(self, attribute)
            if port is not None:
                port.stopListening()
                setattr(self, attribute, None)
        if self.port is not None:
            stopped = defer.maybeDeferred(self.port.stopListening)
            d.addBoth(lambda _: stopped)
            self.port = None
        return d.addBoth(lambda _: self.store.close())


def _result_of(d):
    """
    The result of a Deferred that has already fired; raise its failure.
    """
    out = []
    d.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def _fail(message):
    print(f"securelan-keyserver: {message}", file=sys.stderr)
    raise SystemExit(1)


#: The collector's thresholds in a key server (Python's are 700, 10, 10):
#: see L{tune_collector}.
COLLECTOR_THRESHOLDS = (10000, 10, 10)


def tune_collector():
    """
    Collect young objects less often than Python does by default.  A key
    server holds a large, long-lived heap (10,000 sessions: ~560 MiB), and
    under load every request keeps a few short-lived objects (Deferreds,
    boxes, closures) alive for milliseconds.  With the default thresholds
    many are still alive when the young generation is collected, are
    promoted, and make full collections frequent: 8 in a 10 s burst of new
    keys at 10,000 sessions, 0.3 s each (bench/keyserver_load.py, see
    BENCHMARKS.md).  With 10,000 allocations between young collections
    they die young: no full collection in that run, the longest pause
    51 ms, new keys about 25 % faster.
    """
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    tune_collector()
    try:
        config = load_keyserver_config(options["config"])
        credentials = Credentials.load(config.ca, config.certificate, config.private_key)
        # Open and close once, synchronously: creates the database at first
        # start and proves the master key matches before we go on.
        preflight = open_store(config.store, config.master_key, runner=run_synchronously)
        _result_of(preflight.open())
        _result_of(preflight.close())
    except (ConfigError, TLSConfigError, PKIError, StoreOpenError, MasterKeyError) as e:
        _fail(str(e))
    store = open_store(config.store, config.master_key, reactor=reactor)
    try:
        return KeyServerService(config, credentials, store, reactor)
    except TLSConfigError as e:
        _fail(str(e))
