"""
Tests for L{securelan.pki}.
"""

import datetime
import os
import stat

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securelan import pki
from securelan.addresses import format_mac, parse_mac
from securelan.records import ROLES
from securelan.testing import make_pki

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH

member_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
mac_sets = st.frozensets(st.binary(min_size=6, max_size=6), max_size=4)
role_sets = st.frozensets(st.sampled_from(ROLES), min_size=1)


def hand_made_certificate(ca_cert_path, ca_key_path, uris, eku=(CLIENT_AUTH,)):
    """
    A certificate signed by the CA at the given paths, carrying C{uris} as
    URI names and C{eku} as extended key usages (none if empty), built with
    cryptography directly so it can be anything C{issue_member} refuses to
    make.
    """
    ca_cert = pki.load_certificate(ca_cert_path)
    ca_key = pki.load_private_key(ca_key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hand-made")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def signed_by(cert, ca_cert) -> bool:
    """
    Whether C{cert}'s signature verifies under C{ca_cert}'s public key.
    """
    try:
        ca_cert.public_key().verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm),
        )
    except InvalidSignature:
        return False
    return True


def extension(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


class CreateCATests(SynchronousTestCase):
    """
    Tests for L{pki.create_ca}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.cert_path, self.key_path = pki.create_ca(self.directory, "lab")
        self.cert = pki.load_certificate(self.cert_path)

    def test_paths(self):
        """
        The CA is written as C{ca.pem} and C{ca.key} in a directory that is
        created with mode 0700.
        """
        self.assertEqual(
            (self.cert_path, self.key_path),
            (os.path.join(self.directory, "ca.pem"), os.path.join(self.directory, "ca.key")),
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_file_modes(self):
        """
        The key is readable by its owner only; the certificate by anyone.
        """
        self.assertEqual(stat.S_IMODE(os.stat(self.key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.cert_path).st_mode), 0o644)

    def test_self_signed(self):
        """
        The CA certificate is self-signed with its own P-256 key over
        SHA-256, and the key on disk matches it.
        """
        key = pki.load_private_key(self.key_path)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertIsInstance(self.cert.signature_hash_algorithm, hashes.SHA256)
        self.assertEqual(self.cert.subject, self.cert.issuer)
        self.assertTrue(signed_by(self.cert, self.cert))
        self.assertEqual(
            key.public_key().public_numbers(), self.cert.public_key().public_numbers()
        )

    def test_ca_extensions(self):
        """
        The CA may sign certificates but no intermediate CA, and says so in
        critical extensions.
        """
        constraints = extension(self.cert, x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertEqual(constraints.value, x509.BasicConstraints(ca=True, path_length=0))
        usage = extension(self.cert, x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertTrue(usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)
        extension(self.cert, x509.SubjectKeyIdentifier)
        extension(self.cert, x509.AuthorityKeyIdentifier)

    def test_subject_and_subnet(self):
        """
        The subject names the subnet, and so does a subnet URI.
        """
        self.assertEqual(
            self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "securelan CA lab",
        )
        self.assertEqual(
            self.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
            "lab",
        )
        self.assertEqual(pki.ca_subnet(self.cert), "lab")

    def test_days(self):
        """
        The CA is valid from five minutes ago for C{days} days.
        """
        directory = self.mktemp()
        cert = pki.load_certificate(pki.create_ca(directory, "lab", days=7)[0])
        self.assertEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc,
            datetime.timedelta(days=7, minutes=5),
        )
        now = datetime.datetime.now(datetime.timezone.utc)
        self.assertTrue(cert.not_valid_before_utc < now - datetime.timedelta(minutes=4))

    def test_bad_days(self):
        """
        C{days} must be a positive int.
        """
        for days in (0, -1, 1.5, "10", True):
            with self.assertRaises(pki.PKIError):
                pki.create_ca(self.mktemp(), "lab", days=days)

    def test_bad_subnet(self):
        """
        A subnet name with characters that do not belong in a URN is refused.
        """
        for subnet in ("", "a b", "a/b", "-lab"):
            with self.assertRaises(pki.PKIError):
                pki.create_ca(self.mktemp(), subnet)

    def test_random_serials(self):
        """
        Two CAs get different serial numbers.
        """
        other = pki.load_certificate(pki.create_ca(self.mktemp(), "lab")[0])
        self.assertNotEqual(self.cert.serial_number, other.serial_number)

    def test_refuses_to_overwrite(self):
        """
        A second C{create_ca} in the same directory fails, naming the file,
        and leaves the first CA unchanged.
        """
        with open(self.cert_path, "rb") as f:
            cert_before = f.read()
        with open(self.key_path, "rb") as f:
            key_before = f.read()
        with self.assertRaises(pki.PKIError) as cm:
            pki.create_ca(self.directory, "lab")
        self.assertEqual(
            str(cm.exception), f"{self.cert_path} already exists; refusing to overwrite"
        )
        with open(self.cert_path, "rb") as f:
            self.assertEqual(f.read(), cert_before)
        with open(self.key_path, "rb") as f:
            self.assertEqual(f.read(), key_before)

    def test_no_half_pair(self):
        """
        If only the key file is in the way, nothing is written: the check
        covers both files before either is written.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        key_path = os.path.join(directory, "ca.key")
        with open(key_path, "w") as f:
            f.write("precious")
        with self.assertRaises(pki.PKIError) as cm:
            pki.create_ca(directory, "lab")
        self.assertIn(key_path, str(cm.exception))
        self.assertEqual(os.listdir(directory), ["ca.key"])
        with open(key_path) as f:
            self.assertEqual(f.read(), "precious")


class IssueKeyserverTests(SynchronousTestCase):
    """
    Tests for L{pki.issue_keyserver}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.ca_path, _ = pki.create_ca(self.directory, "lab")
        self.ca = pki.load_certificate(self.ca_path)

    def test_round_trip(self):
        """
        A key-server certificate names its host, is signed by the CA, and
        serves for TLS server and client authentication.
        """
        cert_path, key_path = pki.issue_keyserver(self.directory, "ks.lab")
        self.assertEqual(cert_path, os.path.join(self.directory, "ks.lab.pem"))
        self.assertEqual(key_path, os.path.join(self.directory, "ks.lab.key"))
        cert = pki.load_certificate(cert_path)
        self.assertEqual(pki.keyserver_names(cert), ["ks.lab"])
        self.assertEqual(cert.issuer, self.ca.subject)
        self.assertTrue(signed_by(cert, self.ca))
        self.assertEqual(
            list(extension(cert, x509.ExtendedKeyUsage).value), [SERVER_AUTH, CLIENT_AUTH]
        )
        self.assertFalse(extension(cert, x509.BasicConstraints).value.ca)
        self.assertEqual(
            extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier,
            extension(self.ca, x509.SubjectKeyIdentifier).value.digest,
        )
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        key = pki.load_private_key(key_path)
        self.assertEqual(key.public_key().public_numbers(), cert.public_key().public_numbers())

    def test_ip_address(self):
        """
        A key server named by an IP address also gets an IP address name.
        """
        cert = pki.load_certificate(pki.issue_keyserver(self.directory, "192.0.2.7")[0])
        san = extension(cert, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["192.0.2.7"])
        self.assertEqual(
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)], ["192.0.2.7"]
        )

    def test_bad_name(self):
        """
        A name that is neither a host name nor an IP address is refused.
        """
        for name in ("", "a b", "../etc/passwd", "-ks", "ks..lab", "*.lab"):
            with self.assertRaises(pki.PKIError):
                pki.issue_keyserver(self.directory, name)

    def test_days(self):
        """
        The certificate is valid for C{days} days (and five minutes of skew).
        """
        cert = pki.load_certificate(pki.issue_keyserver(self.directory, "ks", days=3)[0])
        self.assertEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc,
            datetime.timedelta(days=3, minutes=5),
        )

    def test_explicit_ca(self):
        """
        The CA may live elsewhere than the output directory.
        """
        out = self.mktemp()
        cert_path, _ = pki.issue_keyserver(
            out,
            "ks",
            ca_cert=self.ca_path,
            ca_key=os.path.join(self.directory, "ca.key"),
        )
        self.assertTrue(signed_by(pki.load_certificate(cert_path), self.ca))

    def test_missing_ca(self):
        """
        Without a CA in the directory, the error names the missing file.
        """
        directory = self.mktemp()
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue_keyserver(directory, "ks")
        self.assertIn(os.path.join(directory, "ca.pem"), str(cm.exception))

    def test_mismatched_ca_key(self):
        """
        A CA key that does not belong to the CA certificate is refused.
        """
        other = self.mktemp()
        pki.create_ca(other, "other")
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue_keyserver(self.directory, "ks", ca_key=os.path.join(other, "ca.key"))
        self.assertIn("does not match", str(cm.exception))

    def test_refuses_to_overwrite(self):
        """
        Issuing the same name twice fails and leaves the first pair intact.
        """
        cert_path, key_path = pki.issue_keyserver(self.directory, "ks")
        with open(key_path, "rb") as f:
            before = f.read()
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue_keyserver(self.directory, "ks")
        self.assertIn("refusing to overwrite", str(cm.exception))
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), before)


class IssueMemberTests(SynchronousTestCase):
    """
    Tests for L{pki.issue_member} and L{pki.member_identity}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.ca_path, self.ca_key_path = pki.create_ca(self.directory, "lab")
        self.ca = pki.load_certificate(self.ca_path)

    def issue(self, member_id, **kwargs):
        return pki.load_certificate(pki.issue_member(self.directory, member_id, **kwargs)[0])

    def test_round_trip(self):
        """
        A member certificate carries the member ID, its MACs and its roles,
        and C{member_identity} reads them back.
        """
        cert = self.issue(
            "alice", macs=["02:00:00:00:00:01", "02-00-00-00-00-02"], roles=("client", "gateway")
        )
        identity = pki.member_identity(cert)
        self.assertEqual(identity.member_id, "alice")
        self.assertEqual(
            identity.macs,
            frozenset({parse_mac("02:00:00:00:00:01"), parse_mac("02:00:00:00:00:02")}),
        )
        self.assertEqual(identity.roles, frozenset({"client", "gateway"}))
        self.assertEqual(identity.serial, cert.serial_number)
        self.assertEqual(identity.not_valid_after, cert.not_valid_after_utc)

    def test_certificate_contents(self):
        """
        The subject's CN is the member ID, the URIs are in canonical form,
        and the certificate is for TLS client authentication only.
        """
        cert = self.issue("alice", macs=["02:AA:00:00:00:01"])
        self.assertEqual(
            cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "alice"
        )
        uris = extension(cert, x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
        self.assertEqual(
            uris,
            [
                "urn:securelan:member:alice",
                "urn:securelan:mac:02:aa:00:00:00:01",
                "urn:securelan:role:client",
            ],
        )
        self.assertEqual(list(extension(cert, x509.ExtendedKeyUsage).value), [CLIENT_AUTH])
        extension(cert, x509.AuthorityKeyIdentifier)

    def test_default_any_mac_and_client(self):
        """
        By default a member may use any MAC, in the client role only.
        """
        identity = pki.member_identity(self.issue("bob"))
        self.assertEqual(identity.macs, frozenset())
        self.assertEqual(identity.roles, frozenset({"client"}))
        self.assertTrue(identity.allows_mac(b"\x02\x00\x00\x00\x00\x09"))
        self.assertTrue(identity.allows_role("client"))
        self.assertFalse(identity.allows_role("gateway"))

    def test_allows_mac(self):
        """
        A member with pinned MACs may use those and no other.
        """
        identity = pki.member_identity(self.issue("carol", macs=["02:00:00:00:00:01"]))
        self.assertTrue(identity.allows_mac(b"\x02\x00\x00\x00\x00\x01"))
        self.assertFalse(identity.allows_mac(b"\x02\x00\x00\x00\x00\x02"))

    def test_no_role_uri_means_client(self):
        """
        A certificate without role URIs allows the client role.
        """
        cert = hand_made_certificate(
            self.ca_path, self.ca_key_path, ["urn:securelan:member:dave"]
        )
        self.assertEqual(pki.member_identity(cert).roles, frozenset({"client"}))

    def test_other_uris_ignored(self):
        """
        URIs that are not securelan member names do not matter.
        """
        cert = hand_made_certificate(
            self.ca_path,
            self.ca_key_path,
            ["https://example.com/", "urn:securelan:member:dave"],
        )
        self.assertEqual(pki.member_identity(cert).member_id, "dave")

    def test_verifies_against_its_ca_only(self):
        """
        A member certificate's signature verifies under its CA's public key
        and not under another CA's.
        """
        cert = self.issue("alice")
        self.assertTrue(signed_by(cert, self.ca))
        other = pki.load_certificate(pki.create_ca(self.mktemp(), "lab")[0])
        self.assertFalse(signed_by(cert, other))

    def test_key_mode(self):
        """
        The member's key file is mode 0600, its certificate 0644.
        """
        cert_path, key_path = pki.issue_member(self.directory, "alice")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(cert_path).st_mode), 0o644)

    def test_days(self):
        """
        The certificate is valid for C{days} days (and five minutes of skew).
        """
        cert = self.issue("alice", days=10)
        self.assertEqual(
            cert.not_valid_after_utc - cert.not_valid_before_utc,
            datetime.timedelta(days=10, minutes=5),
        )

    def test_refuses_to_overwrite(self):
        """
        Issuing the same member twice fails, names the file, and leaves the
        original certificate unchanged.
        """
        cert_path, _ = pki.issue_member(self.directory, "alice")
        with open(cert_path, "rb") as f:
            before = f.read()
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue_member(self.directory, "alice", macs=["02:00:00:00:00:01"])
        self.assertIn(cert_path, str(cm.exception))
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_bad_member_id(self):
        """
        An invalid member ID is refused before anything is written.
        """
        for member_id in ("", "../x", "@group", "a b", "x" * 64):
            with self.assertRaises(pki.PKIError) as cm:
                pki.issue_member(self.directory, member_id)
            self.assertIn("member ID", str(cm.exception))
        self.assertEqual(sorted(os.listdir(self.directory)), ["ca.key", "ca.pem"])

    def test_bad_mac(self):
        """
        An invalid MAC is refused with a message naming it.
        """
        with self.assertRaises(pki.PKIError) as cm:
            pki.issue_member(self.directory, "alice", macs=["02:00:00:00:00"])
        self.assertIn("02:00:00:00:00", str(cm.exception))

    def test_bad_role(self):
        """
        A role outside L{ROLES}, or no role at all, is refused.
        """
        for roles in (("admin",), ()):
            with self.assertRaises(pki.PKIError):
                pki.issue_member(self.directory, "alice", roles=roles)

    def test_keyserver_is_not_a_member(self):
        """
        A key-server certificate names no member.
        """
        cert = pki.load_certificate(pki.issue_keyserver(self.directory, "ks")[0])
        self.assertRaises(pki.CertificateError, pki.member_identity, cert)


