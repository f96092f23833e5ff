"""QEMU's own reading of a QemuOpts argument (util/qemu-option.c, opts_do_parse), to check
that an argv says exactly what the builder meant: which keys, and which values.

``,`` separates options and ``,,`` is a literal comma; ``key=value``, or a bare ``key`` (a
flag, "on"); the first option may be a bare value for the option group's implied key
(``-chardev socket,...``: backend=socket) — but only when no ``=`` comes before the
first separator, else that text is a key.
"""

from __future__ import annotations

import json
from typing import Any

# Options whose value is QemuOpts: the implied first key (or None), and the keys allowed.
QEMUOPTS: dict[str, tuple[str | None, frozenset[str]]] = {
    "-name": (None, frozenset({"guest", "debug-threads"})),
    "-machine": (
        "type",
        frozenset(
            {
                "type",
                "usb",
                "dump-guest-core",
                "acpi",
                "vmport",
                "smm",
                "hpet",
                "pflash0",
                "pflash1",
                "kernel_irqchip",
                "i8042",
                "confidential-guest-support",
                "graphics",
                "pcspk-audiodev",
                "memory-backend",
                "mem-merge",
                "nvdimm",
                "cxl",
            }
        ),
    ),
    "-accel": ("accel", frozenset({"accel"})),
    "-smp": (
        "cpus",
        frozenset({"cpus", "maxcpus", "sockets", "dies", "clusters", "cores", "threads"}),
    ),
    "-chardev": (
        "backend",
        frozenset(
            {
                "backend",
                "id",
                "path",
                "server",
                "wait",
                "host",
                "port",
                "telnet",
                "append",
                "name",
                "logfile",
                "logappend",
                "reconnect",
                "tls-creds",
                "localaddr",
                "localport",
                "fd",
                "clipboard",
                "mouse",
            }
        ),
    ),
    "-mon": (None, frozenset({"chardev", "id", "mode"})),
    "-vnc": (
        "vnc",
        frozenset(
            {
                "vnc",
                "to",
                "websocket",
                "share",
                "password",
                "tls-creds",
                "sasl",
                "power-control",
                "audiodev",
            }
        ),
    ),
    "-spice": (
        None,
        frozenset(
            {
                "port",
                "tls-port",
                "addr",
                "unix",
                "disable-ticketing",
                "seamless-migration",
                "image-compression",
                "jpeg-wan-compression",
                "zlib-glz-wan-compression",
                "playback-compression",
                "streaming-video",
                "agent-mouse",
                "sasl",
                "x509-dir",
                "tls-channel",
                "plaintext-channel",
                "disable-copy-paste",
                "disable-agent-file-xfer",
                "gl",
                "rendernode",
            }
        ),
    ),
    "-rtc": (None, frozenset({"base", "driftfix", "clock"})),
    "-boot": (None, frozenset({"strict", "menu", "splash-time", "reboot-timeout"})),
    "-overcommit": (None, frozenset({"mem-lock", "cpu-pm"})),
    "-tpmdev": ("type", frozenset({"type", "id", "path", "cancel-path", "chardev"})),
    "-fsdev": (
        "fsdriver",
        frozenset(
            {
                "fsdriver",
                "id",
                "path",
                "security_model",
                "readonly",
                "writeout",
                "multidevs",
                "fmode",
                "dmode",
            }
        ),
    ),
    "-numa": (
        "type",
        frozenset({"type", "nodeid", "cpus", "memdev", "initiator", "src", "dst", "val"}),
    ),
    "-fw_cfg": (None, frozenset({"name", "file", "string"})),
    "-smbios": (
        None,
        frozenset(
            {
                "type",
                "vendor",
                "version",
                "date",
                "release",
                "manufacturer",
                "product",
                "serial",
                "uuid",
                "sku",
                "family",
                "asset",
                "location",
                "value",
            }
        ),
    ),
    "-acpitable": (None, frozenset({"sig", "file"})),
    "-sandbox": (
        "enable",
        frozenset({"enable", "obsolete", "elevateprivileges", "spawn", "resourcecontrol"}),
    ),
    "-msg": (None, frozenset({"timestamp"})),
    "-action": (None, frozenset({"reboot", "watchdog"})),
}
JSON_OPTIONS = frozenset({"-device", "-blockdev", "-object", "-netdev", "-audiodev"})
PLAIN = frozenset(
    {
        "-kernel",
        "-initrd",
        "-append",
        "-bios",
        "-pidfile",
        "-uuid",
        "-m",
        "-display",
        "-cpu",
        "-global",
        "-incoming",
        "-k",
    }
)
FLAGS = frozenset({"-S", "-nodefaults", "-no-user-config", "-no-shutdown", "-daemonize"})


def _value(text: str, pos: int) -> tuple[str, int]:
    out = []
    while pos < len(text):
        if text[pos] == ",":
            if text[pos + 1 : pos + 2] == ",":
                out.append(",")
                pos += 2
                continue
            return "".join(out), pos + 1
        out.append(text[pos])
        pos += 1
    return "".join(out), pos


def split(text: str, implied: str | None) -> list[tuple[str, str]]:
    """``[(key, value)]`` as QEMU reads them."""
    pairs: list[tuple[str, str]] = []
    pos, first = 0, True
    while pos < len(text):
        stops = [i for i in (text.find("=", pos), text.find(",", pos)) if i >= 0]
        stop = min(stops) if stops else len(text)
        if stop == len(text) or text[stop] == ",":
            if first and implied:
                value, pos = _value(text, pos)
                pairs.append((implied, value))
            else:
                pairs.append((text[pos:stop], "on"))
                pos = stop + 1
        else:
            key = text[pos:stop]
            value, pos = _value(text, stop + 1)
            pairs.append((key, value))
        first = False
    return pairs


def parse_argv(argv: list[str]) -> list[tuple[str, Any]]:
    """``[(option, parsed value)]``: QemuOpts options as a key/value dict (a duplicate key
    is an error), JSON options as dicts, plain options as their string."""
    out: list[tuple[str, Any]] = []
    i = 1
    while i < len(argv):
        opt = argv[i]
        if opt in FLAGS:
            out.append((opt, None))
            i += 1
            continue
        value = argv[i + 1]
        i += 2
        if opt in QEMUOPTS:
            implied, allowed = QEMUOPTS[opt]
            pairs = split(value, implied)
            keys = [k for k, _ in pairs]
            assert len(keys) == len(set(keys)), f"{opt} {value!r}: a key repeats: {keys}"
            unknown = set(keys) - allowed
            assert not unknown, f"{opt} {value!r}: unexpected keys {sorted(unknown)}"
            out.append((opt, dict(pairs)))
        elif opt in JSON_OPTIONS:
            parsed = json.loads(value)
            assert isinstance(parsed, dict), (opt, value)
            out.append((opt, parsed))
        else:
            assert opt in PLAIN, f"an option this check does not know: {opt} {value!r}"
            out.append((opt, value))
    return out
