"""What a hot-plug gives a confined QEMU and takes back (drivers/qemu/dac.py acquire_disk /
release_disk) when a step fails or is cut short, and the helper logs taken back at undefine
(drivers/qemu/companions.py disown_logs), on real files (the tests run as root). The
end-to-end behaviour is in tests/e2e/test_qemu_peruid.py and test_qemu_dac.py."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from drivers.qemu import companions, dac
from drivers.qemu.dac import REMEMBER, SUFFIX, DacLabels
from virtbus.domain import DomainDefinition
from virtbus.domain.devices import parse_device
from virtbus.domain.xml import parse_domain_xml
from virtbus.errors import OperationFailed

UUID = "3b1f8a52-6c1e-4d0a-9d55-0a1b2c3d4e5f"
FIRST = 233000  # a per-domain uid no account of a test host uses


def _domain() -> DomainDefinition:
    return parse_domain_xml(
        f"<domain type='kvm'><name>hp</name><uuid>{UUID}</uuid><memory>65536</memory>"
        "<os><type>hvm</type></os><devices/></domain>"
    )


@pytest.fixture(autouse=True)
def _reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest's tmp dirs are under a 0700 dir of root's: what QEMU could reach is not what
    these tests are about."""
    monkeypatch.setattr(dac, "check_reachable", lambda *_args: None)


def _labels(tmp_path: Path) -> DacLabels:
    run = tmp_path / "run"
    run.mkdir()
    labels = DacLabels("", run, uid_range=f"{FIRST}-{FIRST + 9}", state_dir=tmp_path)
    assert labels.pool is not None
    labels.pool.allocate(UUID, "hp")
    return labels


def _image(path: Path) -> Path:
    path.write_bytes(b"\0" * 512)
    os.chown(path, 0, 0)
    os.chmod(path, 0o644)
    return path


def _owner(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)


def _recorded(labels: DacLabels) -> set[str]:
    doc = json.loads((labels._run_dir / f"{UUID}{SUFFIX}").read_bytes())
    return {str(e[0]) for e in doc["files"]} | {str(a[0]) for a in doc["acl"]}


async def test_a_hot_plug_whose_chown_fails_gives_back_what_it_had_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is written before the chowns (a crash then still gives them back), but a
    chown that fails must not leave the files chowned before it the QEMU's (nor in the
    record) until the run ends: the hot-plug failed, QEMU never opens them."""
    labels = _labels(tmp_path)
    top, volume = _image(tmp_path / "top.img"), _image(tmp_path / "vol.img")
    el = parse_device(f"<disk type='file' device='disk'><source file='{top}'/>"
                      "<target dev='vdb' bus='virtio'/></disk>")  # fmt: skip
    real = dac._chown

    def chown(path: str, user: dac.QemuUser, private: bool, plain: bool = False) -> None:
        if path == str(volume):
            raise PermissionError(1, "Operation not permitted", path)
        real(path, user, private, plain)

    monkeypatch.setattr(dac, "_chown", chown)
    with pytest.raises(OSError, match="not permitted"):
        await labels.acquire_disk(_domain(), el, str(volume))
    for path in (top, volume):
        assert _owner(path) == (0, 0, 0o644), path
        assert REMEMBER not in os.listxattr(path), path
    assert _recorded(labels) == set()


async def test_a_detach_cut_short_leaves_what_it_did_not_give_back_in_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """release_disk takes a file out of the run's record only once it is given back: a
    detach cancelled in between (its command timed out, the agent stopping) leaves it for
    the end of the run, instead of owned by a uid that a later domain may get."""
    labels = _labels(tmp_path)
    image = _image(tmp_path / "data.img")
    el = parse_device(f"<disk type='file' device='disk'><source file='{image}'/>"
                      "<target dev='vdb' bus='virtio'/></disk>")  # fmt: skip
    assert await labels.acquire_disk(_domain(), el, None) == [str(image)]
    assert _owner(image) == (FIRST, FIRST, 0o600)

    def cut(*_args: object) -> None:
        raise KeyboardInterrupt  # stands for the cancel: nothing was given back

    monkeypatch.setattr(dac, "_restore", cut)
    with pytest.raises(KeyboardInterrupt):
        await labels.release_disk(UUID, [str(image)])
    assert _recorded(labels) == {str(image)}
    monkeypatch.undo()
    await labels.release(UUID)  # the end of the run
    assert _owner(image) == (0, 0, 0o644)
    assert REMEMBER not in os.listxattr(image)


def test_helper_logs_are_taken_back_without_following_a_link(tmp_path: Path) -> None:
    """With one shared qemu_user the run dir is the QEMU group's (1770) and a swtpm log is
    the QEMU user's: it may replace it with a link to any file, which the agent (root) must
    not chown or chmod at undefine."""
    run = tmp_path / "run"
    run.mkdir()
    log = run / f"{UUID}.tpm0-swtpm.log"
    log.write_text("swtpm\n")
    os.chown(log, FIRST, FIRST)
    os.chmod(log, 0o600)
    victim = tmp_path / "victim"
    victim.write_text("someone else's\n")
    os.chown(victim, FIRST + 5, FIRST + 5)
    os.chmod(victim, 0o4755)
    link = run / f"{UUID}.tpm1-swtpm.log"
    link.symlink_to(victim)
    companions.disown_logs(run, UUID)
    assert _owner(log) == (os.getuid(), os.getgid(), 0o640)
    assert _owner(victim) == (FIRST + 5, FIRST + 5, 0o4755)
    assert link.is_symlink()


@pytest.mark.parametrize("dangling", [False, True])
@pytest.mark.parametrize("step", ["give", "log", "secret"])
def test_a_helper_file_of_the_run_dir_is_never_opened_through_a_link(
    tmp_path: Path, dangling: bool, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one shared qemu_user the run dir is the QEMU group's (1770), and the swtpm log
    kept from an earlier run the QEMU user's: a link it put in place of a file the agent
    (root) gives away, appends to or writes a passphrase to at a start must not give away,
    write or create the file it points to."""
    from drivers.qemu import helpers
    from virtbus.errors import OperationFailed

    monkeypatch.setattr(helpers, "check_reachable", lambda *_args: None)
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("root's\n")
        os.chmod(victim, 0o600)
    link = run / f"{UUID}.tpm0-swtpm.log"
    link.symlink_to(victim)
    secret = tmp_path / "secret.b64"
    secret.write_text("aGVsbG8=")
    user = dac.QemuUser("uid", FIRST, FIRST, ())
    spec = helpers.HelperSpec("swtpm", "tpm0", ("swtpm",), run / "tpm0.sock", files=(link,))
    with pytest.raises(OperationFailed, match="not a plain file"):
        if step == "give":
            helpers._give(spec, user, UUID)
        elif step == "log":
            os.close(helpers._open_log(link, ("swtpm",)))
        else:
            helpers._write_secrets(((secret, link),))
    if dangling:
        assert not victim.exists()
    else:
        assert (*_owner(victim), victim.read_text()) == (0, 0, 0o600, "root's\n")
    assert link.is_symlink()


