"""``python -m refbnn.crosscheck WEIGHTS.h5 --against torch``: compare refbnn with another
implementation layer by layer.

Both run the model in ``WEIGHTS.h5`` on the same seeded input batch (standard normal, ``--seed``,
``--batch``); every leaf layer's output is compared in call order (``--train``: in train mode, then
one cross-entropy backward, and every parameter's gradient too). The other side is:

* ``torch``: the PyTorch twin (:func:`refbnn.interop.torch.twin`) with the same weights;
* ``golden FILE``: a ``model.h5`` golden file (``docs/golden.md``), from refbnn or any other
  implementation; its own input batch is used;
* ``onnx MODEL.onnx``: an ONNX model run by onnxruntime (graph outputs named like refbnn's layers
  are compared, and the first graph output against the logits); eval mode only;
* ``openvino MODEL.xml``: an OpenVINO IR written by ``python -m refbnn.export ... --openvino``
  (:func:`refbnn.interop.openvino.run_layers`, f32); eval mode only.

For each layer the table shows the max absolute difference, the relative difference
``max |a - r| / max |r|`` (``r`` = refbnn) and, at layers with a kink at 0 (binary layers' sign,
ReLU, PReLU, FPReLU), how many inputs fall on different sides of 0 in the two runs ("flips") and
how many of those lie within rounding of 0 (``|r| <= NEAR_ZERO * max |r|``).
A layer is beyond tolerance when its relative difference exceeds ``--rtol`` (outputs) or
``--grad-rtol`` (gradients). The check stops at the first such layer and names it (exit 1); exit 0
when all agree, 2 for bad input (one-line error).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from refbnn.cli_util import UserError, fail

RTOL = 1e-4        # outputs: float32 summation order, a few ulp of the largest partial sum per layer
GRAD_RTOL = 1e-4   # gradients (measured against PyTorch, small presets: <= 2e-5)
NEAR_ZERO = 1e-5   # a binary input within this fraction of its layer's max |x| is "within rounding"


@dataclass
class Run:
    """One implementation's run: ``outputs`` (layer name -> output, call order; ``logits`` last),
    ``inputs`` (binary layer name -> its pre-sign input) and, for a training run, ``grads``."""

    outputs: OrderedDict
    inputs: dict = field(default_factory=dict)
    grads: OrderedDict = field(default_factory=OrderedDict)


@dataclass
class Row:
    name: str
    kind: str                # "output" or "grad"
    max_abs: float
    rel: float
    ok: bool
    flips: int | None = None
    near_zero_flips: int | None = None
    note: str = ""


def seeded_batch(config: dict, seed: int, batch: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *config["input_shape"])).astype(np.float32)
    return x, rng.integers(0, config["num_classes"], batch).astype(np.int64)


def run_refbnn(model, x, labels=None) -> Run:
    """refbnn's run: eval mode, or (with ``labels``) train mode plus one backward."""
    from refbnn.goldenlib.model import forward_record
    from refbnn.training.losses import cross_entropy

    rec = forward_record(model, x, "train" if labels is not None else "eval")
    run = _run_from_record(rec)
    if labels is not None:
        model.zero_grad()
        model.backward(cross_entropy(rec["logits"], labels)[1])
        run.grads = OrderedDict((n, p.grad if p.grad is not None else np.zeros_like(p.data))
                                for n, p in model.named_parameters())
    return run


def _run_from_record(rec: dict) -> Run:
    outputs = OrderedDict((k[4:], v) for k, v in rec.items() if k.startswith("out."))
    outputs["logits"] = rec["logits"]
    return Run(outputs, {k[3:]: v for k, v in rec.items() if k.startswith("in.")},
               OrderedDict((k[5:], v) for k, v in rec.items() if k.startswith("grad.")))


