"""Whose heartbeats and events count for a host: one rule for the daemons and the client.

Apart from :mod:`virtbus.security.authz` (which loads the policy) so that a client that
only reads what hosts publish (``virtbus list``, ``virtbus event``) imports no policy code.
"""

from __future__ import annotations


def publisher_trusted(user: str | None, host: str, *trusted: str | None) -> bool:
    """A message about ``host`` counts when its verified sender is that host's user, or a
    user in ``trusted`` (the reader's own user in a dev setup: it could have sent it
    itself; an operator-configured shared agent user)."""
    if not user:
        return False
    return user == host or user in trusted
