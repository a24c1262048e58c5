"""refbnn: a framework-free reference implementation of 1-bit CNNs (Bi-Real Net, FTBNN).

Public entry points (see ``docs/semantics.md`` for the exact meaning of each):

* :func:`refbnn.sign`, :func:`refbnn.pack_bits`, :func:`refbnn.unpack_bits`,
  :func:`refbnn.pack_groups`, :func:`refbnn.pack_kernel`
* :func:`refbnn.bconv2d` (real NHWC input and HWIO kernel), :func:`refbnn.bconv2d_packed` and
  :class:`refbnn.BConv2DPlan` (packed operands, fused float / threshold-bits outputs)
* :func:`refbnn.bgemm`, :func:`refbnn.bgemm_packed`, :func:`refbnn.maxpool2d_packed`,
  :func:`refbnn.output_thresholds`
* :func:`refbnn.load`: a weight file, ready to ``predict(images)`` / ``predict_files(paths)``
  (:mod:`refbnn.predictor`, imported on first use)
"""

__version__ = "0.1.0"

import os as _os

# Numba's OpenMP workers (GNU libgomp) spin 300,000 PAUSEs (~6 ms on Zen 4) after every parallel
# region before sleeping; during training that spinning steals the second core from the BLAS calls
# refbnn.nn runs on its own Python threads right after. 10,000 spins (~0.2 ms) still covers the gap
# between back-to-back kernels. Measured (ftbnn18 x0.25 MNIST step, 2 threads): 220-233 img/s
# default, 244-266 img/s with this. Only read when libgomp loads, i.e. before the first parallel
# kernel runs; a value set by the user wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .ops import (
    BConv2DPlan,
    bconv2d,
    bconv2d_packed,
    bgemm,
    bgemm_packed,
    maxpool2d_packed,
    output_thresholds,
    pack_bits,
    pack_groups,
    pack_kernel,
    sign,
    unpack_bits,
)

__all__ = ["BConv2DPlan", "__version__", "bconv2d", "bconv2d_packed", "bgemm", "bgemm_packed",
           "load", "maxpool2d_packed", "output_thresholds", "pack_bits", "pack_groups", "pack_kernel",
           "sign", "unpack_bits"]


def load(path, engine: str = "packed", stem: str = "float32"):
    """Load refbnn weight file ``path`` ready to predict: a :class:`refbnn.predictor.LoadedModel`
    with ``predict(images)``, ``logits(images)`` and ``predict_files(paths)`` (shapes, dtypes and
    the image conversion: :mod:`refbnn.predictor`). ``engine``: ``"packed"`` (XNOR-popcount
    kernels) or ``"reference"`` (the float path); ``stem``: the packed engine's stem arithmetic,
    ``"float32"`` or the opt-in ``"bf16"`` (docs/semantics.md 7b). The file format, models and
    engine are imported here, on first use, so ``import refbnn`` stays light."""
    from refbnn.predictor import load as _load

    return _load(path, engine, stem)
