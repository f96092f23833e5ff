"""Build the real QEMU test guest (Debian cloud kernel + busybox initramfs) into a cache.

Everything comes from Debian packages fetched with `apt-get download`, so the repository
never holds binaries. The result is cached outside the repository under a key made of the
kernel package, its version and a hash of the init script and build recipe: changing any
of them rebuilds. Builds happen in a temporary directory that is renamed into place, under
a file lock, so concurrent test workers never see half a guest.

Run `python -m virtbus.guests.build` to build (or find) the guest and print its paths.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

Progress = Callable[[str], None]

INIT_SCRIPT = Path(__file__).with_name("init.sh")
BUILD_FORMAT = "virtbus-test-guest/1"  # bump when the recipe below changes meaningfully
SECTOR = 512
MIB = 1024 * 1024


class GuestBuildError(RuntimeError):
    """The test guest could not be built (apt, package contents, or file system)."""


@dataclass(frozen=True)
class GuestBuildSettings:
    """What to build: the knobs live here rather than as literals in the code."""

    kernel_meta_package: str = "linux-image-cloud-amd64"
    busybox_package: str = "busybox-static"
    # Loaded in dependency order; names as in modules.dep (dashes and underscores equal).
    modules: tuple[str, ...] = (
        "evdev", "button", "virtio_pci", "virtio_blk", "virtio_console", "virtio_balloon",
        "virtio_net", "pvpanic_mmio", "pvpanic_pci", "virtiofs",
    )  # fmt: skip
    disk_size_mib: int = 16
    pattern_mib: int = 8  # known data in [0, pattern_mib); scratch area above it
    cmdline: str = "console=ttyS0 panic=-1 quiet"
    command_timeout_s: float = 600.0


@dataclass(frozen=True)
class TestGuest:
    """A built guest. The disk is the cached master copy: clone it before writing to it."""

    __test__ = False  # not a pytest test class despite the name

    kernel: Path
    initramfs: Path
    disk: Path
    cmdline: str
    kernel_version: str = ""
    directory: Path = field(default_factory=Path)

    def clone_disk(self, dest: Path) -> Path:
        """Copy the master disk to `dest` so a test can write to it freely."""
        shutil.copyfile(self.disk, dest)
        return dest


def disk_sector(index: int) -> bytes:
    """The known contents of sector `index` of the pattern area (tests recompute it)."""
    line = f"virtbus-test-disk sector {index:08d}\n".encode()
    return (line * (SECTOR // len(line) + 1))[:SECTOR]


def expected_disk_md5(mib: int) -> str:
    """md5 of the first `mib` MiB of a fresh disk, as the guest's `disk-md5` reports it."""
    settings = GuestBuildSettings()
    digest = hashlib.md5()
    for i in range(mib * MIB // SECTOR):
        in_pattern = i < settings.pattern_mib * MIB // SECTOR
        digest.update(disk_sector(i) if in_pattern else bytes(SECTOR))
    return digest.hexdigest()


def default_cache_root() -> Path:
    """$VIRTBUS_CACHE/guests, else $XDG_CACHE_HOME/virtbus/guests, else ~/.cache/..."""
    if env := os.environ.get("VIRTBUS_CACHE"):
        return Path(env) / "guests"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "virtbus" / "guests"


def _run(cmd: list[str], settings: GuestBuildSettings, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=settings.command_timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"{cmd[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _apt_show(package: str, settings: GuestBuildSettings, progress: Progress) -> dict[str, str]:
    """`apt-cache show` fields of the candidate; runs `apt-get update` once if lists are empty."""
    for attempt in range(2):
        try:
            out = _run(["apt-cache", "show", "--no-all-versions", package], settings)
        except GuestBuildError:
            out = ""
        if out.strip():
            fields: dict[str, str] = {}
            for line in out.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line[0].isspace():
                    fields[key] = value.strip()
            return fields
        if attempt == 0 and os.geteuid() == 0:
            progress("apt-get update")
            _run(["apt-get", "update"], settings)
    raise GuestBuildError(f"apt knows no package {package!r} (run apt-get update as root)")


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_signature(package: str) -> str:
    """Changes whenever `apt-get update` changes the package lists."""
    h = hashlib.sha256(package.encode())
    if APT_LISTS.is_dir():
        for entry in sorted(APT_LISTS.iterdir()):
            st = entry.stat()
            h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_kernel_cached(
    root: Path, settings: GuestBuildSettings, progress: Progress
) -> tuple[str, str]:
    """`resolve_kernel`, remembered until the apt lists change (apt-cache takes ~0.6 s here)."""
    memo = root / "resolved.json"
    signature = _apt_lists_signature(settings.kernel_meta_package)
    try:
        saved = json.loads(memo.read_text())
        if saved.get("signature") == signature:
            return str(saved["package"]), str(saved["version"])
    except (OSError, ValueError, KeyError):
        pass
    package, version = resolve_kernel(settings, progress)
    tmp = memo.with_name(f".resolved.{os.getpid()}.json")
    tmp.write_text(json.dumps({"signature": signature, "package": package, "version": version}))
    tmp.replace(memo)
    return package, version


def resolve_kernel(settings: GuestBuildSettings, progress: Progress) -> tuple[str, str]:
    """(package, version) of the kernel image the cloud meta-package depends on."""
    fields = _apt_show(settings.kernel_meta_package, settings, progress)
    for dep in fields.get("Depends", "").split(","):
        name = dep.strip().split(" ")[0]
        if name.startswith("linux-image-") and name != settings.kernel_meta_package:
            return name, fields.get("Version", "")
    raise GuestBuildError(f"no linux-image dependency in {settings.kernel_meta_package}")


def _download_extract(package: str, work: Path, settings: GuestBuildSettings) -> Path:
    """`apt-get download` + `dpkg -x`; returns the extraction root. No root needed."""
    dl = work / "debs"
    dl.mkdir(exist_ok=True)
    _run(["apt-get", "download", package], settings, cwd=dl)
    debs = sorted(dl.glob(f"{package}_*.deb"))
    if not debs:
        raise GuestBuildError(f"apt-get download {package} produced no .deb")
    root = work / f"x-{package}"
    _run(["dpkg", "-x", str(debs[-1]), str(root)], settings)
    return root


def _busybox(work: Path, settings: GuestBuildSettings, progress: Progress) -> Path:
    """Static busybox: the installed package's binary, else one downloaded from apt."""
    try:
        status = _run(["dpkg-query", "-W", "-f=${Status}", settings.busybox_package], settings)
    except GuestBuildError:
        status = ""
    if status.endswith("installed") and Path("/bin/busybox").is_file():
        return Path("/bin/busybox")
    progress(f"downloading {settings.busybox_package}")
    path = _download_extract(settings.busybox_package, work, settings) / "bin" / "busybox"
    if not path.is_file():
        raise GuestBuildError(f"{settings.busybox_package} has no bin/busybox")
    return path


def _modinfo_depends(data: bytes) -> list[str]:
    """Dependencies from an ELF64 module's .modinfo section (no kmod on the host needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError("module is not an ELF64 object")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    for name_idx, _t, _f, _a, offset, size in sections:
        name = data[names_off + name_idx : data.index(b"\0", names_off + name_idx)]
        if name == b".modinfo":
            for entry in data[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    deps = entry[len(b"depends=") :].decode()
                    return [d for d in deps.split(",") if d]
            return []
    return []


def _module_bytes(path: Path, settings: GuestBuildSettings) -> bytes:
    """Module contents, decompressed: busybox insmod wants a plain ELF object."""
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    if path.suffix == ".zst":
        proc = subprocess.run(
            ["zstd", "-dc", str(path)], capture_output=True, timeout=settings.command_timeout_s
        )
        if proc.returncode != 0:
            raise GuestBuildError(f"zstd -d {path.name}: {proc.stderr.decode().strip()}")
        return proc.stdout
    return raw


def _norm(name: str) -> str:
    for ext in (".xz", ".zst", ".gz", ".ko"):
        name = name.removesuffix(ext)
    return name.replace("-", "_")


def collect_modules(
    moddir: Path, wanted: Iterable[str], settings: GuestBuildSettings
) -> list[tuple[str, bytes]]:
    """Wanted modules plus their dependencies, in load order; built-ins are skipped."""
    builtin = {
        _norm(Path(line).name)
        for line in (moddir / "modules.builtin").read_text().splitlines()
        if line
    }
    files = {_norm(p.name): p for p in moddir.rglob("*.ko*")}
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = _norm(name)
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise GuestBuildError(f"kernel has no module {name!r} (and it is not built in)")
        data = _module_bytes(files[name], settings)
        for dep in _modinfo_depends(data):
            visit(dep)
        ordered.append((name, data))

    for name in wanted:
        visit(name)
    return ordered


CpioEntry = tuple[str, int, bytes, tuple[int, int]]  # name, mode, data, (rdev major, minor)


def _cpio_newc(entries: list[CpioEntry]) -> bytes:
    """A newc ("070701") cpio archive, as the kernel unpacks initramfs; no cpio tool needed."""
    out = bytearray()

    def add(name: str, mode: int, data: bytes, rdev: tuple[int, int], ino: int) -> None:
        nlink = 2 if mode & 0o040000 else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(name, mode, data, rdev, ino)
    add("TRAILER!!!", 0, b"", (0, 0), 0)
    return bytes(out)


def _initramfs(busybox: Path, modules: list[tuple[str, bytes]], init: bytes) -> bytes:
    dirs = ["bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/modules"]
    none = (0, 0)
    entries: list[CpioEntry] = [(d, 0o040755, b"", none) for d in dirs]
    entries.append(("dev/console", 0o020600, b"", (5, 1)))  # stdio for init before devtmpfs
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes(), none))
    entries.append(("bin/sh", 0o120777, b"busybox", none))
    entries.append(("init", 0o100755, init, none))
    for name, data in modules:
        entries.append((f"lib/modules/{name}.ko", 0o100644, data, none))
    order = "".join(f"{name}\n" for name, _ in modules).encode()
    entries.append(("lib/modules/load.order", 0o100644, order, none))
    return _cpio_newc(entries)


def _write_disk(path: Path, settings: GuestBuildSettings) -> None:
    sectors = settings.pattern_mib * MIB // SECTOR
    with path.open("wb") as f:
        for start in range(0, sectors, 2048):
            f.write(b"".join(disk_sector(i) for i in range(start, min(start + 2048, sectors))))
        f.truncate(settings.disk_size_mib * MIB)


def cache_key(settings: GuestBuildSettings, kernel_pkg: str, kernel_version: str) -> str:
    h = hashlib.sha256()
    for part in (BUILD_FORMAT, kernel_pkg, kernel_version, repr(settings.modules),
                 str(settings.disk_size_mib), str(settings.pattern_mib)):  # fmt: skip
        h.update(part.encode() + b"\0")
    h.update(INIT_SCRIPT.read_bytes())
    return f"{kernel_version or kernel_pkg}-{h.hexdigest()[:12]}"


def _load(directory: Path, settings: GuestBuildSettings) -> TestGuest | None:
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return TestGuest(
        kernel=directory / "vmlinuz",
        initramfs=directory / "initramfs.cpio",
        disk=directory / "disk.raw",
        cmdline=settings.cmdline,
        kernel_version=str(meta["kernel_version"]),
        directory=directory,
    )


def _build_into(
    out: Path, work: Path, kernel_pkg: str, settings: GuestBuildSettings, progress: Progress
) -> str:
    progress(f"downloading {kernel_pkg}")
    kroot = _download_extract(kernel_pkg, work, settings)
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    moddirs = sorted((kroot / "lib" / "modules").iterdir())
    if not vmlinuz or not moddirs:
        raise GuestBuildError(f"{kernel_pkg} has no boot/vmlinuz-* or lib/modules/*")
    kernel_version = moddirs[-1].name
    shutil.copyfile(vmlinuz[-1], out / "vmlinuz")
    progress("collecting kernel modules")
    modules = collect_modules(moddirs[-1], settings.modules, settings)
    busybox = _busybox(work, settings, progress)
    progress("building initramfs")
    (out / "initramfs.cpio").write_bytes(_initramfs(busybox, modules, INIT_SCRIPT.read_bytes()))
    progress("writing disk image")
    _write_disk(out / "disk.raw", settings)
    return kernel_version


def build_test_guest(
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    settings: GuestBuildSettings | None = None,
) -> TestGuest:
    """Return the cached test guest, building it first if the cache lacks this version."""
    settings = settings or GuestBuildSettings()
    say: Progress = progress or (lambda _msg: None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    kernel_pkg, pkg_version = resolve_kernel_cached(root, settings, say)
    final = root / cache_key(settings, kernel_pkg, pkg_version)
    if (guest := _load(final, settings)) is not None:
        return guest
    with (root / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same guest
        if (guest := _load(final, settings)) is not None:
            return guest
        with tempfile.TemporaryDirectory(prefix=".build-", dir=root) as tmp:
            out, work = Path(tmp) / "out", Path(tmp) / "work"
            out.mkdir()
            work.mkdir()
            kernel_version = _build_into(out, work, kernel_pkg, settings, say)
            meta = {"kernel_package": kernel_pkg, "package_version": pkg_version,
                    "kernel_version": kernel_version, "format": BUILD_FORMAT,
                    "built_at": time.time()}  # fmt: skip
            (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            out.rename(final)
    say(f"test guest ready in {final}")
    guest = _load(final, settings)
    assert guest is not None
    return guest


async def ensure_test_guest(
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    settings: GuestBuildSettings | None = None,
) -> TestGuest:
    """`build_test_guest` off the event loop (it runs apt and writes files)."""
    return await asyncio.to_thread(build_test_guest, cache_dir, progress, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--prune", action="store_true", help="delete other cached builds")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        guest = build_test_guest(args.cache_dir, lambda m: print(f"# {m}", file=sys.stderr))
    except GuestBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.prune:
        for old in guest.directory.parent.iterdir():
            if old.is_dir() and old != guest.directory and not old.name.startswith("."):
                shutil.rmtree(old)
                print(f"# pruned {old}", file=sys.stderr)
    print(f"kernel={guest.kernel}")
    print(f"initramfs={guest.initramfs}")
    print(f"disk={guest.disk}")
    print(f"cmdline={guest.cmdline}")
    print(f"kernel_version={guest.kernel_version}")
    print(f"# {time.monotonic() - started:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
