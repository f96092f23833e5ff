"""Authorisation cost per call: the policy check over a policy of 1,000 rules.

Target (issue 13): at most 50 µs median per check. Two policies of 1,000 rules each:

- ``spread``: 250 users with 4 rules each (host and domain globs, an ``except``, a deny),
  roles for them; the caller is one of them (what a real policy looks like);
- ``worst``: every rule for the caller's own role and the op it calls, so the check
  walks all 1,000 compiled rules (globs that do not match, then the last that does).

Each sample times a batch of checks through :meth:`Authorizer.decide` (what the agent
runs per call: the scheduler-only migration rule, then the policy): uncached (a target
never asked before, so the caller's rules are walked) and repeated (the decision cache);
the figures are medians per check. Run: ``.venv/bin/python -m tests.bench.policy_check [--force]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from tests.bench.common import add_force, check_load
from virtbus.protocol import ops
from virtbus.security.authz import Authorizer

RULES = 1000
BATCH = 2000
SAMPLES = 20


def spread_policy() -> str:
    users = "\n".join(f'u{i} = ["operator", "team{i % 10}"]' for i in range(250))
    rules = []
    for i in range(250):
        rules.append(
            f'[[rules]]\nuser = "u{i}"\nops = ["@lifecycle", "@read"]\n'
            f'hosts = ["rack{i % 7}-*", "edge-{i}"]\ntargets = ["app{i}-*", "web-{i}-?"]\n'
        )
        rules.append(f'[[rules]]\nuser = "u{i}"\nops = ["domain.*"]\nexcept = ["domain.reset"]\n'
                     f'targets = ["svc{i}-*"]\n')  # fmt: skip
        rules.append(f'[[rules]]\nrole = "team{i % 10}"\nops = ["@config"]\n'
                     f'targets = ["team{i % 10}-{i}-*"]\n')  # fmt: skip
        rules.append(f'[[rules]]\nuser = "u{i}"\nops = ["domain.destroy"]\n'
                     f'hosts = ["prod-*"]\neffect = "deny"\n')  # fmt: skip
    return f"[users]\n{users}\n\n" + "\n".join(rules)


def worst_policy() -> str:
    rules = [
        f'[[rules]]\nrole = "ops"\nops = ["domain.start"]\nhosts = ["h{i}-*"]\n'
        f'targets = ["t{i}-*", "x{i}?"]\n'
        for i in range(RULES - 1)
    ]
    rules.append('[[rules]]\nrole = "ops"\nops = ["domain.start"]\ntargets = ["web-*"]\n')
    return '[users]\nalice = ["ops"]\n\n' + "\n".join(rules)


def measure(authz: Authorizer, user: str, host: str, target: str) -> tuple[float, float, bool]:
    """Median µs per check, cold (a target never asked before: the policy's rules are
    walked) and warm (a repeated call: the decision cache), and the decision."""
    decide = authz.decide
    op = ops.DOMAIN_START
    allowed = decide(user, op, host, target).allowed
    cold, warm = [], []
    prefix = target[:-1]
    for s in range(SAMPLES):
        t0 = time.perf_counter()
        for i in range(BATCH // 20):  # fresh targets matching the same rule
            decide(user, op, host, f"{prefix}{s}-{i}")
        cold.append((time.perf_counter() - t0) / (BATCH // 20))
        t0 = time.perf_counter()
        for _ in range(BATCH):
            decide(user, op, host, target)
        warm.append((time.perf_counter() - t0) / BATCH)
    return statistics.median(cold) * 1e6, statistics.median(warm) * 1e6, allowed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_force(p)
    args = p.parse_args()
    check_load(args.force)
    with TemporaryDirectory() as tmp:
        for name, text, call in (
            ("spread", spread_policy(), ("u137", "rack4-node9", "app137-db")),
            ("worst", worst_policy(), ("alice", "node1", "web-1")),
        ):
            path = Path(tmp) / f"{name}.toml"
            path.write_text(text)
            t0 = time.perf_counter()
            authz = Authorizer.load(path, own_user="bench")
            load_ms = (time.perf_counter() - t0) * 1000
            assert authz.policy is not None
            rules = len(authz.policy.rules)
            cold, warm, allowed = measure(authz, *call)
            print(
                f"{name:6}: {rules} rules (incl. built-in), load+compile {load_ms:.0f} ms; "
                f"median per check: {cold:.2f} us uncached, {warm:.2f} us repeated "
                f"({'allowed' if allowed else 'denied'}; target <= 50 us)",
                flush=True,
            )
    check_load(True)  # the load after the run too


if __name__ == "__main__":
    main()
