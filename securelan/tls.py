# -*- test-case-name: tests.test_keyserver -*-
"""
TLS for every securelan control channel: TLS 1.3 only, mutually
authenticated against the subnet CA.

OpenSSL's default key-exchange groups are left alone on purpose: with the
OpenSSL that ships in C{cryptography}, two endpoints negotiate the hybrid
post-quantum group X25519MLKEM768, so keys handed out today cannot be read
from a recording later.  L{negotiated_group} reports what was used.
"""

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.error import VerifyError
from twisted.internet._sslverify import TLSVersion

#: What every securelan TLS channel negotiates; tests assert it.
EXPECTED_GROUP = "X25519MLKEM768"


class TLSConfigError(Exception):
    """
    A certificate, key or CA file cannot be used for TLS.
    """


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"{path}: cannot read {what}: {e.strerror}") from None


@attrs.frozen
class Credentials:
    """
    A party's TLS credentials: its certificate and key, and the CA it trusts.
    """

    ca: ssl.Certificate
    own: ssl.PrivateCertificate

    @classmethod
    def load(cls, ca_path: str, cert_path: str, key_path: str) -> "Credentials":
        try:
            ca = ssl.Certificate.loadPEM(_read(ca_path, "CA certificate"))
        except SSL.Error:
            raise TLSConfigError(f"{ca_path}: not a PEM certificate") from None
        cert_pem = _read(cert_path, "certificate")
        key_pem = _read(key_path, "private key")
        try:
            own = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except VerifyError:
            raise TLSConfigError(f"{key_path}: private key does not match {cert_path}") from None
        except (SSL.Error, ValueError):
            raise TLSConfigError(f"{cert_path}, {key_path}: not a PEM certificate and private key") from None
        try:
            ctx = SSL.Context(SSL.TLS_METHOD)
            ctx.use_certificate(own.original)
            ctx.use_privatekey(own.privateKey.original)
            ctx.check_privatekey()
        except (SSL.Error, TypeError):
            raise TLSConfigError(f"{key_path}: private key does not match {cert_path}") from None
        return cls(ca=ca, own=own)

    def server_options(self):
        """
        Options for a server that demands a client certificate from our CA.
        """
        return ssl.CertificateOptions(
            privateKey=self.own.privateKey.original,
            certificate=self.own.original,
            trustRoot=ssl.trustRootFromCertificates([self.ca]),
            raiseMinimumTo=TLSVersion.TLSv1_3,
        )

    def client_options(self, hostname: str):
        """
        Options for a client that presents our certificate and checks that
        the server is C{hostname} (service-identity), signed by our CA.
        """
        return ssl.optionsForClientTLS(
            hostname,
            trustRoot=ssl.trustRootFromCertificates([self.ca]),
            clientCertificate=self.own,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_3},
        )


def negotiated_group(transport) -> str | None:
    """
    The key-exchange group a TLS transport negotiated, e.g. C{X25519MLKEM768}.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if isinstance(handle, SSL.Connection):
        return handle.get_group_name()
    return None


def peer_certificate(transport):
    """
    The peer's certificate as a C{cryptography} certificate, or None.
    """
    cert = transport.getPeerCertificate()
    return cert.to_cryptography() if cert is not None else None


def describe_tls_failure(reason) -> str:
    """
    A one-line reason for a failed TLS handshake, from OpenSSL's error list.
    """
    value = getattr(reason, "value", reason)
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [str(entry[-1]) for entry in value.args[0] if entry]
        if parts:
            return "; ".join(parts)
    return str(value) or value.__class__.__name__
