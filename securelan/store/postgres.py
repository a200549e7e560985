# -*- test-case-name: tests.test_store_postgres -*-
"""
The key server's store on PostgreSQL: one store for a cascade of key servers.

Several key servers of one subnet (the seed's cascade port) open one
database, so that any of them can answer any member.  L{PostgreSQLStore} has
the semantics of L{securelan.store.sqlite.SQLiteStore}, across processes and
hosts:

  - "Issue if absent" (pair keys, the group key) is C{INSERT ... ON CONFLICT
    DO NOTHING} then C{SELECT}, in one transaction: two key servers asked for
    a new pair at the same moment both hand out the key that committed first.
  - A registration is one atomic upsert whose C{RETURNING} gives the
    incarnation, so two registrations never get the same new incarnation;
    the MAC's C{UNIQUE} constraint settles a race for a MAC (L{MacInUse}).
  - A registration or a new pair key and a revocation of the same member,
    through two key servers at once, do not cross: the write waits for the
    revocation (or the other way round) on an advisory lock, and a member
    revoked meanwhile is refused with L{NotPermitted}, so no revoked member
    comes back nor gets a new key because a mirror was a moment behind.
  - The table caps (C{max_members}, C{max_pair_keys}) are counted inside the
    write transaction, without a table lock: key servers racing at the cap
    may overshoot it by one entry each.

Reads are answered at once from a mirror of the tables in memory, as in
SQLite.  Each write transaction also sends a C{NOTIFY} on the channel
L{CHANNEL} with a small JSON payload naming what changed (a member, a pair,
the group, a revoked member, a MAC behind a gateway) and the store instance
that changed it; every store listens on a connection of its own, in a
thread, and reloads the named entries.  Writes and reloads run one after another on the store's single
database thread, and their results reach the mirror in that same order, so
a reload never puts back an older state over a newer one.  When the listener
loses the database, changes may have been missed: once it is back, the
store reloads everything and reports the differences.  L{on_change} lets
the key server learn of changes that other key servers made.

Keys at rest are wrapped under the master key exactly as in SQLite (same
associated data), and the schema is the SQLite one in PostgreSQL types
(C{schema/postgres-v<N>.sql}; upgrades in
C{schema/postgres-upgrade-to-v<N>.sql}, run in one transaction).

A database failure (refused connection, server gone, deadlock, lock wait
past C{busy_timeout}) is L{StoreUnavailable}, whose message carries
PostgreSQL's primary message only (never a bound value, hence no key
material) and never the DSN's password; the mirror is left as it was, and
the next operation connects again.
"""

import json
import re
import secrets
import threading
from importlib import resources

from attrs import define, evolve, field
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

try:
    import psycopg
    from psycopg import errors as pg_errors
except ImportError:  # pragma: no cover - reported when a store is made
    psycopg = None
    pg_errors = None

from ..logs import logger
from .._interfaces import IStore
from ..addresses import check_mac, format_mac, pair_of, parse_mac
from ..errors import AddressInUse, BadRequest, MacInUse, NotPermitted, StoreUnavailable, TableFull
from ..keys import MasterKey, MasterKeyError, SecretKey
from ..records import GROUP_ID, GroupKey, Member, PairKey
from . import StoreOpenError
from .mirror import SharedStore, forget_member
from .sqlite import (
    _CHECK_CONTEXT,
    _CHECK_NAME,
    MAX_INCARNATION,
    _group_context,
    _pair_context,
    check_version_and_key,
)

__all__ = ["CHANNEL", "KINDS", "SCHEMA_VERSION", "PostgreSQLStore"]

#: The schema version this code builds, and the newest it can open.
SCHEMA_VERSION = 2

#: The NOTIFY channel on which every write names what it changed.
CHANNEL = "securelan_changes"

#: What a change names, and how many IDs it carries: a member (its ID), a
#: pair (the canonical pair), the group key (the group ID), a revocation
#: (the member ID), a MAC behind a gateway (the MAC in colon form).
KINDS = {"member": 1, "pair": 2, "group": 1, "revoked": 1, "foreign": 1}

#: Key of the advisory lock that serializes opening (so that two key
#: servers starting on an empty database build the schema once).
_OPEN_LOCK = 0x736563756C616E31  # "seculan1"

#: Class of the advisory locks that keep a revocation and a write for the
#: same member (a registration, a new pair key) from crossing.
_MEMBER_LOCKS = 0x736C616E  # "slan"

#: A transaction that PostgreSQL aborted for a deadlock or a serialization
#: failure is run again up to this many times in all.
_ATTEMPTS = 3

#: How long the listener waits for notifications before it looks whether
#: it should stop; how long it waits between reconnections (doubling).
_LISTEN_POLL = 0.25
_RETRY_MIN = 0.25
_RETRY_MAX = 2.0

_log = logger(__name__)

_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^@/]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)
_KV_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(dsn):
    """
    C{dsn} without its password, fit for messages and logs.
    """
    dsn = _URL_PASSWORD.sub(r"\1:***@", dsn)
    dsn = _QUERY_PASSWORD.sub(r"\1***", dsn)
    return _KV_PASSWORD.sub(r"\1***", dsn)


