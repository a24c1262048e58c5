"""``python -m refbnn.crosscheck WEIGHTS.h5 --against torch``: compare refbnn with another
implementation layer by layer.

Both run the model in ``WEIGHTS.h5`` on the same seeded input batch (standard normal, ``--seed``,
``--batch``); every leaf layer's output is compared in call order (``--train``: in train mode, then
one cross-entropy backward, and every parameter's gradient too). The other side is:

* ``torch``: the PyTorch twin (:func:`refbnn.interop.torch.twin`) with the same weights;
* ``golden FILE``: a ``model.h5`` golden file (``docs/golden.md``), from refbnn or any other
  implementation; its own input batch is used;
* ``onnx MODEL.onnx``: an ONNX model run by onnxruntime (graph optimizations off). Graph outputs named
  like refbnn's layers are compared (``in.<layer>`` ones give the pre-sign inputs for the flip
  counts), and the output ``logits`` (else the first output) against the logits; a static batch is
  respected; eval mode only. ``python -m refbnn.export MODEL.h5 OUT.onnx --onnx --layer-outputs``
  writes such a model;
* ``torch-module PKG.MODULE:FACTORY --checkpoint FILE [--rename MAP.json] [--factory-kwargs JSON]``:
  any importable ``nn.Module`` filled from a PyTorch checkpoint; its leaf modules' outputs (copied when
  hooked, so later in-place ops cannot change them) are compared with refbnn's layers of the same
  name (after ``--rename``'s prefix map ``{"theirs": "refbnn's"}``); eval mode only;
* ``openvino MODEL.xml``: an OpenVINO IR written by ``python -m refbnn.export ... --openvino``
  (:func:`refbnn.interop.openvino.run_layers`, f32); eval mode only;
* ``keras MODEL.h5``, ``lce MODEL.tflite``, ``qonnx MODEL.onnx``: Larq/Keras, LCE's interpreter
  (logits only) and QONNX's executor (:mod:`refbnn.interop.external`, ``docs/interop.md``).

For ``onnx`` and ``torch-module`` the verdict rests on the layers both runs have (the logits at
least); the others are listed as not compared. For ``torch`` and ``golden`` a missing layer fails.

For each layer the table shows the max absolute difference, the relative difference
``max |a - r| / max |r|`` (``r`` = refbnn) and, at layers with a kink at 0 (binary layers' sign,
ReLU, PReLU, FPReLU), how many inputs fall on different sides of 0 in the two runs ("flips") and
how many of those lie within rounding of 0 (``|r| <= NEAR_ZERO * max |r|``). refbnn's side is
decided by its layer's rule; the other side's by the other model's sign(0) where it can be read
(the twin's layers, the ``refbnn.sign_at_zero`` metadata of refbnn's ONNX export, a module's
``sign_at_zero`` attribute), else by ``--other-sign-at-zero`` (default: refbnn's own rule).
A layer is beyond tolerance when its relative difference exceeds ``--rtol`` (outputs) or
``--grad-rtol`` (gradients). The check stops at the first such layer and names it (exit 1); exit 0
when all agree, 2 for bad input (one-line error).
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from refbnn import cli_util
from refbnn.bits import SIGN_AT_ZERO_TRAINING, SIGN_RULES
from refbnn.cli_util import ArgumentParser, UserError, fail

RTOL = 1e-4        # outputs: float32 summation order, a few ulp of the largest partial sum per layer
GRAD_RTOL = 1e-4   # gradients (measured against PyTorch, small presets: <= 2e-5)
NEAR_ZERO = 1e-5   # a binary input within this fraction of its layer's max |x| is "within rounding"


@dataclass
class Run:
    """One implementation's run: ``outputs`` (layer name -> output, call order; ``logits`` last),
    ``inputs`` (binary layer name -> its pre-sign input), for a training run ``grads``, and
    ``rules`` (layer -> ``"ge"``/``"gt"``/``"sign"``) where the model states its sign(0)."""

    outputs: OrderedDict
    inputs: dict = field(default_factory=dict)
    grads: OrderedDict = field(default_factory=OrderedDict)
    rules: dict = field(default_factory=dict)  # layer -> sign rule read from the other model


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
    from refbnn.golden.model import forward_record
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


def run_torch(tmodel, x, labels=None, rename=None) -> Run:
    """The PyTorch model's run, every leaf module's input and output copied by hooks at the time
    the module ran (in-place ops later, such as ``out += residual``, cannot change them); module
    names mapped by ``rename`` (:func:`refbnn.interop.torch_module.rename_layer`). ``Run.rules``
    holds the sign rule of each leaf with a ``sign_at_zero`` attribute."""
    import torch

    from refbnn.interop.torch_module import rename_layer

    outputs, inputs, hooks, rules = OrderedDict(), {}, [], {}

    def hook(name):
        def fn(_module, args, out):
            if args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().cpu().numpy().copy()
            if isinstance(out, torch.Tensor):
                outputs[name] = out.detach().cpu().numpy().copy()
        return fn

    for name, m in tmodel.named_modules():
        if name and not any(True for _ in m.children()):
            ours = rename_layer(name, rename)
            hooks.append(m.register_forward_hook(hook(ours)))
            if getattr(m, "sign_at_zero", None) in SIGN_RULES:
                rules[ours] = SIGN_RULES[m.sign_at_zero]
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
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    outputs["logits"] = logits.detach().cpu().numpy().copy()
    return Run(outputs, inputs, grads, rules)


def run_golden(golden, train: bool) -> Run:
    """The run recorded in a golden ``model.h5`` (its ``eval`` or ``train_step`` case)."""
    case = {c.name: c for c in golden.cases}.get("train_step" if train else "eval")
    if case is None:
        raise UserError("the golden file has no " + ("train_step" if train else "eval") + " case")
    return _run_from_record(case.outputs)


def run_onnx(path, x, rename=None) -> Run:
    """The ONNX model's run (:func:`refbnn.interop.onnx.run_onnx`): graph outputs by name (after
    ``rename``), ``in.<layer>`` outputs as inputs, ``logits`` (else the first output) as logits."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise UserError("--against onnx needs onnxruntime, which is not installed "
                        "(pip install onnxruntime)")
    from refbnn.interop.onnx import SIGN_AT_ZERO_KEY, OnnxRunError
    from refbnn.interop.onnx import run_onnx as run
    from refbnn.interop.torch_module import rename_layer

    try:
        values, meta = run(path, x)
    except OnnxRunError as e:
        raise UserError(str(e)) from None
    names = list(values)
    logits = "logits" if "logits" in values else names[0]
    outputs, inputs = OrderedDict(), {}
    for name in names:
        if name == logits:
            continue
        if name.startswith("in."):
            inputs[rename_layer(name[3:], rename)] = values[name]
        else:
            outputs[rename_layer(name, rename)] = values[name]
    outputs["logits"] = values[logits]
    rule = SIGN_RULES.get(_int_or_none(meta.get(SIGN_AT_ZERO_KEY)))
    return Run(outputs, inputs, rules={"*": rule} if rule else {})


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _side(x, rule):
    """The binarized value (+1, -1, or 0 for ``"sign"`` at 0) that ``rule`` gives ``x``, so runs with
    different rules compare."""
    if rule == "ge":
        return np.where(x >= 0, 1.0, -1.0)
    if rule == "gt":
        return np.where(x > 0, 1.0, -1.0)
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
            train=False, other_rules: dict | None = None, missing: str = "fail") -> list[Row]:
    """One row per refbnn layer output (and per gradient when ``train``), in refbnn's order.

    ``rules``: layer name -> the test deciding its side of 0 in refbnn (:func:`kink_rules`), for
    counting inputs that fall on different sides in the two runs ("flips"); ``other_rules`` the
    same for the other run (default: refbnn's). ``missing``: ``"fail"`` (a layer absent in the
    other run is a failing row) or ``"skip"`` (no row; see :func:`not_compared`)."""
    other_rules = other_rules or {}
    rows = []
    for name, r in ref.outputs.items():
        if name not in other.outputs and missing == "skip" and name != "logits":
            continue
        if name not in other.outputs:
            if missing == "fail" or name == "logits":
                rows.append(Row(name, "output", np.inf, np.inf, False,
                                note="missing in the other run"))
            continue
        row = _row(name, "output", r, other.outputs[name], rtol)
        if name in ref.inputs and name in other.inputs and name in rules:
            a = np.asarray(ref.inputs[name])
            b = np.asarray(other.inputs[name])
            if b.size == a.size:
                b = b.reshape(a.shape)
                flipped = _side(a, rules[name]) != _side(b, other_rules.get(name, rules[name]))
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


