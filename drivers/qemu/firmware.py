"""``<os firmware='efi'>``: firmware autoselection from QEMU's firmware descriptors
(``/usr/share/qemu/firmware/*.json``, overridden by ``/etc/qemu/firmware``), as
libvirt's ``qemu_firmware.c`` does it.

The first descriptor (in file-name order) whose interface, machine, architecture,
features and flash mode fit the definition wins; its loader, NVRAM template, secure-boot
and SMM requirements are written into the definition, so ``dumpxml`` shows the firmware
the guest boots and a migration destination uses the same files. Without a match the
definition is refused, as libvirt refuses it.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtbus.domain.model import Element
from virtbus.errors import ConfigUnsupported, XMLError

log = logging.getLogger(__name__)
_ARCH = {"i386": "i686", "x86_64": "x86_64"}


@dataclass(frozen=True, slots=True)
class Descriptor:
    path: str
    interfaces: tuple[str, ...]  # "uefi", "bios", ...
    device: str  # flash | memory | kernel
    mode: str  # flash: split | combined | stateless
    executable: str
    executable_format: str
    nvram_template: str | None
    nvram_template_format: str | None
    targets: tuple[tuple[str, tuple[str, ...]], ...]  # (arch, machine globs)
    features: frozenset[str]

    def matches_machine(self, machine: str, arch: str) -> bool:
        # libvirt matches the canonical machine name: the aliases stand for their newest
        # versioned machine, which the descriptors' globs ("pc-q35-*") name
        name = _MACHINE_ALIASES.get(machine, machine)
        return any(
            _ARCH.get(a, a) == arch and any(fnmatch.fnmatchcase(name, g) for g in globs)
            for a, globs in self.targets
        )


_MACHINE_ALIASES = {"q35": "pc-q35-latest", "pc": "pc-i440fx-latest"}


def parse_descriptor(path: Path) -> Descriptor | None:
    """One descriptor file, or None (with a warning) when it cannot be used."""
    try:
        doc = json.loads(path.read_text())
        mapping = doc["mapping"]
        device = mapping["device"]
        if device == "flash":
            mode = mapping.get("mode", "split")
            exe = mapping["executable"]
            tmpl = mapping.get("nvram-template") if mode == "split" else None
            executable, exe_fmt = exe["filename"], exe.get("format", "raw")
            template = tmpl["filename"] if tmpl else None
            template_fmt = tmpl.get("format", "raw") if tmpl else None
        elif device in ("memory", "kernel"):
            mode, executable, exe_fmt = "", mapping["filename"], "raw"
            template = template_fmt = None
        else:
            return None
        targets = tuple(
            (t["architecture"], tuple(t.get("machines", []))) for t in doc.get("targets", [])
        )
        return Descriptor(
            str(path), tuple(doc.get("interface-types", [])), device, mode, executable,
            exe_fmt, template, template_fmt, targets, frozenset(doc.get("features", [])),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring firmware descriptor %s: %s", path, exc)
        return None


def load_descriptors(dirs: tuple[Path, ...]) -> tuple[Descriptor, ...]:
    """Descriptors by file name: a name in an earlier dir hides it in later ones; an
    empty file masks the name (QEMU's interop rules)."""
    chosen: dict[str, Path] = {}
    for d in reversed(dirs):  # lowest priority first, higher ones overwrite
        try:
            entries = sorted(p for p in d.iterdir() if p.suffix == ".json")
        except OSError:
            continue
        for p in entries:
            chosen[p.name] = p
    out = []
    for name in sorted(chosen):
        p = chosen[name]
        try:
            if p.stat().st_size == 0:
                continue
        except OSError:
            continue
        desc = parse_descriptor(p)
        if desc is not None:
            out.append(desc)
    return tuple(out)


# ---------------------------------------------------------------------------- selection


def _yes(value: str | None) -> bool | None:
    return None if value is None else value == "yes"


def validate_os(root: Element) -> None:
    """libvirt's ``virDomainDefOSValidate`` rules about firmware, loader and NVRAM."""
    os_ = root.find("os")
    if os_ is None:
        return
    firmware = os_.get("firmware")
    loader = os_.find("loader")
    nvram = os_.find("nvram")
    feats = {f.get("name"): f.get("enabled") for f in os_.findall("firmware/feature")}
    if firmware:
        if feats.get("enrolled-keys") == "yes" and feats.get("secure-boot") == "no":
            raise XMLError(
                "firmware feature 'enrolled-keys' cannot be enabled when firmware feature "
                "'secure-boot' is disabled"
            )
        if nvram is not None and firmware != "efi":
            raise XMLError(f"firmware type '{firmware}' does not support nvram")
    else:
        if feats:
            raise XMLError(
                "cannot use feature-based firmware autoselection when firmware autoselection "
                "is disabled"
            )
        if loader is None:
            return
        if not (loader.text or "").strip():
            raise XMLError("no loader path specified and firmware auto selection disabled")
    if loader is None:
        return
    stateless = _yes(loader.get("stateless"))
    if stateless is True:
        if nvram is not None and nvram.get("template"):
            raise XMLError("NVRAM template is not permitted when loader is stateless")
        if nvram is not None:
            raise XMLError("NVRAM is not permitted when loader is stateless")
    elif stateless is False:
        if not firmware and loader.get("type") != "pflash":
            raise XMLError("Only pflash loader type permits NVRAM")
        if firmware and firmware != "efi":
            raise XMLError("Only EFI firmware permits NVRAM")
    for el, what in ((loader, "loader"), (nvram, "nvram")):
        fmt = el.get("format") if el is not None else None
        if fmt is not None and fmt not in ("raw", "qcow2"):
            raise XMLError(f"Unsupported {what} format '{fmt}'")


def _matches(root: Element, d: Descriptor, machine: str, arch: str) -> bool:
    os_ = root.find("os")
    assert os_ is not None
    loader = os_.find("loader")
    firmware = os_.get("firmware")
    want = {"efi": "uefi", "bios": "bios"}.get(firmware or "")
    if want is None and loader is not None:
        want = "uefi" if loader.get("type") == "pflash" else "bios"
    if want not in d.interfaces:
        return False
    path = (loader.text or "").strip() if loader is not None else ""
    nvram = os_.find("nvram")
    template = nvram.get("template") if nvram is not None else None
    if d.device == "flash":
        if path and path != d.executable:
            return False
        if template and (d.mode != "split" or template != d.nvram_template):
            return False
    elif d.device == "memory" and path and path != d.executable:
        return False
    if not d.matches_machine(machine, arch):
        return False
    pm = root.find("pm")
    for tag, feat in (("suspend-to-mem", "acpi-s3"), ("suspend-to-disk", "acpi-s4")):
        el = pm.find(tag) if pm is not None else None
        if el is not None and el.get("enabled") == "yes" and feat not in d.features:
            return False
    feats = {f.get("name"): f.get("enabled") for f in os_.findall("firmware/feature")}
    for name in ("secure-boot", "enrolled-keys"):
        if feats.get(name) == "yes" and name not in d.features:
            return False
        if feats.get(name) == "no" and name in d.features:
            return False
    secure = _yes(loader.get("secure")) if loader is not None else None
    smm = root.find("features/smm")
    if "requires-smm" in d.features:
        if smm is not None and smm.get("state") == "off":
            return False
        if secure is False:
            return False
    elif secure is True:
        return False
    if d.device == "flash":
        ltype = loader.get("type") if loader is not None else None
        if ltype not in (None, "pflash"):
            return False
        stateless = _yes(loader.get("stateless")) if loader is not None else None
        if (stateless is True) != (d.mode == "stateless"):
            return False
        if stateless is not True and d.mode != "split":
            return False
        if loader is not None and loader.get("readonly") == "no" and d.mode != "combined":
            return False
        if d.executable_format not in ("raw", "qcow2"):
            return False
        if loader is not None and loader.get("format") not in (None, d.executable_format):
            return False
    elif d.device == "memory":
        if loader is not None and loader.get("type") not in (None, "rom"):
            return False
        if loader is not None and loader.get("readonly") == "no":
            return False
    sec = root.find("launchSecurity")
    if sec is not None:
        stype = sec.get("type")
        if stype == "sev" and "amd-sev" not in d.features:
            return False
        if stype == "sev-snp" and "amd-sev-snp" not in d.features:
            return False
    return True


def fill(root: Element, descriptors: tuple[Descriptor, ...] | None, nvram_dir: Path) -> None:
    """Select the firmware (see module docstring) and write it into ``root``.

    ``descriptors`` None means "not known here": a definition whose firmware is already
    selected (a loader path) is left as it is, one that still needs selecting is refused.
    """
    validate_os(root)
    os_ = root.find("os")
    if os_ is None:
        return
    firmware = os_.get("firmware")
    loader = os_.find("loader")
    if not firmware and (loader is None or loader.get("type", "rom") == "rom"):
        return
    if descriptors is None:
        if firmware and (loader is None or not (loader.text or "").strip()):
            raise ConfigUnsupported(
                f"<os firmware='{firmware}'>: no QEMU firmware descriptors to select from"
            )
        _ensure_nvram(root, nvram_dir)
        return
    type_el = os_.find("type")
    machine = (type_el.get("machine") if type_el is not None else None) or "pc"
    arch = (type_el.get("arch") if type_el is not None else None) or "x86_64"
    if firmware and loader is None:
        loader = etree.Element("loader")
        _insert_os(os_, loader)
    if firmware and loader is not None and loader.get("format") is None:
        loader.set("format", "raw")  # libvirt: autoselection of existing domains is raw
    chosen = next((d for d in descriptors if _matches(root, d, machine, arch)), None)
    if chosen is None:
        if firmware:
            raise ConfigUnsupported(
                f"Unable to find '{firmware}' firmware that is compatible with the current "
                "configuration"
            )
        if loader is not None and loader.get("format") is None:
            loader.set("format", "raw")
        _ensure_nvram(root, nvram_dir)
        return
    assert loader is not None
    if chosen.device == "flash":
        loader.set("readonly", "yes")
        loader.set("type", "pflash")
        loader.set("format", chosen.executable_format)
        loader.text = chosen.executable
        if chosen.mode == "split":
            nvram = os_.find("nvram")
            local = nvram is None or nvram.get("type") in (None, "file")
            if local:
                if nvram is None:
                    nvram = etree.Element("nvram")
                    loader.addnext(nvram)
                nvram.set("template", str(chosen.nvram_template))
                nvram.set("templateFormat", str(chosen.nvram_template_format or "raw"))
    elif chosen.device == "memory":
        loader.set("type", "rom")
        loader.text = chosen.executable
    if "requires-smm" in chosen.features:
        feats = root.find("features")
        if feats is None:
            feats = etree.Element("features")
            os_.addnext(feats)
        smm = feats.find("smm")
        if smm is None:
            smm = etree.SubElement(feats, "smm")
        smm.set("state", "on")
        loader.set("secure", "yes")
    if not firmware:
        firmware = next(({"uefi": "efi", "bios": "bios"}[i] for i in chosen.interfaces
                         if i in ("uefi", "bios")), None)  # fmt: skip
        if firmware:
            os_.set("firmware", firmware)
    if firmware:
        fw_el = os_.find("firmware")
        if fw_el is None:
            fw_el = etree.Element("firmware")
            loader.addprevious(fw_el)
        for name in ("enrolled-keys", "secure-boot"):
            if fw_el.find(f"feature[@name='{name}']") is None:
                etree.SubElement(fw_el, "feature", enabled="yes" if name in chosen.features
                                 else "no", name=name)  # fmt: skip
    _ensure_nvram(root, nvram_dir)


def _insert_os(os_: Element, el: Element) -> None:
    type_el = os_.find("type")
    if type_el is not None:
        type_el.addnext(el)
    else:
        os_.insert(0, el)


def _ensure_nvram(root: Element, nvram_dir: Path) -> None:
    """A read-only, stateful pflash loader gets an NVRAM file: ``<name>_VARS.fd``."""
    os_ = root.find("os")
    assert os_ is not None
    loader = os_.find("loader")
    if loader is None or loader.get("type") != "pflash" or loader.get("readonly") != "yes":
        return
    if loader.get("stateless") == "yes":
        return
    nvram = os_.find("nvram")
    if nvram is not None and nvram.get("format") is None and loader.get("format"):
        nvram.set("format", str(loader.get("format")))
    if nvram is not None and ((nvram.text or "").strip() or nvram.find("source") is not None):
        return
    if nvram is None:
        nvram = etree.Element("nvram")
        loader.addnext(nvram)
    fmt = nvram.get("templateFormat") or loader.get("format") or "raw"
    nvram.set("format", fmt)
    ext = ".qcow2" if fmt == "qcow2" else ".fd"
    name_el = root.find("name")
    name = name_el.text if name_el is not None and name_el.text else "guest"
    nvram.text = str(nvram_dir / f"{name}_VARS{ext}")
