"""The per-domain uids of ``qemu_uid_range`` (drivers/qemu/dac.py) and the one-entry POSIX
ACL edit (drivers/qemu/acl.py), on real files: the end-to-end behaviour is in
tests/e2e/test_qemu_peruid.py."""

from __future__ import annotations

import os
import pwd
import stat
import threading
from pathlib import Path

import pytest

from drivers.qemu import acl
from drivers.qemu.dac import DacLabels, UidPool, parse_range
from virtbus.errors import InvalidArgument, OperationFailed


def test_the_range_parses_and_a_bad_one_names_the_setting() -> None:
    assert parse_range("200000-200999") == (200000, 200999)
    for bad in ("200000", "2-1", "0-100", "a-b", "300-200", "1000-4294967295"):
        with pytest.raises(InvalidArgument, match="qemu_uid_range"):
            parse_range(bad)


def test_with_qemu_user_too_its_groups_are_shared_but_never_the_uid_or_gid(
    tmp_path: Path,
) -> None:
    shared = pwd.getpwnam("virtbus-qemu")  # made by deploy/setup-dev
    labels = DacLabels("virtbus-qemu", tmp_path, uid_range="200000-200001", state_dir=tmp_path)
    assert labels.per_domain and labels.pool is not None
    labels.pool.allocate("a", "da")
    user = labels.user("a")
    assert user is not None and (user.uid, user.gid) == (200000, 200000)
    assert shared.pw_gid in user.groups and shared.pw_uid != user.uid
    alone = DacLabels("", tmp_path, uid_range="200000-200001", state_dir=tmp_path).user("a")
    assert alone is not None and shared.pw_gid not in alone.groups


def test_allocations_survive_a_new_pool_and_are_freed(tmp_path: Path) -> None:
    path = tmp_path / "qemu-uids.json"
    pool = UidPool(path, 200000, 200001)
    assert pool.allocate("a", "da") == 200000
    assert pool.allocate("b", "db") == 200001
    assert pool.allocate("a", "da") == 200000  # its own again
    again = UidPool(path, 200000, 200001)  # a restarted agent
    assert again.get("a") == 200000 and again.get("b") == 200001
    with pytest.raises(OperationFailed, match=r"no free uid in .*qemu_uid_range=200000-200001"):
        again.allocate("c", "dc")
    again.free("a")
    assert UidPool(path, 200000, 200001).allocate("c", "dc") == 200000
    again = UidPool(path, 200000, 200001)
    again.prune({"c"})  # b is no longer on this host
    assert UidPool(path, 200000, 200001).get("b") is None


def test_an_account_of_the_host_is_never_handed_out(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    pool = UidPool(tmp_path / "u.json", nobody - 1, nobody)
    assert pool.allocate("a", "da") == nobody - 1
    with pytest.raises(OperationFailed, match="no free uid"):
        pool.allocate("b", "db")


def test_an_acl_entry_per_uid_is_added_and_taken_off(tmp_path: Path) -> None:
    f = tmp_path / "shared.iso"
    f.write_bytes(b"x")
    f.chmod(0o600)
    acl.add_user(str(f), 200000, 4)
    acl.add_user(str(f), 200001, 6)
    assert acl.user_perm(str(f), 200000) == 4 and acl.user_perm(str(f), 200001) == 6
    assert stat.S_IMODE(f.stat().st_mode) == 0o660  # the group bits show the mask
    acl.remove_user(str(f), 200000)
    assert acl.user_perm(str(f), 200000) is None and acl.user_perm(str(f), 200001) == 6
    acl.remove_user(str(f), 200001)
    assert acl.XATTR not in os.listxattr(f)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600  # as it was
    acl.remove_user(str(f), 200001)  # idempotent


def test_concurrent_launches_never_get_the_same_uid(tmp_path: Path) -> None:
    """Launches allocate in worker threads (asyncio.to_thread), several at once."""
    pool = UidPool(tmp_path / "u.json", 200000, 200015)
    barrier = threading.Barrier(16)
    got: dict[str, int] = {}

    def start(n: int) -> None:
        barrier.wait()
        got[f"d{n}"] = pool.allocate(f"d{n}", f"dom{n}")

    threads = [threading.Thread(target=start, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got.values()) == list(range(200000, 200016))
    assert UidPool(tmp_path / "u.json", 200000, 200015).get("d7") == got["d7"]
