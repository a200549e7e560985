"""
How a securelan daemon that cannot start says so: one line on stderr, a
critical log entry, a clean reactor shutdown, and a non-zero exit status
(twistd itself would exit 0 after a service failed to start).
"""

import os
import sys

from .logs import logger

log = logger("securelan")


def fail_startup(reactor, program: str, message: str):
    print(f"{program}: cannot start: {message}", file=sys.stderr, flush=True)
    log.critical("cannot start: {message}", message=message)
    reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
    reactor.callWhenRunning(reactor.stop)
