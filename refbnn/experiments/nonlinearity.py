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
``results.json``, ``results.md`` (accuracy and discrepancy, mean +- std
over seeds), ``features.png`` (2-D test-set features of each model's first seed, one panel per
model; also ``features-<model>.png``) and ``discrepancy.png`` (discrepancy during training, mean
over seeds). Exit status: 0 done, 2 bad arguments or data, 3 a loss became NaN/inf.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numba
import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from refbnn import cli_util, nn
from refbnn.cli_util import ArgumentParser, fail, write_text_atomic
from refbnn.data import DataError, batches, subset
from refbnn.models.diagnostics import binary_input_stats
from refbnn.nn import functional as F
from refbnn.nn.init import manual_seed
from refbnn.plot import line_chart, save_png, scatter
from refbnn.scale import mean_abs_scale
from refbnn.training.faults import NumericalFault
from refbnn.training.fit import Callback, fit
from refbnn.training.recipe import LIMITS, Recipe

VARIANTS = OrderedDict(linear="Linear", binary="Binary", prelu="PReLU", relu="ReLU")
N_CLASSES = 10


@dataclass
class StudyConfig:
    """Everything a study depends on (stored in ``results.json``)."""

    seeds: int = 5               # runs per model, seeds 0 .. seeds-1
    epochs: int = 2
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


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarize(runs: list, cfg: StudyConfig) -> dict:
    """Per model: per-seed lists, mean and std, and the mean discrepancy curve over seeds."""
    out = OrderedDict()
    for variant in cfg.models:
        mine = [r for r in runs if r["model"] == variant]
        entry = {"name": VARIANTS[variant], "seeds": [r["seed"] for r in mine]}
        for key in ("accuracy", "discrepancy", "relative_error"):
            entry[key] = [r[key] for r in mine]
            entry[key + "_mean"], entry[key + "_std"] = mean_std(entry[key])
        entry["curve_epoch"] = mine[0]["curve"]["epoch"]
        entry["curve_discrepancy"] = [float(v) for v in
                                      np.mean([r["curve"]["discrepancy"] for r in mine], axis=0)]
        entry["positive_fraction"] = [r["positive_fraction"] for r in mine]
        entry["seconds"] = [round(r["seconds"], 1) for r in mine]
        out[variant] = entry
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
    p.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 400 training images, 1 epoch, 2 seeds, width 8")
    p.add_argument("--seeds", type=cli_util.int_in(1, 1000), help=f"runs per model (default {d.seeds})")
    p.add_argument("--epochs", type=cli_util.int_in(1, 1000), help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=cli_util.int_in(2, 4096),
                   help=f"2-4096 (BatchNorm needs 2; default {d.batch_size})")
    p.add_argument("--lr", type=LIMITS["lr"], help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--width", type=cli_util.int_in(1, 512), help=f"first-stage channels (default {d.width})")
    p.add_argument("--train-size", type=cli_util.int_in(0, 60_000), help="training images (default 0: all)")
    p.add_argument("--test-size", type=cli_util.int_in(0, 10_000), help="test images (default 0: all)")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--jobs", type=cli_util.int_in(1, 1024),
                   help="worker processes training in parallel (default: the core count; 1 with --quick)")
    p.add_argument("--threads", type=cli_util.threads, default=1,
                   help="Numba threads (default 1: faster for these small layers, see docs)")
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
    try:
        cli_util.check_writable(args.out_dir)
    except OSError as e:
        p.fail_flag("--out-dir", f"cannot write to {args.out_dir}: {e}")
    return args


