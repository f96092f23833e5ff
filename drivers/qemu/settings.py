"""Typed settings of the QEMU driver: every wait, timeout and bound in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from drivers.qemu.argv_common import ArgvSettings
from drivers.qemu.companions import CompanionSettings
from drivers.qemu.confine import (
    DEFAULT_DEVICES,
    DEFAULT_FIRMWARE_ROOTS,
    DEFAULT_PROGRAM_DIRS,
    ConfineSettings,
)
from drivers.qemu.host import FIRMWARE_DIRS
from virtbus.settings import Backoff


@dataclass(frozen=True, slots=True)
class QemuSettings:
    """Timeouts are seconds.

    The destroy waits are a bounded escalation (``quit`` over QMP, then SIGTERM, then
    SIGKILL) so a hung QEMU never hangs the agent.
    """

    emulator: str = "qemu-system-x86_64"  # the binary (the XML's <emulator> is ignored)
    qmp_timeout: float = 10.0  # one QMP command
    connect_timeout: float = 10.0  # launch until the QMP socket answers
    quit_wait: float = 1.0  # `quit` until the process is gone
    sigterm_wait: float = 2.0
    sigkill_wait: float = 5.0
    shutdown_timeout: float = 120.0  # for callers: a sensible `timeout` for shutdown(); the
    # driver itself waits only when given one (the Driver protocol: None returns at once)
    reboot_fallback: float = 30.0  # ACPI reboot ignored by the guest -> system_reset
    exit_wait: float = 2.0  # monitor EOF until the process is seen gone
    exit_poll: float = 0.01  # polling of a process that is not our child
    event_queue: int = 1024  # QMP events buffered per domain (oldest kept, newer dropped)
    log_tail_bytes: int = 4096  # of the QEMU log quoted in a start error
    detach_timeout: float = 10.0  # device_del until the guest lets go (DEVICE_DELETED)
    snapshot_timeout: float = 600.0  # one snapshot-save/load/delete job until it concludes
    block_job_progress_s: float = 1.0  # a block job's progress is read at most this often
    #: MiB/s each disk's backup job may copy (0: unlimited), so that a host's backups do
    #: not starve its guests' I/O (``--driver-option backup_bandwidth=50``)
    backup_bandwidth: int = 0
    reconnect: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0))
    #: the command line's tunables; its nvram/memory/secrets dirs default to the state dir
    argv: ArgvSettings | None = None
    #: QEMU firmware descriptor directories, highest priority first
    firmware_dirs: tuple[Path, ...] = FIRMWARE_DIRS
    #: helper processes, overlays and scripts around a run (drivers/qemu/companions.py)
    companions: CompanionSettings = field(default_factory=CompanionSettings)
    #: path confinement (drivers/qemu/confine.py): besides storage pool targets and the
    #: domain's own run dir, the directories any domain may name files and sockets in
    #: (``--driver-option allowed_dirs=/srv/images:/srv/iso``)
    allowed_dirs: tuple[Path, ...] = ()
    allowed_devices: tuple[str, ...] = DEFAULT_DEVICES  # device nodes (globs) any domain may use
    firmware_roots: tuple[Path, ...] = DEFAULT_FIRMWARE_ROOTS  # read-only loaders, templates
    program_dirs: tuple[Path, ...] = DEFAULT_PROGRAM_DIRS  # interface scripts, virtiofsd
    #: False: accept any host path (libvirt without sVirt). The operator's explicit
    #: opt-out, and the compatibility harness's (libvirt's test inputs name any path)
    confine_paths: bool = True
    #: the user QEMU runs as (drivers/qemu/dac.py): "virtbus-qemu" (deploy/setup-dev creates
    #: it) gives each QEMU that uid and chowns the domain's files to it for the run; empty:
    #: QEMU runs as the agent's user (root), as before
    qemu_user: str = ""
    #: per-domain uids (drivers/qemu/dac.py): "200000-200999" gives each domain's QEMU a
    #: uid (and gid) of its own from that range, from its first start until it is
    #: undefined, so one guest's QEMU cannot open another's files; with qemu_user set too,
    #: that user's groups are every QEMU's supplementary groups (shared TLS credentials)
    qemu_uid_range: str = ""
    #: device cgroups (drivers/qemu/cgroup.py): "on" puts each QEMU in a cgroup v1 devices
    #: group of its own that denies every device but libvirt's default ACL and the nodes
    #: its domain is given (the agent refuses to start without the v1 hierarchy); "auto":
    #: on where the hierarchy exists; "off" (the default, like qemu_user: opt-in)
    cgroup_devices: str = "off"
    #: device nodes every domain's group allows besides the default ACL
    #: (``--driver-option cgroup_devices_allow=/dev/sev,/dev/vhost-vsock``)
    cgroup_devices_allow: tuple[str, ...] = ()
    #: addresses besides loopback that displays, TCP chardevs and incoming migrations may
    #: listen on (``--driver-option listen_allowed=192.0.2.10,198.51.100.7``; "*": any)
    listen_allowed: tuple[str, ...] = ()
    #: migrations over TLS (``virtbus migrate --tls``, libvirt's qemu.conf settings of the
    #: same names): the directory of QEMU's tls-creds-x509 for the migration stream and the
    #: NBD copy of the disks (ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem;
    #: ``virtbus pki issue host NAME --qemu-dir DIR`` lays it out), whether the destination
    #: asks the source for its certificate (the source always checks the destination's),
    #: and whether this host refuses migrations without TLS, in and out
    migrate_tls_x509_cert_dir: str = "/etc/pki/qemu"
    migrate_tls_x509_verify: bool = True
    migrate_tls_force: bool = False

    def confinement(self) -> ConfineSettings:
        """The confinement rules these settings give."""
        return ConfineSettings(
            enforce=self.confine_paths, allowed_dirs=self.allowed_dirs,
            allowed_devices=self.allowed_devices, firmware_roots=self.firmware_roots,
            program_dirs=self.program_dirs, listen_allowed=self.listen_allowed,
        )  # fmt: skip
