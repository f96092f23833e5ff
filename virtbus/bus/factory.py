"""Pick the transport from the URL scheme: one call site for agents, CLI and scheduler."""

from __future__ import annotations

import dataclasses

from virtbus.bus.base import Bus
from virtbus.errors import InvalidArgument
from virtbus.settings import BusSettings, bus_url_from_env


def open_bus(
    url: str | None, src: str, settings: BusSettings | None = None, *, oneshot: bool = False
) -> Bus:
    """An unconnected bus (``await bus.connect()`` next) for ``memory://`` or ``amqp(s)://``.

    ``url`` falls back to ``VIRTBUS_BUS_URL``, then the local RabbitMQ; the settings'
    ``url`` is made to agree with the URL actually used. ``oneshot``: a short-lived
    caller's lean AMQP transport (calls, subscriptions; no reconnect, no serving).
    """
    resolved = bus_url_from_env(url)
    base = settings or BusSettings()
    if base.url != resolved:
        base = dataclasses.replace(base, url=resolved)
    scheme = resolved.split("://", 1)[0].lower() if "://" in resolved else ""
    if scheme == "memory":
        from virtbus.bus.memory import MemoryBus

        return MemoryBus(resolved, src, base)
    if scheme in ("amqp", "amqps") and oneshot:
        from virtbus.bus.oneshot import OneShotBus

        return OneShotBus(resolved, src, base)
    if scheme in ("amqp", "amqps"):
        from virtbus.bus.amqp import AmqpBus  # imports aio-pika only when it is needed

        return AmqpBus(resolved, src, base)
    raise InvalidArgument(f"unsupported bus URL {resolved!r}: use amqp://, amqps:// or memory://")
