"""Run libvirt's QEMU test corpus through virtbus and compare with libvirt's outcome.

Every x86 input goes through what a user's XML goes through: parse, ``define`` on a real
:class:`~drivers.qemu.driver.QemuDriver` (its validation and persistence), ``dumpxml``
validated against libvirt's RelaxNG schema, and the command line start would build
(with the host facts libvirt's own test suite fakes: its firmware descriptors, hugetlbfs
mounts and host NUMA nodes). The outcome is compared with libvirt's stored one
(``.args`` built, ``.err`` refused), and for files both build, the multiset of
``-device`` drivers.

``python -m tests.compat.harness`` prints the table; ``--json`` the raw results;
``--write-floor`` records the floor the CI test (tests/compat/test_compat_floor.py) holds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lxml import etree

from drivers.qemu.argv import ArgvSettings, QemuPaths, build_command, graphics_needing_ports
from drivers.qemu.capabilities import QemuCapabilities
from drivers.qemu.driver import QemuDriver
from drivers.qemu.firmware import load_descriptors
from drivers.qemu.host import HostFacts
from drivers.qemu.settings import QemuSettings
from tests.compat.corpus import Case, Corpus, ensure_corpus
from virtbus.domain import parse_domain_xml
from virtbus.errors import VirtbusError

FLOOR = Path(__file__).with_name("floor.json")
#: libvirt capability flags the test suite removes for some tests -> the QEMU device
CAPS_DEVICES = {
    "PIIX3_USB_UHCI": "piix3-usb-uhci", "NEC_USB_XHCI": "nec-usb-xhci",
    "DEVICE_QEMU_XHCI": "qemu-xhci", "ICH9_USB_EHCI1": "ich9-usb-ehci1",
    "PCI_OHCI": "pci-ohci",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CorpusCaps(QemuCapabilities):
    """The test suite's QEMU ("latest") minus the devices a test removes."""

    removed: frozenset[str] = frozenset()

    def has_device(self, name: str) -> bool:
        return name not in self.removed


def corpus_caps(case: Case) -> CorpusCaps:
    removed = frozenset(
        CAPS_DEVICES[c] for c in case.config.get("caps_del", "").split(",") if c in CAPS_DEVICES
    )
    return CorpusCaps(frozenset(), frozenset(), frozenset(), frozenset(), True, removed)


#: the host configuration of libvirt's test suite that virtbus has settings for: its
#: fake network ports are bridges here (tests/qemuxmlconftest.c, networkmock)
BASE_SETTINGS = ArgvSettings(
    networks=MappingProxyType({
        "default": "user",
        "nat-network;plug-network-basic": "bridge:virbr0",
        "nat-network;plug-bridge-basic": "bridge:virbr0",
        "nat-network;": "bridge:virbr0",
        "vepa-net;plug-bridge-basic": "bridge:virbr0",
        "openvswitch-net;plug-bridge-basic": "bridge:virbr0",
    }),
)  # fmt: skip
_ELEMENT_RE = re.compile(r"<([A-Za-z][\w:.-]*)((?:\s+[\w:-]+)?)")


@dataclass(slots=True)
class Result:
    name: str
    libvirt: str  # "build" | "reject"
    virtbus: str  # "build" | "reject" | "crash"
    stage: str  # where virtbus stopped: parse | define | dumpxml | argv | done
    code: str | None = None
    message: str | None = None
    schema_ok: bool | None = None  # dumpxml valid against domain.rng (None: not defined)
    schema_error: str | None = None
    devices_match: bool | None = None  # both built: same multiset of -device drivers
    missing_devices: list[str] = field(default_factory=list)  # libvirt has, virtbus not
    extra_devices: list[str] = field(default_factory=list)  # virtbus has, libvirt not
    libvirt_error: str | None = None