async def test_a_run_ending_during_a_hot_plug_gives_its_file_back_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's end (its QEMU exiting) gives back what the record holds while a hot-plug
    may be giving one more file: one after the other per domain, so the end sees the
    hot-plug's file in the record and gives it back too, never deletes the record under
    it (the file then stayed the uid's, with no record left to say so)."""
    labels = _labels(tmp_path)
    image = _image(tmp_path / "late.img")
    el = parse_device(f"<disk type='file' device='disk'><source file='{image}'/>"
                      "<target dev='vdb' bus='virtio'/></disk>")  # fmt: skip
    real = dac._original
    inside, go_on = asyncio.Event(), threading.Event()

    def original(
        path: str, create: bool, user: dac.QemuUser, plain: bool = False
    ) -> list[object] | None:
        loop.call_soon_threadsafe(inside.set)
        go_on.wait(10)  # the hot-plug stands here, before its record write
        return real(path, create, user, plain)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(dac, "_original", original)
    plug = asyncio.create_task(labels.acquire_disk(_domain(), el, None))
    await asyncio.wait_for(inside.wait(), 10)
    end = asyncio.create_task(labels.release(UUID))  # the QEMU exited meanwhile
    for _ in range(20):
        await asyncio.sleep(0)
    go_on.set()
    assert await plug == [str(image)]
    await end
    assert _owner(image) == (0, 0, 0o644)
    assert REMEMBER not in os.listxattr(image)
    assert not (labels._run_dir / f"{UUID}{SUFFIX}").exists()


def test_qemus_log_is_never_opened_through_a_link(tmp_path: Path) -> None:
    """The agent (root) opens a domain's QEMU log in the run dir, which with one shared
    qemu_user is the QEMU group's: any QEMU may put a link there before that domain's first
    start. The start fails naming the log; the file the link points to is untouched."""
    from drivers.qemu import process

    victim = _image(tmp_path / "shadow")
    log = tmp_path / f"{UUID}.log"
    log.symlink_to(victim)
    with pytest.raises(OperationFailed, match="not a plain file"):
        process._open_log(log, "--- start ---\n")
    assert victim.read_bytes() == b"\0" * 512 and _owner(victim) == (0, 0, 0o644)
    log.unlink()
    fd = process._open_log(log, "--- start ---\n")  # a plain file: opened, stamped
    os.close(fd)
    assert log.read_text() == "--- start ---\n"


async def test_a_link_a_qemu_put_in_the_run_dir_is_never_labelled_through(
    tmp_path: Path,
) -> None:
    """A domain's own dir is its QEMU's to write: a QEMU (compromised) that replaced a file
    there (its console log) with a link to another guest's image would have had the agent,
    root, give that image to its uid at the next start. A file of the run dir is labelled
    only as a plain file; one elsewhere (a pool's) through its links, as libvirt does."""
    labels = _labels(tmp_path)
    other = _image(tmp_path / "other-guest.img")
    own = labels._run_dir / UUID
    own.mkdir()
    (own / "serial.log").symlink_to(other)
    el = parse_device(f"<disk type='file' device='disk'><source file='{own / 'serial.log'}'/>"
                      "<target dev='vdb' bus='virtio'/></disk>")  # fmt: skip
    with pytest.raises(OperationFailed, match="not a plain file"):
        await labels.acquire_disk(_domain(), el, None)
    assert _owner(other) == (0, 0, 0o644) and REMEMBER not in os.listxattr(other)
    # a link outside the run dir (a pool's image named by a link) is followed
    link = tmp_path / "pool-link.img"
    link.symlink_to(other)
    el = parse_device(f"<disk type='file' device='disk'><source file='{link}'/>"
                      "<target dev='vdc' bus='virtio'/></disk>")  # fmt: skip
    assert await labels.acquire_disk(_domain(), el, None) == [str(link)]
    assert _owner(other) == (FIRST, FIRST, 0o600)
    await labels.release_disk(UUID, [str(link)])
    assert _owner(other) == (0, 0, 0o644)
