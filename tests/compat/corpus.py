"""libvirt's own QEMU test corpus, fetched from Debian's source packages into the cache.

libvirt keeps, for every domain XML of its QEMU test suite, the outcome its driver gives:
``NAME.x86_64-latest.args`` (the command line it builds) or ``NAME.x86_64-latest.err``
(the error it reports). That is the reference virtbus is measured against.

:func:`ensure_corpus` downloads the source with ``apt-get source`` through a private apt
configuration under ``~/.cache/virtbus/apt`` (the system's sources lists are neither
needed nor changed) and unpacks only the test data and the schemas into
``~/.cache/virtbus/libvirt-src``; never into the repository. It prefers trixie's libvirt
11.3 (``tests/qemuxmlconfdata``, the stricter corpus), and falls back to bookworm's 9.0
(``tests/qemuxml2argvdata``) when the newer one cannot be had.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("VIRTBUS_CACHE", Path.home() / ".cache" / "virtbus"))
SOURCES = ("trixie", "bookworm")  # newest first
_MEMBERS = (  # what is unpacked from the upstream tarball
    "tests/qemuxmlconftest.c",
    "tests/qemuxmlconfdata/",
    "tests/qemuxml2argvdata/",
    "tests/qemufirmwaredata/",
    "tests/storagepoolxml2xmlin/",  # the storage XML tests round-trip these
    "tests/storagevolxml2xmlin/",
    "src/conf/schemas/",
    "docs/schemas/",
)


@dataclass(frozen=True, slots=True)
class Case:
    """One x86 input of the corpus and libvirt's outcome for it."""

    name: str
    xml: Path
    args: Path | None  # libvirt built this command line
    err: Path | None  # libvirt refused (its message), when it stored one
    #: the qemu.conf settings libvirt's test suite had switched on for this test
    #: (``driver.config->spiceTLS = 1;`` before its DO_TEST line)
    config: dict[str, str] = field(default_factory=dict)

    @property
    def libvirt_builds(self) -> bool:
        return self.args is not None


@dataclass(frozen=True, slots=True)
class Corpus:
    version: str  # libvirt's version, e.g. "11.3.0"
    root: Path  # the unpacked source tree
    data: Path  # tests/qemuxmlconfdata (or qemuxml2argvdata)
    schemas: Path  # directory with domain.rng
    firmware: Path  # tests/qemufirmwaredata (QEMU firmware descriptors of the test suite)
    cases: tuple[Case, ...]


def _apt_options(apt: Path) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={apt / 'sources.list'}",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", f"Dir::State::Lists={apt / 'lists'}",
        "-o", f"Dir::Cache={apt / 'cache'}",
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def _apt_setup() -> list[str]:
    apt = CACHE / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(
        "".join(f"deb-src http://deb.debian.org/debian {s} main\n" for s in SOURCES)
    )
    opts = _apt_options(apt)
    subprocess.run(["apt-get", *opts, "-qq", "update"], check=True, timeout=600)
    return opts


