"""Child processes for calls that hold the GIL long enough to stall this process.

The embedded engine holds the GIL while it creates a shard, and the built-in embedder holds it
while it hashes a batch of texts: run in a thread, either one stops the event loop (kopf's
handlers, the lease keeper, the other products' writes) for as long as it runs. In a child
process they use the machine's other core instead.

Children are started with ``spawn``, never ``fork`` (this process runs threads: kopf's, the
engine's, onnxruntime's). ``spawn`` imports the main module again, so a script that uses them
needs the usual ``if __name__ == "__main__":`` guard. A child exits as soon as the process that
started it is gone, kill -9 included, and when its pool has had no call for a while: each child holds
an interpreter and the modules its calls need (about 25-35 MiB), which an operator at rest need not
keep. What a child runs should live in a module that imports little (``edge_builder``, ``ngram``),
and the program's main script must import little at its top (``datamesh.__main__``): a child imports
both again.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")

# A pool's queues hold semaphores that multiprocessing's resource tracker (a process of its own)
# frees if this process exits without closing them: kill -9, or the election's exit when the
# operator does not stop in time. Freeing them is right; the tracker also warns about each on stderr,
# which put a "leaked semaphore objects" line in the log of every such exit. The tracker takes its
# warning filters from this process' -W options when it starts.
_QUIET_TRACKER = "ignore:resource_tracker:UserWarning"


IDLE_SECONDS = 60.0


class ChildProcesses:
    """A pool of child processes, started on first use, replaced when one of them dies, and stopped after
    ``idle_seconds`` without a call (the next call starts it again).
    """

    def __init__(self, workers: int, idle_seconds: float = IDLE_SECONDS) -> None:
        self.workers = workers
        self.idle_seconds = idle_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # stores and embedders of several threads share one pool
        self._running = 0  # calls in the pool now
        self._last_call = 0.0  # monotonic time the last call began or ended

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        """``call(*args)`` in a child; once more in a new one when the first died (killed, out of memory).

        Raises ``BrokenProcessPool`` when the second child died too.
        """
        try:
            return await self._once(call, *args)
        except BrokenProcessPool:  # killed, out of memory: once more, in a new process
            return await self._once(call, *args)

    def pids(self) -> list[int]:
        """The process ids of its live children (none before the first call)."""
        with self._lock:
            pool = self._pool
        processes = getattr(pool, "_processes", None) or {}  # the executor keeps no public list
        return [pid for pid, process in list(processes.items()) if process.is_alive()]

    async def _once(self, call: Callable[..., T], *args: Any) -> T:
        pool = self._begin()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, call, *args)
        except BrokenProcessPool:
            self._retire(pool)
            raise
        finally:
            with self._lock:
                self._running -= 1
                self._last_call = time.monotonic()

    def _begin(self) -> ProcessPoolExecutor:
        """The pool, started if there is none, with one more call counted in it."""
        with self._lock:
            self._running += 1
            self._last_call = time.monotonic()
            if self._pool is None:
                if _QUIET_TRACKER not in sys.warnoptions:
                    sys.warnoptions.append(_QUIET_TRACKER)
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_exit_with_parent)
                threading.Thread(
                    target=self._stop_when_idle, args=(self._pool,), name="idle-children", daemon=True
                ).start()
            return self._pool

    def _stop_when_idle(self, pool: ProcessPoolExecutor) -> None:
        """Shut ``pool`` down once it has had no call for ``idle_seconds`` (a thread of its own, one per pool)."""
        while True:
            with self._lock:
                if self._pool is not pool:  # retired (a child died) and perhaps replaced: not this thread's
                    return
                quiet = time.monotonic() - self._last_call
                if self._running == 0 and quiet >= self.idle_seconds:
                    self._pool = None
                    break
                wait = self.idle_seconds - quiet if self._running == 0 else self.idle_seconds
            time.sleep(max(wait, 0.01))
        pool.shutdown(wait=False)

    def _retire(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:  # not one that replaced it meanwhile
                self._pool = None
        pool.shutdown(wait=False)


def _exit_with_parent() -> None:
    """A child's start: it exits as soon as the process that started it is gone, kill -9 included."""
    # Ctrl-C reaches the whole process group: the parent decides what it means, and the child goes with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_ready, args=(parent.sentinel,), daemon=True).start()


def _exit_when_ready(sentinel: int) -> None:
    # Without this an orphaned child lives on, holding the dead process's stdout and stderr open.
    multiprocessing.connection.wait([sentinel])
    os._exit(0)
