"""``<filesystem>`` shares and ``<tpm>`` devices: what goes on QEMU's command line, and the
per-domain helper each one needs (virtiofsd, swtpm; see :mod:`drivers.qemu.helpers`).

- virtiofs: ``vhost-user-fs-pci`` on a socket that a virtiofsd started for this domain
  serves (or one the user runs, ``<source socket=...>``); guest RAM must be shared, as
  libvirt requires.
- 9p: ``-fsdev local`` + ``virtio-9p-pci``.
- TPM: ``tpm-tis``/``tpm-crb`` on an emulator backend (swtpm, whose state lives under the
  driver's state dir and travels with a live migration inside QEMU's stream), a host TPM
  (passthrough) or an external swtpm socket.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from drivers.qemu.argv_common import BuildContext, kv_escape, secret_path, unsupported
from drivers.qemu.argv_virtio import virtio_props
from drivers.qemu.helpers import HelperSpec
from drivers.qemu.xmlnum import num
from virtbus.domain.model import Element
from virtbus.domain.numbers import shown
from virtbus.errors import ConfigUnsupported, XMLError

FS_ACCESS = {"passthrough": "passthrough", "mapped": "mapped", "squash": "none"}


def _shared_memory(ctx: BuildContext) -> bool:
    root = ctx.defn.root
    acc = root.find("memoryBacking/access")
    if acc is not None and acc.get("mode") == "shared":
        return True
    cells = root.findall("cpu/numa/cell")
    return bool(cells) and all(c.get("memAccess") == "shared" for c in cells)


def build_filesystems(ctx: BuildContext) -> None:
    for i, fs in enumerate(ctx.defn.elements("devices/filesystem")):
        ftype = fs.get("type", "mount")
        driver = fs.find("driver")
        dtype = driver.get("type") if driver is not None else None
        src = fs.find("source")
        target = fs.find("target")
        tag = target.get("dir") if target is not None else None
        if not tag:
            raise XMLError(f"<filesystem> #{i} needs <target dir=...>")
        fs_id = f"fs{i}"
        if dtype == "virtiofs":
            if ftype != "mount":
                raise unsupported(f"<filesystem type='{ftype}'> with virtiofs")
            if not _shared_memory(ctx):
                raise ConfigUnsupported("'virtiofs' requires shared memory")
            sock_path = src.get("socket") if src is not None else None
            if sock_path:  # someone else's virtiofsd: QEMU connects
                socket = ctx.user_socket(Path(sock_path), bind=False)
            else:
                path = src.get("dir") if src is not None else None
                if not path:
                    raise XMLError(f"<filesystem> #{i} needs <source dir=...>")
                socket = ctx.socket_path(f"{fs_id}-fs.sock")
                ctx.helpers.append(_virtiofsd(ctx, fs, fs_id, path, socket))
            ctx.add("-chardev", f"socket,id=chr-vu-{fs_id},path={kv_escape(str(socket))}")
            props: dict[str, Any] = virtio_props("vhost-user-fs", fs, fs.get("model"))
            props |= {"id": fs_id, "chardev": f"chr-vu-{fs_id}"}
            if driver is not None and driver.get("queue"):
                props["queue-size"] = num(driver, "queue")
            props["tag"] = tag
            boot = fs.find("boot")
            if boot is not None and boot.get("order"):
                props["bootindex"] = num(boot, "order")
            ctx.device(props | ctx.addr_props(fs, f"<filesystem> #{i}"))
            continue
        if dtype == "mtp":
            path = src.get("dir") if src is not None else None
            if not path:
                raise XMLError(f"<filesystem> #{i} needs <source dir=...>")
            props = {"driver": "usb-mtp", "id": fs_id, "rootdir": path, "desc": tag,
                     "readonly": fs.find("readonly") is not None}  # fmt: skip
            ctx.device(props | ctx.addr_props(fs, f"<filesystem> #{i}"))
            continue
        if dtype not in (None, "path", "handle"):
            raise unsupported(f"<filesystem><driver type='{dtype}'>")
        if ftype != "mount":
            raise unsupported(f"<filesystem type='{ftype}'>")
        path = src.get("dir") if src is not None else None
        if not path:
            raise XMLError(f"<filesystem> #{i} needs <source dir=...>")
        if dtype == "handle":
            opts = "handle"
        else:
            opts = "local"
            access = fs.get("accessmode", "passthrough")
            if access not in FS_ACCESS:
                raise XMLError(f"invalid <filesystem accessmode='{access}'>")
            opts += f",security_model={FS_ACCESS[access]}"
            multidevs = fs.get("multidevs")
            if multidevs in ("remap", "forbid", "warn"):
                opts += f",multidevs={multidevs}"
            for attr in ("fmode", "dmode"):
                if fs.get(attr):
                    opts += f",{attr}={_mode(fs, attr)}"
        wrpolicy = driver.get("wrpolicy") if driver is not None else None
        if wrpolicy:
            opts += f",writeout={wrpolicy}"
        opts += f",id=fsdev-{fs_id},path={path.replace(',', ',,')}"
        if fs.find("readonly") is not None:
            opts += ",readonly=on"
        ctx.add("-fsdev", opts)
        props = virtio_props("virtio-9p", fs, fs.get("model"))
        props |= {"id": fs_id, "fsdev": f"fsdev-{fs_id}", "mount_tag": tag}
        ctx.device(props | ctx.addr_props(fs, f"<filesystem> #{i}"))


def _mode(el: Element, attr: str) -> str:
    """A file mode (octal, as in ``<filesystem fmode='644'>``)."""
    raw = str(el.get(attr))
    if not re.fullmatch(r"0?[0-7]{1,4}", raw):
        raise XMLError(f"invalid <filesystem {attr}='{shown(raw)}'>: expected an octal mode")
    return f"{int(raw, 8):04o}"


def _virtiofsd(ctx: BuildContext, fs: Any, fs_id: str, path: str, socket: Path) -> HelperSpec:
    opts = f"source={path.replace(',', ',,')}"
    binary = fs.find("binary")
    argv = [ctx.settings.virtiofsd, f"--socket-path={socket}"]
    if binary is not None:
        if binary.get("path"):
            argv[0] = str(binary.get("path"))
        cache = binary.find("cache")
        if cache is not None and cache.get("mode"):
            mode = str(cache.get("mode"))
            opts += f",cache={'none' if mode == 'none' else mode}"
        sandbox = binary.find("sandbox")
        if sandbox is not None and sandbox.get("mode"):
            opts += f",sandbox={sandbox.get('mode')}"
        if binary.get("xattr") == "on":
            opts += ",xattr"
        elif binary.get("xattr") == "off":
            opts += ",no_xattr"
        lock = binary.find("lock")
        if lock is not None:
            for attr in ("posix", "flock"):
                value = lock.get(attr)
                if value in ("on", "off"):
                    name = "posix_lock" if attr == "posix" else "flock"
                    opts += f",{name}" if value == "on" else f",no_{name}"
        pool = binary.find("thread_pool")
        if pool is not None and pool.get("size"):
            argv.append(f"--thread-pool-size={num(pool, 'size')}")
        rlimit = binary.find("openfiles")
        if rlimit is not None and rlimit.get("max"):
            argv.append(f"--rlimit-nofile={num(rlimit, 'max')}")
    argv += ["-o", opts]
    for child in fs.findall("idmap/uid"):
        argv.append(f"--uid-map=:{child.get('start')}:{child.get('target')}:{child.get('count')}:")
    for child in fs.findall("idmap/gid"):
        argv.append(f"--gid-map=:{child.get('start')}:{child.get('target')}:{child.get('count')}:")
    if fs.find("readonly") is not None:
        argv.append("--readonly")
    return HelperSpec("virtiofsd", fs_id, tuple(argv), socket)


def build_tpms(ctx: BuildContext) -> None:
    tpms = ctx.defn.elements("devices/tpm")
    if len(tpms) > 2:
        raise ConfigUnsupported("a domain can have at most two TPMs (one tpm-tis or tpm-crb)")
    for i, tpm in enumerate(tpms):
        backend = tpm.find("backend")
        if backend is None:
            raise XMLError("missing TPM device backend")
        btype = backend.get("type")
        model = tpm.get("model") or "tpm-tis"
        if model not in ("tpm-tis", "tpm-crb"):
            raise unsupported(f"<tpm model='{model}'> on x86")
        dev_id = f"tpm{i}"
        tpmdev = f"tpm-{dev_id}"
        if btype == "passthrough":
            dev = backend.find("device")
            path = dev.get("path") if dev is not None else None
            path = path or "/dev/tpm0"
            name = Path(path).name
            ctx.add(
                "-tpmdev",
                f"passthrough,id={tpmdev},path={kv_escape(path)},"
                f"cancel-path={kv_escape(f'/sys/class/misc/{name}/device/cancel')}",
            )
            ctx.host_devices.append(path)
        elif btype in ("emulator", "external"):
            if btype == "external":
                src = backend.find("source")
                path = src.get("path") if src is not None else None
                if not path:
                    raise XMLError("<backend type='external'> needs <source type='unix' path>")
                socket = ctx.user_socket(Path(path), bind=False)
            else:
                socket = ctx.socket_path(f"{dev_id}-swtpm.sock")
                ctx.helpers.append(_swtpm(ctx, tpm, backend, model, dev_id, socket))
            ctx.add("-chardev", f"socket,id=chr{tpmdev},path={kv_escape(str(socket))}")
            ctx.add("-tpmdev", f"emulator,id={tpmdev},chardev=chr{tpmdev}")
        else:
            raise unsupported(f"<tpm><backend type='{btype}'>")
        ctx.device({"driver": model, "tpmdev": tpmdev, "id": dev_id}
                   | ctx.addr_props(tpm, "<tpm>"))  # fmt: skip


def _swtpm(ctx: BuildContext, tpm: Any, backend: Any, model: str, dev_id: str,
           socket: Path) -> HelperSpec:  # fmt: skip
    version = backend.get("version") or ("1.2" if model == "tpm-tis" else "2.0")
    if version not in ("1.2", "2.0"):
        raise XMLError(f"invalid TPM version '{version}'")
    if version == "1.2" and model == "tpm-crb":
        raise ConfigUnsupported("Unsupported interface 'tpm-crb' for TPM 1.2")
    host = ctx.host
    if host is not None and version == "1.2" and not host.swtpm_tpm12:
        raise ConfigUnsupported("TPM version '1.2' is not supported")
    if host is not None and version == "2.0" and not host.swtpm_tpm20:
        raise ConfigUnsupported("TPM version '2.0' is not supported")
    enc = backend.find("encryption")
    secrets: tuple[tuple[Path, Path], ...] = ()
    if enc is not None:
        if not enc.get("secret"):
            raise XMLError("missing secret uuid for TPM encryption")
        source = secret_path(ctx.settings, str(enc.get("secret")))
        raw = ctx.run_dir / f"{ctx.defn.uuid}.{dev_id}-swtpm.pwd"
        secrets = ((source, raw),)
    src = backend.find("source")
    if src is not None and src.get("path"):
        state = Path(str(src.get("path")))
        state_arg = (f"backend-uri=file://{state}" if src.get("type") == "file"
                     else f"dir={state}")  # fmt: skip
    else:
        state = (
            ctx.settings.swtpm_state_dir
            / ctx.defn.uuid
            / ("tpm2" if version == "2.0" else "tpm1.2")
        )
        state_arg = f"dir={state}"
    log = ctx.run_dir / f"{ctx.defn.uuid}.{dev_id}-swtpm.log"
    argv = [
        ctx.settings.swtpm,
        "socket",
        "--ctrl",
        f"type=unixio,path={socket},mode=0600",
        "--tpmstate",
        f"{state_arg},mode=0600",
        "--log",
        f"file={log}",
        "--terminate",
    ]
    if version == "2.0":
        argv.append("--tpm2")
    key: tuple[str, ...] = ()
    if secrets:
        # the state is encrypted at rest and in the migration stream (libvirt does both)
        pwd = f"pwdfile={secrets[0][1]},mode=aes-256-cbc"
        argv += ["--key", pwd, "--migration-key", pwd]
        key = ("--pwdfile", str(secrets[0][1]), "--cipher", "aes-256-cbc")
    tpm2 = ("--tpm2",) if version == "2.0" else ()
    vmid = f"{ctx.defn.name}:{ctx.defn.uuid}"
    setup: tuple[tuple[str, ...], ...]
    setup = ((ctx.settings.swtpm_setup, *tpm2, "--tpm-state", str(state), "--vmid", vmid,
              "--logfile", str(log), "--createek", "--create-ek-cert",
              "--create-platform-cert", "--lock-nvram", "--not-overwrite", *key),)  # fmt: skip
    pcr = backend.find("active_pcr_banks")
    if pcr is not None and version == "2.0":
        banks = ",".join(b.tag for b in pcr if isinstance(b.tag, str))
        if banks:
            setup = (*setup, (ctx.settings.swtpm_setup, "--tpm2", "--tpm-state", str(state),
                              "--logfile", str(log), "--pcr-banks", banks, *key))  # fmt: skip
    # an incoming migration brings the state in QEMU's stream: no setup (as libvirt)
    return HelperSpec("swtpm", dev_id, tuple(argv), socket, setup, (), state, (log,), secrets,
                      confined=True)  # fmt: skip
