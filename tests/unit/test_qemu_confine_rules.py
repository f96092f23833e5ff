"""Path confinement rules (drivers/qemu/confine.py) on real files: every kind of host path
a definition names, symlinks and ``..`` that try to escape, the per-kind roots."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from drivers.qemu import confine
from drivers.qemu.confine import ConfineSettings, Kind, Roots
from virtbus.domain import parse_domain_xml
from virtbus.errors import AuthDenied


def domain(devices: str = "", os_extra: str = "") -> str:
    return (
        f"<domain type='qemu'><name>c</name><uuid>{uuid.uuid4()}</uuid><memory>131072</memory>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type>{os_extra}</os>"
        f"<devices>{devices}</devices></domain>"
    )


@pytest.fixture
def roots(tmp_path: Path) -> Roots:
    for d in ("pool", "allowed", "run", "nvram"):
        (tmp_path / d).mkdir()
    settings = ConfineSettings(allowed_dirs=(tmp_path / "allowed",))
    return Roots(settings, tmp_path / "run" / "u", pools=(tmp_path / "pool",),
                 nvram_dir=tmp_path / "nvram", firmware=frozenset({"/opt/fw/CODE.fd"}))  # fmt: skip


def check(xml: str, roots: Roots) -> None:
    confine.check(parse_domain_xml(xml), roots)


def disk(path: Path | str, dtype: str = "file", attr: str = "file") -> str:
    return (f"<disk type='{dtype}' device='disk'><source {attr}='{path}'/>"
            "<target dev='vda' bus='virtio'/></disk>")  # fmt: skip


def test_disks_inside_pools_allowed_dirs_and_own_dir_pass(tmp_path: Path, roots: Roots) -> None:
    for where in ("pool/a.img", "allowed/sub/b.img", "run/u/c.img"):
        check(domain(disk(tmp_path / where)), roots)


@pytest.mark.parametrize("path", ["/etc/shadow", "/root/.ssh/id_rsa", "/dev/sda"])
def test_a_disk_outside_is_auth_denied_naming_it(path: str, roots: Roots) -> None:
    with pytest.raises(AuthDenied, match=f"<disk> vda source '{path}'"):
        check(domain(disk(path)), roots)
    with pytest.raises(AuthDenied, match=path):
        check(domain(disk(path, "block", "dev")), roots)


def test_symlinks_and_dotdot_do_not_escape(tmp_path: Path, roots: Roots) -> None:
    link = tmp_path / "pool" / "link.img"
    link.symlink_to("/etc/shadow")
    with pytest.raises(AuthDenied, match="resolves to '/etc/shadow'"):
        check(domain(disk(link)), roots)
    (tmp_path / "pool" / "dir").symlink_to("/etc")
    with pytest.raises(AuthDenied, match="resolves to '/etc/passwd'"):
        check(domain(disk(tmp_path / "pool" / "dir" / "passwd")), roots)
    with pytest.raises(AuthDenied, match="resolves to '/etc/shadow'"):
        check(domain(disk(f"{tmp_path}/pool/../../../../../../../etc/shadow")), roots)
    with pytest.raises(AuthDenied, match="not an absolute path"):
        check(domain(disk("pool/a.img")), roots)
    # a sibling whose name starts like an allowed dir is not inside it
    with pytest.raises(AuthDenied):
        check(domain(disk(tmp_path / "pool-other" / "a.img")), roots)


def test_every_kind_of_host_path_is_found() -> None:
    """One of each element that names a host path (a new one must be added here)."""
    xml = domain(
        devices=(
            "<disk type='file'><source file='/x/disk'/><backingStore type='file'>"
            "<format type='raw'/><source file='/x/backing'/></backingStore>"
            "<target dev='vda'/></disk>"
            "<disk type='network'><source protocol='nbd'><host transport='unix' "
            "socket='/x/nbd.sock'/></source><target dev='vdb'/></disk>"
            "<serial type='file'><source path='/x/serial'/><log file='/x/serial.log'/></serial>"
            "<console type='pty'/>"
            "<channel type='unix'><source mode='bind' path='/x/chan.sock'/></channel>"
            "<parallel type='dev'><source path='/dev/parport0'/></parallel>"
            "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
            "<filesystem type='mount'><driver type='virtiofs'/><binary path='/x/virtiofsd'/>"
            "<source dir='/x/share'/><target dir='t'/></filesystem>"
            "<interface type='ethernet'><script path='/x/ifup'/></interface>"
            "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>"
            "</backend></tpm>"
            "<graphics type='vnc' socket='/x/vnc.sock'/>"
            "<shmem name='../etc'><model type='ivshmem-plain'/></shmem>"
        ),
        os_extra=(
            "<kernel>/x/kernel</kernel><initrd>/x/initrd</initrd><dtb>/x/dtb</dtb>"
            "<loader>/x/loader</loader><nvram template='/x/template'>/x/nvram</nvram>"
        ),
    )
    found = {(hp.path, hp.kind) for hp in confine.host_paths(parse_domain_xml(xml).root)}
    assert found == {
        ("/x/kernel", Kind.FILE), ("/x/initrd", Kind.FILE), ("/x/dtb", Kind.FILE),
        ("/x/loader", Kind.FIRMWARE), ("/x/nvram", Kind.NVRAM), ("/x/template", Kind.FIRMWARE),
        ("/x/disk", Kind.FILE), ("/x/backing", Kind.FILE), ("/x/nbd.sock", Kind.SOCKET),
        ("/x/serial", Kind.FILE), ("/x/serial.log", Kind.FILE), ("/x/chan.sock", Kind.SOCKET),
        ("/dev/parport0", Kind.DEVICE), ("/dev/urandom", Kind.DEVICE),
        ("/x/virtiofsd", Kind.PROGRAM), ("/x/share", Kind.FILE), ("/x/ifup", Kind.PROGRAM),
        ("/dev/tpm0", Kind.DEVICE), ("/x/vnc.sock", Kind.SOCKET),
        ("/dev/shm/../etc", Kind.SHM),
    }  # fmt: skip


def test_sockets_stay_in_the_run_dir_or_allowed_dirs(tmp_path: Path, roots: Roots) -> None:
    def chan(path: Path) -> str:
        return f"<channel type='unix'><source mode='bind' path='{path}'/></channel>"

    check(domain(chan(tmp_path / "run" / "u" / "c.sock")), roots)
    check(domain(chan(tmp_path / "allowed" / "c.sock")), roots)
    for bad in (tmp_path / "pool" / "c.sock", tmp_path / "run" / "other.qmp", Path("/tmp/x")):
        with pytest.raises(AuthDenied, match="as a socket"):
            check(domain(chan(bad)), roots)


def test_devices_programs_firmware_and_nvram(tmp_path: Path, roots: Roots) -> None:
    check(domain("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"),
          roots)  # fmt: skip
    with pytest.raises(AuthDenied, match="/dev/mem"):
        check(domain("<rng model='virtio'><backend model='random'>/dev/mem</backend></rng>"),
              roots)  # fmt: skip
    with pytest.raises(AuthDenied, match="as a program"):  # run as root by the agent
        check(domain(f"<interface type='ethernet'><script path='{tmp_path}/allowed/up'/>"
                     "</interface>"), roots)  # fmt: skip
    check(domain(os_extra="<loader type='pflash'>/opt/fw/CODE.fd</loader>"), roots)
    check(domain(os_extra="<loader>/usr/share/OVMF/OVMF_CODE.fd</loader>"), roots)
    with pytest.raises(AuthDenied, match="<os><loader>"):
        check(domain(os_extra="<loader>/etc/shadow</loader>"), roots)
    check(domain(os_extra=f"<nvram>{tmp_path}/nvram/c_VARS.fd</nvram>"), roots)
    with pytest.raises(AuthDenied, match="<os><kernel>"):  # nvram_dir is for NVRAM only
        check(domain(os_extra=f"<kernel>{tmp_path}/nvram/k</kernel>"), roots)
    with pytest.raises(AuthDenied, match=re.escape("/dev/shm/../../etc/shadow")):
        check(domain("<shmem name='../../etc/shadow'/>"), roots)


def test_the_opt_out_accepts_anything(roots: Roots) -> None:
    off = Roots(ConfineSettings(enforce=False), roots.own_dir)
    check(domain(disk("/etc/shadow")), off)


def test_a_qcow2_backing_file_named_in_the_image_is_checked(tmp_path: Path, roots: Roots) -> None:
    image = tmp_path / "pool" / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow",
                    "-F", "raw", str(image), "1M"], check=True)  # fmt: skip
    xml = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>")  # fmt: skip
    defn = parse_domain_xml(domain(xml))
    confine.check(defn, roots)  # at define the image is not read
    with pytest.raises(AuthDenied, match=r"backing file of .*'/etc/shadow'"):
        confine.check(defn, roots, images=True)
    relative = tmp_path / "pool" / "rel.qcow2"
    base = tmp_path / "pool" / "base.raw"
    base.write_bytes(b"\0" * 512)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(relative)], check=True, cwd=tmp_path / "pool")  # fmt: skip
    ok = xml.replace(str(image), str(relative))
    confine.check(parse_domain_xml(domain(ok)), roots, images=True)  # relative to the image
    os.unlink(base)
    base.symlink_to("/etc/shadow")
    with pytest.raises(AuthDenied, match="resolves to '/etc/shadow'"):
        confine.check(parse_domain_xml(domain(ok)), roots, images=True)


def test_listen_addresses_are_loopback_unless_allowed(roots: Roots) -> None:
    from dataclasses import replace

    def listen(dev: str, settings: ConfineSettings = roots.settings) -> None:
        check(domain(dev), replace(roots, settings=settings))

    for ok in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        listen(f"<graphics type='vnc' listen='{ok}'/>")
    listen("<serial type='tcp'><source mode='connect' host='192.0.2.1' service='1'/></serial>")
    bad = {
        "<graphics type='vnc' listen='0.0.0.0'/>": "0.0.0.0",
        "<graphics type='spice'><listen type='address' address='::'/></graphics>": "::",
        "<graphics type='vnc' listen='myhost'/>": "myhost",  # names are not resolved
        "<serial type='tcp'><source mode='bind' service='1'/></serial>": "0.0.0.0",
        "<interface type='server'><source address='192.0.2.1' port='1'/></interface>": "192.0",
    }
    for dev, address in bad.items():
        with pytest.raises(AuthDenied, match=re.escape(f"may not listen on '{address}")):
            listen(dev)
    some = ConfineSettings(listen_allowed=("192.0.2.1", "0.0.0.0"))
    listen("<graphics type='vnc' listen='0.0.0.0'/>", some)
    with pytest.raises(AuthDenied):
        listen("<graphics type='vnc' listen='192.0.2.2'/>", some)
    listen("<graphics type='vnc' listen='192.0.2.2'/>", ConfineSettings(listen_allowed=("*",)))


def test_listen_allowed_is_a_driver_option() -> None:
    from drivers.qemu.settings import QemuSettings
    from virtbus.config import options_into

    s = options_into(QemuSettings, {"listen_allowed": "192.0.2.1, fd00::1"}, "qemu driver")
    assert s.confinement().listen_allowed == ("192.0.2.1", "fd00::1")
