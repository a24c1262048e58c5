"""Numba kernels behind :mod:`refbnn.ops`: pure compute, no input validation (``refbnn.ops``
validates, lays out and dispatches; :class:`refbnn.ops.plan.BConv2DPlan` builds the records the
conv kernels read).

* :mod:`~refbnn.kernels.simd`: generic intrinsics emitting explicit LLVM vector IR (``<64 x T>``
  sign compares, ``<8 x i64>`` XOR-popcount, raw-address loads and stores).
* :mod:`~refbnn.kernels.epilogue`: the output transform (int32, float, LCE float, threshold bits):
  its parameters, its scalar code and its vector intrinsics, for every path.
* :mod:`~refbnn.kernels.padding`: the padding correction (border classes, correction tables).
* :mod:`~refbnn.kernels.packing`: sign-pack rows and HWIO kernels into ``uint64`` words (NaN
  counted), unpack, sums of packed signs.
* :mod:`~refbnn.kernels.bconv_fast` with the generated :mod:`~refbnn.kernels.bconv_tiles`
  (:mod:`~refbnn.kernels._codegen`): register-tiled binary conv on padded packed NHWC.
* :mod:`~refbnn.kernels.bconv_portable`: scalar-loop binary conv, exact on any CPU (imports
  nothing of the fast path).
* :mod:`~refbnn.kernels.pool`: max-pool on packed bits. :mod:`~refbnn.kernels.elementwise`: fused
  float32 non-linearity / residual passes of the engine. :mod:`~refbnn.kernels.dispatch`: the
  portable/fast choice.

``python refbnn/kernels/_codegen.py`` regenerates the generated code and stamps every
``DEPS_DIGEST`` (the Numba cache keys of modules that import other kernel modules).

Calls between jitted functions pass plain ``int64``/``bool`` scalars and every parameter: a constant
(``0``, ``True``) reaches the callee as a Numba literal type and an omitted argument as a type of its
own, and each new combination compiles the callee and everything it calls again (the binary-conv
tree is tens of seconds cold); write ``np.int64(0)``, ``np.bool_(True)``
(``tests/test_kernels_misc.py`` checks the binary-conv tree's call sites).
"""
