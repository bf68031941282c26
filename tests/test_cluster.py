"""The cluster run, CI size (`scripts/cluster.py --small`, kms.dev.cluster): 3 `kms serve` replicas on PostgreSQL
sharing the worker services, 6 stations streaming at once, a replica SIGKILLed mid-stream and restarted, a ceremony
executed by two replicas racing, the bank worker service restarted; every invariant must hold."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kms.dev.cluster import Check, Report, leftovers

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL", "")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.py"
INVARIANTS = ("every card issued exactly once", "none lost", "a redelivered bundle is byte-identical to the first "
              "delivery", "one gap-free audit chain that verifies offline", "checkpoints from several replicas",
              "the raced ceremony executed once", "faults injected mid-stream", "no process left behind",
              "services' logs hold no traceback")


@pytest.mark.postgres
@pytest.mark.service
@pytest.mark.hsm
def test_the_small_cluster_run_keeps_every_invariant(tmp_path: Path) -> None:
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set: the cluster run needs PostgreSQL")
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--database", POSTGRES, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, check=False)
    report = done.stdout[done.stdout.find("invariants"):]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in INVARIANTS:
        assert f"] {name}: " in report, name
    assert "[FAILED" not in report and "result: OK" in report
    assert "r1 SIGKILLed mid-stream" in done.stdout and "bank worker service stopped mid-run" in done.stdout
    assert not run_dir.exists()  # removed after a run that passed
    assert leftovers([tmp_path]) == []


def test_a_report_fails_on_any_failed_invariant_and_not_on_a_pending_one() -> None:
    report = Report()
    assert not report.ok  # nothing checked is not a pass
    report.add("a", True, "held")
    report.add("b", None, "not measurable here")
    assert report.ok and "[pending] b: not measurable here" in report.text()
    report.checks.append(Check("c", False, "broken"))
    assert not report.ok
    assert report.text().splitlines()[-1] == "result: FAILED (1 ok, 1 pending, 1 failed)"