def device_drivers(argv: Iterable[str]) -> collections.Counter[str]:
    """The ``-device`` drivers of a command line (JSON or QemuOpts form)."""
    out: collections.Counter[str] = collections.Counter()
    args = list(argv)
    for i, arg in enumerate(args[:-1]):
        if arg != "-device":
            continue
        value = args[i + 1]
        if value.startswith("{"):
            out[str(json.loads(value)["driver"])] += 1
        else:
            first = value.split(",", 1)[0]
            out[first.removeprefix("driver=")] += 1
    return out


def libvirt_argv(path: Path) -> list[str]:
    return shlex.split(path.read_text().replace("\\\n", " "))


def feature_key(message: str) -> str:
    """``<tag attr>`` of the first element a refusal names (the table's grouping)."""
    m = _ELEMENT_RE.search(message)
    if m is None:
        return message.split(":")[0][:60]
    attr = m.group(2).strip()
    return f"<{m.group(1)}{' ' + attr if attr else ''}>"


class Harness:
    """One corpus run: a QEMU driver on a temporary state dir, libvirt's schema."""

    def __init__(self, corpus: Corpus, workdir: Path) -> None:
        self.corpus = corpus
        self.workdir = workdir
        self.run_dir = workdir / "run"
        fw = corpus.firmware
        self.firmware_dirs = (fw / "home/user/.config/qemu/firmware", fw / "etc/qemu/firmware",
                              fw / "usr/share/qemu/firmware")  # fmt: skip
        dirs = self.firmware_dirs
        self.drivers: dict[str, QemuDriver] = {}
        # what libvirt's test suite fakes (tests/testutilsqemu.c): two hugetlbfs mounts,
        # host NUMA nodes 0-3; CPU sets are not checked when a command line is built
        self.host = HostFacts(
            hugepages={2048: "/dev/hugepages2M", 1048576: "/dev/hugepages1G"},
            default_hugepage_kib=2048,
            numa_nodes=frozenset(range(4)),
            cpus=frozenset(range(1 << 16)),
            firmware=load_descriptors(dirs),
            resolve_devices=False,
        )
        self.schema = etree.RelaxNG(etree.parse(str(corpus.schemas / "domain.rng")))

    async def driver_for(self, case: Case) -> tuple[QemuDriver, ArgvSettings]:
        """A driver configured as libvirt's test suite configured itself for ``case``."""
        cfg = case.config
        settings = replace(
            BASE_SETTINGS,
            spice_tls="spiceTLS" in cfg, spice_sasl="spiceSASL" in cfg,
            vnc_tls="vncTLS" in cfg, vnc_tls_verify="vncTLSx509verify" in cfg,
            vnc_sasl="vncSASL" in cfg, chardev_tls="chardevTLS" in cfg,
            vnc_auto_unix_socket="vncAutoUnixSocket" in cfg,
            spice_auto_unix_socket="spiceAutoUnixSocket" in cfg,
            dump_guest_core="dumpGuestCore" in cfg,
        )  # fmt: skip
        key = repr((sorted(cfg), cfg.get("caps_del")))
        driver = self.drivers.get(key)
        if driver is None:
            n = len(self.drivers)
            driver = QemuDriver(
                self.workdir / f"state{n}", self.run_dir,
                # libvirt's test inputs name arbitrary host paths: the harness measures the
                # command line, so it opts out of path confinement (test-only)
                QemuSettings(firmware_dirs=self.firmware_dirs, argv=settings,
                             confine_paths=False),
                caps=corpus_caps(case),
            )  # fmt: skip
            await driver.open(lambda _event: None)
            self.drivers[key] = driver
        return driver, settings

    async def run_case(self, case: Case) -> Result:
        res = Result(case.name, "build" if case.libvirt_builds else "reject", "reject", "parse")
        driver, settings = await self.driver_for(case)
        if case.err is not None:
            res.libvirt_error = case.err.read_text(errors="replace").strip()[:300]
        xml = case.xml.read_bytes()
        try:
            parse_domain_xml(xml)
            res.stage = "define"
            ref = await driver.define(xml.decode("utf-8", errors="replace"))
            try:
                res.stage = "dumpxml"
                dumped = await driver.xml(ref.uuid)
                self._check_schema(res, dumped)
                res.stage = "argv"
                defn = parse_domain_xml(dumped)
                ports = {i: 5900 + i for i in graphics_needing_ports(defn)}
                launch = build_command(
                    defn,
                    QemuPaths(self.run_dir),
                    kvm_available=True,
                    graphics_ports=ports,
                    host=self.host,
                    settings=settings,
                    caps=corpus_caps(case),
                )
            finally:
                await driver.undefine(ref.uuid)
        except VirtbusError as exc:
            res.code, res.message = exc.code, exc.message
            return res
        except Exception as exc:  # noqa: BLE001  # a bug in virtbus: reported, never hidden
            res.virtbus, res.code, res.message = "crash", type(exc).__name__, repr(exc)[:300]
            return res
        res.virtbus, res.stage = "build", "done"
        if case.args is not None:
            theirs = device_drivers(libvirt_argv(case.args))
            ours = device_drivers(launch.argv)
            res.devices_match = theirs == ours
            res.missing_devices = sorted((theirs - ours).elements())
            res.extra_devices = sorted((ours - theirs).elements())
        return res

    def _check_schema(self, res: Result, dumped: str) -> None:
        doc = etree.fromstring(dumped.encode())
        res.schema_ok = bool(self.schema.validate(doc))
        if not res.schema_ok:
            res.schema_error = str(self.schema.error_log.last_error)[:200]

    async def run(self, names: set[str] | None = None) -> list[Result]:
        try:
            return [
                await self.run_case(c)
                for c in self.corpus.cases
                if names is None or c.name in names
            ]
        finally:
            for driver in self.drivers.values():
                await driver.close()


