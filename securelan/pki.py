# -*- test-case-name: tests.test_pki -*-
"""
The subnet's certificate authority: making and reading its certificates.

Every subnet has one CA.  It issues key-server certificates (TLS server and,
for key servers that talk to each other, TLS client) and member certificates
(TLS client only).  A member's identity travels in its certificate as URI
subject alternative names, so the key server never trusts anything the member
merely claims:

    urn:securelan:member:<member ID>     exactly one
    urn:securelan:mac:<aa:bb:cc:dd:ee:ff> zero or more; none means any MAC
    urn:securelan:role:<role>            zero or more; none means "client"

The CA records its subnet name the same way (C{urn:securelan:subnet:<name>}).

Keys are ECDSA P-256, signatures SHA-256.  Files are written once and never
overwritten: a key is mode 0600, a certificate 0644.
"""

import datetime
import ipaddress
import os
import re

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .addresses import AddressError, check_member_id, format_mac, parse_mac
from .records import ROLES

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"

URN_MEMBER = "urn:securelan:member:"
URN_MAC = "urn:securelan:mac:"
URN_ROLE = "urn:securelan:role:"
URN_SUBNET = "urn:securelan:subnet:"

# Certificates start a little in the past so a peer whose clock lags ours
# does not reject a certificate that was just issued.
_CLOCK_SKEW = datetime.timedelta(minutes=5)

# A subnet name ends up in a URN and in the CA's subject; the member-ID rule
# keeps it free of separators and spaces.
_SUBNET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class PKIError(Exception):
    """
    A certificate or key could not be made or read.  The message is one line
    naming the file (or certificate) involved and the reason.
    """


class CertificateError(PKIError):
    """
    A certificate does not carry a valid securelan identity.
    """


@attrs.frozen
class MemberIdentity:
    """
    Who a member certificate says its holder is, and what it may do.
    """

    member_id: str
    #: The 6-byte MACs the member may register; empty means any MAC.
    macs: frozenset[bytes] = attrs.field(repr=lambda macs: repr(sorted(map(format_mac, macs))))
    roles: frozenset[str]
    serial: int
    not_valid_after: datetime.datetime

    def allows_mac(self, mac: bytes) -> bool:
        """
        Whether the member may register with C{mac}.
        """
        return not self.macs or mac in self.macs

    def allows_role(self, role: str) -> bool:
        """
        Whether the member may register in C{role}.
        """
        return role in self.roles


# Making certificates


def create_ca(directory: str, subnet: str, days: int = 3650) -> tuple[str, str]:
    """
    Make the self-signed CA of subnet C{subnet}: C{ca.pem} and C{ca.key} in
    C{directory}, which is created (mode 0700) if absent.

    @return: the paths of the certificate and of the key.
    @raise PKIError: if the subnet name or C{days} is invalid, or a file
        exists already or cannot be written.
    """
    _check_days(days)
    if not isinstance(subnet, str) or not _SUBNET_NAME.fullmatch(subnet):
        raise PKIError(f"not a valid subnet name: {subnet!r}")
    cert_path = os.path.join(directory, CA_CERT_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    _ensure_directory(directory)
    _check_absent(cert_path, key_path)

    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"securelan CA {subnet}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, subnet),
        ]
    )
    builder = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(URN_SUBNET + subnet)]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
            critical=False,
        )
    )
    cert = builder.sign(key, hashes.SHA256())
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


