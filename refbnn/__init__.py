"""refbnn: a framework-free reference implementation of 1-bit CNNs (Bi-Real Net, FTBNN).

Public entry points (see ``docs/semantics.md`` for the exact meaning of each):

* :func:`refbnn.sign`, :func:`refbnn.pack_bits`, :func:`refbnn.unpack_bits`,
  :func:`refbnn.pack_groups`, :func:`refbnn.pack_kernel`
* :func:`refbnn.bconv2d` (real NHWC input and HWIO kernel), :func:`refbnn.bconv2d_packed` and
  :class:`refbnn.BConv2DPlan` (packed operands, fused float / threshold-bits outputs)
* :func:`refbnn.bgemm`, :func:`refbnn.bgemm_packed`, :func:`refbnn.maxpool2d_packed`,
  :func:`refbnn.output_thresholds`
"""

__version__ = "0.1.0"

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
           "maxpool2d_packed", "output_thresholds", "pack_bits", "pack_groups", "pack_kernel",
           "sign", "unpack_bits"]