def run_corpus(names: set[str] | None = None) -> tuple[Corpus, list[Result], float]:
    logging.getLogger("drivers.qemu.firmware").setLevel(logging.ERROR)  # 93-invalid.json
    corpus = ensure_corpus()
    with tempfile.TemporaryDirectory(prefix="vbc-", dir="/dev/shm") as tmp:
        t0 = time.perf_counter()
        results = asyncio.run(Harness(corpus, Path(tmp)).run(names))
        return corpus, results, time.perf_counter() - t0


# ---------------------------------------------------------------------------- summary


def summarize(results: list[Result]) -> dict[str, Any]:
    builds = [r for r in results if r.libvirt == "build"]
    rejects = [r for r in results if r.libvirt == "reject"]
    both = [r for r in builds if r.virtbus == "build"]
    defined = [r for r in results if r.schema_ok is not None]
    blocked = collections.Counter(
        feature_key(r.message or "") for r in builds if r.virtbus != "build"
    )
    missing: collections.Counter[str] = collections.Counter()
    extra: collections.Counter[str] = collections.Counter()
    for r in both:
        missing.update(set(r.missing_devices))
        extra.update(set(r.extra_devices))
    return {
        "files": len(results),
        "libvirt_builds": len(builds),
        "libvirt_rejects": len(rejects),
        "virtbus_builds": len(both),
        "build_share": len(both) / len(builds) if builds else 0.0,
        "wrongly_accepted": sorted(r.name for r in rejects if r.virtbus == "build"),
        "rejection_codes": dict(
            collections.Counter(r.code for r in results if r.virtbus != "build")
        ),
        "crashes": sorted(r.name for r in results if r.virtbus == "crash"),
        "device_match": sum(bool(r.devices_match) for r in both) / len(both) if both else 0.0,
        "devices_matched": sum(bool(r.devices_match) for r in both),
        "schema_valid": sum(bool(r.schema_ok) for r in defined),
        "schema_checked": len(defined),
        "schema_invalid": sorted(r.name for r in defined if not r.schema_ok),
        "top_missing": blocked.most_common(25),
        "top_missing_devices": missing.most_common(12),
        "top_extra_devices": extra.most_common(12),
    }