def _describe(e):
    """
    What went wrong, in words safe to show: PostgreSQL's primary message and
    SQLSTATE (its DETAIL may quote a row's values), or libpq's first line.
    """
    diag = getattr(e, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    if primary:
        state = getattr(e, "sqlstate", None)
        return f"{primary} ({state})" if state else primary
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _unavailable(message, resync=False):
    e = StoreUnavailable(message)
    #: The write may have committed unseen (the connection broke while
    #: committing): the store reloads its mirror.
    e.resync = resync
    return e


def _read_schema(name):
    return resources.files(__package__).joinpath("schema", name).read_text("utf-8")


def _notify(conn, origin, kind, ids):
    payload = json.dumps({"o": origin, "k": kind, "ids": list(ids)}, separators=(",", ":"))
    conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def _parse_change(payload, origin):
    """
    The change that a notification's payload names, as C{(kind, ids)}; None
    for the store's own changes and for payloads it cannot read.
    """
    try:
        change = json.loads(payload)
        sender, kind, ids = change["o"], change["k"], change["ids"]
    except (ValueError, TypeError, KeyError):
        return None
    if sender == origin or KINDS.get(kind) is None:
        return None
    if not isinstance(ids, list) or len(ids) != KINDS[kind] or not all(isinstance(i, str) for i in ids):
        return None
    if kind == "pair":
        return kind, pair_of(ids[0], ids[1])
    if kind == "foreign":
        try:
            return kind, (format_mac(parse_mac(ids[0])),)
        except ValueError:
            return None
    return kind, tuple(ids)


# Everything from here to _Listener runs on the store's database thread (or
# the caller's, under a runner) and touches no store attribute: the mirror
# belongs to the reactor thread.


class _Database:
    """
    The store's connection, owned by its database thread: made on first
    use, made again after it broke.
    """

    def __init__(self, dsn, name, busy_timeout, connect_timeout):
        self.dsn = dsn
        self.name = name
        self.busy_timeout = busy_timeout
        self.connect_timeout = connect_timeout
        self.conn = None

    def connect(self, autocommit=False):
        conn = psycopg.connect(
            self.dsn,
            autocommit=autocommit,
            connect_timeout=max(1, int(round(self.connect_timeout))),
            application_name="securelan",
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        )
        try:
            # A write waiting on another key server's row lock gives up after
            # busy_timeout, as SQLite's does.
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self.busy_timeout * 1000)}ms",))
            if not autocommit:
                conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def connection(self):
        conn = self.conn
        if conn is None or conn.closed or conn.broken:
            self.close()
            conn = self.conn = self.connect()
        return conn

    def close(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _abandon(self, conn):
        """
        End the failed transaction of C{conn}; drop C{conn} if it is broken.
        """
        if not (conn.closed or conn.broken):
            try:
                conn.rollback()
                return
            except psycopg.Error:
                pass
        if self.conn is conn:
            self.close()

    def transact(self, work, *args):
        """
        Run C{work(conn, *args)} in one transaction and commit.  A
        transaction that failed before its commit on a connection that
        broke (the server restarted since its last use) is run again once
        on a new connection; one aborted by a deadlock, up to L{_ATTEMPTS}
        times.  Every other database failure is L{StoreUnavailable}.
        """
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = self.connection()
            except psycopg.Error as e:
                raise _unavailable(f"store {self.name}: cannot connect: {_describe(e)}") from None
            committing = False
            try:
                result = work(conn, *args)
                committing = True
                conn.commit()
                return result
            except psycopg.Error as e:
                self._abandon(conn)
                broken = conn.closed or conn.broken
                if broken and committing:
                    raise _unavailable(
                        f"store {self.name} failed while committing: {_describe(e)}", resync=True
                    ) from None
                retry = (broken and attempt == 1) or (
                    isinstance(e, (pg_errors.DeadlockDetected, pg_errors.SerializationFailure))
                    and attempt < _ATTEMPTS
                )
                if retry:
                    continue
                raise _unavailable(f"store {self.name} failed: {_describe(e)}") from None
            except BaseException:
                self._abandon(conn)
                raise


def _pair_key_from_row(master, name, id_a, id_b, epoch, wrapped, created_at, expires_at):
    try:
        key = master.unwrap(bytes(wrapped), _pair_context(id_a, id_b, epoch))
    except (MasterKeyError, TypeError):
        raise MasterKeyError(f"{name}: the key of pair ({id_a}, {id_b}) epoch {epoch} does not open") from None
    return PairKey(id_a, id_b, epoch, key, created_at, expires_at)


def _group_key_from_row(master, name, group_id, epoch, wrapped, created_at):
    try:
        key = master.unwrap(bytes(wrapped), _group_context(group_id, epoch))
    except (MasterKeyError, TypeError):
        raise MasterKeyError(f"{name}: the key of group {group_id} epoch {epoch} does not open") from None
    return GroupKey(epoch, key, created_at)


def _member_from_row(member_id, role, mac, endpoint, registered_at, incarnation, addresses):
    return Member(member_id, role, parse_mac(mac), endpoint, registered_at, incarnation, addresses)


_MEMBER_COLUMNS = ("member_id, role, mac, endpoint, registered_at, incarnation, ARRAY(SELECT a.address"
                   " FROM member_addresses a WHERE a.member_id = members.member_id ORDER BY a.address)")
_PAIR_COLUMNS = "id_a, id_b, epoch, wrapped_key, created_at, expires_at"
_SELECT_MEMBER = f"SELECT {_MEMBER_COLUMNS} FROM members WHERE member_id = %s"
_SELECT_PAIR = f"SELECT {_PAIR_COLUMNS} FROM pair_keys WHERE id_a = %s AND id_b = %s"
_SELECT_PAIRS_OF = f"SELECT {_PAIR_COLUMNS} FROM pair_keys WHERE id_a = %s OR id_b = %s"
_SELECT_GROUP = "SELECT group_id, epoch, wrapped_key, created_at FROM group_keys WHERE group_id = %s"
_SELECT_FOREIGN = "SELECT gateway_id, expires_at FROM foreign_macs WHERE mac = %s"


@define
class _Loaded:
    """
    Every table the mirror holds, read in one snapshot.
    """

    members: list
    pair_keys: list
    group_key: GroupKey | None
    revoked: set
    #: MAC (6 bytes) -> (gateway ID, expires_at).
    foreign: dict


@define
class _Opened:
    """
    What opening hands from the database thread to the reactor thread.
    """

    master: MasterKey
    version: int
    loaded: _Loaded
    listener_conn: object


def _load_txn(conn, name, master):
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    members = [_member_from_row(*row) for row in conn.execute(f"SELECT {_MEMBER_COLUMNS} FROM members")]
    pair_keys = [
        _pair_key_from_row(master, name, *row) for row in conn.execute(f"SELECT {_PAIR_COLUMNS} FROM pair_keys")
    ]
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    group_key = None if row is None else _group_key_from_row(master, name, *row)
    revoked = {member_id for (member_id,) in conn.execute("SELECT DISTINCT member_id FROM revoked")}
    foreign = {
        parse_mac(mac): (gateway_id, expires_at)
        for mac, gateway_id, expires_at in conn.execute("SELECT mac, gateway_id, expires_at FROM foreign_macs")
    }
    return _Loaded(members, pair_keys, group_key, revoked, foreign)


def _fetch_txn(conn, name, master, changes):
    """
    The database's current state of each change's entries, in order.
    """
    results = []
    for kind, ids in changes:
        if kind == "member":
            row = conn.execute(_SELECT_MEMBER, ids).fetchone()
            results.append(None if row is None else _member_from_row(*row))
        elif kind == "pair":
            row = conn.execute(_SELECT_PAIR, ids).fetchone()
            results.append(None if row is None else _pair_key_from_row(master, name, *row))
        elif kind == "group":
            row = conn.execute(_SELECT_GROUP, ids).fetchone()
            results.append(None if row is None else _group_key_from_row(master, name, *row))
        elif kind == "foreign":
            row = conn.execute(_SELECT_FOREIGN, ids).fetchone()
            results.append(None if row is None else tuple(row))
        else:  # revoked
            (member_id,) = ids
            row = conn.execute(_SELECT_MEMBER, ids).fetchone()
            member = None if row is None else _member_from_row(*row)
            pairs = [_pair_key_from_row(master, name, *r) for r in conn.execute(_SELECT_PAIRS_OF, (member_id,) * 2)]
            revoked = conn.execute("SELECT 1 FROM revoked WHERE member_id = %s LIMIT 1", ids).fetchone() is not None
            results.append((member, pairs, revoked))
    return results


def _prepare_txn(conn, name, master_key_path, now):
    """
    Build the schema in an empty database, or check (and upgrade) an
    existing one; return its version and the master key.
    """
    # Two key servers opening an empty database at once build it once.
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_OPEN_LOCK,))
    has_version, has_meta = conn.execute(
        "SELECT to_regclass('version') IS NOT NULL, to_regclass('meta') IS NOT NULL"
    ).fetchone()
    if not has_version and not has_meta:
        conn.execute(_read_schema(f"postgres-v{SCHEMA_VERSION}.sql"))
        # The master key file is made only once the schema stands.
        master = MasterKey.load_or_create(master_key_path, create=True)
        conn.execute("INSERT INTO version (version) VALUES (%s)", (SCHEMA_VERSION,))
        check = master.wrap(SecretKey.generate(), _CHECK_CONTEXT)
        conn.execute("INSERT INTO meta (name, value) VALUES (%s, %s)", (_CHECK_NAME, check))
        conn.execute("INSERT INTO meta (name, value) VALUES ('created_at', %s)", (repr(float(now)).encode(),))
        _log.info("created store {name} (schema v{version})", name=name, version=SCHEMA_VERSION)
        return SCHEMA_VERSION, master
    if not (has_version and has_meta):
        raise StoreOpenError(f"{name}: not a securelan database")
    version, master = check_version_and_key(
        name, conn.execute("SELECT version FROM version").fetchall(), SCHEMA_VERSION, master_key_path,
        lambda: conn.execute("SELECT value FROM meta WHERE name = %s", (_CHECK_NAME,)).fetchone())
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            script = _read_schema(f"postgres-upgrade-to-v{target}.sql")
        except FileNotFoundError:
            raise StoreOpenError(f"{name}: no upgrade from schema v{target - 1} to v{target}") from None
        try:
            conn.execute(script)
            conn.execute("UPDATE version SET version = %s", (target,))
        except psycopg.Error as e:
            raise StoreOpenError(
                f"{name}: upgrade to schema v{target} failed ({_describe(e)}); the database stays at v{version}"
            ) from None
        _log.info("upgraded store {name} to schema v{version}", name=name, version=target)
    return SCHEMA_VERSION, master


