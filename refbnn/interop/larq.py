"""Larq (Keras) models in: a Larq/Keras Bi-Real-style model to a refbnn config and state dict,
and Keras's own layer-by-layer outputs for ``crosscheck --against keras``.

Needs ``tensorflow``, ``tf-keras`` and ``larq`` (the optional extra ``larq``; ``TF_USE_LEGACY_KERAS=1``
is set here before TensorFlow is imported). What converts is refbnn's network family in Keras
form, as larq_zoo's ``BiRealNet`` writes it (NHWC, HWIO kernels)::

    Conv2D stem (no bias, "same") -> BatchNormalization -> [MaxPool2D 3x3/2 "same"]
    blocks: QuantConv2D 3x3 ("same", no bias) -> BatchNormalization -> Add(shortcut)
            shortcut of a block whose stride or width changes:
            AvgPool2D 2x2/2 -> Conv2D 1x1 (real, no bias) or QuantConv2D 1x1 -> BatchNormalization
    GlobalAveragePooling2D -> [Flatten] -> Dense (bias) -> [Activation softmax / linear]

``QuantConv2D``: ``input_quantizer`` ``ste_sign`` (``act_grad="ste"``; ``clip_value=None``:
``"identity"``) or ``approx_sign``; ``kernel_quantizer`` ``ste_sign`` (``scale="none"``) or
``magnitude_aware_sign`` (``scale="mean_abs"``, Bi-Real's per-channel mean |W|); ``weight_clip``
(a training constraint, nothing to convert); ``pad_values`` 0 or 1 per layer; ``groups``. Signs are
``x >= 0 -> +1`` (``sign_at_zero=1``). BatchNorm epsilon becomes ``bn_eps`` (one for all), the
padding ``conv_padding="tf"``. A final softmax is dropped: refbnn outputs logits. Any other layer,
or an option outside this list, raises :class:`UnsupportedModel` naming the layer and its class.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict

import numpy as np


class UnsupportedModel(ValueError):
    """A Keras model, layer or option refbnn cannot express; the message names the layer."""


def import_tf():
    """``(tensorflow, larq)``, with Keras 2 (``tf-keras``) selected; ``UnsupportedModel`` if absent."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import larq
        import tensorflow as tf
    except ImportError as e:
        raise UnsupportedModel(f"needs tensorflow, tf-keras and larq (the 'larq' extra): {e}") from None
    return tf, larq


def load_keras(path):
    """Load a Keras ``.h5`` / ``.keras`` model with Larq's custom objects, uncompiled."""
    tf, larq = import_tf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UnsupportedModel(f"{path}: no such file")
    try:
        with larq.context.quantized_scope(False):
            return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UnsupportedModel(f"{path}: not a loadable Keras model ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]})") from None


_ALIASES = {"MaxPooling2D": "MaxPool2D", "AveragePooling2D": "AvgPool2D",
            "GlobalAveragePooling2D": "GlobalAvgPool2D"}


def _cls(layer) -> str:
    """The layer's class name, Keras's aliases folded (``MaxPooling2D`` is ``MaxPool2D``)."""
    name = type(layer).__name__
    return _ALIASES.get(name, name)


def _unsupported(layer, why=""):
    return UnsupportedModel(f"layer {layer.name!r} ({type(layer).__name__}) is not supported"
                            + (f": {why}" if why else ""))


def _quantizer_name(q):
    if q is None:
        return None, None
    name = getattr(q, "__name__", None) or _cls(q)
    clip = getattr(q, "clip_value", 1.0)
    key = {"ste_sign": "ste_sign", "SteSign": "ste_sign", "approx_sign": "approx_sign",
           "ApproxSign": "approx_sign", "magnitude_aware_sign": "magnitude_aware_sign",
           "MagnitudeAwareSign": "magnitude_aware_sign"}.get(name)
    return key, clip


def _inbound(layer):
    """Names of the layers feeding ``layer`` (its first inbound node)."""
    node = layer.inbound_nodes[0]
    inbound = node.inbound_layers
    return [inbound.name] if not isinstance(inbound, (list, tuple)) else [x.name for x in inbound]


class _Walker:
    """Reads the model's layers in order, checking each against the expected pattern."""

    def __init__(self, model):
        self.layers = [la for la in model.layers if _cls(la) != "InputLayer"]
        self.i = 0

    def peek(self):
        return self.layers[self.i] if self.i < len(self.layers) else None

    def take(self, *classes, why=""):
        layer = self.peek()
        if layer is None:
            raise UnsupportedModel(f"the model ends before a {' or '.join(classes)} ({why})")
        if _cls(layer) not in classes:
            raise _unsupported(layer, f"expected {' or '.join(classes)} here ({why})")
        self.i += 1
        return layer


