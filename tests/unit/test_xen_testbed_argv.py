"""The nested-Xen bed's QEMU command line carries the runner's arguments intact.

QEMU splits ``-initrd`` at commas (its module list: dom0 kernel with its command line,
dom0 initramfs); arguments joined by commas once turned a retry boot into
"Failed to open file 'crash_preserve'".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.xen.build import XenBed
from tests.xen.testbed import BootSettings, qemu_argv

BED = XenBed(Path("/b/xen"), Path("/b/vmlinuz"), Path("/b/base.cpio.gz"), Path("/b"))


def initrd(args: list[str]) -> str:
    argv = qemu_argv(BED, Path("/t/dom0.cpio.gz"), args, BootSettings())
    return argv[argv.index("-initrd") + 1]


def test_runner_arguments_stay_inside_the_kernel_module() -> None:
    value = initrd(["crash_preserve", "contract", "lifecycle"])
    kernel, initramfs = value.split(",")
    assert initramfs == "/t/dom0.cpio.gz"
    assert kernel.endswith(" virtbus.args=crash_preserve+contract+lifecycle")
    assert "virtbus.args" not in initrd([])


@pytest.mark.parametrize("bad", ["a,b", "a b", "a+b", ""])
def test_an_argument_that_cannot_travel_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        initrd(["contract", bad])
