"""The bus-less security verbs as users run them: ``virtbus acl check`` and ``virtbus pki``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

POLICY = """
[users]
vera = ["viewer"]
olga = ["operator"]

[[rules]]
user = "oscar"
ops = ["@lifecycle"]
targets = ["web-*"]
"""


def virtbus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtbus.cli.main", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_acl_check_explains_allow_and_deny_with_exit_status(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    ok = virtbus(
        "--json", "acl", "check", "oscar", "domain.start", "web-1", "--policy", str(policy)
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rule"].startswith("allow user:oscar ops=@lifecycle")
    no = virtbus("acl", "check", "oscar", "domain.start", "db-1", "--policy", str(policy))
    assert no.returncode == 2 and "Decision: denied" in no.stdout and "db-1" in no.stdout
    viewer = virtbus("acl", "check", "vera", "migration.perform", "x", "--policy", str(policy))
    assert viewer.returncode == 2 and "scheduler role" in viewer.stdout
    bad = virtbus("acl", "check", "oscar", "domain.nope", "--policy", str(policy))
    assert bad.returncode == 1 and "NO_SUPPORT" in bad.stderr


def test_acl_check_explains_the_owner_rules_for_pools_volumes_and_networks(
    tmp_path: Path,
) -> None:
    """The built-in operator removes only what it owns: acl check names the target's kind
    and the owner it was asked about, and a denial says whose the object is."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)

    def check(op: str, target: str, owner: str) -> subprocess.CompletedProcess[str]:
        return virtbus(
            "acl", "check", "olga", op, target, "--owner", owner, "--policy", str(policy)
        )

    cases = [
        ("storage.pool.undefine", "p1", "self", 0),
        ("storage.pool.undefine", "p1", "other", 2),
        ("storage.pool.undefine", "p1", "unknown", 2),  # nobody's: not removable
        ("storage.pool.set_autostart", "p1", "unknown", 0),  # ... but configurable
        ("storage.vol.delete", "p1/v1", "self", 0),
        ("storage.vol.delete", "p1/v1", "other", 2),
        ("network.undefine", "n1", "self", 0),
        ("network.undefine", "n1", "other", 2),
    ]
    got = [(op, t, o, check(op, t, o).returncode) for op, t, o, _ in cases]
    assert got == cases
    denied = check("storage.vol.delete", "p1/v1", "other").stdout
    assert "Target:   volume p1/v1 (owner: other)" in denied
    assert "for volume 'p1/v1' (owned by another user)" in denied
    shown = json.loads(virtbus("--json", "acl", "check", "olga", "network.undefine", "n1",
                               "--owner", "self", "--policy", str(policy)).stdout)  # fmt: skip
    assert (shown["kind"], shown["owner"], shown["allowed"]) == ("network", "self", True)


def test_pki_init_and_issue_a_host_and_a_user_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "pki"
    assert virtbus("pki", "init", "--dir", str(ca)).returncode == 0
    again = virtbus("pki", "init", "--dir", str(ca))
    assert again.returncode == 1 and "OPERATION_INVALID" in again.stderr
    host = virtbus("--json", "pki", "issue", "host", "node1", "--dir", str(ca))
    assert host.returncode == 0, host.stderr
    cert = x509.load_pem_x509_certificate(Path(json.loads(host.stdout)["cert"]).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "node1"
    assert (Path(json.loads(host.stdout)["key"]).stat().st_mode & 0o777) == 0o600
    user = virtbus("pki", "issue", "user", "oscar", "--role", "operator", "--dir", str(ca))
    assert user.returncode == 0 and 'oscar = ["operator"]' in user.stdout
    bad = virtbus("pki", "issue", "host", "no such", "--dir", str(ca))
    assert bad.returncode == 1 and "INVALID_ARG" in bad.stderr


def test_pki_issue_host_lays_out_a_qemu_tls_directory(tmp_path: Path) -> None:
    """``--qemu-dir``: the migrate --tls layout (the qemu driver's migrate_tls_x509_cert_dir);
    only for host certificates, refused before anything is issued otherwise."""
    ca, qdir = tmp_path / "pki", tmp_path / "qemu"
    assert virtbus("pki", "init", "--dir", str(ca)).returncode == 0
    got = virtbus("--json", "pki", "issue", "host", "node1", "--dir", str(ca),
                  "--qemu-dir", str(qdir))  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["qemu_dir"] == str(qdir)
    assert sorted(p.name for p in qdir.iterdir()) == [
        "ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem", "server-key.pem",
    ]  # fmt: skip
    shown = virtbus("pki", "issue", "host", "node2", "--dir", str(ca), "--qemu-dir",
                    str(tmp_path / "q2"))  # fmt: skip
    assert shown.returncode == 0 and "QEMU TLS dir" in shown.stdout
    user = virtbus("pki", "issue", "user", "oscar", "--dir", str(ca), "--qemu-dir", str(qdir))
    assert user.returncode == 1 and "INVALID_ARG" in user.stderr and "host" in user.stderr
    assert not (ca / "users" / "oscar.crt").exists()


def test_cli_spellings_match_the_security_types() -> None:
    """The CLI spells pki kinds and policy owners itself (no heavy import at parse time)."""
    from virtbus.cli.acl import OWNERS
    from virtbus.cli.pki import KINDS
    from virtbus.security.pki import Kind
    from virtbus.security.policy import Owner

    assert tuple(k.value for k in Kind) == KINDS
    assert set(OWNERS) == {o.value for o in Owner}
