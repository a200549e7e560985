# -*- test-case-name: tests.test_cli -*-
"""
The operator's command line, C{securelan}.

Each top-level command lives in one C{_add_<name>(subparsers)} function that
declares its arguments and sets C{func} to the function that runs it; to add
a command, write such a function and call it from L{build_parser}.  A C{func}
takes the parsed arguments and returns the exit status.

Expected failures (L{PKIError}, L{AddressError}) are reported as one line on
stderr with exit status 2, never as a traceback.
"""

import argparse
import json
import sys

from .addresses import AddressError
from .pki import (
    PKIError,
    create_ca,
    describe,
    issue_keyserver,
    issue_member,
    load_certificate,
)
from .records import ROLES

PROG = "securelan"

#: Exit status of a command that failed for a reason it reported.
EXIT_ERROR = 2

#: Failures that are the operator's to fix, reported without a traceback.
EXPECTED_ERRORS = (PKIError, AddressError)


def build_parser() -> argparse.ArgumentParser:
    """
    The parser of the whole C{securelan} command line.
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Operate a securelan subnet: key-server network encryption."
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_pki(subparsers)
    _add_demo(subparsers)
    _add_status(subparsers)
    _add_keyserver_commands(subparsers)
    _add_doctor(subparsers)
    return parser


def main(argv=None) -> int:
    """
    Run the C{securelan} command line and return its exit status.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # argparse exits for --help and usage errors; callers get a status
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    try:
        return args.func(args)
    except EXPECTED_ERRORS as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


# securelan pki


def _add_pki(subparsers) -> None:
    pki = subparsers.add_parser(
        "pki",
        help="make and inspect the subnet's certificates",
        description="Make and inspect the subnet's certificates.",
    )
    commands = pki.add_subparsers(title="pki commands", metavar="PKI_COMMAND", required=True)

    init_ca = commands.add_parser(
        "init-ca",
        help="create the subnet's CA",
        description="Create the subnet's certificate authority (ca.pem, ca.key) in DIR.",
    )
    init_ca.add_argument("--dir", required=True, help="directory to write to (created if absent)")
    init_ca.add_argument("--subnet", required=True, help="the subnet's name")
    _add_days(init_ca, 3650)
    init_ca.set_defaults(func=_pki_init_ca)

    keyserver = commands.add_parser(
        "keyserver",
        help="issue a key-server certificate",
        description="Issue a key-server certificate (NAME.pem, NAME.key) from the CA in DIR.",
    )
    keyserver.add_argument("--dir", required=True, help="directory holding ca.pem and ca.key")
    keyserver.add_argument("--name", required=True, help="the key server's DNS name or IP address")
    _add_days(keyserver, 825)
    keyserver.set_defaults(func=_pki_keyserver)

    member = commands.add_parser(
        "member",
        help="issue a member certificate",
        description="Issue a member certificate (ID.pem, ID.key) from the CA in DIR.",
    )
    member.add_argument("--dir", required=True, help="directory holding ca.pem and ca.key")
    member.add_argument(
        "--id", required=True, dest="member_id", metavar="ID", help="the member ID"
    )
    member.add_argument(
        "--mac",
        action="append",
        default=[],
        dest="macs",
        metavar="MAC",
        help="a MAC the member may use (repeatable; none allows any MAC)",
    )
    member.add_argument(
        "--role",
        action="append",
        choices=ROLES,
        dest="roles",
        help="a role the member may take (repeatable; default client)",
    )
    _add_days(member, 825)
    member.set_defaults(func=_pki_member)

    show = commands.add_parser(
        "show",
        help="describe a certificate",
        description="Describe a certificate: subject, validity, fingerprint, identity.",
    )
    show.add_argument("cert", metavar="CERT", help="a PEM certificate file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_pki_show)


def _add_days(parser, default: int) -> None:
    parser.add_argument(
        "--days",
        type=_positive_int,
        metavar="N",
        default=default,
        help=f"days of validity (default {default})",
    )


def _wrote(*paths: str) -> None:
    for path in paths:
        print(f"wrote {path}")


def _pki_init_ca(args) -> int:
    _wrote(*create_ca(args.dir, args.subnet, days=args.days))
    return 0


def _pki_keyserver(args) -> int:
    _wrote(*issue_keyserver(args.dir, args.name, days=args.days))
    return 0


def _pki_member(args) -> int:
    paths = issue_member(
        args.dir,
        args.member_id,
        days=args.days,
        macs=args.macs,
        roles=args.roles or ("client",),
    )
    _wrote(*paths)
    return 0


def _pki_show(args) -> int:
    info = describe(load_certificate(args.cert))
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    member = info.pop("member", None)
    for key, value in info.items():
        print(f"{key}: {_text(value)}")
    if member is not None:
        print(f"member: {member['member_id']}")
        print(f"macs: {_text(member['macs']) or 'any'}")
        print(f"roles: {_text(member['roles'])}")
    return 0


def _text(value) -> str:
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _add_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="build an encrypted LAN in network namespaces and show it working (root)",
        description="Build a switch, a key server and three member hosts in network namespaces, "
        "run real agents, show ping and a TCP transfer working while the wire carries only "
        "ciphertext, then remove everything.  Needs root.  With --keyserver-only: a key server "
        "and three members on loopback (no root), showing that pair keys are bound to both "
        "members' IDs.",
    )
    demo.add_argument("--carrier", choices=("udp", "ethernet"), default="udp",
                      help="how the agents carry frames (default udp)")
    demo.add_argument("--keyserver-only", action="store_true",
                      help="only the key server and members on loopback; no root needed")
    demo.add_argument("--dir", help="with --keyserver-only: work in this folder")
    demo.add_argument("--keep", action="store_true", help="with --keyserver-only: keep the folder")
    demo.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    if args.keyserver_only:
        from . import demo

        return demo.main(args.dir, args.keep)
    from . import lan_demo

    return lan_demo.run(args.carrier)


