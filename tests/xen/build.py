"""Build the nested-Xen test bed (Xen 4.17 + dom0 initramfs + a PVH test guest) into a cache.

Everything comes from Debian packages (``apt-get download`` + ``dpkg-deb -x``) and from
this machine's Python, so the repository holds no binaries. The result lives under
``~/.cache/virtbus/xen/<key>/``; the key hashes the package versions and this recipe.

The dom0 initramfs is two concatenated cpio archives (Linux unpacks both): the cached
``base.cpio.gz`` (Xen tools, shared libraries, busybox, Python, lxml/msgpack/aiofiles, the guest
kernel and initramfs) and ``app.cpio``, the virtbus source tree, rebuilt for every run
so a boot always tests the working tree.

Run ``python -m tests.xen.build`` to build (or find) the bed and print its paths.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import py_compile
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.guests.build import GuestBuildSettings, collect_modules

Progress = Callable[[str], None]
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_FORMAT = "virtbus-xen-bed/1"
XEN_BIN = "usr/lib/xen-4.17/bin"


class XenBedError(RuntimeError):
    """The test bed could not be built."""


@dataclass(frozen=True)
class XenBedSettings:
    """What goes into the bed; knobs here rather than literals in the code."""

    xen_packages: tuple[str, ...] = (
        "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils",
        "libxencall1", "libxenevtchn1", "libxenforeignmemory1", "libxengnttab1",
        "libxenmisc4.17", "libxenstore4", "libxentoollog1", "libxendevicemodel1",
        "libxenhypfs1", "libxentoolcore1", "libyajl2",
    )  # fmt: skip
    kernel_meta_package: str = "linux-image-amd64"  # generic: has the dom0 Xen modules
    busybox_package: str = "busybox-static"
    dom0_modules: tuple[str, ...] = (
        "xen-evtchn", "xenfs", "xen-privcmd", "xen-gntdev", "xen-gntalloc",
    )  # fmt: skip
    xen_tools: tuple[str, ...] = (
        "xl", "xenstored", "xen-init-dom0", "xenconsoled", "libxl-save-helper", "xenconsole",
    )  # fmt: skip
    # copied from the venv
    python_site: tuple[str, ...] = ("lxml", "msgpack", "msgspec", "aiofiles")
    command_timeout_s: float = 600.0


@dataclass(frozen=True)
class XenBed:
    """A built bed: boot ``xen`` with ``vmlinuz`` and ``initramfs`` (see :mod:`testbed`)."""

    xen: Path
    vmlinuz: Path
    base_cpio: Path
    directory: Path

    def initramfs(self, dest: Path) -> Path:
        """``base.cpio.gz`` + a fresh cpio of the virtbus source tree, as one file."""
        with dest.open("wb") as out:
            out.write(self.base_cpio.read_bytes())
            out.write(gzip.compress(app_cpio(), compresslevel=1))
        return dest


def default_cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "virtbus" / "xen"


def _run(cmd: list[str], settings: XenBedSettings, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=settings.command_timeout_s
    )
    if proc.returncode != 0:
        raise XenBedError(f"{' '.join(cmd)}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _kernel_package(settings: XenBedSettings) -> str:
    out = _run(["apt-cache", "depends", settings.kernel_meta_package], settings)
    for line in out.splitlines():
        parts = line.split()
        if parts[:1] == ["Depends:"] and parts[1].startswith("linux-image-6"):
            return parts[1]
    raise XenBedError(f"cannot resolve {settings.kernel_meta_package} (apt-get update?)")


def _fetch(packages: Iterable[str], debs: Path, root: Path, settings: XenBedSettings) -> None:
    """Download (once) and unpack the packages into ``root``."""
    debs.mkdir(parents=True, exist_ok=True)
    for pkg in packages:
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            _run(["apt-get", "download", pkg], settings, cwd=debs)
            found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            raise XenBedError(f"apt-get download {pkg} produced no .deb")
        _run(["dpkg-deb", "-x", str(found[-1]), str(root)], settings)


def _ldd(paths: Iterable[Path], libdirs: list[Path]) -> set[Path]:
    """Shared libraries (resolved host or unpacked paths) the ELF files need."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in libdirs))
    libs: set[Path] = set()
    for path in paths:
        proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env)
        for line in proc.stdout.splitlines():
            if "not found" in line:
                raise XenBedError(f"{path.name}: missing {line.strip()}")
            if "=>" in line:
                target = line.split("=>", 1)[1].split("(")[0].strip()
                if target:
                    libs.add(Path(target))
            elif line.strip().startswith("/"):
                libs.add(Path(line.split("(")[0].strip()))
    return libs


