"""The device cgroup rules of a definition and the ``cgroup_devices`` setting
(drivers/qemu/cgroup.py), on device nodes made in a temp dir: which nodes a domain gets
and with what access, and what the setting does on a host without the v1 hierarchy."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from drivers.qemu.cgroup import Device, DeviceCgroups, domain_rules, find_hierarchy, parse_mode
from virtbus.domain import parse_domain_xml
from virtbus.errors import ConfigUnsupported, InvalidArgument

V1 = "cgroup /sys/fs/cgroup/devices cgroup rw,nosuid,relatime,devices 0 0\n"
V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev 0 0\n"


def node(tmp_path: Path, name: str, kind: int, major: int, minor: int) -> str:
    path = tmp_path / name
    os.mknod(path, kind | 0o600, os.makedev(major, minor))
    return str(path)


def domain(devices: str) -> str:
    return (
        f"<domain type='qemu'><name>c</name><uuid>{uuid.uuid4()}</uuid><memory>131072</memory>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{devices}</devices>"
        "</domain>"
    )


def block(path: str, target: str, extra: str = "") -> str:
    return (f"<disk type='block' device='disk'><source dev='{path}'/>"
            f"<target dev='{target}' bus='virtio'/>{extra}</disk>")  # fmt: skip


def test_a_domain_gets_the_default_acl_and_its_device_nodes(tmp_path: Path) -> None:
    ro, rw = node(tmp_path, "ro", stat.S_IFBLK, 7, 200), node(tmp_path, "rw", stat.S_IFBLK, 7, 201)
    vol = node(tmp_path, "vol", stat.S_IFBLK, 253, 3)
    tty = node(tmp_path, "tty", stat.S_IFCHR, 4, 64)
    image = tmp_path / "image.raw"
    image.write_bytes(b"")
    xml = domain(
        block(ro, "vda", "<readonly/>") + block(rw, "vdb")
        + f"<disk type='file' device='disk'><source file='{image}'/><target dev='vdc'/></disk>"
        + "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdd'/>"
        + "</disk>"
        + f"<serial type='dev'><source path='{tty}'/></serial>"
    )  # fmt: skip
    rules = domain_rules(parse_domain_xml(xml), {3: vol})
    assert rules[Device("b", 7, 200)] == "rm"  # <readonly/>: no write
    assert rules[Device("b", 7, 201)] == "rwm"
    assert rules[Device("b", 253, 3)] == "rwm"  # the volume's device
    assert rules[Device("c", 4, 64)] == "rw"
    assert rules[Device("c", 136, None)] == "rw"  # every pty
    null = os.stat("/dev/null").st_rdev
    assert rules[Device("c", os.major(null), os.minor(null))] == "rw"
    assert not any(d.type == "b" and d.major not in (7, 253) for d in rules)  # no image file
    # the same node read-only in one disk and writable in another: writable
    both = domain(block(ro, "vda", "<readonly/>") + block(ro, "vdb"))
    assert domain_rules(parse_domain_xml(both), {})[Device("b", 7, 200)] == "rwm"


def test_tap_nics_get_the_tun_device_only_when_they_need_it() -> None:
    dev = Device("c", 10, 200)  # /dev/net/tun: the kernel's fixed misc number
    user = domain("<interface type='user'/>")
    tap = domain("<interface type='ethernet'><target dev='t0'/></interface>")
    assert dev not in domain_rules(parse_domain_xml(user), {})
    if os.path.exists("/dev/net/tun"):
        assert domain_rules(parse_domain_xml(tap), {})[dev] == "rw"
    else:  # a node the host lacks gets no rule (QEMU could not open it anyway)
        assert dev not in domain_rules(parse_domain_xml(tap), {})


def test_the_setting(tmp_path: Path) -> None:
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.write_text(V2 + V1)
    v2.write_text(V2)
    assert find_hierarchy(str(v1)) == Path("/sys/fs/cgroup/devices")
    assert find_hierarchy(str(v2)) is None
    assert [parse_mode(m) for m in ("on", "AUTO", "off", "yes", "false")] == [
        "on", "auto", "off", "on", "off"]  # fmt: skip
    with pytest.raises(InvalidArgument, match="cgroup_devices='maybe'"):
        parse_mode("maybe")
    with pytest.raises(InvalidArgument, match="not a device node"):
        DeviceCgroups("on", tmp_path, extra=("/etc/shadow",), mounts=str(v1))
    # on without the v1 hierarchy: the agent does not start, naming the limitation
    with pytest.raises(ConfigUnsupported, match=r"no cgroup v1 'devices' hierarchy.*cgroup v2"):
        DeviceCgroups("on", tmp_path, mounts=str(v2)).check()
    auto = DeviceCgroups("auto", tmp_path, mounts=str(v2))
    auto.check()
    assert not auto.enabled and auto.procs("u") is None
    assert not DeviceCgroups("off", tmp_path, mounts=str(v1)).enabled
    on = DeviceCgroups("on", tmp_path / "run", mounts=str(v1))
    group = on.group("u")
    assert group is not None and group.parent == Path("/sys/fs/cgroup/devices/virtbus")
    assert group.name.endswith("-u") and on.procs("u") == group / "cgroup.procs"
    other = DeviceCgroups("on", tmp_path / "run2", mounts=str(v1)).group("u")
    assert other != group  # two agents of one machine never share a group


def test_the_agent_takes_the_settings_from_driver_options(tmp_path: Path) -> None:
    from agent.drivers import make_driver
    from virtbus.settings import AgentSettings

    options = {"cgroup_devices": "auto", "cgroup_devices_allow": "/dev/sev,/dev/vhost-vsock"}
    driver = make_driver(
        AgentSettings(host="h", driver="qemu", state_dir=tmp_path, driver_options=options)
    )
    cgroups = driver._cgroups  # type: ignore[attr-defined]
    assert cgroups.mode == "auto" and cgroups.extra == ("/dev/sev", "/dev/vhost-vsock")
    with pytest.raises(InvalidArgument, match="cgroup_devices"):
        make_driver(AgentSettings(host="h", driver="qemu", state_dir=tmp_path,
                                  driver_options={"cgroup_devices": "sometimes"}))  # fmt: skip
