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
from dataclasses import dataclass, field
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
    env: dict[str, str] = field(default_factory=dict)  # a cluster's epmd port and cookie

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
            env={**os.environ, **self.env} if self.env else None,
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
    *,
    tls: NodeTls | None = None,
    plugins: Sequence[str] = (),
    parent: Path | None = None,
    cluster_env: dict[str, str] | None = None,
) -> AsyncIterator[RabbitNode]:
    """A fresh node (about 10-30 s to start here); removed with its directory afterwards.
    ``tls``: also an amqps listener (``node.tls_port``) with certificate logins.

    ``parent``: make the node's directory there (a cluster's one temp dir);
    ``cluster_env``: the private epmd port and Erlang cookie of a cluster (see
    :func:`rabbit_cluster`), for the node and for its ``rabbitmqctl``.
    """
    if shutil.which("rabbitmq-server") is None:
        raise AssertionError("rabbitmq-server is not installed: run deploy/setup-dev")
    root = Path(tempfile.mkdtemp(prefix="vbrmq-", dir=parent))
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
        **(cluster_env or {}),
    }
    out = open(root / "server.out", "wb")  # noqa: SIM115  # closed below
    proc = await asyncio.create_subprocess_exec(
        "rabbitmq-server", stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
        start_new_session=True,
    )  # fmt: skip
    node = RabbitNode(name, port, root, proc, tls_port, dict(cluster_env or {}))
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


@dataclass
class RabbitCluster:
    """Nodes clustered with each other, and nothing else: their epmd listens on a port of
    its own and their Erlang cookie is their own, so they can never join (or be reached
    by the tools of) the shared broker on 5672."""

    nodes: list[RabbitNode]
    root: Path

    @property
    def url(self) -> str:
        """Every node, in order: the bus URL of a client of the cluster."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"amqp://guest:guest@{hosts}/"

    def url_from(self, first: RabbitNode) -> str:
        """Every node, ``first`` first (a client connects to the first that answers)."""
        order = [first, *(n for n in self.nodes if n is not first)]
        return ",".join(n.url for n in order)

    def by_name(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.name == name)

    async def ctl(self, *args: str, timeout: float = 120) -> str:
        """``rabbitmqctl`` on the first node that runs its app (a node may be stopped)."""
        errors = []
        for node in self.nodes:
            try:
                return await node.ctl(*args, timeout=timeout)
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError("; ".join(errors))


@contextlib.asynccontextmanager
async def rabbit_cluster(size: int = 3) -> AsyncIterator[RabbitCluster]:
    """``size`` fresh nodes under one temp dir, started in parallel and clustered
    (``join_cluster`` to the first); everything is stopped, epmd included, afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vbrmq-cluster-"))
    shutil.chown(root, "rabbitmq", "rabbitmq")  # the nodes' directories are under it
    epmd = free_port()
    cluster_env = {
        "ERL_EPMD_PORT": str(epmd),
        "RABBITMQ_ERLANG_COOKIE": uuid.uuid4().hex,
    }
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes = list(
                await asyncio.gather(
                    *(
                        stack.enter_async_context(rabbit_node(parent=root, cluster_env=cluster_env))
                        for _ in range(size)
                    )
                )
            )
            first = nodes[0]
            for node in nodes[1:]:
                await node.ctl("stop_app")
                await node.ctl("join_cluster", first.name)
                await node.ctl("start_app")
            await first.ctl("await_online_nodes", str(size))
            yield RabbitCluster(nodes, root)
    finally:
        proc = await asyncio.create_subprocess_exec(
            "epmd", "-port", str(epmd), "-kill",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await proc.wait()  # the cluster's own epmd (it refuses while a node is registered)
        shutil.rmtree(root, ignore_errors=True)
