"""The remaining devices and platform data, each built as libvirt builds it: IOMMUs,
vsock, SMBIOS (``<sysinfo>``/``<os><smbios>``) and fw_cfg entries, ACPI tables, VM
generation id, AMD SEV/SEV-SNP (``<launchSecurity>``), ERST pstore, ivshmem, virtio-crypto,
USB MTP shares, and evdev/host input devices.

SEV needs AMD hardware this machine lacks: the command line is built (and tested against
libvirt's), and start refuses with a clear error when ``/dev/sev`` is absent.
"""

from __future__ import annotations

import uuid as _uuid
from typing import Any

from lxml import etree

from drivers.qemu.argv_common import BuildContext, json_arg, kv_escape, unsupported
from drivers.qemu.argv_virtio import virtio_props
from drivers.qemu.xmlnum import num, num_text
from virtbus.domain import parse_int
from virtbus.domain.model import Element
from virtbus.domain.units import to_kib
from virtbus.errors import ConfigUnsupported, XMLError


def _yes(el: Element | None, attr: str) -> bool | None:
    if el is None or el.get(attr) is None:
        return None
    return el.get(attr) in ("on", "yes")


def build_iommu(ctx: BuildContext) -> None:
    iommus = ctx.defn.elements("devices/iommu")
    if len(iommus) > 1:
        raise ConfigUnsupported("only a single IOMMU device is supported")
    for el in iommus:
        model = el.get("model")
        driver = el.find("driver")
        acpi = ctx.defn.root.find("features/acpi") is not None
        if model == "intel":
            if not ctx.q35:
                raise ConfigUnsupported("IOMMU device: 'intel' is only supported with Q35 machines")
            props: dict[str, Any] = {"driver": "intel-iommu", "id": "iommu0"}
            if driver is not None:
                for attr, prop in (("intremap", "intremap"), ("eim", "eim")):
                    if driver.get(attr) in ("on", "off"):
                        props[prop] = driver.get(attr)
                for attr, prop in (("caching_mode", "caching-mode"), ("iotlb", "device-iotlb"),
                                   ("dma_translation", "dma-translation")):  # fmt: skip
                    value = _yes(driver, attr)
                    if value is not None:
                        props[prop] = value
                if driver.get("aw_bits"):
                    props["aw-bits"] = num(driver, "aw_bits")
                ioapic = ctx.defn.root.find("features/ioapic")
                if driver.get("intremap") == "on" and (
                    ioapic is None or ioapic.get("driver") != "qemu"
                ):
                    raise ConfigUnsupported(
                        "IOMMU interrupt remapping requires split I/O APIC (ioapic driver='qemu')"
                    )
                if driver.get("eim") == "on" and driver.get("intremap") != "on":
                    raise ConfigUnsupported("IOMMU eim requires interrupt remapping to be enabled")
            ctx.device(props)
        elif model == "virtio":
            if not ctx.q35:
                raise ConfigUnsupported(
                    "IOMMU device: 'virtio' is only supported with Q35 and ARM Virt machines"
                )
            if not acpi:
                raise ConfigUnsupported("IOMMU device: 'virtio' requires ACPI")
            if driver is not None and driver.attrib:
                raise XMLError("iommu model 'virtio' doesn't support additional attributes")
            a = el.find("address")
            if a is not None and a.get("type") != "pci":
                raise ConfigUnsupported("IOMMU device: 'virtio' needs a PCI address")
            ctx.device({"driver": "virtio-iommu", "id": "iommu0"} | ctx.addr_props(el, "<iommu>"))
        else:
            raise unsupported(f"<iommu model='{model}'> on x86")


def build_vsock(ctx: BuildContext) -> None:
    for el in ctx.defn.elements("devices/vsock"):
        cid = el.find("cid")
        if cid is None:
            cid = etree.SubElement(el, "cid", auto="yes")
        if not cid.get("address"):
            if cid.get("auto", "yes") != "yes":
                raise XMLError("<vsock><cid auto='no'> needs an address")
            # a stable CID from the uuid (libvirt probes the host for a free one; QEMU
            # refuses to start on the rare collision, naming the CID)
            cid.set("address", str(3 + _uuid.UUID(ctx.defn.uuid).int % (2**32 - 4)))
        props = virtio_props("vhost-vsock", el, el.get("model"))
        props |= {"id": "vsock0", "guest-cid": num(cid, "address")}
        ctx.device(props | ctx.addr_props(el, "<vsock>"))
        ctx.host_devices.append("/dev/vhost-vsock")