def _orig_checksums(opts: list[str]) -> dict[str, str]:
    """file name -> sha256 from the (signed) Sources index, for every libvirt version."""
    out = subprocess.run(
        ["apt-cache", *opts, "showsrc", "libvirt"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    sums: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and len(parts[0]) == 64 and parts[2].endswith(".orig.tar.xz"):
            sums[parts[2]] = parts[0]
    return sums


def _fetch(suite: str, opts: list[str], dest: Path) -> Path | None:
    """``apt-get source --download-only libvirt/<suite>``; the verified orig tarball."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", *opts, "-qq", "source", "--download-only", f"libvirt/{suite}"],
        cwd=dest, check=False, timeout=1200,
    )  # fmt: skip  # a missing .dsc signature is not fatal: the tarball is checked below
    sums = _orig_checksums(opts)
    versions = sorted(
        (n for n in sums if (dest / n).exists()),
        key=lambda n: [int(x) for x in re.findall(r"\d+", n)],
        reverse=True,
    )
    for name in versions:
        digest = hashlib.sha256((dest / name).read_bytes()).hexdigest()
        if digest == sums[name]:
            return dest / name
    return None


def _unpack(tarball: Path, dest: Path) -> Path:
    version = re.sub(r"^libvirt_|\.orig\.tar\.xz$", "", tarball.name)
    top = f"libvirt-{version}/"
    with tarfile.open(tarball) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(top) and m.name[len(top) :].startswith(_MEMBERS)
        ]
        tar.extractall(dest, members=members, filter="data")
    return dest / top.rstrip("/")


def _find_tree() -> Path | None:
    src = CACHE / "libvirt-src"
    trees = [
        p
        for p in src.glob("libvirt-*")
        if ((p / "tests/qemuxmlconfdata").is_dir() or (p / "tests/qemuxml2argvdata").is_dir())
        and (p / "tests/storagepoolxml2xmlin").is_dir()  # unpacked before storage joined: again
    ]
    trees.sort(key=lambda p: [int(x) for x in re.findall(r"\d+", p.name)], reverse=True)
    return trees[0] if trees else None


def ensure_corpus() -> Corpus:
    """The newest corpus in the cache, fetched first if there is none (needs network)."""
    tree = _find_tree()
    if tree is None:
        opts = _apt_setup()
        dest = CACHE / "libvirt-src"
        for suite in SOURCES:
            tarball = _fetch(suite, opts, dest)
            if tarball is not None:
                tree = _unpack(tarball, dest)
                break
        if tree is None:
            raise RuntimeError("cannot fetch libvirt's source with apt-get source")
    return load(tree)


_ASSIGN_RE = re.compile(r"^\s*((?:driver\.config->\w+\s*=\s*)+)([^;]+);")
_FREE_RE = re.compile(r"VIR_FREE\(driver\.config->(\w+)\)")
_TEST_RE = re.compile(r'DO_TEST\w*\(\s*"([^"]+)"')


def test_configs(source: Path) -> dict[str, dict[str, str]]:
    """The driver settings in force for each test of ``qemuxmlconftest.c``."""
    current: dict[str, str] = {}
    out: dict[str, dict[str, str]] = {}
    try:
        lines = source.read_text().splitlines()
    except OSError:
        return out
    for n, line in enumerate(lines):
        m = _ASSIGN_RE.match(line)
        if m:
            for key in re.findall(r"driver\.config->(\w+)", m.group(1)):
                current[key] = m.group(2).strip()
            continue
        m = _FREE_RE.search(line)
        if m:
            current.pop(m.group(1), None)
            continue
        m = _TEST_RE.search(line)
        if m:
            cfg = {k: v for k, v in current.items() if v not in ("0", "false", "NULL")}
            stmt = line
            k = n
            while not stmt.rstrip().endswith(");") and k + 1 < len(lines):
                k += 1
                stmt += lines[k]
            removed = re.search(r"ARG_QEMU_CAPS_DEL,(.*?)QEMU_CAPS_LAST", stmt)
            if removed:
                cfg["caps_del"] = ",".join(re.findall(r"QEMU_CAPS_(\w+)", removed.group(1)))
            out.setdefault(m.group(1), cfg)
    return out


def load(tree: Path) -> Corpus:
    version = tree.name.removeprefix("libvirt-")
    data = tree / "tests/qemuxmlconfdata"
    if data.is_dir():
        configs = test_configs(tree / "tests/qemuxmlconftest.c")
        cases = tuple(
            Case(c.name, c.xml, c.args, c.err, configs.get(c.name, {})) for c in _cases_conf(data)
        )
    else:
        data = tree / "tests/qemuxml2argvdata"
        cases = _cases_argv(data)
    schemas = tree / "src/conf/schemas"
    if not (schemas / "domain.rng").exists():
        schemas = tree / "docs/schemas"
    return Corpus(version, tree, data, schemas, tree / "tests/qemufirmwaredata", cases)


def _cases_conf(data: Path) -> tuple[Case, ...]:
    """libvirt >= 10: NAME.xml with NAME.x86_64-latest.{args,err} (or a fixed version)."""
    names = {p.name for p in data.iterdir()}
    cases = []
    for name in sorted(n[:-4] for n in names if n.endswith(".xml") and "." not in n[:-4]):
        outs = sorted(
            n for n in names
            if n.startswith(name + ".x86_64-") and n.endswith((".args", ".err"))
            and ".abi-update." not in n and "+" not in n[len(name):]
        )  # fmt: skip
        if not outs:
            continue
        latest = [n for n in outs if n.startswith(name + ".x86_64-latest.")]
        pick = latest or [n for n in outs if _version_key(n) == max(map(_version_key, outs))]
        args = next((data / n for n in pick if n.endswith(".args")), None)
        err = next((data / n for n in pick if n.endswith(".err")), None)
        cases.append(Case(name, data / f"{name}.xml", args, err if args is None else None))
    return tuple(cases)


def _version_key(filename: str) -> list[int]:
    tag = filename.split(".x86_64-", 1)[1]
    return [int(x) for x in re.findall(r"\d+", tag.split(".args")[0].split(".err")[0])]


def _cases_argv(data: Path) -> tuple[Case, ...]:
    """libvirt 9.0: NAME.xml with NAME.args / NAME.x86_64-*.args or .err; inputs with no
    stored x86 outcome at all are left out (their expectation lives only in C code)."""
    names = {p.name for p in data.iterdir()}
    cases = []
    for name in sorted(n[:-4] for n in names if n.endswith(".xml") and "." not in n[:-4]):
        if name.startswith(("aarch64", "ppc64", "pseries", "s390", "riscv", "arm", "mach-virt")):
            continue
        args = [n for n in names if n in (f"{name}.args", f"{name}.x86_64-latest.args")]
        errs = [n for n in names if n == f"{name}.x86_64-latest.err"]
        if args:
            cases.append(Case(name, data / f"{name}.xml", data / sorted(args)[-1], None))
        elif errs:
            cases.append(Case(name, data / f"{name}.xml", None, data / errs[0]))
    return tuple(cases)
