"""Typed settings of the Xen driver: every timeout, interval and path lives here."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtbus.config import options_into
from virtbus.settings import Backoff

DEFAULT_XENSTORED_PATH = "/run/xenstored/socket"


def xenstored_path_from_env() -> str:
    """``$XENSTORED_PATH`` as libxenstore honours it, else the standard socket."""
    return os.environ.get("XENSTORED_PATH") or DEFAULT_XENSTORED_PATH


@dataclass(frozen=True, slots=True)
class XenStoreSettings:
    """The XenStore wire client."""

    path: str = field(default_factory=xenstored_path_from_env)
    request_timeout: float = 10.0  # s, one request/reply
    connect_timeout: float = 5.0
    event_queue: int = 1024  # watch events held for the consumer; overflow = "resync"
    transaction_retries: int = 8  # EAGAIN on commit
    transaction_backoff: Backoff = field(
        default_factory=lambda: Backoff(initial=0.01, maximum=0.5, factor=2.0, jitter=0.5)
    )
    reconnect: Backoff = field(default_factory=lambda: Backoff(initial=0.1, maximum=5.0))


@dataclass(frozen=True, slots=True)
class XenSettings:
    """The Xen driver."""

    xl_path: str = "xl"
    state_dir: Path = Path("/var/lib/virtbus/xen")  # definitions (XML) + generated configs
    xl_timeout: float = 60.0  # s, one xl command (create, shutdown -w excluded)
    list_timeout: float = 15.0  # s, `xl list -v` / `xl info`
    shutdown_poll: float = 0.2  # s, while waiting for a shutdown to complete
    reconcile_interval: float = 2.0  # s, periodic reconcile (catches external xl pause)
    reconcile_idle_factor: float = 4.0  # the periodic pass idles >= this x the last pass
    debounce: float = 0.05  # s, coalesce bursts of XenStore triggers
    start_timeout: float = 30.0  # s, wait for a created domain to show in `xl list`
    parallel_creates: int = 2  # concurrent `xl create` (each loads a kernel through dom0)
    migrate_timeout: float = 600.0  # s, one `xl migrate`
    # `xl migrate -s <migrate_ssh> <domain> <host>`: the receiver transport. "ssh" on real
    # hosts; "" runs <host> itself as the receiver command (localhost: "xl migrate-receive").
    migrate_ssh: str = "ssh"
    migrate_host: str = field(default_factory=socket.gethostname)  # what prepare advertises
    xenstore: XenStoreSettings = field(default_factory=XenStoreSettings)
    # a background loop (reconcile, XenStore) that dies of a bug is restarted after this
    loop_restart: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=30.0))

    @classmethod
    def from_options(cls, state_dir: Path, options: Mapping[str, str]) -> XenSettings:
        """From the agent's ``--driver-option KEY=VALUE`` map: the plain fields (xl_path,
        migrate_ssh, migrate_host, the timeouts ...) and ``xenstored_path``."""
        plain = {k: v for k, v in options.items() if k != "xenstored_path"}
        fixed: dict[str, Any] = {"state_dir": state_dir}
        if "xenstored_path" in options:
            fixed["xenstore"] = XenStoreSettings(path=options["xenstored_path"])
        return options_into(cls, plain, "xen driver", **fixed)