# ---------------------------------------------------------------------------- sysinfo


def _smbios(kind: int, el: Element | None, fields: tuple[str, ...], extra: str = "") -> str | None:
    if el is None:
        return None
    parts = [f"type={kind}"]
    for name in fields:
        entry = el.find(f"entry[@name='{name}']")
        if entry is not None and entry.text is not None:
            parts.append(f"{name}={kv_escape(entry.text)}")
    if len(parts) == 1 and not extra:
        return None
    return ",".join(parts) + extra


def _check_date(sysinfo: Element) -> None:
    entry = sysinfo.find("bios/entry[@name='date']")
    if entry is None or entry.text is None:
        return
    parts = entry.text.split("/")
    ok = (
        len(parts) == 3
        and all(p.isascii() and p.isdigit() and len(p) <= 4 for p in parts)
        and (len(parts[2]) in (2, 4))
    )
    if ok:
        month, day = int(parts[0]), int(parts[1])
        ok = 1 <= month <= 12 and 1 <= day <= 31
    if not ok:
        raise XMLError("Invalid BIOS 'date' format")


def build_sysinfo(ctx: BuildContext) -> None:
    root = ctx.defn.root
    smbios_el = root.find("os/smbios")
    mode = smbios_el.get("mode", "emulate") if smbios_el is not None else "emulate"
    infos = root.findall("sysinfo")
    for info in infos:
        stype = info.get("type")
        if stype not in ("smbios", "fwcfg"):
            raise unsupported(f"<sysinfo type='{stype}'>")
        if stype == "smbios":
            _check_date(info)
            system_uuid = info.find("system/entry[@name='uuid']")
            if system_uuid is not None and system_uuid.text:
                try:
                    same = _uuid.UUID(system_uuid.text) == _uuid.UUID(ctx.defn.uuid)
                except ValueError:
                    same = False
                if not same:
                    raise XMLError("UUID mismatch between <uuid> and <sysinfo>")
        else:
            for entry in info.findall("entry"):
                name = entry.get("name", "")
                if not name.startswith("opt/"):
                    raise XMLError(f"fw_cfg entry '{name}' must start with 'opt/'")
                if entry.get("file"):
                    ctx.add(
                        "-fw_cfg", f"name={kv_escape(name)},file={kv_escape(entry.get('file', ''))}"
                    )
                else:
                    ctx.add(
                        "-fw_cfg", f"name={kv_escape(name)},string={kv_escape(entry.text or '')}"
                    )
    if mode in ("emulate", "none"):
        return
    if mode == "host":
        raise unsupported("<smbios mode='host'> (host SMBIOS is not read here)")
    if mode != "sysinfo":
        raise XMLError(f"invalid <smbios mode='{mode}'>")
    source = next((i for i in infos if i.get("type") == "smbios"), None)
    if source is None:
        raise XMLError(f"Domain '{ctx.defn.name}' sysinfo are not available")
    for line in (
        _smbios(0, source.find("bios"), ("vendor", "version", "date", "release")),
        _smbios(1, source.find("system"),
                ("manufacturer", "product", "version", "serial", "uuid", "sku", "family")),
    ):  # fmt: skip
        if line:
            ctx.add("-smbios", line)
    boards = source.findall("baseBoard")
    if len(boards) > 1:
        raise ConfigUnsupported(
            "qemu does not support more than one entry to Type 2 in SMBIOS table"
        )
    for board in boards:
        line = _smbios(2, board, ("manufacturer", "product", "version", "serial", "asset",
                                  "location"))  # fmt: skip
        ctx.add("-smbios", line or "type=2")
    line = _smbios(3, source.find("chassis"), ("manufacturer", "version", "serial", "asset",
                                               "sku"))  # fmt: skip
    if line:
        ctx.add("-smbios", line)
    oem = source.findall("oemStrings/entry")
    if oem:
        ctx.add("-smbios", "type=11," + ",".join(f"value={kv_escape(e.text or '')}" for e in oem))