def _open_database(db, master_key_path, now, listen):
    """
    Connect (and start listening, before anything is read, so no change
    slips between), build or check the database, and load it.
    """
    listener_conn = None
    try:
        conn = db.connection()
        if listen:
            listener_conn = db.connect(autocommit=True)
            listener_conn.execute(f"LISTEN {CHANNEL}")
        try:
            version, master = _prepare_txn(conn, db.name, master_key_path, now)
            conn.commit()
        except BaseException:
            db._abandon(conn)
            raise
        loaded = db.transact(_load_txn, db.name, master)
        return _Opened(master, version, loaded, listener_conn)
    except BaseException as e:
        if listener_conn is not None:
            listener_conn.close()
        db.close()
        if isinstance(e, psycopg.Error):
            raise StoreOpenError(f"{db.name}: cannot open database: {_describe(e)}") from None
        if isinstance(e, StoreUnavailable):
            raise StoreOpenError(f"{db.name}: cannot open database: {e}") from None
        raise


def _close_database(db, listener):
    if listener is not None:
        listener.join(10 * _LISTEN_POLL + 5)
    db.close()


def _not_revoked(conn, member_ids):
    """
    Hold off revocations of C{member_ids} until this transaction ends, then
    refuse if one was revoked already.
    """
    conn.execute(
        "SELECT pg_advisory_xact_lock_shared(%s::integer, hashtext(m)) FROM unnest(%s::text[]) AS m",
        (_MEMBER_LOCKS, list(member_ids)),
    )
    # A statement of its own: its snapshot is taken once the locks are held.
    row = conn.execute(
        "SELECT member_id FROM revoked WHERE member_id = ANY(%s::text[]) LIMIT 1", (list(member_ids),)
    ).fetchone()
    if row is not None:
        raise NotPermitted(f"member {row[0]} is revoked")


