"""``iscsi-direct`` pools: an iSCSI target whose LUNs QEMU opens itself through libiscsi.

No kernel initiator and no device nodes: the pool lists the target's LUNs with libiscsi's
own tools (``iscsi-ls``, ``iscsi-readcapacity16``), a volume is ``unit:0:0:<lun>`` (libvirt's
names) with an ``iscsi://host:port/IQN/LUN`` path, and a domain's
``<disk type='volume'>`` becomes QEMU's ``iscsi`` block driver with the pool's initiator
name. As in libvirt, LUNs are the target's: no create, delete, resize or upload here;
refresh and ``vol-wipe --algorithm zero`` (qemu-img writes zeros through libiscsi) are.
"""

from __future__ import annotations

import json
import re

from drivers.storage.base import BackendSettings, ImageSource, PoolScan, UploadSink, VolumeSpec
from drivers.storage.tools import Progress, run, run_with_progress
from virtbus.errors import NoStorageVol, NoSupport, OperationFailed
from virtbus.storage import PoolDefinition, PoolSizes, VolumeFacts

DEFAULT_PORT = 3260
_TARGET = re.compile(r"^Target:(\S+)")
_LUN = re.compile(r"^Lun:(\d+)\s+Type:(\S+)")
_NAME = re.compile(r"^unit:0:0:(\d+)$")