def run_torch(tmodel, x, labels=None) -> Run:
    """The PyTorch model's run, every leaf module's input and output captured by hooks."""
    import torch

    outputs, inputs, hooks = OrderedDict(), {}, []

    def hook(name):
        def fn(_module, args, out):
            inputs[name] = args[0].detach().numpy().copy()
            outputs[name] = out.detach().numpy().copy()
        return fn

    for name, m in tmodel.named_modules():
        if name and not any(True for _ in m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        tmodel.train(labels is not None)
        tmodel.zero_grad()
        logits = tmodel(torch.from_numpy(np.ascontiguousarray(x)))
        grads = OrderedDict()
        if labels is not None:
            torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
            grads = OrderedDict((n, p.grad.numpy().copy() if p.grad is not None
                                 else np.zeros(tuple(p.shape), np.float32))
                                for n, p in tmodel.named_parameters())
    finally:
        for h in hooks:
            h.remove()
    outputs["logits"] = logits.detach().numpy().copy()
    return Run(outputs, inputs, grads)


def run_golden(golden, train: bool) -> Run:
    """The run recorded in a golden ``model.h5`` (its ``eval`` or ``train_step`` case)."""
    case = {c.name: c for c in golden.cases}.get("train_step" if train else "eval")
    if case is None:
        raise UserError("the golden file has no " + ("train_step" if train else "eval") + " case")
    return _run_from_record(case.outputs)


def run_onnx(path, x) -> Run:
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError("--against onnx needs onnxruntime, which is not installed "
                        "(pip install onnxruntime)")
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path))
    except Exception as e:  # onnxruntime raises its own exception types
        raise UserError(f"{path}: cannot load the ONNX model ({e})") from None
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: x})
    outputs = OrderedDict(zip(names[1:], values[1:]))
    outputs["logits"] = values[0]
    return Run(outputs)


def _side(x, rule):
    if rule == "ge":
        return x >= 0
    if rule == "gt":
        return x > 0
    return np.sign(x)


def _row(name, kind, ref, other, rtol) -> Row:
    r = np.asarray(ref, np.float64)
    o = np.asarray(other, np.float64)
    if o.shape != r.shape and o.size == r.size:
        o = o.reshape(r.shape)  # e.g. PyTorch's (N, C, 1, 1) global pool against (N, C)
    if o.shape != r.shape:
        return Row(name, kind, np.inf, np.inf, False, note=f"shape {o.shape} vs {r.shape}")
    diff = float(np.abs(r - o).max()) if r.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    rel = diff / scale if scale else (0.0 if diff == 0 else np.inf)
    return Row(name, kind, diff, rel, bool(rel <= rtol))


def compare(ref: Run, other: Run, rules: dict, rtol=RTOL, grad_rtol=GRAD_RTOL,
            train=False) -> list[Row]:
    """One row per refbnn layer output (and per gradient when ``train``), in refbnn's order.

    ``rules``: layer name -> the test deciding its side of 0 (:func:`kink_rules`), for counting
    inputs that fall on different sides in the two runs ("flips")."""
    rows = []
    for name, r in ref.outputs.items():
        if name not in other.outputs:
            rows.append(Row(name, "output", np.inf, np.inf, False, note="missing in the other run"))
            continue
        row = _row(name, "output", r, other.outputs[name], rtol)
        if name in ref.inputs and name in other.inputs:
            a = np.asarray(ref.inputs[name])
            b = np.asarray(other.inputs[name]).reshape(a.shape)
            flipped = _side(a, rules[name]) != _side(b, rules[name])
            near = np.abs(a) <= NEAR_ZERO * float(np.abs(a).max() if a.size else 0.0)
            row.flips, row.near_zero_flips = int(flipped.sum()), int((flipped & near).sum())
            if row.flips and not row.ok:
                row.note = (f"{row.flips} input signs flipped"
                            + (" (all within rounding of 0)" if row.flips == row.near_zero_flips
                               else ""))
        rows.append(row)
    if train:
        for name, g in ref.grads.items():
            if name not in other.grads:
                rows.append(Row(name, "grad", np.inf, np.inf, False, note="missing in the other run"))
            else:
                rows.append(_row(name, "grad", g, other.grads[name], grad_rtol))
    return rows


def first_failure(rows) -> Row | None:
    return next((r for r in rows if not r.ok), None)


def format_table(rows) -> str:
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}}  {'kind':<6}  {'max abs diff':>12}  {'rel diff':>9}  "
             f"{'sign flips (near 0)':>19}  status"]
    for r in rows:
        flips = "" if r.flips is None else f"{r.flips} ({r.near_zero_flips})"
        lines.append(f"{r.name:<{width}}  {r.kind:<6}  {r.max_abs:>12.3e}  {r.rel:>9.2e}  "
                     f"{flips:>19}  {'ok' if r.ok else 'BEYOND TOLERANCE'}"
                     + (f"  {r.note}" if r.note else ""))
    return "\n".join(lines)


def kink_rules(model) -> dict:
    """Layer name -> ``"ge"``/``"gt"``/``"sign"`` for binary layers and ReLU/PReLU/FPReLU."""
    from refbnn.goldenlib.model import kink_rule

    return {name: kink_rule(m) for name, m in model.named_modules() if kink_rule(m)}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m refbnn.crosscheck",
                                description="Compare refbnn with another implementation per layer.")
    p.add_argument("weights", help="refbnn model or checkpoint file (.h5)")
    p.add_argument("--against", nargs="+", required=True, metavar=("IMPL", "FILE"),
                   help="torch | golden FILE | onnx MODEL.onnx | openvino MODEL.xml")
    p.add_argument("--train", action="store_true", help="train mode, and compare every gradient")
    p.add_argument("--seed", type=int, default=0, help="input batch seed (default 0)")
    p.add_argument("--batch", type=int, default=2, help="input batch size (default 2)")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"output tolerance (default {RTOL})")
    p.add_argument("--grad-rtol", type=float, default=GRAD_RTOL,
                   help=f"gradient tolerance (default {GRAD_RTOL})")
    return p.parse_args(argv)