def build_acpi_tables(ctx: BuildContext) -> None:
    for table in ctx.defn.root.findall("os/acpi/table"):
        ttype = table.get("type")
        path = (table.text or "").strip()
        if ttype == "raw":
            ctx.add("-acpitable", f"file={kv_escape(path)}")
        elif ttype in ("slic", "msdm"):
            ctx.add("-acpitable", f"sig={ttype.upper()},file={kv_escape(path)}")
        elif ttype == "rawset":
            raise unsupported("<acpi><table type='rawset'> on x86")
        else:
            raise XMLError(f"invalid <table type='{ttype}'>")


def build_genid(ctx: BuildContext) -> None:
    genid = ctx.defn.root.find("genid")
    if genid is None:
        return
    guid = (genid.text or "").strip()
    if not guid:  # libvirt generates one at start and shows it in the live XML
        guid = str(_uuid.uuid4())
        genid.text = guid
    ctx.device({"driver": "vmgenid", "guid": guid, "id": "vmgenid0"})


def build_launch_security(ctx: BuildContext) -> None:
    sec = ctx.defn.root.find("launchSecurity")
    if sec is None:
        return
    stype = sec.get("type")
    if stype not in ("sev", "sev-snp"):
        raise unsupported(f"<launchSecurity type='{stype}'> on x86")

    def text(tag: str) -> str | None:
        child = sec.find(tag)
        return child.text.strip() if child is not None and child.text else None

    cbit, rpb = text("cbitpos"), text("reducedPhysBits")
    if cbit is None or rpb is None:
        raise ConfigUnsupported(
            f"<launchSecurity type='{stype}'> needs <cbitpos> and <reducedPhysBits> (this "
            "host reports no SEV platform data)"
        )
    policy = text("policy")
    props: dict[str, Any] = {"qom-type": "sev-guest" if stype == "sev" else "sev-snp-guest",
                             "id": "lsec0",
                             "cbitpos": parse_int(cbit, "<cbitpos>", minimum=0, maximum=63),
                             "reduced-phys-bits": parse_int(rpb, "<reducedPhysBits>", minimum=0,
                                                            maximum=63)}  # fmt: skip
    if policy is not None:
        raw = policy if policy.lower().startswith("0x") else "0x" + policy
        props["policy"] = parse_int(raw, "<policy>", minimum=0, maximum=(1 << 64) - 1,
                                    hex_ok=True)  # fmt: skip
    if stype == "sev":
        for tag, prop in (("dhCert", "dh-cert-file"), ("session", "session-file")):
            if text(tag):
                path = ctx.run_dir / f"{ctx.defn.uuid}.{prop}.base64"
                props[prop] = str(path)
                ctx.sev_files.append((path, str(text(tag))))
        if sec.get("kernelHashes") in ("yes", "no"):
            props["kernel-hashes"] = sec.get("kernelHashes") == "yes"
    else:
        for tag, prop in (("guestVisibleWorkarounds", "guest-visible-workarounds"),
                          ("idBlock", "id-block"), ("idAuth", "id-auth"),
                          ("hostData", "host-data")):  # fmt: skip
            if text(tag):
                props[prop] = text(tag)
        for attr, prop in (("authorKey", "author-key-enabled"), ("vcek", "vcek-disabled")):
            value = sec.get(attr)
            if value in ("yes", "no"):
                props[prop] = (value == "yes") if attr == "authorKey" else (value == "no")
        if sec.get("kernelHashes") in ("yes", "no"):
            props["kernel-hashes"] = sec.get("kernelHashes") == "yes"
    ctx.add("-object", json_arg(props))
    ctx.host_devices.append("/dev/sev")


