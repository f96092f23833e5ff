"""``virtbus pki init|issue``: the cluster's certificate authority (virtbus.security.pki).

``init`` creates a CA; ``issue`` signs a key for a broker node (``server``), an agent
(``host``: CN = the host name, which is its bus user under SASL EXTERNAL) or a person or
service (``user``: CN = the user; the policy file grants the role). No bus needed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from virtbus.cli.output import emit_json, fields
from virtbus.errors import InvalidArgument

DEFAULT_DIR = Path(os.environ.get("VIRTBUS_PKI_DIR", "/etc/virtbus/pki"))


# pki.Kind's values, spelled here so that parsing the command line never imports
# cryptography (every CLI command parses all subcommands; tests/unit keeps the two equal)
KINDS = ("server", "host", "user")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pki", help="the cluster's certificate authority: init, issue")
    verbs = p.add_subparsers(dest="pki_command", metavar="VERB", required=True)
    init = verbs.add_parser("init", help="create a CA (ca.key, ca.crt) in --dir")
    init.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default %(default)s")
    init.add_argument("--name", default="virtbus CA", help="the CA's CN")
    init.add_argument("--days", type=int, help="validity (default 3650)")
    init.set_defaults(func=pki_init, no_bus=True)
    issue = verbs.add_parser("issue", help="issue a key and certificate signed by the CA")
    issue.add_argument("kind", choices=KINDS, help="server, host or user")
    issue.add_argument("name", metavar="NAME", help="CN: the broker node, host or user name")
    issue.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default %(default)s")
    issue.add_argument("--role", help="user certificates: the role it is meant for (OU)")
    issue.add_argument(
        "--alt-name", action="append", default=[], help="server certificates: another DNS name/IP"
    )
    issue.add_argument("--days", type=int, help="validity (default 365)")
    issue.add_argument("--out", type=Path, help="write key and cert here (default DIR/KINDs)")
    issue.add_argument(
        "--qemu-dir", type=Path, metavar="QDIR",
        help="host certificates: also lay them out as QEMU's tls-creds-x509 directory (the"
        " qemu driver's migrate_tls_x509_cert_dir, default /etc/pki/qemu) for migrate --tls",
    )  # fmt: skip
    issue.set_defaults(func=pki_issue, no_bus=True)


def pki_init(args: argparse.Namespace) -> int:
    from virtbus.security import pki  # cryptography: only when a certificate is made

    cert = pki.init_ca(args.dir, args.name, args.days or pki.CA_DAYS)
    if args.json:
        emit_json({"ca": str(cert), "key": str(args.dir / pki.CA_KEY)})
    else:
        print(f"CA created: {cert} (its key {args.dir / pki.CA_KEY} must stay here, 0600)")
    return 0


def pki_issue(args: argparse.Namespace) -> int:
    from virtbus.security import pki  # cryptography: only when a certificate is made

    kind = pki.Kind(args.kind)
    if args.qemu_dir is not None and kind is not pki.Kind.HOST:
        raise InvalidArgument("--qemu-dir is for host certificates")
    got = pki.issue(
        args.dir, kind, args.name, role=args.role, alt_names=args.alt_name,
        days=args.days or pki.DEFAULT_DAYS,
        out=args.out,
    )  # fmt: skip
    qemu = pki.qemu_tls_dir(got, args.qemu_dir) if args.qemu_dir is not None else None
    grant = f'{args.name} = ["{args.role or "viewer"}"]' if kind is pki.Kind.USER else None
    if args.json:
        emit_json(
            {"kind": str(kind), "name": got.name, "key": str(got.key), "cert": str(got.cert),
             "ca": str(got.ca), "not_after": got.not_after.isoformat(), "policy_line": grant,
             "qemu_dir": str(qemu) if qemu is not None else None}
        )  # fmt: skip
        return 0
    rows = [("Kind", str(kind)), ("CN", got.name), ("Key", str(got.key)),
            ("Certificate", str(got.cert)), ("CA", str(got.ca)),
            ("Valid until", got.not_after.isoformat())]  # fmt: skip
    if qemu is not None:
        rows.append(("QEMU TLS dir", str(qemu)))
    print(fields(rows))
    if grant is not None:
        print(f"\nGrant the role in the policy file's [users]:  {grant}")
    return 0
