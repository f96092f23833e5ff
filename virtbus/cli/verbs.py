"""Which module of :mod:`virtbus.cli` registers and runs each verb.

A one-shot command builds the parser of its own verb only, so ``virtbus list`` imports
``virtbus.cli.host`` and not the storage, snapshot or PKI modules (and their XML, TOML and
certificate libraries) that the other verbs need. The order is that of ``virtbus --help``.
``tests/unit/test_cli_verbs.py`` checks that each module registers exactly its verbs here.
"""

from __future__ import annotations

MAIN = "main"  # verbs whose options virtbus.cli.main adds itself (``demo``)

MODULE_VERBS: dict[str, tuple[str, ...]] = {
    "host": ("hosts", "list"),
    "domain": (
        "define", "undefine", "start", "shutdown", "destroy", "reboot", "reset", "suspend",
        "resume", "autostart", "save", "restore", "managedsave", "managedsave-remove",
        "dominfo", "domstate", "dumpxml", "setmem", "setmaxmem",
    ),
    "disk": (
        "attach-disk", "detach-disk", "attach-device", "detach-device", "domblklist",
        "domblkinfo",
    ),
    "iface": (
        "attach-interface", "detach-interface", "domiflist", "domif-getlink", "domif-setlink",
        "domifaddr", "domiftune",
    ),
    "snapshot": (
        "snapshot-create", "snapshot-create-as", "snapshot-list", "snapshot-info",
        "snapshot-dumpxml", "snapshot-current", "snapshot-parent", "snapshot-revert",
        "snapshot-delete",
    ),
    "blockjob": ("blockcommit", "blockpull", "blockcopy", "blockjob", "domblkerror"),
    "backup": (
        "checkpoint-create", "checkpoint-create-as", "checkpoint-list", "checkpoint-info",
        "checkpoint-dumpxml", "checkpoint-parent", "checkpoint-delete", "backup-begin",
        "backup-dumpxml", "domjobinfo", "domjobabort",
    ),
    "storage": (
        "pool-define", "pool-define-as", "pool-create", "pool-create-as", "pool-build",
        "pool-start", "pool-destroy", "pool-delete", "pool-undefine", "pool-refresh",
        "pool-info", "pool-dumpxml", "pool-autostart", "pool-name", "pool-uuid", "pool-list",
        "vol-create", "vol-create-as", "vol-create-from", "vol-clone", "vol-delete",
        "vol-info", "vol-dumpxml", "vol-path", "vol-key", "vol-pool", "vol-name", "vol-wipe",
        "vol-resize", "vol-list", "vol-upload", "vol-download",
    ),
    "network": (
        "net-define", "net-create", "net-start", "net-destroy", "net-undefine",
        "net-autostart", "net-info", "net-dumpxml", "net-name", "net-uuid", "net-list",
        "net-update", "net-dhcp-leases", "net-port-list", "net-port-dumpxml",
        "net-port-create", "net-port-delete",
    ),
    "event": ("event",),
    "stats": ("domstats",),
    "migrate": ("migrate", "migrate-cancel", "migrations", "drain", "undrain"),
    "acl": ("acl",),
    "audit": ("audit",),
    "pki": ("pki",),
    MAIN: ("demo",),
    "completion": ("completion",),
}  # fmt: skip

VERB_MODULE: dict[str, str] = {
    verb: module for module, verbs in MODULE_VERBS.items() for verb in verbs
}

# Global options that take a value (``--bus URL``, ``--timeout S``): skipped when looking
# for the verb among the words.
_VALUED_OPTIONS = ("--bus", "--timeout")


def verb_of(words: list[str]) -> str | None:
    """The verb of a command line (the first word after the global options), if it is
    one of ours; None for ``--help``, a typo or no verb (the full parser reports those)."""
    skip = False
    for word in words:
        if skip:
            skip = False
        elif word in ("-h", "--help") or word == "--":
            return None
        elif word.startswith("--"):
            # argparse accepts unambiguous prefixes (``--time 5``) and ``--bus=URL``.
            skip = "=" not in word and any(o.startswith(word) for o in _VALUED_OPTIONS)
        elif word.startswith("-"):
            return None
        else:
            return word if word in VERB_MODULE else None
    return None
