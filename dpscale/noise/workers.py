"""A small pool of daemon threads that the host generator spreads one noise request over.

Why threads help here: nearly all of a request's time is spent in OpenSSL's ChaCha20 and in numpy's
whole-array passes, and both release the GIL while they run (measured: a spinning Python thread
keeps running beside either), so disjoint spans of one request drawn on several threads run on
several cores. The values do not move: the host generator's value at an element depends on (key,
step, name, element index) only, never on where a request or a span starts (tests/test_noise.py
checks every partition), so spans drawn by different threads join into exactly the one-thread
result.

No state is global: a pool belongs to the object that made it (an engine's ``NoiseAhead``, a
benchmark), its threads hold only their queue, and it stops when closed or garbage-collected.
``threads=1`` starts no thread at all (the caller does the work, as before the pool existed).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Sequence

from dpscale.errors import ConfigError

__all__ = ["NoiseWorkers"]


class NoiseWorkers:
    """``threads`` threads of noise work: ``threads - 1`` daemon threads started on first use, and
    the caller of ``run``."""

    def __init__(self, threads: int = 1) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"noise threads must be an int >= 1, got {threads!r}.")
        self.threads = threads
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._started: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop, self._tasks, self._started)

    def run(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run every task, the first on the calling thread and the others on the pool, and return
        when all are done; the first exception raised by a task is raised here."""
        if not tasks:
            return
        if len(tasks) == 1 or self.threads == 1 or not self._finalizer.alive:
            for task in tasks:
                task()
            return
        self._start()
        done = threading.Semaphore(0)
        errors: list[BaseException] = []
        for task in tasks[1:]:
            self._tasks.put((task, done, errors))
        try:
            tasks[0]()
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the others finish
            errors.insert(0, error)
        for _ in tasks[1:]:
            done.acquire()
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Stop the threads (idempotent); ``run`` then works on the calling thread alone."""
        self._finalizer()

    @property
    def alive_threads(self) -> int:
        return sum(t.is_alive() for t in self._started)

    def _start(self) -> None:
        with self._lock:
            while len(self._started) < self.threads - 1:
                thread = threading.Thread(target=_serve, args=(self._tasks,), daemon=True,
                                          name=f"dpscale-noise-{len(self._started)}")
                thread.start()
                self._started.append(thread)


def _serve(tasks: queue.SimpleQueue) -> None:
    while True:
        item = tasks.get()
        if item is None:
            return
        task, done, errors = item
        try:
            task()
        except BaseException as error:  # noqa: BLE001 - handed to the caller of run()
            errors.append(error)
        finally:
            done.release()


def _stop(tasks: queue.SimpleQueue, started: list[threading.Thread]) -> None:
    for _ in started:
        tasks.put(None)
