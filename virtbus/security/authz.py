"""Authorisation of every call an agent or the scheduler serves, and whose messages count.

The caller is the AMQP ``user_id`` its call arrived with: RabbitMQ refuses a message
whose ``user_id`` is not the publishing connection's user, so it names the login (a
password user, or a certificate's CN under SASL EXTERNAL), never what the sender claims.
A call without one is refused (``AUTH_DENIED``) whatever the policy says.

Two modes, chosen by whether the policy file exists:

- **enforcing** (``/etc/virtbus/policy.toml`` or the ``policy`` setting exists): every
  call is checked against it (:mod:`virtbus.security.policy`); ``migration.*`` (the
  ``migrate`` access class) only from a user with the ``scheduler`` role, whatever else
  grants it; heartbeats and events count only from the user named as the host they
  describe (``user_id == host``).
- **development** (no policy file): every authenticated user is an admin, and a warning
  says so at start. The dev broker has one user (``guest``) for everything, so heartbeats
  and events also count from the daemon's own user. A policy file that exists but cannot
  be read or parsed is an error at start, never a fall-back to this mode.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtbus.errors import AuthDenied
from virtbus.protocol.registry import Access, Op
from virtbus.security.policy import Decision, Owner, Policy, Request, load_policy
from virtbus.security.trust import publisher_trusted
from virtbus.settings import DEFAULT_POLICY

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_POLICY", "Authorizer"]
SCHEDULER_ROLE = "scheduler"
DECISION_CACHE = 65_536  # decisions remembered (cleared when full)


def no_user(op: str) -> AuthDenied:
    return AuthDenied(
        f"call {op} carries no user_id: the caller must set the AMQP user_id property "
        "to its login user (RabbitMQ checks it), and virtbus refuses anonymous calls"
    )


@dataclass(slots=True)
class Authorizer:
    """The check every served call passes (see the module docstring)."""

    policy: Policy | None  # None: development mode
    source: str  # the policy file, for messages
    own_user: str  # the daemon's own bus user (trusted as a publisher in dev mode)
    # Decisions by (user, op, host, target, owner): the policy never changes once loaded,
    # so a repeated call (the common case) costs a dict lookup, not a walk of its rules.
    _cache: dict[tuple[str, str, str, str | None, Owner], Decision] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, own_user: str) -> Authorizer:
        """Enforcing when ``path`` exists (INVALID_ARG if it is not a valid policy)."""
        if not path.exists():
            log.warning(
                "no policy file at %s: development mode, every authenticated bus user is "
                "an admin (write a policy to enforce one; see README 'Security')",
                path,
            )
            return cls(None, str(path), own_user)
        return cls(load_policy(path), str(path), own_user)

    @property
    def enforcing(self) -> bool:
        return self.policy is not None

    def decide(
        self,
        user: str | None,
        op: Op[Any, Any],
        host: str,
        target: str | None = None,
        owner: Owner = Owner.UNKNOWN,
    ) -> Decision:
        """The decision for one call, with the reason (which rule, or why none)."""
        if not user:
            return Decision(False, None, no_user(op).message)
        if self.policy is None:
            return Decision(True, None, f"development mode (no policy file at {self.source})")
        key = (user, op.name, host, target, owner)
        known = self._cache.get(key)
        if known is not None:
            return known
        decision = self._decide(user, op, host, target, owner)
        if len(self._cache) >= DECISION_CACHE:
            self._cache.clear()  # bounded; refilled by the calls that keep coming
        self._cache[key] = decision
        return decision

    def _decide(
        self, user: str, op: Op[Any, Any], host: str, target: str | None, owner: Owner
    ) -> Decision:
        assert self.policy is not None
        req = Request(user, op, host, target, owner)
        if op.access is Access.MIGRATE and SCHEDULER_ROLE not in self.policy.users.get(user, ()):
            return Decision(
                False,
                None,
                f"{user!r} may not call {op} on host {host!r}"
                + (f" for {target!r}" if target else "")
                + ": migration steps are accepted only from the scheduler role",
            )
        return self.policy.check(req)

    def check(
        self,
        user: str | None,
        op: Op[Any, Any],
        host: str,
        target: str | None = None,
        owner: Owner = Owner.UNKNOWN,
    ) -> None:
        """Raise AUTH_DENIED (naming user, op, host and target) unless allowed."""
        decision = self.decide(user, op, host, target, owner)
        if not decision.allowed:
            raise AuthDenied(decision.reason)

    def speaks_for(self, user: str | None, host: str) -> bool:
        """May a heartbeat or event from ``user`` describe ``host``?"""
        return publisher_trusted(user, host, self.own_user if self.policy is None else None)
