"""The cluster run, CI size (`scripts/cluster.py --small`, kms.dev.cluster): 3 `kms serve` replicas on PostgreSQL
sharing the worker services, 6 stations streaming at once, a replica SIGKILLed mid-stream and restarted, a ceremony
executed by two replicas racing, the bank worker service restarted; every invariant must hold."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kms.dev.cluster import Check, Cluster, Report, Service, ancestors, leftovers, restart

POSTGRES = os.environ.get("KMS_TEST_POSTGRES_URL", "")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cluster.py"
INVARIANTS = ("every card issued exactly once", "none lost", "a redelivered bundle is byte-identical to the first "
              "delivery", "one gap-free audit chain that verifies offline", "checkpoints from several replicas",
              "the raced ceremony executed once", "faults injected mid-stream", "no process left behind",
              "services' logs hold no traceback", "no bundle delivered twice to a station")
#: Above the --small run's own limits (scripts/cluster.py SMALL_SECONDS for the streams, plus set-up and stopping).
TIMEOUT, GRACE = 900, 240


def run_script(args: list[str], sessions: Path) -> tuple[int, str, str, int]:
    """scripts/cluster.py in a session of its own; past TIMEOUT: SIGTERM (it stops what it started and drops its
    schema), GRACE seconds to do so, then every process group of the run SIGKILLed."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--sessions-file", str(sessions)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=GRACE)
        except subprocess.TimeoutExpired:
            for group in {proc.pid, *run_sessions(sessions)}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
            out, err = proc.communicate()
        err += f"\ntests/test_cluster.py: the run took more than {TIMEOUT} s and was stopped"
    return proc.returncode, out, err, proc.pid


def run_sessions(path: Path) -> set[int]:
    try:
        return {int(line.split()[0]) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except OSError:
        return set()


def schemas(url: str, names: set[str], drop: bool = False) -> set[str]:
    """Which of the schemas ``names`` exist (dropped first with ``drop``)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            if drop:
                for name in names:
                    conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
            return {row[0] for row in conn.execute(sa.text("SELECT schema_name FROM information_schema.schemata"))
                    if row[0] in names}
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.service
@pytest.mark.hsm
def test_the_small_cluster_run_keeps_every_invariant(tmp_path: Path) -> None:
    if not POSTGRES:
        pytest.skip("KMS_TEST_POSTGRES_URL is not set: the cluster run needs PostgreSQL")
    run_dir, sessions = tmp_path / "run", tmp_path / "sessions"
    code, out, err, script = run_script(["--small", "--database", POSTGRES, "--run-dir", str(run_dir)], sessions)
    started = run_sessions(sessions) | {script}  # the script's own session: what it started without a new one
    made = set(re.findall(r"\bschema (cluster_[0-9a-f]{10})\b", out))
    left = leftovers(started)
    for _ in range(100):  # what ends after the script (its multiprocessing resource tracker) is given 10 s to end
        if not left:
            break
        time.sleep(0.1)
        left = leftovers(started)
    schemas_left = schemas(POSTGRES, made)
    if left or schemas_left:  # what a broken run left: ended, so that it does not weigh on the tests after this one
        for group in started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        schemas(POSTGRES, made, drop=True)
    report = out[out.find("invariants"):]
    assert code == 0, out[-4000:] + err[-2000:]
    for name in INVARIANTS:
        assert f"] {name}: " in report, name
    assert "[FAILED" not in report and "result: OK" in report
    assert re.search(r"\br[1-3] SIGKILLed mid-stream", out) and "bank worker service stopped mid-run" in out
    assert not run_dir.exists()  # removed after a run that passed
    # 6 services and 6 stations, each in a session of its own; none of them, nor anything they started, still runs
    # (other processes of this pytest, such as the openbao fixture's server, are not the run's)
    assert len(started) >= 13, started
    assert left == []
    assert len(made) == 1 and schemas_left == set(), made  # the run's schema dropped at its end


def test_a_report_fails_on_any_failed_invariant_and_not_on_a_pending_one() -> None:
    report = Report()
    assert not report.ok  # nothing checked is not a pass
    report.add("a", True, "held")
    report.add("b", None, "not measurable here")
    assert report.ok and "[pending] b: not measurable here" in report.text()
    report.checks.append(Check("c", False, "broken"))
    assert not report.ok
    assert report.text().splitlines()[-1] == "result: FAILED (1 ok, 1 pending, 1 failed)"


def test_leftovers_finds_an_orphan_by_its_session_and_never_this_process_or_its_ancestors() -> None:
    # A process that starts a child and exits at once: the child is re-parented (to init or a subreaper), its
    # command line names nothing of the run, and it stays in the session its parent led.
    parent = subprocess.Popen(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    out, _ = parent.communicate(timeout=30)
    orphan = int(out.strip())
    try:
        found = leftovers({parent.pid})
        assert [int(line.split()[0]) for line in found] == [orphan], found
        assert "sleep 60" in found[0]
        mine = ancestors()
        assert os.getpid() in mine and len(mine) >= 2
        own_session = os.getsid(0)
        assert not {int(line.split()[0]) for line in leftovers({own_session})} & mine
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    for _ in range(100):  # killed: gone, or a zombie init has not reaped yet (not a process left running)
        if not leftovers({parent.pid}):
            break
        time.sleep(0.05)
    assert leftovers({parent.pid}) == []


def test_a_fault_thread_does_not_start_a_service_again_once_the_cluster_is_stopping(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, "postgresql+psycopg://unused/none", log=lambda _: None)
    service = Service("replica r1", ["--version"], tmp_path / "r1.log", "kms ", cluster.started)
    cluster.close()  # nothing runs yet; it marks the cluster stopping
    assert cluster.stopping.is_set()
    report = Report()
    assert restart(cluster, service, report) is False
    assert service.starts == 0 and service.proc is None and cluster.sessions == set()
    assert report.events == ["replica r1 not started again: the run is stopping"]


def test_sigterm_takes_the_clean_up_path_of_ctrl_c_in_the_cluster_script() -> None:
    # The script's handler, in a process of its own: a SIGTERM runs the finally blocks (where the run stops its
    # services, kills their groups and drops its schema) and ends with 143; a second one does not cut them short.
    code = ("import importlib.util, os, signal, sys, time\n"
            f"spec = importlib.util.spec_from_file_location('cluster_script', {str(SCRIPT)!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "signal.signal(signal.SIGTERM, module.terminated)\n"
            "try:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); print('not interrupted')\n"
            "finally:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2); print('cleaned up', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 143, done.stderr
    assert done.stdout.splitlines() == ["cleaned up"]
    assert done.stderr.count("cluster: SIGTERM: stopping what the run started") == 1
