"""The storage tools a backend runs (qemu-img, sfdisk, partx, mount, mkfs, scrub, iscsi-ls):
argv lists only, bounded by timeouts, killed when the caller is cancelled, and their
failures turned into OPERATION_FAILED with the tool's own words.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from typing import Any

from virtbus.errors import OperationFailed, OperationTimeout

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (processed, total) in bytes
_STDERR_TAIL = 2000
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


class ToolError(OperationFailed):
    """A tool exited non-zero; ``stderr`` holds its last words (for ENOSPC detection)."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr

    @property
    def no_space(self) -> bool:
        return "No space left on device" in self.stderr or "ENOSPC" in self.stderr


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """End a tool we started (its own process group), and reap it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        await proc.wait()


async def run(
    argv: Sequence[str],
    *,
    timeout: float | None,
    what: str,
    stdin: bytes | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> str:
    """Run a tool to completion; its stdout. ToolError (OPERATION_FAILED) on failure,
    OperationTimeout past ``timeout``; a cancelled caller kills the tool."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own group: a kill reaches its children too
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin)
    except TimeoutError:
        await _kill(proc)
        raise OperationTimeout(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    except BaseException:
        await _kill(proc)
        raise
    if proc.returncode not in ok_codes:
        text = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
        raise ToolError(
            f"{what}: {os.path.basename(argv[0])} failed: {text or proc.returncode}", text
        )
    return out.decode(errors="replace")


async def run_with_progress(
    argv: Sequence[str], *, what: str, total: int, progress: Progress | None
) -> None:
    """Run a long tool (``qemu-img convert -p``), turning its ``(n/100%)`` output into
    progress callbacks. No timeout: a job's cancel is the bound (it kills the tool)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read(), name=f"tool-stderr:{argv[0]}")
    try:
        while chunk := await proc.stdout.read(4096):
            matches = _PROGRESS.findall(chunk)
            if matches and progress is not None:
                progress(int(float(matches[-1]) * total / 100), total)
        err = await errors
        await proc.wait()
    except BaseException:
        errors.cancel()
        await _kill(proc)
        raise
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
        raise ToolError(f"{what}: {os.path.basename(argv[0])} failed: {text}", text)
    if progress is not None:
        progress(total, total)


async def qemu_img_info(spec: str, *, timeout: float, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info --output=json -U`` of a file, device or ``json:`` spec."""
    argv = ["qemu-img", "info", "--output=json", "-U"]
    if fmt is not None:
        argv += ["-f", fmt]
    out = await run([*argv, *image_arg(spec)], timeout=timeout, what=f"inspect {spec}")
    try:
        info = json.loads(out)
    except ValueError:
        raise OperationFailed(f"qemu-img info of {spec}: unreadable answer") from None
    if not isinstance(info, dict):
        raise OperationFailed(f"qemu-img info of {spec}: unexpected answer")
    return info


def image_arg(spec: str) -> list[str]:
    """qemu-img's file argument: a ``json:`` spec, or an absolute path (never read as an
    option: it starts with ``/``)."""
    if not spec.startswith(("json:", "/")):
        raise OperationFailed(f"refusing image {spec!r}: not an absolute path or json: spec")
    return [spec]