def table(corpus: Corpus, s: dict[str, Any], seconds: float) -> str:
    pct = lambda a, b: f"{a}/{b} ({100 * a / b:.1f}%)" if b else "0/0"  # noqa: E731
    lines = [
        f"libvirt {corpus.version} corpus ({corpus.data.name}), x86 inputs: {s['files']}"
        f" — run in {seconds:.1f}s",
        "",
        "| measure | value |",
        "|---|---|",
        f"| libvirt builds args | {s['libvirt_builds']} |",
        f"| libvirt rejects | {s['libvirt_rejects']} |",
        f"| virtbus builds argv (of libvirt's builds) | "
        f"{pct(s['virtbus_builds'], s['libvirt_builds'])} |",
        f"| wrongly accepted (libvirt rejects, virtbus builds) | {len(s['wrongly_accepted'])} |",
        f"| -device multiset matches (files both build) | "
        f"{pct(s['devices_matched'], s['virtbus_builds'])} |",
        f"| dumpxml valid against domain.rng (defined files) | "
        f"{pct(s['schema_valid'], s['schema_checked'])} |",
        f"| virtbus crashes (non-virtbus exceptions) | {len(s['crashes'])} |",
        f"| refusal codes | {', '.join(f'{k}={v}' for k, v in sorted(s['rejection_codes'].items(), key=str))} |",  # noqa: E501
        "",
        "Top missing features (files libvirt builds that virtbus refuses, by element):",
        "",
        "| files | element |",
        "|---|---|",
        *(f"| {n} | `{k}` |" for k, n in s["top_missing"]),
        "",
        "Wrongly accepted: " + (", ".join(s["wrongly_accepted"]) or "none"),
        "",
        "-device drivers libvirt adds that virtbus does not (files): "
        + (", ".join(f"{d} ({n})" for d, n in s["top_missing_devices"]) or "none"),
        "-device drivers virtbus adds that libvirt does not (files): "
        + (", ".join(f"{d} ({n})" for d, n in s["top_extra_devices"]) or "none"),
    ]
    if s["crashes"]:
        lines += ["", "Crashes: " + ", ".join(s["crashes"])]
    return "\n".join(lines)


def floor_of(corpus: Corpus, s: dict[str, Any]) -> dict[str, Any]:
    """Shares rounded down (a rounded-up floor would fail the run that recorded it)."""
    return {
        "build_share": math.floor(s["build_share"] * 10_000) / 10_000,
        "device_match": math.floor(s["device_match"] * 10_000) / 10_000,
        "wrongly_accepted": s["wrongly_accepted"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print every file's result as JSON")
    ap.add_argument("--write-floor", action="store_true", help="record the floor for CI")
    ap.add_argument("--only", action="append", help="run only these inputs (repeatable)")
    ap.add_argument("--show", choices=["refused", "wrong", "devices", "schema", "crash"],
                    help="list the files of one category with virtbus' message")  # fmt: skip
    opts = ap.parse_args(argv)
    corpus, results, seconds = run_corpus(set(opts.only) if opts.only else None)
    s = summarize(results)
    if opts.json:
        print(json.dumps({"summary": s, "results": [asdict(r) for r in results]}, indent=1))
    elif opts.show:
        for r in results:
            if (
                (opts.show == "refused" and r.libvirt == "build" and r.virtbus != "build")
                or (opts.show == "wrong" and r.libvirt == "reject" and r.virtbus == "build")
                or (opts.show == "devices" and r.devices_match is False)
                or (opts.show == "schema" and r.schema_ok is False)
                or (opts.show == "crash" and r.virtbus == "crash")
            ):
                detail = r.message or r.schema_error or r.libvirt_error or ""
                if opts.show == "devices":
                    detail = f"missing {r.missing_devices} extra {r.extra_devices}"
                elif opts.show == "schema":
                    detail = r.schema_error or ""
                print(f"{r.name}: {detail}")
    else:
        print(table(corpus, s, seconds))
    if opts.write_floor:
        floors = json.loads(FLOOR.read_text()) if FLOOR.exists() else {}
        floors[corpus.version] = floor_of(corpus, s)
        FLOOR.write_text(json.dumps(floors, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