def _add_status(subparsers) -> None:
    from .config import DEFAULT_STATUS_SOCKET

    status = subparsers.add_parser(
        "status",
        help="show a running agent's key servers, peers, keys and counters",
        description="Ask a running agent over its status socket: key servers and whether "
        "connected; each peer's ID, MAC, endpoint, key epoch, traffic and drops by reason; "
        "pending frames; the group key's epoch.",
    )
    status.add_argument("--socket", help=f"the agent's status socket (default {DEFAULT_STATUS_SOCKET}, "
                        "or the one in --config)")
    status.add_argument("--config", help="read the status socket's path from this agent config")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_run_status)


def _run_status(args) -> int:
    from .agent.status import format_status
    from .config import DEFAULT_STATUS_SOCKET, ConfigError, load_agent_config

    path = args.socket
    try:
        if path is None and args.config:
            try:
                path = load_agent_config(args.config).status_socket
            except ConfigError as e:
                raise _CLIError(str(e)) from None
        status = _ask(path or DEFAULT_STATUS_SOCKET, "status")
    except _CLIError as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return 0


def _keyserver_socket(args):
    from .config import DEFAULT_ADMIN_SOCKET, ConfigError, load_keyserver_config

    if args.socket:
        return args.socket
    if args.config:
        try:
            return load_keyserver_config(args.config).admin_socket or DEFAULT_ADMIN_SOCKET
        except ConfigError as e:
            raise _CLIError(str(e)) from None
    return DEFAULT_ADMIN_SOCKET


class _CLIError(Exception):
    """
    A command failed for a reason it reports in one line.
    """


def _ask(path, command, **arguments):
    """
    One control request, run to completion; the result, or L{_CLIError}.
    """
    from twisted.internet import task

    from .control import ask_control

    outcome = []

    def ask(reactor):
        return ask_control(reactor, path, command, **arguments).addBoth(outcome.append)

    try:
        task.react(ask)
    except SystemExit:
        pass
    if not outcome:
        raise _CLIError(f"no answer from {path}")
    if hasattr(outcome[0], "getErrorMessage"):
        raise _CLIError(f"{path}: {outcome[0].getErrorMessage()}")
    return outcome[0]


def _add_keyserver_commands(subparsers) -> None:
    from .config import DEFAULT_ADMIN_SOCKET

    def common(parser):
        parser.add_argument("--socket", help=f"the key server's admin socket (default {DEFAULT_ADMIN_SOCKET}, "
                            "or the one in --config)")
        parser.add_argument("--config", help="read the admin socket's path from this key server config")
        parser.add_argument("--json", action="store_true", help="print JSON")

    members = subparsers.add_parser("members", help="list the members a key server knows",
                                    description="Every registered member: ID, MAC, role, endpoint, "
                                    "incarnation, and whether it is connected now.")
    common(members)
    members.set_defaults(func=_run_members)
    keys = subparsers.add_parser("keys", help="list the keys a key server holds (metadata only)",
                                 description="The group key's epoch and every pair key's members, epoch, "
                                 "age and fingerprint. Never key material.")
    common(keys)
    keys.set_defaults(func=_run_keys)
    revoke = subparsers.add_parser("revoke", help="revoke a member for good",
                                   description="Refuse the member's certificate from now on, close its "
                                   "sessions, destroy its pair keys, tell its peers to purge them and "
                                   "replace the group key.")
    revoke.add_argument("member", help="the member ID to revoke")
    revoke.add_argument("--reason", default="", help="recorded with the revocation")
    common(revoke)
    revoke.set_defaults(func=_run_revoke)
    rekey = subparsers.add_parser("rekey", help="replace pair keys now",
                                  description="Replace the key of one pair (--pair ID1 ID2) or of every "
                                  "pair (--all) with a new key of the next epoch, pushed to both holders; "
                                  "the previous epoch is still accepted for a grace period.")
    which = rekey.add_mutually_exclusive_group(required=True)
    which.add_argument("--pair", nargs=2, metavar="ID", help="the two member IDs")
    which.add_argument("--all", action="store_true", help="every pair")
    which.add_argument("--netkey", metavar="SUBNET",
                       help="the NETKEY of the link to SUBNET (on the key server that leads the link)")
    common(rekey)
    rekey.set_defaults(func=_run_rekey)


