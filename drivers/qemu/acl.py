"""One named-user entry of a file's POSIX access ACL, added and taken away again.

What ``setfacl -m u:UID:r`` and ``setfacl -x u:UID`` do, written straight to the
``system.posix_acl_access`` extended attribute (the kernel's binary format,
``linux/posix_acl_xattr.h``), so that the agent needs no ``acl`` package. The QEMU
driver's per-domain uids (:mod:`drivers.qemu.dac`) use it for files several guests share
(a read-only ISO, a shareable disk): each guest's uid gets its own entry, the file keeps
its owner, and the entry goes when that guest stops.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")

Entries = dict[tuple[int, int], int]  # (tag, id) -> perm (r=4, w=2, x=1)


def _parse(data: bytes) -> Entries:
    (version,) = _HEADER.unpack_from(data)
    if version != VERSION or (len(data) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, f"unknown POSIX ACL format (version {version})")
    out: Entries = {}
    for offset in range(_HEADER.size, len(data), _ENTRY.size):
        tag, perm, ident = _ENTRY.unpack_from(data, offset)
        out[(tag, ident if tag in (USER, GROUP) else UNDEFINED_ID)] = perm
    return out


def _encode(entries: Entries) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(
        _ENTRY.pack(tag, perm, ident) for (tag, ident), perm in sorted(entries.items())
    )


def _read(path: str) -> tuple[Entries, bool]:
    """The access ACL of ``path`` and whether it has one (else the one its mode implies)."""
    try:
        return _parse(os.getxattr(path, XATTR, follow_symlinks=True)), True
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
    mode = os.stat(path).st_mode
    return {(USER_OBJ, UNDEFINED_ID): (mode >> 6) & 7, (GROUP_OBJ, UNDEFINED_ID): (mode >> 3) & 7,
            (OTHER, UNDEFINED_ID): mode & 7}, False  # fmt: skip


def _named(entries: Entries) -> list[int]:
    return [perm for (tag, _), perm in entries.items() if tag in (USER, GROUP)]


def add_user(path: str, uid: int, perm: int) -> None:
    """Give ``uid`` the permissions ``perm`` on ``path`` (its entry replaced if any); the
    mask widens just enough. OSError (EOPNOTSUPP: no ACLs on that filesystem)."""
    entries, _ = _read(path)
    entries[(USER, uid)] = perm
    mask = entries.get((MASK, UNDEFINED_ID))
    if mask is None:
        mask = entries[(GROUP_OBJ, UNDEFINED_ID)]
        for p in _named(entries):
            mask |= p
    entries[(MASK, UNDEFINED_ID)] = mask | perm
    os.setxattr(path, XATTR, _encode(entries))


def remove_user(path: str, uid: int) -> None:
    """Take ``uid``'s entry off ``path``; the last named entry gone, the ACL goes too and
    the mode's group bits are the owning group's again (as ``setfacl -x`` then ``-b``)."""
    entries, present = _read(path)
    if not present or entries.pop((USER, uid), None) is None:
        return
    if _named(entries):
        os.setxattr(path, XATTR, _encode(entries))
        return
    group = entries[(GROUP_OBJ, UNDEFINED_ID)]
    mode = stat.S_IMODE(os.stat(path).st_mode)
    os.removexattr(path, XATTR)
    os.chmod(path, (mode & ~0o070) | (group << 3))


def user_perm(path: str, uid: int) -> int | None:
    """The permissions of ``uid``'s own entry on ``path`` (None: it has none)."""
    entries, _ = _read(path)
    return entries.get((USER, uid))
