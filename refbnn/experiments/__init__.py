"""Reproducible studies built on refbnn (layer 7: may import every layer below).

``python -m refbnn.experiments.nonlinearity``: FTBNN's MNIST study of non-linearity (Figure 2),
see ``docs/nonlinearity.md``.
"""
