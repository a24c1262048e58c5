"""Computational budget of a model, counted on the real module tree.

Convention (Bi-Real Net, FTBNN, ReActNet):

* FLOPs = multiply-accumulates of the real-valued convolutions and fully connected layers;
* BOPs  = multiply-accumulates of the binary convolutions / fully connected layers
  (a grouped layer counts ``C_in / groups`` inputs per output);
* OPs   = FLOPs + BOPs / 64 (one 64-bit XNOR-popcount word replaces 64 MACs);
* BatchNorm, sign, non-linearities, pooling, residual adds and channel duplication are not counted.

Shapes come from one eval-mode forward pass of a single zero image through the model, so the count
follows exactly the layers that run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from refbnn import nn
from refbnn.models.trace import trace


@dataclass
class LayerCost:
    name: str
    kind: str              # "real" or "binary"
    op: str                # layer class name
    out_shape: tuple
    macs: int
    flops: int
    bops: int
    params: int
    bytes_float: int       # parameters stored as float32
    bytes_packed: int      # binary weights as packed 64-bit words, the rest float32


@dataclass
class Budget:
    model: str
    input_shape: tuple
    layers: list
    flops: int
    bops: int
    ops: float
    params: int
    bytes_float: int
    bytes_packed: int

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(lc) for lc in self.layers]
        return d


def _conv_macs(layer, in_shape, out_shape) -> int:
    _, cin, _, _ = in_shape
    _, cout, oh, ow = out_shape
    kh, kw = layer.weight.shape[2:]
    return oh * ow * cout * (cin // layer.groups) * kh * kw


def _packed_bytes(weight_shape) -> int:
    o, cg, kh, kw = weight_shape if len(weight_shape) == 4 else (*weight_shape, 1, 1)
    return o * kh * kw * (-(-cg // 64)) * 8


def layer_cost(name, layer, in_shape, out_shape) -> LayerCost | None:
    """Cost of one leaf layer for one image, or ``None`` for a layer with no parameters and no MACs."""
    params = sum(p.data.size for p in layer.parameters())
    binary = isinstance(layer, (nn.BinaryConv2d, nn.BinaryLinear))
    if isinstance(layer, (nn.Conv2d, nn.BinaryConv2d)):
        macs = _conv_macs(layer, in_shape, out_shape)
    elif isinstance(layer, (nn.Linear, nn.BinaryLinear)):
        macs = int(layer.weight.shape[0] * layer.weight.shape[1])
    else:
        macs = 0
    if macs == 0 and params == 0:
        return None
    packed = 4 * params
    if binary:
        w = layer.weight.data
        packed = _packed_bytes(w.shape) + 4 * (params - w.size)
    return LayerCost(name=name, kind="binary" if binary else "real", op=type(layer).__name__,
                     out_shape=tuple(int(v) for v in out_shape[1:]), macs=macs,
                     flops=0 if binary else macs, bops=macs if binary else 0, params=params,
                     bytes_float=4 * params, bytes_packed=packed)


def count(model, input_shape=None, name=None) -> Budget:
    """Budget of ``model`` (a refbnn ``Module`` with ``config``) for one ``input_shape`` image."""
    input_shape = tuple(input_shape or model.config["input_shape"])
    records = [(name, layer, np.shape(x), np.shape(y))
               for name, layer, x, y in trace(model, np.zeros((1, *input_shape), np.float32))]
    layers = [c for c in (layer_cost(*r) for r in records) if c is not None]
    flops = sum(c.flops for c in layers)
    bops = sum(c.bops for c in layers)
    return Budget(model=name or model.config.get("name", "model"), input_shape=input_shape,
                  layers=layers, flops=flops, bops=bops, ops=flops + bops / 64,
                  params=sum(c.params for c in layers), bytes_float=sum(c.bytes_float for c in layers),
                  bytes_packed=sum(c.bytes_packed for c in layers))
