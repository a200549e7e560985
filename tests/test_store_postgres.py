"""
Tests for L{securelan.store.postgres}: the store that a cascade of key
servers shares, on a real PostgreSQL (L{securelan.testing_postgres} starts a
throwaway cluster on 127.0.0.1, once for the whole module; each test gets a
database of its own).
"""

import os
import sqlite3
import threading
import time
from importlib import resources

from twisted.internet import defer, reactor, task
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from securelan import testing_postgres
from securelan._interfaces import IStore
from securelan.addresses import format_mac, parse_mac
from securelan.errors import MacInUse, NotPermitted, StoreUnavailable, TableFull
from securelan.keys import MasterKey, MasterKeyError, SecretKey
from securelan.records import GROUP_ID, GroupKey, Member, PairKey
from securelan.store import StoreOpenError, open_store, run_synchronously
from securelan.store import sqlite as store_sqlite

try:
    import psycopg

    from securelan.store import postgres as store_postgres
    from securelan.store.postgres import PostgreSQLStore
except ImportError:  # reported by testing_postgres.unavailable()
    psycopg = store_postgres = PostgreSQLStore = None

#: Why these tests cannot run here, if they cannot: they then fail, never
#: pass over (CI installs and starts PostgreSQL, so they always run there).
UNAVAILABLE = testing_postgres.unavailable()

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")
MAC_3 = parse_mac("02:00:00:00:00:03")
HOST_MAC = parse_mac("0a:00:00:00:00:09")

_DEFAULT = object()


def a_member(member_id, mac, role="client", endpoint="", registered_at=100.0, incarnation=0, addresses=()):
    return Member(member_id, role, mac, endpoint, registered_at, incarnation, addresses)


def a_pair_key(id_a, id_b, epoch=1, key=None):
    return PairKey(id_a, id_b, epoch, key or SecretKey.generate(), 200.0, 0.0)


