"""RabbitMQ definitions (``rabbitmqctl import_definitions``) generated from the topology.

Generated, not hand-written, so the broker an operator prepares matches exactly what
agents and the scheduler declare (a mismatch in queue arguments would close their
channels). ``python -m virtbus.bus.definitions --vhost /virtbus > definitions.json``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import secrets
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from virtbus.bus.topology import (
    CALL_QUEUE_TYPES,
    DEAD_LETTER,
    DEAD_LETTER_EXCHANGE,
    EXCHANGES,
    HISTORIES,
    RPC_EXCHANGE,
    SCHEDULER_ROUTE,
    QueueSpec,
    call_queue_for,
)
from virtbus.errors import InvalidArgument

# Who may do what, as RabbitMQ permission regexes (configure, write, read).
# The topology (exchanges, the dead-letter queue, the history streams, the scheduler's
# queue) is declared by the admin who imports these definitions: nobody else may
# configure (declare or delete) it, so no daemon's or client's credentials can delete
# ``virtbus.rpc`` or a history stream. Daemons declare their topology passively.
# Subscriptions are server-named queues (``amq.gen-*``), exclusive to their connection.
# Declaring a call queue with a dead-letter exchange needs write on ``virtbus.dlx``;
# binding it needs read on ``virtbus.rpc``; replies go to the default exchange.
_PUBLISHED_RE = r"events|metrics|hosts|audit"
_HISTORIES_RE = r"events\.history|audit\.history"
_OWN_QUEUES = r"amq\.gen-.*"
_REPLIES = r"amq\.rabbitmq\.reply-to"


def _daemon(
    queue_re: str, published: str = _PUBLISHED_RE, histories: str = _HISTORIES_RE
) -> tuple[str, str, str]:
    """(configure, write, read) of a daemon that serves the call queue(s) ``queue_re``."""
    return (
        rf"^(virtbus\.({queue_re})|{_OWN_QUEUES})$",
        rf"^(virtbus\.(rpc|dlx|{published}|{queue_re})|{_OWN_QUEUES}|amq\.default)$",
        rf"^(virtbus\.(rpc|{published}|{histories}|{queue_re})|{_OWN_QUEUES}|{_REPLIES})$",
    )


# Clients send calls and read events, metrics, heartbeats and audit records; they
# configure only their own server-named subscription queues.
CLIENT_PERMISSIONS: tuple[str, str, str] = (
    rf"^{_OWN_QUEUES}$",
    rf"^(virtbus\.rpc|{_OWN_QUEUES})$",
    rf"^(virtbus\.({_PUBLISHED_RE}|{_HISTORIES_RE})|{_OWN_QUEUES}|{_REPLIES})$",
)
ROLES: dict[str, tuple[str, str, str]] = {
    "virtbus-agent": _daemon(r"agent\..*"),
    # Only the scheduler writes and reads its journal (virtbus.journal, the stream).
    "virtbus-scheduler": _daemon(
        r"scheduler", rf"{_PUBLISHED_RE}|journal", rf"{_HISTORIES_RE}|scheduler\.journal"
    ),
    "virtbus-client": CLIENT_PERMISSIONS,
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
    return _daemon(rf"agent\.{re.escape(host)}")


def random_passwords(hosts: Sequence[str] = (), clients: Sequence[str] = ()) -> dict[str, str]:
    """A fresh random password per user: nothing ships with a default password."""
    return {user: secrets.token_urlsafe(18) for user in (*ROLES, *hosts, *clients)}


def definitions(
    vhost: str,
    password: str | Mapping[str, str] | None,
    salt: bytes | None = None,
    hosts: Sequence[str] = (),
    clients: Sequence[str] = (),
    call_queue_type: str = "quorum",
) -> dict[str, Any]:
    """The definitions for ``vhost``; ``password``: one for every user, or one per user,
    or None: certificate users (no password: only a TLS client certificate whose CN is
    the user logs in, through SASL EXTERNAL).

    ``hosts``: an agent user per host, named as the host (its heartbeats and events then
    count, see README "Security"), that reads only its own call queue and publishes on
    the topic exchanges only under its own name (topic permissions: keys start "HOST.").
    ``clients``: more users with the client permissions (people and services, named as
    their certificates' CNs).
    ``call_queue_type``: the scheduler's call queue, as the scheduler's
    ``bus.call_queue_type`` (quorum for a cluster, classic for one broker).
    """
    kinds = {"role": set(ROLES), "host": set(hosts), "client": set(clients)}
    for (kind, names), (other, others) in itertools.combinations(kinds.items(), 2):
        if both := sorted(names & others):  # the later entry would silently win
            raise InvalidArgument(f"user {both[0]!r} is both a {kind} and a {other}")
    roles = {
        **ROLES,
        **{h: host_permissions(h) for h in hosts},
        **dict.fromkeys(clients, CLIENT_PERMISSIONS),
    }
    hashes: dict[str, str]
    if password is None:
        hashes = dict.fromkeys(roles, "")  # no PLAIN login at all
    else:
        passwords = password if isinstance(password, Mapping) else dict.fromkeys(roles, password)
        missing = set(roles) - set(passwords)
        if missing or not all(passwords.values()):
            raise InvalidArgument(f"no password for {', '.join(sorted(missing)) or 'a user'}")
        hashes = {user: password_hash(passwords[user], salt) for user in roles}
    scheduler = call_queue_for(SCHEDULER_ROUTE, call_queue_type)
    queues = [DEAD_LETTER, *HISTORIES.values(), scheduler]
    # The same table amqp._ensure_topology declares from on a dev broker.
    bindings: list[tuple[QueueSpec, str, str]] = [(DEAD_LETTER, DEAD_LETTER_EXCHANGE, "")]
    bindings += [(stream, exchange, "#") for exchange, stream in HISTORIES.items()]
    bindings.append((scheduler, RPC_EXCHANGE, SCHEDULER_ROUTE))
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": user,
                "password_hash": hashes[user],
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
                "source": source,
                "vhost": vhost,
                "destination": queue.name,
                "destination_type": "queue",
                "routing_key": key,
                "arguments": {},
            }
            for queue, source, key in bindings
        ],
        "policies": [
            {
                # Subscription queues of dead clients must not pile up messages.
                "vhost": vhost,
                "name": "virtbus-subscriptions",
                "pattern": r"^(virtbus\.sub\.|amq\.gen-)",
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
    p.add_argument(
        "--client",
        action="append",
        default=[],
        help="add a user with the client permissions (a person or service; its CN)",
    )
    p.add_argument(
        "--certificates",
        action="store_true",
        help="users without passwords: they log in only with a TLS client certificate "
        "whose CN is the user (SASL EXTERNAL); no password is generated or printed",
    )
    p.add_argument(
        "--call-queue-type",
        choices=CALL_QUEUE_TYPES,
        default=CALL_QUEUE_TYPES[0],
        help="type of the scheduler's call queue, as the daemons' bus.call_queue_type "
        "(default: quorum, for a RabbitMQ cluster; classic: one broker, quicker calls)",
    )
    args = p.parse_args(argv)
    if args.certificates and args.password:
        p.error("--certificates: users have no password (drop --password)")
    passwords: str | dict[str, str] | None = (
        None if args.certificates else args.password or random_passwords(args.host, args.client)
    )
    defs = definitions(
        args.vhost,
        passwords,
        hosts=args.host,
        clients=args.client,
        call_queue_type=args.call_queue_type,
    )
    json.dump(defs, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    if isinstance(passwords, dict):  # shown once: only their hashes are in the file
        sys.stderr.write("passwords (shown once; keep them in the daemons' bus URLs):\n")
        for user, secret in passwords.items():
            sys.stderr.write(f"  {user}: {secret}\n")


if __name__ == "__main__":
    main()
