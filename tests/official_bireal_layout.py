"""A PyTorch Bi-Real Net in the official code's checkpoint layout, written for refbnn's tests from the
layout's description (docs/crosscheck.md; not the official code): the same module names and tensor
shapes as github liuzechun/Bi-Real-net's ``birealnet.py`` and the behaviour the tests rely on:

* ``layerS.B.binary_activation``: ``torch.sign`` forward (0 at 0) through a straight-through
  estimator written as ``hard + (soft - soft)``-style arithmetic, so the forward values are +-1/0 up
  to float rounding, as in the official code;
* ``layerS.B.binary_conv.weights``: the latent weights flat, ``(O*I*3*3, 1)``, used as
  ``mean|W| * sign(W)`` per output channel (float32 mean, like PyTorch) with a clipped STE;
* ``bn1``, ``downsample = Sequential(AvgPool2d(2, 2), Conv2d 1x1, BatchNorm2d)``, and the residual
  added in place (``out += residual``), which is why hooks must copy what they record;
* stem 7x7/2 conv + BN + 3x3/2 max-pool at any input size, global average pool, ``fc``.

``birealnet18(num_classes=10, width=8)`` is small for tests; the official network is ``width=64``,
``num_classes=1000``.
"""

import torch
import torch.nn.functional as F
from torch import nn


class BinaryActivation(nn.Module):
    def forward(self, x):
        hard = torch.sign(x)
        # ApproxSign's piecewise-quadratic surrogate (its derivative is 2 - 2|x| on |x| < 1)
        soft = torch.clamp(2 * x - x * x.abs(), -1.0, 1.0)
        soft = torch.where(x.abs() < 1, soft, hard)
        return soft + (hard - soft).detach()


class FlatBinaryConv(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.shape = (cout, cin, 3, 3)
        self.stride = stride
        self.weights = nn.Parameter(torch.rand(cout * cin * 9, 1) * 1e-3)

    def forward(self, x):
        w = self.weights.view(self.shape)
        alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True).detach()
        clipped = torch.clamp(w, -1.0, 1.0)
        wq = clipped + (alpha * torch.sign(w) - clipped).detach()
        return F.conv2d(x, wq, stride=self.stride, padding=1)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.binary_activation = BinaryActivation()
        self.binary_conv = FlatBinaryConv(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, stride), nn.Conv2d(cin, cout, 1, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.binary_conv(self.binary_activation(x)))
        out += x if self.downsample is None else self.downsample(x)
        return out


class Net(nn.Module):
    def __init__(self, blocks, num_classes, width, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for s, n in enumerate(blocks):
            cout = width * 2 ** s
            layers = [Block(cin if i == 0 else cout, cout, 2 if (i == 0 and s) else 1) for i in range(n)]
            self.add_module(f"layer{s + 1}", nn.Sequential(*layers))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        for s in range(1, 5):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def birealnet18(num_classes=10, width=8):
    return Net([4, 4, 4, 4], num_classes, width)


def birealnet34(num_classes=10, width=8):
    return Net([6, 8, 12, 6], num_classes, width)