def a_group_key(epoch=1):
    return GroupKey(epoch, SecretKey.generate(), 300.0)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class PostgresTestMixin:
    """
    Stores on a fresh database of the shared cluster, each with its own
    database thread, under the real reactor.
    """

    def setUp(self):
        if UNAVAILABLE:
            self.fail(f"the PostgreSQL tests need PostgreSQL and psycopg: {UNAVAILABLE}")
        self.directory = os.path.abspath(self.mktemp())
        os.mkdir(self.directory)
        self.key_path = os.path.join(self.directory, "master.key")
        self.cluster = self.make_cluster()
        # Registered first, so dropped after every store closed.
        self.dsn = testing_postgres.fresh_database(self, self.cluster)

    def make_cluster(self):
        return testing_postgres.shared_cluster()

    def make_store(self, dsn=_DEFAULT, key_path=_DEFAULT, **kwargs):
        dsn = self.dsn if dsn is _DEFAULT else dsn
        key_path = self.key_path if key_path is _DEFAULT else key_path
        return PostgreSQLStore(dsn, key_path, **kwargs)

    @defer.inlineCallbacks
    def opened(self, dsn=_DEFAULT, key_path=_DEFAULT, **kwargs):
        store = self.make_store(dsn, key_path, **kwargs)
        result = yield store.open()
        self.assertIsNone(result)
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def two_stores(self, **kwargs):
        """
        Two stores on the test's database, as two key servers of a cascade.
        """
        one = yield self.opened(**kwargs)
        two = yield self.opened(**kwargs)
        return one, two

    def raw(self, autocommit=True):
        """
        A plain connection to the test's database.
        """
        conn = psycopg.connect(self.dsn, autocommit=autocommit)
        self.addCleanup(conn.close)
        return conn

    def master(self):
        return MasterKey.load_or_create(self.key_path, create=False)

    @defer.inlineCallbacks
    def eventually(self, check, timeout=5.0, what="the condition"):
        """
        Poll C{check()} (a value or a Deferred) until it is true, for at
        most C{timeout} seconds; fire with its value.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = yield defer.maybeDeferred(check)
            if result:
                return result
            if time.monotonic() > deadline:
                self.fail(f"{what} did not hold within {timeout} s")
            yield sleep(0.01)

    def lock_waiters(self):
        row = self.raw().execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        return row[0]

    def hold_after_insert(self, store, kind):
        """
        Make C{store}'s next write of C{kind} stop right after its INSERT,
        inside its transaction (its row inserted, not committed), until the
        returned event is set; C{reached} is set once it stopped there.
        """
        real = store_postgres._notify
        reached, release = threading.Event(), threading.Event()

        def notify(conn, origin, change_kind, ids):
            real(conn, origin, change_kind, ids)
            if origin == store._origin and change_kind == kind and not reached.is_set():
                reached.set()
                release.wait(20)

        self.patch(store_postgres, "_notify", notify)
        self.addCleanup(release.set)
        return reached, release

    @defer.inlineCallbacks
    def wait_event(self, event, what):
        yield self.eventually(event.is_set, what=what)


class RegistryTests(PostgresTestMixin, TestCase):
    """
    The member registry.
    """

    @defer.inlineCallbacks
    def test_interface(self):
        """
        L{PostgreSQLStore} provides L{IStore}.
        """
        store = yield self.opened()
        self.assertTrue(verifyObject(IStore, store))

    @defer.inlineCallbacks
    def test_registerAndLookup(self):
        """
        A registered member gets incarnation 1 and is found by ID and by
        MAC, listed and counted.
        """
        store = yield self.opened()
        alice = yield store.register(a_member("alice", MAC_1, endpoint="192.0.2.1:4789"), 10)
        self.assertEqual(alice, a_member("alice", MAC_1, endpoint="192.0.2.1:4789", incarnation=1))
        self.assertEqual((yield store.member("alice")), alice)
        self.assertEqual((yield store.member_by_mac(MAC_1)), alice)
        self.assertEqual((yield store.members()), [alice])
        self.assertEqual((yield store.counts()), {"members": 1, "pair_keys": 0})
        self.assertIsNone((yield store.member("nobody")))
        self.assertIsNone((yield store.member_by_mac(MAC_2)))
        row = self.raw().execute("SELECT member_id, mac, incarnation, last_seen FROM members").fetchall()
        self.assertEqual(row, [("alice", "02:00:00:00:00:01", 1, 100.0)])

    @defer.inlineCallbacks
    def test_macInUse(self):
        """
        A MAC held by another member is refused with L{MacInUse}, whose
        message names the MAC but not the holder; the newcomer is not
        registered.
        """
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 10)
        e = yield self.assertFailure(store.register(a_member("mallory", MAC_1), 10), MacInUse)
        self.assertIn("02:00:00:00:00:01", str(e))
        self.assertNotIn("alice", str(e))
        self.assertIsNone((yield store.member("mallory")))
        self.assertEqual((yield store.member_by_mac(MAC_1)).member_id, "alice")

    @defer.inlineCallbacks
    def test_addresses(self):
        """
        Layer 3: a member's overlay IP addresses find it, here and on a
        second key server of the cascade; another member cannot take one
        (L{AddressInUse}, nothing half done); moving and revoking release
        them.
        """
        from securelan.errors import AddressInUse

        store = yield self.opened()
        other = yield self.opened()
        alice = yield store.register(a_member("alice", MAC_1, addresses=("10.9.0.1", "fd00::1")), 10)
        self.assertEqual((yield store.member_by_address("fd00::1")), alice)
        yield self.eventually(lambda: other._by_address.get("10.9.0.1") is not None, what="the other mirror")
        self.assertEqual((yield other.member_by_address("10.9.0.1")), alice)
        e = yield self.assertFailure(other.register(a_member("mallory", MAC_2, addresses=("10.9.0.1",)), 10),
                                     AddressInUse)
        self.assertIn("10.9.0.1", str(e))
        self.assertIsNone((yield store.member("mallory")))
        self.assertEqual(self.raw().execute("SELECT COUNT(*) FROM members").fetchone(), (1,))
        yield store.register(a_member("alice", MAC_1, addresses=("10.9.0.2",)), 10)
        self.assertIsNone((yield store.member_by_address("10.9.0.1")))
        yield other.register(a_member("bob", MAC_2, addresses=("10.9.0.1",)), 10)
        yield store.revoke("bob", "test", 300.0)
        self.assertIsNone((yield store.member_by_address("10.9.0.1")))
        rows = self.raw().execute("SELECT address, member_id FROM member_addresses").fetchall()
        self.assertEqual(rows, [("10.9.0.2", "alice")])

    @defer.inlineCallbacks
    def test_macRace(self):
        """
        When another key server gives a MAC to another member while this one
        registers it (past the first look), the UNIQUE constraint settles
        it: L{MacInUse}, and nothing half done.
        """
        store = yield self.opened()
        other = self.raw(autocommit=False)
        other.execute(
            "INSERT INTO members (member_id, role, mac, registered_at, incarnation)"
            " VALUES ('eve', 'client', '02:00:00:00:00:01', 1, 1)"
        )
        d = store.register(a_member("mallory", MAC_1), 10)
        yield self.eventually(lambda: self.lock_waiters() == 1, what="the registration waiting on the MAC")
        other.commit()
        yield self.assertFailure(d, MacInUse)
        self.assertIsNone((yield store.member("mallory")))
        rows = self.raw().execute("SELECT member_id FROM members").fetchall()
        self.assertEqual(rows, [("eve",)])

    @defer.inlineCallbacks
    def test_reregisterNewMac(self):
        """
        A member re-registering with a new MAC moves to it (with its new
        role, endpoint and time, and the next incarnation) and releases the
        old MAC for others.
        """
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 10)
        moved = a_member("alice", MAC_2, role="gateway", endpoint="192.0.2.9:1", registered_at=150.0)
        moved = yield store.register(moved, 10)
        self.assertEqual(moved.incarnation, 2)
        self.assertEqual((yield store.member("alice")), moved)
        self.assertEqual((yield store.member_by_mac(MAC_2)), moved)
        self.assertIsNone((yield store.member_by_mac(MAC_1)))
        # The same answers at once, from memory.
        self.assertEqual(store.peek_member("alice"), moved)
        self.assertEqual(store.peek_member_by_mac(MAC_2), moved)
        self.assertIsNone(store.peek_member_by_mac(MAC_1))
        bob = yield store.register(a_member("bob", MAC_1), 10)
        self.assertEqual(bob, a_member("bob", MAC_1, incarnation=1))
        self.assertEqual((yield store.counts())["members"], 2)

    @defer.inlineCallbacks
    def test_claimedIncarnation(self):
        """
        A member that claims an incarnation not below the stored one keeps
        it; a lower claim (or none) gets the stored one plus one.
        """
        store = yield self.opened()
        self.assertEqual((yield store.register(a_member("alice", MAC_1, incarnation=7), 10)).incarnation, 7)
        self.assertEqual((yield store.register(a_member("alice", MAC_1, incarnation=7), 10)).incarnation, 7)
        self.assertEqual((yield store.register(a_member("alice", MAC_1, incarnation=9), 10)).incarnation, 9)
        self.assertEqual((yield store.register(a_member("alice", MAC_1, incarnation=3), 10)).incarnation, 10)
        self.assertEqual((yield store.register(a_member("alice", MAC_1), 10)).incarnation, 11)
        self.assertEqual((yield store.member("alice")).incarnation, 11)

    @defer.inlineCallbacks
    def test_incarnationsNeverRepeat(self):
        """
        Registrations of one member racing through two key servers (two
        stores, two threads) all get different incarnations.
        """
        one, two = yield self.two_stores()
        results = yield defer.gatherResults(
            [store.register(a_member("alice", MAC_1), 10) for _ in range(10) for store in (one, two)]
        )
        self.assertEqual(sorted(m.incarnation for m in results), list(range(1, 21)))

    @defer.inlineCallbacks
    def test_registryFull(self):
        """
        A new member is refused with L{TableFull} once the registry holds
        C{max_members}; a known member may still re-register.
        """
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 2)
        yield store.register(a_member("bob", MAC_2), 2)
        yield self.assertFailure(store.register(a_member("carol", MAC_3), 2), TableFull)
        self.assertIsNone((yield store.member("carol")))
        yield store.register(a_member("bob", MAC_3, endpoint="192.0.2.2:1"), 2)
        self.assertEqual((yield store.member_by_mac(MAC_3)).member_id, "bob")

    @defer.inlineCallbacks
    def test_writeWhenClosed(self):
        """
        A write to a store that is not open fails with L{StoreUnavailable};
        reads still answer from the mirror after close.
        """
        store = self.make_store()
        yield self.assertFailure(store.register(a_member("alice", MAC_1), 10), StoreUnavailable)
        yield store.open()
        yield store.register(a_member("alice", MAC_1), 10)
        yield store.close()
        yield self.assertFailure(store.issue_pair_key(a_pair_key("a", "b"), 10), StoreUnavailable)
        self.assertEqual((yield store.member("alice")).mac, MAC_1)


class PairKeyTests(PostgresTestMixin, TestCase):
    """
    The pair-key table and the group key, within one key server and across
    key servers.
    """

    @defer.inlineCallbacks
    def test_issue(self):
        """
        The first candidate for a pair is stored and found under either
        order; later candidates, in either order, get it; a reversed
        candidate is stored in canonical order.
        """
        store = yield self.opened()
        first = a_pair_key("alice", "bob")
        self.assertEqual((yield store.issue_pair_key(first, 10)), first)
        self.assertEqual((yield store.pair_key("bob", "alice")), first)
        self.assertIsNone((yield store.pair_key("alice", "carol")))
        self.assertEqual(store.peek_pair_key("bob", "alice"), first)
        self.assertIsNone(store.peek_pair_key("alice", "carol"))
        self.assertEqual((yield store.issue_pair_key(a_pair_key("bob", "alice"), 10)), first)
        key = SecretKey.generate()
        issued = yield store.issue_pair_key(a_pair_key("carol", "alice", key=key), 10)
        self.assertEqual((issued.id_a, issued.id_b, issued.key), ("alice", "carol", key))
        self.assertEqual(sorted(p.peer_of("alice") for p in (yield store.pairs_of("alice"))), ["bob", "carol"])
        self.assertEqual((yield store.counts())["pair_keys"], 2)

    @defer.inlineCallbacks
    def test_codePointOrder(self):
        """
        Pairs are canonical in Python's (code point) order even where the
        database collates otherwise (the test database sorts "B" after
        "a").
        """
        store = yield self.opened()
        issued = yield store.issue_pair_key(a_pair_key("alice", "Bob"), 10)
        self.assertEqual((issued.id_a, issued.id_b), ("Bob", "alice"))
        self.assertEqual(self.raw().execute("SELECT id_a, id_b FROM pair_keys").fetchall(), [("Bob", "alice")])

    @defer.inlineCallbacks
    def test_tableFull(self):
        """
        A new pair is refused with L{TableFull} once the table holds
        C{max_pair_keys}; a pair that has a key still gets it.
        """
        store = yield self.opened()
        first = yield store.issue_pair_key(a_pair_key("alice", "bob"), 1)
        yield self.assertFailure(store.issue_pair_key(a_pair_key("alice", "carol"), 1), TableFull)
        self.assertIsNone((yield store.pair_key("alice", "carol")))
        self.assertEqual((yield store.issue_pair_key(a_pair_key("bob", "alice"), 1)), first)

    @defer.inlineCallbacks
    def test_concurrentIssuesCoalesce(self):
        """
        Two issues for one pair under way at once in one store make one
        transaction, and both callers get the first candidate.
        """
        calls = []
        real = store_postgres._issue_pair_txn

        def issue(*args):
            calls.append(threadable.isInIOThread())
            return real(*args)

        self.patch(store_postgres, "_issue_pair_txn", issue)
        store = yield self.opened()
        first = a_pair_key("alice", "bob")
        results = yield defer.gatherResults(
            [store.issue_pair_key(first, 10), store.issue_pair_key(a_pair_key("bob", "alice"), 10)]
        )
        self.assertEqual(results, [first, first])
        self.assertEqual(calls, [False])

    @defer.inlineCallbacks
    def test_pairRaceInterleaved(self):
        """
        Two key servers asked for the same new pair at the same moment hand
        out the same key: B's transaction runs while A's has inserted and
        not committed; B waits on A's row, then returns A's key.
        """
        one, two = yield self.two_stores()
        reached, release = self.hold_after_insert(one, "pair")
        first, second = a_pair_key("alice", "bob"), a_pair_key("bob", "alice")
        d1 = one.issue_pair_key(first, 10)
        yield self.wait_event(reached, "A's insert")
        d2 = two.issue_pair_key(second, 10)
        yield self.eventually(lambda: self.lock_waiters() == 1, what="B waiting on A's row")
        self.assertNoResult(d2)
        release.set()
        self.assertEqual((yield d1), first)
        self.assertEqual((yield d2), first)
        self.assertEqual((yield two.pair_key("alice", "bob")), first)
        self.assertEqual(self.raw().execute("SELECT COUNT(*) FROM pair_keys").fetchone(), (1,))

    @defer.inlineCallbacks
    def test_pairRaceThreads(self):
        """
        Two stores (two database threads) issuing the same 40 new pairs at
        once, each with its own candidates, agree on every key, which is
        the one the database holds.
        """
        one, two = yield self.two_stores()
        pairs = [(f"m{i:02d}", f"n{i:02d}") for i in range(40)]
        d1 = defer.gatherResults([one.issue_pair_key(a_pair_key(*pair), 100) for pair in pairs])
        d2 = defer.gatherResults([two.issue_pair_key(a_pair_key(*reversed(pair)), 100) for pair in pairs])
        got1 = yield d1
        got2 = yield d2
        self.assertEqual(got1, got2)
        master = self.master()
        stored = {
            (a, b): master.unwrap(wrapped, store_sqlite._pair_context(a, b, epoch))
            for a, b, epoch, wrapped in self.raw().execute("SELECT id_a, id_b, epoch, wrapped_key FROM pair_keys")
        }
        self.assertEqual(stored, {(p.id_a, p.id_b): p.key for p in got1})

    @defer.inlineCallbacks
    def test_groupKey(self):
        """
        The first group key candidate is kept; later ones get it.
        """
        store = yield self.opened()
        self.assertIsNone((yield store.group_key()))
        first = a_group_key()
        self.assertEqual((yield store.issue_group_key(first)), first)
        self.assertEqual((yield store.issue_group_key(a_group_key(epoch=2))), first)
        self.assertEqual((yield store.group_key()), first)

    @defer.inlineCallbacks
    def test_groupKeyRaceInterleaved(self):
        """
        Two key servers generating the group key at once (both started on
        an empty store) end up with one group key.
        """
        one, two = yield self.two_stores()
        reached, release = self.hold_after_insert(one, "group")
        first = a_group_key()
        d1 = one.issue_group_key(first)
        yield self.wait_event(reached, "A's insert")
        d2 = two.issue_group_key(a_group_key())
        yield self.eventually(lambda: self.lock_waiters() == 1, what="B waiting on A's row")
        release.set()
        self.assertEqual([(yield d1), (yield d2)], [first, first])
        self.assertEqual((yield two.group_key()), first)

    @defer.inlineCallbacks
    def test_rekeyPair(self):
        """
        A pair is rekeyed only forward: a higher epoch replaces the key, the
        same or a lower one gets the stored key back; a pair with no key
        stays without.
        """
        store = yield self.opened()
        yield store.issue_pair_key(a_pair_key("alice", "bob"), 10)
        second = a_pair_key("alice", "bob", epoch=2)
        self.assertEqual((yield store.rekey_pair(second)), second)
        self.assertEqual((yield store.rekey_pair(a_pair_key("bob", "alice", epoch=2))), second)
        self.assertEqual((yield store.pair_key("alice", "bob")), second)
        self.assertIsNone((yield store.rekey_pair(a_pair_key("alice", "carol", epoch=2))))
        self.assertIsNone((yield store.pair_key("alice", "carol")))

    @defer.inlineCallbacks
    def test_rekeyGroup(self):
        """
        The group key is rekeyed only forward; of two key servers rekeying
        to the same epoch at once, both end with the one stored.
        """
        one, two = yield self.two_stores()
        yield one.issue_group_key(a_group_key())
        second = a_group_key(epoch=2)
        self.assertEqual((yield one.rekey_group(second)), second)
        self.assertEqual((yield one.rekey_group(a_group_key(epoch=1))), second)
        third_a, third_b = a_group_key(epoch=3), a_group_key(epoch=3)
        results = yield defer.gatherResults([one.rekey_group(third_a), two.rekey_group(third_b)])
        self.assertEqual(results[0], results[1])
        self.assertIn(results[0], (third_a, third_b))
        self.assertEqual((yield one.group_key()), results[0])

    @defer.inlineCallbacks
    def test_revoke(self):
        """
        Revoking a member records it, destroys every pair key it holds (and
        fires with them), releases its MAC and the MACs it fronted, and
        leaves other pairs alone.
        """
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 10)
        yield store.register(a_member("gw", MAC_2, role="gateway"), 10)
        ab = yield store.issue_pair_key(a_pair_key("alice", "bob"), 10)
        ag = yield store.issue_pair_key(a_pair_key("alice", "gw"), 10)
        bc = yield store.issue_pair_key(a_pair_key("bob", "carol"), 10)
        self.assertEqual((yield store.bind_foreign_mac(HOST_MAC, "gw", 1000.0, 0, 10)), "gw")
        destroyed = yield store.revoke("alice", "stolen laptop", 500.0)
        self.assertEqual(sorted(destroyed, key=lambda p: p.id_b), [ab, ag])
        self.assertTrue((yield store.is_revoked("alice")))
        self.assertFalse((yield store.is_revoked("bob")))
        self.assertIsNone((yield store.member("alice")))
        self.assertIsNone((yield store.member_by_mac(MAC_1)))
        self.assertEqual((yield store.pairs_of("alice")), [])
        self.assertEqual((yield store.pairs_of("bob")), [bc])
        self.assertEqual((yield store.pair_keys()), [bc])
        yield store.revoke("gw", "", 501.0)
        self.assertIsNone((yield store.foreign_mac(HOST_MAC, 1000.0)))
        raw = self.raw()
        self.assertEqual(raw.execute("SELECT id_a, id_b FROM pair_keys").fetchall(), [("bob", "carol")])
        self.assertEqual(raw.execute("SELECT COUNT(*) FROM foreign_macs").fetchone(), (0,))
        self.assertEqual(
            raw.execute("SELECT member_id, serial, revoked_at, reason FROM revoked ORDER BY member_id").fetchall(),
            [("alice", "", 500.0, "stolen laptop"), ("gw", "", 501.0, "")],
        )
        # A new store learns it from the database.
        again = yield self.opened()
        self.assertTrue((yield again.is_revoked("alice")))

    @defer.inlineCallbacks
    def test_revokedElsewhere(self):
        """
        A key server whose mirror has not yet heard of a revocation made
        through another one still cannot register the member again nor
        issue it a new pair key: L{NotPermitted}.
        """
        one, two = yield self.two_stores()
        yield two.register(a_member("mallory", MAC_1), 10)
        two._listener._changed = lambda change: None
        yield one.revoke("mallory", "", 1.0)
        self.assertFalse((yield two.is_revoked("mallory")))
        e = yield self.assertFailure(two.register(a_member("mallory", MAC_1), 10), NotPermitted)
        self.assertIn("mallory", str(e))
        yield self.assertFailure(two.issue_pair_key(a_pair_key("bob", "mallory"), 10), NotPermitted)
        raw = self.raw()
        self.assertEqual(raw.execute("SELECT COUNT(*) FROM members").fetchone(), (0,))
        self.assertEqual(raw.execute("SELECT COUNT(*) FROM pair_keys").fetchone(), (0,))

    @defer.inlineCallbacks
    def test_revokeWaitsForIssue(self):
        """
        A revocation that comes while another key server's new pair key
        for the member is not committed yet waits for it, then destroys it.
        """
        one, two = yield self.two_stores()
        reached, release = self.hold_after_insert(two, "pair")
        d = two.issue_pair_key(a_pair_key("bob", "mallory"), 10)
        yield self.wait_event(reached, "the insert")
        revoked = one.revoke("mallory", "", 1.0)
        yield self.eventually(lambda: self.lock_waiters() == 1, what="the revocation waiting")
        self.assertNoResult(revoked)
        release.set()
        issued = yield d
        self.assertEqual((yield revoked), [issued])
        self.assertEqual(self.raw().execute("SELECT COUNT(*) FROM pair_keys").fetchone(), (0,))
        yield self.eventually(lambda: two.pair_key("bob", "mallory").addCallback(lambda p: p is None))

    @defer.inlineCallbacks
    def test_foreignMacs(self):
        """
        A MAC bound to a gateway stays bound (a second binding gets the
        first gateway) until the binding expires; an expired one may be
        bound again.
        """
        store = yield self.opened()
        yield store.register(a_member("gw1", MAC_1, role="gateway"), 10)
        yield store.register(a_member("gw2", MAC_2, role="gateway"), 10)
        self.assertIsNone((yield store.foreign_mac(HOST_MAC, 100.0)))
        self.assertEqual((yield store.bind_foreign_mac(HOST_MAC, "gw1", 100.0, 200.0, 10)), "gw1")
        self.assertEqual((yield store.bind_foreign_mac(HOST_MAC, "gw2", 150.0, 250.0, 10)), "gw1")
        self.assertEqual((yield store.foreign_mac(HOST_MAC, 150.0)), "gw1")
        self.assertIsNone((yield store.foreign_mac(HOST_MAC, 200.0)))
        self.assertEqual((yield store.bind_foreign_mac(HOST_MAC, "gw2", 200.0, 300.0, 1)), "gw2")
        other = parse_mac("0a:00:00:00:00:0a")
        yield self.assertFailure(store.bind_foreign_mac(other, "gw2", 200.0, 300.0, 1), TableFull)


class DurabilityTests(PostgresTestMixin, TestCase):
    """
    What the database keeps, and how.
    """

    @defer.inlineCallbacks
    def fill(self, store):
        members = []
        for member in [a_member("alice", MAC_1, endpoint="192.0.2.1:1"), a_member("bob", MAC_2, role="gateway")]:
            members.append((yield store.register(member, 10)))
        pairs = []
        for candidate in [a_pair_key("alice", "bob", epoch=3), a_pair_key("alice", "carol")]:
            pairs.append((yield store.issue_pair_key(candidate, 10)))
        group = yield store.issue_group_key(a_group_key())
        yield store.bind_foreign_mac(HOST_MAC, "bob", 100.0, 0, 10)
        return members, pairs, group

    @defer.inlineCallbacks
    def test_restart(self):
        """
        A new store object on the same database and master key sees every
        member, pair key, foreign MAC and the group key, with equal keys.
        """
        store = yield self.opened()
        members, pairs, group = yield self.fill(store)
        yield store.close()
        again = yield self.opened()
        self.assertEqual(sorted((yield again.members()), key=lambda m: m.member_id), members)
        self.assertEqual((yield again.member_by_mac(MAC_2)), members[1])
        for pair in pairs:
            self.assertEqual((yield again.pair_key(pair.id_b, pair.id_a)), pair)
        self.assertEqual((yield again.group_key()), group)
        self.assertEqual((yield again.foreign_mac(HOST_MAC, 5000.0)), "bob")
        self.assertEqual((yield again.counts()), {"members": 2, "pair_keys": 2})

    @defer.inlineCallbacks
    def test_wrappedAsSQLite(self):
        """
        Keys at rest are wrapped under the master key with the SQLite
        store's associated data, and the check value opens under it.
        """
        store = yield self.opened()
        _, pairs, group = yield self.fill(store)
        master, raw = self.master(), self.raw()
        for id_a, id_b, epoch, wrapped in raw.execute("SELECT id_a, id_b, epoch, wrapped_key FROM pair_keys"):
            key = master.unwrap(wrapped, store_sqlite._pair_context(id_a, id_b, epoch))
            self.assertIn(key, [p.key for p in pairs])
        ((epoch, wrapped),) = raw.execute("SELECT epoch, wrapped_key FROM group_keys").fetchall()
        self.assertEqual(master.unwrap(wrapped, store_sqlite._group_context(GROUP_ID, epoch)), group.key)
        (check,) = raw.execute("SELECT value FROM meta WHERE name = 'master_key_check'").fetchone()
        master.unwrap(check, store_sqlite._CHECK_CONTEXT)

    @defer.inlineCallbacks
    def test_noKeyMaterialInDatabase(self):
        """
        No key's bytes (nor the master key's) are in the database: not in
        any row, not in the database's files or the write-ahead log.
        """
        store = yield self.opened()
        _, pairs, group = yield self.fill(store)
        with open(self.key_path, "rb") as f:
            secrets = [f.read(), group.key.material] + [pair.key.material for pair in pairs]
        raw = self.raw()
        tables = ("version", "meta", "members", "pair_keys", "group_keys", "foreign_macs", "net_keys", "revoked")
        dump = "".join(str(row) for table in tables for row in raw.execute(f"SELECT t::text FROM {table} t"))
        self.assertIn("alice", dump)
        for secret in secrets:
            self.assertNotIn(secret.hex(), dump)
        raw.execute("CHECKPOINT")
        (oid,) = raw.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()
        data = self.cluster.data_directory
        files = [
            path
            for path in self.cluster.files()
            if path.startswith((os.path.join(data, "base", str(oid)) + os.sep, os.path.join(data, "pg_wal") + os.sep))
        ]
        wrapped = raw.execute("SELECT wrapped_key FROM pair_keys").fetchone()[0]
        found_wrapped = False
        for path in files:
            with open(path, "rb") as f:
                content = f.read()
            found_wrapped = found_wrapped or wrapped in content
            for secret in secrets:
                self.assertNotIn(secret, content, path)
        # The scan did look where the rows are.
        self.assertTrue(found_wrapped)

    @defer.inlineCallbacks
    def test_reprHidesPassword(self):
        """
        The store's repr and name show the DSN without its password, and
        no key.
        """
        store = yield self.opened()
        _, pairs, _ = yield self.fill(store)
        self.assertNotIn(pairs[0].key.material.hex(), repr(store))
        self.assertIn(self.dsn, repr(store))
        for dsn, shown in [
            ("postgresql://keys:hunter2@db.example:5432/x", "postgresql://keys:***@db.example:5432/x"),
            ("postgresql://db/securelan?user=k&password=hunter2", "postgresql://db/securelan?user=k&password=***"),
            ("host=db user=k password='hun ter2' dbname=x", "host=db user=k password=*** dbname=x"),
        ]:
            store = PostgreSQLStore(dsn, self.key_path)
            self.assertEqual(store.name, shown)
            self.assertNotIn("hunter2", repr(store))
            self.assertNotIn("hun ter2", repr(store))

    def test_schemaMatchesSQLite(self):
        """
        The PostgreSQL schema has the SQLite schema's tables and columns,
        with BYTEA keys, DOUBLE PRECISION times and BIGINT counters.
        """
        sqlite_conn = sqlite3.connect(":memory:")
        self.addCleanup(sqlite_conn.close)
        sqlite_conn.executescript(
            resources.files("securelan.store").joinpath("schema", "v2.sql").read_text("utf-8")
        )
        expected = {
            table: [column[1] for column in sqlite_conn.execute(f"PRAGMA table_info({table})")]
            for (table,) in sqlite_conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        raw = self.raw()
        raw.execute(resources.files("securelan.store").joinpath("schema", "postgres-v2.sql").read_text("utf-8"))
        columns = raw.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ).fetchall()
        got = {}
        for table, column, _ in columns:
            got.setdefault(table, []).append(column)
        self.assertEqual(got, expected)
        types = {(table, column): data_type for table, column, data_type in columns}
        for table in ("pair_keys", "group_keys", "net_keys"):
            self.assertEqual(types[(table, "wrapped_key")], "bytea")
        self.assertEqual(types[("meta", "value")], "bytea")
        self.assertEqual(types[("members", "registered_at")], "double precision")
        self.assertEqual(types[("members", "incarnation")], "bigint")
        self.assertEqual(types[("pair_keys", "epoch")], "bigint")


class OpenTests(PostgresTestMixin, TestCase):
    """
    Opening: creating the schema, and what is refused.
    """

    @defer.inlineCallbacks
    def make_database(self):
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 10)
        yield store.close()

    @defer.inlineCallbacks
    def test_created(self):
        """
        An empty database gets the schema at the current version, the master key
        check value and a new master key file (mode 0600).
        """
        yield self.opened()
        raw = self.raw()
        self.assertEqual(raw.execute("SELECT version FROM version").fetchall(), [(store_postgres.SCHEMA_VERSION,)])
        names = sorted(name for (name,) in raw.execute("SELECT name FROM meta"))
        self.assertEqual(names, ["created_at", "master_key_check"])
        self.assertEqual(os.stat(self.key_path).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_concurrentOpen(self):
        """
        Two key servers starting at once on an empty database build the
        schema once and both open it.
        """
        one, two = self.make_store(), self.make_store()
        yield defer.gatherResults([one.open(), two.open()])
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        self.assertEqual(self.raw().execute("SELECT version FROM version").fetchall(),
                         [(store_postgres.SCHEMA_VERSION,)])
        alice = yield one.register(a_member("alice", MAC_1), 10)
        self.assertEqual((yield self.eventually(lambda: two.member_by_mac(MAC_1))), alice)

    @defer.inlineCallbacks
    def test_mismatchedMasterKey(self):
        """
        A master key other than the database's is refused, naming both.
        """
        yield self.make_database()
        other = os.path.join(self.directory, "other.key")
        MasterKey.load_or_create(other, create=True)
        store = self.make_store(key_path=other)
        e = yield self.assertFailure(store.open(), MasterKeyError)
        self.assertEqual(str(e), f"master key {other} does not match database {self.dsn}")
        self.assertIsNone(store._pool)

    @defer.inlineCallbacks
    def test_missingMasterKey(self):
        """
        An existing database whose master key file is missing is refused,
        naming the file, and no new key is made.
        """
        yield self.make_database()
        os.remove(self.key_path)
        e = yield self.assertFailure(self.make_store().open(), MasterKeyError)
        self.assertIn(self.key_path, str(e))
        self.assertFalse(os.path.exists(self.key_path))

    @defer.inlineCallbacks
    def test_needsMasterKeyPath(self):
        """
        A store without a master key path is refused before connecting.
        """
        e = yield self.assertFailure(PostgreSQLStore(self.dsn, None).open(), StoreOpenError)
        self.assertIn("master key", str(e))

    @defer.inlineCallbacks
    def test_newerSchema(self):
        """
        A database of a newer schema version is refused, saying so, and
        left as it was.
        """
        yield self.make_database()
        raw = self.raw()
        newer = store_postgres.SCHEMA_VERSION + 1
        raw.execute("UPDATE version SET version = %s", (newer,))
        e = yield self.assertFailure(self.make_store().open(), StoreOpenError)
        self.assertIn(self.dsn, str(e))
        self.assertIn(f"v{newer}", str(e))
        self.assertEqual(raw.execute("SELECT version FROM version").fetchall(), [(newer,)])

    @defer.inlineCallbacks
    def test_upgrade(self):
        """
        An older database is upgraded in one transaction, keeping its
        contents; an upgrade that fails leaves it at its version.
        """
        yield self.make_database()
        real = store_postgres._read_schema
        current = store_postgres.SCHEMA_VERSION
        following = current + 1
        upgrade = f"postgres-upgrade-to-v{following}.sql"
        upgrades = {upgrade: "CREATE TABLE added (x INTEGER); CREATE TABLE broken (;"}
        self.patch(store_postgres, "_read_schema", lambda name: upgrades.get(name) or real(name))
        self.patch(store_postgres, "SCHEMA_VERSION", following)
        e = yield self.assertFailure(self.make_store().open(), StoreOpenError)
        self.assertIn(f"stays at v{current}", str(e))
        raw = self.raw()
        self.assertEqual(raw.execute("SELECT version FROM version").fetchall(), [(current,)])
        self.assertIsNone(raw.execute("SELECT to_regclass('added')").fetchone()[0])
        upgrades[upgrade] = "CREATE TABLE added (x INTEGER);"
        store = yield self.opened()
        self.assertEqual((yield store.member("alice")).mac, MAC_1)
        self.assertEqual(raw.execute("SELECT version FROM version").fetchall(), [(following,)])
        raw.execute("SELECT x FROM added")

    @defer.inlineCallbacks
    def test_upgrade_v1_to_v2(self):
        """
        A schema v1 database (no member_addresses) is upgraded by the real
        script; its members stay and can then register addresses.
        """
        yield self.make_database()
        raw = self.raw()
        raw.execute("DROP TABLE member_addresses")
        raw.execute("UPDATE version SET version = 1")
        store = yield self.opened()
        self.assertEqual((yield store.member("alice")).mac, MAC_1)
        yield store.register(a_member("alice", MAC_1, addresses=("10.9.0.1",)), 10)
        self.assertEqual((yield store.member_by_address("10.9.0.1")).member_id, "alice")
        self.assertEqual(raw.execute("SELECT version FROM version").fetchall(), [(2,)])

    @defer.inlineCallbacks
    def test_notSecurelan(self):
        """
        A database that holds some of securelan's bookkeeping tables but
        not all is refused, and no key file is made.
        """
        self.raw().execute("CREATE TABLE meta (name TEXT)")
        e = yield self.assertFailure(self.make_store().open(), StoreOpenError)
        self.assertIn("not a securelan database", str(e))
        self.assertFalse(os.path.exists(self.key_path))

    @defer.inlineCallbacks
    def test_unreachable(self):
        """
        A server that cannot be reached fails the open with
        L{StoreOpenError}, without the password, and stops the thread.
        """
        port = testing_postgres._free_port()
        store = self.make_store(f"postgresql://keys:hunter2@127.0.0.1:{port}/securelan", connect_timeout=2)
        d = store.open()
        pool = store._pool
        e = yield self.assertFailure(d, StoreOpenError)
        self.assertIn("cannot open database", str(e))
        self.assertNotIn("hunter2", str(e))
        self.assertFalse(pool.started)

    @defer.inlineCallbacks
    def test_alreadyOpen(self):
        """
        Opening an open store is refused; a closed one opens again.
        """
        store = yield self.opened()
        yield self.assertFailure(store.open(), StoreOpenError)
        yield store.close()
        again = yield store.open()
        self.assertIsNone(again)

    @defer.inlineCallbacks
    def test_synchronousRunner(self):
        """
        With L{run_synchronously} (the key server's preflight, tools) the
        store works on the calling thread and does not listen.
        """
        store = yield self.opened(runner=run_synchronously)
        self.assertIsNone(store._pool)
        self.assertIsNone(store._listener)
        alice = self.successResultOf(store.register(a_member("alice", MAC_1), 10))
        self.assertEqual(alice.incarnation, 1)
        self.successResultOf(store.close())


class CrossStoreTests(PostgresTestMixin, TestCase):
    """
    Key servers of one cascade see each other's changes.
    """

    @defer.inlineCallbacks
    def test_visibility(self):
        """
        What store A writes reaches store B's mirror reads soon, through
        NOTIFY: members (and a MAC that moved), pair keys, rekeys, the group
        key and revocations.
        """
        one, two = yield self.two_stores()
        alice = yield one.register(a_member("alice", MAC_1), 10)
        self.assertEqual((yield self.eventually(lambda: two.member_by_mac(MAC_1))), alice)
        moved = yield one.register(a_member("alice", MAC_2), 10)
        yield self.eventually(lambda: two.member_by_mac(MAC_2))
        self.assertEqual((yield two.member("alice")), moved)
        self.assertIsNone((yield two.member_by_mac(MAC_1)))
        pair = yield one.issue_pair_key(a_pair_key("alice", "bob"), 10)
        self.assertEqual((yield self.eventually(lambda: two.pair_key("bob", "alice"))), pair)
        rekeyed = yield one.rekey_pair(a_pair_key("alice", "bob", epoch=2))
        yield self.eventually(lambda: two.pair_key("alice", "bob").addCallback(lambda p: p.epoch == 2))
        self.assertEqual((yield two.pair_key("alice", "bob")), rekeyed)
        group = yield one.issue_group_key(a_group_key())
        self.assertEqual((yield self.eventually(two.group_key)), group)
        yield one.register(a_member("gw", MAC_3, role="gateway"), 10)
        yield one.bind_foreign_mac(HOST_MAC, "gw", 100.0, 0, 10)
        yield self.eventually(lambda: two.foreign_mac(HOST_MAC, 100.0))
        yield one.revoke("alice", "", 1.0)
        yield self.eventually(lambda: two.is_revoked("alice"))
        self.assertIsNone((yield two.member("alice")))
        self.assertIsNone((yield two.pair_key("alice", "bob")))
        self.assertEqual((yield two.counts()), {"members": 1, "pair_keys": 0})

    @defer.inlineCallbacks
    def test_onChange(self):
        """
        C{on_change} callbacks run on the reactor thread for the changes
        other stores made (never for the store's own), after the mirror
        holds them; a revocation reports the pairs it destroyed first.
        """
        one, two = yield self.two_stores()
        seen = []

        def changed(kind, ids):
            seen.append((kind, ids, threadable.isInIOThread()))

        cancel = two.on_change(changed)
        yield two.register(a_member("bob", MAC_2), 10)
        # One change at a time (B would reload changes that come together
        # in one go, and report a pair that is already gone only once).
        yield one.register(a_member("alice", MAC_1), 10)
        yield self.eventually(lambda: two.member("alice"))
        yield one.issue_pair_key(a_pair_key("bob", "alice"), 10)
        yield self.eventually(lambda: two.pair_key("alice", "bob"))
        yield one.issue_group_key(a_group_key())
        yield self.eventually(two.group_key)
        yield one.revoke("alice", "", 1.0)
        expected = [
            ("member", ("alice",), True),
            ("pair", ("alice", "bob"), True),
            ("group", (GROUP_ID,), True),
            ("pair", ("alice", "bob"), True),
            ("revoked", ("alice",), True),
        ]
        yield self.eventually(lambda: len(seen) >= len(expected), what="five changes")
        self.assertEqual(seen, expected)
        cancel()
        yield one.register(a_member("carol", MAC_3), 10)
        yield self.eventually(lambda: two.member("carol"))
        self.assertEqual(len(seen), len(expected))

    @defer.inlineCallbacks
    def test_reloadAfterMissedChanges(self):
        """
        When the listener's connection is cut, changes made meanwhile are
        not lost: once it reconnects the store reloads everything and
        reports the differences.
        """
        one, two = yield self.two_stores()
        seen = []
        two.on_change(lambda kind, ids: seen.append((kind, ids)))
        listener = two._listener
        # Stop delivering notifications to two, as a broken connection would.
        real = listener._changed
        listener._changed = lambda change: None
        alice = yield one.register(a_member("alice", MAC_1), 10)
        yield sleep(0.3)
        self.assertIsNone((yield two.member("alice")))
        listener._changed = real
        self.raw().execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        self.assertEqual((yield self.eventually(lambda: two.member("alice"), what="the reload")), alice)
        self.assertIn(("member", ("alice",)), seen)


class FailureTests(PostgresTestMixin, TestCase):
    """
    A database that fails.
    """

    @defer.inlineCallbacks
    def test_deadlock(self):
        """
        A transaction aborted for a deadlock is tried again, up to three
        times in all, then fails with L{StoreUnavailable}, no key in its
        message, and the mirror unchanged.
        """
        store = yield self.opened()
        calls = []

        def deadlocked(*args):
            calls.append(args)
            raise psycopg.errors.DeadlockDetected("deadlock detected")

        self.patch(store_postgres, "_issue_pair_txn", deadlocked)
        candidate = a_pair_key("alice", "bob")
        e = yield self.assertFailure(store.issue_pair_key(candidate, 10), StoreUnavailable)
        self.assertIn("deadlock detected", str(e))
        self.assertNotIn(candidate.key.material.hex(), str(e))
        self.assertEqual(len(calls), 3)
        self.assertIsNone((yield store.pair_key("alice", "bob")))

    @defer.inlineCallbacks
    def test_lockTimeout(self):
        """
        A write that waits on another transaction's lock past C{busy_timeout}
        fails with L{StoreUnavailable}; it works once the lock is free.
        """
        store = yield self.opened(busy_timeout=0.2)
        other = self.raw(autocommit=False)
        other.execute("LOCK TABLE members IN ACCESS EXCLUSIVE MODE")
        e = yield self.assertFailure(store.register(a_member("alice", MAC_1), 10), StoreUnavailable)
        self.assertIn("lock", str(e))
        self.assertIsNone((yield store.member("alice")))
        other.rollback()
        yield store.register(a_member("alice", MAC_1), 10)

    @defer.inlineCallbacks
    def test_threads(self):
        """
        Writes run off the reactor thread; close stops the database thread
        and the listener, and closes their connections.
        """
        seen = []
        real = store_postgres._register_txn

        def register(*args):
            seen.append(threadable.isInIOThread())
            return real(*args)

        self.patch(store_postgres, "_register_txn", register)
        store = yield self.opened()
        yield store.register(a_member("alice", MAC_1), 10)
        self.assertEqual(seen, [False])
        pool, listener = store._pool, store._listener
        self.assertTrue(listener.is_alive())
        raw = self.raw()
        count = "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid != pg_backend_pid()"
        self.assertEqual(raw.execute(count).fetchone(), (2,))
        yield store.close()
        self.assertFalse(pool.started)
        self.assertFalse(any(thread.is_alive() for thread in pool.threads))
        self.assertFalse(listener.is_alive())
        yield self.eventually(lambda: raw.execute(count).fetchone() == (0,), what="connections closed")


class OutageTests(PostgresTestMixin, TestCase):
    """
    The PostgreSQL server stops and comes back (on a cluster of the test's
    own).
    """

    def make_cluster(self):
        cluster = testing_postgres.PostgreSQLCluster().start()
        self.addCleanup(cluster.destroy)
        return cluster

    @defer.inlineCallbacks
    def test_serverDown(self):
        """
        While the server is down, writes fail with L{StoreUnavailable}
        (no key in the message) and reads answer from the mirror; once it is
        back, writes work again on new connections, and what another key
        server writes reaches the mirror again.
        """
        one, two = yield self.two_stores()
        alice = yield one.register(a_member("alice", MAC_1), 10)
        pair = yield one.issue_pair_key(a_pair_key("alice", "bob"), 10)
        self.cluster.stop_server()
        e = yield self.assertFailure(one.register(a_member("bob", MAC_2), 10), StoreUnavailable)
        self.assertIn(self.dsn, str(e))
        candidate = a_pair_key("alice", "carol")
        e = yield self.assertFailure(two.issue_pair_key(candidate, 10), StoreUnavailable)
        self.assertNotIn(candidate.key.material.hex(), str(e))
        self.assertEqual((yield one.member_by_mac(MAC_1)), alice)
        self.assertEqual((yield one.pair_key("bob", "alice")), pair)
        self.assertIsNone((yield one.member("bob")))
        self.assertIsNone((yield two.pair_key("alice", "carol")))
        self.cluster.start_server()
        bob = yield one.register(a_member("bob", MAC_2), 10)
        carol = yield two.issue_pair_key(a_pair_key("alice", "carol"), 10)
        self.assertEqual((yield self.eventually(lambda: two.member("bob"), what="bob seen by two")), bob)
        self.assertEqual((yield self.eventually(lambda: one.pair_key("alice", "carol"), what="pair seen")), carol)
        dave = yield two.register(a_member("dave", MAC_3), 10)
        self.assertEqual((yield self.eventually(lambda: one.member("dave"), what="dave seen by one")), dave)


class OpenStoreTests(SynchronousTestCase):
    """
    L{open_store} names PostgreSQL stores by URL.
    """

    def test_specs(self):
        """
        C{postgresql://} and C{postgres://} URLs name a PostgreSQL store;
        the reactor, runner and clock reach it; nothing connects yet.
        """
        if store_postgres is None:
            self.fail("psycopg is not installed (pip install '.[postgresql]')")
        reactor_, clock = object(), object()
        for spec in ("postgresql://keys:hunter2@db.example/securelan", "postgres://db.example/securelan"):
            store = open_store(spec, "master.key", reactor=reactor_, runner=run_synchronously, clock=clock)
            self.assertIsInstance(store, PostgreSQLStore)
            self.assertEqual((store.dsn, store.master_key_path), (spec, "master.key"))
            self.assertEqual((store.reactor, store.runner, store.clock), (reactor_, run_synchronously, clock))
            self.assertNotIn("hunter2", repr(store))
            self.assertTrue(IStore.providedBy(store))

    def test_parseChange(self):
        """
        Notifications name a known kind with the right number of IDs, and
        come from another store; anything else is ignored.
        """
        parse = store_postgres._parse_change
        self.assertEqual(parse('{"o":"b","k":"pair","ids":["z","a"]}', "a"), ("pair", ("a", "z")))
        self.assertEqual(parse('{"o":"b","k":"member","ids":["x"]}', "a"), ("member", ("x",)))
        self.assertEqual(
            parse('{"o":"b","k":"foreign","ids":["0A:00:00:00:00:09"]}', "a"), ("foreign", (format_mac(HOST_MAC),))
        )
        for payload in [
            '{"o":"a","k":"member","ids":["x"]}',
            '{"o":"b","k":"member","ids":["x","y"]}',
            '{"o":"b","k":"other","ids":["x"]}',
            '{"o":"b","k":"foreign","ids":["nope"]}',
            '{"o":"b","k":"member","ids":[1]}',
            "not json",
            "[]",
        ]:
            self.assertIsNone(parse(payload, "a"), payload)
