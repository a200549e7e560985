# -*- test-case-name: tests.test_store -*-
"""
The key server's durable state, behind L{securelan._interfaces.IStore}.

A store spec names where the state lives: ``sqlite:///abs/path``,
``sqlite:relative/path``, a bare path, or ``:memory:`` (tests).  SQLite (in
L{securelan.store.sqlite}) serves one key server process: each process
answers reads from the copy it loaded, so two processes on one file would
not see each other's registrations.  A cascade of key servers (the seed's
cascade port) shares a PostgreSQL store (L{securelan.store.postgres}:
``postgresql://...``), whose changes reach every key server at once through
LISTEN/NOTIFY.

Never restore a store from a backup while agents run on keys it handed out
since: the restored incarnations and keys would be handed out again.  Until
the key-lifecycle work brings a rekey of everything on restore, restore only
with every agent stopped and a fresh master key and store instead.
"""

import re


class StoreOpenError(Exception):
    """
    The store cannot be opened: the spec is unsupported, the file is not a
    securelan database, its schema is newer than this code, or it cannot be
    read or created.  The message names the file.
    """


# Imported after StoreOpenError is defined, because .sqlite imports it.
from .sqlite import SQLiteStore, run_synchronously  # noqa: E402

__all__ = ["StoreOpenError", "SQLiteStore", "open_store", "run_synchronously"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def open_store(spec: str, master_key_path: str | None, reactor=None, runner=None, clock=None):
    """
    Build the store that C{spec} names; it is not opened yet (call
    C{open()}, which fires when the database is ready).

    A bare path holding a colon before its first slash reads as a scheme:
    write it as ``./name``.  A ``postgresql://`` (or ``postgres://``) URL
    names a L{securelan.store.postgres.PostgreSQLStore}, which a cascade of
    key servers shares.

    @param master_key_path: the file of the master key that wraps every key
        at rest (created with the database).  May be None for ``:memory:``.
    @param reactor: see L{SQLiteStore}, as are C{runner} (for example
        L{run_synchronously}, for tools) and C{clock}.
    @raise StoreOpenError: the spec names an unsupported kind of store.
    """

    def make(path):
        return SQLiteStore(path, master_key_path, reactor=reactor, runner=runner, clock=clock)

    if not spec:
        raise StoreOpenError("empty store spec")
    if spec == ":memory:":
        return make(spec)
    scheme = _SCHEME.match(spec)
    if scheme is None:
        return make(spec)
    if scheme.group(1).lower() in ("postgresql", "postgres"):
        from .postgres import PostgreSQLStore  # psycopg is needed only here

        return PostgreSQLStore(spec, master_key_path, reactor=reactor, runner=runner, clock=clock)
    if scheme.group(1).lower() != "sqlite":
        raise StoreOpenError(
            f"unsupported store {spec.split(':', 1)[0]!r}: use sqlite:///abs/path, "
            "sqlite:relative/path, a path or :memory:"
        )
    path = spec[scheme.end() :]
    if path.startswith("//"):
        path = path[2:]
        # sqlite://host/... names a host, which SQLite has no use for.
        if not path.startswith("/"):
            raise StoreOpenError(f"unsupported store spec {spec!r}: sqlite:///abs/path has three slashes")
    if not path:
        raise StoreOpenError(f"store spec {spec!r} names no file")
    return make(path)
