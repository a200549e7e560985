"""
securelan: a key-server-based network encryption system on Twisted.

A key server admits member hosts (identity from a TLS client certificate, plus
the MAC of their interface) and hands out pair keys bound to both members'
IDs, so only the two ends of a conversation can read it.
"""

__version__ = "0.1.0"

#: The control-protocol version spoken between agents and key servers.  A
#: register request carrying another version is refused with a clear error.
PROTOCOL_VERSION = 1
