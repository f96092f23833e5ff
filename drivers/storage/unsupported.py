"""Pool types that parse but cannot run on this host, each with the reason (NO_SUPPORT)."""

from __future__ import annotations

from typing import NoReturn

from virtbus.errors import NoSupport
from virtbus.storage import PoolDefinition

REASONS: dict[str, str] = {
    "logical": "LVM needs device-mapper, which the kernels virtbus is built and tested on lack"
    " (dmsetup targets fails, lvcreate refuses); the backend is not implemented untested",
    "netfs": "no NFS or CIFS client in this kernel and no server to test against",
    "iscsi": "the kernel iSCSI initiator (open-iscsi) is not available; use type='iscsi-direct',"
    " where QEMU opens the LUNs itself through libiscsi",
    "scsi": "no SCSI host adapters (scsi_host/fc_host) to test against",
    "mpath": "multipath needs device-mapper, which this kernel lacks",
    "rbd": "no Ceph cluster (RBD) to test against",
    "sheepdog": "sheepdog was removed from QEMU and libvirt",
    "gluster": "no GlusterFS server to test against",
    "zfs": "no ZFS in this kernel",
    "vstorage": "Virtuozzo Storage is not available",
}


class UnsupportedBackend:
    """Every call fails with NO_SUPPORT naming the pool type and why."""

    create_formats: tuple[str, ...] = ()
    files = False

    def __init__(self, pool_type: str) -> None:
        self.type = pool_type
        self.reason = REASONS.get(pool_type, "not implemented")

    def refuse(self, pool: PoolDefinition | None = None) -> NoSupport:
        name = f" '{pool.name}'" if pool is not None else ""
        return NoSupport(
            f"storage pool{name} of type '{self.type}' is not supported here: {self.reason}"
        )

    def check(self, pool: PoolDefinition) -> NoReturn:
        raise self.refuse(pool)
