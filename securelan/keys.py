# -*- test-case-name: tests.test_keys -*-
"""
Secret key material and how it is kept.

L{SecretKey} holds key bytes without ever showing them: its repr and str give
a fingerprint only, equality is constant-time.  L{MasterKey} encrypts keys at
rest (the key server's store holds only wrapped keys).
"""

import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

KEY_BYTES = 32


class SecretKey:
    """
    A 256-bit symmetric key.  The bytes are reachable only through
    L{SecretKey.material}, so they cannot end up in a log line by accident.
    """

    __slots__ = ("_material", "_fingerprint")

    def __init__(self, material: bytes):
        if not isinstance(material, bytes) or len(material) != KEY_BYTES:
            raise ValueError(f"a key is {KEY_BYTES} bytes")
        self._material = material
        self._fingerprint = None

    @classmethod
    def generate(cls) -> "SecretKey":
        """
        A fresh key from the operating system's CSPRNG.
        """
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def material(self) -> bytes:
        return self._material

    @property
    def fingerprint(self) -> str:
        """
        A short, one-way name for this key, safe to log and show: two holders
        of the same key see the same fingerprint.
        """
        if self._fingerprint is None:
            # Named once: the key server compares fingerprints per request.
            self._fingerprint = hashlib.sha256(b"securelan key fingerprint\0" + self._material).hexdigest()[:16]
        return self._fingerprint

    def __eq__(self, other):
        if not isinstance(other, SecretKey):
            return NotImplemented
        return hmac.compare_digest(self._material, other._material)

    def __hash__(self):
        return hash(self.fingerprint)

    def __repr__(self):
        return f"<SecretKey {self.fingerprint}>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("SecretKey is not picklable")


class MasterKeyError(Exception):
    """
    The master key file is missing, malformed, or does not open the store.
    """


class MasterKey:
    """
    The key under which every key at rest is wrapped (AES-256-GCM-SIV, so a
    repeated random nonce cannot leak the key).  The associated data binds a
    wrapped key to its row, so a wrapped key moved to another row fails.
    """

    __slots__ = ("_aead",)

    def __init__(self, material: bytes):
        if len(material) != KEY_BYTES:
            raise MasterKeyError(f"a master key is {KEY_BYTES} bytes")
        self._aead = AESGCMSIV(material)

    def __repr__(self):
        return "<MasterKey>"

    @classmethod
    def load_or_create(cls, path: str, create: bool) -> "MasterKey":
        """
        Read the master key at C{path}; if it does not exist and C{create} is
        true, make a new one, written with mode 0600 and never overwriting.
        """
        try:
            with open(path, "rb") as f:
                material = f.read(KEY_BYTES + 1)
        except FileNotFoundError:
            if not create:
                raise MasterKeyError(f"{path}: master key file is missing") from None
            material = secrets.token_bytes(KEY_BYTES)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                # Another process made it first: use theirs.
                return cls.load_or_create(path, create=False)
            except OSError as e:
                raise MasterKeyError(f"{path}: cannot create master key: {e.strerror}") from None
            with os.fdopen(fd, "wb") as f:
                f.write(material)
        except OSError as e:
            raise MasterKeyError(f"{path}: cannot read master key: {e.strerror}") from None
        if len(material) != KEY_BYTES:
            raise MasterKeyError(f"{path}: master key file must hold exactly {KEY_BYTES} bytes")
        return cls(material)

    def wrap(self, key: SecretKey, context: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, key.material, context)

    def unwrap(self, blob: bytes, context: bytes) -> SecretKey:
        try:
            return SecretKey(self._aead.decrypt(blob[:12], blob[12:], context))
        except (InvalidTag, ValueError):
            raise MasterKeyError("a wrapped key does not open under this master key") from None