class IscsiDirectBackend:
    type = "iscsi-direct"
    create_formats: tuple[str, ...] = ()
    files = False

    def __init__(self, settings: BackendSettings | None = None) -> None:
        self.settings = settings or BackendSettings()

    def check(self, pool: PoolDefinition) -> None:
        if pool.source.auth_type is not None:
            raise NoSupport(
                f"iscsi-direct pool '{pool.name}': CHAP <auth> needs libvirt's secrets, which"
                " virtbus does not have yet"
            )

    def portal(self, pool: PoolDefinition) -> str:
        host = pool.source.hosts[0]
        name = f"[{host.name}]" if ":" in host.name else host.name
        return f"{name}:{host.port or DEFAULT_PORT}"

    def iqn(self, pool: PoolDefinition) -> str:
        return pool.source.devices[0]

    def initiator(self, pool: PoolDefinition) -> str:
        assert pool.source.initiator_iqn is not None  # required by the XML check
        return pool.source.initiator_iqn

    def url(self, pool: PoolDefinition, lun: int | None = None) -> str:
        base = f"iscsi://{self.portal(pool)}"
        return base if lun is None else f"{base}/{self.iqn(pool)}/{lun}"

    # ------------------------------------------------------------------ pool
    async def build(self, pool: PoolDefinition, *, overwrite: bool | None) -> None:
        return None  # nothing to build: the target is the storage administrator's

    async def start(self, pool: PoolDefinition) -> None:
        await self._luns(pool)  # the target answers and exports the IQN

    async def stop(self, pool: PoolDefinition) -> None:
        return None

    async def delete(self, pool: PoolDefinition) -> None:
        raise NoSupport("iscsi-direct pools cannot be deleted: the target's LUNs are not ours")

    async def active(self, pool: PoolDefinition) -> bool:
        return True  # nothing on this host to lose; a refresh finds an unreachable target

    async def _luns(self, pool: PoolDefinition) -> list[int]:
        out = await run(
            ["iscsi-ls", "-s", "-i", self.initiator(pool), self.url(pool)],
            timeout=self.settings.tool_timeout,
            what=f"list LUNs of {self.iqn(pool)} at {self.portal(pool)}",
        )
        luns: list[int] = []
        current = None
        for line in out.splitlines():
            line = line.strip()
            if m := _TARGET.match(line):
                current = m.group(1)
            elif (
                (m := _LUN.match(line))
                and current == self.iqn(pool)
                and m.group(2) == "DIRECT_ACCESS"
            ):
                luns.append(int(m.group(1)))
        if current is None or self.iqn(pool) not in out:
            raise OperationFailed(
                f"pool '{pool.name}': target {self.iqn(pool)} is not exported by"
                f" {self.portal(pool)}"
            )
        return luns

    async def _capacity(self, pool: PoolDefinition, lun: int) -> int:
        out = await run(
            ["iscsi-readcapacity16", "-s", "-i", self.initiator(pool), self.url(pool, lun)],
            timeout=self.settings.tool_timeout,
            what=f"read the capacity of LUN {lun}",
        )
        try:
            return int(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise OperationFailed(f"unreadable capacity of LUN {lun}: {out[:80]!r}") from None

    def _facts(self, pool: PoolDefinition, lun: int, size: int) -> VolumeFacts:
        url = self.url(pool, lun)
        return VolumeFacts(
            name=f"unit:0:0:{lun}",
            type="network",
            path=url,
            key=url,
            format="raw",
            capacity=size,
            allocation=size,
            physical=size,
        )

    async def sizes(self, pool: PoolDefinition) -> PoolSizes:
        return (await self.scan(pool, {})).sizes

    async def scan(self, pool: PoolDefinition, known: dict[str, str]) -> PoolScan:
        vols = [
            self._facts(pool, lun, await self._capacity(pool, lun))
            for lun in await self._luns(pool)
        ]
        total = sum(v.capacity for v in vols)
        return PoolScan(PoolSizes(total, total, 0), tuple(vols))

    # ------------------------------------------------------------------ volumes
    async def volume(self, pool: PoolDefinition, name: str, fmt: str | None) -> VolumeFacts:
        m = _NAME.match(name)
        if m is None or int(m.group(1)) not in await self._luns(pool):
            raise NoStorageVol(f"no storage vol with matching name '{name}' in pool '{pool.name}'")
        lun = int(m.group(1))
        return self._facts(pool, lun, await self._capacity(pool, lun))

    def _no_luns(self, what: str) -> NoSupport:
        return NoSupport(
            f"iscsi-direct pools cannot {what}: LUNs belong to the target (as in libvirt)"
        )

    async def create(
        self, pool: PoolDefinition, spec: VolumeSpec, progress: Progress | None
    ) -> VolumeFacts:
        raise self._no_luns("create volumes")

    async def clone(
        self, pool: PoolDefinition, spec: VolumeSpec, source: ImageSource, progress: Progress | None
    ) -> VolumeFacts:
        raise self._no_luns("create volumes")

    async def remove(self, pool: PoolDefinition, facts: VolumeFacts) -> None:
        raise self._no_luns("delete volumes")

    async def resize(
        self,
        pool: PoolDefinition,
        facts: VolumeFacts,
        capacity: int,
        *,
        shrink: bool,
        allocate: bool,
    ) -> None:
        raise self._no_luns("resize volumes")

    async def wipe(
        self, pool: PoolDefinition, facts: VolumeFacts, algorithm: str, progress: Progress | None
    ) -> None:
        if algorithm != "zero":
            raise NoSupport(
                f"iscsi-direct pools wipe with zeros only (as in libvirt), not '{algorithm}'"
            )
        zeros = {
            "driver": "raw",
            "file": {"driver": "null-co", "size": facts.capacity, "read-zeroes": True},
        }
        argv = ["qemu-img", "convert", "-p", "-n", "-f", "raw", "-O", "raw",
                "json:" + json.dumps(zeros), self.image(pool, facts).spec]  # fmt: skip
        await run_with_progress(argv, what=f"wipe {facts.name}", total=facts.capacity,
                                progress=progress)  # fmt: skip

    def blockdev(self, pool: PoolDefinition, lun: int) -> dict[str, object]:
        """QEMU's ``iscsi`` blockdev driver options for one LUN."""
        return {
            "driver": "iscsi",
            "transport": "tcp",
            "portal": self.portal(pool),
            "target": self.iqn(pool),
            "lun": lun,
            "initiator-name": self.initiator(pool),
        }

    def image(self, pool: PoolDefinition, facts: VolumeFacts) -> ImageSource:
        m = _NAME.match(facts.name)
        assert m is not None
        node = self.blockdev(pool, int(m.group(1)))
        spec = "json:" + json.dumps({"driver": "raw", "file": node})
        return ImageSource(spec, "raw", facts.capacity, kind="network", network=node)

    async def upload(self, pool: PoolDefinition, facts: VolumeFacts, length: int) -> UploadSink:
        raise self._no_luns("take vol-upload")

    def download_path(self, pool: PoolDefinition, facts: VolumeFacts) -> str:
        raise self._no_luns("serve vol-download")
