# -*- test-case-name: tests.test_keyserver_admin -*-
"""
The key server's control socket commands (see L{securelan.control}):
C{members}, C{keys} (metadata only: epochs, ages, fingerprints, which holder
acknowledged which epoch, the NETKEYs of links to other subnets; never key
material), C{revoke}, C{rekey} (of pairs, or of a link's NETKEY) and
C{rekey_group}.  C{securelan members|keys|revoke|rekey} are their client.
"""

from twisted.internet import defer

from ..addresses import check_member_id, format_mac
from ..errors import UnknownPeer


def admin_handlers(server):
    """
    The commands of the key server C{server}, for L{listen_control}.
    """

    @defer.inlineCallbacks
    def members():
        records = yield server.store.members()
        return [
            {
                "member_id": m.member_id,
                "mac": format_mac(m.mac),
                "role": m.role,
                "endpoint": m.endpoint,
                "incarnation": m.incarnation,
                "registered_at": m.registered_at,
                "connected": bool(server.sessions.get(m.member_id)),
            }
            for m in sorted(records, key=lambda m: m.member_id)
        ]

    @defer.inlineCallbacks
    def keys():
        records = yield server.store.members()
        seen, pairs = set(), []
        for member in records:
            for pair_key in (yield server.store.pairs_of(member.member_id)):
                if (pair_key.id_a, pair_key.id_b) in seen:
                    continue
                seen.add((pair_key.id_a, pair_key.id_b))
                pairs.append({
                    "members": [pair_key.id_a, pair_key.id_b],
                    "epoch": pair_key.epoch,
                    "acknowledged": server.acknowledged.get((pair_key.id_a, pair_key.id_b), {}),
                    "created_at": pair_key.created_at,
                    "expires_at": pair_key.expires_at,
                    "fingerprint": pair_key.key.fingerprint,
                })
        group = server.group_key()
        return {
            "now": server.clock.seconds(),
            "group": {"epoch": group.epoch, "created_at": group.created_at,
                      "fingerprint": group.key.fingerprint},
            "pairs": sorted(pairs, key=lambda p: p["members"]),
            "netkeys": server.broker.status() if server.broker is not None else [],
        }

    @defer.inlineCallbacks
    def revoke(member, reason=""):
        check_member_id(member)
        known = yield server.store.member(member)
        if known is None and not server.sessions.get(member):
            raise UnknownPeer(f"no member {member} is registered")
        result = yield server.revoke(member, str(reason))
        return result

    @defer.inlineCallbacks
    def rekey(pair=None, all=False, netkey=None):
        if netkey is not None:
            broker = server.broker
            if broker is None or netkey not in broker.links:
                raise UnknownPeer(f"subnet {server.subnet} has no link to {netkey!r}")
            yield broker.rekey(netkey)
            return [{"members": [server.subnet, netkey], "epoch": broker.links[netkey].epoch}]
        if all:
            pairs = yield server.all_pairs()
            done = []
            for pair_key in pairs:
                new = yield server.rekey_pair(pair_key.id_a, pair_key.id_b)
                done.append({"members": [new.id_a, new.id_b], "epoch": new.epoch})
            return done
        if not pair or len(pair) != 2:
            raise ValueError("name a pair of member IDs, or all")
        for member_id in pair:
            check_member_id(member_id)
        new = yield server.rekey_pair(*pair)
        return [{"members": [new.id_a, new.id_b], "epoch": new.epoch}]

    @defer.inlineCallbacks
    def rekey_group():
        group = yield server.rekey_group()
        return {"group_epoch": group.epoch}

    return {"members": members, "keys": keys, "revoke": revoke, "rekey": rekey, "rekey_group": rekey_group}