def _register_txn(conn, origin, member, max_members):
    mac = format_mac(check_mac(member.mac))
    _not_revoked(conn, [member.member_id])
    # Registrations of one MAC take turns across key servers: the check
    # below then sees a concurrent one's committed row (without the lock,
    # the same member registering through two servers at once would trip
    # the UNIQUE constraint and be told its own MAC is in use).
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("securelan mac " + mac,))
    holder = conn.execute("SELECT member_id FROM members WHERE mac = %s", (mac,)).fetchone()
    if holder is not None and holder[0] != member.member_id:
        raise MacInUse(f"{mac} is registered to another member")
    known = conn.execute("SELECT 1 FROM members WHERE member_id = %s", (member.member_id,)).fetchone()
    if known is None:
        (count,) = conn.execute("SELECT COUNT(*) FROM members").fetchone()
        if count >= max_members:
            raise TableFull(f"the member registry is full ({max_members} members)")
    claimed = member.incarnation if member.incarnation > 0 else 0
    if claimed >= MAX_INCARNATION:
        raise BadRequest(f"incarnation {claimed} is out of range")
    # One statement settles the incarnation under the row lock: an agent that
    # reconnects keeps the incarnation it uses (not below the stored one);
    # anything else gets the stored one plus one.
    try:
        (incarnation,) = conn.execute(
            "INSERT INTO members (member_id, role, mac, endpoint, registered_at, last_seen, incarnation)"
            " VALUES (%(id)s, %(role)s, %(mac)s, %(endpoint)s, %(at)s, %(at)s,"
            "  CASE WHEN %(claimed)s::bigint > 0 THEN %(claimed)s::bigint ELSE 1 END)"
            " ON CONFLICT (member_id) DO UPDATE SET role = excluded.role, mac = excluded.mac,"
            "  endpoint = excluded.endpoint, registered_at = excluded.registered_at,"
            "  last_seen = excluded.last_seen,"
            "  incarnation = CASE WHEN %(claimed)s::bigint > 0 AND %(claimed)s::bigint >= members.incarnation"
            "   THEN %(claimed)s::bigint ELSE members.incarnation + 1 END"
            " RETURNING incarnation",
            {
                "id": member.member_id,
                "role": member.role,
                "mac": mac,
                "endpoint": member.endpoint,
                "at": member.registered_at,
                "claimed": claimed,
            },
        ).fetchone()
    except pg_errors.UniqueViolation:
        # Another key server gave the MAC to another member a moment ago.
        raise MacInUse(f"{mac} is registered to another member") from None
    if incarnation >= MAX_INCARNATION:
        raise BadRequest(f"incarnation {incarnation} is out of range")
    conn.execute("DELETE FROM member_addresses WHERE member_id = %s", (member.member_id,))
    for address in member.addresses:
        # The primary key settles a race between members for one address
        # across key servers: DO NOTHING waits for the rival's insert, and
        # the loser inserts nothing.
        inserted = conn.execute(
            "INSERT INTO member_addresses (address, member_id) VALUES (%s, %s)"
            " ON CONFLICT (address) DO NOTHING RETURNING 1", (address, member.member_id)).fetchone()
        if inserted is None:
            raise AddressInUse(f"{address} is registered to another member")
    _notify(conn, origin, "member", (member.member_id,))
    return evolve(member, incarnation=incarnation)


def _issue_pair_txn(conn, origin, name, master, candidate, max_pair_keys):
    pair = (candidate.id_a, candidate.id_b)
    row = conn.execute(_SELECT_PAIR, pair).fetchone()
    if row is None:
        _not_revoked(conn, pair)
        (count,) = conn.execute("SELECT COUNT(*) FROM pair_keys").fetchone()
        if count >= max_pair_keys:
            raise TableFull(f"the pair-key table is full ({max_pair_keys} keys)")
        wrapped = master.wrap(candidate.key, _pair_context(candidate.id_a, candidate.id_b, candidate.epoch))
        # DO NOTHING (which waits for a rival's insert to commit or roll
        # back), then SELECT (a new snapshot under READ COMMITTED): whoever
        # inserted first wins, and every key server returns the winner.
        inserted = conn.execute(
            "INSERT INTO pair_keys (id_a, id_b, epoch, wrapped_key, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id_a, id_b) DO NOTHING RETURNING 1",
            (candidate.id_a, candidate.id_b, candidate.epoch, wrapped, candidate.created_at, candidate.expires_at),
        ).fetchone()
        if inserted is not None:
            _notify(conn, origin, "pair", pair)
        row = conn.execute(_SELECT_PAIR, pair).fetchone()
    return _pair_key_from_row(master, name, *row)


