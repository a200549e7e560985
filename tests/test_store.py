"""
Tests for L{securelan.store}: the SQLite store and store specs.
"""

import os
import sqlite3
import stat

from twisted.internet import defer
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from securelan._interfaces import IStore
from securelan.addresses import parse_mac
from securelan.errors import MacInUse, StoreUnavailable, TableFull
from securelan.keys import MasterKey, MasterKeyError, SecretKey
from securelan.records import GroupKey, Member, PairKey
from securelan.store import SQLiteStore, StoreOpenError, open_store, run_synchronously
from securelan.store import sqlite as store_sqlite

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")
MAC_3 = parse_mac("02:00:00:00:00:03")

_DEFAULT = object()

#: The schema version this code builds, and the one after it (for tests
#: that pretend a newer securelan).
CURRENT = store_sqlite.SCHEMA_VERSION
NEXT = CURRENT + 1


def a_member(member_id, mac, role="client", endpoint="", registered_at=100.0, incarnation=0, addresses=()):
    return Member(member_id, role, mac, endpoint, registered_at, incarnation, addresses)


def a_pair_key(id_a, id_b, epoch=1, key=None):
    return PairKey(id_a, id_b, epoch, key or SecretKey.generate(), 200.0, 0.0)


def a_group_key(epoch=1):
    return GroupKey(epoch, SecretKey.generate(), 300.0)


