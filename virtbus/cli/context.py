"""What every CLI command gets: the bus, the output mode, the call deadline."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from virtbus.bus.base import Bus
from virtbus.bus.topology import HEARTBEAT_KEY_SUFFIX, HOSTS_EXCHANGE, SCHEDULER_ROUTE
from virtbus.errors import (
    BusUnavailable,
    InvalidArgument,
    NoDomainError,
    NoHostError,
    OperationTimeout,
)
from virtbus.protocol import ops
from virtbus.protocol.envelope import Kind

HOST_ENV = "VIRTBUS_HOST"
DISCOVERY_WAIT = 2.5  # s: a little more than one heartbeat interval at the default 2 s
SCHEDULER_PROBE = 2.0  # s: how long to wait for a scheduler before falling back


@dataclass(slots=True)
class Context:
    bus: Bus
    json: bool
    timeout: float

    async def call(self, host: str, op: str, body: dict[str, Any]) -> Any:
        try:
            return await self.bus.call(ops.agent_route(host), op, body, timeout=self.timeout)
        except NoHostError as exc:
            if "route" not in exc.message:
                raise  # the agent's own answer
            raise NoHostError(
                f"no agent answers for host '{host}' — is virtbus-agent running there? "
                "(`virtbus hosts` lists the hosts heard on the bus)"
            ) from None
        except OperationTimeout:
            raise OperationTimeout(
                f"host '{host}' did not answer {op} within {self.timeout:g} s — is "
                f"virtbus-agent running on '{host}'? (`virtbus hosts` lists live hosts)"
            ) from None

    async def scheduler(self, op: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """A call to the active scheduler (``virtbus-scheduler``)."""
        deadline = timeout or self.timeout
        try:
            return await self.bus.call(SCHEDULER_ROUTE, op, body, timeout=deadline)
        except NoHostError as exc:
            if "route" not in exc.message:
                raise  # the scheduler's own answer (e.g. no host can run the domain)
            raise NoHostError(
                "no scheduler answers — is virtbus-scheduler running on this bus?"
            ) from None
        except OperationTimeout:
            raise OperationTimeout(
                f"the scheduler did not answer {op} within {deadline:g} s — is "
                "virtbus-scheduler running on this bus?"
            ) from None

    async def try_scheduler(self, op: str, body: dict[str, Any]) -> Any | None:
        """The scheduler's answer, or None when no scheduler answers (callers fall back)."""
        try:
            return await self.scheduler(op, body, timeout=min(self.timeout, SCHEDULER_PROBE))
        except (NoHostError, OperationTimeout, BusUnavailable):
            return None

    async def define_on(self, explicit: str | None, xml: str) -> tuple[str, dict[str, Any]]:
        """Define on ``--host``/``$VIRTBUS_HOST``, else on the host the scheduler places it."""
        host = explicit or os.environ.get(HOST_ENV)
        if host:
            return host, await self.call(host, ops.DOMAIN_DEFINE, {"xml": xml})
        if await self.try_scheduler(ops.SCHEDULER_PING, {}) is None:
            raise NoHostError("no scheduler answers: pass --host H (or start virtbus-scheduler)")
        result = await self.scheduler(ops.SCHEDULER_DEFINE, {"xml": xml})
        return str(result["host"]), result

    async def discover_hosts(self, wait: float = DISCOVERY_WAIT) -> dict[str, dict[str, Any]]:
        """Hosts heard from within ``wait`` seconds (their latest heartbeat, by host name)."""
        seen: dict[str, dict[str, Any]] = {}
        sub = await self.bus.subscribe(HOSTS_EXCHANGE, [f"*.{HEARTBEAT_KEY_SUFFIX}"])
        try:
            async with asyncio.timeout(wait):
                async for env in sub:
                    if env.kind == Kind.HEARTBEAT and isinstance(env.body.get("host"), str):
                        seen[env.body["host"]] = env.body
        except TimeoutError:
            pass
        finally:
            await sub.close()
        return seen

    async def host_for(self, explicit: str | None, domain: str | None = None) -> str:
        """``--host``, else ``$VIRTBUS_HOST``, else the one host that has ``domain``."""
        host = explicit or os.environ.get(HOST_ENV)
        if host:
            return host
        if domain is None:
            raise InvalidArgument("--host is required (or set VIRTBUS_HOST)")
        hosts = await self.discover_hosts()
        if not hosts:
            raise NoHostError("no agent heard on the bus — is virtbus-agent running?")
        owners = []
        for name in sorted(hosts):
            found = await self.call(name, ops.DOMAIN_LIST, {"all": True})
            if any(domain in (d["name"], d["uuid"]) for d in found["domains"]):
                owners.append(name)
        if not owners:
            raise NoDomainError(f"domain '{domain}' is not defined on any host")
        if len(owners) > 1:
            raise InvalidArgument(f"domain '{domain}' exists on {', '.join(owners)}: pass --host")
        return owners[0]
