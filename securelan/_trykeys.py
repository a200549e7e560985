"""
Run inside a member's namespace by the end-to-end tests: act as that member
(its own certificate), fetch the pair keys it may hold, and try every one of
them, in every derivation, on datagrams captured between two other members.
Prints JSON: how many datagrams were tried and how many opened (must be 0).

    python -m securelan._trykeys CA CERT KEY KEYSERVER MAC DATAGRAMS PEER_MAC...
"""

import json
import sys
from itertools import permutations

from twisted.internet import defer, task

from .addresses import parse_mac
from .client import KeyServerClient
from .tls import Credentials
from .wire import TYPE_PAIR, Opener, WireError, derive_pair_key, parse_header


@defer.inlineCallbacks
def main(reactor, ca, cert, key, keyserver, mac, datagram_file, *peer_macs):
    client = KeyServerClient([keyserver], Credentials.load(ca, cert, key), mac=parse_mac(mac),
                             endpoint=":4789", reactor=reactor)
    client.startService()
    admission = yield client.whenRegistered()
    grants = []
    for peer_mac in peer_macs:
        grants.append((yield client.request_pair_key(parse_mac(peer_mac))))
    yield client.stopService()
    with open(datagram_file) as f:
        datagrams = [bytes.fromhex(line) for line in f.read().split()]
    ids = {admission.member_id} | {g.peer_id for g in grants}
    tried = opened = 0
    for datagram in datagrams:
        header = parse_header(datagram)
        tried += 1
        for grant in grants:
            for sender, receiver in permutations(sorted(ids), 2):
                # Every receiver incarnation the members can have had.
                for receiver_incarnation in range(1, 9):
                    opener = Opener(derive_pair_key(grant.key, sender, receiver, header.epoch,
                                                    header.incarnation, receiver_incarnation),
                                    TYPE_PAIR, header.epoch, header.incarnation)
                    try:
                        opener.open(datagram, header)
                        opened += 1
                    except WireError:
                        pass
    print(json.dumps({"member": admission.member_id, "keys": len(grants), "tried": tried,
                      "opened": opened}))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