def not_compared(ref: Run, other: Run) -> list[str]:
    """refbnn's layers that the other run does not have, in refbnn's order."""
    return [n for n in ref.outputs if n not in other.outputs]


def _resolve_other_rules(rules: dict, binary: set, other: Run, fallback: int | None) -> dict:
    """The other run's sign rule per kink layer: read from the model (``other.rules``; ``"*"`` for
    all binary layers), else ``fallback`` (``--other-sign-at-zero``) for the ``binary`` layers, else
    refbnn's own rule."""
    out = {}
    for name, rule in rules.items():
        if name in other.rules:
            out[name] = other.rules[name]
        elif name in binary and "*" in other.rules:
            out[name] = other.rules["*"]
        elif name in binary and fallback is not None:
            out[name] = SIGN_RULES[fallback]
        else:
            out[name] = rule
    return out


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
    from refbnn.golden.model import kink_rule

    return {name: kink_rule(m) for name, m in model.named_modules() if kink_rule(m)}


IMPLS = {"torch": 0, "golden": 1, "onnx": 1, "torch-module": 1,  # impl -> how many values follow
         "openvino": 1, "keras": 1, "lce": 1, "qonnx": 1}
AGAINST_FORMS = ("'torch', 'golden FILE', 'onnx MODEL.onnx', 'torch-module PKG.MODULE:FACTORY', "
                 "'openvino MODEL.xml', 'keras MODEL.h5', 'lce MODEL.tflite' or 'qonnx MODEL.onnx'")


