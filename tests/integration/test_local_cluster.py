"""deploy/local-cluster: start -> a live migration through the CLI -> stop, nothing left.

It runs in a RabbitMQ vhost of its own with unique host names, so other agents and
schedulers on the broker never interfere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "local-cluster"
XML = ROOT / "deploy" / "examples" / "minimal.xml"

pytestmark = pytest.mark.rabbitmq


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_migrate_stop_leaves_no_process(rabbitmq: None, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    vhost = f"virtbus-lc-{tag}"
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    hosts = (f"lc-a-{tag}", f"lc-b-{tag}")
    run_dir = tmp_path / "lc"
    env = {
        **os.environ,
        "VIRTBUS_LOCAL_CLUSTER_DIR": str(run_dir),
        "VIRTBUS_BUS_URL": url,
        "VIRTBUS_LOCAL_CLUSTER_HOSTS": " ".join(hosts),
        "VIRTBUS_LOCAL_CLUSTER_DRIVER": "test",
        "VIRTBUS_BIN": str(Path(sys.executable).parent),
    }
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    pids: list[int] = []
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip

        def sh(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(args), env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip

        started = sh(str(SCRIPT), "start")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "2 of 2 hosts seen" in started.stdout
        pids = [int((run_dir / f"{n}.pid").read_text()) for n in (*hosts, "scheduler")]
        assert all(_alive(p) for p in pids)
        status = sh(str(SCRIPT), "status")
        assert status.returncode == 0 and hosts[0] in status.stdout

        cli = [str(Path(sys.executable).parent / "virtbus")]
        for args in (["define", str(XML), "--host", hosts[0]], ["start", "minimal"],
                     ["migrate", "minimal", "--to", hosts[1], "--wait"]):  # fmt: skip
            r = sh(*cli, *args)
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        r = sh(*cli, "--json", "list", "--host", hosts[1])
        assert [d["name"] for d in __import__("json").loads(r.stdout)] == ["minimal"]

        stopped = sh(str(SCRIPT), "stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "destroyed guest" in stopped.stdout
        assert not any(_alive(p) for p in pids)
        assert not list(run_dir.glob("*.pid"))
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)
        subprocess.run([*ctl, "delete_vhost", vhost], capture_output=True, timeout=60)
