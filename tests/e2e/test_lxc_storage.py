"""LXC file systems other than a directory: a raw image file as the root (lxc loop-mounts
it) and a block device mounted inside (its file system found with blkid). The images
and the loop device are made by the test and removed afterwards."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.lxc_support import agent_options, cname, container_xml, host_events, lxc_agent
from tests.guests.lxc import READY, LxcRootfs
from tests.procs import unique_host

pytestmark = [pytest.mark.lxc, pytest.mark.rabbitmq]


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60).stdout


def ext4_image(path: Path, size_mib: int, content: Path | None = None) -> Path:
    run("truncate", "-s", f"{size_mib}M", str(path))
    run("mkfs.ext4", "-q", "-F", *(["-d", str(content)] if content else []), str(path))
    return path


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    device = run("losetup", "-f", "--show", str(ext4_image(tmp_path / "data.img", 16))).strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30, check=False)


async def test_image_root_and_block_device_mount(
    loop_device: str, lxc_root: Path, lxc_rootfs: LxcRootfs, rabbitmq: None
) -> None:
    host = unique_host("lxcs")
    base = Path(tempfile.mkdtemp(prefix="s", dir=lxc_root))
    image = ext4_image(base / "root.img", 32, content=lxc_rootfs.path)
    c = cname("img")
    options = agent_options(lxc_rootfs, base)
    options[0] += f":{loop_device}"  # the device is a path containers may use
    block = (f"<filesystem type='block'><source dev='{loop_device}'/><target dir='/data'/>"
             "</filesystem>")  # fmt: skip
    ro_root = (f"<filesystem type='mount'><source dir='{lxc_rootfs.path}'/>"
               "<target dir='/'/><readonly/>")  # fmt: skip
    # the image is this test's own copy: writable (lxc makes /data in it)
    img_root = (f"<filesystem type='file'><driver type='loop' format='raw'/>"
                f"<source file='{image}'/><target dir='/'/>")  # fmt: skip
    xml = container_xml(c, lxc_rootfs, devices=block).replace(ro_root, img_root)
    assert f"source file='{image}'" in xml
    async with host_events(host) as events, lxc_agent(host, base, lxc_rootfs, events,
                                                      options) as h:  # fmt: skip
        (base / "c.xml").write_text(xml)
        await h.ok("define", str(base / "c.xml"))
        await h.ok("start", c)
        await h.wait_console(c, READY)
        init = (await h.info(c))["id"]
        mounts = Path(f"/proc/{init}/mountinfo").read_text().splitlines()
        root = next(line for line in mounts if line.split()[4] == "/")
        data = next(line for line in mounts if line.split()[4] == "/data")
        assert " - ext4 /dev/loop" in root, root  # lxc loop-mounted the image
        assert f" - ext4 {loop_device} " in data, data  # ext4, as blkid said
        config = (h.lxcpath / c / "config").read_text()
        assert f"lxc.rootfs.path = loop:{image}" in config
        await h.ok("destroy", c)
        await events.wait(c, "stopped", "destroyed")
        assert run("losetup", "-j", str(image)).strip() == ""  # lxc's loop device is gone
