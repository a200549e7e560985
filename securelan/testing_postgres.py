"""
A throwaway PostgreSQL cluster for tests of L{securelan.store.postgres}.

L{PostgreSQLCluster} runs C{initdb} into a temporary directory (as the
C{postgres} OS user when running as root, since PostgreSQL refuses to run as
root), then C{pg_ctl start} listening on 127.0.0.1 only, on a free port, with
its unix socket inside that directory.  Authentication is C{trust}, which is
safe only because nothing but loopback reaches it.  Durability is switched
off (C{fsync}, C{full_page_writes}): the cluster exists for one test run.

The server binaries are looked up under C{/usr/lib/postgresql/*/bin} (the
newest version first), then on C{PATH}; the client side needs C{psycopg}.
L{unavailable} says why a cluster cannot be had (a test then fails with
that reason: it is never skipped).

L{shared_cluster} starts one cluster per process on first use and stops and
deletes it at exit; L{fresh_database} gives a test a database of its own.
"""

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

try:
    import psycopg
except ImportError:  # pragma: no cover - reported by unavailable()
    psycopg = None

__all__ = ["PostgreSQLCluster", "find_bindir", "fresh_database", "shared_cluster", "unavailable"]

_OS_USER = "postgres"
_SUPERUSER = "postgres"


def _version_key(path):
    match = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", path)
    if match is None:
        return (0, 0)
    return (int(match.group(1)), int(match.group(2) or 0))


def find_bindir():
    """
    The directory that holds C{initdb}, C{pg_ctl} and C{postgres}, or None.
    """
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all(os.access(os.path.join(directory, name), os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return directory
    initdb = shutil.which("initdb")
    if initdb is not None:
        directory = os.path.dirname(initdb)
        if shutil.which("pg_ctl", path=directory) and shutil.which("postgres", path=directory):
            return directory
    return None


def unavailable():
    """
    Why no test cluster can be started here (a message naming the fix), or
    None when one can.
    """
    if psycopg is None:
        return "psycopg is not installed: pip install 'psycopg[binary]'"
    if find_bindir() is None:
        return "PostgreSQL server binaries not found: apt-get install -y postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_OS_USER)
        except KeyError:
            return f"running as root and there is no {_OS_USER!r} OS user to run PostgreSQL as"
    return None


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgreSQLCluster:
    """
    One PostgreSQL cluster in a temporary directory, on 127.0.0.1.

    @ivar directory: the temporary directory (data in C{data/}, the unix
        socket and the server log beside it).
    @ivar port: the TCP port on 127.0.0.1.
    """

    def __init__(self, bindir=None):
        reason = unavailable()
        if reason is not None and bindir is None:
            raise RuntimeError(reason)
        self.bindir = bindir or find_bindir()
        self.directory = None
        self.port = None
        self.running = False
        self._counter = 0
        self._lock = threading.Lock()

    # Running commands

    def _as_owner(self):
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_OS_USER)
            return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        return {}

    def _run(self, name, *args, timeout=60):
        command = [os.path.join(self.bindir, name), *args]
        result = subprocess.run(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            **self._as_owner(),
        )
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", "replace")
            raise RuntimeError(f"{name} failed ({result.returncode}):\n{output}{self._log_tail()}")
        return result.stdout

    def _log_tail(self):
        try:
            with open(self.log_file, "rb") as f:
                return "\nserver log:\n" + f.read()[-4000:].decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    @property
    def data_directory(self):
        return os.path.join(self.directory, "data")

    @property
    def log_file(self):
        return os.path.join(self.directory, "server.log")

    # Life cycle

    def start(self):
        """
        Make the cluster and start its server; returns self.
        """
        self.directory = tempfile.mkdtemp(prefix="securelan-pg-")
        try:
            owner = self._as_owner()
            if owner:
                os.chown(self.directory, owner["user"], owner["group"])
            self._run(
                "initdb",
                "--pgdata", self.data_directory,
                "--username", _SUPERUSER,
                "--auth", "trust",
                "--encoding", "UTF8",
                "--locale", "C.UTF-8",
                "--no-sync",
            )
            self.port = _free_port()
            with open(os.path.join(self.data_directory, "postgresql.conf"), "a", encoding="utf-8") as f:
                f.write(
                    "\n# securelan test cluster\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.directory}'\n"
                    "fsync = off\n"
                    "synchronous_commit = off\n"
                    "full_page_writes = off\n"
                    "max_connections = 100\n"
                    "shared_buffers = 32MB\n"
                    "deadlock_timeout = 100ms\n"
                )
            self.start_server()
        except BaseException:
            self.destroy()
            raise
        return self

    def start_server(self):
        """
        Start the server (again), on the same port.
        """
        self._run(
            "pg_ctl", "--pgdata", self.data_directory, "--log", self.log_file, "--wait", "--timeout", "30", "start"
        )
        self.running = True

    def stop_server(self, mode="fast"):
        """
        Stop the server, keeping its data; C{mode} is pg_ctl's.
        """
        if self.running:
            self.running = False
            self._run("pg_ctl", "--pgdata", self.data_directory, "--mode", mode, "--wait", "--timeout", "30", "stop")

    def destroy(self):
        """
        Stop the server if it runs and delete the whole directory.
        """
        try:
            if self.running:
                self.stop_server("immediate")
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    # Databases

    def dsn(self, dbname="postgres"):
        """
        A libpq URL for C{dbname} over TCP on 127.0.0.1.
        """
        return f"postgresql://{_SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def socket_dsn(self, dbname="postgres"):
        """
        A libpq URL for C{dbname} over the server's unix socket: it reaches
        the server from any network namespace of this host.
        """
        return f"postgresql://{_SUPERUSER}@/{dbname}?host={self.directory}&port={self.port}"

    def admin(self):
        """
        An autocommit connection to the C{postgres} database; close it.
        """
        return psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10)

    def create_database(self, name=None, icu_locale=None):
        """
        Create an empty database (from C{template0}); return its name.

        @param icu_locale: an ICU locale (such as C{"en-US"}) for the
            database's collation, whose order of text differs from code
            point order; None for the cluster's C.UTF-8.
        """
        if name is None:
            with self._lock:
                self._counter += 1
                name = f"securelan_test_{os.getpid()}_{self._counter}"
        locale = ""
        if icu_locale is not None:
            if not re.match(r"^[A-Za-z0-9_-]+$", icu_locale):
                raise ValueError(f"not an ICU locale: {icu_locale!r}")
            locale = f" LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0{locale}')
        return name

    def drop_database(self, name):
        """
        Drop C{name}, closing whatever connections it still has.
        """
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def files(self):
        """
        The paths of every file under the data directory (for tests that
        look for key bytes on disk).
        """
        found = []
        for root, _, names in os.walk(self.data_directory):
            found.extend(os.path.join(root, name) for name in names)
        return found


