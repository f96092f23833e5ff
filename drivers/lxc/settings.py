"""Typed settings of the LXC driver: every path, timeout and interval lives here."""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtbus.errors import InvalidArgument
from virtbus.settings import Backoff

NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
DEFAULT_ALLOWED_ROOTS = (Path("/var/lib/virtbus/containers"), Path("/var/lib/lxc"))


def signal_name(value: str, what: str) -> str:
    """A signal name lxc understands (``SIGTERM``, ``TERM``, ``SIGRTMIN+3``), normalised."""
    name = value.strip().upper()
    if not name.startswith("SIG"):
        name = f"SIG{name}"
    base, plus, offset = name.partition("+")
    if base in ("SIGRTMIN", "SIGRTMAX") and (not plus or offset.isdigit()):
        return name
    if plus or not hasattr(signal.Signals, name):
        raise InvalidArgument(f"lxc driver option {what}: unknown signal {value!r}")
    return name


@dataclass(frozen=True, slots=True)
class LxcSettings:
    """The LXC driver. Times are seconds.

    ``lxcpath`` is the driver's own LXCPATH (``lxc-* -P``): one directory per container
    holding its definition, the generated lxc config, its run status and its logs.
    """

    lxcpath: Path = Path("/var/lib/virtbus/lxc")
    tools_dir: str = ""  # where lxc-start & co. are ("" = $PATH)
    # host paths a container may expose (root filesystems, bind mounts, images, devices)
    allowed_roots: tuple[Path, ...] = DEFAULT_ALLOWED_ROOTS
    command_timeout: float = 30.0  # one lxc-start / lxc-stop / lxc-freeze / lxc-unfreeze
    list_timeout: float = 10.0  # lxc-ls / lxc-info
    start_timeout: float = 30.0  # lxc-start returned: until the monitor says RUNNING
    stop_timeout: float = 30.0  # destroy: until the monitor says STOPPED
    shutdown_timeout: float = 120.0  # for callers: a sensible wait for shutdown()
    halt_signal: str = "SIGTERM"  # shutdown: the signal libvirt's LXC driver sends init
    reboot_signal: str = "SIGHUP"  # reboot: likewise
    reconcile_interval: float = 2.0  # s, cheap liveness/freezer/OOM check of each container
    run_root: Path = Path("/run")  # lxc's rundir for root: <run_root>/lxc/<lxcpath>/monitor-fifo
    netns: str = ""  # run every lxc command in this named network namespace (/run/netns)
    lxc_log_level: str = "WARN"  # lxc.log.level of each container's lxc.log
    log_tail_bytes: int = 4096  # of lxc.log quoted in a start error
    monitor_check: float = 1.0  # s between checks that the monitor FIFO is still ours
    monitor_reopen: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0))
    # a background loop (monitor, reconcile) that dies of a bug is restarted after this
    loop_restart: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=30.0))

    @property
    def monitor_fifo(self) -> Path:
        """Where liblxc writes state changes of the containers in ``lxcpath``."""
        return self.run_root / "lxc" / str(self.lxcpath).lstrip("/") / "monitor-fifo"

    def tool(self, name: str) -> str:
        return str(Path(self.tools_dir) / name) if self.tools_dir else name

    @classmethod
    def from_options(cls, state_dir: Path, options: Mapping[str, str]) -> LxcSettings:
        """From the agent's ``--driver-option KEY=VALUE`` map (see README, "LXC driver").

        ``allowed_roots`` is a ``:``-separated list of directories.
        """
        floats = ("command_timeout", "list_timeout", "start_timeout", "stop_timeout",
                  "shutdown_timeout", "reconcile_interval", "monitor_check")  # fmt: skip
        kwargs: dict[str, Any] = {"lxcpath": state_dir / "lxc"}
        for key, value in options.items():
            if key in floats:
                try:
                    number = float(value)
                except ValueError:
                    raise InvalidArgument(f"lxc driver option {key} must be a number") from None
                if number <= 0:
                    raise InvalidArgument(f"lxc driver option {key} must be > 0, got {value}")
                kwargs[key] = number
            elif key in ("halt_signal", "reboot_signal"):
                kwargs[key] = signal_name(value, key)
            elif key == "allowed_roots":
                roots = tuple(Path(p) for p in value.split(":") if p)
                if not all(r.is_absolute() for r in roots):
                    raise InvalidArgument("lxc driver option allowed_roots: absolute paths only")
                kwargs[key] = roots
            elif key in ("lxcpath", "run_root"):
                if not Path(value).is_absolute():
                    raise InvalidArgument(f"lxc driver option {key} must be an absolute path")
                kwargs[key] = Path(value)
            elif key == "netns":
                if not NETNS_NAME.match(value):
                    raise InvalidArgument(f"lxc driver option netns: invalid name {value!r}")
                kwargs[key] = value
            elif key in ("tools_dir", "lxc_log_level"):
                kwargs[key] = value
            else:
                raise InvalidArgument(f"unknown lxc driver option {key!r}")
        return cls(**kwargs)
