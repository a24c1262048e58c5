"""A trained network as inference needs it: the resolved config plus named tensors, folded.

:func:`network_from_tensors` walks the block layout of :func:`refbnn.models.config.stage_specs`
(the single source every builder uses) and reads each layer's tensors by its state-dict name
(``conv1.weight``, ``layer{s}.{i}.bn1.running_var``, ...; ``docs/format.md``). Nothing here
builds a float model or looks at module types, so a packed-only file (sign bits and Bi-Real's
alpha, no latent weights) describes the same network as the full file.

Folding, in float32 exactly as the float path's eval-mode forward computes it:

* BatchNorm: ``inv = 1 / sqrt(var + eps)``, ``scale = gamma * inv``, ``shift = beta - mean * scale``,
  applied as ``float32(x * scale) + shift``;
* binary conv + BN: ``mul = scale`` (FTBNN) or ``float32(alpha * scale)`` (Bi-Real), ``bias = shift``;
  the output is ``float32(float32(acc) * mul) + bias`` (:class:`refbnn.ops.BConv2DPlan`, ``"float"``).
  For ``alpha = None`` this is the float path's own two roundings, hence bit-identical; with alpha
  the float path rounds ``acc * alpha`` first, so outputs agree within a few ulp.

Layouts: real conv weights ``w_hwio`` float32 ``(KH, KW, I, O)``; binary weights ``words`` uint64
OHWI ``(O, KH, KW, ceil(I/64))`` (bit 1 = -1, LSB first); the classifier ``fc_w`` ``(C, classes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refbnn.kernels import elementwise as ew
from refbnn.models.config import bridge_spec, resolve, stage_specs
from refbnn.ops import pack_kernel
from refbnn.scale import mean_abs_scale


class EngineError(ValueError):
    """A network the packed engine cannot run (e.g. ternary ``sign_at_zero=0``, missing tensors)."""


@dataclass(frozen=True)
class Act:
    """A non-linearity: ``code`` (:mod:`refbnn.kernels.elementwise`), slopes ``pos``/``neg`` (C,)."""

    kind: str
    code: int
    pos: np.ndarray
    neg: np.ndarray


@dataclass(frozen=True)
class BN:
    """Folded eval-mode BatchNorm ``y = float32(x * scale) + shift`` (float32 ``(C,)`` each)."""

    name: str
    scale: np.ndarray
    shift: np.ndarray


def fold_batchnorm(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` float32 ``(C,)`` of an eval-mode BatchNorm, computed exactly as its float32
    forward does: ``inv = 1 / sqrt(var + eps)``, ``scale = gamma * inv``, ``shift = beta - mean * scale``
    (every operation rounded to float32)."""
    f = np.float32
    inv = f(1.0) / np.sqrt(np.asarray(var).astype(f) + f(eps))
    scale = (np.asarray(gamma).astype(f) * inv).astype(f)
    shift = (np.asarray(beta).astype(f) - np.asarray(mean).astype(f) * scale).astype(f)
    return _f32(scale), _f32(shift)


