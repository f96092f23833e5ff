"""``virtbus acl check USER OP [TARGET]``: explain what the policy decides, and why.

Read from the policy file itself (the same file every agent and the scheduler load), so
it needs no bus: an operator checks a policy before shipping it to the hosts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtbus.cli.output import emit_json, fields
from virtbus.settings import DEFAULT_POLICY

# policy.Owner's values, spelled here so that parsing never imports the policy engine
# (and with it every op declaration); tests/unit keeps the two equal
OWNERS = ("self", "other", "unknown")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("acl", help="the security policy: explain a decision (acl check)")
    verbs = p.add_subparsers(dest="acl_command", metavar="VERB", required=True)
    check = verbs.add_parser(
        "check", help="would USER be allowed OP (on TARGET)? prints the deciding rule"
    )
    check.add_argument("user", metavar="USER", help="a bus user (AMQP user_id, a cert's CN)")
    check.add_argument("op", metavar="OP", help="an op name, e.g. domain.start")
    check.add_argument("target", metavar="TARGET", nargs="?", help="the object's name")
    check.add_argument(
        "--host", default="*", help="the host the call goes to (default '*': no host rule applies)"
    )
    check.add_argument(
        "--owner",
        choices=OWNERS,
        default="unknown",
        help="who made the target (a domain, pool, volume or network): self (USER), other"
        " (another user), unknown (nobody recorded, or not made yet; the default)",
    )
    check.add_argument(
        "--policy",
        type=Path,
        default=DEFAULT_POLICY,
        help="the policy file (default %(default)s)",
    )
    check.set_defaults(func=acl_check, no_bus=True)


def acl_check(args: argparse.Namespace) -> int:
    """0 when allowed, 2 when denied (a denial is an answer, not an error)."""
    from virtbus.protocol.registry import lookup
    from virtbus.security.authz import Authorizer
    from virtbus.security.policy import Owner

    authz = Authorizer.load(args.policy, own_user="")
    op = lookup(args.op)
    decision = authz.decide(args.user, op, args.host, args.target, Owner(args.owner))
    roles = list(authz.policy.users.get(args.user, ())) if authz.policy is not None else []
    answer = {
        "user": args.user,
        "roles": roles,
        "op": op.name,
        "access": str(op.access),
        "host": args.host,
        "target": args.target,
        "kind": str(op.target),
        "owner": args.owner if args.target is not None else None,
        "allowed": decision.allowed,
        "rule": decision.rule.describe() if decision.rule is not None else None,
        "reason": decision.reason,
        "policy": str(args.policy) if authz.enforcing else None,
    }
    target = "-" if args.target is None else f"{op.target} {args.target} (owner: {args.owner})"
    if args.json:
        emit_json(answer)
    else:
        print(
            fields(
                [
                    ("Decision", "allowed" if decision.allowed else "denied"),
                    ("User", f"{args.user} (roles: {', '.join(roles) or 'none'})"),
                    ("Op", f"{op.name} ({op.access})"),
                    ("Host", args.host),
                    ("Target", target),
                    ("Rule", answer["rule"] or "-"),
                    ("Reason", decision.reason),
                ]
            )
        )
    return 0 if decision.allowed else 2
