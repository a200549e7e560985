"""
All of securelan's zope interfaces, in one place.
"""

from zope.interface import Attribute, Interface


class IStore(Interface):
    """
    The key server's durable state: the member registry, the pair-key table
    and the group key.  Every method returns a Deferred; blocking work happens
    off the reactor thread.  Several key servers of one subnet may share one
    store (a cascade), so "issue if absent" operations must be race-free
    across processes, not only within one.

    Failures: L{securelan.errors.MacInUse}, L{securelan.errors.TableFull},
    L{securelan.errors.StoreUnavailable} (the database failed).
    """

    def open():
        """
        Create or upgrade the database and check that the master key opens
        it.  Fires with None; fails with L{securelan.keys.MasterKeyError} or
        L{securelan.store.StoreOpenError} with a clear message.
        """

    def close():
        """
        Flush and close.  Fires with None.
        """

    def register(member, max_members):
        """
        Insert or update C{member} (a L{securelan.records.Member}), keyed by
        its member ID.  A member re-registering may change MAC: its old MAC
        is released.  Fails with L{MacInUse} when another member holds the
        MAC, and with L{TableFull} when the member is new and the registry
        already holds C{max_members} members.  Fires with the stored record.
        """

    def member(member_id):
        """
        Fires with the L{Member} of C{member_id}, or None.
        """

    def member_by_mac(mac):
        """
        Fires with the L{Member} that holds C{mac} (6 bytes), or None.
        """

    def members():
        """
        Fires with a list of every L{Member}.
        """

    def pair_key(id_1, id_2):
        """
        Fires with the current L{securelan.records.PairKey} of the unordered
        pair, or None.
        """

    def issue_pair_key(candidate, max_pair_keys):
        """
        Store C{candidate} (a L{PairKey}) unless the pair already has a key;
        fire with whichever key the store holds afterwards.  Two callers
        racing with different candidates both receive the same key.  Fails
        with L{TableFull} when the table holds C{max_pair_keys} keys.
        """

    def group_key():
        """
        Fires with the current L{securelan.records.GroupKey}, or None.
        """

    def issue_group_key(candidate):
        """
        Store C{candidate} (a L{GroupKey}) unless a group key exists; fire
        with the stored one.
        """

    def counts():
        """
        Fires with a dict of table sizes: ``members``, ``pair_keys``.
        """


class IMemberConnection(Interface):
    """
    The key server's view of one authenticated member session, through which
    it pushes key updates and purges.
    """

    member_id = Attribute("The authenticated member ID (from the certificate).")

    def push_pair_key(pair_key, peer):
        """
        Push a pair key (and the peer L{Member} it leads to) to this member.
        Fires when the member acknowledges.
        """

    def push_purge(peer_id, reason):
        """
        Tell this member to forget every key it holds with C{peer_id}.
        """


class IKeyListener(Interface):
    """
    What a member agent is told by its key-server client: admission, and
    the pushes a key server sends over the control connection.
    """

    def registered(admission):
        """
        The member was admitted (again, after every reconnection), with a
        L{securelan.protocol.Admission}.
        """

    def pair_key_pushed(grant):
        """
        A key server pushed a L{securelan.protocol.PairKeyGrant}.
        """

    def group_key_pushed(grant):
        """
        A key server pushed a new L{securelan.protocol.GroupKeyGrant}.
        """

    def purged(peer_id, reason):
        """
        Forget every key held with C{peer_id}.
        """
