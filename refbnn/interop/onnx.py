"""ONNX export of a refbnn model (needs the ``onnx`` package only) and ONNX runs (``onnxruntime``).

:func:`export_onnx` writes the eval-mode network as a plain ONNX graph (opset 17, IR version 8) built
with ``onnx.helper``; no PyTorch involved. ONNX has no binary op, so each binary conv becomes

* ``sign``: ``Where(Less(x, 0), -1, +1)`` for ``sign_at_zero=+1`` (``x >= 0 -> +1``, ``-0.0`` too),
  ``Where(Greater(x, 0), +1, -1)`` for ``-1``, ``Sign(x)`` (0 at 0) for ``0``. ONNX's own ``Sign``
  gives 0 at 0, so it is used only where refbnn's layer does the same. NaN takes the ``else`` branch
  (refbnn itself refuses NaN input);
* padding after the sign with the layer's ``pad_value`` (0: the Conv's zero padding, +-1: ``Pad``);
* ``Conv`` with the +-1 (0 for ternary) weights ``sign(W)``: the integer accumulator, exact in float32;
* ``Mul`` by Bi-Real's ``alpha`` (:func:`refbnn.scale.mean_abs_scale`) for ``scale="mean_abs"``.

BatchNorm (eval) is ``Mul`` by ``scale = gamma * (1 / sqrt(var + eps))`` then ``Add`` of
``shift = beta - mean * scale``, the float32 constants and the two roundings of refbnn's own eval
BatchNorm, so every binary layer and BatchNorm after it matches refbnn bit for bit as long as its
input does; the real convs, pools and the classifier sum in onnxruntime's order (a few ulp).
The 2x2 shortcut pool is ``AveragePool(ceil_mode=1, count_include_pad=0)``; FPReLU is
``Where(x >= 0, pos * x, neg * x)``; ChannelRepeat is ``Concat``.

Graph input ``input`` ``(N, C, H, W)`` float32 (``N`` symbolic, or the static ``batch``); the first
graph output is ``logits``. With ``layer_outputs`` every leaf layer's output is also a graph output
named exactly like refbnn's layer (``conv1``, ``layer1.0.binary_conv``, ...), and ``in.<layer>`` the
pre-sign input of each layer with a kink at 0 (binary convs, ReLU, PReLU, FPReLU), so
``python -m refbnn.crosscheck MODEL.h5 --against onnx OUT.onnx`` compares layer by layer.
``metadata_props``: ``refbnn.sign_at_zero`` (the model's sign(0)), ``refbnn.config`` (JSON).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from refbnn import nn
from refbnn.atomicio import write_bytes_atomic
from refbnn.engine import fold_batchnorm_module
from refbnn.models.trace import trace

OPSET = 17
IR_VERSION = 8
SIGN_AT_ZERO_KEY = "refbnn.sign_at_zero"


class _Graph:
    def __init__(self, onnx):
        self.onnx, self.h = onnx, onnx.helper
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, name, value, dtype=np.float32):
        arr = np.ascontiguousarray(np.asarray(value, dtype))
        self.inits.append(self.onnx.numpy_helper.from_array(arr, name))
        return name

    def op(self, op, inputs, output=None, **attrs):
        if output is None:
            self._n += 1
            output = f"_t{self._n}"
        self.nodes.append(self.h.make_node(op, inputs, [output], name=f"{op}_{len(self.nodes)}",
                                           **attrs))
        return output


def _col(v):
    return np.asarray(v, np.float32).reshape(1, -1, 1, 1)


class _Builder:
    """Emits one refbnn module at a time; ``out[name]`` its output, ``kink_inputs[name]`` its input."""

    def __init__(self, onnx):
        self.g = _Graph(onnx)
        self.kink_inputs = OrderedDict()
        self.layer_names = []

    def _named(self, name, value):
        self.layer_names.append(name)
        return value

    def conv(self, name, m, x):
        kh, kw = m.kernel_size
        (ph, pw), w = m.padding, m.weight.data
        inputs = [x, self.g.const(name + ".weight", w)]
        if m.bias is not None:
            inputs.append(self.g.const(name + ".bias", m.bias.data))
        y = self.g.op("Conv", inputs, name, kernel_shape=[kh, kw], strides=list(m.stride),
                      pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups)
        return self._named(name, y)

    def binary_conv(self, name, m, x):
        g = self.g
        self.kink_inputs[name] = x
        plus, minus = g.const(name + "/+1", 1.0), g.const(name + "/-1", -1.0)
        zero = g.const(name + "/0", 0.0)
        if m.sign_at_zero == 1:
            xb = g.op("Where", [g.op("Less", [x, zero]), minus, plus])
        elif m.sign_at_zero == -1:
            xb = g.op("Where", [g.op("Greater", [x, zero]), plus, minus])
        else:
            xb = g.op("Sign", [x])
        (ph, pw), (kh, kw) = m.padding, m.kernel_size
        pads = [ph, pw, ph, pw]
        if m.pad_value != 0 and (ph or pw):
            xb = g.op("Pad", [xb, g.const(name + "/pads", [0, 0, ph, pw, 0, 0, ph, pw], np.int64),
                              g.const(name + "/pad_value", m.pad_value)], mode="constant")
            pads = [0, 0, 0, 0]
        wb = m.binarized_weight(np.float32)
        out = name if m.scale != "mean_abs" else None
        acc = g.op("Conv", [xb, g.const(name + ".weight_sign", wb)], out, kernel_shape=[kh, kw],
                   strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=m.groups)
        if m.scale == "mean_abs":
            acc = g.op("Mul", [acc, g.const(name + ".alpha", _col(m.weight_scale()))], name)
        return self._named(name, acc)

    def batchnorm(self, name, m, x):
        scale, shift = fold_batchnorm_module(m)
        y = self.g.op("Mul", [x, self.g.const(name + ".scale", _col(scale))])
        return self._named(name, self.g.op("Add", [y, self.g.const(name + ".shift", _col(shift))],
                                           name))

    def nonlinear(self, name, m, x):
        g = self.g
        self.kink_inputs[name] = x
        if isinstance(m, nn.ReLU):
            return self._named(name, g.op("Relu", [x], name))
        if isinstance(m, nn.PReLU):
            return self._named(name, g.op("PRelu", [x, g.const(name + ".weight", _col(m.weight.data))],
                                          name))
        pos = g.op("Mul", [x, g.const(name + ".pos_slope", _col(m.pos_slope.data))])
        neg = g.op("Mul", [x, g.const(name + ".neg_slope", _col(m.neg_slope.data))])
        ge = g.op("GreaterOrEqual", [x, g.const(name + "/0", 0.0)])
        return self._named(name, g.op("Where", [ge, pos, neg], name))

    def module(self, name, m, x):
        if isinstance(m, nn.BinaryConv2d):
            return self.binary_conv(name, m, x)
        if isinstance(m, nn.Conv2d):
            return self.conv(name, m, x)
        if isinstance(m, nn.BatchNorm2d):
            return self.batchnorm(name, m, x)
        if isinstance(m, (nn.ReLU, nn.PReLU, nn.FPReLU)):
            return self.nonlinear(name, m, x)
        if isinstance(m, nn.MaxPool2d):
            (ph, pw) = m.padding
            return self._named(name, self.g.op("MaxPool", [x], name, kernel_shape=list(m.kernel_size),
                                               strides=list(m.stride), pads=[ph, pw, ph, pw]))
        if isinstance(m, nn.AvgPool2d):
            (ph, pw) = m.padding
            return self._named(name, self.g.op(
                "AveragePool", [x], name, kernel_shape=list(m.kernel_size), strides=list(m.stride),
                pads=[ph, pw, ph, pw], ceil_mode=int(m.ceil_mode),
                count_include_pad=int(m.count_include_pad)))
        if isinstance(m, nn.ChannelRepeat):
            return self._named(name, self.g.op("Concat", [x] * m.times, name, axis=1))
        if isinstance(m, nn.GlobalAvgPool2d):
            pooled = self.g.op("GlobalAveragePool", [x])
            return self._named(name, self.g.op("Flatten", [pooled], name, axis=1))
        if isinstance(m, nn.Linear):
            inputs = [x, self.g.const(name + ".weight", m.weight.data)]
            if m.bias is not None:
                inputs.append(self.g.const(name + ".bias", m.bias.data))
            return self._named(name, self.g.op("Gemm", inputs, name, transB=1))
        raise ValueError(f"{name}: no ONNX export for {type(m).__name__}")

    def block(self, prefix, b, x):
        out = self.module(prefix + ".binary_conv", b.binary_conv, x)
        out = self.module(prefix + ".bn1", b.bn1, out)
        short = x
        if b.downsample is not None:
            for i, m in enumerate(b.downsample.children()):
                short = self.module(f"{prefix}.downsample.{i}", m, short)
        nl = b.nonlinear
        if nl is not None and b.position == "before_add":
            out = self.module(prefix + ".nonlinear", nl, out)
        y = self.g.op("Add", [out, short])
        if nl is not None and b.position == "after_add":
            y = self.module(prefix + ".nonlinear", nl, y)
        return y

    def network(self, model, x):
        x = self.module("conv1", model.conv1, x)
        x = self.module("bn1", model.bn1, x)
        if model.maxpool is not None:
            x = self.module("maxpool", model.maxpool, x)
        if model.bridge is not None:
            b = model.bridge
            x = self.module("bridge.bn1", b.bn1, self.module("bridge.binary_conv", b.binary_conv, x))
            if b.nonlinear is not None:
                x = self.module("bridge.nonlinear", b.nonlinear, x)
        for si, stage in enumerate(model.stages):
            for bi, blk in enumerate(stage.children()):
                x = self.block(f"layer{si + 1}.{bi}", blk, x)
        x = self.module("avgpool", model.avgpool, x)
        return self.module("fc", model.fc, x)


def build_onnx(model, layer_outputs: bool = False, batch: int | None = None):
    """The ``onnx.ModelProto`` of ``model`` (a :class:`refbnn.models.BNNResNet`, eval mode) as the
    module docstring describes; ``batch``: static batch size, or ``None`` for a symbolic ``N``."""
    import onnx

    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None, got {batch!r}")
    cfg = model.config
    n = "N" if batch is None else batch
    records = trace(model, np.zeros((1, *cfg["input_shape"]), np.float32), mode="eval")
    shapes = {name: y.shape[1:] for name, _, _, y in records}
    in_shapes = {name: np.shape(x)[1:] for name, _, x, _ in records}
    b = _Builder(onnx)
    logits = b.network(model, "input")
    h = onnx.helper
    g = b.g
    g.nodes.append(h.make_node("Identity", [logits], ["logits"], name="logits"))
    info = lambda name, shape: h.make_tensor_value_info(name, onnx.TensorProto.FLOAT,  # noqa: E731
                                                        [n, *shape])
    outputs = [info("logits", shapes["fc"])]
    if layer_outputs:
        outputs += [info(name, shapes[name]) for name in b.layer_names]
        for name, tensor in b.kink_inputs.items():
            g.nodes.append(h.make_node("Identity", [tensor], ["in." + name], name="in." + name))
            outputs.append(info("in." + name, in_shapes[name]))
    graph = h.make_graph(g.nodes, cfg["name"], [info("input", cfg["input_shape"])], outputs,
                         initializer=g.inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)],
                         producer_name="refbnn")
    proto.ir_version = IR_VERSION
    h.set_model_props(proto, {SIGN_AT_ZERO_KEY: str(cfg["sign_at_zero"]),
                              "refbnn.config": json.dumps(cfg)})
    onnx.checker.check_model(proto)
    return proto


def export_onnx(model, path, layer_outputs: bool = False, batch: int | None = None) -> Path:
    """Write :func:`build_onnx` of ``model`` to ``path`` atomically
    (:func:`refbnn.atomicio.write_bytes_atomic`)."""
    proto = build_onnx(model, layer_outputs, batch)
    path = Path(path)
    write_bytes_atomic(path, proto.SerializeToString())
    return path


class OnnxRunError(ValueError):
    """The ONNX model cannot be loaded or run on the given input (one-line message)."""


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def run_onnx(path, x) -> tuple[OrderedDict, dict]:
    """Run the ONNX model at ``path`` on ``x`` (N, C, H, W) float32 with onnxruntime (CPU, graph
    optimizations off: the graph as written). A static batch ``B`` is respected: ``x`` runs in chunks
    of ``B`` (the last one padded with zeros, the padding dropped). Returns ``(outputs, meta)``:
    graph output name -> array (batch first), and the model's ``metadata_props``. Raises
    :class:`OnnxRunError` on any onnxruntime problem or shape mismatch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise OnnxRunError(f"{path}: cannot load the ONNX model ({_one_line(e)})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxRunError(f"{path}: the model has {len(inputs)} inputs; crosscheck feeds one image batch")
    spec = inputs[0]
    if spec.type != "tensor(float)":
        raise OnnxRunError(f"{path}: input {spec.name!r} is {spec.type}, not float32")
    shape = list(spec.shape)
    if len(shape) != 4 or any(isinstance(d, int) and d != v for d, v in zip(shape[1:], x.shape[1:])):
        raise OnnxRunError(f"{path}: input {spec.name!r} has shape {shape}, refbnn's model takes "
                           f"(N, {', '.join(map(str, x.shape[1:]))})")
    step = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else len(x)
    names = [o.name for o in session.get_outputs()]
    chunks = []
    for start in range(0, len(x), step):
        part = x[start:start + step]
        fill = step - len(part)
        if fill:
            part = np.concatenate([part, np.zeros((fill, *x.shape[1:]), x.dtype)])
        try:
            values = session.run(names, {spec.name: np.ascontiguousarray(part, np.float32)})
        except Exception as e:
            raise OnnxRunError(f"{path}: onnxruntime failed ({_one_line(e)})") from None
        chunks.append([np.asarray(v)[: step - fill] if np.ndim(v) and np.shape(v)[0] == step else
                       np.asarray(v) for v in values])
    outputs = OrderedDict()
    for i, name in enumerate(names):
        parts = [c[i] for c in chunks]
        outputs[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    return outputs, meta