def _issue_group_txn(conn, origin, name, master, candidate):
    wrapped = master.wrap(candidate.key, _group_context(GROUP_ID, candidate.epoch))
    inserted = conn.execute(
        "INSERT INTO group_keys (group_id, epoch, wrapped_key, created_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (group_id) DO NOTHING RETURNING 1",
        (GROUP_ID, candidate.epoch, wrapped, candidate.created_at),
    ).fetchone()
    if inserted is not None:
        _notify(conn, origin, "group", (GROUP_ID,))
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    return _group_key_from_row(master, name, *row)


def _rekey_group_txn(conn, origin, name, master, candidate):
    wrapped = master.wrap(candidate.key, _group_context(GROUP_ID, candidate.epoch))
    # Replaces only an older epoch, atomically: of two key servers rekeying
    # at once, the higher epoch (or the first of equals) stays.
    written = conn.execute(
        "INSERT INTO group_keys (group_id, epoch, wrapped_key, created_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (group_id) DO UPDATE SET epoch = excluded.epoch,"
        " wrapped_key = excluded.wrapped_key, created_at = excluded.created_at"
        " WHERE group_keys.epoch < excluded.epoch RETURNING 1",
        (GROUP_ID, candidate.epoch, wrapped, candidate.created_at),
    ).fetchone()
    if written is not None:
        _notify(conn, origin, "group", (GROUP_ID,))
        return candidate
    # Another key server rekeyed first: keep its key.
    row = conn.execute(_SELECT_GROUP, (GROUP_ID,)).fetchone()
    return _group_key_from_row(master, name, *row)


def _rekey_pair_txn(conn, origin, name, master, candidate):
    wrapped = master.wrap(candidate.key, _pair_context(candidate.id_a, candidate.id_b, candidate.epoch))
    # Only forward: a key server that lost a race (another one rekeyed the
    # pair first) gets the winner's key back.
    written = conn.execute(
        "UPDATE pair_keys SET epoch = %s, wrapped_key = %s, created_at = %s, expires_at = %s"
        " WHERE id_a = %s AND id_b = %s AND epoch < %s RETURNING 1",
        (candidate.epoch, wrapped, candidate.created_at, candidate.expires_at,
         candidate.id_a, candidate.id_b, candidate.epoch),
    ).fetchone()
    if written is not None:
        _notify(conn, origin, "pair", (candidate.id_a, candidate.id_b))
    row = conn.execute(_SELECT_PAIR, (candidate.id_a, candidate.id_b)).fetchone()
    return None if row is None else _pair_key_from_row(master, name, *row)


def _bind_foreign_txn(conn, origin, mac, gateway_id, now, expires_at, max_foreign):
    text = format_mac(check_mac(mac))
    row = conn.execute(_SELECT_FOREIGN, (text,)).fetchone()
    if row is not None and (row[1] == 0 or row[1] > now):
        # Bound already (by this key server or another): keep it.
        return row[0], row[1]
    conn.execute("DELETE FROM foreign_macs WHERE expires_at != 0 AND expires_at <= %s AND mac != %s", (now, text))
    (count,) = conn.execute("SELECT COUNT(*) FROM foreign_macs WHERE mac != %s", (text,)).fetchone()
    if count >= max_foreign:
        raise TableFull(f"the table of MACs behind gateways is full ({max_foreign})")
    # Replaces only an expired binding, atomically: of two key servers
    # binding one MAC at once, the first binding stays.
    written = conn.execute(
        "INSERT INTO foreign_macs (mac, gateway_id, learned_at, expires_at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (mac) DO UPDATE SET gateway_id = excluded.gateway_id,"
        " learned_at = excluded.learned_at, expires_at = excluded.expires_at"
        " WHERE foreign_macs.expires_at != 0 AND foreign_macs.expires_at <= %s RETURNING 1",
        (text, gateway_id, now, expires_at, now),
    ).fetchone()
    if written is None:
        return tuple(conn.execute(_SELECT_FOREIGN, (text,)).fetchone())
    _notify(conn, origin, "foreign", (text,))
    return gateway_id, expires_at


def _revoke_txn(conn, origin, name, master, member_id, reason, now):
    # Waits for registrations and new pair keys of the member under way.
    conn.execute("SELECT pg_advisory_xact_lock(%s::integer, hashtext(%s))", (_MEMBER_LOCKS, member_id))
    conn.execute(
        "INSERT INTO revoked (member_id, serial, revoked_at, reason) VALUES (%s, '', %s, %s)"
        " ON CONFLICT (member_id, serial) DO NOTHING",
        (member_id, now, reason),
    )
    rows = conn.execute(
        f"DELETE FROM pair_keys WHERE id_a = %s OR id_b = %s RETURNING {_PAIR_COLUMNS}", (member_id, member_id)
    ).fetchall()
    destroyed = [_pair_key_from_row(master, name, *row) for row in rows]
    conn.execute("DELETE FROM foreign_macs WHERE gateway_id = %s", (member_id,))
    conn.execute("DELETE FROM member_addresses WHERE member_id = %s", (member_id,))
    conn.execute("DELETE FROM members WHERE member_id = %s", (member_id,))
    _notify(conn, origin, "revoked", (member_id,))
    return destroyed


