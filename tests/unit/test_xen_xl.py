"""`xl list -v` / `xl info` parsers on output captured from real Xen 4.17 (nested bed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.xen.migration import MigrationJob
from drivers.xen.xl import XlError, parse_info, parse_list_verbose

DATA = Path(__file__).parent / "data" / "xen"


def rows(n: int) -> dict[str, tuple[int, str, str | None, int]]:
    parsed = parse_list_verbose((DATA / f"xl-list-v-{n}.txt").read_text())
    return {r.name: (r.domid, r.state, r.shutdown_reason, r.mem_mib) for r in parsed}


def test_dom0_only() -> None:
    (dom0,) = parse_list_verbose((DATA / "xl-list-v-0.txt").read_text())
    assert (dom0.name, dom0.domid, dom0.mem_mib, dom0.vcpus) == ("Domain-0", 0, 1536, 2)
    assert dom0.running and not dom0.shutdown and dom0.reason_code is None
    assert dom0.uuid == "00000000-0000-0000-0000-000000000000" and dom0.cpu_time_s == 21.3


def test_crash_preserved_then_paused() -> None:
    assert rows(1)["p1"] == (1, "---sc-", "crash", 128)
    got = parse_list_verbose((DATA / "xl-list-v-2.txt").read_text())
    p1 = next(r for r in got if r.name == "p1")
    assert p1.paused and p1.shutdown and p1.reason_code == 3 and p1.shutdown_reason == "crash"


def test_guest_poweroff_and_reboot_preserved() -> None:
    four = rows(4)
    assert four["p2"] == (2, "---s--", "poweroff", 128)  # reason letter '-' is poweroff
    five = rows(5)
    assert five["p3"] == (3, "---sr-", "reboot", 128)


def test_half_destroyed_domains_show_null_names() -> None:
    got = parse_list_verbose((DATA / "xl-list-v-6.txt").read_text())
    assert [r.name for r in got] == ["Domain-0", "(null)", "(null)", "(null)"]
    assert [r.domid for r in got[1:]] == [1, 2, 3] and all(r.paused for r in got[1:])


def test_names_with_spaces_and_bad_rows() -> None:
    line = "my dom   7   256   1   -b----   1.5 f273a74c-762a-497b-9e94-0f3ad001d15d   -   -"
    (row,) = parse_list_verbose(line)
    assert row.name == "my dom" and row.domid == 7 and row.blocked
    with pytest.raises(XlError):
        parse_list_verbose("Domain-0 0 1536 2 r----- 21.3")
    with pytest.raises(XlError):
        parse_list_verbose("d 1 128 1 zzzzzz 1.0 f273a74c-762a-497b-9e94-0f3ad001d15d - -")


def test_xl_info() -> None:
    info = parse_info((DATA / "xl-info.txt").read_text())
    assert info["xen_version"] == "4.17.7" and info["nr_cpus"] == "2"
    assert int(info["total_memory"]) == 3071 and "hvm" in info["virt_caps"]


async def test_a_failed_migration_names_libxl_s_cause() -> None:
    """xl's last line says where a migration failed; libxl's first error says why (stderr of a
    PV guest's migration on the nested bed)."""
    stderr = (
        "migration target: Ready to receive domain.\n"
        "xc: error: Failed to enable logdirty: 95,22,0 (22 = Invalid argument): Internal error\n"
        "xc: error: Save failed (22 = Invalid argument): Internal error\n"
        "libxl: error: libxl_stream_write.c:347:libxl__xc_domain_save_done: saving domain\n"
        "libxl: error: libxl_domain.c:1137:domain_destroy_callback: Domain 2:Unable to destroy\n"
        "Migration failed, failed to suspend at sender."
    )

    class FailingXl:
        async def migrate(self, domid: int, host: str, ssh: str, timeout: float) -> None:
            raise XlError(
                "xl migrate failed: Migration failed, failed to suspend at sender.", stderr
            )

    job = MigrationJob(domid=3, host="localhost")
    await job.run(FailingXl(), "", 10.0)  # type: ignore[arg-type]
    assert job.status == "failed"
    assert job.error is not None
    assert job.error.startswith("xl migrate failed: Migration failed, failed to suspend")
    assert "Failed to enable logdirty: 95" in job.error
    assert "Unable to destroy" not in job.error  # the first three, not the aftermath