def fold_batchnorm_module(bn) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fold_batchnorm` of a :class:`refbnn.nn.BatchNorm2d` (or 1d) module."""
    return fold_batchnorm(bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var, bn.eps)


@dataclass(frozen=True)
class RealConv:
    """A real conv (no bias, groups 1) followed by BatchNorm; NHWC, zero padding ``padding``."""

    name: str
    w_hwio: np.ndarray
    stride: int
    padding: int
    bn: BN


@dataclass(frozen=True)
class BinaryConv:
    """A binary conv followed by BatchNorm: ``words`` OHWI, ``alpha`` ``(O,)`` or ``None``."""

    name: str
    words: np.ndarray
    in_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    pad_value: int
    sign_at_zero: int
    alpha: np.ndarray | None
    bn: BN

    @property
    def out_channels(self) -> int:
        return self.words.shape[0]

    @property
    def mul(self) -> np.ndarray:
        """The folded multiplier: ``bn.scale`` or ``float32(alpha * bn.scale)``."""
        if self.alpha is None:
            return self.bn.scale
        return (self.alpha.astype(np.float32) * self.bn.scale).astype(np.float32)


@dataclass(frozen=True)
class Block:
    """``y = post(pre(BN(bconv(x))) + shortcut(x))``; ``shortcut``: ``None`` (identity),
    ``("real", RealConv)``, ``("binary", BinaryConv)`` or ``("repeat", times)``, the last three
    after a 2x2/2 average pool (ceil mode, in-bounds pixels only)."""

    name: str
    conv: BinaryConv
    pre: Act
    post: Act
    shortcut: tuple | None
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


@dataclass(frozen=True)
class Network:
    """The whole folded network; ``stem_pool``: 3x3/2 max-pool (padding 1) after the stem."""

    config: dict
    input_shape: tuple[int, int, int]
    stem: RealConv
    stem_hw: tuple[int, int]
    stem_pool: bool
    bridge: tuple[BinaryConv, Act] | None
    blocks: list[Block]
    fc_w: np.ndarray
    fc_b: np.ndarray | None

    def binary_convs(self) -> list[BinaryConv]:
        """Every binary conv in execution order (bridge, then per block the conv and a binary
        shortcut)."""
        out = [self.bridge[0]] if self.bridge else []
        for b in self.blocks:
            out.append(b.conv)
            if b.shortcut and b.shortcut[0] == "binary":
                out.append(b.shortcut[1])
        return out


def _f32(a):
    """A float32 C-contiguous copy (never a view of the caller's array: the engine must not change
    when the model it came from is trained further)."""
    return np.array(a, dtype=np.float32, order="C", copy=True)


class _Tensors:
    def __init__(self, tensors, packed, scales, bn_eps):
        self.t, self.packed, self.scales = tensors, packed or {}, scales or {}
        self.bn_eps = bn_eps

    def get(self, name):
        if name not in self.t:
            raise EngineError(f"missing tensor {name!r}")
        return np.asarray(self.t[name])

    def bn(self, prefix) -> BN:
        scale, shift = fold_batchnorm(*(self.get(f"{prefix}.{k}") for k in
                                        ("weight", "bias", "running_mean", "running_var")), self.bn_eps)
        return BN(prefix, scale, shift)

    def act(self, kind, prefix, channels) -> Act:
        ones = np.ones(channels, np.float32)
        if kind == "none":
            return Act(kind, ew.NONE, ones, ones)
        if kind == "relu":
            return Act(kind, ew.RELU, ones, ones)
        if kind == "prelu":
            a = np.broadcast_to(self.get(f"{prefix}.weight").astype(np.float32).reshape(-1),
                                (channels,))
            return Act(kind, ew.PRELU, ones, _f32(a))
        if kind == "fprelu":
            return Act(kind, ew.FPRELU, _f32(self.get(f"{prefix}.pos_slope")),
                       _f32(self.get(f"{prefix}.neg_slope")))
        raise EngineError(f"unsupported non-linearity {kind!r}")

    def binary(self, name, bn_prefix, cin, cout, kernel, stride, padding, groups, cfg) -> BinaryConv:
        saz = int(cfg["sign_at_zero"])
        if saz not in (1, -1):
            raise EngineError("the packed engine needs sign_at_zero +1 or -1; 0 (torch.sign) is "
                              "ternary and cannot be packed")
        wname = f"{name}.weight"
        latent = self.t.get(wname)
        words = self.packed.get(wname)
        if words is None:
            if latent is None:
                raise EngineError(f"missing tensor {wname!r} (neither latent nor packed)")
            words = pack_kernel(np.asarray(latent).transpose(2, 3, 1, 0), saz)
        words = np.ascontiguousarray(words, dtype=np.uint64)
        expect = (cout, kernel, kernel, -(-(cin // groups) // 64))
        if words.shape != expect:
            raise EngineError(f"{wname}: packed shape {words.shape}, the config needs {expect}")
        alpha = None
        if cfg["scale"] == "mean_abs":
            alpha = self.scales.get(wname)
            if alpha is None:
                if latent is None:
                    raise EngineError(f"{wname}: a scaled layer needs its latent weight or alpha")
                alpha = mean_abs_scale(np.asarray(latent, np.float32))
            alpha = _f32(np.asarray(alpha).reshape(-1))
        pad_value = int(cfg["pad_values"].get(name, cfg["pad_value"]))
        return BinaryConv(name, words, cin, kernel, stride, padding, groups, pad_value,
                          saz, alpha, self.bn(bn_prefix))


def _conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def network_from_tensors(config: dict, tensors, packed=None, scales=None) -> Network:
    """Fold a network from its config and named tensors.

    ``tensors``: state-dict name -> array (latent binary weights optional when ``packed`` has
    them); ``packed``: binary weight name -> uint64 OHWI words; ``scales``: binary weight name ->
    Bi-Real's alpha ``(O,)`` (needed for ``scale="mean_abs"`` without latent weights).
    Raises :class:`EngineError` naming a missing or mis-shaped tensor.
    """
    cfg = resolve(config)
    if cfg["conv_padding"] != "symmetric":
        raise EngineError("the packed engine runs symmetric (PyTorch-style) padding only; this model "
                          "uses conv_padding='tf' (Keras 'same'): use the float path (--engine reference)")
    t = _Tensors(tensors, packed, scales, float(cfg["bn_eps"]))
    c, h, w = cfg["input_shape"]
    k, s = cfg["stem_kernel"], cfg["stem_stride"]
    w1 = t.get("conv1.weight")
    if w1.shape != (cfg["stem_channels"], c, k, k):
        raise EngineError(f"conv1.weight has shape {w1.shape}, the config needs "
                          f"{(cfg['stem_channels'], c, k, k)}")
    stem = RealConv("conv1", _f32(w1.transpose(2, 3, 1, 0)), s, k // 2, t.bn("bn1"))
    hw = stem_hw = (_conv_out(h, k, s, k // 2), _conv_out(w, k, s, k // 2))
    if cfg["stem_pool"]:
        hw = (_conv_out(hw[0], 3, 2, 1), _conv_out(hw[1], 3, 2, 1))
    bridge = None
    b = bridge_spec(cfg)
    if b is not None:
        cin, cout, kind = b
        bridge = (t.binary("bridge.binary_conv", "bridge.bn1", cin, cout, 3, 1, 1, 1, cfg),
                  t.act(kind, "bridge.nonlinear", cout))
    blocks = []
    for si, specs in enumerate(stage_specs(cfg)):
        for bi, spec in enumerate(specs):
            p = f"layer{si + 1}.{bi}"
            conv = t.binary(f"{p}.binary_conv", f"{p}.bn1", spec.cin, spec.cout, 3, spec.stride, 1,
                            spec.groups, cfg)
            out_hw = (_conv_out(hw[0], 3, spec.stride, 1), _conv_out(hw[1], 3, spec.stride, 1))
            act = t.act(spec.nonlinearity, f"{p}.nonlinear", spec.cout)
            none = t.act("none", "", spec.cout)
            before = spec.position == "before_add"
            shortcut = None
            if spec.downsample:
                kind = cfg["downsample"]
                if kind == "real":
                    wd = t.get(f"{p}.downsample.1.weight")
                    if wd.shape != (spec.cout, spec.cin, 1, 1):
                        raise EngineError(f"{p}.downsample.1.weight has shape {wd.shape}")
                    shortcut = ("real", RealConv(f"{p}.downsample.1", _f32(wd.transpose(2, 3, 1, 0)),
                                                 1, 0, t.bn(f"{p}.downsample.2")))
                elif kind == "binary":
                    shortcut = ("binary", t.binary(f"{p}.downsample.1", f"{p}.downsample.2",
                                                   spec.cin, spec.cout, 1, 1, 0, 1, cfg))
                else:
                    shortcut = ("repeat", spec.cout // spec.cin)
            blocks.append(Block(p, conv, act if before else none, none if before else act,
                                shortcut, hw, out_hw))
            hw = out_hw
    fc_w = t.get("fc.weight")
    if fc_w.shape != (cfg["num_classes"], cfg["widths"][-1]):
        raise EngineError(f"fc.weight has shape {fc_w.shape}")
    fc_b = _f32(t.get("fc.bias")) if "fc.bias" in tensors else None
    return Network(cfg, (c, h, w), stem, stem_hw, bool(cfg["stem_pool"]), bridge, blocks,
                   _f32(fc_w.T), fc_b)


def network_from_model(model) -> Network:
    """:func:`network_from_tensors` of a :class:`refbnn.models.BNNResNet`'s config and state dict."""
    return network_from_tensors(model.config, model.state_dict())


def network_from_file(loaded) -> Network:
    """:func:`network_from_tensors` of a :class:`refbnn.fileformat.LoadedFile` (any kind)."""
    scales = {n: b.scale for n, b in loaded.binary.items() if b.scale is not None}
    return network_from_tensors(loaded.config, loaded.state_dict, dict(loaded.packed), scales)
