"""What the studies share: their data, and running independent trainings in worker processes.

:func:`run_tasks` runs ``run_one(task, context)`` for every task, in this process (``jobs=1``) or in
``jobs`` spawned worker processes, each with ``threads`` Numba threads and single-threaded BLAS
(refbnn splits its GEMMs over Numba's threads). Every worker builds its ``context`` once with
``setup(*setup_args)`` (e.g. loads the data). A run must be a pure function of its task and
context, so the results do not depend on ``jobs``; they are yielded in completion order.
"""

from __future__ import annotations

import functools
import multiprocessing
import platform

import numba
from threadpoolctl import threadpool_limits

from refbnn import cli_util
from refbnn.data import subset

_CONTEXT: dict = {}


def _init_worker(setup, setup_args, threads: int) -> None:
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(1)
    _CONTEXT.clear()
    _CONTEXT.update(setup(*setup_args))


def _call(run_one, task):
    return run_one(task, _CONTEXT)


def run_tasks(tasks, run_one, setup, setup_args=(), jobs: int = 1, threads: int = 1, context=None):
    """Yield ``run_one(task, context)`` for each of ``tasks`` (module docstring). ``run_one`` and
    ``setup`` must be module-level functions (the workers import them by name). ``context``: the
    in-process context (``jobs=1``), instead of calling ``setup`` here."""
    tasks = list(tasks)
    if jobs == 1 or len(tasks) <= 1:
        ctx = context if context is not None else setup(*setup_args)
        for task in tasks:
            yield run_one(task, ctx)
        return
    pool_ctx = multiprocessing.get_context("spawn")
    with pool_ctx.Pool(min(jobs, len(tasks)), initializer=_init_worker,
                       initargs=(setup, setup_args, threads)) as pool:
        yield from pool.imap_unordered(functools.partial(_call, run_one), tasks)


def load_splits(dataset: str, data_dir, download: bool, train_size: int = 0, test_size: int = 0):
    """``(train, test)`` of ``dataset`` (:func:`refbnn.cli_util.load_split`'s lookup); a non-zero
    ``train_size`` / ``test_size`` keeps that many images drawn with seed 1234 (in their original
    order). ``ValueError`` naming the flag when a size exceeds its split."""
    train, _ = cli_util.load_split(dataset, "train", data_dir, download)
    test, _ = cli_util.load_split(dataset, "test", data_dir, download)
    for flag, n, ds in (("--train-size", train_size, train), ("--test-size", test_size, test)):
        if n > len(ds):
            raise ValueError(f"{flag} {n} exceeds the {len(ds)} images of the {ds.name} {ds.split} split")
    if train_size:
        train = subset(train, train_size, seed=1234)
    if test_size:
        test = subset(test, test_size, seed=1234)
    return train, test


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`), for the records."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
