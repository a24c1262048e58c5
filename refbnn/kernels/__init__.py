"""Numba kernels behind :mod:`refbnn.ops` (no input validation here; ``refbnn.ops`` validates).

* :mod:`~refbnn.kernels.simd`: intrinsics emitting explicit LLVM vector IR (``<64 x T>`` sign
  compares, ``<8 x i64>`` XOR-popcount, vector epilogues).
* :mod:`~refbnn.kernels.packing`: sign-pack rows into ``uint64`` words (NaN counted), unpack.
* :mod:`~refbnn.kernels.bconv_fast` with the generated :mod:`~refbnn.kernels.bconv_tiles`
  (:mod:`~refbnn.kernels._codegen`): register-tiled binary conv on padded packed NHWC.
* :mod:`~refbnn.kernels.bconv_portable`: scalar-loop binary conv, exact on any CPU.
* :mod:`~refbnn.kernels.pool`: max-pool on packed bits. :mod:`~refbnn.kernels.dispatch`: the
  portable/fast choice. :mod:`~refbnn.kernels.plan`: :class:`BConv2DPlan`, a layer prepared for
  the kernels.
"""