class MemberIdentityErrorTests(SynchronousTestCase):
    """
    L{pki.member_identity} refuses certificates that do not carry a valid
    member identity.
    """

    def setUp(self):
        directory = self.mktemp()
        self.ca_path, self.ca_key_path = pki.create_ca(directory, "lab")

    def assertRefused(self, uris, reason, eku=(CLIENT_AUTH,)):
        cert = hand_made_certificate(self.ca_path, self.ca_key_path, uris, eku)
        with self.assertRaises(pki.CertificateError) as cm:
            pki.member_identity(cert)
        message = str(cm.exception)
        self.assertIn(reason, message)
        self.assertIn(f"{cert.serial_number:x}", message)
        self.assertNotIn("\n", message)

    def test_no_member_uri(self):
        """
        A certificate without a member URI is refused.
        """
        self.assertRefused(["urn:securelan:mac:02:00:00:00:00:01"], "no urn:securelan:member:")

    def test_no_names_at_all(self):
        """
        A certificate without a subject alternative name is refused.
        """
        self.assertRefused([], "no urn:securelan:member:")

    def test_two_member_uris(self):
        """
        A certificate naming two members is refused.
        """
        self.assertRefused(
            ["urn:securelan:member:alice", "urn:securelan:member:bob"], "several"
        )

    def test_invalid_member_id(self):
        """
        A member URI with an invalid member ID is refused.
        """
        self.assertRefused(["urn:securelan:member:@group"], "not a valid member ID")

    def test_bad_mac_uri(self):
        """
        A MAC URI that does not hold a MAC is refused.
        """
        self.assertRefused(
            ["urn:securelan:member:alice", "urn:securelan:mac:02:00:00:00:00:zz"],
            "invalid MAC URI",
        )

    def test_unknown_role(self):
        """
        A role URI naming a role outside L{ROLES} is refused.
        """
        self.assertRefused(
            ["urn:securelan:member:alice", "urn:securelan:role:admin"], "unknown role"
        )

    def test_no_client_auth(self):
        """
        A certificate that is not good for TLS client authentication is
        refused, whether it has another usage or none.
        """
        uris = ["urn:securelan:member:alice"]
        self.assertRefused(uris, "clientAuth", eku=(SERVER_AUTH,))
        self.assertRefused(uris, "clientAuth", eku=())