def _run_admin(args, command, show, **arguments):
    try:
        result = _ask(_keyserver_socket(args), command, **arguments)
    except _CLIError as e:
        print(f"{PROG}: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(result, indent=2, sort_keys=True) if args.json else show(result))
    return 0


def _run_members(args) -> int:
    def show(members):
        lines = [f"{'member':<20} {'mac':<17} {'role':<8} {'incarnation':>11}  {'connected':<9} endpoint"]
        for m in members:
            lines.append(f"{m['member_id']:<20} {m['mac']:<17} {m['role']:<8} {m['incarnation']:>11}  "
                         f"{'yes' if m['connected'] else 'no':<9} {m['endpoint']}")
        return "\n".join(lines)

    return _run_admin(args, "members", show)


def _run_keys(args) -> int:
    def show(keys):
        now = keys["now"]
        group = keys["group"]
        lines = [f"group key: epoch {group['epoch']}, {now - group['created_at']:.0f} s old, "
                 f"fingerprint {group['fingerprint']}",
                 f"{'pair':<40} {'epoch':>5} {'age':>10} {'next rekey':>12}  {'fingerprint':<16}  acknowledged"]
        for pair in keys["pairs"]:
            expires = pair["expires_at"]
            due = f"{expires - now:.0f} s" if expires else "never"
            acks = ", ".join(f"{who}@{epoch}" for who, epoch in sorted(pair.get("acknowledged", {}).items()))
            lines.append(f"{' - '.join(pair['members']):<40} {pair['epoch']:>5} "
                         f"{now - pair['created_at']:>8.0f} s {due:>12}  {pair['fingerprint']:<16}  {acks or '-'}")
        for link in keys.get("netkeys", []):
            due = f"{link['next_rekey']} s" if link.get("next_rekey") is not None else "-"
            lines.append(f"NETKEY with subnet {link['subnet']} ({link['role']}, "
                         f"{'connected' if link['connected'] else 'not connected'}): epoch {link['epoch']}, "
                         f"age {link['age'] if link['age'] is not None else '-'} s, next rekey {due}, "
                         f"fingerprint {link['fingerprint'] or '-'}; border {link['border'] or '?'}, "
                         f"prefixes {', '.join(link['prefixes']) or '-'}")
        return "\n".join(lines)

    return _run_admin(args, "keys", show)


def _run_revoke(args) -> int:
    def show(result):
        return (f"revoked {result['member_id']}: {result['pair_keys_destroyed']} pair keys destroyed, "
                f"peers told: {', '.join(result['peers_told']) or 'none'}; "
                f"group key now epoch {result['group_epoch']}")

    return _run_admin(args, "revoke", show, member=args.member, reason=args.reason)


def _run_rekey(args) -> int:
    def show(done):
        return "\n".join(f"rekeyed {' - '.join(p['members'])} to epoch {p['epoch']}" for p in done) \
            or "no pair keys"

    if args.netkey:
        return _run_admin(args, "rekey", show, netkey=args.netkey)
    return _run_admin(args, "rekey", show, pair=args.pair, all=args.all)


def _add_doctor(subparsers) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="check a key server's or an agent's configuration",
        description="Check a configuration: the file, the certificates (chain, expiry, key), the "
        "state it needs; for an agent also the right to create a TAP device and a TLS handshake "
        "with each key server (nothing is registered). Exit status 1 if a check fails.")
    which = doctor.add_mutually_exclusive_group(required=True)
    which.add_argument("--agent", metavar="CONFIG", help="an agent configuration")
    which.add_argument("--keyserver", metavar="CONFIG", help="a key server configuration")
    doctor.set_defaults(func=_run_doctor)


def _run_doctor(args) -> int:
    from twisted.internet import task

    from . import doctor

    if args.keyserver:
        checks = doctor.check_keyserver(args.keyserver)
    else:
        found = []

        def run(reactor):
            return doctor.check_agent(reactor, args.agent).addCallback(found.extend)

        try:
            task.react(run)
        except SystemExit:
            pass
        checks = found
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} checks passed, {len(failed)} failed")
    return 1 if failed else 0

if __name__ == "__main__":
    raise SystemExit(main())
