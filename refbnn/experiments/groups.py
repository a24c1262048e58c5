"""``python -m refbnn.experiments.groups``: FTBNN's Figure 5 at small scale (group execution).

The derived models ``ftbnn18_g{1,2,4}`` and ``ftbnn34_g{1,2,4}`` at the data set's 28x28 input,
with the stage widths ``w, 2w, 4w, 8w`` (bridge ``w``) of each model solved with refbnn's budget
counter (:mod:`refbnn.models.budget`) so that every model of one depth costs the same OPs at that
input: ``--budget18`` and ``--budget34`` million OPs (default 0.35 and 0.50, near the paper's
ratio 135M / 90M = 1.5, where the width steps match all three 34-layer models within 3%:
docs/groups.md). All are trained with one recipe (:class:`~refbnn.training.recipe.Recipe`'s
defaults, ``--epochs`` epochs) by :func:`refbnn.training.fit.fit`, and tested after every epoch.

The same seed gives every model the same batch order and augmentation draws (``fit``'s seed) and
reseeds the initialiser (``models.build(seed=...)``), so differences can be paired by seed
(:mod:`refbnn.experiments.stats`).

Writes into ``--out-dir`` (default ``runs/groups``, checked before anything else): ``results.json``,
``results.md`` (widths, OPs, parameters, final test accuracy, time; paired differences between
group settings when there are 2 or more seeds) and ``curves.png`` (test accuracy per epoch, one
panel per depth, like Figure 5), and each run as it finishes under ``runs/`` (``--resume`` reuses
those whose settings match: an interrupted study, or ``--seeds 3`` after ``--seeds 1``, trains
only what is missing). Exit status: 0 done, 2 bad arguments or data, 3 a loss became
NaN/inf.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from refbnn import cli_util, models
from refbnn.cli_util import ArgumentParser, write_text_atomic
from refbnn.experiments import stats
from refbnn.experiments.common import (
    RunStore,
    add_run_flags,
    check_out_dir,
    config_values,
    cpu_name,
    load_splits,
    run_cli,
    run_tasks,
)
from refbnn.models.budget import count
from refbnn.plot import line_panels
from refbnn.training.fit import fit
from refbnn.training.recipe import Recipe

DEPTHS = (18, 34)
GROUPS = (1, 2, 4)
DATASETS = ("fashion-mnist", "mnist")
#: the paper's budgets at 224x224: about 90M OPs (Layer = 18) and 135M OPs (Layer = 34)
PAPER_BUDGET = {18: 90e6, 34: 135e6}
MAX_WIDTH = 1024
DEFAULT_OUT_DIR = "runs/groups"


@dataclass
class StudyConfig:
    """Everything the study depends on (stored in ``results.json``)."""

    dataset: str = "fashion-mnist"
    seeds: int = 1               # runs per model, seeds 0 .. seeds-1
    epochs: int = 4              # Recipe's defaults otherwise (Adam 3e-3, cosine, batch 128, shifts 2)
    train_size: int = 0          # training images (0: all)
    test_size: int = 0           # test images (0: all)
    budget18: float = 0.35       # million OPs per 28x28 image, Layer = 18
    budget34: float = 0.50       # million OPs, Layer = 34 (1.43x; the paper: 135M / 90M = 1.5x)
    stem_pool: bool = True       # the derived models' stem max-pool (stages at 14/7/4/2 pixels)
    depths: list = field(default_factory=lambda: list(DEPTHS))
    groups: list = field(default_factory=lambda: list(GROUPS))


QUICK = {"seeds": 1, "epochs": 2, "train_size": 256, "test_size": 128, "budget18": 0.24,
         "budget34": 0.25}


# --- the models: widths solved for one budget per depth -----------------------------------------
def overrides(cfg: StudyConfig, width: int, input_shape, num_classes: int) -> dict:
    """The preset overrides of a derived model with stage-1 width ``width``."""
    return {"input_shape": list(input_shape), "num_classes": num_classes, "stem_pool": cfg.stem_pool,
            "widths": [width, 2 * width, 4 * width, 8 * width], "bridge_channels": width}


def model_budget(depth: int, groups: int, width: int, cfg: StudyConfig, input_shape, num_classes):
    """:class:`~refbnn.models.budget.Budget` of ``ftbnn{depth}_g{groups}`` at stage-1 ``width``."""
    model = models.build(f"ftbnn{depth}_g{groups}", **overrides(cfg, width, input_shape, num_classes))
    return count(model)


def solve_width(depth: int, groups: int, target_ops: float, cfg: StudyConfig, input_shape,
                num_classes: int) -> tuple[int, object]:
    """``(width, budget)``: the stage-1 width, a multiple of ``max(2, groups)`` (the reduction
    blocks have ``max(2, groups)`` groups), whose OPs are nearest ``target_ops`` (the smaller
    width on a tie). OPs grow with the width, so a doubling search brackets the target and a
    bisection over the multiples finds it."""
    unit = max(2, groups)
    cache = {}

    def ops(k):  # OPs at width k * unit
        if k not in cache:
            cache[k] = model_budget(depth, groups, k * unit, cfg, input_shape, num_classes)
        return cache[k].ops

    hi = 1
    while ops(hi) < target_ops and hi * unit * 2 <= MAX_WIDTH:
        hi *= 2
    lo = max(1, hi // 2)
    if ops(lo) >= target_ops:  # even the narrowest reaches the target
        hi = lo
    while hi - lo > 1:  # ops(lo) < target <= ops(hi)
        mid = (lo + hi) // 2
        if ops(mid) < target_ops:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: (abs(ops(k) - target_ops), k))
    return best * unit, cache[best]


def plan(cfg: StudyConfig, input_shape, num_classes: int) -> list[dict]:
    """One entry per (depth, groups): name, widths, and the budget (OPs, FLOPs, BOPs, params)."""
    entries = []
    for depth in cfg.depths:
        target = 1e6 * (cfg.budget18 if depth == 18 else cfg.budget34)
        for g in cfg.groups:
            width, b = solve_width(depth, g, target, cfg, input_shape, num_classes)
            entries.append({"depth": depth, "groups": g, "name": f"ftbnn{depth}_g{g}",
                            "widths": [width, 2 * width, 4 * width, 8 * width],
                            "target_ops": target, "ops": b.ops, "flops": b.flops, "bops": b.bops,
                            "params": b.params})
    return entries


def format_plan(entries: list) -> str:
    lines = []
    for e in entries:
        lines.append(f"Layer={e['depth']} Group={e['groups']}: widths {'/'.join(map(str, e['widths']))}, "
                     f"{e['ops'] / 1e6:.4f} M OPs (target {e['target_ops'] / 1e6:.4f}; FLOPs "
                     f"{e['flops'] / 1e6:.3f} M, BOPs {e['bops'] / 1e6:.2f} M), "
                     f"{e['params'] / 1e6:.3f} M parameters")
    return "\n".join(lines)


# --- one run, the study --------------------------------------------------------------------------
def train_run(task, ctx) -> dict:
    """Train one model for one seed (no files); returns its per-epoch history and timings."""
    entry, seed = task
    cfg, train, test = ctx["cfg"], ctx["train"], ctx["test"]
    t0 = time.perf_counter()
    input_shape = [1, *train.images.shape[1:]]
    model = models.build(entry["name"], seed=seed,
                         **overrides(cfg, entry["widths"][0], input_shape, len(train.class_names)))
    result = fit(model, Recipe(epochs=cfg.epochs), train, test, seed=seed, handle_sigint=False)
    history = result.history
    train_seconds = sum(r["train_seconds"] for r in history)
    return {"depth": entry["depth"], "groups": entry["groups"], "seed": seed,
            "accuracy": history[-1]["test_accuracy"],
            "test_accuracy": [r["test_accuracy"] for r in history],
            "train_accuracy": [r["train_accuracy"] for r in history],
            "train_loss": [r["train_loss"] for r in history],
            "train_seconds": train_seconds, "eval_seconds": sum(r["eval_seconds"] for r in history),
            "images_per_second": len(train) * len(history) / max(train_seconds, 1e-9),
            "seconds": time.perf_counter() - t0}


def _setup(cfg: StudyConfig, data_dir) -> dict:
    train, test = load_splits(cfg.dataset, data_dir, False, cfg.train_size, cfg.test_size)
    return {"cfg": cfg, "train": train, "test": test}


def summarize(entries: list, runs: list) -> list:
    """``entries`` (from :func:`plan`) with their runs' results: per seed, mean and std."""
    out = []
    for e in entries:
        mine = sorted((r for r in runs if (r["depth"], r["groups"]) == (e["depth"], e["groups"])),
                      key=lambda r: r["seed"])
        s = dict(e)
        s["seeds"] = [r["seed"] for r in mine]
        s["accuracy"] = [r["accuracy"] for r in mine]
        s["accuracy_mean"], s["accuracy_std"] = stats.mean_std(s["accuracy"])
        s["curve"] = [float(v) for v in np.mean([r["test_accuracy"] for r in mine], axis=0)]
        for key in ("test_accuracy", "train_accuracy", "train_loss"):
            s[f"{key}_per_seed"] = [r[key] for r in mine]
        for key in ("train_seconds", "eval_seconds", "images_per_second"):
            s[key] = [round(r[key], 1) for r in mine]
        out.append(s)
    return out


