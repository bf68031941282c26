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

``spawn`` never forks a process that runs gRPC's threads (forking those is unsafe); nothing uses ``preexec_fn``.
"""

from __future__ import annotations

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


def executor_pids(executor: Any) -> list[int]:
    """The process ids of a ProcessPoolExecutor's workers (diagnostics and tests)."""
    processes = getattr(executor, "_processes", None) or {}
    return [p.pid for p in processes.values() if p.pid is not None]
