"""Host paths a container exposes: inside ``allowed_roots`` or refused (AUTH_DENIED), and
an init that really exists in the root filesystem. Blocking file-system calls: the driver
runs these in a worker thread."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from drivers.lxc.config import DEFAULT_INIT, root_filesystem
from virtbus.domain import DomainDefinition, Filesystem
from virtbus.errors import AuthDenied, InvalidArgument

MAX_SYMLINKS = 40  # as the kernel's path walk
_KINDS = {"mount": (stat.S_ISDIR, "a directory"), "block": (stat.S_ISBLK, "a block device"),
          "file": (stat.S_ISREG, "a regular file")}  # fmt: skip


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def resolve_sources(defn: DomainDefinition, allowed_roots: Sequence[Path]) -> dict[int, str]:
    """Every filesystem source, symlinks resolved, checked against ``allowed_roots``.

    Returns filesystem index -> the resolved path, which is what the lxc config uses (a
    symlink swapped after this check cannot redirect the container elsewhere).
    """
    roots = [os.path.realpath(r) for r in allowed_roots]
    out: dict[int, str] = {}
    for fs in defn.filesystems:
        source = fs.source_path
        if source is None or fs.type not in _KINDS:
            continue
        real = os.path.realpath(source)
        if not _inside(real, roots):
            shown = f"'{source}'" + (f" (really '{real}')" if real != source else "")
            raise AuthDenied(
                f"filesystem source {shown} of domain '{defn.name}' is outside the directories"
                f" containers may use ({', '.join(roots) or 'none'}; driver option"
                " allowed_roots)"
            )
        check, kind = _KINDS[fs.type]
        try:
            mode = os.stat(real).st_mode
        except OSError as exc:
            raise InvalidArgument(
                f"filesystem source '{source}' of domain '{defn.name}': {exc.strerror}"
            ) from None
        if not check(mode):
            raise InvalidArgument(
                f"filesystem source '{source}' of domain '{defn.name}' is not {kind}"
            )
        out[fs.index] = real
    return out


def resolve_in_root(root: str, path: str) -> str:
    """``path`` as the container sees it, resolved on the host under ``root`` (a chroot
    walk: absolute symlinks restart at ``root``, ``..`` never leaves it)."""
    parts = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, part)
        try:
            info = os.lstat(here)
        except OSError:
            done.append(part)
            done += parts
            return os.path.join(root, *done)
        if stat.S_ISLNK(info.st_mode):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise InvalidArgument(f"too many symbolic links resolving '{path}'")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        done.append(part)
    return os.path.join(root, *done)


def _filesystem_of(defn: DomainDefinition, path: str) -> Filesystem:
    """The filesystem that holds ``path`` in the container (the longest target prefix)."""
    best = root_filesystem(defn)
    for fs in defn.filesystems:
        target = fs.target_dir.rstrip("/")
        inside = path == target or path.startswith(target + "/")
        if target and inside and len(target) > len(best.target_dir.rstrip("/")):
            best = fs
    return best


def check_init(defn: DomainDefinition, sources: dict[int, str]) -> None:
    """The init exists and is executable where the container will look for it.

    Only a directory can be inspected from the host: an init on an image file or a
    block device (or a ram disk) is left for lxc-start to find.
    """
    init = defn.os.init or DEFAULT_INIT
    fs = _filesystem_of(defn, init)
    if fs.type != "mount" or fs.index not in sources:
        return
    inner = init[len(fs.target_dir.rstrip("/")) :] or "/"
    host = resolve_in_root(sources[fs.index], inner)
    try:
        info = os.stat(host)
    except OSError:
        raise InvalidArgument(
            f"init '{init}' of domain '{defn.name}' does not exist in its root filesystem"
            f" ('{host}' not found)"
        ) from None
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o111:
        raise InvalidArgument(
            f"init '{init}' of domain '{defn.name}' is not an executable file ('{host}')"
        )
