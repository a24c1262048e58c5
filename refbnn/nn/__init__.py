"""Training layers (NCHW, float32) with explicit forward and backward passes."""

from refbnn.nn.module import Module, Parameter

__all__ = ["Module", "Parameter"]
