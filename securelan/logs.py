# -*- test-case-name: tests.test_logs -*-
"""
securelan's loggers, their level, and logs for log shippers.

Every securelan module logs through a L{logger} of this module, whose
events below the level set with L{set_level} (C{info} unless the daemon's
C{--log-level} says otherwise) are dropped before any observer sees them:
twistd's own observers write every event, debug included, and a debug line
per key or per connection costs a busy key server real time.

Logs for log shippers: one JSON object a line on standard output.

    twistd -n --logger securelan.logs.json_observer securelan-keyserver ...

Every event keeps its fields (the member, the peer, the reason of a
refusal) as JSON keys, plus C{time}, C{level}, C{namespace} and the
formatted C{text}; nothing else is added, and no securelan event carries
key material.
"""

import json
import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import provider

#: The levels a daemon's --log-level accepts.
LEVELS = ("debug", "info", "warn", "error", "critical")

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def _publish(event):
    # Looked up at each event, so that observers added later (twistd's,
    # a test's) see securelan's events.
    globalLogPublisher(event)


_filtered = FilteringLogObserver(_publish, [_levels])


def logger(namespace=None) -> Logger:
    """
    A logger for C{namespace} whose events below the level go nowhere.
    """
    return Logger(namespace=namespace, observer=_filtered)


def contain(call, owner, counter: str, log: Logger, message: str, **fields):
    """
    C{call}, such that an exception it raises is counted in C{owner}'s
    attribute C{counter} and logged with its traceback (the first ten, then
    every thousandth; C{message} may use C{{count}} and C{fields}) instead
    of raised.  For what a reader hands its input to: an exception out of a
    reader's C{doRead} makes Twisted close what it reads, and the agent
    would take in nothing more until restarted.
    """

    def contained(*args):
        try:
            return call(*args)
        except Exception:
            count = getattr(owner, counter) + 1
            setattr(owner, counter, count)
            if count <= 10 or not count % 1000:
                log.failure(message, count=count, **fields)

    return contained


def set_level(name: str):
    """
    Let securelan's events of level C{name} (one of L{LEVELS}) and above
    through.
    """
    _levels.setLogLevelForNamespace("", LogLevel.levelWithName(name))


def _plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def json_line(event) -> str:
    """
    One event as a JSON line.
    """
    record = {
        "time": event.get("log_time"),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "text": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in record:
            record[key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return json.dumps(record, sort_keys=True)


def json_observer(out=None):
    """
    A log observer factory for twistd's C{--logger}: JSON lines on
    standard output (or C{out}).
    """
    stream = out or sys.stdout

    @provider(ILogObserver)
    def observe(event):
        stream.write(json_line(event) + "\n")
        stream.flush()

    return observe


__all__ = ["json_observer", "json_line", "logger", "set_level", "LEVELS"]
