"""The LXC test guest: a busybox root filesystem from Debian's busybox-static, in a cache.

The root holds ``/bin/busybox`` (the installed package's binary, else one fetched with
``apt-get download``), its applet links, empty ``/proc /sys /dev /tmp`` and ``/init``,
a shell script that prints to the container's console (which lxc logs to the
container's ``console.log``):

- ``VIRTBUS-LXC-READY`` once, then ``VIRTBUS-TICK <n>`` every second (the heartbeat);
- on SIGTERM (the driver's shutdown) ``VIRTBUS-LXC-HALT`` and exit 0, on SIGHUP (its
  reboot) ``VIRTBUS-LXC-REBOOT`` and exit 0;
- with arguments, a scenario first: ``exit CODE AFTER`` (init exits by itself after
  AFTER seconds), ``burn`` (a CPU-bound loop in the background), ``alloc MIB`` (a process
  that allocates MIB MiB, then ``VIRTBUS-ALLOC-RC <status>``).

The root is shared read-only by every test container (``<readonly/>``); they write to a
``type='ram'`` ``/tmp``. It is built in a temporary directory renamed into place, under
a file lock, keyed by a hash of the recipe and the busybox binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from virtbus.guests.build import default_cache_root

READY = "VIRTBUS-LXC-READY"
TICK = "VIRTBUS-TICK"
HALT = "VIRTBUS-LXC-HALT"
REBOOT = "VIRTBUS-LXC-REBOOT"
ALLOC_RC = "VIRTBUS-ALLOC-RC"

INIT = f"""#!/bin/sh
exec </dev/console >/dev/console 2>&1
trap 'echo {HALT}; exit 0' TERM
trap 'echo {REBOOT}; exit 0' HUP
echo "{READY} $$ $*"
case "$1" in
  exit) sleep "$3"; echo "VIRTBUS-LXC-EXIT $2"; exit "$2" ;;
  burn) (while :; do :; done) & ;;
  alloc) (dd if=/dev/zero of=/dev/null bs="$2"M count=1 2>/dev/null; echo "{ALLOC_RC} $?") & ;;
esac
n=0
while :; do
  n=$((n + 1))
  echo "{TICK} $n"
  sleep 1 &
  wait $!
done
"""
RECIPE = "virtbus-lxc-rootfs/1"
APPLETS = ("sh", "sleep", "echo", "dd", "cat", "ls", "ps", "kill", "ip", "ping", "true")


@dataclass(frozen=True)
class LxcRootfs:
    __test__ = False

    path: Path  # the root filesystem (a directory)

    @property
    def cache_dir(self) -> Path:
        """What ``allowed_roots`` must contain for containers to use this root."""
        return self.path.parent.parent


def _busybox(work: Path) -> Path:
    installed = Path("/bin/busybox")
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if status.stdout.endswith("installed") and installed.is_file():
        return installed
    subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, check=True, timeout=600)
    deb = next(work.glob("busybox-static_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True, timeout=600)
    return work / "x" / "bin" / "busybox"


def build_lxc_rootfs(cache_root: Path | None = None) -> LxcRootfs:
    """Build (once) and return the busybox root filesystem."""
    base = (cache_root or default_cache_root()) / "lxc"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            busybox = _busybox(Path(tmp))
            digest = hashlib.sha256(RECIPE.encode() + INIT.encode() + busybox.read_bytes())
            target = base / digest.hexdigest()[:16]
            if (target / "rootfs" / "init").is_file():
                return LxcRootfs(target / "rootfs")
            work = Path(tmp) / "out"
            root = work / "rootfs"
            for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root"):
                (root / d).mkdir(parents=True)
            shutil.copy2(busybox, root / "bin" / "busybox")
            for applet in APPLETS:
                os.symlink("busybox", root / "bin" / applet)
            (root / "init").write_text(INIT)
            (root / "init").chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)
            work.rename(target)
    return LxcRootfs(target / "rootfs")
