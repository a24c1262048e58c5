"""``python -m refbnn.convert``: PyTorch checkpoints and Larq (Keras) models -> refbnn weight files.

* ``bireal CKPT OUT.h5 [--model birealnet18|birealnet34] [--input-shape C,H,W] [--sign-at-zero S]``:
  a checkpoint of the official Bi-Real Net code as its ``train.py`` saves it
  (``{"epoch", "state_dict", "best_top1_acc", "optimizer"}``, ``module.`` prefixes, binary weights
  flat as ``binary_conv.weights`` ``(O*I*9, 1)``), or a plain state dict of refbnn's PyTorch twin of
  that model. The official architecture at any input size (7x7/2 stem and max-pool, also at 32x32);
  widths, classes and input channels come from the tensors. ``--sign-at-zero`` defaults to 0, the
  official ``torch.sign`` (said in a printed line, with the count of latent weights exactly 0): such a
  file runs on the float path (``infer --engine reference``, ``crosscheck``, ``golden --weights``);
  the packed engine needs +1 or -1, which binarize exact zeros differently. Input spec: the official
  ``train.py``'s ImageNet normalisation for 3 channels.
* ``twin STATE.pt OUT.h5 (--model PRESET | --config FILE) [--input-shape C,H,W] [--width-multiplier M]``:
  a state dict of refbnn's PyTorch twin (:func:`refbnn.interop.torch.twin`) of any config; ``--config``
  takes a JSON config or a refbnn ``.h5`` file (its config and input spec).

* ``larq MODEL.h5|MODEL.keras OUT.h5``: a Larq (Keras) model (:mod:`refbnn.interop.larq` says which
  models convert; needs the ``larq`` extra: tensorflow, tf-keras, larq). An unsupported layer or
  option: one line naming the layer and its class, exit 2.

PyTorch files are read with ``torch.load(..., weights_only=True)`` (nothing in the file runs; needs the
``torch`` extra). A tensor that does not fit: one line naming it and both shapes, exit 2; the
destination is written atomically and never equal to the source.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

from refbnn import cli_util
from refbnn.bits import SIGN_AT_ZERO_TRAINING
from refbnn.cli_util import ArgumentParser, UserError, existing_file, fail, parse_shape

IMAGENET_SPEC = {"layout": "NCHW", "channel_order": "RGB", "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]}


def parse_args(argv):
    # cli_util's parser (its subcommands' too): a refused flag is one line, exit status 2
    p = ArgumentParser(prog="python -m refbnn.convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="source", required=True)
    b = sub.add_parser("bireal", help="official Bi-Real Net checkpoint (or its refbnn twin's state dict)")
    t = sub.add_parser("twin", help="state dict of refbnn's PyTorch twin of any config")
    for q in (b, t):
        q.add_argument("checkpoint", type=existing_file, help="PyTorch file (.pth / .pt / .pth.tar)")
        q.add_argument("out", help="refbnn model file to write (.h5)")
        q.add_argument("--input-shape", type=parse_shape, default=None,
                       help="C,H,W of one input (bireal default 3,224,224)")
        q.add_argument("--sign-at-zero", type=int, choices=SIGN_AT_ZERO_TRAINING, default=None,
                       help="sign(0) of every binary layer (bireal default 0, torch.sign; "
                            "twin default: the config's)")
    b.add_argument("--model", choices=("birealnet18", "birealnet34"), default="birealnet18")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="refbnn preset the twin was built from")
    src.add_argument("--config", metavar="FILE", type=existing_file,
                     help="JSON config, or a refbnn .h5 file")
    t.add_argument("--width-multiplier", type=cli_util.positive_float, default=1.0,
                   help="with --model (default 1)")
    k = sub.add_parser("larq", help="Larq (Keras) model file (.h5 or .keras)")
    k.add_argument("checkpoint", metavar="model", type=existing_file,
                   help="Keras model file (.h5 or .keras) with Larq layers")
    k.add_argument("out", help="refbnn model file to write (.h5)")
    return p.parse_args(argv)


def convert_larq(src, dest) -> dict:
    """Convert the Larq/Keras model file ``src`` to the refbnn file ``dest``; returns the config."""
    from refbnn.interop import larq

    if os.path.exists(dest) and os.path.exists(src) and os.path.samefile(src, dest):
        raise UserError(f"{dest}: the output would overwrite the input")
    return larq.convert_file(src, dest)


def _read(path):
    from refbnn.interop import checkpoints

    if importlib.util.find_spec("torch") is None:
        raise UserError("reading a PyTorch checkpoint needs PyTorch, which is not installed "
                        "(pip install 'refbnn[torch]')")
    return checkpoints.read_torch_file(path)


def _twin_config(args, state):
    from refbnn import fileformat, models

    spec = None
    if args.config:
        if args.config.endswith((".h5", ".hdf5")):
            f = fileformat.load(args.config)
            config, spec = dict(f.config), f.input_spec
        else:
            try:
                with open(args.config) as fh:
                    config = json.load(fh)
            except (OSError, ValueError) as e:
                raise UserError(f"{args.config}: not a readable JSON config ({e})") from None
            if not isinstance(config, dict):
                raise UserError(f"{args.config}: a config is a JSON object")
        over = {}
    else:
        config = {**models.PRESETS[args.model], "name": args.model} if args.model in models.PRESETS \
            else models.get_config(args.model)  # unknown: get_config names the known ones
        over = {"width_multiplier": args.width_multiplier}
        if "fc.weight" in state:
            over["num_classes"] = int(state["fc.weight"].shape[0])
    if args.input_shape is not None:
        over["input_shape"] = args.input_shape
    if args.sign_at_zero is not None:
        over["sign_at_zero"] = args.sign_at_zero
    return models.resolve({**config, **over}), spec


def convert(args) -> str:
    from refbnn import fileformat, models
    from refbnn.interop import checkpoints

    if args.source == "larq":
        cfg = convert_larq(args.checkpoint, args.out)
        return (f"wrote {args.out}: {cfg['name']}, input {cfg['input_shape']}, widths {cfg['widths']}, "
                f"blocks {cfg['blocks']}, scale {cfg['scale']}, bn_eps {cfg['bn_eps']:g}, "
                f"pad_values {cfg['pad_values'] or {}} (default {cfg['pad_value']})")
    if args.source == "twin" and not (math.isfinite(args.width_multiplier) and args.width_multiplier > 0):
        raise UserError(f"--width-multiplier must be a finite number > 0, got {args.width_multiplier}")
    if os.path.abspath(args.out) == os.path.abspath(args.checkpoint):
        raise UserError(f"{args.out}: the output would replace the checkpoint being read")
    raw, meta = _read(args.checkpoint)
    state = checkpoints.strip_prefix(raw)
    flat = sum(k.endswith(".binary_conv.weights") for k in state)
    if args.source == "bireal":
        sign = 0 if args.sign_at_zero is None else args.sign_at_zero
        shape = args.input_shape or [3, 224, 224]
        config = checkpoints.official_config(args.model, state, shape, sign)
        spec = {**IMAGENET_SPEC, "shape": shape} if shape[0] == 3 else None
    else:
        config, spec = _twin_config(args, state)
    mapped = checkpoints.map_state(state, config, args.checkpoint)
    model = models.BNNResNet(config)
    model.load_state_dict(mapped)
    layout = ("official Bi-Real Net layout" if flat else "refbnn twin layout") + \
        (", module. prefixes" if any(k.startswith("module.") for k in raw) else "")
    extra = ", ".join(f"{k} {v}" for k, v in meta.items() if k in ("epoch", "best_top1_acc"))
    print(f"read {args.checkpoint}: {len(raw)} tensors, {layout}" + (f"; {extra}" if extra else ""))
    zeros = checkpoints.exact_zero_weights(mapped, config)
    total = sum(mapped[n].size for n in model.binary_weights())
    s = config["sign_at_zero"]
    if s == 0:
        print("sign_at_zero=0 (torch.sign, as the official code): runs on the float path (infer "
              "--engine reference, crosscheck, golden --weights); the packed engine needs "
              "--sign-at-zero 1 or -1")
    print(f"{zeros} of {total} latent binary weights are exactly 0 "
          f"(binarized to {'0' if s == 0 else '+1' if s == 1 else '-1'} here"
          + ("" if zeros == 0 else "; +1 / 0 / -1 under the other conventions") + ")")
    provenance = {"converted_from": os.path.basename(args.checkpoint), "source": args.source,
                  **{k: v for k, v in meta.items() if k in ("epoch", "best_top1_acc", "arch")}}
    fileformat.save_model(args.out, model.state_dict(), config=config,
                          binary_weights=model.binary_weights(), input_spec=spec,
                          provenance=provenance)
    c, h, w = config["input_shape"]
    return (f"wrote {args.out}: {config['name']}, input {c}x{h}x{w}, {config['num_classes']} "
            f"classes, sign_at_zero {s}")


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    from refbnn import fileformat
    from refbnn.interop.checkpoints import ConversionError
    from refbnn.models.config import ConfigError

    try:
        print(convert(args))
    except (UserError, ConversionError, ConfigError, fileformat.FormatError, ValueError, OSError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    cli_util.run_main(main)
