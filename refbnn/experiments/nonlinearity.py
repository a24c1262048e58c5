"""``python -m refbnn.experiments.nonlinearity``: FTBNN's MNIST study of non-linearity (Figure 2).

Four variants of one small Bi-Real-style CNN with a 2-D penultimate layer are trained on MNIST,
each with several seeds: ``linear`` (real 3x3 convs, no non-linearity anywhere: the whole network
is affine), ``binary`` (binary convs, sign() is the only non-linearity), ``prelu`` and ``relu``
(binary convs, each followed by BN and then a PReLU / ReLU on the residual branch, before the add,
so that no later sign() sees only values >= 0: see "The ReLU trap" in docs/models.md).

For every conv slot of the residual blocks the study measures the *discrepancy* between what the
layer computes and the real-valued convolution ``conv2d(x, W)`` of its latent (proxy) weights
``W`` with its real input ``x``: both outputs are standardised per output channel over
(N, H, W) (the BatchNorm that follows removes any per-channel affine difference, including the
scale alpha), then ``mean |z_layer - z_real|`` is taken per layer and averaged over layers. It is
exactly 0 for the linear model. A second, scale-sensitive measure, ``relative_error = mean
|alpha * acc - conv2d(x, W)| / mean |conv2d(x, W)|`` with Bi-Real's ``alpha = mean |W|`` per
output channel, is reported beside it, and so is the share of +1 in each binary conv's binarized
input after training (``positive_fraction``: a dead conv of the ReLU trap would show 1.0).

Writes into ``--out-dir`` (default ``runs/nonlinearity``, checked before any training):
``results.json``, ``results.md`` (accuracy and discrepancy, mean +- std over seeds; accuracy per
seed; the :data:`COMPARISONS` paired by seed, each with its 95% Student-t interval, t-test, sign
test and permutation p-values: :mod:`refbnn.experiments.stats`), ``features.png`` (2-D test-set
features of each model's first seed, one panel per model; also ``features-<model>.png``) and
``discrepancy.png`` (discrepancy during training, mean over seeds). Exit status: 0 done, 2 bad
arguments or data, 3 a loss became NaN/inf.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from refbnn import cli_util, nn
from refbnn.cli_util import ArgumentParser, fail, write_text_atomic
from refbnn.data import batches
from refbnn.experiments import stats
from refbnn.experiments.common import (
    add_run_flags,
    check_out_dir,
    config_values,
    cpu_name,
    load_splits,
    run_cli,
    run_tasks,
)
from refbnn.models.diagnostics import binary_input_stats
from refbnn.nn import functional as F
from refbnn.nn.init import manual_seed
from refbnn.plot import line_chart, save_png, scatter
from refbnn.scale import mean_abs_scale
from refbnn.training.fit import Callback, fit
from refbnn.training.recipe import LIMITS, Recipe

VARIANTS = OrderedDict(linear="Linear", binary="Binary", prelu="PReLU", relu="ReLU")
N_CLASSES = 10


@dataclass
class StudyConfig:
    """Everything a study depends on (stored in ``results.json``)."""

    seeds: int = 8               # runs per model, seeds 0 .. seeds-1 (>= 6: a sign test can reach 5%)
    epochs: int = 3              # 8 x 3 x 4 trainings: about 30 minutes on 2 quiet cores (docs)
    batch_size: int = 64
    lr: float = 5e-3             # Adam, cosine decay to 0, no weight decay, no augmentation
    width: int = 12              # channels of the first stage (the second has twice as many)
    train_size: int = 0          # training images (0: all 60000)
    test_size: int = 0           # test images (0: all 10000)
    probe_size: int = 500        # test images on which the discrepancy is measured
    logs_per_epoch: int = 4      # discrepancy measurements per epoch (plus one at initialisation)
    models: list = field(default_factory=lambda: list(VARIANTS))


QUICK = {"seeds": 2, "epochs": 1, "batch_size": 50, "train_size": 400, "test_size": 300,
         "probe_size": 100, "logs_per_epoch": 2, "width": 8}


# --- the network ---------------------------------------------------------------------------------
class Tap(nn.Module):
    """Identity layer that keeps its last input while ``armed`` (a conv's real-valued input)."""

    def __init__(self):
        super().__init__()
        self.armed, self.value = False, None

    def forward(self, x):
        if self.armed:
            self.value = x
        return x

    def backward(self, grad_out):
        return grad_out


def conv3x3(variant: str, cin: int, cout: int, stride: int):
    """The conv slot: real ``Conv2d`` (``linear``) or FTBNN's ``BinaryConv2d`` (no scale: the BN
    after it absorbs alpha; sign(0) = +1; zero padding after the sign; ApproxSign gradient)."""
    if variant == "linear":
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    return nn.BinaryConv2d(cin, cout, 3, stride=stride, padding=1, scale="none", sign_at_zero=1,
                           act_grad="approx_sign", pad_value=0)


def block(variant: str, cin: int, cout: int, stride: int = 1):
    """``y = shortcut(x) + act(BN(conv(x)))``; ``act`` = PReLU (per channel, init 0.25) or ReLU for
    those variants, absent otherwise. Shortcut: identity, or 2x2 average pooling followed by
    channel duplication when the block halves the resolution and doubles the width."""
    body = [Tap(), conv3x3(variant, cin, cout, stride), nn.BatchNorm2d(cout)]
    if variant == "prelu":
        body.append(nn.PReLU(cout, init=0.25))
    elif variant == "relu":
        body.append(nn.ReLU())
    shortcut = None
    if stride != 1 or cin != cout:
        shortcut = nn.Sequential(nn.AvgPool2d(stride), nn.ChannelRepeat(cout // cin))
    return nn.Residual(nn.Sequential(*body), shortcut)


def build_model(variant: str, width: int):
    """The study's network for ``variant`` (one of :data:`VARIANTS`), input (N, 1, 28, 28):

    stem: real 3x3 conv 1->w, BN, 2x2 average pool (14x14); blocks w->w, w->w, w->2w (stride 2,
    7x7), 2w->2w; global average pool; ``Linear(2w, 2)`` (the 2-D features); ``Linear(2, 10)``.
    Children ``features`` and ``classifier``. No max-pooling, so ``linear`` stays affine.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model {variant!r}; use one of {', '.join(VARIANTS)}")
    w = width
    features = nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.AvgPool2d(2),
        block(variant, w, w), block(variant, w, w),
        block(variant, w, 2 * w, stride=2), block(variant, 2 * w, 2 * w),
        nn.GlobalAvgPool2d(), nn.Linear(2 * w, 2))
    return nn.Sequential(OrderedDict(features=features, classifier=nn.Linear(2, N_CLASSES)))


# --- the measurement -----------------------------------------------------------------------------
def conv_slots(model) -> list:
    """``(tap, conv)`` for every residual block of ``model``, in network order."""
    return [(m[0], m[1]) for _, m in model.named_modules()
            if isinstance(m, nn.Sequential) and len(m) > 1 and isinstance(m[0], Tap)]


def standardize(a: np.ndarray) -> np.ndarray:
    """Per channel (axis 1) over (N, H, W), in float64: ``(a - mean) / std`` (population std);
    a constant channel becomes 0."""
    a = a.astype(np.float64)
    mean = a.mean(axis=(0, 2, 3), keepdims=True)
    std = a.std(axis=(0, 2, 3), keepdims=True)
    return np.divide(a - mean, std, out=np.zeros_like(a), where=std > 0)


def slot_discrepancy(conv, x) -> tuple[float, float]:
    """``(discrepancy, relative_error)`` of one conv slot on its real input ``x`` (module
    docstring). The slot's own output: ``conv.forward(x)`` for a real conv; for a binary conv
    ``accumulators(x) * weight_scale`` (its output; the scale is 1 here) for the discrepancy and
    ``accumulators(x) * mean|W|`` for the relative error."""
    w = conv.weight.data
    real = F.conv2d(x, w, conv.stride, conv.padding)
    if isinstance(conv, nn.BinaryConv2d):
        acc = conv.accumulators(x)
        out = acc * conv.weight_scale(x.dtype)[:, None, None]
        alpha = mean_abs_scale(w, x.dtype)
        approx = acc * alpha[:, None, None]
    else:
        out = approx = conv.forward(x)
    disc = float(np.abs(standardize(out) - standardize(real)).mean())
    denom = float(np.abs(real.astype(np.float64)).mean())
    rel = float(np.abs(approx.astype(np.float64) - real).mean() / denom) if denom > 0 else 0.0
    return disc, rel


def discrepancy(model, x) -> tuple[float, float]:
    """Mean over conv slots of :func:`slot_discrepancy`, with ``model`` in eval mode on ``x``."""
    slots = conv_slots(model)
    was_training = model.training
    model.eval()
    try:
        for tap, _ in slots:
            tap.armed = True
        model.forward(x)
        values = [slot_discrepancy(conv, tap.value) for tap, conv in slots]
    finally:
        for tap, _ in slots:
            tap.armed, tap.value = False, None
        model.train(was_training)
    return float(np.mean([d for d, _ in values])), float(np.mean([r for _, r in values]))


def evaluate(model, dataset, batch_size: int = 500):
    """``(accuracy, features (N, 2) float32, labels (N,))`` of ``model`` in eval mode."""
    model.eval()
    feats, labels, correct = [], [], 0
    for x, y in batches(dataset, batch_size, np.random.default_rng(0), shuffle=False):
        f = model.features.forward(x)
        correct += int((model.classifier.forward(f).argmax(axis=1) == y).sum())
        feats.append(f)
        labels.append(y)
    model.train()
    return correct / len(dataset), np.concatenate(feats), np.concatenate(labels)


# --- one run, the study --------------------------------------------------------------------------
def train_run(variant: str, seed: int, cfg: StudyConfig, train_set, test_set, probe_x) -> dict:
    """Train one model (:func:`refbnn.training.fit.fit`, no files); returns accuracy, final
    discrepancy, its curve and the test features."""
    t0 = time.perf_counter()
    manual_seed(seed)
    model = build_model(variant, cfg.width)
    recipe = Recipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, schedule="cosine",
                    augment=0)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    marks = {max(1, round(steps * k / cfg.logs_per_epoch)) for k in range(1, cfg.logs_per_epoch + 1)}
    curve = [(0.0, *discrepancy(model, probe_x))]

    class Curve(Callback):
        def on_batch(self, trainer, stats):
            if trainer.batches_done in marks:
                curve.append((trainer.epoch + trainer.batches_done / steps, *discrepancy(model, probe_x)))

    fit(model, recipe, train_set, seed=seed, callbacks=[Curve()], handle_sigint=False)
    accuracy, feats, labels = evaluate(model, test_set)
    balance = [round(s.positive_fraction, 4) for s in binary_input_stats(model, probe_x)]
    return {"model": variant, "seed": seed, "accuracy": accuracy,
            "discrepancy": curve[-1][1], "relative_error": curve[-1][2],
            "positive_fraction": balance,
            "curve": {"epoch": [c[0] for c in curve], "discrepancy": [c[1] for c in curve],
                      "relative_error": [c[2] for c in curve]},
            "seconds": time.perf_counter() - t0, "features": feats, "labels": labels}


def summarize(runs: list, cfg: StudyConfig) -> dict:
    """Per model: per-seed lists, mean and std, and the mean discrepancy curve over seeds."""
    out = OrderedDict()
    for variant in cfg.models:
        mine = [r for r in runs if r["model"] == variant]
        entry = {"name": VARIANTS[variant], "seeds": [r["seed"] for r in mine]}
        for key in ("accuracy", "discrepancy", "relative_error"):
            entry[key] = [r[key] for r in mine]
            entry[key + "_mean"], entry[key + "_std"] = stats.mean_std(entry[key])
        entry["curve_epoch"] = mine[0]["curve"]["epoch"]
        entry["curve_discrepancy"] = [float(v) for v in
                                      np.mean([r["curve"]["discrepancy"] for r in mine], axis=0)]
        entry["positive_fraction"] = [r["positive_fraction"] for r in mine]
        entry["seconds"] = [round(r["seconds"], 1) for r in mine]
        out[variant] = entry
    return out


#: the differences the study tests, ``(a, b)`` for ``a - b``: does a non-linearity after the binary
#: conv help (PReLU, ReLU vs Binary), does binarization itself add discriminative power over the
#: affine model (Binary vs Linear), and do the two non-linearities differ (ReLU vs PReLU)?
COMPARISONS = (("prelu", "binary"), ("relu", "binary"), ("binary", "linear"), ("relu", "prelu"))


def compare(summary: dict, key: str, scale: float = 1.0) -> list:
    """:data:`COMPARISONS` of ``key`` (``"accuracy"``, ``"discrepancy"``) paired by seed, values times
    ``scale``, for the pairs whose models both ran (:func:`refbnn.experiments.stats.paired`)."""
    out = []
    for a, b in COMPARISONS:
        if a in summary and b in summary:
            va, vb = ({s: scale * v for s, v in zip(summary[m]["seeds"], summary[m][key])}
                      for m in (a, b))
            out.append(stats.paired(VARIANTS[a], va, VARIANTS[b], vb).to_dict())
    return out


def markdown_table(summary: dict, n_seeds: int) -> str:
    lines = [f"| model | test accuracy (mean ± std over {n_seeds} seeds) | discrepancy | "
             "relative error |", "|---|---|---|---|"]
    for entry in summary.values():
        lines.append(f"| {entry['name']} | {100 * entry['accuracy_mean']:.2f} ± "
                     f"{100 * entry['accuracy_std']:.2f} % | {entry['discrepancy_mean']:.4f} ± "
                     f"{entry['discrepancy_std']:.4f} | {entry['relative_error_mean']:.4f} ± "
                     f"{entry['relative_error_std']:.4f} |")
    return "\n".join(lines) + "\n"


def per_seed_table(summary: dict) -> str:
    """Test accuracy (%) of every model for every seed."""
    seeds = next(iter(summary.values()))["seeds"]
    lines = ["| model | " + " | ".join(str(s) for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for entry in summary.values():
        lines.append(f"| {entry['name']} | " + " | ".join(f"{100 * a:.2f}" for a in entry["accuracy"]) + " |")
    return "\n".join(lines) + "\n"


def report(summary: dict, comparisons: dict, n_seeds: int) -> str:
    """``results.md``: the summary table, accuracy per seed, and the paired comparisons of test
    accuracy (points) and discrepancy, each with its verdict."""
    parts = [markdown_table(summary, n_seeds), "Test accuracy (%) per seed:", "", per_seed_table(summary)]
    for key, unit in (("accuracy", "points"), ("discrepancy", "discrepancy")):
        if comparisons.get(key):
            parts += [f"Paired by seed ({key}, a - b):", "",
                      stats.comparisons_table(comparisons[key], unit), ""]
            parts += [f"- {stats.verdict(c, unit)}" for c in comparisons[key]] + [""]
    return "\n".join(parts)


# --- outputs -------------------------------------------------------------------------------------
def write_figures(out_dir: Path, runs: list, summary: dict, class_names) -> None:
    """``features-<model>.png`` (first seed of each model), ``features.png`` (the panels side by
    side, two per row) and ``discrepancy.png``."""
    panels = []
    for variant, entry in summary.items():
        first = next(r for r in runs if r["model"] == variant)
        title = (f"{entry['name']}: acc {100 * entry['accuracy_mean']:.1f}%, "
                 f"disc {entry['discrepancy_mean']:.3f}")
        panels.append(scatter(out_dir / f"features-{variant}.png", first["features"],
                              first["labels"], title=title, class_names=class_names, radius=1.0))
    images = [Image.open(p).convert("RGB") for p in panels]
    cols = min(2, len(images))
    rows = -(-len(images) // cols)
    pw, ph = images[0].size
    sheet = Image.new("RGB", (cols * pw, rows * ph), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * pw, (i // cols) * ph))
    save_png(sheet, out_dir / "features.png")
    series = {e["name"]: (e["curve_epoch"], e["curve_discrepancy"]) for e in summary.values()}
    line_chart(out_dir / "discrepancy.png", series, title="discrepancy of the conv outputs",
               xlabel="epoch", ylabel="discrepancy")


# --- command line --------------------------------------------------------------------------------
DEFAULT_OUT_DIR = "runs/nonlinearity"


def build_parser() -> ArgumentParser:
    d = StudyConfig()
    p = ArgumentParser(prog="python -m refbnn.experiments.nonlinearity",
                       description="FTBNN Figure 2: Linear / Binary / PReLU / ReLU CNNs on MNIST.")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                   help=f"folder for the tables and figures (default {DEFAULT_OUT_DIR})")
    p.add_argument("--data-dir", type=cli_util.existing_dir,
                   help="folder with the MNIST IDX files or mnist/; nothing else is searched then "
                        "(default: $REFBNN_DATA_DIR/mnist, the cache, ...)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 400 training images, 1 epoch, 2 seeds, width 8")
    p.add_argument("--seeds", type=cli_util.int_in(1, 1000), help=f"runs per model (default {d.seeds})")
    p.add_argument("--epochs", type=cli_util.int_in(1, 1000), help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=cli_util.int_in(2, 4096),
                   help=f"2-4096 (BatchNorm needs 2; default {d.batch_size})")
    p.add_argument("--lr", type=LIMITS["lr"], help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--width", type=cli_util.int_in(1, 512), help=f"first-stage channels (default {d.width})")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(VARIANTS)}")
    add_run_flags(p, "Numba threads per worker (default 1: faster for these small layers, see docs)")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if args.models is not None:
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in names if m not in VARIANTS]
        if unknown or not names or len(set(names)) != len(names):
            p.fail_flag("--models", f"expected a comma-separated subset of {','.join(VARIANTS)} "
                                    f"without repeats, got "
                                    f"{args.models!r}")
    check_out_dir(p, args)
    return args


def make_config(args) -> StudyConfig:
    """The study configuration from the flags (``--quick`` first, explicit flags override)."""
    values = config_values(StudyConfig(), QUICK, args,
                           ("seeds", "epochs", "batch_size", "lr", "width", "train_size", "test_size"))
    if args.models is not None:
        values["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    cfg = StudyConfig(**values)
    for key in ("seeds", "epochs", "width"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(cfg, key)}")
    if cfg.batch_size < 2:
        raise ValueError(f"--batch-size must be >= 2 (BatchNorm), got {cfg.batch_size}")
    if not (np.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {cfg.lr}")
    for key in ("train_size", "test_size"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 0 (0: all), got {getattr(cfg, key)}")
    unknown = [m for m in cfg.models if m not in VARIANTS]
    if unknown or not cfg.models:
        raise ValueError(f"--models: unknown or empty {unknown}; choose from {', '.join(VARIANTS)}")
    return cfg


def load_data(cfg: StudyConfig, data_dir, download: bool):
    return load_splits("mnist", data_dir, download, cfg.train_size, cfg.test_size)


def probe_batch(test, cfg: StudyConfig) -> np.ndarray:
    """The first ``probe_size`` test images (normalised), on which the discrepancy is measured."""
    n = min(cfg.probe_size, len(test))
    return next(batches(test, n, np.random.default_rng(0), shuffle=False))[0]


def _setup(cfg: StudyConfig, data_dir, data=None) -> dict:
    """A worker's context: the data (loaded once per process) and the probe batch."""
    train, test = data if data is not None else load_data(cfg, data_dir, download=False)
    return {"cfg": cfg, "train": train, "test": test, "probe": probe_batch(test, cfg)}


def _run_task(task, ctx) -> dict:
    variant, seed = task
    return train_run(variant, seed, ctx["cfg"], ctx["train"], ctx["test"], ctx["probe"])


def run_study(cfg: StudyConfig, out_dir: Path, data_dir=None, download=True, jobs=1, threads=1,
              log=print) -> dict:
    """Train every model for every seed (``jobs`` worker processes, each with ``threads`` Numba
    threads; runs are independent, so the results do not depend on ``jobs``), write the outputs
    and return the JSON-able results."""
    train, test = load_data(cfg, data_dir, download)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(variant, seed) for variant in cfg.models for seed in range(cfg.seeds)]
    t0, load_start = time.perf_counter(), os.getloadavg()
    runs = []
    context = _setup(cfg, data_dir, data=(train, test)) if jobs == 1 else None
    for r in run_tasks(tasks, _run_task, _setup, (cfg, data_dir), jobs, threads, context=context):
        runs.append(r)
        log(f"{VARIANTS[r['model']]:>6} seed {r['seed']}: test accuracy {r['accuracy']:.4f}, "
            f"discrepancy {r['discrepancy']:.4f}, relative error {r['relative_error']:.4f} "
            f"({r['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)")
    runs.sort(key=lambda r: tasks.index((r["model"], r["seed"])))
    summary = summarize(runs, cfg)
    comparisons = {"accuracy": compare(summary, "accuracy", 100.0),
                   "discrepancy": compare(summary, "discrepancy")}
    results = {"config": asdict(cfg), "train_images": len(train), "test_images": len(test),
               "probe_images": min(cfg.probe_size, len(test)), "jobs": jobs, "threads": threads,
               "cpu": cpu_name(), "seconds": round(time.perf_counter() - t0, 1),
               "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
               "models": summary, "comparisons": comparisons}
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", report(summary, comparisons, cfg.seeds))
    write_figures(out_dir, runs, summary, [str(k) for k in range(N_CLASSES)])
    return results


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as e:
        return fail(e)
    return run_cli(args, cfg, run_study, lambda r: report(r["models"], r["comparisons"], cfg.seeds))


if __name__ == "__main__":
    # run the importable module's main, so worker processes find its functions by their real name
    from refbnn.experiments.nonlinearity import main as _main

    cli_util.run_main(_main)