def parse_args(argv):
    p = ArgumentParser(prog="python -m refbnn.crosscheck",
                       description="Compare refbnn with another implementation per layer.")
    p.add_argument("weights", nargs="?", help="refbnn model or checkpoint file (.h5)")
    p.add_argument("--against", nargs="+", required=True, metavar=("IMPL", "ARG"),
                   help="torch | golden FILE | onnx MODEL.onnx | torch-module PKG.MODULE:FACTORY | "
                        "openvino MODEL.xml | keras MODEL.h5 | lce MODEL.tflite | qonnx MODEL.onnx")
    p.add_argument("--checkpoint", metavar="FILE", help="torch-module: the PyTorch checkpoint to load")
    p.add_argument("--rename", metavar="MAP.json",
                   help="onnx / torch-module: JSON {their layer prefix: refbnn's layer prefix}")
    p.add_argument("--factory-kwargs", metavar="JSON", default="{}",
                   help="torch-module: keyword arguments of FACTORY as a JSON object")
    p.add_argument("--other-sign-at-zero", type=int, choices=SIGN_AT_ZERO_TRAINING, default=None,
                   help="sign(0) of the other side's binary layers where its model does not say "
                        "(default: refbnn's own rule)")
    p.add_argument("--train", action="store_true", help="train mode, and compare every gradient")
    p.add_argument("--seed", type=cli_util.seed, default=0, help="input batch seed (default 0)")
    p.add_argument("--batch", type=cli_util.int_in(1, 4096), default=2,
                   help="input batch size, 1-4096 (default 2)")
    p.add_argument("--rtol", type=cli_util.nonnegative_float, default=RTOL,
                   help=f"output tolerance (default {RTOL})")
    p.add_argument("--grad-rtol", type=cli_util.nonnegative_float, default=GRAD_RTOL,
                   help=f"gradient tolerance (default {GRAD_RTOL})")
    args = p.parse_args(argv)
    # "--against torch weights.h5" (flags first): --against swallowed the weight file
    impl = args.against[0]
    if args.weights is None and impl in IMPLS and len(args.against) == IMPLS[impl] + 2:
        args.weights = args.against.pop()
    if args.weights is None:
        p.error("the refbnn weight file (.h5) is required")
    return args


def _check_against(args):
    impl, rest = args.against[0], args.against[1:]
    if impl not in IMPLS or len(rest) != IMPLS[impl]:
        raise UserError(f"--against must be {AGAINST_FORMS}, got {' '.join(args.against)!r}")
    if impl == "torch-module" and not args.checkpoint:
        raise UserError("--against torch-module needs --checkpoint FILE")
    if args.checkpoint and impl != "torch-module":
        raise UserError("--checkpoint is for --against torch-module")
    if args.rename and impl not in ("onnx", "torch-module"):
        raise UserError("--rename is for --against onnx or torch-module")
    if impl in ("onnx", "torch-module", "openvino", "keras", "lce", "qonnx") and args.train:
        raise UserError(f"--against {impl} compares eval mode only; drop --train")
    if impl in ("torch", "torch-module") and importlib.util.find_spec("torch") is None:
        raise UserError(f"--against {impl} needs PyTorch, which is not installed")
    if not (args.rtol >= 0 and args.grad_rtol >= 0):  # also refuses NaN
        raise UserError("--rtol and --grad-rtol must be >= 0")
    if impl not in ("torch", "torch-module"):
        path = rest[0]
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the read
            raise UserError(f"--against {impl} {path}: not a regular file")
        if impl == "openvino" and os.path.isfile(path) and not _looks_like_xml(path):
            raise UserError(f"--against openvino {path}: not an OpenVINO IR (.xml written by "
                            "python -m refbnn.export ... --openvino)")
    return impl, rest


def _looks_like_xml(path) -> bool:
    """Whether ``path`` starts (after a byte-order mark and white space) with ``<``: OpenVINO
    would otherwise try every frontend it has on it (TensorFlow's logs to stderr)."""
    with open(path, "rb") as f:
        head = f.read(256).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"<")


