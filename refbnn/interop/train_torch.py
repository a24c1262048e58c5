"""Train refbnn's PyTorch twin on many CPUs or GPUs with ``torch.distributed`` (DDP).

``torchrun --nproc_per_node N -m refbnn.interop.train_torch [--data ROOT | --dataset mnist] ...``
(or plain ``python -m refbnn.interop.train_torch ...`` for one process). Each rank trains
:func:`refbnn.interop.torch.twin` of the config, initialised with refbnn's own initialiser for the
seed (:func:`refbnn.models.build`), wrapped in ``DistributedDataParallel`` (gradient all-reduce,
gloo on CPU, nccl on CUDA); a :class:`~refbnn.interop.torch_data.ShardSampler` deals each epoch's
seeded permutation out rank-strided. ``--batch-size`` is the GLOBAL batch (each rank takes
``batch / world size``); ``--per-rank-batch-size`` gives the per-rank batch instead.

With ``--sync-bn`` (the default when there is more than one rank) BatchNorm uses the statistics of
the global batch (:mod:`refbnn.interop.torch_syncbn`), so ``W`` ranks at global batch ``B`` compute
what one rank at batch ``B`` computes, up to float summation order; ``--no-sync-bn`` normalises
each rank's share alone (Bi-Real's ``DataParallel`` behaviour; results then depend on ``W``).

Recipes (``--recipe``; any flag overrides a field):

* ``refbnn``: ``python -m refbnn.train``'s defaults (Adam lr 3e-3, cosine decay to 0, batch 128,
  10 epochs, shifts of up to 2 pixels on MNIST, latent binary weights clipped to [-1, 1]);
* ``bireal``: the Bi-Real Net PyTorch recipe: Adam lr 1e-3 at batch 512, linear decay to 0 (per
  step; the official code steps per epoch), 256 epochs, label smoothing 0.1, no weight decay on
  binary weights (``--weight-decay`` applies to the real conv/fc weights only), no clipping.

Data: ``--dataset mnist|fashion-mnist`` (refbnn's lookup: ``--data-dir``, ``$REFBNN_DATA_DIR``, the
cache, download) or ``--data ROOT``, an ImageNet-layout tree ``ROOT/{train,val}/<class>/<image>``
(random-resized crop + flip for training, resize + center crop for evaluation, ImageNet mean/std).

Rank 0 writes into ``--out-dir``, atomically: ``checkpoint.h5`` (refbnn's checkpoint format) after
every epoch (and every ``--checkpoint-every`` steps), ``metrics.jsonl``, ``curves.png`` and at the
end ``model.h5``, which ``python -m refbnn.infer`` and ``python -m refbnn.crosscheck`` take.
``--resume CHECKPOINT`` continues a run (bit-identically for the same world size, device and thread
count where the device's kernels are deterministic); MNIST-family checkpoints also resume in
``python -m refbnn.train --resume`` (its own data order from there on), except with
``--recipe bireal --weight-decay > 0`` (an optimizer layout refbnn's recipe cannot express).

Exit status: 0 done (or stopped by ``--stop-after``), 2 bad arguments or data (one line, printed by
rank 0), 3 the loss became NaN/inf (the last good checkpoint is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from refbnn import cli_util
from refbnn.cli_util import ArgumentParser, UserError, check_writable, fail, write_text_atomic
from refbnn.train import MODEL_DEFAULTS, RECIPE_FLAGS
from refbnn.training.fit import write_curves
from refbnn.training.recipe import Recipe

#: ``python -m refbnn.train``'s defaults: the model flags and the recipe (one set, in ``Recipe``)
DEFAULTS = {**MODEL_DEFAULTS, **{k: getattr(Recipe(), k) for k in RECIPE_FLAGS}}

TRAINER = "refbnn.interop.train_torch"
RECIPES = {
    "refbnn": {**{k: DEFAULTS[k] for k in RECIPE_FLAGS}, "clip_latent": True},
    "bireal": {"epochs": 256, "batch_size": 512, "optimizer": "adam", "lr": 1e-3, "momentum": 0.9,
               "nesterov": False, "weight_decay": 0.0, "schedule": "linear", "warmup_epochs": 0.0,
               "step_epochs": 0, "label_smoothing": 0.1, "augment": 0, "clip_latent": False},
}
RECIPE_FIELDS = tuple(RECIPES["bireal"])
IMAGEFOLDER_WIDTH = 1.0


def parse_args(argv):
    p = ArgumentParser(  # cli_util's: a refused flag is one line, exit status 2
        prog="torchrun --nproc_per_node N -m refbnn.interop.train_torch",
        description="Train refbnn's PyTorch twin with torch.distributed DDP (gloo on CPU, nccl on "
                    "CUDA); rank 0 writes refbnn checkpoints and model files.")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="mnist or fashion-mnist (default mnist unless --data is given)")
    d.add_argument("--data", metavar="ROOT", help="ImageNet-layout folder ROOT/{train,val}/<class>/*")
    d.add_argument("--data-dir", help="folder holding the IDX files (else $REFBNN_DATA_DIR's "
                   "folders/<dataset>, the cache)")
    d.add_argument("--no-download", action="store_true", help="never try to download the IDX files")
    d.add_argument("--image-size", type=int, help="--data: crop size (default 224; evaluation "
                   "resizes the shorter side to size*256/224 first)")
    d.add_argument("--workers", type=int, help="data-loader worker processes per rank (default 0 "
                   "for MNIST, min(8, cores per rank) for --data)")
    d.add_argument("--limit-train", type=int, help="use only N training images (smoke tests)")
    d.add_argument("--limit-test", type=int, help="evaluate on only N test images")
    m = p.add_argument_group("model")
    m.add_argument("--model", help=f"model preset (default {DEFAULTS['model']})")
    m.add_argument("--width", type=float, help=f"width multiplier (default {DEFAULTS['width']} for "
                   f"MNIST, {IMAGEFOLDER_WIDTH} for --data)")
    m.add_argument("--stem-pool", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3/2 max-pool after the stem (default on for MNIST, the preset's for --data)")
    r = p.add_argument_group("recipe (flags override the recipe's fields)")
    r.add_argument("--recipe", choices=sorted(RECIPES), help="default refbnn")
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", type=int, help="GLOBAL batch: the sum over ranks")
    r.add_argument("--per-rank-batch-size", type=int,
                   help="per-rank batch instead (global = this x world size)")
    r.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    r.add_argument("--lr", type=float, help="peak learning rate (not scaled with the batch)")
    r.add_argument("--momentum", type=float, help="SGD momentum")
    r.add_argument("--nesterov", action="store_true", default=None)
    r.add_argument("--weight-decay", type=float, help="never on BN, slopes, biases")
    r.add_argument("--schedule", choices=("constant", "cosine", "linear", "step"))
    r.add_argument("--warmup-epochs", type=float)
    r.add_argument("--step-epochs", type=int)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--augment", type=int, help="MNIST: random shifts of up to N pixels")
    r.add_argument("--clip-latent", action=argparse.BooleanOptionalAction, default=None,
                   help="clip latent binary weights to [-1, 1] after each step")
    r.add_argument("--seed", type=cli_util.seed, help="default 0")
    x = p.add_argument_group("execution")
    x.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    x.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm statistics over the global batch (default on)")
    x.add_argument("--threads", type=int, help="torch threads per rank (default cores / local ranks)")
    x.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="training arithmetic; float64 verifies the distribution (W ranks = 1 rank to "
                        "~1e-12; slow on GPUs); files always hold float32")
    x.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs on CUDA (default: "
                   "float32, refbnn's arithmetic)")
    x.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels (torch.use_deterministic_algorithms), no cudnn "
                        "autotuning: bit-identical resume on GPUs")
    x.add_argument("--eval-batch-size", type=int, help="per-rank evaluation batch (default 500)")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", help="run folder (default runs/<dataset>-<model>-ddp)")
    o.add_argument("--out", help="final model file (default <out-dir>/model.h5)")
    o.add_argument("--resume", metavar="CHECKPOINT", help="continue a run from its checkpoint.h5")
    o.add_argument("--stop-after", type=int, metavar="EPOCHS",
                   help="stop after this many epochs in this invocation (resumable)")
    o.add_argument("--checkpoint-every", type=int, metavar="STEPS", default=0,
                   help="also write checkpoint.h5 every N steps within an epoch")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


# --- the process group -------------------------------------------------------------------------

@dataclass
class World:
    """This process's place in the run (from torchrun's environment; one rank without it)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        try:
            return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                       int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1)))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(args, world: World):
    import torch

    want = args.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda: this torch has no CUDA device")
    if world.local_rank >= torch.cuda.device_count():
        raise UserError(f"local rank {world.local_rank} but only {torch.cuda.device_count()} CUDA "
                        "devices: lower --nproc_per_node")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def all_sum(values, device, world: World):
    """Element-wise sum of a list of floats over ranks (float64)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world.size > 1:
        dist.all_reduce(t)
    return t.tolist()


# --- what to train -----------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything decided before any rank talks to another."""

    args: argparse.Namespace
    world: World
    resumed: object | None
    recipe: object
    model_name: str
    seed: int
    config: dict
    data: dict              # {"kind": "idx"|"imagefolder", ...}: how to rebuild the data sets
    dataset_name: str
    train_set: object       # a torch Dataset (IdxImages or ImageFolder)
    test_set: object
    ref_train: object       # the refbnn Dataset (MNIST family) or None
    class_names: list
    input_spec: dict
    per_rank_batch: int
    sync_bn: bool
    decay_binary: bool
    out_dir: Path
    out_path: Path
    workers: int
    threads: int
    argv: list | None = None
    device: object = None


