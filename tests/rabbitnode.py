"""A RabbitMQ node of a test's own: its own node name, ports, config, data and log dirs
under one temp dir, started in the foreground (``rabbitmq-server``) and stopped by PID.
Tests that stop or restart a broker use one, never the shared broker on 5672."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

START_WAIT = 180.0  # s: a loaded 2-core machine starts a node slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RabbitNode:
    name: str  # e.g. vbt-1a2b3c4d@localhost
    port: int
    root: Path
    proc: asyncio.subprocess.Process
    tls_port: int | None = None  # the amqps listener, when started with ``tls=``

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def tls_url(self, vhost: str = "") -> str:
        """``amqps://127.0.0.1:PORT/VHOST`` (no user: the client certificate is the user)."""
        assert self.tls_port is not None, "node started without tls="
        return f"amqps://127.0.0.1:{self.tls_port}/{quote(vhost, safe='')}"

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl -n NODE ARGS`` (this node only)."""
        proc = await asyncio.create_subprocess_exec(
            "rabbitmqctl", "-n", self.name, *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        if proc.returncode != 0:
            raise AssertionError(f"rabbitmqctl {' '.join(args)}: {err.decode()}{out.decode()}")
        return out.decode()

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup")


@dataclass(frozen=True)
class NodeTls:
    """The broker's side of TLS: its CA (which client certificates must chain to), its
    certificate and key. The node gets an amqps listener that requires a client
    certificate and logs it in by its CN (SASL EXTERNAL, rabbitmq_auth_mechanism_ssl)."""

    ca: Path
    cert: Path
    key: Path


def _tls_conf(root: Path, tls: NodeTls, port: int) -> str:
    (root / "tls").mkdir()
    for name, source in (("ca.pem", tls.ca), ("server.pem", tls.cert), ("key.pem", tls.key)):
        shutil.copyfile(source, root / "tls" / name)
    return (
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {root}/tls/ca.pem\n"
        f"ssl_options.certfile = {root}/tls/server.pem\n"
        f"ssl_options.keyfile = {root}/tls/key.pem\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        "ssl_cert_login_from = common_name\n"
        "auth_mechanisms.1 = EXTERNAL\n"
        "auth_mechanisms.2 = PLAIN\n"
    )


@contextlib.asynccontextmanager
async def rabbit_node(
    *, tls: NodeTls | None = None, plugins: Sequence[str] = ()
) -> AsyncIterator[RabbitNode]:
    """A fresh node (about 10-30 s to start here); removed with its directory afterwards.
    ``tls``: also an amqps listener (``node.tls_port``) with certificate logins."""
    if shutil.which("rabbitmq-server") is None:
        raise AssertionError("rabbitmq-server is not installed: run deploy/setup-dev")
    root = Path(tempfile.mkdtemp(prefix="vbrmq-"))
    name = f"vbt-{uuid.uuid4().hex[:8]}@localhost"
    port, dist = free_port(), free_port()
    (root / "mnesia").mkdir()
    (root / "log").mkdir()
    tls_port = free_port() if tls is not None else None
    conf = f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"
    enabled = list(plugins)
    if tls is not None and tls_port is not None:
        conf += _tls_conf(root, tls, tls_port)
        enabled.append("rabbitmq_auth_mechanism_ssl")
    (root / "rabbitmq.conf").write_text(conf)
    # No management listener on 15672 unless asked for.
    (root / "enabled_plugins").write_text(f"[{','.join(enabled)}].\n")
    (root / "env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
    shutil.chown(root, "rabbitmq", "rabbitmq")  # the server drops to the rabbitmq user
    for path in root.rglob("*"):
        shutil.chown(path, "rabbitmq", "rabbitmq")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
        "RABBITMQ_LOG_BASE": str(root / "log"),
        "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(root / "env.conf"),
        "RABBITMQ_PID_FILE": str(root / "node.pid"),
    }
    out = open(root / "server.out", "wb")  # noqa: SIM115  # closed below
    proc = await asyncio.create_subprocess_exec(
        "rabbitmq-server", stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,
    )  # fmt: skip
    node = RabbitNode(name, port, root, proc, tls_port)
    try:
        async with asyncio.timeout(START_WAIT):
            while True:
                if proc.returncode is not None:
                    raise AssertionError(f"rabbitmq-server exited: {_tail(root)}")
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                await asyncio.sleep(0.3)
        await node.ctl("await_startup")
        yield node
    finally:
        if proc.returncode is None:
            with contextlib.suppress(AssertionError, TimeoutError):
                await node.ctl("stop", timeout=60)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the session this fixture started
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        out.close()
        shutil.rmtree(root, ignore_errors=True)


def _tail(root: Path) -> str:
    try:
        return (root / "server.out").read_text(errors="replace")[-2000:]
    except OSError:
        return "(no output)"
