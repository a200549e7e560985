"""
Tests for L{securelan.keyserver.server}: the seed's key server over real TLS
in memory (L{securelan.testing.MemorySubnet}).
"""

import base64

import attrs
from twisted.internet import defer, ssl
from twisted.internet.error import ConnectionClosed
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from securelan import PROTOCOL_VERSION
from securelan.addresses import parse_mac
from securelan.client import register, request_group_key, request_pair_key
from securelan.config import Limits
from securelan.errors import (
    BadRequest,
    MacInUse,
    NotPermitted,
    NotRegistered,
    RateLimited,
    TableFull,
    UnknownPeer,
    VersionMismatch,
)
from securelan.keys import SecretKey
from securelan.protocol import ERRORS, _PAIR_KEY_FIELDS
from securelan.store import SQLiteStore, run_synchronously
from securelan.testing import LogCapture, MemorySubnet, RecordingListener, make_pki
from securelan.tls import EXPECTED_GROUP, negotiated_group

MAC_1 = parse_mac("02:00:00:00:00:01")
MAC_2 = parse_mac("02:00:00:00:00:02")
MAC_3 = parse_mac("02:00:00:00:00:03")


class RequestPairKeyAs(amp.Command):
    """
    C{RequestPairKey} with a field that claims to be another member: what a
    member that tries to ask in someone else's name would send.
    """

    commandName = b"RequestPairKey"
    arguments = [(b"peer_mac", amp.String()), (b"member_id", amp.Unicode()),
                 (b"requester", amp.Unicode())]
    response = _PAIR_KEY_FIELDS
    errors = ERRORS


class SubnetTestCase(SynchronousTestCase):
    def subnet(self, **kw):
        return MemorySubnet(self.mktemp(), **kw)

    def three(self, **kw):
        """
        A subnet with alice (MAC_1), bob (MAC_2) and carol (MAC_3) joined.
        """
        net = self.subnet(**kw)
        conns = [net.join(m, mac)[0] for m, mac in (("alice", MAC_1), ("bob", MAC_2), ("carol", MAC_3))]
        return net, conns

    def pair_key(self, conn, mac, **kw):
        return self.successResultOf(conn.run(request_pair_key(conn.client, mac, **kw)))


def grant_fields(**changes):
    """
    A pair-key grant's fields, as a key server answers them.
    """
    fields = dict(peer_id="bob", peer_mac=MAC_2, peer_role="client", peer_endpoint="192.0.2.2:4789",
                  peer_incarnation=3, key=SecretKey(bytes(range(32))), epoch=2, lifetime=60, age=5,
                  peer_addresses=("10.9.0.2",))
    fields.update(changes)
    return fields


class QuickResponseTests(SynchronousTestCase):
    """
    The pair-key answers and pushes are serialised and parsed without
    AMP's generic path, into and from the same boxes.
    """

    def grant(self, **changes):
        return grant_fields(**changes)

    def test_same_box(self):
        """
        With and without the optional field, the box is AMP's own.
        """
        from securelan.protocol import RequestPairKey, RequestPairKeyByAddress

        for command in (RequestPairKey, RequestPairKeyByAddress):
            for grant in (self.grant(), self.grant(peer_addresses=None)):
                generic = amp._objectsToStrings(grant, command.response, amp.AmpBox(), None)
                self.assertEqual(command.makeResponse(dict(grant), None), generic)
        self.assertNotIn(b"peer_addresses", RequestPairKey.makeResponse(self.grant(peer_addresses=None), None))
        # Not AMP's path in disguise: every field is laid out.
        self.assertEqual(len(RequestPairKey.layout("response")), len(RequestPairKey.response))

    def test_same_objects(self):
        """
        An answer parses into what AMP would make of it, with or without
        the optional field.
        """
        from securelan.protocol import RequestPairKey

        for grant in (self.grant(), self.grant(peer_addresses=None)):
            box = RequestPairKey.makeResponse(dict(grant), None)
            generic = amp._stringsToObjects(box, RequestPairKey.response, None)
            self.assertEqual(RequestPairKey.parseResponse(box, None), generic)
            self.assertEqual(RequestPairKey.parseResponse(box, None)["peer_addresses"],
                             list(grant["peer_addresses"]) if grant["peer_addresses"] else None)
        box = RequestPairKey.makeResponse(self.grant(), None)
        del box[b"epoch"]
        self.assertRaises(KeyError, RequestPairKey.parseResponse, box, None)

    def test_push_arguments(self):
        """
        A pushed key's arguments are AMP's own box, and parse back as AMP
        would; an unknown argument is refused as AMP refuses it.
        """
        from securelan.protocol import PushPairKey

        for grant in (self.grant(), self.grant(peer_addresses=None)):
            box = PushPairKey.makeArguments(dict(grant), None)
            generic = amp._objectsToStrings(grant, PushPairKey.arguments, amp.AmpBox(), None)
            self.assertEqual(box, generic)
            self.assertEqual(PushPairKey.parseArguments(box, None),
                             amp._stringsToObjects(box, PushPairKey.arguments, None))
        self.assertEqual(len(PushPairKey.layout("arguments")), len(PushPairKey.arguments))
        self.assertRaises(amp.InvalidSignature, PushPairKey.makeArguments, self.grant(colour="red"), None)

    def test_request_arguments(self):
        """
        A pair-key request's arguments are AMP's own box, with and without
        the optional epoch, and parse back as AMP would.
        """
        from securelan.protocol import RequestPairKey

        for request in ({"peer_mac": MAC_2}, {"peer_mac": MAC_2, "epoch": 4}):
            box = RequestPairKey.makeArguments(dict(request), None)
            self.assertEqual(box, amp._objectsToStrings(request, RequestPairKey.arguments, amp.AmpBox(), None))
            self.assertEqual(RequestPairKey.parseArguments(box, None),
                             amp._stringsToObjects(box, RequestPairKey.arguments, None))

    def test_answer_without_addresses(self):
        """
        An answer without the optional addresses (a key server that sends
        none) makes a grant with none, not a failure.
        """
        from securelan.protocol import PairKeyGrant, RequestPairKey

        box = RequestPairKey.makeResponse(self.grant(peer_addresses=None), None)
        self.assertNotIn(b"peer_addresses", box)
        self.assertEqual(PairKeyGrant(**RequestPairKey.parseResponse(box, None)).peer_addresses, ())

    def test_missing_field(self):
        """
        A missing field fails as it does in AMP.
        """
        from securelan.protocol import RequestPairKey

        grant = self.grant()
        del grant["epoch"]
        self.assertRaises(KeyError, RequestPairKey.makeResponse, grant, None)


