"""
twistd plugins: ``securelan-keyserver`` and ``securelan-agent``.
"""

from twisted.application.service import ServiceMaker

securelanKeyserver = ServiceMaker(
    "securelan key server",
    "securelan.keyserver.tap",
    "Admit members and hand out pair keys and the group key.",
    "securelan-keyserver",
)

securelanAgent = ServiceMaker(
    "securelan member agent",
    "securelan.agent.tap",
    "Encrypt this host's frames on a TAP device with keys from the key server.",
    "securelan-agent",
)
