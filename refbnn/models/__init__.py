"""Model family: Bi-Real Net, the FTBNN baseline and the derived FTBNN models, from plain configs."""

from __future__ import annotations

from refbnn.models.config import ConfigError, from_json, resolve, to_json
from refbnn.models.network import BNNResNet
from refbnn.models.presets import PRESETS
from refbnn.nn import init

__all__ = ["PRESETS", "BNNResNet", "ConfigError", "build", "from_json", "get_config", "list_models",
           "resolve", "to_json"]


def list_models() -> list[str]:
    """Names of the presets, sorted."""
    return sorted(PRESETS)


def get_config(name: str, **overrides) -> dict:
    """The resolved config of preset ``name`` with ``overrides`` applied (before resolution)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return resolve({**PRESETS[name], "name": name, **overrides})


def build(config, seed: int | None = None, **overrides) -> BNNResNet:
    """A freshly initialised model from a preset name or a config dict (plus ``overrides``).

    ``seed``: reseed the layer initialiser first (``refbnn.nn.init.manual_seed``), so the same seed
    gives the same initial weights.
    """
    cfg = get_config(config, **overrides) if isinstance(config, str) else resolve({**config, **overrides})
    if seed is not None:
        init.manual_seed(seed)
    return BNNResNet(cfg)
