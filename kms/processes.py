"""Child processes that end with their parent: the domain workers (kms.issuance.workers) and the audit signer
(kms.audit.signer) are logged into tokens, so none may outlive ``kms serve``, even when it is killed with SIGKILL.

Two pieces:

- ``context()``: the ``spawn`` multiprocessing context for ProcessPoolExecutor, except that every process is started
  from one long-lived thread of this module. Linux sends the parent-death signal when the *thread* that created a
  child ends, not the process; pools start processes on demand from whichever thread submits (a gRPC handler, the
  health monitor), so without this a child could be killed when that thread ends.
- ``end_with_parent()``: called first in each child's initializer; asks the kernel for SIGKILL when the parent dies
  (``prctl(PR_SET_PDEATHSIG)``), then checks ``os.getppid()`` in case the parent died before that (the race), and
  exits at once if so. Where prctl is not available, a thread polls ``os.getppid()`` instead.
- ``retire(executor)`` / ``settle()``: a pool given up without waiting (a refused PIN, a broken or recycled pool)
  still ends in the background, in its management thread. ``settle`` waits for those ends (killing processes that
  do not end in time) as the process exits, before the pools' own exit hook: Python 3.11's hook writes to a pool's
  wakeup pipe while that thread may be closing it, which printed "Exception ignored ... Bad file descriptor" after
  the one line of a failed start.

``spawn`` never forks a process that runs gRPC's threads (forking those is unsafe); nothing uses ``preexec_fn``.
"""

from __future__ import annotations

import atexit
import concurrent.futures.process  # noqa: F401  (its exit hook registers first; see settle)
import contextlib
import ctypes
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
_requests: queue.SimpleQueue[tuple[Callable[[], None], threading.Event, list[BaseException]]] = queue.SimpleQueue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _serve_spawns() -> None:
    while True:
        start, done, failure = _requests.get()
        try:
            start()
        except BaseException as error:  # handed back to the thread that asked
            failure.append(error)
        finally:
            done.set()


def _in_spawner(start: Callable[[], None]) -> None:
    """Run ``start`` (which creates a process) in the one spawner thread, and wait for it."""
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_serve_spawns, name="kms-process-spawner", daemon=True)
            _spawner.start()
    if threading.current_thread() is _spawner:
        start()
        return
    done, failure = threading.Event(), list[BaseException]()
    _requests.put((start, done, failure))
    done.wait()
    if failure:
        raise failure[0]


class _Process(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        _in_spawner(super().start)


class _Context(multiprocessing.context.SpawnContext):
    Process = _Process


_CONTEXT = _Context()


def context() -> multiprocessing.context.SpawnContext:
    """The multiprocessing context for kms's process pools: ``spawn``, started from one long-lived thread."""
    return _CONTEXT


def end_with_parent() -> None:
    """In a child process: die with the parent (see the module's docstring). Call it first in an initializer."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    expected = parent.pid
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != expected:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(expected,), name="kms-parent-watch", daemon=True).start()


def _watch_parent(expected: int) -> None:
    while True:
        threading.Event().wait(1.0)
        if os.getppid() != expected:
            os._exit(1)


def alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_retired: list[tuple[threading.Thread, list[multiprocessing.process.BaseProcess]]] = []
_retired_lock = threading.Lock()


def retire(executor: Any, *, cancel: bool = True) -> None:
    """``executor.shutdown(wait=False)`` (``cancel``: its queued work too), remembered for ``settle``."""
    thread = getattr(executor, "_executor_manager_thread", None)
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=cancel)
    if thread is not None:
        with _retired_lock:
            _retired[:] = [entry for entry in _retired if entry[0].is_alive()]
            _retired.append((thread, processes))


#: After ``settle``'s deadline: how long the killed pools' management threads get, together, to see their processes end.
KILL_GRACE = 5.0


def settle(timeout: float = 10.0) -> None:
    """Wait until every retired pool has ended, all of them within ``timeout`` seconds in total; then kill the
    processes of those still running and give their management threads KILL_GRACE seconds, again in total. However
    many pools were retired, it returns within ``timeout + KILL_GRACE`` seconds (a stop stays bounded)."""
    with _retired_lock:
        retired, _retired[:] = list(_retired), []
    deadline = time.monotonic() + timeout
    for thread, _ in retired:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = [(thread, processes) for thread, processes in retired if thread.is_alive()]
    for _, processes in late:
        for process in processes:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                process.kill()
    grace = time.monotonic() + KILL_GRACE
    for thread, _ in late:
        thread.join(max(0.0, grace - time.monotonic()))


# Run ``settle`` at exit before the process pools' own exit hook (threading runs these hooks last registered first;
# importing concurrent.futures.process above registered that one already).
getattr(threading, "_register_atexit", atexit.register)(settle)


def executor_pids(executor: Any) -> list[int]:
    """The process ids of a ProcessPoolExecutor's workers (diagnostics and tests)."""
    processes = getattr(executor, "_processes", None) or {}
    return [p.pid for p in processes.values() if p.pid is not None]