def _bn_state(layer, prefix, state, eps_seen):
    if _cls(layer) != "BatchNormalization":
        raise _unsupported(layer, "expected BatchNormalization")
    if list(layer.axis) not in ([3], [-1]):
        raise _unsupported(layer, f"BatchNormalization over axis {layer.axis}, not channels")
    w = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in layer.weights}
    c = w["moving_mean"].shape[0]
    state[f"{prefix}.weight"] = w.get("gamma", np.ones(c, np.float32)).astype(np.float32)
    state[f"{prefix}.bias"] = w.get("beta", np.zeros(c, np.float32)).astype(np.float32)
    state[f"{prefix}.running_mean"] = w["moving_mean"].astype(np.float32)
    state[f"{prefix}.running_var"] = w["moving_variance"].astype(np.float32)
    state[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)
    eps_seen.append(float(layer.epsilon))


def _real_conv(layer, prefix, state, kernel, stride, padding):
    if _cls(layer) != "Conv2D":
        raise _unsupported(layer, "expected a real Conv2D")
    if layer.use_bias:
        raise _unsupported(layer, "a real conv with a bias (refbnn's have none; BN follows)")
    if tuple(layer.kernel_size) != (kernel, kernel) or tuple(layer.strides) != (stride, stride) \
            or layer.padding != padding or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise _unsupported(layer, f"needs kernel {kernel}x{kernel}, stride {stride}, padding "
                                  f"{padding!r}, no dilation or groups")
    if getattr(layer, "activation", None) is not None and layer.activation.__name__ != "linear":
        raise _unsupported(layer, f"activation {layer.activation.__name__}")
    state[f"{prefix}.weight"] = layer.get_weights()[0].transpose(3, 2, 0, 1).astype(np.float32)


def _binary_conv(layer, prefix, state, info, kernel, stride):
    if _cls(layer) != "QuantConv2D":
        raise _unsupported(layer, "expected a Larq QuantConv2D")
    iq, clip = _quantizer_name(layer.input_quantizer)
    kq, _ = _quantizer_name(layer.kernel_quantizer)
    if iq not in ("ste_sign", "approx_sign"):
        raise _unsupported(layer, f"input_quantizer {iq or layer.input_quantizer!r}; "
                                  "ste_sign or approx_sign")
    if kq not in ("ste_sign", "magnitude_aware_sign"):
        raise _unsupported(layer, f"kernel_quantizer {kq or layer.kernel_quantizer!r}; "
                                  "ste_sign or magnitude_aware_sign")
    if layer.use_bias:
        raise _unsupported(layer, "a binary conv with a bias")
    if tuple(layer.kernel_size) != (kernel, kernel) or tuple(layer.strides) != (stride, stride) \
            or tuple(layer.dilation_rate) != (1, 1):
        raise _unsupported(layer, f"needs kernel {kernel}x{kernel}, stride {stride}, no dilation")
    if kernel > 1 and layer.padding != "same":
        raise _unsupported(layer, f"padding {layer.padding!r}; refbnn's 3x3 binary convs pad 'same'")
    pad = float(getattr(layer, "pad_values", 0.0))
    if pad not in (0.0, 1.0):
        raise _unsupported(layer, f"pad_values {pad}; 0 or 1")
    if getattr(layer, "activation", None) is not None and layer.activation.__name__ != "linear":
        raise _unsupported(layer, f"activation {layer.activation.__name__}")
    act = {"approx_sign": "approx_sign", "ste_sign": "ste" if clip is not None else "identity"}[iq]
    info.append({"name": prefix, "layer": layer.name, "act_grad": act,
                 "scale": "mean_abs" if kq == "magnitude_aware_sign" else "none",
                 "pad_value": int(pad), "groups": int(layer.groups)})
    state[f"{prefix}.weight"] = layer.get_weights()[0].transpose(3, 2, 0, 1).astype(np.float32)


def _uniform(info, key, what):
    values = {i[key] for i in info}
    if len(values) > 1:
        first = next(i for i in info if i[key] != info[0][key])
        raise UnsupportedModel(f"layer {first['layer']!r} (QuantConv2D): {what} {first[key]!r} differs "
                               f"from {info[0]['layer']!r}'s {info[0][key]!r} (one value per network)")
    return values.pop()


