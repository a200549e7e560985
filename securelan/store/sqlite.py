# -*- test-case-name: tests.test_store -*-
"""
The key server's store on SQLite.

Reads are the key server's hot path (every key request resolves a MAC and
looks a pair up), so L{SQLiteStore} keeps a mirror of its tables in memory,
loaded at open, and answers reads from it at once.  Writes go to the
database first, on a thread of their own, and reach the mirror only once
they have committed: a failed write leaves the mirror as it was.

Several processes may share one database file: every write is one
C{BEGIN IMMEDIATE} transaction, and "issue if absent" inserts with
C{ON CONFLICT DO NOTHING} and then returns what the database holds.  Each
process's mirror knows only what it wrote or loaded at open, which is why a
cascade spread over several hosts wants a shared server database instead.

Keys at rest are wrapped under the master key (L{securelan.keys.MasterKey}),
bound to their row.  The schema lives in C{schema/v<N>.sql} (a new database)
and C{schema/upgrade-to-v<N>.sql} (one step from N-1), after the layout of
magic-wormhole-mailbox-server's C{database.py}.
"""

import os
import secrets
import sqlite3
import tempfile
from importlib import resources

from attrs import define, evolve, field
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..logs import logger
from .._interfaces import IStore
from ..addresses import check_mac, format_mac, pair_of, parse_mac
from ..errors import AddressInUse, BadRequest, MacInUse, StoreUnavailable, TableFull
from ..keys import KEY_BYTES, MasterKey, MasterKeyError, SecretKey
from ..records import GROUP_ID, GroupKey, Member, PairKey
from . import StoreOpenError
from .mirror import SharedStore, coalesce, forget_member

__all__ = ["SCHEMA_VERSION", "SQLiteStore", "run_synchronously"]

#: The schema version this code builds, and the newest it can open.
SCHEMA_VERSION = 2

_MEMORY = ":memory:"
_CHECK_NAME = "master_key_check"
_CHECK_CONTEXT = b"securelan master key check"

_log = logger(__name__)


def run_synchronously(f, *args, **kwargs):
    """
    A store runner that does the blocking work at once on the calling
    thread, for tests and command-line tools; never inside a running key
    server, whose reactor it would stall.
    """
    return defer.maybeDeferred(f, *args, **kwargs)


def _read_schema(name):
    return resources.files(__package__).joinpath("schema", name).read_text("utf-8")


def _pair_context(id_a, id_b, epoch):
    return b"pair\0%s\0%s\0%d" % (id_a.encode("utf-8"), id_b.encode("utf-8"), epoch)


def _group_context(group_id, epoch):
    return b"group\0%s\0%d" % (group_id.encode("utf-8"), epoch)


def _remove_quietly(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# Everything from here to SQLiteStore runs on the store's database thread (or
# the caller's, under run_synchronously) and touches no store attribute: the
# mirror belongs to the reactor thread.


def _connect(path, busy_timeout):
    try:
        return sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreOpenError(f"{path}: cannot open database: {e}") from None


def _build_schema(conn, get_master, now):
    """
    Build the latest schema in the empty database C{conn}, in one
    transaction, so it is never seen without its check value.  The master
    key comes from C{get_master()}, called once the schema stands, so that a
    broken schema leaves no new key file behind.
    """
    conn.executescript("BEGIN;\n" + _read_schema(f"v{SCHEMA_VERSION}.sql"))
    master = get_master()
    conn.execute("INSERT INTO version (version) VALUES (?)", (SCHEMA_VERSION,))
    check = master.wrap(SecretKey.generate(), _CHECK_CONTEXT)
    conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)", (_CHECK_NAME, check))
    conn.execute("INSERT INTO meta (name, value) VALUES ('created_at', ?)", (now,))
    conn.execute("COMMIT")
    return master


