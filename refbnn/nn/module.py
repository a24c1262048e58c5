"""A tiny module system: parameters, buffers and children by dotted name; no autograd.

Every layer implements ``forward(x)`` (caching what its backward needs while ``training``) and
``backward(grad_out) -> grad_in`` (accumulating into each parameter's ``grad``). Names follow
PyTorch's ``state_dict`` (``layer1.0.conv.weight``), so weights map one to one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

import numpy as np


class Parameter:
    """A trainable float32 array ``data`` with its gradient ``grad`` (same shape, or ``None``).

    ``decay``: whether weight decay applies by default (False for BatchNorm, slopes and biases).
    """

    __slots__ = ("data", "decay", "grad")

    def __init__(self, data, decay: bool = True):
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        self.grad = None
        self.decay = decay

    @property
    def shape(self):
        return self.data.shape

    def accumulate(self, g, owned: bool = False) -> None:
        """Add ``g`` to ``grad`` (allocating it on first use). ``owned``: ``g`` is a new array that
        nothing else holds, so a float32 C-contiguous one becomes ``grad`` without a copy."""
        g = np.asarray(g, dtype=np.float32).reshape(self.data.shape)
        if self.grad is None:
            self.grad = g if owned and g.flags.c_contiguous and g.flags.writeable else g.copy()
        else:
            self.grad += g

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape})"


class Module:
    """Base class. Assigning a ``Parameter`` or ``Module`` attribute registers it; buffers are
    registered with :meth:`register_buffer`. Registration order is the state_dict order."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = np.asarray(value)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value) -> None:
        """A non-trainable array saved in the state_dict (e.g. BatchNorm running statistics)."""
        self._buffers[name] = np.asarray(value)
        object.__setattr__(self, name, self._buffers[name])

    def add_module(self, name: str, module: Module) -> None:
        self._modules[name] = module
        object.__setattr__(self, name, module)

    # --- computation -------------------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError

    def backward(self, grad_out):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    # --- traversal ---------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self) -> Iterator[Module]:
        yield from self._modules.values()

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for mname, module in self.named_modules(prefix):
            for pname, p in module._parameters.items():
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
        for mname, module in self.named_modules(prefix):
            for bname, b in module._buffers.items():
                yield (f"{mname}.{bname}" if mname else bname), b

    def state_dict(self) -> OrderedDict:
        """Copies of all parameters and buffers by dotted name, parameters of a module first."""
        out = OrderedDict()
        for mname, module in self.named_modules():
            for pname, p in module._parameters.items():
                out[f"{mname}.{pname}" if mname else pname] = p.data.copy()
            for bname, b in module._buffers.items():
                out[f"{mname}.{bname}" if mname else bname] = np.array(b, copy=True)
        return out

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays from ``state`` into parameters and buffers; shapes must match exactly. The
        model never shares memory with ``state`` (an optimizer step leaves it unchanged).

        With ``strict`` every name must be present and no extra name may appear (``KeyError``).
        """
        own = {}
        for mname, module in self.named_modules():
            for pname in module._parameters:
                own[f"{mname}.{pname}" if mname else pname] = (module, pname, "p")
            for bname in module._buffers:
                own[f"{mname}.{bname}" if mname else bname] = (module, bname, "b")
        if strict:
            missing = [k for k in own if k not in state]
            extra = [k for k in state if k not in own]
            if missing or extra:
                raise KeyError(f"state_dict mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, (module, name, kind) in own.items():
            if key not in state:
                continue
            value = np.asarray(state[key])
            target = module._parameters[name].data if kind == "p" else module._buffers[name]
            if value.shape != target.shape:
                raise ValueError(f"{key}: shape {value.shape} does not match {target.shape}")
            if kind == "p":  # a copy: the caller's array never becomes the parameter's storage
                module._parameters[name].data = np.array(value, dtype=np.float32, order="C", copy=True)
            else:
                setattr(module, name, np.array(value, dtype=target.dtype, copy=True))

    def train(self, mode: bool = True) -> Module:
        for _, module in self.named_modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")