def make_config(args) -> StudyConfig:
    """The study configuration from the flags (``--quick`` first, explicit flags override)."""
    values = asdict(StudyConfig())
    if args.quick:
        values.update(QUICK)
    for key in ("seeds", "epochs", "batch_size", "lr", "width", "train_size", "test_size"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
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
    train, _ = cli_util.load_split("mnist", "train", data_dir, download)
    test, _ = cli_util.load_split("mnist", "test", data_dir, download)
    for key, ds in (("train_size", train), ("test_size", test)):
        if getattr(cfg, key) > len(ds):
            raise ValueError(f"--{key.replace('_', '-')} {getattr(cfg, key)} exceeds the "
                             f"{len(ds)} images of the split")
    if cfg.train_size:
        train = subset(train, cfg.train_size, seed=1234)
    if cfg.test_size:
        test = subset(test, cfg.test_size, seed=1234)
    return train, test


def probe_batch(test, cfg: StudyConfig) -> np.ndarray:
    """The first ``probe_size`` test images (normalised), on which the discrepancy is measured."""
    n = min(cfg.probe_size, len(test))
    return next(batches(test, n, np.random.default_rng(0), shuffle=False))[0]


_WORKER: dict = {}


def _init_worker(cfg: StudyConfig, data_dir, threads: int, data=None) -> None:
    """Load the data once per process (``data``: already loaded, in-process runs)."""
    if threads:  # a spawned worker: single-threaded BLAS, ``threads`` Numba threads
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        threadpool_limits(1)
    train, test = data if data is not None else load_data(cfg, data_dir, download=False)
    _WORKER.update(cfg=cfg, train=train, test=test, probe=probe_batch(test, cfg))


def _run_task(task) -> dict:
    variant, seed = task
    w = _WORKER
    return train_run(variant, seed, w["cfg"], w["train"], w["test"], w["probe"])


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
    with contextlib.ExitStack() as stack:
        if jobs == 1:
            _init_worker(cfg, data_dir, 0, data=(train, test))
            finished = map(_run_task, tasks)
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ctx.Pool(min(jobs, len(tasks)), initializer=_init_worker,
                                                initargs=(cfg, data_dir, threads)))
            finished = pool.imap_unordered(_run_task, tasks)
        for r in finished:
            runs.append(r)
            log(f"{VARIANTS[r['model']]:>6} seed {r['seed']}: test accuracy {r['accuracy']:.4f}, "
                f"discrepancy {r['discrepancy']:.4f}, relative error {r['relative_error']:.4f} "
                f"({r['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s elapsed)")
    _WORKER.clear()
    runs.sort(key=lambda r: tasks.index((r["model"], r["seed"])))
    summary = summarize(runs, cfg)
    results = {"config": asdict(cfg), "train_images": len(train), "test_images": len(test),
               "probe_images": min(cfg.probe_size, len(test)), "jobs": jobs, "threads": threads,
               "seconds": round(time.perf_counter() - t0, 1), "load_average_start": list(load_start),
               "load_average_end": list(os.getloadavg()), "models": summary}
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    write_text_atomic(out_dir / "results.md", markdown_table(summary, cfg.seeds))
    write_figures(out_dir, runs, summary, [str(k) for k in range(N_CLASSES)])
    return results


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = make_config(args)
    except ValueError as e:
        return fail(e)
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else os.cpu_count() or 1)
    numba_threads = numba.get_num_threads()
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    # refbnn splits its GEMMs over Python threads and wants BLAS single-threaded (nn.functional)
    with threadpool_limits(1):
        try:
            results = run_study(cfg, Path(args.out_dir), args.data_dir, not args.no_download,
                                jobs=jobs, threads=args.threads, log=lambda s: print(s, flush=True))
        except (DataError, ValueError, OSError) as e:
            return fail(e)
        except NumericalFault as e:
            return fail(e, status=3)
        finally:
            numba.set_num_threads(numba_threads)
    print(markdown_table(results["models"], cfg.seeds), end="")
    print(f"total {results['seconds']:.0f} s; outputs in {args.out_dir}")
    return 0


if __name__ == "__main__":
    # run the importable module's main, so worker processes find its functions by their real name
    from refbnn.experiments.nonlinearity import main as _main

    cli_util.run_main(_main)
