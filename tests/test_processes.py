"""kms.processes: a pool given up without waiting (``retire``) has ended before the interpreter's exit hooks for
process pools run (``settle``), so a failed start prints its one line and nothing after it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers import ROOT

# Python 3.11's exit hook for process pools checks a pool's wakeup pipe, then writes to it; the pool's management
# thread may close the pipe in between. The child widens that window to half a second, so the race is certain
# whenever the management thread of a retired pool is still running when the hook runs.
_CHILD = textwrap.dedent("""
    import concurrent.futures.process as cfp
    import time
    from concurrent.futures import ProcessPoolExecutor

    from kms import processes

    def slow_wakeup(self):
        if not self._closed:
            time.sleep(0.5)
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
