"""CI floor on libvirt's QEMU test corpus: compatibility may only go up.

The whole corpus runs through parse, define, dumpxml + schema and argv building (a few
seconds). The share of files libvirt builds that virtbus builds, and the share whose
``-device`` multiset matches libvirt's, may not fall below tests/compat/floor.json; the
files virtbus wrongly accepts (libvirt rejects them) may only shrink. Record a new floor
after an improvement with ``python -m tests.compat.harness --write-floor``.
"""

from __future__ import annotations

import json

import pytest

from tests.compat.harness import FLOOR, run_corpus, summarize


@pytest.fixture(scope="module")
def outcome() -> tuple[str, dict[str, object]]:
    corpus, results, _seconds = run_corpus()
    return corpus.version, summarize(results)


def _floor(version: str) -> dict[str, object]:
    floors = json.loads(FLOOR.read_text())
    assert version in floors, f"no floor recorded for libvirt {version}'s corpus in {FLOOR}"
    floor: dict[str, object] = floors[version]
    return floor


def test_build_share_does_not_fall(outcome: tuple[str, dict[str, object]]) -> None:
    version, summary = outcome
    floor = _floor(version)
    assert summary["libvirt_builds"], "the corpus has no file libvirt builds: wrong corpus?"
    assert summary["build_share"] >= floor["build_share"], (
        f"virtbus builds {summary['build_share']:.4f} of the files libvirt builds; "
        f"the floor is {floor['build_share']}"
    )


def test_device_match_does_not_fall(outcome: tuple[str, dict[str, object]]) -> None:
    version, summary = outcome
    floor = _floor(version)
    assert summary["device_match"] >= floor["device_match"], (
        f"-device multisets match in {summary['device_match']:.4f} of the files both build;"
        f" the floor is {floor['device_match']}"
    )


def test_wrongly_accepted_only_shrinks(outcome: tuple[str, dict[str, object]]) -> None:
    version, summary = outcome
    floor = _floor(version)
    allowed = set(floor["wrongly_accepted"])  # type: ignore[call-overload]
    new = sorted(set(summary["wrongly_accepted"]) - allowed)  # type: ignore[call-overload]
    assert not new, f"virtbus now accepts files libvirt rejects: {new}"


def test_no_crash(outcome: tuple[str, dict[str, object]]) -> None:
    """Every refusal is a virtbus error with a code, never a stray Python exception."""
    _version, summary = outcome
    assert summary["crashes"] == []