def from_keras(model):
    """``(config, state_dict, layer_map)`` for a Keras model of the supported form (module doc):
    a refbnn config (``conv_padding="tf"``, ``bn_eps``, ``pad_values``), a state dict in refbnn's
    names (OIHW kernels, ``(out, in)`` Dense weight), and ``{refbnn layer: Keras layer name}``."""
    shape = model.input_shape
    if isinstance(shape, list) or len(shape) != 4 or None in shape[1:]:
        raise UnsupportedModel(f"model input {shape}: needs one fixed-size NHWC image input")
    h, w, c = (int(v) for v in shape[1:])
    walk, state, info, eps, names = _Walker(model), OrderedDict(), [], [], OrderedDict()
    stem = walk.take("Conv2D", why="the real stem conv")
    k, s = int(stem.kernel_size[0]), int(stem.strides[0])
    _real_conv(stem, "conv1", state, k, s, "same")
    names["conv1"] = stem.name
    bn = walk.take("BatchNormalization", why="the stem's BatchNorm")
    _bn_state(bn, "bn1", state, eps)
    names["bn1"] = bn.name
    stem_pool = False
    if walk.peek() is not None and _cls(walk.peek()) == "MaxPool2D":
        pool = walk.take("MaxPool2D")
        if tuple(pool.pool_size) != (3, 3) or tuple(pool.strides) != (2, 2) or pool.padding != "same":
            raise _unsupported(pool, "the stem max-pool must be 3x3, stride 2, 'same'")
        stem_pool = True
        names["maxpool"] = pool.name
    prev = int(stem.filters)
    stages, downsample = [], set()
    while walk.peek() is not None and _cls(walk.peek()) != "GlobalAvgPool2D":
        si, bi = (len(stages), 0) if not stages else (len(stages) - 1, len(stages[-1]))
        block = []  # the layers up to and including this block's Add
        while True:
            layer = walk.take("QuantConv2D", "BatchNormalization", "AvgPool2D", "Conv2D", "Add",
                              why="a residual block")
            block.append(layer)
            if _cls(layer) == "Add":
                break
        convs = [la for la in block if _cls(la) == "QuantConv2D" and la.kernel_size[0] == 3]
        if len(convs) != 1:
            raise _unsupported(block[-1], "a block needs exactly one 3x3 QuantConv2D")
        main = convs[0]
        stride = int(main.strides[0])
        cout = int(main.filters)
        if stride == 2 or not stages:
            stages.append([])
            si, bi = len(stages) - 1, 0
        prefix = f"layer{si + 1}.{bi}"
        main_bn = next((la for la in block if _cls(la) == "BatchNormalization"
                        and _inbound(la) == [main.name]), None)
        if main_bn is None:
            raise _unsupported(main, "its output must feed a BatchNormalization")
        _binary_conv(main, f"{prefix}.binary_conv", state, info, 3, stride)
        _bn_state(main_bn, f"{prefix}.bn1", state, eps)
        names[f"{prefix}.binary_conv"], names[f"{prefix}.bn1"] = main.name, main_bn.name
        rest = [la for la in block if la not in (main, main_bn, block[-1])]
        if rest:
            kinds = [_cls(la) for la in rest]
            if len(rest) != 3 or kinds[0] != "AvgPool2D" or \
                    kinds[2] != "BatchNormalization" or kinds[1] not in ("Conv2D", "QuantConv2D"):
                raise _unsupported(rest[0], "the shortcut must be AvgPool2D -> 1x1 conv -> BatchNorm")
            pool = rest[0]
            if tuple(pool.pool_size) != (2, 2) or tuple(pool.strides) != (2, 2) or pool.padding != "same":
                raise _unsupported(pool, "the shortcut pool must be 2x2, stride 2, 'same'")
            if kinds[1] == "Conv2D":
                _real_conv(rest[1], f"{prefix}.downsample.1", state, 1, 1, "valid")
                downsample.add("real")
            else:
                _binary_conv(rest[1], f"{prefix}.downsample.1", state, info, 1, 1)
                downsample.add("binary")
            _bn_state(rest[2], f"{prefix}.downsample.2", state, eps)
            for j, la in enumerate(rest):
                names[f"{prefix}.downsample.{j}"] = la.name
        elif stride != 1 or cout != prev:
            raise _unsupported(block[-1], "a block that changes stride or width needs a shortcut conv")
        if len(_inbound(block[-1])) != 2:
            raise _unsupported(block[-1], "Add must have two inputs (branch and shortcut)")
        stages[-1].append({"cout": cout, "groups": int(main.groups), "stride": stride})
        names[prefix] = block[-1].name
        prev = cout
    if not stages:
        raise UnsupportedModel("the model has no residual block of QuantConv2D layers")
    gap = walk.take("GlobalAvgPool2D", why="the head")
    names["avgpool"] = gap.name
    if walk.peek() is not None and _cls(walk.peek()) == "Flatten":
        walk.take("Flatten")
    dense = walk.take("Dense", why="the classifier")
    if not dense.use_bias or dense.activation.__name__ not in ("linear", "softmax"):
        raise _unsupported(dense, "the classifier needs a bias and no activation (softmax is dropped)")
    kernel, bias = dense.get_weights()
    state["fc.weight"] = kernel.T.astype(np.float32)
    state["fc.bias"] = bias.astype(np.float32)
    names["fc"] = dense.name
    while walk.peek() is not None:
        tail = walk.take("Activation", "Softmax", why="only a final softmax may follow Dense")
        if _cls(tail) == "Activation" and tail.activation.__name__ not in ("softmax", "linear"):
            raise _unsupported(tail, f"activation {tail.activation.__name__} after the classifier")
    if len(set(eps)) > 1:
        raise UnsupportedModel(f"BatchNormalization epsilons differ ({sorted(set(eps))}); "
                               "refbnn has one bn_eps per network")
    if len(downsample) > 1:
        raise UnsupportedModel("the shortcuts mix real and binary 1x1 convs; refbnn has one kind")
    main_info = [i for i in info if i["name"].endswith("binary_conv")]
    pads = Counter(i["pad_value"] for i in info)
    pad_value = pads.most_common(1)[0][0]
    groups = {b["groups"] for st in stages for b in st if b["stride"] == 1} or {1}
    rgroups = {b["groups"] for st in stages for b in st if b["stride"] == 2} or {1}
    if len(groups) > 1 or len(rgroups) > 1:
        raise UnsupportedModel("the 3x3 QuantConv2D groups vary between blocks; refbnn has one "
                               "groups value for stride-1 blocks and one for stride-2 blocks")
    config = {
        "name": model.name, "input_shape": [c, h, w], "num_classes": int(dense.units),
        "stem_channels": int(stem.filters), "stem_kernel": k, "stem_stride": s, "stem_pool": stem_pool,
        "bridge_channels": None, "widths": [st[0]["cout"] for st in stages],
        "blocks": [len(st) for st in stages], "groups": groups.pop(), "reduction_groups": rgroups.pop(),
        "downsample": downsample.pop() if downsample else "real",
        "scale": _uniform(info, "scale", "kernel_quantizer scale"),
        "nonlinearity": "none", "sign_at_zero": 1,
        "act_grad": _uniform(main_info, "act_grad", "input_quantizer"),
        "pad_value": pad_value, "conv_padding": "tf", "bn_eps": eps[0] if eps else 1e-3,
        "pad_values": {i["name"]: i["pad_value"] for i in info if i["pad_value"] != pad_value},
    }
    return config, state, names


