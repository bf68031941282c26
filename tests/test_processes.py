"""kms.processes: a pool given up without waiting (``retire``) has ended before the interpreter's exit hooks for
process pools run (``settle``), so a failed start prints its one line and nothing after it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any, cast

import pytest
from helpers import ROOT

from kms import processes

# Python 3.11's exit hook for process pools checks a pool's wakeup pipe, then writes to it; the pool's management
# thread may close the pipe in between. The child widens that window to two seconds (the management thread closes
# the pipe within it even on a loaded machine), so the race is certain whenever the management thread of a retired
# pool is still running when the hook runs.
_CHILD = textwrap.dedent("""
    import concurrent.futures.process as cfp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from kms import processes

    def slow_wakeup(self):
        if not self._closed:
            time.sleep(2.0)
            self._writer.send_bytes(b"")

    cfp._ThreadWakeup.wakeup = slow_wakeup
    executor = ProcessPoolExecutor(1, mp_context=processes.context())
    executor.submit(int).result()
    processes.{retire}(executor)
    print("exiting", flush=True)
""")


def _run_child(source: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_retired_pool_has_ended_before_the_exit_hooks_run() -> None:
    done = _run_child(_CHILD.format(retire="retire"))
    assert done.returncode == 0 and done.stdout == "exiting\n", done
    assert done.stderr == "", done.stderr


def test_without_settle_the_exit_hook_races_the_pool() -> None:
    """The same child with a plain shutdown(wait=False) (the code before retire/settle): the race shows, so the
    test above can fail."""
    child = _CHILD.replace("processes.{retire}(executor)", "executor.shutdown(wait=False, cancel_futures=True)")
    done = _run_child(child)
    assert "Bad file descriptor" in done.stderr or "handle is closed" in done.stderr, done.stderr


class _StuckPool:
    """Fault injection: a retired pool whose management thread never ends until its processes are killed; each
    join advances the test's clock by the time it was given."""

    def __init__(self, clock: list[float]) -> None:
        self.clock, self.killed = clock, False

    def join(self, timeout: float) -> None:
        if self.is_alive():  # an ended thread's join returns at once
            self.clock[0] += timeout

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        self.killed = True


def test_settle_is_bounded_by_one_deadline_for_all_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five stuck pools: settle waits at most its timeout in all, kills every process, and gives the grace once (not
    10 s + 5 s per pool)."""
    clock = [0.0]
    pools = [_StuckPool(clock) for _ in range(5)]
    monkeypatch.setattr(processes.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(processes, "_retired", [(cast(Any, pool), [cast(Any, pool)]) for pool in pools])
    processes.settle(timeout=10.0)
    assert all(pool.killed for pool in pools)
    assert clock[0] == 10.0  # the killed pools end at once: no grace used
    stuck = [_StuckPool(clock) for _ in range(3)]
    for pool in stuck:
        pool.kill = lambda: None  # type: ignore[method-assign]  # processes that outlive SIGKILL (never, but bounded)
    clock[0] = 0.0
    monkeypatch.setattr(processes, "_retired", [(cast(Any, pool), [cast(Any, pool)]) for pool in stuck])
    processes.settle(timeout=10.0)
    assert clock[0] == 10.0 + processes.KILL_GRACE
