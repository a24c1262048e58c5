"""Public binary ops: validated entry points above the Numba kernels of :mod:`refbnn.kernels`.

Every op equals its NumPy oracle in :mod:`refbnn.reference` exactly (tests check it). Semantics
of sign and of a packed bit are those of :mod:`refbnn.bits`: ``sign(x) = +1`` for ``x >= 0``
(``sign_at_zero=+1``; ``-0.0`` included) or for ``x > 0`` (``sign_at_zero=-1``); bit 1 = -1; value
``c`` goes to word ``c // W`` bit ``c % W``; unused high bits are 0. NaN raises ``ValueError``.

* :mod:`~refbnn.ops.args`: argument checks, padding specs;
* :mod:`~refbnn.ops.packing`: :func:`pack_bits`, :func:`unpack_bits`, :func:`pack_groups`,
  :func:`pack_kernel`;
* :mod:`~refbnn.ops.plan`: :class:`BConv2DPlan` (a layer prepared once: validation, weight layout,
  padding correction, output transform, buffers, kernel dispatch), :func:`output_thresholds`;
* :mod:`~refbnn.ops.conv`: :func:`bconv2d` (:func:`bconv2d_nchw`), :func:`bconv2d_packed`, :func:`bgemm`,
  :func:`bgemm_packed`, :func:`maxpool2d_packed`.
"""

from ..bits import sign
from .args import resolve_padding
from .conv import bconv2d, bconv2d_nchw, bconv2d_packed, bgemm, bgemm_packed, maxpool2d_packed
from .packing import pack_bits, pack_groups, pack_kernel, unpack_bits
from .plan import BConv2DPlan, output_thresholds

__all__ = ["BConv2DPlan", "bconv2d", "bconv2d_nchw", "bconv2d_packed", "bgemm", "bgemm_packed",
           "maxpool2d_packed", "output_thresholds", "pack_bits", "pack_groups", "pack_kernel",
           "resolve_padding", "sign", "unpack_bits"]
