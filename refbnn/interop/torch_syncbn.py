"""BatchNorm over the global batch of a ``torch.distributed`` run, on any device.

``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13: "expected input tensor to be on GPU"),
so gloo runs on CPU use :class:`GlobalBatchNorm2d`; :func:`sync_batchnorm` picks
``torch.nn.SyncBatchNorm`` on CUDA and it elsewhere. Both compute, in training mode, the statistics
of the union of every rank's batch, so ``W`` ranks with batch ``b`` each normalise like one rank
with batch ``W * b`` (up to float summation order), and their gradients are those of the global
batch (the all-reduce's backward sums every rank's contribution).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllReduceSum(torch.autograd.Function):
    """``dist.all_reduce`` (sum) of a copy; its backward is the all-reduce of the gradient (the
    gradient of ``sum over ranks`` reaches every rank's input)."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def all_reduce_sum(x):
    """Differentiable sum over ranks (what the deprecated ``torch.distributed.nn.functional
    .all_reduce`` does)."""
    return _AllReduceSum.apply(x)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with training statistics over every rank's batch (same parameters,
    buffers and names, so state dicts are interchangeable).

    Per channel, with ``M`` = the global number of values (batch x H x W summed over ranks):
    ``mean = allreduce(sum x) / M``, ``var = allreduce(sum (x - mean)^2) / M`` (two passes, float32
    as the input), ``y = (x - mean) / sqrt(var + eps) * weight + bias``. The running statistics
    follow ``nn.BatchNorm2d`` with the global values: ``running_var`` gets ``var * M / (M - 1)``.
    The all-reduces are differentiable (:func:`all_reduce_sum`). Without an
    initialised process group, or in eval mode, it is ``nn.BatchNorm2d``.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), x.new_tensor([x.numel() / c])])
        total = all_reduce_sum(local)
        m = total[c].detach()
        mean = total[:c] / m
        d = x - mean.view(1, c, 1, 1)
        var = all_reduce_sum((d * d).sum(dim=(0, 2, 3))) / m
        y = d * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                unbiased = var.detach() * (m / (m - 1)) if m > 1 else var.detach()
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        return y


def convert_batchnorm(module: nn.Module, cls=GlobalBatchNorm2d) -> nn.Module:
    """``module`` with every plain ``nn.BatchNorm2d`` replaced, in place, by ``cls`` carrying the
    same parameters and buffers (the same objects: an optimizer built before stays valid)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = cls(child.num_features, child.eps, child.momentum, child.affine,
                      child.track_running_stats)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            module.add_module(name, new)
        else:
            convert_batchnorm(child, cls)
    return module


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Global-batch BatchNorm for ``device``: ``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm2d` elsewhere (in place for the latter)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return convert_batchnorm(module)
