"""refbnn: a framework-free reference implementation of 1-bit CNNs (Bi-Real Net, FTBNN).

Public entry points (see ``docs/semantics.md`` for the exact meaning of each):

* :func:`refbnn.sign`, :func:`refbnn.pack_bits`, :func:`refbnn.unpack_bits`,
  :func:`refbnn.pack_groups`
* :func:`refbnn.bconv2d` (real NHWC input and HWIO kernel) and :func:`refbnn.bconv2d_packed`
"""

__version__ = "0.1.0"

from .ops import pack_bits, pack_groups, sign, unpack_bits

__all__ = ["__version__", "pack_bits", "pack_groups", "sign", "unpack_bits"]
