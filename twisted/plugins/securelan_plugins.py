"""
twistd plugins: ``securelan-keyserver`` (and, later, ``securelan-agent``).
"""

from twisted.application.service import ServiceMaker

securelanKeyserver = ServiceMaker(
    "securelan key server",
    "securelan.keyserver.tap",
    "Admit members and hand out pair keys and the group key.",
    "securelan-keyserver",
)