def _torch_module_run(args, spec, x):
    import json

    from refbnn.interop import torch_module as tm

    try:
        kwargs = json.loads(args.factory_kwargs)
    except ValueError as e:
        raise UserError(f"--factory-kwargs: not JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise UserError("--factory-kwargs must be a JSON object")
    try:
        rename = tm.read_rename(args.rename) if args.rename else None
        net = tm.build_module(spec, kwargs)
        tm.load_checkpoint(net, args.checkpoint)
    except tm.ModuleSpecError as e:
        raise UserError(str(e)) from None
    try:
        return run_torch(net, x, None, rename)
    except Exception as e:  # whatever the foreign module raises on this input
        raise UserError(f"{spec} failed on the {tuple(x.shape)} input batch "
                        f"({type(e).__name__}: {' '.join(str(e).split())})") from None


def _other_run(args, config, state, x, labels):
    impl, rest = _check_against(args)
    if impl == "torch":
        from refbnn.interop.torch import to_torch_state, twin

        tmodel = twin(config)
        tmodel.load_state_dict(to_torch_state(state))
        return run_torch(tmodel, x, labels), x, labels
    if impl in ("keras", "lce", "qonnx"):  # refbnn.interop.external: Larq/Keras, LCE, QONNX
        from refbnn.interop.external import other_run

        return other_run(impl, rest, config, state, x, labels, Run), x, labels
    if impl == "openvino":
        from refbnn.interop.openvino import run_layers

        try:
            return Run(run_layers(rest[0], x)), x, labels
        except ImportError as e:
            raise UserError(str(e)) from None
        except RuntimeError as e:  # OpenVINO's own errors (unreadable IR, ...)
            raise UserError(f"{rest[0]}: {e}") from None
    if impl == "onnx":
        from refbnn.interop.torch_module import ModuleSpecError, read_rename

        try:
            rename = read_rename(args.rename) if args.rename else None
        except ModuleSpecError as e:
            raise UserError(str(e)) from None
        return run_onnx(rest[0], x, rename), x, labels
    if impl == "torch-module":
        return _torch_module_run(args, rest[0], x), x, labels
    from refbnn.golden import GoldenError
    from refbnn.golden import read as read_golden

    try:
        golden = read_golden(rest[0])
    except GoldenError as e:
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


def report(rows, skipped=()) -> int:
    """Print the table (up to the first failure), the verdict and the layers not compared; return
    the exit status (0 all within tolerance, 1 otherwise)."""
    bad = first_failure(rows)
    shown = rows if bad is None else rows[: rows.index(bad) + 1]
    print(format_table(shown))
    if skipped:
        print(f"not compared (absent in the other run): {len(skipped)} layers: {', '.join(skipped)}")
    flips = sum(r.flips or 0 for r in shown if r.kind == "output")
    near = sum(r.near_zero_flips or 0 for r in shown if r.kind == "output")
    logits = next((r for r in rows if r.name == "logits"), None)
    summary = (f"{sum(r.kind == 'output' for r in rows)} layer outputs compared"
               + (f", max |logit| difference {logits.max_abs:.3g}" if logits else "")
               + f", {flips} sign flips at kinks" + ("" if bad is None else " up to it")
               + f" ({near} within rounding of 0)")
    if bad is None:
        print(f"all {len(rows)} comparisons within tolerance; {summary}")
        return 0
    print(f"first {bad.kind} beyond tolerance: {bad.name} (relative diff {bad.rel:.3g}"
          f"{'' if not bad.note else '; ' + bad.note})")
    print(summary)
    if bad.kind == "grad" and flips:
        print(f"note: the forward pass had {flips} flips at kinks ({near} within rounding of 0); "
              "a gradient there takes the other branch")
    return 1


@cli_util.command
def main(argv=None) -> int:
    args = parse_args(argv)
    from refbnn import fileformat, models
    from refbnn.golden.model import is_binary

    try:
        if args.batch < 1 or (args.train and args.batch < 2):
            raise UserError("--batch must be >= 1 (>= 2 with --train: BatchNorm batch statistics)")
        _check_against(args)
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
    rules = kink_rules(model)
    binary = {n for n, m in model.named_modules() if is_binary(m)}
    other_rules = _resolve_other_rules(rules, binary, other, args.other_sign_at_zero)
    foreign = args.against[0] in ("onnx", "torch-module", "lce")
    rows = compare(ref, other, rules, args.rtol, args.grad_rtol, args.train, other_rules,
                   missing="skip" if foreign else "fail")
    return report(rows, not_compared(ref, other) if foreign else ())


if __name__ == "__main__":
    cli_util.run_main(main)