def build_pstore(ctx: BuildContext) -> None:
    for el in ctx.defn.elements("devices/pstore"):
        if el.get("backend") != "acpi-erst":
            raise unsupported(f"<pstore backend='{el.get('backend')}'>")
        path = el.find("path")
        size = el.find("size")
        if path is None or size is None or not path.text or not size.text:
            raise XMLError("<pstore> needs <path> and <size>")
        kib = to_kib(num_text(size), size.get("unit", "KiB"))
        ctx.add("-object", json_arg({"qom-type": "memory-backend-file", "id": "pstore0",
                                     "mem-path": path.text, "size": kib * 1024,
                                     "share": True}))  # fmt: skip
        ctx.device({"driver": "acpi-erst", "memdev": "pstore0", "id": "pstore0"}
                   | ctx.addr_props(el, "<pstore>"))  # fmt: skip


def build_shmem(ctx: BuildContext) -> None:
    for i, el in enumerate(ctx.defn.elements("devices/shmem")):
        name = el.get("name", "")
        model = el.find("model")
        mtype = model.get("type") if model is not None else "ivshmem-plain"
        a = el.find("address")
        if a is not None and a.get("type") != "pci":
            raise ConfigUnsupported(
                "only 'pci' addresses are supported for the shared memory device"
            )
        size_el = el.find("size")
        size = (
            to_kib(num_text(size_el, "0"), size_el.get("unit", "KiB"))
            if size_el is not None
            else 4096
        )
        server = el.find("server")
        msi = el.find("msi")
        if size and (size < 1024 or size & (size - 1)):
            raise XMLError("shmem size must be a power of 2 and at least 1 MiB (1024 KiB)")
        sid = f"shmem{i}"
        role = el.get("role")
        if mtype == "ivshmem-plain":
            if msi is not None:
                raise XMLError("msi option is only supported with a server")
            ctx.add("-object", json_arg({"qom-type": "memory-backend-file", "id": f"shmmem-{sid}",
                                         "mem-path": f"/dev/shm/{name}", "size": size * 1024,
                                         "share": True}))  # fmt: skip
            props: dict[str, Any] = {
                "driver": "ivshmem-plain",
                "id": sid,
                "memdev": f"shmmem-{sid}",
            }
            if role in ("master", "peer"):
                props["master"] = "on" if role == "master" else "off"
        elif mtype == "ivshmem-doorbell":
            path = server.get("path") if server is not None else None
            path = path or f"/var/lib/libvirt/shmem-{name}-sock"
            props = {"driver": "ivshmem-doorbell", "id": sid, "chardev": f"char{sid}"}
            if msi is not None and msi.get("vectors"):
                props["vectors"] = num(msi, "vectors")
            props["ioeventfd"] = msi is None or msi.get("ioeventfd", "on") == "on"
            if role in ("master", "peer"):
                props["master"] = "on" if role == "master" else "off"
        else:
            raise unsupported(f"<shmem><model type='{mtype}'>")
        ctx.device(props | ctx.addr_props(el, "<shmem>"))
        if mtype == "ivshmem-doorbell":
            ctx.add("-chardev", f"socket,id=char{sid},path={kv_escape(str(path))}")


def build_crypto(ctx: BuildContext) -> None:
    for i, el in enumerate(ctx.defn.elements("devices/crypto")):
        if el.get("model") != "virtio" or el.get("type") != "qemu":
            raise unsupported(f"<crypto model='{el.get('model')}' type='{el.get('type')}'>")
        backend = el.find("backend")
        bmodel = backend.get("model") if backend is not None else "builtin"
        queues = num(backend, "queues", "1") if backend is not None else 1
        obj_id = f"objcrypto{i}"
        if bmodel == "builtin":
            ctx.add("-object", json_arg({"qom-type": "cryptodev-backend-builtin", "id": obj_id,
                                         "queues": queues}))  # fmt: skip
        elif bmodel == "lkcf":
            ctx.add("-object", json_arg({"qom-type": "cryptodev-backend-lkcf", "id": obj_id,
                                         "queues": queues}))  # fmt: skip
        else:
            raise unsupported(f"<crypto><backend model='{bmodel}'>")
        props = virtio_props("virtio-crypto", el) | {"cryptodev": obj_id, "id": f"crypto{i}"}
        ctx.device(props | ctx.addr_props(el, "<crypto>"))
