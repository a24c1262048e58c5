"""QONNX / FINN out: a refbnn model as a QONNX graph, and QONNX's own executor's outputs.

:func:`to_qonnx` builds an ONNX graph (opset 13) in which every binary convolution is
``BipolarQuant`` on its input and on its latent weight (QONNX's op, domain
``qonnx.custom_op.general``: ``x >= 0 -> +1``, else ``-1``, times ``scale = 1``; refbnn's
``sign_at_zero = +1``), then a standard ``Conv``: zero padding (pad value 0) is ``Conv``'s own
``pads``; pad values +1 / -1 are a ``Pad`` node with that constant after the quantizer; Bi-Real's
``alpha`` is a per-channel ``Mul`` after the conv. Everything else is standard ONNX: ``Conv``,
``BatchNormalization`` (the config's ``bn_eps``), ``MaxPool`` / ``AveragePool`` (ceil mode,
padding excluded) with explicit ``pads`` (TensorFlow's asymmetric ones under ``conv_padding="tf"``),
``Add``, ``Relu``, ``PRelu``, FPReLU as ``Where(x >= 0, a*x, b*x)``, ``Concat`` (channel repeat),
``GlobalAveragePool`` -> ``Flatten`` -> ``Gemm``. Besides ``logits`` the graph outputs every leaf
layer's output under refbnn's layer name (``conv1``, ``layer1.0.binary_conv``, ...), so it can be
compared layer by layer. onnxruntime cannot load ``BipolarQuant``; :func:`qonnx_outputs` runs the
graph in ``qonnx.core.onnx_exec.execute_onnx`` after QONNX's ``InferShapes``.

Needs ``onnx`` to build and ``qonnx`` to run (the ``qonnx`` extra).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from refbnn.atomicio import write_bytes_atomic

QONNX_DOMAIN = "qonnx.custom_op.general"


class QONNXError(ValueError):
    """A model QONNX cannot express, or a file QONNX cannot run; one line."""


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError:
        raise QONNXError("needs onnx (install the 'qonnx' extra: pip install 'refbnn[qonnx]')") from None
    return onnx, helper, numpy_helper


class _Graph:
    def __init__(self):
        _, self.helper, self.nph = _onnx()
        self.nodes, self.inits, self.outputs, self.n = [], [], [], 0

    def const(self, value, name=None):
        self.n += 1
        name = name or f"c{self.n}"
        self.inits.append(self.nph.from_array(np.asarray(value), name))
        return name

    def node(self, op, inputs, out=None, domain=None, **attrs):
        self.n += 1
        out = out or f"t{self.n}"
        kw = {"domain": domain} if domain else {}
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=f"n{self.n}_{op}", **kw, **attrs))
        return out

    def output(self, tensor, name):
        """Expose ``tensor`` as graph output ``name`` (an Identity keeps names unique)."""
        self.node("Identity", [tensor], name)
        self.outputs.append(name)
        return name


def _pads_onnx(layer, x_shape):
    """ONNX ``pads`` ``[top, left, bottom, right]`` of a conv or pool layer for NCHW ``x_shape``."""
    from refbnn.nn.functional import conv_padding

    k = layer.weight.shape if hasattr(layer, "weight") else (0, 0, *layer.kernel_size)
    dil = getattr(layer, "dilation", (1, 1))
    pad = conv_padding(layer.padding, x_shape, k, layer.stride, dil)
    t, b, left, r = pad if len(pad) == 4 else (pad[0], pad[0], pad[1], pad[1])
    return [int(t), int(left), int(b), int(r)]


def _bn(g, x, bn):
    scale = bn.weight.data.astype(np.float32)
    return g.node("BatchNormalization", [x, g.const(scale), g.const(bn.bias.data.astype(np.float32)),
                                         g.const(bn.running_mean.astype(np.float32)),
                                         g.const(bn.running_var.astype(np.float32))],
                  epsilon=float(bn.eps))


def _binary_conv(g, x, conv, x_shape):
    from refbnn import nn

    if conv.sign_at_zero != 1:
        raise QONNXError(f"QONNX's BipolarQuant maps x >= 0 to +1; sign_at_zero {conv.sign_at_zero} "
                         "is not expressible")
    one = g.const(np.float32(1.0))
    xb = g.node("BipolarQuant", [x, one], domain=QONNX_DOMAIN)
    wb = g.node("BipolarQuant", [g.const(conv.weight.data.astype(np.float32)), one], domain=QONNX_DOMAIN)
    pads = _pads_onnx(conv, x_shape)
    attrs = {"strides": list(conv.stride), "dilations": list(conv.dilation), "group": conv.groups,
             "kernel_shape": list(conv.kernel_size)}
    if conv.pad_value != 0 and any(pads):
        t, left, b, r = pads
        xb = g.node("Pad", [xb, g.const(np.array([0, 0, t, left, 0, 0, b, r], np.int64)),
                            g.const(np.float32(conv.pad_value))], mode="constant")
        pads = [0, 0, 0, 0]
    y = g.node("Conv", [xb, wb], pads=pads, **attrs)
    if conv.scale == "mean_abs":
        alpha = nn.BinaryConv2d.weight_scale(conv).astype(np.float32).reshape(1, -1, 1, 1)
        y = g.node("Mul", [y, g.const(alpha)])
    return y


def to_qonnx(model, batch: int = 1):
    """The QONNX ``onnx.ModelProto`` of a built refbnn ``BNNResNet`` (eval mode), input ``x``
    ``(batch, C, H, W)`` float32."""
    from refbnn import nn
    from refbnn.models.trace import trace

    _, helper, _ = _onnx()
    import onnx

    model.eval()
    cfg = model.config
    x0 = np.zeros((batch, *cfg["input_shape"]), np.float32)
    records = trace(model, x0, mode="eval")  # call order, every leaf's input and output shape
    g = _Graph()
    # the wiring follows the network's structure below; the trace gives each leaf's shapes
    out_shape = {name: np.asarray(y).shape for name, _, _, y in records}
    in_shape = {name: np.asarray(i).shape for name, _, i, _ in records}

    def real_conv(x, conv, name):
        pads = _pads_onnx(conv, in_shape[name])
        return g.node("Conv", [x, g.const(conv.weight.data.astype(np.float32))], pads=pads,
                      strides=list(conv.stride), kernel_shape=list(conv.kernel_size),
                      dilations=list(conv.dilation), group=conv.groups)

    def nonlinear(x, layer, name):
        if isinstance(layer, nn.ReLU):
            return g.node("Relu", [x])
        if isinstance(layer, nn.PReLU):
            w = layer.weight.data.astype(np.float32)
            return g.node("PRelu", [x, g.const(w.reshape(-1, 1, 1) if w.size > 1 else w)])
        if isinstance(layer, nn.FPReLU):
            a = g.const(layer.pos_slope.data.astype(np.float32).reshape(1, -1, 1, 1))
            b = g.const(layer.neg_slope.data.astype(np.float32).reshape(1, -1, 1, 1))
            ge = g.node("GreaterOrEqual", [x, g.const(np.float32(0.0))])
            return g.node("Where", [ge, g.node("Mul", [x, a]), g.node("Mul", [x, b])])
        raise QONNXError(f"{name}: no QONNX form for {type(layer).__name__}")

    def emit(name, module, x):
        """One refbnn leaf layer, exposed as an output named after it."""
        if isinstance(module, nn.BinaryConv2d):
            y = _binary_conv(g, x, module, in_shape[name])
        elif isinstance(module, nn.Conv2d):
            y = real_conv(x, module, name)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            y = _bn(g, x, module)
        elif isinstance(module, nn.MaxPool2d):
            y = g.node("MaxPool", [x], kernel_shape=list(module.kernel_size), strides=list(module.stride),
                       pads=_pads_onnx(module, in_shape[name]))
        elif isinstance(module, nn.AvgPool2d):
            p = list(module.padding)
            y = g.node("AveragePool", [x], kernel_shape=list(module.kernel_size),
                       strides=list(module.stride), pads=[p[0], p[1], p[0], p[1]],
                       ceil_mode=int(module.ceil_mode), count_include_pad=int(module.count_include_pad))
        elif isinstance(module, nn.ChannelRepeat):
            y = g.node("Concat", [x] * module.times, axis=1)
        elif isinstance(module, nn.GlobalAvgPool2d):
            y = g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1)
        elif isinstance(module, nn.Linear):
            ins = [x, g.const(module.weight.data.astype(np.float32))]
            if module.bias is not None:
                ins.append(g.const(module.bias.data.astype(np.float32)))
            y = g.node("Gemm", ins, transB=1)
        else:
            y = nonlinear(x, module, name)
        return g.output(y, name)

    def seq(prefix, container, x):
        for i, m in enumerate(container):
            x = emit(f"{prefix}.{i}", m, x)
        return x

    x = emit("conv1", model.conv1, "x")
    x = emit("bn1", model.bn1, x)
    if model.maxpool is not None:
        x = emit("maxpool", model.maxpool, x)
    if model.bridge is not None:
        br = model.bridge
        x = emit("bridge.bn1", br.bn1, emit("bridge.binary_conv", br.binary_conv, x))
        if br.nonlinear is not None:
            x = emit("bridge.nonlinear", br.nonlinear, x)
    for si, stage in enumerate(model.stages):
        for bi, block in enumerate(stage):
            p = f"layer{si + 1}.{bi}"
            out = emit(f"{p}.bn1", block.bn1, emit(f"{p}.binary_conv", block.binary_conv, x))
            short = x if block.downsample is None else seq(f"{p}.downsample", block.downsample, x)
            if block.nonlinear is not None and block.position == "before_add":
                out = emit(f"{p}.nonlinear", block.nonlinear, out)
            x = g.node("Add", [out, short])
            if block.nonlinear is not None and block.position == "after_add":
                x = emit(f"{p}.nonlinear", block.nonlinear, x)
    x = emit("avgpool", model.avgpool, x)
    logits = emit("fc", model.fc, x)
    g.output(logits, "logits")
    missing = [n for n in out_shape if n not in g.outputs]
    if missing:
        raise QONNXError(f"layers without a QONNX node: {', '.join(missing)}")
    outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT,
                                             list(out_shape.get(n, out_shape["fc"])))
               for n in g.outputs]
    graph = helper.make_graph(g.nodes, cfg.get("name", "refbnn"),
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x0.shape))],
                              outputs, g.inits)
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(QONNX_DOMAIN, 1)]
    proto = helper.make_model(graph, producer_name="refbnn", opset_imports=opsets)
    proto.ir_version = 8
    return proto


def export_file(src, dest, batch: int = 1) -> str:
    """``python -m refbnn.export SRC.h5 DEST.onnx --qonnx``: write the QONNX graph of a refbnn model
    file atomically (:func:`refbnn.atomicio.write_bytes_atomic`); returns ``dest``."""
    from refbnn import fileformat
    from refbnn.models import BNNResNet

    loaded = fileformat.load(src)
    if loaded.kind == "packed":
        raise QONNXError(f"{src}: a packed-only file has no latent weights; use the model file")
    net = BNNResNet(loaded.config)
    net.load_state_dict(loaded.state_dict)
    proto = to_qonnx(net, batch)
    dest = os.fspath(dest)
    write_bytes_atomic(dest, proto.SerializeToString())
    return dest


def qonnx_outputs(path, x) -> OrderedDict:
    """Run a QONNX file in QONNX's executor on NCHW ``x``; every graph output by name (``logits``
    last), float32. The graph's batch must equal ``len(x)`` (QONNX runs static shapes)."""
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx
        from qonnx.transformation.infer_shapes import InferShapes
    except ImportError:
        raise QONNXError("--against qonnx needs qonnx (the 'qonnx' extra), which is not installed") from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QONNXError(f"{path}: no such file")
    try:
        model = ModelWrapper(path)
    except Exception as e:  # protobuf and onnx raise many kinds
        raise QONNXError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if dims and dims[0] and dims[0] != len(x):
        raise QONNXError(f"{path}: graph batch {dims[0]}, input batch {len(x)} (use --batch {dims[0]})")
    model = model.transform(InferShapes())
    try:
        out = execute_onnx(model, {inp.name: np.asarray(x, np.float32)})
    except Exception as e:  # the executor raises whatever a node raises
        raise QONNXError(f"{path}: QONNX's executor failed ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:160]})") from None
    names = [o.name for o in model.graph.output]
    result = OrderedDict((n, np.asarray(out[n], np.float32)) for n in names if n != "logits")
    result["logits"] = np.asarray(out[names[-1] if "logits" not in out else "logits"], np.float32)
    return result