def _other_run(args, config, state, x, labels):
    impl, rest = args.against[0], args.against[1:]
    if impl == "torch":
        if rest:
            raise UserError("--against torch takes no file")
        if importlib.util.find_spec("torch") is None:
            raise UserError("--against torch needs PyTorch, which is not installed")
        from refbnn.interop.torch import to_torch_state, twin

        tmodel = twin(config)
        tmodel.load_state_dict(to_torch_state(state))
        return run_torch(tmodel, x, labels), x, labels
    if impl not in ("golden", "onnx", "openvino") or len(rest) != 1:
        raise UserError("--against must be 'torch', 'golden FILE', 'onnx MODEL.onnx' or "
                        "'openvino MODEL.xml'")
    if impl == "openvino":
        if labels is not None:
            raise UserError("--against openvino compares eval mode only; drop --train")
        from refbnn.interop.openvino import run_layers
        try:
            return Run(run_layers(rest[0], x)), x, labels
        except ImportError as e:
            raise UserError(str(e)) from None
        except RuntimeError as e:  # OpenVINO's own errors (unreadable IR, ...)
            raise UserError(f"{rest[0]}: {e}") from None
    if impl == "onnx":
        if labels is not None:
            raise UserError("--against onnx compares eval mode only; drop --train")
        return run_onnx(rest[0], x), x, labels
    from refbnn import goldenlib

    try:
        golden = goldenlib.read(rest[0])
    except goldenlib.GoldenError as e:
        raise UserError(str(e)) from None
    if golden.kind != "model":
        raise UserError(f"{rest[0]}: a {golden.kind} golden file; --against golden needs model.h5")
    differ = [k for k in state if k in golden.arrays
              and not np.array_equal(np.asarray(state[k]), golden.arrays[k])]
    if differ or set(golden.arrays) != set(state):
        raise UserError(f"{rest[0]}: recorded with other weights than {args.weights} "
                        f"(first difference: {(differ or sorted(set(golden.arrays) ^ set(state)))[0]})")
    case = {c.name: c for c in golden.cases}.get("train_step" if labels is not None else "eval")
    if case is None:
        raise UserError(f"{rest[0]}: no {'train_step' if labels is not None else 'eval'} case")
    x = case.inputs["x"]
    labels = case.inputs.get("labels") if labels is not None else None
    return run_golden(golden, labels is not None), x, labels


def main(argv=None) -> int:
    args = parse_args(argv)
    from refbnn import fileformat, models

    try:
        if args.batch < 1 or (args.train and args.batch < 2):
            raise UserError("--batch must be >= 1 (>= 2 with --train: BatchNorm batch statistics)")
        loaded = fileformat.load(args.weights)
        if loaded.kind == "packed":
            raise UserError(f"{args.weights}: a packed-only file has no latent weights")
        model = models.BNNResNet(loaded.config)
        model.load_state_dict(loaded.state_dict)
        x, labels = seeded_batch(model.config, args.seed, args.batch)
        other, x, labels = _other_run(args, model.config, model.state_dict(), x,
                                      labels if args.train else None)
        ref = run_refbnn(model, x, labels)
    except (UserError, fileformat.FormatError, ValueError, KeyError, OSError) as e:
        return fail(e)
    rows = compare(ref, other, kink_rules(model), args.rtol, args.grad_rtol, args.train)
    bad = first_failure(rows)
    shown = rows if bad is None else rows[: rows.index(bad) + 1]
    print(format_table(shown))
    if bad is None:
        print(f"all {len(rows)} comparisons within tolerance")
        return 0
    print(f"first {bad.kind} beyond tolerance: {bad.name} (relative diff {bad.rel:.3g}"
          f"{'' if not bad.note else '; ' + bad.note})")
    flips = sum(r.flips or 0 for r in rows if r.kind == "output")
    if bad.kind == "grad" and flips:
        near = sum(r.near_zero_flips or 0 for r in rows if r.kind == "output")
        print(f"note: the forward pass had {flips} flips at kinks ({near} within rounding of 0); "
              "a gradient there takes the other branch")
    return 1


if __name__ == "__main__":
    sys.exit(main())
