"""The call policy: roles, rules, owners, explanations, and refusing a bad policy file."""

from __future__ import annotations

import re

import pytest

from virtbus.errors import AuthDenied, InvalidArgument
from virtbus.security.policy import Owner, Request, parse_policy

POLICY = """
[users]
root = ["admin"]
ops1 = ["operator"]
eve = ["viewer"]
sched = ["scheduler"]
web = ["operator"]

[[rules]]
user = "web"
ops = ["@lifecycle"]
targets = ["web-*"]
effect = "deny"
hosts = ["prod-*"]

[[rules]]
role = "viewer"
ops = ["domain.start"]
targets = ["lab-*"]

[[rules]]
user = "ops1"
ops = ["domain.*"]
except = ["domain.destroy"]
effect = "deny"
hosts = ["frozen"]
"""


@pytest.fixture(scope="module")
def policy():  # type: ignore[no-untyped-def]
    return parse_policy(POLICY)


@pytest.mark.parametrize(
    ("request_", "allowed"),
    [
        (Request("root", "domain.undefine", "h", "anything", Owner.OTHER), True),
        (Request("root", "migration.perform", "h", "x"), True),
        (Request("eve", "domain.info", "h", "x"), True),
        (Request("eve", "domain.start", "h", "x"), False),  # a viewer reads only
        (Request("eve", "domain.start", "h", "lab-3"), True),  # ... unless a rule grants it
        (Request("ops1", "domain.start", "h", "x"), True),
        (Request("ops1", "domain.define", "h", "new", Owner.UNKNOWN), True),
        (Request("ops1", "domain.undefine", "h", "mine", Owner.SELF), True),
        (Request("ops1", "domain.undefine", "h", "theirs", Owner.OTHER), False),
        (Request("ops1", "domain.define", "h", "theirs", Owner.OTHER), False),  # no redefine
        (Request("ops1", "domain.undefine", "h", "nobodys", Owner.UNKNOWN), False),
        (Request("ops1", "migration.perform", "h", "x"), False),  # the scheduler's alone
        (Request("ops1", "domain.start", "frozen", "x"), False),  # a deny wins
        (Request("ops1", "domain.destroy", "frozen", "x"), True),  # ... but not its exception
        (Request("sched", "migration.perform", "h", "x"), True),
        (Request("sched", "host.set_draining", "h"), True),
        (Request("sched", "domain.undefine", "h", "x", Owner.OTHER), False),
        (Request("web", "domain.start", "prod-1", "web-7"), False),
        (Request("web", "domain.start", "dev-1", "web-7"), True),
        (Request("stranger", "domain.info", "h", "x"), False),  # nobody's role: nothing
    ],
)
def test_decisions(policy, request_: Request, allowed: bool) -> None:  # type: ignore[no-untyped-def]
    decision = policy.check(request_)
    assert decision.allowed is allowed, decision.reason


def test_a_denial_explains_itself(policy) -> None:  # type: ignore[no-untyped-def]
    denied = policy.check(Request("ops1", "domain.start", "frozen", "x"))
    assert (
        "denied by deny user:ops1 ops=domain.* except=domain.destroy hosts=frozen" in denied.reason
    )
    assert "rule 3" in denied.reason
    with pytest.raises(AuthDenied, match=r"'eve' may not call domain\.start on host 'h'"):
        policy.check(Request("eve", "domain.start", "h", "x")).raise_if_denied()
    assert "roles: viewer" in policy.check(Request("eve", "domain.start", "h", "x")).reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rules]]\nops = ['*']\n", "exactly one of user or role"),
        ("[[rules]]\nuser = 'a'\n", "ops is required"),
        ("[[rules]]\nuser = 'a'\nops = ['@nope']\n", "unknown access class '@nope'"),
        ("[[rules]]\nuser = 'a'\nops = ['*']\neffect = 'maybe'\n", "rules[1]"),
        ("[[rules]]\nuser = 'a'\nops = ['*']\ncolour = 'red'\n", "unknown key(s) colour"),
        ("[groups]\n", "unknown section(s) groups"),
        ("[users]\na = [1]\n", "users.a"),
        ("not toml = = \n", "not valid TOML"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_entry(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        parse_policy(text)