def _create_database(path, master_key_path, now):
    """
    Build a new database beside C{path} and rename it into place, so that a
    failure leaves nothing at C{path}.  The master key file is made (or
    read) here too.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".creating", dir=directory)
    except OSError as e:
        raise StoreOpenError(f"{path}: cannot create database: {e.strerror}") from None
    os.close(fd)
    try:
        conn = sqlite3.connect(temp, isolation_level=None)
        try:
            _build_schema(conn, lambda: MasterKey.load_or_create(master_key_path, create=True), now)
        finally:
            conn.close()
        os.rename(temp, path)
    except sqlite3.Error as e:
        _remove_quietly(temp)
        raise StoreOpenError(f"{path}: cannot create database: {e}") from None
    except OSError as e:
        _remove_quietly(temp)
        raise StoreOpenError(f"{path}: cannot create database: {e.strerror or e}") from None
    except BaseException:
        _remove_quietly(temp)
        raise
    finally:
        _remove_quietly(temp + "-journal")
    _log.info("created store {path} (schema v{version})", path=path, version=SCHEMA_VERSION)


def _check_database(conn, path, master_key_path):
    """
    Make sure C{conn} is a securelan database this code can read, opened by
    the master key at C{master_key_path}; return its schema version and the
    master key.
    """
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError:
        # Locked, or I/O: a database that cannot be read right now.
        raise
    except sqlite3.DatabaseError as e:
        raise StoreOpenError(f"{path}: not a securelan database ({e})") from None
    if not {"version", "meta"} <= tables:
        raise StoreOpenError(f"{path}: not a securelan database")
    return check_version_and_key(
        path, conn.execute("SELECT version FROM version").fetchall(), SCHEMA_VERSION, master_key_path,
        lambda: conn.execute("SELECT value FROM meta WHERE name = ?", (_CHECK_NAME,)).fetchone())


def check_version_and_key(name, version_rows, schema_version, master_key_path, read_check):
    """
    What both stores check of an existing database: one sane version row,
    not newer than C{schema_version}, and a master key check value (read
    with C{read_check()}) that the master key at C{master_key_path} opens.
    Return the version and the master key.
    """
    if len(version_rows) != 1 or not isinstance(version_rows[0][0], int) or version_rows[0][0] < 1:
        raise StoreOpenError(f"{name}: damaged securelan database (bad version table)")
    version = version_rows[0][0]
    if version > schema_version:
        raise StoreOpenError(
            f"{name}: database schema v{version} is newer than this securelan knows "
            f"(v{schema_version}); run a newer securelan"
        )
    master = MasterKey.load_or_create(master_key_path, create=False)
    row = read_check()
    if row is None or not isinstance(row[0], bytes):
        raise StoreOpenError(f"{name}: damaged securelan database (no master key check value)")
    try:
        master.unwrap(row[0], _CHECK_CONTEXT)
    except MasterKeyError:
        raise MasterKeyError(f"master key {master_key_path} does not match database {name}") from None
    return version, master


def _backup(conn, path, version):
    backup = f"{path}.backup-v{version}"
    temp = None
    try:
        fd, temp = tempfile.mkstemp(prefix=os.path.basename(backup) + ".", dir=os.path.dirname(os.path.abspath(path)))
        os.close(fd)
        copy = sqlite3.connect(temp)
        try:
            conn.backup(copy)
        finally:
            copy.close()
        os.replace(temp, backup)
    except BaseException as e:
        if temp is not None:
            _remove_quietly(temp)
        if isinstance(e, (sqlite3.Error, OSError)):
            raise StoreOpenError(f"{path}: cannot back up to {backup} before upgrading: {e}") from None
        raise
    return backup


def _upgrade(conn, path, version):
    backup = _backup(conn, path, version)
    _log.info(
        "upgrading store {path} from schema v{old} to v{new}; backup in {backup}",
        path=path,
        old=version,
        new=SCHEMA_VERSION,
        backup=backup,
    )
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            script = _read_schema(f"upgrade-to-v{target}.sql")
        except FileNotFoundError:
            raise StoreOpenError(f"{path}: no upgrade from schema v{target - 1} to v{target}") from None
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{script}\nUPDATE version SET version = {target};\nCOMMIT;")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.rollback()
            raise StoreOpenError(
                f"{path}: upgrade to schema v{target} failed ({e}); "
                f"the database stays at v{target - 1}, backup in {backup}"
            ) from None


def _configure(conn, path):
    if path != _MEMORY:
        # WAL lets readers (the CLI, another key server) work beside a writer.
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode != "wal":
            _log.warn("store {path}: journal mode is {mode}, not WAL", path=path, mode=mode)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")


def _pair_key_from_row(master, path, id_a, id_b, epoch, wrapped, created_at, expires_at):
    try:
        key = master.unwrap(wrapped, _pair_context(id_a, id_b, epoch))
    except (MasterKeyError, TypeError):
        raise MasterKeyError(f"{path}: the key of pair ({id_a}, {id_b}) epoch {epoch} does not open") from None
    return PairKey(id_a, id_b, epoch, key, created_at, expires_at)


def _group_key_from_row(master, path, group_id, epoch, wrapped, created_at):
    try:
        key = master.unwrap(wrapped, _group_context(group_id, epoch))
    except (MasterKeyError, TypeError):
        raise MasterKeyError(f"{path}: the key of group {group_id} epoch {epoch} does not open") from None
    return GroupKey(epoch, key, created_at)


_SELECT_PAIR = (
    "SELECT id_a, id_b, epoch, wrapped_key, created_at, expires_at FROM pair_keys WHERE id_a = ? AND id_b = ?"
)
_SELECT_GROUP = "SELECT group_id, epoch, wrapped_key, created_at FROM group_keys WHERE group_id = ?"


@define
class _Opened:
    """
    What opening hands from the database thread to the reactor thread.
    """

    conn: sqlite3.Connection
    master: MasterKey
    version: int
    members: list
    pair_keys: list
    group_key: GroupKey | None
    revoked: set
    foreign: dict


def _load(conn, path, master, version):
    addresses = {}
    for address, member_id in conn.execute("SELECT address, member_id FROM member_addresses"):
        addresses.setdefault(member_id, []).append(address)
    members = [
        Member(member_id, role, parse_mac(mac), endpoint, registered_at, incarnation,
               addresses.get(member_id, ()))
        for member_id, role, mac, endpoint, registered_at, incarnation in conn.execute(
            "SELECT member_id, role, mac, endpoint, registered_at, incarnation FROM members"
        )
    ]
    pair_keys = [
        _pair_key_from_row(master, path, *row)
        for row in conn.execute("SELECT id_a, id_b, epoch, wrapped_key, created_at, expires_at FROM pair_keys")
    ]
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    group_key = None if row is None else _group_key_from_row(master, path, *row)
    revoked = {member_id for (member_id,) in conn.execute("SELECT DISTINCT member_id FROM revoked")}
    foreign = {parse_mac(mac): (gateway_id, expires_at) for mac, gateway_id, expires_at in conn.execute(
        "SELECT mac, gateway_id, expires_at FROM foreign_macs")}
    return _Opened(conn, master, version, members, pair_keys, group_key, revoked, foreign)


def _open_database(path, master_key_path, now, busy_timeout):
    """
    Create, or check and upgrade, the database at C{path}; return it loaded.
    """
    if path == _MEMORY:
        if master_key_path is None:
            master = MasterKey(secrets.token_bytes(KEY_BYTES))
        else:
            master = MasterKey.load_or_create(master_key_path, create=True)
        conn = _connect(path, busy_timeout)
        try:
            _build_schema(conn, lambda: master, now)
            _configure(conn, path)
            return _load(conn, path, master, SCHEMA_VERSION)
        except sqlite3.Error as e:
            conn.close()
            raise StoreOpenError(f"{path}: cannot create database: {e}") from None
        except BaseException:
            conn.close()
            raise
    if master_key_path is None:
        raise StoreOpenError(f"{path}: a database file needs a master key file")
    if not os.path.exists(path):
        _create_database(path, master_key_path, now)
    conn = _connect(path, busy_timeout)
    try:
        version, master = _check_database(conn, path, master_key_path)
        if version < SCHEMA_VERSION:
            _upgrade(conn, path, version)
        _configure(conn, path)
        return _load(conn, path, master, SCHEMA_VERSION)
    except sqlite3.Error as e:
        conn.close()
        raise StoreOpenError(f"{path}: cannot open database: {e}") from None
    except BaseException:
        conn.close()
        raise


def _close_database(conn, path):
    try:
        conn.close()
    except sqlite3.Error as e:
        raise StoreUnavailable(f"store {path}: closing failed: {e}") from None


def _transact(conn, path, work, *args):
    """
    Run C{work(conn, *args)} in one write transaction.  A database failure
    becomes L{StoreUnavailable}, whose message carries sqlite's own (which
    never quotes bound values, hence no key material).
    """
    try:
        # IMMEDIATE takes the write lock up front, so the reads that decide a
        # write (is the MAC taken, is the table full) cannot go stale under
        # another process.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        raise StoreUnavailable(f"store {path} failed: {e}") from None
    return result


#: Incarnations stay below this, so they fit the wire's 32 bits with room.
MAX_INCARNATION = 2**31


def _register_txn(conn, member, max_members):
    mac = format_mac(check_mac(member.mac))
    holder = conn.execute("SELECT member_id FROM members WHERE mac = ?", (mac,)).fetchone()
    if holder is not None and holder[0] != member.member_id:
        raise MacInUse(f"{mac} is registered to another member")
    for address in member.addresses:
        holder = conn.execute("SELECT member_id FROM member_addresses WHERE address = ?", (address,)).fetchone()
        if holder is not None and holder[0] != member.member_id:
            raise AddressInUse(f"{address} is registered to another member")
    known = conn.execute(
        "SELECT incarnation FROM members WHERE member_id = ?", (member.member_id,)
    ).fetchone()
    if known is None:
        (count,) = conn.execute("SELECT COUNT(*) FROM members").fetchone()
        if count >= max_members:
            raise TableFull(f"the member registry is full ({max_members} members)")
    stored = known[0] if known else 0
    claimed = member.incarnation
    # An agent that reconnects keeps the incarnation it is using (it is the
    # latest, or the store was restored from a backup behind it); anything
    # else gets a new, higher one.
    incarnation = claimed if claimed and claimed >= stored else stored + 1
    if incarnation >= MAX_INCARNATION:
        raise BadRequest(f"incarnation {incarnation} is out of range")
    member = evolve(member, incarnation=incarnation)
    conn.execute(
        "INSERT INTO members (member_id, role, mac, endpoint, registered_at, last_seen, incarnation)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (member_id) DO UPDATE SET role = excluded.role, mac = excluded.mac,"
        " endpoint = excluded.endpoint, registered_at = excluded.registered_at,"
        " last_seen = excluded.last_seen, incarnation = excluded.incarnation",
        (member.member_id, member.role, mac, member.endpoint, member.registered_at,
         member.registered_at, member.incarnation),
    )
    conn.execute("DELETE FROM member_addresses WHERE member_id = ?", (member.member_id,))
    conn.executemany("INSERT INTO member_addresses (address, member_id) VALUES (?, ?)",
                     [(address, member.member_id) for address in member.addresses])
    return member


def _issue_pair_txn(conn, path, master, candidate, max_pair_keys):
    # The cap is checked against the mirror before the write (one process
    # owns a SQLite store): no table scan per key here.  The mirror also
    # says the pair has no key yet, so the insert comes first (no SELECT
    # per key); DO NOTHING, then SELECT: whoever inserted first wins, and
    # every process returns the winner.
    wrapped = master.wrap(candidate.key, _pair_context(candidate.id_a, candidate.id_b, candidate.epoch))
    inserted = conn.execute(
        "INSERT INTO pair_keys (id_a, id_b, epoch, wrapped_key, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id_a, id_b) DO NOTHING",
        (candidate.id_a, candidate.id_b, candidate.epoch, wrapped, candidate.created_at, candidate.expires_at),
    ).rowcount
    if inserted == 1:
        # Ours went in: the row is the candidate (no read-back, no unwrap).
        return candidate
    row = conn.execute(_SELECT_PAIR, (candidate.id_a, candidate.id_b)).fetchone()
    return _pair_key_from_row(master, path, *row)


def _issue_pairs_txn(conn, path, master, candidates):
    """
    L{_issue_pair_txn} for every candidate, in the one transaction.
    """
    return [_issue_pair_txn(conn, path, master, candidate, None) for candidate in candidates]


def _issue_group_txn(conn, path, master, candidate):
    wrapped = master.wrap(candidate.key, _group_context(GROUP_ID, candidate.epoch))
    conn.execute(
        "INSERT INTO group_keys (group_id, epoch, wrapped_key, created_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO NOTHING",
        (GROUP_ID, candidate.epoch, wrapped, candidate.created_at),
    )
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    return _group_key_from_row(master, path, *row)


def _rekey_pair_txn(conn, path, master, candidate):
    wrapped = master.wrap(candidate.key, _pair_context(candidate.id_a, candidate.id_b, candidate.epoch))
    # Only forward: a key server that lost a race (another one rekeyed the
    # pair first) gets the winner's key back.
    conn.execute(
        "UPDATE pair_keys SET epoch = ?, wrapped_key = ?, created_at = ?, expires_at = ?"
        " WHERE id_a = ? AND id_b = ? AND epoch < ?",
        (candidate.epoch, wrapped, candidate.created_at, candidate.expires_at,
         candidate.id_a, candidate.id_b, candidate.epoch),
    )
    row = conn.execute(_SELECT_PAIR, (candidate.id_a, candidate.id_b)).fetchone()
    return None if row is None else _pair_key_from_row(master, path, *row)


def _bind_foreign_txn(conn, mac, gateway_id, now, expires_at, max_foreign):
    text = format_mac(mac)
    row = conn.execute("SELECT gateway_id, expires_at FROM foreign_macs WHERE mac = ?", (text,)).fetchone()
    if row is not None and (row[1] == 0 or row[1] > now):
        # Bound already (by this key server or another): keep it.
        return row[0], row[1]
    conn.execute("DELETE FROM foreign_macs WHERE expires_at != 0 AND expires_at <= ?", (now,))
    (count,) = conn.execute("SELECT COUNT(*) FROM foreign_macs").fetchone()
    if count >= max_foreign:
        raise TableFull(f"the table of MACs behind gateways is full ({max_foreign})")
    conn.execute(
        "INSERT INTO foreign_macs (mac, gateway_id, learned_at, expires_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (mac) DO UPDATE SET gateway_id = excluded.gateway_id,"
        " learned_at = excluded.learned_at, expires_at = excluded.expires_at",
        (text, gateway_id, now, expires_at),
    )
    return gateway_id, expires_at


def _revoke_txn(conn, path, master, member_id, reason, now):
    conn.execute(
        "INSERT INTO revoked (member_id, serial, revoked_at, reason) VALUES (?, '', ?, ?)"
        " ON CONFLICT (member_id, serial) DO NOTHING",
        (member_id, now, reason),
    )
    rows = conn.execute(
        "SELECT id_a, id_b, epoch, wrapped_key, created_at, expires_at FROM pair_keys"
        " WHERE id_a = ? OR id_b = ?",
        (member_id, member_id),
    ).fetchall()
    destroyed = [_pair_key_from_row(master, path, *row) for row in rows]
    conn.execute("DELETE FROM pair_keys WHERE id_a = ? OR id_b = ?", (member_id, member_id))
    conn.execute("DELETE FROM foreign_macs WHERE gateway_id = ?", (member_id,))
    conn.execute("DELETE FROM member_addresses WHERE member_id = ?", (member_id,))
    conn.execute("DELETE FROM members WHERE member_id = ?", (member_id,))
    return destroyed


def _rekey_group_txn(conn, path, master, candidate):
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    if row is not None and row[1] >= candidate.epoch:
        # Another key server rekeyed first: keep its key.
        return _group_key_from_row(master, path, *row)
    wrapped = master.wrap(candidate.key, _group_context(GROUP_ID, candidate.epoch))
    conn.execute(
        "INSERT INTO group_keys (group_id, epoch, wrapped_key, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (group_id) DO UPDATE SET epoch = excluded.epoch,"
        " wrapped_key = excluded.wrapped_key, created_at = excluded.created_at",
        (GROUP_ID, candidate.epoch, wrapped, candidate.created_at),
    )
    return candidate


@implementer(IStore)
@define(eq=False)
class SQLiteStore(SharedStore):
    """
    An L{IStore} on one SQLite file (or C{":memory:"}).

    @ivar path: the database file, or C{":memory:"}.
    @ivar master_key_path: the master key file, made beside a new database
        (mode 0600) and required by an existing one.  None for
        C{":memory:"} means a fresh random master key.
    @ivar reactor: the reactor that receives results from the database
        thread; the global one by default.
    @ivar runner: C{runner(f, *args) -> Deferred} runs the blocking work
        instead of the store's own single-thread pool; see
        L{run_synchronously}.
    @ivar clock: an L{IReactorTime} for the store's own timestamps.
    @ivar busy_timeout: how long a write waits for another process's lock
        before failing with L{StoreUnavailable}.

    Call C{close()} only once C{open()} has fired.  Reads answer from the
    mirror even after close.
    """

    path: str
    master_key_path: str | None
    reactor: object = field(default=None, repr=False)
    runner: object = field(default=None, repr=False)
    clock: object = field(default=None, repr=False)
    busy_timeout: float = field(default=5.0, kw_only=True, repr=False)

    _conn: sqlite3.Connection | None = field(init=False, default=None, repr=False)
    _master: MasterKey | None = field(init=False, default=None, repr=False)
    _pool: ThreadPool | None = field(init=False, default=None, repr=False)
    _pool_reactor: object = field(init=False, default=None, repr=False)
    _shutdown_trigger: object = field(init=False, default=None, repr=False)
    _members: dict = field(init=False, factory=dict, repr=False)
    _by_mac: dict = field(init=False, factory=dict, repr=False)
    _by_address: dict = field(init=False, factory=dict, repr=False)
    _pair_keys: dict = field(init=False, factory=dict, repr=False)
    #: member ID -> the pairs (id_a, id_b) it is part of.
    _pairs_of: dict = field(init=False, factory=dict, repr=False)
    _group_key: GroupKey | None = field(init=False, default=None, repr=False)
    _revoked: set = field(init=False, factory=set, repr=False)
    #: MAC -> (gateway ID, expires_at): the MACs that gateways front.
    _foreign: dict = field(init=False, factory=dict, repr=False)
    #: Writes under way that later callers join rather than repeat.
    _in_flight: dict = field(init=False, factory=dict, repr=False)
    #: (candidate, Deferred) of the new pair keys for the next transaction.
    _pair_batch: list = field(init=False, factory=list, repr=False)
    _pair_batch_running: bool = field(init=False, default=False, repr=False)
    _pairs_issuing: int = field(init=False, default=0, repr=False)

    # Life cycle

    def open(self):
        if self._conn is not None or self._pool is not None:
            return defer.fail(StoreOpenError(f"{self.path}: store is already open"))
        if self.runner is None:
            if self.reactor is None:
                from twisted.internet import reactor
            else:
                reactor = self.reactor
            self._pool_reactor = reactor
            self._pool = ThreadPool(1, 1, name=f"securelan-store {self.path}")
            self._pool.start()
            # Pool threads are not daemons: an unclosed store would hang the
            # process at exit.
            self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        d = self._run(_open_database, self.path, self.master_key_path, self._now(), self.busy_timeout)
        d.addCallbacks(self._opened, self._open_failed)
        return d

    def _opened(self, opened):
        self._conn = opened.conn
        self._master = opened.master
        self._members = {m.member_id: m for m in opened.members}
        self._by_mac = {m.mac: m for m in opened.members}
        self._by_address = {a: m for m in opened.members for a in m.addresses}
        self._pair_keys = {}
        self._pairs_of = {}
        for pair_key in opened.pair_keys:
            self._remember_pair(pair_key)
        self._group_key = opened.group_key
        self._revoked = set(opened.revoked)
        self._foreign = dict(opened.foreign)
        _log.info(
            "opened store {path} (schema v{version}, {members} members, {pair_keys} pair keys)",
            path=self.path,
            version=opened.version,
            members=len(self._members),
            pair_keys=len(self._pair_keys),
        )

    def _open_failed(self, failure):
        self._stop_pool()
        return failure

    def close(self):
        conn, self._conn = self._conn, None
        if conn is None:
            self._stop_pool()
            return defer.succeed(None)
        d = self._run(_close_database, conn, self.path)

        def stopped(result):
            self._stop_pool()
            return result

        d.addBoth(stopped)
        d.addCallback(lambda _: None)
        return d

    def _shutdown(self):
        pool, self._pool = self._pool, None
        self._shutdown_trigger = None
        conn, self._conn = self._conn, None
        if pool is not None:
            if conn is not None:
                pool.callInThread(conn.close)
            pool.stop()

    # Writes

    def _write(self, work, *args):
        if self._conn is None:
            return defer.fail(StoreUnavailable(f"store {self.path} is not open"))
        return self._run(_transact, self._conn, self.path, work, *args)

    def register(self, member, max_members):
        d = self._write(_register_txn, member, max_members)
        d.addCallback(self._registered)
        return d

    def _registered(self, member):
        previous = self._members.get(member.member_id)
        if previous is not None:
            forget_member(self._by_mac, self._by_address, previous)
        self._members[member.member_id] = member
        self._by_mac[member.mac] = member
        for address in member.addresses:
            self._by_address[address] = member
        return member

    def issue_pair_key(self, candidate, max_pair_keys):
        pair = pair_of(candidate.id_a, candidate.id_b)
        held = self._pair_keys.get(pair)
        if held is not None:
            return defer.succeed(held)
        if pair != (candidate.id_a, candidate.id_b):
            candidate = evolve(candidate, id_a=pair[0], id_b=pair[1])
        if ("pair",) + pair not in self._in_flight and len(self._pair_keys) + self._pairs_issuing >= max_pair_keys:
            return defer.fail(TableFull(f"the pair-key table is full ({max_pair_keys} keys)"))
        return coalesce(self._in_flight, ("pair",) + pair, lambda: self._issue_in_batch(candidate))

    def _issue_in_batch(self, candidate):
        """
        Issue C{candidate} in the next write transaction that issues pair
        keys: one starts at once when none is under way; the keys asked for
        meanwhile all go into the one after it (a group commit), so a burst
        of new pairs costs a transaction per burst, not per key.
        """
        d = defer.Deferred()
        self._pair_batch.append((candidate, d))
        # Counted, not looked for among the writes in flight: the table's
        # bound is checked for every new pair.
        self._pairs_issuing += 1
        if not self._pair_batch_running:
            self._issue_batch()
        return d

    def _issue_batch(self):
        batch, self._pair_batch = self._pair_batch, []
        self._pair_batch_running = True

        def done(result):
            # Still running while the callers hear: what they ask for now
            # joins the next batch, which starts after.
            if isinstance(result, Failure):
                self._pairs_issuing -= len(batch)
                for _, d in batch:
                    d.errback(result)
            else:
                for (_, d), pair_key in zip(batch, result):
                    pair_key = self._pair_issued(pair_key)
                    self._pairs_issuing -= 1
                    d.callback(pair_key)
            self._pair_batch_running = False
            if self._pair_batch:
                self._issue_batch()

        self._write(_issue_pairs_txn, self.path, self._master, [candidate for candidate, _ in batch]).addBoth(done)

    def issue_group_key(self, candidate):
        if self._group_key is not None:
            return defer.succeed(self._group_key)
        return self._coalesced(("group",), self._group_issued, _issue_group_txn, self.path, self._master, candidate)

    def rekey_pair(self, candidate):
        def stored(pair_key):
            if pair_key is not None:
                self._remember_pair(pair_key)
            return pair_key

        return self._write(_rekey_pair_txn, self.path, self._master, candidate).addCallback(stored)

    def rekey_group(self, candidate):
        return self._write(_rekey_group_txn, self.path, self._master, candidate).addCallback(self._group_issued)

    def revoke(self, member_id, reason, now):
        d = self._write(_revoke_txn, self.path, self._master, member_id, reason, now)

        def revoked(destroyed):
            self._revoked.add(member_id)
            self._foreign = {m: v for m, v in self._foreign.items() if v[0] != member_id}
            member = self._members.pop(member_id, None)
            if member is not None:
                forget_member(self._by_mac, self._by_address, member)
            for pair in self._pairs_of.pop(member_id, set()):
                self._pair_keys.pop(pair, None)
                other = pair[1] if pair[0] == member_id else pair[0]
                self._pairs_of.get(other, set()).discard(pair)
            return destroyed

        return d.addCallback(revoked)

    def bind_foreign_mac(self, mac, gateway_id, now, expires_at, max_foreign):
        if len(self._foreign) >= max_foreign:
            # Forget expired bindings before the database refuses.
            self._foreign = {m: v for m, v in self._foreign.items() if not v[1] or v[1] > now}
        d = self._write(_bind_foreign_txn, mac, gateway_id, now, expires_at, max_foreign)

        def bound(result):
            self._foreign[mac] = result
            return result[0]

        return d.addCallback(bound)