def issue_keyserver(
    directory: str,
    name: str,
    days: int = 825,
    ca_cert: str | None = None,
    ca_key: str | None = None,
) -> tuple[str, str]:
    """
    Issue a key-server certificate for host C{name} (a DNS name or an IP
    address): C{<name>.pem} and C{<name>.key} in C{directory}.  It is good
    for TLS server and client authentication, since key servers of a cascade
    or of linked subnets authenticate each other with mutual TLS.

    @param ca_cert: the CA certificate; C{directory/ca.pem} by default.
    @param ca_key: the CA key; C{directory/ca.key} by default.
    @return: the paths of the certificate and of the key.
    @raise PKIError: if an argument is invalid, the CA cannot be loaded, or
        a file exists already or cannot be written.
    """
    _check_days(days)
    ip = _check_host_name(name)
    ca = _load_ca(directory, ca_cert, ca_key)
    cert_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}.key")
    _ensure_directory(directory)
    _check_absent(cert_path, key_path)

    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if ip is not None:
        names.append(x509.IPAddress(ip))
    key = _new_key()
    builder = (
        _leaf_builder(ca, name, key, days)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    cert = builder.sign(ca.key, hashes.SHA256())
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


def issue_member(
    directory: str,
    member_id: str,
    days: int = 825,
    macs=(),
    roles=("client",),
    ca_cert: str | None = None,
    ca_key: str | None = None,
) -> tuple[str, str]:
    """
    Issue a member certificate for C{member_id}: C{<member_id>.pem} and
    C{<member_id>.key} in C{directory}.

    @param macs: MACs (text, such as C{"aa:bb:cc:dd:ee:ff"}) the member may
        register with; empty allows any.
    @param roles: the roles (from L{securelan.records.ROLES}) the member may
        register in.
    @param ca_cert: the CA certificate; C{directory/ca.pem} by default.
    @param ca_key: the CA key; C{directory/ca.key} by default.
    @return: the paths of the certificate and of the key.
    @raise PKIError: if an argument is invalid, the CA cannot be loaded, or
        a file exists already or cannot be written.
    """
    _check_days(days)
    try:
        check_member_id(member_id)
        # parse then format, so the certificate always holds the canonical form
        mac_texts = sorted({format_mac(parse_mac(mac)) for mac in macs})
    except AddressError as e:
        raise PKIError(str(e)) from None
    if isinstance(roles, str):
        roles = (roles,)
    roles = sorted(set(roles))
    if not roles:
        raise PKIError(f"member {member_id!r} needs at least one role")
    for role in roles:
        if role not in ROLES:
            raise PKIError(f"unknown role {role!r}: choose from {', '.join(ROLES)}")
    ca = _load_ca(directory, ca_cert, ca_key)
    cert_path = os.path.join(directory, f"{member_id}.pem")
    key_path = os.path.join(directory, f"{member_id}.key")
    _ensure_directory(directory)
    _check_absent(cert_path, key_path)

    uris = [URN_MEMBER + member_id]
    uris += [URN_MAC + mac for mac in mac_texts]
    uris += [URN_ROLE + role for role in roles]
    key = _new_key()
    builder = (
        _leaf_builder(ca, member_id, key, days)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    cert = builder.sign(ca.key, hashes.SHA256())
    _write_pair(cert_path, cert, key_path, key)
    return cert_path, key_path


@attrs.frozen
class _CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _load_ca(directory: str, cert_path: str | None, key_path: str | None) -> _CA:
    """
    Load the issuing CA and check that its key and certificate belong
    together, so we never hand out certificates nobody can verify.
    """
    if cert_path is None:
        cert_path = os.path.join(directory, CA_CERT_FILE)
    if key_path is None:
        key_path = os.path.join(directory, CA_KEY_FILE)
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PKIError(f"{cert_path}: not a CA certificate")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{key_path}: not an ECDSA key")
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise PKIError(f"{key_path}: key does not match the CA certificate {cert_path}")
    return _CA(cert, key)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _builder(subject, issuer, public_key, days: int) -> x509.CertificateBuilder:
    """
    The fields and extensions every certificate carries.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_builder(ca: _CA, common_name: str, key, days: int) -> x509.CertificateBuilder:
    """
    The fields and extensions of a certificate that C{ca} issues to an end
    entity (a key server or a member).
    """
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    # the subnet's organization name, so the subject says which subnet it is of
    attributes += ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[:1]
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return (
        _builder(x509.Name(attributes), ca.cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(aki, critical=False)
    )


def _check_days(days) -> None:
    # bool is an int, but "--days True" is surely a mistake
    if not isinstance(days, int) or isinstance(days, bool) or days <= 0:
        raise PKIError(f"days must be a positive whole number, not {days!r}")


def _check_host_name(name) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    Check that C{name} is a host name or an IP address (it also becomes a
    file name); return the address if it is one.
    """
    if not isinstance(name, str):
        raise PKIError(f"not a host name: {name!r}")
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise PKIError(f"not a host name or IP address: {name!r}")
    return None


# Files


def _ensure_directory(directory: str) -> None:
    if os.path.isdir(directory):
        return
    try:
        os.makedirs(directory, mode=0o700)
        # makedirs's mode is filtered by the umask; the CA directory must not be
        # readable by others whatever the umask is
        os.chmod(directory, 0o700)
    except OSError as e:
        raise PKIError(f"{directory}: cannot create directory: {e.strerror}") from None


def _check_absent(*paths: str) -> None:
    # checked up front so that a refusal leaves no half-written pair behind
    for path in paths:
        if os.path.lexists(path):
            raise PKIError(f"{path} already exists; refusing to overwrite")


def _write_pair(cert_path: str, cert: x509.Certificate, key_path: str, key) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except PKIError:
        # a key without its certificate is of no use and would block a retry
        os.unlink(key_path)
        raise


def _write_new(path: str, data: bytes, mode: int) -> None:
    """
    Write C{data} to a new file C{path}; never follow a link or replace an
    existing file, even one that appeared since we last looked.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PKIError(f"{path} already exists; refusing to overwrite") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot create: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
    except OSError as e:
        os.unlink(path)
        raise PKIError(f"{path}: cannot write: {e.strerror}") from None


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} file is missing") from None
    except OSError as e:
        raise PKIError(f"{path}: cannot read {what}: {e.strerror}") from None


def load_certificate(path: str) -> x509.Certificate:
    """
    Read a PEM certificate.

    @raise PKIError: if the file is missing, unreadable or not a certificate.
    """
    data = _read(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except Exception:
        # ValueError, and cryptography's own (InvalidVersion, ...).
        raise PKIError(f"{path}: not a PEM certificate") from None


def load_private_key(path: str):
    """
    Read an unencrypted PEM private key.

    @raise PKIError: if the file is missing, unreadable, encrypted or not a
        private key.
    """
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PKIError(f"{path}: private key is encrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise PKIError(f"{path}: not a PEM private key") from None


# Reading certificates


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _label(cert: x509.Certificate) -> str:
    """
    How error messages name a certificate that has no file name at hand.
    """
    subject = cert.subject.rfc4514_string() or "no subject"
    return f"certificate {cert.serial_number:x} ({subject})"


def member_identity(cert: x509.Certificate) -> MemberIdentity:
    """
    The member identity that C{cert} carries (see L{_member_identity}).
    A certificate whose fields do not even parse is a L{CertificateError}
    too: C{cryptography} parses extensions lazily and raises ValueError.
    """
    try:
        return _member_identity(cert)
    except CertificateError:
        raise
    except Exception as e:
        # ValueError, TypeError, DuplicateExtension,
        # UnsupportedGeneralNameType...: whatever a malformed field raises.
        try:
            label = f"certificate {cert.serial_number:x}"
        except Exception:
            label = "a certificate"
        raise CertificateError(f"{label}: malformed ({' '.join(str(e).split())[:200]})") from None


def _member_identity(cert: x509.Certificate) -> MemberIdentity:
    """
    The member identity that C{cert} carries.

    URIs outside the C{member}, C{mac} and C{role} kinds are ignored, so a
    certificate may carry other names as well.

    @raise CertificateError: if C{cert} does not name exactly one valid
        member ID, names an invalid MAC or an unknown role, or is not good
        for TLS client authentication.
    """
    label = _label(cert)
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = ()
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateError(f"{label}: lacks the clientAuth extended key usage")

    member_ids = []
    macs = set()
    roles = set()
    for uri in _uris(cert):
        if uri.startswith(URN_MEMBER):
            member_ids.append(uri[len(URN_MEMBER) :])
        elif uri.startswith(URN_MAC):
            try:
                macs.add(parse_mac(uri[len(URN_MAC) :]))
            except AddressError:
                raise CertificateError(f"{label}: invalid MAC URI {uri!r}") from None
        elif uri.startswith(URN_ROLE):
            role = uri[len(URN_ROLE) :]
            if role not in ROLES:
                raise CertificateError(f"{label}: unknown role URI {uri!r}")
            roles.add(role)
    if not member_ids:
        raise CertificateError(f"{label}: no {URN_MEMBER} URI")
    if len(member_ids) > 1:
        raise CertificateError(f"{label}: several {URN_MEMBER} URIs")
    try:
        member_id = check_member_id(member_ids[0])
    except AddressError as e:
        raise CertificateError(f"{label}: {e}") from None
    return MemberIdentity(
        member_id=member_id,
        macs=frozenset(macs),
        roles=frozenset(roles or {"client"}),
        serial=cert.serial_number,
        not_valid_after=cert.not_valid_after_utc,
    )


def keyserver_names(cert: x509.Certificate) -> list[str]:
    """
    The DNS names of a key-server certificate (empty if it has none).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def ca_subnet(cert: x509.Certificate) -> str | None:
    """
    The subnet name a CA certificate records, or None.
    """
    for uri in _uris(cert):
        if uri.startswith(URN_SUBNET):
            return uri[len(URN_SUBNET) :]
    return None


def describe(cert: x509.Certificate) -> dict:
    """
    What an operator wants to know about C{cert}, as JSON-ready values.

    A certificate that names a member but not validly gets C{member_error}
    instead of C{member}, so a broken certificate can still be inspected.
    """
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    info = {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_valid_before": cert.not_valid_before_utc.isoformat(),
        "not_valid_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":"),
        "ca": is_ca,
    }
    subnet = ca_subnet(cert)
    if subnet is not None:
        info["subnet"] = subnet
    dns_names = keyserver_names(cert)
    if dns_names:
        info["dns_names"] = dns_names
    if any(uri.startswith(URN_MEMBER) for uri in _uris(cert)):
        try:
            identity = member_identity(cert)
        except CertificateError as e:
            info["member_error"] = str(e)
        else:
            info["member"] = {
                "member_id": identity.member_id,
                "macs": sorted(format_mac(mac) for mac in identity.macs),
                "roles": sorted(identity.roles),
            }
    return info