class QuickCallTests(SynchronousTestCase):
    """
    A pair-key request sent with L{securelan.protocol._QuickBoxes.call} is
    the box C{callRemote} sends, and its answer or error comes back as
    C{callRemote}'s would.
    """

    def connected(self):
        from securelan.protocol import QuietAMP

        proto, transport = QuietAMP(), StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def sent(self, transport):
        [box] = amp.parseString(transport.value())
        transport.clear()
        return box

    def test_same_box_as_call_remote(self):
        """
        With and without the optional field, the request is AMP's own box,
        tag included; the tags of later requests are fresh.
        """
        from securelan.protocol import RequestPairKey, RequestPairKeyByAddress

        for command, arguments in ((RequestPairKey, dict(peer_mac=MAC_2)),
                                   (RequestPairKey, dict(peer_mac=MAC_2, epoch=4)),
                                   (RequestPairKeyByAddress, dict(peer_address="10.9.0.2"))):
            quick, quick_transport = self.connected()
            generic, generic_transport = self.connected()
            command.call(quick, **arguments)
            generic.callRemote(command, **arguments)
            self.assertEqual(self.sent(quick_transport), self.sent(generic_transport))
            command.call(quick, **arguments)
            self.assertEqual(self.sent(quick_transport)[b"_ask"], b"2")

    def test_answer(self):
        """
        The answer fires the request's Deferred with the parsed response.
        """
        from securelan.protocol import RequestPairKey

        proto, transport = self.connected()
        answers = []
        RequestPairKey.call(proto, peer_mac=MAC_2).addCallback(answers.append)
        ask = self.sent(transport)[b"_ask"]
        proto.dataReceived(RequestPairKey.serialize_answer(grant_fields(), ask, proto))
        expected = RequestPairKey.parseResponse(RequestPairKey.makeResponse(grant_fields(), proto), proto)
        self.assertEqual(answers, [expected])
        self.assertEqual(answers[0]["key"].material, bytes(range(32)))

    def test_errors(self):
        """
        A declared error comes back as its exception, any other code as
        C{UnknownRemoteError}, as from C{callRemote}.
        """
        from securelan.protocol import RequestPairKey

        for code, expected in ((b"UNKNOWN_PEER", UnknownPeer), (b"WHATEVER", amp.UnknownRemoteError)):
            proto, transport = self.connected()
            failures = []
            # As a caller does: its errback is there before the answer (AMP
            # treats an error no one handled as fatal to the connection).
            RequestPairKey.call(proto, peer_mac=MAC_2).addErrback(failures.append)
            ask = self.sent(transport)[b"_ask"]
            error = amp.AmpBox(_error=ask, _error_code=code, _error_description=b"no such member")
            proto.dataReceived(error.serialize())
            [failure] = failures
            self.assertIsInstance(failure.value, expected)
            self.assertIn("no such member", str(failure.value))
            self.assertFalse(transport.disconnecting)

    def test_bad_arguments(self):
        """
        An argument the command does not have, or a required one missing,
        fails as in C{callRemote}, and nothing is sent.
        """
        from securelan.protocol import RequestPairKey

        proto, transport = self.connected()
        self.failureResultOf(RequestPairKey.call(proto, peer_mac=MAC_2, colour="red"), amp.InvalidSignature)
        self.failureResultOf(RequestPairKey.call(proto, epoch=3), amp.InvalidSignature)
        self.assertEqual(transport.value(), b"")

    def test_other_commands_take_call_remote(self):
        """
        A command that asks for no answer, or whose arguments AMP handles
        itself, is sent by C{callRemote}: the same box, the same result.
        """
        from twisted.python.compat import nativeString

        from securelan.protocol import _QuickBoxes

        class Tell(_QuickBoxes):
            commandName = b"Tell"
            arguments = [(b"what", amp.String())]
            requiresAnswer = False

        class Boxed(amp.Argument):
            # An argument that fills the box itself.
            def toBox(self, name, strings, objects, proto):
                strings[name] = b"<" + objects.pop(nativeString(name)) + b">"

        class Own(_QuickBoxes):
            commandName = b"Own"
            arguments = [(b"what", amp.String()), (b"how", Boxed())]

        proto, transport = self.connected()
        self.assertIsNone(Tell.call(proto, what=b"x"))
        self.assertEqual(self.sent(transport), amp.AmpBox(_command=b"Tell", what=b"x"))
        Own.call(proto, what=b"y", how=b"z")
        self.assertEqual(self.sent(transport), amp.AmpBox(_command=b"Own", _ask=b"2", what=b"y", how=b"<z>"))

    def test_write_fails(self):
        """
        A write that raises leaves no request waiting for an answer.
        """
        from securelan.protocol import RequestPairKey

        proto, transport = self.connected()

        def refuse(data):
            raise OSError("no")

        transport.write = refuse
        self.assertRaises(OSError, RequestPairKey.call, proto, peer_mac=MAC_2)
        self.assertEqual(proto._outstandingRequests, {})

    def test_connection_lost(self):
        """
        A request outstanding when the connection is lost fails with the
        reason; one made afterwards fails at once, as from C{callRemote}.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        from securelan.protocol import RequestPairKey

        proto, transport = self.connected()
        d = RequestPairKey.call(proto, peer_mac=MAC_2)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ConnectionDone)
        self.failureResultOf(RequestPairKey.call(proto, peer_mac=MAC_2), ConnectionDone)


class QuickAnswerSerializationTests(SynchronousTestCase):
    """
    A pair-key answer serialised at once is the box AMP would send.
    """

    def test_same_box_on_the_wire(self):
        """
        Parsed back, the bytes are AMP's answer box: the response's fields
        (an absent optional one left out) and the question's tag.
        """
        from securelan.protocol import RequestPairKey

        for grant in (grant_fields(), grant_fields(peer_addresses=None)):
            data = RequestPairKey.serialize_answer(dict(grant), b"2a", None)
            [box] = amp.parseString(data)
            expected = RequestPairKey.makeResponse(dict(grant), None)
            expected[b"_answer"] = b"2a"
            self.assertEqual(box, expected)

    def test_record_or_mapping(self):
        """
        A grant record serialises as its fields given as a mapping do.
        """
        from securelan.protocol import PairKeyGrant, RequestPairKey

        for fields in (grant_fields(), grant_fields(peer_addresses=())):
            record = PairKeyGrant(**fields)
            self.assertEqual(RequestPairKey.serialize_answer(record, b"7", None),
                             RequestPairKey.serialize_answer(attrs.asdict(record, recurse=False), b"7", None))

    def test_records_of_one_or_more_fields(self):
        """
        A record serialises as the mapping of its fields does, with one
        field or several; a record that lacks a field as a mapping that
        lacks it: an optional one is left out, a required one is a
        KeyError.
        """
        from types import SimpleNamespace

        from securelan.protocol import _QuickBoxes

        class One(_QuickBoxes):
            response = [(b"n", amp.Integer())]

        class Two(_QuickBoxes):
            response = [(b"n", amp.Integer()), (b"s", amp.Unicode(optional=True))]

        for command, fields in ((One, {"n": 3}), (Two, {"n": 3, "s": "x"}), (Two, {"n": 4})):
            data = command.serialize_answer(SimpleNamespace(**fields), b"9", None)
            self.assertEqual(data, command.serialize_answer(fields, b"9", None))
            expected = command.makeResponse(fields, None)
            expected[b"_answer"] = b"9"
            self.assertEqual(amp.parseString(data), [expected])
        self.assertRaises(KeyError, Two.serialize_answer, SimpleNamespace(s="x"), b"9", None)

    def test_missing_and_too_long(self):
        """
        A missing field fails as in AMP (KeyError); so does a value too long
        for a box (TooLong).
        """
        from securelan.protocol import RequestPairKey

        grant = grant_fields()
        del grant["epoch"]
        self.assertRaises(KeyError, RequestPairKey.serialize_answer, grant, b"1", None)
        grant = grant_fields(peer_endpoint="x" * 70000)
        self.assertRaises(amp.TooLong, RequestPairKey.serialize_answer, grant, b"1", None)

    def test_only_quick_commands(self):
        """
        A command whose fields take AMP's own path has no quick answer.
        """
        from securelan.protocol import RequestPairKey, _QuickBoxes

        class Boxed(amp.Argument):
            def toBox(self, name, strings, objects, proto):
                strings[name] = b"made by hand"

        class Other(_QuickBoxes):
            response = [(b"items", Boxed())]

        self.assertRaises(TypeError, Other.serialize_answer, {"items": []}, b"1", None)
        self.assertTrue(RequestPairKey.layout("response"))

    def test_push_as_callRemote_sends_it(self):
        """
        A push serialised at once is the box C{callRemote} sends for a
        command that asks for no answer: the arguments and the command's
        name, no question tag.
        """
        from securelan.protocol import PushPairKey

        class Told(PushPairKey):
            commandName = b"PushPairKey"
            requiresAnswer = False

        for grant in (grant_fields(), grant_fields(peer_addresses=None)):
            sent = StringTransport()
            protocol = amp.AMP()
            protocol.makeConnection(sent)
            self.assertIsNone(protocol.callRemote(Told, **grant))
            self.assertEqual(amp.parseString(PushPairKey.serialize_command(dict(grant), None)),
                             amp.parseString(sent.value()))
            self.assertNotIn(b"_ask", amp.parseString(sent.value())[0])

    def answered_by_amp(self, error):
        """
        What AMP itself answers a pair-key request tagged C{b"5"} with when
        the responder fails with C{error}, and whether it closed the
        connection.
        """
        from securelan.protocol import RequestPairKey

        class Failing(amp.AMP):
            @RequestPairKey.responder
            def answer(self, peer_mac, epoch=None):
                raise error

        sent = StringTransport()
        protocol = Failing()
        protocol.makeConnection(sent)
        box = RequestPairKey.makeArguments({"peer_mac": MAC_2}, None)
        box.update({b"_command": b"RequestPairKey", b"_ask": b"5"})
        protocol.dataReceived(box.serialize())
        [answer] = amp.parseString(sent.value())
        return answer, sent.disconnecting

    def test_error_box_as_amp_answers(self):
        """
        The error box for a failure is AMP's own: a declared error's code
        and description (the connection stays), a fatal one's (it closes),
        and an unknown error for anything else (it closes; logged).
        """
        from twisted.python.failure import Failure

        from securelan.protocol import RequestPairKey

        class Fatal(Exception):
            pass

        self.patch(RequestPairKey, "fatalErrors", {Fatal: b"FATAL"})
        self.patch(RequestPairKey, "allErrors", {**RequestPairKey.allErrors, Fatal: b"FATAL"})
        for error, closes in ((TableFull("the pair-key table is full (3 keys)"), False),
                              (Fatal("gone"), True), (RuntimeError("a bug"), True)):
            expected, closed = self.answered_by_amp(error)
            box = RequestPairKey.error_box(Failure(error), b"5")
            self.assertEqual(amp.parseString(box.serialize()), [expected], error)
            self.assertEqual(isinstance(box, amp.QuitBox), closed, error)
            self.assertEqual(closed, closes, error)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class AnsweredAtOnceTests(SubnetTestCase):
    """
    A request for the pair key of two members is taken without AMP's
    dispatch, with the same checks, answers and errors: at once for a key
    already issued, once written for a new one.
    """

    def dispatched(self, session):
        calls = []
        original = session.dispatchCommand

        def dispatch(box):
            calls.append(box[b"_command"])
            return original(box)

        session.dispatchCommand = dispatch
        return calls

    def test_pair_keys_answered_without_dispatch(self):
        """
        Neither the first request (the key is issued) nor the next ones
        take AMP's dispatch; all get the same grant and are counted.
        """
        net, (alice, bob, carol) = self.three()
        calls = self.dispatched(alice.session)
        first = self.pair_key(alice, MAC_2)
        again = [self.pair_key(alice, MAC_2) for _ in range(3)]
        self.assertEqual(calls, [])
        self.assertEqual(again, [first] * 3)
        self.assertEqual(net.server.counters[("requests", "pair key")], 4)
        self.assertEqual(net.server.counters[("keys_issued", "pair")], 1)

    def test_new_key_answered_when_written(self):
        """
        A key to issue is answered once the store has written it, not
        before; a session that closed meanwhile is sent nothing, and
        nothing fails.
        """
        net, (alice, bob, carol) = self.three()
        writes = []
        issue = net.store.issue_pair_key

        def held_back(candidate, max_pair_keys):
            d = defer.Deferred()
            writes.append(lambda: issue(candidate, max_pair_keys).chainDeferred(d))
            return d

        self.patch(net.store, "issue_pair_key", held_back)
        outcomes = []
        request_pair_key(alice.client, MAC_2).addBoth(outcomes.append)
        alice.pump.flush()
        self.assertEqual((len(writes), outcomes), (1, []))
        writes.pop()()
        alice.pump.flush()
        self.assertEqual(outcomes[0].peer_id, "bob")
        request_pair_key(alice.client, MAC_3).addBoth(outcomes.append)
        alice.pump.flush()
        with LogCapture() as logs:
            alice.client_tls.transport.loseConnection()
            alice.pump.flush()
            self.assertFalse(alice.connected)
            writes.pop()()
            alice.pump.flush()
        self.assertEqual(len(outcomes), 2)
        self.assertTrue(outcomes[1].check(ConnectionClosed), outcomes[1])
        self.assertNotIn(" error", " ".join(logs.lines()).lower())
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(net.server.counters[("keys_issued", "pair")], 2)

    def test_both_ends_ask_at_once(self):
        """
        alice and bob ask for their new key while its write is under way:
        one write, one key issued and counted, both answered with it.
        """
        net, (alice, bob, carol) = self.three()
        release = []
        runner = net.store.runner

        def queued(f, *args):
            d = defer.Deferred()
            release.append(lambda: runner(f, *args).chainDeferred(d))
            return d

        self.patch(net.store, "runner", queued)
        outcomes = []
        request_pair_key(alice.client, MAC_2).addBoth(outcomes.append)
        request_pair_key(bob.client, MAC_1).addBoth(outcomes.append)
        alice.pump.flush()
        bob.pump.flush()
        self.assertEqual((len(release), outcomes), (1, []))
        release.pop()()
        net.flush()
        self.assertEqual([grant.peer_id for grant in outcomes], ["bob", "alice"])
        self.assertEqual(outcomes[0].key, outcomes[1].key)
        self.assertEqual(net.server.counters[("keys_issued", "pair")], 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_failure_before_the_write(self):
        """
        A failure while issuing, before the store is asked (a bug: here the
        key generator), is answered as AMP answers it: logged, an unknown
        error, the connection closed; the rest of the read is not lost to
        an exception.
        """
        net, (alice, bob, carol) = self.three()

        def broken():
            raise RuntimeError("no randomness")

        self.patch(net.server, "keygen", broken)
        with LogCapture() as logs:
            failure = self.failureResultOf(alice.run(request_pair_key(alice.client, MAC_2)))
        self.assertTrue(failure.check(amp.UnknownRemoteError), failure)
        self.assertTrue(any("while answering RequestPairKey" in line for line in logs.lines()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(alice.connected)

    def test_store_refusal_answered_as_amp_would(self):
        """
        A key the store refuses to issue (the table is full) is refused as
        on AMP's path: the declared error, counted, the session kept.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(max_pair_keys=1))
        calls = self.dispatched(alice.session)
        self.pair_key(alice, MAC_2)
        failure = self.failureResultOf(alice.run(request_pair_key(alice.client, MAC_3)))
        self.assertTrue(failure.check(TableFull), failure)
        self.assertIn("table is full", failure.getErrorMessage())
        self.assertEqual(calls, [])
        self.assertTrue(alice.connected)
        self.assertEqual(net.server.counters[("errors", "TableFull")], 1)
        self.assertEqual(net.server.counters[("requests", "pair key")], 2)

    def test_refusals_take_the_general_path(self):
        """
        What must be refused is refused as before: a group MAC, a MAC no
        one holds, our own MAC.
        """
        net, (alice, bob, carol) = self.three()
        self.pair_key(alice, MAC_2)
        for mac, error in ((b"\xff" * 6, BadRequest), (b"\x02\0\0\0\0\x99", UnknownPeer),
                           (MAC_1, NotPermitted)):
            failure = self.failureResultOf(alice.run(request_pair_key(alice.client, mac)))
            self.assertTrue(failure.check(error), (mac, failure))

    def test_failure_while_answering(self):
        """
        A failure while answering at once (a bug) is logged and answered as
        AMP answers a responder's unexpected failure: an unknown error, and
        the connection closes.  The request is counted once.
        """
        from securelan.protocol import RequestPairKey

        net, (alice, bob, carol) = self.three()
        self.pair_key(alice, MAC_2)

        def serialize_answer(*args):
            raise RuntimeError("a bug")

        self.patch(RequestPairKey, "serialize_answer", serialize_answer)
        with LogCapture() as logs:
            failure = self.failureResultOf(alice.run(request_pair_key(alice.client, MAC_2)))
        self.assertTrue(failure.check(amp.UnknownRemoteError), failure)
        self.assertTrue(any("while answering RequestPairKey" in line for line in logs.lines()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(net.server.counters[("requests", "pair key")], 2)
        self.assertFalse(alice.connected)

    def test_rate_limited_on_the_quick_path(self):
        """
        A request for an issued key past the member's rate is refused as
        on the general path (RateLimited, reading paused), counted once.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(requests_per_second=1, request_burst=3))
        self.pair_key(alice, MAC_2)
        outcomes = []
        for _ in range(3):
            request_pair_key(alice.client, MAC_2).addBoth(outcomes.append)
        alice.pump.flush()
        # Register and the first request took two of the three tokens.
        self.assertEqual([type(o).__name__ for o in outcomes], ["PairKeyGrant", "Failure"])
        self.assertTrue(outcomes[1].check(RateLimited))
        self.assertTrue(alice.session.paused)
        self.assertEqual(net.server.counters[("requests", "pair key")], 3)
        self.assertEqual(net.server.counters[("errors", "RateLimited")], 1)
        net.clock.advance(alice.session.RATE_LIMIT_PAUSE)
        alice.pump.flush()
        self.assertEqual([type(o).__name__ for o in outcomes], ["PairKeyGrant", "Failure", "PairKeyGrant"])
        self.assertEqual(net.server.counters[("requests", "pair key")], 4)

    def test_answer_boxes_are_not_requests(self):
        """
        A box that carries an answer tag is an answer, whatever command it
        names: the quick path does not take it (AMP's path closes the
        connection over an unknown answer).
        """
        from securelan.protocol import RequestPairKey

        net, (alice, bob, carol) = self.three()
        self.pair_key(alice, MAC_2)
        box = RequestPairKey.makeArguments({"peer_mac": MAC_2}, None)
        box.update({b"_command": b"RequestPairKey", b"_ask": b"77", b"_answer": b"77"})
        with LogCapture():
            alice.client_tls.write(box.serialize())
            alice.pump.flush()
        self.assertFalse(alice.connected)
        self.assertEqual(net.server.counters[("requests", "pair key")], 1)


class _StartTLSRequest(amp.Command):
    """
    AMP's StartTLS as a peer would send it, without the local side's TLS
    preparations.
    """

    commandName = b"StartTLS"


class StartTLSTests(SubnetTestCase):
    """
    AMP's StartTLS (a TLS layer without certificates inside ours) is
    refused on every securelan connection.
    """

    def test_member_cannot_start_tls(self):
        """
        A member that asks for StartTLS is refused and disconnected; the
        key server starts no TLS layer and logs no traceback.
        """
        net = self.subnet()
        alice, _ = net.join("alice", MAC_1)
        failure = self.failureResultOf(alice.run(alice.client.callRemote(_StartTLSRequest)))
        self.assertTrue(failure.check(amp.UnknownRemoteError), failure)
        self.assertIn("this connection is TLS already", failure.getErrorMessage())
        self.assertFalse(alice.connected)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_agent_refuses_start_tls(self):
        """
        Nor does an agent take StartTLS from its key server.
        """
        net = self.subnet()
        alice, _ = net.join("alice", MAC_1)
        failure = self.failureResultOf(alice.run(alice.session.callRemote(_StartTLSRequest)))
        self.assertTrue(failure.check(amp.UnknownRemoteError), failure)
        self.assertFalse(alice.connected)


class TLSTests(SubnetTestCase):
    """
    The control channel is mutually authenticated TLS 1.3 with a
    post-quantum hybrid key exchange.
    """

    def test_post_quantum_tls13(self):
        """
        Both ends negotiate TLS 1.3 and the X25519MLKEM768 group.
        """
        net = self.subnet()
        conn = net.connect("alice")
        self.assertTrue(conn.connected)
        for side in (conn.client_tls, conn.server_tls):
            self.assertEqual(negotiated_group(side), EXPECTED_GROUP)
            self.assertEqual(side.getHandle().get_protocol_version_name(), "TLSv1.3")

    def test_member_id_from_certificate(self):
        """
        The key server knows the member by the ID in its certificate.
        """
        net = self.subnet()
        conn, admission = net.join("bob", MAC_2)
        self.assertEqual(admission.member_id, "bob")
        self.assertEqual(conn.session.member_id, "bob")
        self.assertEqual(admission.subnet, "test")
        self.assertEqual(admission.version, PROTOCOL_VERSION)

    def assertRefused(self, net, conn, logs, reason_part):
        self.assertFalse(conn.connected)
        refused = [line for line in logs.lines() if "refused" in line and reason_part in line]
        self.assertTrue(refused, f"no refusal mentioning {reason_part!r} in {logs.lines()!r}")

    def test_no_client_certificate(self):
        """
        A client without a certificate is refused during the handshake, and
        the refusal is logged with its reason.
        """
        net = self.subnet()
        options = ssl.optionsForClientTLS(
            "keyserver.test", trustRoot=ssl.trustRootFromCertificates([net.credentials.ca]))
        with LogCapture() as logs:
            conn = net.connect(client_options=options)
        self.assertRefused(net, conn, logs, "certificate")

    def test_certificate_from_another_ca(self):
        """
        A member certificate from another subnet's CA is refused.
        """
        net = self.subnet()
        other = make_pki(self.mktemp(), subnet="other", members=("alice",))
        from securelan.tls import Credentials

        cert, key = other.members["alice"]
        # It trusts our CA (so it would accept our server) but holds a
        # certificate our CA never signed.
        creds = Credentials(ca=net.credentials.ca, own=Credentials.load(other.ca_cert, cert, key).own)
        with LogCapture() as logs:
            conn = net.connect(credentials=creds)
        self.assertRefused(net, conn, logs, "certificate")

    def test_keyserver_certificate_is_not_a_member(self):
        """
        A certificate of our CA that names no member (a key server's) is
        refused after the handshake.
        """
        net = self.subnet()
        from securelan.tls import Credentials

        creds = Credentials.load(net.pki.ca_cert, net.pki.keyserver_cert, net.pki.keyserver_key)
        with LogCapture() as logs:
            conn = net.connect(credentials=creds)
        self.assertFalse(conn.connected)
        self.assertTrue(any("refused connection" in line for line in logs.lines()))

    def test_member_checks_server_name(self):
        """
        A member refuses a key server whose certificate does not carry the
        name it expects.
        """
        net = self.subnet()
        conn = net.connect("alice", server_name="other.test")
        self.assertFalse(conn.connected)


class SeedSemanticsTests(SubnetTestCase):
    """
    The seed's steps 1 and 3, exactly.
    """

    def test_both_members_get_the_same_key(self):
        """
        (ID_1, MAC_2) and (ID_2, MAC_1) are answered with one key, K(1,2).
        """
        net, (alice, bob, carol) = self.three()
        k12 = self.pair_key(alice, MAC_2)
        k21 = self.pair_key(bob, MAC_1)
        self.assertEqual(k12.key, k21.key)
        self.assertEqual(k12.epoch, k21.epoch)
        self.assertEqual((k12.peer_id, k12.peer_mac), ("bob", MAC_2))
        self.assertEqual((k21.peer_id, k21.peer_mac), ("alice", MAC_1))
        self.assertEqual(k12.peer_endpoint, "127.0.0.1:4789")
        self.assertEqual(k12.lifetime, net.server.pair_key_lifetime)

    def test_third_member_gets_its_own_key(self):
        """
        Carol asking for MAC_2 gets K(3,2), never K(1,2).
        """
        net, (alice, bob, carol) = self.three()
        k12 = self.pair_key(alice, MAC_2)
        k32 = self.pair_key(carol, MAC_2)
        self.assertEqual(k32.peer_id, "bob")
        self.assertNotEqual(k32.key, k12.key)
        self.assertEqual(self.pair_key(bob, MAC_3).key, k32.key)

    def test_keys_stable(self):
        """
        Asking again returns the same key; the store holds one key per pair.
        """
        net, (alice, bob, carol) = self.three()
        first = self.pair_key(alice, MAC_2)
        self.assertEqual(self.pair_key(alice, MAC_2).key, first.key)
        self.assertEqual(self.successResultOf(net.store.counts())["pair_keys"], 1)

    def test_id_in_message_ignored(self):
        """
        A member that writes another member's ID into its request still gets
        its own key: the ID comes only from the certificate.
        """
        net, (alice, bob, carol) = self.three()
        k12 = self.pair_key(alice, MAC_2)
        forged = self.successResultOf(
            carol.call(RequestPairKeyAs, peer_mac=MAC_2, member_id="alice", requester="alice"))
        self.assertEqual(forged["peer_id"], "bob")
        self.assertNotEqual(forged["key"], k12.key)
        self.assertEqual(forged["key"], self.pair_key(carol, MAC_2).key)

    def test_mac_claimed_by_second_member(self):
        """
        A MAC registered by one member cannot be claimed by another.
        """
        net = self.subnet()
        net.join("alice", MAC_1)
        with LogCapture() as logs:
            self.assertRaises(MacInUse, net.join, "bob", MAC_1)
        self.assertTrue(any("refused register from bob" in line for line in logs.lines()))
        # alice keeps it: carol reaches alice, not bob.
        net.join("carol", MAC_3)
        conn, _ = net.join("bob", MAC_2)
        self.assertEqual(self.pair_key(conn, MAC_1).peer_id, "alice")

    def test_same_member_reregisters(self):
        """
        A member may register again (after a restart), even with a new MAC;
        its old MAC is released.
        """
        net = self.subnet()
        net.join("alice", MAC_1)
        conn, admission = net.join("alice", MAC_3)
        self.assertEqual(admission.member_id, "alice")
        bob, _ = net.join("bob", MAC_2)
        self.assertEqual(self.pair_key(bob, MAC_3).peer_id, "alice")
        self.failureResultOf(bob.run(request_pair_key(bob.client, MAC_1)), UnknownPeer)
        net.join("carol", MAC_1)

    def test_pinned_mac(self):
        """
        A certificate that pins a MAC allows only that MAC.
        """
        net = self.subnet()
        net.pki.add_member("dave", macs=["02:00:00:00:00:0d"])
        self.assertRaises(NotPermitted, net.join, "dave", MAC_1)
        conn, admission = net.join("dave", parse_mac("02:00:00:00:00:0d"))
        self.assertEqual(admission.member_id, "dave")

    def test_role_must_be_allowed(self):
        """
        A client certificate cannot register as a gateway; a certificate
        that allows the role can.
        """
        net = self.subnet()
        self.assertRaises(NotPermitted, net.join, "alice", MAC_1, role="gateway")
        net.pki.add_member("gw", roles=("gateway",))
        conn, admission = net.join("gw", MAC_2, role="gateway")
        self.assertEqual(conn.session.member.role, "gateway")

    def test_unicast_mac_required(self):
        """
        A member cannot register a group or all-zero MAC, nor a MAC that is
        not 6 bytes.
        """
        net = self.subnet()
        for mac in (b"\xff" * 6, parse_mac("01:00:5e:00:00:01"), b"\0" * 6, b"\x02\0\0"):
            self.assertRaises(BadRequest, net.join, "alice", mac)

    def test_endpoint(self):
        """
        ``:port`` takes the host the member connects from; a malformed
        endpoint is refused.
        """
        net = self.subnet()
        conn, admission = net.join("alice", MAC_1, endpoint="[2001:db8::1]:5000")
        self.assertEqual(admission.endpoint, "[2001:db8::1]:5000")
        conn, admission = net.join("bob", MAC_2, endpoint="")
        self.assertEqual(admission.endpoint, "")
        for bad in ("host.example:1", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:99999"):
            self.assertRaises(BadRequest, net.join, "carol", MAC_3, endpoint=bad)

    def test_version_mismatch(self):
        """
        Another protocol version is refused with both versions named.
        """
        net = self.subnet()
        conn = net.connect("alice")
        from securelan.protocol import Register

        f = self.failureResultOf(conn.call(Register, version=PROTOCOL_VERSION + 1, mac=MAC_1,
                                           role="client", endpoint=""), VersionMismatch)
        self.assertIn(str(PROTOCOL_VERSION + 1), f.getErrorMessage())

    def test_not_registered(self):
        """
        Keys are served only after register.
        """
        net = self.subnet()
        net.join("bob", MAC_2)
        conn = net.connect("alice")
        self.failureResultOf(conn.run(request_pair_key(conn.client, MAC_2)), NotRegistered)
        self.failureResultOf(conn.run(request_group_key(conn.client)), NotRegistered)

    def test_unknown_peer(self):
        """
        A MAC nobody holds: a clear "unknown peer" error.
        """
        net, (alice, bob, carol) = self.three()
        f = self.failureResultOf(alice.run(request_pair_key(alice.client, parse_mac("02:aa:00:00:00:01"))),
                                 UnknownPeer)
        self.assertIn("02:aa:00:00:00:01", f.getErrorMessage())

    def test_no_key_with_oneself(self):
        """
        A member asking for its own MAC is refused.
        """
        net, (alice, bob, carol) = self.three()
        self.failureResultOf(alice.run(request_pair_key(alice.client, MAC_1)), NotPermitted)

    def test_group_key(self):
        """
        Every member gets the one group key, unlike any pair key; a group MAC
        asked for as a pair is refused.
        """
        net, (alice, bob, carol) = self.three()
        grants = [self.successResultOf(c.run(request_group_key(c.client))) for c in (alice, bob, carol)]
        self.assertEqual({g.key.fingerprint for g in grants}, {grants[0].key.fingerprint})
        self.assertEqual(grants[0].group_id, "@group")
        self.assertNotEqual(grants[0].key, self.pair_key(alice, MAC_2).key)
        self.failureResultOf(alice.run(request_pair_key(alice.client, b"\xff" * 6)), BadRequest)

    def test_restart_keeps_keys(self):
        """
        A key server restarted on the same database and master key serves
        the same members, pair keys and group key.
        """
        path = self.mktemp()
        master = self.mktemp()
        store = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(store.open())
        net = self.subnet(store=store)
        alice, _ = net.join("alice", MAC_1)
        bob, _ = net.join("bob", MAC_2)
        before = self.pair_key(alice, MAC_2)
        group_before = self.successResultOf(alice.run(request_group_key(alice.client)))
        self.successResultOf(store.close())

        again = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(again.open())
        net.restart(again)
        # bob reconnects; alice has not re-registered yet but is still known.
        bob, _ = net.join("bob", MAC_2)
        after = self.pair_key(bob, MAC_1)
        self.assertEqual(after.key, before.key)
        self.assertEqual(after.peer_id, "alice")
        group_after = self.successResultOf(bob.run(request_group_key(bob.client)))
        self.assertEqual(group_after.key, group_before.key)
        self.successResultOf(again.close())


class LimitTests(SubnetTestCase):
    """
    No member, and no unauthenticated peer, can exhaust the key server.
    """

    def test_flooding_member_is_rate_limited(self):
        """
        A member flooding requests is refused with RateLimited, while another
        member is still served; the flooder recovers with time.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(requests_per_second=10, request_burst=20))
        outcomes = []
        for _ in range(100):
            request_pair_key(alice.client, MAC_2).addBoth(outcomes.append)
        for _ in range(20):
            alice.pump.flush()
            net.clock.advance(0)
        served = [o for o in outcomes if not hasattr(o, "check")]
        refused = [o for o in outcomes if hasattr(o, "check") and o.check(RateLimited)]
        self.assertLessEqual(len(served), 20)
        self.assertGreaterEqual(len(refused), 1)
        # The rest waits unread while bob is served.
        self.assertLess(len(outcomes), 100)
        self.assertEqual(self.pair_key(bob, MAC_3).peer_id, "carol")
        for _ in range(20):
            net.clock.advance(1)
            for _ in range(5):
                alice.pump.flush()
                net.clock.advance(0)
        self.assertEqual(len(outcomes), 100)
        served = [o for o in outcomes if not hasattr(o, "check")]
        # At most the burst and the rate over the time it took.
        self.assertLessEqual(len(served), 20 + 10 * 20)
        self.assertEqual(self.pair_key(alice, MAC_2).peer_id, "bob")

    def test_flooder_is_paused(self):
        """
        Past its rate limit a member is not read from for a second (its
        flood waits in its own TCP buffers instead of costing the key server
        a refusal apiece); then it is read again.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(requests_per_second=10, request_burst=20))
        session = alice.session
        for _ in range(30):
            alice.run(request_pair_key(alice.client, MAC_2)).addErrback(lambda f: None)
        self.assertTrue(session.paused)
        self.assertEqual(net.server.counters[("rate_limit_pauses", "")], 1)
        net.clock.advance(0.5)
        self.assertTrue(session.paused)
        net.clock.advance(0.5)
        self.assertFalse(session.paused)
        net.clock.advance(5)
        self.assertEqual(self.pair_key(alice, MAC_2).peer_id, "bob")

    def test_requests_make_no_timers(self):
        """
        Requests from several sessions in one reactor turn start one timer
        of the key server's in all (the end of the turn), and more requests
        none: neither the turn count nor the idle timeout costs a timer per
        session or per request.
        """
        net, sessions = self.three()
        box = amp.AmpBox(_command=b"Ping", _ask=b"1").serialize()

        def ours():
            owners = {net.server} | {member.session for member in sessions}
            return len([c for c in net.clock.getDelayedCalls() if getattr(c.func, "__self__", None) in owners])

        before = ours()
        deadlines = [member.session._deadline_call.getTime() for member in sessions]
        net.clock.advance(5)
        for member in sessions:
            member.session.dataReceived(box)
        self.assertEqual(ours(), before + 1)
        for member in sessions:
            member.session.dataReceived(box * 3)
        self.assertEqual(net.server.counters[("requests", "ping")], 12)
        self.assertEqual(ours(), before + 1)
        # The idle timers stay where they were: they look at the time of
        # the last request when they fire.
        self.assertEqual([member.session._deadline_call.getTime() for member in sessions], deadlines)

    def test_closed_session_leaves_no_timers(self):
        """
        A session closed (revoked, or gone) leaves none of its timers
        behind.
        """
        net, (alice, bob, carol) = self.three()
        sessions = [alice.session, bob.session]
        alice.session.close("revoked")
        bob.session.transport.abortConnection()
        for conn in (alice, bob):
            conn.pump.flush()
        self.assertEqual([c for c in net.clock.getDelayedCalls() if getattr(c.func, "__self__", None) in sessions],
                         [])

    def test_turns_taken(self):
        """
        A session that sent many requests at once is handled a few at a
        time (BOXES_PER_TURN and one), one reactor turn each, so others get
        theirs in between; all are answered.
        """
        net, (alice, bob, carol) = self.three()
        session = alice.session
        box = amp.AmpBox(_command=b"Ping", _ask=b"1").serialize()
        for i in range(40):
            session.dataReceived(box)
        handled = net.server.counters[("requests", "ping")]
        self.assertEqual(handled, session.BOXES_PER_TURN + 1)
        self.assertTrue(session.paused)
        # (A real reactor takes I/O between turns; task.Clock runs them all.)
        net.clock.advance(0)
        self.assertEqual(net.server.counters[("requests", "ping")], 40)
        self.assertFalse(session.paused)

    def test_member_table_cap(self):
        """
        Past max_members, new members are refused with TableFull; known
        members may still register again.
        """
        net = self.subnet(limits=Limits(max_members=2))
        net.join("alice", MAC_1)
        net.join("bob", MAC_2)
        self.assertRaises(TableFull, net.join, "carol", MAC_3)
        net.join("alice", MAC_1)

    def test_pair_key_table_cap(self):
        """
        Past max_pair_keys, new pairs are refused with TableFull; existing
        pairs are still served.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(max_pair_keys=1))
        self.pair_key(alice, MAC_2)
        self.failureResultOf(carol.run(request_pair_key(carol.client, MAC_1)), TableFull)
        self.assertEqual(self.pair_key(bob, MAC_1).peer_id, "alice")

    def test_oversize_request_closes_connection(self):
        """
        A request larger than max_request_bytes closes that connection; the
        key server goes on serving others.
        """
        net, (alice, bob, carol) = self.three(limits=Limits(max_request_bytes=1024))
        with LogCapture() as logs:
            d = alice.call(RequestPairKeyAs, peer_mac=MAC_2, member_id="x" * 2000, requester="")
        self.failureResultOf(d)
        self.assertFalse(alice.connected)
        self.assertTrue(any("over 1024 bytes" in line for line in logs.lines()))
        self.assertEqual(self.pair_key(bob, MAC_3).peer_id, "carol")

    def test_garbage_closes_connection(self):
        """
        Bytes that are not AMP close that connection only.
        """
        net, (alice, bob, carol) = self.three()
        # A key longer than AMP's 255-byte limit.
        alice.client.transport.write(b"\xff\xff" + b"x" * 300)
        alice.pump.flush()
        self.assertFalse(alice.connected)
        self.assertEqual(self.pair_key(bob, MAC_3).peer_id, "carol")


class PushTests(SubnetTestCase):
    """
    The key server pushes over the member's own connection.
    """

    def test_push_pair_key_reaches_both_holders(self):
        """
        A pushed pair key reaches every connected session of both holders,
        each with the other as peer.
        """
        net = self.subnet()
        heard = {m: RecordingListener() for m in ("alice", "bob")}
        alice, _ = net.join("alice", MAC_1, listener=heard["alice"])
        bob, _ = net.join("bob", MAC_2, listener=heard["bob"])
        grant = self.pair_key(alice, MAC_2)
        pair_key = self.successResultOf(net.store.pair_key("alice", "bob"))
        d = net.server.push_pair_key(pair_key)
        alice.pump.flush()
        bob.pump.flush()
        self.assertEqual(self.successResultOf(d), 2)
        (kind, to_alice), = heard["alice"].events
        # bob heard of the key first when alice's request created it.
        (_, on_issue), (kind, to_bob) = heard["bob"].events
        self.assertEqual(on_issue.key, grant.key)
        self.assertEqual((to_alice.peer_id, to_bob.peer_id), ("bob", "alice"))
        self.assertEqual(to_alice.key, grant.key)
        self.assertEqual(to_bob.key, grant.key)

    def test_purge(self):
        """
        A purge reaches the holder's listener.
        """
        net = self.subnet()
        heard = RecordingListener()
        alice, _ = net.join("alice", MAC_1, listener=heard)
        d = net.server.purge("alice", "bob", "revoked")
        alice.pump.flush()
        self.successResultOf(d)
        self.assertEqual(heard.events, [("purge", "bob", "revoked")])


class NoKeyMaterialInLogsTests(SubnetTestCase):
    """
    Key material never appears in a log line, repr or error.
    """

    def test_planted_key_never_logged(self):
        """
        With every new key set to a known value, a full session (admission,
        pair and group keys, refusals, a closed connection) logs nothing
        that contains it in any common encoding.
        """
        planted = bytes(range(32))
        forms = [planted, planted.hex(), planted.hex().upper(), repr(planted),
                 base64.b64encode(planted).decode(), planted.hex(":")]
        with LogCapture() as logs:
            net, (alice, bob, carol) = self.three(keygen=lambda: SecretKey(planted))
            grant = self.pair_key(alice, MAC_2)
            self.assertEqual(grant.key.material, planted)
            self.successResultOf(bob.run(request_group_key(bob.client)))
            self.failureResultOf(alice.run(request_pair_key(alice.client, b"\x02" * 6)), UnknownPeer)
            self.assertRaises(MacInUse, net.join, "carol", MAC_1)
            carol.client.transport.write(b"\xff\xff" + b"x" * 300)
            carol.pump.flush()
            reprs = [repr(grant), str(grant), repr(grant.key),
                     repr(self.successResultOf(net.store.pair_key("alice", "bob"))),
                     repr(net.server)]
        lines = logs.lines() + reprs
        self.assertTrue(logs.events)
        for line in lines:
            for form in forms:
                self.assertNotIn(str(form) if not isinstance(form, bytes) else form.decode("latin-1"), line)


class IncarnationTests(SubnetTestCase):
    """
    Every registration gets a higher incarnation, kept across restarts.
    """

    def test_incarnation_rises(self):
        """
        A member registering again gets a strictly higher incarnation;
        another member's count is its own.
        """
        path, master = self.mktemp(), self.mktemp()
        store = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(store.open())
        net = self.subnet(store=store)
        seen = [net.join("alice", MAC_1)[1].incarnation for _ in range(3)]
        self.assertEqual(seen, [1, 2, 3])
        self.assertEqual(net.join("bob", MAC_2)[1].incarnation, 1)
        self.successResultOf(store.close())
        again = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(again.open())
        net.restart(again)
        self.assertEqual(net.join("alice", MAC_1)[1].incarnation, 4)
        self.successResultOf(again.close())


class ListPeersTests(SubnetTestCase):
    """
    Members learn the others (for broadcast over carriers that cannot
    broadcast), page by page.
    """

    def test_lists_others_in_pages(self):
        """
        Every other member is listed once, with MAC and endpoint; never the
        asker; across several pages.
        """
        from securelan.client import list_peers
        from securelan.protocol import ListPeers

        self.patch(ListPeers, "PAGE", 2)
        names = [f"m{i}" for i in range(5)]
        net = self.subnet(members=names)
        conns = {}
        for i, name in enumerate(names):
            conns[name], _ = net.join(name, bytes([2, 0, 0, 0, 1, i]), endpoint=f"127.0.0.{i + 1}:4789")
        peers = self.successResultOf(conns["m2"].run(list_peers(conns["m2"].client)))
        self.assertEqual([p.member_id for p in peers], ["m0", "m1", "m3", "m4"])
        self.assertEqual(peers[0].mac, bytes([2, 0, 0, 0, 1, 0]))
        self.assertEqual(peers[3].endpoint, "127.0.0.5:4789")

    def test_needs_registration(self):
        """
        An unregistered connection cannot list members.
        """
        from securelan.client import list_peers

        net = self.subnet()
        conn = net.connect("alice")
        self.failureResultOf(conn.run(list_peers(conn.client)), NotRegistered)


class PushOnIssueTests(SubnetTestCase):
    """
    A newly issued pair key reaches the peer before the requester's first
    frame does.
    """

    def test_peer_hears_of_new_key(self):
        """
        When alice's request creates K(alice, bob), bob is pushed the key,
        with alice as peer; again only when something changed or alice says
        she holds the current epoch.
        """
        net = self.subnet()
        heard = RecordingListener()
        alice, _ = net.join("alice", MAC_1)
        bob, _ = net.join("bob", MAC_2, listener=heard)
        grant = self.pair_key(alice, MAC_2)
        net.flush()
        (kind, pushed), = heard.events
        self.assertEqual((kind, pushed.peer_id, pushed.peer_mac), ("pair_key", "alice", MAC_1))
        self.assertEqual(pushed.key, grant.key)
        # Asking again pushes nothing new; asking with the current epoch (the
        # seed's "the peer is behind") pushes again.  Both are answered on
        # the session's quick path (the key is issued).
        self.assertEqual(self.pair_key(alice, MAC_2), grant)
        net.flush()
        self.assertEqual(len(heard.events), 1)
        self.assertEqual(self.pair_key(alice, MAC_2, epoch=grant.epoch), grant)
        net.flush()
        self.assertEqual([g.key for _, g in heard.events], [grant.key, grant.key])
        self.assertEqual([(kind, g.peer_id) for kind, g in heard.events], [("pair_key", "alice")] * 2)

    def test_peer_told_without_question(self):
        """
        The push on issue asks no answer: bob is sent a box without a
        question tag and sends nothing back; the key server waits for
        nothing.  A rekey's push still asks (acknowledgements are kept).
        """
        net = self.subnet()
        alice, _ = net.join("alice", MAC_1)
        bob, _ = net.join("bob", MAC_2, listener=RecordingListener())
        received = []
        original = bob.client.ampBoxReceived

        def seen(box):
            received.append(dict(box))
            return original(box)

        bob.client.ampBoxReceived = seen
        sent_back = []
        bob.session.dataReceived = sent_back.append
        self.pair_key(alice, MAC_2)
        net.flush()
        [push] = received
        self.assertEqual(push[b"_command"], b"PushPairKey")
        self.assertNotIn(b"_ask", push)
        self.assertEqual(sent_back, [])
        self.assertEqual(bob.session._outstandingRequests, {})
        del bob.session.dataReceived
        net.server.rekey_pair("alice", "bob")
        net.flush()
        self.assertIn(b"_ask", received[-1])
        self.assertEqual(net.server.acknowledged[("alice", "bob")], {"alice": 2, "bob": 2})


class SessionLifeTests(SubnetTestCase):
    """
    Sessions that stall or fall silent are closed; one that goes away
    while registering leaves nothing behind.
    """

    def test_register_timeout(self):
        """
        A connection that does not register in time is closed.
        """
        net = self.subnet(limits=Limits(register_timeout=5))
        conn = net.connect("alice")
        net.clock.advance(4)
        self.assertTrue(conn.connected)
        net.clock.advance(2)
        conn.pump.flush()
        self.assertFalse(conn.connected)

    def test_idle_timeout_and_ping(self):
        """
        A registered session that pings stays; a silent one is closed.
        """
        from securelan.protocol import Ping

        net = self.subnet(limits=Limits(idle_timeout=60))
        conn, _ = net.join("alice", MAC_1)
        for _ in range(5):
            net.clock.advance(40)
            self.successResultOf(conn.call(Ping))
        self.assertTrue(conn.connected)
        net.clock.advance(61)
        conn.pump.flush()
        self.assertFalse(conn.connected)
        self.assertNotIn("alice", net.server.sessions)

    def test_closed_while_registering(self):
        """
        A registration that completes after its connection closed does not
        leave a session behind.
        """
        from securelan.protocol import Register

        held = []
        holding = [False]

        def runner(f, *args):
            if holding[0]:
                d = defer.Deferred()
                held.append((d, f, args))
                return d
            return run_synchronously(f, *args)

        store = SQLiteStore(":memory:", None, runner=runner)
        self.successResultOf(store.open())
        net = self.subnet(store=store)
        conn = net.connect("alice")
        holding[0] = True
        conn.client.callRemote(Register, version=PROTOCOL_VERSION, mac=MAC_1, role="client",
                               endpoint="").addErrback(lambda f: None)
        conn.pump.flush()
        self.assertEqual(len(held), 1)
        conn.client_tls.transport.loseConnection()
        conn.pump.flush()
        holding[0] = False
        d, f, args = held[0]
        run_synchronously(f, *args).chainDeferred(d)
        self.assertEqual(net.server.sessions, {})

    def test_incarnation_kept_on_reconnect(self):
        """
        An agent that reconnects with the incarnation it uses keeps it; one
        that claims an older one gets a new, higher one.
        """
        net = self.subnet()
        conn, first = net.join("alice", MAC_1)
        again = self.successResultOf(net.connect("alice").run(
            register(net.connections[-1].client, MAC_1, "client", ":4789", first.incarnation)))
        self.assertEqual(again.incarnation, first.incarnation)
        net.join("alice", MAC_1)  # a new agent: incarnation + 1
        stale = self.successResultOf(net.connect("alice").run(
            register(net.connections[-1].client, MAC_1, "client", ":4789", first.incarnation)))
        self.assertEqual(stale.incarnation, first.incarnation + 2)

    def test_classical_key_exchange_refused(self):
        """
        A member whose TLS offers only a classical key exchange is refused:
        keys never travel without the post-quantum hybrid.
        """
        from OpenSSL._util import lib
        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
        from zope.interface import implementer

        net = self.subnet()
        inner = net.member_credentials("alice").client_options("keyserver.test")

        @implementer(IOpenSSLClientConnectionCreator)
        class ClassicalOnly:
            def clientConnectionForTLS(self, tls):
                connection = inner.clientConnectionForTLS(tls)
                lib.SSL_set1_curves_list(connection._ssl, b"X25519")
                return connection

        with LogCapture() as logs:
            conn = net.connect(client_options=ClassicalOnly())
        self.assertFalse(conn.connected)
        self.assertTrue(any("is not X25519MLKEM768" in line for line in logs.lines()))


class RevocationTests(SubnetTestCase):
    """
    A revoked member is refused, its keys destroyed, its peers told, and the
    group key replaced.
    """

    def test_revoke(self):
        """
        Revoking carol closes her session, refuses her certificate from then
        on, destroys K(alice, carol) and K(bob, carol), tells alice and bob
        to purge them, and pushes everyone else a new group key.
        """
        heard = {m: RecordingListener() for m in ("alice", "bob")}
        net = self.subnet()
        alice, _ = net.join("alice", MAC_1, listener=heard["alice"])
        bob, _ = net.join("bob", MAC_2, listener=heard["bob"])
        carol, _ = net.join("carol", MAC_3)
        self.pair_key(carol, MAC_1)
        self.pair_key(carol, MAC_2)
        self.pair_key(alice, MAC_2)
        net.flush()
        for listener in heard.values():
            listener.events.clear()
        old_group = net.server.group_key()
        with LogCapture() as logs:
            summary = self.successResultOf(net.server.revoke("carol", "laptop stolen"))
            net.flush()
        self.assertEqual(summary["pair_keys_destroyed"], 2)
        self.assertEqual(summary["peers_told"], ["alice", "bob"])
        self.assertFalse(carol.connected)
        self.assertIsNone(self.successResultOf(net.store.pair_key("alice", "carol")))
        self.assertIsNotNone(self.successResultOf(net.store.pair_key("alice", "bob")))
        for name in ("alice", "bob"):
            kinds = [e[0] for e in heard[name].events]
            self.assertIn(("purge", "carol", "carol was revoked"), heard[name].events)
            self.assertIn("group_key", kinds)
            group = [e[1] for e in heard[name].events if e[0] == "group_key"][0]
            self.assertEqual(group.epoch, old_group.epoch + 1)
            self.assertNotEqual(group.key, old_group.key)
        self.assertTrue(any("revoked member carol" in line for line in logs.lines()))
        # From now on: refused at once, and nobody can reach her MAC.
        with LogCapture() as logs:
            again = net.connect("carol")
        self.assertFalse(again.connected)
        self.assertTrue(any("carol is revoked" in line for line in logs.lines()))
        self.failureResultOf(alice.run(request_pair_key(alice.client, MAC_3)), UnknownPeer)

    def test_revocation_survives_restart(self):
        """
        A restarted key server still refuses a revoked member.
        """
        path, master = self.mktemp(), self.mktemp()
        store = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(store.open())
        net = self.subnet(store=store)
        net.join("carol", MAC_3)
        self.successResultOf(net.server.revoke("carol"))
        self.successResultOf(store.close())
        again = SQLiteStore(path, master, runner=run_synchronously)
        self.successResultOf(again.open())
        net.restart(again)
        self.assertFalse(net.connect("carol").connected)
        self.assertEqual(net.server.group_key().epoch, 2)
        self.successResultOf(again.close())


class ForeignMacTests(SubnetTestCase):
    """
    MACs no member holds go to the subnet's gateway (the seed's ID-IP list).
    """

    PRINTER = parse_mac("0a:00:00:00:00:99")

    def test_no_gateway(self):
        """
        Without a gateway, an unknown MAC is a clear "unknown peer".
        """
        net, (alice, bob, carol) = self.three()
        f = self.failureResultOf(alice.run(request_pair_key(alice.client, self.PRINTER)), UnknownPeer)
        self.assertIn("the subnet has no gateway", f.getErrorMessage())

    def test_gateway_fronts_unknown_macs(self):
        """
        With a gateway, alice asking for the printer gets K(alice, gw) held
        against the printer's MAC; the binding is kept (bob is sent to the
        same gateway); the gateway itself cannot ask for foreign MACs.
        """
        net = self.subnet()
        net.pki.add_member("gw", roles=("gateway",))
        alice, _ = net.join("alice", MAC_1)
        bob, _ = net.join("bob", MAC_2)
        gw, _ = net.join("gw", parse_mac("02:00:00:00:00:0f"), role="gateway")
        grant = self.pair_key(alice, self.PRINTER)
        self.assertEqual((grant.peer_id, grant.peer_mac, grant.peer_role), ("gw", self.PRINTER, "gateway"))
        direct = self.pair_key(alice, parse_mac("02:00:00:00:00:0f"))
        self.assertEqual(direct.key, grant.key)
        self.assertEqual(self.pair_key(bob, self.PRINTER).peer_id, "gw")
        self.assertEqual(self.successResultOf(net.store.foreign_mac(self.PRINTER, net.clock.seconds())), "gw")
        self.failureResultOf(gw.run(request_pair_key(gw.client, parse_mac("0a:00:00:00:00:98"))), UnknownPeer)

    def test_foreign_table_cap(self):
        """
        The table of MACs behind gateways is bounded.
        """
        net = self.subnet(limits=Limits(max_foreign_macs=2))
        net.pki.add_member("gw", roles=("gateway",))
        alice, _ = net.join("alice", MAC_1)
        net.join("gw", parse_mac("02:00:00:00:00:0f"), role="gateway")
        for i in range(2):
            self.pair_key(alice, bytes([10, 0, 0, 0, 1, i]))
        self.failureResultOf(alice.run(request_pair_key(alice.client, bytes([10, 0, 0, 0, 1, 9]))), TableFull)


class MemberTrustTests(SubnetTestCase):
    def test_member_refuses_key_server_of_another_ca(self):
        """
        A member refuses a key server whose certificate another CA signed,
        even with the right name.
        """
        from securelan.tls import Credentials

        net = self.subnet()
        other = make_pki(self.mktemp(), subnet="other", members=())
        own = net.member_credentials("alice")
        # alice trusts only the other subnet's CA.
        creds = Credentials(ca=Credentials.load(other.ca_cert, other.keyserver_cert, other.keyserver_key).ca,
                            own=own.own)
        conn = net.connect(credentials=creds)
        self.assertFalse(conn.connected)


class RekeyPolicyTests(SubnetTestCase):
    def test_lifetimes(self):
        """
        Pairs past their lifetime and a group key past its lifetime are
        replaced by the timer's check; a group lifetime of 0 never rekeys.
        """
        net, (alice, bob, carol) = self.three()
        net.server.pair_key_lifetime = 100
        self.pair_key(alice, MAC_2)
        self.pair_key(alice, MAC_3)
        pair = self.successResultOf(net.store.pair_key("alice", "bob"))
        self.assertEqual(self.successResultOf(net.server.rekey_due()), 0)
        net.clock.advance(101)
        self.assertEqual(self.successResultOf(net.server.rekey_due()), 2)
        self.assertEqual(self.successResultOf(net.store.pair_key("alice", "bob")).epoch, pair.epoch + 1)
        self.assertEqual(net.server.group_key().epoch, 1)
        net.server.group_key_lifetime = 50
        self.successResultOf(net.server.rekey_due())
        self.assertEqual(net.server.group_key().epoch, 2)


class CountRekeyTests(SubnetTestCase):
    """
    Rekey by packet or byte count: senders ask when they reach the key
    server's limits; the key server rekeys once per epoch, at most once a
    second per pair.
    """

    def ask(self, conn, peer_id, epoch):
        from securelan.client import request_rekey

        outcome = []
        conn.run(request_rekey(conn.client, peer_id, epoch)).addBoth(outcome.append)
        return outcome[0]

    def test_limits_in_admission(self):
        net = self.subnet()
        net.server.pair_key_max_packets = 1000
        net.server.pair_key_max_bytes = 10**9
        _, admission = net.join("alice", MAC_1)
        self.assertEqual((admission.rekey_after_packets, admission.rekey_after_bytes), (1000, 10**9))

    def test_rekey_once_per_epoch(self):
        """
        The first sender to ask rekeys the pair (both holders are pushed
        epoch 2); the other end asking for the same epoch after it gets
        epoch 2 and no second rekey; asking again at once for epoch 2 is
        held back for a second.
        """
        net = self.subnet()
        heard = RecordingListener()
        alice, _ = net.join("alice", MAC_1)
        bob, _ = net.join("bob", MAC_2, listener=heard)
        self.pair_key(alice, MAC_2)
        net.flush()
        self.assertEqual(self.ask(alice, "bob", 1), 2)
        self.assertEqual(self.ask(bob, "alice", 1), 2)
        net.flush()
        self.assertEqual([g.epoch for kind, g in heard.events if kind == "pair_key"][-1], 2)
        self.assertEqual(self.ask(alice, "bob", 2), 2)
        net.clock.advance(1)
        self.assertEqual(self.ask(alice, "bob", 2), 3)
        self.assertEqual(net.server.counters[("rekeys", "count")], 2)

    def test_refusals(self):
        net, (alice, bob, carol) = self.three()
        self.pair_key(alice, MAC_2)
        self.ask(alice, "bob", 7).trap(BadRequest)
        self.ask(alice, "carol", 1).trap(UnknownPeer)
        self.assertEqual(self.successResultOf(net.store.pair_key("alice", "bob")).epoch, 1)


class Layer3Tests(SubnetTestCase):
    """
    Layer 3: the key server keeps ID <-> IP as it keeps ID <-> MAC, and
    answers key requests by the peer's overlay IP.
    """

    def join_l3(self, net, member_id, mac, addresses, listener=None):
        conn = net.connect(member_id, listener=listener)
        outcome = []
        conn.run(register(conn.client, mac, "client", ":4789", addresses=addresses)).addBoth(outcome.append)
        return conn, outcome[0]

    def by_address(self, conn, address, **kw):
        from securelan.client import request_pair_key_by_address

        outcome = []
        conn.run(request_pair_key_by_address(conn.client, address, **kw)).addBoth(outcome.append)
        return outcome[0]

    def test_key_by_address(self):
        """
        alice asks by bob's overlay IP and gets K(alice, bob), the one she
        would get by his MAC, with his addresses; bob is pushed the key with
        alice's addresses (what she may send from).
        """
        from securelan.protocol import Admission

        net = self.subnet()
        heard = RecordingListener()
        alice, admitted = self.join_l3(net, "alice", MAC_1, ["10.9.0.1"])
        self.assertIsInstance(admitted, Admission)
        self.join_l3(net, "bob", MAC_2, ["10.9.0.2", "fd00::2"], listener=heard)
        grant = self.by_address(alice, "10.9.0.2")
        self.assertEqual((grant.peer_id, grant.peer_mac, grant.peer_addresses),
                         ("bob", MAC_2, ("10.9.0.2", "fd00::2")))
        self.assertEqual(self.pair_key(alice, MAC_2).key, grant.key)
        self.assertEqual(self.by_address(alice, "fd00:0::2").key, grant.key)
        net.flush()
        pushed = [g for kind, g in heard.events if kind == "pair_key"]
        self.assertEqual(pushed[0].peer_addresses, ("10.9.0.1",))

    def test_unknown_address(self):
        net = self.subnet()
        alice, _ = self.join_l3(net, "alice", MAC_1, ["10.9.0.1"])
        failure = self.by_address(alice, "10.9.0.77")
        failure.trap(UnknownPeer)
        self.assertIn("10.9.0.77", failure.getErrorMessage())

    def test_address_taken(self):
        """
        An address held by another member is refused (as a held MAC is):
        a member cannot take over another's traffic by claiming its IP.
        """
        from securelan.errors import AddressInUse

        net = self.subnet()
        self.join_l3(net, "alice", MAC_1, ["10.9.0.1"])
        _, outcome = self.join_l3(net, "bob", MAC_2, ["10.9.0.1"])
        outcome.trap(AddressInUse)

    def test_bad_addresses(self):
        net = self.subnet()
        for addresses in (["10.9.0.300"], ["224.0.0.1"], ["127.0.0.1"], ["0.0.0.0"], ["fd00::5%x"],
                          [f"10.9.1.{i}" for i in range(17)]):
            _, outcome = self.join_l3(net, "alice", MAC_1, addresses)
            outcome.trap(BadRequest)
        alice, _ = self.join_l3(net, "alice", MAC_1, ["10.9.0.1"])
        self.by_address(alice, "not an address").trap(BadRequest)
