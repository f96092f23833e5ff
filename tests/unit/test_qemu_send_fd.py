"""drivers.qemu.monitor.send_fd: a file descriptor passed over a UNIX stream transport
(what `getfd` needs for a hot-plugged NIC's tap) arrives on asyncio's loop and on uvloop's,
whose transport socket cannot send itself (qemu.qmp's send_fd_scm fails there)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable

import pytest

from drivers.qemu.monitor import send_fd


def loops() -> list[Callable[[], asyncio.AbstractEventLoop]]:
    factories: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, uvloop.new_event_loop]


@pytest.mark.parametrize("factory", loops())
def test_the_fd_arrives_and_the_stream_still_works(
    factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    ours, qemu = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()

    async def main() -> None:
        _reader, writer = await asyncio.open_unix_connection(sock=ours)
        send_fd(writer.transport, write_end)
        writer.write(b'{"execute": "getfd"}\n')  # the command that follows, on the transport
        await writer.drain()
        msg, fds, _flags, _addr = socket.recv_fds(qemu, 1, 1)
        assert msg == b" " and len(fds) == 1
        os.write(fds[0], b"through the passed fd")
        os.close(fds[0])
        assert os.read(read_end, 100) == b"through the passed fd"
        assert qemu.recv(100) == b'{"execute": "getfd"}\n'
        writer.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    for fd in (read_end, write_end):
        os.close(fd)
    qemu.close()