class QueuedRunner:
    """
    A store runner that holds the work until the test runs it, so a test
    can have several writes under way at once.
    """

    def __init__(self):
        self.queue = []

    def __call__(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.queue.append((f, args, kwargs, d))
        return d

    def run_next(self):
        f, args, kwargs, d = self.queue.pop(0)
        defer.maybeDeferred(f, *args, **kwargs).chainDeferred(d)


class StoreTestMixin:
    """
    Stores on files in a fresh directory, run synchronously.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "keys.db")
        self.key_path = os.path.join(self.directory, "master.key")

    def make_store(self, path=_DEFAULT, key_path=_DEFAULT, **kwargs):
        kwargs.setdefault("runner", run_synchronously)
        path = self.path if path is _DEFAULT else path
        key_path = self.key_path if key_path is _DEFAULT else key_path
        return SQLiteStore(path, key_path, **kwargs)

    def opened(self, path=_DEFAULT, key_path=_DEFAULT, **kwargs):
        store = self.make_store(path, key_path, **kwargs)
        self.assertIsNone(self.successResultOf(store.open()))
        self.addCleanup(lambda: self.successResultOf(store.close()))
        return store

    def memory_store(self, **kwargs):
        return self.opened(":memory:", None, **kwargs)

    def queued_store(self):
        """
        An open store in memory whose writes wait for the test to run them
        (L{QueuedRunner}), and the runner.
        """
        runner = QueuedRunner()
        store = self.make_store(":memory:", None, runner=runner)
        d = store.open()
        runner.run_next()
        self.successResultOf(d)
        return store, runner

    def failing_issues(self):
        """
        Make every pair-key issue fail as a broken disk does, until the
        returned function is called.
        """
        from securelan.store import sqlite as sqlite_store

        def broken(*args):
            raise sqlite3.OperationalError("disk I/O error")

        original = sqlite_store._issue_pair_txn
        sqlite_store._issue_pair_txn = broken

        def mend():
            sqlite_store._issue_pair_txn = original

        self.addCleanup(mend)
        return mend

    def raw(self, path=None):
        conn = sqlite3.connect(path or self.path, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def open_failure(self, store, exception):
        return self.failureResultOf(store.open(), exception).value


class RegistryTests(StoreTestMixin, SynchronousTestCase):
    """
    The member registry.
    """

    def test_interface(self):
        """
        L{SQLiteStore} provides L{IStore}.
        """
        self.assertTrue(verifyObject(IStore, self.memory_store()))

    def test_registerAndLookup(self):
        """
        A registered member is found by ID and by MAC, listed and counted.
        """
        store = self.memory_store()
        alice = self.successResultOf(store.register(a_member("alice", MAC_1, endpoint="192.0.2.1:4789"), 10))
        self.assertEqual(alice, a_member("alice", MAC_1, endpoint="192.0.2.1:4789", incarnation=1))
        self.assertEqual(self.successResultOf(store.member("alice")), alice)
        self.assertEqual(self.successResultOf(store.member_by_mac(MAC_1)), alice)
        self.assertEqual(self.successResultOf(store.members()), [alice])
        self.assertEqual(self.successResultOf(store.counts()), {"members": 1, "pair_keys": 0})

    def test_unknown(self):
        """
        An unknown ID or MAC gives None.
        """
        store = self.memory_store()
        self.assertIsNone(self.successResultOf(store.member("nobody")))
        self.assertIsNone(self.successResultOf(store.member_by_mac(MAC_1)))

    def test_macInUse(self):
        """
        A MAC held by another member is refused with L{MacInUse}, whose
        message names the MAC but not the holder; the newcomer is not
        registered.
        """
        store = self.memory_store()
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        e = self.failureResultOf(store.register(a_member("mallory", MAC_1), 10), MacInUse).value
        self.assertIn("02:00:00:00:00:01", str(e))
        self.assertNotIn("alice", str(e))
        self.assertIsNone(self.successResultOf(store.member("mallory")))
        self.assertEqual(self.successResultOf(store.member_by_mac(MAC_1)).member_id, "alice")

    def test_reregisterNewMac(self):
        """
        A member re-registering with a new MAC moves to it (with its new
        role, endpoint and time) and releases the old MAC for others.
        """
        store = self.memory_store()
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        moved = a_member("alice", MAC_2, role="gateway", endpoint="192.0.2.9:1", registered_at=150.0)
        moved = self.successResultOf(store.register(moved, 10))
        self.assertEqual(moved.incarnation, 2)
        self.assertEqual(self.successResultOf(store.member("alice")), moved)
        self.assertEqual(self.successResultOf(store.member_by_mac(MAC_2)), moved)
        self.assertIsNone(self.successResultOf(store.member_by_mac(MAC_1)))
        # The same answers at once, from memory.
        self.assertEqual(store.peek_member("alice"), moved)
        self.assertEqual(store.peek_member_by_mac(MAC_2), moved)
        self.assertIsNone(store.peek_member_by_mac(MAC_1))
        bob = a_member("bob", MAC_1)
        self.assertEqual(self.successResultOf(store.register(bob, 10)), a_member("bob", MAC_1, incarnation=1))
        self.assertEqual(self.successResultOf(store.counts())["members"], 2)

    def test_addresses(self):
        """
        Layer 3: a member's overlay IP addresses find it; another member
        cannot take one (L{AddressInUse}, nothing registered); moving
        releases the old ones; a revocation releases them; they survive a
        restart.
        """
        from securelan.errors import AddressInUse

        store = self.opened()
        alice = self.successResultOf(store.register(a_member("alice", MAC_1, addresses=("10.9.0.1", "fd00::1")), 10))
        self.assertEqual(alice.addresses, ("10.9.0.1", "fd00::1"))
        self.assertEqual(self.successResultOf(store.member_by_address("fd00::1")), alice)
        e = self.failureResultOf(store.register(a_member("mallory", MAC_2, addresses=("10.9.0.1",)), 10),
                                 AddressInUse).value
        self.assertIn("10.9.0.1", str(e))
        self.assertIsNone(self.successResultOf(store.member("mallory")))
        moved = self.successResultOf(store.register(a_member("alice", MAC_1, addresses=("10.9.0.2",)), 10))
        self.assertIsNone(self.successResultOf(store.member_by_address("10.9.0.1")))
        self.assertEqual(self.successResultOf(store.member_by_address("10.9.0.2")), moved)
        bob = self.successResultOf(store.register(a_member("bob", MAC_2, addresses=("10.9.0.1",)), 10))
        self.successResultOf(store.close())
        again = self.opened()
        self.assertEqual(self.successResultOf(again.member_by_address("10.9.0.1")), bob)
        self.assertEqual(self.successResultOf(again.member("alice")).addresses, ("10.9.0.2",))
        self.successResultOf(again.revoke("bob", "test", 300.0))
        self.assertIsNone(self.successResultOf(again.member_by_address("10.9.0.1")))
        self.successResultOf(again.register(a_member("carol", MAC_3, addresses=("10.9.0.1",)), 10))

    def test_registryFull(self):
        """
        A new member is refused with L{TableFull} once the registry holds
        C{max_members}; a known member may still re-register.
        """
        store = self.memory_store()
        self.successResultOf(store.register(a_member("alice", MAC_1), 2))
        self.successResultOf(store.register(a_member("bob", MAC_2), 2))
        self.failureResultOf(store.register(a_member("carol", MAC_3), 2), TableFull)
        self.assertIsNone(self.successResultOf(store.member("carol")))
        self.successResultOf(store.register(a_member("bob", MAC_3, endpoint="192.0.2.2:1"), 2))
        self.assertEqual(self.successResultOf(store.member_by_mac(MAC_3)).member_id, "bob")

    def test_writeWhenClosed(self):
        """
        A write to a store that is not open fails with L{StoreUnavailable}.
        """
        store = self.make_store(":memory:", None)
        self.failureResultOf(store.register(a_member("alice", MAC_1), 10), StoreUnavailable)
        self.successResultOf(store.open())
        self.successResultOf(store.close())
        self.failureResultOf(store.issue_pair_key(a_pair_key("a", "b"), 10), StoreUnavailable)


class PairKeyTests(StoreTestMixin, SynchronousTestCase):
    """
    The pair-key table.
    """

    def test_issue(self):
        """
        The first candidate for a pair is stored and found under either
        order of the pair.
        """
        store = self.memory_store()
        candidate = a_pair_key("alice", "bob")
        self.assertEqual(self.successResultOf(store.issue_pair_key(candidate, 10)), candidate)
        self.assertEqual(self.successResultOf(store.pair_key("alice", "bob")), candidate)
        self.assertEqual(self.successResultOf(store.pair_key("bob", "alice")), candidate)
        self.assertIsNone(self.successResultOf(store.pair_key("alice", "carol")))
        self.assertEqual(self.successResultOf(store.counts())["pair_keys"], 1)
        self.assertEqual(store.peek_pair_key("bob", "alice"), candidate)
        self.assertIsNone(store.peek_pair_key("alice", "carol"))

    def test_pairKeys(self):
        """
        Every current pair key, once each; a revoked member's are gone.
        """
        store = self.memory_store()
        self.assertEqual(self.successResultOf(store.pair_keys()), [])
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        issued = [self.successResultOf(store.issue_pair_key(a_pair_key(a, b), 10))
                  for a, b in (("alice", "bob"), ("carol", "bob"), ("bob", "dave"))]
        self.successResultOf(store.issue_pair_key(a_pair_key("bob", "alice"), 10))
        key = lambda p: (p.id_a, p.id_b)  # noqa: E731
        self.assertEqual(sorted(self.successResultOf(store.pair_keys()), key=key), sorted(issued, key=key))
        self.successResultOf(store.revoke("alice", "lost", 500.0))
        self.assertEqual(sorted(self.successResultOf(store.pair_keys()), key=key), sorted(issued[1:], key=key))

    def test_secondCandidateGetsExisting(self):
        """
        A second candidate for a pair, in either order, gets the key the
        store already holds.
        """
        store = self.memory_store()
        first = a_pair_key("alice", "bob")
        self.successResultOf(store.issue_pair_key(first, 10))
        self.assertEqual(self.successResultOf(store.issue_pair_key(a_pair_key("alice", "bob"), 10)), first)
        reversed_ = self.successResultOf(store.issue_pair_key(a_pair_key("bob", "alice"), 10))
        self.assertEqual(reversed_, first)
        self.assertEqual((reversed_.id_a, reversed_.id_b), ("alice", "bob"))

    def test_reversedCandidateStoredCanonically(self):
        """
        A candidate given as (id_b, id_a) is stored under the canonical
        order, with its key.
        """
        store = self.memory_store()
        key = SecretKey.generate()
        issued = self.successResultOf(store.issue_pair_key(a_pair_key("bob", "alice", key=key), 10))
        self.assertEqual((issued.id_a, issued.id_b, issued.key), ("alice", "bob", key))

    def test_tableFull(self):
        """
        A new pair is refused with L{TableFull} once the table holds
        C{max_pair_keys}; a pair that has a key still gets it.
        """
        store = self.memory_store()
        first = self.successResultOf(store.issue_pair_key(a_pair_key("alice", "bob"), 1))
        self.failureResultOf(store.issue_pair_key(a_pair_key("alice", "carol"), 1), TableFull)
        self.assertIsNone(self.successResultOf(store.pair_key("alice", "carol")))
        self.assertEqual(self.successResultOf(store.issue_pair_key(a_pair_key("bob", "alice"), 1)), first)

    def test_tableFullCountsIssuesUnderWay(self):
        """
        Keys being issued count toward C{max_pair_keys}, whether their write
        is running or waiting for the next batch; once written (or failed)
        they count as keys (or not at all).
        """
        store, runner = self.queued_store()
        running = store.issue_pair_key(a_pair_key("alice", "bob"), 2)
        waiting = store.issue_pair_key(a_pair_key("alice", "carol"), 2)
        self.failureResultOf(store.issue_pair_key(a_pair_key("bob", "carol"), 2), TableFull)
        # The same pair again is not a new key.
        again = store.issue_pair_key(a_pair_key("bob", "alice"), 2)
        while runner.queue:
            runner.run_next()
        self.assertEqual(self.successResultOf(again), self.successResultOf(running))
        self.successResultOf(waiting)
        self.failureResultOf(store.issue_pair_key(a_pair_key("bob", "carol"), 2), TableFull)
        third = store.issue_pair_key(a_pair_key("bob", "carol"), 3)
        runner.run_next()
        self.successResultOf(third)

        # A batch that fails frees its places.
        mend = self.failing_issues()
        failed = [store.issue_pair_key(a_pair_key("dave", name), 5) for name in ("erin", "frank")]
        while runner.queue:
            runner.run_next()
        for d in failed:
            self.failureResultOf(d, StoreUnavailable)
        mend()
        fine = [store.issue_pair_key(a_pair_key("dave", name), 5) for name in ("erin", "frank")]
        while runner.queue:
            runner.run_next()
        for d in fine:
            self.successResultOf(d)

    def test_concurrentIssuesCoalesce(self):
        """
        Two issues for one pair under way at once make one write, and both
        callers get the first candidate.
        """
        store, runner = self.queued_store()
        first, second = a_pair_key("alice", "bob"), a_pair_key("bob", "alice")
        d1 = store.issue_pair_key(first, 10)
        d2 = store.issue_pair_key(second, 10)
        self.assertEqual(len(runner.queue), 1)
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        runner.run_next()
        self.assertEqual(self.successResultOf(d1), first)
        self.assertEqual(self.successResultOf(d2), first)
        self.assertEqual(self.successResultOf(store.issue_pair_key(a_pair_key("alice", "bob"), 10)), first)
        self.assertEqual(runner.queue, [])

    def test_newPairKeysShareATransaction(self):
        """
        New pair keys asked for while one is being written go into the next
        write transaction together (a group commit); so do the ones that
        callers ask for as they hear of their own keys.  Each caller gets its
        own key, and the store holds all.
        """
        store, runner = self.queued_store()
        names = ["alice", "bob", "carol", "dave", "erin", "frank"]
        candidates = [a_pair_key(names[0], name) for name in names[1:]]
        issued = [store.issue_pair_key(candidate, 10) for candidate in candidates[:3]]
        later = []
        for d, candidate in zip(issued[1:], candidates[3:]):
            d.addCallback(lambda _, c=candidate: later.append(store.issue_pair_key(c, 10)))
        self.assertEqual(len(runner.queue), 1)
        runner.run_next()
        self.assertEqual(self.successResultOf(issued[0]), candidates[0])
        self.assertNoResult(issued[1])
        self.assertEqual(len(runner.queue), 1)
        runner.run_next()
        self.assertEqual(len(later), 2)
        self.assertEqual(len(runner.queue), 1)
        runner.run_next()
        self.assertEqual(runner.queue, [])
        self.assertEqual([self.successResultOf(d) for d in later], candidates[3:])
        for candidate in candidates:
            self.assertEqual(self.successResultOf(store.pair_key(candidate.id_b, candidate.id_a)), candidate)

    def test_coalescedFailure(self):
        """
        When a shared write fails, every caller waiting on it gets the
        failure, and the next issue tries afresh.
        """
        store, runner = self.queued_store()
        mend = self.failing_issues()
        d1 = store.issue_pair_key(a_pair_key("alice", "bob"), 10)
        d2 = store.issue_pair_key(a_pair_key("alice", "bob"), 10)
        runner.run_next()
        self.failureResultOf(d1, StoreUnavailable)
        self.failureResultOf(d2, StoreUnavailable)
        mend()
        self.assertEqual(self.failureResultOf(store.issue_pair_key(a_pair_key("alice", "carol"), 0)).type,
                         TableFull)
        d3 = store.issue_pair_key(a_pair_key("alice", "bob"), 10)
        self.assertEqual(len(runner.queue), 1)
        runner.run_next()
        self.successResultOf(d3)

    def test_issueAcrossProcesses(self):
        """
        Two stores on one file (two key servers) that both issue for a pair
        both end up with the key that reached the database first.
        """
        one = self.opened()
        two = self.opened()
        first = self.successResultOf(one.issue_pair_key(a_pair_key("alice", "bob"), 10))
        self.assertEqual(self.successResultOf(two.issue_pair_key(a_pair_key("alice", "bob"), 10)), first)
        self.assertEqual(self.successResultOf(two.pair_key("alice", "bob")), first)
        group = self.successResultOf(one.issue_group_key(a_group_key()))
        self.assertEqual(self.successResultOf(two.issue_group_key(a_group_key())), group)

    def test_groupKey(self):
        """
        The first group key candidate is kept; later ones get it.
        """
        store = self.memory_store()
        self.assertIsNone(self.successResultOf(store.group_key()))
        first = a_group_key()
        self.assertEqual(self.successResultOf(store.issue_group_key(first)), first)
        self.assertEqual(self.successResultOf(store.issue_group_key(a_group_key(epoch=2))), first)
        self.assertEqual(self.successResultOf(store.group_key()), first)


class DurabilityTests(StoreTestMixin, SynchronousTestCase):
    """
    What a store on a file keeps, and how.
    """

    def fill(self, store):
        members = [a_member("alice", MAC_1, endpoint="192.0.2.1:1"), a_member("bob", MAC_2, role="gateway")]
        members = [self.successResultOf(store.register(member, 10)) for member in members]
        pairs = [
            self.successResultOf(store.issue_pair_key(a_pair_key("alice", "bob", epoch=3), 10)),
            self.successResultOf(store.issue_pair_key(a_pair_key("alice", "carol"), 10)),
        ]
        group = self.successResultOf(store.issue_group_key(a_group_key()))
        return members, pairs, group

    def test_restart(self):
        """
        A new store on the same file and master key sees every member, pair
        key and the group key, with equal keys.
        """
        store = self.opened()
        members, pairs, group = self.fill(store)
        self.successResultOf(store.close())
        again = self.opened()
        self.assertEqual(sorted(self.successResultOf(again.members()), key=lambda m: m.member_id), members)
        self.assertEqual(self.successResultOf(again.member_by_mac(MAC_2)), members[1])
        for pair in pairs:
            self.assertEqual(self.successResultOf(again.pair_key(pair.id_b, pair.id_a)), pair)
        self.assertEqual(self.successResultOf(again.group_key()), group)
        self.assertEqual(self.successResultOf(again.counts()), {"members": 2, "pair_keys": 2})

    def test_noKeyMaterialOnDisk(self):
        """
        Neither the database nor its write-ahead log holds any key's bytes
        (nor the master key's), while open and after closing.
        """
        store = self.opened()
        _, pairs, group = self.fill(store)
        with open(self.key_path, "rb") as f:
            secrets = [f.read(), group.key.material] + [pair.key.material for pair in pairs]

        def on_disk():
            content = b""
            for suffix in ("", "-wal"):
                if os.path.exists(self.path + suffix):
                    with open(self.path + suffix, "rb") as f:
                        content += f.read()
            return content

        self.assertGreater(len(on_disk()), 0)
        for secret in secrets:
            self.assertNotIn(secret, on_disk())
        self.successResultOf(store.close())
        for secret in secrets:
            self.assertNotIn(secret, on_disk())

    def test_noKeyMaterialInRepr(self):
        """
        The store's repr names its files and nothing else.
        """
        store = self.opened()
        _, pairs, _ = self.fill(store)
        self.assertNotIn(pairs[0].key.material.hex(), repr(store))
        self.assertIn(self.path, repr(store))

    def test_keyFileMode(self):
        """
        The master key file made with a new database has mode 0600.
        """
        self.opened()
        self.assertEqual(stat.S_IMODE(os.stat(self.key_path).st_mode), 0o600)

    def test_walMode(self):
        """
        A database file runs in WAL mode with normal syncing and foreign
        keys enforced.
        """
        store = self.opened()
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone(), ("wal",))
        self.assertEqual(store._conn.execute("PRAGMA foreign_keys").fetchone(), (1,))
        self.assertEqual(store._conn.execute("PRAGMA synchronous").fetchone(), (1,))

    def test_memoryLeavesNoFiles(self):
        """
        A C{:memory:} store without a key path writes no file.
        """
        store = self.memory_store()
        self.fill(store)
        self.assertEqual(os.listdir(self.directory), [])


class OpenRefusalTests(StoreTestMixin, SynchronousTestCase):
    """
    Databases and master keys that a store refuses to open.
    """

    def make_database(self):
        store = self.make_store()
        self.successResultOf(store.open())
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        self.successResultOf(store.close())

    def test_mismatchedMasterKey(self):
        """
        A master key other than the database's is refused, naming both
        files.
        """
        self.make_database()
        other = os.path.join(self.directory, "other.key")
        MasterKey.load_or_create(other, create=True)
        e = self.open_failure(self.make_store(key_path=other), MasterKeyError)
        self.assertEqual(str(e), f"master key {other} does not match database {self.path}")

    def test_missingMasterKey(self):
        """
        An existing database whose master key file is missing is refused,
        naming the file, and no new key is made.
        """
        self.make_database()
        os.remove(self.key_path)
        e = self.open_failure(self.make_store(), MasterKeyError)
        self.assertIn(self.key_path, str(e))
        self.assertFalse(os.path.exists(self.key_path))

    def test_fileNeedsMasterKey(self):
        """
        A database file without a master key path is refused.
        """
        store = SQLiteStore(self.path, None, runner=run_synchronously)
        self.assertIn(self.path, str(self.open_failure(store, StoreOpenError)))
        self.assertEqual(os.listdir(self.directory), [])

    def test_notSecurelan(self):
        """
        Another application's SQLite database is refused, naming the file,
        and left as it was (no WAL switch, no key file).
        """
        self.raw().execute("CREATE TABLE other (x)")
        e = self.open_failure(self.make_store(), StoreOpenError)
        self.assertIn(self.path, str(e))
        self.assertIn("not a securelan database", str(e))
        self.assertEqual(self.raw().execute("PRAGMA journal_mode").fetchone(), ("delete",))
        self.assertFalse(os.path.exists(self.key_path))

    def test_notSqlite(self):
        """
        A file that is not a database at all, or an empty one, is refused
        and left as it was.
        """
        for content in (b"not a database, just some text" * 100, b""):
            with open(self.path, "wb") as f:
                f.write(content)
            e = self.open_failure(self.make_store(), StoreOpenError)
            self.assertIn(self.path, str(e))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), content)

    def test_unreadable(self):
        """
        A path that cannot be opened as a file is refused, naming it.
        """
        os.mkdir(self.path)
        self.assertIn(self.path, str(self.open_failure(self.make_store(), StoreOpenError)))

    def test_locked(self):
        """
        A database that another process holds locked is refused as such,
        not as a stranger's file.
        """
        self.make_database()
        other = self.raw()
        other.execute("PRAGMA locking_mode = EXCLUSIVE")
        other.execute("BEGIN EXCLUSIVE")
        e = self.open_failure(self.make_store(busy_timeout=0.01), StoreOpenError)
        self.assertIn(self.path, str(e))
        self.assertIn("locked", str(e))

    def test_newerSchema(self):
        """
        A database of a schema version newer than the code is refused,
        saying so, and left as it was.
        """
        self.make_database()
        future = store_sqlite.SCHEMA_VERSION + 1
        self.raw().execute("UPDATE version SET version = ?", (future,))
        e = self.open_failure(self.make_store(), StoreOpenError)
        self.assertIn(self.path, str(e))
        self.assertIn(f"v{future}", str(e))
        self.assertEqual(self.raw().execute("SELECT version FROM version").fetchall(), [(future,)])

    def test_creationIsAtomic(self):
        """
        When building a new database fails, nothing is left: no database at
        the path, no temporary file, no key file.
        """
        real = store_sqlite._read_schema
        self.patch(store_sqlite, "_read_schema", lambda name: real(name) + "\nCREATE TABLE broken (;")
        e = self.open_failure(self.make_store(), StoreOpenError)
        self.assertIn(self.path, str(e))
        self.assertEqual(os.listdir(self.directory), [])

    def test_creationRenameFails(self):
        """
        When the new database cannot be renamed into place, nothing is left
        at the path and the temporary file is gone.
        """

        def rename(source, destination):
            raise PermissionError(13, "Permission denied")

        self.patch(os, "rename", rename)
        self.open_failure(self.make_store(), StoreOpenError)
        self.assertEqual(sorted(os.listdir(self.directory)), ["master.key"])

    def test_alreadyOpen(self):
        """
        Opening an open store is refused.
        """
        store = self.opened(":memory:", None)
        self.open_failure(store, StoreOpenError)


class UpgradeTests(StoreTestMixin, SynchronousTestCase):
    """
    Opening a database of an older schema.
    """

    def pretend_newer_code(self, upgrades):
        real = store_sqlite._read_schema

        def read_schema(name):
            if name in upgrades:
                return upgrades[name]
            return real(name)

        self.patch(store_sqlite, "_read_schema", read_schema)
        self.patch(store_sqlite, "SCHEMA_VERSION", NEXT)

    def test_upgrade(self):
        """
        An older database is backed up to C{<path>.backup-v<N>} and then
        upgraded, keeping its contents.
        """
        store = self.opened()
        alice = self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        key = self.successResultOf(store.issue_pair_key(a_pair_key("alice", "bob"), 10))
        self.successResultOf(store.close())
        self.pretend_newer_code({f"upgrade-to-v{NEXT}.sql": "CREATE TABLE added (x INTEGER);"})
        again = self.opened()
        self.assertEqual(self.successResultOf(again.member("alice")), alice)
        self.assertEqual(self.successResultOf(again.pair_key("alice", "bob")), key)
        self.assertEqual(self.raw().execute("SELECT version FROM version").fetchall(), [(NEXT,)])
        self.raw().execute("SELECT x FROM added")
        backup = self.raw(self.path + f".backup-v{CURRENT}")
        self.assertEqual(backup.execute("SELECT version FROM version").fetchall(), [(CURRENT,)])
        self.assertEqual(backup.execute("SELECT member_id FROM members").fetchall(), [("alice",)])

    def test_upgrade_v1_to_v2(self):
        """
        A schema v1 database (before layer 3: no member_addresses) is
        upgraded by the real upgrade script; its members stay, and they can
        register addresses afterwards.
        """
        store = self.opened()
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        self.successResultOf(store.close())
        raw = self.raw()
        raw.execute("DROP TABLE member_addresses")
        raw.execute("UPDATE version SET version = 1")
        raw.commit()
        raw.close()
        again = self.opened()
        self.assertEqual(self.successResultOf(again.member("alice")).mac, MAC_1)
        moved = a_member("alice", MAC_1, addresses=("10.9.0.1",))
        self.successResultOf(again.register(moved, 10))
        self.assertEqual(self.successResultOf(again.member_by_address("10.9.0.1")).member_id, "alice")
        self.assertEqual(self.raw().execute("SELECT version FROM version").fetchall(), [(2,)])

    def test_failedUpgrade(self):
        """
        An upgrade that fails leaves the database at its old version, and
        says where the backup is.
        """
        self.successResultOf(self.opened().close())
        self.pretend_newer_code({f"upgrade-to-v{NEXT}.sql": "CREATE TABLE added (x); CREATE TABLE broken (;"})
        e = self.open_failure(self.make_store(), StoreOpenError)
        self.assertIn(self.path + f".backup-v{CURRENT}", str(e))
        self.assertEqual(self.raw().execute("SELECT version FROM version").fetchall(), [(CURRENT,)])
        tables = {name for (name,) in self.raw().execute("SELECT name FROM sqlite_master")}
        self.assertNotIn("added", tables)

    def test_noUpgrader(self):
        """
        A version with no upgrade file is refused.
        """
        self.successResultOf(self.opened().close())
        self.patch(store_sqlite, "SCHEMA_VERSION", NEXT)
        e = self.open_failure(self.make_store(), StoreOpenError)
        self.assertIn(f"no upgrade from schema v{NEXT - 1} to v{NEXT}", str(e))


class WriteFailureTests(StoreTestMixin, SynchronousTestCase):
    """
    A database that fails during a write.
    """

    def failing(self, name):
        """
        Make the write transaction C{name} do its work and then hit a disk
        error before committing.
        """
        real = getattr(store_sqlite, name)

        def work(*args):
            real(*args)
            raise sqlite3.OperationalError("disk I/O error")

        self.patch(store_sqlite, name, work)

    def test_issueFails(self):
        """
        A pair-key write that fails is L{StoreUnavailable} with no key in
        its message; neither the mirror nor the database keeps the key.
        """
        store = self.opened()
        candidate = a_pair_key("alice", "bob")
        self.failing("_issue_pair_txn")
        e = self.failureResultOf(store.issue_pair_key(candidate, 10), StoreUnavailable).value
        self.assertIn("disk I/O error", str(e))
        self.assertNotIn(candidate.key.material.hex(), str(e))
        self.assertIsNone(self.successResultOf(store.pair_key("alice", "bob")))
        self.assertEqual(self.successResultOf(store.counts())["pair_keys"], 0)
        self.assertEqual(self.raw().execute("SELECT COUNT(*) FROM pair_keys").fetchone(), (0,))

    def test_registerFails(self):
        """
        A re-registration that fails leaves the member as it was, in the
        mirror and in the database.
        """
        store = self.opened()
        alice = self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        self.failing("_register_txn")
        self.failureResultOf(store.register(a_member("alice", MAC_2), 10), StoreUnavailable)
        self.assertEqual(self.successResultOf(store.member("alice")), alice)
        self.assertEqual(self.successResultOf(store.member_by_mac(MAC_1)), alice)
        self.assertIsNone(self.successResultOf(store.member_by_mac(MAC_2)))
        self.assertEqual(self.raw().execute("SELECT mac FROM members").fetchall(), [("02:00:00:00:00:01",)])

    def test_locked(self):
        """
        A database locked by another process past the busy timeout fails
        writes with L{StoreUnavailable}; they work again once it is free.
        """
        store = self.opened(busy_timeout=0.01)
        other = self.raw()
        other.execute("BEGIN EXCLUSIVE")
        e = self.failureResultOf(store.register(a_member("alice", MAC_1), 10), StoreUnavailable).value
        self.assertIn("locked", str(e))
        self.failureResultOf(store.issue_group_key(a_group_key()), StoreUnavailable)
        self.assertIsNone(self.successResultOf(store.member("alice")))
        self.assertIsNone(self.successResultOf(store.group_key()))
        other.execute("ROLLBACK")
        self.successResultOf(store.register(a_member("alice", MAC_1), 10))


class OpenStoreTests(SynchronousTestCase):
    """
    L{open_store} turns a spec into a store.
    """

    def test_specs(self):
        """
        sqlite URLs, bare paths and C{:memory:} name SQLite stores.
        """
        for spec, path in [
            ("sqlite:///var/lib/securelan/keys.db", "/var/lib/securelan/keys.db"),
            ("sqlite:state/keys.db", "state/keys.db"),
            ("SQLite:keys.db", "keys.db"),
            ("/var/lib/securelan/keys.db", "/var/lib/securelan/keys.db"),
            ("keys.db", "keys.db"),
            ("./odd:name.db", "./odd:name.db"),
            (":memory:", ":memory:"),
        ]:
            store = open_store(spec, "master.key")
            self.assertIsInstance(store, SQLiteStore)
            self.assertEqual((store.path, store.master_key_path), (path, "master.key"))
            self.assertTrue(IStore.providedBy(store))

    def test_passedThrough(self):
        """
        The reactor, runner and clock given reach the store.
        """
        reactor, clock = object(), object()
        store = open_store("sqlite:keys.db", None, reactor=reactor, runner=run_synchronously, clock=clock)
        self.assertEqual((store.reactor, store.runner, store.clock), (reactor, run_synchronously, clock))

    def test_unsupported(self):
        """
        Any other scheme is refused, without echoing the rest of the spec
        (which may hold a password).
        """
        e = self.assertRaises(StoreOpenError, open_store, "mysql://u:hunter2@db/securelan", "k")
        self.assertIn("unsupported store", str(e))
        self.assertNotIn("hunter2", str(e))
        self.assertRaises(StoreOpenError, open_store, "sqlite://host/keys.db", "k")
        self.assertRaises(StoreOpenError, open_store, "sqlite:", "k")
        self.assertRaises(StoreOpenError, open_store, "", "k")


class ThreadPoolTests(StoreTestMixin, TestCase):
    """
    The store with its own database thread, under the real reactor.
    """

    @defer.inlineCallbacks
    def test_offReactorThread(self):
        """
        Writes run off the reactor thread; concurrent issues for one pair
        make one write; close stops the thread; a restart sees the data.
        """
        seen = []
        real = store_sqlite._issue_pair_txn

        def issue(*args):
            seen.append(threadable.isInIOThread())
            return real(*args)

        self.patch(store_sqlite, "_issue_pair_txn", issue)
        store = SQLiteStore(self.path, self.key_path)
        self.addCleanup(store.close)
        yield store.open()
        alice = yield store.register(a_member("alice", MAC_1), 10)
        first = a_pair_key("alice", "bob")
        results = yield defer.gatherResults(
            [store.issue_pair_key(first, 10), store.issue_pair_key(a_pair_key("bob", "alice"), 10)]
        )
        self.assertEqual(results, [first, first])
        self.assertEqual(seen, [False])
        pool = store._pool
        yield store.close()
        self.assertFalse(pool.started)
        self.assertFalse(any(thread.is_alive() for thread in pool.threads))

        again = SQLiteStore(self.path, self.key_path)
        self.addCleanup(again.close)
        yield again.open()
        self.assertEqual((yield again.member_by_mac(MAC_1)), alice)
        self.assertEqual((yield again.pair_key("bob", "alice")), first)
        yield again.close()

    @defer.inlineCallbacks
    def test_openFailureStopsThread(self):
        """
        A store that fails to open stops its thread.
        """
        self.raw().execute("CREATE TABLE other (x)")
        store = SQLiteStore(self.path, self.key_path)
        d = store.open()
        pool = store._pool
        yield self.assertFailure(d, StoreOpenError)
        self.assertFalse(pool.started)
        self.assertIsNone(store._pool)
