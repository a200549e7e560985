"""
Tests for L{securelan.keys}.
"""

import os
import pickle
import stat

from twisted.trial.unittest import SynchronousTestCase

from securelan.keys import KEY_BYTES, MasterKey, MasterKeyError, SecretKey

MATERIAL = bytes(range(32))


class SecretKeyTests(SynchronousTestCase):
    """
    L{SecretKey} holds key bytes without ever showing them.
    """

    def test_reprShowsNoMaterial(self):
        """
        Neither repr nor str carries the key bytes, in any usual encoding;
        both show the fingerprint.
        """
        key = SecretKey(MATERIAL)
        for shown in (repr(key), str(key), f"{key}", f"{[key]}"):
            self.assertNotIn(MATERIAL.hex(), shown)
            self.assertNotIn(repr(MATERIAL), shown)
            self.assertIn(key.fingerprint, shown)

    def test_equality(self):
        """
        Keys with the same bytes are equal and hash alike; keys with other
        bytes are not equal, and a key never equals its bytes.
        """
        self.assertEqual(SecretKey(MATERIAL), SecretKey(bytes(MATERIAL)))
        self.assertEqual(hash(SecretKey(MATERIAL)), hash(SecretKey(MATERIAL)))
        self.assertNotEqual(SecretKey(MATERIAL), SecretKey(bytes(32)))
        self.assertNotEqual(SecretKey(MATERIAL), MATERIAL)

    def test_fingerprintStable(self):
        """
        The fingerprint is a fixed function of the key: 16 hex digits that
        do not change between versions (holders compare them in logs).
        """
        self.assertEqual(SecretKey(bytes(32)).fingerprint, "392edafbaccdd66c")
        self.assertEqual(SecretKey(MATERIAL).fingerprint, "74c1922e63227ea8")
        self.assertNotIn(SecretKey(MATERIAL).fingerprint, MATERIAL.hex())

    def test_wrongLength(self):
        """
        A key is exactly 32 bytes.
        """
        for material in (b"", bytes(31), bytes(33)):
            self.assertRaises(ValueError, SecretKey, material)
        self.assertRaises(ValueError, SecretKey, MATERIAL.hex())

    def test_generate(self):
        """
        Generated keys are 32 bytes and differ from each other.
        """
        first, second = SecretKey.generate(), SecretKey.generate()
        self.assertEqual(len(first.material), KEY_BYTES)
        self.assertNotEqual(first, second)

    def test_notPicklable(self):
        """
        A key refuses to be pickled, so it cannot leave the process by way
        of a cache or a queue.
        """
        self.assertRaises(TypeError, pickle.dumps, SecretKey(MATERIAL))


class MasterKeyTests(SynchronousTestCase):
    """
    L{MasterKey} wraps keys at rest, bound to a context.
    """

    def setUp(self):
        self.master = MasterKey(bytes(32))
        self.key = SecretKey(MATERIAL)

    def test_roundTrip(self):
        """
        A wrapped key unwraps, under the same context, to an equal key; the
        wrapped form does not contain the key bytes.
        """
        blob = self.master.wrap(self.key, b"pair\0a\0b\x001")
        self.assertNotIn(MATERIAL, blob)
        self.assertEqual(self.master.unwrap(blob, b"pair\0a\0b\x001"), self.key)

    def test_wrapIsRandomised(self):
        """
        Wrapping one key twice gives two different blobs (a fresh nonce
        each time), both of which unwrap.
        """
        first = self.master.wrap(self.key, b"c")
        second = self.master.wrap(self.key, b"c")
        self.assertNotEqual(first, second)
        self.assertEqual(self.master.unwrap(second, b"c"), self.key)

    def test_wrongContext(self):
        """
        A wrapped key moved to another row (another context) does not open.
        """
        blob = self.master.wrap(self.key, b"pair\0a\0b\x001")
        self.assertRaises(MasterKeyError, self.master.unwrap, blob, b"pair\0a\0c\x001")
        self.assertRaises(MasterKeyError, self.master.unwrap, blob, b"pair\0a\0b\x002")

    def test_wrongMasterKey(self):
        """
        A key wrapped under one master key does not open under another.
        """
        blob = self.master.wrap(self.key, b"c")
        self.assertRaises(MasterKeyError, MasterKey(bytes(range(32))).unwrap, blob, b"c")

    def test_tampered(self):
        """
        A changed or truncated blob does not open, and the error says
        nothing of the key.
        """
        blob = self.master.wrap(self.key, b"c")
        flipped = blob[:-1] + bytes([blob[-1] ^ 1])
        for bad in (flipped, blob[:20], b""):
            e = self.assertRaises(MasterKeyError, self.master.unwrap, bad, b"c")
            self.assertNotIn(MATERIAL.hex(), str(e))

    def test_repr(self):
        """
        A master key's repr shows nothing of it.
        """
        self.assertEqual(repr(MasterKey(MATERIAL)), "<MasterKey>")

    def test_wrongLength(self):
        """
        A master key is exactly 32 bytes.
        """
        self.assertRaises(MasterKeyError, MasterKey, bytes(16))


class LoadOrCreateTests(SynchronousTestCase):
    """
    L{MasterKey.load_or_create} reads the master key file, and makes one
    only when asked to.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "master.key")

    def test_createMakesPrivateFile(self):
        """
        With C{create}, a missing key file is made: 32 bytes, mode 0600 even
        under a permissive umask.
        """
        old = os.umask(0)
        try:
            MasterKey.load_or_create(self.path, create=True)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.path.getsize(self.path), KEY_BYTES)

    def test_loadAgain(self):
        """
        Loading the key file again gives the same master key: what one
        wrapped, the other unwraps.
        """
        first = MasterKey.load_or_create(self.path, create=True)
        second = MasterKey.load_or_create(self.path, create=False)
        key = SecretKey(MATERIAL)
        self.assertEqual(second.unwrap(first.wrap(key, b"c"), b"c"), key)

    def test_createKeepsExisting(self):
        """
        With C{create}, an existing key file is read, never replaced.
        """
        with open(self.path, "wb") as f:
            f.write(MATERIAL)
        master = MasterKey.load_or_create(self.path, create=True)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), MATERIAL)
        blob = MasterKey(MATERIAL).wrap(SecretKey(bytes(32)), b"c")
        self.assertEqual(master.unwrap(blob, b"c"), SecretKey(bytes(32)))

    def test_missingRefused(self):
        """
        Without C{create}, a missing key file is an error that names the
        file, and no file is made.
        """
        e = self.assertRaises(MasterKeyError, MasterKey.load_or_create, self.path, create=False)
        self.assertIn(self.path, str(e))
        self.assertFalse(os.path.exists(self.path))

    def test_wrongSizeRefused(self):
        """
        A key file that does not hold exactly 32 bytes is refused, with
        either value of C{create}, and left as it was.
        """
        for content in (b"", bytes(31), bytes(33)):
            with open(self.path, "wb") as f:
                f.write(content)
            for create in (False, True):
                e = self.assertRaises(MasterKeyError, MasterKey.load_or_create, self.path, create=create)
                self.assertIn(self.path, str(e))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_unreadableRefused(self):
        """
        A key path that cannot be read (here, a directory) is an error that
        names it.
        """
        os.mkdir(self.path)
        e = self.assertRaises(MasterKeyError, MasterKey.load_or_create, self.path, create=True)
        self.assertIn(self.path, str(e))