class Cpio:
    """A newc cpio archive written in memory (no cpio tool, no root needed)."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes, mtime: int = 0) -> None:
        self._ino += 1
        nlink = 2 if mode & 0o040000 else 1
        fields = (self._ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        self._out += b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out += name.encode() + b"\0"
        self._out += b"\0" * (-len(self._out) % 4)
        self._out += data
        self._out += b"\0" * (-len(self._out) % 4)

    def dir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.dir(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, 0o100000 | mode, data, mtime)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, 0o120777, target.encode())

    def tree(self, src: Path, dest: str, skip: Callable[[Path], bool] = lambda _p: False) -> None:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if skip(rel):
                continue
            name = f"{dest}/{rel}"
            if path.is_symlink():
                self.symlink(name, os.readlink(path))
            elif path.is_dir():
                self.dir(name)
            else:
                # the source's mtime: a .pyc beside it is only used when they agree, and
                # recompiling the stdlib under TCG at every boot costs dom0 a minute
                st = path.stat()
                self.file(name, path.read_bytes(), st.st_mode & 0o777, int(st.st_mtime))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return bytes(self._out)


def _stdlib_skip(rel: Path) -> bool:
    top = rel.parts[0]
    if top in {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
               "site-packages", "pydoc_data", "unittest", "distutils"}:  # fmt: skip
        return True
    if top.startswith("config-3") or "tests" in rel.parts:
        return True
    return rel.name.endswith((".opt-1.pyc", ".opt-2.pyc"))


UNCHECKED = py_compile.PycInvalidationMode.UNCHECKED_HASH


def app_cpio() -> bytes:
    """The virtbus source tree (python packages only) under /opt/virtbus, byte-compiled
    here (unchecked-hash .pyc): compiling it in dom0 under TCG takes most of a minute."""
    cpio = Cpio()
    with tempfile.TemporaryDirectory(prefix="virtbus-pyc-") as tmp:
        for pkg in ("virtbus", "drivers", "agent", "tests/xen"):
            src = REPO / pkg
            if not src.is_dir():
                continue
            cpio.tree(src, f"opt/virtbus/{pkg}", lambda p: "__pycache__" in p.parts)
            for py in sorted(src.rglob("*.py")):
                if "__pycache__" in py.parts:
                    continue
                rel = py.relative_to(REPO)
                pyc = Path(tmp) / f"{rel}c"
                py_compile.compile(
                    str(py), str(pyc), str(rel), doraise=True, invalidation_mode=UNCHECKED
                )
                cached = f"{py.stem}.{sys.implementation.cache_tag}.pyc"
                cpio.file(f"opt/virtbus/{rel.parent}/__pycache__/{cached}", pyc.read_bytes())
    cpio.file("opt/virtbus/tests/__init__.py", b"")
    return cpio.finish()


def _guest_cpio(busybox: Path) -> bytes:
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "sbin"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (HERE / "guest_init.sh").read_bytes(), 0o755)
    # orderly_poweroff()/orderly_reboot() run these for `xl shutdown` / `xl reboot`
    cpio.file("sbin/poweroff", b"#!/bin/sh\nexec /bin/busybox poweroff -f\n", 0o755)
    cpio.file("sbin/reboot", b"#!/bin/sh\nexec /bin/busybox reboot -f\n", 0o755)
    return cpio.finish()


def guest_kernel(vmlinuz: Path) -> bytes:
    """The ELF inside an x86 bzImage (its xz payload, as Debian builds it), which Xen's PVH
    loader takes as is; the bzImage itself when the payload is not xz."""
    data = vmlinuz.read_bytes()
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    payload = data[start : start + int.from_bytes(data[0x24C:0x250], "little")]
    if data[0x202:0x206] != b"HdrS" or not payload.startswith(b"\xfd7zXZ\x00"):
        return data
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    return elf if elf.startswith(b"\x7fELF") else data


def _base_cpio(root: Path, kernel_ver: str, busybox: Path, settings: XenBedSettings) -> bytes:
    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "var/log/xen", "var/lib/xen", "root", "mnt",
              "sbin", "etc/xen"):  # fmt: skip
        cpio.dir(d)
    cpio.symlink("var/run", "/run")  # libxl locks live in /var/run/xen
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", (HERE / "dom0_init.sh").read_bytes(), 0o755)
    cpio.file("etc/xen/xl.conf", b'autoballoon="off"\n')
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    moddir = root / "lib/modules" / kernel_ver
    guest_settings = GuestBuildSettings(command_timeout_s=settings.command_timeout_s)
    modules = collect_modules(moddir, settings.dom0_modules, guest_settings)
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("lib/modules/load.order", "".join(f"{n}\n" for n, _ in modules).encode())
    elves: list[Path] = []
    for tool in settings.xen_tools:
        src = root / XEN_BIN / tool
        cpio.file(f"{XEN_BIN}/{tool}", src.read_bytes(), 0o755)
        elves.append(src)
    cpio.file("usr/bin/xenstore", (root / "usr/bin/xenstore").read_bytes(), 0o755)
    elves.append(root / "usr/bin/xenstore")
    for verb in ("read", "write", "ls", "list", "rm", "watch", "exists"):
        cpio.symlink(f"usr/bin/xenstore-{verb}", "xenstore")
    # Python: interpreter, libpython, stdlib, lib-dynload, chosen site-packages
    prefix = Path(sys.base_prefix)
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": str(prefix)})["stdlib"])
    python = prefix / "bin" / pyver
    cpio.file(f"usr/bin/{pyver}", python.read_bytes(), 0o755)
    cpio.symlink("usr/bin/python3", pyver)
    cpio.tree(stdlib, f"usr/lib/{pyver}", _stdlib_skip)
    elves += [python, *(stdlib / "lib-dynload").glob("*.so")]
    site = Path(sysconfig.get_paths()["purelib"])
    for pkg in settings.python_site:
        cpio.tree(site / pkg, f"usr/lib/{pyver}/site-packages/{pkg}")
        elves += list((site / pkg).rglob("*.so"))
    libdirs = [root / "usr/lib/x86_64-linux-gnu", prefix / "lib"]
    for lib in sorted(_ldd(elves, libdirs)):
        real = lib.resolve()
        dest = "lib64" if lib.name.startswith("ld-linux") else "lib/x86_64-linux-gnu"
        cpio.file(f"{dest}/{lib.name}", real.read_bytes(), 0o755)
    cpio.file("lib/x86_64-linux-gnu/libgcc_s.so.1", Path(
        "/lib/x86_64-linux-gnu/libgcc_s.so.1").read_bytes(), 0o755)  # fmt: skip
    # the guest: same kernel, busybox initramfs
    # the guests boot the kernel's ELF: from a bzImage, every `xl create` and every restart
    # by the xl monitor first un-xz's ~66 MB in dom0, 60-90 s under TCG on a loaded host
    cpio.file("var/lib/xen/boot/vmlinux", guest_kernel(root / f"boot/vmlinuz-{kernel_ver}"))
    cpio.file("var/lib/xen/boot/guest.cpio", _guest_cpio(busybox))
    return cpio.finish()


def cache_key(settings: XenBedSettings, kernel_pkg: str) -> str:
    h = hashlib.sha256()
    for part in (BUILD_FORMAT, kernel_pkg, repr(settings), sys.version):
        h.update(part.encode() + b"\0")
    for name in ("dom0_init.sh", "guest_init.sh", "build.py"):
        h.update((HERE / name).read_bytes())
    return f"{kernel_pkg}-{h.hexdigest()[:12]}"


def build_xen_bed(
    settings: XenBedSettings | None = None,
    cache_root: Path | None = None,
    progress: Progress = lambda _m: None,
) -> XenBed:
    """Find the bed in the cache or build it (under a file lock, renamed into place)."""
    settings = settings or XenBedSettings()
    cache = cache_root or default_cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    kernel_pkg = _kernel_package(settings)
    out = cache / cache_key(settings, kernel_pkg)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").is_file():
            progress(f"building the Xen bed into {out}")
            _build_into(out, kernel_pkg, cache, settings, progress)
    return XenBed(out / "xen", out / "vmlinuz", out / "base.cpio.gz", out)


def _build_into(
    out: Path, kernel_pkg: str, cache: Path, settings: XenBedSettings, progress: Progress
) -> None:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        work = Path(tmp)
        root = work / "root"
        packages = [*settings.xen_packages, kernel_pkg, settings.busybox_package]
        progress(f"fetching {len(packages)} packages")
        _fetch(packages, cache / "debs", root, settings)
        kernel_ver = kernel_pkg.removeprefix("linux-image-")
        stage = work / "out"
        stage.mkdir()
        (stage / "xen").write_bytes(gzip.decompress((root / "boot/xen-4.17-amd64.gz").read_bytes()))
        shutil.copyfile(root / f"boot/vmlinuz-{kernel_ver}", stage / "vmlinuz")
        progress("assembling the dom0 initramfs")
        base = _base_cpio(root, kernel_ver, root / "bin/busybox", settings)
        (stage / "base.cpio.gz").write_bytes(gzip.compress(base, compresslevel=6))
        (stage / "meta.json").write_text(json.dumps({"kernel": kernel_pkg, "size": len(base)}))
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args(argv)
    bed = build_xen_bed(cache_root=args.cache, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: str(v) for k, v in bed.__dict__.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