def keras_outputs(model, names: dict, x_nchw) -> OrderedDict:
    """Every mapped Keras layer's output for refbnn's NCHW batch ``x_nchw``, as NCHW (or (N, F))
    float32 under refbnn's layer names; ``logits`` is the Dense output (before any softmax)."""
    tf, _ = import_tf()
    layers = [model.get_layer(n) for n in names.values()]
    probe = tf.keras.Model(model.inputs, [la.output for la in layers])
    outs = probe(np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1)),
                 training=False)
    result = OrderedDict()
    for key, y in zip(names, outs if isinstance(outs, (list, tuple)) else [outs]):
        y = np.asarray(y)
        result[key] = y.transpose(0, 3, 1, 2) if y.ndim == 4 else y
    result["logits"] = result["fc"]
    return result


def keras_inputs(model, names: dict, x_nchw) -> dict:
    """The pre-sign input of every mapped QuantConv2D (refbnn names), NCHW, for counting flips."""
    tf, _ = import_tf()
    keys = [k for k in names if k.endswith("binary_conv") or (
        k.endswith("downsample.1") and _cls(model.get_layer(names[k])) == "QuantConv2D")]
    if not keys:
        return {}
    probe = tf.keras.Model(model.inputs, [model.get_layer(names[k]).input for k in keys])
    outs = probe(np.ascontiguousarray(np.asarray(x_nchw, np.float32).transpose(0, 2, 3, 1)),
                 training=False)
    outs = outs if isinstance(outs, (list, tuple)) else [outs]
    return {k: np.asarray(y).transpose(0, 3, 1, 2) for k, y in zip(keys, outs)}


