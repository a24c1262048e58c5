"""refbnn networks as OpenVINO models (optional extra ``openvino``): the peer the engine is timed and
checked against.

:func:`to_openvino` builds an ``openvino.Model`` with OpenVINO's Python opset API from the folded
network of :mod:`refbnn.engine.network` (so a packed-only file exports too), NCHW float32 input:

* real conv: ``Convolution`` (OIHW weights), then BatchNorm as ``Multiply`` + ``Add`` with the
  float path's folded ``scale``/``shift``; stem max-pool: ``MaxPool`` 3x3/2, padding 1;
* binary conv: the sign as ``FakeQuantize(levels=2)`` with both thresholds ``-1.4e-45`` (the
  largest negative float32 subnormal: ``+0.0`` and ``-0.0`` go to the high level, i.e.
  ``sign(0) = +1``; ``0.0`` for ``sign_at_zero=-1``), levels ``0``/``1`` (what
  ``BinaryConvolution`` reads as -1/+1; levels -1/+1 give wrong sums without an error); then
  ``BinaryConvolution`` mode ``"xnor-popcount"`` with ``pad_value`` = refbnn's (0: padded taps add
  nothing; +-1: they hold that value), u1 weights bit 1 = +1 packed **lowest bit first** within each
  byte of the flattened OIHW bits (``np.packbits(bits, bitorder="little")``: OpenVINO's CPU kernel
  reads that order, ``ecosystem-notes.md``); groups > 1 run as a ``Split`` / per-group convs /
  ``Concat``; Bi-Real's alpha a ``Multiply``, then BatchNorm;
* FPReLU as ``Select(x >= 0, pos * x, neg * x)``, PReLU ``PRelu``, ReLU ``Relu``; the 2x2/2 shortcut
  pool ``AvgPool`` (ceil rounding, pad excluded); channel repeat ``Concat``; global pool
  ``ReduceMean``; classifier ``MatMul`` + ``Add``.

With ``layer_outputs=True`` the model also returns the output of each node that corresponds to a
refbnn leaf layer, named as refbnn's layers (``conv1``, ``layer1.0.binary_conv``, ``layer1.0.bn1``,
...), for ``python -m refbnn.crosscheck MODEL.h5 --against openvino MODEL.xml``. Binary layers'
accumulators are exact integers in both; real layers differ in summation order (f32) or by bf16
rounding (OpenVINO's default on CPUs with AVX512-BF16 or AMX: :func:`compile_model` with
``precision="f32"`` forces f32).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from refbnn.engine.network import Network, network_from_file, network_from_model
from refbnn.ops import unpack_bits

#: FakeQuantize threshold for ``sign_at_zero=+1``: ``x > -1.4e-45`` holds for both zeros.
SIGN_THRESHOLD = {1: -1.401298464324817e-45, -1: 0.0}


def _ov():
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("refbnn.interop.openvino needs OpenVINO: pip install 'refbnn[openvino]'") \
            from e
    return ov, ops


def _c(ops, a, dtype=np.float32):
    return ops.constant(np.ascontiguousarray(a, dtype=dtype))


def _col(a):
    return np.asarray(a, np.float32).reshape(1, -1, 1, 1)


def _sign(ops, x, saz):
    t = _c(ops, np.float32(SIGN_THRESHOLD[saz]))
    return ops.fake_quantize(x, t, t, _c(ops, np.float32(0.0)), _c(ops, np.float32(1.0)), 2)


def _bn(ops, x, bn):
    return ops.add(ops.multiply(x, _c(ops, _col(bn.scale))), _c(ops, _col(bn.shift)))


def _act(ops, x, act):
    if act.kind == "none":
        return None
    if act.kind == "relu":
        return ops.relu(x)
    if act.kind == "prelu":
        return ops.prelu(x, _c(ops, act.neg))
    pos = ops.multiply(x, _c(ops, _col(act.pos)))
    neg = ops.multiply(x, _c(ops, _col(act.neg)))
    return ops.select(ops.greater_equal(x, _c(ops, np.float32(0.0))), pos, neg)


def _tap_sum_map(in_hw, k, stride, pad, pad_value):
    """Per output pixel, the accumulator of an all-+1 input channel with all-+1 weights:
    ``sum over taps of (1 if in bounds else pad_value)``, float32 ``(1, 1, OH, OW)``."""
    counts = []
    for n in in_hw:
        o = (n + 2 * pad - k) // stride + 1
        t = np.arange(o)[:, None] * stride + np.arange(k)[None, :] - pad
        counts.append(((t >= 0) & (t < n)).sum(axis=1))
    inside = counts[0][:, None] * counts[1][None, :]  # taps with both coordinates in bounds
    return (inside + (k * k - inside) * float(pad_value)).astype(np.float32)[None, None]


def _binary(ov, ops, x, conv, in_hw):
    """The binary_conv output node (accumulator, times alpha for Bi-Real) of a :class:`BinaryConv`.

    OpenVINO's CPU kernel is wrong (silently, or it crashes) when a group's input channels are not
    a multiple of 8 (measured: 8, 16, 24, 32, 40, 64 right; 1, 4, 7, 9, 12, 19, 38, 77 wrong). Such
    groups get ``n`` extra input channels of constant +1 with weights +1, -1, +1, -1, ...: each
    +1/-1 pair adds exactly 0 at every tap (padded taps included); an odd ``n`` leaves one +1
    channel, whose exact contribution (:func:`_tap_sum_map`) is subtracted."""
    g, k, p = conv.groups, conv.kernel, conv.padding
    og, cg = conv.out_channels // g, conv.in_channels // g
    extra = -cg % 8
    parts = ops.split(x, ops.constant(np.int64(1)), g).outputs() if g > 1 else [x]
    accs = []
    for gi in range(g):
        part = parts[gi]
        plus = (unpack_bits(conv.words[gi * og:(gi + 1) * og], cg).transpose(0, 3, 1, 2) > 0)
        if extra:
            first = ops.slice(part, _c(ops, [0], np.int64), _c(ops, [1], np.int64),
                              _c(ops, [1], np.int64), _c(ops, [1], np.int64))
            one = ops.add(ops.multiply(first, _c(ops, np.float32(0.0))), _c(ops, np.float32(1.0)))
            part = ops.concat([part] + [one] * extra, 1)
            pad_w = np.broadcast_to((np.arange(extra) % 2 == 0)[None, :, None, None],
                                    (og, extra, k, k))
            plus = np.concatenate([plus, pad_w], axis=1)
        bits = np.packbits(plus.astype(np.uint8).reshape(-1), bitorder="little")
        t = ov.Tensor(ov.Type.u1, ov.Shape([og, cg + extra, k, k]))
        t.data[:] = bits  # the tensor's bytes as they are: no re-packing by OpenVINO
        acc = ops.binary_convolution(_sign(ops, part, conv.sign_at_zero), ov.op.Constant(t),
                                     [conv.stride] * 2, [p, p], [p, p], [1, 1], "xnor-popcount",
                                     float(conv.pad_value))
        if extra % 2:
            acc = ops.subtract(acc, _c(ops, _tap_sum_map(in_hw, k, conv.stride, p, conv.pad_value)))
        accs.append(acc)
    acc = accs[0] if g == 1 else ops.concat(accs, 1)
    return acc if conv.alpha is None else ops.multiply(acc, _c(ops, _col(conv.alpha)))


def to_openvino(net: Network, layer_outputs: bool = False, batch: int | None = None):
    """An ``openvino.Model`` of ``net`` (input ``x`` NCHW float32, batch ``batch`` or dynamic:
    the CPU plugin's BinaryConvolution needs a static batch, ``model.reshape`` sets one); first
    output ``logits``, then (``layer_outputs``) one per refbnn leaf layer."""
    ov, ops = _ov()
    c, h, w = net.input_shape
    x = ops.parameter([batch if batch else -1, c, h, w], np.float32, name="x")
    named = OrderedDict()

    def keep(name, node):
        named[name] = node
        return node

    st = net.stem
    y = keep("conv1", ops.convolution(x, _c(ops, st.w_hwio.transpose(3, 2, 0, 1)), [st.stride] * 2,
                                      [st.padding] * 2, [st.padding] * 2, [1, 1]))
    y = keep("bn1", _bn(ops, y, st.bn))
    if net.stem_pool:
        y = keep("maxpool", ops.max_pool(y, [2, 2], [1, 1], [1, 1], [1, 1], [3, 3]).output(0))
    if net.bridge is not None:
        conv, act = net.bridge
        z = _binary(ov, ops, y, conv, net.blocks[0].in_hw)
        y = _bn(ops, keep("bridge.binary_conv", z), conv.bn)
        keep("bridge.bn1", y)
        a = _act(ops, y, act)
        if a is not None:
            y = keep("bridge.nonlinear", a)
    for blk in net.blocks:
        p = blk.name
        z = _binary(ov, ops, y, blk.conv, blk.in_hw)
        out = keep(f"{p}.bn1", _bn(ops, keep(f"{p}.binary_conv", z), blk.conv.bn))
        short = y
        if blk.shortcut is not None:
            kind, op = blk.shortcut
            short = keep(f"{p}.downsample.0", ops.avg_pool(y, [2, 2], [0, 0], [0, 0], [2, 2], True,
                                                           "ceil"))
            if kind == "real":
                short = keep(f"{p}.downsample.1", ops.convolution(
                    short, _c(ops, op.w_hwio.transpose(3, 2, 0, 1)), [1, 1], [0, 0], [0, 0], [1, 1]))
                short = keep(f"{p}.downsample.2", _bn(ops, short, op.bn))
            elif kind == "binary":
                z2 = _binary(ov, ops, short, op, blk.out_hw)
                short = keep(f"{p}.downsample.2", _bn(ops, keep(f"{p}.downsample.1", z2), op.bn))
            else:
                short = keep(f"{p}.downsample.1", ops.concat([short] * op, 1))
        pre = _act(ops, out, blk.pre)
        if pre is not None:
            out = keep(f"{p}.nonlinear", pre)
        y = ops.add(out, short)
        post = _act(ops, y, blk.post)
        if post is not None:
            y = keep(f"{p}.nonlinear", post)
    y = keep("avgpool", ops.reduce_mean(y, _c(ops, np.array([2, 3]), np.int64), False))
    logits = ops.matmul(y, _c(ops, net.fc_w), False, False)
    if net.fc_b is not None:
        logits = ops.add(logits, _c(ops, net.fc_b))
    keep("fc", logits)
    outs = [logits.output(0)]
    outs[0].get_tensor().set_names({"logits"})
    if layer_outputs:
        for name, node in named.items():
            if name == "fc":
                continue
            o = node.output(0) if hasattr(node, "output") else node
            o.get_tensor().set_names({name})
            outs.append(o)
    return ov.Model(outs, [x], net.config.get("name", "refbnn"))


def network_of(source) -> Network:
    """A :class:`Network` from a :class:`Network`, a refbnn model, a ``LoadedFile`` or a path."""
    if isinstance(source, Network):
        return source
    if isinstance(source, (str, os.PathLike)):
        from refbnn import fileformat

        return network_from_file(fileformat.load(source))
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return network_from_model(source)
    return network_from_file(source)


def export(source, xml_path, layer_outputs: bool = True) -> None:
    """Write ``source`` (see :func:`network_of`) as OpenVINO IR ``xml_path`` + its ``.bin`` beside
    it, both replaced atomically (written in a temp folder first); weights are not compressed."""
    from refbnn.atomicio import check_target

    xml_path = Path(xml_path)
    bin_path = xml_path.with_suffix(".bin")
    if bin_path == xml_path:
        raise ValueError(f"{xml_path}: the IR's .xml cannot end in .bin (its weights go to "
                         f"{bin_path}); name it .xml")
    check_target(xml_path)  # a folder, FIFO or device node: refused, not replaced
    check_target(bin_path)
    ov, _ = _ov()
    model = to_openvino(network_of(source), layer_outputs)
    tmp = Path(tempfile.mkdtemp(dir=xml_path.parent, prefix=xml_path.name + "."))
    try:
        try:
            ov.save_model(model, str(tmp / "m.xml"), compress_to_fp16=False)
        except RuntimeError as e:  # OpenVINO's writer: "basic_ios::clear: iostream error"
            full = shutil.disk_usage(tmp).free < 1 << 20
            raise OSError(errno.ENOSPC if full else errno.EIO,
                          f"cannot write {xml_path}: " + ("no space left on the device" if full
                                                          else f"OpenVINO's writer failed ({e})")
                          + " (nothing written)") from None
        os.replace(tmp / "m.bin", xml_path.with_suffix(".bin"))
        # the .xml names its weights file relative to itself: same stem, so it still matches
        os.replace(tmp / "m.xml", xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compile_model(model, precision: str | None = "f32", threads: int | None = None):
    """Compile for the CPU plugin: ``precision`` ``"f32"``/``"bf16"`` or ``None`` (the plugin's
    default); one stream, latency hint, ``threads`` inference threads (``None``: all)."""
    ov, _ = _ov()
    cfg = {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY"}
    if precision is not None:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    if threads is not None:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(model, "CPU", cfg)


def run_layers(source, x, precision: str | None = "f32") -> OrderedDict:
    """Run ``source`` (an IR ``.xml`` path written by :func:`export`, or an ``openvino.Model``) on
    NCHW ``x``: ``{output name: array}``, ``logits`` last (also as ``fc``, the classifier layer)."""
    ov, _ = _ov()
    model = ov.Core().read_model(str(source)) if isinstance(source, (str, os.PathLike)) else source
    x = np.ascontiguousarray(x, np.float32)
    model.reshape(list(x.shape))  # BinaryConvolution runs with static shapes only
    compiled = compile_model(model, precision)
    res = compiled(x)
    out = OrderedDict()
    for port in compiled.outputs:
        out[port.get_any_name()] = np.asarray(res[port])
    out["fc"] = out["logits"]
    out.move_to_end("logits")
    return out