def _given(args, names):
    return [n for n in names if getattr(args, n, None) is not None]


def plan_run(args, world: World) -> Plan:
    """Validate the flags, load the data sets and resolve the config (raises UserError /
    DataError / FormatError / ValueError with a one-line message)."""
    from refbnn import fileformat, models
    from refbnn.data import DATASETS, load_dataset, subset
    from refbnn.interop.torch_data import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        IdxImages,
        ImageFolder,
        even_subset,
    )

    for name in ("epochs", "batch_size", "per_rank_batch_size", "stop_after", "limit_train",
                 "limit_test", "image_size", "threads", "eval_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    for name in ("workers", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0")
    if args.batch_size is not None and args.per_rank_batch_size is not None:
        raise UserError("give --batch-size (global) or --per-rank-batch-size, not both")
    if args.data and args.dataset:
        raise UserError("give --dataset (MNIST family) or --data (an image folder), not both")

    resumed, run = None, {}
    if args.resume:
        fixed = _given(args, RECIPE_FIELDS + ("recipe", "model", "width", "stem_pool", "seed",
                                              "image_size", "dataset", "limit_train", "limit_test"))
        fixed = [f for f in fixed if f != "epochs"]
        if fixed:
            raise UserError(f"--resume continues the saved run; drop --{fixed[0].replace('_', '-')}")
        if not os.path.exists(args.resume):
            raise UserError(f"{args.resume}: no such file")
        resumed = fileformat.load(args.resume)
        if resumed.kind != "checkpoint":
            raise UserError(f"{args.resume}: is a {resumed.kind} file, not a training checkpoint")
        run = (resumed.provenance or {}).get("run") or {}
        if "recipe" not in run or "model" not in run:
            raise UserError(f"{args.resume}: its provenance holds no training run (recipe, model)")
        recipe = Recipe.from_dict(run["recipe"])
        if args.epochs is not None:
            recipe.epochs = args.epochs
        model_name, seed = run["model"], int(run.get("seed", 0))
        limit_train, limit_test = run.get("limit_train"), run.get("limit_test")
        decay_binary = bool(run.get("decay_binary", True))
        saved_data = run.get("data") or {"kind": "idx"}
        kind = "imagefolder" if args.data or saved_data["kind"] == "imagefolder" else "idx"
        dataset_name = resumed.dataset
        root = args.data or saved_data.get("root")
        image_size = saved_data.get("image_size")
        sync_default = run.get("sync_bn", True)
    else:
        base = RECIPES[args.recipe or "refbnn"]
        fields = {k: (getattr(args, k) if getattr(args, k, None) is not None else v)
                  for k, v in base.items()}
        if args.per_rank_batch_size is not None:
            fields["batch_size"] = args.per_rank_batch_size * world.size
        recipe = Recipe.from_dict(fields)
        model_name = args.model or DEFAULTS["model"]
        seed = DEFAULTS["seed"] if args.seed is None else args.seed
        limit_train, limit_test = args.limit_train, args.limit_test
        decay_binary = (args.recipe or "refbnn") != "bireal"
        kind = "imagefolder" if args.data else "idx"
        root, image_size = args.data, args.image_size or 224
        dataset_name = None if kind == "imagefolder" else (args.dataset or "mnist")
        sync_default = True
    if not recipe.lr > 0:
        raise UserError("--lr must be positive")
    if recipe.augment < 0 or recipe.weight_decay < 0:
        raise UserError("--augment and --weight-decay must be >= 0")
    if not 0 <= recipe.label_smoothing <= 1:
        raise UserError(f"--label-smoothing must be in [0, 1], got {recipe.label_smoothing}")
    if recipe.batch_size % world.size:
        raise UserError(f"the global batch {recipe.batch_size} is not a multiple of the world size "
                        f"{world.size}; pick --batch-size B with B % {world.size} == 0 "
                        "or --per-rank-batch-size")
    per_rank = recipe.batch_size // world.size
    if args.per_rank_batch_size is not None and args.resume and args.per_rank_batch_size != per_rank:
        raise UserError(f"--resume keeps the global batch {recipe.batch_size}: {world.size} ranks "
                        f"take {per_rank} each; drop --per-rank-batch-size")
    if args.batch_size is not None and args.resume:
        raise UserError("--resume continues the saved run; drop --batch-size")

    if kind == "imagefolder":
        if not root:
            raise UserError("--resume: the checkpoint's image folder is unknown; pass --data ROOT")
        if resumed is not None:
            _c, h, w = resumed.config["input_shape"]
            image_size = h
        train_set = ImageFolder(root, "train", image_size, train=True, seed=seed)
        test_set = ImageFolder(root, "val", image_size, train=False, seed=seed,
                               classes=train_set.classes)
        if resumed is not None and resumed.class_names and resumed.class_names != train_set.classes:
            raise UserError(f"{root}: its classes differ from the checkpoint's")
        if limit_train:
            train_set.samples = [train_set.samples[i]
                                 for i in even_subset(len(train_set), min(limit_train, len(train_set)))]
        if limit_test:
            test_set.samples = [test_set.samples[i]
                                for i in even_subset(len(test_set), min(limit_test, len(test_set)))]
        ref_train = None
        class_names = train_set.classes
        shape = [3, image_size, image_size]
        dataset_name = dataset_name or "imagefolder:" + os.path.basename(os.path.abspath(root))
        input_spec = {"shape": shape, "layout": "NCHW", "channel_order": "RGB",
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                      "resize": test_set.resize, "crop": image_size}
        data = {"kind": "imagefolder", "root": os.path.abspath(root), "image_size": image_size}
        default_width, stem_pool = IMAGEFOLDER_WIDTH, args.stem_pool
    else:
        if dataset_name not in DATASETS:
            raise UserError(f"unknown dataset {dataset_name!r}; known: {', '.join(sorted(DATASETS))} "
                            "(or --data ROOT for an image folder)")
        download = not args.no_download
        ref_train = load_dataset(dataset_name, "train", data_dir=args.data_dir, download=download)
        ref_test = load_dataset(dataset_name, "test", data_dir=args.data_dir, download=download)
        if limit_train:
            ref_train = subset(ref_train, min(limit_train, len(ref_train)))
        if limit_test:
            ref_test = subset(ref_test, min(limit_test, len(ref_test)))
        spec = DATASETS[dataset_name]
        train_set = IdxImages(ref_train, spec.mean, spec.std, augment=recipe.augment, seed=seed)
        test_set = IdxImages(ref_test, spec.mean, spec.std)
        class_names = list(ref_train.class_names)
        h, w = ref_train.images.shape[1:]
        shape = [1, h, w]
        input_spec = {"shape": shape, "layout": "NCHW", "channel_order": "L",
                      "mean": [spec.mean], "std": [spec.std]}
        data = {"kind": "idx"}
        default_width = DEFAULTS["width"]
        stem_pool = DEFAULTS["stem_pool"] if args.stem_pool is None else args.stem_pool

    if resumed is not None:
        config = resumed.config
        if resumed.epoch >= recipe.epochs:
            raise UserError(f"{args.resume}: already trained {resumed.epoch} of {recipe.epochs} "
                            "epochs; pass a larger --epochs to continue")
    else:
        overrides = {"input_shape": shape, "num_classes": len(class_names),
                     "width_multiplier": default_width if args.width is None else args.width}
        if stem_pool is not None:
            overrides["stem_pool"] = stem_pool
        config = models.get_config(model_name, **overrides)

    name = dataset_name.split(":")[-1]
    out_dir = Path(args.out_dir or (Path(args.resume).parent if args.resume
                                    else Path("runs") / f"{name}-{model_name}-ddp"))
    out_path = Path(args.out) if args.out else out_dir / "model.h5"
    if world.main:
        try:
            check_writable(out_dir)
            check_writable(out_path.parent)
        except OSError as e:
            raise UserError(f"cannot write to the output folder: {e}") from None
    cores = max(1, (os.cpu_count() or 1) // max(1, world.local_size))
    workers = args.workers if args.workers is not None else (min(8, cores) if kind == "imagefolder" else 0)
    sync_bn = sync_default if args.sync_bn is None else args.sync_bn
    return Plan(args, world, resumed, recipe, model_name, seed, config, data, dataset_name,
                train_set, test_set, ref_train, class_names, input_spec, per_rank, sync_bn,
                decay_binary, out_dir, out_path, workers, args.threads or cores)


# --- training ----------------------------------------------------------------------------------

def refbnn_rng_state(plan: Plan, epoch: int, batches_done: int) -> dict:
    """The ``rng_state`` ``refbnn.train --resume`` restores: the generator state its own Trainer
    would have at the start of ``epoch`` + 1 (``default_rng(seed)`` after ``epoch`` calls of
    :func:`refbnn.data.batches`), and the batches done in that epoch. The twin's own position is
    ``epoch`` and ``batches_done``: its data order is a function of ``(seed, epoch)``."""
    import numpy as np

    from refbnn.data import batches

    rng = np.random.default_rng(plan.seed)
    if plan.ref_train is not None:
        for _ in range(epoch):
            batches(plan.ref_train, plan.recipe.batch_size, rng, shuffle=True,
                    augment=plan.recipe.augment)
    return {"bit_generator": rng.bit_generator.state, "batches_done": int(batches_done)}


def train(plan: Plan) -> int:
    from collections import OrderedDict

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Subset

    from refbnn import fileformat, models
    from refbnn.interop.torch import from_torch_state, to_torch_state, twin
    from refbnn.interop.torch_data import IMAGENET_MEAN, IMAGENET_STD, IdxImages, ShardSampler, pass_batch
    from refbnn.interop.torch_optim import (
        clip_latent,
        refbnn_layout,
        state_from_refbnn,
        state_to_refbnn,
        torch_optimizer,
    )
    from refbnn.interop.torch_syncbn import sync_batchnorm
    from refbnn.training.trainer import Trainer

    args, world, recipe = plan.args, plan.world, plan.recipe
    device = plan.device
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(plan.seed)

    # the refbnn model: initial weights, optimizer layout, schedule, binary-weight metadata
    ref_model = models.build(plan.config, seed=plan.seed)
    schedule = Trainer(ref_model, range(len(plan.train_set)), recipe, seed=plan.seed)
    try:
        schedule.learning_rate(schedule.total_steps - 1)
    except ValueError as e:  # e.g. --schedule step without --step-epochs, too long a warm-up
        raise UserError(f"learning-rate schedule: {e}") from None
    layout = refbnn_layout(schedule.optimizer.state_dict()["hparams"], ref_model.binary_weights(),
                           plan.decay_binary)
    net = twin(ref_model.config)
    start_epoch, start_batch, history = 0, 0, []
    try:
        if plan.resumed is not None:
            net.load_state_dict(to_torch_state(plan.resumed.state_dict))
            start_epoch = int(plan.resumed.epoch)
            start_batch = int((plan.resumed.rng_state or {}).get("batches_done", 0))
            history = list(plan.resumed.history or [])
        else:
            net.load_state_dict(to_torch_state(ref_model.state_dict()))
        net.to(device, dtype)
        if world.size > 1 and plan.sync_bn:
            net = sync_batchnorm(net, device)
        optimizer = torch_optimizer(net, layout)
        if plan.resumed is not None:
            state_from_refbnn(optimizer, layout, plan.resumed.optimizer_state,
                              plan.resumed.optimizer_hyperparameters)
    except (KeyError, RuntimeError, ValueError) as e:
        raise UserError(f"{args.resume}: does not match its own model config: {e}") from None
    model = net
    if world.size > 1:
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    idx = isinstance(plan.train_set, IdxImages)
    loader_kw = {"num_workers": plan.workers, "pin_memory": device.type == "cuda"}
    if idx:
        loader_kw["collate_fn"] = pass_batch
    sampler = ShardSampler(plan.train_set, world.size, world.rank, plan.per_rank_batch, seed=plan.seed)
    test_part = Subset(plan.test_set, range(world.rank, len(plan.test_set), world.size))
    eval_batch = args.eval_batch_size or 500
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def prepare(x):
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # image folders: normalise on the device, (p / 255 - mean) / std
            x = (x.float() / 255.0 - mean) / std
        return x.to(dtype)

    def evaluate():
        for b in net.buffers():  # per-rank BatchNorm statistics: everyone uses rank 0's
            if world.size > 1:
                dist.broadcast(b, 0)
        net.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        loader = DataLoader(test_part, batch_size=eval_batch, shuffle=False, **loader_kw)
        with torch.no_grad():
            for x, y in loader:
                logits = net(prepare(x))
                y = y.to(device)
                sums[0] += float(F.cross_entropy(logits, y, reduction="sum"))
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                sums[1] += float((top[:, 0] == y).sum())
                sums[2] += float((top == y[:, None]).any(dim=1).sum())
                sums[3] += len(y)
        net.train()
        loss, c1, c5, n = all_sum(sums, device, world)
        return {"loss": loss / n, "accuracy": c1 / n, "top5": c5 / n}

    command = (f"torchrun --nproc_per_node {world.local_size} -m {TRAINER} " if world.size > 1
               else f"python -m {TRAINER} ") + " ".join(shlex.quote(a) for a in plan.argv)
    run_info = {"model": plan.model_name, "seed": plan.seed, "recipe": recipe.to_dict(),
                "threads": plan.threads, "limit_train": args.limit_train, "limit_test": args.limit_test,
                "command": command, "trainer": TRAINER, "world_size": world.size,
                "per_rank_batch_size": plan.per_rank_batch, "sync_bn": plan.sync_bn,
                "decay_binary": plan.decay_binary, "device": device.type, "data": plan.data,
                "torch_version": torch.__version__}
    if plan.resumed is not None:
        saved = plan.resumed.provenance["run"]
        run_info.update(limit_train=saved.get("limit_train"), limit_test=saved.get("limit_test"),
                        command=saved.get("command", command), resumed_with=command)
    common = {"config": ref_model.config, "input_spec": plan.input_spec,
              "class_names": list(plan.class_names), "dataset": plan.dataset_name}
    ckpt_path = plan.out_dir / "checkpoint.h5"

    def refbnn_state():
        state = OrderedDict((k, v.astype(np.float32) if v.dtype == np.float64 else v)
                            for k, v in from_torch_state(net.state_dict()).items())
        ref_model.load_state_dict(state)
        return state, ref_model.binary_weights()

    def save_checkpoint(epoch, batches_done):
        state, binary = refbnn_state()
        opt_state, opt_hparams = state_to_refbnn(optimizer, layout)
        fileformat.save_checkpoint(
            ckpt_path, state, binary_weights=binary, optimizer_state=opt_state,
            optimizer_hyperparameters=opt_hparams,
            rng_state=refbnn_rng_state(plan, epoch, batches_done), epoch=epoch, history=history,
            metrics=history[-1] if history else {}, provenance={"run": run_info}, **common)

    spe = schedule.steps_per_epoch
    stop_at = recipe.epochs if args.stop_after is None else min(recipe.epochs, start_epoch + args.stop_after)
    if world.main:
        print(f"training {plan.model_name} (stage widths {'/'.join(map(str, ref_model.config['widths']))}, "
              f"{sum(p.numel() for p in net.parameters()):,} parameters) on {plan.dataset_name}: "
              f"{len(plan.train_set)} train / {len(plan.test_set)} test images, {world.size} rank(s) "
              f"on {device.type} x {plan.per_rank_batch} = batch {recipe.batch_size}, "
              f"epochs {start_epoch + 1}..{recipe.epochs}", file=sys.stderr)
    from tqdm import tqdm

    for epoch in range(start_epoch, stop_at):
        sampler.set_epoch(epoch)
        sampler.start_batch = start_batch if epoch == start_epoch else 0
        plan.train_set.set_epoch(epoch)
        loader = DataLoader(plan.train_set, batch_size=plan.per_rank_batch, sampler=sampler,
                            drop_last=False, **loader_kw)
        batches_done = sampler.start_batch
        bar = tqdm(total=spe, initial=batches_done, unit="batch", desc=f"epoch {epoch + 1}/{recipe.epochs}",
                   disable=args.quiet or not world.main, leave=True, dynamic_ncols=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        t0 = time.perf_counter()
        for x, y in loader:
            lr = schedule.learning_rate(epoch * spe + batches_done)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = prepare(x), y.to(device, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            clip_latent(optimizer, layout)
            batches_done += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            bar.update(1)
            if args.checkpoint_every and batches_done % args.checkpoint_every == 0 and batches_done < spe:
                if not math.isfinite(all_sum([float(loss_sum)], device, world)[0]):
                    raise NonFinite(epoch, ckpt_path)
                if world.main:
                    save_checkpoint(epoch, batches_done)
        bar.close()
        seconds = time.perf_counter() - t0
        total_loss, total_correct, total_seen = all_sum([float(loss_sum), float(correct), seen],
                                                        device, world)
        if not math.isfinite(total_loss):
            raise NonFinite(epoch, ckpt_path)
        t = time.perf_counter()
        test = evaluate()
        record = {"epoch": epoch + 1, "lr": schedule.learning_rate((epoch + 1) * spe - 1),
                  "train_loss": total_loss / max(total_seen, 1),
                  "train_accuracy": total_correct / max(total_seen, 1),
                  "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                  "train_seconds": seconds, "eval_seconds": time.perf_counter() - t,
                  "images_per_second": total_seen / max(seconds, 1e-9)}
        if not idx:
            record["test_top5"] = test["top5"]
        history.append(record)
        if world.main:
            save_checkpoint(epoch + 1, 0)
            write_text_atomic(plan.out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            write_curves(plan.out_dir / "curves.png", history, f"{plan.model_name} on {plan.dataset_name}")
            print(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                  f"acc {record['train_accuracy']:.4f} | test loss {test['loss']:.4f} "
                  f"acc {test['accuracy']:.4f} | "
                  f"{record['images_per_second']:.0f} img/s, {seconds:.0f} s", file=sys.stderr)
    if stop_at < recipe.epochs:
        if world.main:
            print(f"stopped after epoch {stop_at} of {recipe.epochs} as asked; continue with "
                  f"--resume {ckpt_path}", file=sys.stderr)
        return 0
    if world.main:
        state, binary = refbnn_state()
        final = history[-1]
        metrics = {"test_accuracy": final["test_accuracy"], "test_loss": final["test_loss"],
                   "epochs": recipe.epochs}
        if "test_top5" in final:
            metrics["test_top5"] = final["test_top5"]
        fileformat.save_model(plan.out_path, state, binary_weights=binary, metrics=metrics,
                              provenance={"run": run_info}, **common)
        print(f"wrote {plan.out_path} (test accuracy {final['test_accuracy']:.4f})", file=sys.stderr)
    return 0


def _last_line(error) -> str:
    """A data-loader worker's exception arrives with its traceback in the message: keep the
    original error's last line."""
    lines = [s for s in str(error).splitlines() if s.strip()]
    return lines[-1].split(": ", 1)[-1] if len(lines) > 1 else str(error)


class NonFinite(RuntimeError):
    def __init__(self, epoch, ckpt_path):
        kept = (f"the last good checkpoint is {ckpt_path}" if Path(ckpt_path).exists()
                else "no checkpoint was written")
        super().__init__(f"the training loss became NaN or infinite in epoch {epoch + 1}; stopped, {kept}")


@cli_util.command
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from refbnn.data import DataError
    from refbnn.fileformat import FormatError
    from refbnn.models import ConfigError

    world = World()
    try:
        world = World.from_env()
        plan = plan_run(args, world)
        plan.argv = argv
        plan.device = pick_device(args, world)
    except (UserError, DataError, FormatError, ConfigError, ValueError, OSError) as e:
        return fail(e) if world.main else 2
    torch.set_num_threads(plan.threads)
    if plan.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = not args.deterministic
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
    import torch.distributed as dist

    if world.size > 1:
        dist.init_process_group("nccl" if plan.device.type == "cuda" else "gloo",
                                rank=world.rank, world_size=world.size)
    try:
        status = train(plan)
    except (UserError, DataError) as e:
        return fail(_last_line(e)) if world.main else 2
    except NonFinite as e:
        return fail(e, status=3) if world.main else 3
    except KeyboardInterrupt:
        if world.main:
            print("interrupted: resume from the last checkpoint with --resume", file=sys.stderr)
        return 130
    # on success only: a rank that failed leaves the others to torchrun, which stops them; a
    # barrier here would wait for them forever. Ranks leave together: gloo can abort a process
    # that tears its group down while a peer is still busy (rank 0 writing files).
    if world.size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