class _Listener(threading.Thread):
    """
    Waits for notifications on a connection of its own and hands every
    change another store made to C{changed(change)}, on the reactor thread.
    When its connection breaks it connects again, then calls
    C{reconnected()}: changes may have been missed meanwhile.
    """

    def __init__(self, db, conn, origin, call, changed, lost, reconnected):
        super().__init__(name=f"securelan-store-listener {db.name}", daemon=True)
        self._db = db
        self._conn = conn
        self._origin = origin
        self._call = call
        self._changed = changed
        self._lost = lost
        self._reconnected = reconnected
        self.stopping = threading.Event()

    def run(self):
        conn, self._conn = self._conn, None
        delay = _RETRY_MIN
        try:
            while not self.stopping.is_set():
                if conn is None:
                    try:
                        conn = self._db.connect(autocommit=True)
                        conn.execute(f"LISTEN {CHANNEL}")
                    except psycopg.Error:
                        if conn is not None:
                            conn.close()
                            conn = None
                        self.stopping.wait(delay)
                        delay = min(delay * 2, _RETRY_MAX)
                        continue
                    delay = _RETRY_MIN
                    self._call(self._reconnected)
                try:
                    for notification in conn.notifies(timeout=_LISTEN_POLL):
                        change = _parse_change(notification.payload, self._origin)
                        if change is not None:
                            self._call(self._changed, change)
                        if self.stopping.is_set():
                            break
                except Exception as e:
                    # psycopg.Error mostly; anything else must not end the
                    # thread either (the mirror would go stale unseen).
                    self._call(self._lost, _describe(e))
                    try:
                        conn.close()
                    except Exception:
                        pass
                    conn = None
                    self.stopping.wait(_RETRY_MIN)
        finally:
            if conn is not None:
                conn.close()


def _check_psycopg():
    if psycopg is None:
        raise StoreOpenError("a PostgreSQL store needs psycopg 3: pip install 'psycopg[binary]'")
    version = tuple(int(part) for part in re.findall(r"\d+", psycopg.__version__)[:2])
    if version < (3, 2):
        raise StoreOpenError(f"a PostgreSQL store needs psycopg 3.2 or newer, not {psycopg.__version__}")