class MemberIdentityPropertyTests(SynchronousTestCase):
    """
    Property tests: any valid identity survives a trip through a certificate.
    """

    def setUp(self):
        self.ca_directory = self.mktemp()
        self.ca_cert, self.ca_key = pki.create_ca(self.ca_directory, "lab")

    @settings(deadline=None, derandomize=True)
    @given(member_id=member_ids, macs=mac_sets, roles=role_sets)
    def test_round_trip(self, member_id, macs, roles):
        """
        C{member_identity} returns exactly the member ID, MACs and roles that
        C{issue_member} was given.
        """
        cert_path, _ = pki.issue_member(
            self.mktemp(),
            member_id,
            macs=[format_mac(mac) for mac in macs],
            roles=roles,
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
        )
        identity = pki.member_identity(pki.load_certificate(cert_path))
        self.assertEqual(identity.member_id, member_id)
        self.assertEqual(identity.macs, macs)
        self.assertEqual(identity.roles, roles)


class LoadTests(SynchronousTestCase):
    """
    Tests for L{pki.load_certificate} and L{pki.load_private_key}.
    """

    def test_missing(self):
        """
        A missing file is a L{pki.PKIError} naming it.
        """
        path = self.mktemp()
        for load in (pki.load_certificate, pki.load_private_key):
            with self.assertRaises(pki.PKIError) as cm:
                load(path)
            self.assertIn(path, str(cm.exception))
            self.assertIn("missing", str(cm.exception))

    def test_malformed(self):
        """
        A file that does not hold PEM is a L{pki.PKIError} naming it.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not pem\n")
        for load in (pki.load_certificate, pki.load_private_key):
            with self.assertRaises(pki.PKIError) as cm:
                load(path)
            self.assertIn(path, str(cm.exception))

    def test_wrong_kind(self):
        """
        A key is not a certificate and a certificate is not a key.
        """
        directory = self.mktemp()
        cert_path, key_path = pki.create_ca(directory, "lab")
        self.assertRaises(pki.PKIError, pki.load_certificate, key_path)
        self.assertRaises(pki.PKIError, pki.load_private_key, cert_path)

    def test_unreadable(self):
        """
        A directory where a file should be is a L{pki.PKIError}.
        """
        path = self.mktemp()
        os.mkdir(path)
        with self.assertRaises(pki.PKIError) as cm:
            pki.load_certificate(path)
        self.assertIn(path, str(cm.exception))


class DescribeTests(SynchronousTestCase):
    """
    Tests for L{pki.describe}.
    """

    def setUp(self):
        self.pki = make_pki(self.mktemp(), subnet="lab", members=())

    def test_member(self):
        """
        A member certificate is described with its identity.
        """
        cert_path, _ = self.pki.add_member("alice", macs=["02:00:00:00:00:01"], roles=("gateway",))
        cert = pki.load_certificate(cert_path)
        info = pki.describe(cert)
        self.assertEqual(info["subject"], "O=lab,CN=alice")
        self.assertEqual(info["serial"], f"{cert.serial_number:x}")
        self.assertEqual(info["not_valid_after"], cert.not_valid_after_utc.isoformat())
        self.assertEqual(info["sha256"], cert.fingerprint(hashes.SHA256()).hex(":"))
        self.assertFalse(info["ca"])
        self.assertEqual(
            info["member"],
            {"member_id": "alice", "macs": ["02:00:00:00:00:01"], "roles": ["gateway"]},
        )

    def test_keyserver(self):
        """
        A key-server certificate is described with its DNS names.
        """
        info = pki.describe(pki.load_certificate(self.pki.keyserver_cert))
        self.assertEqual(info["dns_names"], ["keyserver.test"])
        self.assertNotIn("member", info)

    def test_ca(self):
        """
        A CA certificate is described with its subnet.
        """
        info = pki.describe(pki.load_certificate(self.pki.ca_cert))
        self.assertTrue(info["ca"])
        self.assertEqual(info["subnet"], "lab")

    def test_broken_member(self):
        """
        A certificate with a broken member identity is still described, with
        the reason.
        """
        cert = hand_made_certificate(
            self.pki.ca_cert,
            self.pki.ca_key,
            ["urn:securelan:member:a", "urn:securelan:member:b"],
        )
        info = pki.describe(cert)
        self.assertNotIn("member", info)
        self.assertIn("several", info["member_error"])


class MakePKITests(SynchronousTestCase):
    """
    Tests for L{securelan.testing.make_pki}.
    """

    def test_make_pki(self):
        """
        C{make_pki} makes a CA, a key server and client members, all signed
        by the CA.
        """
        test_pki = make_pki(self.mktemp())
        ca = pki.load_certificate(test_pki.ca_cert)
        self.assertEqual(pki.ca_subnet(ca), "test")
        keyserver = pki.load_certificate(test_pki.keyserver_cert)
        self.assertEqual(pki.keyserver_names(keyserver), ["keyserver.test"])
        self.assertTrue(signed_by(keyserver, ca))
        self.assertEqual(sorted(test_pki.members), ["alice", "bob", "carol"])
        for member_id, (cert_path, key_path) in test_pki.members.items():
            cert = pki.load_certificate(cert_path)
            self.assertTrue(signed_by(cert, ca))
            self.assertEqual(pki.member_identity(cert).member_id, member_id)
            pki.load_private_key(key_path)
        self.assertEqual(
            keyserver.not_valid_after_utc - keyserver.not_valid_before_utc,
            datetime.timedelta(days=30, minutes=5),
        )

    def test_add_member(self):
        """
        C{add_member} issues and records another member.
        """
        test_pki = make_pki(self.mktemp(), members=())
        paths = test_pki.add_member("gw", macs=["02:00:00:00:00:09"], roles=("gateway",))
        self.assertEqual(test_pki.members, {"gw": paths})
        identity = pki.member_identity(pki.load_certificate(paths[0]))
        self.assertEqual(identity.roles, frozenset({"gateway"}))
        self.assertEqual(identity.macs, frozenset({b"\x02\x00\x00\x00\x00\x09"}))
