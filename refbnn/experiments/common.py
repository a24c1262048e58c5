"""What the studies share: their data, and running independent trainings in worker processes.

:func:`run_tasks` runs ``run_one(task, context)`` for every task, in this process (``jobs=1``) or in
``jobs`` spawned worker processes, each with ``threads`` Numba threads and single-threaded BLAS
(refbnn splits its GEMMs over Numba's threads). Every worker builds its ``context`` once with
``setup(*setup_args)`` (e.g. loads the data). A run must be a pure function of its task and
context, so the results do not depend on ``jobs``; they are yielded in completion order.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numba
from threadpoolctl import threadpool_limits

from refbnn import cli_util
from refbnn.data import DataError, subset
from refbnn.training.faults import NumericalFault

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


class RunStore:
    """A study's finished runs, one JSON file each: ``<out_dir>/runs/<name>.json`` holding
    ``{"settings": ..., "run": ...}``, written atomically as each run finishes, so a study that is
    interrupted (or extended, e.g. ``--seeds 3`` after ``--seeds 1``) loses only the runs in
    progress. ``load(name, settings)`` returns a stored run only when its settings equal
    ``settings`` (compared after a JSON round trip: everything a run depends on except its own
    name); a missing, unreadable, corrupt or mismatched file gives ``None`` (the run is done again
    and its file replaced)."""

    def __init__(self, out_dir: Path):
        self.dir = Path(out_dir) / "runs"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def load(self, name: str, settings: dict):
        try:
            doc = json.loads(self.path(name).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("settings") != json.loads(json.dumps(settings)) \
                or not isinstance(doc.get("run"), dict):
            return None
        return doc["run"]

    def save(self, name: str, settings: dict, run: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cli_util.write_text_atomic(self.path(name),
                                   json.dumps({"settings": settings, "run": run}, indent=1) + "\n")


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


def run_cli(args, cfg, run_study, report) -> int:
    """A study's command line after its flags are parsed: run ``run_study(cfg, out_dir, data_dir,
    download, jobs=, threads=, log=)`` with ``args.jobs`` workers (default: the core count, 1 with
    ``--quick``) of ``args.threads`` Numba threads and single-threaded BLAS (Numba's thread count is
    restored after), print ``report(results)`` and the total time. Exit status: 0; 2 for bad data or
    an unwritable output (one line); 3 for a numerical fault."""
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else os.cpu_count() or 1)
    numba_threads = numba.get_num_threads()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    with threadpool_limits(1):  # refbnn splits its GEMMs over Numba's threads: BLAS single-threaded
        try:
            results = run_study(cfg, Path(args.out_dir), args.data_dir, not args.no_download,
                                jobs=jobs, threads=args.threads, log=lambda s: print(s, flush=True))
        except (DataError, ValueError, OSError) as e:
            return cli_util.fail(e)
        except NumericalFault as e:
            return cli_util.fail(e, status=3)
        finally:
            numba.set_num_threads(numba_threads)
    print(report(results), end="")
    print(f"total {results['seconds']:.0f} s; outputs in {args.out_dir}")
    return 0


def check_out_dir(parser, args) -> None:
    """Refuse ``--out-dir`` (one line, exit 2) unless a file can be written there (creates it)."""
    try:
        cli_util.check_writable(args.out_dir)
    except OSError as e:
        parser.fail_flag("--out-dir", f"cannot write to {args.out_dir}: {e}")


def add_run_flags(parser, threads_help: str) -> None:
    """The flags every study shares: ``--train-size``, ``--test-size`` (0: all), ``--jobs``,
    ``--threads`` and ``--no-download`` (each with its typed range, refbnn's flag rule)."""
    parser.add_argument("--train-size", type=cli_util.int_in(0, 60_000),
                        help="training images (default 0: all)")
    parser.add_argument("--test-size", type=cli_util.int_in(0, 10_000), help="test images (default 0: all)")
    parser.add_argument("--jobs", type=cli_util.int_in(1, 1024),
                        help="worker processes training at once (default: the core count; 1 with --quick)")
    parser.add_argument("--threads", type=cli_util.threads, default=1, help=threads_help)
    parser.add_argument("--no-download", action="store_true", help="never try to download the data set")


def config_values(defaults, quick: dict, args, keys) -> dict:
    """A study configuration's fields: the dataclass ``defaults``, then ``quick`` with ``--quick``,
    then every flag of ``keys`` that was given (explicit flags override ``--quick``)."""
    values = asdict(defaults)
    if args.quick:
        values.update(quick)
    values.update({k: getattr(args, k) for k in keys if getattr(args, k) is not None})
    return values