def compare(summary: list, cfg: StudyConfig) -> list:
    """Paired by seed, in accuracy points: every group setting against Group=1 within a depth, and,
    with both depths, the interaction ``(G - 1 at Layer=34) - (G - 1 at Layer=18)`` (does group
    execution help the deeper network more?)."""
    acc = {(s["depth"], s["groups"]): dict(zip(s["seeds"], (100 * a for a in s["accuracy"])))
           for s in summary}
    out = []
    base = min(cfg.groups)
    for depth in cfg.depths:
        for g in cfg.groups:
            if g != base:
                out.append(stats.paired(f"Layer={depth}: Group={g}", acc[depth, g],
                                        f"Group={base}", acc[depth, base]))
    if len(cfg.depths) == 2:
        for g in cfg.groups:
            if g == base:
                continue
            gains = {d: {s: acc[d, g][s] - acc[d, base][s] for s in acc[d, g]} for d in cfg.depths}
            deep, shallow = max(cfg.depths), min(cfg.depths)
            out.append(stats.paired(f"(Group={g} - Group={base}) at Layer={deep}", gains[deep],
                                    f"at Layer={shallow}", gains[shallow]))
    return [c.to_dict() for c in out]


def markdown(summary: list, comparisons: list, cfg: StudyConfig) -> str:
    n = cfg.seeds
    lines = [f"| Layer | Group | widths | OPs (M) | BOPs (M) | parameters (M) | test accuracy % "
             f"(final, {'mean ± std over ' + str(n) + ' seeds' if n > 1 else 'seed 0'}) | "
             "best epoch % | train s / run | images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        acc = f"{100 * s['accuracy_mean']:.2f}" + (f" ± {100 * s['accuracy_std']:.2f}" if n > 1 else "")
        lines.append(f"| {s['depth']} | {s['groups']} | {'/'.join(map(str, s['widths']))} | "
                     f"{s['ops'] / 1e6:.4f} | {s['bops'] / 1e6:.2f} | {s['params'] / 1e6:.3f} | {acc} | "
                     f"{100 * max(s['curve']):.2f} | {np.mean(s['train_seconds']):.0f} | "
                     f"{np.mean(s['images_per_second']):.0f} |")
    if comparisons:
        lines += ["", "Paired by seed, test accuracy in points:", "",
                  stats.comparisons_table(comparisons, "points")]
        lines += [""] + [f"- {stats.verdict(c, 'points')}" for c in comparisons]
    return "\n".join(lines) + "\n"


def write_curves(path: Path, summary: list, cfg: StudyConfig, dataset: str) -> None:
    """Test accuracy (%) per epoch, mean over seeds: one panel per depth, one line per group."""
    panels = []
    for depth in cfg.depths:
        mine = [s for s in summary if s["depth"] == depth]
        series = {f"Group={s['groups']}": (list(range(1, len(s["curve"]) + 1)),
                                           [100 * v for v in s["curve"]]) for s in mine}
        ops = mine[0]["target_ops"] / 1e6
        panels.append((series, f"Layer={depth}, ~{ops:.2f}M OPs, {dataset}", "epoch", "test accuracy %"))
    line_panels(path, panels)


def run_settings(cfg: StudyConfig, entry: dict, train, test) -> dict:
    """Everything one run of ``entry`` depends on besides its seed (:class:`RunStore`'s check):
    the study's configuration without the seed count, the recipe, the data and the widths."""
    config = asdict(cfg)
    del config["seeds"]
    return {"config": config, "recipe": Recipe(epochs=cfg.epochs).to_dict(), "dataset": train.name,
            "train_images": len(train), "test_images": len(test), "name": entry["name"],
            "widths": entry["widths"]}


def _log_run(log, r, t0, reused=False):
    log(f"Layer={r['depth']} Group={r['groups']} seed {r['seed']}: test accuracy "
        f"{' '.join(f'{a:.4f}' for a in r['test_accuracy'])} ({r['images_per_second']:.0f} "
        f"images/s, {r['seconds']:.0f} s; "
        + ("stored run reused)" if reused else f"{time.perf_counter() - t0:.0f} s elapsed)"))


def run_study(cfg: StudyConfig, out_dir: Path, data_dir=None, download=True, jobs=1, threads=1,
              log=print, resume=False) -> dict:
    """Solve the widths, train every model for every seed, write the outputs, return the results.
    Each finished run is stored under ``out_dir/runs/`` (:class:`RunStore`); ``resume`` reuses the
    stored runs whose settings match instead of training them again."""
    train, test = load_splits(cfg.dataset, data_dir, download, cfg.train_size, cfg.test_size)
    input_shape = [1, *train.images.shape[1:]]
    entries = plan(cfg, input_shape, len(train.class_names))
    log(format_plan(entries))
    out_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(out_dir)
    # seed by seed (an interrupted study keeps whole seeds), within one the longest runs first
    # (deeper, then more groups: wider), so the workers finish together
    order = sorted(entries, key=lambda e: (-e["depth"], -e["groups"]))
    tasks = [(e, seed) for seed in range(cfg.seeds) for e in order]
    t0, load_start = time.perf_counter(), os.getloadavg()
    runs, todo = [], []
    for e, seed in tasks:
        r = store.load(f"{e['name']}_seed{seed}", run_settings(cfg, e, train, test)) if resume \
            else None
        if r is None:
            todo.append((e, seed))
        else:
            runs.append(r)
            _log_run(log, r, t0, reused=True)
    reused = len(runs)
    context = {"cfg": cfg, "train": train, "test": test}
    names = {(e["depth"], e["groups"]): e for e in entries}
    for r in run_tasks(todo, train_run, _setup, (cfg, data_dir), jobs, threads, context=context):
        e = names[r["depth"], r["groups"]]
        store.save(f"{e['name']}_seed{r['seed']}", run_settings(cfg, e, train, test), r)
        runs.append(r)
        _log_run(log, r, t0)
    summary = summarize(entries, runs)
    comparisons = compare(summary, cfg)
    results = {"config": asdict(cfg), "recipe": Recipe(epochs=cfg.epochs).to_dict(),
               "dataset": train.name, "input_shape": input_shape, "train_images": len(train),
               "test_images": len(test), "jobs": jobs, "threads": threads, "cpu": cpu_name(),
               "seconds": round(time.perf_counter() - t0, 1), "runs_reused": reused,
               "load_average_start": list(load_start),
               "load_average_end": list(os.getloadavg()), "models": summary,
               "comparisons": comparisons}
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", markdown(summary, comparisons, cfg))
    write_curves(out_dir / "curves.png", summary, cfg, train.name)
    return results


# --- command line --------------------------------------------------------------------------------
def _int_list(allowed):
    """argparse type: a comma-separated subset of ``allowed`` without repeats, in the given order."""
    what = f"a comma-separated subset of {','.join(map(str, allowed))} without repeats"

    def parse(text: str) -> list:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values or len(set(values)) != len(values) or any(v not in allowed for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    parse.__name__ = "list"
    return parse


def build_parser() -> ArgumentParser:
    d = StudyConfig()
    p = ArgumentParser(prog="python -m refbnn.experiments.groups",
                       description="FTBNN Figure 5 at 28x28: derived models with 1, 2, 4 groups.")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help=f"default {d.dataset}")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"folder for the tables and the figure (default {DEFAULT_OUT_DIR})")
    p.add_argument("--data-dir", type=cli_util.existing_dir,
                   help="folder with the data set's IDX files or <dataset>/; nothing else is searched "
                        "then (default: $REFBNN_DATA_DIR's folders/<dataset>, the cache)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK['train_size']} training images, {QUICK['epochs']} epochs, "
                        "1 seed, the narrowest widths")
    p.add_argument("--seeds", type=cli_util.int_in(1, 100), help=f"runs per model (default {d.seeds})")
    p.add_argument("--epochs", type=cli_util.int_in(1, 1000), help=f"default {d.epochs}")
    for depth in DEPTHS:
        default = getattr(d, f"budget{depth}")
        p.add_argument(f"--budget{depth}", type=cli_util.float_in(0.0, 1000.0, lo_open=True),
                       help=f"million OPs per image of every Layer={depth} model (default {default})")
    p.add_argument("--depths", type=_int_list(DEPTHS), help="subset of 18,34 (default both)")
    p.add_argument("--groups", type=_int_list(GROUPS), help="subset of 1,2,4 (default all)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs stored under OUT_DIR/runs/ whose settings match "
                        "(an interrupted study, or more --seeds) instead of training them again")
    add_run_flags(p, "Numba threads per worker (default 1: see docs/groups.md)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    check_out_dir(p, args)
    return args


def make_config(args) -> StudyConfig:
    """The study configuration from the flags (``--quick`` first, explicit flags override)."""
    return StudyConfig(**config_values(StudyConfig(), QUICK, args, (
        "dataset", "seeds", "epochs", "train_size", "test_size", "budget18", "budget34", "depths",
        "groups")))


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    return run_cli(args, cfg, functools.partial(run_study, resume=args.resume),
                   lambda r: markdown(r["models"], r["comparisons"], cfg))


if __name__ == "__main__":
    # run the importable module's main, so worker processes find its functions by their real name
    from refbnn.experiments.groups import main as _main

    cli_util.run_main(_main)
