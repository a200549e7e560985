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
from .wire import HEADER_LEN, TYPE_PAIR, Opener, Reassembler, WireError, derive_pair_key, parse_header


class _Clock:
    """
    Time stands still: every captured piece is kept until its frame is whole.
    """

    def seconds(self):
        return 0.0


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
    # A split frame is one AEAD message: its pieces are tried together.
    reassembler = Reassembler(_Clock(), max_frames_per_sender=64, max_bytes=64 * 1024 * 1024)
    for datagram in datagrams:
        header = parse_header(datagram)
        tried += 1
        pieces = reassembler.add(header, datagram[HEADER_LEN:])
        if pieces is None:
            continue
        for grant in grants:
            for sender, receiver in permutations(sorted(ids), 2):
                # Every receiver incarnation the members can have had.
                for receiver_incarnation in range(1, 9):
                    opener = Opener(derive_pair_key(grant.key, sender, receiver, header.epoch,
                                                    header.incarnation, receiver_incarnation),
                                    TYPE_PAIR, header.epoch, header.incarnation)
                    try:
                        if header.count == 1:
                            opener.open(datagram, header)
                        else:
                            opener.open_pieces(header, pieces)
                        opened += 1
                    except WireError:
                        pass
    print(json.dumps({"member": admission.member_id, "keys": len(grants), "tried": tried,
                      "opened": opened}))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
