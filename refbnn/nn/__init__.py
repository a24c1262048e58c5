"""Training layers (NCHW, float32) with explicit forward and backward passes.

Every layer computes in the dtype of its input (float32 for training, float64 for gradient
checks); parameter and buffer names follow PyTorch so state_dicts map one to one.

Speed: convolutions are im2col + BLAS GEMMs (``functional``); BinaryConv2d's forward runs on the
packed XNOR-popcount kernels of :func:`refbnn.bconv2d`. Threads: ``numba.set_num_threads`` (or
``NUMBA_NUM_THREADS``) sets how many threads the Numba loops and the split GEMMs use; BLAS runs
single-threaded inside refbnn's GEMMs (``runtime``: the thread pool and scratch buffers).
"""

from refbnn.nn import functional, init
from refbnn.nn.activation import FPReLU, PReLU, ReLU
from refbnn.nn.batchnorm import BatchNorm1d, BatchNorm2d
from refbnn.nn.binary import BinaryConv2d, BinaryLinear
from refbnn.nn.container import ChannelRepeat, Flatten, Identity, Residual, Sequential
from refbnn.nn.conv import Conv2d, Linear
from refbnn.nn.module import Module, Parameter
from refbnn.nn.pooling import AvgPool2d, GlobalAvgPool2d, MaxPool2d

__all__ = [
    "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "BinaryConv2d", "BinaryLinear", "ChannelRepeat",
    "Conv2d", "FPReLU", "Flatten", "GlobalAvgPool2d", "Identity", "Linear", "MaxPool2d",
    "Module", "PReLU", "Parameter", "ReLU", "Residual", "Sequential", "functional", "init",
]
