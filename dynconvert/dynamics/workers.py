"""Thread discipline: every fit on one thread, independent layers in parallel worker processes.

A layer's fit is a chain of small products and decompositions. A second OpenMP thread barely
helps them when the cores are idle and ruins them when another process holds a core: the
threads spin waiting for each other (``torch.linalg.svdvals`` on 256x2048: 36 ms on one thread,
95 ms on two idle cores; beside one busy-loop process 117 ms and 745 ms). So each fit runs on
one thread, and the cores are used by fitting several layers at once in worker processes
(``--threads N``: N one-thread processes).

Results do not depend on N: a layer's fit is the same computation on one thread whether it runs
here or in a worker, which is what makes the same seed give the same bytes on any thread count.

Workers come from a fork server (``multiprocessing``'s forkserver): a fresh process that imports
torch once and forks a worker per pool slot, which starts in a fraction of a second where a spawned
one would import torch again (15 s for two on this 2-core machine under load). Forking the
converting process itself is not safe: a child of a process whose OpenMP pool has run can hang.
Workers ignore Ctrl-C (it reaches the whole process group; the parent stops them) and exit when the
parent dies, so a killed conversion leaves no process behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import pickle
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from ..errors import DynError
from ..io.allocator import keep_freed_memory

_threads: int | None = None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by OMP_NUM_THREADS when that is set."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        n = min(n, int(omp))
    return max(n, 1)


@contextmanager
def using_threads(n: int | None):
    """Within the block a conversion may use ``n`` threads (``None``: ``available_cores()``).

    Per-layer fits then run in up to ``n`` one-thread worker processes, and torch's own thread
    count (used by the sequential budgeted path) is ``n``. Programs that convert inside this
    block must guard their entry point with ``if __name__ == "__main__":`` (workers import the
    main module, as with any Python process pool that does not fork the caller).
    """
    global _threads
    if n is not None and n < 1:
        raise DynError(f"--threads must be >= 1, got {n}")
    before = _threads, torch.get_num_threads()
    _threads = available_cores() if n is None else n
    torch.set_num_threads(_threads)
    try:
        yield _threads
    finally:
        _threads = before[0]
        torch.set_num_threads(before[1])


def threads() -> int:
    """The count ``using_threads`` set; 1 (no worker processes) outside it."""
    return _threads or 1


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _exit_with(parent) -> None:
    parent.join()  # returns when the parent process is gone
    os._exit(1)


def _init_worker() -> None:
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    parent = mp.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _call(fn: Callable, job: bytes) -> bytes:
    # Jobs and results travel as plain pickles: through the pool's own pickler torch would move
    # every tensor into /dev/shm, which containers often cap at 64 MB.
    return pickle.dumps(fn(pickle.loads(job)))


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the running workers now (a fit can take minutes).
    The executor has no public way to end running tasks before Python 3.14."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def in_order(fn: Callable, jobs: Sequence, workers: int) -> Iterator[Iterator]:
    """``fn(job)`` for every job, yielded in the jobs' order as each becomes ready.

    ``workers`` <= 1 (or a single job): here, on one thread. Otherwise in that many
    one-thread worker processes (``fn`` and the jobs must pickle). Leaving the ``with`` block early (an
    error, Ctrl-C) ends the workers.
    """
    workers = min(workers, len(jobs))
    if workers <= 1:
        with one_thread():
            yield (fn(job) for job in jobs)
        return
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dynconvert.dynamics.conversion"])  # the server imports torch once, before any fork
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker)
    try:
        futures = [pool.submit(_call, fn, pickle.dumps(job)) for job in jobs]
        yield (pickle.loads(_result(f)) for f in futures)
    finally:
        _stop(pool)


class WorkerDied(DynError):
    """A fitting worker process ended without a result (killed, out of memory)."""


def _result(future: cf.Future):
    try:
        return future.result()
    except cf.process.BrokenProcessPool:
        raise WorkerDied("a worker process died while fitting (out of memory?); rerun with --threads 1, which "
                       "fits one layer at a time in this process") from None
