"""RabbitMQ definitions (``rabbitmqctl import_definitions``) generated from the topology.

Generated, not hand-written, so the broker an operator prepares matches exactly what
agents and the scheduler declare (a mismatch in queue arguments would close their
channels). ``python -m virtbus.bus.definitions --vhost /virtbus > definitions.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from virtbus.bus.topology import (
    AUDIT_EXCHANGE,
    AUDIT_HISTORY,
    DEAD_LETTER,
    DEAD_LETTER_EXCHANGE,
    EVENT_HISTORY,
    EVENTS_EXCHANGE,
    EXCHANGES,
    RPC_EXCHANGE,
    SCHEDULER_ROUTE,
    call_queue_for,
)
from virtbus.errors import InvalidArgument

# Who may do what, as RabbitMQ permission regexes (configure, write, read).
# Agents declare their own call queue and subscriptions; clients only publish calls and
# read their own (server-named) subscription queues.
_EXCHANGES_RE = r"rpc|events|metrics|hosts|audit|dlx"
_SHARED_QUEUES_RE = r"dead|events\.history|audit\.history|sub\..*"
ROLES: dict[str, tuple[str, str, str]] = {
    # Everyone (re)declares the exchanges and the shared queues at connect.
    "virtbus-agent": (
        rf"^(virtbus\.({_EXCHANGES_RE}|{_SHARED_QUEUES_RE}|agent\..*)|amq\.gen.*)$",
        r"^(virtbus\..*|amq\.default)$",
        r"^(virtbus\..*|amq\.rabbitmq\.reply-to)$",
    ),
    "virtbus-scheduler": (
        rf"^(virtbus\.({_EXCHANGES_RE}|{_SHARED_QUEUES_RE}|scheduler)|amq\.gen.*)$",
        r"^(virtbus\..*|amq\.default)$",
        r"^(virtbus\..*|amq\.rabbitmq\.reply-to)$",
    ),
    # Clients send calls and read events, metrics, heartbeats; they serve no call queue.
    "virtbus-client": (
        rf"^(virtbus\.({_EXCHANGES_RE}|{_SHARED_QUEUES_RE})|amq\.gen.*)$",
        r"^(virtbus\.(rpc|dead|events\.history|audit\.history|sub\..*)|amq\.default)$",
        rf"^(virtbus\.({_EXCHANGES_RE}|{_SHARED_QUEUES_RE})|amq\.rabbitmq\.reply-to)$",
    ),
}


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = salt if salt is not None else os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


# Exchanges an agent publishes on only under its own name (topic permissions).
_OWN_KEY_EXCHANGES = ("virtbus.events", "virtbus.metrics", "virtbus.hosts", "virtbus.audit")


def host_permissions(host: str) -> tuple[str, str, str]:
    """(configure, write, read) of the agent whose bus user is ``host``: its own call queue
    and subscriptions only, never another host's queue (it could consume its calls)."""
    h = re.escape(host)
    return (
        rf"^(virtbus\.({_EXCHANGES_RE}|dead|events\.history|audit\.history|agent\.{h}"
        rf"|sub\.{h}\..*)|amq\.gen.*)$",
        rf"^(virtbus\.({_EXCHANGES_RE}|dead|events\.history|audit\.history|agent\.{h}"
        rf"|sub\.{h}\..*)|amq\.default)$",
        rf"^(virtbus\.({_EXCHANGES_RE}|events\.history|audit\.history|agent\.{h}"
        rf"|sub\.{h}\..*)|amq\.rabbitmq\.reply-to)$",
    )


def random_passwords(hosts: Sequence[str] = ()) -> dict[str, str]:
    """A fresh random password per user: nothing ships with a default password."""
    return {user: secrets.token_urlsafe(18) for user in (*ROLES, *hosts)}


