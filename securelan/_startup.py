"""
What both securelan daemons share at start: their command-line options
(C{--config}, C{--log-level}), and how one that cannot start says so: one
line on stderr, a critical log entry, a clean reactor shutdown, and a
non-zero exit status (twistd itself would exit 0 after a service failed to
start).
"""

import os
import sys

from twisted.python import usage

from .logs import LEVELS, logger, set_level

log = logger("securelan")


class DaemonOptions(usage.Options):
    """
    A daemon's options; a subclass names its configuration in C{what}.
    """

    synopsis = "--config PATH"
    what = "daemon"

    def __init__(self):
        super().__init__()
        self.docs["config"] = f"Path to the {self.what}'s TOML configuration file."

    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
        ["log-level", None, "info", "Log events of this level and above: " + ", ".join(LEVELS) + "."],
    ]

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config is required")
        if self["log-level"] not in LEVELS:
            raise usage.UsageError("--log-level must be one of " + ", ".join(LEVELS))
        set_level(self["log-level"])


def fail_startup(reactor, program: str, message: str):
    print(f"{program}: cannot start: {message}", file=sys.stderr, flush=True)
    log.critical("cannot start: {message}", message=message)
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    reactor.callWhenRunning(reactor.stop)
