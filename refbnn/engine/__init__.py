"""The packed inference engine: a trained Bi-Real / FTBNN network compiled for fast CPU inference.

* :mod:`refbnn.engine.network`: the network as inference needs it, folded from the resolved config
  plus named tensors (any refbnn file, packed-only included, or a model's state dict);
* :mod:`refbnn.engine.runtime`: :class:`Engine`, which runs it NHWC on refbnn's kernels with every
  buffer allocated once per (batch size, threads), fused epilogues and threaded real-valued stages.

``Engine.from_file(path)``, ``Engine.from_model(model)``; ``compile_model(model)`` is the same as
``Engine.from_model``. ``stem="bf16"`` (opt-in, :data:`STEM_PRECISIONS`) runs the real stem in
bfloat16 (docs/semantics.md 7b); everything below is about the default, ``"float32"``.

Agreement with the float training path (eval mode): for ``scale="none"`` models (FTBNN) every binary
layer's output equals the float path's exactly, because ``acc`` is an exact integer and the float
path computes ``acc * scale + shift`` with the same two roundings; the residual adds, the
non-linearities, the max-pool and the 2x2 average pool are the same float32 operations in the same
order. The real convolutions (stem, 1x1 shortcuts, classifier) and the global average pool sum in
another order (FMA micro-kernels vs BLAS), a few float32 ulp, which can flip a sign at a binary
input whose real value is within that rounding of 0. ``tests/test_engine.py`` states and checks
the bound.
"""

from refbnn.engine.network import (
    EngineError,
    Network,
    fold_batchnorm,
    fold_batchnorm_module,
    network_from_file,
    network_from_model,
    network_from_tensors,
)
from refbnn.engine.runtime import STEM_PRECISIONS, Engine, compile_model, stage_threads

__all__ = ["STEM_PRECISIONS", "Engine", "EngineError", "Network", "compile_model", "fold_batchnorm",
           "fold_batchnorm_module",
           "network_from_file",
           "network_from_model", "network_from_tensors", "stage_threads"]