_shared = None
_shared_lock = threading.Lock()


def shared_cluster():
    """
    The process's one shared cluster, started on first use and stopped and
    deleted at exit.

    @raise RuntimeError: it cannot be started (see L{unavailable}).
    """
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.running:
            if _shared is not None:
                _shared.destroy()
            cluster = PostgreSQLCluster()
            cluster.start()
            atexit.register(cluster.destroy)
            _shared = cluster
        return _shared


def fresh_database(testcase, cluster=None, icu_locale="en-US", unix_socket=False):
    """
    Create an empty database for C{testcase} (on the shared cluster unless
    C{cluster} is given), dropped at its cleanup; return its DSN.

    The database collates text in C{icu_locale} where the server has ICU
    (it sorts C{"B"} after C{"a"}, unlike Python), so that tests catch code
    that leans on the database's order of text; None for code point order.

    Register this before the cleanups that close stores on it, so that the
    database outlives them.  With C{unix_socket}, the DSN goes through the
    server's unix socket (for key servers in network namespaces).
    """
    cluster = cluster or shared_cluster()
    try:
        name = cluster.create_database(icu_locale=icu_locale)
    except psycopg.errors.FeatureNotSupported:
        # A server built without ICU.
        name = cluster.create_database()

    def drop():
        if cluster.running:
            # Connections may linger a moment after close().
            deadline = time.monotonic() + 5
            while True:
                try:
                    cluster.drop_database(name)
                    return
                except psycopg.Error:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    testcase.addCleanup(drop)
    return cluster.socket_dsn(name) if unix_socket else cluster.dsn(name)
