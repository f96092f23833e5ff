"""LXC driver: domain XML -> lxc config, what is refused, paths and settings (no lxc run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers.lxc.config import (
    RenderContext,
    capability_lines,
    check_name,
    check_supported,
    init_argv,
    render,
)
from drivers.lxc.paths import check_init, resolve_in_root, resolve_sources
from drivers.lxc.settings import LxcSettings
from virtbus.domain import parse_domain_xml
from virtbus.errors import AuthDenied, ConfigUnsupported, InvalidArgument

SAMPLE = (Path(__file__).parent / "data" / "lxc-container.xml").read_text()


def lxc(extra: str = "", devices: str = "", os_extra: str = "", name: str = "c",
        root: str = "/r") -> str:  # fmt: skip
    return f"""<domain type='lxc'><name>{name}</name><memory unit='MiB'>64</memory>
      <os><type>exe</type><init>/init</init>{os_extra}</os>{extra}
      <devices><filesystem type='mount'><source dir='{root}'/><target dir='/'/></filesystem>
      {devices}</devices></domain>"""


def ctx(**kw: object) -> RenderContext:
    base: dict[str, object] = {"container_dir": "/var/lib/virtbus/lxc/web1",
                               "sources": {0: "/real/root", 1: "/srv/www"}}  # fmt: skip
    base.update(kw)
    return RenderContext(**base)  # type: ignore[arg-type]


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_sample_renders_v1() -> None:
    d = parse_domain_xml(SAMPLE)
    check_supported(d, "x86_64")
    out = lines(render(d, ctx(bridges={0: "br0"})))
    expected = [
        "lxc.uts.name = web1",
        "lxc.rootfs.path = dir:/real/root",
        "lxc.rootfs.options = ro",
        "lxc.console.logfile = /var/lib/virtbus/lxc/web1/console.log",
        "lxc.signal.halt = SIGTERM",
        "lxc.signal.reboot = SIGHUP",
        "lxc.environment = LIBVIRT_LXC_NAME=web1",
        f"lxc.environment = LIBVIRT_LXC_UUID={d.uuid}",
        "lxc.environment = FOO=bar baz",
        "lxc.init.cwd = /tmp",
        "lxc.idmap = u 0 100000 65536",
        "lxc.idmap = g 0 100000 65536",
        "lxc.cap.drop = audit_control mac_admin mknod sys_module",
        "lxc.cgroup.memory.limit_in_bytes = 134217728",
        "lxc.cgroup.memory.soft_limit_in_bytes = 67108864",
        "lxc.cgroup.cpu.shares = 512",
        "lxc.cgroup.cpu.cfs_period_us = 100000",
        "lxc.cgroup.cpu.cfs_quota_us = 50000",
        "lxc.mount.entry = /srv/www var/www none bind,create=dir 0 0",
        "lxc.mount.entry = tmpfs tmp tmpfs size=16384k,create=dir 0 0",
        "lxc.net.0.type = veth",
        "lxc.net.0.flags = up",
        "lxc.net.0.link = br0",
        "lxc.net.0.veth.pair = vnet-web1",
        "lxc.net.0.name = eth0",
        "lxc.net.0.hwaddr = 52:54:00:6a:11:01",
        "lxc.net.0.ipv4.address = 192.168.122.12/24",
        "lxc.net.0.ipv4.gateway = 192.168.122.1",
    ]
    missing = [line for line in expected if line not in out]
    assert not missing, "\n".join(out)
    assert init_argv(d) == ["/sbin/init", "--tick", "1 second"]


def test_cgroup_v2_keys() -> None:
    d = parse_domain_xml(
        lxc(
            extra="<memtune><hard_limit unit='MiB'>32</hard_limit>"
            "<swap_hard_limit unit='MiB'>48</swap_hard_limit></memtune>"
            "<cputune><shares>1024</shares><quota>-1</quota></cputune>"
        ).replace("<memory unit='MiB'>64</memory>", "<memory unit='MiB'>64</memory>"
                  "<vcpu cpuset='0-1,3'>2</vcpu>")
    )  # fmt: skip
    out = lines(render(d, ctx(memory_v2=True, cpu_v2=True, cpuset_v2=True, sources={0: "/r"})))
    assert "lxc.cgroup2.memory.max = 33554432" in out
    assert "lxc.cgroup2.memory.swap.max = 16777216" in out
    assert "lxc.cgroup2.cpu.weight = 39" in out  # libvirt's shares -> weight
    assert "lxc.cgroup2.cpu.max = max 100000" in out
    assert "lxc.cgroup2.cpuset.cpus = 0-1,3" in out
    assert not [line for line in out if line.startswith("lxc.cgroup.")]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("", ["lxc.cap.drop = audit_control mac_admin mknod sys_module sys_time"]),
        ("<capabilities policy='default'><mknod state='on'/><kill state='off'/></capabilities>",
         ["lxc.cap.drop = audit_control kill mac_admin sys_module sys_time"]),
        ("<capabilities policy='allow'><net_admin state='off'/></capabilities>",
         ["lxc.cap.drop = net_admin"]),
        ("<capabilities policy='allow'/>", []),
        ("<capabilities policy='deny'><chown state='on'/><kill state='on'/></capabilities>",
         ["lxc.cap.keep = chown kill"]),
        ("<capabilities policy='deny'/>", ["lxc.cap.keep = none"]),
    ],
)  # fmt: skip
def test_capability_policies(policy: str, expected: list[str]) -> None:
    extra = f"<features>{policy}</features>" if policy else ""
    assert capability_lines(parse_domain_xml(lxc(extra=extra))) == expected


def test_network_namespace_without_interfaces() -> None:
    shared = lines(render(parse_domain_xml(lxc()), ctx(sources={0: "/r"})))
    private = lines(render(parse_domain_xml(lxc(extra="<features><privnet/></features>")),
                           ctx(sources={0: "/r"})))  # fmt: skip
    assert "lxc.net.0.type = none" in shared  # libvirt: the host's network, without privnet
    assert "lxc.net.0.type = empty" in private


def test_mount_entries_escape_blanks() -> None:
    d = parse_domain_xml(
        lxc(devices="<filesystem type='mount'><source dir='/a b'/><target dir='/mnt/x y'/>"
            "<readonly/></filesystem><filesystem type='block'><source dev='/dev/loop9'/>"
            "<target dir='/data'/></filesystem>")
    )  # fmt: skip
    out = lines(render(d, ctx(sources={0: "/r", 1: "/a b", 2: "/dev/loop9"},
                              block_fstypes={2: "ext4"})))  # fmt: skip
    assert "lxc.mount.entry = /a\\040b mnt/x\\040y none bind,create=dir,ro 0 0" in out
    assert "lxc.mount.entry = /dev/loop9 data ext4 defaults,create=dir 0 0" in out


def test_image_and_block_roots() -> None:
    img = lxc().replace(
        "<filesystem type='mount'><source dir='/r'/>",
        "<filesystem type='file'><driver type='loop' format='raw'/><source file='/i.img'/>",
    )
    assert "lxc.rootfs.path = loop:/i.img" in render(
        parse_domain_xml(img), ctx(sources={0: "/i.img"})
    )
    blk = lxc().replace("<filesystem type='mount'><source dir='/r'/>",
                        "<filesystem type='block'><source dev='/dev/loop3'/>")  # fmt: skip
    assert "lxc.rootfs.path = /dev/loop3\n" in render(
        parse_domain_xml(blk), ctx(sources={0: "/dev/loop3"})
    )


@pytest.mark.parametrize(
    ("xml", "named"),
    [
        (lxc().replace("type='lxc'", "type='kvm'"), "<domain type='kvm'>"),
        (lxc().replace("<type>exe</type>", "<type>hvm</type>"), "<os><type>hvm</type>"),
        (lxc(os_extra="<kernel>/k</kernel>"), "<os><kernel>"),
        (lxc(extra="<features><acpi/></features>"), "<features><acpi>"),
        (lxc(extra="<features><capabilities><frobnicate state='on'/></capabilities></features>"),
         "<capabilities><frobnicate>"),
        (lxc(extra="<resource><partition>/machine</partition></resource>"), "<resource>"),
        (lxc(extra="<memtune><min_guarantee>1</min_guarantee></memtune>"),
         "<memtune><min_guarantee>"),
        (lxc(extra="<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>"), "<cputune><vcpupin>"),
        (lxc(extra="<cputune><shares>1</shares></cputune>"), "<cputune><shares>1</shares>"),
        (lxc(extra="<on_poweroff>restart</on_poweroff>"), "<on_poweroff>restart"),
        (lxc(extra="<on_reboot>destroy</on_reboot>"), "<on_reboot>destroy"),
        (lxc(extra="<clock offset='localtime'/>"), "<clock offset='localtime'>"),
        (lxc(extra="<seclabel type='dynamic' model='apparmor'/>"), "<seclabel type='dynamic'>"),
        (lxc(devices="<hostdev mode='capabilities' type='misc'/>"), "<hostdev>"),
        (lxc(devices="<interface type='network'><source network='default'/></interface>"),
         "<interface type='network'>"),
        (lxc(devices="<interface type='user'/>"), "<interface type='user'>"),
        (lxc(devices="<serial type='pty'/>"), "<serial>"),
        (lxc(devices="<filesystem type='volume'><source pool='p' volume='v'/>"
                     "<target dir='/v'/></filesystem>"), "storage volumes are not supported yet"),
        (lxc(devices="<filesystem type='mount' accessmode='mapped'><source dir='/x'/>"
                     "<target dir='/x'/></filesystem>"), "accessmode='mapped'"),
        (lxc(devices="<filesystem type='file'><source file='/x.img'/><target dir='/x'/>"
                     "</filesystem>"), "image files can only be the root"),
        (lxc(devices="<filesystem type='mount'><source dir='/x'/><target dir='/a/../b'/>"
                     "</filesystem>"), "without '..'"),
        (lxc().replace("<target dir='/'/>", "<target dir='/srv'/>"), "no root filesystem"),
        (lxc(devices="<interface type='bridge'><source bridge='br0'/>"
                     "<route address='10.0.0.0' prefix='8' gateway='10.0.0.1'/></interface>"),
         "only a default route"),
        (lxc(devices="<interface type='bridge'><source bridge='br0'/>"
                     "<guest dev='eth0 x'/></interface>"), "not a valid interface name"),
        (lxc(extra="<idmap><uid start='1' target='1000' count='10'/>"
                   "<gid start='0' target='1000' count='10'/></idmap>"), "mapping id 0"),
        (lxc(os_extra="<inituser>nobody</inituser>"), "numeric ids only"),
        (lxc().replace("<init>/init</init>", "<init>init</init>"), "an absolute path"),
        (lxc(devices="<console type='pty'/><console type='pty'/>"), "more than one <console>"),
    ],
)  # fmt: skip
def test_refused_with_its_name(xml: str, named: str) -> None:
    with pytest.raises(ConfigUnsupported) as err:
        check_supported(parse_domain_xml(xml), "x86_64")
    assert named in err.value.message


def test_every_problem_is_named_at_once() -> None:
    xml = lxc(extra="<features><acpi/></features>", devices="<hostdev/>")
    with pytest.raises(ConfigUnsupported, match=r"<features><acpi>, .*<hostdev>"):
        check_supported(parse_domain_xml(xml))


def test_network_interfaces_once_networks_exist() -> None:
    d = parse_domain_xml(lxc(devices="<interface type='network'><source network='n'/></interface>"))
    check_supported(d, networks=True)


@pytest.mark.parametrize("name", ["a b", "-x", ".x", "a/b", "x" * 65, "é"])
def test_invalid_container_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid container name"):
        check_name(name)


def test_config_values_cannot_break_lines() -> None:
    d = parse_domain_xml(lxc(os_extra="<initenv name='X'>a&#10;lxc.cap.drop = </initenv>"))
    with pytest.raises(ConfigUnsupported, match="cannot be written to an lxc config"):
        render(d, ctx(sources={0: "/r"}))


# --- host paths (real files in a temporary directory) ------------------------------------
def make_root(base: Path) -> Path:
    root = base / "allowed" / "c1"
    (root / "sbin").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin" / "busybox").write_text("#!/bin/sh\n")
    (root / "bin" / "busybox").chmod(0o755)
    os.symlink("/bin/busybox", root / "sbin" / "init")  # absolute: inside the container
    (root / "data").write_text("not executable")
    return root


def test_sources_inside_allowed_roots(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    d = parse_domain_xml(lxc(root=str(root)).replace("<init>/init</init>", ""))
    assert resolve_sources(d, [tmp_path / "allowed"]) == {0: str(root)}
    check_init(d, {0: str(root)})  # /sbin/init -> /bin/busybox inside the root


def test_source_outside_allowed_roots_is_denied(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    d = parse_domain_xml(lxc(root=str(root)))
    with pytest.raises(AuthDenied, match=rf"'{root}' of domain 'c' is outside"):
        resolve_sources(d, [tmp_path / "elsewhere"])


def test_symlink_out_of_allowed_roots_is_denied(tmp_path: Path) -> None:
    make_root(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tmp_path / "allowed" / "sneaky"
    os.symlink(outside, link)
    d = parse_domain_xml(lxc(root=str(link)))
    with pytest.raises(AuthDenied, match=f"really '{outside}'"):
        resolve_sources(d, [tmp_path / "allowed"])


def test_missing_and_wrong_sources(tmp_path: Path) -> None:
    make_root(tmp_path)
    missing = parse_domain_xml(lxc(root=str(tmp_path / "allowed" / "nope")))
    with pytest.raises(InvalidArgument, match="No such file or directory"):
        resolve_sources(missing, [tmp_path / "allowed"])
    a_file = parse_domain_xml(lxc(root=str(tmp_path / "allowed" / "c1" / "data")))
    with pytest.raises(InvalidArgument, match="is not a directory"):
        resolve_sources(a_file, [tmp_path / "allowed"])


def test_init_must_exist_and_execute(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    sources = {0: str(root)}
    nope = parse_domain_xml(lxc(root=str(root)).replace("/init<", "/sbin/nope<"))
    with pytest.raises(InvalidArgument, match="init '/sbin/nope' of domain 'c' does not exist"):
        check_init(nope, sources)
    data = parse_domain_xml(lxc(root=str(root)).replace("/init<", "/data<"))
    with pytest.raises(InvalidArgument, match="not an executable file"):
        check_init(data, sources)


def test_chroot_walk_never_leaves_the_root(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    os.symlink("../../../../etc/passwd", root / "escape")
    assert resolve_in_root(str(root), "/escape") == str(root / "etc" / "passwd")
    assert resolve_in_root(str(root), "/sbin/init") == str(root / "bin" / "busybox")


# --- settings -----------------------------------------------------------------------------
def test_settings_from_options(tmp_path: Path) -> None:
    s = LxcSettings.from_options(
        tmp_path, {"allowed_roots": "/a:/b", "halt_signal": "pwr", "reconcile_interval": "0.5"}
    )
    assert s.lxcpath == tmp_path / "lxc"
    assert s.allowed_roots == (Path("/a"), Path("/b"))
    assert s.halt_signal == "SIGPWR" and s.reconcile_interval == 0.5
    assert str(s.monitor_fifo) == f"/run/lxc/{str(tmp_path / 'lxc').lstrip('/')}/monitor-fifo"
    assert LxcSettings.from_options(tmp_path, {"halt_signal": "SIGRTMIN+3"}).halt_signal == (
        "SIGRTMIN+3"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bogus": "1"}, "unknown lxc driver option 'bogus'"),
        ({"start_timeout": "x"}, "must be a number"),
        ({"start_timeout": "-1"}, "must be > 0"),
        ({"halt_signal": "SIGNOPE"}, "unknown signal"),
        ({"allowed_roots": "relative/dir"}, "absolute paths only"),
    ],
)
def test_bad_settings(tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        LxcSettings.from_options(tmp_path, options)
