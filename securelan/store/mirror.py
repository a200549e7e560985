"""
What both stores do the same way: every read is answered from their
in-memory mirror of the database, blocking work runs on their thread pool,
and concurrent identical writes run once.
"""

import time

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from ..addresses import pair_of

def forget_member(by_mac, by_address, member):
    """
    Take C{member}'s MAC and addresses out of a mirror's indexes, where
    they still name it (another member may have taken one since).
    """
    if by_mac.get(member.mac) is not None and by_mac[member.mac].member_id == member.member_id:
        del by_mac[member.mac]
    for address in member.addresses:
        if by_address.get(address) is not None and by_address[address].member_id == member.member_id:
            del by_address[address]



def coalesce(in_flight, key, start):
    """
    Call C{start} (which returns a Deferred) unless a call under the same
    C{key} is already under way in C{in_flight}; either way fire with the
    result of the one call, so concurrent identical writes run once.
    """
    waiters = in_flight.get(key)
    if waiters is not None:
        d = defer.Deferred()
        waiters.append(d)
        return d
    waiters = in_flight[key] = []

    def done(result):
        del in_flight[key]
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        return result

    return start().addBoth(done)


class SharedStore:
    """
    What both stores do alike.  The reads of
    L{securelan._interfaces.IStore}, from a store's mirror: C{_members},
    C{_by_mac}, C{_by_address}, C{_pair_keys}, C{_pairs_of}, C{_group_key},
    C{_revoked} and C{_foreign}, which the store keeps as the database
    changes.  Its thread pool (C{_pool}, C{runner}, C{clock}), and writes
    that run once however many ask at the same time (C{_coalesced}, over
    the store's own C{_write}).
    """

    def _now(self):
        return self.clock.seconds() if self.clock is not None else time.time()

    def _run(self, f, *args):
        if self.runner is not None:
            return self.runner(f, *args)
        return threads.deferToThreadPool(self._pool_reactor, self._pool, f, *args)

    def _stop_pool(self):
        pool, self._pool = self._pool, None
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            self._pool_reactor.removeSystemEventTrigger(trigger)
        if pool is not None:
            pool.stop()

    def _coalesced(self, key, then, work, *args):
        """
        Run the write C{work} unless one with the same C{key} is under way;
        either way fire with its result, after C{then} put it in the mirror.
        """
        return coalesce(self._in_flight, key, lambda: self._write(work, *args).addCallback(then))

    # Reads, from the mirror

    def member(self, member_id):
        return defer.succeed(self.peek_member(member_id))

    def member_by_mac(self, mac):
        return defer.succeed(self.peek_member_by_mac(mac))

    def peek_member(self, member_id):
        return self._members.get(member_id)

    def peek_member_by_mac(self, mac):
        return self._by_mac.get(mac)

    def peek_pair_key(self, id_1, id_2):
        return self._pair_keys.get(pair_of(id_1, id_2))

    def member_by_address(self, address):
        return defer.succeed(self._by_address.get(address))

    def members(self):
        return defer.succeed(list(self._members.values()))

    def pair_key(self, id_1, id_2):
        return defer.succeed(self.peek_pair_key(id_1, id_2))

    def pairs_of(self, member_id):
        return defer.succeed([self._pair_keys[pair] for pair in self._pairs_of.get(member_id, ())])

    def pair_keys(self):
        return defer.succeed(list(self._pair_keys.values()))

    def group_key(self):
        return defer.succeed(self._group_key)

    def counts(self):
        return defer.succeed({"members": len(self._members), "pair_keys": len(self._pair_keys)})

    def is_revoked(self, member_id):
        return defer.succeed(member_id in self._revoked)

    def foreign_mac(self, mac, now):
        held = self._foreign.get(mac)
        if held is None or (held[1] and held[1] <= now):
            return defer.succeed(None)
        return defer.succeed(held[0])

    # Keeping the mirror

    def _remember_pair(self, pair_key):
        pair = (pair_key.id_a, pair_key.id_b)
        self._pair_keys[pair] = pair_key
        self._pairs_of.setdefault(pair_key.id_a, set()).add(pair)
        self._pairs_of.setdefault(pair_key.id_b, set()).add(pair)

    def _pair_issued(self, pair_key):
        self._remember_pair(pair_key)
        return pair_key

    def _group_issued(self, group_key):
        self._group_key = group_key
        return group_key
