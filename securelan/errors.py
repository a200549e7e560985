"""
Every failure a key server reports to a member on purpose.

Each is an exception with a clear message; the AMP commands declare them, so
the member receives the same exception class (see L{securelan.protocol}).
Messages never carry key material.
"""


class SecurelanError(Exception):
    """
    Base of securelan's expected failures.
    """


class NotRegistered(SecurelanError):
    """
    The connection has not registered yet: register comes first.
    """


class UnknownPeer(SecurelanError):
    """
    No member (and no gateway) holds the MAC that was asked for.
    """


class MacInUse(SecurelanError):
    """
    The MAC is registered to another member (anti-spoofing).
    """


class AddressInUse(SecurelanError):
    """
    The overlay IP address (layer 3) is registered to another member.
    """


class NotPermitted(SecurelanError):
    """
    The member's certificate does not allow this (a MAC other than the one it
    pins, a role it does not carry, a key for itself).
    """


class RateLimited(SecurelanError):
    """
    The member sent requests faster than its allowance.
    """


class VersionMismatch(SecurelanError):
    """
    The member speaks another version of the control protocol.
    """


class BadRequest(SecurelanError):
    """
    A request was malformed (for example a MAC that is not 6 bytes).
    """


class TableFull(SecurelanError):
    """
    A table of the key server reached its configured cap.
    """


class StoreUnavailable(SecurelanError):
    """
    The key server's store failed; the request may be retried.
    """