@implementer(IStore)
@define(eq=False)
class PostgreSQLStore(SharedStore):
    """
    An L{IStore} on a PostgreSQL database that a cascade of key servers
    shares.

    @ivar dsn: a libpq connection string or URL (C{postgresql://...}); its
        password never shows in the repr, messages or logs.
    @ivar master_key_path: the master key file, made with a new database
        (mode 0600) and required by an existing one: every key server of
        the cascade needs a copy.
    @ivar reactor: the reactor that receives results from the database
        thread and the listener; the global one by default.
    @ivar runner: C{runner(f, *args) -> Deferred} runs the blocking work
        instead of the store's own single-thread pool (see
        L{securelan.store.run_synchronously}, for tools).
    @ivar clock: an L{IReactorTime} for the store's own timestamps.
    @ivar busy_timeout: how long a write waits for another key server's
        row lock before failing with L{StoreUnavailable}.
    @ivar connect_timeout: how long a connection attempt may take.
    @ivar listen: whether to follow other key servers' changes (LISTEN);
        by default only when the store runs its own thread (no C{runner}),
        as a key server's does.

    Call C{close()} only once C{open()} has fired.  Reads answer from the
    mirror even after close, and while the database is down.
    """

    dsn: str = field(repr=redact)
    master_key_path: str | None
    reactor: object = field(default=None, repr=False)
    runner: object = field(default=None, repr=False)
    clock: object = field(default=None, repr=False)
    busy_timeout: float = field(default=5.0, kw_only=True, repr=False)
    connect_timeout: float = field(default=5.0, kw_only=True, repr=False)
    listen: bool | None = field(default=None, kw_only=True, repr=False)

    _db: _Database | None = field(init=False, default=None, repr=False)
    _open: bool = field(init=False, default=False, repr=False)
    _master: MasterKey | None = field(init=False, default=None, repr=False)
    _pool: ThreadPool | None = field(init=False, default=None, repr=False)
    _pool_reactor: object = field(init=False, default=None, repr=False)
    _shutdown_trigger: object = field(init=False, default=None, repr=False)
    _listener: _Listener | None = field(init=False, default=None, repr=False)
    #: Names this store in its notifications, so it skips its own.
    _origin: str = field(init=False, factory=lambda: secrets.token_hex(8), repr=False)
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
    _callbacks: list = field(init=False, factory=list, repr=False)
    #: Changes of other stores to reload (an ordered set), and whether the
    #: whole mirror must be reloaded.
    _pending: dict = field(init=False, factory=dict, repr=False)
    _resync_pending: bool = field(init=False, default=False, repr=False)
    _sync_running: bool = field(init=False, default=False, repr=False)
    _retry_call: object = field(init=False, default=None, repr=False)
    _retry_delay: float = field(init=False, default=_RETRY_MIN, repr=False)
    _listener_down: bool = field(init=False, default=False, repr=False)
    #: Raised at every close, so that a reload under way then is dropped.
    _generation: int = field(init=False, default=0, repr=False)

    def __attrs_post_init__(self):
        _check_psycopg()

    @property
    def name(self):
        """
        The DSN without its password.
        """
        return redact(self.dsn)

    def _the_reactor(self):
        if self.reactor is not None:
            return self.reactor
        from twisted.internet import reactor

        return reactor

    # Life cycle

    def open(self):
        if self._db is not None or self._pool is not None:
            return defer.fail(StoreOpenError(f"{self.name}: store is already open"))
        if self.master_key_path is None:
            return defer.fail(StoreOpenError(f"{self.name}: a PostgreSQL store needs a master key file"))
        self._db = _Database(self.dsn, self.name, self.busy_timeout, self.connect_timeout)
        if self.runner is None:
            reactor = self._the_reactor()
            self._pool_reactor = reactor
            self._pool = ThreadPool(1, 1, name=f"securelan-store {self.name}")
            self._pool.start()
            # Pool threads are not daemons: an unclosed store would hang the
            # process at exit.
            self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        listen = self.listen if self.listen is not None else self.runner is None
        d = self._run(_open_database, self._db, self.master_key_path, self._now(), listen)
        d.addCallbacks(self._opened, self._open_failed)
        return d

    def _opened(self, opened):
        self._master = opened.master
        self._install(opened.loaded)
        self._open = True
        if opened.listener_conn is not None:
            self._listener = _Listener(
                self._db,
                opened.listener_conn,
                self._origin,
                self._the_reactor().callFromThread,
                self._changed,
                self._listener_lost,
                self._listener_reconnected,
            )
            self._listener.start()
        _log.info(
            "opened store {name} (schema v{version}, {members} members, {pair_keys} pair keys)",
            name=self.name,
            version=opened.version,
            members=len(self._members),
            pair_keys=len(self._pair_keys),
        )

    def _open_failed(self, failure):
        self._db = None
        self._stop_pool()
        return failure

    def close(self):
        if not self._open:
            self._db = None
            self._stop_pool()
            return defer.succeed(None)
        self._forget_sync()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stopping.set()
        db, self._db = self._db, None
        d = self._run(_close_database, db, listener)

        def stopped(result):
            self._stop_pool()
            return result

        d.addBoth(stopped)
        d.addCallback(lambda _: None)
        return d

    def _forget_sync(self):
        self._open = False
        self._generation += 1
        self._cancel_retry()
        self._pending = {}
        self._resync_pending = False
        self._sync_running = False

    def _shutdown(self):
        self._forget_sync()
        self._shutdown_trigger = None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stopping.set()
        db, self._db = self._db, None
        pool, self._pool = self._pool, None
        if pool is not None:
            if db is not None:
                pool.callInThread(_close_database, db, listener)
            pool.stop()

    # Changes made by other stores

    def on_change(self, callback):
        """
        Call C{callback(kind, ids)} on the reactor thread for every change
        another store (another key server) made, once this store's mirror
        holds it: C{("member", (member_id,))}, C{("pair", (id_a, id_b))}
        (a new or rekeyed pair key), C{("group", (GROUP_ID,))},
        C{("revoked", (member_id,))} or C{("foreign", ("aa:bb:..",))} (a MAC
        bound to a gateway).  A revocation first reports every pair key it
        destroyed, as C{"pair"}; the mirror no longer holds them then.
        After the database was out of reach, the store reloads everything
        and reports whatever differs from its mirror.

        @return: a function that stops the calls.
        """
        self._callbacks.append(callback)

        def cancel():
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return cancel

    def _changed(self, change):
        if not self._open:
            return
        self._pending[change] = None
        self._kick()

    def _listener_lost(self, reason):
        if not self._listener_down:
            self._listener_down = True
            _log.warn(
                "store {name}: lost the change listener ({reason}); reconnecting", name=self.name, reason=reason
            )

    def _listener_reconnected(self):
        if self._listener_down:
            self._listener_down = False
            _log.info("store {name}: change listener is back; reloading the mirror", name=self.name)
        self._request_resync()

    def _request_resync(self):
        if not self._open:
            return
        self._resync_pending = True
        self._kick()

    def _kick(self):
        """
        Reload what other stores changed, one reload at a time, on the
        database thread after the writes already queued there.
        """
        if not self._open or self._sync_running or self._retry_call is not None:
            return
        if not self._pending and not self._resync_pending:
            return
        changes, self._pending = list(self._pending), {}
        full, self._resync_pending = self._resync_pending, False
        self._sync_running = True
        generation = self._generation
        if full:
            d = self._run(self._db.transact, _load_txn, self.name, self._master)
        else:
            d = self._run(self._db.transact, _fetch_txn, self.name, self._master, changes)
        args = (changes, full, generation)
        d.addCallbacks(self._synced, self._sync_failed, callbackArgs=args, errbackArgs=args)

    def _synced(self, result, changes, full, generation):
        if generation != self._generation:
            return
        self._sync_running = False
        self._retry_delay = _RETRY_MIN
        if full:
            events = self._install(result)
        else:
            events = []
            for change, state in zip(changes, result):
                events.extend(self._apply(change, state))
        for kind, ids in events:
            for callback in list(self._callbacks):
                try:
                    callback(kind, ids)
                except Exception:
                    _log.failure("store {name}: change callback failed", name=self.name)
        self._kick()

    def _sync_failed(self, failure, changes, full, generation):
        if generation != self._generation:
            return
        self._sync_running = False
        if not failure.check(StoreUnavailable):
            _log.failure("store {name}: cannot reload changes", failure, name=self.name)
            return
        # Try again later, keeping what is still to reload.
        for change in changes:
            self._pending[change] = None
        self._resync_pending = self._resync_pending or full
        delay, self._retry_delay = self._retry_delay, min(self._retry_delay * 2, _RETRY_MAX)
        self._retry_call = self._the_reactor().callLater(delay, self._retry)

    def _retry(self):
        self._retry_call = None
        self._kick()

    def _cancel_retry(self):
        call, self._retry_call = self._retry_call, None
        if call is not None and call.active():
            call.cancel()

    # The mirror (reactor thread only)

    def _install(self, loaded):
        """
        Make the mirror hold C{loaded}; return the changes against what it
        held, as C{on_change} reports them.
        """
        members = {m.member_id: m for m in loaded.members}
        pair_keys = {(p.id_a, p.id_b): p for p in loaded.pair_keys}
        events = [
            ("member", (member_id,))
            for member_id in sorted(set(self._members) | set(members))
            if self._members.get(member_id) != members.get(member_id)
        ]
        events += [
            ("pair", pair)
            for pair in sorted(set(self._pair_keys) | set(pair_keys))
            if self._pair_keys.get(pair) != pair_keys.get(pair)
        ]
        if self._group_key != loaded.group_key:
            events.append(("group", (GROUP_ID,)))
        events += [("revoked", (member_id,)) for member_id in sorted(set(loaded.revoked) - self._revoked)]
        events += [
            ("foreign", (format_mac(mac),))
            for mac in sorted(set(self._foreign) | set(loaded.foreign))
            if self._foreign.get(mac) != loaded.foreign.get(mac)
        ]
        self._members = members
        self._by_mac = {m.mac: m for m in loaded.members}
        self._by_address = {a: m for m in loaded.members for a in m.addresses}
        self._pair_keys = {}
        self._pairs_of = {}
        for pair_key in loaded.pair_keys:
            self._remember_pair(pair_key)
        self._group_key = loaded.group_key
        self._revoked = set(loaded.revoked)
        self._foreign = dict(loaded.foreign)
        return events

    def _apply(self, change, state):
        """
        Put the database's C{state} of C{change}'s entries in the mirror;
        return the changes to report.
        """
        kind, ids = change
        if kind == "member":
            self._set_member(ids[0], state)
        elif kind == "pair":
            self._set_pair(ids, state)
        elif kind == "group":
            self._group_key = state
        elif kind == "foreign":
            mac = parse_mac(ids[0])
            if state is None:
                self._foreign.pop(mac, None)
            else:
                self._foreign[mac] = state
        else:
            (member_id,) = ids
            member, pairs, revoked = state
            self._set_member(member_id, member)
            events = []
            held = {(p.id_a, p.id_b): p for p in pairs}
            for pair in sorted(self._pairs_of.get(member_id, set()) - set(held)):
                self._forget_pair(pair)
                events.append(("pair", pair))
            for pair_key in pairs:
                self._remember_pair(pair_key)
            if revoked:
                self._revoked.add(member_id)
                self._forget_gateway(member_id)
            return events + [change]
        return [change]

    def _forget_gateway(self, member_id):
        self._foreign = {mac: held for mac, held in self._foreign.items() if held[0] != member_id}

    def _set_member(self, member_id, member):
        previous = self._members.pop(member_id, None)
        if previous is not None:
            forget_member(self._by_mac, self._by_address, previous)
        if member is not None:
            self._members[member_id] = member
            self._by_mac[member.mac] = member
            for address in member.addresses:
                self._by_address[address] = member

    def _set_pair(self, pair, pair_key):
        if pair_key is None:
            self._forget_pair(pair)
        else:
            self._remember_pair(pair_key)

    def _forget_pair(self, pair):
        self._pair_keys.pop(pair, None)
        for member_id in pair:
            held = self._pairs_of.get(member_id)
            if held is not None:
                held.discard(pair)
                if not held:
                    del self._pairs_of[member_id]

    # Writes

    def _write(self, work, *args):
        if not self._open:
            return defer.fail(StoreUnavailable(f"store {self.name} is not open"))
        d = self._run(self._db.transact, work, self._origin, *args)
        d.addErrback(self._write_failed)
        return d

    def _write_failed(self, failure):
        if getattr(failure.value, "resync", False):
            self._request_resync()
        return failure

    def register(self, member, max_members):
        d = self._write(_register_txn, member, max_members)
        d.addCallback(self._registered)
        return d

    def _registered(self, member):
        self._set_member(member.member_id, member)
        return member

    def issue_pair_key(self, candidate, max_pair_keys):
        pair = pair_of(candidate.id_a, candidate.id_b)
        held = self._pair_keys.get(pair)
        if held is not None:
            return defer.succeed(held)
        if pair != (candidate.id_a, candidate.id_b):
            candidate = evolve(candidate, id_a=pair[0], id_b=pair[1])
        return self._coalesced(
            ("pair",) + pair, self._pair_issued, _issue_pair_txn, self.name, self._master, candidate, max_pair_keys
        )

    def issue_group_key(self, candidate):
        if self._group_key is not None:
            return defer.succeed(self._group_key)
        return self._coalesced(("group",), self._group_issued, _issue_group_txn, self.name, self._master, candidate)

    def rekey_pair(self, candidate):
        pair = pair_of(candidate.id_a, candidate.id_b)
        if pair != (candidate.id_a, candidate.id_b):
            candidate = evolve(candidate, id_a=pair[0], id_b=pair[1])

        def stored(pair_key):
            if pair_key is not None:
                self._remember_pair(pair_key)
            else:
                self._forget_pair(pair)
            return pair_key

        return self._write(_rekey_pair_txn, self.name, self._master, candidate).addCallback(stored)

    def rekey_group(self, candidate):
        return self._write(_rekey_group_txn, self.name, self._master, candidate).addCallback(self._group_issued)

    def revoke(self, member_id, reason, now):
        d = self._write(_revoke_txn, self.name, self._master, member_id, reason, now)

        def revoked(destroyed):
            self._revoked.add(member_id)
            self._forget_gateway(member_id)
            self._set_member(member_id, None)
            for pair in list(self._pairs_of.get(member_id, ())):
                self._forget_pair(pair)
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