def convert_file(src, dest) -> dict:
    """``python -m refbnn.convert larq SRC DEST``: convert a Keras file to a refbnn model file;
    returns the config. Raises :class:`UnsupportedModel` or refbnn's config/format errors."""
    from refbnn import fileformat
    from refbnn.models import BNNResNet

    config, state, _ = from_keras(load_keras(src))
    net = BNNResNet(config)
    net.load_state_dict(state)
    fileformat.save_model(dest, net.state_dict(), config=net.config,
                          binary_weights=net.binary_weights(),
                          provenance={"converted_from": os.path.basename(os.fspath(src)),
                                      "converter": "refbnn.interop.larq"})
    return net.config


def to_keras(net):
    """The Keras (Larq) model of a built refbnn ``BNNResNet`` in Keras's conventions, weights
    included: the inverse of :func:`from_keras` (no softmax: it outputs logits). Needs
    ``conv_padding="tf"``, ``sign_at_zero=1``, pad values 0/+1, no non-linearity, no bridge and a
    real or binary shortcut; anything else raises :class:`UnsupportedModel`."""
    tf, larq = import_tf()
    cfg = net.config
    problems = [msg for bad, msg in [
        (cfg["conv_padding"] != "tf", "conv_padding must be 'tf' (Keras 'same')"),
        (cfg["sign_at_zero"] != 1, "Larq's quantizers map x >= 0 to +1: sign_at_zero must be 1"),
        (any(k != "none" for k in cfg["nonlinearity"]), "non-linearities have no Larq form here"),
        (cfg["bridge_channels"] is not None, "the derived models' bridge has no Larq form here"),
        (cfg["downsample"] == "cheap", "the cheap (channel-repeat) shortcut has no Larq form here"),
        (cfg["pad_value"] == -1 or -1 in cfg["pad_values"].values(), "Larq pads with 0 or +1 only"),
    ] if bad]
    if problems:
        raise UnsupportedModel(f"{cfg['name']}: not expressible in Larq/Keras: {problems[0]}")
    state = net.state_dict()
    layers = tf.keras.layers
    iq = {"approx_sign": "approx_sign", "ste": "ste_sign",
          "identity": larq.quantizers.SteSign(clip_value=None)}[cfg["act_grad"]]
    kq = "magnitude_aware_sign" if cfg["scale"] == "mean_abs" else "ste_sign"
    eps = float(cfg["bn_eps"])
    weights = {}  # keras layer -> arrays to set once the model is built

    def bn(x, prefix):
        layer = layers.BatchNormalization(epsilon=eps)
        weights[layer] = [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
        return layer(x)

    def qconv(x, prefix, cout, k, stride, groups):
        pad = float(cfg["pad_values"].get(prefix, cfg["pad_value"]))
        layer = larq.layers.QuantConv2D(cout, k, strides=stride, padding="same" if k > 1 else "valid",
                                        pad_values=pad, groups=groups, input_quantizer=iq,
                                        kernel_quantizer=kq, kernel_constraint="weight_clip",
                                        use_bias=False)
        weights[layer] = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        return layer(x)

    c, h, w = cfg["input_shape"]
    inp = tf.keras.Input((h, w, c))
    stem = layers.Conv2D(cfg["stem_channels"], cfg["stem_kernel"], strides=cfg["stem_stride"], padding="same",
                         use_bias=False)
    weights[stem] = [state["conv1.weight"].transpose(2, 3, 1, 0)]
    x = bn(stem(inp), "bn1")
    if cfg["stem_pool"]:
        x = layers.MaxPool2D(3, strides=2, padding="same")(x)
    from refbnn.models.config import stage_specs

    for si, specs in enumerate(stage_specs(cfg)):
        for bi, b in enumerate(specs):
            p = f"layer{si + 1}.{bi}"
            short = x
            if b.downsample:
                short = layers.AvgPool2D(2, strides=2, padding="same")(short)
                if cfg["downsample"] == "real":
                    conv = layers.Conv2D(b.cout, 1, use_bias=False)
                    weights[conv] = [state[f"{p}.downsample.1.weight"].transpose(2, 3, 1, 0)]
                    short = conv(short)
                else:
                    short = qconv(short, f"{p}.downsample.1", b.cout, 1, 1, 1)
                short = bn(short, f"{p}.downsample.2")
            y = bn(qconv(x, f"{p}.binary_conv", b.cout, 3, b.stride, b.groups), f"{p}.bn1")
            x = layers.add([y, short])
    x = layers.GlobalAveragePooling2D()(x)
    fc = layers.Dense(cfg["num_classes"])
    weights[fc] = [state["fc.weight"].T, state["fc.bias"]]
    model = tf.keras.Model(inp, fc(x), name=str(cfg["name"]))
    for layer, arrays in weights.items():
        layer.set_weights([np.asarray(a, np.float32) for a in arrays])
    return model
