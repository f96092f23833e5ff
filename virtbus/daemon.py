"""The life of a daemon process, written once for the agent and the scheduler.

Start the service; on failure to start, stop what started and exit 1. Print one
"ready" line (tests and supervisors wait for it). Then wait for SIGTERM/SIGINT or for
the service to report that a supervised task died, stop it (staged, by the service
itself) and exit 0 after a signal, 1 after a failure.

:func:`loop_factory`: a daemon runs on asyncio's own event loop, or on uvloop's (the
``uvloop`` setting, ``--uvloop``; ``pip install virtbus[uvloop]``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol

from virtbus.errors import VirtbusError


class Service(Protocol):
    failed: asyncio.Event  # set when a supervised task died: the daemon must stop

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def serve(service: Service, name: str, ready: Callable[[], str]) -> int:
    log = logging.getLogger(f"virtbus.{name}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    try:
        await service.start()
    except VirtbusError as exc:
        log.error("%s could not start: %s", name, exc)
        await service.stop()
        return 1
    print(ready(), flush=True)
    waits = {
        asyncio.create_task(stop.wait(), name=f"{name}:signal-watch"),
        asyncio.create_task(service.failed.wait(), name=f"{name}:failed-watch"),
    }
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    log.info("stopping %s", name)
    await service.stop()
    return 1 if service.failed.is_set() else 0


UVLOOP_MISSING = "--uvloop (uvloop = true) needs the uvloop package: pip install 'virtbus[uvloop]'"


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop factory, or None (asyncio's own); exits 2 with one line when
    uvloop is asked for and not installed (a setting the daemon cannot honour)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        sys.exit(UVLOOP_MISSING)
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