def definitions(
    vhost: str,
    password: str | Mapping[str, str],
    salt: bytes | None = None,
    hosts: Sequence[str] = (),
) -> dict[str, Any]:
    """The definitions for ``vhost``; ``password``: one for every user, or one per user.

    ``hosts``: an agent user per host, named as the host (its heartbeats and events then
    count, see README "Security"), that reads only its own call queue and publishes on
    the topic exchanges only under its own name (topic permissions: keys start "HOST.").
    """
    roles = {**ROLES, **{h: host_permissions(h) for h in hosts}}
    passwords = password if isinstance(password, Mapping) else dict.fromkeys(roles, password)
    missing = set(roles) - set(passwords)
    if missing or not all(passwords.values()):
        raise InvalidArgument(f"no password for {', '.join(sorted(missing)) or 'a user'}")
    scheduler = call_queue_for(SCHEDULER_ROUTE)
    queues = [DEAD_LETTER, EVENT_HISTORY, AUDIT_HISTORY, scheduler]
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": user,
                "password_hash": password_hash(passwords[user], salt),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
            }
            for user in roles
        ],
        "permissions": [
            {"user": user, "vhost": vhost, "configure": c, "write": w, "read": r}
            for user, (c, w, r) in roles.items()
        ],
        "topic_permissions": [
            {"user": h, "vhost": vhost, "exchange": x, "write": rf"^{re.escape(h)}\.", "read": ".*"}
            for h in hosts
            for x in _OWN_KEY_EXCHANGES
        ],
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in EXCHANGES
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in queues
        ],
        "bindings": [
            {
                "source": DEAD_LETTER_EXCHANGE,
                "vhost": vhost,
                "destination": DEAD_LETTER.name,
                "destination_type": "queue",
                "routing_key": "",
                "arguments": {},
            },
            {
                "source": EVENTS_EXCHANGE,
                "vhost": vhost,
                "destination": EVENT_HISTORY.name,
                "destination_type": "queue",
                "routing_key": "#",
                "arguments": {},
            },
            {
                "source": AUDIT_EXCHANGE,
                "vhost": vhost,
                "destination": AUDIT_HISTORY.name,
                "destination_type": "queue",
                "routing_key": "#",
                "arguments": {},
            },
            {
                "source": RPC_EXCHANGE,
                "vhost": vhost,
                "destination": scheduler.name,
                "destination_type": "queue",
                "routing_key": SCHEDULER_ROUTE,
                "arguments": {},
            },
        ],
        "policies": [
            {
                # Subscription queues of dead clients must not pile up messages.
                "vhost": vhost,
                "name": "virtbus-subscriptions",
                "pattern": r"^virtbus\.sub\.",
                "apply-to": "queues",
                "priority": 0,
                "definition": {"max-length": 100000, "overflow": "drop-head"},
            },
            {
                # Agent queues of hosts gone for good are removed after a week unused.
                "vhost": vhost,
                "name": "virtbus-agent-queues",
                "pattern": r"^virtbus\.agent\.",
                "apply-to": "queues",
                "priority": 0,
                "definition": {"expires": 7 * 24 * 3600 * 1000},
            },
        ],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vhost", default="/virtbus")
    p.add_argument(
        "--password",
        default=os.environ.get("VIRTBUS_BROKER_PASSWORD"),
        help="one password for every virtbus user (default: $VIRTBUS_BROKER_PASSWORD; "
        "without either, a random password per user, printed once on stderr)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        help="add an agent user named as this host, confined to its own queue and names",
    )
    args = p.parse_args(argv)
    passwords: str | dict[str, str] = args.password or random_passwords(args.host)
    defs = definitions(args.vhost, passwords, hosts=args.host)
    json.dump(defs, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    if isinstance(passwords, dict):  # shown once: only their hashes are in the file
        sys.stderr.write("passwords (shown once; keep them in the daemons' bus URLs):\n")
        for user, secret in passwords.items():
            sys.stderr.write(f"  {user}: {secret}\n")


if __name__ == "__main__":
    main()
