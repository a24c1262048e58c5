"""Loss functions returning ``(loss, dlogits)``: the value and its gradient w.r.t. the logits."""

from __future__ import annotations

import numpy as np


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy over the batch, as ``torch.nn.functional.cross_entropy``.

    ``logits`` (N, K) float32/float64, ``labels`` (N,) ints in [0, K). With smoothing ``e`` the
    target is ``(1 - e) * onehot + e / K``, so ``loss = mean_n [(1 - e) * nll_n + e * mean_k
    (-log p_nk)]``. ``log p = z - max(z) - log(sum exp(z - max(z)))`` (log-sum-exp, stable for any
    finite logits). Returns ``(loss, dlogits)``: a Python float and ``(softmax - target) / N`` in the
    dtype of ``logits``. Any NaN or infinite logit gives ``loss = nan`` and NaN gradients (never a
    finite value that hides it); bad shapes or labels raise ``ValueError``.
    """
    z = np.asarray(logits)
    if z.ndim != 2 or z.dtype not in (np.float32, np.float64):
        raise ValueError(f"logits must be a float32/float64 (N, K) array, got {z.dtype} {z.shape}")
    y = np.asarray(labels)
    n, k = z.shape
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be ({n},) integers, got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got range [{y.min()}, {y.max()}]")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if n == 0:
        raise ValueError("cross_entropy of an empty batch is undefined")
    if not np.isfinite(z).all():
        return float("nan"), np.full_like(z, np.nan)
    shifted = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    logp = shifted - lse
    rows = np.arange(n)
    nll = -logp[rows, y]
    e = float(label_smoothing)
    per = (1.0 - e) * nll - e * logp.mean(axis=1) if e else nll
    loss = float(per.astype(np.float64).mean())
    grad = np.exp(logp)
    grad[rows, y] -= z.dtype.type(1.0 - e)
    if e:
        grad -= z.dtype.type(e / k)
    grad /= z.dtype.type(n)
    return loss, grad
